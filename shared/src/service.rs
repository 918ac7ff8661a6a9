//! Process plumbing both services share: the shutdown signal, serving HTTP on a bound listener
//! within limits a hostile client cannot stretch (with the one machine-readable "listening"
//! line), and the probe endpoints.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use mongodb::Database;
use tokio::{
    net::TcpListener,
    sync::{Notify, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::{
    metrics::Registry,
    mongo,
    progress::{Tracked, WriteProgress},
};

/// Exit code of a process stopped by a second signal while it drained (128 + SIGINT).
pub const EXIT_FORCED: i32 = 130;
/// How long `/readyz` waits for MongoDB's answer.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// A token cancelled by the first SIGTERM or SIGINT (drain: stop taking work, finish what runs).
/// A second signal exits the process at once with [`EXIT_FORCED`].
pub fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!(
                event = "signal_handlers_failed",
                "Cannot install signal handlers"
            );
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!(
            event = "shutdown_started",
            "Shutting down: no new work starts; work in flight may finish"
        );
        trigger.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!(event = "shutdown_forced", "Second signal: exiting at once");
        std::process::exit(EXIT_FORCED);
    });
    token
}

/// What a client of an HTTP port may make the server hold: time, header bytes, connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// A request's headers must arrive within this; on HTTP/1 it also bounds the wait for the
    /// next request on a kept-alive connection.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/1 and HTTP/2).
    pub idle_timeout: Duration,
    /// Most bytes of request headers a connection may buffer.
    pub max_header_bytes: usize,
    /// Most connections open at once; past it, new ones wait in the listen queue.
    pub max_connections: usize,
}

/// hyper refuses HTTP/1 read buffers smaller than this.
const MIN_HTTP1_BUFFER: usize = 8192;
/// Most request header fields (HTTP/1).
const MAX_HEADERS: usize = 100;
/// Concurrent HTTP/2 streams per connection.
const MAX_H2_STREAMS: u32 = 64;
/// Pause after a failed `accept` (out of file descriptors, say) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound listener and the address it got (port 0 picks a free one).
#[derive(Debug)]
pub struct HttpListener {
    listener: TcpListener,
    addr: SocketAddr,
    /// What the port serves (`api`, `admin`), for the listening line.
    endpoint: &'static str,
}

impl HttpListener {
    pub async fn bind(addr: &str, endpoint: &'static str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(Self {
            listener,
            addr,
            endpoint,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `router` within `limits` until `shutdown`, then lets requests in flight finish
    /// (for at most `limits.idle_timeout`). Logs the one machine-readable line that says where
    /// it listens (`event = "listening"`).
    pub async fn serve(
        self,
        router: Router,
        limits: ServerLimits,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        tracing::info!(
            event = "listening",
            endpoint = self.endpoint,
            address = %self.addr,
            "Listening for HTTP requests"
        );
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes.max(MIN_HTTP1_BUFFER))
            .max_headers(MAX_HEADERS);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(MAX_H2_STREAMS)
            .keep_alive_interval(limits.idle_timeout)
            .keep_alive_timeout(limits.header_read_timeout);
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let connections = TaskTracker::new();
        loop {
            let slot = tokio::select! {
                _ = shutdown.cancelled() => break,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(event = "accept_failed", endpoint = self.endpoint, error = %e, "Cannot accept a connection");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            connections.spawn(serve_connection(
                builder.clone(),
                stream,
                router.clone(),
                limits,
                shutdown.clone(),
                slot,
            ));
        }
        drop(self.listener);
        connections.close();
        connections.wait().await;
        Ok(())
    }
}

/// Carried by every request: its connection's write progress, and a way to close the connection
/// at once, without a graceful end. For a response that streams to a client which stopped
/// reading: its frames cannot be written, so nothing else would ever end the connection.
#[derive(Debug, Clone)]
pub struct ConnectionAbort {
    abort: CancellationToken,
    writes: Arc<WriteProgress>,
}

impl ConnectionAbort {
    /// Closes the connection now.
    pub fn abort(&self) {
        self.abort.cancel();
    }

