//! Telemetry set-up shared by both binaries: JSON or pretty logs, and OTLP export of traces
//! and of the metrics registry when `telemetry.otlp_endpoint` is set.

use std::sync::Arc;

use opentelemetry::{
    metrics::{Meter, MeterProvider},
    trace::TracerProvider,
    KeyValue,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{metrics::SdkMeterProvider, trace::SdkTracerProvider, Resource};
use tracing_subscriber::{
    filter::{LevelFilter, Targets},
    fmt,
    prelude::*,
    EnvFilter,
};

use crate::{
    config::{LogFormat, TelemetryConfig},
    metrics::{MetricKind, Registry, Value},
};

/// The project's own crates: only they may log below `info`.
const OURS: [&str; 8] = [
    "shared",
    "cml_client",
    "sync_daemon",
    "lab_api",
    "cml_sim",
    "labs_bench",
    "testkit",
    "system_tests",
];

/// A filter over whatever `RUST_LOG` or `telemetry.log_level` asks for: libraries log at
/// `info` at most. Below it they print what goes over the wire (tungstenite prints every frame,
/// the stream's first message and its token with it; HTTP and TLS libraries print requests),
/// and no setting may bring a secret into a log line.
pub fn libraries_capped() -> Targets {
    OURS.iter().fold(
        Targets::new().with_default(LevelFilter::INFO),
        |targets, ours| targets.with_target(*ours, LevelFilter::TRACE),
    )
}

/// Keeps the exporters alive; [`Telemetry::shutdown`] flushes what is buffered.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Installs the global subscriber (`RUST_LOG`, when set, wins over `telemetry.log_level`)
    /// and, with an OTLP endpoint, the span and metric exporters. `binary` names the service
    /// unless `telemetry.service_name` does.
    pub fn init(cfg: &TelemetryConfig, binary: &str) -> Telemetry {
        let filter = EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(&cfg.log_level))
            .unwrap_or_else(|_| EnvFilter::new("info"));
        let service = if cfg.service_name.is_empty() {
            binary.to_owned()
        } else {
            cfg.service_name.clone()
        };
        let endpoint = cfg.otlp_endpoint.trim_end_matches('/');
        let mut telemetry = Telemetry::default();
        let mut export_error = None;
        let otel_layer = if endpoint.is_empty() {
            None
        } else {
            let resource = Resource::builder()
                .with_service_name(service.clone())
                .with_attribute(KeyValue::new("service.version", crate::cli::VERSION))
                .build();
            match build_providers(endpoint, resource) {
                Ok((traces, metrics)) => {
                    let tracer = traces.tracer(service.clone());
                    telemetry.tracer_provider = Some(traces);
                    telemetry.meter_provider = Some(metrics);
                    Some(tracing_opentelemetry::layer().with_tracer(tracer))
                }
                Err(e) => {
                    export_error = Some(e);
                    None
                }
            }
        };
        let registry = tracing_subscriber::registry()
            .with(filter)
            .with(libraries_capped())
            .with(otel_layer);
        let _ = match cfg.log_format {
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
                .with(
                    fmt::layer()
                        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                        .with_writer(std::io::stderr),
                )
                .try_init(),
        };
        match (&export_error, endpoint.is_empty()) {
            (Some(e), _) => {
                tracing::error!(event = "otlp_export_failed", endpoint, error = %e, "Cannot set up OTLP export; continuing without it")
            }
            (None, false) => {
                tracing::info!(event = "otlp_export_started", endpoint, service = %service, "Exporting traces and metrics over OTLP")
            }
            (None, true) => {}
        }
        telemetry
    }

    /// A meter of the OTLP metric pipeline, when there is one.
    pub fn meter(&self, name: &'static str) -> Option<Meter> {
        self.meter_provider.as_ref().map(|p| p.meter(name))
    }

    /// Exports `registry` over OTLP too, when there is an OTLP endpoint.
    pub fn export_metrics(&self, name: &'static str, registry: Arc<Registry>) {
        if let Some(meter) = self.meter(name) {
            export_metrics(&meter, registry);
        }
    }

    /// Flushes and stops the exporters. They run on threads of their own and block while
    /// flushing, so this waits for them off the async runtime.
    pub async fn shutdown(self) {
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(p) = self.tracer_provider {
                let _ = p.shutdown();
            }
            if let Some(p) = self.meter_provider {
                let _ = p.shutdown();
            }
        })
        .await;
    }
}

