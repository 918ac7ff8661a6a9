//! Talking to CML servers over HTTP: sessions, tokens, the bulk call and its fallback, errors.
//! Mapping of payloads lives in [`crate::payload`].

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use futures::{stream, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use url::Url;

use shared::{
    change::Listing,
    config::CmlConfig,
    record::{plausible_lab_id, ObservedLab},
    secret::Secret,
};

use crate::{
    events::{self, EventLimits, EventStream},
    payload::{self, clip, GroupsShape, LabError, LabIds, MappedLabs, PayloadError},
    Error, Result,
};

/// A CML server to talk to: the worker id (for tokens, logs, errors) and its endpoint, e.g.
/// `https://10.0.0.5` or `https://proxy.example/cml-7` (a path prefix is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmlTarget {
    pub worker_id: String,
    pub endpoint: String,
}

/// `GET system_information`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    pub version: String,
    pub ready: bool,
}

/// How a listing was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchSource {
    /// One `populate_lab_tiles` call.
    Bulk,
    /// `labs?show_all=true`, then `labs/{id}` for each lab.
    Fallback,
}

/// Where the groups of a listing's labs came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupsRead {
    /// The lab objects (a sync of a few labs on CML up to 2.8, whose lab objects hold them).
    InLabs,
    /// The server's groups, `GET groups` (every full sync, whatever the release).
    Associations,
    /// Not read: a sync of a few labs, whose lab objects do not carry their groups (CML 2.9+),
    /// keeps the groups their records have.
    Kept,
    /// The lab objects hold none and `GET groups` failed: the labs' groups are unknown (they
    /// are empty in the listing).
    Unread {
        /// The error's fixed label (`cml_http_status`, `cml_malformed`, …).
        kind: &'static str,
        error: String,
    },
}

/// Who may see which lab of a server, as read with its labs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessRead {
    /// Its users and groups.
    Read(shared::access::Directory),
    /// Not read (a sync of a few labs reads none).
    NotAsked,
    /// `GET users` or `GET groups` failed, or was refused: the last known access data stay.
    Unread {
        /// The error's fixed label.
        kind: &'static str,
        error: String,
    },
}

/// Every lab of one worker, and whether that is the whole truth.
#[derive(Debug, Clone, PartialEq)]
pub struct LabListing {
    /// Who may see its labs.
    pub access: AccessRead,
    pub labs: Vec<ObservedLab>,
    pub listing: Listing,
    /// Where the labs' groups came from, or why they are unknown.
    pub groups: GroupsRead,
    pub source: FetchSource,
    /// HTTP requests sent for this listing, authentication included.
    pub calls: u32,
    /// Why the fallback was used or why the listing is partial, for the log line.
    pub note: Option<String>,
    /// Labs refused, each as why: an id that is not a plausible CML lab id, or a lab object
    /// naming another id than it was listed as. They are neither read nor written.
    pub refused: Vec<String>,
}

/// One lab and where its server keeps its groups.
type MappedLab = (ObservedLab, GroupsShape);

/// What reading one lab found.
enum LabRead {
    Found(Box<MappedLab>),
    /// 404: deleted (or never there).
    Gone,
    /// Not taken, and why: an implausible id, or an object naming another id.
    Refused(String),
}

/// A body of the wrong shape from `path`.
fn malformed(target: &CmlTarget, path: &str, detail: String) -> Error {
    Error::Malformed {
        worker: target.worker_id.clone(),
        path: path.to_owned(),
        detail: clip(&detail),
    }
}

/// A body that must be JSON of any shape.
fn json_body(target: &CmlTarget, path: &str, bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| malformed(target, path, format!("not JSON ({e})")))
}

/// One piece of work with one worker: its own connections (reused from call to call, closed
/// when the session is dropped) and the number of requests sent.
///
/// Between syncs a worker's connection is of no use (a pass is 30 minutes apart, far past any
/// idle timeout), while a shared pool would keep one idle socket and its buffers per worker
/// until it expires: about 70 MiB and 1,000 file descriptors for a fleet of 1,000.
struct Session {
    http: reqwest::Client,
    calls: AtomicU32,
}

