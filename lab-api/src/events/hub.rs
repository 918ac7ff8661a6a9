//! One replica's events: the recent ones (so a reconnecting client gets exactly what it missed)
//! and the clients, each with a queue bounded in frames and in bytes, and all queues together
//! bounded in bytes. A client whose queue is full has fallen behind: it is dropped from the
//! fan-out and told to `reset`; past the bound of all queues, the client furthest behind goes
//! first. No client makes the replica hold more.
//!
//! Each client sees what its grant lets it see ([`Audience`]): a lab's change goes to the
//! callers who may see the lab; one who just gained it gets it as an addition, one who lost it
//! a removal without fields; a worker's sync goes to the callers with a user on it, those who
//! see only some of its labs with their own counts and no error text.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use bson::DateTime;
use serde_json::Value;
use shared::{access::Grant, config::EventsConfig, metrics::Reason};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{
    queue::{Ledger, Queue},
    EventMetrics, EventType, Filter, Frame,
};
use shared::access::{Reach, Visibility};

/// Whether clients keep up with the events published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    Clear,
    /// Some client's queue is more than half full: it is behind, maybe only for want of CPU.
    /// The change stream is read more slowly for a moment so that it can catch up; one that
    /// does not read at all fills its queue and is dropped, so it cannot hold the others up.
    /// (Half full in frames or in bytes.)
    Behind,
}

/// What a client's queue carries.
#[derive(Debug, Clone)]
pub enum Item {
    Frame(Arc<Frame>),
    /// Reload from the REST API: events were lost (`history_lost`).
    Reset(&'static str),
}

/// Who an event is for.
#[derive(Debug, Clone, PartialEq)]
pub enum Audience {
    /// Every client whose filter wants it.
    Everyone,
    /// Clients with a user on the event's worker; those who see only some of its labs get
    /// `partial` instead (when given).
    Worker { partial: Option<Value> },
    /// A worker's sync: clients who see all of the worker get the event; each other client
    /// with a user on it gets the frame of its own view (its principals on the worker), if
    /// one was made for it. Views that count the same share one `data`.
    Counts {
        views: Vec<(Vec<Vec<String>>, Value)>,
    },
    /// A lab's change: who could read it before the write, who can after; what a client who
    /// gains it gets, and one who loses it. Those who keep it get the event, when there is one.
    Lab {
        before: Vec<String>,
        after: Vec<String>,
        gained: Value,
        lost: Value,
    },
}

/// The frames of one event, rendered once: the one most clients get, and those of an
/// audience's other views.
#[derive(Debug)]
struct Event {
    main: Option<Arc<Frame>>,
    audience: Rendered,
}

#[derive(Debug)]
enum Rendered {
    Everyone,
    Worker {
        partial: Option<Arc<Frame>>,
    },
    /// By view, the index of its frame: one lookup per grant, however many views there are.
    Counts {
        views: HashMap<Vec<String>, usize>,
        frames: Vec<Arc<Frame>>,
    },
    Lab {
        before: Vec<String>,
        after: Vec<String>,
        gained: Arc<Frame>,
        lost: Arc<Frame>,
    },
}

impl Event {
    /// The frame most of its audience gets, or one of another view: what a filter is judged by.
    fn probe(&self) -> Option<&Arc<Frame>> {
        self.main.as_ref().or(match &self.audience {
            Rendered::Lab { gained, .. } => Some(gained),
            Rendered::Worker { partial } => partial.as_ref(),
            _ => None,
        })
    }

    /// Whether a client with this filter wants the event.
    fn wanted_by(&self, filter: &Filter) -> bool {
        self.probe().is_some_and(|p| filter.wants(p))
    }

    /// The frame a client with this grant and filter gets, if any.
    fn frame_for(&self, grant: &Grant, filter: &Filter) -> Option<Arc<Frame>> {
        if self.wanted_by(filter) {
            self.frame_as(grant)
        } else {
            None
        }
    }

