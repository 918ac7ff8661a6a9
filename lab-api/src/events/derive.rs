//! From a change in MongoDB to the event the UI reads — pure: no I/O, no clock.
//!
//! A lab event is derived from what was written: the record after the write and the history
//! entry that write pushed (found by the record's `last_changed_at`, which every change sets
//! and a stamp of an unchanged lab never touches). An insert is a new lab. A write that only
//! stamps `last_synced_at`, a purge, or an upgrade of old documents is no event. A status
//! write of a sync is one sync of one worker: refreshed when it succeeded, failed otherwise (the
//! registry's fields sync-daemon copies into a status are no event). A throttle
//! notice in `sync_requests` is a refused refresh; a request that finished is no event, but
//! wakes whoever waits for it ([`finished_request`]).
//!
//! Each event says who it is for ([`Audience`]): a lab's change, the callers who may read the
//! lab (its `readers` before the write, from `readers_before` when the write changed them, and
//! after), with an addition for those who gain it and a removal without fields for those who
//! lose it; a write that changed only who may read it is an event for those two only. A
//! worker's sync or refused refresh, the callers with a user on it.

use std::collections::BTreeMap;

use bson::{Bson, DateTime, Document};
use serde_json::Value;
use shared::{
    record::{HistoryEntry, LabRecord},
    status::WorkerSyncStatus,
};

use super::{
    hub::Audience,
    payload::{
        self, Changed, DataRefreshed, LabChange, LabHidden, LabUpdated, RefreshThrottled,
        SyncFailed,
    },
    EventType,
};
use crate::dto::{iso, HistoryEntryDto, LabEntry};

/// The collection a change happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collection {
    Labs,
    Status,
    Requests,
    /// `cml_accounts`: a user's account on a worker.
    Accounts,
}

/// What kind of write it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Insert,
    Update,
    Replace,
    Delete,
    Other,
}

/// One change as the change stream reported it, without the driver's types.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub collection: Collection,
    pub operation: Operation,
    /// `updateDescription.updatedFields` (empty unless an update).
    pub updated_fields: Document,
    /// The document after the write (for updates: as looked up just after).
    pub full_document: Option<Document>,
}

/// An event: its type, the worker it concerns, its `data` (what most of its audience gets;
/// none when only those who gain or lose a lab get something) and who it is for.
#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    pub kind: EventType,
    pub worker_id: String,
    pub data: Option<Value>,
    pub audience: Audience,
}

/// A sync's `worker.data.refreshed` as a caller who sees `visible` of the worker's labs gets
/// it: its own count, none of the whole worker's figures.
pub fn refreshed_for(data: &Value, visible: i64) -> Value {
    let mut mine = data.clone();
    if let Some(o) = mine.as_object_mut() {
        o.insert("lab_count".into(), visible.into());
        o.insert("labs_synced".into(), visible.into());
        for key in [
            "labs_created",
            "labs_updated",
            "labs_unchanged",
            "labs_removed",
        ] {
            o.insert(key.into(), Value::Null);
        }
    }
    mine
}

/// A sync's `worker.data.refreshed` for each view (a client's principals on the worker,
/// sorted), from the reader lists of the worker's labs (each sorted, with how many labs have
/// it): each view counts the labs it may read. Views that count the same share one `data`
/// (rendered once); the groups come in count order.
pub fn refreshed_per_view(
    data: &Value,
    labs: &[(Vec<String>, usize)],
    views: Vec<Vec<String>>,
) -> Vec<(Vec<Vec<String>>, Value)> {
    let mut by_count: BTreeMap<usize, Vec<Vec<String>>> = BTreeMap::new();
    for view in views {
        let n = labs
            .iter()
            .filter(|(readers, _)| readers.iter().any(|p| view.binary_search(p).is_ok()))
            .map(|(_, n)| n)
            .sum();
        by_count.entry(n).or_default().push(view);
    }
    by_count
        .into_iter()
        .map(|(n, views)| {
            (
                views,
                refreshed_for(data, i64::try_from(n).unwrap_or(i64::MAX)),
            )
        })
        .collect()
}

