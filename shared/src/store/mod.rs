//! The `lab_records` collection: the handle, its indexes, the queries both services make, and
//! maintenance (tombstone purges, upgrading documents of the previous system). Writing a sync
//! plan is in [`write`].

mod write;

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use bson::{doc, Bson, DateTime, Document};
use futures::{stream::BoxStream, StreamExt, TryStreamExt};
use mongodb::{options::IndexOptions, Client, Collection, Database, IndexModel};
use tokio::sync::OnceCell;

use write::{history_document, Statement};
pub use write::{ApplyOutcome, Skipped};

use crate::{
    config::{BatchWriteMode, MongoConfig},
    cursor::PageCursor,
    mongo,
    record::{LabFields, LabRecord, LabState},
    Error, Result,
};

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

/// Filters of the cross-worker listing. Values are compared for equality only: a value is
/// never interpreted as a query operator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabFilter {
    pub worker_id: Option<String>,
    pub state: Option<LabState>,
    pub owner_username: Option<String>,
    pub include_removed: bool,
    /// Only records one of these principals may read (see [`crate::access`]); `None`: all.
    pub readers: Option<Vec<String>>,
}

/// One page of the cross-worker listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub records: Vec<LabRecord>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<PageCursor>,
}

/// Records by lab state: one count per state CML knows, one for states it does not (a newer
/// CML, a damaged document), and one for records marked removed, whatever their last state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub by_state: [u64; LabState::ALL.len()],
    pub other: u64,
    pub removed: u64,
}

impl StateCounts {
    /// The label value of the count of removed records.
    pub const REMOVED: &'static str = "removed";
    /// The label value of the count of records in a state CML does not define.
    pub const OTHER: &'static str = "other";

