//! The read endpoints over `lab_records` and `worker_sync_status`, and the live event stream,
//! each declared once with its documentation: [`routes`] routes exactly what the OpenAPI
//! document describes (refresh on demand included, from [`crate::refresh`]).

use axum::{
    extract::{Path, State},
    http::HeaderMap,
    response::Response,
    Extension,
};
use futures::TryStreamExt;
use shared::{
    access::Grant,
    cursor::PageCursor,
    fleet::{self, FleetFilter, FleetKey},
    service::ConnectionAbort,
    store::LabFilter,
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    access::Viewer,
    dto::{FleetLab, FleetPage, FleetWorkerDto, LabPage, LabRecordDto, SyncStatusDto, UiLab},
    etag::Tagged,
    events,
    openapi::ReadErrors,
    params::{
        self, EventStreamQuery, FleetLabsQuery, FleetStatusQuery, Id, NoQuery, Query, Region,
        WorkerLabsQuery,
    },
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
    params(("worker_id" = Id, Path, description = "The worker's id"), WorkerLabsQuery),
    responses(
        (status = 200, description = "The worker's labs ([] when it has none)", body = [UiLab]),
        (status = 422, description = "More labs than one response carries (`api.max_labs_per_response`): page with `/api/labs?worker_id=…`", body = Problem, content_type = "application/problem+json"),
        ReadErrors,
    ),
    security(("bearer" = []))
)]
pub async fn worker_labs(
    State(s): State<AppState>,
    viewer: Viewer,
    Path(worker_id): Path<String>,
    Query(q): Query<WorkerLabsQuery>,
) -> Result<Tagged, ApiError> {
    labs_of(&s, &viewer, &worker_id, &q).await
}

/// The path the existing UI calls; the region is checked for form only.
#[utoipa::path(
    get, path = "/api/labs/region/{aws_region}/workers/{worker_id}/labs", tag = "labs",
    params(
        ("aws_region" = Region, Path, description = "The worker's AWS region"),
        ("worker_id" = Id, Path, description = "The worker's id"),
        WorkerLabsQuery,
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
    viewer: Viewer,
    Path((region, worker_id)): Path<(String, String)>,
    Query(q): Query<WorkerLabsQuery>,
) -> Result<Tagged, ApiError> {
    params::region("aws_region", &region)?;
    labs_of(&s, &viewer, &worker_id, &q).await
}

/// Written as the records arrive, at most `max_labs_per_response` of them; only those the
/// caller may see (none: `[]`, as for a worker without labs).
async fn labs_of(
    s: &AppState,
    viewer: &Viewer,
    worker_id: &str,
    q: &WorkerLabsQuery,
) -> Result<Tagged, ApiError> {
    let worker_id = params::id("worker_id", worker_id)?;
    let include_removed = q.include_removed.0;
    let max = s.max_labs_per_response;
    let readers = viewer.on_worker(worker_id);
    let mut body = Tagged::array();
    if readers.as_ref().is_some_and(Vec::is_empty) {
        return Ok(body.close());
    }
    let mut records = s
        .store
        .labs_of_worker(
            worker_id,
            include_removed,
            readers.as_deref(),
            max.saturating_add(1),
        )
        .await?;
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
        NoQuery,
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
    viewer: Viewer,
    Path((worker_id, lab_id)): Path<(String, String)>,
    Query(NoQuery {}): Query<NoQuery>,
) -> Result<Tagged, ApiError> {
    let worker_id = params::id("worker_id", &worker_id)?;
    let lab_id = params::id("lab_id", &lab_id)?;
    // One the caller may not see is answered exactly as one that does not exist.
    let readers = viewer.on_worker(worker_id);
    let found = match &readers {
        Some(r) if r.is_empty() => None,
        _ => {
            s.store
                .lab_for(worker_id, lab_id, readers.as_deref())
                .await?
        }
    };
    match found {
        Some(r) => Tagged::json(&LabRecordDto::from(&r)),
        None => Err(ApiError::NotFound(format!(
            "Worker {worker_id} has no lab {lab_id}."
        ))),
    }
}

/// Labs across the fleet, ordered by worker then lab id, a page at a time.
#[utoipa::path(
    get, path = "/api/labs", tag = "labs",
    params(FleetLabsQuery),
    responses((status = 200, description = "One page", body = LabPage), ReadErrors),
    security(("bearer" = []))
)]
pub async fn fleet_labs(
    State(s): State<AppState>,
    viewer: Viewer,
    Query(q): Query<FleetLabsQuery>,
) -> Result<Tagged, ApiError> {
    let filter = LabFilter {
        readers: match &q.worker_id {
            Some(w) => viewer.on_worker(&w.0),
            None => viewer.anywhere(),
        },
        worker_id: q.worker_id.map(|w| w.0),
        state: q.state.map(|s| s.0),
        owner_username: q.owner_username.map(|u| u.0),
        include_removed: q.include_removed.0,
    };
    let limit = q.limit.0;
    let after = q
        .cursor
        .map(|c| PageCursor::decode(&c.0).map_err(|_| not_ours()))
        .transpose()?;
    let page = if filter.readers.as_ref().is_some_and(Vec::is_empty) {
        shared::store::Page {
            records: Vec::new(),
            next: None,
        }
    } else {
        s.store.list(&filter, after.as_ref(), limit).await?
    };
    Tagged::json(&LabPage {
        items: page.records.iter().map(FleetLab::from).collect(),
        next_cursor: page.next.map(|c| c.encode()),
    })
}

