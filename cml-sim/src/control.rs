//! The HTTP control API of the simulator, for scripts: labs and the groups they are shared
//! with, faults, token expiry, churn.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{delete, get, patch, post, put},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};

use shared::record::LabState;

use crate::{
    fleet::Fleet,
    model::{Faults, SimGroup, SimShare, SimWorker, LAB_PERMISSIONS},
};

#[derive(Debug, Clone)]
struct Ctx {
    fleet: Arc<Fleet>,
    endpoints: Arc<BTreeMap<String, String>>,
}

pub fn router(fleet: Arc<Fleet>, endpoints: BTreeMap<String, String>) -> Router {
    Router::new()
        .route("/workers", get(workers))
        .route("/workers/{id}/labs", get(labs).post(create_lab))
        .route(
            "/workers/{id}/labs/{lab_id}",
            patch(update_lab).delete(delete_lab),
        )
        .route("/workers/{id}/labs/{lab_id}/groups", put(share_lab))
        .route(
            "/workers/{id}/labs/{lab_id}/users",
            put(share_lab_with_users),
        )
        .route("/workers/{id}/users", get(users).post(create_user))
        .route("/workers/{id}/users/{username}", delete(delete_user))
        .route(
            "/workers/{id}/users/{username}/groups",
            put(set_user_groups),
        )
        .route("/workers/{id}/users/{username}/labs", get(labs_of_user))
        .route(
            "/workers/{id}/faults",
            get(faults).put(set_faults).delete(clear_faults),
        )
        .route("/workers/{id}/expire-tokens", post(expire_tokens))
        .route("/workers/{id}/drop-streams", post(drop_streams))
        .route("/workers/{id}/calls", get(calls).delete(reset_calls))
        .route("/churn", post(churn))
        .route("/connections", get(connections))
        .with_state(Ctx {
            fleet,
            endpoints: Arc::new(endpoints),
        })
}

fn problem(status: StatusCode, detail: impl Into<String>) -> Response {
    (status, Json(json!({ "error": detail.into() }))).into_response()
}

fn worker(ctx: &Ctx, id: &str) -> Result<Arc<SimWorker>, Response> {
    ctx.fleet
        .worker(id)
        .ok_or_else(|| problem(StatusCode::NOT_FOUND, format!("no worker {id}")))
}

/// Runs `f` on the worker named in the path, or answers 404.
fn with_worker(ctx: &Ctx, id: &str, f: impl FnOnce(&SimWorker) -> Response) -> Response {
    match worker(ctx, id) {
        Ok(w) => f(&w),
        Err(r) => r,
    }
}

async fn workers(State(ctx): State<Ctx>) -> Json<Value> {
    Json(json!(ctx
        .fleet
        .workers
        .iter()
        .map(|w| json!({
            "id": w.id, "name": w.name, "aws_region": w.aws_region,
            "version": w.personality.version(), "endpoint": ctx.endpoints.get(&w.id),
            "lab_count": w.lab_ids().len(), "event_stream": w.has_event_stream(),
            "open_streams": w.open_streams(), "listening_streams": w.listening_streams(),
        }))
        .collect::<Vec<_>>()))
}

/// Client connections open now and accepted since start, over the whole fleet.
async fn connections(State(ctx): State<Ctx>) -> Json<Value> {
    Json(json!({
        "open": ctx.fleet.open_connections(),
        "accepted": ctx.fleet.accepted_connections(),
    }))
}

async fn labs(State(ctx): State<Ctx>, Path(id): Path<String>) -> Response {
    with_worker(&ctx, &id, |w| Json(json!(w.labs())).into_response())
}

/// Fields a script may set on a lab; absent ones keep their value (or a generated one).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabPatch {
    title: Option<String>,
    description: Option<String>,
    notes: Option<String>,
    state: Option<String>,
    node_count: Option<u32>,
    link_count: Option<u32>,
    /// The username of the new owner (a user of the server).
    owner: Option<String>,
}

impl LabPatch {
    /// Checks the patch, and resolves its owner to a user of the server.
    fn validate(&self, w: &SimWorker) -> Result<Option<crate::model::SimUser>, Response> {
        if let Some(Err(e)) = self.state.as_deref().map(str::parse::<LabState>) {
            return Err(problem(StatusCode::BAD_REQUEST, e));
        }
        match &self.owner {
            None => Ok(None),
            Some(name) => w
                .directory(|d| d.by_name(name).map(|u| u.as_owner()))
                .map(Some)
                .ok_or_else(|| problem(StatusCode::BAD_REQUEST, format!("no user {name}"))),
        }
    }

    fn apply(self, lab: &mut crate::model::SimLab, owner: Option<crate::model::SimUser>) {
        if let Some(o) = owner {
            lab.owner = o;
        }
        if let Some(v) = self.title {
            lab.title = v
        }
        if let Some(v) = self.description {
            lab.description = v
        }
        if let Some(v) = self.notes {
            lab.notes = v
        }
        if let Some(v) = self.state {
            lab.state = v
        }
        if let Some(v) = self.node_count {
            lab.node_count = v
        }
        if let Some(v) = self.link_count {
            lab.link_count = v
        }
    }
}

