//! The read endpoints over `lab_records` and `worker_sync_status`, and the live event stream,
//! each declared once with its documentation: [`routes`] routes exactly what the OpenAPI
//! document describes (refresh on demand included, from [`crate::refresh`]).

use axum::{
    extract::{Path, RawQuery, State},
    http::HeaderMap,
    response::Response,
    Extension,
};
use futures::TryStreamExt;
use shared::{
    cursor::PageCursor,
    fleet::{self, FleetFilter, FleetKey},
    record::LabState,
    service::ConnectionAbort,
    store::LabFilter,
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    dto::{FleetLab, FleetPage, FleetWorkerDto, LabPage, LabRecordDto, SyncStatusDto, UiLab},
    etag::Tagged,
    events,
    openapi::ReadErrors,
    params::{self, Cursor, Id, Region, Username},
    problem::{ApiError, Problem},
    state::AppState,
};

/// Every endpoint under `/api`, with its documentation.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(worker_labs))
        .routes(routes!(legacy_worker_labs))
        .routes(routes!(lab))
        .routes(routes!(fleet_labs))
        .routes(routes!(sync_status))
        .routes(routes!(fleet_status))
        .routes(routes!(event_stream))
        .routes(routes!(crate::refresh::refresh_worker))
        .routes(routes!(crate::refresh::sync_request))
}

