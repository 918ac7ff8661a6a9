//! `lab-api`: the read-only HTTP API over `lab_records`, in the shape the UI reads.

use std::{process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use cml_labs::{
    cli::{check_config, load_or_report, CheckConfigArgs, ConfigArgs},
    config::{AuthMode, Config, Role},
    mongo,
    status::SyncStatusStore,
    store::LabStore,
    telemetry::{bridge_prometheus, Telemetry},
};
use lab_api::{
    app::{app, AppState},
    auth::Authenticator,
    metrics::Metrics,
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "lab-api",
    version = cml_labs::cli::VERSION,
    about = "Serves lab records from MongoDB to the CML Cloud Manager UI."
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API until stopped (the default).
    Serve,
    /// Validate the configuration and check that MongoDB answers.
    CheckConfig(CheckConfigArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::CheckConfig(check)) = &cli.command {
        return check_config(&cli.config, check, Role::LabApi).await;
    }
    let config = match load_or_report(&cli.config, Role::LabApi) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let telemetry = Telemetry::init(&config.telemetry, "lab-api");
    let code = match serve(config, &telemetry).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "lab-api failed: {e:#}");
            ExitCode::FAILURE
        }
    };
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    code
}

async fn serve(config: Config, telemetry: &Telemetry) -> anyhow::Result<()> {
    if config.api.auth.mode == AuthMode::None {
        tracing::warn!("api.auth.mode is \"none\": every request is served without authentication");
    }
    let client = mongo::connect(&config.mongodb, "lab-api", None).await?;
    let db = client.database(&config.mongodb.database);
    let metrics = Arc::new(Metrics::default());
    if let Some(meter) = telemetry.meter("lab-api") {
        let m = metrics.clone();
        bridge_prometheus(&meter, Arc::new(move || m.render()));
    }
    let state = AppState {
        store: LabStore::new(&client, &config.mongodb, config.sync.history_limit),
        status: SyncStatusStore::new(&db, &config.mongodb.sync_status_collection),
        db,
        metrics,
    };
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()?;
    let auth = Arc::new(Authenticator::from_config(&config.api.auth, http));
    let router = app(state, auth, &config.api);
    let listener = tokio::net::TcpListener::bind(&config.api.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(address = %addr, auth = ?config.api.auth.mode, version = cml_labs::cli::VERSION, "lab-api listening on {addr}");
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("Shutting down: draining in-flight requests");
        trigger.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        std::process::exit(130);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    tracing::info!("lab-api stopped");
    Ok(())
}
