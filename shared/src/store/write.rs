//! Writing a sync plan: one statement per record write plus one stamp of the unchanged records,
//! sent in as few commands as MongoDB's limits allow (normally one round trip), each fenced by
//! the lease's term ([`crate::fence`]).

use bson::{doc, Bson, DateTime, Document};
use mongodb::{
    error::ErrorKind,
    options::{UpdateManyModel, UpdateOneModel, WriteModel},
    Namespace,
};

use super::LabStore;
use crate::{
    change::{LabAccess, RecordWrite, SyncPlan},
    config::BatchWriteMode,
    fence::{self, Term},
    mongo::{self, DOCUMENT_TOO_LARGE, DUPLICATE_KEY},
    record::{HistoryEntry, LabFields},
    Error, Result,
};

/// Commands are single BSON documents (16 MiB at most); statements are batched well below that.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// A statement this large cannot travel in a command at all: its record is skipped.
const MAX_STATEMENT_BYTES: usize = 16 * 1024 * 1024 - 64 * 1024;
/// The server's `maxWriteBatchSize` since 3.6.
const MAX_BATCH_STATEMENTS: usize = 100_000;

/// What applying a plan did, as MongoDB counted it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Records that could not be written (their document would pass MongoDB's 16 MiB limit);
    /// the other writes of the sync went through.
    pub skipped: Vec<Skipped>,
    /// Records inserted.
    pub created: u64,
    /// Record writes (updates, removals, creates raced by another writer) that matched a record.
    pub matched: u64,
    /// Record writes skipped because the record was synced by someone else in between (or,
    /// under a newer term of the lease, by its next holder).
    pub conflicts: u64,
    /// Unchanged records whose `last_synced_at` was stamped.
    pub stamped: u64,
    /// Commands sent to MongoDB.
    pub round_trips: u32,
}

/// A record that could not be written, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub lab_id: String,
    pub reason: String,
}

/// One statement of the `update` command.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Statement {
    pub filter: Document,
    pub update: Document,
    pub upsert: bool,
    pub multi: bool,
    /// The lab a single-record statement writes.
    pub lab_id: Option<String>,
}

impl Statement {
    /// The statement as a write made under `term`: it matches only records last written
    /// under `term` or an older one, and marks what it writes with `term`.
    fn fenced(mut self, term: Term) -> Self {
        self.filter.insert(fence::FIELD, term.admits());
        match self.update.get_mut("$set") {
            Some(Bson::Document(set)) => {
                set.insert(fence::FIELD, term.0);
            }
            _ => {
                self.update.insert("$set", doc! { fence::FIELD: term.0 });
            }
        }
        self
    }

