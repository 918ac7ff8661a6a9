//! `sync-daemon`: keeps `lab_records` in MongoDB in step with every CML worker of the fleet.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cml_labs::{
    cli::{check_config, CheckConfigArgs, ConfigArgs},
    config::Role,
};

#[derive(Debug, Parser)]
#[command(
    name = "sync-daemon",
    version,
    about = "Polls every CML worker and keeps lab_records in MongoDB up to date."
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration and check that MongoDB answers.
    CheckConfig(CheckConfigArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig(check) => check_config(&cli.config, &check, Role::SyncDaemon).await,
    }
}
