//! `sync-daemon`: keeps `lab_records` in MongoDB in step with every CML worker of the fleet.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shared::{
    cli::{check_config, load_or_report, CheckConfigArgs, ConfigArgs},
    config::{Config, Role},
    duration::HumanDuration,
    service::shutdown_signal,
    sync_request::RequestStatus,
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
    /// Refresh one worker now: the lease holder (this or another replica) syncs it, as lab-api's
    /// refresh does; prints the outcome. Exit codes as `once`.
    Refresh {
        /// The worker's id.
        worker_id: String,
        /// How long to wait for the outcome (`0s`: record the request and return).
        #[arg(long, default_value = "30s")]
        wait: HumanDuration,
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
        Command::Refresh { worker_id, wait } => refresh(config, &worker_id, wait.get()).await,
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

/// Exit codes as `once`: 0 refreshed (or recorded, without waiting), 1 the sync failed, 2 the
/// refresh could not run (unknown or stopped worker, throttled, MongoDB, no outcome in time).
async fn refresh(config: Config, worker_id: &str, wait: std::time::Duration) -> ExitCode {
    let ctx = match Context::build(config, &app::instance_name()).await {
        Ok(ctx) => ctx,
        Err(e) => {
            tracing::error!(event = "start_failed", error = %e, "Cannot start");
            return ExitCode::from(2);
        }
    };
    let request = match daemon::refresh(&ctx, worker_id, wait).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Cannot refresh worker {worker_id}: {e}");
            return ExitCode::from(2);
        }
    };
    let id = &request.id;
    match (request.status, request.counts) {
        (RequestStatus::Done, Some(c)) => {
            println!(
                "Worker {worker_id} refreshed: synced={}, created={}, updated={}, removed={}, duration_ms={} (request {id})",
                c.synced, c.created, c.updated, c.removed, request.duration_ms.unwrap_or(0)
            );
            ExitCode::SUCCESS
        }
        (RequestStatus::Failed, _) | (RequestStatus::Done, None) => {
            println!(
                "Worker {worker_id} could not be refreshed ({}): {} (request {id})",
                request.error_kind.as_deref().unwrap_or("unknown"),
                request.error.as_deref().unwrap_or("")
            );
            ExitCode::FAILURE
        }
        (status, _) if wait.is_zero() => {
            println!("Refresh of worker {worker_id} recorded ({status:?}): request {id}");
            ExitCode::SUCCESS
        }
        (status, _) => {
            println!(
                "Refresh of worker {worker_id} is still {} after {} s (request {id}): is a \
                 sync-daemon replica running and holding the lease?",
                format!("{status:?}").to_lowercase(),
                wait.as_secs()
            );
            ExitCode::from(2)
        }
    }
}
