//! Checks serde cannot express: ranges, addresses, URLs, names, and settings that only make
//! sense together. Each binary checks every key it reads and nothing else: the keys a role
//! reads are declared once ([`Role::reads`]); a test checks that each of them is validated.

use std::{collections::HashSet, net::SocketAddr, path::Path, time::Duration};

use super::{
    ApiConfig, AuthMode, CmlConfig, Config, MongoConfig, Role, SyncConfig, TelemetryConfig,
};
use crate::duration::HumanDuration;

// Bounds of durations: every one is checked, so none can overflow a clock later.
const MS_100: Duration = Duration::from_millis(100);
const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const MINUTES_5: Duration = Duration::from_secs(300);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

impl Role {
    /// The keys this role's binary reads: whole sections, or single keys of a section (and
    /// everything below them). Validation covers exactly these.
    pub fn reads(self) -> &'static [&'static str] {
        match self {
            Role::SyncDaemon => &["mongodb", "telemetry", "cml", "sync"],
            Role::LabApi => &[
                "mongodb",
                "telemetry",
                "api",
                // The fleet view's staleness (two intervals) and the refresh throttle.
                "sync.interval",
                "sync.refresh_min_interval",
                // Whether a worker may be refreshed: as a cycle would see it.
                "sync.workers_from_registry",
                "sync.static_workers",
                "cml.use_private_ip",
            ],
        }
    }

    /// Whether this role reads `key` (a dotted key, `[i]` indexes included).
    pub fn reads_key(self, key: &str) -> bool {
        self.reads().iter().any(|read| {
            key.strip_prefix(read)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    }
}

impl Config {
    /// Semantic checks serde cannot express, of the keys `role` reads. Returns `(dotted key,
    /// message)` pairs.
    pub fn validate(&self, role: Role) -> Vec<(String, String)> {
        self.validator(role).problems
    }

    /// What `check-config` tells besides problems: how the configuration decides who sees
    /// what (lab-api only).
    pub fn notes(&self, role: Role) -> Vec<String> {
        if role != Role::LabApi {
            return Vec::new();
        }
        let (auth, access) = (&self.api.auth, &self.api.access);
        let mut notes = Vec::new();
        match (auth.mode, access.mode) {
            (AuthMode::None, _) => notes.push(
                "api.auth.mode = \"none\": nobody is checked, so access is open: every caller sees every lab".into(),
            ),
            (_, crate::config::AccessMode::Open) => notes.push(
                "api.access.mode = \"open\": every authenticated caller sees every lab".into(),
            ),
            (_, crate::config::AccessMode::Cml) => notes.push(
                "api.access.mode = \"cml\": each caller sees the labs each CML server shows its user".into(),
            ),
        }
        if auth.mode == AuthMode::Tokens && !auth.token_hashes.is_empty() {
            notes.push(format!(
                "api.auth.token_hashes: {} token(s), each an admin of the fleet's (it sees every lab); to give a token one user's view, list it in api.auth.tokens with its username",
                auth.token_hashes.len()
            ));
        }
        notes
    }

    /// The keys whose values [`Config::validate`] looks at for `role`.
    pub fn validated_keys(&self, role: Role) -> HashSet<String> {
        self.validator(role).visited
    }

    fn validator(&self, role: Role) -> Validator {
        let mut v = Validator {
            role,
            problems: Vec::new(),
            visited: HashSet::new(),
        };
        self.mongodb.validate(&mut v);
        self.telemetry.validate(&mut v);
        self.cml.validate(&mut v);
        self.sync.validate(&mut v);
        self.api.validate(&mut v);
        v
    }
}

struct Validator {
    role: Role,
    problems: Vec<(String, String)>,
    /// Every key looked at (for the test that each key read is validated).
    visited: HashSet<String>,
}

impl Validator {
    /// Whether `key` is checked here: only the keys the role reads are.
    fn reads(&mut self, key: &str) -> bool {
        let reads = self.role.reads_key(key);
        if reads {
            self.visited.insert(key.to_owned());
        }
        reads
    }

    fn fail(&mut self, key: &str, message: impl Into<String>) {
        if self.reads(key) {
            self.problems.push((key.to_owned(), message.into()));
        }
    }

    fn check(&mut self, ok: bool, key: &str, message: impl FnOnce() -> String) {
        if self.reads(key) && !ok {
            self.fail(key, message());
        }
    }

    /// A key any value of its type is valid for (a switch): looked at, nothing to check.
    fn any(&mut self, key: &str) {
        self.reads(key);
    }

    fn duration_range(&mut self, key: &str, d: HumanDuration, min: Duration, max: Duration) {
        self.check((min..=max).contains(&d.get()), key, || {
            format!(
                "must be between {} and {}, got {d}",
                HumanDuration(min),
                HumanDuration(max)
            )
        });
    }

    fn range(&mut self, key: &str, value: usize, min: usize, max: usize) {
        self.check((min..=max).contains(&value), key, || {
            format!("must be between {min} and {max}, got {value}")
        });
    }

    fn socket_addr(&mut self, key: &str, value: &str) {
        self.check(value.parse::<SocketAddr>().is_ok(), key, || {
            format!("`{value}` is not an address like \"0.0.0.0:8080\"")
        });
    }

    fn name(&mut self, key: &str, value: &str, forbidden: &[char]) {
        if !self.reads(key) {
            return;
        }
        if value.is_empty() {
            self.fail(key, "must not be empty");
        } else if let Some(c) = value.chars().find(|c| forbidden.contains(c) || *c == '\0') {
            self.fail(key, format!("must not contain {c:?}"));
        }
    }

    fn http_url(&mut self, key: &str, value: &str) {
        if !self.reads(key) {
            return;
        }
        if value.is_empty() {
            return self.fail(key, "must be set to an http(s) URL");
        }
        let rest = value
            .strip_prefix("https://")
            .or_else(|| value.strip_prefix("http://"));
        self.check(
            rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/')),
            key,
            || format!("`{value}` is not an http(s) URL"),
        );
    }
}

impl MongoConfig {
    fn validate(&self, v: &mut Validator) {
        let uri = self.uri.expose();
        // The URI itself is a secret: the message says what is wrong without echoing it.
        v.check(
            uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://"),
            "mongodb.uri",
            || "must start with mongodb:// or mongodb+srv://".into(),
        );
        v.name(
            "mongodb.database",
            &self.database,
            &['/', '\\', '.', ' ', '"', '$'],
        );
        for (key, value) in [
            (
                "mongodb.lab_records_collection",
                &self.lab_records_collection,
            ),
            ("mongodb.workers_collection", &self.workers_collection),
            (
                "mongodb.sync_status_collection",
                &self.sync_status_collection,
            ),
            ("mongodb.lease_collection", &self.lease_collection),
            (
                "mongodb.sync_requests_collection",
                &self.sync_requests_collection,
            ),
            (
                "mongodb.cml_accounts_collection",
                &self.cml_accounts_collection,
            ),
        ] {
            v.name(key, value, &['$']);
        }
        v.any("mongodb.read_preference");
        v.any("mongodb.batch_writes");
        v.duration_range(
            "mongodb.server_selection_timeout",
            self.server_selection_timeout,
            MS_100,
            MINUTES_5,
        );
    }
}

impl CmlConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(!self.username.trim().is_empty(), "cml.username", || {
            "must not be empty".into()
        });
        v.check(!self.password.is_empty(), "cml.password", || {
            "must be set (usually through CML_LABS_CML__PASSWORD)".into()
        });
        v.any("cml.verify_tls");
        v.any("cml.use_private_ip");
        v.any("cml.ca_bundle");
        if !self.ca_bundle.is_empty() {
            v.check(
                Path::new(&self.ca_bundle).is_file(),
                "cml.ca_bundle",
                || format!("{} is not a readable file", self.ca_bundle),
            );
        }
        v.duration_range(
            "cml.connect_timeout",
            self.connect_timeout,
            MS_100,
            MINUTES_5,
        );
        v.duration_range("cml.request_timeout", self.request_timeout, MS_100, HOUR);
        v.range("cml.fallback_concurrency", self.fallback_concurrency, 1, 64);
        v.range(
            "cml.max_response_bytes",
            self.max_response_bytes,
            64 * 1024,
            1 << 30,
        );
        v.range(
            "cml.max_labs_per_worker",
            self.max_labs_per_worker,
            1,
            1_000_000,
        );
    }
}

