//! The CML REST API of one simulated server (`/api/v0/...`), with the worker's faults applied.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{FromRequestParts, Path, Query},
    http::{header, request::Parts, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    fleet::Fleet,
    model::{EndpointFault, Personality, SimGroup, SimLab, SimShare, SimWorker, LAB_PERMISSIONS},
    server::ConnControl,
    token::{self, Claims},
};

/// The CML API routes; the worker is chosen before routing (see `server`).
pub fn router(fleet: Arc<Fleet>) -> Router {
    Router::new()
        .route("/api/v0/authenticate", post(authenticate))
        .route("/api/v0/auth_extended", post(auth_extended))
        .route("/api/v0/authok", get(authok))
        .route("/api/v0/authentication", get(authentication))
        .route("/api/v0/system_information", get(system_information))
        .route("/api/v0/labs", get(labs))
        .route("/api/v0/labs/{lab_id}", get(lab))
        .route("/api/v0/labs/{lab_id}/state", get(lab_state))
        .route("/api/v0/labs/{lab_id}/topology", get(lab_topology))
        .route(
            "/api/v0/labs/{lab_id}/associations",
            get(lab_associations).patch(patch_lab_associations),
        )
        .route("/api/v0/groups", get(groups).post(create_group))
        .route("/ws/ui", get(crate::ws::ws_ui))
        .route("/api/v0/populate_lab_tiles", get(populate_lab_tiles))
        .route("/api/v0/users", get(users).post(create_user))
        .route("/api/v0/users/{username}/id", get(user_id))
        .fallback(not_found)
        .with_state(fleet)
}

/// CML's error body: `{"code": <status>, "description": "..."}`.
pub fn cml_error(status: StatusCode, description: impl Into<String>) -> Response {
    let body = json!({ "code": status.as_u16(), "description": description.into() });
    (status, [(header::SERVER, "nginx")], Json(body)).into_response()
}

fn ok_json(value: Value) -> Response {
    ([(header::SERVER, "nginx")], Json(value)).into_response()
}

/// The simulated server a request is for (chosen before routing), with the fleet and the
/// connection the request came on.
#[derive(Debug)]
pub struct Call {
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) worker: Arc<SimWorker>,
    pub(crate) ctl: ConnControl,
}

impl FromRequestParts<Arc<Fleet>> for Call {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, fleet: &Arc<Fleet>) -> Result<Self, Response> {
        let worker = parts
            .extensions
            .get::<Arc<SimWorker>>()
            .cloned()
            .ok_or_else(|| cml_error(StatusCode::NOT_FOUND, "unknown worker"))?;
        let ctl = parts
            .extensions
            .get::<ConnControl>()
            .cloned()
            .unwrap_or_default();
        Ok(Call {
            fleet: fleet.clone(),
            worker,
            ctl,
        })
    }
}

impl Call {
    /// Faults first, then the token: the caller's claims or CML's 401.
    async fn authorized(&self, endpoint: &str, headers: &HeaderMap) -> Result<Claims, Response> {
        if let Some(r) = before(&self.worker, &self.ctl, endpoint).await {
            return Err(r);
        }
        authorize(&self.fleet, &self.worker, headers)
    }

    /// [`Call::authorized`] for an admin of the server only (CML's 403 for anyone else).
    async fn admin(&self, endpoint: &str, headers: &HeaderMap) -> Result<Claims, Response> {
        let claims = self.authorized(endpoint, headers).await?;
        if self
            .worker
            .directory(|d| d.users.get(&claims.sub).is_some_and(|u| u.admin))
        {
            Ok(claims)
        } else {
            Err(cml_error(
                StatusCode::FORBIDDEN,
                "User does not have the required access: admin",
            ))
        }
    }

    /// [`Call::authorized`], then the lab, or CML's 404 for an unknown one (or one the caller
    /// does not see).
    async fn lab(
        &self,
        endpoint: &str,
        headers: &HeaderMap,
        lab_id: &str,
    ) -> Result<SimLab, Response> {
        let claims = self.authorized(endpoint, headers).await?;
        self.worker
            .lab(lab_id)
            .filter(|l| self.worker.sees(&claims.sub, l))
            .ok_or_else(|| cml_error(StatusCode::NOT_FOUND, format!("Lab not found: {lab_id}")))
    }
}

pub(crate) async fn not_found() -> Response {
    cml_error(
        StatusCode::NOT_FOUND,
        "404 Not Found: The requested URL was not found on the server.",
    )
}

