//! Change detection: from the stored records of one worker and a fresh listing, the writes a sync needs.
//!
//! Pure: no I/O, no clock. The store turns a [`SyncPlan`] into MongoDB statements.
//! The only failure is a tracked field that BSON cannot encode (none can today).

use std::collections::{BTreeMap, HashMap};

use bson::{Bson, DateTime};

use crate::{
    record::{FieldChange, HistoryEntry, LabFields, LabRecord, ObservedLab, REMOVED_STATE},
    Result,
};

/// Whether a listing of a worker's labs is known to be the whole truth.
///
/// Only a complete listing may mark labs as removed: an error, a 404, a non-list body or a
/// fallback that could not read every lab says nothing about the labs it did not return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Complete,
    Partial,
}

/// Whether a listing says which groups its labs are shared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Groups {
    /// Every lab's groups were read: from the lab objects (CML up to 2.8) or from the
    /// server's group associations (2.9+).
    Observed,
    /// They could not be read (the group associations failed, or a sync that read one lab
    /// only): a known lab keeps the groups its record has; a new one starts with none, marked
    /// unobserved, so the first read adopts them without a history entry.
    Unknown,
}

impl Groups {
    /// The tracked fields a listing leaves unobserved.
    fn unobserved(self) -> &'static [&'static str] {
        match self {
            Groups::Observed => &[],
            Groups::Unknown => &["groups"],
        }
    }
}

/// One record-level write of a sync.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordWrite {
    /// A lab never seen before on this worker. Its history starts empty: history is the list
    /// of changes, and `first_seen_at` records the discovery.
    Create {
        lab: ObservedLab,
        /// Tracked fields the listing did not observe (stored empty, adopted when first seen).
        unobserved: Vec<String>,
    },
    /// A known lab whose tracked fields changed, or that came back after being marked removed.
    Update {
        lab: ObservedLab,
        /// `last_synced_at` as read: the write applies only if nobody synced the record since.
        expected_last_synced: DateTime,
        reappeared: bool,
        entry: HistoryEntry,
        /// The record's unobserved fields this listing did not observe either.
        unobserved: Vec<String>,
    },
    /// A known lab whose only news is the first value of fields it never had (added to the
    /// model since it was written, or unread when it was created): stored without a history
    /// entry, as nothing changed.
    Adopt {
        lab: ObservedLab,
        expected_last_synced: DateTime,
        /// The record's unobserved fields this listing did not observe either.
        unobserved: Vec<String>,
    },
    /// A known lab missing from a complete listing.
    Remove {
        lab_id: String,
        expected_last_synced: DateTime,
        entry: HistoryEntry,
    },
    /// A known lab unchanged but for who may see it (its shares, or its owner's account):
    /// its access (in [`SyncPlan::access`]) is written, without a history entry.
    Regrant {
        lab_id: String,
        expected_last_synced: DateTime,
        /// Whether `last_synced_at` is stamped too (a sync that read the lab; not one that read
        /// only who may see it).
        stamp: bool,
    },
}

impl RecordWrite {
    pub fn lab_id(&self) -> &str {
        match self {
            RecordWrite::Create { lab, .. }
            | RecordWrite::Update { lab, .. }
            | RecordWrite::Adopt { lab, .. } => &lab.lab_id,
            RecordWrite::Remove { lab_id, .. } | RecordWrite::Regrant { lab_id, .. } => lab_id,
        }
    }
}

/// Who may see one lab, as a write stores it: its shares and its readers (see
/// [`crate::access`]), and the readers it had (what the live stream compares).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabAccess {
    pub shares: Vec<String>,
    pub readers: Vec<String>,
    pub readers_before: Vec<String>,
}

/// What a sync knows of its labs' shares.
#[derive(Debug, Clone, Copy)]
pub enum Shares<'a> {
    /// Read with the listing: each lab's share principals (a lab absent is shared with nobody).
    Read(&'a HashMap<String, Vec<String>>),
    /// Not read, or the read failed: each record keeps the shares it has.
    Kept,
}

/// Everything one sync of one worker must write.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncPlan {
    pub worker_id: String,
    pub now: DateTime,
    pub writes: Vec<RecordWrite>,
    /// Labs seen with nothing changed: only their `last_synced_at` is stamped (adopted ones
    /// count as unchanged too).
    pub unchanged: Vec<String>,
    /// The access each written lab gets, by lab id, when it is new or changed (see
    /// [`plan_access`]).
    pub access: HashMap<String, LabAccess>,
}

/// The figures of a plan, as logged per worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanCounts {
    /// Labs in the listing.
    pub synced: usize,
    pub created: usize,
    /// Changed labs, reappeared ones included.
    pub updated: usize,
    pub unchanged: usize,
    pub removed: usize,
    pub reappeared: usize,
}

impl SyncPlan {
    /// Whether a lab it writes changed state (a lab started, stopped, wiped): activity on the
    /// worker, as an idle-worker check sees it.
    pub fn changes_a_state(&self) -> bool {
        self.writes.iter().any(|w| match w {
            RecordWrite::Update { entry, .. } => {
                entry.previous_state.as_deref() != Some(entry.new_state.as_str())
            }
            _ => false,
        })
    }

    pub fn counts(&self) -> PlanCounts {
        let mut c = PlanCounts {
            unchanged: self.unchanged.len(),
            ..PlanCounts::default()
        };
        for w in &self.writes {
            match w {
                RecordWrite::Create { .. } => c.created += 1,
                RecordWrite::Update { reappeared, .. } => {
                    c.updated += 1;
                    c.reappeared += usize::from(*reappeared);
                }
                RecordWrite::Adopt { .. } | RecordWrite::Regrant { .. } => c.unchanged += 1,
                RecordWrite::Remove { .. } => c.removed += 1,
            }
        }
        c.synced = c.created + c.updated + c.unchanged;
        c
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.unchanged.is_empty()
    }
}

