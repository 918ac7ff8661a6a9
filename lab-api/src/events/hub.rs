//! One replica's events: the recent ones (so a reconnecting client gets exactly what it missed)
//! and the clients, each with a queue bounded in frames and in bytes, and all queues together
//! bounded in bytes. A client whose queue is full has fallen behind: it is dropped from the
//! fan-out and told to `reset`; past the bound of all queues, the client furthest behind goes
//! first. No client makes the replica hold more.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use bson::DateTime;
use serde_json::Value;
use shared::{config::EventsConfig, metrics::Reason};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{
    queue::{Ledger, Queue},
    EventMetrics, EventType, Filter, Frame,
};

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

#[derive(Debug)]
struct Client {
    queue: Arc<Queue>,
    filter: Filter,
    /// Cancelled when the client fell behind.
    behind: CancellationToken,
    /// A `Last-Event-ID` not seen here yet: nothing is sent until it comes (the client comes
    /// from a replica whose change stream is ahead of ours) or the client gives up on it.
    awaiting: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    recent: VecDeque<Arc<Frame>>,
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
    /// Events after the client's `Last-Event-ID`, to send before the live ones.
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

    /// Publishes one event (from the change stream): kept for replays, queued for every client
    /// that wants it. A client whose queue is full is dropped and told it fell behind.
    /// Returns whether some client's queue is more than half full (see [`Backlog`]).
    pub fn publish(
        &self,
        id: String,
        kind: EventType,
        worker_id: String,
        written_at: DateTime,
        data: Value,
    ) -> Backlog {
        // Rendered before the lock is taken: clients and the next publish do not wait for it.
        let frame = Arc::new(Frame::new(
            Some(id),
            kind,
            Some(worker_id),
            written_at,
            data,
        ));
        let mut inner = self.lock();
        if self.keep > 0 && frame.text.len() <= self.keep_bytes {
            inner.recent_bytes += frame.text.len();
            inner.recent.push_back(frame.clone());
            while inner.recent.len() > self.keep || inner.recent_bytes > self.keep_bytes {
                if let Some(old) = inner.recent.pop_front() {
                    inner.recent_bytes -= old.text.len();
                }
            }
        }
        self.make_room(&mut inner, frame.text.len());
        let mut backlog = Backlog::Clear;
        inner.clients.retain(|_, c| {
            if let Some(awaited) = &c.awaiting {
                if frame.id.as_ref() == Some(awaited) {
                    c.awaiting = None;
                }
                return true;
            }
            if !c.filter.wants(&frame) {
                return true;
            }
            let kept = self.offer(c, Item::Frame(frame.clone()));
            if kept && c.queue.more_than_half_full() {
                backlog = Backlog::Behind;
            }
            kept
        });
        backlog
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
        let mut inner = self.lock();
        let mut replay = VecDeque::new();
        let mut reset = None;
        let mut awaiting = None;
        match last_id {
            None => {}
            Some(last) if !plausible_id(last) => reset = Some("unknown_id"),
            Some(last) => match inner
                .recent
                .iter()
                .rposition(|f| f.id.as_deref() == Some(last))
            {
                Some(i) => replay.extend(
                    inner
                        .recent
                        .iter()
                        .skip(i + 1)
                        .filter(|f| filter.wants(f))
                        .cloned(),
                ),
                None => awaiting = Some(last.to_owned()),
            },
        }
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
        let bytes: usize = inner.recent.iter().map(|f| f.text.len()).sum();
        assert!(bytes <= 1000 && bytes > 1000 - 200, "{bytes}");
        assert_eq!(inner.recent_bytes, bytes);
        assert_eq!(
            inner.recent.back().and_then(|f| f.id.clone()),
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
}