/// A worker's labs, sorted by title then lab id, in the UI's shape.
#[utoipa::path(
    get, path = "/api/workers/{worker_id}/labs", tag = "labs",
    params(
        ("worker_id" = Id, Path, description = "The worker's id"),
        ("include_removed" = Option<bool>, Query, description = "Also list labs that vanished from CML"),
    ),
    responses(
        (status = 200, description = "The worker's labs ([] when it has none)", body = [UiLab]),
        (status = 422, description = "More labs than one response carries (`api.max_labs_per_response`): page with `/api/labs?worker_id=…`", body = Problem, content_type = "application/problem+json"),
        ReadErrors,
    ),
    security(("bearer" = []))
)]
pub async fn worker_labs(
    State(s): State<AppState>,
    Path(worker_id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Tagged, ApiError> {
    labs_of(&s, &worker_id, q.as_deref()).await
}

/// The path the existing UI calls; the region is checked for form only.
#[utoipa::path(
    get, path = "/api/labs/region/{aws_region}/workers/{worker_id}/labs", tag = "labs",
    params(
        ("aws_region" = Region, Path, description = "The worker's AWS region"),
        ("worker_id" = Id, Path, description = "The worker's id"),
        ("include_removed" = Option<bool>, Query, description = "Also list labs that vanished from CML"),
    ),
    responses(
        (status = 200, description = "The worker's labs ([] when it has none)", body = [UiLab]),
        (status = 422, description = "More labs than one response carries (`api.max_labs_per_response`): page with `/api/labs?worker_id=…`", body = Problem, content_type = "application/problem+json"),
        ReadErrors,
    ),
    security(("bearer" = []))
)]
pub async fn legacy_worker_labs(
    State(s): State<AppState>,
    Path((region, worker_id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Tagged, ApiError> {
    params::region("aws_region", &region)?;
    labs_of(&s, &worker_id, q.as_deref()).await
}

/// Written as the records arrive, at most `max_labs_per_response` of them.
async fn labs_of(s: &AppState, worker_id: &str, query: Option<&str>) -> Result<Tagged, ApiError> {
    let worker_id = params::id("worker_id", worker_id)?;
    let q = params::query(query, &["include_removed"])?;
    let include_removed = params::boolean(&q, "include_removed")?;
    let max = s.max_labs_per_response;
    let mut records = s
        .store
        .labs_of_worker(worker_id, include_removed, max.saturating_add(1))
        .await?;
    let mut body = Tagged::array();
    while let Some(record) = records.try_next().await? {
        if body.len() == max {
            return Err(ApiError::TooManyLabs {
                worker_id: worker_id.to_owned(),
                max,
            });
        }
        body.push(&UiLab::from(&record))?;
    }
    Ok(body.close())
}

/// One lab's full record, with its change history.
#[utoipa::path(
    get, path = "/api/workers/{worker_id}/labs/{lab_id}", tag = "labs",
    params(
        ("worker_id" = Id, Path, description = "The worker's id"),
        ("lab_id" = Id, Path, description = "The CML lab id"),
    ),
    responses(
        (status = 200, description = "The record", body = LabRecordDto),
        (status = 404, description = "No such lab on that worker", body = Problem, content_type = "application/problem+json"),
        ReadErrors,
    ),
    security(("bearer" = []))
)]
pub async fn lab(
    State(s): State<AppState>,
    Path((worker_id, lab_id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Tagged, ApiError> {
    let worker_id = params::id("worker_id", &worker_id)?;
    let lab_id = params::id("lab_id", &lab_id)?;
    params::query(q.as_deref(), &[])?;
    match s.store.lab(worker_id, lab_id).await? {
        Some(r) => Tagged::json(&LabRecordDto::from(&r)),
        None => Err(ApiError::NotFound(format!(
            "Worker {worker_id} has no lab {lab_id}."
        ))),
    }
}

/// Labs across the fleet, ordered by worker then lab id, a page at a time.
#[utoipa::path(
    get, path = "/api/labs", tag = "labs",
    params(
        ("state" = Option<LabState>, Query, description = "Only labs in this state"),
        ("owner_username" = Option<Username>, Query, description = "Only this owner's labs"),
        ("worker_id" = Option<Id>, Query, description = "Only this worker's labs"),
        ("include_removed" = Option<bool>, Query, description = "Also list labs that vanished from CML"),
        ("limit" = Option<usize>, Query, description = "Page size, 1–1000 (default 100)", minimum = 1, maximum = 1000),
        ("cursor" = Option<Cursor>, Query, description = "`next_cursor` of the previous page (opaque)"),
    ),
    responses((status = 200, description = "One page", body = LabPage), ReadErrors),
    security(("bearer" = []))
)]
pub async fn fleet_labs(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
) -> Result<Tagged, ApiError> {
    let q = params::query(
        q.as_deref(),
        &[
            "state",
            "owner_username",
            "worker_id",
            "include_removed",
            "limit",
            "cursor",
        ],
    )?;
    let worker_id = match q.get("worker_id") {
        Some(w) => Some(params::id("worker_id", w)?.to_owned()),
        None => None,
    };
    let filter = LabFilter {
        worker_id,
        state: params::state(&q)?,
        owner_username: params::username(&q)?,
        include_removed: params::boolean(&q, "include_removed")?,
    };
    let limit = params::limit(&q)?;
    let after = match q.get("cursor") {
        Some(c) => Some(
            PageCursor::decode(c)
                .map_err(|_| ApiError::bad("cursor", "is not a cursor this API issued"))?,
        ),
        None => None,
    };
    let page = s.store.list(&filter, after.as_ref(), limit).await?;
    Tagged::json(&LabPage {
        items: page.records.iter().map(FleetLab::from).collect(),
        next_cursor: page.next.map(|c| c.encode()),
    })
}

/// How the last sync of a worker went.
#[utoipa::path(
    get, path = "/api/workers/{worker_id}/sync-status", tag = "workers",
    params(("worker_id" = Id, Path, description = "The worker's id")),
    responses(
        (status = 200, description = "The status", body = SyncStatusDto),
        (status = 404, description = "The worker was never synced", body = Problem, content_type = "application/problem+json"),
        ReadErrors,
    ),
    security(("bearer" = []))
)]
pub async fn sync_status(
    State(s): State<AppState>,
    Path(worker_id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Tagged, ApiError> {
    let worker_id = params::id("worker_id", &worker_id)?;
    params::query(q.as_deref(), &[])?;
    match s.status.get(worker_id).await? {
        Some(st) => Tagged::json(&SyncStatusDto::from(&st)),
        None => Err(ApiError::NotFound(format!(
            "Worker {worker_id} was never synced."
        ))),
    }
}

/// Every worker the registry or the sync status knows, with how its syncs go, most urgent
/// first (failing, then stale, then the rest), a page at a time.
#[utoipa::path(
    get, path = "/api/sync-status", tag = "workers",
    params(
        ("stale" = Option<bool>, Query, description = "Only workers without a success for more than two sync intervals (or never), or only the others"),
        ("failing" = Option<bool>, Query, description = "Only workers whose last sync failed, or only the others"),
        ("region" = Option<Region>, Query, description = "Only workers of this AWS region"),
        ("limit" = Option<usize>, Query, description = "Page size, 1–1000 (default 100)", minimum = 1, maximum = 1000),
        ("cursor" = Option<Cursor>, Query, description = "`next_cursor` of the previous page (opaque)"),
    ),
    responses((status = 200, description = "One page", body = FleetPage), ReadErrors),
    security(("bearer" = []))
)]
pub async fn fleet_status(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
) -> Result<Tagged, ApiError> {
    let q = params::query(
        q.as_deref(),
        &["stale", "failing", "region", "limit", "cursor"],
    )?;
    let filter = FleetFilter {
        stale: params::optional_boolean(&q, "stale")?,
        failing: params::optional_boolean(&q, "failing")?,
        region: match q.get("region") {
            Some(r) => Some(params::region("region", r)?.to_owned()),
            None => None,
        },
    };
    let limit = params::limit(&q)?;
    let after = match q.get("cursor") {
        Some(c) => Some(
            FleetKey::decode(c)
                .map_err(|_| ApiError::bad("cursor", "is not a cursor this API issued"))?,
        ),
        None => None,
    };
    let threshold = fleet::stale_threshold(bson::DateTime::now(), s.stale_after);
    let (items, next) = s
        .status
        .fleet_page(&filter, after.as_ref(), limit, threshold)
        .await?;
    Tagged::json(&FleetPage {
        items: items
            .iter()
            .map(|r| FleetWorkerDto::new(r, threshold))
            .collect(),
        next_cursor: next.map(|k| k.encode()),
    })
}