async fn create_lab(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
    body: Option<Json<LabPatch>>,
) -> Response {
    let w = match worker(&ctx, &id) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let patch = body.map(|Json(p)| p).unwrap_or_default();
    let owner = match patch.validate(&w) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let lab_id = w.create_lab(None);
    w.update_lab(&lab_id, |l| patch.apply(l, owner));
    (StatusCode::CREATED, Json(json!(w.lab(&lab_id)))).into_response()
}

async fn update_lab(
    State(ctx): State<Ctx>,
    Path((id, lab_id)): Path<(String, String)>,
    Json(patch): Json<LabPatch>,
) -> Response {
    let w = match worker(&ctx, &id) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let owner = match patch.validate(&w) {
        Ok(o) => o,
        Err(r) => return r,
    };
    if w.update_lab(&lab_id, |l| patch.apply(l, owner)) {
        Json(json!(w.lab(&lab_id))).into_response()
    } else {
        problem(StatusCode::NOT_FOUND, format!("no lab {lab_id}"))
    }
}

/// One group a lab is shared with, by name (made on the server if it has none of that name).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Share {
    name: String,
    /// CML's lab permissions; `["lab_view"]` when absent.
    #[serde(default)]
    permissions: Option<Vec<String>>,
}

/// `PUT /workers/{id}/labs/{lab_id}/groups`: the lab's group associations become these (its
/// `modified` time stays, as on CML), answering the lab.
async fn share_lab(
    State(ctx): State<Ctx>,
    Path((id, lab_id)): Path<(String, String)>,
    Json(shares): Json<Vec<Share>>,
) -> Response {
    let w = match worker(&ctx, &id) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let mut groups = Vec::with_capacity(shares.len());
    for s in shares {
        if s.name.trim().is_empty() {
            return problem(StatusCode::BAD_REQUEST, "a group name is empty");
        }
        let permissions = s.permissions.unwrap_or_else(|| vec!["lab_view".into()]);
        if let Some(bad) = permissions
            .iter()
            .find(|p| !LAB_PERMISSIONS.contains(&p.as_str()))
        {
            return problem(
                StatusCode::BAD_REQUEST,
                format!(
                    "`{bad}` is not a lab permission ({})",
                    LAB_PERMISSIONS.join(", ")
                ),
            );
        }
        groups.push(SimGroup {
            id: w.group_named(&s.name),
            name: s.name,
            permissions,
        });
    }
    if w.set_lab_groups(&lab_id, groups) {
        Json(json!(w.lab(&lab_id))).into_response()
    } else {
        problem(StatusCode::NOT_FOUND, format!("no lab {lab_id}"))
    }
}

/// One user a lab is shared with, by username.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserShare {
    username: String,
    /// CML's lab permissions; `["lab_view"]` when absent.
    #[serde(default)]
    permissions: Option<Vec<String>>,
}

/// `PUT /workers/{id}/labs/{lab_id}/users`: the lab's user associations (2.9+) become these.
async fn share_lab_with_users(
    State(ctx): State<Ctx>,
    Path((id, lab_id)): Path<(String, String)>,
    Json(shares): Json<Vec<UserShare>>,
) -> Response {
    let w = match worker(&ctx, &id) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let mut resolved = Vec::with_capacity(shares.len());
    for s in shares {
        let Some(user_id) = w.directory(|d| d.by_name(&s.username).map(|u| u.id.clone())) else {
            return problem(StatusCode::BAD_REQUEST, format!("no user {}", s.username));
        };
        resolved.push(SimShare {
            id: user_id,
            permissions: s.permissions.unwrap_or_else(|| vec!["lab_view".into()]),
        });
    }
    if w.update_lab_quietly(&lab_id, |l| l.user_shares = resolved) {
        w.announce_access("user", "modified", &lab_id);
        Json(json!(w.lab(&lab_id))).into_response()
    } else {
        problem(StatusCode::NOT_FOUND, format!("no lab {lab_id}"))
    }
}

/// A user made through the control API: groups by name (made if the server has none of that
/// name); the password defaults to the seeded users' pattern.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    username: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    groups: Vec<String>,
}

async fn users(State(ctx): State<Ctx>, Path(id): Path<String>) -> Response {
    with_worker(&ctx, &id, |w| {
        Json(json!(w.directory(|d| d
            .users
            .values()
            .cloned()
            .collect::<Vec<_>>())))
        .into_response()
    })
}

async fn create_user(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
    Json(u): Json<NewUser>,
) -> Response {
    let w = match worker(&ctx, &id) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let groups = u.groups.iter().map(|g| w.group_named(g)).collect();
    let password = u
        .password
        .unwrap_or_else(|| crate::directory::seeded_password(&u.username));
    match w.directory(|d| d.add_user(&u.username, &password, "", u.admin, groups)) {
        Some(user) => {
            w.announce_access("user", "created", &user.id);
            (StatusCode::CREATED, Json(json!(user))).into_response()
        }
        None => problem(StatusCode::CONFLICT, format!("user {} exists", u.username)),
    }
}

