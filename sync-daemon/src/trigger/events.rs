//! CML's event streams as a source: while this replica holds the lease it keeps one watch per
//! active worker (up to `sync.events.max_watches`) on the worker's `/ws/ui`, and sends the
//! runner the labs each stream says changed (coalesced per worker), and a relist of the worker
//! each time its stream is live (again). What each message means is [`crate::cml_events`]';
//! what a watch does after each thing that happens to it is [`crate::stream_policy`]'s. The
//! watches' states and the activity they see are written to `worker_sync_status` about once a
//! second, in one command ([`keep_book`]).
//!
//! Losing the lease or stopping closes every stream (a close frame, within a second).

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use bson::DateTime;
use cml_client::{
    events::{EventLimits, EventStream, StreamBudget, StreamEnd},
    CmlTarget,
};
use shared::{
    backoff::{random_unit, Backoff},
    config::Config,
    metrics::{Kind, Origin, Reason, State},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{serve_failed, Trigger, Triggers};
use crate::{
    cml_events::classify,
    context::Context,
    logs::{LabIdsRefused, LogLine, WatchChanged, WatchWriteFailed, WatchesCapped},
    schedule::Scope,
    status::WatchUpdate,
    stream_policy::{FailReason, Happened, Next, Policy, Watch, WatchState},
};

/// How often the watches' states and activity are written (and the gauges set).
const BOOK_EVERY: Duration = Duration::from_secs(1);
/// How long a closing stream may take to say goodbye.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// The knobs of every watch (from `sync.events.*`), and the memory budget they share.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: EventLimits,
    pub silence: Duration,
    pub coalesce: Duration,
    pub min_interval: Duration,
    pub max_watches: usize,
    pub policy: Policy,
}

impl Settings {
    pub fn from_config(config: &Config) -> Self {
        let e = &config.sync.events;
        Self {
            limits: EventLimits {
                max_message_bytes: e.max_message_bytes,
                max_frames_per_second: e.max_messages_per_second,
                budget: StreamBudget::new(e.buffer_bytes),
            },
            silence: e.silence_timeout.get(),
            coalesce: e.coalesce.get(),
            min_interval: e.min_interval.get(),
            max_watches: e.max_watches,
            policy: Policy {
                reconnect: Backoff {
                    base: Duration::from_secs(2),
                    cap: e.reconnect_max.get(),
                },
                // A server without a stream is tried again once a cycle.
                no_stream_retry: config.sync.interval.get(),
                healthy_after: e.healthy_after.get(),
                relist_every: e.relist_min_interval.get(),
                ..Policy::default()
            },
        }
    }
}

/// What a watch tells the book.
#[derive(Debug)]
enum Note {
    State {
        worker_id: String,
        state: WatchState,
    },
    Activity {
        worker_id: String,
        at: DateTime,
    },
    /// The watch ended (the worker left the fleet, or the lease went).
    Gone {
        worker_id: String,
    },
}

type Notes = mpsc::UnboundedSender<Note>;

/// One running watch.
#[derive(Debug)]
struct Running {
    endpoint: String,
    stop: CancellationToken,
}

