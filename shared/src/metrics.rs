//! Metrics of both services: counters, gauges and histograms in one registry, rendered as
//! OpenMetrics text for `/metrics` and read directly (never re-parsed) by the OTLP bridge.
//!
//! Labels come from closed sets by construction: a label set is a type of ours, and every label
//! value it yields is a `&'static str` (an error kind, an outcome, a route template) or a number
//! from a bounded range. Nothing a client or a CML server sends can mint a new series.

use std::{
    collections::HashMap,
    fmt::Write as _,
    hash::Hash,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
};

/// One label: its name and a value from a closed set.
pub type Label = (&'static str, LabelValue);

/// A label value: a static name, a name from a set fixed at start (route templates), or a
/// number from a bounded range (an HTTP status).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LabelValue {
    Name(&'static str),
    Known(Arc<str>),
    Number(u16),
}

impl std::fmt::Display for LabelValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabelValue::Name(s) => f.write_str(s),
            LabelValue::Known(s) => f.write_str(s),
            LabelValue::Number(n) => write!(f, "{n}"),
        }
    }
}

/// The labels of one series of a family.
pub trait LabelSet: Clone + Eq + Hash + Send + Sync + 'static {
    fn labels(&self) -> Vec<Label>;
}

/// Declares a label set of one label whose values are `&'static str` (closed by construction).
macro_rules! one_label {
    ($(#[$doc:meta])* $ty:ident = $name:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $ty(pub &'static str);

        impl LabelSet for $ty {
            fn labels(&self) -> Vec<Label> {
                vec![($name, LabelValue::Name(self.0))]
            }
        }
    };
}

one_label!(
    /// `kind="…"`: an error kind.
    Kind = "kind"
);
one_label!(
    /// `outcome="…"`.
    Outcome = "outcome"
);
one_label!(
    /// `command="…"`: a MongoDB command name.
    Command = "command"
);
one_label!(
    /// `reason="…"`.
    Reason = "reason"
);
one_label!(
    /// `field="…"`: a tracked lab field.
    Field = "field"
);
one_label!(
    /// `state="…"`.
    State = "state"
);
one_label!(
    /// `source="…"`: where something came from (`listing`, `stream`).
    Origin = "source"
);
one_label!(
    /// `trigger="…"`: why a worker sync ran (cycle, retry, requested, event, relist).
    Trigger = "trigger"
);
one_label!(
    /// `watch="…"`: a collection the sync-daemon watches (`sync_requests`, `registry`).
    Watched = "watch"
);

/// A monotonic count.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (stored as `f64` bits).
#[derive(Debug, Clone, Default)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    pub fn add(&self, delta: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + delta).to_bits())
            });
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Bucket bounds of latency histograms, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket bounds of durations of background work (worker syncs, cycles), in seconds.
pub const DURATION_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Debug)]
struct HistogramCells {
    bounds: &'static [f64],
    /// One count per bound, plus the `+Inf` bucket; not cumulative.
    counts: Vec<AtomicU64>,
    sum: AtomicU64,
}

/// A distribution over fixed buckets.
#[derive(Debug, Clone)]
pub struct Histogram(Arc<HistogramCells>);

/// What a histogram holds at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound, cumulative count)`, the `+Inf` bucket last.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self(Arc::new(HistogramCells {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }))
    }

    pub fn observe(&self, v: f64) {
        let i = self.0.bounds.partition_point(|b| *b < v);
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .0
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(self.0.counts.len());
        for (i, c) in self.0.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            let bound = self.0.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, total));
        }
        HistogramSnapshot {
            buckets,
            sum: f64::from_bits(self.0.sum.load(Ordering::Relaxed)),
            count: total,
        }
    }
}

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// One series' value at one moment.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(HistogramSnapshot),
}

/// One series of a family: its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: Vec<Label>,
    pub value: Value,
}

/// A counter, gauge or histogram: what a family is made of.
pub trait Metric: Clone + Send + Sync + 'static {
    const KIND: MetricKind;
    fn value(&self) -> Value;
}

impl Metric for Counter {
    const KIND: MetricKind = MetricKind::Counter;
    fn value(&self) -> Value {
        Value::Counter(self.get())
    }
}

impl Metric for Gauge {
    const KIND: MetricKind = MetricKind::Gauge;
    fn value(&self) -> Value {
        Value::Gauge(self.get())
    }
}

impl Metric for Histogram {
    const KIND: MetricKind = MetricKind::Histogram;
    fn value(&self) -> Value {
        Value::Histogram(self.snapshot())
    }
}

type Make<M> = Arc<dyn Fn() -> M + Send + Sync>;

