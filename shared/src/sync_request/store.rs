//! Reading and writing `sync_requests`: lab-api records a refresh (throttled per worker), the
//! lease holder claims and finishes it; a TTL index removes requests a day after they were
//! made. Throttle notices (a refresh refused, for the event stream of every lab-api replica) are
//! documents of their own (`_id: "throttled:…"`, `notice: "throttled"`). The throttle and the
//! one-active rule are decided by the database, whichever replica records a request: every
//! accepted request first takes its worker's gate ([`Gate`], `_id: "gate:<worker_id>"`) by
//! one conditional upsert (free: not busy and released long enough ago; else the upsert
//! collides with the gate's `_id` and the request is refused), and finishing a request lets
//! go of it. Gates and notices have no `status` field, so no read of requests sees them.
//! (Markers `active:<worker_id>` of earlier versions are read by nothing; the TTL index
//! removes them.)

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
    sync_request::{throttle, Gate, RequestStatus, SyncRequest},
    Result,
};

/// How long requests are kept.
pub const KEEP_REQUESTS: Duration = Duration::from_secs(86_400);

/// How often [`RequestStore::wait_finished`] reads a request when change streams fail.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Request `id`, never a gate or a notice that share the collection (and might be asked
/// for by their ids): those have no `status`.
fn only_request(id: &str) -> Document {
    doc! { "_id": id, "status": { "$exists": true } }
}

/// How long a gate may be busy for a request that was never written before [`RequestStore::record`]
/// lets go of it (its recorder stopped between the two writes).
const STUCK_AFTER: Duration = Duration::from_secs(60);

