//! The daemon's metrics: one registry served on the admin port and exported over OTLP. Every
//! label value comes from a closed set (outcomes, error kinds, MongoDB command names).

use std::sync::Arc;

use shared::metrics::{
    Command, Counter, Family, Field, Gauge, Histogram, Kind, Origin, Outcome, Reason, Registry,
    State, Trigger, Watched, DURATION_BUCKETS, LATENCY_BUCKETS,
};

/// Every counter, gauge and histogram of the daemon.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub labs_synced: Counter,
    pub labs_created: Counter,
    pub labs_updated: Counter,
    pub labs_removed: Counter,
    pub labs_purged: Counter,
    pub write_conflicts: Counter,
    pub fields_truncated: Family<Field, Counter>,
    pub records_skipped: Counter,
    pub removals_kept: Counter,
    pub worker_syncs: Family<Outcome, Counter>,
    pub worker_failures: Family<Kind, Counter>,
    pub worker_warnings: Family<Kind, Counter>,
    pub workers_in_flight: Gauge,
    pub cycles: Family<Outcome, Counter>,
    pub cycle_duration: Histogram,
    pub worker_duration: Histogram,
    pub cml_requests: Counter,
    pub mongodb_commands: Family<Command, Counter>,
    pub lease_held: Gauge,
    pub last_cycle_end: Gauge,
    pub interval: Gauge,
    pub workers: Family<State, Gauge>,
    pub lab_records: Family<State, Gauge>,
    pub refresh_requests: Family<Outcome, Counter>,
    pub registry_changes: Family<Reason, Counter>,
    pub watch_up: Family<Watched, Gauge>,
    pub syncs_by_trigger: Family<Trigger, Counter>,
    pub event_watches: Family<State, Gauge>,
    pub event_messages: Family<Kind, Counter>,
    pub event_reconnects: Family<Reason, Counter>,
    pub event_lag: Histogram,
    pub lab_ids_refused: Family<Origin, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::default();
        let metrics = Metrics {
            labs_synced: r.counter(
                "cml_labs_synced",
                "Labs seen in complete or partial listings",
            ),
            labs_created: r.counter("cml_labs_created", "Lab records created"),
            labs_updated: r.counter(
                "cml_labs_updated",
                "Lab records changed (reappeared labs included)",
            ),
            labs_removed: r.counter("cml_labs_removed", "Lab records marked removed"),
            labs_purged: r.counter(
                "cml_labs_purged",
                "Removed lab records deleted after the retention",
            ),
            write_conflicts: r.counter(
                "sync_write_conflicts",
                "Record writes skipped because another sync got there first",
            ),
            fields_truncated: r.counters(
                "sync_fields_truncated",
                "Lab text fields cut to their limit before they were stored, by field",
            ),
            records_skipped: r.counter(
                "sync_records_skipped",
                "Lab records that could not be written (past MongoDB's document limit)",
            ),
            removals_kept: r.counter(
                "sync_removals_kept",
                "Labs missing from a listing but kept: the id list still names them, or cannot be read",
            ),
            worker_syncs: r.counters("sync_worker_syncs", "Worker syncs by outcome"),
            worker_failures: r
                .counters("sync_worker_failures", "Failed worker syncs by error kind"),
            worker_warnings: r.counters(
                "sync_worker_warnings",
                "Successful worker syncs that could not do everything, by kind: groups_unread (the group associations could not be read; records kept their groups)",
            ),
            workers_in_flight: r.gauge("sync_workers_in_flight", "Worker syncs running now"),
            cycles: r.counters("sync_cycles", "Refresh cycles and retry passes by outcome"),
            cycle_duration: r.histogram(
                "sync_cycle_duration_seconds",
                "Duration of sync cycles",
                DURATION_BUCKETS,
            ),
            worker_duration: r.histogram(
                "sync_worker_duration_seconds",
                "Duration of one worker's sync",
                DURATION_BUCKETS,
            ),
            cml_requests: r.counter("cml_requests", "HTTP requests sent to CML workers"),
            mongodb_commands: r.counters(
                "mongodb_commands",
                "Commands (round trips) sent to MongoDB, by command name",
            ),
            lease_held: r.gauge(
                "sync_lease_held",
                "1 while this replica holds the sync lease",
            ),
            last_cycle_end: r.gauge(
                "sync_last_cycle_end_timestamp_seconds",
                "When the last sync cycle ended (Unix time)",
            ),
            interval: r.gauge("sync_interval_seconds", "The configured sync interval"),
            workers: r.gauges(
                "sync_workers",
                "Workers by state after the last cycle: known, failing, failing_repeatedly (3+ in a row), stale, warned (the last success could not do everything: see last_warning_kind)",
            ),
            lab_records: r.gauges(
                "cml_lab_records",
                "Lab records by lab state after the last cycle (removed ones under removed, states CML does not define under other)",
            ),
            refresh_requests: r.counters(
                "sync_refresh_requests",
                "Refreshes asked for on demand, by outcome: done, failed, requeued (left for the next lease holder)",
            ),
            registry_changes: r.counters(
                "sync_registry_changes",
                "Workers of the registry that started running (appeared), moved (endpoint_changed) or stopped, as the lease holder saw them",
            ),
            watch_up: r.gauges(
                "sync_watch_up",
                "1 while the lease holder's change stream on a collection is open (sync_requests, registry)",
            ),
            syncs_by_trigger: r.counters(
                "sync_worker_syncs_started",
                "Worker syncs started, by trigger: cycle, retry, requested (refresh, registry change), event (labs a CML event stream named), relist (a whole worker after its stream went live), access (its users and groups only: every sync.access_interval, or when its stream says they changed)",
            ),
            event_watches: r.gauges(
                "sync_event_watches",
                "Workers' CML event-stream watches by state: live, connecting, polling (no stream, or past sync.events.max_watches), failing",
            ),
            event_messages: r.counters(
                "sync_event_messages",
                "Messages read from CML event streams, by kind: lab_event, lab_element_event, state_change, system_stats, lab_stats, access (users or groups changed), other, malformed",
            ),
            event_reconnects: r.counters(
                "sync_event_reconnects",
                "Event streams opened again, by why the last one ended or failed: unreachable, unauthorized, redirect, too_large, flooded, silent, stalled, dropped",
            ),
            lab_ids_refused: r.counters(
                "sync_lab_ids_refused",
                "Labs refused because their CML server named them by an id that is not a CML lab id, or their object named another lab, by source: listing, stream",
            ),
            event_lag: r.histogram(
                "sync_event_lag_seconds",
                "From a lab change arriving on a CML event stream to its records written",
                LATENCY_BUCKETS,
            ),
            registry: Arc::new(r),
        };
        // A closed set: every kind is there from the start, at zero.
        for w in shared::status::SyncWarning::ALL {
            metrics.worker_warnings.get(&Kind(w.as_str()));
        }
        for state in shared::status::WATCH_STATES {
            metrics.event_watches.get(&State(state));
        }
        for kind in crate::cml_events::MessageKind::ALL {
            metrics.event_messages.get(&Kind(kind.as_str()));
        }
        for source in ["listing", "stream"] {
            metrics.lab_ids_refused.get(&Origin(source));
        }
        for reason in crate::stream_policy::FailReason::ALL {
            metrics.event_reconnects.get(&Reason(reason.as_str()));
        }
        metrics
    }
}

