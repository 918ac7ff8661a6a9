//! The `lab_records` collection: indexes, applying a sync plan in one or two round trips, queries.

use std::time::Duration;

use bson::{doc, Bson, DateTime, Document};
use futures::TryStreamExt;
use mongodb::{
    error::ErrorKind,
    options::{IndexOptions, UpdateManyModel, UpdateOneModel, WriteModel},
    Client, Collection, Database, IndexModel, Namespace,
};
use tokio::sync::OnceCell;

use crate::{
    change::{RecordWrite, SyncPlan},
    config::{BatchWriteMode, MongoConfig},
    cursor::PageCursor,
    record::{HistoryEntry, LabFields, LabRecord},
    Error, Result,
};

/// MongoDB's error code for a unique index violation.
const DUPLICATE_KEY: i32 = 11000;
/// Commands are single BSON documents (16 MiB at most); statements are batched well below that.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// The server's `maxWriteBatchSize` since 3.6.
const MAX_BATCH_STATEMENTS: usize = 100_000;

/// Access to `lab_records`. Cheap to clone; holds no state but the handle and the server's
/// capabilities, learned once.
#[derive(Debug, Clone)]
pub struct LabStore {
    client: Client,
    db: Database,
    records: Collection<LabRecord>,
    raw: Collection<Document>,
    history_limit: usize,
    batch_mode: BatchWriteMode,
    bulk_write_command: std::sync::Arc<OnceCell<bool>>,
}

/// What applying a plan did, as MongoDB counted it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Records inserted.
    pub created: u64,
    /// Record writes (updates, removals, creates raced by another writer) that matched a record.
    pub matched: u64,
    /// Updates and removals skipped because the record was synced by someone else in between.
    pub conflicts: u64,
    /// Unchanged records whose `last_synced_at` was stamped.
    pub stamped: u64,
    /// Commands sent to MongoDB.
    pub round_trips: u32,
}

/// Filters of the cross-worker listing. Values are compared for equality only: a value is
/// never interpreted as a query operator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabFilter {
    pub worker_id: Option<String>,
    pub state: Option<String>,
    pub owner_username: Option<String>,
    pub include_removed: bool,
}

/// One page of the cross-worker listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub records: Vec<LabRecord>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<PageCursor>,
}

/// One statement of the `update` command.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Statement {
    pub filter: Document,
    pub update: Document,
    pub upsert: bool,
    pub multi: bool,
}

