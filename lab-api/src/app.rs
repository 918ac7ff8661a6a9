//! The service: [`router`] builds the HTTP application from explicit dependencies (tests drive
//! it with `oneshot`); [`App`] binds it to `api.listen` and serves it until shutdown.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    error_handling::HandleErrorLayer,
    http::{header, HeaderValue, Method},
    middleware,
    response::{IntoResponse, Response},
    routing::get,
    BoxError, Json, Router,
};
use mongodb::{Client, Database};
use shared::{
    config::{ApiConfig, AuthMode, Config, EventsConfig, MongoConfig, SyncConfig},
    metrics::Registry,
    mongo,
    registry::WorkerRegistry,
    service::{probes, HttpListener, ServerLimits},
    status::SyncStatusReader,
    store::LabStore,
    sync_request::RequestStore,
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
    etag,
    events::{self, follow::Watched, waiters::Waiters, EventMetrics, Hub},
    metrics::Metrics,
    openapi::ApiDoc,
    problem::ApiError,
    refresh::{RefreshSettings, MAX_WAIT},
};

/// Paths served besides the API: probes, metrics and the OpenAPI document (never authenticated).
pub const OPEN_PATHS: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/openapi.json"];

/// What handlers need; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: LabStore,
    pub status: SyncStatusReader,
    pub registry: WorkerRegistry,
    pub db: Database,
    /// A worker without a success for this long is stale: two sync intervals (`sync.interval`).
    pub stale_after: Duration,
    /// `api.max_labs_per_response`, set by [`router`] from the configuration.
    pub max_labs_per_response: usize,
    /// The live events of this replica (`api.events`); [`App::build`] starts following the
    /// change stream into it.
    pub events: Arc<Hub>,
    /// Refreshes asked for on demand (`sync_requests`): the only collection lab-api writes.
    pub requests: RequestStore,
    /// Callers waiting for a request's outcome, woken by the change stream.
    pub waiters: Arc<Waiters>,
    pub refresh: RefreshSettings,
}

impl AppState {
    pub fn new(client: &Client, cfg: &MongoConfig) -> Self {
        let db = client.database(&cfg.database);
        Self {
            // The API never writes: the history limit is the daemon's business.
            store: LabStore::new(client, cfg, 1),
            status: SyncStatusReader::new(&db, &cfg.sync_status_collection),
            registry: WorkerRegistry::new(&db, &cfg.workers_collection),
            requests: RequestStore::new(&db, &cfg.sync_requests_collection),
            db,
            stale_after: 2 * SyncConfig::default().interval.get(),
            max_labs_per_response: ApiConfig::default().max_labs_per_response,
            events: Hub::new(&EventsConfig::default(), EventMetrics::default()),
            waiters: Arc::new(Waiters::new(waiting_callers(&ApiConfig::default()))),
            refresh: RefreshSettings::default(),
        }
    }
}

/// Callers that may wait for a refresh's outcome at once: a quarter of the requests in
/// flight, so that waiting never crowds out reads.
pub fn waiting_callers(cfg: &ApiConfig) -> usize {
    (cfg.max_concurrent_requests / 4).max(1)
}

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
    mut state: AppState,
    auth: Arc<Authenticator>,
    cfg: &ApiConfig,
) -> (Router, Arc<Metrics>) {
    state.max_labs_per_response = cfg.max_labs_per_response;
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
    if safe || !cross_site(request.headers(), &allowed) {
        return next.run(request).await;
    }
    ApiError::Forbidden(
        "This request comes from a page of another site (Origin); it is refused. List that \
         site in api.cors_allowed_origins if it is the UI."
            .into(),
    )
    .into_response()
}

/// Whether a browser sent the request from a site other than ours and other than `allowed`.
pub fn cross_site(headers: &axum::http::HeaderMap, allowed: &[String]) -> bool {
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
    let host = text(header::HOST);
    let foreign_origin = origin.is_some_and(|o| {
        let authority = o.split_once("://").map_or(o, |(_, rest)| rest);
        o == "null" || host != Some(authority)
    });
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    foreign_origin || fetch_site == Some("cross-site")
}

/// Every request ends within `api.request_timeout` (503 after it); one that asks to wait for
/// an outcome (`wait=`, at most [`MAX_WAIT`]) gets that much longer.
async fn deadline(
    axum::extract::State(limit): axum::extract::State<Duration>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let waits = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p.starts_with("wait=")));
    let limit = if waits { limit + MAX_WAIT } else { limit };
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
    events: Arc<Hub>,
}

impl App {
    /// Connects (lazily) to MongoDB and binds `api.listen` (port 0 picks a free port: see
    /// [`App::local_addr`]).
    pub async fn build(config: &Config) -> Result<Self, ApiError> {
        if config.api.auth.mode == AuthMode::None {
            tracing::warn!(
                event = "auth_disabled",
                "api.auth.mode is \"none\": every request is served without authentication"
            );
        }
        let client = mongo::connect(&config.mongodb, "lab-api", None).await?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ApiError::Internal(format!("cannot build the HTTP client: {e}")))?;
        let auth = Arc::new(Authenticator::from_config(&config.api.auth, http));
        let mut state = AppState::new(&client, &config.mongodb);
        state.stale_after = 2 * config.sync.interval.get();
        state.events = Hub::new(&config.api.events, EventMetrics::default());
        state.waiters = Arc::new(Waiters::new(waiting_callers(&config.api)));
        state.refresh = RefreshSettings::new(
            config.api.refresh_enabled,
            config.sync.clone(),
            config.cml.use_private_ip,
        );
        let events = state.events.clone();
        tokio::spawn(events::follow::follow(
            events.clone(),
            state.waiters.clone(),
            state.db.clone(),
            Watched {
                labs: config.mongodb.lab_records_collection.clone(),
                status: config.mongodb.sync_status_collection.clone(),
                requests: config.mongodb.sync_requests_collection.clone(),
            },
        ));
        let (router, metrics) = router(state, auth, &config.api);
        let addr = config.api.listen.clone();
        let listener = HttpListener::bind(&addr, "api")
            .await
            .map_err(|source| ApiError::Listen { addr, source })?;
        Ok(Self {
            router,
            metrics,
            listener,
            limits: config.api.server_limits(),
            events,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// The metrics registry (for OTLP export).
    pub fn registry(&self) -> Arc<Registry> {
        self.metrics.registry.clone()
    }

    /// Serves until `shutdown`, then lets requests in flight finish; event streams end at once.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ApiError> {
        let events = self.events.clone();
        let stopping = shutdown.clone();
        tokio::spawn(async move {
            stopping.cancelled().await;
            events.stop();
        });
        self.listener
            .serve(self.router, self.limits, shutdown)
            .await
            .map_err(|e| ApiError::Internal(format!("the server failed: {e}")))?;
        tracing::info!(event = "api_stopped", "lab-api stopped");
        Ok(())
    }
}