/// What every call goes through first: count, hold, latency, hang, reset, errors.
pub(crate) async fn before(
    worker: &SimWorker,
    ctl: &ConnControl,
    endpoint: &str,
) -> Option<Response> {
    worker.count_call(endpoint);
    worker.while_held(endpoint).await;
    let faults = worker.faults();
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    if faults.reset {
        ctl.reset();
        std::future::pending::<()>().await;
    }
    if faults.hang {
        std::future::pending::<()>().await;
    }
    let injected = |status: u16| {
        let mut text = format!("{status} injected by the simulator");
        text.extend(std::iter::repeat_n('!', faults.error_description_bytes));
        text
    };
    if worker.take_failure() {
        return Some(cml_error(StatusCode::BAD_GATEWAY, injected(502)));
    }
    match faults.endpoint_faults.get(endpoint) {
        Some(EndpointFault::Status(status)) => {
            let code = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Some(cml_error(code, injected(*status)));
        }
        Some(EndpointFault::Malformed) => {
            let body = b"{\"groups\": [<<not json".to_vec();
            return Some(([(header::CONTENT_TYPE, "application/json")], body).into_response());
        }
        None => {}
    }
    if faults.error_rate > 0.0 && worker.roll() < faults.error_rate {
        let status = worker.pick_status(&faults.error_statuses);
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Some(cml_error(code, injected(status)));
    }
    None
}

/// A data answer, broken as the worker's faults say.
fn data(worker: &SimWorker, value: Value) -> Response {
    data_bytes(worker, Bytes::from(value.to_string()))
}

/// A JSON body already serialised, broken as the worker's faults say.
fn data_bytes(worker: &SimWorker, text: Bytes) -> Response {
    let faults = worker.faults();
    if faults.malformed_json {
        let mut broken = text[..text.len() / 2].to_vec();
        broken.extend_from_slice(b"<<not json");
        return ([(header::CONTENT_TYPE, "application/json")], broken).into_response();
    }
    if faults.truncated_body {
        let full = text.len();
        let half = text.slice(..full / 2);
        // The pause lets the headers and the first half reach the client before the cut.
        let stream = StreamExt::chain(
            futures::stream::iter([Ok::<_, std::io::Error>(half)]),
            futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(std::io::Error::other("truncated by the simulator"))
            }),
        );
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, full)
            .body(Body::from_stream(stream))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    (
        [
            (header::SERVER, "nginx"),
            (header::CONTENT_TYPE, "application/json"),
        ],
        text,
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct Credentials {
    username: String,
    password: String,
}

/// The fleet's credentials log in as the server's admin; any other user of the server with its
/// own password (an empty password never logs in).
fn login(fleet: &Fleet, worker: &SimWorker, creds: &Credentials) -> Option<(String, String)> {
    let user_id = if creds.username == fleet.username && creds.password == fleet.password {
        SimWorker::users()[0].id.clone()
    } else {
        worker.directory(|d| {
            d.by_name(&creds.username)
                .filter(|u| !u.password.is_empty() && u.password == creds.password)
                .map(|u| u.id.clone())
        })?
    };
    let now = fleet.now().timestamp();
    let claims = Claims {
        iss: "com.cisco.virl".into(),
        iat: now,
        exp: now + fleet.token_ttl.as_secs() as i64,
        sub: user_id.clone(),
        wid: worker.id.clone(),
        epoch: worker.token_epoch(),
    };
    Some((token::issue(&fleet.secret, &claims), user_id))
}

/// A redirect to `location`, as a misconfigured or hostile server might answer.
pub(crate) fn redirect(status: StatusCode, location: &str) -> Response {
    (status, [(header::LOCATION, location.to_owned())]).into_response()
}

async fn authenticate(
    Call { fleet, worker, ctl }: Call,
    Json(creds): Json<Credentials>,
) -> Response {
    if let Some(r) = before(&worker, &ctl, "authenticate").await {
        return r;
    }
    if let Some(to) = worker.faults().redirect_login_to {
        return redirect(StatusCode::TEMPORARY_REDIRECT, &to);
    }
    match login(&fleet, &worker, &creds) {
        Some((token, _)) => ok_json(Value::String(token)),
        None => cml_error(StatusCode::FORBIDDEN, "Authentication failed!"),
    }
}

async fn auth_extended(
    Call { fleet, worker, ctl }: Call,
    Json(creds): Json<Credentials>,
) -> Response {
    if let Some(r) = before(&worker, &ctl, "auth_extended").await {
        return r;
    }
    match login(&fleet, &worker, &creds) {
        Some((token, id)) => {
            let admin = worker.directory(|d| d.users.get(&id).is_some_and(|u| u.admin));
            ok_json(
                json!({ "username": creds.username, "id": id, "token": token, "admin": admin, "error": null }),
            )
        }
        None => cml_error(StatusCode::FORBIDDEN, "Authentication failed!"),
    }
}

/// The caller's claims, or the 401 CML gives for a missing, bad or expired token.
fn authorize(fleet: &Fleet, worker: &SimWorker, headers: &HeaderMap) -> Result<Claims, Response> {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Err(cml_error(
            StatusCode::UNAUTHORIZED,
            "Not authenticated: 401 Unauthorized: No authorization token provided.",
        ));
    };
    let token = value.strip_prefix("Bearer ").unwrap_or("");
    verify_token(fleet, worker, token).map_err(|why| cml_error(StatusCode::UNAUTHORIZED, why))
}