fn build_providers(
    endpoint: &str,
    resource: Resource,
) -> Result<(SdkTracerProvider, SdkMeterProvider), String> {
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .build()
        .map_err(|e| e.to_string())?;
    let traces = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_resource(resource.clone())
        .build();
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/metrics"))
        .build()
        .map_err(|e| e.to_string())?;
    let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(metrics)
        .with_interval(std::time::Duration::from_secs(15))
        .build();
    let meters = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource)
        .build();
    Ok((traces, meters))
}

/// Exports every family of `registry` through an OTLP meter as well: counters and gauges as
/// observable instruments, histograms as their `_sum` and `_count`. Each export reads the
/// series straight from the registry: one source of truth, two exports.
pub fn export_metrics(meter: &Meter, registry: Arc<Registry>) {
    for (index, desc) in registry.families().iter().enumerate() {
        let read = {
            let registry = registry.clone();
            move || registry.families()[index].series()
        };
        match desc.kind {
            MetricKind::Counter => {
                meter
                    .u64_observable_counter(format!("{}_total", desc.name))
                    .with_description(desc.help)
                    .with_callback(move |o| {
                        for s in read() {
                            if let Value::Counter(n) = s.value {
                                o.observe(n, &attributes(&s.labels));
                            }
                        }
                    })
                    .build();
            }
            MetricKind::Gauge => {
                meter
                    .f64_observable_gauge(desc.name)
                    .with_description(desc.help)
                    .with_callback(move |o| {
                        for s in read() {
                            if let Value::Gauge(g) = s.value {
                                o.observe(g, &attributes(&s.labels));
                            }
                        }
                    })
                    .build();
            }
            MetricKind::Histogram => {
                let read_count = read.clone();
                meter
                    .f64_observable_counter(format!("{}_sum", desc.name))
                    .with_description(desc.help)
                    .with_callback(move |o| {
                        for s in read() {
                            if let Value::Histogram(h) = s.value {
                                o.observe(h.sum, &attributes(&s.labels));
                            }
                        }
                    })
                    .build();
                meter
                    .u64_observable_counter(format!("{}_count", desc.name))
                    .with_description(desc.help)
                    .with_callback(move |o| {
                        for s in read_count() {
                            if let Value::Histogram(h) = s.value {
                                o.observe(h.count, &attributes(&s.labels));
                            }
                        }
                    })
                    .build();
            }
        }
    }
}

fn attributes(labels: &[crate::metrics::Label]) -> Vec<KeyValue> {
    labels
        .iter()
        .map(|(k, v)| KeyValue::new(*k, v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log lines written into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn libraries_never_log_below_info_whatever_the_level_asked() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new("trace"))
            .with(libraries_capped())
            .with(fmt::layer().with_writer(move || writer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!(target: "tungstenite::protocol", "Sending frame: token-in-a-frame");
            tracing::debug!(target: "hyper_util::client", "authorization: token-in-a-header");
            tracing::info!(target: "mongodb::connection", "library info line");
            tracing::trace!(target: "sync_daemon::trigger::events", "our trace line");
            tracing::debug!(target: "cml_client::client", "our debug line");
        });
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        assert!(!text.contains("token-in-a"), "{text}");
        for line in ["library info line", "our trace line", "our debug line"] {
            assert!(text.contains(line), "{line} missing: {text}");
        }
    }
}
