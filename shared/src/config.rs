//! The configuration both binaries read: defaults, then a TOML file, then `CML_LABS_*` env vars.
//!
//! The names are a contract with operators and manifests (see the README's reference). Every
//! problem is reported with its dotted key and where the value came from, all at once.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use figment::{
    providers::{Env, Format, Toml},
    Figment, Metadata, Source,
};
use serde::{Deserialize, Serialize};

use crate::{duration::HumanDuration, secret::Secret};

/// Environment variable naming the TOML file when `--config` is not given.
pub const CONFIG_PATH_ENV: &str = "CML_LABS_CONFIG";
/// Prefix of every environment override; sections are nested with `__`.
pub const ENV_PREFIX: &str = "CML_LABS_";

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
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    pub interval: HumanDuration,
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
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            interval: HumanDuration::from_secs(30 * 60),
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
    pub max_concurrent_requests: usize,
    pub cors_allowed_origins: Vec<String>,
    pub auth: AuthConfig,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            request_timeout: HumanDuration::from_secs(10),
            max_concurrent_requests: 512,
            cors_allowed_origins: Vec::new(),
            auth: AuthConfig::default(),
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
    /// SHA-256 hex digests of the accepted static API tokens; the tokens themselves are never stored.
    pub token_hashes: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Jwt,
            jwks_url: String::new(),
            issuer: String::new(),
            audience: String::new(),
            token_hashes: Vec::new(),
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

/// Which binary is loading: each validates only the sections it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    SyncDaemon,
    LabApi,
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key, e.g. `sync.concurrency`; empty when the whole file is at fault.
    pub key: String,
    /// Where the value came from, e.g. `environment variable CML_LABS_SYNC__CONCURRENCY`.
    pub source: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)?;
        } else {
            write!(f, "`{}`: {}", self.key, self.message)?;
        }
        match &self.source {
            Some(source) => write!(f, " (from {source})"),
            None => Ok(()),
        }
    }
}

/// Every problem found while loading, so an operator can fix them in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Where configuration comes from, besides the built-in defaults.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// `--config PATH`; when `None`, `CML_LABS_CONFIG` is consulted.
    pub file: Option<PathBuf>,
    /// Read `CML_LABS_*` overrides from the process environment (tests turn this off).
    pub skip_env: bool,
}

impl Config {
    /// Loads, layers and validates the configuration for `role`.
    pub fn load(sources: &ConfigSources, role: Role) -> Result<Config, ConfigError> {
        let file = sources
            .file
            .clone()
            .or_else(|| std::env::var_os(CONFIG_PATH_ENV).map(PathBuf::from));
        let mut figment = Figment::new();
        if let Some(path) = &file {
            if !path.is_file() {
                return Err(ConfigError(vec![ConfigProblem {
                    key: String::new(),
                    source: None,
                    message: format!(
                        "configuration file {} does not exist or is not a file",
                        path.display()
                    ),
                }]));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        if !sources.skip_env {
            figment = figment.merge(env_provider());
        }
        Self::from_figment(&figment, role)
    }

    /// Extracts and validates from an assembled figment (tests build their own).
    pub fn from_figment(figment: &Figment, role: Role) -> Result<Config, ConfigError> {
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError(figment_problems(e)))?;
        let problems: Vec<ConfigProblem> = config
            .validate(role)
            .into_iter()
            .map(|(key, message)| ConfigProblem {
                source: describe_source(figment, &key),
                key,
                message,
            })
            .collect();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError(problems))
        }
    }

    /// Semantic checks serde cannot express. Returns `(dotted key, message)` pairs.
    pub fn validate(&self, role: Role) -> Vec<(String, String)> {
        let mut v = Validator::default();
        self.mongodb.validate(&mut v);
        self.telemetry.validate(&mut v);
        match role {
            Role::SyncDaemon => {
                self.cml.validate(&mut v);
                self.sync.validate(&mut v);
            }
            Role::LabApi => self.api.validate(&mut v),
        }
        v.problems
    }

    /// The effective configuration as TOML, secrets redacted, for `check-config`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// `CML_LABS_SYNC__INTERVAL=10m` → `sync.interval`.
fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX).split("__").ignore(&["CONFIG"])
}

fn figment_problems(error: figment::Error) -> Vec<ConfigProblem> {
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let source = e.metadata.as_ref().map(|md| {
                let keys: Vec<&str> = e.path.iter().map(String::as_str).collect();
                metadata_text(md, &keys)
            });
            ConfigProblem {
                key,
                source,
                message: e.kind.to_string(),
            }
        })
        .collect()
}