/// The event a change makes, if any.
pub fn derive(change: &Change) -> Option<Derived> {
    match change.collection {
        Collection::Labs => lab_event(change),
        Collection::Status => status_event(change),
        Collection::Requests => throttle_event(change),
        Collection::Accounts => None,
    }
}

/// The user whose account on a worker a change wrote (made, changed, marked removed): what
/// that user may see changed.
pub fn account_changed(change: &Change) -> Option<String> {
    if change.collection != Collection::Accounts {
        return None;
    }
    Some(
        change
            .full_document
            .as_ref()?
            .get_str("username")
            .ok()?
            .to_owned(),
    )
}

/// A refused refresh, from its notice: `worker_id` and `retry_after_seconds`.
fn throttle_event(change: &Change) -> Option<Derived> {
    let notice = change.full_document.as_ref()?;
    if change.operation != Operation::Insert || notice.get_str("notice").ok()? != "throttled" {
        return None;
    }
    let worker_id = notice.get_str("throttled_worker_id").ok()?.to_owned();
    let retry_after = notice
        .get("retry_after_seconds")
        .and_then(shared::mongo::as_i64)?;
    Some(Derived {
        kind: EventType::RefreshThrottled,
        data: Some(payload::data(&RefreshThrottled {
            worker_id: worker_id.clone(),
            retry_after_seconds: retry_after,
        })),
        audience: Audience::Worker { partial: None },
        worker_id,
    })
}

/// The id of the sync request a change finished, if it finished one.
pub fn finished_request(change: &Change) -> Option<String> {
    if change.collection != Collection::Requests
        || change.operation != Operation::Update
        || !change.updated_fields.contains_key("finished_at")
    {
        return None;
    }
    Some(
        change
            .full_document
            .as_ref()?
            .get_str("_id")
            .ok()?
            .to_owned(),
    )
}

fn lab_event(change: &Change) -> Option<Derived> {
    let updated = &change.updated_fields;
    // The record is looked up when the stream reads the change, so a later write can show in
    // it: what this write set is laid over it (a removal read after the lab came back still
    // says when it was removed). Who may read it stays the looked-up one: the latest data go
    // only to those who may read them now.
    let mut written = change.full_document.clone()?;
    for (path, value) in updated {
        if !ACCESS_FIELDS
            .iter()
            .any(|f| path.split('.').next() == Some(*f))
        {
            set_path(&mut written, path, value.clone());
        }
    }
    let record: LabRecord = bson::from_document(written).ok()?;
    let regranted = updated.contains_key("readers");
    let lab_change = match change.operation {
        Operation::Insert => Some(created(&record)),
        Operation::Update => match updated.get_datetime("last_changed_at") {
            Ok(at) => {
                let entry = written_entry(updated, &record, *at)?;
                let dto = HistoryEntryDto::from(&entry);
                let changed = Changed {
                    previous_state: dto.previous_state,
                    new_state: dto.new_state,
                    changed_fields: dto.changed_fields,
                    changed_at: dto.timestamp,
                };
                Some(match entry.action() {
                    "reappeared" => LabChange::Reappeared(changed),
                    "removed" => LabChange::Removed(changed),
                    "state_changed" => LabChange::StateChanged(changed),
                    _ => LabChange::Updated {
                        change: changed,
                        synced_at: iso(record.last_synced_at),
                    },
                })
            }
            // Only who may read it changed: an event for those who gain or lose it.
            Err(_) if regranted => None,
            Err(_) => return None,
        },
        Operation::Replace | Operation::Delete | Operation::Other => return None,
    };
    let after = record.readers.clone();
    let before = match change.operation {
        Operation::Insert => Vec::new(),
        _ if regranted => strings(updated.get("readers_before")),
        _ => after.clone(),
    };
    let as_change = |c: LabChange| {
        payload::data(&LabUpdated {
            worker_id: record.worker_id.clone(),
            lab_id: record.lab_id.clone(),
            lab: LabEntry::from(&record),
            removed_at: record.removed_at.map(iso),
            change: c,
        })
    };
    let lost = payload::data(&LabHidden {
        worker_id: record.worker_id.clone(),
        lab_id: record.lab_id.clone(),
        action: "removed",
        reason: "access",
    });
    Some(Derived {
        kind: EventType::LabsUpdated,
        data: lab_change.map(as_change),
        audience: Audience::Lab {
            before,
            after,
            gained: as_change(created(&record)),
            lost,
        },
        worker_id: record.worker_id,
    })
}

