//! The daemon's metrics, exported as Prometheus text on the admin port.

use std::sync::{
    atomic::{AtomicI64, AtomicU64},
    Mutex,
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabel {
    pub command: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// Every counter, gauge and histogram of the daemon. Labels have small, fixed value sets.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    pub labs_synced: Counter,
    pub labs_created: Counter,
    pub labs_updated: Counter,
    pub labs_removed: Counter,
    pub labs_purged: Counter,
    pub write_conflicts: Counter,
    pub worker_syncs: Family<OutcomeLabel, Counter>,
    pub worker_failures: Family<KindLabel, Counter>,
    pub cycles: Family<OutcomeLabel, Counter>,
    pub cycle_duration: Histogram,
    pub worker_duration: Histogram,
    pub cml_requests: Counter,
    pub mongodb_commands: Family<CommandLabel, Counter>,
    pub lease_held: Gauge<i64, AtomicI64>,
    pub last_cycle_end: Gauge<f64, AtomicU64>,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    [
        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            labs_synced: Counter::default(),
            labs_created: Counter::default(),
            labs_updated: Counter::default(),
            labs_removed: Counter::default(),
            labs_purged: Counter::default(),
            write_conflicts: Counter::default(),
            worker_syncs: Family::default(),
            worker_failures: Family::default(),
            cycles: Family::default(),
            cycle_duration: Histogram::new(seconds_buckets()),
            worker_duration: Histogram::new(seconds_buckets()),
            cml_requests: Counter::default(),
            mongodb_commands: Family::default(),
            lease_held: Gauge::default(),
            last_cycle_end: Gauge::default(),
        };
        r.register(
            "cml_labs_synced",
            "Labs seen in complete or partial listings",
            m.labs_synced.clone(),
        );
        r.register(
            "cml_labs_created",
            "Lab records created",
            m.labs_created.clone(),
        );
        r.register(
            "cml_labs_updated",
            "Lab records changed (reappeared labs included)",
            m.labs_updated.clone(),
        );
        r.register(
            "cml_labs_removed",
            "Lab records marked removed",
            m.labs_removed.clone(),
        );
        r.register(
            "cml_labs_purged",
            "Removed lab records deleted after the retention",
            m.labs_purged.clone(),
        );
        r.register(
            "sync_write_conflicts",
            "Record writes skipped because another sync got there first",
            m.write_conflicts.clone(),
        );
        r.register(
            "sync_worker_syncs",
            "Worker syncs by outcome",
            m.worker_syncs.clone(),
        );
        r.register(
            "sync_worker_failures",
            "Failed worker syncs by error kind",
            m.worker_failures.clone(),
        );
        r.register(
            "sync_cycles",
            "Refresh cycles and retry passes by outcome",
            m.cycles.clone(),
        );
        r.register(
            "sync_cycle_duration_seconds",
            "Duration of refresh cycles",
            m.cycle_duration.clone(),
        );
        r.register(
            "sync_worker_duration_seconds",
            "Duration of one worker's sync",
            m.worker_duration.clone(),
        );
        r.register(
            "cml_requests",
            "HTTP requests sent to CML workers",
            m.cml_requests.clone(),
        );
        r.register(
            "mongodb_commands",
            "Commands (round trips) sent to MongoDB",
            m.mongodb_commands.clone(),
        );
        r.register(
            "sync_lease_held",
            "1 while this replica holds the sync lease",
            m.lease_held.clone(),
        );
        r.register(
            "sync_last_cycle_end_timestamp_seconds",
            "When the last refresh cycle ended",
            m.last_cycle_end.clone(),
        );
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = r;
        m
    }
}

impl Metrics {
    pub fn failure(&self, kind: &str) {
        self.worker_failures
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .inc();
        self.worker_syncs
            .get_or_create(&OutcomeLabel {
                outcome: "failure".into(),
            })
            .inc();
    }

    pub fn success(&self) {
        self.worker_syncs
            .get_or_create(&OutcomeLabel {
                outcome: "success".into(),
            })
            .inc();
    }

    pub fn mongodb_command(&self, name: &str) {
        self.mongodb_commands
            .get_or_create(&CommandLabel {
                command: name.to_owned(),
            })
            .inc();
    }

    /// MongoDB commands sent so far, all names together.
    pub fn mongodb_commands_total(&self) -> u64 {
        let text = self.render();
        text.lines()
            .filter(|l| l.starts_with("mongodb_commands_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let _ = encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_their_labels() {
        let m = Metrics::default();
        m.labs_created.inc_by(3);
        m.failure("cml_timeout");
        m.mongodb_command("update");
        m.mongodb_command("update");
        m.mongodb_command("find");
        let text = m.render();
        assert!(text.contains("cml_labs_created_total 3"), "{text}");
        assert!(
            text.contains("sync_worker_failures_total{kind=\"cml_timeout\"} 1"),
            "{text}"
        );
        assert_eq!(m.mongodb_commands_total(), 3);
        assert!(text.ends_with("# EOF\n"));
    }
}
