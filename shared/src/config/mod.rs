//! Loading the configuration both binaries read: defaults, then a TOML file, then `CML_LABS_*`
//! environment variables; every problem reported at once with its dotted key and its source.
//!
//! The names are a contract with operators and manifests (see the README's reference). The
//! sections are in [`sections`], the checks serde cannot express in [`validate`].

mod sections;
mod validate;

use std::{fmt, path::PathBuf};

use figment::{
    providers::{Env, Format, Toml},
    Figment, Metadata, Source,
};

pub use sections::*;

/// Environment variable naming the TOML file when `--config` is not given.
pub const CONFIG_PATH_ENV: &str = "CML_LABS_CONFIG";
/// Prefix of every environment override; sections are nested with `__`.
pub const ENV_PREFIX: &str = "CML_LABS_";

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
    /// Ignore `CML_LABS_*` overrides in the process environment (tests set this).
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

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return its large error type
mod tests {
    use figment::Jail;

    use super::*;
    use crate::{duration::HumanDuration, secret::Secret};

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

    /// The streams' budget must hold one message; the new bounds of the watch are ranged.
    #[test]
    fn the_stream_budget_and_watch_bounds_are_checked_with_their_keys() {
        Jail::expect_with(|jail| {
            jail.set_env("CML_LABS_CML__PASSWORD", "pw");
            jail.set_env("CML_LABS_SYNC__EVENTS__MAX_MESSAGE_BYTES", "4194304");
            jail.set_env("CML_LABS_SYNC__EVENTS__BUFFER_BYTES", "2097152");
            jail.set_env("CML_LABS_SYNC__EVENTS__HEALTHY_AFTER", "0s");
            jail.set_env("CML_LABS_SYNC__EVENTS__RELIST_MIN_INTERVAL", "2d");
            let err = load(Role::SyncDaemon).expect_err("out of bounds");
            let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
            assert_eq!(
                keys,
                [
                    "sync.events.buffer_bytes",
                    "sync.events.healthy_after",
                    "sync.events.relist_min_interval"
                ],
                "{err}"
            );
            assert!(
                err.to_string().contains("no stream could hold one message"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn durations_too_long_to_add_to_a_clock_are_refused_with_their_key() {
        Jail::expect_with(|jail| {
            jail.set_env("CML_LABS_CML__PASSWORD", "pw");
            jail.set_env("CML_LABS_SYNC__INTERVAL", "18446744073709551615s");
            jail.set_env("CML_LABS_SYNC__RETRY_BASE", "0s");
            jail.set_env("CML_LABS_API__REQUEST_TIMEOUT", "100years");
            let err = load(Role::SyncDaemon).expect_err("too long");
            let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
            assert_eq!(keys, ["sync.interval", "sync.retry_base"], "{err}");
            assert!(err.to_string().contains("CML_LABS_SYNC__INTERVAL"), "{err}");
            let err = load(Role::LabApi).expect_err("too long");
            let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
            // lab-api reads the interval too (twice it is the fleet view's staleness).
            assert_eq!(keys[..2], ["sync.interval", "api.request_timeout"], "{err}");
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
            jail.set_env("CML_LABS_API__AUTH__COOKIE_NAME", "session id");
            let err = load(Role::LabApi).expect_err("three problems");
            let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
            assert!(keys.contains(&"api.listen"), "{keys:?}");
            assert!(keys.contains(&"api.auth.token_hashes"), "{keys:?}");
            assert!(keys.contains(&"api.auth.cookie_name"), "{keys:?}");
            Ok(())
        });
    }

    #[test]
    fn roles_validate_only_their_sections() {
        // Each file is broken only in the sections of one binary.
        let daemon_broken = "[cml]\npassword = \"\"\n[sync]\nconcurrency = 0\n\
                             [api.auth]\nmode = \"none\"\n";
        let api_broken = "[cml]\npassword = \"pw\"\n[api]\nlisten = \"nowhere\"\n\
                          [api.auth]\nmode = \"none\"\n";
        let load =
            |toml: &str, role| Config::from_figment(&Figment::from(Toml::string(toml)), role);
        assert!(
            load(daemon_broken, Role::LabApi).is_ok(),
            "the API ignores cml and sync"
        );
        assert!(
            load(api_broken, Role::SyncDaemon).is_ok(),
            "the daemon ignores api"
        );
        let keys = |toml: &str, role| -> Vec<String> {
            let err = load(toml, role).expect_err("broken for this role");
            err.0.into_iter().map(|p| p.key).collect()
        };
        assert_eq!(
            keys(daemon_broken, Role::SyncDaemon),
            ["cml.password", "sync.concurrency"]
        );
        assert_eq!(keys(api_broken, Role::LabApi), ["api.listen"]);
    }

    /// Every key of the configuration, dotted, with its default (secrets are left out of the
    /// comparison: they serialise redacted).
    fn keys(value: &toml::Value, prefix: &str, out: &mut Vec<(String, toml::Value)>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    keys(v, &path, out);
                }
            }
            leaf => out.push((prefix.to_owned(), leaf.clone())),
        }
    }

    /// Each binary validates every key it reads: a key added to a role's reads without a check
    /// (or a new key of a section a role reads) fails here.
    #[test]
    fn each_role_validates_every_key_it_reads() {
        let defaults = toml::Value::try_from(Config::default()).expect("defaults serialise");
        let mut all = Vec::new();
        keys(&defaults, "", &mut all);
        for role in [Role::SyncDaemon, Role::LabApi] {
            let validated = Config::default().validated_keys(role);
            let read: Vec<&str> = all
                .iter()
                .map(|(k, _)| k.as_str())
                .filter(|k| role.reads_key(k))
                .collect();
            for key in &read {
                assert!(
                    validated.contains(*key),
                    "{role:?} reads `{key}` but does not validate it"
                );
            }
            for key in &validated {
                assert!(
                    role.reads_key(key),
                    "{role:?} validates `{key}` it does not read"
                );
            }
            for read in role.reads() {
                assert!(
                    all.iter()
                        .any(|(k, _)| role.reads_key(k) && k.starts_with(read)),
                    "{role:?} reads `{read}`, which is no key"
                );
            }
        }
    }

    #[test]
    fn lab_api_refuses_what_it_reads_of_the_sync_section() {
        // Twice an interval this long overflows a clock; lab-api computes it at start.
        let toml = "[sync]\ninterval = \"100000000d\"\nrefresh_min_interval = \"0s\"\n\
                    [api.auth]\nmode = \"none\"\n";
        let err = Config::from_figment(&Figment::from(Toml::string(toml)), Role::LabApi)
            .expect_err("refused");
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["sync.interval", "sync.refresh_min_interval"]);
        let mut longest = Config::default();
        longest.api.auth.mode = AuthMode::None;
        longest.sync.interval = HumanDuration::from_secs(7 * 86_400);
        assert!(
            longest.validate(Role::LabApi).is_empty(),
            "the longest interval allowed"
        );
        assert!(longest.sync.interval.get().checked_mul(2).is_some());
    }

    #[test]
    fn the_example_file_and_the_readme_list_every_key_with_its_default() {
        let example: toml::Value =
            toml::from_str(include_str!("../../../config/example.toml")).expect("example parses");
        let readme = include_str!("../../../README.md");
        let defaults = toml::Value::try_from(Config::default()).expect("defaults serialise");
        let mut all = Vec::new();
        keys(&defaults, "", &mut all);
        assert!(all.len() > 30, "{all:?}");
        for (path, default) in all {
            let leaf = path.rsplit('.').next().unwrap_or(&path);
            assert!(
                readme.contains(&format!("`{path}`")) || readme.contains(&format!("`{leaf}`")),
                "the README's configuration reference does not name `{path}`"
            );
            if path == "sync.static_workers" {
                continue; // an example list, commented out in the file
            }
            let listed = path
                .split('.')
                .try_fold(&example, |v, k| v.get(k))
                .unwrap_or_else(|| panic!("config/example.toml does not list `{path}`"));
            if !["mongodb.uri", "cml.password"].contains(&path.as_str()) {
                // Durations may be spelt otherwise ("7d", "7days"): compare what they mean.
                let duration = |v: &toml::Value| v.as_str()?.parse::<HumanDuration>().ok();
                let same = match (duration(listed), duration(&default)) {
                    (Some(a), Some(b)) => a == b,
                    _ => listed == &default,
                };
                assert!(
                    same,
                    "config/example.toml: `{path}` is {listed}, its default {default}"
                );
            }
        }
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