/// Live events as server-sent events: every change of a lab and every worker sync, from any
/// replica, resumable with `Last-Event-ID` on any replica.
///
/// Frames: `connected` first; then `worker.labs.updated` (`action`: created, updated,
/// state_changed, removed, reappeared; with the lab's list entry), `worker.data.refreshed` (a
/// worker synced, with its counts), `worker.sync.failed`, `worker.refresh.throttled` (a
/// refresh refused: `retry_after_seconds`); `heartbeat` after each quiet
/// `api.events.heartbeat_interval`; `reset` when events were missed (reload from the REST API).
/// Each data line is the envelope `{type, source, time, data}`.
#[utoipa::path(
    get, path = "/api/events/stream", tag = "events",
    params(
        ("worker_ids" = Option<String>, Query, description = "Only events of these workers (comma-separated ids, at most 1000)"),
        ("event_types" = Option<String>, Query, description = "Only these events (comma-separated: worker.labs.updated, worker.data.refreshed, worker.sync.failed, worker.refresh.throttled); connected, heartbeat and reset always come"),
        ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received: the stream resumes after it"),
    ),
    responses(
        (status = 200, description = "The stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad parameter: `param` names it", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No token, or a bad one", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "As many streams open on this replica as it serves (`Retry-After`)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn event_stream(
    State(s): State<AppState>,
    headers: HeaderMap,
    abort: Option<Extension<ConnectionAbort>>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let q = params::query(q.as_deref(), &["worker_ids", "event_types"])?;
    let filter = events::stream::filter(&q)?;
    events::stream::open(&s.events, filter, &headers, abort.map(|Extension(a)| a))
}