/// Runs the watches while `held`; `fleet` says which workers are active now (each time the
/// registry source reads them). Ends when `stop` is cancelled, after closing every stream.
pub async fn run(
    ctx: Arc<Context>,
    mut held: watch::Receiver<bool>,
    mut fleet: watch::Receiver<Option<Vec<CmlTarget>>>,
    triggers: Triggers,
    stop: CancellationToken,
) {
    let settings = Settings::from_config(&ctx.config);
    let (notes, book_rx) = mpsc::unbounded_channel();
    let book = tokio::spawn(keep_book(ctx.clone(), book_rx));
    let mut watches: HashMap<String, Running> = HashMap::new();
    let mut tasks = JoinSet::new();
    // The active workers as last read in this term of the lease.
    let mut known: Option<Vec<CmlTarget>> = None;
    loop {
        let holds = *held.borrow_and_update();
        if holds {
            if let Some(read) = fleet.borrow_and_update().clone() {
                known = Some(read);
            }
            if known.is_none() {
                // Taken the lease: the first list is read here, the next ones come from the
                // registry source.
                known = match ctx.workers().await {
                    Ok(t) => Some(t),
                    Err(e) => {
                        serve_failed(&ctx, e, "read the workers to watch");
                        None
                    }
                };
            }
            if let Some(targets) = &known {
                reconcile(
                    &ctx,
                    &settings,
                    targets,
                    &mut watches,
                    &mut tasks,
                    &notes,
                    &triggers,
                );
            }
        } else {
            known = None;
            fleet.borrow_and_update();
            close_all(&mut watches, &notes);
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = held.changed() => if changed.is_err() { break },
            changed = fleet.changed() => if changed.is_err() { break },
            // A worker list that could not be read is tried again.
            _ = tokio::time::sleep(Duration::from_secs(5)), if holds && known.is_none() => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    close_all(&mut watches, &notes);
    let _ = tokio::time::timeout(CLOSE_WITHIN * 2, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    drop(notes);
    let _ = book.await;
}

/// Starts a watch for each target not watched (or moved), up to the cap; stops the watches of
/// workers no longer active.
fn reconcile(
    ctx: &Arc<Context>,
    settings: &Settings,
    targets: &[CmlTarget],
    watches: &mut HashMap<String, Running>,
    tasks: &mut JoinSet<()>,
    notes: &Notes,
    triggers: &Triggers,
) {
    let wanted: HashMap<&str, &CmlTarget> =
        targets.iter().map(|t| (t.worker_id.as_str(), t)).collect();
    watches.retain(|id, running| {
        let keep = wanted
            .get(id.as_str())
            .is_some_and(|t| t.endpoint == running.endpoint);
        if !keep {
            running.stop.cancel();
            let _ = notes.send(Note::Gone {
                worker_id: id.clone(),
            });
        }
        keep
    });
    let mut capped = 0;
    for target in targets {
        if watches.contains_key(&target.worker_id) {
            continue;
        }
        if watches.len() >= settings.max_watches {
            capped += 1;
            let _ = notes.send(Note::State {
                worker_id: target.worker_id.clone(),
                state: WatchState::Polling,
            });
            continue;
        }
        let stop = CancellationToken::new();
        watches.insert(
            target.worker_id.clone(),
            Running {
                endpoint: target.endpoint.clone(),
                stop: stop.clone(),
            },
        );
        tasks.spawn(watch_worker(
            ctx.clone(),
            target.clone(),
            settings.clone(),
            notes.clone(),
            triggers.clone(),
            stop,
        ));
    }
    if capped > 0 {
        WatchesCapped {
            workers: targets.len(),
            max_watches: settings.max_watches,
        }
        .emit(&ctx.metrics);
    }
}

fn close_all(watches: &mut HashMap<String, Running>, notes: &Notes) {
    for (worker_id, running) in watches.drain() {
        running.stop.cancel();
        let _ = notes.send(Note::Gone { worker_id });
    }
}

/// One worker's watch: open, read, reconnect, as [`crate::stream_policy`] says, until `stop`.
async fn watch_worker(
    ctx: Arc<Context>,
    target: CmlTarget,
    settings: Settings,
    notes: Notes,
    triggers: Triggers,
    stop: CancellationToken,
) {
    let mut watch = Watch::default();
    let mut shown = Shown::default();
    shown.show(&ctx, &target, &notes, WatchState::Connecting, None, None);
    loop {
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            opened = ctx.cml.open_events(&target, settings.limits.clone()) => opened,
        };
        let (happened, why, token) = match opened {
            Err(cml_client::Error::Status { status: 404, .. }) => {
                (Happened::NoStream, "404 on /ws/ui".to_owned(), None)
            }
            Err(e) => (Happened::OpenFailed(open_failure(&e)), e.to_string(), None),
            Ok(stream) => {
                let token = stream.token().to_owned();
                let session = Session {
                    ctx: &ctx,
                    target: &target,
                    settings: &settings,
                    notes: &notes,
                    triggers: &triggers,
                    stop: &stop,
                };
                match session.read(stream, &mut watch, &mut shown).await {
                    None => return,
                    Some((happened, why)) => (happened, why, Some(token)),
                }
            }
        };
        let next = watch.on(happened, &settings.policy, random_unit(), Instant::now());
        let wait = match next {
            Next::Reconnect {
                after,
                reauthenticate,
            } => {
                if let Happened::OpenFailed(reason) | Happened::Ended(reason) = happened {
                    ctx.metrics
                        .event_reconnects
                        .get(&Reason(reason.as_str()))
                        .inc();
                }
                if reauthenticate {
                    if let Some(token) = &token {
                        ctx.cml.forget_token(&target, token).await;
                    }
                }
                after
            }
            Next::Poll { retry_after } => retry_after,
            // Only a live stream is relisted or read, and that happens while it is read.
            Next::Relist { .. } | Next::Read => Duration::ZERO,
        };
        shown.show(&ctx, &target, &notes, watch.state(), Some(&why), Some(wait));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The state a watch last showed: each change of it is logged once and noted for the book.
#[derive(Debug, Default)]
struct Shown(Option<WatchState>);

impl Shown {
    fn show(
        &mut self,
        ctx: &Context,
        target: &CmlTarget,
        notes: &Notes,
        state: WatchState,
        why: Option<&str>,
        retry_in: Option<Duration>,
    ) {
        if self.0 == Some(state) {
            return;
        }
        self.0 = Some(state);
        WatchChanged {
            worker_id: &target.worker_id,
            state,
            why,
            retry_in,
        }
        .emit(&ctx.metrics);
        let _ = notes.send(Note::State {
            worker_id: target.worker_id.clone(),
            state,
        });
    }
}

/// Why opening a stream failed, as a watch's reason.
fn open_failure(e: &cml_client::Error) -> FailReason {
    use cml_client::Error as E;
    match e {
        E::Redirect { .. } => FailReason::Redirect,
        E::AuthFailed { .. }
        | E::Status {
            status: 401 | 403, ..
        } => FailReason::Unauthorized,
        E::TooLarge { .. } => FailReason::TooLarge,
        _ => FailReason::Unreachable,
    }
}

/// Why an open stream ended, as a watch's reason.
fn end_reason(end: &StreamEnd) -> FailReason {
    match end {
        StreamEnd::Unauthorized => FailReason::Unauthorized,
        StreamEnd::Silent => FailReason::Silent,
        StreamEnd::TooLarge | StreamEnd::OverBudget => FailReason::TooLarge,
        StreamEnd::Flooded => FailReason::Flooded,
        StreamEnd::Stalled => FailReason::Stalled,
        StreamEnd::Closed { .. } | StreamEnd::Dropped(_) => FailReason::Dropped,
    }
}

/// Reading one open stream.
struct Session<'a> {
    ctx: &'a Context,
    target: &'a CmlTarget,
    settings: &'a Settings,
    notes: &'a Notes,
    triggers: &'a Triggers,
    stop: &'a CancellationToken,
}

/// Labs announced and not sent to the runner yet (and whether users or groups changed).
#[derive(Debug, Default)]
struct Pending {
    labs: BTreeSet<String>,
    /// The server said its users or groups changed: who may see its labs is read again.
    access: bool,
    /// When the first of them arrived.
    seen: Option<Instant>,
    /// When they go.
    due: Option<Instant>,
}

impl Session<'_> {
    /// Reads `stream` until it ends (what happened, and why in words) or the watch stops
    /// (`None`: the stream was closed).
    async fn read(
        &self,
        mut stream: EventStream,
        watch: &mut Watch,
        shown: &mut Shown,
    ) -> Option<(Happened, String)> {
        let s = self.settings;
        let mut last_message = Instant::now();
        let mut live = false;
        let mut pending = Pending::default();
        // Lab ids refused on this stream: each counted, the first logged.
        let mut refused = 0u64;
        let mut last_sent: Option<Instant> = None;
        // When the relist the policy asked for is due, and when the stream counts as healthy.
        let (mut relist_at, mut healthy_at): (Option<Instant>, Option<Instant>) = (None, None);
        loop {
            let silent_at = last_message + s.silence;
            let due = pending.due;
            let woke = tokio::select! {
                _ = self.stop.cancelled() => Woke::Stop,
                _ = sleep_until(due) => Woke::Due,
                _ = sleep_until(relist_at) => Woke::Relist,
                _ = sleep_until(healthy_at) => Woke::Healthy,
                m = stream.next(silent_at.saturating_duration_since(Instant::now())) => {
                    Woke::Message(m)
                }
            };
            let text = match woke {
                Woke::Stop => {
                    stream.close(CLOSE_WITHIN).await;
                    return None;
                }
                Woke::Due => {
                    self.send(&mut pending, &mut last_sent).await;
                    continue;
                }
                Woke::Relist => {
                    relist_at = None;
                    // Whatever changed while the stream was not live is caught by one full sync.
                    let relist = Trigger::Event {
                        target: self.target.clone(),
                        scope: Scope::Full,
                        seen: Instant::now(),
                    };
                    if self.triggers.send(relist).await.is_err() {
                        return None;
                    }
                    watch.on(Happened::Relisted, &s.policy, random_unit(), Instant::now());
                    continue;
                }
                Woke::Healthy => {
                    healthy_at = None;
                    watch.on(Happened::Healthy, &s.policy, random_unit(), Instant::now());
                    shown.show(self.ctx, self.target, self.notes, watch.state(), None, None);
                    continue;
                }
                Woke::Message(Ok(text)) => text,
                Woke::Message(Err(end)) => {
                    self.send(&mut pending, &mut last_sent).await;
                    let why = match &end {
                        StreamEnd::Closed { code, reason } => format!("closed {code} {reason}"),
                        StreamEnd::Dropped(e) => format!("dropped: {e}"),
                        StreamEnd::Flooded => format!(
                            "more than {} frames in a second",
                            s.limits.max_frames_per_second
                        ),
                        StreamEnd::OverBudget => "the streams together held more than \
                            sync.events.buffer_bytes, and this one held the most"
                            .to_owned(),
                        other => other.label().to_owned(),
                    };
                    if matches!(end, StreamEnd::Flooded | StreamEnd::Stalled) {
                        stream.close(CLOSE_WITHIN).await;
                    }
                    let reason = end_reason(&end);
                    return Some(if live {
                        (Happened::Ended(reason), why)
                    } else {
                        (Happened::OpenFailed(reason), why)
                    });
                }
            };
            let now = Instant::now();
            last_message = now;
            if !live {
                live = true;
                healthy_at = Some(now + s.policy.healthy_after);
                if let Next::Relist { after } =
                    watch.on(Happened::Live, &s.policy, random_unit(), now)
                {
                    relist_at = Some(now + after);
                }
                shown.show(self.ctx, self.target, self.notes, watch.state(), None, None);
            }
            let verdict = classify(&text);
            tracing::trace!(
                event = "stream_message",
                worker_id = %self.target.worker_id,
                kind = verdict.kind.as_str(),
                lab_id = verdict.sync.as_deref(),
                "Read a message of the worker's stream"
            );
            self.ctx
                .metrics
                .event_messages
                .get(&Kind(verdict.kind.as_str()))
                .inc();
            if let Some(id) = &verdict.refused {
                refused += 1;
                if refused == 1 {
                    LabIdsRefused {
                        worker_id: &self.target.worker_id,
                        source: "stream",
                        refused: &[format!("{id:?} is not a CML lab id")],
                    }
                    .emit(&self.ctx.metrics);
                } else {
                    self.ctx
                        .metrics
                        .lab_ids_refused
                        .get(&Origin("stream"))
                        .inc();
                }
            }
            if verdict.activity {
                let _ = self.notes.send(Note::Activity {
                    worker_id: self.target.worker_id.clone(),
                    at: DateTime::now(),
                });
            }
            if verdict.sync.is_some() || verdict.access {
                if pending.labs.is_empty() && !pending.access {
                    pending.seen = Some(now);
                    let earliest = last_sent.map_or(now, |at| at + s.min_interval);
                    pending.due = Some((now + s.coalesce).max(earliest));
                }
                pending.labs.extend(verdict.sync);
                pending.access |= verdict.access;
            }
        }
    }

    /// Sends the labs pending, if any, to the runner, and a read of users and groups if they
    /// changed (coalesced alike: one per `sync.events.min_interval` at most).
    async fn send(&self, pending: &mut Pending, last_sent: &mut Option<Instant>) {
        let Pending {
            labs, access, seen, ..
        } = std::mem::take(pending);
        if labs.is_empty() && !access {
            return;
        }
        *last_sent = Some(Instant::now());
        let seen = seen.unwrap_or_else(Instant::now);
        let labs = (!labs.is_empty()).then_some(Scope::Labs(labs));
        for scope in labs.into_iter().chain(access.then_some(Scope::Access)) {
            let trigger = Trigger::Event {
                target: self.target.clone(),
                scope,
                seen,
            };
            // The runner gone means the daemon stops: the stream is closed next.
            if self.triggers.send(trigger).await.is_err() {
                return;
            }
        }
    }
}

/// What a stream's reader woke for.
enum Woke {
    Stop,
    /// Pending labs are due.
    Due,
    /// The relist is due.
    Relist,
    /// The stream has stayed up long enough to count as healthy.
    Healthy,
    Message(Result<String, StreamEnd>),
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes what the watches show to `worker_sync_status` (each worker's latest state and
/// activity, about once a second, in one command) and sets `sync_event_watches{state}`.
async fn keep_book(ctx: Arc<Context>, mut notes: mpsc::UnboundedReceiver<Note>) {
    let mut shown: HashMap<String, WatchState> = HashMap::new();
    let mut dirty: HashMap<String, WatchUpdate> = HashMap::new();
    let mut tick = tokio::time::interval(BOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            note = notes.recv() => match note {
                Some(note) => note_down(note, &mut shown, &mut dirty),
                None => break,
            },
            _ = tick.tick() => {
                set_gauges(&ctx, &shown);
                flush(&ctx, &mut dirty).await;
            }
        }
    }
    set_gauges(&ctx, &shown);
    flush(&ctx, &mut dirty).await;
}

fn note_down(
    note: Note,
    shown: &mut HashMap<String, WatchState>,
    dirty: &mut HashMap<String, WatchUpdate>,
) {
    fn update<'a>(
        dirty: &'a mut HashMap<String, WatchUpdate>,
        worker_id: &str,
    ) -> &'a mut WatchUpdate {
        dirty
            .entry(worker_id.to_owned())
            .or_insert_with(|| WatchUpdate {
                worker_id: worker_id.to_owned(),
                state: None,
                activity: None,
            })
    }
    match note {
        Note::State { worker_id, state } => {
            let failure = match state {
                WatchState::Failing(reason) => Some(reason.as_str()),
                _ => None,
            };
            update(dirty, &worker_id).state = Some((state.as_str(), failure, DateTime::now()));
            shown.insert(worker_id, state);
        }
        Note::Activity { worker_id, at } => {
            let u = update(dirty, &worker_id);
            u.activity = Some(u.activity.map_or(at, |a| a.max(at)));
        }
        Note::Gone { worker_id } => {
            shown.remove(&worker_id);
        }
    }
}

fn set_gauges(ctx: &Context, shown: &HashMap<String, WatchState>) {
    let mut counts: HashMap<&'static str, usize> = HashMap::new();
    for state in shown.values() {
        *counts.entry(state.as_str()).or_default() += 1;
    }
    for state in shared::status::WATCH_STATES {
        let n = counts.get(state).copied().unwrap_or(0);
        ctx.metrics.event_watches.get(&State(state)).set(n as f64);
    }
}

async fn flush(ctx: &Context, dirty: &mut HashMap<String, WatchUpdate>) {
    if dirty.is_empty() {
        return;
    }
    let updates: Vec<WatchUpdate> = dirty.drain().map(|(_, u)| u).collect();
    if let Err(e) = ctx.status.record_watches(&updates, ctx.lease.term()).await {
        WatchWriteFailed {
            error: &e.into(),
            workers: updates.len(),
        }
        .emit(&ctx.metrics);
    }
}