impl Statement {
    fn to_document(&self) -> Document {
        doc! { "q": &self.filter, "u": &self.update, "upsert": self.upsert, "multi": self.multi }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct BatchCounts {
    matched: u64,
    upserted: u64,
    round_trips: u32,
}

impl LabStore {
    pub fn new(client: &Client, cfg: &MongoConfig, history_limit: usize) -> Self {
        let db = client.database(&cfg.database);
        Self {
            client: client.clone(),
            records: db.collection(&cfg.lab_records_collection),
            raw: db.collection(&cfg.lab_records_collection),
            db,
            history_limit: history_limit.max(1),
            batch_mode: cfg.batch_writes,
            bulk_write_command: Default::default(),
        }
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn collection_name(&self) -> &str {
        self.raw.name()
    }

    /// Creates the indexes queries rely on. Idempotent; an index that already exists with the
    /// same keys (under any name, e.g. made by the system this replaces) is left alone.
    pub async fn ensure_indexes(&self) -> Result<()> {
        let wanted = [
            IndexModel::builder()
                .keys(doc! { "worker_id": 1 })
                .options(
                    IndexOptions::builder()
                        .name("worker_id_1".to_owned())
                        .build(),
                )
                .build(),
            IndexModel::builder()
                .keys(doc! { "worker_id": 1, "lab_id": 1 })
                .options(
                    IndexOptions::builder()
                        .name("worker_id_1_lab_id_1".to_owned())
                        .unique(true)
                        .build(),
                )
                .build(),
            IndexModel::builder()
                .keys(doc! { "last_synced_at": 1 })
                .options(
                    IndexOptions::builder()
                        .name("last_synced_at_1".to_owned())
                        .build(),
                )
                .build(),
            // Tombstone purges look only at removed records.
            IndexModel::builder()
                .keys(doc! { "removed_at": 1 })
                .options(
                    IndexOptions::builder()
                        .name("removed_at_1".to_owned())
                        .partial_filter_expression(doc! { "removed_at": { "$type": "date" } })
                        .build(),
                )
                .build(),
        ];
        ensure_indexes(&self.raw, wanted).await
    }

    /// Every record of a worker, removed ones included, without `operation_history`:
    /// what the daemon diffs a fresh listing against.
    pub async fn records_for_sync(&self, worker_id: &str) -> Result<Vec<LabRecord>> {
        let cursor = self
            .records
            .find(doc! { "worker_id": worker_id })
            .projection(doc! { "operation_history": 0 })
            .await?;
        Ok(cursor.try_collect().await?)
    }

    /// A worker's labs sorted by title then lab id, without `operation_history`.
    pub async fn labs_of_worker(
        &self,
        worker_id: &str,
        include_removed: bool,
    ) -> Result<Vec<LabRecord>> {
        let mut filter = doc! { "worker_id": worker_id };
        if !include_removed {
            filter.insert("removed_at", Bson::Null);
        }
        let cursor = self
            .records
            .find(filter)
            .sort(doc! { "title": 1, "lab_id": 1 })
            .projection(doc! { "operation_history": 0 })
            .await?;
        Ok(cursor.try_collect().await?)
    }

    /// One record, with its history.
    pub async fn lab(&self, worker_id: &str, lab_id: &str) -> Result<Option<LabRecord>> {
        Ok(self
            .records
            .find_one(doc! { "worker_id": worker_id, "lab_id": lab_id })
            .await?)
    }

    /// The cross-worker listing, ordered by (worker_id, lab_id) so a cursor is just the last key.
    pub async fn list(
        &self,
        filter: &LabFilter,
        after: Option<&PageCursor>,
        limit: usize,
    ) -> Result<Page> {
        let limit = limit.max(1);
        let mut clauses = Vec::new();
        if let Some(w) = &filter.worker_id {
            clauses.push(doc! { "worker_id": w });
        }
        if let Some(s) = &filter.state {
            clauses.push(doc! { "state": s });
        }
        if let Some(o) = &filter.owner_username {
            clauses.push(doc! { "owner_username": o });
        }
        if !filter.include_removed {
            clauses.push(doc! { "removed_at": Bson::Null });
        }
        if let Some(c) = after {
            clauses.push(doc! { "$or": [
                { "worker_id": { "$gt": &c.worker_id } },
                { "worker_id": &c.worker_id, "lab_id": { "$gt": &c.lab_id } },
            ] });
        }
        let query = match clauses.len() {
            0 => Document::new(),
            1 => clauses.remove(0),
            _ => doc! { "$and": clauses },
        };
        let mut records: Vec<LabRecord> = self
            .records
            .find(query)
            .sort(doc! { "worker_id": 1, "lab_id": 1 })
            .projection(doc! { "operation_history": 0 })
            .limit(i64::try_from(limit + 1).unwrap_or(i64::MAX))
            .await?
            .try_collect()
            .await?;
        let next = if records.len() > limit {
            records.truncate(limit);
            records.last().map(|r| PageCursor {
                worker_id: r.worker_id.clone(),
                lab_id: r.lab_id.clone(),
            })
        } else {
            None
        };
        Ok(Page { records, next })
    }

    /// Deletes records marked removed before `cutoff`. Returns how many went.
    pub async fn purge_removed(&self, cutoff: DateTime) -> Result<u64> {
        let result = self
            .raw
            .delete_many(doc! { "removed_at": { "$type": "date", "$lt": cutoff } })
            .await?;
        Ok(result.deleted_count)
    }

    /// Rewrites documents left by the system this replaces so they follow the stored contract:
    /// ISO-string dates become BSON dates, a missing record `id` gets one. Safe to run at every
    /// start; returns how many documents were rewritten.
    pub async fn upgrade_legacy_documents(&self) -> Result<u64> {
        let string_dates: Vec<Document> = [
            "first_seen_at",
            "last_synced_at",
            "cml_created_at",
            "modified_at",
            "removed_at",
            "operation_history.timestamp",
        ]
        .into_iter()
        .map(|f| doc! { f: { "$type": "string" } })
        .chain([doc! { "id": { "$exists": false } }, doc! { "id": "" }])
        .collect();
        let legacy: Vec<LabRecord> = self
            .records
            .find(doc! { "$or": string_dates })
            .await?
            .try_collect()
            .await?;
        let statements: Vec<Statement> = legacy
            .iter()
            .filter_map(|r| {
                let id = r.object_id?;
                let mut set = doc! {
                    "first_seen_at": r.first_seen_at,
                    "last_synced_at": r.last_synced_at,
                    "cml_created_at": r.cml_created_at,
                    "modified_at": r.modified_at,
                    "removed_at": r.removed_at,
                    "operation_history": r.operation_history.iter().map(history_document).collect::<Vec<_>>(),
                };
                if r.id.is_empty() {
                    set.insert("id", uuid::Uuid::new_v4().to_string());
                }
                Some(Statement { filter: doc! { "_id": id }, update: doc! { "$set": set }, upsert: false, multi: false })
            })
            .collect();
        if statements.is_empty() {
            return Ok(0);
        }
        Ok(self.execute(&statements).await?.matched)
    }

    /// Writes a worker's sync in one round trip: every record write and the `last_synced_at`
    /// stamp of the unchanged records go in one batch (split only past the size limits).
    pub async fn apply(&self, plan: &SyncPlan) -> Result<ApplyOutcome> {
        let mut statements: Vec<Statement> = plan
            .writes
            .iter()
            .map(|w| write_statement(&plan.worker_id, w, plan.now, self.history_limit))
            .collect();
        let singles = statements.len() as u64;
        if !plan.unchanged.is_empty() {
            statements.push(stamp_statement(&plan.worker_id, &plan.unchanged, plan.now));
        }
        if statements.is_empty() {
            return Ok(ApplyOutcome::default());
        }
        let counts = self.execute(&statements).await?;
        // The stamp matches every unchanged record: they exist and are not removed, and nothing
        // but a purge of removed records deletes records. What remains matched is the record
        // writes'. Creates always land (inserted, or matched after a race); any other write that
        // matched nothing lost a race with another writer and is left to the next sync.
        let stamped = (plan.unchanged.len() as u64).min(counts.matched);
        let matched = counts.matched - stamped;
        Ok(ApplyOutcome {
            created: counts.upserted,
            matched,
            conflicts: singles.saturating_sub(matched + counts.upserted),
            stamped,
            round_trips: counts.round_trips,
        })
    }

    async fn use_bulk_write_command(&self) -> Result<bool> {
        match self.batch_mode {
            BatchWriteMode::UpdateCommand => Ok(false),
            BatchWriteMode::BulkWrite => Ok(true),
            BatchWriteMode::Auto => self
                .bulk_write_command
                .get_or_try_init(|| async {
                    Ok(crate::mongo::server_info(&self.db)
                        .await?
                        .supports_bulk_write_command())
                })
                .await
                .copied(),
        }
    }

    /// Sends statements in as few commands as the size limits allow. Upserts that lose a race
    /// on the unique index (a duplicate key error) are retried once: they then match.
    async fn execute(&self, statements: &[Statement]) -> Result<BatchCounts> {
        let bulk = self.use_bulk_write_command().await?;
        let mut total = BatchCounts::default();
        for chunk in chunks(statements) {
            let mut pending: Vec<Statement> = chunk.to_vec();
            for attempt in 0..2 {
                let (counts, retry) = if bulk {
                    self.run_bulk_write(&pending).await?
                } else {
                    self.run_update_command(&pending).await?
                };
                total.matched += counts.matched;
                total.upserted += counts.upserted;
                total.round_trips += 1;
                if retry.is_empty() {
                    break;
                }
                if attempt == 1 {
                    return Err(Error::WriteErrors(format!(
                        "{} upserts still hit a duplicate key after a retry",
                        retry.len()
                    )));
                }
                pending = retry.into_iter().map(|i| pending[i].clone()).collect();
            }
        }
        Ok(total)
    }

    /// The classic `update` command: one round trip on every server version.
    async fn run_update_command(
        &self,
        statements: &[Statement],
    ) -> Result<(BatchCounts, Vec<usize>)> {
        let updates: Vec<Document> = statements.iter().map(Statement::to_document).collect();
        let reply = self
            .db
            .run_command(doc! { "update": self.raw.name(), "updates": updates, "ordered": false })
            .await?;
        let n = reply.get("n").and_then(as_i64).unwrap_or(0).max(0) as u64;
        let upserted = reply
            .get_array("upserted")
            .map(|a| a.len() as u64)
            .unwrap_or(0);
        let mut retry = Vec::new();
        let mut fatal = Vec::new();
        if let Ok(errors) = reply.get_array("writeErrors") {
            for e in errors.iter().filter_map(Bson::as_document) {
                let index = e.get("index").and_then(as_i64).unwrap_or(-1);
                let code = e.get("code").and_then(as_i64).unwrap_or(0);
                match usize::try_from(index) {
                    Ok(i)
                        if code == i64::from(DUPLICATE_KEY)
                            && statements.get(i).is_some_and(|s| s.upsert) =>
                    {
                        retry.push(i)
                    }
                    _ => fatal.push(format!(
                        "statement {index}: code {code}: {}",
                        e.get_str("errmsg").unwrap_or("")
                    )),
                }
            }
        }
        if let Ok(wce) = reply.get_document("writeConcernError") {
            fatal.push(format!(
                "write concern: {}",
                wce.get_str("errmsg").unwrap_or("")
            ));
        }
        if !fatal.is_empty() {
            return Err(Error::WriteErrors(fatal.join("; ")));
        }
        Ok((
            BatchCounts {
                matched: n.saturating_sub(upserted),
                upserted,
                round_trips: 1,
            },
            retry,
        ))
    }

    /// The 8.0+ `bulkWrite` command through the driver.
    async fn run_bulk_write(&self, statements: &[Statement]) -> Result<(BatchCounts, Vec<usize>)> {
        let ns = Namespace::new(self.db.name(), self.raw.name());
        let models: Vec<WriteModel> = statements
            .iter()
            .map(|s| {
                if s.multi {
                    UpdateManyModel::builder()
                        .namespace(ns.clone())
                        .filter(s.filter.clone())
                        .update(s.update.clone())
                        .upsert(s.upsert)
                        .build()
                        .into()
                } else {
                    UpdateOneModel::builder()
                        .namespace(ns.clone())
                        .filter(s.filter.clone())
                        .update(s.update.clone())
                        .upsert(s.upsert)
                        .build()
                        .into()
                }
            })
            .collect();
        match self.client.bulk_write(models).ordered(false).await {
            Ok(r) => Ok((
                BatchCounts {
                    matched: r.matched_count.max(0) as u64,
                    upserted: r.upserted_count.max(0) as u64,
                    round_trips: 1,
                },
                Vec::new(),
            )),
            Err(e) => match *e.kind {
                ErrorKind::BulkWrite(ref bw) => {
                    let mut retry = Vec::new();
                    let mut fatal = Vec::new();
                    for (&i, we) in &bw.write_errors {
                        if we.code == DUPLICATE_KEY && statements.get(i).is_some_and(|s| s.upsert) {
                            retry.push(i);
                        } else {
                            fatal.push(format!("statement {i}: code {}: {}", we.code, we.message));
                        }
                    }
                    for wce in &bw.write_concern_errors {
                        fatal.push(format!("write concern: {}", wce.message));
                    }
                    if !fatal.is_empty() {
                        return Err(Error::WriteErrors(fatal.join("; ")));
                    }
                    retry.sort_unstable();
                    let (matched, upserted) = match &bw.partial_result {
                        Some(mongodb::error::PartialBulkWriteResult::Summary(s)) => {
                            (s.matched_count, s.upserted_count)
                        }
                        Some(mongodb::error::PartialBulkWriteResult::Verbose(v)) => {
                            (v.summary.matched_count, v.summary.upserted_count)
                        }
                        None => (0, 0),
                    };
                    Ok((
                        BatchCounts {
                            matched: matched.max(0) as u64,
                            upserted: upserted.max(0) as u64,
                            round_trips: 1,
                        },
                        retry,
                    ))
                }
                _ => Err(e.into()),
            },
        }
    }
}

/// Creates each wanted index unless one with the same keys and uniqueness exists already.
pub(crate) async fn ensure_indexes(
    coll: &Collection<Document>,
    wanted: impl IntoIterator<Item = IndexModel>,
) -> Result<()> {
    let existing: Vec<IndexModel> = match coll.list_indexes().await {
        Ok(cursor) => cursor.try_collect().await?,
        // The collection does not exist yet (NamespaceNotFound): no indexes.
        Err(e) if matches!(*e.kind, ErrorKind::Command(ref c) if c.code == 26) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let unique = |m: &IndexModel| m.options.as_ref().and_then(|o| o.unique).unwrap_or(false);
    let missing: Vec<IndexModel> = wanted
        .into_iter()
        .filter(|w| {
            !existing
                .iter()
                .any(|e| e.keys == w.keys && unique(e) == unique(w))
        })
        .collect();
    if !missing.is_empty() {
        coll.create_indexes(missing).await.map_err(|e| match *e.kind {
            ErrorKind::Command(ref c) if c.code == DUPLICATE_KEY => Error::WriteErrors(format!(
                "collection {} holds duplicate records, so a unique index cannot be built; remove the duplicates first ({})",
                coll.name(),
                c.message
            )),
            _ => e.into(),
        })?;
    }
    Ok(())
}

/// Splits statements into commands that stay under the server's size and count limits.
fn chunks(statements: &[Statement]) -> Vec<&[Statement]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, s) in statements.iter().enumerate() {
        let size = bson::to_vec(&s.to_document()).map_or(0, |v| v.len());
        if i > start && (bytes + size > MAX_BATCH_BYTES || i - start >= MAX_BATCH_STATEMENTS) {
            out.push(&statements[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < statements.len() {
        out.push(&statements[start..]);
    }
    out
}

fn fields_document(fields: &LabFields) -> Document {
    fields
        .values()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

fn history_document(entry: &HistoryEntry) -> Bson {
    // A history entry is plain data; encoding it cannot fail.
    bson::to_bson(entry).unwrap_or(Bson::Null)
}

/// The MongoDB statement for one record write of a plan.
pub(crate) fn write_statement(
    worker_id: &str,
    write: &RecordWrite,
    now: DateTime,
    history_limit: usize,
) -> Statement {
    let push = |entry: &HistoryEntry| {
        doc! { "operation_history": {
            "$each": [history_document(entry)],
            "$slice": -(i64::try_from(history_limit).unwrap_or(i64::MAX)),
        } }
    };
    match write {
        // Everything goes in with `$setOnInsert`: if another writer created the record a
        // moment earlier, this write only stamps it, and the next sync diffs against it.
        RecordWrite::Create { lab, entry } => {
            let mut on_insert = fields_document(&lab.fields);
            on_insert.insert("id", uuid::Uuid::new_v4().to_string());
            on_insert.insert("first_seen_at", now);
            on_insert.insert("removed_at", Bson::Null);
            on_insert.insert("operation_history", vec![history_document(entry)]);
            Statement {
                filter: doc! { "worker_id": worker_id, "lab_id": &lab.lab_id },
                update: doc! { "$setOnInsert": on_insert, "$set": { "last_synced_at": now } },
                upsert: true,
                multi: false,
            }
        }
        RecordWrite::Update {
            lab,
            expected_last_synced,
            entry,
            ..
        } => {
            let mut set = fields_document(&lab.fields);
            set.insert("last_synced_at", now);
            set.insert("removed_at", Bson::Null);
            Statement {
                filter: doc! { "worker_id": worker_id, "lab_id": &lab.lab_id, "last_synced_at": expected_last_synced },
                update: doc! { "$set": set, "$push": push(entry) },
                upsert: false,
                multi: false,
            }
        }
        RecordWrite::Remove {
            lab_id,
            expected_last_synced,
            entry,
        } => Statement {
            filter: doc! { "worker_id": worker_id, "lab_id": lab_id, "last_synced_at": expected_last_synced, "removed_at": Bson::Null },
            update: doc! { "$set": { "removed_at": now }, "$push": push(entry) },
            upsert: false,
            multi: false,
        },
    }
}

/// Stamps `last_synced_at` on the records that did not change.
pub(crate) fn stamp_statement(worker_id: &str, lab_ids: &[String], now: DateTime) -> Statement {
    Statement {
        filter: doc! { "worker_id": worker_id, "lab_id": { "$in": lab_ids } },
        update: doc! { "$set": { "last_synced_at": now } },
        upsert: false,
        multi: true,
    }
}

/// A count from a server reply, whatever integer width the server chose.
pub(crate) fn as_i64(b: &Bson) -> Option<i64> {
    match b {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        Bson::Double(n) if n.is_finite() => Some(*n as i64),
        _ => None,
    }
}

/// How long ago `cutoff` is from `now`, for purges: `now - retention`.
pub fn cutoff(now: DateTime, retention: Duration) -> DateTime {
    let ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    DateTime::from_millis(now.timestamp_millis().saturating_sub(ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::ObservedLab;

    fn entry() -> HistoryEntry {
        HistoryEntry {
            timestamp: DateTime::from_millis(5),
            previous_state: None,
            new_state: "STOPPED".into(),
            changed_fields: Default::default(),
        }
    }

    #[test]
    fn create_sets_everything_on_insert_only() {
        let w = RecordWrite::Create {
            lab: ObservedLab::new("l1", LabFields::default()),
            entry: entry(),
        };
        let s = write_statement("w1", &w, DateTime::from_millis(5), 50);
        assert!(s.upsert && !s.multi);
        assert_eq!(s.filter, doc! { "worker_id": "w1", "lab_id": "l1" });
        let on_insert = s.update.get_document("$setOnInsert").expect("setOnInsert");
        for key in [
            "id",
            "first_seen_at",
            "operation_history",
            "title",
            "groups",
            "removed_at",
        ] {
            assert!(on_insert.contains_key(key), "{key}");
        }
        assert_eq!(
            s.update.get_document("$set").expect("$set"),
            &doc! { "last_synced_at": DateTime::from_millis(5) }
        );
    }

    #[test]
    fn update_is_conditional_and_caps_history() {
        let w = RecordWrite::Update {
            lab: ObservedLab::new("l1", LabFields::default()),
            expected_last_synced: DateTime::from_millis(1),
            reappeared: false,
            entry: entry(),
        };
        let s = write_statement("w1", &w, DateTime::from_millis(5), 50);
        assert!(!s.upsert);
        assert_eq!(
            s.filter.get_datetime("last_synced_at").ok(),
            Some(&DateTime::from_millis(1))
        );
        let push = s
            .update
            .get_document("$push")
            .and_then(|p| p.get_document("operation_history"))
            .expect("push");
        assert_eq!(push.get_i64("$slice").ok(), Some(-50));
        assert_eq!(push.get_array("$each").map(Vec::len).ok(), Some(1));
    }

    #[test]
    fn chunks_respect_the_byte_budget() {
        let big = Statement {
            filter: doc! {},
            update: doc! { "$set": { "notes": "x".repeat(3 * 1024 * 1024) } },
            upsert: false,
            multi: false,
        };
        let small = Statement {
            filter: doc! {},
            update: doc! {},
            upsert: false,
            multi: false,
        };
        let list = vec![big.clone(), big.clone(), big.clone(), small.clone()];
        let sizes: Vec<usize> = chunks(&list).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [2, 2]);
        assert_eq!(chunks(&[small]).len(), 1);
        assert!(chunks(&[]).is_empty());
    }

    #[test]
    fn cutoff_subtracts_the_retention() {
        assert_eq!(
            cutoff(DateTime::from_millis(10_000), Duration::from_secs(3)),
            DateTime::from_millis(7_000)
        );
    }
}
