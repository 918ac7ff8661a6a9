//! Reading and writing `sync_requests`: lab-api records a refresh (throttled per worker), the
//! lease holder claims and finishes it; a TTL index removes requests a day after they were
//! made. Throttle notices (a refresh refused, for the event stream of every lab-api replica) are
//! documents of their own (`_id: "throttled:…"`, `notice: "throttled"`). One request per
//! worker is active at a time, whichever replica records it: recording
//! first inserts a marker document whose `_id` names the worker (`active:<worker_id>`, unique
//! by nature), and finishing deletes it. Markers have no `worker_id` or `status` field, so no
//! query for requests sees them. (Not a unique index on a field that changes: every index
//! stays correct for updates that change no indexed value.)

use std::time::Duration;

use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use mongodb::{
    options::{IndexOptions, ReturnDocument},
    Collection, Database, IndexModel,
};

use crate::{
    mongo::{self, is_duplicate_key},
    status::SyncCounts,
    sync_request::{throttle, RequestStatus, SyncRequest, Throttle},
    Result,
};

/// How long requests are kept.
pub const KEEP_REQUESTS: Duration = Duration::from_secs(86_400);

/// How often [`RequestStore::wait_finished`] reads a request when change streams fail.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Request `id`, never a marker or a notice that share the collection (and might be asked
/// for by their ids): those have no `status`.
fn only_request(id: &str) -> Document {
    doc! { "_id": id, "status": { "$exists": true } }
}

/// The marker of a worker's active request.
fn marker_id(worker_id: &str) -> String {
    format!("active:{worker_id}")
}

/// What recording a refresh came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    Accepted(Box<SyncRequest>),
    Throttled {
        retry_after: Duration,
        latest: Box<SyncRequest>,
    },
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done {
        counts: SyncCounts,
        duration_ms: i64,
    },
    Failed {
        kind: String,
        error: String,
        duration_ms: i64,
    },
}

/// The `sync_requests` collection.
#[derive(Debug, Clone)]
pub struct RequestStore {
    coll: Collection<SyncRequest>,
}

impl RequestStore {
    pub fn new(db: &Database, collection: &str) -> Self {
        Self {
            coll: db.collection(collection),
        }
    }

    /// The TTL index (markers carry `requested_at` too) and the latest-first index.
    pub async fn ensure_indexes(&self) -> Result<()> {
        let ttl = IndexModel::builder()
            .keys(doc! { "requested_at": 1 })
            .options(
                IndexOptions::builder()
                    .name("requested_at_ttl".to_owned())
                    .expire_after(KEEP_REQUESTS)
                    .build(),
            )
            .build();
        let latest = mongo::index(
            doc! { "worker_id": 1, "requested_at": -1 },
            "worker_latest",
            false,
        );
        mongo::ensure_indexes(&self.coll.clone_with_type::<Document>(), [ttl, latest]).await
    }

    /// The worker's most recent request.
    pub async fn latest(&self, worker_id: &str) -> Result<Option<SyncRequest>> {
        Ok(self
            .coll
            .find_one(doc! { "worker_id": worker_id })
            .sort(doc! { "requested_at": -1 })
            .await?)
    }

    pub async fn get(&self, id: &str) -> Result<Option<SyncRequest>> {
        Ok(self.coll.find_one(only_request(id)).await?)
    }

    /// Records a refresh of `worker_id` unless the throttle refuses it. Two replicas recording
    /// one at the same moment: the marker lets one in, the other is throttled.
    pub async fn record(
        &self,
        id: String,
        worker_id: &str,
        now: DateTime,
        min_interval: Duration,
    ) -> Result<Recorded> {
        let latest = self.latest(worker_id).await?;
        if let Throttle::Refuse {
            retry_after,
            latest,
        } = throttle(latest.as_ref(), now, min_interval)
        {
            return Ok(Recorded::Throttled {
                retry_after,
                latest,
            });
        }
        let request = SyncRequest::pending(id, worker_id.to_owned(), now);
        let marker = doc! {
            "_id": marker_id(worker_id),
            "request_id": &request.id,
            "requested_at": now,
        };
        match self.markers().insert_one(marker).await {
            Ok(_) => {}
            Err(e) if is_duplicate_key(&e) => {
                // Another replica recorded one a moment ago: it is active, so the throttle
                // asks for a whole interval.
                let latest = self.latest(worker_id).await?;
                return Ok(Recorded::Throttled {
                    retry_after: min_interval,
                    latest: Box::new(latest.unwrap_or(request)),
                });
            }
            Err(e) => return Err(e.into()),
        }
        if let Err(e) = self.coll.insert_one(&request).await {
            let _ = self
                .markers()
                .delete_one(doc! { "_id": marker_id(worker_id) })
                .await;
            return Err(e.into());
        }
        Ok(Recorded::Accepted(Box::new(request)))
    }

