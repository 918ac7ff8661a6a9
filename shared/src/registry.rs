//! Reading the worker registry (`cml_workers`): which CML servers there are, which are active,
//! where they answer. The registry belongs to the fleet manager; we never write it.

use bson::{doc, Document};
use futures::TryStreamExt;
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use crate::Result;

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

    pub async fn worker(&self, id: &str) -> Result<Option<Worker>> {
        Ok(self
            .coll
            .find_one(doc! { "id": id })
            .projection(projection())
            .await?)
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
    fn only_running_workers_with_an_endpoint_are_active() {
        assert!(worker("running", Some("https://10.0.0.1")).is_active());
        assert!(!worker("running", Some("  ")).is_active());
        assert!(!worker("running", None).is_active());
        assert!(!worker("stopped", Some("https://10.0.0.1")).is_active());
    }
}