async fn delete_user(
    State(ctx): State<Ctx>,
    Path((id, username)): Path<(String, String)>,
) -> Response {
    with_worker(&ctx, &id, |w| {
        let gone = w.directory(|d| {
            let id = d.by_name(&username).map(|u| u.id.clone());
            id.and_then(|id| d.users.remove(&id))
        });
        match gone {
            Some(u) => {
                w.announce_access("user", "deleted", &u.id);
                StatusCode::NO_CONTENT.into_response()
            }
            None => problem(StatusCode::NOT_FOUND, format!("no user {username}")),
        }
    })
}

/// `PUT /workers/{id}/users/{username}/groups`: the user's groups become these (by name).
async fn set_user_groups(
    State(ctx): State<Ctx>,
    Path((id, username)): Path<(String, String)>,
    Json(names): Json<Vec<String>>,
) -> Response {
    let w = match worker(&ctx, &id) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let groups: std::collections::BTreeSet<String> =
        names.iter().map(|g| w.group_named(g)).collect();
    let done = w.directory(|d| {
        let id = d.by_name(&username).map(|u| u.id.clone())?;
        let u = d.users.get_mut(&id)?;
        u.groups = groups;
        Some(u.clone())
    });
    match done {
        Some(u) => {
            w.announce_access("group", "modified", &u.id);
            Json(json!(u)).into_response()
        }
        None => problem(StatusCode::NOT_FOUND, format!("no user {username}")),
    }
}

/// `GET /workers/{id}/users/{username}/labs`: the ids of the labs CML lists for that user
/// (every lab for an admin), sorted.
async fn labs_of_user(
    State(ctx): State<Ctx>,
    Path((id, username)): Path<(String, String)>,
) -> Response {
    with_worker(&ctx, &id, |w| {
        let Some(user_id) = w.directory(|d| d.by_name(&username).map(|u| u.id.clone())) else {
            return problem(StatusCode::NOT_FOUND, format!("no user {username}"));
        };
        let ids: Vec<String> = w
            .labs_visible_to(&user_id)
            .into_iter()
            .map(|l| l.id)
            .collect();
        Json(json!(ids)).into_response()
    })
}

async fn delete_lab(
    State(ctx): State<Ctx>,
    Path((id, lab_id)): Path<(String, String)>,
) -> Response {
    with_worker(&ctx, &id, |w| {
        if w.delete_lab(&lab_id) {
            StatusCode::NO_CONTENT.into_response()
        } else {
            problem(StatusCode::NOT_FOUND, format!("no lab {lab_id}"))
        }
    })
}

async fn faults(State(ctx): State<Ctx>, Path(id): Path<String>) -> Response {
    with_worker(&ctx, &id, |w| Json(json!(w.faults())).into_response())
}

async fn set_faults(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
    Json(faults): Json<Faults>,
) -> Response {
    if !(0.0..=1.0).contains(&faults.error_rate) {
        return problem(
            StatusCode::BAD_REQUEST,
            "error_rate must be between 0 and 1",
        );
    }
    with_worker(&ctx, &id, |w| {
        w.set_faults(faults);
        Json(json!(w.faults())).into_response()
    })
}

async fn clear_faults(State(ctx): State<Ctx>, Path(id): Path<String>) -> Response {
    with_worker(&ctx, &id, |w| {
        w.set_faults(Faults::default());
        StatusCode::NO_CONTENT.into_response()
    })
}

async fn expire_tokens(State(ctx): State<Ctx>, Path(id): Path<String>) -> Response {
    with_worker(&ctx, &id, |w| {
        w.expire_tokens();
        StatusCode::NO_CONTENT.into_response()
    })
}

/// Every open `/ws/ui` stream of the worker is dropped (no close frame), as a restarting
/// server or a broken network would.
async fn drop_streams(State(ctx): State<Ctx>, Path(id): Path<String>) -> Response {
    with_worker(&ctx, &id, |w| {
        w.drop_streams();
        StatusCode::NO_CONTENT.into_response()
    })
}

async fn calls(State(ctx): State<Ctx>, Path(id): Path<String>) -> Response {
    with_worker(&ctx, &id, |w| Json(json!(w.calls())).into_response())
}

async fn reset_calls(State(ctx): State<Ctx>, Path(id): Path<String>) -> Response {
    with_worker(&ctx, &id, |w| {
        w.reset_calls();
        StatusCode::NO_CONTENT.into_response()
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Churn {
    share: f64,
    /// Give each changed lab a new description this long (large events); 0: keep it.
    #[serde(default)]
    description_chars: usize,
}

async fn churn(State(ctx): State<Ctx>, Json(c): Json<Churn>) -> Response {
    if !(0.0..=1.0).contains(&c.share) {
        return problem(StatusCode::BAD_REQUEST, "share must be between 0 and 1");
    }
    if c.description_chars > 1 << 20 {
        return problem(
            StatusCode::BAD_REQUEST,
            "description_chars is at most 1048576",
        );
    }
    Json(json!({ "changed": ctx.fleet.churn(c.share, c.description_chars) })).into_response()
}
