//! The sync lease: one document that lets exactly one sync-daemon replica sync at a time, and
//! the keeper that holds it for this replica.
//!
//! The holder renews it well before it expires; another replica takes it only once it has
//! expired. Replicas compare against their own clocks, so clocks must agree to well within the
//! lease's lifetime (NTP does that easily for a 30 s lease). Each taking starts a new term
//! (`term`, counted up in the document): the fencing token every write of a sync carries
//! ([`shared::fence`]), so a holder that lost the lease and carries on changes nothing its
//! successor wrote.

use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use bson::{doc, DateTime, Document};
use mongodb::{options::ReturnDocument, Collection, Database};
use shared::{fence::Term, mongo::is_duplicate_key, Result};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    context::Context,
    logs::{self, LeaseError, LogLine},
};

#[derive(Debug, Clone)]
pub struct Lease {
    coll: Collection<Document>,
    name: String,
    holder: String,
    ttl: Duration,
    /// The term of this replica's last taking or renewal (0: none yet).
    term: Arc<AtomicI64>,
}

/// Who holds a lease, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    pub holder: String,
    pub expires_at: DateTime,
    /// When the last cycle (of any replica) started.
    pub last_cycle_at: Option<DateTime>,
    /// When the last cycle (of any replica) ended.
    pub last_cycle_end_at: Option<DateTime>,
}

impl LeaseState {
    /// When the last cycle began, if it never ended (its replica died or lost the lease).
    pub fn interrupted_cycle(&self) -> Option<DateTime> {
        let start = self.last_cycle_at?;
        match self.last_cycle_end_at {
            Some(end) if end >= start => None,
            _ => Some(start),
        }
    }

    /// How long before `now` the last cycle started (zero if its start lies ahead).
    pub fn since_last_cycle(&self, now: DateTime) -> Option<Duration> {
        self.last_cycle_at.map(|last| {
            let ms = now
                .timestamp_millis()
                .saturating_sub(last.timestamp_millis());
            Duration::from_millis(u64::try_from(ms).unwrap_or(0))
        })
    }
}

impl Lease {
    /// `holder` names this replica (pod name and a random suffix, say).
    pub fn new(db: &Database, collection: &str, name: &str, holder: &str, ttl: Duration) -> Self {
        Self {
            coll: db.collection(collection),
            name: name.to_owned(),
            holder: holder.to_owned(),
            ttl,
            term: Arc::new(AtomicI64::new(0)),
        }
    }

    /// The term under which this replica last held the lease: what its sync writes carry.
    /// (Still the old one once the lease is lost: the fence then refuses them.)
    pub fn term(&self) -> Term {
        Term(self.term.load(Ordering::SeqCst))
    }