/// Compares every tracked field; the result holds exactly the fields that changed, named as
/// stored, in declaration order.
///
/// Text is compared exactly (a blank line added to a note is an edit); groups are compared as
/// sets (CML lists them in no particular order).
pub fn diff(old: &LabFields, new: &LabFields) -> Result<BTreeMap<String, FieldChange>> {
    let old = old.clone().canonical();
    let new = new.clone().canonical();
    if old == new {
        // Most labs did not change: no documents to build.
        return Ok(BTreeMap::new());
    }
    Ok(old
        .to_document()?
        .into_iter()
        .zip(new.to_document()?)
        .filter(|((_, o), (_, n))| o != n)
        .map(|((name, o), (_, n))| (name, FieldChange { old: o, new: n }))
        .collect())
}

/// Plans the sync of one worker from its stored records and what its CML server listed.
pub fn plan_sync(
    worker_id: &str,
    stored: &[LabRecord],
    observed: Vec<ObservedLab>,
    listing: Listing,
    groups: Groups,
    now: DateTime,
) -> Result<SyncPlan> {
    let by_id: HashMap<&str, &LabRecord> = stored.iter().map(|r| (r.lab_id.as_str(), r)).collect();
    // A listing that names a lab twice keeps the last description of it.
    let observed: BTreeMap<String, ObservedLab> = observed
        .into_iter()
        .map(|lab| (lab.lab_id.clone(), lab))
        .collect();
    let mut writes = Vec::new();
    let mut unchanged = Vec::new();
    for (lab_id, lab) in &observed {
        match by_id.get(lab_id.as_str()) {
            None => writes.push(create(lab, groups)),
            Some(record) => match update(record, lab, groups, now)? {
                Some(write) => writes.push(write),
                None => unchanged.push(lab_id.clone()),
            },
        }
    }
    if listing == Listing::Complete {
        let mut gone: Vec<&LabRecord> = stored
            .iter()
            .filter(|r| r.removed_at.is_none() && !observed.contains_key(&r.lab_id))
            .collect();
        gone.sort_by(|a, b| a.lab_id.cmp(&b.lab_id));
        writes.extend(gone.into_iter().map(|record| remove(record, now)));
    }
    Ok(SyncPlan {
        worker_id: worker_id.to_owned(),
        now,
        writes,
        unchanged,
        access: HashMap::new(),
    })
}

/// Adds to a plan who may see each lab it keeps: a lab's readers follow from its owner (as
/// the plan writes it) and its shares (as read, or as its record has them). A new lab gets
/// its access; a known one whose access changed gets it too, an unchanged lab by a
/// [`RecordWrite::Regrant`] instead of its stamp. Tombstones keep theirs.
pub fn plan_access(plan: &mut SyncPlan, stored: &[LabRecord], shares: Shares<'_>) {
    let by_id: HashMap<&str, &LabRecord> = stored.iter().map(|r| (r.lab_id.as_str(), r)).collect();
    let worker_id = plan.worker_id.clone();
    let access_of = |lab_id: &str, owner: &str, record: Option<&LabRecord>| -> Option<LabAccess> {
        let shares = match shares {
            Shares::Read(map) => map.get(lab_id).cloned().unwrap_or_default(),
            Shares::Kept => record.map(|r| r.shares.clone()).unwrap_or_default(),
        };
        let readers = crate::access::readers(&worker_id, owner, &shares);
        let before = record.map(|r| r.readers.clone()).unwrap_or_default();
        let same = record.is_some_and(|r| r.shares == shares && r.readers == readers);
        (!same).then_some(LabAccess {
            shares,
            readers,
            readers_before: before,
        })
    };
    let mut access = HashMap::new();
    for w in &plan.writes {
        if let RecordWrite::Create { lab, .. }
        | RecordWrite::Update { lab, .. }
        | RecordWrite::Adopt { lab, .. } = w
        {
            let record = by_id.get(lab.lab_id.as_str()).copied();
            if let Some(a) = access_of(&lab.lab_id, &lab.fields.owner_username, record) {
                access.insert(lab.lab_id.clone(), a);
            }
        }
    }
    let mut still = Vec::with_capacity(plan.unchanged.len());
    for lab_id in std::mem::take(&mut plan.unchanged) {
        let Some(record) = by_id.get(lab_id.as_str()).copied() else {
            still.push(lab_id);
            continue;
        };
        match access_of(&lab_id, &record.fields.owner_username, Some(record)) {
            Some(a) => {
                access.insert(lab_id.clone(), a);
                plan.writes.push(RecordWrite::Regrant {
                    lab_id,
                    expected_last_synced: record.last_synced_at,
                    stamp: true,
                });
            }
            None => still.push(lab_id),
        }
    }
    plan.unchanged = still;
    plan.access = access;
}

/// Plans the sync of some labs of a worker — those its CML event stream said changed — from
/// their stored records (`stored`: of those labs only) and what a re-read of each found: the
/// labs read are planned as [`plan_sync`] plans them (their groups `Unknown` when the read
/// does not carry them), each lab in `gone` (the server answered 404 for it) is tombstoned,
/// and no other lab of the worker is touched.
pub fn plan_labs(
    worker_id: &str,
    stored: &[LabRecord],
    read: Vec<ObservedLab>,
    gone: &[String],
    groups: Groups,
    now: DateTime,
) -> Result<SyncPlan> {
    let mut plan = plan_sync(worker_id, stored, read, Listing::Partial, groups, now)?;
    let mut removed: Vec<&LabRecord> = stored
        .iter()
        .filter(|r| r.removed_at.is_none() && gone.contains(&r.lab_id))
        .collect();
    removed.sort_by(|a, b| a.lab_id.cmp(&b.lab_id));
    removed.dedup_by(|a, b| a.lab_id == b.lab_id);
    plan.writes
        .extend(removed.into_iter().map(|record| remove(record, now)));
    Ok(plan)
}

