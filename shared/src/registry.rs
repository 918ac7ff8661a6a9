//! Reading the worker registry (`cml_workers`): which CML servers there are, which are active,
//! where they answer. The registry belongs to the fleet manager; we never write it.

use bson::{doc, Document};
use futures::TryStreamExt;
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use crate::{config::SyncConfig, Result};

/// Where one worker stands for syncing, as a cycle would see it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// Synced by cycles, at this endpoint.
    Active { endpoint: String },
    /// In the registry, but not running with an endpoint.
    Inactive { status: Option<String> },
    /// Neither in the registry nor in `sync.static_workers`.
    Unknown,
}

/// A registry document, reduced to what syncing and the fleet view need. Unknown fields are
/// ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub aws_region: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub https_endpoint: Option<String>,
    #[serde(default)]
    pub private_ip: Option<String>,
}

impl Worker {
    /// Only running workers with an address are synced.
    pub fn is_active(&self) -> bool {
        self.status.as_deref() == Some("running")
            && self
                .https_endpoint
                .as_deref()
                .is_some_and(|e| !e.trim().is_empty())
    }

    /// Where to reach the worker's CML API: its `https_endpoint`, or with `use_private_ip` the
    /// same URL with the host replaced by `private_ip` (scheme, port and path kept).
    pub fn endpoint(&self, use_private_ip: bool) -> Option<String> {
        let endpoint = self.https_endpoint.as_deref()?.trim();
        if endpoint.is_empty() {
            return None;
        }
        Some(
            match (use_private_ip, self.private_ip.as_deref().map(str::trim)) {
                (true, Some(ip)) if !ip.is_empty() => {
                    with_host(endpoint, ip).unwrap_or_else(|| endpoint.to_owned())
                }
                _ => endpoint.to_owned(),
            },
        )
    }
}

fn with_host(endpoint: &str, host: &str) -> Option<String> {
    let mut url = url::Url::parse(endpoint).ok()?;
    url.set_host(Some(host)).ok()?;
    Some(url.to_string())
}

/// Reads `cml_workers`; never writes it (the registry belongs to the fleet manager).
#[derive(Debug, Clone)]
pub struct WorkerRegistry {
    coll: Collection<Worker>,
}

impl WorkerRegistry {
    pub fn new(db: &Database, collection: &str) -> Self {
        Self {
            coll: db.collection(collection),
        }
    }

    /// Workers with `status == "running"` and a non-empty `https_endpoint`, ordered by id.
    pub async fn active_workers(&self) -> Result<Vec<Worker>> {
        let workers: Vec<Worker> = self
            .coll
            .find(doc! { "status": "running", "https_endpoint": { "$type": "string", "$ne": "" } })
            .projection(projection())
            .sort(doc! { "id": 1 })
            .await?
            .try_collect()
            .await?;
        Ok(workers.into_iter().filter(Worker::is_active).collect())
    }

    /// Every worker of the registry, whatever its status, ordered by id.
    pub async fn all(&self) -> Result<Vec<Worker>> {
        Ok(self
            .coll
            .find(doc! {})
            .projection(projection())
            .sort(doc! { "id": 1 })
            .await?
            .try_collect()
            .await?)
    }

    /// Where worker `id` stands: as [`Self::active_workers`] plus `sync.static_workers` make
    /// the list of a cycle (an active registry entry's endpoint wins over a static one).
    pub async fn standing(
        &self,
        id: &str,
        sync: &SyncConfig,
        use_private_ip: bool,
    ) -> Result<Standing> {
        let registered = if sync.workers_from_registry {
            self.worker(id).await?
        } else {
            None
        };
        Ok(standing(
            registered.as_ref(),
            sync.static_workers
                .iter()
                .find(|w| w.id == id)
                .map(|w| w.endpoint.as_str()),
            use_private_ip,
        ))
    }

    pub async fn worker(&self, id: &str) -> Result<Option<Worker>> {
        Ok(self
            .coll
            .find_one(doc! { "id": id })
            .projection(projection())
            .await?)
    }
}

/// [`WorkerRegistry::standing`] without the reads.
pub fn standing(
    registered: Option<&Worker>,
    fixed: Option<&str>,
    use_private_ip: bool,
) -> Standing {
    if let Some(endpoint) = registered
        .filter(|w| w.is_active())
        .and_then(|w| w.endpoint(use_private_ip))
    {
        return Standing::Active { endpoint };
    }
    match (fixed, registered) {
        (Some(endpoint), _) => Standing::Active {
            endpoint: endpoint.to_owned(),
        },
        (None, Some(w)) => Standing::Inactive {
            status: w.status.clone(),
        },
        (None, None) => Standing::Unknown,
    }
}

fn projection() -> Document {
    doc! { "_id": 0, "id": 1, "name": 1, "aws_region": 1, "status": 1, "https_endpoint": 1, "private_ip": 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(status: &str, endpoint: Option<&str>) -> Worker {
        Worker {
            id: "w".into(),
            name: None,
            aws_region: None,
            status: Some(status.into()),
            https_endpoint: endpoint.map(str::to_owned),
            private_ip: None,
        }
    }

    #[test]
    fn targets_use_the_endpoint_or_the_private_ip() {
        let mut w = worker("running", Some("https://203.0.113.7:8443/cml"));
        w.private_ip = Some("10.1.2.3".into());
        assert_eq!(
            w.endpoint(false),
            Some("https://203.0.113.7:8443/cml".into())
        );
        assert_eq!(w.endpoint(true), Some("https://10.1.2.3:8443/cml".into()));
        w.private_ip = None;
        assert_eq!(
            w.endpoint(true),
            Some("https://203.0.113.7:8443/cml".into())
        );
        assert!(worker("running", Some(" ")).endpoint(false).is_none());
    }

    #[test]
    fn a_workers_standing_follows_the_cycles_list() {
        let running = worker("running", Some("https://10.0.0.1"));
        let stopped = worker("stopped", Some("https://10.0.0.1"));
        let active = |e: &str| Standing::Active { endpoint: e.into() };
        assert_eq!(
            standing(Some(&running), None, false),
            active("https://10.0.0.1")
        );
        assert_eq!(
            standing(Some(&running), Some("https://static"), false),
            active("https://10.0.0.1"),
            "the registry's endpoint wins"
        );
        assert_eq!(
            standing(Some(&stopped), None, false),
            Standing::Inactive {
                status: Some("stopped".into())
            }
        );
        assert_eq!(
            standing(Some(&stopped), Some("https://static"), false),
            active("https://static"),
            "a static worker is always synced"
        );
        assert_eq!(
            standing(None, Some("https://static"), false),
            active("https://static")
        );
        assert_eq!(standing(None, None, false), Standing::Unknown);
    }

    #[test]
    fn only_running_workers_with_an_endpoint_are_active() {
        assert!(worker("running", Some("https://10.0.0.1")).is_active());
        assert!(!worker("running", Some("  ")).is_active());
        assert!(!worker("running", None).is_active());
        assert!(!worker("stopped", Some("https://10.0.0.1")).is_active());
    }
}
