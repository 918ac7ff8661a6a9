//! `sync-daemon`: keeps `lab_records` in MongoDB in step with every CML worker of the fleet.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shared::{
    cli::{check_config, load_or_report, CheckConfigArgs, ConfigArgs},
    config::{Config, Role},
    service::shutdown_signal,
    telemetry::Telemetry,
};
use sync_daemon::{app, context::Context, daemon};

#[derive(Debug, Parser)]
#[command(
    name = "sync-daemon",
    version = shared::cli::VERSION,
    about = "Polls every CML worker and keeps lab_records in MongoDB up to date."
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sync at start and every interval until stopped (the default).
    Run,
    /// One cycle, then exit; non-zero when any worker failed (for CronJobs and tests).
    Once {
        /// Sync only this worker.
        #[arg(long)]
        worker: Option<String>,
    },
    /// Validate the configuration and check that MongoDB answers.
    CheckConfig(CheckConfigArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::CheckConfig(check) = &command {
        return check_config(&cli.config, check, Role::SyncDaemon).await;
    }
    let config = match load_or_report(&cli.config, Role::SyncDaemon) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let telemetry = Telemetry::init(&config.telemetry, "sync-daemon");
    let code = match command {
        Command::Once { worker } => once(config, worker.as_deref(), &telemetry).await,
        _ => run(config, &telemetry).await,
    };
    telemetry.shutdown().await;
    code
}

async fn run(config: Config, telemetry: &Telemetry) -> ExitCode {
    let app = match app::App::build(config, &app::instance_name()).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(event = "start_failed", error = %e, "Cannot start");
            return ExitCode::FAILURE;
        }
    };
    telemetry.export_metrics("sync-daemon", app.context().metrics.registry.clone());
    match app.run(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(event = "daemon_failed", error = %e, "sync-daemon failed");
            ExitCode::FAILURE
        }
    }
}

/// Exit codes as documented: 0 all synced, 1 some worker failed, 2 the cycle could not run.
async fn once(config: Config, worker: Option<&str>, telemetry: &Telemetry) -> ExitCode {
    let ctx = match Context::build(config, &app::instance_name()).await {
        Ok(ctx) => ctx,
        Err(e) => {
            tracing::error!(event = "start_failed", error = %e, "Cannot start");
            return ExitCode::from(2);
        }
    };
    telemetry.export_metrics("sync-daemon", ctx.metrics.registry.clone());
    match daemon::once(ctx, worker, shutdown_signal()).await {
        Ok(report) if report.outcome() == "success" => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            tracing::error!(event = "cycle_failed", error = %e, kind = e.metric_label(), "The cycle could not run");
            ExitCode::from(2)
        }
    }
}