    fn to_document(&self) -> Document {
        doc! { "q": &self.filter, "u": &self.update, "upsert": self.upsert, "multi": self.multi }
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct BatchCounts {
    pub matched: u64,
    pub upserted: u64,
    pub round_trips: u32,
    pub skipped: Vec<Skipped>,
}

impl LabStore {
    /// Writes a worker's sync, made under the lease's `term`, in one round trip: every record
    /// write and the `last_synced_at` stamp of the unchanged records go in one batch (split
    /// only past the size limits). Records written under a newer term are left alone.
    pub async fn apply(&self, plan: &SyncPlan, term: Term) -> Result<ApplyOutcome> {
        let mut statements = plan
            .writes
            .iter()
            .map(|w| {
                let access = plan.access.get(w.lab_id());
                write_statement(
                    &plan.worker_id,
                    w,
                    access,
                    plan.now,
                    self.history_limit,
                    term,
                )
            })
            .collect::<Result<Vec<Statement>>>()?;
        let singles = statements.len() as u64;
        if !plan.unchanged.is_empty() {
            statements.push(stamp_statement(
                &plan.worker_id,
                &plan.unchanged,
                plan.now,
                term,
            ));
        }
        if statements.is_empty() {
            return Ok(ApplyOutcome::default());
        }
        let counts = self.execute(statements).await?;
        // The stamp matches every unchanged record: they exist and are not removed, and nothing
        // but a purge of removed records deletes records (unless a newer term wrote some: then
        // these counts are approximate, and the holder has lost the lease anyway). What remains
        // matched is the record writes'. Creates land (inserted, or matched after a race, when
        // they change nothing); any other write that matched nothing, and was not skipped, lost
        // a race with another writer and is left to the next sync.
        let stamped = (plan.unchanged.len() as u64).min(counts.matched);
        let matched = counts.matched - stamped;
        let skipped = counts.skipped.len() as u64;
        Ok(ApplyOutcome {
            created: counts.upserted,
            matched,
            conflicts: singles.saturating_sub(matched + counts.upserted + skipped),
            stamped,
            round_trips: counts.round_trips,
            skipped: counts.skipped,
        })
    }

    async fn use_bulk_write_command(&self) -> Result<bool> {
        match self.batch_mode {
            BatchWriteMode::UpdateCommand => Ok(false),
            BatchWriteMode::BulkWrite => Ok(true),
            BatchWriteMode::Auto => self
                .bulk_write_command
                .get_or_try_init(|| async {
                    Ok(mongo::server_info(&self.db)
                        .await?
                        .supports_bulk_write_command())
                })
                .await
                .copied(),
        }
    }

    /// Sends statements in as few commands as the size limits allow. Upserts that lose a race
    /// on the unique index (a duplicate key error) are retried once: they then match. A record
    /// whose document would pass 16 MiB is skipped, the rest written.
    pub(crate) async fn execute(&self, statements: Vec<Statement>) -> Result<BatchCounts> {
        let bulk = self.use_bulk_write_command().await?;
        let mut total = BatchCounts::default();
        let (statements, oversized): (Vec<Statement>, Vec<Statement>) = statements
            .into_iter()
            .partition(|s| statement_size(s) <= MAX_STATEMENT_BYTES);
        total.skipped.extend(oversized.into_iter().map(|s| Skipped {
            lab_id: s.lab_id.unwrap_or_default(),
            reason: "the record would pass MongoDB's 16 MiB document limit".into(),
        }));
        for chunk in chunks(&statements) {
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
                total.skipped.extend(counts.skipped);
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
        let reply = mongo::update_command(&self.db, self.raw.name(), updates, |i| {
            statements.get(i).is_some_and(|s| s.upsert)
        })
        .await?;
        Ok((
            BatchCounts {
                matched: reply.matched,
                upserted: reply.upserted,
                round_trips: 1,
                skipped: too_large(statements, &reply.too_large),
            },
            reply.duplicate_upserts,
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
                    skipped: Vec::new(),
                },
                Vec::new(),
            )),
            Err(e) => partial_bulk_write(e, statements),
        }
    }
}

/// What a `bulkWrite` that reported errors did: its counts and the upserts to retry (those that
/// lost a race on the unique index); any other error fails the batch.
fn partial_bulk_write(
    e: mongodb::error::Error,
    statements: &[Statement],
) -> Result<(BatchCounts, Vec<usize>)> {
    let ErrorKind::BulkWrite(ref bw) = *e.kind else {
        return Err(e.into());
    };
    let mut retry = Vec::new();
    let mut oversized = Vec::new();
    let mut fatal = Vec::new();
    for (&i, we) in &bw.write_errors {
        if we.code == DUPLICATE_KEY && statements.get(i).is_some_and(|s| s.upsert) {
            retry.push(i);
        } else if DOCUMENT_TOO_LARGE.contains(&we.code) {
            oversized.push(i);
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
            skipped: too_large(statements, &oversized),
        },
        retry,
    ))
}

/// The records of statements MongoDB refused as too large.
fn too_large(statements: &[Statement], indices: &[usize]) -> Vec<Skipped> {
    indices
        .iter()
        .filter_map(|&i| statements.get(i))
        .map(|s| Skipped {
            lab_id: s.lab_id.clone().unwrap_or_default(),
            reason: "MongoDB refused the record: it would pass the 16 MiB document limit".into(),
        })
        .collect()
}

