//! One client's event stream: `connected`, then what it missed since its `Last-Event-ID`
//! (or `reset` when that cannot be known), then live events and a `heartbeat` after each quiet
//! `api.events.heartbeat_interval`. A client that falls behind gets `reset` and is closed; one
//! that does not even read that within a heartbeat interval has its connection cut, as has one
//! that stalled: it took none of the bytes sent to it, or its stream was not asked for its next
//! frame, for a heartbeat interval (judged by a watchdog, whether its queue is full or not, whether its
//! body is polled or not). The stream ends when the service stops.

use std::{collections::VecDeque, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{header, HeaderMap, HeaderValue},
    response::Response,
};
use bson::DateTime;
use bytes::Bytes;

use shared::{
    metrics::{Counter, Family, Reason},
    service::ConnectionAbort,
};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    hub::ACCESS_CHANGED,
    payload::{self, Connected, Heartbeat, Reset},
    queue::Queue,
    EventMetrics, EventType, Filter, Frame, Hub, Item, Subscription, TypeLabel,
};
use crate::{
    access::Viewer,
    logs::{LogLine, StreamCut},
    params::{self, EventStreamQuery},
    problem::ApiError,
};

/// Most workers one stream may name in `worker_ids`.
pub const MAX_WORKER_IDS: usize = 1000;
/// The header a browser sends when it reconnects.
const LAST_EVENT_ID: &str = "last-event-id";
/// What an unreadable `Last-Event-ID` is taken as: an id no event has.
const MALFORMED_ID: &str = "";
/// How long a `Last-Event-ID` this replica has not seen is waited for (the client may come
/// from a replica whose change stream is ahead) before the client is told to reload.
pub const RESUME_WAIT: Duration = Duration::from_secs(3);
/// Frames already waiting are sent together, up to this many bytes per write: one write per
/// burst instead of one per event.
const BATCH_BYTES: usize = 16 * 1024;

