//! `cml-sim`: serves a simulated CML fleet on loopback for local runs, demos and tests.

use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use cml_sim::{registry, Addressing, Fleet, FleetConfig, Personality, RunningFleet, ServeOptions};
use shared::duration::HumanDuration;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "cml-sim",
    version,
    about = "A fleet of simulated CML servers with fault injection."
)]
struct Cli {
    #[arg(long, default_value_t = 5)]
    workers: usize,
    #[arg(long, default_value_t = 20)]
    labs_per_worker: usize,
    /// Same seed, same fleet.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// CML releases to imitate, assigned round-robin (2.4, 2.9, 2.10).
    #[arg(long, value_delimiter = ',', default_value = "2.4,2.9,2.10")]
    versions: Vec<String>,
    #[arg(long, value_enum, default_value_t = Addressing::Ports)]
    addressing: Addressing,
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port of prefix addressing (0: any).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Port of the control API (0: any).
    #[arg(long, default_value_t = 0)]
    control_port: u16,
    /// Serve HTTPS with a generated certificate (its CA goes to STATE_DIR/ca.pem).
    #[arg(long)]
    tls: bool,
    /// Where `endpoints.json` (and `ca.pem`) are written.
    #[arg(long, default_value = ".local/cml-sim")]
    state_dir: PathBuf,
    #[arg(long, default_value = "admin")]
    username: String,
    #[arg(
        long,
        env = "CML_SIM_PASSWORD",
        default_value = "local-dev-password",
        hide_env_values = true
    )]
    password: String,
    /// Token lifetime, e.g. 24h or 30s.
    #[arg(long, default_value = "24h", value_parser = humantime_duration)]
    token_ttl: Duration,
    /// Change the state of a share of labs every so often (e.g. 60s); off when absent.
    #[arg(long, value_parser = humantime_duration)]
    churn_every: Option<Duration>,
    #[arg(long, default_value_t = 0.1)]
    churn_share: f64,
    /// Latency added to every API call of every worker (milliseconds).
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// How often `/ws/ui` streams get `system_stats` and `lab_stats` (a real server: ~3.3 s).
    #[arg(long, default_value = "3300ms", value_parser = humantime_duration)]
    stats_every: Duration,
    /// More users on every server (`user-000`…, password `<name>-password`), in teams of ten
    /// that each see a share of the labs (every lab is shared with one team in turn).
    #[arg(long, default_value_t = 0)]
    users: usize,
    /// Write the fleet into this MongoDB's worker registry.
    #[arg(long, env = "CML_SIM_MONGODB_URI", hide_env_values = true)]
    mongodb_uri: Option<String>,
    #[arg(long, default_value = "cml_cloud_manager")]
    mongodb_database: String,
    #[arg(long, default_value = "cml_workers")]
    workers_collection: String,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    s.parse::<HumanDuration>().map(HumanDuration::get)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let opts = ServeOptions {
        host: cli.host,
        addressing: cli.addressing,
        port: cli.port,
        tls: cli.tls,
        state_dir: Some(cli.state_dir.clone()),
    };
    let running = cml_sim::start(&fleet_config(&cli)?, &opts)
        .await
        .context("cannot serve the fleet")?;
    let control_url = serve_control(&cli, &running).await?;
    let summary = serde_json::json!({
        "control": control_url,
        "workers": running.endpoints,
        "ca_file": running.ca_path,
    });
    cml_sim::server::write_file(
        &cli.state_dir,
        "endpoints.json",
        &serde_json::to_string_pretty(&summary)?,
    )?;
    if let Some(uri) = &cli.mongodb_uri {
        register(&cli, uri, &running).await?;
    }
    tracing::info!(
        workers = cli.workers, labs_per_worker = cli.labs_per_worker, control = %control_url,
        endpoints = %cli.state_dir.join("endpoints.json").display(),
        "Simulated CML fleet ready"
    );
    println!(
        "cml-sim ready control={control_url} state_dir={}",
        cli.state_dir.display()
    );
    if let Some(every) = cli.churn_every {
        tokio::spawn(churn(running.fleet.clone(), every, cli.churn_share));
    }
    shared::service::shutdown_signal().cancelled().await;
    tracing::info!("Stopping the simulated fleet");
    drop(running);
    Ok(())
}

fn fleet_config(cli: &Cli) -> anyhow::Result<FleetConfig> {
    let personalities = cli
        .versions
        .iter()
        .map(|v| {
            Personality::parse(v)
                .with_context(|| format!("unknown CML version {v} (2.4, 2.9 or 2.10)"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(FleetConfig {
        workers: cli.workers,
        labs_per_worker: cli.labs_per_worker,
        seed: cli.seed,
        personalities,
        username: cli.username.clone(),
        password: cli.password.clone(),
        token_ttl: cli.token_ttl,
        latency: Duration::from_millis(cli.latency_ms),
        stats_interval: cli.stats_every,
        users: cli.users,
    })
}

/// Serves the control API; returns its URL.
async fn serve_control(cli: &Cli, running: &RunningFleet) -> anyhow::Result<String> {
    let control = tokio::net::TcpListener::bind((cli.host, cli.control_port))
        .await
        .context("cannot bind the control port")?;
    let url = format!("http://{}", control.local_addr()?);
    let router = cml_sim::control::router(running.fleet.clone(), running.endpoints.clone());
    tokio::spawn(async move { axum::serve(control, router).await });
    Ok(url)
}

/// Writes the fleet into the worker registry at `uri`.
async fn register(cli: &Cli, uri: &str, running: &RunningFleet) -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(uri)
        .await
        .context("bad --mongodb-uri")?;
    let n = registry::write_registry(
        &client,
        &cli.mongodb_database,
        &cli.workers_collection,
        &running.fleet,
        &running.endpoints,
    )
    .await
    .context("cannot write the worker registry")?;
    tracing::info!(workers = n, database = %cli.mongodb_database, "Wrote the workers into the registry");
    Ok(())
}

/// Moves a share of the labs to another state every so often (demos and benchmarks).
async fn churn(fleet: Arc<Fleet>, every: Duration, share: f64) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let changed = fleet.churn(share, 0);
        tracing::info!(changed, "Churned lab states");
    }
}