/// Series of one metric, one per label set seen.
#[derive(Clone)]
pub struct Family<L, M> {
    series: Arc<RwLock<HashMap<L, M>>>,
    make: Make<M>,
}

impl<L, M> std::fmt::Debug for Family<L, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family").finish_non_exhaustive()
    }
}

impl<L: LabelSet, M: Metric + Default> Default for Family<L, M> {
    /// A family not yet in any registry (see [`Registry::register`]).
    fn default() -> Self {
        Self::new(Arc::new(M::default))
    }
}

impl<L: LabelSet> Family<L, Histogram> {
    /// A family of histograms over `bounds`, not yet in any registry.
    pub fn with_buckets(bounds: &'static [f64]) -> Self {
        Self::new(Arc::new(move || Histogram::new(bounds)))
    }
}

impl<L: LabelSet, M: Metric> Family<L, M> {
    fn new(make: Make<M>) -> Self {
        Self {
            series: Arc::default(),
            make,
        }
    }

    /// The series of `labels`, created on first use.
    pub fn get(&self, labels: &L) -> M {
        if let Some(m) = self
            .series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(labels)
        {
            return m.clone();
        }
        self.series
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(labels.clone())
            .or_insert_with(|| (self.make)())
            .clone()
    }
}

/// What the registry reads a family from.
trait Source: Send + Sync {
    fn series(&self) -> Vec<Series>;
}

/// A metric or a family a component made itself and hands to a registry.
#[allow(private_bounds)]
pub trait Registrable: Source + Clone + 'static {
    const KIND: MetricKind;
}

impl<M: Metric> Registrable for M {
    const KIND: MetricKind = M::KIND;
}

impl<L: LabelSet, M: Metric> Registrable for Family<L, M> {
    const KIND: MetricKind = M::KIND;
}

impl<M: Metric> Source for M {
    fn series(&self) -> Vec<Series> {
        vec![Series {
            labels: Vec::new(),
            value: self.value(),
        }]
    }
}

impl<L: LabelSet, M: Metric> Source for Family<L, M> {
    fn series(&self) -> Vec<Series> {
        let map = self.series.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Series> = map
            .iter()
            .map(|(l, m)| Series {
                labels: l.labels(),
                value: m.value(),
            })
            .collect();
        // A stable order: scrapes and tests compare text.
        out.sort_by(|a, b| {
            a.labels
                .iter()
                .map(label_key)
                .cmp(b.labels.iter().map(label_key))
        });
        out
    }
}

fn label_key(l: &Label) -> (&'static str, String) {
    (l.0, l.1.to_string())
}

/// A registered family: name, help text, type and where its series come from.
pub struct Desc {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricKind,
    source: Box<dyn Source>,
}

impl Desc {
    pub fn series(&self) -> Vec<Series> {
        self.source.series()
    }
}

impl std::fmt::Debug for Desc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Desc")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

/// Every family of a process, registered at start and fixed from then on.
#[derive(Debug, Default)]
pub struct Registry {
    families: Vec<Desc>,
}

