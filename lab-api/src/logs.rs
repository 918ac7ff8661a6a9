//! What lab-api tells operators: one type per outcome, whose `emit` writes one log line (a
//! fixed sentence, its facts as fields, and an `event` name that tools and tests match on) and
//! moves that outcome's metrics where it has any — the pattern of sync-daemon's `logs`.

use std::time::Duration;

use axum::http::StatusCode;

use crate::{events::EventMetrics, metrics::Metrics};
use shared::metrics::Reason;

/// An outcome worth a log line (and its metrics).
pub trait LogLine {
    fn emit(&self);
}

/// What a line shows of an error or a route: its text (and, for `Debug`, its form).
pub trait Shown: std::fmt::Display + std::fmt::Debug {}

impl<T: std::fmt::Display + std::fmt::Debug + ?Sized> Shown for T {}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `api.auth.mode` is `none`.
#[derive(Debug)]
pub struct AuthDisabled;

impl LogLine for AuthDisabled {
    fn emit(&self) {
        tracing::warn!(
            event = "auth_disabled",
            "api.auth.mode is \"none\": every request is served without authentication"
        );
    }
}

/// Who sees what, said once at start: `cml` (each caller what CML shows its user) or `open`.
#[derive(Debug)]
pub struct AccessMode {
    pub mode: &'static str,
}

impl LogLine for AccessMode {
    fn emit(&self) {
        tracing::info!(
            event = "access_mode", mode = self.mode,
            "Access mode set: cml shows each caller the labs its CML servers show its user, open shows everyone everything"
        );
    }
}

/// The service could not be built (MongoDB's URI, the listen address).
#[derive(Debug)]
pub struct StartFailed<'a> {
    pub error: &'a dyn Shown,
}

impl LogLine for StartFailed<'_> {
    fn emit(&self) {
        tracing::error!(event = "start_failed", error = %self.error, "Cannot start");
    }
}

/// Serving failed.
#[derive(Debug)]
pub struct ApiFailed<'a> {
    pub error: &'a dyn Shown,
}

impl LogLine for ApiFailed<'_> {
    fn emit(&self) {
        tracing::error!(event = "api_failed", error = %self.error, "lab-api failed");
    }
}

/// A background task (the change-stream follower) panicked.
#[derive(Debug)]
pub struct TaskFailed<'a> {
    pub error: &'a dyn Shown,
}

impl LogLine for TaskFailed<'_> {
    fn emit(&self) {
        tracing::error!(event = "task_failed", error = %self.error, "A background task of lab-api failed");
    }
}

/// Shutdown is complete.
#[derive(Debug)]
pub struct Stopped;

impl LogLine for Stopped {
    fn emit(&self) {
        tracing::info!(event = "api_stopped", "lab-api stopped");
    }
}

/// The identity provider's keys were read.
#[derive(Debug)]
pub struct JwksFetched<'a> {
    pub keys: usize,
    pub url: &'a str,
}

impl LogLine for JwksFetched<'_> {
    fn emit(&self) {
        tracing::info!(event = "jwks_fetched", keys = self.keys, url = %self.url, "Fetched the signing keys of the JWKS");
    }
}

/// The identity provider's keys could not be read.
#[derive(Debug)]
pub struct JwksFetchFailed<'a> {
    pub url: &'a str,
    pub error: &'a dyn Shown,
}

impl LogLine for JwksFetchFailed<'_> {
    fn emit(&self) {
        tracing::warn!(event = "jwks_fetch_failed", url = %self.url, error = %self.error, "Cannot fetch the JWKS; the keys known so far stay in use");
    }
}

/// A refused refresh could not be recorded for the event stream (the refusal stands).
#[derive(Debug)]
pub struct ThrottleNoticeFailed<'a> {
    pub worker_id: &'a str,
    pub error: &'a dyn Shown,
}

impl LogLine for ThrottleNoticeFailed<'_> {
    fn emit(&self) {
        tracing::warn!(event = "throttle_notice_failed", worker_id = self.worker_id, error = %self.error, "Cannot record a throttle notice for the event stream");
    }
}

/// The change stream is open (again).
#[derive(Debug)]
pub struct ChangeStreamOpened<'a> {
    pub resumed: bool,
    pub metrics: &'a EventMetrics,
}

