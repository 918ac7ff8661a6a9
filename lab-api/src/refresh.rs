//! Refresh on demand: `POST /api/workers/{worker_id}/labs/refresh` records a sync request for
//! the sync-daemon that holds the lease (lab-api never writes lab data), throttled per worker;
//! `GET /api/sync-requests/{id}` reads one back. Both may wait for the outcome (`?wait=`, at
//! most 30 s), woken by the replica's change stream rather than by reading in a loop.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::{Path, State},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use bson::DateTime;
use shared::{
    config::SyncConfig,
    registry::Standing,
    sync_request::{Recorded, SyncRequest},
};
use tokio::time::Instant;

use crate::{
    access::Viewer,
    dto::SyncRequestDto,
    etag::Tagged,
    logs::{LogLine, ThrottleNoticeFailed},
    openapi::{ReadErrors, WriteErrors},
    params::{self, Id, Query, WaitQuery},
    problem::{ApiError, Problem},
    state::AppState,
};

/// The routes whose callers may wait for an outcome (`wait`): the request deadline grows by
/// the wait asked for on these only.
pub const WAITING_ROUTES: [&str; 2] = [
    "/api/workers/{worker_id}/labs/refresh",
    "/api/sync-requests/{request_id}",
];
/// While the change stream is up, a waiting caller still reads its request this often (a
/// notification lost to a reconnect costs at most this).
const RECHECK: Duration = Duration::from_secs(5);
/// While it is down, this often.
const RECHECK_DOWN: Duration = Duration::from_secs(1);
/// At most one throttle notice per worker this often, however often its refresh is refused.
const NOTICE_EVERY: Duration = Duration::from_secs(1);
/// Workers whose last notice is remembered before old ones are forgotten.
const NOTICES_KEPT: usize = 10_000;

/// What refresh on demand needs besides the stores.
#[derive(Debug, Clone)]
pub struct RefreshSettings {
    /// `api.refresh_enabled`.
    pub enabled: bool,
    /// Which workers a cycle syncs (`sync.*`) and `sync.refresh_min_interval`.
    pub sync: Arc<SyncConfig>,
    /// `cml.use_private_ip`.
    pub use_private_ip: bool,
    notices: Arc<Mutex<HashMap<String, Instant>>>,
}

impl RefreshSettings {
    pub fn new(enabled: bool, sync: SyncConfig, use_private_ip: bool) -> Self {
        Self {
            enabled,
            sync: Arc::new(sync),
            use_private_ip,
            notices: Arc::default(),
        }
    }

    /// Whether a throttle notice for `worker_id` should go out now (one per worker per
    /// second, so a client hammering the button writes at most that).
    fn notice_due(&self, worker_id: &str, now: Instant) -> bool {
        let mut notices = self.notices.lock().unwrap_or_else(|p| p.into_inner());
        if notices
            .get(worker_id)
            .is_some_and(|last| now.duration_since(*last) < NOTICE_EVERY)
        {
            return false;
        }
        if notices.len() >= NOTICES_KEPT {
            notices.retain(|_, last| now.duration_since(*last) < NOTICE_EVERY);
        }
        if notices.len() < NOTICES_KEPT {
            notices.insert(worker_id.to_owned(), now);
        }
        true
    }
}

impl Default for RefreshSettings {
    fn default() -> Self {
        Self::new(true, SyncConfig::default(), false)
    }
}