/// A record's fields that say who may read it.
const ACCESS_FIELDS: [&str; 3] = ["readers", "readers_before", "shares"];

/// A lab as it arrives for a caller who had not seen it: created.
fn created(record: &LabRecord) -> LabChange {
    LabChange::Created {
        first_seen_at: iso(record.first_seen_at),
    }
}

/// A list of strings in a document (anything else: none).
fn strings(v: Option<&Bson>) -> Vec<String> {
    match v {
        Some(Bson::Array(items)) => items
            .iter()
            .filter_map(|b| b.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// The history entry the write pushed: the one stamped `at`, looked for among the entries the
/// update reported (the whole array, or `operation_history.N` keys), then in the record.
fn written_entry(updated: &Document, record: &LabRecord, at: DateTime) -> Option<HistoryEntry> {
    let entry = |b: &Bson| bson::from_bson::<HistoryEntry>(b.clone()).ok();
    let mut written: Vec<HistoryEntry> = Vec::new();
    for (key, value) in updated {
        if key == "operation_history" {
            if let Bson::Array(items) = value {
                written.extend(items.iter().filter_map(entry));
            }
        } else if key
            .strip_prefix("operation_history.")
            .is_some_and(|i| i.parse::<usize>().is_ok())
        {
            written.extend(entry(value));
        }
    }
    written
        .into_iter()
        .rev()
        .chain(record.operation_history.iter().rev().cloned())
        .find(|e| e.timestamp == at)
}

/// The status a sync wrote, and whether it succeeded. An update's `full_document` is looked up
/// when the stream reads the change, so a later write can show in it: a failure read after the
/// next success would look like that success. So an update's outcome is judged by the fields
/// it set alone (a success sets `last_success_at` to its `last_attempt_at`, a failure never
/// sets it), and those fields are laid over the looked-up document; the others are the
/// latest.
fn status_as_written(change: &Change) -> Option<(WorkerSyncStatus, bool)> {
    let mut written = change.full_document.clone()?;
    if change.operation != Operation::Update {
        let s: WorkerSyncStatus = bson::from_document(written).ok()?;
        let succeeded = s.consecutive_failures == 0 && s.last_success_at == Some(s.last_attempt_at);
        return Some((s, succeeded));
    }
    for (path, value) in &change.updated_fields {
        set_path(&mut written, path, value.clone());
    }
    let set = &change.updated_fields;
    let succeeded = matches!(
        (set.get("last_success_at"), set.get("last_attempt_at")),
        (Some(Bson::DateTime(success)), Some(Bson::DateTime(attempt))) if success == attempt
    );
    Some((bson::from_document(written).ok()?, succeeded))
}

/// Sets `value` at a dotted `path` (`last_counts.updated`, `operation_history.3`), as an
/// update description names the fields it changed inside a sub-document or an array.
fn set_path(doc: &mut Document, path: &str, value: Bson) {
    let Some((head, rest)) = path.split_once('.') else {
        doc.insert(path, value);
        return;
    };
    if !matches!(doc.get(head), Some(Bson::Document(_) | Bson::Array(_))) {
        doc.insert(head, Document::new());
    }
    if let Some(inner) = doc.get_mut(head) {
        set_in(inner, rest, value);
    }
}

/// [`set_path`] inside a sub-document or an array (an index past its end appends).
fn set_in(target: &mut Bson, path: &str, value: Bson) {
    match target {
        Bson::Document(d) => set_path(d, path, value),
        Bson::Array(items) => {
            let (head, rest) = path
                .split_once('.')
                .map_or((path, None), |(h, r)| (h, Some(r)));
            let Ok(i) = head.parse::<usize>() else { return };
            if i >= items.len() {
                if i > items.len() || rest.is_some() {
                    return;
                }
                items.push(Bson::Null);
            }
            match rest {
                None => items[i] = value,
                Some(rest) => set_in(&mut items[i], rest, value),
            }
        }
        _ => {}
    }
}

fn status_event(change: &Change) -> Option<Derived> {
    if !matches!(
        change.operation,
        Operation::Insert | Operation::Update | Operation::Replace
    ) {
        return None;
    }
    // A sync sets `last_attempt_at`; the registry's fields the daemon copies in do not.
    if change.operation == Operation::Update
        && !change.updated_fields.contains_key("last_attempt_at")
    {
        return None;
    }
    let (s, succeeded) = status_as_written(change)?;
    let (kind, data) = if succeeded {
        let c = s.last_counts.unwrap_or_default();
        (
            EventType::DataRefreshed,
            payload::data(&DataRefreshed {
                worker_id: s.worker_id.clone(),
                last_success_at: s.last_success_at.map(iso),
                lab_count: s.lab_count,
                duration_ms: s.last_duration_ms,
                labs_synced: c.synced,
                labs_created: Some(c.created),
                labs_updated: Some(c.updated),
                labs_unchanged: Some(c.unchanged),
                labs_removed: Some(c.removed),
            }),
        )
    } else {
        (
            EventType::SyncFailed,
            payload::data(&SyncFailed {
                worker_id: s.worker_id.clone(),
                error_kind: s.last_error_kind.clone(),
                error: s.last_error.clone(),
                consecutive_failures: s.consecutive_failures,
                last_attempt_at: iso(s.last_attempt_at),
                last_success_at: s.last_success_at.map(iso),
            }),
        )
    };
    let audience = match kind {
        EventType::DataRefreshed => Audience::Counts { views: Vec::new() },
        _ => {
            let mut partial = data.clone();
            if let Some(o) = partial.as_object_mut() {
                o.insert("error".into(), Value::Null);
            }
            Audience::Worker {
                partial: Some(partial),
            }
        }
    };
    Some(Derived {
        kind,
        worker_id: s.worker_id,
        data: Some(data),
        audience,
    })
}

#[cfg(test)]
mod tests {
    use bson::doc;
    use serde_json::json;
    use shared::record::REMOVED_STATE;

    use super::*;

    fn t(ms: i64) -> DateTime {
        DateTime::from_millis(1_795_000_000_000 + ms)
    }

    #[test]
    fn each_view_of_a_sync_counts_the_labs_it_may_read_once() {
        let data = json!({ "worker_id": "w", "lab_count": 3, "labs_synced": 3, "labs_created": 1,
            "labs_updated": 0, "labs_unchanged": 2, "labs_removed": 0 });
        let labs = vec![
            (vec!["a:w".to_owned(), "u:w:alice".to_owned()], 1),
            (
                vec!["a:w".to_owned(), "g:w:g1".to_owned(), "u:w:bob".to_owned()],
                1,
            ),
            (
                vec![
                    "a:w".to_owned(),
                    "g:w:g1".to_owned(),
                    "u:w:alice".to_owned(),
                ],
                1,
            ),
        ];
        let views = vec![
            vec!["g:w:g1".to_owned(), "u:w:alice".to_owned()],
            vec!["u:w:bob".to_owned()],
            vec!["u:w:zed".to_owned()],
        ];
        let got = refreshed_per_view(&data, &labs, views.clone());
        let counts: Vec<(Vec<Vec<String>>, Value, Value)> = got
            .into_iter()
            .map(|(v, d)| (v, d["lab_count"].clone(), d["labs_created"].clone()))
            .collect();
        assert_eq!(
            counts,
            vec![
                (vec![views[2].clone()], json!(0), Value::Null),
                (vec![views[1].clone()], json!(1), Value::Null),
                (vec![views[0].clone()], json!(3), Value::Null),
            ],
            "a lab read through two principals of a view counts once"
        );
    }

    #[test]
    fn views_that_count_the_same_share_one_data_and_each_list_counts_its_labs() {
        let data = json!({ "worker_id": "w", "lab_count": 4 });
        let v = |p: &[&str]| p.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
        let labs = vec![(v(&["a:w", "g:w:g1"]), 3), (v(&["a:w", "g:w:g2"]), 1)];
        let views = vec![v(&["g:w:g1"]), v(&["g:w:g2"]), v(&["g:w:g1", "u:w:x"])];
        let got: Vec<(Vec<Vec<String>>, Value)> = refreshed_per_view(&data, &labs, views)
            .into_iter()
            .map(|(views, d)| (views, d["lab_count"].clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (vec![v(&["g:w:g2"])], json!(1)),
                (vec![v(&["g:w:g1"]), v(&["g:w:g1", "u:w:x"])], json!(3)),
            ]
        );
    }

    fn entry(at: i64, previous: &str, new: &str, field: &str) -> Document {
        doc! {
            "timestamp": t(at), "previous_state": previous, "new_state": new,
            "changed_fields": { field: { "old": "a", "new": "b" } },
        }
    }

    fn record(history: Vec<Document>, removed: Option<i64>) -> Document {
        doc! {
            "id": "rec-1", "worker_id": "w1", "lab_id": "l1",
            "title": "Lab <b>", "description": "", "notes": "", "state": "STARTED",
            "owner_username": "alice", "owner_fullname": "Alice", "node_count": 3, "link_count": 2,
            "groups": [], "cml_created_at": t(0), "modified_at": t(0),
            "first_seen_at": t(1), "last_synced_at": t(50), "removed_at": removed.map(t),
            "last_changed_at": t(40), "operation_history": history,
        }
    }

    fn update(updated: Document, full: Document) -> Change {
        Change {
            collection: Collection::Labs,
            operation: Operation::Update,
            updated_fields: updated,
            full_document: Some(full),
        }
    }

    #[test]
    fn who_may_see_a_lab_goes_with_its_event() {
        let mut full = record(vec![], None);
        full.insert("readers", vec!["a:w1", "u:w1:bob"]);
        let insert = derive(&Change {
            collection: Collection::Labs,
            operation: Operation::Insert,
            updated_fields: Document::new(),
            full_document: Some(full.clone()),
        })
        .expect("event");
        let Audience::Lab {
            before,
            after,
            lost,
            ..
        } = &insert.audience
        else {
            panic!("{:?}", insert.audience);
        };
        assert!(before.is_empty(), "nobody saw a new lab");
        assert_eq!(after, &["a:w1", "u:w1:bob"]);
        assert_eq!(
            lost,
            &serde_json::json!({
                "worker_id": "w1", "lab_id": "l1", "action": "removed", "reason": "access",
            }),
            "a removal says nothing of the lab"
        );
        // Only its sharing changed: no event for those who keep it.
        let regrant = derive(&update(
            doc! { "readers": ["a:w1", "u:w1:bob"], "readers_before": ["a:w1", "g:w1:g"], "last_synced_at": t(60) },
            full.clone(),
        ))
        .expect("event");
        assert_eq!(regrant.data, None);
        let Audience::Lab { before, gained, .. } = &regrant.audience else {
            panic!("{:?}", regrant.audience);
        };
        assert_eq!(before, &["a:w1", "g:w1:g"]);
        assert_eq!(
            gained["action"], "created",
            "who gains it gets it as an addition"
        );
        assert!(gained.get("notes").is_none());
        // A stamp is still no event.
        assert_eq!(
            derive(&update(doc! { "last_synced_at": t(70) }, full)),
            None
        );
    }

    #[test]
    fn an_insert_is_a_created_lab_with_the_ui_fields() {
        let d = derive(&Change {
            collection: Collection::Labs,
            operation: Operation::Insert,
            updated_fields: Document::new(),
            full_document: Some(record(vec![], None)),
        })
        .expect("event");
        assert_eq!(d.kind, EventType::LabsUpdated);
        assert_eq!(d.worker_id, "w1");
        assert_eq!(d.data.clone().expect("data")["action"], "created");
        assert!(
            d.data.clone().expect("data").get("notes").is_none(),
            "notes stay out of events"
        );
        assert_eq!(d.data.clone().expect("data")["lab_id"], "l1");
        assert_eq!(
            d.data.clone().expect("data")["id"],
            "l1",
            "the UI's list entry: id is the lab id"
        );
        for key in [
            "title",
            "state",
            "node_count",
            "link_count",
            "owner_username",
            "owner",
            "groups",
            "last_synced",
            "first_seen_at",
        ] {
            assert!(
                d.data.clone().expect("data").get(key).is_some(),
                "{key}: {}",
                d.data.clone().expect("data")
            );
        }
        assert_eq!(
            d.data.clone().expect("data")["title"],
            "Lab <b>",
            "text as stored: the page escapes it"
        );
    }

    #[test]
    fn a_stamp_of_an_unchanged_lab_is_no_event() {
        let c = update(
            doc! { "last_synced_at": t(60) },
            record(vec![entry(40, "STOPPED", "STARTED", "state")], None),
        );
        assert_eq!(derive(&c), None);
    }

    #[test]
    fn the_action_follows_the_entry_the_write_pushed() {
        let cases = [
            (entry(40, "STOPPED", "STARTED", "state"), "state_changed"),
            (entry(40, "STARTED", "STARTED", "title"), "updated"),
            (entry(40, "STARTED", REMOVED_STATE, "removed_at"), "removed"),
            (
                entry(40, REMOVED_STATE, "STARTED", "removed_at"),
                "reappeared",
            ),
        ];
        for (e, want) in cases {
            // Reported as the whole array, as `operation_history.N`, or only in the record.
            let shapes = [
                doc! { "last_changed_at": t(40), "operation_history": [e.clone()] },
                doc! { "last_changed_at": t(40), "operation_history.7": e.clone() },
                doc! { "last_changed_at": t(40) },
            ];
            for updated in shapes {
                let d =
                    derive(&update(updated.clone(), record(vec![e.clone()], None))).expect("event");
                assert_eq!(d.data.clone().expect("data")["action"], want, "{updated}");
                assert_eq!(d.data.clone().expect("data")["changed_at"], iso(t(40)));
                assert_eq!(
                    d.data.clone().expect("data")["new_state"],
                    e.get_str("new_state").expect("s")
                );
                assert_eq!(
                    d.data.clone().expect("data")["changed_fields"]
                        .as_object()
                        .map(|o| o.len()),
                    Some(1)
                );
            }
        }
    }

    #[test]
    fn a_later_write_seen_by_the_lookup_does_not_change_what_this_write_was() {
        // This write pushed the state change at t=40; by the lookup the record had a title
        // change at t=45 too.
        let this = entry(40, "STOPPED", "STARTED", "state");
        let later = entry(45, "STARTED", "STARTED", "title");
        let d = derive(&update(
            doc! { "last_changed_at": t(40), "operation_history": [this.clone()] },
            record(vec![this, later], None),
        ))
        .expect("event");
        assert_eq!(d.data.clone().expect("data")["action"], "state_changed");
        assert_eq!(d.data.clone().expect("data")["changed_at"], iso(t(40)));
    }

    /// A removal the stream reads after the lab came back: the record looked up says it is
    /// there, the event says when it was removed, as the write did.
    #[test]
    fn a_removal_read_after_the_lab_came_back_keeps_its_time() {
        let gone = entry(40, "STARTED", "STARTED", "removed_at");
        let back = entry(45, "STARTED", "STARTED", "removed_at");
        let d = derive(&update(
            doc! {
                "last_changed_at": t(40), "removed_at": t(40),
                "operation_history.1": bson::to_bson(&gone).expect("entry"),
            },
            record(vec![entry(30, "A", "B", "state"), gone, back], None),
        ))
        .expect("event");
        let data = d.data.expect("data");
        assert_eq!(data["removed_at"], iso(t(40)));
    }

    #[test]
    fn an_update_description_is_laid_over_documents_and_arrays() {
        let mut d = doc! { "a": { "b": 1_i64 }, "list": [1_i64, 2_i64] };
        for (path, v) in [
            ("a.b", 5_i64),
            ("a.c", 6),
            ("list.1", 7),
            ("list.2", 8),
            ("list.9", 9),
            ("new.x", 10),
        ] {
            set_path(&mut d, path, Bson::Int64(v));
        }
        assert_eq!(
            d,
            doc! { "a": { "b": 5_i64, "c": 6_i64 }, "list": [1_i64, 7_i64, 8_i64], "new": { "x": 10_i64 } }
        );
    }

    #[test]
    fn without_its_entry_or_its_record_a_change_is_no_event() {
        let gone = Change {
            full_document: None,
            ..update(doc! { "last_changed_at": t(40) }, Document::new())
        };
        assert_eq!(derive(&gone), None, "purged before the lookup");
        let other = update(
            doc! { "last_changed_at": t(41) },
            record(vec![entry(40, "A", "B", "state")], None),
        );
        assert_eq!(derive(&other), None, "no entry stamped t=41");
    }

    fn status(failures: i64, success: Option<i64>, attempt: i64) -> Document {
        doc! {
            "worker_id": "w1", "last_attempt_at": t(attempt), "last_success_at": success.map(t),
            "last_error": (failures > 0).then_some("CML timed out"),
            "last_error_kind": (failures > 0).then_some("cml_timeout"),
            "consecutive_failures": failures, "lab_count": 7_i64, "last_duration_ms": 120_i64,
            "last_counts": { "synced": 7_i64, "created": 1_i64, "updated": 2_i64, "unchanged": 4_i64, "removed": 0_i64 },
        }
    }

    #[test]
    fn a_status_write_is_a_refresh_or_a_failure() {
        for operation in [Operation::Insert, Operation::Update, Operation::Replace] {
            let (synced, failed_at) = match operation {
                Operation::Update => (
                    doc! { "last_attempt_at": t(10), "last_success_at": t(10) },
                    doc! { "last_attempt_at": t(20), "consecutive_failures": 3_i64 },
                ),
                _ => (Document::new(), Document::new()),
            };
            let ok = derive(&Change {
                collection: Collection::Status,
                operation,
                updated_fields: synced.clone(),
                full_document: Some(status(0, Some(10), 10)),
            })
            .expect("event");
            assert_eq!(ok.kind, EventType::DataRefreshed);
            assert_eq!(
                (
                    &ok.data.clone().expect("data")["labs_synced"],
                    &ok.data.clone().expect("data")["labs_created"],
                    &ok.data.clone().expect("data")["labs_updated"]
                ),
                (&json!(7), &json!(1), &json!(2))
            );
            assert_eq!(
                ok.data.clone().expect("data")["last_success_at"],
                iso(t(10))
            );
            let failed = derive(&Change {
                collection: Collection::Status,
                operation,
                updated_fields: failed_at,
                full_document: Some(status(3, Some(10), 20)),
            })
            .expect("event");
            assert_eq!(failed.kind, EventType::SyncFailed);
            assert_eq!(
                failed.data.clone().expect("data")["error_kind"],
                "cml_timeout"
            );
            assert_eq!(
                failed.data.clone().expect("data")["consecutive_failures"],
                3
            );
        }
        assert_eq!(
            derive(&Change {
                collection: Collection::Status,
                operation: Operation::Delete,
                updated_fields: Document::new(),
                full_document: None,
            }),
            None
        );
        // The registry's fields copied in: no sync, no event.
        assert_eq!(
            derive(&Change {
                collection: Collection::Status,
                operation: Operation::Update,
                updated_fields: doc! { "registry_status": "stopped", "active": false },
                full_document: Some(status(0, Some(10), 10)),
            }),
            None
        );
        // A worker never synced gets a document without a sync in it: no event either.
        assert_eq!(
            derive(&Change {
                collection: Collection::Status,
                operation: Operation::Insert,
                updated_fields: Document::new(),
                full_document: Some(
                    doc! { "worker_id": "w1", "registry_status": "running", "active": true, "consecutive_failures": 0_i64 }
                ),
            }),
            None
        );
    }

    /// The stream looks an update's document up when it reads the change: a failure read
    /// after the next success finds that success, and is still a failure, with its own
    /// attempt and count; a success read after a failure is still a success.
    #[test]
    fn a_status_update_is_judged_by_what_it_set_not_by_a_later_write() {
        let failed = derive(&Change {
            collection: Collection::Status,
            operation: Operation::Update,
            updated_fields: doc! {
                "last_attempt_at": t(20), "consecutive_failures": 1_i64,
                "last_error": "CML timed out", "last_error_kind": "cml_timeout",
            },
            full_document: Some(status(0, Some(30), 30)),
        })
        .expect("event");
        assert_eq!(failed.kind, EventType::SyncFailed);
        let data = failed.data.expect("data");
        assert_eq!(
            (
                &data["last_attempt_at"],
                &data["consecutive_failures"],
                &data["error_kind"]
            ),
            (&json!(iso(t(20))), &json!(1), &json!("cml_timeout"))
        );
        let synced = derive(&Change {
            collection: Collection::Status,
            operation: Operation::Update,
            updated_fields: doc! {
                "last_attempt_at": t(10), "last_success_at": t(10),
                "last_counts.updated": 5_i64,
            },
            full_document: Some(status(2, Some(10), 20)),
        })
        .expect("event");
        assert_eq!(synced.kind, EventType::DataRefreshed);
        assert_eq!(synced.data.expect("data")["labs_updated"], 5);
    }

    #[test]
    fn a_throttle_notice_is_an_event_and_a_finished_request_wakes_its_waiters() {
        let notice = Change {
            collection: Collection::Requests,
            operation: Operation::Insert,
            updated_fields: Document::new(),
            full_document: Some(doc! {
                "_id": "throttled:x", "notice": "throttled", "throttled_worker_id": "w1",
                "retry_after_seconds": 42_i64, "requested_at": t(0),
            }),
        };
        let d = derive(&notice).expect("an event");
        assert_eq!(d.kind, EventType::RefreshThrottled);
        assert_eq!(d.worker_id, "w1");
        assert_eq!(
            d.data.clone().expect("data"),
            json!({ "worker_id": "w1", "retry_after_seconds": 42 })
        );
        assert_eq!(finished_request(&notice), None);

        let request =
            doc! { "_id": "r1", "worker_id": "w1", "status": "done", "requested_at": t(0) };
        let inserted = Change {
            full_document: Some(request.clone()),
            ..notice.clone()
        };
        assert!(derive(&inserted).is_none(), "a request is no event");
        let finished = Change {
            operation: Operation::Update,
            updated_fields: doc! { "status": "done", "finished_at": t(5) },
            ..inserted.clone()
        };
        assert!(derive(&finished).is_none());
        assert_eq!(finished_request(&finished).as_deref(), Some("r1"));
        let claimed = Change {
            updated_fields: doc! { "status": "running", "started_at": t(1) },
            ..finished
        };
        assert_eq!(finished_request(&claimed), None);
    }
}
