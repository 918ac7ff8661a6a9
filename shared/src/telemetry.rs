//! Logging set-up shared by both binaries: JSON lines in production, readable text locally.

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `telemetry.log_level`.
pub fn init_logging(cfg: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match cfg.log_format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
    };
    // A second call (tests) keeps the first subscriber.
    let _ = result;
}