/// Refreshes a worker's labs now: the sync-daemon that holds the lease syncs it exactly as a
/// cycle would (joining a sync of that worker already under way). Answers `202` with the
/// request (`Location` names it); with `wait`, `200` with the outcome once there is one
/// within that time (`labs_synced`, `labs_created`, `labs_updated`, `labs_removed`,
/// `duration_ms`, or `error_kind` and `error`). One refresh per worker at a time, and none
/// within `sync.refresh_min_interval` of the last one's end: `429` with `Retry-After`, and a
/// `worker.refresh.throttled` event. Takes no body. Switched off (`api.refresh_enabled =
/// false`): `404`.
#[utoipa::path(
    post, path = "/api/workers/{worker_id}/labs/refresh", tag = "refresh",
    params(("worker_id" = Id, Path, description = "The worker's id"), WaitQuery),
    responses(
        (status = 200, description = "The refresh is over (with `wait`): its outcome", body = SyncRequestDto),
        (status = 202, description = "Recorded; not over yet. `Location` names the request", body = SyncRequestDto,
            headers(("Location" = String, description = "/api/sync-requests/{id}"))),
        (status = 404, description = "No such worker (neither in the registry nor configured), or refresh on demand switched off", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The worker is not running", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "A refresh of this worker is pending or running, or ended less than `sync.refresh_min_interval` ago: `Retry-After` says when to ask again; `request` is that refresh", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds"))),
        WriteErrors,
    ),
    security(("bearer" = []))
)]
pub async fn refresh_worker(
    State(s): State<AppState>,
    viewer: Viewer,
    Path(worker_id): Path<String>,
    Query(WaitQuery { wait }): Query<WaitQuery>,
) -> Result<Response, ApiError> {
    if !s.refresh.enabled {
        return Err(ApiError::NotFound(
            "Refresh on demand is switched off (api.refresh_enabled).".into(),
        ));
    }
    let worker_id = params::id("worker_id", &worker_id)?;
    // An admin of the fleet, or a caller with a user on the worker (who may have just made a
    // lab there); to anyone else the worker is unknown.
    if !viewer.grant.has_account(worker_id) {
        return Err(unknown_worker(worker_id));
    }
    let wait = wait.0;
    let settings = &s.refresh;
    match s
        .registry
        .standing(worker_id, &settings.sync, settings.use_private_ip)
        .await?
    {
        Standing::Active { .. } => {}
        Standing::Unknown => return Err(unknown_worker(worker_id)),
        Standing::Inactive { status } => {
            return Err(ApiError::Conflict(format!(
                "Worker {worker_id} is not running (status {}): only running workers are synced.",
                status.as_deref().unwrap_or("unknown")
            )))
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    let now = DateTime::now();
    let min_interval = settings.sync.refresh_min_interval.get();
    let by = (!viewer.sees_all()).then_some(viewer.username.as_str());
    let partial = !viewer.grant.sees_all_of(worker_id);
    match s
        .requests
        .record_by(id, worker_id, by, now, min_interval)
        .await?
    {
        Recorded::Accepted(request) => {
            let request = outcome(&s, *request, wait).await?;
            Ok(answer(&request, partial))
        }
        Recorded::Throttled {
            retry_after,
            latest,
        } => {
            if settings.notice_due(worker_id, Instant::now()) {
                let notice = uuid::Uuid::new_v4().to_string();
                if let Err(e) = s
                    .requests
                    .notice_throttled(&notice, worker_id, retry_after, now)
                    .await
                {
                    // The refusal stands; only its event is lost.
                    ThrottleNoticeFailed {
                        worker_id,
                        error: &e,
                    }
                    .emit();
                }
            }
            Err(ApiError::Throttled {
                retry_after_s: retry_after.as_secs(),
                request: Box::new(dto(latest.as_ref(), partial)),
            })
        }
    }
}

/// A refresh asked for on demand, as it is now; with `wait`, once it is over (or the time is
/// up). Requests are kept a day.
#[utoipa::path(
    get, path = "/api/sync-requests/{request_id}", tag = "refresh",
    params(("request_id" = Id, Path, description = "The request's id (from `Location`)"), WaitQuery),
    responses(
        (status = 200, description = "The request", body = SyncRequestDto),
        (status = 404, description = "No such request (or older than a day)", body = Problem, content_type = "application/problem+json"),
        ReadErrors,
    ),
    security(("bearer" = []))
)]
pub async fn sync_request(
    State(s): State<AppState>,
    viewer: Viewer,
    Path(request_id): Path<String>,
    Query(WaitQuery { wait }): Query<WaitQuery>,
) -> Result<Tagged, ApiError> {
    let request_id = params::id("request_id", &request_id)?;
    let wait = wait.0;
    // Whoever asked for it, and the fleet's admins; to anyone else it does not exist.
    let request = s.requests.get(request_id).await?.filter(|r| {
        viewer.sees_all() || r.requested_by.as_deref() == Some(viewer.username.as_str())
    });
    let Some(request) = request else {
        return Err(ApiError::NotFound(format!(
            "No sync request {request_id} (requests are kept a day)."
        )));
    };
    let partial = !viewer.grant.sees_all_of(&request.worker_id);
    Tagged::json(&dto(&outcome(&s, request, wait).await?, partial))
}

