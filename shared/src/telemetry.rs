//! Telemetry set-up shared by both binaries: JSON or pretty logs, and OTLP export of traces
//! and metrics when `telemetry.otlp_endpoint` is set.

use std::sync::Arc;

use opentelemetry::{
    metrics::{Meter, MeterProvider},
    trace::TracerProvider,
    KeyValue,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{metrics::SdkMeterProvider, trace::SdkTracerProvider, Resource};
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::{LogFormat, TelemetryConfig};

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
        let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
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
                .with(fmt::layer().with_writer(std::io::stderr))
                .try_init(),
        };
        match (&export_error, endpoint.is_empty()) {
            (Some(e), _) => {
                tracing::error!(endpoint, error = %e, "Cannot set up OTLP export; continuing without it")
            }
            (None, false) => {
                tracing::info!(endpoint, service = %service, "Exporting traces and metrics over OTLP to {endpoint}")
            }
            (None, true) => {}
        }
        telemetry
    }

    /// A meter of the OTLP metric pipeline, when there is one.
    pub fn meter(&self, name: &'static str) -> Option<Meter> {
        self.meter_provider.as_ref().map(|p| p.meter(name))
    }

    /// Flushes and stops the exporters (they run on threads of their own, so this blocks).
    pub fn shutdown(self) {
        if let Some(p) = self.tracer_provider {
            let _ = p.shutdown();
        }
        if let Some(p) = self.meter_provider {
            let _ = p.shutdown();
        }
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

/// Installs only the log subscriber (tests and tools).
pub fn init_logging(cfg: &TelemetryConfig) {
    let plain = TelemetryConfig {
        otlp_endpoint: String::new(),
        ..cfg.clone()
    };
    let _ = Telemetry::init(&plain, "cml-labs");
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// The kind of a metric family, from its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FamilyKind {
    Counter,
    Gauge,
    Histogram,
}

/// Parses a Prometheus/OpenMetrics text exposition: the families (`# TYPE`) and the samples.
pub fn parse_exposition(text: &str) -> (Vec<(String, FamilyKind)>, Vec<Sample>) {
    let mut families = Vec::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let kind = match kind {
                "counter" => FamilyKind::Counter,
                "gauge" => FamilyKind::Gauge,
                "histogram" => FamilyKind::Histogram,
                _ => continue,
            };
            families.push((name.to_owned(), kind));
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (head, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
            None => (head, Vec::new()),
        };
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    (families, samples)
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_owned();
        let after = &rest[eq + 2..];
        // Label values escape `"` and `\`; find the closing quote.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key, value));
        rest = &after[end..];
    }
    out
}

/// Exports the metrics of a Prometheus registry through an OTLP meter as well: every counter
/// and gauge (and the `_sum`/`_count` of every histogram) becomes an observable instrument
/// read from `render` at each export. One source of truth, two exports.
pub fn bridge_prometheus(meter: &Meter, render: Arc<dyn Fn() -> String + Send + Sync>) {
    let (families, _) = parse_exposition(&render());
    for (family, kind) in families {
        let series: Vec<(String, bool)> = match kind {
            FamilyKind::Counter => vec![(format!("{family}_total"), true)],
            FamilyKind::Gauge => vec![(family.clone(), false)],
            FamilyKind::Histogram => vec![
                (format!("{family}_sum"), true),
                (format!("{family}_count"), true),
            ],
        };
        for (sample_name, monotonic) in series {
            let render = render.clone();
            let wanted = sample_name.clone();
            let read = move || -> Vec<(f64, Vec<KeyValue>)> {
                parse_exposition(&render())
                    .1
                    .into_iter()
                    .filter(|s| s.name == wanted)
                    .map(|s| {
                        (
                            s.value,
                            s.labels
                                .into_iter()
                                .map(|(k, v)| KeyValue::new(k, v))
                                .collect(),
                        )
                    })
                    .collect()
            };
            if monotonic {
                meter
                    .f64_observable_counter(sample_name)
                    .with_callback(move |o| {
                        for (v, attrs) in read() {
                            o.observe(v, &attrs);
                        }
                    })
                    .build();
            } else {
                meter
                    .f64_observable_gauge(sample_name)
                    .with_callback(move |o| {
                        for (v, attrs) in read() {
                            o.observe(v, &attrs);
                        }
                    })
                    .build();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_families_samples_and_escaped_labels() {
        let text = "# HELP a_total things\n# TYPE a counter\na_total{kind=\"x\",path=\"q\\\"uote\"} 3\n\
                    # TYPE g gauge\ng 1.5\n# TYPE h histogram\nh_sum 2.0\nh_count 4\nh_bucket{le=\"0.5\"} 1\n# EOF\n";
        let (families, samples) = parse_exposition(text);
        assert_eq!(
            families,
            vec![
                ("a".into(), FamilyKind::Counter),
                ("g".into(), FamilyKind::Gauge),
                ("h".into(), FamilyKind::Histogram)
            ]
        );
        assert_eq!(
            samples[0],
            Sample {
                name: "a_total".into(),
                labels: vec![
                    ("kind".into(), "x".into()),
                    ("path".into(), "q\"uote".into())
                ],
                value: 3.0
            }
        );
        assert_eq!(samples[1].value, 1.5);
        assert_eq!(
            samples.iter().filter(|s| s.name.starts_with("h_")).count(),
            3
        );
    }
}
