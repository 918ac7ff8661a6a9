//! The sync lease: one document that lets exactly one sync-daemon replica sync at a time.
//!
//! The holder renews it well before it expires; another replica takes it only once it has
//! expired. Replicas compare against their own clocks, so clocks must agree to well within the
//! lease's lifetime (NTP does that easily for a 30 s lease).

use std::time::Duration;

use bson::{doc, DateTime, Document};
use mongodb::{error::ErrorKind, Collection, Database};

use crate::Result;

const DUPLICATE_KEY: i32 = 11000;

#[derive(Debug, Clone)]
pub struct Lease {
    coll: Collection<Document>,
    name: String,
    holder: String,
    ttl: Duration,
}

/// Who holds a lease, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    pub holder: String,
    pub expires_at: DateTime,
    pub last_cycle_at: Option<DateTime>,
}

impl Lease {
    /// `holder` names this replica (pod name and a random suffix, say).
    pub fn new(db: &Database, collection: &str, name: &str, holder: &str, ttl: Duration) -> Self {
        Self {
            coll: db.collection(collection),
            name: name.to_owned(),
            holder: holder.to_owned(),
            ttl,
        }
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

    /// Takes the lease if it is free, expired or already ours; renews it in the last case.
    pub async fn try_acquire(&self, now: DateTime) -> Result<bool> {
        let filter = doc! {
            "_id": &self.name,
            "$or": [{ "holder": &self.holder }, { "expires_at": { "$lte": now } }],
        };
        let update = doc! { "$set": { "holder": &self.holder, "expires_at": self.expiry(now), "renewed_at": now } };
        match self.coll.update_one(filter, update).upsert(true).await {
            Ok(r) => Ok(r.matched_count == 1 || r.upserted_id.is_some()),
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
        self.coll
            .update_one(
                doc! { "_id": &self.name, "holder": &self.holder },
                doc! { "$set": { "last_cycle_at": at } },
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
        }))
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match &*e.kind {
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => e.to_string().contains("E11000"),
    }
}