/// The claims of a token this server issued and still honours, or CML's reason why not.
pub(crate) fn verify_token(
    fleet: &Fleet,
    worker: &SimWorker,
    token: &str,
) -> Result<Claims, &'static str> {
    let claims = token::verify(&fleet.secret, token)
        .filter(|c| c.wid == worker.id)
        .ok_or("Not authenticated: 401 Unauthorized: Invalid token.")?;
    check_claims(fleet, worker, &claims)?;
    Ok(claims)
}

/// Whether a token's claims are still honoured (not expired, not revoked).
pub(crate) fn check_claims(
    fleet: &Fleet,
    worker: &SimWorker,
    claims: &Claims,
) -> Result<(), &'static str> {
    if claims.exp <= fleet.now().timestamp() || claims.epoch != worker.token_epoch() {
        return Err("Not authenticated: 401 Unauthorized: Token has expired.");
    }
    Ok(())
}

async fn authok(call: Call, headers: HeaderMap) -> Response {
    if let Err(r) = call.authorized("authok", &headers).await {
        return r;
    }
    ok_json(json!("OK"))
}

async fn authentication(call: Call, headers: HeaderMap) -> Response {
    if call.worker.personality != Personality::V2_10 {
        return not_found().await;
    }
    let claims = match call.authorized("authentication", &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match call.worker.directory(|d| d.users.get(&claims.sub).cloned()) {
        Some(u) => ok_json(json!({ "id": u.id, "admin": u.admin, "username": u.username })),
        None => cml_error(
            StatusCode::UNAUTHORIZED,
            "Not authenticated: 401 Unauthorized: Invalid token.",
        ),
    }
}

async fn system_information(Call { worker, ctl, .. }: Call) -> Response {
    if let Some(r) = before(&worker, &ctl, "system_information").await {
        return r;
    }
    let mut info = json!({
        "version": worker.personality.version(),
        "ready": true,
        "allow_ssh_pubkey_auth": false,
        "oui": "52:54:00:00:00:00",
    });
    if worker.personality == Personality::V2_10 {
        info["timeout"] = json!(14400);
        info["features"] = json!(["resource_pools", "node_staging"]);
    }
    ok_json(info)
}

#[derive(Debug, Deserialize)]
struct LabsQuery {
    show_all: Option<String>,
}

async fn labs(call: Call, headers: HeaderMap, Query(q): Query<LabsQuery>) -> Response {
    let claims = match call.authorized("labs", &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let worker = &call.worker;
    if worker.faults().labs_list_404 {
        return not_found().await;
    }
    let show_all = q
        .show_all
        .as_deref()
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    // An admin sees every lab with `show_all`, its own and shared ones without; anyone else
    // its own and shared ones either way.
    let admin = worker.directory(|d| d.users.get(&claims.sub).is_some_and(|u| u.admin));
    let ids: Vec<String> = if admin && show_all {
        worker.lab_ids()
    } else {
        worker
            .labs()
            .into_iter()
            .filter(|l| l.owner.id == claims.sub || worker.shared_with(&claims.sub, l))
            .map(|l| l.id)
            .collect()
    };
    data(worker, json!(ids))
}

async fn lab(call: Call, headers: HeaderMap, Path(lab_id): Path<String>) -> Response {
    let worker = &call.worker;
    match call.lab("lab", &headers, &lab_id).await {
        Ok(l) => data(worker, worker.lab_object(&l, false)),
        Err(r) => r,
    }
}

async fn lab_state(call: Call, headers: HeaderMap, Path(lab_id): Path<String>) -> Response {
    let worker = &call.worker;
    match call.lab("lab_state", &headers, &lab_id).await {
        Ok(l) => data(worker, json!(l.state)),
        Err(r) => r,
    }
}

/// `labs/{id}/topology`: what Cisco's client reads when it joins a lab: the lab's properties
/// and its nodes (as the event stream names them, so a joined lab follows their events).
async fn lab_topology(call: Call, headers: HeaderMap, Path(lab_id): Path<String>) -> Response {
    let worker = &call.worker;
    match call.lab("lab_topology", &headers, &lab_id).await {
        Ok(l) => data(
            worker,
            json!({
                "lab": { "title": l.title, "description": l.description, "notes": l.notes, "owner": l.owner.id, "version": "0.3.0" },
                "nodes": crate::events::nodes(&l), "links": [], "interfaces": [],
                "annotations": [], "smart_annotations": [],
            }),
        ),
        Err(r) => r,
    }
}

async fn populate_lab_tiles(call: Call, headers: HeaderMap) -> Response {
    let claims = match call.authorized("populate_lab_tiles", &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let worker = &call.worker;
    if !worker.directory(|d| d.users.get(&claims.sub).is_some_and(|u| u.admin)) {
        // A user's tiles: the labs it sees.
        let tiles: serde_json::Map<String, Value> = worker
            .labs_visible_to(&claims.sub)
            .iter()
            .map(|l| (l.id.clone(), worker.lab_object(l, true)))
            .collect();
        return data(worker, json!({ "lab_tiles": tiles }));
    }
    let faults = worker.faults();
    if faults.bulk_missing {
        return not_found().await;
    }
    if let Some(to) = faults.redirect_tiles_to {
        return redirect(StatusCode::FOUND, &to);
    }
    if faults.empty_tiles {
        return data(worker, json!({ "lab_tiles": {} }));
    }
    if faults.tiles_padding_bytes > 0 {
        return padded_tiles(worker.tiles_body(), faults.tiles_padding_bytes);
    }
    data_bytes(worker, worker.tiles_body())
}

/// The tiles body with one more lab whose title is `padding` bytes long, streamed in chunks:
/// a server answering hundreds of megabytes, without this process holding them.
fn padded_tiles(body: Bytes, padding: u64) -> Response {
    const CHUNK: usize = 64 * 1024;
    // `{"lab_tiles":{` + the real labs + `,"padding-lab":{"lab_title":"xxx…"}` + `}}`
    let head = body.slice(..body.len() - 2);
    let open = Bytes::from_static(br#","padding-lab":{"lab_title":""#);
    let close = Bytes::from_static(br#""}}}"#);
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let full_chunks = padding / CHUNK as u64;
    let rest = (padding % CHUNK as u64) as usize;
    let middle = futures::stream::iter((0..full_chunks).map(move |_| chunk.clone())).chain(
        futures::stream::iter((rest > 0).then(|| Bytes::from(vec![b'x'; rest]))),
    );
    let stream = futures::stream::iter([head, open])
        .chain(middle)
        .chain(futures::stream::iter([close]))
        .map(Ok::<_, std::io::Error>);
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `GET groups`: every group of the server with the labs associated with it.
/// A non-admin sees only the groups it is a member of.
async fn groups(call: Call, headers: HeaderMap) -> Response {
    let claims = match call.authorized("groups", &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let own = call.worker.directory(|d| match d.users.get(&claims.sub) {
        Some(u) if u.admin => None,
        Some(u) => Some(u.groups.clone()),
        None => Some(BTreeSet::new()),
    });
    data(&call.worker, call.worker.groups_json(own.as_ref()))
}

/// The body of `POST groups`.
#[derive(Debug, Deserialize)]
struct NewGroup {
    name: String,
    #[serde(default)]
    description: String,
    /// User ids.
    #[serde(default)]
    members: Vec<String>,
    /// 2.9+: `[{id: lab id, permissions}]`.
    #[serde(default)]
    associations: Vec<Association>,
    /// Up to 2.8: `[{id: lab id, permission: read_only | read_write}]`.
    #[serde(default)]
    labs: Vec<LegacyShare>,
}

#[derive(Debug, Deserialize)]
struct LegacyShare {
    id: String,
    permission: String,
}

/// `POST groups` (admins only): a new group with its members and the labs shared with it.
async fn create_group(call: Call, headers: HeaderMap, Json(body): Json<NewGroup>) -> Response {
    if let Err(r) = call.admin("groups", &headers).await {
        return r;
    }
    let worker = &call.worker;
    if body.name.trim().is_empty() || worker.directory(|d| d.group_by_name(&body.name).is_some()) {
        return cml_error(
            StatusCode::BAD_REQUEST,
            format!("Group name is taken or empty: {}", body.name),
        );
    }
    let mut shares = Vec::new();
    for a in body.associations {
        if let Err(r) = valid_permissions(&a.permissions) {
            return r;
        }
        shares.push((a.id, a.permissions));
    }
    for l in body.labs {
        let permissions = match l.permission.as_str() {
            "read_only" => vec!["lab_view".to_owned()],
            "read_write" => vec!["lab_view".to_owned(), "lab_edit".to_owned()],
            other => {
                return cml_error(
                    StatusCode::BAD_REQUEST,
                    format!("Invalid permission: {other}"),
                )
            }
        };
        shares.push((l.id, permissions));
    }
    let id = worker.group_named(&body.name);
    worker.directory(|d| {
        if let Some(g) = d.groups.get_mut(&id) {
            g.description = body.description;
        }
        for m in &body.members {
            if let Some(u) = d.users.get_mut(m) {
                u.groups.insert(id.clone());
            }
        }
    });
    let name = body.name;
    for (lab_id, permissions) in shares {
        worker.update_lab_quietly(&lab_id, |lab| {
            lab.groups.retain(|g| g.id != id);
            lab.groups.push(SimGroup {
                id: id.clone(),
                name: name.clone(),
                permissions,
            });
        });
    }
    worker.announce_access("group", "created", &id);
    let only = BTreeSet::from([id]);
    match worker.groups_json(Some(&only)) {
        Value::Array(mut groups) if !groups.is_empty() => ok_json(groups.remove(0)),
        _ => cml_error(StatusCode::INTERNAL_SERVER_ERROR, "the group vanished"),
    }
}

/// Every permission must be one CML knows.
fn valid_permissions(permissions: &[String]) -> Result<(), Response> {
    match permissions
        .iter()
        .find(|p| !LAB_PERMISSIONS.contains(&p.as_str()))
    {
        Some(bad) => Err(cml_error(
            StatusCode::BAD_REQUEST,
            format!("Invalid permission: {bad}"),
        )),
        None => Ok(()),
    }
}

/// A lab's associations (2.9+): its groups and its owner, each with permissions.
fn associations_json(lab: &SimLab) -> Value {
    json!({
        "groups": lab.groups.iter().map(|g| json!({ "id": g.id, "permissions": g.permissions })).collect::<Vec<_>>(),
        "users": std::iter::once(json!({ "id": lab.owner.id, "permissions": LAB_PERMISSIONS }))
            .chain(lab.user_shares.iter().filter(|s| s.id != lab.owner.id).map(|s| json!({ "id": s.id, "permissions": s.permissions })))
            .collect::<Vec<_>>(),
    })
}

/// `labs/{id}/associations` came with 2.9.
fn has_associations(worker: &SimWorker) -> bool {
    worker.personality != Personality::V2_4
}

async fn lab_associations(call: Call, headers: HeaderMap, Path(lab_id): Path<String>) -> Response {
    if !has_associations(&call.worker) {
        return not_found().await;
    }
    match call.lab("lab_associations", &headers, &lab_id).await {
        Ok(l) => data(&call.worker, associations_json(&l)),
        Err(r) => r,
    }
}

/// The body of `PATCH labs/{id}/associations`: what is given replaces what the lab had (the
/// owner's own association is its ownership, kept whatever the body says).
#[derive(Debug, Deserialize)]
struct AssociationsBody {
    #[serde(default)]
    groups: Option<Vec<Association>>,
    #[serde(default)]
    users: Option<Vec<Association>>,
}

#[derive(Debug, Deserialize)]
struct Association {
    id: String,
    permissions: Vec<String>,
}

/// `PATCH labs/{id}/associations`: replaces the lab's group associations (the groups must
/// exist, the permissions be CML's), answering the lab's associations as they are now.
async fn patch_lab_associations(
    call: Call,
    headers: HeaderMap,
    Path(lab_id): Path<String>,
    Json(body): Json<AssociationsBody>,
) -> Response {
    if !has_associations(&call.worker) {
        return not_found().await;
    }
    let worker = &call.worker;
    if let Err(r) = call.lab("lab_associations", &headers, &lab_id).await {
        return r;
    }
    if let Some(groups) = body.groups {
        let mut resolved = Vec::with_capacity(groups.len());
        for a in groups {
            let Some(name) = worker.group_name(&a.id) else {
                return cml_error(StatusCode::NOT_FOUND, format!("Group not found: {}", a.id));
            };
            if let Err(r) = valid_permissions(&a.permissions) {
                return r;
            }
            resolved.push(SimGroup {
                id: a.id,
                name,
                permissions: a.permissions,
            });
        }
        worker.set_lab_groups(&lab_id, resolved);
    }
    if let Some(users) = body.users {
        let mut shares = Vec::with_capacity(users.len());
        for a in users {
            if !worker.directory(|d| d.users.contains_key(&a.id)) {
                return cml_error(StatusCode::NOT_FOUND, format!("User not found: {}", a.id));
            }
            if let Err(r) = valid_permissions(&a.permissions) {
                return r;
            }
            shares.push(SimShare {
                id: a.id,
                permissions: a.permissions,
            });
        }
        worker.update_lab_quietly(&lab_id, |lab| {
            let owner = lab.owner.id.clone();
            lab.user_shares = shares.into_iter().filter(|s| s.id != owner).collect();
        });
        worker.announce_access("user", "modified", &lab_id);
    }
    match worker.lab(&lab_id) {
        Some(l) => ok_json(associations_json(&l)),
        None => cml_error(StatusCode::NOT_FOUND, format!("Lab not found: {lab_id}")),
    }
}

/// `GET users`: every user, with its groups, its labs and (2.9+) its associations (any user
/// may list them: Cisco's client resolves a lab's owner through it whoever is logged in).
async fn users(call: Call, headers: HeaderMap) -> Response {
    if let Err(r) = call.authorized("users", &headers).await {
        return r;
    }
    data(&call.worker, call.worker.users_json())
}

/// The body of `POST users`.
#[derive(Debug, Deserialize)]
struct NewUser {
    username: String,
    password: String,
    #[serde(default)]
    fullname: String,
    #[serde(default)]
    admin: bool,
    /// Group ids.
    #[serde(default)]
    groups: Vec<String>,
    /// 2.9+: labs shared with the user.
    #[serde(default)]
    associations: Vec<Association>,
}

/// `POST users` (admins only): a new user, in its groups, with the labs shared with it.
async fn create_user(call: Call, headers: HeaderMap, Json(body): Json<NewUser>) -> Response {
    if let Err(r) = call.admin("users", &headers).await {
        return r;
    }
    let worker = &call.worker;
    if body.username.is_empty() || body.username.len() > 32 || body.password.is_empty() {
        return cml_error(
            StatusCode::BAD_REQUEST,
            "username (1-32 characters) and password are required",
        );
    }
    for a in &body.associations {
        if let Err(r) = valid_permissions(&a.permissions) {
            return r;
        }
    }
    let created = worker.directory(|d| {
        let groups = body
            .groups
            .iter()
            .filter(|g| d.groups.contains_key(*g))
            .cloned()
            .collect();
        d.add_user(
            &body.username,
            &body.password,
            &body.fullname,
            body.admin,
            groups,
        )
    });
    let Some(user) = created else {
        return cml_error(
            StatusCode::BAD_REQUEST,
            format!("User already exists: {}", body.username),
        );
    };
    for a in body.associations {
        let share = SimShare {
            id: user.id.clone(),
            permissions: a.permissions,
        };
        worker.update_lab_quietly(&a.id, |lab| lab.user_shares.push(share));
    }
    match worker.user_json(&user.id) {
        Some(u) => ok_json(u),
        None => cml_error(StatusCode::INTERNAL_SERVER_ERROR, "the user vanished"),
    }
}

/// `GET users/{username}/id`.
async fn user_id(call: Call, headers: HeaderMap, Path(username): Path<String>) -> Response {
    if let Err(r) = call.authorized("users", &headers).await {
        return r;
    }
    match call
        .worker
        .directory(|d| d.by_name(&username).map(|u| u.id.clone()))
    {
        Some(id) => ok_json(json!(id)),
        None => cml_error(StatusCode::NOT_FOUND, format!("User not found: {username}")),
    }
}