impl SyncConfig {
    fn validate(&self, v: &mut Validator) {
        v.duration_range("sync.interval", self.interval, SECOND, 7 * DAY);
        v.duration_range("sync.access_interval", self.access_interval, SECOND, DAY);
        v.range("sync.concurrency", self.concurrency, 1, 1024);
        v.duration_range("sync.worker_deadline", self.worker_deadline, SECOND, DAY);
        v.duration_range(
            "sync.removed_retention",
            self.removed_retention,
            Duration::ZERO,
            3650 * DAY,
        );
        v.duration_range(
            "sync.shutdown_grace",
            self.shutdown_grace,
            Duration::ZERO,
            HOUR,
        );
        v.range("sync.history_limit", self.history_limit, 1, 1000);
        v.duration_range(
            "sync.admin_header_read_timeout",
            self.admin_header_read_timeout,
            MS_100,
            MINUTES_5,
        );
        v.duration_range(
            "sync.admin_idle_timeout",
            self.admin_idle_timeout,
            SECOND,
            HOUR,
        );
        v.range(
            "sync.admin_max_header_bytes",
            self.admin_max_header_bytes,
            8192,
            1 << 20,
        );
        v.range(
            "sync.admin_max_connections",
            self.admin_max_connections,
            1,
            100_000,
        );
        v.duration_range("sync.lease_ttl", self.lease_ttl, SECOND, HOUR);
        v.duration_range("sync.retry_base", self.retry_base, MS_100, DAY);
        v.duration_range(
            "sync.refresh_min_interval",
            self.refresh_min_interval,
            SECOND,
            DAY,
        );
        v.socket_addr("sync.admin_listen", &self.admin_listen);
        let e = &self.events;
        v.any("sync.events.enabled");
        v.range("sync.events.max_watches", e.max_watches, 0, 100_000);
        v.range(
            "sync.events.max_message_bytes",
            e.max_message_bytes,
            64 * 1024,
            64 << 20,
        );
        v.range(
            "sync.events.buffer_bytes",
            e.buffer_bytes,
            1 << 20,
            16 << 30,
        );
        v.check(
            e.buffer_bytes >= e.max_message_bytes,
            "sync.events.buffer_bytes",
            || {
                format!(
                    "is {} bytes, less than sync.events.max_message_bytes ({}): no stream could \
                     hold one message",
                    e.buffer_bytes, e.max_message_bytes
                )
            },
        );
        v.range(
            "sync.events.max_messages_per_second",
            e.max_messages_per_second,
            10,
            100_000,
        );
        v.duration_range(
            "sync.events.silence_timeout",
            e.silence_timeout,
            5 * SECOND,
            HOUR,
        );
        v.duration_range("sync.events.coalesce", e.coalesce, Duration::ZERO, MINUTE);
        v.duration_range(
            "sync.events.min_interval",
            e.min_interval,
            Duration::ZERO,
            HOUR,
        );
        v.duration_range("sync.events.reconnect_max", e.reconnect_max, SECOND, HOUR);
        v.duration_range("sync.events.healthy_after", e.healthy_after, SECOND, HOUR);
        v.duration_range(
            "sync.events.relist_min_interval",
            e.relist_min_interval,
            SECOND,
            DAY,
        );
        v.check(
            self.workers_from_registry || !self.static_workers.is_empty(),
            "sync.workers_from_registry",
            || "is false and sync.static_workers is empty: there is nothing to sync".into(),
        );
        v.any("sync.run_immediately");
        v.any("sync.static_workers");
        let mut ids = HashSet::new();
        for (i, w) in self.static_workers.iter().enumerate() {
            let key = format!("sync.static_workers[{i}]");
            if w.id.trim().is_empty() {
                v.fail(&format!("{key}.id"), "must not be empty");
            } else if !ids.insert(w.id.as_str()) {
                v.fail(&format!("{key}.id"), format!("`{}` is listed twice", w.id));
            }
            v.http_url(&format!("{key}.endpoint"), &w.endpoint);
        }
    }
}