/// The 404 of a worker the caller cannot refresh: the same whether it exists or not.
fn unknown_worker(worker_id: &str) -> ApiError {
    ApiError::NotFound(format!(
        "Worker {worker_id} is neither in the registry nor configured."
    ))
}

/// A request as its reader sees it: without the worker's figures for one who sees only some
/// of its labs.
fn dto(request: &SyncRequest, partial: bool) -> SyncRequestDto {
    let mut dto = SyncRequestDto::from(request);
    if partial {
        dto.limit();
    }
    dto
}

/// `request` once it is over, or as it is when `wait` is up. Woken by the change stream;
/// reads the request again after registering (the outcome may have come first), and now and
/// then in case a wake was lost. Past the bound on waiting callers, answers at once.
async fn outcome(
    s: &AppState,
    request: SyncRequest,
    wait: Duration,
) -> Result<SyncRequest, ApiError> {
    if wait.is_zero() || request.status.is_finished() {
        return Ok(request);
    }
    let Some(waiting) = s.waiters.wait_for(&request.id) else {
        return Ok(request);
    };
    let deadline = Instant::now() + wait;
    let mut current = request;
    loop {
        let woken = waiting.notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        match s.requests.get(&current.id).await? {
            Some(r) => current = r,
            None => return Ok(current),
        }
        if current.status.is_finished() || Instant::now() >= deadline {
            return Ok(current);
        }
        let recheck = if s.events.metrics.change_stream_up.get() >= 1.0 {
            RECHECK
        } else {
            RECHECK_DOWN
        };
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep_until((Instant::now() + recheck).min(deadline)) => {}
        }
    }
}

/// `200` with the outcome once over, `202` before; `Location` names the request either way.
fn answer(request: &SyncRequest, partial: bool) -> Response {
    let status = if request.status.is_finished() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let mut response = (status, Json(dto(request, partial))).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/api/sync-requests/{}", request.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deadline grows on exactly the routes whose documentation has a `wait` parameter.
    #[test]
    fn the_waiting_routes_are_those_documented_with_wait() {
        let (_, doc) = crate::app::documented_routes();
        let doc = serde_json::to_value(&doc).expect("json");
        let mut documented: Vec<&str> = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .filter(|(_, item)| {
                item.as_object().is_some_and(|ops| {
                    ops.values().any(|op| {
                        op["parameters"].as_array().is_some_and(|ps| {
                            ps.iter().any(|p| p["name"] == "wait" && p["in"] == "query")
                        })
                    })
                })
            })
            .map(|(path, _)| path.as_str())
            .collect();
        documented.sort_unstable();
        let mut declared = WAITING_ROUTES.to_vec();
        declared.sort_unstable();
        assert_eq!(documented, declared);
    }

    #[test]
    fn throttle_notices_go_out_once_per_worker_per_second() {
        let s = RefreshSettings::default();
        let t0 = Instant::now();
        assert!(s.notice_due("w1", t0));
        assert!(!s.notice_due("w1", t0 + Duration::from_millis(500)));
        assert!(s.notice_due("w2", t0 + Duration::from_millis(500)));
        assert!(s.notice_due("w1", t0 + NOTICE_EVERY));
    }
}