    /// The frame a client with this grant gets, if its filter wants the event.
    fn frame_as(&self, grant: &Grant) -> Option<Arc<Frame>> {
        let main = self.main.as_ref();
        let probe = self.probe()?;
        let worker = probe.worker_id.as_deref().unwrap_or_default();
        let reach = grant.on(worker);
        match &self.audience {
            Rendered::Everyone => main.cloned(),
            Rendered::Worker { partial } => match reach {
                _ if reach.sees_all() => main.cloned(),
                Reach::Account(_) => partial.as_ref().or(main).cloned(),
                _ => None,
            },
            Rendered::Counts { views, frames } => match reach {
                _ if reach.sees_all() => main.cloned(),
                Reach::Account(on) => views.get(&on.principals).map(|&i| frames[i].clone()),
                _ => None,
            },
            Rendered::Lab {
                before,
                after,
                gained,
                lost,
            } => match shared::access::transition(reach, before, after) {
                Visibility::Kept => main.cloned(),
                Visibility::Gained => Some(gained.clone()),
                Visibility::Lost => Some(lost.clone()),
                Visibility::Never => None,
            },
        }
    }

    /// Bytes of text it holds.
    fn bytes(&self) -> usize {
        let extra: usize = match &self.audience {
            Rendered::Everyone => 0,
            Rendered::Worker { partial } => partial.as_ref().map_or(0, |f| f.text.len()),
            Rendered::Counts { frames, .. } => frames.iter().map(|f| f.text.len()).sum(),
            Rendered::Lab { gained, lost, .. } => gained.text.len() + lost.text.len(),
        };
        self.main.as_ref().map_or(0, |f| f.text.len()) + extra
    }

    fn id(&self) -> Option<&str> {
        let any = self.main.as_ref().or(match &self.audience {
            Rendered::Lab { gained, .. } => Some(gained),
            _ => None,
        })?;
        any.id.as_deref()
    }
}

/// The reason of the `reset` a client gets when its access changed: its stream ends after it,
/// and the client comes back with its new grant.
pub const ACCESS_CHANGED: &str = "access_changed";

#[derive(Debug)]
struct Client {
    queue: Arc<Queue>,
    filter: Filter,
    /// What the client may see: one grant for all the streams of a user that have the same
    /// (an event is judged once per grant, and a grant is held once).
    grant: Arc<Grant>,
    /// Its CML username (empty when it sees everything).
    username: String,
    /// Cancelled when the client fell behind.
    behind: CancellationToken,
    /// A `Last-Event-ID` not seen here yet: nothing is sent until it comes (the client comes
    /// from a replica whose change stream is ahead of ours) or the client gives up on it.
    awaiting: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    recent: VecDeque<Arc<Event>>,
    /// Bytes of frame text in `recent`.
    recent_bytes: usize,
    clients: HashMap<u64, Client>,
    next_client: u64,
}

/// The events of this replica and who listens.
#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    keep: usize,
    keep_bytes: usize,
    client_buffer: usize,
    client_bytes: usize,
    /// Most bytes all queues may hold together (each frame once).
    total_bytes: usize,
    ledger: Arc<Ledger>,
    pub(crate) heartbeat: Duration,
    pub(crate) replay_window: Duration,
    streams: Arc<Semaphore>,
    stop: CancellationToken,
    pub metrics: EventMetrics,
}

/// One client's place in the fan-out; leaving it (drop) unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    id: u64,
    hub: Weak<Hub>,
    pub queue: Arc<Queue>,
    pub behind: CancellationToken,
    /// Events after the client's `Last-Event-ID` (as it may see them), to send before the
    /// live ones.
    pub replay: VecDeque<Arc<Frame>>,
    /// Why the client must reload first (its id is malformed), if it must.
    pub reset: Option<&'static str>,
    /// Whether the client's id has not been seen here yet: see [`Hub::give_up`].
    pub awaiting: bool,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.lock().clients.remove(&self.id);
        }
        // Out of the fan-out: what it still holds is freed now.
        self.queue.clear();
    }
}