impl Registry {
    fn add<S: Source + 'static>(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: MetricKind,
        s: S,
    ) {
        debug_assert!(
            self.families.iter().all(|d| d.name != name),
            "metric {name} registered twice"
        );
        self.families.push(Desc {
            name,
            help,
            kind,
            source: Box::new(s),
        });
    }

    /// Registers a metric or family made by the component that updates it; the registry reads
    /// the same cells.
    pub fn register<R: Registrable>(&mut self, name: &'static str, help: &'static str, m: &R) {
        self.add(name, help, R::KIND, m.clone());
    }

    pub fn counter(&mut self, name: &'static str, help: &'static str) -> Counter {
        let c = Counter::default();
        self.add(name, help, MetricKind::Counter, c.clone());
        c
    }

    pub fn gauge(&mut self, name: &'static str, help: &'static str) -> Gauge {
        let g = Gauge::default();
        self.add(name, help, MetricKind::Gauge, g.clone());
        g
    }

    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        bounds: &'static [f64],
    ) -> Histogram {
        let h = Histogram::new(bounds);
        self.add(name, help, MetricKind::Histogram, h.clone());
        h
    }

    pub fn counters<L: LabelSet>(
        &mut self,
        name: &'static str,
        help: &'static str,
    ) -> Family<L, Counter> {
        let f = Family::new(Arc::new(Counter::default));
        self.add(name, help, MetricKind::Counter, f.clone());
        f
    }

    pub fn gauges<L: LabelSet>(
        &mut self,
        name: &'static str,
        help: &'static str,
    ) -> Family<L, Gauge> {
        let f = Family::new(Arc::new(Gauge::default));
        self.add(name, help, MetricKind::Gauge, f.clone());
        f
    }

    pub fn histograms<L: LabelSet>(
        &mut self,
        name: &'static str,
        help: &'static str,
        bounds: &'static [f64],
    ) -> Family<L, Histogram> {
        let f = Family::new(Arc::new(move || Histogram::new(bounds)));
        self.add(name, help, MetricKind::Histogram, f.clone());
        f
    }

    pub fn families(&self) -> &[Desc] {
        &self.families
    }

    /// The value of one counter or gauge series, for tests and tools: `None` when absent.
    pub fn sample(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let desc = self.families.iter().find(|d| d.name == name)?;
        desc.series().into_iter().find_map(|s| {
            let same = s.labels.len() == labels.len()
                && s.labels
                    .iter()
                    .zip(labels)
                    .all(|((k, v), (wk, wv))| k == wk && v.to_string() == *wv);
            match (same, s.value) {
                (true, Value::Counter(n)) => Some(n as f64),
                (true, Value::Gauge(g)) => Some(g),
                (true, Value::Histogram(h)) => Some(h.count as f64),
                _ => None,
            }
        })
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        for d in &self.families {
            let kind = match d.kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
                MetricKind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {} {}", d.name, d.help);
            let _ = writeln!(out, "# TYPE {} {kind}", d.name);
            for s in d.series() {
                match s.value {
                    Value::Counter(n) => sample(&mut out, d.name, "_total", &s.labels, None, n),
                    Value::Gauge(g) => sample(&mut out, d.name, "", &s.labels, None, g),
                    Value::Histogram(h) => {
                        for (bound, count) in &h.buckets {
                            let le = if bound.is_infinite() {
                                "+Inf".to_owned()
                            } else {
                                format!("{bound}")
                            };
                            sample(&mut out, d.name, "_bucket", &s.labels, Some(&le), count);
                        }
                        sample(&mut out, d.name, "_sum", &s.labels, None, h.sum);
                        sample(&mut out, d.name, "_count", &s.labels, None, h.count);
                    }
                }
            }
        }
        out.push_str("# EOF\n");
        out
    }
}

fn sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[Label],
    le: Option<&str>,
    value: impl std::fmt::Display,
) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        let mut first = true;
        let pairs = labels
            .iter()
            .map(|(k, v)| (*k, v.to_string()))
            .chain(le.map(|l| ("le", l.to_owned())));
        for (k, v) in pairs {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(k);
            out.push_str("=\"");
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openmetrics_with_labels_buckets_and_eof() {
        let mut r = Registry::default();
        let created = r.counter("labs_created", "Lab records created");
        let failures = r.counters::<Kind>("worker_failures", "Failures by kind");
        let held = r.gauge("lease_held", "1 while held");
        let took = r.histogram("took_seconds", "Durations", &[0.5, 1.0]);
        created.inc_by(3);
        failures.get(&Kind("cml_timeout")).inc();
        failures.get(&Kind("cml_timeout")).inc();
        failures.get(&Kind("bson")).inc();
        held.set(1.0);
        took.observe(0.2);
        took.observe(0.7);
        took.observe(9.0);
        let text = r.render();
        let expected = "\
# HELP labs_created Lab records created
# TYPE labs_created counter
labs_created_total 3
# HELP worker_failures Failures by kind
# TYPE worker_failures counter
worker_failures_total{kind=\"bson\"} 1
worker_failures_total{kind=\"cml_timeout\"} 2
# HELP lease_held 1 while held
# TYPE lease_held gauge
lease_held 1
# HELP took_seconds Durations
# TYPE took_seconds histogram
took_seconds_bucket{le=\"0.5\"} 1
took_seconds_bucket{le=\"1\"} 2
took_seconds_bucket{le=\"+Inf\"} 3
took_seconds_sum 9.9
took_seconds_count 3
# EOF
";
        assert_eq!(text, expected);
        assert_eq!(
            r.sample("worker_failures", &[("kind", "cml_timeout")]),
            Some(2.0)
        );
        assert_eq!(r.sample("worker_failures", &[("kind", "other")]), None);
    }

    #[test]
    fn gauges_go_up_and_down_and_values_are_escaped() {
        #[derive(Clone, PartialEq, Eq, Hash)]
        struct Odd;
        impl LabelSet for Odd {
            fn labels(&self) -> Vec<Label> {
                vec![
                    ("route", LabelValue::Name("/a\"b\\c")),
                    ("status", LabelValue::Number(503)),
                ]
            }
        }
        let mut r = Registry::default();
        let g = r.gauges::<Odd>("in_flight", "Requests in flight");
        g.get(&Odd).add(2.0);
        g.get(&Odd).add(-1.0);
        assert!(r
            .render()
            .contains("in_flight{route=\"/a\\\"b\\\\c\",status=\"503\"} 1\n"));
    }
}