    /// Folds `(state, removed, count)` groups into the closed set of states.
    pub fn from_groups<'a>(groups: impl IntoIterator<Item = (Option<&'a str>, bool, u64)>) -> Self {
        let mut c = StateCounts::default();
        for (state, removed, n) in groups {
            let known = state.and_then(|s| LabState::ALL.iter().position(|k| k.as_str() == s));
            let slot = match (removed, known) {
                (true, _) => &mut c.removed,
                (false, Some(i)) => &mut c.by_state[i],
                (false, None) => &mut c.other,
            };
            *slot += n;
        }
        c
    }

    /// Every count with its label value, the same set every time.
    pub fn labelled(&self) -> Vec<(&'static str, u64)> {
        LabState::ALL
            .iter()
            .zip(self.by_state)
            .map(|(s, n)| (s.as_str(), n))
            .chain([(Self::OTHER, self.other), (Self::REMOVED, self.removed)])
            .collect()
    }
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
            mongo::index(doc! { "worker_id": 1 }, "worker_id_1", false),
            mongo::index(
                doc! { "worker_id": 1, "lab_id": 1 },
                "worker_id_1_lab_id_1",
                true,
            ),
            mongo::index(doc! { "last_synced_at": 1 }, "last_synced_at_1", false),
            // A caller's labs: one range per principal it holds, in the listing's order.
            mongo::index(
                doc! { "readers": 1, "worker_id": 1, "lab_id": 1 },
                "readers_1_worker_id_1_lab_id_1",
                false,
            ),
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
        mongo::ensure_indexes(&self.raw, wanted).await
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

    /// The records of some labs of a worker (those an event sync re-reads), without
    /// `operation_history`: one query on the `(worker_id, lab_id)` index.
    pub async fn records_of_labs(
        &self,
        worker_id: &str,
        lab_ids: &[String],
    ) -> Result<Vec<LabRecord>> {
        let cursor = self
            .records
            .find(doc! { "worker_id": worker_id, "lab_id": { "$in": lab_ids } })
            .projection(doc! { "operation_history": 0 })
            .await?;
        Ok(cursor.try_collect().await?)
    }

    /// A worker's labs sorted by title then lab id, without `operation_history`, at most
    /// `limit`, as they arrive from the server; only those `readers` reach when given.
    pub async fn labs_of_worker(
        &self,
        worker_id: &str,
        include_removed: bool,
        readers: Option<&[String]>,
        limit: usize,
    ) -> Result<BoxStream<'static, Result<LabRecord>>> {
        let (filter, sort) = worker_labs_query(worker_id, include_removed, readers);
        let cursor = self
            .records
            .find(filter)
            .sort(sort)
            .projection(doc! { "operation_history": 0 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await?;
        Ok(cursor.map_err(Error::from).boxed())
    }

    /// One record, with its history.
    pub async fn lab(&self, worker_id: &str, lab_id: &str) -> Result<Option<LabRecord>> {
        self.lab_for(worker_id, lab_id, None).await
    }

    /// One record, with its history, if one of `readers` may read it (`None`: anyone).
    pub async fn lab_for(
        &self,
        worker_id: &str,
        lab_id: &str,
        readers: Option<&[String]>,
    ) -> Result<Option<LabRecord>> {
        let mut filter = doc! { "worker_id": worker_id, "lab_id": lab_id };
        if let Some(r) = readers {
            filter.insert("readers", doc! { "$in": r });
        }
        Ok(self.records.find_one(filter).await?)
    }

    /// The distinct reader lists (each sorted) of the records not removed of `workers`, with
    /// how many records have each, by worker: what syncs' counts per view are made from (one
    /// read for a batch of syncs; the server groups, so a worker sends as many rows as it has
    /// distinct lists, not one per lab).
    pub async fn readers_of_workers(
        &self,
        workers: &[&str],
    ) -> Result<HashMap<String, Vec<(Vec<String>, usize)>>> {
        let pipeline = [
            doc! { "$match": { "worker_id": { "$in": workers }, "removed_at": Bson::Null } },
            doc! { "$group": {
                "_id": { "w": "$worker_id", "r": "$readers" },
                "n": { "$sum": 1 },
            } },
        ];
        let mut cursor = self.raw.aggregate(pipeline).await?;
        let mut out: HashMap<String, Vec<(Vec<String>, usize)>> = HashMap::new();
        while let Some(d) = cursor.try_next().await? {
            let Ok(id) = d.get_document("_id") else {
                continue;
            };
            let Ok(worker) = id.get_str("w") else {
                continue;
            };
            let mut r: Vec<String> = id
                .get_array("r")
                .map(|a| {
                    a.iter()
                        .filter_map(|b| b.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            r.sort();
            let n = match d.get("n") {
                Some(Bson::Int32(n)) => usize::try_from(*n).unwrap_or(0),
                Some(Bson::Int64(n)) => usize::try_from(*n).unwrap_or(0),
                _ => 0,
            };
            out.entry(worker.to_owned()).or_default().push((r, n));
        }
        Ok(out)
    }

    /// How many records not removed each of `workers` has that one of `readers` may read.
    pub async fn count_visible(
        &self,
        workers: &[String],
        readers: &[String],
    ) -> Result<HashMap<String, i64>> {
        let pipeline = [
            doc! { "$match": {
                "readers": { "$in": readers },
                "worker_id": { "$in": workers },
                "removed_at": Bson::Null,
            } },
            doc! { "$group": { "_id": "$worker_id", "n": { "$sum": 1 } } },
        ];
        let groups: Vec<Document> = self.raw.aggregate(pipeline).await?.try_collect().await?;
        Ok(groups
            .iter()
            .filter_map(|g| {
                let id = g.get_str("_id").ok()?.to_owned();
                Some((id, g.get("n").and_then(mongo::as_i64).unwrap_or(0)))
            })
            .collect())
    }

    /// The cross-worker listing, ordered by (worker_id, lab_id) so a cursor is just the last key.
    pub async fn list(
        &self,
        filter: &LabFilter,
        after: Option<&PageCursor>,
        limit: usize,
    ) -> Result<Page> {
        let limit = limit.max(1);
        let (query, sort) = list_query(filter, after);
        let mut records: Vec<LabRecord> = self
            .records
            .find(query)
            .sort(sort)
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

    /// The workers a sync wrote to at or after `since` (each sync stamps every record it saw):
    /// one range of the `last_synced_at` index. What a replica taking over an interrupted
    /// cycle need not sync again.
    pub async fn workers_synced_since(&self, since: DateTime) -> Result<HashSet<String>> {
        Ok(self
            .raw
            .distinct("worker_id", doc! { "last_synced_at": { "$gte": since } })
            .await?
            .into_iter()
            .filter_map(|b| b.as_str().map(str::to_owned))
            .collect())
    }

    /// How many records there are in each lab state, removed ones apart; one aggregation.
    pub async fn count_by_state(&self) -> Result<StateCounts> {
        let pipeline = [doc! { "$group": {
            "_id": {
                "state": "$state",
                "removed": { "$eq": [{ "$type": "$removed_at" }, "date"] },
            },
            "n": { "$sum": 1 },
        } }];
        let groups: Vec<Document> = self.raw.aggregate(pipeline).await?.try_collect().await?;
        Ok(StateCounts::from_groups(groups.iter().map(|g| {
            let id = g.get_document("_id").ok();
            let state = id.and_then(|i| i.get_str("state").ok());
            let removed = id.and_then(|i| i.get_bool("removed").ok()).unwrap_or(false);
            let n = match g.get("n") {
                Some(Bson::Int32(n)) => u64::try_from(*n).unwrap_or(0),
                Some(Bson::Int64(n)) => u64::try_from(*n).unwrap_or(0),
                _ => 0,
            };
            (state, removed, n)
        })))
    }

    /// Deletes records marked removed before `cutoff`. Returns how many went.
    pub async fn purge_removed(&self, cutoff: DateTime) -> Result<u64> {
        let result = self
            .raw
            .delete_many(doc! { "removed_at": { "$type": "date", "$lt": cutoff } })
            .await?;
        Ok(result.deleted_count)
    }

    /// Rewrites documents left by the system this replaces, or by earlier versions, so they
    /// follow the stored contract: ISO-string dates become BSON dates, a missing record `id`
    /// gets one, and the history entry once written on first sight (no previous state, no
    /// changed field) goes: history is the list of changes; a record lacking a tracked field
    /// the model has (one added since it was written) is marked so that the field's first
    /// value is adopted without a history entry or an event. Safe to run at every start;
    /// returns how many rewrites it made (a document may need several).
    pub async fn upgrade_legacy_documents(&self) -> Result<u64> {
        let first_sight = doc! { "previous_state": null, "changed_fields": {} };
        let pulled = self
            .raw
            .update_many(
                doc! { "operation_history": { "$elemMatch": first_sight.clone() } },
                doc! { "$pull": { "operation_history": first_sight } },
            )
            .await?
            .modified_count;
        Ok(pulled + self.upgrade_string_dates().await? + self.mark_unobserved_fields().await?)
    }

    /// Notes in `unobserved_fields` which tracked fields each record lacks. Costs one scan
    /// when nothing lacks any (every start), one update per missing field otherwise.
    async fn mark_unobserved_fields(&self) -> Result<u64> {
        let names = LabFields::names()?;
        let missing: Vec<Document> = names
            .iter()
            .map(|f| doc! { f: { "$exists": false } })
            .collect();
        let any = self
            .raw
            .find_one(doc! { "$or": missing })
            .projection(doc! { "_id": 1 })
            .await?;
        if any.is_none() {
            return Ok(0);
        }
        let mut marked = 0;
        for f in &names {
            marked += self
                .raw
                .update_many(
                    doc! { f: { "$exists": false } },
                    doc! { "$addToSet": { "unobserved_fields": f } },
                )
                .await?
                .modified_count;
        }
        Ok(marked)
    }

    async fn upgrade_string_dates(&self) -> Result<u64> {
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
        let mut statements = Vec::new();
        for r in &legacy {
            let Some(id) = r.object_id else { continue };
            let history = r
                .operation_history
                .iter()
                .map(history_document)
                .collect::<Result<Vec<Bson>>>()?;
            let mut set = doc! {
                "first_seen_at": r.first_seen_at,
                "last_synced_at": r.last_synced_at,
                "cml_created_at": r.fields.cml_created_at,
                "modified_at": r.fields.modified_at,
                "removed_at": r.removed_at,
                "operation_history": history,
            };
            if r.id.is_empty() {
                set.insert("id", uuid::Uuid::new_v4().to_string());
            }
            statements.push(Statement {
                filter: doc! { "_id": id },
                update: doc! { "$set": set },
                upsert: false,
                multi: false,
                lab_id: Some(r.lab_id.clone()),
            });
        }
        if statements.is_empty() {
            return Ok(0);
        }
        Ok(self.execute(statements).await?.matched)
    }
}

/// The filter and sort of [`LabStore::labs_of_worker`] (for `explain` as well): the listing's
/// filter on one worker, in title order.
pub fn worker_labs_query(
    worker_id: &str,
    include_removed: bool,
    readers: Option<&[String]>,
) -> (Document, Document) {
    let filter = LabFilter {
        worker_id: Some(worker_id.to_owned()),
        include_removed,
        readers: readers.map(<[String]>::to_vec),
        ..LabFilter::default()
    };
    (
        all_of(filter_clauses(&filter)),
        doc! { "title": 1, "lab_id": 1 },
    )
}

/// One equality (or `$in` of principals) clause per filter that is set. The principals come
/// first, as in the `(readers, worker_id, lab_id)` index: MongoDB plans the same whatever the
/// order, SecantusDB answers a user's listing three times faster in this one.
fn filter_clauses(filter: &LabFilter) -> Vec<Document> {
    let mut clauses = Vec::new();
    if let Some(r) = &filter.readers {
        clauses.push(doc! { "readers": { "$in": r } });
    }
    if let Some(w) = &filter.worker_id {
        clauses.push(doc! { "worker_id": w });
    }
    if let Some(s) = &filter.state {
        clauses.push(doc! { "state": s.as_str() });
    }
    if let Some(o) = &filter.owner_username {
        clauses.push(doc! { "owner_username": o });
    }
    if !filter.include_removed {
        clauses.push(doc! { "removed_at": Bson::Null });
    }
    clauses
}

/// The conjunction of `clauses`, as one `$and` (the same shape for every listing).
fn all_of(mut clauses: Vec<Document>) -> Document {
    match clauses.len() {
        0 => Document::new(),
        1 => clauses.remove(0),
        _ => doc! { "$and": clauses },
    }
}

/// The filter and sort of [`LabStore::list`] (for `explain` as well).
pub fn list_query(filter: &LabFilter, after: Option<&PageCursor>) -> (Document, Document) {
    let mut clauses = filter_clauses(filter);
    if let Some(c) = after {
        // After (worker_id, lab_id) = c. The range on worker_id alone bounds the scan of the
        // (worker_id, lab_id) index, which also gives the order: a page reads a page of keys
        // (plus the cursor's worker's labs before it) however deep it is. An `$or` of the two
        // cases alone makes planners merge two scans and sort everything after the cursor.
        clauses.push(doc! { "worker_id": { "$gte": &c.worker_id } });
        clauses.push(doc! { "$or": [
            { "worker_id": { "$gt": &c.worker_id } },
            { "lab_id": { "$gt": &c.lab_id } },
        ] });
    }
    (all_of(clauses), doc! { "worker_id": 1, "lab_id": 1 })
}

/// How long ago `cutoff` is from `now`, for purges: `now - retention`.
pub fn cutoff(now: DateTime, retention: Duration) -> DateTime {
    let ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    DateTime::from_millis(now.timestamp_millis().saturating_sub(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoff_subtracts_the_retention() {
        assert_eq!(
            cutoff(DateTime::from_millis(10_000), Duration::from_secs(3)),
            DateTime::from_millis(7_000)
        );
    }

    #[test]
    fn state_counts_fold_into_a_closed_set() {
        let c = StateCounts::from_groups([
            (Some("STARTED"), false, 3),
            (Some("STOPPED"), false, 2),
            (Some("STARTED"), true, 4),
            (Some("PAUSED_BY_A_NEWER_CML"), false, 1),
            (None, false, 1),
            (None, true, 1),
        ]);
        assert_eq!(
            c.labelled(),
            vec![
                ("DEFINED_ON_CORE", 0),
                ("STOPPED", 2),
                ("STARTED", 3),
                ("other", 2),
                ("removed", 5),
            ]
        );
        assert_eq!(
            StateCounts::default().labelled().len(),
            c.labelled().len(),
            "every state is reported, zero or not"
        );
    }
}