    /// Notes the term of the lease document this replica just took or renewed.
    fn note_term(&self, lease: &Document) {
        let term = match lease.get("term") {
            Some(bson::Bson::Int64(t)) => *t,
            Some(bson::Bson::Int32(t)) => i64::from(*t),
            _ => 0,
        };
        self.term.store(term, Ordering::SeqCst);
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn expiry(&self, now: DateTime) -> DateTime {
        let ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        DateTime::from_millis(now.timestamp_millis().saturating_add(ms))
    }

    /// Takes the lease if it is free, expired or already ours. Ours and not expired: renewed,
    /// in the same term; else taken in a new term (ours but expired as well: somebody may have
    /// taken and given it up meanwhile).
    pub async fn try_acquire(&self, now: DateTime) -> Result<bool> {
        let set =
            doc! { "holder": &self.holder, "expires_at": self.expiry(now), "renewed_at": now };
        let renewed = self
            .coll
            .find_one_and_update(
                doc! {
                    "_id": &self.name,
                    "holder": &self.holder,
                    "expires_at": { "$gt": now },
                    "term": { "$exists": true },
                },
                doc! { "$set": set.clone() },
            )
            .return_document(ReturnDocument::After)
            .await?;
        if let Some(lease) = renewed {
            self.note_term(&lease);
            return Ok(true);
        }
        let taken = self
            .coll
            .find_one_and_update(
                doc! {
                    "_id": &self.name,
                    "$or": [{ "holder": &self.holder }, { "expires_at": { "$lte": now } }],
                },
                doc! { "$set": set, "$inc": { "term": 1_i64 } },
            )
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await;
        match taken {
            Ok(Some(lease)) => {
                self.note_term(&lease);
                Ok(true)
            }
            Ok(None) => Ok(false),
            // Held by someone else: the filter missed and the insert hit the existing _id.
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Extends the lease if this replica still holds it; false when it was lost.
    pub async fn renew(&self, now: DateTime) -> Result<bool> {
        let r = self
            .coll
            .update_one(
                doc! { "_id": &self.name, "holder": &self.holder },
                doc! { "$set": { "expires_at": self.expiry(now), "renewed_at": now } },
            )
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Gives the lease up at once, so a standby replica need not wait for it to expire.
    pub async fn release(&self) -> Result<()> {
        self.coll
            .update_one(
                doc! { "_id": &self.name, "holder": &self.holder },
                doc! { "$set": { "expires_at": DateTime::from_millis(0) } },
            )
            .await?;
        Ok(())
    }

    /// Notes that a cycle started, so a replica taking over keeps the schedule.
    pub async fn record_cycle(&self, at: DateTime) -> Result<()> {
        self.note("last_cycle_at", at).await
    }

    /// Notes that a cycle ended, so a replica taking over reports when the fleet last synced.
    pub async fn record_cycle_end(&self, at: DateTime) -> Result<()> {
        self.note("last_cycle_end_at", at).await
    }

    /// Sets `field` of the lease document while this replica holds it (else nothing).
    async fn note(&self, field: &str, at: DateTime) -> Result<()> {
        self.coll
            .update_one(
                doc! { "_id": &self.name, "holder": &self.holder },
                doc! { "$set": { field: at } },
            )
            .await?;
        Ok(())
    }

    pub async fn state(&self) -> Result<Option<LeaseState>> {
        let Some(d) = self.coll.find_one(doc! { "_id": &self.name }).await? else {
            return Ok(None);
        };
        Ok(Some(LeaseState {
            holder: d.get_str("holder").unwrap_or("").to_owned(),
            expires_at: d
                .get_datetime("expires_at")
                .copied()
                .unwrap_or(DateTime::from_millis(0)),
            last_cycle_at: d.get_datetime("last_cycle_at").ok().copied(),
            last_cycle_end_at: d.get_datetime("last_cycle_end_at").ok().copied(),
        }))
    }
}

/// Holds the lease for this replica: tries to take it, renews it every third of its lifetime,
/// and tells the loop when it was taken or lost.
#[derive(Debug)]
pub struct LeaseKeeper {
    held: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    pub fn start(ctx: Arc<Context>, shutdown: CancellationToken) -> Self {
        let (tx, held) = watch::channel(false);
        let task = tokio::spawn(keep(ctx, tx, shutdown));
        Self { held, task }
    }

    pub fn held(&self) -> bool {
        *self.held.borrow()
    }

    /// Whether this replica holds the lease, for tasks that act only while it does.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.held.clone()
    }

    /// Waits until the lease is taken or lost; `None` once the keeper has stopped.
    pub async fn changed(&mut self) -> Option<bool> {
        self.held.changed().await.ok()?;
        Some(*self.held.borrow_and_update())
    }

    /// Stops renewing and gives the lease up, so a standby need not wait for it to expire.
    pub async fn release(self, ctx: &Context) {
        self.task.abort();
        if *self.held.borrow() {
            match ctx.lease.release().await {
                Ok(()) => logs::LeaseChange::Released {
                    holder: ctx.lease.holder(),
                }
                .emit(&ctx.metrics),
                Err(e) => LeaseError {
                    error: &e.into(),
                    action: "release",
                }
                .emit(&ctx.metrics),
            }
        }
        ctx.metrics.lease_held.set(0.0);
    }
}

async fn keep(ctx: Arc<Context>, tx: watch::Sender<bool>, shutdown: CancellationToken) {
    let ttl = ctx.lease.ttl();
    let mut last_renewal: Option<Instant> = None;
    let mut first = true;
    loop {
        let was = *tx.borrow();
        let held = match ctx.lease.try_acquire(DateTime::now()).await {
            Ok(true) => {
                last_renewal = Some(Instant::now());
                true
            }
            Ok(false) => false,
            Err(e) => {
                LeaseError {
                    error: &e.into(),
                    action: "renew",
                }
                .emit(&ctx.metrics);
                // Unsure whether it still holds: keep it only while it surely has not expired.
                was && last_renewal.is_some_and(|t| t.elapsed() < ttl * 2 / 3)
            }
        };
        let holder = ctx.lease.holder();
        match (was, held) {
            (false, true) => logs::LeaseChange::Acquired { holder }.emit(&ctx.metrics),
            (true, false) => logs::LeaseChange::Lost { holder }.emit(&ctx.metrics),
            (false, false) if first => logs::LeaseChange::StandingBy { holder }.emit(&ctx.metrics),
            _ => {}
        }
        first = false;
        if held != was {
            let _ = tx.send(held);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
    }
}
