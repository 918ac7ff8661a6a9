//! The sections of the configuration, their keys and their defaults.

use serde::{Deserialize, Serialize};

use crate::{duration::HumanDuration, secret::Secret};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub mongodb: MongoConfig,
    pub cml: CmlConfig,
    pub sync: SyncConfig,
    pub api: ApiConfig,
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MongoConfig {
    /// May carry credentials: only ever shown through [`crate::secret::redact_uri`].
    pub uri: Secret,
    pub database: String,
    pub lab_records_collection: String,
    pub workers_collection: String,
    pub sync_status_collection: String,
    /// The lease that lets one sync-daemon replica sync at a time.
    pub lease_collection: String,
    /// Refreshes asked for through lab-api or `sync-daemon refresh`, served by the lease holder.
    pub sync_requests_collection: String,
    /// Each user's account on each worker (admin, groups), read from CML with each full sync:
    /// what lab-api decides who sees what from.
    pub cml_accounts_collection: String,
    pub server_selection_timeout: HumanDuration,
    pub read_preference: ReadPreferenceMode,
    /// How batched record writes travel: `auto` uses the 8.0+ `bulkWrite` command when the server
    /// offers it and the classic multi-statement `update` command otherwise.
    pub batch_writes: BatchWriteMode,
}

impl Default for MongoConfig {
    fn default() -> Self {
        Self {
            uri: Secret::new("mongodb://127.0.0.1:27017"),
            database: "cml_cloud_manager".into(),
            lab_records_collection: "lab_records".into(),
            workers_collection: "cml_workers".into(),
            sync_status_collection: "worker_sync_status".into(),
            lease_collection: "sync_lease".into(),
            sync_requests_collection: "sync_requests".into(),
            cml_accounts_collection: "cml_accounts".into(),
            server_selection_timeout: HumanDuration::from_secs(2),
            read_preference: ReadPreferenceMode::Primary,
            batch_writes: BatchWriteMode::Auto,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReadPreferenceMode {
    Primary,
    PrimaryPreferred,
    Secondary,
    SecondaryPreferred,
    Nearest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchWriteMode {
    Auto,
    UpdateCommand,
    BulkWrite,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CmlConfig {
    pub username: String,
    pub password: Secret,
    pub verify_tls: bool,
    /// PEM file of extra trusted CAs; empty for none.
    pub ca_bundle: String,
    pub connect_timeout: HumanDuration,
    pub request_timeout: HumanDuration,
    pub use_private_ip: bool,
    /// Lab detail calls in flight per worker when `populate_lab_tiles` is unavailable.
    pub fallback_concurrency: usize,
    /// Largest answer read from a CML server; a larger one fails the worker.
    pub max_response_bytes: usize,
    /// Most labs taken from one CML server; more fails the worker.
    pub max_labs_per_worker: usize,
}

impl Default for CmlConfig {
    fn default() -> Self {
        Self {
            username: "admin".into(),
            password: Secret::default(),
            verify_tls: true,
            ca_bundle: String::new(),
            connect_timeout: HumanDuration::from_secs(10),
            request_timeout: HumanDuration::from_secs(30),
            use_private_ip: false,
            fallback_concurrency: 4,
            max_response_bytes: 64 * 1024 * 1024,
            max_labs_per_worker: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    pub interval: HumanDuration,
    /// Every active worker's users and groups (who may see its labs) are read at least this
    /// often, in a sync of their own, streaming or polled.
    pub access_interval: HumanDuration,
    pub run_immediately: bool,
    pub concurrency: usize,
    pub worker_deadline: HumanDuration,
    pub history_limit: usize,
    pub removed_retention: HumanDuration,
    pub admin_listen: String,
    pub workers_from_registry: bool,
    pub static_workers: Vec<StaticWorker>,
    /// A replica that stops renewing the lease loses it after this long.
    pub lease_ttl: HumanDuration,
    /// On SIGTERM, how long in-flight worker syncs may take to finish.
    pub shutdown_grace: HumanDuration,
    /// Delay before the first retry of a failed worker (doubles per failure, jittered,
    /// capped at `interval`).
    pub retry_base: HumanDuration,
    /// A worker refreshed on demand may be refreshed again this long after that refresh ended
    /// (lab-api and `sync-daemon refresh` both enforce it; periodic cycles do not count).
    pub refresh_min_interval: HumanDuration,
    /// Limits of the admin port against slow or hostile clients (see `api.*` of the same names).
    pub admin_header_read_timeout: HumanDuration,
    pub admin_idle_timeout: HumanDuration,
    pub admin_max_header_bytes: usize,
    pub admin_max_connections: usize,
    /// Watching each worker's CML event stream (`/ws/ui`) and syncing what it says changed.
    pub events: SyncEventsConfig,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            interval: HumanDuration::from_secs(30 * 60),
            access_interval: HumanDuration::from_secs(5 * 60),
            run_immediately: true,
            concurrency: 16,
            worker_deadline: HumanDuration::from_secs(5 * 60),
            history_limit: 50,
            removed_retention: HumanDuration::from_secs(7 * 86_400),
            admin_listen: "0.0.0.0:9090".into(),
            workers_from_registry: true,
            static_workers: Vec::new(),
            lease_ttl: HumanDuration::from_secs(30),
            shutdown_grace: HumanDuration::from_secs(25),
            retry_base: HumanDuration::from_secs(60),
            refresh_min_interval: HumanDuration::from_secs(60),
            admin_header_read_timeout: HumanDuration::from_secs(10),
            admin_idle_timeout: HumanDuration::from_secs(60),
            admin_max_header_bytes: 16 * 1024,
            admin_max_connections: 64,
            events: SyncEventsConfig::default(),
        }
    }
}

/// The lease holder's watch of each active worker's CML event stream (`sync.events.*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncEventsConfig {
    /// Off: every worker is synced by the periodic cycle (and refreshes) only.
    pub enabled: bool,
    /// Event streams held open at once; workers past it are left to the periodic cycle.
    pub max_watches: usize,
    /// Longest message (and frame) a server may send, and the most one stream may hold of
    /// what it has read and not handed over (plus one 8 KiB read); more resets that watch.
    pub max_message_bytes: usize,
    /// What all the streams together may hold of what they have read and not handed over;
    /// past it the streams holding the most are reset first.
    pub buffer_bytes: usize,
    /// Frames a server may send per second, pings and pongs included (CML's stats are about
    /// one a second); past it the watch is reset as flooding.
    pub max_messages_per_second: usize,
    /// A stream with no message for this long is dead (CML sends stats every ~3.3 s) and is
    /// reopened; also the time allowed for the first message after authenticating.
    pub silence_timeout: HumanDuration,
    /// Lab changes of one worker arriving within this window are synced together.
    pub coalesce: HumanDuration,
    /// Event syncs of one worker start at least this far apart (changes meanwhile wait and
    /// are synced together).
    pub min_interval: HumanDuration,
    /// Longest wait between attempts to open a failing stream (failures in a row back off up
    /// to it, jittered).
    pub reconnect_max: HumanDuration,
    /// A stream counts as healthy (its failures forgiven) only once it has stayed up this
    /// long: one that keeps dying younger backs off and shows `failing`.
    pub healthy_after: HumanDuration,
    /// Relists of one worker (a full sync each time its stream is live again) start at least
    /// this far apart.
    pub relist_min_interval: HumanDuration,
}

impl Default for SyncEventsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_watches: 2000,
            max_message_bytes: 1 << 20,
            buffer_bytes: 64 << 20,
            max_messages_per_second: 500,
            silence_timeout: HumanDuration::from_secs(30),
            coalesce: HumanDuration::from_millis(100),
            min_interval: HumanDuration::from_secs(1),
            reconnect_max: HumanDuration::from_secs(300),
            healthy_after: HumanDuration::from_secs(30),
            relist_min_interval: HumanDuration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticWorker {
    pub id: String,
    pub endpoint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: String,
    pub request_timeout: HumanDuration,
    /// Requests in flight at once, over the whole service; past it, new ones get 503 at once.
    pub max_concurrent_requests: usize,
    /// Request headers must arrive within this (on HTTP/1 it also bounds idle keep-alive).
    pub header_read_timeout: HumanDuration,
    /// Connections with no request in flight for this long are closed.
    pub idle_timeout: HumanDuration,
    /// Most bytes of request headers one connection may buffer.
    pub max_header_bytes: usize,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Most labs one response of a worker's labs carries; a worker with more gets a problem
    /// document pointing to the paged listing.
    pub max_labs_per_response: usize,
    pub cors_allowed_origins: Vec<String>,
    /// Whether `POST /api/workers/{id}/labs/refresh` is offered (off: the route answers 404).
    pub refresh_enabled: bool,
    pub auth: AuthConfig,
    pub access: AccessConfig,
    pub events: EventsConfig,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            request_timeout: HumanDuration::from_secs(10),
            max_concurrent_requests: 512,
            header_read_timeout: HumanDuration::from_secs(10),
            idle_timeout: HumanDuration::from_secs(60),
            max_header_bytes: 16 * 1024,
            max_connections: 1024,
            max_labs_per_response: 5000,
            cors_allowed_origins: Vec::new(),
            refresh_enabled: true,
            auth: AuthConfig::default(),
            access: AccessConfig::default(),
            events: EventsConfig::default(),
        }
    }
}

/// The live event stream (`/api/events/stream`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// A `heartbeat` frame goes out after this long without another frame. A client that fell
    /// behind and does not read its `reset` within this long is disconnected.
    pub heartbeat_interval: HumanDuration,
    /// Frames one client may have waiting; a client further behind gets `reset` and is closed.
    pub client_buffer: usize,
    /// ...and at most this many bytes of them (any one frame fits an empty queue).
    pub client_buffer_bytes: usize,
    /// Most bytes all clients' queues may hold together (a frame shared by many queues
    /// counted once); past it, the clients furthest behind get `reset` first.
    pub buffer_bytes: usize,
    /// Streams one replica serves at once; past it, new streams get 503 with `Retry-After`.
    pub max_streams: usize,
    /// Recent events each replica keeps so that a client reconnecting with `Last-Event-ID`
    /// (to any replica) gets exactly what it missed.
    pub replay_events: usize,
    /// ...and at most this many bytes of them (the older ones go first).
    pub replay_bytes: usize,
    /// How far back a replica reads the change stream when it starts, to fill that memory.
    pub replay_window: HumanDuration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: HumanDuration::from_secs(30),
            client_buffer: 256,
            client_buffer_bytes: 1 << 20,
            buffer_bytes: 64 << 20,
            max_streams: 1000,
            replay_events: 10_000,
            replay_bytes: 8 << 20,
            replay_window: HumanDuration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    pub jwks_url: String,
    pub issuer: String,
    pub audience: String,
    /// SHA-256 hex digests of the accepted static API tokens; the tokens themselves are never
    /// stored. Each is an admin of the fleet's token (it sees everything).
    pub token_hashes: Vec<String>,
    /// Static API tokens that each name who holds them: a CML username, or an admin of the fleet.
    pub tokens: Vec<StaticToken>,
    /// A cookie whose value is accepted as the token when a request has no `Authorization`
    /// header (a browser's `EventSource` cannot send one); empty: cookies are ignored.
    pub cookie_name: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Jwt,
            jwks_url: String::new(),
            issuer: String::new(),
            audience: String::new(),
            token_hashes: Vec::new(),
            tokens: Vec::new(),
            cookie_name: String::new(),
        }
    }
}