    /// How long the client has taken none of the bytes sent to it (see
    /// [`WriteProgress::stalled_for`]).
    pub fn stalled_for(&self) -> Duration {
        self.writes.stalled_for()
    }
}

/// A response body that keeps its connection busy until it has been sent (or dropped): a long
/// download or an event stream is a request in flight, not an idle connection.
struct BusyBody {
    inner: axum::body::Body,
    _busy: Busy,
}

impl hyper::body::Body for BusyBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// One connection: served until it ends, stays idle too long, is aborted, or the server shuts
/// down.
async fn serve_connection(
    builder: auto::Builder<TokioExecutor>,
    stream: tokio::net::TcpStream,
    router: Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new());
    let abort = CancellationToken::new();
    let writes = WriteProgress::new();
    writes.watch_socket(std::os::fd::AsRawFd::as_raw_fd(&stream));
    let service = {
        let activity = activity.clone();
        let handle = ConnectionAbort {
            abort: abort.clone(),
            writes: writes.clone(),
        };
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let router = router.clone();
            let busy = Busy::start(activity.clone());
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(handle.clone());
            async move {
                let response = router.oneshot(request).await?;
                Ok::<_, std::convert::Infallible>(
                    response.map(|inner| BusyBody { inner, _busy: busy }),
                )
            }
        })
    };
    let conn =
        builder.serve_connection_with_upgrades(TokioIo::new(Tracked::new(stream, writes)), service);
    tokio::pin!(conn);
    let stop = tokio::select! {
        done = conn.as_mut() => {
            if let Err(e) = done {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            return;
        }
        _ = shutdown.cancelled() => "shutdown",
        _ = activity.idle(limits) => "idle",
        _ = abort.cancelled() => {
            tracing::debug!("Aborting an HTTP connection");
            return;
        }
    };
    tracing::debug!(reason = stop, "Closing an HTTP connection");
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(limits.idle_timeout, conn).await;
}

/// Requests in flight on one connection, since when it has had none, and whether it ever had
/// one.
#[derive(Debug)]
struct Activity {
    /// Requests in flight, and since when there are none (`None` while some run).
    in_flight: Mutex<(usize, Option<Instant>)>,
    served: std::sync::atomic::AtomicBool,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: Mutex::new((0, Some(Instant::now()))),
            served: std::sync::atomic::AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    /// Completes once the connection has been idle too long: no first request within the
    /// header-read timeout of connecting (whatever bytes trickled in: HTTP/1 and HTTP/2 alike),
    /// or no request in flight for the idle timeout since the last one.
    async fn idle(&self, limits: ServerLimits) {
        loop {
            let since = self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).1;
            let allowed = if self.served.load(std::sync::atomic::Ordering::SeqCst) {
                limits.idle_timeout
            } else {
                limits.header_read_timeout
            };
            match since {
                Some(since) if since.elapsed() >= allowed => return,
                Some(since) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until((since + allowed).into()) => {}
                        _ = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }
}

/// A request in flight; the connection is busy until it is dropped.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: Arc<Activity>) -> Self {
        activity
            .served
            .store(true, std::sync::atomic::Ordering::SeqCst);
        {
            let mut state = activity.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            *state = (state.0 + 1, None);
        }
        activity.changed.notify_one();
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        {
            let mut state = self.0.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            let left = state.0.saturating_sub(1);
            *state = (left, (left == 0).then(Instant::now));
        }
        self.0.changed.notify_one();
    }
}

/// `/healthz` (the process answers), `/readyz` (MongoDB answers) and `/metrics` (OpenMetrics).
pub fn probes<S: Clone + Send + Sync + 'static>(
    db: Database,
    registry: Arc<Registry>,
) -> Router<S> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let db = db.clone();
                async move {
                    match tokio::time::timeout(READY_TIMEOUT, mongo::ping(&db)).await {
                        Ok(Ok(())) => (StatusCode::OK, "ready\n"),
                        _ => (StatusCode::SERVICE_UNAVAILABLE, "MongoDB does not answer\n"),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        registry.render(),
                    )
                        .into_response()
                }
            }),
        )
}
