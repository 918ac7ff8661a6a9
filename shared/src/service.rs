//! Process plumbing both services share: the shutdown signal, serving HTTP on a bound listener
//! (with the one machine-readable "listening" line), and the probe endpoints.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use mongodb::Database;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{metrics::Registry, mongo};

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

    /// Serves `router` until `shutdown`, then lets requests in flight finish. Logs the one
    /// machine-readable line that says where it listens (`event = "listening"`).
    pub async fn serve(self, router: Router, shutdown: CancellationToken) -> std::io::Result<()> {
        tracing::info!(
            event = "listening",
            endpoint = self.endpoint,
            address = %self.addr,
            "Listening for HTTP requests"
        );
        axum::serve(self.listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
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