/// How the last sync of a worker went.
#[utoipa::path(
    get, path = "/api/workers/{worker_id}/sync-status", tag = "workers",
    params(("worker_id" = Id, Path, description = "The worker's id"), NoQuery),
    responses(
        (status = 200, description = "The status", body = SyncStatusDto),
        (status = 404, description = "The worker was never synced", body = Problem, content_type = "application/problem+json"),
        ReadErrors,
    ),
    security(("bearer" = []))
)]
pub async fn sync_status(
    State(s): State<AppState>,
    viewer: Viewer,
    Path(worker_id): Path<String>,
    Query(NoQuery {}): Query<NoQuery>,
) -> Result<Tagged, ApiError> {
    let worker_id = params::id("worker_id", &worker_id)?;
    // A worker where the caller has no user is one it does not know of.
    let status = if viewer.grant.has_account(worker_id) {
        s.status.get(worker_id).await?
    } else {
        None
    };
    match status {
        Some(st) if viewer.grant.sees_all_of(worker_id) => Tagged::json(&SyncStatusDto::from(&st)),
        Some(st) => {
            let readers = viewer.on_worker(worker_id).unwrap_or_default();
            let visible = s
                .store
                .count_visible(&[worker_id.to_owned()], &readers)
                .await?;
            let mut dto = SyncStatusDto::from(&st);
            dto.limit_to(visible.get(worker_id).copied().unwrap_or(0));
            Tagged::json(&dto)
        }
        None => Err(ApiError::NotFound(format!(
            "Worker {worker_id} was never synced."
        ))),
    }
}

/// Every worker the registry or the sync status knows, with how its syncs go, most urgent
/// first (failing, then stale, then the rest), a page at a time.
#[utoipa::path(
    get, path = "/api/sync-status", tag = "workers",
    params(FleetStatusQuery),
    responses((status = 200, description = "One page", body = FleetPage), ReadErrors),
    security(("bearer" = []))
)]
pub async fn fleet_status(
    State(s): State<AppState>,
    viewer: Viewer,
    Query(q): Query<FleetStatusQuery>,
) -> Result<Tagged, ApiError> {
    let filter = FleetFilter {
        stale: q.stale.map(|f| f.0),
        failing: q.failing.map(|f| f.0),
        region: q.region.map(|r| r.0),
        watch: q.watch_state.map(|w| w.0.to_owned()),
        workers: match &*viewer.grant {
            Grant::All => None,
            Grant::Principals { workers, .. } => {
                let mut ids: Vec<String> = workers.keys().cloned().collect();
                ids.sort_unstable();
                Some(ids)
            }
        },
    };
    let limit = q.limit.0;
    let after = q
        .cursor
        .map(|c| FleetKey::decode(&c.0).map_err(|_| not_ours()))
        .transpose()?;
    let threshold = fleet::stale_threshold(bson::DateTime::now(), s.stale_after);
    if filter.workers.as_ref().is_some_and(Vec::is_empty) {
        return Tagged::json(&FleetPage {
            items: Vec::new(),
            next_cursor: None,
        });
    }
    let (items, next) = s
        .status
        .fleet_page(&filter, after.as_ref(), limit, threshold)
        .await?;
    let mut items: Vec<FleetWorkerDto> = items
        .iter()
        .map(|r| FleetWorkerDto::new(r, threshold))
        .collect();
    // Where the caller sees only some labs: its own count, nothing of the others.
    let partial: Vec<String> = items
        .iter()
        .filter(|w| !viewer.grant.sees_all_of(&w.worker_id))
        .map(|w| w.worker_id.clone())
        .collect();
    if let (false, Some(readers)) = (partial.is_empty(), viewer.anywhere()) {
        let counts = s.store.count_visible(&partial, &readers).await?;
        for w in items.iter_mut().filter(|w| partial.contains(&w.worker_id)) {
            w.limit_to(counts.get(&w.worker_id).copied().unwrap_or(0));
        }
    }
    Tagged::json(&FleetPage {
        items,
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
        EventStreamQuery,
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
    viewer: Viewer,
    headers: HeaderMap,
    abort: Option<Extension<ConnectionAbort>>,
    Query(q): Query<EventStreamQuery>,
) -> Result<Response, ApiError> {
    let filter = events::stream::filter(&q)?;
    events::stream::open(
        &s.events,
        viewer,
        filter,
        &headers,
        abort.map(|Extension(a)| a),
    )
}

/// A cursor that does not decode: not one this API issued.
fn not_ours() -> ApiError {
    ApiError::bad("cursor", "is not a cursor this API issued")
}
