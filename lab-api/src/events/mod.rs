//! Live lab events (`GET /api/events/stream`): every change that reaches MongoDB, from one
//! change stream per replica, fanned out to its clients as server-sent events in the wire
//! format the UI already speaks, resumable on any replica with `Last-Event-ID`, and bounded.
//!
//! [`derive`] turns a change into an event (pure); [`hub`] keeps the recent events and the
//! clients; [`follow`] reads the change stream; [`stream`] serves one client.

pub mod derive;
pub mod follow;
pub mod hub;
pub mod payload;
pub mod queue;
pub mod stream;
pub mod waiters;

use std::collections::HashSet;

use bson::DateTime;
use bytes::Bytes;
use serde_json::Value;
use shared::metrics::{
    Counter, Family, Gauge, Histogram, LabelSet, Reason, Registry, LATENCY_BUCKETS,
};

pub use hub::{Backlog, Hub, Item, Subscription};

use crate::dto::iso;

/// The `source` of every envelope.
pub const SOURCE: &str = "lab-api";

/// The events a stream carries. The last four can be asked for by name (`event_types`); the
/// others go to every client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Connected,
    Heartbeat,
    Reset,
    LabsUpdated,
    DataRefreshed,
    SyncFailed,
    RefreshThrottled,
}

impl EventType {
    /// The events a client can filter on.
    pub const SUBSCRIBABLE: [EventType; 4] = [
        EventType::LabsUpdated,
        EventType::DataRefreshed,
        EventType::SyncFailed,
        EventType::RefreshThrottled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Connected => "connected",
            EventType::Heartbeat => "heartbeat",
            EventType::Reset => "reset",
            EventType::LabsUpdated => "worker.labs.updated",
            EventType::DataRefreshed => "worker.data.refreshed",
            EventType::SyncFailed => "worker.sync.failed",
            EventType::RefreshThrottled => "worker.refresh.throttled",
        }
    }

    /// A subscribable event by its name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::SUBSCRIBABLE.into_iter().find(|t| t.as_str() == name)
    }
}

/// One event, rendered once and shared by every client that gets it.
#[derive(Debug)]
pub struct Frame {
    /// The SSE `id:` (from the change stream's resume token); none for frames of one stream.
    pub id: Option<String>,
    pub kind: EventType,
    pub worker_id: Option<String>,
    /// When the change was written (MongoDB's wall time).
    pub written_at: DateTime,
    /// `id:`, `event:` and `data:` lines and the blank line that ends the frame.
    pub text: Bytes,
    /// Client queues holding it now (see [`queue::Ledger`]).
    queued_in: std::sync::atomic::AtomicUsize,
}