fn describe_source(figment: &Figment, key: &str) -> Option<String> {
    // A problem in `a.b[3].c` is reported on the deepest key the figment knows.
    let mut candidate = key.split('[').next().unwrap_or(key).to_owned();
    loop {
        if let Some(md) = figment.find_metadata(&candidate) {
            let keys: Vec<&str> = candidate.split('.').collect();
            return Some(metadata_text(md, &keys));
        }
        match candidate.rfind('.') {
            Some(dot) => candidate.truncate(dot),
            None => return None,
        }
    }
}

fn metadata_text(md: &Metadata, keys: &[&str]) -> String {
    match &md.source {
        Some(Source::File(path)) => format!("{} {}", md.name, path.display()),
        // Figment's own interpolation drops the prefix and the `__` nesting; rebuild the name.
        _ if md.name.contains("environment") => {
            format!(
                "environment variable {ENV_PREFIX}{}",
                keys.join("__").to_ascii_uppercase()
            )
        }
        Some(other) => format!("{} {other}", md.name),
        None => md.name.to_string(),
    }
}

#[derive(Default)]
struct Validator {
    problems: Vec<(String, String)>,
}

impl Validator {
    fn fail(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push((key.to_owned(), message.into()));
    }

    fn check(&mut self, ok: bool, key: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.fail(key, message());
        }
    }

    fn positive(&mut self, key: &str, d: HumanDuration) {
        self.check(!d.get().is_zero(), key, || {
            "must be longer than zero".into()
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
        if value.is_empty() {
            self.fail(key, "must not be empty");
        } else if let Some(c) = value.chars().find(|c| forbidden.contains(c) || *c == '\0') {
            self.fail(key, format!("must not contain {c:?}"));
        }
    }

    fn http_url(&mut self, key: &str, value: &str) {
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
        ] {
            v.name(key, value, &['$']);
        }
        v.positive(
            "mongodb.server_selection_timeout",
            self.server_selection_timeout,
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
        if !self.ca_bundle.is_empty() {
            v.check(
                Path::new(&self.ca_bundle).is_file(),
                "cml.ca_bundle",
                || format!("{} is not a readable file", self.ca_bundle),
            );
        }
        v.positive("cml.connect_timeout", self.connect_timeout);
        v.positive("cml.request_timeout", self.request_timeout);
        v.range("cml.fallback_concurrency", self.fallback_concurrency, 1, 64);
    }
}

impl SyncConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(self.interval.get().as_secs() >= 1, "sync.interval", || {
            "must be at least 1s".into()
        });
        v.range("sync.concurrency", self.concurrency, 1, 1024);
        v.positive("sync.worker_deadline", self.worker_deadline);
        v.range("sync.history_limit", self.history_limit, 1, 1000);
        v.check(
            self.lease_ttl.get() >= std::time::Duration::from_secs(1),
            "sync.lease_ttl",
            || "must be at least 1s".into(),
        );
        v.positive("sync.retry_base", self.retry_base);
        v.socket_addr("sync.admin_listen", &self.admin_listen);
        if !self.workers_from_registry && self.static_workers.is_empty() {
            v.fail(
                "sync.workers_from_registry",
                "is false and sync.static_workers is empty: there is nothing to sync",
            );
        }
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
        v.positive("api.request_timeout", self.request_timeout);
        v.range(
            "api.max_concurrent_requests",
            self.max_concurrent_requests,
            1,
            1_000_000,
        );
        for (i, origin) in self.cors_allowed_origins.iter().enumerate() {
            if origin != "*" {
                v.http_url(&format!("api.cors_allowed_origins[{i}]"), origin);
            }
        }
        let auth = &self.auth;
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
                    !auth.token_hashes.is_empty(),
                    "api.auth.token_hashes",
                    || "must list at least one token hash when api.auth.mode is \"tokens\"".into(),
                );
            }
            AuthMode::None => {}
        }
        for (i, hash) in auth.token_hashes.iter().enumerate() {
            v.check(
                hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit()),
                &format!("api.auth.token_hashes[{i}]"),
                || "must be a SHA-256 digest in hex (64 characters)".into(),
            );
        }
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
        if !self.otlp_endpoint.is_empty() {
            v.http_url("telemetry.otlp_endpoint", &self.otlp_endpoint);
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return its large error type
mod tests {
    use figment::Jail;

    use super::*;

    fn load(role: Role) -> Result<Config, ConfigError> {
        Config::load(&ConfigSources::default(), role)
    }

    #[test]
    fn defaults_match_the_contract() {
        Jail::expect_with(|jail| {
            jail.set_env("CML_LABS_CML__PASSWORD", "pw");
            let c = load(Role::SyncDaemon).expect("defaults load");
            assert_eq!(c.mongodb.database, "cml_cloud_manager");
            assert_eq!(c.mongodb.lab_records_collection, "lab_records");
            assert_eq!(c.sync.interval, HumanDuration::from_secs(1800));
            assert_eq!(c.sync.history_limit, 50);
            assert_eq!(
                c.sync.removed_retention,
                HumanDuration::from_secs(7 * 86400)
            );
            assert_eq!(c.api.auth.mode, AuthMode::Jwt);
            Ok(())
        });
    }

    #[test]
    fn env_overrides_file_which_overrides_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "labs.toml",
                "[sync]\ninterval = \"10m\"\nconcurrency = 4\n[cml]\npassword = \"from-file\"\n",
            )?;
            jail.set_env("CML_LABS_CONFIG", "labs.toml");
            jail.set_env("CML_LABS_SYNC__CONCURRENCY", "8");
            jail.set_env("CML_LABS_CML__PASSWORD", "123456");
            let c = load(Role::SyncDaemon).expect("loads");
            assert_eq!(c.sync.interval, HumanDuration::from_secs(600));
            assert_eq!(c.sync.concurrency, 8);
            assert_eq!(c.cml.password.expose(), "123456");
            Ok(())
        });
    }

    #[test]
    fn a_bad_env_value_names_the_key_and_the_variable() {
        Jail::expect_with(|jail| {
            jail.set_env("CML_LABS_CML__PASSWORD", "pw");
            jail.set_env("CML_LABS_SYNC__CONCURRENCY", "0");
            let err = load(Role::SyncDaemon).expect_err("concurrency 0 is invalid");
            let text = err.to_string();
            assert!(text.contains("`sync.concurrency`"), "{text}");
            assert!(text.contains("CML_LABS_SYNC__CONCURRENCY"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn a_type_error_in_the_file_names_the_key_and_the_file() {
        Jail::expect_with(|jail| {
            jail.create_file("labs.toml", "[sync]\ninterval = \"often\"\n")?;
            let err = Config::load(
                &ConfigSources {
                    file: Some("labs.toml".into()),
                    skip_env: false,
                },
                Role::SyncDaemon,
            )
            .expect_err("bad duration");
            let text = err.to_string();
            assert!(text.contains("`sync.interval`"), "{text}");
            assert!(text.contains("labs.toml"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_rejected() {
        Jail::expect_with(|jail| {
            jail.create_file("labs.toml", "[sync]\nintervall = \"10m\"\n")?;
            jail.set_env("CML_LABS_CONFIG", "labs.toml");
            let err = load(Role::LabApi).expect_err("typo");
            assert!(err.to_string().contains("intervall"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("CML_LABS_MONGO__URI", "mongodb://x");
            let err = load(Role::LabApi).expect_err("typo in env section");
            assert!(err.to_string().contains("mongo"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        Jail::expect_with(|jail| {
            jail.set_env("CML_LABS_API__LISTEN", "nowhere");
            jail.set_env("CML_LABS_API__AUTH__MODE", "tokens");
            let err = load(Role::LabApi).expect_err("two problems");
            let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
            assert!(keys.contains(&"api.listen"), "{keys:?}");
            assert!(keys.contains(&"api.auth.token_hashes"), "{keys:?}");
            Ok(())
        });
    }

    #[test]
    fn roles_validate_only_their_sections() {
        Jail::expect_with(|_| {
            // No CML password: fine for the API, fatal for the daemon.
            let c = Config::from_figment(&Figment::new(), Role::LabApi);
            assert!(
                c.is_err(),
                "jwt mode without jwks_url is invalid for the API"
            );
            let err =
                Config::from_figment(&Figment::new(), Role::SyncDaemon).expect_err("no password");
            assert_eq!(err.0[0].key, "cml.password");
            Ok(())
        });
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let err = Config::load(
            &ConfigSources {
                file: Some("/nonexistent/labs.toml".into()),
                skip_env: true,
            },
            Role::LabApi,
        )
        .expect_err("missing file");
        assert!(err.to_string().contains("/nonexistent/labs.toml"));
    }

    #[test]
    fn redacted_toml_hides_secrets() {
        let mut c = Config::default();
        c.cml.password = Secret::new("s3cret");
        c.mongodb.uri = Secret::new("mongodb://u:pw@h");
        let text = c.to_redacted_toml();
        assert!(!text.contains("s3cret") && !text.contains("u:pw"), "{text}");
        assert!(text.contains("[redacted]"));
    }
}
