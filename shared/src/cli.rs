//! Command-line pieces both binaries share: the `--config` option and `check-config`.

use std::{path::PathBuf, process::ExitCode};

use crate::{
    config::{Config, ConfigSources, Role},
    mongo,
    secret::{redact_uri, scrub},
};

/// The version both binaries report: `BUILD_VERSION` when the build set it (container images
/// bake in `<version>+<git revision>`), the crate version otherwise.
pub const VERSION: &str = match option_env!("BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Where the configuration file is; `CML_LABS_CONFIG` when not given.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file (defaults → this file → CML_LABS_* environment variables).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

impl ConfigArgs {
    pub fn sources(&self) -> ConfigSources {
        ConfigSources {
            file: self.config.clone(),
            skip_env: false,
        }
    }
}

/// Options of `check-config`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckConfigArgs {
    /// Only validate; do not try to reach MongoDB.
    #[arg(long)]
    pub offline: bool,
    /// Print the effective configuration (secrets redacted).
    #[arg(long)]
    pub print: bool,
}

/// Exit code of an invalid configuration (`EX_CONFIG` of sysexits).
pub const EXIT_BAD_CONFIG: u8 = 78;
/// Exit code when a dependency (MongoDB) cannot be reached (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Loads the configuration for `role`, or prints every problem and returns the exit code.
pub fn load_or_report(args: &ConfigArgs, role: Role) -> Result<Config, ExitCode> {
    Config::load(&args.sources(), role).map_err(|e| {
        eprintln!("configuration is invalid:");
        for problem in &e.0 {
            eprintln!("  - {problem}");
        }
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

/// `check-config`: validate, optionally print, then check that MongoDB answers.
pub async fn check_config(args: &ConfigArgs, check: &CheckConfigArgs, role: Role) -> ExitCode {
    let config = match load_or_report(args, role) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!("configuration is valid");
    for note in config.notes(role) {
        println!("note: {note}");
    }
    if check.print {
        print!("{}", config.to_redacted_toml());
    }
    if check.offline {
        return ExitCode::SUCCESS;
    }
    let target = redact_uri(config.mongodb.uri.expose());
    let name = match role {
        Role::SyncDaemon => "sync-daemon",
        Role::LabApi => "lab-api",
    };
    let reached = async {
        let client = mongo::connect(&config.mongodb, name, None).await?;
        let db = client.database(&config.mongodb.database);
        mongo::ping(&db).await?;
        mongo::server_info(&db).await
    }
    .await;
    match reached {
        Ok(info) => {
            println!(
                "MongoDB at {target} answers (server {}, wire version {}); database `{}`",
                info.version, info.max_wire_version, config.mongodb.database
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let why = scrub(&e.to_string(), config.mongodb.uri.expose());
            eprintln!("MongoDB at {target} cannot be reached: {why}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}