/// A lab never seen before on this worker.
fn create(lab: &ObservedLab, groups: Groups) -> RecordWrite {
    let mut lab = lab.clone();
    if groups == Groups::Unknown {
        lab.fields.groups.clear();
    }
    RecordWrite::Create {
        lab,
        unobserved: groups.unobserved().iter().map(|&f| f.to_owned()).collect(),
    }
}

/// A known lab seen again: the write its changes need, or `None` when nothing changed.
fn update(
    record: &LabRecord,
    lab: &ObservedLab,
    groups: Groups,
    now: DateTime,
) -> Result<Option<RecordWrite>> {
    let kept;
    let lab = if groups == Groups::Unknown && lab.fields.groups != record.fields.groups {
        // Unread is not empty: the record keeps what it has.
        let mut l = lab.clone();
        l.fields.groups.clone_from(&record.fields.groups);
        kept = l;
        &kept
    } else {
        lab
    };
    let unobserved: Vec<String> = record
        .unobserved_fields
        .iter()
        .filter(|f| groups.unobserved().contains(&f.as_str()))
        .cloned()
        .collect();
    let mut changed = diff(&record.fields, &lab.fields)?;
    // A field the record never had a value for is observed now, not changed.
    changed.retain(|name, _| !record.unobserved_fields.contains(name));
    bound_history_text(&mut changed);
    let reappeared = record.removed_at.is_some();
    if reappeared {
        changed.insert(
            "removed_at".to_owned(),
            FieldChange {
                old: record.removed_at.map_or(Bson::Null, Bson::DateTime),
                new: Bson::Null,
            },
        );
    }
    if changed.is_empty() {
        // Adopted: fields unobserved until now that this listing observed.
        let adopt = record.unobserved_fields.len() > unobserved.len();
        return Ok(adopt.then(|| RecordWrite::Adopt {
            lab: lab.clone(),
            expected_last_synced: record.last_synced_at,
            unobserved,
        }));
    }
    let previous_state = if reappeared {
        REMOVED_STATE.to_owned()
    } else {
        record.fields.state.clone()
    };
    Ok(Some(RecordWrite::Update {
        entry: HistoryEntry {
            timestamp: now,
            previous_state: Some(previous_state),
            new_state: lab.fields.state.clone(),
            changed_fields: changed,
        },
        lab: lab.clone(),
        expected_last_synced: record.last_synced_at,
        reappeared,
        unobserved,
    }))
}

/// Longest text a history entry keeps of an old or a new value, in characters: an entry
/// records what changed, and fifty of them must fit in one record.
pub const HISTORY_TEXT_LIMIT: usize = 4096;

fn bound_history_text(changed: &mut BTreeMap<String, FieldChange>) {
    for change in changed.values_mut() {
        for value in [&mut change.old, &mut change.new] {
            if let Bson::String(text) = value {
                crate::record::truncate(text, HISTORY_TEXT_LIMIT);
            }
        }
    }
}

/// A known lab missing from a complete listing.
fn remove(record: &LabRecord, now: DateTime) -> RecordWrite {
    RecordWrite::Remove {
        lab_id: record.lab_id.clone(),
        expected_last_synced: record.last_synced_at,
        entry: HistoryEntry {
            timestamp: now,
            previous_state: Some(record.fields.state.clone()),
            new_state: REMOVED_STATE.to_owned(),
            changed_fields: BTreeMap::from([(
                "removed_at".to_owned(),
                FieldChange {
                    old: Bson::Null,
                    new: Bson::DateTime(now),
                },
            )]),
        },
    }
}

