//! The HTTP application: routes, auth, ETags, compression, CORS, timeouts, load shedding,
//! metrics, tracing. `app()` builds it from explicit dependencies, so tests drive it directly.

use std::{sync::Arc, time::Duration};

use axum::{
    error_handling::HandleErrorLayer,
    extract::State,
    http::{header, HeaderValue, Method, StatusCode},
    middleware,
    response::{IntoResponse, Response},
    routing::get,
    BoxError, Json, Router,
};
use cml_labs::{config::ApiConfig, status::SyncStatusStore, store::LabStore};
use mongodb::Database;
use tower::ServiceBuilder;
use tower_http::{
    compression::CompressionLayer,
    cors::{AllowOrigin, CorsLayer},
    trace::TraceLayer,
};
use utoipa::OpenApi;

use crate::{api, auth::Authenticator, etag, metrics::Metrics, openapi::ApiDoc, problem::ApiError};

/// What handlers need; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: LabStore,
    pub status: SyncStatusStore,
    pub db: Database,
    pub metrics: Arc<Metrics>,
}

pub fn app(state: AppState, auth: Arc<Authenticator>, cfg: &ApiConfig) -> Router {
    let api = Router::new()
        .route("/api/workers/{worker_id}/labs", get(api::worker_labs))
        .route(
            "/api/labs/region/{aws_region}/workers/{worker_id}/labs",
            get(api::legacy_worker_labs),
        )
        .route("/api/workers/{worker_id}/labs/{lab_id}", get(api::lab))
        .route(
            "/api/workers/{worker_id}/sync-status",
            get(api::sync_status),
        )
        .route("/api/labs", get(api::fleet_labs))
        .route_layer(middleware::from_fn(etag::middleware))
        .route_layer(middleware::from_fn_with_state(auth, crate::auth::require));
    let open = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }));
    Router::new()
        .merge(api)
        .merge(open)
        .fallback(|| async { ApiError::NotFound("No such endpoint.".into()) })
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::record,
        ))
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(overload_or_timeout))
                .load_shed()
                .concurrency_limit(cfg.max_concurrent_requests.max(1))
                .timeout(cfg.request_timeout.get()),
        )
        .layer(CompressionLayer::new().gzip(true))
        .layer(cors(&cfg.cors_allowed_origins))
        .layer(TraceLayer::new_for_http())
}

/// Shed load with 503 instead of queueing without bound; a request past its time gets 503 too.
async fn overload_or_timeout(error: BoxError) -> Response {
    if error.is::<tower::load_shed::error::Overloaded>() {
        ApiError::Overloaded.into_response()
    } else if error.is::<tower::timeout::error::Elapsed>() {
        ApiError::Timeout.into_response()
    } else {
        ApiError::Internal(error.to_string()).into_response()
    }
}

fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::IF_NONE_MATCH,
            header::CONTENT_TYPE,
        ])
        .expose_headers([header::ETAG])
        .max_age(Duration::from_secs(600))
}

async fn readyz(State(s): State<AppState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), cml_labs::mongo::ping(&s.db)).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "MongoDB does not answer\n").into_response(),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}