fn statement_size(s: &Statement) -> usize {
    bson::to_vec(&s.to_document()).map_or(usize::MAX, |v| v.len())
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

pub(crate) fn history_document(entry: &HistoryEntry) -> Result<Bson> {
    Ok(bson::to_bson(entry)?)
}

fn fields_document(fields: &LabFields) -> Result<Document> {
    Ok(fields.to_document()?)
}

/// The MongoDB statement for one record write of a plan.
pub(crate) fn write_statement(
    worker_id: &str,
    write: &RecordWrite,
    access: Option<&LabAccess>,
    now: DateTime,
    history_limit: usize,
    term: Term,
) -> Result<Statement> {
    let push = |entry: &HistoryEntry| -> Result<Document> {
        Ok(doc! { "operation_history": {
            "$each": [history_document(entry)?],
            "$slice": -(i64::try_from(history_limit).unwrap_or(i64::MAX)),
        } })
    };
    let statement = match write {
        // Everything goes in with `$setOnInsert`, the term too: if another writer created
        // the record meanwhile (a concurrent sync, or the lease's next holder), this write
        // changes nothing, and the next sync diffs against it. Fenced by being insert-only,
        // its filter stays one equality on the unique index.
        RecordWrite::Create { lab, unobserved } => {
            let mut on_insert = fields_document(&lab.fields)?;
            if !unobserved.is_empty() {
                on_insert.insert("unobserved_fields", unobserved);
            }
            on_insert.insert("id", uuid::Uuid::new_v4().to_string());
            on_insert.insert("first_seen_at", now);
            on_insert.insert("removed_at", Bson::Null);
            on_insert.insert("last_changed_at", now);
            on_insert.insert("operation_history", Bson::Array(Vec::new()));
            on_insert.insert("last_synced_at", now);
            on_insert.insert(fence::FIELD, term.0);
            if let Some(a) = access {
                on_insert.insert("shares", &a.shares);
                on_insert.insert("readers", &a.readers);
            }
            return Ok(Statement {
                filter: doc! { "worker_id": worker_id, "lab_id": &lab.lab_id },
                update: doc! { "$setOnInsert": on_insert },
                upsert: true,
                multi: false,
                lab_id: Some(lab.lab_id.clone()),
            });
        }
        RecordWrite::Update {
            lab,
            expected_last_synced,
            entry,
            unobserved,
            ..
        } => {
            let mut set = fields_document(&lab.fields)?;
            set.insert("last_synced_at", now);
            set.insert("removed_at", Bson::Null);
            set.insert("last_changed_at", entry.timestamp);
            set_access(&mut set, access);
            let mut update = doc! { "$push": push(entry)? };
            still_unobserved(&mut update, &mut set, unobserved);
            update.insert("$set", set);
            Statement {
                filter: doc! { "worker_id": worker_id, "lab_id": &lab.lab_id, "last_synced_at": expected_last_synced },
                update,
                upsert: false,
                multi: false,
                lab_id: Some(lab.lab_id.clone()),
            }
        }
        // No history entry and no `last_changed_at`: no change, so no event either.
        RecordWrite::Adopt {
            lab,
            expected_last_synced,
            unobserved,
        } => {
            let mut set = fields_document(&lab.fields)?;
            set.insert("last_synced_at", now);
            set_access(&mut set, access);
            let mut update = Document::new();
            still_unobserved(&mut update, &mut set, unobserved);
            update.insert("$set", set);
            Statement {
                filter: doc! { "worker_id": worker_id, "lab_id": &lab.lab_id, "last_synced_at": expected_last_synced },
                update,
                upsert: false,
                multi: false,
                lab_id: Some(lab.lab_id.clone()),
            }
        }
        RecordWrite::Remove {
            lab_id,
            expected_last_synced,
            entry,
        } => Statement {
            filter: doc! { "worker_id": worker_id, "lab_id": lab_id, "last_synced_at": expected_last_synced, "removed_at": Bson::Null },
            update: doc! { "$set": { "removed_at": now, "last_changed_at": entry.timestamp }, "$push": push(entry)? },
            upsert: false,
            multi: false,
            lab_id: Some(lab_id.clone()),
        },
        // Who may see it, and the stamp of the sync that saw it.
        RecordWrite::Regrant {
            lab_id,
            expected_last_synced,
            stamp,
        } => {
            let mut set = Document::new();
            if *stamp {
                set.insert("last_synced_at", now);
            }
            set_access(&mut set, access);
            Statement {
                filter: doc! { "worker_id": worker_id, "lab_id": lab_id, "last_synced_at": expected_last_synced },
                update: doc! { "$set": set },
                upsert: false,
                multi: false,
                lab_id: Some(lab_id.clone()),
            }
        }
    };
    Ok(statement.fenced(term))
}

/// Sets a lab's new access: its shares, its readers, and the readers it had (the live stream
/// tells the callers who gained or lost it from the two).
fn set_access(set: &mut Document, access: Option<&LabAccess>) {
    if let Some(a) = access {
        set.insert("shares", &a.shares);
        set.insert("readers", &a.readers);
        set.insert("readers_before", &a.readers_before);
    }
}

/// Records which fields stay unobserved after a write: none (the list goes) or some.
fn still_unobserved(update: &mut Document, set: &mut Document, unobserved: &[String]) {
    if unobserved.is_empty() {
        update.insert("$unset", doc! { "unobserved_fields": "" });
    } else {
        set.insert("unobserved_fields", unobserved);
    }
}

/// Stamps `last_synced_at` on the records that did not change.
fn stamp_statement(worker_id: &str, lab_ids: &[String], now: DateTime, term: Term) -> Statement {
    Statement {
        filter: doc! { "worker_id": worker_id, "lab_id": { "$in": lab_ids } },
        update: doc! { "$set": { "last_synced_at": now } },
        upsert: false,
        multi: true,
        lab_id: None,
    }
    .fenced(term)
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
            unobserved: Vec::new(),
        };
        let s = write_statement("w1", &w, None, DateTime::from_millis(5), 50, Term(3))
            .expect("encodes");
        assert!(s.upsert && !s.multi);
        assert_eq!(s.filter, doc! { "worker_id": "w1", "lab_id": "l1" });
        let on_insert = s.update.get_document("$setOnInsert").expect("setOnInsert");
        for key in LabFields::names()
            .expect("encodes")
            .iter()
            .map(String::as_str)
            .chain([
                "id",
                "first_seen_at",
                "operation_history",
                "removed_at",
                "last_changed_at",
                "last_synced_at",
            ])
        {
            assert!(on_insert.contains_key(key), "{key}");
        }
        assert!(!on_insert.contains_key("unobserved_fields"));
        assert_eq!(on_insert.get_i64("sync_term").ok(), Some(3));
        assert_eq!(
            s.update.keys().collect::<Vec<_>>(),
            ["$setOnInsert"],
            "insert-only"
        );
    }

    /// Fields a sync did not observe stay marked (a create stores them so); once every one is
    /// observed the mark goes.
    #[test]
    fn unobserved_fields_stay_marked_until_observed() {
        let lab = ObservedLab::new("l1", LabFields::default());
        let was = DateTime::from_millis(1);
        let now = DateTime::from_millis(5);
        let statement =
            |w: RecordWrite| write_statement("w1", &w, None, now, 50, Term(1)).expect("encodes");
        let groups = vec!["groups".to_owned()];
        let s = statement(RecordWrite::Create {
            lab: lab.clone(),
            unobserved: groups.clone(),
        });
        let on_insert = s.update.get_document("$setOnInsert").expect("setOnInsert");
        assert_eq!(
            on_insert.get_array("unobserved_fields").ok(),
            Some(&vec![Bson::String("groups".into())])
        );
        for (unobserved, kept) in [(groups.clone(), true), (Vec::new(), false)] {
            for s in [
                statement(RecordWrite::Update {
                    lab: lab.clone(),
                    expected_last_synced: was,
                    reappeared: false,
                    entry: entry(),
                    unobserved: unobserved.clone(),
                }),
                statement(RecordWrite::Adopt {
                    lab: lab.clone(),
                    expected_last_synced: was,
                    unobserved: unobserved.clone(),
                }),
            ] {
                let set = s.update.get_document("$set").expect("set");
                assert_eq!(set.contains_key("unobserved_fields"), kept, "{s:?}");
                assert_eq!(s.update.contains_key("$unset"), !kept, "{s:?}");
            }
        }
    }

    #[test]
    fn update_is_conditional_and_caps_history() {
        let w = RecordWrite::Update {
            lab: ObservedLab::new("l1", LabFields::default()),
            expected_last_synced: DateTime::from_millis(1),
            reappeared: false,
            entry: entry(),
            unobserved: Vec::new(),
        };
        let s = write_statement("w1", &w, None, DateTime::from_millis(5), 50, Term(3))
            .expect("encodes");
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
    fn every_write_of_a_sync_but_a_create_is_fenced_by_its_term() {
        let lab = ObservedLab::new("l1", LabFields::default());
        let was = DateTime::from_millis(1);
        let writes = [
            RecordWrite::Update {
                lab: lab.clone(),
                expected_last_synced: was,
                reappeared: false,
                entry: entry(),
                unobserved: Vec::new(),
            },
            RecordWrite::Adopt {
                lab,
                expected_last_synced: was,
                unobserved: Vec::new(),
            },
            RecordWrite::Remove {
                lab_id: "l1".into(),
                expected_last_synced: was,
                entry: entry(),
            },
        ];
        let now = DateTime::from_millis(5);
        let mut statements: Vec<Statement> = writes
            .iter()
            .map(|w| write_statement("w1", w, None, now, 50, Term(9)).expect("encodes"))
            .collect();
        statements.push(stamp_statement("w1", &["l2".into()], now, Term(9)));
        for s in statements {
            assert_eq!(
                s.filter.get_document("sync_term").ok(),
                Some(&doc! { "$not": { "$gt": 9_i64 } }),
                "{s:?}"
            );
            let set = s.update.get_document("$set").expect("$set");
            assert_eq!(set.get_i64("sync_term").ok(), Some(9), "{s:?}");
        }
    }

    #[test]
    fn chunks_respect_the_byte_budget() {
        let big = Statement {
            filter: doc! {},
            update: doc! { "$set": { "notes": "x".repeat(3 * 1024 * 1024) } },
            upsert: false,
            multi: false,
            lab_id: None,
        };
        let small = Statement {
            filter: doc! {},
            update: doc! {},
            upsert: false,
            multi: false,
            lab_id: None,
        };
        let list = vec![big.clone(), big.clone(), big.clone(), small.clone()];
        let sizes: Vec<usize> = chunks(&list).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [2, 2]);
        assert_eq!(chunks(&[small]).len(), 1);
        assert!(chunks(&[]).is_empty());
    }
}