impl ApiConfig {
    fn validate(&self, v: &mut Validator) {
        v.socket_addr("api.listen", &self.listen);
        v.duration_range(
            "api.request_timeout",
            self.request_timeout,
            MS_100,
            10 * MINUTE,
        );
        v.range(
            "api.max_concurrent_requests",
            self.max_concurrent_requests,
            1,
            1_000_000,
        );
        v.duration_range(
            "api.header_read_timeout",
            self.header_read_timeout,
            MS_100,
            MINUTES_5,
        );
        v.duration_range("api.idle_timeout", self.idle_timeout, SECOND, HOUR);
        v.range("api.max_header_bytes", self.max_header_bytes, 8192, 1 << 20);
        v.range("api.max_connections", self.max_connections, 1, 100_000);
        v.range(
            "api.max_labs_per_response",
            self.max_labs_per_response,
            1,
            1_000_000,
        );
        v.any("api.refresh_enabled");
        v.any("api.cors_allowed_origins");
        for (i, origin) in self.cors_allowed_origins.iter().enumerate() {
            if origin != "*" {
                v.http_url(&format!("api.cors_allowed_origins[{i}]"), origin);
            }
        }
        let ev = &self.events;
        v.duration_range(
            "api.events.heartbeat_interval",
            ev.heartbeat_interval,
            SECOND,
            HOUR,
        );
        v.range("api.events.client_buffer", ev.client_buffer, 64, 65_536);
        v.range(
            "api.events.client_buffer_bytes",
            ev.client_buffer_bytes,
            64 << 10,
            1 << 30,
        );
        v.range(
            "api.events.buffer_bytes",
            ev.buffer_bytes,
            64 << 10,
            16 << 30,
        );
        v.check(
            ev.buffer_bytes >= ev.client_buffer_bytes,
            "api.events.buffer_bytes",
            || {
                "must be at least api.events.client_buffer_bytes (what one client may have \
                 queued)"
                    .to_owned()
            },
        );
        v.range("api.events.max_streams", ev.max_streams, 1, 100_000);
        v.check(
            ev.max_streams < self.max_connections,
            "api.events.max_streams",
            || {
                format!(
                    "must be below api.max_connections ({}): each stream holds a connection",
                    self.max_connections
                )
            },
        );
        v.range("api.events.replay_events", ev.replay_events, 0, 1_000_000);
        v.range("api.events.replay_bytes", ev.replay_bytes, 0, 1 << 30);
        v.duration_range(
            "api.events.replay_window",
            ev.replay_window,
            Duration::ZERO,
            DAY,
        );
        let auth = &self.auth;
        for key in [
            "api.auth.mode",
            "api.auth.jwks_url",
            "api.auth.issuer",
            "api.auth.audience",
            "api.auth.token_hashes",
        ] {
            v.any(key); // checked below for the mode that uses it
        }
        match auth.mode {
            AuthMode::Jwt => {
                v.http_url("api.auth.jwks_url", &auth.jwks_url);
                v.check(!auth.issuer.is_empty(), "api.auth.issuer", || {
                    "must be set when api.auth.mode is \"jwt\"".into()
                });
                v.check(!auth.audience.is_empty(), "api.auth.audience", || {
                    "must be set when api.auth.mode is \"jwt\"".into()
                });
            }
            AuthMode::Tokens => {
                v.check(
                    !auth.token_hashes.is_empty() || !auth.tokens.is_empty(),
                    "api.auth.token_hashes",
                    || "api.auth.token_hashes or api.auth.tokens must list at least one token when api.auth.mode is \"tokens\"".into(),
                );
            }
            AuthMode::None => {}
        }
        v.check(
            auth.cookie_name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)),
            "api.auth.cookie_name",
            || "must be a cookie name: letters, digits and !#$%&'*+-.^_`|~ only".into(),
        );
        let digest = |h: &str| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit());
        for (i, hash) in auth.token_hashes.iter().enumerate() {
            v.check(digest(hash), &format!("api.auth.token_hashes[{i}]"), || {
                "must be a SHA-256 digest in hex (64 characters)".into()
            });
        }
        v.any("api.auth.tokens");
        for (i, t) in auth.tokens.iter().enumerate() {
            v.check(
                digest(&t.sha256),
                &format!("api.auth.tokens[{i}].sha256"),
                || "must be a SHA-256 digest in hex (64 characters)".into(),
            );
            v.check(
                t.admin || crate::access::plausible_username(&t.username),
                &format!("api.auth.tokens[{i}].username"),
                || "must name a CML user (1 to 256 characters, no control characters) unless admin = true".into(),
            );
        }
        let access = &self.access;
        v.any("api.access.mode");
        v.check(
            !access.username_claim.trim().is_empty(),
            "api.access.username_claim",
            || "must name a claim".into(),
        );
        v.check(
            !access.admin_claim.is_empty() && access.admin_claim.split('.').all(|p| !p.is_empty()),
            "api.access.admin_claim",
            || "must be a claim, or a dotted path to one (like \"realm_access.roles\")".into(),
        );
        v.any("api.access.admin_values");
    }
}

impl TelemetryConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(
            tracing_subscriber::EnvFilter::try_new(&self.log_level).is_ok(),
            "telemetry.log_level",
            || {
                format!(
                    "`{}` is not a level or filter like \"info\" or \"info,cml_labs=debug\"",
                    self.log_level
                )
            },
        );
        v.any("telemetry.log_format");
        v.any("telemetry.otlp_endpoint");
        if !self.otlp_endpoint.is_empty() {
            v.http_url("telemetry.otlp_endpoint", &self.otlp_endpoint);
        }
        v.any("telemetry.service_name"); // empty: the binary's own name
    }
}
