//! The sync of one worker: fetch its labs (all of them, or the few its event stream named),
//! diff them against their records, write the changes — within the worker deadline — and tell
//! the outcome (one log line, its metrics).
//!
//! A failure leaves the worker's records as they were: nothing is written before the listing is
//! complete in memory, and every record write is atomic.

use std::{
    collections::{BTreeSet, HashSet},
    time::Duration,
};

use bson::DateTime;
use cml_client::{payload::GroupsShape, AccessRead, CmlTarget, FetchSource, GroupsRead};
use futures::{stream, StreamExt, TryStreamExt};
use shared::{
    accounts::AccountsWritten,
    change::{
        plan_access, plan_labs, plan_sync, Groups, Listing, PlanCounts, RecordWrite, Shares,
        SyncPlan,
    },
    fence::Term,
    record::ObservedLab,
    status::SyncWarning,
    store::ApplyOutcome,
};
use tokio::time::Instant;

use crate::{
    context::Context,
    logs::{
        AccessUnread, FieldsTruncated, GroupsUnread, LabIdsRefused, ListingNote, LogLine,
        RecordSkipped, RemovalsChecked, WorkerSyncFailed, WorkerSynced,
    },
    metrics::Metrics,
    schedule::Scope,
    status::StatusUpdate,
    Error, Result,
};

/// Labs of one worker re-read at once by a sync of some labs.
const LAB_READS_IN_FLIGHT: usize = 4;

/// What one successful worker sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerOutcome {
    pub counts: PlanCounts,
    pub applied: ApplyOutcome,
    /// Whether the listing was the whole truth (only then are vanished labs marked removed).
    pub complete: bool,
    /// `bulk` (one `populate_lab_tiles`), `fallback` (one call per lab), or `labs` (only the
    /// labs an event named, one call each).
    pub source: &'static str,
    /// Where the labs' groups came from, or why they could not be read.
    pub groups: GroupsRead,
    pub cml_calls: u32,
    /// A lab it wrote changed state (activity on the worker).
    pub activity: bool,
    /// Who may see the worker's labs: read and written, not asked (a sync of some labs), or
    /// unread (and why).
    pub access: AccessOutcome,
}

/// What a sync did about who may see the worker's labs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessOutcome {
    /// Not read (a sync of some labs): records keep their shares; an owner change applies.
    NotAsked,
    /// Read: the accounts were written (those that changed), each lab's readers with its record.
    Read(AccountsWritten),
    /// The users or groups could not be read: everything stays as last read.
    Unread { kind: &'static str, error: String },
}

impl WorkerOutcome {
    /// Labs whose records now match what CML showed (those that could not be written left out).
    pub fn labs_written(&self) -> usize {
        self.counts
            .synced
            .saturating_sub(self.applied.skipped.len())
    }

    /// What the sync could not do, and why.
    pub fn warning(&self) -> Option<(SyncWarning, &str)> {
        match (&self.groups, &self.access) {
            (GroupsRead::Unread { error, .. }, _) => Some((SyncWarning::GroupsUnread, error)),
            (_, AccessOutcome::Unread { error, .. }) => Some((SyncWarning::AccessUnread, error)),
            _ => None,
        }
    }
}

/// One worker's sync, done or failed: when it began, how long it took, what came of it.
#[derive(Debug)]
pub struct WorkerSync {
    pub target: CmlTarget,
    /// Every lab, or the labs an event named.
    pub scope: Scope,
    pub attempt_at: DateTime,
    pub took: Duration,
    /// The lease's term it was made under: its writes, status included, carry it.
    pub term: Term,
    pub result: Result<WorkerOutcome>,
}

impl WorkerSync {
    /// A sync that never returned (its task panicked): a failure like any other.
    pub fn panicked(
        target: CmlTarget,
        scope: Scope,
        attempt_at: DateTime,
        took: Duration,
        term: Term,
        why: String,
    ) -> Self {
        Self {
            target,
            scope,
            attempt_at,
            took,
            term,
            result: Err(Error::Panicked(why)),
        }
    }

