//! The `cml_accounts` collection: each user's account on each worker (admin or not, its
//! groups), as the worker's last read of its users and groups gave it. sync-daemon writes a
//! worker's accounts when they change; lab-api reads a caller's by its username (one indexed
//! query) and decides from them what it may see ([`crate::access::grant`]). An account gone
//! from its server is marked `removed_at` (whoever follows the collection learns whose access
//! changed) and deleted a day later.

use std::collections::HashMap;

use bson::{doc, Bson, DateTime, Document};
use futures::TryStreamExt;
use mongodb::{options::IndexOptions, Collection, Database, IndexModel};

use crate::{access::Account, mongo, Result};

/// Most workers one caller's accounts are read from (a fleet larger than this shows a user
/// the labs of the first this many workers, by id).
pub const MAX_ACCOUNTS_PER_USER: i64 = 10_000;

/// What writing a worker's accounts did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountsWritten {
    pub upserted: u64,
    pub removed: u64,
    pub unchanged: u64,
}

/// Access to `cml_accounts`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AccountStore {
    db: Database,
    coll: Collection<Document>,
}

impl AccountStore {
    pub fn new(db: &Database, collection: &str) -> Self {
        Self {
            db: db.clone(),
            coll: db.collection(collection),
        }
    }

    /// One account per (username, worker); a caller's accounts are one range of it.
    pub async fn ensure_indexes(&self) -> Result<()> {
        mongo::ensure_indexes(
            &self.coll,
            [
                mongo::index(
                    doc! { "username": 1, "worker_id": 1 },
                    "username_1_worker_id_1",
                    true,
                ),
                mongo::index(doc! { "worker_id": 1 }, "worker_id_1", false),
                IndexModel::builder()
                    .keys(doc! { "removed_at": 1 })
                    .options(
                        IndexOptions::builder()
                            .name("removed_at_ttl".to_owned())
                            .expire_after(std::time::Duration::from_secs(86_400))
                            .build(),
                    )
                    .build(),
            ],
        )
        .await
    }

    /// The accounts of the user named `username`, on every worker. A name is compared for
    /// equality only: never read as an operator or a pattern.
    pub async fn of_user(&self, username: &str) -> Result<Vec<Account>> {
        let docs: Vec<Document> = self
            .coll
            .find(doc! { "username": username, "removed_at": Bson::Null })
            .sort(doc! { "username": 1, "worker_id": 1 })
            .limit(MAX_ACCOUNTS_PER_USER)
            .await?
            .try_collect()
            .await?;
        Ok(docs.iter().filter_map(account).collect())
    }

    /// The accounts of one worker.
    pub async fn of_worker(&self, worker_id: &str) -> Result<Vec<Account>> {
        let docs: Vec<Document> = self
            .coll
            .find(doc! { "worker_id": worker_id, "removed_at": Bson::Null })
            .await?
            .try_collect()
            .await?;
        Ok(docs.iter().filter_map(account).collect())
    }

    /// Makes a worker's accounts these: writes those that changed (one `update` command),
    /// marks those gone. Costs one read and, when nothing changed, no write.
    pub async fn replace_worker(
        &self,
        worker_id: &str,
        accounts: &[Account],
        now: DateTime,
    ) -> Result<AccountsWritten> {
        let stored = self.of_worker(worker_id).await?;
        self.write_changes(worker_id, &stored, accounts, now).await
    }

    /// [`AccountStore::replace_worker`] against accounts read before (`stored`: the worker's
    /// accounts as [`AccountStore::of_worker`] gave them), so that the read can be made while
    /// CML answers: no write when nothing changed.
    pub async fn write_changes(
        &self,
        worker_id: &str,
        stored: &[Account],
        accounts: &[Account],
        now: DateTime,
    ) -> Result<AccountsWritten> {
        let stored: HashMap<&str, &Account> =
            stored.iter().map(|a| (a.username.as_str(), a)).collect();
        let mut written = AccountsWritten::default();
        let mut statements = Vec::new();
        for a in accounts.iter().filter(|a| a.worker_id == worker_id) {
            if stored.get(a.username.as_str()) == Some(&a) {
                written.unchanged += 1;
                continue;
            }
            statements.push(doc! {
                "q": { "username": &a.username, "worker_id": worker_id },
                "u": {
                    "$set": { "admin": a.admin, "groups": &a.groups, "read_at": now },
                    "$unset": { "removed_at": "" },
                },
                "upsert": true,
            });
        }
        if !statements.is_empty() {
            let n = statements.len();
            mongo::update_command(&self.db, self.coll.name(), statements, |_| true).await?;
            written.upserted = n as u64;
        }
        // Gone accounts are marked, not deleted, so that whoever follows the collection learns
        // whose access changed; a TTL index deletes them a day later.
        let current: Vec<&str> = accounts.iter().map(|a| a.username.as_str()).collect();
        let gone: Vec<&str> = stored
            .keys()
            .copied()
            .filter(|u| !current.contains(u))
            .collect();
        if !gone.is_empty() {
            written.removed = self
                .coll
                .update_many(
                    doc! { "worker_id": worker_id, "username": { "$in": gone }, "removed_at": Bson::Null },
                    doc! { "$set": { "removed_at": now, "admin": false, "groups": [] } },
                )
                .await?
                .modified_count;
        }
        Ok(written)
    }
}

fn account(d: &Document) -> Option<Account> {
    Some(Account {
        worker_id: d.get_str("worker_id").ok()?.to_owned(),
        username: d.get_str("username").ok()?.to_owned(),
        admin: d.get_bool("admin").unwrap_or(false),
        groups: d
            .get_array("groups")
            .map(|a| {
                a.iter()
                    .filter_map(|g| g.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    })
}