/// What taking a gate came to.
enum Take {
    /// Taken; the gate as it was before (`None`: new).
    Taken(Option<Gate>),
    /// Somebody's request holds it, or the last one ended too recently.
    Held,
}
use Take::{Held, Taken};

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

    /// The TTL index (gates and notices carry `requested_at` too) and the latest-first index.
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

    /// Records a refresh of `worker_id` unless the throttle refuses it. Decided by one
    /// conditional update of the worker's gate (taken when free, else a duplicate key), so
    /// that any number of replicas recording at once let exactly one request through.
    pub async fn record(
        &self,
        id: String,
        worker_id: &str,
        now: DateTime,
        min_interval: Duration,
    ) -> Result<Recorded> {
        self.record_by(id, worker_id, None, now, min_interval).await
    }

    /// [`RequestStore::record`], noting who asked (a CML username; `None`: an admin of the
    /// fleet, or anyone where access is open): its status is theirs to read.
    pub async fn record_by(
        &self,
        id: String,
        worker_id: &str,
        requested_by: Option<&str>,
        now: DateTime,
        min_interval: Duration,
    ) -> Result<Recorded> {
        // A few rounds: the gate may be let go (or healed) between a refusal and its reading.
        for _ in 0..3 {
            let held = match self.take_gate(&id, worker_id, now, min_interval).await? {
                Taken(before) => {
                    return self
                        .insert_through(id, worker_id, requested_by, now, before)
                        .await
                }
                Held => self.gate(worker_id).await?,
            };
            let Some(gate) = held else { continue };
            if gate.busy && self.heal(&gate, now).await? {
                continue;
            }
            if let Some(retry_after) = throttle(Some(&gate), now, min_interval) {
                let latest = self.holding_back(&gate).await?;
                return Ok(Recorded::Throttled {
                    retry_after,
                    latest: Box::new(latest),
                });
            }
        }
        // Contended all along: somebody else's refresh keeps getting through.
        let latest = self.latest(worker_id).await?;
        Ok(Recorded::Throttled {
            retry_after: min_interval.max(Duration::from_secs(1)),
            latest: Box::new(
                latest.unwrap_or_else(|| SyncRequest::pending(id, worker_id.to_owned(), now)),
            ),
        })
    }

    /// Takes `worker_id`'s gate for request `id` when it is free (creating it the first
    /// time): what it was before (`None`: it is new). A gate that exists and is not free makes
    /// the upsert insert a second document with its `_id`: a duplicate key, so `Held`.
    async fn take_gate(
        &self,
        id: &str,
        worker_id: &str,
        now: DateTime,
        min_interval: Duration,
    ) -> Result<Take> {
        let taken = self
            .gates()
            .find_one_and_update(
                Gate::free(worker_id, now, min_interval),
                doc! { "$set": {
                    "gate_worker_id": worker_id,
                    "request_id": id,
                    "requested_at": now,
                    "busy": true,
                } },
            )
            .upsert(true)
            .return_document(ReturnDocument::Before)
            .await;
        match taken {
            Ok(before) => Ok(Taken(before)),
            Err(e) if is_duplicate_key(&e) => Ok(Held),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the request that took the gate; when that fails, puts the gate back as it was.
    async fn insert_through(
        &self,
        id: String,
        worker_id: &str,
        requested_by: Option<&str>,
        now: DateTime,
        before: Option<Gate>,
    ) -> Result<Recorded> {
        let mut request = SyncRequest::pending(id, worker_id.to_owned(), now);
        request.requested_by = requested_by.map(str::to_owned);
        let Err(e) = self.coll.insert_one(&request).await else {
            return Ok(Recorded::Accepted(Box::new(request)));
        };
        let ours = doc! { "_id": Gate::id_of(worker_id), "request_id": &request.id };
        let _ = match before {
            Some(before) => self.gates().replace_one(ours, before).await.map(drop),
            None => self.gates().delete_one(ours).await.map(drop),
        };
        Err(e.into())
    }

    async fn gate(&self, worker_id: &str) -> Result<Option<Gate>> {
        Ok(self
            .gates()
            .find_one(doc! { "_id": Gate::id_of(worker_id) })
            .await?)
    }

    /// Lets go of a busy gate whose request is over but was not let go of (its finisher
    /// stopped between the two writes, or is a version that knows no gates), or whose request
    /// was never written ([`STUCK_AFTER`] on). Whether it did.
    async fn heal(&self, gate: &Gate, now: DateTime) -> Result<bool> {
        let released_at = match self.get(&gate.request_id).await? {
            Some(r) if r.status.is_finished() => r.finished_at.unwrap_or(now),
            Some(_) => return Ok(false),
            None => {
                let stuck_ms = i64::try_from(STUCK_AFTER.as_millis()).unwrap_or(i64::MAX);
                if now.timestamp_millis() - gate.requested_at.timestamp_millis() < stuck_ms {
                    return Ok(false);
                }
                gate.released_at.unwrap_or(gate.requested_at)
            }
        };
        let r = self
            .gates()
            .update_one(
                doc! { "_id": &gate.id, "request_id": &gate.request_id, "busy": true },
                doc! { "$set": { "busy": false, "released_at": released_at } },
            )
            .await?;
        Ok(r.modified_count == 1)
    }

    /// The request a closed gate holds back: the one that went through it last (still being
    /// written, when the gate was taken a moment ago: as the gate has it, pending).
    async fn holding_back(&self, gate: &Gate) -> Result<SyncRequest> {
        if let Some(r) = self.get(&gate.request_id).await? {
            return Ok(r);
        }
        Ok(match self.latest(&gate.gate_worker_id).await? {
            Some(r) => r,
            None => SyncRequest::pending(
                gate.request_id.clone(),
                gate.gate_worker_id.clone(),
                gate.requested_at,
            ),
        })
    }

    fn gates(&self) -> Collection<Gate> {
        self.coll.clone_with_type()
    }

    fn documents(&self) -> Collection<Document> {
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
            .documents()
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
        self.documents().insert_one(notice).await?;
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

    /// Writes the outcome of request `id`, which `holder` took; it is no longer active. Whether
    /// it was written: not when the request is no longer `holder`'s (a new lease holder took
    /// it back from a holder that lost the lease, to serve it itself).
    pub async fn finish(
        &self,
        id: &str,
        holder: &str,
        outcome: &Outcome,
        now: DateTime,
    ) -> Result<bool> {
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
            .find_one_and_update(
                doc! { "_id": id, "status": "running", "claimed_by": holder },
                doc! { "$set": set },
            )
            .return_document(ReturnDocument::After)
            .await?;
        let Some(r) = finished else {
            return Ok(false);
        };
        self.gates()
            .update_one(
                doc! { "_id": Gate::id_of(&r.worker_id), "request_id": &r.id },
                doc! { "$set": { "busy": false, "released_at": now } },
            )
            .await?;
        Ok(true)
    }
}
