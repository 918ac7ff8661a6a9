//! The service: [`router`] builds the HTTP application from explicit dependencies (tests drive
//! it with `oneshot`); [`App`] binds it to `api.listen` ([`App::build`]) and runs it with its
//! background task, the change-stream follower, until shutdown ([`App::run`]).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    error_handling::HandleErrorLayer,
    extract::MatchedPath,
    http::{header, HeaderValue, Method},
    middleware,
    response::{IntoResponse, Response},
    routing::get,
    BoxError, Json, Router,
};
use shared::{
    config::{ApiConfig, AuthMode, Config},
    metrics::Registry,
    mongo,
    service::{probes, HttpListener, ServerLimits},
};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::{
    compression::CompressionLayer,
    cors::{AllowOrigin, CorsLayer},
    trace::TraceLayer,
};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::{
    api,
    auth::Authenticator,
    etag, events,
    logs::{AccessMode, AuthDisabled, LogLine, Stopped, TaskFailed},
    metrics::Metrics,
    openapi::ApiDoc,
    params::{self, WaitQuery},
    problem::ApiError,
    refresh::WAITING_ROUTES,
    state::AppState,
};

/// Paths served besides the API: probes, metrics and the OpenAPI document (never authenticated).
pub const OPEN_PATHS: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/openapi.json"];

/// The API's routes and their OpenAPI document, from the same declarations.
pub fn documented_routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(api::routes())
        .split_for_parts()
}

/// The HTTP application: routes, auth, ETags, compression, CORS, timeouts, load shedding,
/// request metrics and the request log.
///
/// The concurrency limit wraps the whole router as one service, so it holds for the service as
/// a whole, not per route; each request's timeout runs inside the router.
pub fn router(
    state: AppState,
    auth: Arc<Authenticator>,
    cfg: &ApiConfig,
) -> (Router, Arc<Metrics>) {
    let (api, doc) = documented_routes();
    let metrics = Arc::new(Metrics::new(
        doc.paths
            .paths
            .keys()
            .cloned()
            .chain(OPEN_PATHS.map(str::to_owned))
            .chain(crate::page::PATHS.map(str::to_owned)),
        &state.events.metrics,
    ));
    let origins = Arc::new(cfg.cors_allowed_origins.clone());
    let api = api
        .route_layer(middleware::from_fn(etag::middleware))
        .route_layer(middleware::from_fn_with_state(origins, same_site_writes))
        .route_layer(middleware::from_fn_with_state(auth, crate::auth::require));
    let doc = Arc::new(doc);
    let open = probes(state.db.clone(), metrics.registry.clone()).route(
        "/openapi.json",
        get(move || async move { Json(doc.as_ref().clone()) }),
    );
    let routes = api
        .merge(open)
        .merge(crate::page::routes())
        .fallback(|| async { ApiError::NotFound("No such endpoint.".into()) })
        .with_state(state)
        // Per request, inside the router: a request past its time keeps its route's label.
        .layer(middleware::from_fn_with_state(
            cfg.request_timeout.get(),
            deadline,
        ))
        .layer(middleware::from_fn(crate::metrics::remember_route));
    // Around the whole router: one limit for the service.
    let service = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http().on_failure(()))
        .layer(cors(&cfg.cors_allowed_origins))
        .layer(CompressionLayer::new().gzip(true))
        .layer(middleware::from_fn_with_state(
            metrics.clone(),
            crate::metrics::observe,
        ))
        .layer(HandleErrorLayer::new(overload_or_timeout))
        .load_shed()
        .concurrency_limit(cfg.max_concurrent_requests.max(1))
        .service(routes);
    (Router::new().fallback_service(service), metrics)
}

/// A request that changes something (anything but GET, HEAD, OPTIONS) sent by a browser from
/// another site is refused with 403, unless that site is one of `api.cors_allowed_origins`: a
/// page elsewhere must not make a logged-in user's browser (its auth cookie) refresh workers.
/// Browsers say where a request comes from (`Origin`, `Sec-Fetch-Site`); other clients send
/// neither and are not affected.
async fn same_site_writes(
    axum::extract::State(allowed): axum::extract::State<Arc<Vec<String>>>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if safe || !cross_site(request.headers(), authority(&request), &allowed) {
        return next.run(request).await;
    }
    ApiError::Forbidden(
        "This request comes from a page of another site (Origin); it is refused. List that \
         site in api.cors_allowed_origins if it is the UI."
            .into(),
    )
    .into_response()
}