    fn markers(&self) -> Collection<Document> {
        self.coll.clone_with_type()
    }

    /// Takes the oldest pending request for replica `holder`: it is running from now.
    pub async fn claim(&self, now: DateTime, holder: &str) -> Result<Option<SyncRequest>> {
        Ok(self
            .coll
            .find_one_and_update(
                doc! { "status": "pending" },
                doc! { "$set": { "status": "running", "started_at": now, "claimed_by": holder } },
            )
            .sort(doc! { "requested_at": 1 })
            .return_document(ReturnDocument::After)
            .await?)
    }

    /// Requests another replica took and never finished (it died, or lost the lease) are
    /// pending again, for `holder` (the new lease holder) to serve. Returns how many.
    pub async fn requeue_orphans(&self, holder: &str) -> Result<u64> {
        let r = self
            .coll
            .update_many(
                doc! { "status": "running", "claimed_by": { "$ne": holder } },
                doc! { "$set": { "status": "pending" }, "$unset": { "started_at": "", "claimed_by": "" } },
            )
            .await?;
        Ok(r.modified_count)
    }

    /// The ids of the requests `holder` has taken and not finished.
    pub async fn claimed_by(&self, holder: &str) -> Result<Vec<String>> {
        let docs: Vec<Document> = self
            .markers()
            .find(doc! { "status": "running", "claimed_by": holder })
            .projection(doc! { "_id": 1 })
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .into_iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
            .collect())
    }

    /// A request taken but not served (the replica stopped syncing before it started) is
    /// pending again.
    pub async fn requeue(&self, id: &str) -> Result<()> {
        self.coll
            .update_one(
                doc! { "_id": id, "status": "running" },
                doc! { "$set": { "status": "pending" }, "$unset": { "started_at": "", "claimed_by": "" } },
            )
            .await?;
        Ok(())
    }

    /// Tells every lab-api replica (through its change stream) that a refresh of `worker_id`
    /// was refused for `retry_after`.
    pub async fn notice_throttled(
        &self,
        id: &str,
        worker_id: &str,
        retry_after: Duration,
        now: DateTime,
    ) -> Result<()> {
        let notice = doc! {
            "_id": format!("throttled:{id}"),
            "notice": "throttled",
            "throttled_worker_id": worker_id,
            "retry_after_seconds": i64::try_from(retry_after.as_secs()).unwrap_or(i64::MAX),
            "requested_at": now,
        };
        self.markers().insert_one(notice).await?;
        Ok(())
    }

    /// Waits up to `timeout` for request `id` to finish: woken by a change stream on the
    /// request, else (change streams unavailable) reading it every second. Returns it as it is
    /// then (finished or not); `None` when there is no such request.
    pub async fn wait_finished(&self, id: &str, timeout: Duration) -> Result<Option<SyncRequest>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let watched = self
            .coll
            .watch()
            .pipeline([doc! { "$match": { "documentKey._id": id } }])
            .await;
        let mut changes = watched.ok();
        loop {
            let request = self.get(id).await?;
            if request.as_ref().is_none_or(|r| r.status.is_finished()) {
                return Ok(request);
            }
            let woken = match changes.as_mut() {
                Some(stream) => {
                    tokio::time::timeout_at(deadline, futures::StreamExt::next(stream)).await
                }
                None => {
                    let next = (tokio::time::Instant::now() + POLL_EVERY).min(deadline);
                    tokio::time::sleep_until(next).await;
                    Ok(None)
                }
            };
            match woken {
                Err(_) => return Ok(request),
                Ok(Some(Ok(_))) => {}
                // The stream failed or ended: read every second from now on.
                Ok(Some(Err(_)) | None) if changes.is_some() => changes = None,
                Ok(_) if tokio::time::Instant::now() >= deadline => return self.get(id).await,
                Ok(_) => {}
            }
        }
    }

    /// Writes a request's outcome; it is no longer active.
    pub async fn finish(&self, id: &str, outcome: &Outcome, now: DateTime) -> Result<()> {
        let mut set = match outcome {
            Outcome::Done {
                counts,
                duration_ms,
            } => doc! {
                "status": bson::to_bson(&RequestStatus::Done)?,
                "counts": bson::to_bson(counts)?,
                "duration_ms": duration_ms,
            },
            Outcome::Failed {
                kind,
                error,
                duration_ms,
            } => doc! {
                "status": bson::to_bson(&RequestStatus::Failed)?,
                "error_kind": kind,
                "error": error,
                "duration_ms": duration_ms,
            },
        };
        set.insert("finished_at", now);
        let finished = self
            .coll
            .find_one_and_update(doc! { "_id": id }, doc! { "$set": set })
            .return_document(ReturnDocument::After)
            .await?;
        if let Some(r) = finished {
            self.markers()
                .delete_one(doc! { "_id": marker_id(&r.worker_id), "request_id": &r.id })
                .await?;
        }
        Ok(())
    }
}