/// One static API token: its SHA-256 digest (hex) and its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticToken {
    pub sha256: String,
    /// The CML username it reads as (it sees what CML shows that user on each worker).
    #[serde(default)]
    pub username: String,
    /// An admin of the fleet: it sees everything.
    #[serde(default)]
    pub admin: bool,
}

/// Who sees which labs (`api.access`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// `cml`: each caller sees what each CML server shows its user; `open`: every caller sees
    /// everything (a deployment whose every reader is an operator).
    pub mode: AccessMode,
    /// The JWT claim holding the caller's CML username.
    pub username_claim: String,
    /// The JWT claim (a dotted path into nested objects) holding the caller's roles.
    pub admin_claim: String,
    /// Values of `admin_claim` (a string, or one in a list) that make the caller an admin of
    /// the fleet.
    pub admin_values: Vec<String>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            mode: AccessMode::Cml,
            username_claim: "preferred_username".into(),
            admin_claim: "realm_access.roles".into(),
            admin_values: vec!["admin".into()],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessMode {
    Cml,
    Open,
}

impl AccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::Cml => "cml",
            AccessMode::Open => "open",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    Jwt,
    Tokens,
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    pub log_level: String,
    pub otlp_endpoint: String,
    /// Empty: the binary's own name.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: "info".into(),
            otlp_endpoint: String::new(),
            service_name: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Pretty,
}

impl ApiConfig {
    /// What a client of the API port may make lab-api hold.
    pub fn server_limits(&self) -> crate::service::ServerLimits {
        crate::service::ServerLimits {
            header_read_timeout: self.header_read_timeout.get(),
            idle_timeout: self.idle_timeout.get(),
            max_header_bytes: self.max_header_bytes,
            max_connections: self.max_connections,
        }
    }
}

impl SyncConfig {
    /// What a client of the admin port may make the daemon hold.
    pub fn admin_limits(&self) -> crate::service::ServerLimits {
        crate::service::ServerLimits {
            header_read_timeout: self.admin_header_read_timeout.get(),
            idle_timeout: self.admin_idle_timeout.get(),
            max_header_bytes: self.admin_max_header_bytes,
            max_connections: self.admin_max_connections,
        }
    }
}
