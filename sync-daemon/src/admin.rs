//! The daemon's admin port: `/healthz` (alive), `/readyz` (MongoDB answers), `/metrics`.

use std::{sync::Arc, time::Duration};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{context::Context, Error, Result};

pub fn router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ctx)
}

async fn readyz(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    match tokio::time::timeout(Duration::from_secs(2), cml_labs::mongo::ping(&ctx.db)).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "MongoDB does not answer\n"),
    }
}

async fn metrics(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ctx.metrics.render(),
    )
}

/// Binds the admin address and serves until `shutdown`.
pub async fn serve(
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let addr = ctx.config.sync.admin_listen.clone();
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| Error::AdminListen {
            addr: addr.clone(),
            source,
        })?;
    let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or(addr);
    tracing::info!(address = %bound, "Admin endpoints (/healthz, /readyz, /metrics) on {bound}");
    let app = router(ctx);
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    }))
}