/// A bearer token and the worker's lock that serialises re-authentication.
type TokenSlot = Arc<tokio::sync::Mutex<Option<String>>>;

/// Called with the server's target once per HTTP request sent (the daemon counts requests in
/// its metrics; tests inject faults of the caller's own).
pub type RequestHook = Arc<dyn Fn(&CmlTarget) + Send + Sync>;

/// Talks to CML workers. Each piece of work with a worker (a sync, a single call) gets a
/// [`Session`] with connections of its own, closed when it ends.
pub struct CmlClient {
    connect_timeout: Duration,
    ca_certificates: Vec<reqwest::Certificate>,
    /// The same TLS settings for event streams.
    stream_tls: Arc<rustls::ClientConfig>,
    username: String,
    password: Secret,
    verify_tls: bool,
    request_timeout: Duration,
    fallback_concurrency: usize,
    max_response_bytes: usize,
    max_labs: usize,
    tokens: Mutex<HashMap<String, TokenSlot>>,
    warned_insecure: Mutex<HashSet<String>>,
    on_request: Vec<RequestHook>,
}

impl std::fmt::Debug for CmlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmlClient")
            .field("username", &self.username)
            .field("verify_tls", &self.verify_tls)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl CmlClient {
    /// Also calls `hook` for every request sent from now on (after the hooks added before).
    pub fn with_request_hook(mut self, hook: RequestHook) -> Self {
        self.on_request.push(hook);
        self
    }

    pub fn new(cfg: &CmlConfig) -> Result<Self> {
        let mut ca_certificates = Vec::new();
        let mut pem = Vec::new();
        if !cfg.ca_bundle.is_empty() {
            pem = std::fs::read(&cfg.ca_bundle).map_err(|e| {
                Error::HttpClient(format!("cannot read cml.ca_bundle {}: {e}", cfg.ca_bundle))
            })?;
            ca_certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::HttpClient(format!("cml.ca_bundle {} is not PEM: {e}", cfg.ca_bundle))
            })?;
        }
        let client = Self {
            connect_timeout: cfg.connect_timeout.get(),
            ca_certificates,
            stream_tls: events::tls_config(cfg.verify_tls, &pem)?,
            username: cfg.username.clone(),
            password: cfg.password.clone(),
            verify_tls: cfg.verify_tls,
            request_timeout: cfg.request_timeout.get(),
            fallback_concurrency: cfg.fallback_concurrency.max(1),
            max_response_bytes: cfg.max_response_bytes,
            max_labs: cfg.max_labs_per_worker,
            tokens: Mutex::new(HashMap::new()),
            warned_insecure: Mutex::new(HashSet::new()),
            on_request: Vec::new(),
        };
        // Fail at start, not at the first sync, if the TLS settings cannot make a client.
        client.session()?;
        Ok(client)
    }

    /// A new session: an HTTP client whose connections close when the session is dropped.
    /// Building one is cheap (no I/O; the root certificates are shared).
    fn session(&self) -> Result<Session> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout)
            .user_agent(concat!("cml-labs-sync/", env!("CARGO_PKG_VERSION")))
            // A redirect would re-send the login, the fleet-wide password, to another origin,
            // or take another origin's answer as the worker's labs: never follow one.
            .redirect(reqwest::redirect::Policy::none())
            .danger_accept_invalid_certs(!self.verify_tls);
        for cert in &self.ca_certificates {
            builder = builder.add_root_certificate(cert.clone());
        }
        Ok(Session {
            http: builder
                .build()
                .map_err(|e| Error::HttpClient(e.to_string()))?,
            calls: AtomicU32::new(0),
        })
    }

    /// `GET system_information` (no token needed).
    pub async fn system_information(&self, target: &CmlTarget) -> Result<SystemInfo> {
        let session = self.session()?;
        let bytes = self
            .get(target, "system_information", false, &session)
            .await?;
        let body = json_body(target, "system_information", &bytes)?;
        Ok(SystemInfo {
            version: body
                .get("version")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            ready: body.get("ready").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// `GET labs?show_all=true`: the ids of every user's labs (those that are plausible CML
    /// lab ids).
    pub async fn list_lab_ids(&self, target: &CmlTarget) -> Result<Vec<String>> {
        Ok(self.lab_ids(target, &self.session()?).await?.ids)
    }

    /// Opens the worker's event stream (`/ws/ui`, CML 2.6+) with the token its syncs use
    /// (authenticating first when none is cached): a server without one answers 404
    /// ([`Error::Status`]), a redirect is [`Error::Redirect`] and never followed.
    pub async fn open_events(
        &self,
        target: &CmlTarget,
        limits: EventLimits,
    ) -> Result<EventStream> {
        self.warn_once_if_insecure(target);
        let session = self.session()?;
        let slot = self.token_slot(&target.worker_id);
        let token = self.token(target, &slot, None, &session).await?;
        self.count_request(target, &session);
        events::open(
            target,
            &self.stream_tls,
            limits,
            self.connect_timeout,
            self.request_timeout,
            token,
        )
        .await
    }

    /// The server refused `token` (an event stream closed with 3000): the next call
    /// authenticates again, unless another task already replaced it.
    pub async fn forget_token(&self, target: &CmlTarget, token: &str) {
        let slot = self.token_slot(&target.worker_id);
        let mut cached = slot.lock().await;
        if cached.as_deref() == Some(token) {
            *cached = None;
        }
    }

    /// `GET labs/{id}`; `None` when the lab does not exist (any more). Its groups are those
    /// of the lab object, and the shape says whether that object keeps them: on CML 2.9+ only
    /// the group associations do (a sync of this lab alone then keeps what its record has:
    /// [`shared::change::Groups::Unknown`]).
    pub async fn lab_details(
        &self,
        target: &CmlTarget,
        lab_id: &str,
    ) -> Result<Option<(ObservedLab, GroupsShape)>> {
        self.warn_once_if_insecure(target);
        match self.lab(target, lab_id, &self.session()?).await? {
            LabRead::Found(lab) => Ok(Some(*lab)),
            LabRead::Gone => Ok(None),
            LabRead::Refused(why) => Err(malformed(target, "labs", why)),
        }
    }

    /// Every lab of a worker, its users and its groups: one `populate_lab_tiles` call when the
    /// server has it, otherwise (or when it fails) the listing plus one call per lab, a few at
    /// a time; `GET users` and `GET groups` at the same time. The groups read gives every lab
    /// its groups, whatever the release (the lab objects of 2.9+ hold none); users and groups
    /// together say who may see each lab. Either failing leaves them unread, not empty.
    pub async fn fetch_labs(&self, target: &CmlTarget) -> Result<LabListing> {
        self.warn_once_if_insecure(target);
        let session = self.session()?;
        let (listing, users, groups) = tokio::join!(
            self.listing(target, &session),
            self.get(target, "users", true, &session),
            self.get(target, "groups", true, &session),
        );
        let (mut listing, _) = listing?;
        let unread = |e: &Error| (e.metric_label(), e.to_string());
        let group_map = groups.as_ref().map_err(unread).and_then(|body| {
            payload::group_map(body).map_err(|detail| unread(&malformed(target, "groups", detail)))
        });
        listing.groups = match group_map {
            Ok(map) => {
                for lab in &mut listing.labs {
                    lab.set_groups(map.groups_of(&lab.lab_id));
                }
                GroupsRead::Associations
            }
            Err((kind, error)) => GroupsRead::Unread { kind, error },
        };
        listing.access = match (&users, &groups) {
            (Ok(users), Ok(groups)) => match crate::directory::directory(users, groups) {
                Ok(d) => AccessRead::Read(d),
                Err(detail) => {
                    let (kind, error) = unread(&malformed(target, "users", detail));
                    AccessRead::Unread { kind, error }
                }
            },
            (Err(e), _) | (_, Err(e)) => {
                let (kind, error) = unread(e);
                AccessRead::Unread { kind, error }
            }
        };
        listing.calls = session.calls.load(Ordering::Relaxed);
        Ok(listing)
    }

    /// A server's users and groups alone (two calls at the same time): who may see which of
    /// its labs, without reading them. Also how many requests it took.
    pub async fn fetch_access(&self, target: &CmlTarget) -> (AccessRead, u32) {
        self.warn_once_if_insecure(target);
        let session = match self.session() {
            Ok(s) => s,
            Err(e) => {
                let access = AccessRead::Unread {
                    kind: e.metric_label(),
                    error: e.to_string(),
                };
                return (access, 0);
            }
        };
        let (users, groups) = tokio::join!(
            self.get(target, "users", true, &session),
            self.get(target, "groups", true, &session),
        );
        let access = match (users, groups) {
            (Ok(users), Ok(groups)) => match crate::directory::directory(&users, &groups) {
                Ok(d) => AccessRead::Read(d),
                Err(detail) => {
                    let e = malformed(target, "users", detail);
                    AccessRead::Unread {
                        kind: e.metric_label(),
                        error: e.to_string(),
                    }
                }
            },
            (Err(e), _) | (_, Err(e)) => AccessRead::Unread {
                kind: e.metric_label(),
                error: e.to_string(),
            },
        };
        (access, session.calls.load(Ordering::Relaxed))
    }

    /// The labs, as [`CmlClient::fetch_labs`] reads them, and where they keep their groups.
    async fn listing(
        &self,
        target: &CmlTarget,
        session: &Session,
    ) -> Result<(LabListing, GroupsShape)> {
        let note = match self.get(target, "populate_lab_tiles", true, session).await {
            Ok(body) => match payload::labs_from_tiles(&body, self.max_labs) {
                Err(PayloadError::TooManyLabs(limit)) => {
                    return Err(Error::TooManyLabs {
                        worker: target.worker_id.clone(),
                        limit,
                    })
                }
                Ok(MappedLabs {
                    labs,
                    groups,
                    refused,
                }) => {
                    let listing = LabListing {
                        access: AccessRead::NotAsked,
                        labs,
                        listing: Listing::Complete,
                        groups: GroupsRead::InLabs,
                        source: FetchSource::Bulk,
                        calls: 0,
                        note: None,
                        refused,
                    };
                    return Ok((listing, groups));
                }
                Err(PayloadError::Malformed(detail)) => {
                    format!("populate_lab_tiles was malformed ({detail})")
                }
            },
            Err(Error::Status {
                status: 404 | 405, ..
            }) => "populate_lab_tiles is not offered".to_owned(),
            // The server cannot be reached, refuses us, or misbehaves in a way the fallback
            // would meet again (or that must not be pursued: a redirect, a body too large).
            Err(
                e @ (Error::Unreachable { .. }
                | Error::Timeout { .. }
                | Error::AuthFailed { .. }
                | Error::Redirect { .. }
                | Error::TooLarge { .. }),
            ) => return Err(e),
            Err(e) => format!("populate_lab_tiles failed ({e})"),
        };

        self.fallback(target, session, note).await
    }

    /// The listing plus one call per lab, a few at a time. A lab that 404s was deleted in
    /// between (gone, not an error); any other failed call makes the listing partial.
    async fn fallback(
        &self,
        target: &CmlTarget,
        session: &Session,
        note: String,
    ) -> Result<(LabListing, GroupsShape)> {
        let LabIds { ids, mut refused } = self.lab_ids(target, session).await?;
        let results: Vec<(String, Result<LabRead>)> = stream::iter(ids)
            .map(|id| async {
                let r = self.lab(target, &id, session).await;
                (id, r)
            })
            .buffer_unordered(self.fallback_concurrency)
            .collect()
            .await;
        let mut labs = Vec::with_capacity(results.len());
        let mut shape = GroupsShape::Silent;
        let mut failed = Vec::new();
        for (id, r) in results {
            match r {
                Ok(LabRead::Found(found)) => {
                    let (lab, lab_shape) = *found;
                    labs.push(lab);
                    shape = shape.and(lab_shape);
                }
                Ok(LabRead::Gone) => {}
                Ok(LabRead::Refused(why)) => refused.push(why),
                Err(e) => failed.push(format!("{id}: {}", e.metric_label())),
            }
        }
        labs.sort_by(|a, b| a.lab_id.cmp(&b.lab_id));
        let (listing, note) = if failed.is_empty() {
            (Listing::Complete, note)
        } else {
            (
                Listing::Partial,
                format!(
                    "{note}; {} of the lab detail calls failed ({})",
                    failed.len(),
                    failed.join(", ")
                ),
            )
        };
        let listing = LabListing {
            access: AccessRead::NotAsked,
            labs,
            listing,
            groups: GroupsRead::InLabs,
            source: FetchSource::Fallback,
            calls: 0,
            note: Some(note),
            refused,
        };
        Ok((listing, shape))
    }

    async fn lab_ids(&self, target: &CmlTarget, session: &Session) -> Result<LabIds> {
        let body = self
            .get(target, "labs?show_all=true", true, session)
            .await?;
        payload::lab_ids(&body, self.max_labs).map_err(|e| match e {
            PayloadError::TooManyLabs(limit) => Error::TooManyLabs {
                worker: target.worker_id.clone(),
                limit,
            },
            PayloadError::Malformed(detail) => malformed(target, "labs", detail),
        })
    }

    /// `GET labs/{id}`. An id that is not a plausible CML lab id is never asked for (`..`
    /// would read the API's root), and an object naming another id is not taken: both are
    /// [`LabRead::Refused`].
    async fn lab(&self, target: &CmlTarget, lab_id: &str, session: &Session) -> Result<LabRead> {
        if !plausible_lab_id(lab_id) {
            return Ok(LabRead::Refused(format!(
                "{:?} is not a CML lab id",
                clip(lab_id)
            )));
        }
        let path = format!("labs/{}", path_segment(lab_id));
        match self.get(target, &path, true, session).await {
            Ok(body) => match payload::lab_from_json(lab_id, &body) {
                Ok(lab) => Ok(LabRead::Found(Box::new(lab))),
                Err(LabError::Refused(why)) => Ok(LabRead::Refused(why)),
                Err(LabError::Malformed(detail)) => Err(malformed(target, &path, detail)),
            },
            Err(Error::Status { status: 404, .. }) => Ok(LabRead::Gone),
            Err(e) => Err(e),
        }
    }

    /// GET with the worker's token; on 401, authenticates once more and retries once.
    async fn get(
        &self,
        target: &CmlTarget,
        path: &str,
        auth: bool,
        session: &Session,
    ) -> Result<Bytes> {
        if !auth {
            return self
                .send(target, Method::GET, path, None, None, session)
                .await;
        }
        let slot = self.token_slot(&target.worker_id);
        let token = self.token(target, &slot, None, session).await?;
        match self
            .send(target, Method::GET, path, Some(&token), None, session)
            .await
        {
            Err(Error::Status { status: 401, .. }) => {
                let fresh = self.token(target, &slot, Some(&token), session).await?;
                self.send(target, Method::GET, path, Some(&fresh), None, session)
                    .await
            }
            other => other,
        }
    }

    fn token_slot(&self, worker_id: &str) -> TokenSlot {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.entry(worker_id.to_owned()).or_default().clone()
    }

    /// The cached token, or a new one. `rejected` is a token the server just refused: if the
    /// cache still holds it, authenticate; if another task already replaced it, use theirs.
    async fn token(
        &self,
        target: &CmlTarget,
        slot: &TokenSlot,
        rejected: Option<&str>,
        session: &Session,
    ) -> Result<String> {
        let mut cached = slot.lock().await;
        if let Some(token) = cached.as_deref() {
            if Some(token) != rejected {
                return Ok(token.to_owned());
            }
        }
        *cached = None;
        let body =
            serde_json::json!({ "username": self.username, "password": self.password.expose() });
        let token = match self
            .send(
                target,
                Method::POST,
                "authenticate",
                None,
                Some(body),
                session,
            )
            .await
            .and_then(|bytes| json_body(target, "authenticate", &bytes))
        {
            Ok(Value::String(token)) if !token.is_empty() => token,
            Ok(other) => {
                return Err(malformed(
                    target,
                    "authenticate",
                    format!("expected a token string, got {}", kind_of(&other)),
                ))
            }
            Err(Error::Status {
                status: 401 | 403, ..
            }) => {
                return Err(Error::AuthFailed {
                    worker: target.worker_id.clone(),
                })
            }
            Err(e) => return Err(e),
        };
        *cached = Some(token.clone());
        Ok(token)
    }

    async fn send(
        &self,
        target: &CmlTarget,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        session: &Session,
    ) -> Result<Bytes> {
        let url = api_url(&target.endpoint, path).map_err(|detail| Error::Endpoint {
            worker: target.worker_id.clone(),
            endpoint: target.endpoint.clone(),
            detail,
        })?;
        let mut request = session
            .http
            .request(method, url)
            .header("accept", "application/json");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.count_request(target, session);
        let endpoint_path = path.split('?').next().unwrap_or(path).to_owned();
        let transport = |e: reqwest::Error| self.transport_error(target, &endpoint_path, e);
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .map(|l| clip(&String::from_utf8_lossy(l.as_bytes())))
                .unwrap_or_default();
            return Err(Error::Redirect {
                worker: target.worker_id.clone(),
                path: endpoint_path,
                status: status.as_u16(),
                location,
            });
        }
        if !status.is_success() {
            // Only the start of an error body is of use.
            let bytes = match read_capped(response, MAX_ERROR_BODY, true).await {
                Ok(bytes) | Err(Capped::TooLarge(bytes)) => bytes,
                Err(Capped::Transport(_)) => Bytes::new(),
            };
            return Err(Error::Status {
                worker: target.worker_id.clone(),
                path: endpoint_path,
                status: status.as_u16(),
                description: error_description(status, &bytes),
            });
        }
        read_capped(response, self.max_response_bytes, false)
            .await
            .map_err(|e| match e {
                Capped::TooLarge(_) => Error::TooLarge {
                    worker: target.worker_id.clone(),
                    path: endpoint_path.clone(),
                    limit: self.max_response_bytes,
                },
                Capped::Transport(e) => transport(e),
            })
    }

    /// One request is being sent to `target` (an HTTP call or a stream's upgrade).
    fn count_request(&self, target: &CmlTarget, session: &Session) {
        session.calls.fetch_add(1, Ordering::Relaxed);
        for hook in &self.on_request {
            hook(target);
        }
    }

    fn transport_error(&self, target: &CmlTarget, path: &str, e: reqwest::Error) -> Error {
        let worker = target.worker_id.clone();
        if e.is_timeout() {
            return Error::Timeout {
                worker,
                timeout_ms: u64::try_from(self.request_timeout.as_millis()).unwrap_or(u64::MAX),
            };
        }
        if e.is_body() || e.is_decode() {
            return malformed(
                target,
                path,
                format!("incomplete body ({})", source_chain(&e)),
            );
        }
        Error::Unreachable {
            worker,
            detail: source_chain(&e),
        }
    }

    fn warn_once_if_insecure(&self, target: &CmlTarget) {
        if self.verify_tls || !target.endpoint.starts_with("https") {
            return;
        }
        let first = self
            .warned_insecure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(target.worker_id.clone());
        if first {
            tracing::warn!(
                event = "tls_unverified",
                worker_id = %target.worker_id,
                endpoint = %target.endpoint,
                "The CML worker's TLS certificate is not verified (cml.verify_tls = false)"
            );
        }
    }
}

/// Bytes of an error body kept for its description.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Why a body was not read whole.
enum Capped {
    /// Past the limit: what was read up to it (the rest is never read).
    TooLarge(Bytes),
    Transport(reqwest::Error),
}

/// Reads a body as it streams in, never holding more than `max` bytes of it. With `partial`,
/// a longer body's first `max` bytes are read; without, a body announced longer is not read.
async fn read_capped(
    mut response: reqwest::Response,
    max: usize,
    partial: bool,
) -> Result<Bytes, Capped> {
    let announced_longer = response
        .content_length()
        .is_some_and(|n| n > u64::try_from(max).unwrap_or(u64::MAX));
    if announced_longer && !partial {
        return Err(Capped::TooLarge(Bytes::new()));
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(Capped::Transport)? {
        if body.len() + chunk.len() > max {
            let room = max - body.len();
            body.extend_from_slice(&chunk[..room]);
            return Err(Capped::TooLarge(body.freeze()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// `<endpoint>/api/v0/<path>`, keeping any path prefix of the endpoint.
fn api_url(endpoint: &str, path: &str) -> std::result::Result<Url, String> {
    let mut base = Url::parse(endpoint.trim()).map_err(|e| e.to_string())?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(format!("scheme `{}` is not http or https", base.scheme()));
    }
    if !base.path().ends_with('/') {
        let p = format!("{}/", base.path());
        base.set_path(&p);
    }
    base.join("api/v0/")
        .and_then(|b| b.join(path))
        .map_err(|e| e.to_string())
}

/// `text` as one path segment: every byte but ASCII letters, digits, `-` and `_`
/// percent-encoded (`.` too, though a URL parser still takes `%2E` for a dot: ids that are
/// dot segments are refused before they get here).
fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// CML's `{code, description}`, or a short excerpt of whatever came back.
fn error_description(status: StatusCode, body: &[u8]) -> String {
    if let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(body) {
        if let Some(d) = o.get("description") {
            return clip(&match d {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            });
        }
    }
    let text = clip(String::from_utf8_lossy(body).trim());
    if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("no description")
            .to_owned()
    } else {
        text
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "an empty string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The error and its causes in one line ("error sending request: connection reset by peer").
fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    clip(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls_keep_path_prefixes() {
        let u = |e: &str, p: &str| api_url(e, p).expect("valid").to_string();
        assert_eq!(
            u("https://10.0.0.5", "labs?show_all=true"),
            "https://10.0.0.5/api/v0/labs?show_all=true"
        );
        assert_eq!(
            u("https://10.0.0.5/", "authenticate"),
            "https://10.0.0.5/api/v0/authenticate"
        );
        assert_eq!(
            u("http://127.0.0.1:8000/w/abc", "labs/x"),
            "http://127.0.0.1:8000/w/abc/api/v0/labs/x"
        );
        assert_eq!(
            u("http://127.0.0.1:8000/w/abc/", "labs/x"),
            "http://127.0.0.1:8000/w/abc/api/v0/labs/x"
        );
        assert!(api_url("ftp://h", "labs").is_err());
        assert!(api_url("not a url", "labs").is_err());
    }

    #[test]
    fn error_descriptions_come_from_cml_bodies() {
        let body = br#"{"code": 404, "description": "Lab not found: abc"}"#;
        assert_eq!(
            error_description(StatusCode::NOT_FOUND, body),
            "Lab not found: abc"
        );
        assert_eq!(
            error_description(StatusCode::BAD_GATEWAY, b""),
            "Bad Gateway"
        );
        assert_eq!(
            error_description(StatusCode::BAD_GATEWAY, b"<html>nginx</html>"),
            "<html>nginx</html>"
        );
    }
}
