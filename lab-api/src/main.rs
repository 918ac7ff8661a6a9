//! `lab-api`: the read-only HTTP API over `lab_records`, in the shape the UI reads.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lab_api::{
    app::App,
    logs::{ApiFailed, LogLine, StartFailed},
};
use shared::{
    cli::{check_config, load_or_report, CheckConfigArgs, ConfigArgs},
    config::{Config, Role},
    service::shutdown_signal,
    telemetry::Telemetry,
};

#[derive(Debug, Parser)]
#[command(
    name = "lab-api",
    version = shared::cli::VERSION,
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
    let code = serve(&config, &telemetry).await;
    telemetry.shutdown().await;
    code
}

async fn serve(config: &Config, telemetry: &Telemetry) -> ExitCode {
    let app = match App::build(config).await {
        Ok(app) => app,
        Err(e) => {
            StartFailed { error: &e }.emit();
            return ExitCode::FAILURE;
        }
    };
    telemetry.export_metrics("lab-api", app.registry());
    match app.run(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            ApiFailed { error: &e }.emit();
            ExitCode::FAILURE
        }
    }
}
