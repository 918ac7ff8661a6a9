//! `lab-api`: the read-only HTTP API over `lab_records`, in the shape the UI reads.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cml_labs::{
    cli::{check_config, CheckConfigArgs, ConfigArgs},
    config::Role,
};

#[derive(Debug, Parser)]
#[command(
    name = "lab-api",
    version,
    about = "Serves lab records from MongoDB to the CML Cloud Manager UI."
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
        Command::CheckConfig(check) => check_config(&cli.config, &check, Role::LabApi).await,
    }
}
