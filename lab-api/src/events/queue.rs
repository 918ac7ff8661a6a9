//! One client's queue of frames waiting to be written, bounded in frames and in bytes, and
//! the ledger of the bytes all queues hold together (a frame counted once, however many
//! queues hold it: that is the memory they keep alive).

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use shared::metrics::Gauge;
use tokio::{sync::Notify, time::Instant};

use super::{Frame, Item};

/// The bytes of the frames any client's queue holds (each frame once).
#[derive(Debug, Default)]
pub struct Ledger {
    bytes: AtomicUsize,
    /// The same, for `/metrics`.
    gauge: Gauge,
}

impl Ledger {
    pub fn new(gauge: Gauge) -> Self {
        Self {
            bytes: AtomicUsize::new(0),
            gauge,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }

    /// One more queue holds `f`.
    fn hold(&self, f: &Frame) {
        if f.queued_in.fetch_add(1, Ordering::SeqCst) == 0 {
            let now = self.bytes.fetch_add(f.text.len(), Ordering::SeqCst) + f.text.len();
            self.gauge.set(now as f64);
        }
    }

    /// One queue less holds `f`.
    fn release(&self, f: &Frame) {
        if f.queued_in.fetch_sub(1, Ordering::SeqCst) == 1 {
            let now = self.bytes.fetch_sub(f.text.len(), Ordering::SeqCst) - f.text.len();
            self.gauge.set(now as f64);
        }
    }
}

/// The bytes an item takes in a queue.
fn size(item: &Item) -> usize {
    match item {
        Item::Frame(f) => f.text.len(),
        Item::Reset(_) => 0,
    }
}

#[derive(Debug, Default)]
struct State {
    /// Each item with when it was queued.
    items: VecDeque<(Item, Instant)>,
    bytes: usize,
    /// When the stream last took an item.
    last_take: Option<Instant>,
}

/// One client's queue: the hub offers, the client's stream takes.
#[derive(Debug)]
pub struct Queue {
    state: Mutex<State>,
    ready: Notify,
    ledger: Arc<Ledger>,
    max_items: usize,
    max_bytes: usize,
}

impl Queue {
    pub fn new(ledger: Arc<Ledger>, max_items: usize, max_bytes: usize) -> Self {
        Self {
            state: Mutex::default(),
            ready: Notify::new(),
            ledger,
            max_items: max_items.max(1),
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item`; false when it does not fit: the queue holds `max_items` already, or it
    /// is not empty and `item` would take it past `max_bytes` (an empty queue takes any one
    /// frame, so a large frame never costs a client that keeps up its stream).
    pub fn offer(&self, item: Item) -> bool {
        let mut s = self.lock();
        let len = size(&item);
        if s.items.len() >= self.max_items
            || (!s.items.is_empty() && s.bytes + len > self.max_bytes)
        {
            return false;
        }
        if let Item::Frame(f) = &item {
            self.ledger.hold(f);
        }
        s.bytes += len;
        s.items.push_back((item, Instant::now()));
        drop(s);
        self.ready.notify_one();
        true
    }

    /// The next item, if one waits.
    pub fn try_take(&self) -> Option<Item> {
        let mut s = self.lock();
        let (item, _) = s.items.pop_front()?;
        s.last_take = Some(Instant::now());
        s.bytes -= size(&item);
        if let Item::Frame(f) = &item {
            self.ledger.release(f);
        }
        Some(item)
    }

    /// The next item, once one comes.
    pub async fn take(&self) -> Item {
        loop {
            if let Some(item) = self.try_take() {
                return item;
            }
            // One consumer: a wake that comes before this wait is kept for it.
            self.ready.notified().await;
        }
    }

    /// Drops everything queued (the client fell behind, or left).
    pub fn clear(&self) {
        let mut s = self.lock();
        for (item, _) in s.items.drain(..) {
            if let Item::Frame(f) = &item {
                self.ledger.release(f);
            }
        }
        s.bytes = 0;
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// More than half full, in frames or in bytes.
    pub fn more_than_half_full(&self) -> bool {
        let s = self.lock();
        s.items.len() > self.max_items / 2 || s.bytes > self.max_bytes / 2
    }

    /// How long the stream has taken nothing while something waited (zero when nothing
    /// waits): a client whose stream is not even asked for its next frame shows here. A slow
    /// client that keeps taking does not, however long its frames wait behind what its socket
    /// holds (the age of the oldest frame measures the backlog, not a stall).
    pub fn untaken_for(&self) -> Duration {
        let s = self.lock();
        s.items.front().map_or(Duration::ZERO, |(_, queued)| {
            s.last_take
                .map_or(*queued, |taken| taken.max(*queued))
                .elapsed()
        })
    }
}

#[cfg(test)]
mod tests {
    use bson::DateTime;
    use serde_json::json;

    use super::*;
    use crate::events::EventType;

    fn frame(bytes: usize) -> Arc<Frame> {
        Arc::new(Frame::new(
            Some("A".into()),
            EventType::LabsUpdated,
            Some("w".into()),
            DateTime::now(),
            json!({ "pad": "x".repeat(bytes) }),
        ))
    }

    #[test]
    fn a_queue_is_bounded_in_frames_and_in_bytes_but_takes_any_one_frame() {
        let ledger = Arc::new(Ledger::default());
        let big = frame(5000);
        let q = Queue::new(ledger.clone(), 3, 4000);
        assert!(q.offer(Item::Frame(big.clone())), "an empty queue takes it");
        assert!(!q.offer(Item::Frame(frame(10))), "past the bytes");
        assert!(q.try_take().is_some());
        let small = frame(10);
        for _ in 0..3 {
            assert!(q.offer(Item::Frame(small.clone())));
        }
        assert!(!q.offer(Item::Frame(small.clone())), "past the frames");
        assert_eq!(q.bytes(), 3 * small.text.len());
    }

    #[test]
    fn the_ledger_counts_a_frame_once_while_any_queue_holds_it() {
        let ledger = Arc::new(Ledger::default());
        let (a, b) = (
            Queue::new(ledger.clone(), 8, 1 << 20),
            Queue::new(ledger.clone(), 8, 1 << 20),
        );
        let f = frame(100);
        let len = f.text.len();
        assert!(a.offer(Item::Frame(f.clone())) && b.offer(Item::Frame(f.clone())));
        assert_eq!(ledger.bytes(), len, "one frame, two queues");
        a.try_take();
        assert_eq!(ledger.bytes(), len, "b still holds it");
        b.clear();
        assert_eq!(ledger.bytes(), 0);
        assert!(a.offer(Item::Reset("lagged")));
        assert_eq!(
            (ledger.bytes(), a.bytes()),
            (0, 0),
            "a reset weighs nothing"
        );
    }

    #[tokio::test]
    async fn take_waits_for_an_offer_and_how_long_nothing_was_taken_is_known() {
        let q = Arc::new(Queue::new(Arc::new(Ledger::default()), 8, 1 << 20));
        assert_eq!(q.untaken_for(), Duration::ZERO);
        let taker = tokio::spawn({
            let q = q.clone();
            async move { q.take().await }
        });
        tokio::task::yield_now().await;
        assert!(q.offer(Item::Reset("lagged")));
        assert!(matches!(taker.await.expect("taken"), Item::Reset("lagged")));
        assert!(q.offer(Item::Frame(frame(1))));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(q.untaken_for() >= Duration::from_millis(20));
    }

    /// A stream that keeps taking is not stalled, however old the frames it has not reached
    /// yet: what counts is the time since its last take.
    #[tokio::test(start_paused = true)]
    async fn a_stream_that_keeps_taking_is_not_untaken_however_old_its_backlog() {
        let q = Queue::new(Arc::new(Ledger::default()), 64, 1 << 20);
        for _ in 0..10 {
            assert!(q.offer(Item::Frame(frame(1))));
        }
        for _ in 0..9 {
            tokio::time::advance(Duration::from_millis(300)).await;
            assert!(q.try_take().is_some());
            assert_eq!(q.untaken_for(), Duration::ZERO, "it just took one");
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(q.untaken_for(), Duration::from_secs(2));
        assert!(q.try_take().is_some());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(q.untaken_for(), Duration::ZERO, "nothing waits");
        assert!(q.offer(Item::Frame(frame(1))));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            q.untaken_for(),
            Duration::from_secs(1),
            "since it was queued"
        );
    }
}