    /// The status document update this outcome makes.
    pub fn status(&self) -> StatusUpdate {
        let id = &self.target.worker_id;
        match &self.result {
            Ok(o) if self.scope == Scope::Access => {
                StatusUpdate::access_read(id, self.attempt_at, o.warning())
            }
            Ok(o) if self.scope != Scope::Full => {
                StatusUpdate::labs_synced(id, self.attempt_at, o.activity)
            }
            Ok(o) => {
                let update = StatusUpdate::success(
                    id,
                    self.attempt_at,
                    self.took,
                    o.labs_written(),
                    &o.counts,
                    o.activity,
                );
                let update = match o.access {
                    AccessOutcome::Read(_) => update.access_read_at(self.attempt_at),
                    _ => update,
                };
                match o.warning() {
                    Some((warning, text)) => update.warned(warning, text),
                    None => update,
                }
            }
            Err(e) => StatusUpdate::failure(
                id,
                self.attempt_at,
                self.took,
                e.metric_label(),
                &e.to_string(),
            ),
        }
        .fenced(self.term)
    }

    /// One log line and the metrics of this outcome.
    pub fn emit(&self, metrics: &Metrics) {
        let worker_id = &self.target.worker_id;
        match &self.result {
            Ok(outcome) => WorkerSynced {
                worker_id,
                outcome,
                took: self.took,
            }
            .emit(metrics),
            Err(error) => WorkerSyncFailed {
                worker_id,
                error,
                took: self.took,
            }
            .emit(metrics),
        }
    }
}

/// Syncs one worker (every lab, or those of `scope`) within `sync.worker_deadline`.
pub async fn sync_worker(ctx: &Context, target: CmlTarget, scope: Scope) -> WorkerSync {
    let started = Instant::now();
    let attempt_at = DateTime::now();
    let term = ctx.lease.term();
    let deadline = ctx.config.sync.worker_deadline.get();
    let work = async {
        match &scope {
            Scope::Full => fetch_and_write(ctx, &target, term).await,
            Scope::Labs(labs) => fetch_and_write_labs(ctx, &target, labs, term).await,
            Scope::Access => fetch_and_write_access(ctx, &target, term).await,
        }
    };
    let result = match tokio::time::timeout(deadline, work).await {
        Ok(r) => r,
        Err(_) => Err(Error::Deadline(deadline)),
    };
    let sync = WorkerSync {
        target,
        scope,
        attempt_at,
        took: started.elapsed(),
        term,
        result,
    };
    sync.emit(&ctx.metrics);
    sync
}

async fn fetch_and_write(ctx: &Context, target: &CmlTarget, term: Term) -> Result<WorkerOutcome> {
    // The stored records do not depend on the listing: read them while CML answers, so a
    // worker costs one CML round trip plus one write, not plus a read as well.
    let (fetched, stored, accounts) = tokio::join!(
        ctx.cml.fetch_labs(target),
        ctx.store.records_for_sync(&target.worker_id),
        ctx.accounts.of_worker(&target.worker_id)
    );
    let (mut fetched, stored, stored_accounts) = (fetched?, stored?, accounts?);
    let worker_id = target.worker_id.as_str();
    let complete = fetched.listing == Listing::Complete;
    if let Some(note) = &fetched.note {
        ListingNote {
            worker_id,
            note,
            complete,
        }
        .emit(&ctx.metrics);
    }
    if !fetched.refused.is_empty() {
        LabIdsRefused {
            worker_id,
            source: "listing",
            refused: &fetched.refused,
        }
        .emit(&ctx.metrics);
    }
    if let GroupsRead::Unread { kind, error } = &fetched.groups {
        GroupsUnread {
            worker_id,
            kind,
            error,
        }
        .emit(&ctx.metrics);
    }
    let groups = match fetched.groups {
        GroupsRead::InLabs | GroupsRead::Associations => Groups::Observed,
        GroupsRead::Unread { .. } | GroupsRead::Kept => Groups::Unknown,
    };
    bound_fields(ctx, worker_id, &mut fetched.labs);
    let mut plan = plan_sync(
        worker_id,
        &stored,
        fetched.labs,
        fetched.listing,
        groups,
        DateTime::now(),
    )?;
    let directory = match std::mem::replace(&mut fetched.access, AccessRead::NotAsked) {
        AccessRead::Read(d) => Some(d),
        AccessRead::Unread { kind, error } => {
            access_unread(ctx, worker_id, kind, &error);
            fetched.access = AccessRead::Unread { kind, error };
            None
        }
        AccessRead::NotAsked => None,
    };
    let shares = directory.as_ref().map(|d| d.shares(worker_id));
    plan_access(
        &mut plan,
        &stored,
        shares.as_ref().map_or(Shares::Kept, Shares::Read),
    );
    let mut cml_calls = fetched.calls;
    if plan.counts().removed > 0 {
        confirm_removals(ctx, target, &mut plan).await;
        cml_calls += 1;
    }
    let applied = write(ctx, &plan, term).await?;
    // After the records: a share withdrawn is gone from them before anyone's groups change.
    let access = match (directory, fetched.access) {
        (Some(d), _) => AccessOutcome::Read(
            ctx.accounts
                .write_changes(
                    worker_id,
                    &stored_accounts,
                    &d.accounts(worker_id),
                    DateTime::now(),
                )
                .await?,
        ),
        (None, AccessRead::Unread { kind, error }) => AccessOutcome::Unread { kind, error },
        (None, _) => AccessOutcome::NotAsked,
    };
    Ok(WorkerOutcome {
        access,
        counts: plan.counts(),
        applied,
        complete,
        source: match fetched.source {
            FetchSource::Bulk => "bulk",
            FetchSource::Fallback => "fallback",
        },
        groups: fetched.groups,
        cml_calls,
        activity: plan.changes_a_state(),
    })
}