/// Where the request was sent: the URI's authority (HTTP/2's `:authority`, or an absolute
/// URI), else the `Host` header (HTTP/1.1).
fn authority(request: &axum::extract::Request) -> Option<&str> {
    request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers().get(header::HOST)?.to_str().ok())
}

/// Whether a browser sent the request from a site other than ours (`authority`, where it was
/// sent) and other than `allowed`.
pub fn cross_site(
    headers: &axum::http::HeaderMap,
    authority: Option<&str>,
    allowed: &[String],
) -> bool {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let origin = text(header::ORIGIN);
    if let Some(o) = origin {
        if allowed
            .iter()
            .any(|a| a == "*" || a.trim_end_matches('/') == o)
        {
            return false;
        }
    }
    let foreign_origin = origin.is_some_and(|o| {
        let from = o.split_once("://").map_or(o, |(_, rest)| rest);
        o == "null" || authority != Some(from)
    });
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    foreign_origin || fetch_site == Some("cross-site")
}

/// Every request ends within `api.request_timeout` (503 after it); one to a route that waits
/// for an outcome gets as much longer as the `wait` it asks for (at most [`params::MAX_WAIT`]).
async fn deadline(
    axum::extract::State(limit): axum::extract::State<Duration>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let waits = request
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|m| WAITING_ROUTES.contains(&m.as_str()));
    let wait = if waits {
        // A bad `wait` is the handler's 400; it waits for nothing.
        params::parse::<WaitQuery>(request.uri().query()).map_or(Duration::ZERO, |q| q.wait.0)
    } else {
        Duration::ZERO
    };
    let limit = limit + wait;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
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
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::IF_NONE_MATCH,
            header::CONTENT_TYPE,
        ])
        .expose_headers([header::ETAG, header::LOCATION, header::RETRY_AFTER])
        .max_age(Duration::from_secs(600))
}

/// A built service: the application, bound to its address.
#[derive(Debug)]
pub struct App {
    router: Router,
    metrics: Arc<Metrics>,
    listener: HttpListener,
    limits: ServerLimits,
    state: AppState,
}

impl App {
    /// Builds the state from `config` (MongoDB connects lazily) and binds `api.listen` (port 0
    /// picks a free port: see [`App::local_addr`]). Starts nothing: [`App::run`] does.
    pub async fn build(config: &Config) -> Result<Self, ApiError> {
        if config.api.auth.mode == AuthMode::None {
            AuthDisabled.emit();
        }
        let client = mongo::connect(&config.mongodb, "lab-api", None).await?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ApiError::Internal(format!("cannot build the HTTP client: {e}")))?;
        let auth = Arc::new(Authenticator::from_config(
            &config.api.auth,
            &config.api.access,
            http,
        ));
        AccessMode {
            mode: auth.access_mode().as_str(),
        }
        .emit();
        let state = AppState::from_config(config, &client);
        let (router, metrics) = router(state.clone(), auth, &config.api);
        let addr = config.api.listen.clone();
        let listener = HttpListener::bind(&addr, "api")
            .await
            .map_err(|source| ApiError::Listen { addr, source })?;
        Ok(Self {
            router,
            metrics,
            listener,
            limits: config.api.server_limits(),
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// The metrics registry (for OTLP export).
    pub fn registry(&self) -> Arc<Registry> {
        self.metrics.registry.clone()
    }

    /// Follows the change stream into the live events and serves until `shutdown`; then
    /// event streams end at once, requests in flight finish, and the follower is joined.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ApiError> {
        let Self {
            router,
            listener,
            limits,
            state,
            ..
        } = self;
        let events = state.events.clone();
        let follower = tokio::spawn(events::follow::follow(
            events.clone(),
            state.waiters.clone(),
            state.grants.clone(),
            state.store.clone(),
            state.watched.clone(),
        ));
        // Event streams end as soon as shutdown begins, so that serving can drain.
        let stop = shutdown.child_token();
        let (stopping, hub) = (stop.clone(), events.clone());
        let stopper = tokio::spawn(async move {
            stopping.cancelled().await;
            hub.stop();
        });
        let served = listener.serve(router, limits, stop.clone()).await;
        // However serving ended, the background tasks end with it.
        stop.cancel();
        for task in [follower, stopper] {
            if let Err(e) = task.await {
                TaskFailed { error: &e }.emit();
            }
        }
        served.map_err(|e| ApiError::Internal(format!("the server failed: {e}")))?;
        Stopped.emit();
        Ok(())
    }
}
