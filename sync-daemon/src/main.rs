//! `sync-daemon`: keeps `lab_records` in MongoDB in step with every CML worker of the fleet.

use std::{process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use cml_labs::{
    cli::{check_config, load_or_report, CheckConfigArgs, ConfigArgs},
    config::Role,
    telemetry::{bridge_prometheus, Telemetry},
};
use sync_daemon::{admin, context::Context, daemon};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "sync-daemon",
    version = cml_labs::cli::VERSION,
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
    let instance = instance_name();
    let ctx = match Context::build(config, &instance).await {
        Ok(ctx) => ctx,
        Err(e) => {
            tracing::error!(error = %e, "Cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(meter) = telemetry.meter("sync-daemon") {
        let metrics = ctx.metrics.clone();
        bridge_prometheus(&meter, Arc::new(move || metrics.render()));
    }
    let shutdown = shutdown_on_signals();
    let code = match command {
        Command::Run => {
            tracing::info!(instance = %instance, version = cml_labs::cli::VERSION, "sync-daemon starting");
            let admin = match admin::serve(ctx.clone(), shutdown.clone()).await {
                Ok(handle) => handle,
                Err(e) => {
                    tracing::error!(error = %e, "Cannot start: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = daemon::run(ctx, shutdown.clone()).await;
            shutdown.cancel();
            let _ = admin.await;
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "sync-daemon failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Once { worker } => match daemon::once(ctx, worker.as_deref(), shutdown).await {
            Ok(report) if report.failed.is_empty() && report.skipped.is_empty() => {
                ExitCode::SUCCESS
            }
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                tracing::error!(error = %e, kind = e.metric_label(), "The cycle could not run: {e}");
                ExitCode::from(2)
            }
        },
        Command::CheckConfig(_) => unreachable!("handled above"),
    };
    // The exporters flush on threads of their own; wait for them off the runtime.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    code
}

/// This replica's name in the lease: the pod name (HOSTNAME) plus a random suffix.
fn instance_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "sync-daemon".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}

/// The first SIGTERM/SIGINT cancels the token (drain); a second one exits at once.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("Cannot install signal handlers");
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("Shutting down: no new worker syncs start; in-flight ones may finish");
        trigger.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("Second signal: exiting at once");
        std::process::exit(130);
    });
    token
}