/// The sync of the labs a worker's event stream named: each re-read (`GET labs/{id}`, a few at
/// a time; a 404 is a lab deleted, tombstoned), only their records read and written. Their
/// groups are kept unless the lab objects carry them (CML before 2.9): a lab's own object does
/// not say which groups it is shared with on 2.9+. Any other failed read fails the sync, which
/// is then retried as a full one.
async fn fetch_and_write_labs(
    ctx: &Context,
    target: &CmlTarget,
    labs: &BTreeSet<String>,
    term: Term,
) -> Result<WorkerOutcome> {
    let ids: Vec<String> = labs.iter().cloned().collect();
    let worker_id = target.worker_id.as_str();
    let reads = stream::iter(ids.clone())
        .map(|id| read_lab(ctx, target, id))
        .buffer_unordered(LAB_READS_IN_FLIGHT)
        .try_collect::<Vec<_>>();
    let (read, stored) = tokio::join!(reads, ctx.store.records_of_labs(worker_id, &ids));
    let (read, stored) = (read?, stored?);
    let (mut observed, mut gone, mut shape) = (Vec::new(), Vec::new(), GroupsShape::Silent);
    for (id, lab) in read {
        match lab {
            Some((lab, lab_shape)) => {
                shape = shape.and(lab_shape);
                observed.push(lab);
            }
            None => gone.push(id),
        }
    }
    bound_fields(ctx, worker_id, &mut observed);
    let (groups, groups_read) = match shape {
        GroupsShape::InLabs => (Groups::Observed, GroupsRead::InLabs),
        GroupsShape::Silent | GroupsShape::Associations => (Groups::Unknown, GroupsRead::Kept),
    };
    let mut plan = plan_labs(worker_id, &stored, observed, &gone, groups, DateTime::now())?;
    plan_access(&mut plan, &stored, Shares::Kept);
    let applied = write(ctx, &plan, term).await?;
    Ok(WorkerOutcome {
        access: AccessOutcome::NotAsked,
        counts: plan.counts(),
        applied,
        complete: false,
        source: "labs",
        groups: groups_read,
        cml_calls: u32::try_from(ids.len()).unwrap_or(u32::MAX),
        activity: plan.changes_a_state(),
    })
}