/// The MongoDB commands the daemon sends, by name; any other counts as `other`.
const COMMANDS: &[&str] = &[
    "find",
    "getMore",
    "update",
    "bulkWrite",
    "delete",
    "insert",
    "aggregate",
    "createIndexes",
    "listIndexes",
    "hello",
    "isMaster",
    "ping",
    "buildInfo",
    "findAndModify",
    "killCursors",
    "endSessions",
];

impl Metrics {
    /// Counts one command sent to MongoDB.
    pub fn mongodb_command(&self, name: &str) {
        let known = COMMANDS.iter().find(|c| **c == name).copied();
        self.mongodb_commands
            .get(&Command(known.unwrap_or("other")))
            .inc();
    }

    /// A sync cycle (of this replica or, after a takeover, of the last holder) ended at
    /// `at`; the gauge never goes back.
    pub fn note_cycle_end(&self, at: bson::DateTime) {
        let secs = at.timestamp_millis() as f64 / 1000.0;
        if secs > self.last_cycle_end.get() {
            self.last_cycle_end.set(secs);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_names_come_from_a_closed_set() {
        let m = Metrics::default();
        m.mongodb_command("update");
        m.mongodb_command("update");
        m.mongodb_command("find");
        m.mongodb_command("a-command-nobody-knows");
        let text = m.render();
        assert!(
            text.contains("mongodb_commands_total{command=\"update\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("mongodb_commands_total{command=\"other\"} 1"),
            "{text}"
        );
        assert!(!text.contains("nobody"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