impl LogLine for ChangeStreamOpened<'_> {
    fn emit(&self) {
        self.metrics.change_stream_up.set(1.0);
        tracing::info!(
            event = "change_stream_opened",
            resumed = self.resumed,
            "Following lab changes"
        );
    }
}

/// The change stream failed; it resumes after the last change seen.
#[derive(Debug)]
pub struct ChangeStreamFailed<'a> {
    pub error: &'a dyn Shown,
    pub retry_in: Duration,
    pub metrics: &'a EventMetrics,
}

impl LogLine for ChangeStreamFailed<'_> {
    fn emit(&self) {
        self.metrics.change_stream_up.set(0.0);
        self.metrics.change_stream_errors.inc();
        tracing::warn!(event = "change_stream_failed", error = %self.error, retry_in_ms = ms(self.retry_in), "The change stream failed; resuming");
    }
}

/// The change stream cannot resume (changes were missed): every client is told to reload.
#[derive(Debug)]
pub struct ChangeStreamReset<'a> {
    pub error: &'a dyn Shown,
    pub metrics: &'a EventMetrics,
}

impl LogLine for ChangeStreamReset<'_> {
    fn emit(&self) {
        self.metrics.change_stream_up.set(0.0);
        self.metrics.change_stream_errors.inc();
        tracing::warn!(event = "change_stream_reset", error = %self.error, "The change stream cannot resume: every client reloads");
    }
}

/// A stream whose client stopped reading is cut.
#[derive(Debug)]
pub struct StreamCut {
    /// `lagged` (it fell behind and did not take its reset) or `stalled` (it took none of the
    /// bytes sent to it, or its frames were not asked for, for a heartbeat interval).
    pub reason: &'static str,
}

impl LogLine for StreamCut {
    fn emit(&self) {
        tracing::info!(
            event = "stream_cut",
            reason = self.reason,
            "Cutting an event stream whose client stopped reading ({})",
            self.reason
        );
    }
}

/// A request answered with a 5xx: shed (overloaded, too slow: `warn`) or failed (`error`).
#[derive(Debug)]
pub struct RequestFailed<'a> {
    pub status: StatusCode,
    pub kind: &'a str,
    pub route: &'a dyn Shown,
    pub method: &'a str,
    pub took: Duration,
    pub detail: &'a str,
    /// Why it was shed, if it was; counted in `http_requests_shed_total`.
    pub shed: Option<&'static str>,
    pub metrics: &'a Metrics,
}

impl LogLine for RequestFailed<'_> {
    fn emit(&self) {
        let (status, kind, route, method, took_ms, detail) = (
            self.status.as_u16(),
            self.kind,
            self.route,
            self.method,
            ms(self.took),
            self.detail,
        );
        if let Some(reason) = self.shed {
            self.metrics.shed.get(&Reason(reason)).inc();
            tracing::warn!(event = "request_failed", status, kind, route = %route, method, took_ms, detail, "Request not served");
        } else {
            tracing::error!(event = "request_failed", status, kind, route = %route, method, took_ms, detail, "Request failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each outcome moves its own metrics with its line.
    #[test]
    fn outcomes_move_their_metrics() {
        let events = EventMetrics::default();
        ChangeStreamOpened {
            resumed: false,
            metrics: &events,
        }
        .emit();
        assert_eq!(events.change_stream_up.get(), 1.0);
        let error = std::io::Error::other("gone");
        ChangeStreamFailed {
            error: &error,
            retry_in: Duration::from_millis(250),
            metrics: &events,
        }
        .emit();
        ChangeStreamReset {
            error: &error,
            metrics: &events,
        }
        .emit();
        assert_eq!(events.change_stream_up.get(), 0.0);
        assert_eq!(events.change_stream_errors.get(), 2);

        let metrics = Metrics::new(["/x".to_owned()], &events);
        let failed = |shed| RequestFailed {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "overloaded",
            route: &"/x",
            method: "GET",
            took: Duration::ZERO,
            detail: "",
            shed,
            metrics: &metrics,
        };
        failed(Some("overloaded")).emit();
        failed(None).emit();
        assert_eq!(metrics.shed.get(&Reason("overloaded")).get(), 1);
    }
}