/// The filter of `worker_ids` and `event_types` (comma-separated; both optional).
pub fn filter(q: &EventStreamQuery) -> Result<Filter, ApiError> {
    fn list(value: &Option<String>) -> Option<Vec<&str>> {
        value
            .as_deref()
            .map(|v| v.split(',').map(str::trim).collect())
    }
    let workers = match list(&q.worker_ids) {
        None => None,
        Some(ids) if ids.len() > MAX_WORKER_IDS => {
            return Err(ApiError::bad(
                "worker_ids",
                format!("names more than {MAX_WORKER_IDS} workers"),
            ))
        }
        Some(ids) => Some(
            ids.into_iter()
                .map(|id| params::id("worker_ids", id).map(str::to_owned))
                .collect::<Result<_, _>>()?,
        ),
    };
    let types = match list(&q.event_types) {
        None => None,
        Some(names) => Some(
            names
                .into_iter()
                .map(|n| {
                    EventType::parse(n).ok_or_else(|| {
                        let known: Vec<&str> =
                            EventType::SUBSCRIBABLE.iter().map(|t| t.as_str()).collect();
                        ApiError::bad(
                            "event_types",
                            format!("`{n}` is not an event type (known: {})", known.join(", ")),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(Filter { types, workers })
}

/// Opens a stream for `filter`, of what `viewer` may see, resuming after the request's
/// `Last-Event-ID`.
pub fn open(
    hub: &Arc<Hub>,
    viewer: Viewer,
    filter: Filter,
    headers: &HeaderMap,
    abort: Option<ConnectionAbort>,
) -> Result<Response, ApiError> {
    let slot = hub.stream_slot().ok_or(ApiError::TooManyStreams)?;
    // A header that is not visible ASCII is no id this API issued: it gets the `reset` every
    // implausible id gets, never "no header" (the client would miss what it missed, silently).
    let last_id = headers
        .get(LAST_EVENT_ID)
        .map(|v| v.to_str().unwrap_or(MALFORMED_ID));
    let sub = hub.subscribe_as(viewer.grant, viewer.username, filter, last_id);
    let body = Body::from_stream(futures::stream::unfold(
        Live::new(hub, sub, slot, abort),
        Live::next,
    ));
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The state of one open stream.
struct Live {
    hub: Arc<Hub>,
    sub: Subscription,
    /// Until when the client's id is awaited (see [`Hub::give_up`]).
    awaiting_until: Option<tokio::time::Instant>,
    /// Frames to send before reading the queue: `connected`, a `reset`, the replay.
    first: VecDeque<Bytes>,
    stop: CancellationToken,
    ended: bool,
    _slot: OwnedSemaphorePermit,
    /// Ends the stall watchdog, and counts the stream closed, when the stream goes.
    _open: OpenGuard,
}

struct OpenGuard {
    streams: shared::metrics::Gauge,
    _watchdog: DropGuard,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.streams.add(-1.0);
    }
}

impl Live {
    fn new(
        hub: &Arc<Hub>,
        mut sub: Subscription,
        slot: OwnedSemaphorePermit,
        abort: Option<ConnectionAbort>,
    ) -> Self {
        let metrics = &hub.metrics;
        let mut first = VecDeque::new();
        let connected = Frame::local(
            EventType::Connected,
            payload::data(&Connected {
                status: "connected",
                client_id: uuid::Uuid::new_v4().to_string(),
            }),
        );
        first.push_back(sent(metrics, &connected));
        if let Some(reason) = sub.reset {
            first.push_back(reset(metrics, reason));
        }
        for f in sub.replay.drain(..) {
            first.push_back(sent(metrics, &f));
        }
        let done = CancellationToken::new();
        if let Some(conn) = abort {
            let watched = Watched {
                queue: sub.queue.clone(),
                behind: sub.behind.clone(),
                conn,
                grace: hub.heartbeat,
                cuts: metrics.cuts.clone(),
            };
            tokio::spawn(watched.watch(done.clone()));
        }
        metrics.streams.add(1.0);
        let awaiting_until = sub
            .awaiting
            .then(|| tokio::time::Instant::now() + RESUME_WAIT);
        Self {
            hub: hub.clone(),
            awaiting_until,
            sub,
            first,
            stop: hub.stopping(),
            _open: OpenGuard {
                streams: metrics.streams.clone(),
                _watchdog: done.drop_guard(),
            },
            ended: false,
            _slot: slot,
        }
    }

    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        if self.ended {
            return None;
        }
        if let Some(b) = self.first.pop_front() {
            return Some((Ok(b), self));
        }
        let queue = self.sub.queue.clone();
        let bytes = loop {
            let awaiting = self.awaiting_until;
            break tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                _ = self.sub.behind.cancelled() => {
                    self.ended = true;
                    reset_frame(&self.hub.metrics, "lagged")
                }
                _ = tokio::time::sleep_until(awaiting.unwrap_or_else(tokio::time::Instant::now)),
                    if awaiting.is_some() =>
                {
                    self.awaiting_until = None;
                    if !self.hub.give_up(&self.sub) {
                        continue;
                    }
                    reset(&self.hub.metrics, "unknown_id")
                }
                item = queue.take() => {
                    if Self::last(&item) {
                        self.ended = true;
                    }
                    self.batch(item)
                }
                _ = tokio::time::sleep(self.hub.heartbeat) => {
                    let heartbeat = Frame::local(EventType::Heartbeat, payload::data(&Heartbeat {}));
                    sent(&self.hub.metrics, &heartbeat)
                }
            };
        };
        Some((Ok(bytes), self))
    }

    /// The text of `first` and of the frames waiting behind it, up to [`BATCH_BYTES`]; a
    /// lone frame is handed out as it is (shared, not copied).
    fn batch(&mut self, first: Item) -> Bytes {
        let first = self.deliver(&first);
        if first.len() >= BATCH_BYTES {
            return first;
        }
        let Some(mut more) = self.sub.queue.try_take() else {
            return first;
        };
        let mut out = bytes::BytesMut::with_capacity(BATCH_BYTES.max(first.len()));
        out.extend_from_slice(&first);
        loop {
            out.extend_from_slice(&self.deliver(&more));
            if out.len() >= BATCH_BYTES {
                break;
            }
            match self.sub.queue.try_take() {
                Some(item) => more = item,
                None => break,
            }
        }
        out.freeze()
    }

    /// Counts one item sent (with its delay since the write) and hands out its text.
    fn deliver(&self, item: &Item) -> Bytes {
        match item {
            Item::Frame(f) => {
                let lag = DateTime::now().timestamp_millis() - f.written_at.timestamp_millis();
                self.hub.metrics.lag.observe(lag.max(0) as f64 / 1000.0);
                sent(&self.hub.metrics, f)
            }
            Item::Reset(reason) => reset(&self.hub.metrics, reason),
        }
    }

    /// Whether the stream ends after this item: a reset because the caller's access changed
    /// (it comes back with its new grant).
    fn last(item: &Item) -> bool {
        matches!(item, Item::Reset(ACCESS_CHANGED))
    }
}

/// Counts a frame sent and hands out its text.
fn sent(m: &EventMetrics, f: &Frame) -> Bytes {
    m.sent.get(&TypeLabel(f.kind)).inc();
    f.text.clone()
}

/// A `reset` frame: reload from the REST API.
fn reset(m: &EventMetrics, reason: &'static str) -> Bytes {
    m.resets.get(&Reason(reason)).inc();
    reset_frame(m, reason)
}

/// The `reset` frame, its reset counted elsewhere.
fn reset_frame(m: &EventMetrics, reason: &'static str) -> Bytes {
    let f = Frame::local(
        EventType::Reset,
        payload::data(&Reset {
            reason,
            message: "Events were missed: reload from the API.",
        }),
    );
    sent(m, &f)
}

/// What the stall watchdog of one stream watches.
struct Watched {
    queue: Arc<Queue>,
    behind: CancellationToken,
    conn: ConnectionAbort,
    /// How long a client may go without taking its `reset`, or its bytes, or its next frame.
    grace: Duration,
    cuts: Family<Reason, Counter>,
}

impl Watched {
    /// Checks the stream four times per `grace` until it ends (`done`), and cuts its
    /// connection when the client fell behind and did not take its `reset` within `grace`
    /// (`lagged`), or stalled (`stalled`): it has taken none of the bytes sent to it for
    /// `grace` (see [`ConnectionAbort::stalled_for`]), or its stream has taken no frame for
    /// that long while some waited (it is not even asked for them).
    async fn watch(self, done: CancellationToken) {
        let every = (self.grace / 4).max(Duration::from_millis(50));
        let mut behind_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if self.behind.is_cancelled() {
                behind_since.get_or_insert_with(tokio::time::Instant::now);
            }
            let reason = if behind_since.is_some_and(|t| t.elapsed() >= self.grace) {
                "lagged"
            } else if self.conn.stalled_for() >= self.grace
                || self.queue.untaken_for() >= self.grace
            {
                "stalled"
            } else {
                continue;
            };
            self.cuts.get(&Reason(reason)).inc();
            StreamCut { reason }.emit();
            self.conn.abort();
            return;
        }
    }
}