/// Whether `id` could be an event id of ours (the change stream's resume token, as hex).
fn plausible_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 1024 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl Hub {
    pub fn new(cfg: &EventsConfig, metrics: EventMetrics) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::default(),
            keep: cfg.replay_events,
            keep_bytes: cfg.replay_bytes,
            client_buffer: cfg.client_buffer.max(1),
            client_bytes: cfg.client_buffer_bytes,
            total_bytes: cfg.buffer_bytes,
            ledger: Arc::new(Ledger::new(metrics.queued_bytes.clone())),
            heartbeat: cfg.heartbeat_interval.get(),
            replay_window: cfg.replay_window.get(),
            streams: Arc::new(Semaphore::new(cfg.max_streams.max(1))),
            stop: CancellationToken::new(),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for one more stream, unless this replica serves as many as it may.
    pub fn stream_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.streams.clone().try_acquire_owned().ok()
    }

    /// Cancelled when the service stops: streams end, the change stream closes.
    pub fn stopping(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Ends every stream and the change stream (the service is stopping).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Publishes one event for every client (tests; what [`Hub::publish_to`] does with
    /// [`Audience::Everyone`]).
    pub fn publish(
        &self,
        id: String,
        kind: EventType,
        worker_id: String,
        written_at: DateTime,
        data: Value,
    ) -> Backlog {
        self.publish_to(
            id,
            kind,
            worker_id,
            written_at,
            Some(data),
            Audience::Everyone,
        )
    }

    /// Publishes one event (from the change stream): kept for replays, queued for every client
    /// that wants it and may see it, as its grant lets it see it (`data`: what most clients
    /// get; `None` when only an audience's other views get something). A client whose queue is
    /// full is dropped and told it fell behind. Returns whether some client's queue is more
    /// than half full (see [`Backlog`]).
    pub fn publish_to(
        &self,
        id: String,
        kind: EventType,
        worker_id: String,
        written_at: DateTime,
        data: Option<Value>,
        audience: Audience,
    ) -> Backlog {
        // Rendered before the lock is taken: clients and the next publish do not wait for it.
        let frame = |data: Value| {
            Arc::new(Frame::new(
                Some(id.clone()),
                kind,
                Some(worker_id.clone()),
                written_at,
                data,
            ))
        };
        let event = Arc::new(Event {
            main: data.map(frame),
            audience: match audience {
                Audience::Everyone => Rendered::Everyone,
                Audience::Worker { partial } => Rendered::Worker {
                    partial: partial.map(frame),
                },
                Audience::Counts { views: groups } => {
                    let mut views = HashMap::new();
                    let mut frames = Vec::with_capacity(groups.len());
                    for (i, (group, data)) in groups.into_iter().enumerate() {
                        views.extend(group.into_iter().map(|v| (v, i)));
                        frames.push(frame(data));
                    }
                    Rendered::Counts { views, frames }
                }
                Audience::Lab {
                    before,
                    after,
                    gained,
                    lost,
                } => Rendered::Lab {
                    before,
                    after,
                    gained: frame(gained),
                    lost: frame(lost),
                },
            },
        });
        let len = event.bytes();
        let mut inner = self.lock();
        if self.keep > 0 && len <= self.keep_bytes {
            inner.recent_bytes += len;
            inner.recent.push_back(event.clone());
            while inner.recent.len() > self.keep || inner.recent_bytes > self.keep_bytes {
                if let Some(old) = inner.recent.pop_front() {
                    inner.recent_bytes -= old.bytes();
                }
            }
        }
        self.make_room(&mut inner, len);
        let mut backlog = Backlog::Clear;
        let id = event.id().map(str::to_owned);
        let mut decided: HashMap<*const Grant, Option<Arc<Frame>>> = HashMap::new();
        inner.clients.retain(|_, c| {
            if let Some(awaited) = &c.awaiting {
                if id.as_ref() == Some(awaited) {
                    c.awaiting = None;
                }
                return true;
            }
            if !event.wanted_by(&c.filter) {
                return true;
            }
            let frame = decided
                .entry(Arc::as_ptr(&c.grant))
                .or_insert_with(|| event.frame_as(&c.grant))
                .clone();
            let Some(frame) = frame else {
                return true;
            };
            let kept = self.offer(c, Item::Frame(frame));
            if kept && c.queue.more_than_half_full() {
                backlog = Backlog::Behind;
            }
            kept
        });
        backlog
    }

    /// The accounts of `username` changed (a group joined or left, a user made or removed, an
    /// admin flag): each of its clients that does not see everything gets a `reset` and leaves
    /// the fan-out; its stream ends, and comes back with the new grant.
    pub fn access_changed(&self, username: &str) {
        let mut inner = self.lock();
        inner.clients.retain(|_, c| {
            if c.username != username || *c.grant == Grant::All {
                return true;
            }
            c.awaiting = None;
            if !c.queue.offer(Item::Reset(ACCESS_CHANGED)) {
                self.fell_behind(c);
            }
            false
        });
    }

    /// The distinct views (principals on the worker) of the clients with a user on the worker
    /// who see only some of its labs and want `kind`: what a sync's counts are computed for.
    pub fn partial_views(&self, worker_id: &str, kind: EventType) -> Vec<Vec<String>> {
        let inner = self.lock();
        let mut judged = HashSet::new();
        let mut views: Vec<&[String]> = inner
            .clients
            .values()
            .filter(|c| {
                c.filter.types.as_ref().is_none_or(|t| t.contains(&kind))
                    && c.filter
                        .workers
                        .as_ref()
                        .is_none_or(|w| w.contains(worker_id))
                    && judged.insert(Arc::as_ptr(&c.grant))
            })
            .filter_map(|c| match c.grant.on(worker_id) {
                Reach::Account(on) if !on.admin => Some(on.principals.as_slice()),
                _ => None,
            })
            .collect();
        views.sort_unstable();
        views.dedup();
        views.into_iter().map(<[String]>::to_vec).collect()
    }

    /// Keeps the bytes all queues hold, with a new frame of `len` bytes, within the bound:
    /// the clients furthest behind (most bytes queued) fall behind first.
    fn make_room(&self, inner: &mut Inner, len: usize) {
        while self.ledger.bytes() + len > self.total_bytes {
            let furthest = inner
                .clients
                .iter()
                .map(|(id, c)| (c.queue.bytes(), *id))
                .filter(|(bytes, _)| *bytes > 0)
                .max();
            let Some((_, id)) = furthest else { return };
            if let Some(c) = inner.clients.remove(&id) {
                self.fell_behind(&c);
            }
        }
    }

    /// Queues `item` for a client; false when its queue is full: the client leaves the
    /// fan-out, and its stream sends `reset` and ends.
    fn offer(&self, c: &Client, item: Item) -> bool {
        if c.queue.offer(item) {
            return true;
        }
        self.fell_behind(c);
        false
    }

    /// A client fell behind: what it has queued is dropped, its stream sends `reset` and ends
    /// (counted here, where it is known, since a client that stopped reading never gets it).
    fn fell_behind(&self, c: &Client) {
        c.queue.clear();
        c.behind.cancel();
        self.metrics.resets.get(&Reason("lagged")).inc();
    }

    /// Events were lost (the change stream could not resume): every client must reload, and
    /// ids from before cannot be resumed from.
    pub fn reset_all(&self, reason: &'static str) {
        let mut inner = self.lock();
        inner.recent.clear();
        inner.recent_bytes = 0;
        inner.clients.retain(|_, c| {
            c.awaiting = None;
            self.offer(c, Item::Reset(reason))
        });
    }

    /// Joins the fan-out. With `last_id`, the kept events after it come first (filtered). A
    /// well-formed id not kept here is awaited: it may be about to arrive (the client comes
    /// from a replica that is ahead), or be too old or from before a reset, which the client
    /// learns by [`Hub::give_up`] after a wait. A malformed id means a reload first.
    pub fn subscribe(self: &Arc<Self>, filter: Filter, last_id: Option<&str>) -> Subscription {
        self.subscribe_as(Grant::All, String::new(), filter, last_id)
    }

    /// [`Hub::subscribe`] for a client that sees what `grant` lets it (`username`: whose
    /// grant, so that a change of its accounts reaches it).
    pub fn subscribe_as(
        self: &Arc<Self>,
        grant: impl Into<Arc<Grant>>,
        username: String,
        filter: Filter,
        last_id: Option<&str>,
    ) -> Subscription {
        let grant: Arc<Grant> = grant.into();
        let mut inner = self.lock();
        let mut replay = VecDeque::new();
        let mut reset = None;
        let mut awaiting = None;
        match last_id {
            None => {}
            Some(last) if !plausible_id(last) => reset = Some("unknown_id"),
            Some(last) => match inner.recent.iter().rposition(|e| e.id() == Some(last)) {
                Some(i) => replay.extend(
                    inner
                        .recent
                        .iter()
                        .skip(i + 1)
                        .filter_map(|e| e.frame_for(&grant, &filter)),
                ),
                None => awaiting = Some(last.to_owned()),
            },
        }
        let grant = inner
            .clients
            .values()
            .find(|c| c.username == username && c.grant == grant)
            .map_or(grant, |c| c.grant.clone());
        let queue = Arc::new(Queue::new(
            self.ledger.clone(),
            self.client_buffer,
            self.client_bytes,
        ));
        let behind = CancellationToken::new();
        inner.next_client += 1;
        let id = inner.next_client;
        inner.clients.insert(
            id,
            Client {
                queue: queue.clone(),
                filter,
                grant,
                username,
                behind: behind.clone(),
                awaiting: awaiting.clone(),
            },
        );
        Subscription {
            id,
            hub: Arc::downgrade(self),
            queue,
            behind,
            replay,
            reset,
            awaiting: awaiting.is_some(),
        }
    }

    /// The client stops waiting for its id. True when it never came: the client must reload
    /// (`reset`), and then gets the live events; false when it came (or a reset was sent).
    pub fn give_up(&self, sub: &Subscription) -> bool {
        let mut inner = self.lock();
        match inner.clients.get_mut(&sub.id) {
            Some(c) => c.awaiting.take().is_some(),
            None => false,
        }
    }

    /// Clients in the fan-out now.
    pub fn clients(&self) -> usize {
        self.lock().clients.len()
    }

    /// Bytes all queues hold now (each frame once).
    pub fn queued_bytes(&self) -> usize {
        self.ledger.bytes()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use shared::access::OnWorker;

    fn hub(keep: usize, buffer: usize) -> Arc<Hub> {
        Hub::new(
            &EventsConfig {
                replay_events: keep,
                client_buffer: buffer,
                ..EventsConfig::default()
            },
            EventMetrics::default(),
        )
    }

    fn publish(h: &Hub, id: &str, worker: &str) -> Backlog {
        h.publish(
            id.into(),
            EventType::LabsUpdated,
            worker.into(),
            DateTime::now(),
            json!({}),
        )
    }

    fn ids(items: impl IntoIterator<Item = Arc<Frame>>) -> Vec<String> {
        items.into_iter().filter_map(|f| f.id.clone()).collect()
    }

    fn drain(s: &mut Subscription) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(item) = s.queue.try_take() {
            if let Item::Frame(f) = item {
                out.extend(f.id.clone());
            }
        }
        out
    }

    #[test]
    fn a_reconnect_gets_exactly_what_came_after_its_id() {
        let h = hub(100, 16);
        for id in ["A1", "A2", "A3"] {
            publish(&h, id, "w1");
        }
        let mut s = h.subscribe(Filter::default(), Some("A1"));
        assert_eq!(s.reset, None);
        assert_eq!(ids(s.replay.drain(..)), ["A2", "A3"]);
        publish(&h, "A4", "w1");
        assert_eq!(drain(&mut s), ["A4"], "then live, nothing twice");
    }

    #[test]
    fn a_malformed_id_means_reload_first() {
        let h = hub(2, 16);
        publish(&h, "A1", "w1");
        for last in ["no-pe", "a b\r\nevent: x", ""] {
            let s = h.subscribe(Filter::default(), Some(last));
            assert_eq!(s.reset, Some("unknown_id"), "{last:?}");
            assert!(!s.awaiting);
            assert!(s.replay.is_empty());
        }
        assert_eq!(h.subscribe(Filter::default(), None).reset, None);
    }

    #[test]
    fn an_id_not_seen_yet_is_awaited_and_what_follows_it_is_sent() {
        let h = hub(100, 16);
        publish(&h, "A1", "w1");
        let mut s = h.subscribe(Filter::default(), Some("A3"));
        assert!(s.awaiting && s.reset.is_none() && s.replay.is_empty());
        publish(&h, "A2", "w1");
        publish(&h, "A3", "w1");
        publish(&h, "A4", "w1");
        assert_eq!(drain(&mut s), ["A4"], "the client had A2 and A3 already");
        assert!(!h.give_up(&s), "it came: no reload");
    }

    #[test]
    fn an_id_that_never_comes_means_reload_then_live_events() {
        let h = hub(2, 16);
        for id in ["A1", "A2", "A3"] {
            publish(&h, id, "w1");
        }
        let mut s = h.subscribe(Filter::default(), Some("A1"));
        assert!(s.awaiting, "A1 is no longer kept");
        publish(&h, "A4", "w1");
        assert!(drain(&mut s).is_empty(), "nothing while waiting");
        assert!(h.give_up(&s), "it never came: reload");
        publish(&h, "A5", "w1");
        assert_eq!(drain(&mut s), ["A5"]);
    }

    #[test]
    fn replays_and_live_events_follow_the_filter() {
        let h = hub(100, 16);
        publish(&h, "A1", "w1");
        publish(&h, "A2", "w2");
        let f = Filter {
            workers: Some(["w2".to_owned()].into()),
            ..Filter::default()
        };
        let mut s = h.subscribe(f, Some("A1"));
        assert_eq!(ids(s.replay.drain(..)), ["A2"]);
        publish(&h, "A3", "w1");
        publish(&h, "A4", "w2");
        assert_eq!(drain(&mut s), ["A4"]);
    }

    #[test]
    fn a_queue_more_than_half_full_is_a_backlog() {
        let h = hub(100, 4);
        let mut s = h.subscribe(Filter::default(), None);
        assert_eq!(publish(&h, "A1", "w1"), Backlog::Clear);
        assert_eq!(publish(&h, "A2", "w1"), Backlog::Clear, "half full");
        assert_eq!(publish(&h, "A3", "w1"), Backlog::Behind);
        assert_eq!(drain(&mut s), ["A1", "A2", "A3"]);
        assert_eq!(publish(&h, "A4", "w1"), Backlog::Clear, "it caught up");
    }

    #[test]
    fn a_client_that_falls_behind_is_dropped_and_told() {
        let h = hub(100, 2);
        let mut slow = h.subscribe(Filter::default(), None);
        let mut quick = h.subscribe(Filter::default(), None);
        publish(&h, "A1", "w1");
        publish(&h, "A2", "w1");
        assert_eq!(drain(&mut quick), ["A1", "A2"]);
        publish(&h, "A3", "w1");
        assert!(slow.behind.is_cancelled(), "a third frame did not fit");
        assert_eq!(h.clients(), 1, "the quick one stays");
        assert_eq!(drain(&mut quick), ["A3"]);
        assert!(
            drain(&mut slow).is_empty(),
            "what it had queued is freed at once"
        );
    }

    fn bounded(client_bytes: usize, total_bytes: usize) -> Arc<Hub> {
        Hub::new(
            &EventsConfig {
                client_buffer_bytes: client_bytes,
                buffer_bytes: total_bytes,
                ..EventsConfig::default()
            },
            EventMetrics::default(),
        )
    }

    /// A frame of about `bytes` bytes.
    fn publish_big(h: &Hub, id: &str, worker: &str, bytes: usize) {
        h.publish(
            id.into(),
            EventType::LabsUpdated,
            worker.into(),
            DateTime::now(),
            json!({ "pad": "x".repeat(bytes) }),
        );
    }

    #[test]
    fn a_client_is_bounded_in_bytes_even_when_it_gets_few_frames() {
        let h = bounded(10_000, 1 << 20);
        let mut quick = h.subscribe(Filter::default(), None);
        let slow = h.subscribe(Filter::default(), None);
        for i in 0..3 {
            publish_big(&h, &format!("A{i}"), "w1", 4000);
            assert_eq!(drain(&mut quick).len(), 1);
        }
        assert!(
            slow.behind.is_cancelled(),
            "three frames of 4 kB passed 10 kB"
        );
        assert_eq!(slow.queue.bytes(), 0, "freed");
        assert_eq!(h.queued_bytes(), 0);
        assert!(!quick.behind.is_cancelled());
    }

    #[test]
    fn past_the_bound_of_all_queues_the_client_furthest_behind_goes_first() {
        // Each client may hold 100 kB; all together 30 kB.
        let h = bounded(100_000, 30_000);
        let w1 = Filter {
            workers: Some(["w1".to_owned()].into()),
            ..Filter::default()
        };
        let w2 = Filter {
            workers: Some(["w2".to_owned()].into()),
            ..Filter::default()
        };
        let furthest = h.subscribe(w1, None);
        let mut behind = h.subscribe(w2, None);
        let mut quick = h.subscribe(Filter::default(), None);
        for i in 0..3 {
            publish_big(&h, &format!("A{i}"), "w1", 6000);
            drain(&mut quick);
        }
        publish_big(&h, "B0", "w2", 6000);
        drain(&mut quick);
        assert!(h.queued_bytes() > 20_000, "{}", h.queued_bytes());
        // Two more frames for w2: the w1 client, furthest behind, goes to make room.
        publish_big(&h, "B1", "w2", 6000);
        publish_big(&h, "B2", "w2", 6000);
        assert!(furthest.behind.is_cancelled());
        assert!(!behind.behind.is_cancelled() && !quick.behind.is_cancelled());
        assert!(h.queued_bytes() <= 30_000, "{}", h.queued_bytes());
        assert_eq!(drain(&mut behind), ["B0", "B1", "B2"]);
        assert_eq!(h.clients(), 2);
    }

    #[test]
    fn the_kept_events_are_bounded_and_leaving_unsubscribes() {
        let h = hub(3, 16);
        for i in 0..10 {
            publish(&h, &format!("A{i}"), "w1");
        }
        assert_eq!(h.lock().recent.len(), 3);
        let s = h.subscribe(Filter::default(), Some("A7"));
        assert_eq!(ids(s.replay.iter().cloned()), ["A8", "A9"]);
        drop(s);
        assert_eq!(h.clients(), 0);
    }

    #[test]
    fn the_kept_events_are_bounded_in_bytes_too() {
        let h = Hub::new(
            &EventsConfig {
                replay_events: 100,
                replay_bytes: 1000,
                ..EventsConfig::default()
            },
            EventMetrics::default(),
        );
        for i in 0..50 {
            publish(&h, &format!("A{i}"), "w1");
        }
        let inner = h.lock();
        let bytes: usize = inner.recent.iter().map(|e| e.bytes()).sum();
        assert!(bytes <= 1000 && bytes > 1000 - 200, "{bytes}");
        assert_eq!(inner.recent_bytes, bytes);
        assert_eq!(
            inner.recent.back().and_then(|e| e.id().map(str::to_owned)),
            Some("A49".into())
        );
    }

    #[test]
    fn a_lost_history_resets_everyone_and_forgets_old_ids() {
        let h = hub(100, 16);
        publish(&h, "A1", "w1");
        let s = h.subscribe(Filter::default(), None);
        h.reset_all("history_lost");
        assert!(matches!(
            s.queue.try_take(),
            Some(Item::Reset("history_lost"))
        ));
        let old = h.subscribe(Filter::default(), Some("A1"));
        assert!(old.awaiting, "ids from before the reset are not kept");
        assert!(h.give_up(&old));
    }

    #[test]
    fn stream_slots_are_bounded() {
        let h = Hub::new(
            &EventsConfig {
                max_streams: 2,
                ..EventsConfig::default()
            },
            EventMetrics::default(),
        );
        let a = h.stream_slot().expect("1");
        let _b = h.stream_slot().expect("2");
        assert!(h.stream_slot().is_none());
        drop(a);
        assert!(h.stream_slot().is_some());
    }

    fn grant_of(principals: &[&str], workers: &[(&str, bool)]) -> Grant {
        let mut p: Vec<String> = principals.iter().map(|s| s.to_string()).collect();
        p.sort();
        let on = |w: &str, admin: bool| OnWorker {
            admin,
            principals: p
                .iter()
                .filter(|p| shared::access::principal_worker(p) == Some(w))
                .cloned()
                .collect(),
        };
        Grant::Principals {
            workers: workers
                .iter()
                .map(|(w, a)| (w.to_string(), on(w, *a)))
                .collect(),
            principals: p.clone(),
        }
    }

    fn texts(s: &Subscription) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(item) = s.queue.try_take() {
            match item {
                Item::Frame(f) => out.push(String::from_utf8_lossy(&f.text).into_owned()),
                Item::Reset(r) => out.push(format!("reset:{r}")),
            }
        }
        out
    }

    fn lab_event(h: &Hub, id: &str, before: &[&str], after: &[&str], main: bool) {
        let v = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        h.publish_to(
            id.into(),
            EventType::LabsUpdated,
            "w1".into(),
            DateTime::now(),
            main.then(|| json!({ "action": "updated" })),
            Audience::Lab {
                before: v(before),
                after: v(after),
                gained: json!({ "action": "created" }),
                lost: json!({ "action": "removed", "reason": "access" }),
            },
        );
    }

    #[test]
    fn a_lab_event_goes_to_who_may_see_the_lab_as_what_it_is_to_them() {
        let h = hub(100, 16);
        let alice = h.subscribe_as(
            grant_of(&["u:w1:alice"], &[("w1", false)]),
            "alice".into(),
            Filter::default(),
            None,
        );
        let bob = h.subscribe_as(
            grant_of(&["u:w1:bob"], &[("w1", false)]),
            "bob".into(),
            Filter::default(),
            None,
        );
        let carol = h.subscribe_as(
            grant_of(&["g:w1:g1"], &[("w1", false)]),
            "carol".into(),
            Filter::default(),
            None,
        );
        let admin = h.subscribe(Filter::default(), None);
        // alice keeps it, bob gains it, carol loses it: a change of the lab and its sharing.
        lab_event(
            &h,
            "A1",
            &["u:w1:alice", "g:w1:g1"],
            &["u:w1:alice", "u:w1:bob"],
            true,
        );
        // Only its sharing changed: nothing for those who keep it.
        lab_event(
            &h,
            "A2",
            &["u:w1:alice", "u:w1:bob"],
            &["u:w1:alice"],
            false,
        );
        let one = |s: &Subscription| {
            texts(s)
                .iter()
                .map(|t| t.lines().nth(2).unwrap_or("").to_owned())
                .collect::<Vec<_>>()
        };
        let has = |got: &[String], action: &str| {
            got.iter()
                .any(|t| t.contains(&format!("\"action\":\"{action}\"")))
        };
        let a = one(&alice);
        assert_eq!(a.len(), 1, "{a:?}");
        assert!(has(&a, "updated"));
        let b = one(&bob);
        assert_eq!(b.len(), 2, "{b:?}");
        assert!(has(&b[..1], "created") && has(&b[1..], "removed"));
        let c = one(&carol);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(has(&c, "removed") && c[0].contains("access"));
        assert_eq!(
            one(&admin).len(),
            1,
            "an admin of the fleet keeps seeing it: the change only"
        );
        // A replay gives each what it may see, as it saw it.
        let late = h.subscribe_as(
            grant_of(&["g:w1:g1"], &[("w1", false)]),
            "carol".into(),
            Filter::default(),
            Some("A0"),
        );
        assert!(late.awaiting);
        let replayed = h.subscribe_as(
            grant_of(&["u:w1:bob"], &[("w1", false)]),
            "bob".into(),
            Filter::default(),
            Some("A1"),
        );
        assert_eq!(replayed.replay.len(), 1, "bob lost it in A2");
    }

    #[test]
    fn a_worker_event_goes_to_its_users_with_their_own_view() {
        let h = hub(100, 16);
        let partial = h.subscribe_as(
            grant_of(&["u:w1:bob"], &[("w1", false)]),
            "bob".into(),
            Filter::default(),
            None,
        );
        let admin_of_w1 = h.subscribe_as(
            grant_of(&["a:w1"], &[("w1", true)]),
            "root".into(),
            Filter::default(),
            None,
        );
        let stranger = h.subscribe_as(
            grant_of(&["u:w2:eve"], &[("w2", false)]),
            "eve".into(),
            Filter::default(),
            None,
        );
        assert_eq!(
            h.partial_views("w1", EventType::DataRefreshed),
            vec![vec!["u:w1:bob".to_owned()]]
        );
        h.publish_to(
            "B1".into(),
            EventType::DataRefreshed,
            "w1".into(),
            DateTime::now(),
            Some(json!({ "lab_count": 10 })),
            Audience::Counts {
                views: vec![(vec![vec!["u:w1:bob".into()]], json!({ "lab_count": 2 }))],
            },
        );
        h.publish_to(
            "B2".into(),
            EventType::SyncFailed,
            "w1".into(),
            DateTime::now(),
            Some(json!({ "error": "lab l7: boom" })),
            Audience::Worker {
                partial: Some(json!({ "error": null })),
            },
        );
        let p = texts(&partial);
        assert!(
            p[0].contains("\"lab_count\":2") && p[1].contains("\"error\":null"),
            "{p:?}"
        );
        let a = texts(&admin_of_w1);
        assert!(
            a[0].contains("\"lab_count\":10") && a[1].contains("boom"),
            "{a:?}"
        );
        assert!(texts(&stranger).is_empty());
    }

    #[test]
    fn a_change_of_a_users_accounts_resets_and_ends_its_streams() {
        let h = hub(100, 16);
        let bob = h.subscribe_as(
            grant_of(&["u:w1:bob"], &[("w1", false)]),
            "bob".into(),
            Filter::default(),
            None,
        );
        let other = h.subscribe_as(
            grant_of(&["u:w1:ann"], &[("w1", false)]),
            "ann".into(),
            Filter::default(),
            None,
        );
        h.access_changed("bob");
        assert_eq!(texts(&bob), ["reset:access_changed"]);
        assert_eq!(h.clients(), 1, "bob left the fan-out");
        lab_event(&h, "C1", &[], &["u:w1:bob", "u:w1:ann"], true);
        assert!(texts(&bob).is_empty());
        assert_eq!(texts(&other).len(), 1);
    }
}