impl Frame {
    pub fn new(
        id: Option<String>,
        kind: EventType,
        worker_id: Option<String>,
        written_at: DateTime,
        data: Value,
    ) -> Self {
        let text = render(id.as_deref(), kind, written_at, data);
        Self {
            id,
            kind,
            worker_id,
            written_at,
            text,
            queued_in: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// A frame of one stream (`connected`, `heartbeat`, `reset`): no id, so a browser keeps
    /// the last event id it had.
    pub fn local(kind: EventType, data: Value) -> Self {
        Self::new(None, kind, None, DateTime::now(), data)
    }
}

/// The text of one frame: the envelope `{type, source, time, data}` as one line of JSON.
pub fn render(id: Option<&str>, kind: EventType, time: DateTime, data: Value) -> Bytes {
    let envelope = payload::data(&payload::EventEnvelope {
        kind: kind.as_str().to_owned(),
        source: SOURCE.to_owned(),
        time: iso(time),
        data,
    });
    let mut text = String::new();
    if let Some(id) = id {
        text.push_str("id: ");
        text.push_str(id);
        text.push('\n');
    }
    text.push_str("event: ");
    text.push_str(kind.as_str());
    text.push_str("\ndata: ");
    // serde_json writes no raw newline: the JSON is one `data:` line.
    text.push_str(&envelope.to_string());
    text.push_str("\n\n");
    Bytes::from(text)
}

/// What one client asked for: event types and workers (`None`: all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub types: Option<HashSet<EventType>>,
    pub workers: Option<HashSet<String>>,
}

impl Filter {
    pub fn wants(&self, f: &Frame) -> bool {
        let type_ok = self.types.as_ref().is_none_or(|t| t.contains(&f.kind));
        let worker_ok = match (&self.workers, &f.worker_id) {
            (None, _) => true,
            (Some(w), Some(id)) => w.contains(id),
            (Some(_), None) => true,
        };
        type_ok && worker_ok
    }
}

/// `type="…"`: an event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TypeLabel(pub EventType);

impl LabelSet for TypeLabel {
    fn labels(&self) -> Vec<shared::metrics::Label> {
        vec![("type", shared::metrics::LabelValue::Name(self.0.as_str()))]
    }
}

/// The stream's metrics; registered with the service's registry by [`EventMetrics::register`].
#[derive(Debug, Clone)]
pub struct EventMetrics {
    pub streams: Gauge,
    /// Bytes of frames queued for clients (each frame once).
    pub queued_bytes: Gauge,
    /// Streams whose connection was cut, by why.
    pub cuts: Family<Reason, Counter>,
    pub sent: Family<TypeLabel, Counter>,
    pub resets: Family<Reason, Counter>,
    pub lag: Histogram,
    pub changes: Counter,
    pub change_stream_errors: Counter,
    pub change_stream_up: Gauge,
}

impl Default for EventMetrics {
    fn default() -> Self {
        Self {
            streams: Gauge::default(),
            queued_bytes: Gauge::default(),
            cuts: Family::default(),
            sent: Family::default(),
            resets: Family::default(),
            lag: Histogram::new(LATENCY_BUCKETS),
            changes: Counter::default(),
            change_stream_errors: Counter::default(),
            change_stream_up: Gauge::default(),
        }
    }
}

impl EventMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "events_streams",
            "Event streams open on this replica",
            &self.streams,
        );
        r.register(
            "events_queued_bytes",
            "Bytes of frames waiting in clients' queues on this replica (a frame shared by many queues counted once); bounded by api.events.buffer_bytes",
            &self.queued_bytes,
        );
        r.register(
            "events_streams_cut",
            "Event streams whose connection was cut: lagged (fell behind and did not take its reset within a heartbeat interval), stalled (it took none of the bytes sent to it, or its frames were not asked for, for a heartbeat interval)",
            &self.cuts,
        );
        r.register(
            "events_sent",
            "Frames sent to event-stream clients, by event type",
            &self.sent,
        );
        r.register(
            "events_resets",
            "Clients told to reload: lagged (fell behind; its stream ends), unknown_id (a Last-Event-ID that cannot be resumed from), history_lost (the change stream could not resume)",
            &self.resets,
        );
        r.register(
            "events_delivery_lag_seconds",
            "From the write in MongoDB to the frame handed to a client",
            &self.lag,
        );
        r.register(
            "events_changes",
            "Changes read from the change stream (events or not)",
            &self.changes,
        );
        r.register(
            "events_change_stream_errors",
            "Times the change stream failed and was reopened",
            &self.change_stream_errors,
        );
        r.register(
            "events_change_stream_up",
            "1 while the change stream is open",
            &self.change_stream_up,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_frame_is_id_event_and_one_data_line() {
        let text = render(
            Some("82ABC"),
            EventType::LabsUpdated,
            DateTime::from_millis(0),
            json!({"title": "two\nlines"}),
        );
        let text = std::str::from_utf8(&text).expect("utf-8");
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines[0], "id: 82ABC");
        assert_eq!(lines[1], "event: worker.labs.updated");
        assert!(lines[2].starts_with("data: {"), "{text}");
        assert_eq!(&lines[3..], ["", ""], "{text}");
        let envelope: Value = serde_json::from_str(&lines[2]["data: ".len()..]).expect("json");
        assert_eq!(envelope["type"], "worker.labs.updated");
        assert_eq!(envelope["source"], SOURCE);
        assert_eq!(envelope["time"], "1970-01-01T00:00:00Z");
        assert_eq!(envelope["data"]["title"], "two\nlines");
    }

    #[test]
    fn local_frames_carry_no_id() {
        let f = Frame::local(EventType::Heartbeat, json!({}));
        assert!(f.id.is_none());
        assert!(f.text.starts_with(b"event: heartbeat\n"));
    }

    #[test]
    fn filters_match_types_and_workers() {
        let frame = |kind, worker: Option<&str>| {
            Frame::new(
                Some("t".into()),
                kind,
                worker.map(str::to_owned),
                DateTime::now(),
                json!({}),
            )
        };
        let f = Filter {
            types: Some([EventType::LabsUpdated].into()),
            workers: Some(["w1".to_owned()].into()),
        };
        assert!(f.wants(&frame(EventType::LabsUpdated, Some("w1"))));
        assert!(!f.wants(&frame(EventType::LabsUpdated, Some("w2"))));
        assert!(!f.wants(&frame(EventType::DataRefreshed, Some("w1"))));
        assert!(Filter::default().wants(&frame(EventType::SyncFailed, Some("w9"))));
        assert_eq!(
            EventType::parse("worker.sync.failed"),
            Some(EventType::SyncFailed)
        );
        assert_eq!(EventType::parse("heartbeat"), None, "not subscribable");
    }
}