/// The sync of who may see a worker's labs: its users and groups read (two calls), every
/// record whose readers changed regranted (without a stamp: its lab was not read), the
/// accounts that changed written. A read that fails changes nothing and is a warning, not a
/// failure of the worker (its labs are as synced as they were).
async fn fetch_and_write_access(
    ctx: &Context,
    target: &CmlTarget,
    term: Term,
) -> Result<WorkerOutcome> {
    let worker_id = target.worker_id.as_str();
    let ((read, calls), stored, stored_accounts) = tokio::join!(
        ctx.cml.fetch_access(target),
        ctx.store.records_for_sync(worker_id),
        ctx.accounts.of_worker(worker_id)
    );
    let (stored, stored_accounts) = (stored?, stored_accounts?);
    let outcome = |counts, applied, access| WorkerOutcome {
        counts,
        applied,
        complete: false,
        source: "access",
        groups: GroupsRead::Kept,
        cml_calls: calls,
        activity: false,
        access,
    };
    let directory = match read {
        AccessRead::Read(d) => d,
        AccessRead::Unread { kind, error } => {
            access_unread(ctx, worker_id, kind, &error);
            return Ok(outcome(
                PlanCounts::default(),
                ApplyOutcome::default(),
                AccessOutcome::Unread { kind, error },
            ));
        }
        AccessRead::NotAsked => {
            return Ok(outcome(
                PlanCounts::default(),
                ApplyOutcome::default(),
                AccessOutcome::NotAsked,
            ))
        }
    };
    let shares = directory.shares(worker_id);
    let mut plan = SyncPlan {
        worker_id: worker_id.to_owned(),
        now: DateTime::now(),
        writes: Vec::new(),
        unchanged: stored.iter().map(|r| r.lab_id.clone()).collect(),
        access: Default::default(),
    };
    plan_access(&mut plan, &stored, Shares::Read(&shares));
    // Only the regrants: the labs themselves were not read, so nothing is stamped.
    plan.unchanged.clear();
    for w in &mut plan.writes {
        if let RecordWrite::Regrant { stamp, .. } = w {
            *stamp = false;
        }
    }
    let applied = write(ctx, &plan, term).await?;
    let accounts = ctx
        .accounts
        .write_changes(
            worker_id,
            &stored_accounts,
            &directory.accounts(worker_id),
            DateTime::now(),
        )
        .await?;
    Ok(outcome(
        PlanCounts::default(),
        applied,
        AccessOutcome::Read(accounts),
    ))
}

/// Tells that a worker's users or groups could not be read.
fn access_unread(ctx: &Context, worker_id: &str, kind: &str, error: &str) {
    AccessUnread {
        worker_id,
        kind,
        error,
    }
    .emit(&ctx.metrics);
}

/// Cuts each lab's text fields to their limits, logging what was cut.
fn bound_fields(ctx: &Context, worker_id: &str, labs: &mut [ObservedLab]) {
    for lab in labs {
        let fields = lab.fields.bound();
        if !fields.is_empty() {
            FieldsTruncated {
                worker_id,
                lab_id: &lab.lab_id,
                fields: &fields,
            }
            .emit(&ctx.metrics);
        }
    }
}

/// Writes a plan under `term`, logging each record that could not be written.
async fn write(ctx: &Context, plan: &SyncPlan, term: Term) -> Result<ApplyOutcome> {
    let applied = ctx.store.apply(plan, term).await?;
    for skipped in &applied.skipped {
        RecordSkipped {
            worker_id: &plan.worker_id,
            lab_id: &skipped.lab_id,
            reason: &skipped.reason,
        }
        .emit(&ctx.metrics);
    }
    Ok(applied)
}

/// One lab re-read: `None` when the server no longer has it.
async fn read_lab(
    ctx: &Context,
    target: &CmlTarget,
    lab_id: String,
) -> cml_client::Result<(String, Option<(ObservedLab, GroupsShape)>)> {
    let lab = ctx.cml.lab_details(target, &lab_id).await?;
    Ok((lab_id, lab))
}

/// A listing that would tombstone labs is checked against the id list (one more call) first:
/// a proxy or a server still starting may answer an empty or short tile map. Only labs absent
/// from both are removed; when the id list cannot be read, none are.
async fn confirm_removals(ctx: &Context, target: &CmlTarget, plan: &mut SyncPlan) {
    let planned = plan.counts().removed;
    let listed = ctx.cml.list_lab_ids(target).await;
    let still_listed: HashSet<&str> = match &listed {
        Ok(ids) => ids.iter().map(String::as_str).collect(),
        Err(_) => HashSet::new(),
    };
    plan.writes.retain(|w| match w {
        RecordWrite::Remove { lab_id, .. } => {
            listed.is_ok() && !still_listed.contains(lab_id.as_str())
        }
        _ => true,
    });
    let confirmed = plan.counts().removed;
    RemovalsChecked {
        worker_id: &target.worker_id,
        planned,
        confirmed,
        error: listed.as_ref().err(),
    }
    .emit(&ctx.metrics);
}