/// Appends `entry` and keeps the newest `limit` entries, oldest first — what `$push` with
/// `$slice: -limit` does in the store.
pub fn push_capped(history: &mut Vec<HistoryEntry>, entry: HistoryEntry, limit: usize) {
    history.push(entry);
    if history.len() > limit {
        history.drain(..history.len() - limit);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn plan_of(
        worker_id: &str,
        stored: &[LabRecord],
        observed: Vec<ObservedLab>,
        listing: Listing,
        now: DateTime,
    ) -> SyncPlan {
        plan_sync(worker_id, stored, observed, listing, Groups::Observed, now)
            .expect("plain fields encode")
    }

    #[test]
    fn access_is_written_with_a_lab_only_when_it_changes() {
        use crate::access::{admin_principal, group_principal, user_principal};
        let t0 = DateTime::from_millis(1_000);
        let t1 = DateTime::from_millis(2_000);
        let mut owned = fields("STOPPED");
        owned.owner_username = "alice".into();
        let labs = vec![
            ObservedLab::new("l1", owned.clone()),
            ObservedLab::new("l2", owned.clone()),
        ];
        let g = group_principal("w", "g1");
        let shares = HashMap::from([("l1".to_owned(), vec![g.clone()])]);
        let mut plan = plan_of("w", &[], labs.clone(), Listing::Complete, t0);
        plan_access(&mut plan, &[], Shares::Read(&shares));
        let l1 = &plan.access["l1"];
        assert_eq!(l1.shares, std::slice::from_ref(&g));
        assert_eq!(
            l1.readers,
            [
                admin_principal("w"),
                g.clone(),
                user_principal("w", "alice")
            ]
        );
        assert_eq!(plan.access["l2"].shares, Vec::<String>::new());
        let mut records = Vec::new();
        apply(&mut records, &plan, 50);

        // Seen again, nothing changed: stamps only.
        let mut again = plan_of("w", &records, labs.clone(), Listing::Complete, t1);
        plan_access(&mut again, &records, Shares::Read(&shares));
        assert!(again.writes.is_empty() && again.access.is_empty());
        assert_eq!(again.unchanged.len(), 2);

        // The share of l1 withdrawn: a regrant of l1 alone, counted unchanged, no history.
        let none = HashMap::new();
        let mut revoked = plan_of("w", &records, labs.clone(), Listing::Complete, t1);
        plan_access(&mut revoked, &records, Shares::Read(&none));
        assert!(
            matches!(&revoked.writes[..], [RecordWrite::Regrant { lab_id, .. }] if lab_id == "l1")
        );
        assert_eq!(revoked.unchanged, ["l2"]);
        assert_eq!(revoked.counts().unchanged, 2);
        assert_eq!(revoked.access["l1"].readers_before, records[0].readers);
        assert!(!revoked.access["l1"].readers.contains(&g));

        // An owner change read alone (shares kept): the new owner reads it, the shares stay.
        let mut bobs = owned.clone();
        bobs.owner_username = "bob".into();
        let mut moved = plan_labs(
            "w",
            &records[..1],
            vec![ObservedLab::new("l1", bobs)],
            &[],
            Groups::Observed,
            t1,
        )
        .expect("plan");
        plan_access(&mut moved, &records[..1], Shares::Kept);
        let a = &moved.access["l1"];
        assert_eq!(a.shares, std::slice::from_ref(&g));
        assert!(a.readers.contains(&user_principal("w", "bob")));
        assert!(!a.readers.contains(&user_principal("w", "alice")));
    }

    fn changes(old: &LabFields, new: &LabFields) -> BTreeMap<String, FieldChange> {
        diff(old, new).expect("plain fields encode")
    }

    fn fields(state: &str) -> LabFields {
        LabFields {
            title: "Lab A".into(),
            description: "desc".into(),
            notes: "line 1\nline 2".into(),
            state: state.into(),
            owner_username: "admin".into(),
            owner_fullname: "Admin".into(),
            node_count: 3,
            link_count: 2,
            groups: vec!["g1".into(), "g2".into()],
            cml_created_at: Some(DateTime::from_millis(1_700_000_000_000)),
            modified_at: Some(DateTime::from_millis(1_700_000_100_000)),
        }
    }

    /// What the store does with a plan, applied to in-memory records.
    fn apply(records: &mut Vec<LabRecord>, plan: &SyncPlan, limit: usize) {
        for id in &plan.unchanged {
            if let Some(r) = records.iter_mut().find(|r| &r.lab_id == id) {
                r.last_synced_at = plan.now;
            }
        }
        for w in &plan.writes {
            match w {
                RecordWrite::Create { lab, unobserved } => {
                    let mut r = record_from(&plan.worker_id, lab, plan.now);
                    r.unobserved_fields.clone_from(unobserved);
                    records.push(r)
                }
                RecordWrite::Update {
                    lab,
                    entry,
                    unobserved,
                    ..
                } => {
                    let r = records
                        .iter_mut()
                        .find(|r| r.lab_id == lab.lab_id)
                        .expect("exists");
                    r.fields.clone_from(&lab.fields);
                    r.removed_at = None;
                    r.last_synced_at = plan.now;
                    r.last_changed_at = Some(entry.timestamp);
                    r.unobserved_fields.clone_from(unobserved);
                    push_capped(&mut r.operation_history, entry.clone(), limit);
                }
                RecordWrite::Adopt {
                    lab, unobserved, ..
                } => {
                    let r = records
                        .iter_mut()
                        .find(|r| r.lab_id == lab.lab_id)
                        .expect("exists");
                    r.fields.clone_from(&lab.fields);
                    r.last_synced_at = plan.now;
                    r.unobserved_fields.clone_from(unobserved);
                }
                RecordWrite::Remove { lab_id, entry, .. } => {
                    let r = records
                        .iter_mut()
                        .find(|r| &r.lab_id == lab_id)
                        .expect("exists");
                    r.removed_at = Some(plan.now);
                    r.last_changed_at = Some(entry.timestamp);
                    push_capped(&mut r.operation_history, entry.clone(), limit);
                }
                RecordWrite::Regrant { lab_id, stamp, .. } => {
                    let r = records
                        .iter_mut()
                        .find(|r| &r.lab_id == lab_id)
                        .expect("exists");
                    if *stamp {
                        r.last_synced_at = plan.now;
                    }
                }
            }
            if let Some(a) = plan.access.get(w.lab_id()) {
                let r = records
                    .iter_mut()
                    .find(|r| r.lab_id == w.lab_id())
                    .expect("exists");
                r.shares.clone_from(&a.shares);
                r.readers.clone_from(&a.readers);
            }
        }
    }

    /// Plans a sync against `records` and applies it, as the daemon and the store would.
    fn observe(
        records: &mut Vec<LabRecord>,
        observed: Vec<ObservedLab>,
        listing: Listing,
        now: DateTime,
        limit: usize,
    ) -> SyncPlan {
        let plan = plan_of("w", records, observed, listing, now);
        apply(records, &plan, limit);
        plan
    }

    fn record_from(worker: &str, lab: &ObservedLab, now: DateTime) -> LabRecord {
        LabRecord {
            object_id: None,
            id: "id".into(),
            worker_id: worker.into(),
            lab_id: lab.lab_id.clone(),
            fields: lab.fields.clone(),
            first_seen_at: now,
            last_synced_at: now,
            operation_history: Vec::new(),
            removed_at: None,
            last_changed_at: Some(now),
            unobserved_fields: Vec::new(),
            shares: Vec::new(),
            readers: Vec::new(),
        }
    }

    #[test]
    fn a_sync_of_some_labs_writes_those_only_and_tombstones_only_the_labs_gone() {
        let mut records = Vec::new();
        let t0 = DateTime::from_millis(1_000);
        let labs = ["l1", "l2", "l3"].map(|id| ObservedLab::new(id, fields("STOPPED")));
        observe(&mut records, labs.to_vec(), Listing::Complete, t0, 50);
        let t1 = DateTime::from_millis(2_000);
        // l1 started, l2 deleted, l4 new; l3 not named: untouched, not tombstoned.
        let named: Vec<LabRecord> = records
            .iter()
            .filter(|r| ["l1", "l2", "l4"].contains(&r.lab_id.as_str()))
            .cloned()
            .collect();
        let mut read = vec![
            ObservedLab::new("l1", fields("STARTED")),
            ObservedLab::new("l4", fields("STOPPED")),
        ];
        // A re-read of one lab carries no groups on CML 2.9+: unknown, so kept.
        for lab in &mut read {
            lab.set_groups(Vec::new());
        }
        let plan = plan_labs(
            "w",
            &named,
            read,
            &["l2".into(), "l2".into()],
            Groups::Unknown,
            t1,
        )
        .expect("plan");
        assert_eq!(
            plan.counts(),
            PlanCounts {
                synced: 2,
                created: 1,
                updated: 1,
                removed: 1,
                ..PlanCounts::default()
            }
        );
        assert!(plan.unchanged.is_empty());
        assert!(plan.changes_a_state(), "l1 started");
        apply(&mut records, &plan, 50);
        let by = |id: &str| records.iter().find(|r| r.lab_id == id).expect("record");
        assert_eq!(by("l1").fields.state, "STARTED");
        assert_eq!(by("l1").fields.groups, ["g1", "g2"], "groups kept");
        assert_eq!(by("l1").operation_history.len(), 1);
        assert!(by("l2").removed_at.is_some());
        assert_eq!(
            by("l3").last_synced_at,
            t0,
            "a lab not named is not written"
        );
        assert!(by("l3").removed_at.is_none());
        assert_eq!(by("l4").unobserved_fields, ["groups"]);
        // A lab already tombstoned, or never stored, and gone: nothing to write.
        let plan = plan_labs(
            "w",
            &records,
            Vec::new(),
            &["l2".into(), "l9".into()],
            Groups::Unknown,
            t1,
        )
        .expect("plan");
        assert!(plan.writes.is_empty() && plan.unchanged.is_empty());
        assert!(!plan.changes_a_state());
    }

    #[test]
    fn a_new_lab_is_created_with_an_empty_history() {
        let plan = plan_of(
            "w",
            &[],
            vec![ObservedLab::new("l1", fields("STOPPED"))],
            Listing::Complete,
            DateTime::from_millis(1),
        );
        assert_eq!(
            plan.counts(),
            PlanCounts {
                synced: 1,
                created: 1,
                ..PlanCounts::default()
            }
        );
        assert!(
            matches!(&plan.writes[0], RecordWrite::Create { lab, unobserved } if lab.lab_id == "l1" && unobserved.is_empty())
        );
        let mut records = Vec::new();
        apply(&mut records, &plan, 50);
        assert!(records[0].operation_history.is_empty());
    }

    #[test]
    fn one_change_of_several_fields_gives_one_entry_with_all_of_them() {
        let mut records = Vec::new();
        let t0 = DateTime::from_millis(1_000);
        observe(
            &mut records,
            vec![ObservedLab::new("l1", fields("STOPPED"))],
            Listing::Complete,
            t0,
            50,
        );
        let mut next = fields("STARTED");
        next.node_count = 5;
        next.notes = "new notes".into();
        let plan = plan_of(
            "w",
            &records,
            vec![ObservedLab::new("l1", next)],
            Listing::Complete,
            DateTime::from_millis(2_000),
        );
        assert_eq!(plan.writes.len(), 1);
        let RecordWrite::Update {
            entry,
            expected_last_synced,
            reappeared,
            ..
        } = &plan.writes[0]
        else {
            panic!("not an update")
        };
        assert_eq!(*expected_last_synced, t0);
        assert!(!reappeared);
        assert_eq!(entry.previous_state.as_deref(), Some("STOPPED"));
        assert_eq!(entry.new_state, "STARTED");
        let keys: Vec<&str> = entry.changed_fields.keys().map(String::as_str).collect();
        assert_eq!(keys, ["node_count", "notes", "state"]);
        assert_eq!(
            entry.changed_fields["node_count"],
            FieldChange {
                old: Bson::Int32(3),
                new: Bson::Int32(5)
            }
        );
    }

    /// A field added to the model after a record was written: its first value is adopted
    /// without a history entry (nothing changed); the fields it had are compared as ever.
    #[test]
    fn a_field_the_record_never_had_is_adopted_not_changed() {
        let now = DateTime::from_millis(1_000);
        let old = ObservedLab::new(
            "l1",
            LabFields {
                title: "A".into(),
                ..LabFields::default()
            },
        );
        let mut record = record_from("w", &old, now);
        record.unobserved_fields = vec!["groups".into()];
        let seen = ObservedLab::new(
            "l1",
            LabFields {
                groups: vec!["g1".into()],
                ..old.fields.clone()
            },
        );
        let later = DateTime::from_millis(2_000);
        let plan = plan_of(
            "w",
            &[record.clone()],
            vec![seen.clone()],
            Listing::Complete,
            later,
        );
        assert_eq!(
            plan.writes,
            [RecordWrite::Adopt {
                lab: seen.clone(),
                expected_last_synced: now,
                unobserved: Vec::new(),
            }]
        );
        let c = plan.counts();
        assert_eq!((c.synced, c.unchanged, c.updated), (1, 1, 0));

        // With a real change too: one entry, naming only the real change.
        let retitled = ObservedLab::new(
            "l1",
            LabFields {
                title: "B".into(),
                ..seen.fields.clone()
            },
        );
        let plan = plan_of(
            "w",
            &[record.clone()],
            vec![retitled],
            Listing::Complete,
            later,
        );
        match &plan.writes[..] {
            [RecordWrite::Update { entry, .. }] => {
                assert_eq!(entry.changed_fields.keys().collect::<Vec<_>>(), ["title"]);
            }
            other => panic!("{other:?}"),
        }

        // Nothing unobserved left and nothing changed: no write at all.
        record.unobserved_fields.clear();
        record.fields = seen.fields.clone();
        let plan = plan_of("w", &[record], vec![seen], Listing::Complete, later);
        assert!(plan.writes.is_empty());
        assert_eq!(plan.unchanged, ["l1"]);
    }

    /// Groups that could not be read are not "no groups": known labs keep theirs, new labs
    /// start unobserved and adopt their groups silently once they are read.
    #[test]
    fn unread_groups_keep_what_records_have_and_are_adopted_once_read() {
        let t = DateTime::from_millis;
        let mut records = Vec::new();
        observe(
            &mut records,
            vec![ObservedLab::new("l1", fields("STOPPED"))],
            Listing::Complete,
            t(1),
            50,
        );
        let without = |mut f: LabFields| {
            f.groups.clear();
            f
        };
        let unread = |records: &[LabRecord], labs: Vec<ObservedLab>, now| {
            plan_sync("w", records, labs, Listing::Complete, Groups::Unknown, now)
                .expect("plain fields encode")
        };

        // l1 is known: its groups stay, and a real change is still seen. l2 is new.
        let mut next = without(fields("STARTED"));
        next.title = "renamed".into();
        let plan = unread(
            &records,
            vec![
                ObservedLab::new("l1", next),
                ObservedLab::new("l2", fields("STOPPED")),
            ],
            t(2),
        );
        match &plan.writes[..] {
            [RecordWrite::Update {
                lab,
                entry,
                unobserved,
                ..
            }, RecordWrite::Create {
                lab: new,
                unobserved: new_unobserved,
            }] => {
                assert_eq!(lab.fields.groups, ["g1", "g2"]);
                assert!(unobserved.is_empty());
                let keys: Vec<&str> = entry.changed_fields.keys().map(String::as_str).collect();
                assert_eq!(keys, ["state", "title"]);
                assert!(new.fields.groups.is_empty(), "unread groups are not stored");
                assert_eq!(new_unobserved, &["groups"]);
            }
            other => panic!("{other:?}"),
        }
        apply(&mut records, &plan, 50);

        // Unread again: nothing changed, nothing to write.
        let same = |r: &LabRecord| ObservedLab::new(r.lab_id.clone(), without(r.fields.clone()));
        let plan = unread(&records, records.iter().map(same).collect(), t(3));
        assert!(plan.writes.is_empty(), "{:?}", plan.writes);
        assert_eq!(plan.unchanged, ["l1", "l2"]);

        // A change to l2 while its groups are still unread keeps them unobserved.
        let mut l2 = same(&records[1]);
        l2.fields.notes = "edited".into();
        let plan = unread(&records, vec![same(&records[0]), l2], t(4));
        match &plan.writes[..] {
            [RecordWrite::Update {
                lab, unobserved, ..
            }] => {
                assert_eq!(lab.lab_id, "l2");
                assert_eq!(unobserved, &["groups"]);
            }
            other => panic!("{other:?}"),
        }
        apply(&mut records, &plan, 50);

        // Read at last: l2 adopts its groups without an entry; l1's are compared as ever.
        let mut l1 = records[0].fields.clone();
        l1.groups = vec!["g1".into()];
        let mut l2 = records[1].fields.clone();
        l2.groups = vec!["g9".into()];
        let plan = plan_of(
            "w",
            &records,
            vec![ObservedLab::new("l1", l1), ObservedLab::new("l2", l2)],
            Listing::Complete,
            t(5),
        );
        match &plan.writes[..] {
            [RecordWrite::Update { lab, entry, .. }, RecordWrite::Adopt {
                lab: adopted,
                unobserved,
                ..
            }] => {
                assert_eq!(lab.lab_id, "l1");
                assert_eq!(entry.changed_fields.keys().collect::<Vec<_>>(), ["groups"]);
                assert_eq!(adopted.fields.groups, ["g9"]);
                assert!(unobserved.is_empty());
            }
            other => panic!("{other:?}"),
        }
        apply(&mut records, &plan, 50);
        assert_eq!(records[1].operation_history.len(), 1, "only the notes edit");
        assert!(records.iter().all(|r| r.unobserved_fields.is_empty()));
    }

    #[test]
    fn every_tracked_field_is_detected() {
        let base = fields("STOPPED");
        let mut variants: Vec<(&str, LabFields)> = Vec::new();
        let mut v = base.clone();
        v.title = "other".into();
        variants.push(("title", v));
        let mut v = base.clone();
        v.description = "other".into();
        variants.push(("description", v));
        let mut v = base.clone();
        v.notes = "other".into();
        variants.push(("notes", v));
        let mut v = base.clone();
        v.state = "STARTED".into();
        variants.push(("state", v));
        let mut v = base.clone();
        v.owner_username = "bob".into();
        variants.push(("owner_username", v));
        let mut v = base.clone();
        v.owner_fullname = "Bob".into();
        variants.push(("owner_fullname", v));
        let mut v = base.clone();
        v.node_count = 9;
        variants.push(("node_count", v));
        let mut v = base.clone();
        v.link_count = 9;
        variants.push(("link_count", v));
        let mut v = base.clone();
        v.groups = vec!["g3".into()];
        variants.push(("groups", v));
        let mut v = base.clone();
        v.cml_created_at = None;
        variants.push(("cml_created_at", v));
        let mut v = base.clone();
        v.modified_at = Some(DateTime::from_millis(5));
        variants.push(("modified_at", v));
        assert_eq!(variants.len(), LabFields::names().expect("encodes").len());
        for (name, changed) in variants {
            let d = changes(&base, &changed);
            assert_eq!(d.keys().collect::<Vec<_>>(), [name], "changing {name}");
        }
    }

    #[test]
    fn a_partial_listing_removes_nothing() {
        let mut records = Vec::new();
        let labs = vec![
            ObservedLab::new("l1", fields("STOPPED")),
            ObservedLab::new("l2", fields("STOPPED")),
        ];
        observe(
            &mut records,
            labs,
            Listing::Complete,
            DateTime::from_millis(1),
            50,
        );
        let plan = plan_of(
            "w",
            &records,
            vec![],
            Listing::Partial,
            DateTime::from_millis(2),
        );
        assert!(plan.is_empty());
        let plan = plan_of(
            "w",
            &records,
            vec![ObservedLab::new("l1", fields("STOPPED"))],
            Listing::Complete,
            DateTime::from_millis(2),
        );
        assert_eq!(plan.counts().removed, 1);
        assert_eq!(plan.writes[0].lab_id(), "l2");
    }

    #[test]
    fn a_removed_lab_that_reappears_is_unmarked_with_an_entry() {
        let mut records = Vec::new();
        let t = DateTime::from_millis;
        observe(
            &mut records,
            vec![ObservedLab::new("l1", fields("STARTED"))],
            Listing::Complete,
            t(1),
            50,
        );
        observe(&mut records, vec![], Listing::Complete, t(2), 50);
        assert_eq!(records[0].removed_at, Some(t(2)));
        assert_eq!(
            records[0]
                .operation_history
                .last()
                .map(|e| e.new_state.as_str()),
            Some(REMOVED_STATE)
        );
        // Still gone: nothing more to write.
        assert!(plan_of("w", &records, vec![], Listing::Complete, t(3)).is_empty());
        let plan = plan_of(
            "w",
            &records,
            vec![ObservedLab::new("l1", fields("STARTED"))],
            Listing::Complete,
            t(4),
        );
        assert_eq!(
            plan.counts(),
            PlanCounts {
                synced: 1,
                updated: 1,
                reappeared: 1,
                ..PlanCounts::default()
            }
        );
        let RecordWrite::Update { entry, .. } = &plan.writes[0] else {
            panic!("not an update")
        };
        assert_eq!(entry.previous_state.as_deref(), Some(REMOVED_STATE));
        assert_eq!(
            entry.changed_fields.keys().collect::<Vec<_>>(),
            ["removed_at"]
        );
        apply(&mut records, &plan, 50);
        assert_eq!(records[0].removed_at, None);
    }

    #[test]
    fn history_entries_keep_at_most_a_bounded_part_of_long_text() {
        let mut long = fields("STOPPED");
        long.notes = "n".repeat(60_000);
        let mut records = Vec::new();
        observe(
            &mut records,
            vec![ObservedLab::new("l1", fields("STOPPED"))],
            Listing::Complete,
            DateTime::from_millis(1),
            50,
        );
        let plan = plan_of(
            "w",
            &records,
            vec![ObservedLab::new("l1", long)],
            Listing::Complete,
            DateTime::from_millis(2),
        );
        let RecordWrite::Update { entry, lab, .. } = &plan.writes[0] else {
            panic!("not an update")
        };
        assert_eq!(
            lab.fields.notes.len(),
            60_000,
            "the record keeps the whole value"
        );
        let Bson::String(new) = &entry.changed_fields["notes"].new else {
            panic!("text")
        };
        assert_eq!(new.chars().count(), HISTORY_TEXT_LIMIT);
    }

    #[test]
    fn push_capped_keeps_the_newest() {
        let mut h = Vec::new();
        for i in 0..70 {
            push_capped(
                &mut h,
                HistoryEntry {
                    timestamp: DateTime::from_millis(i),
                    previous_state: None,
                    new_state: String::new(),
                    changed_fields: BTreeMap::new(),
                },
                50,
            );
        }
        assert_eq!(h.len(), 50);
        assert_eq!(h.first().map(|e| e.timestamp.timestamp_millis()), Some(20));
        assert_eq!(h.last().map(|e| e.timestamp.timestamp_millis()), Some(69));
    }

    fn arb_text() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "lab", "x1", "é"]), 0..4)
            .prop_map(|w| w.join(" "))
    }

    fn arb_fields() -> impl Strategy<Value = LabFields> {
        (
            (
                arb_text(),
                arb_text(),
                arb_text(),
                prop::sample::select(vec!["DEFINED_ON_CORE", "STOPPED", "STARTED"]),
            ),
            (arb_text(), arb_text(), 0..4i32, 0..4i32),
            prop::collection::vec(prop::sample::select(vec!["g1", "g2", "g3"]), 0..3),
            (prop::option::of(0..3i64), prop::option::of(0..3i64)),
        )
            .prop_map(
                |(
                    (title, description, notes, state),
                    (user, full, nodes, links),
                    groups,
                    (c, m),
                )| LabFields {
                    title,
                    description,
                    notes,
                    state: state.to_owned(),
                    owner_username: user,
                    owner_fullname: full,
                    node_count: nodes,
                    link_count: links,
                    groups: groups.into_iter().map(str::to_owned).collect(),
                    cml_created_at: c.map(DateTime::from_millis),
                    modified_at: m.map(DateTime::from_millis),
                },
            )
    }

    /// The same text with other whitespace: padded, runs widened, `\n` as `\r\n`.
    fn respace(s: &str, seed: u8) -> String {
        let words: Vec<&str> = s.split_whitespace().collect();
        let sep = match seed % 3 {
            0 => "  ",
            1 => "\r\n",
            _ => " \t",
        };
        format!(
            "{}{}{}",
            if seed & 4 == 0 { "" } else { " " },
            words.join(sep),
            if seed & 8 == 0 { "\n" } else { "" }
        )
    }

    proptest! {
        #[test]
        fn history_never_exceeds_the_cap(
            seq in prop::collection::vec((arb_fields(), any::<bool>()), 1..40),
            limit in 1usize..8,
        ) {
            let mut records = Vec::new();
            for (i, (f, present)) in seq.into_iter().enumerate() {
                let observed = if present { vec![ObservedLab::new("l1", f)] } else { vec![] };
                let plan = plan_of("w", &records, observed, Listing::Complete, DateTime::from_millis(i as i64));
                apply(&mut records, &plan, limit);
                for r in &records {
                    prop_assert!(r.operation_history.len() <= limit);
                }
            }
        }

        #[test]
        fn observing_the_same_lab_twice_adds_at_most_one_entry(before in prop::option::of(arb_fields()), seen in arb_fields()) {
            let mut records = Vec::new();
            if let Some(f) = before {
                observe(&mut records, vec![ObservedLab::new("l1", f)], Listing::Complete, DateTime::from_millis(1), 50);
            }
            let len = |r: &Vec<LabRecord>| r.first().map_or(0, |r| r.operation_history.len());
            let start = len(&records);
            observe(&mut records, vec![ObservedLab::new("l1", seen.clone())], Listing::Complete, DateTime::from_millis(2), 50);
            let second = plan_of("w", &records, vec![ObservedLab::new("l1", seen)], Listing::Complete, DateTime::from_millis(3));
            prop_assert!(second.writes.is_empty(), "the second observation changed nothing");
            apply(&mut records, &second, 50);
            prop_assert!(len(&records) <= start + 1);
        }

        /// Whatever the syncs in between, a sync whose groups were unread never changes the
        /// groups a record has, never writes a history entry naming them, and a record's groups
        /// only ever come from a sync that read them.
        #[test]
        fn unread_groups_never_touch_stored_groups(
            seq in prop::collection::vec((arb_fields(), any::<bool>(), any::<bool>()), 1..30),
        ) {
            let mut records: Vec<LabRecord> = Vec::new();
            let mut last_read: Option<Vec<String>> = None;
            for (i, (f, present, read)) in seq.into_iter().enumerate() {
                let observed = if present { vec![ObservedLab::new("l1", f.clone())] } else { vec![] };
                let groups = if read { Groups::Observed } else { Groups::Unknown };
                let before = records.first().map(|r| r.fields.groups.clone());
                let plan = plan_sync("w", &records, observed, Listing::Complete, groups, DateTime::from_millis(i as i64))
                    .expect("plain fields encode");
                apply(&mut records, &plan, 50);
                let after = records.first().map(|r| r.fields.groups.clone());
                if read && present {
                    last_read = Some(f.canonical().groups);
                }
                if !read {
                    prop_assert!(after == before || before.is_none(), "{before:?} became {after:?}");
                    for w in &plan.writes {
                        if let RecordWrite::Update { entry, .. } = w {
                            prop_assert!(!entry.changed_fields.contains_key("groups"));
                        }
                    }
                }
                if let Some(r) = records.first() {
                    let expected = last_read.clone().unwrap_or_default();
                    prop_assert_eq!(&r.fields.groups, &expected);
                }
            }
        }

        #[test]
        fn group_order_and_repeats_never_count_as_a_change(f in arb_fields(), rotate in 0usize..3, repeat in any::<bool>()) {
            let mut g = f.clone();
            g.groups.reverse();
            let n = g.groups.len();
            if n > 0 { g.groups.rotate_left(rotate % n); }
            if repeat { g.groups.extend(f.groups.first().cloned()); }
            prop_assert!(changes(&f, &g).is_empty(), "{:?}", changes(&f, &g));
        }

        /// A whitespace-only edit of a text field (a blank line added to a note) is an edit.
        #[test]
        fn whitespace_edits_are_changes(f in arb_fields(), seed in any::<u8>(), which in 0usize..4) {
            let mut g = f.clone();
            let field = match which {
                0 => &mut g.title,
                1 => &mut g.description,
                2 => &mut g.notes,
                _ => &mut g.owner_fullname,
            };
            let before = field.clone();
            *field = respace(&before, seed);
            prop_assume!(*field != before);
            let name = ["title", "description", "notes", "owner_fullname"][which];
            let changed = changes(&f, &g);
            prop_assert_eq!(changed.keys().collect::<Vec<_>>(), [name]);
        }

        #[test]
        fn diff_is_empty_exactly_when_the_canonical_fields_are_equal(a in arb_fields(), b in arb_fields()) {
            prop_assert_eq!(changes(&a, &b).is_empty(), a.canonical() == b.canonical());
        }
    }
}
