//! Everything a sync needs, built once at start and passed explicitly.

use std::sync::Arc;

use bson::DateTime;
use cml_client::{CmlClient, CmlTarget};
use mongodb::{
    event::{command::CommandEvent, EventHandler},
    Database,
};
use shared::{
    config::Config,
    fleet,
    metrics::State,
    mongo,
    registry::{Standing, WorkerRegistry},
    status::SyncStatusReader,
    store::LabStore,
    sync_request::RequestStore,
};

use crate::{
    lease::Lease,
    logs::{LeaseError, LegacyUpgraded, LogLine, StoragePrepared},
    metrics::Metrics,
    status::StatusWriter,
    Result,
};

/// The name of the lease document all replicas compete for.
pub const LEASE_NAME: &str = "sync-daemon";

#[derive(Debug)]
pub struct Context {
    pub config: Config,
    pub db: Database,
    pub store: LabStore,
    pub accounts: shared::accounts::AccountStore,
    pub status: StatusWriter,
    pub registry: WorkerRegistry,
    /// Refreshes asked for on demand (`sync_requests`).
    pub requests: RequestStore,
    pub cml: CmlClient,
    pub lease: Lease,
    pub metrics: Arc<Metrics>,
}

impl Context {
    /// Connects (lazily) to MongoDB and builds the clients. `instance` names this replica.
    pub async fn build(config: Config, instance: &str) -> Result<Arc<Self>> {
        let cml = CmlClient::new(&config.cml)?;
        Self::with_cml_client(config, instance, cml).await
    }

    /// [`Context::build`] with a CML client of the caller's (tests add request hooks to it).
    pub async fn with_cml_client(
        config: Config,
        instance: &str,
        cml: CmlClient,
    ) -> Result<Arc<Self>> {
        let metrics = Arc::new(Metrics::default());
        let counted = metrics.clone();
        let monitor = EventHandler::callback(move |event: CommandEvent| {
            if let CommandEvent::Started(started) = event {
                counted.mongodb_command(&started.command_name);
            }
        });
        let client = mongo::connect(&config.mongodb, "sync-daemon", Some(monitor)).await?;
        let db = client.database(&config.mongodb.database);
        metrics
            .interval
            .set(config.sync.interval.get().as_secs_f64());
        let requests = metrics.clone();
        let cml = cml.with_request_hook(Arc::new(move |_| requests.cml_requests.inc()));
        Ok(Arc::new(Self {
            store: LabStore::new(&client, &config.mongodb, config.sync.history_limit),
            accounts: shared::accounts::AccountStore::new(
                &client.database(&config.mongodb.database),
                &config.mongodb.cml_accounts_collection,
            ),
            status: StatusWriter::new(&db, &config.mongodb.sync_status_collection),
            registry: WorkerRegistry::new(&db, &config.mongodb.workers_collection),
            requests: RequestStore::new(&db, &config.mongodb.sync_requests_collection),
            lease: Lease::new(
                &db,
                &config.mongodb.lease_collection,
                LEASE_NAME,
                instance,
                config.sync.lease_ttl.get(),
            ),
            cml,
            db,
            metrics,
            config,
        }))
    }

    /// Indexes and the one-time upgrade of old documents; safe at every start.
    pub async fn prepare_storage(&self) -> Result<()> {
        self.store.ensure_indexes().await?;
        self.accounts.ensure_indexes().await?;
        self.status.ensure_indexes().await?;
        self.requests.ensure_indexes().await?;
        StoragePrepared {
            collection: self.store.collection_name(),
        }
        .emit(&self.metrics);
        let upgraded = self.store.upgrade_legacy_documents().await?;
        if upgraded > 0 {
            LegacyUpgraded { upgraded }.emit(&self.metrics);
        }
        Ok(())
    }

    /// Notes in the lease that a cycle starts now, so a replica taking over keeps its rhythm
    /// (and knows what is left of it). A failure is logged: the schedule goes on.
    pub async fn note_cycle_start(&self) {
        self.note_cycle("note_cycle", self.lease.record_cycle(DateTime::now()).await);
    }

    /// Notes in the lease that a cycle ended, so a replica taking over reports when the fleet
    /// last synced. A failure is logged.
    pub async fn note_cycle_end(&self) {
        self.note_cycle(
            "note_cycle_end",
            self.lease.record_cycle_end(DateTime::now()).await,
        );
    }

    fn note_cycle(&self, action: &'static str, noted: shared::Result<()>) {
        if let Err(e) = noted {
            LeaseError {
                error: &e.into(),
                action,
            }
            .emit(&self.metrics);
        }
    }

    /// Keeps the fleet view current: copies the registry's name, region and status of every
    /// worker into its status document (only those that changed; a worker never synced gets a
    /// document), then sets the gauges `sync_workers{state}` as the view counts them. Returns
    /// how many documents it wrote.
    pub async fn update_fleet_view(&self) -> Result<usize> {
        let rows = SyncStatusReader::new(&self.db, &self.config.mongodb.sync_status_collection);
        let (workers, rows) = tokio::try_join!(self.registry.all(), rows.fleet_rows())?;
        let view = fleet::reconcile(&workers, rows);
        self.status.record_registry(&view.changes).await?;
        let stale_after = 2 * self.config.sync.interval.get();
        let c = fleet::counts(
            &view.rows,
            fleet::stale_threshold(DateTime::now(), stale_after),
        );
        let gauges = &self.metrics.workers;
        gauges.get(&State("known")).set(c.known as f64);
        gauges.get(&State("failing")).set(c.failing as f64);
        gauges
            .get(&State("failing_repeatedly"))
            .set(c.failing_repeatedly as f64);
        gauges.get(&State("stale")).set(c.stale as f64);
        gauges.get(&State("warned")).set(c.warned as f64);
        Ok(view.changes.len())
    }

    /// Sets the gauges `cml_lab_records{state}` from the records (one aggregation over them).
    pub async fn count_lab_records(&self) -> Result<()> {
        let labs = self.store.count_by_state().await?;
        for (state, n) in labs.labelled() {
            self.metrics.lab_records.get(&State(state)).set(n as f64);
        }
        Ok(())
    }

    /// Where one worker stands, as a cycle would see it now.
    pub async fn standing(&self, worker_id: &str) -> Result<Standing> {
        Ok(self
            .registry
            .standing(worker_id, &self.config.sync, self.config.cml.use_private_ip)
            .await?)
    }

    /// The workers to sync now: the active ones of the registry (when enabled) and the static
    /// ones of the configuration, each once (the registry's endpoint wins).
    pub async fn workers(&self) -> Result<Vec<CmlTarget>> {
        let mut targets: Vec<CmlTarget> = Vec::new();
        if self.config.sync.workers_from_registry {
            targets.extend(
                self.registry
                    .active_workers()
                    .await?
                    .into_iter()
                    .filter_map(|w| {
                        let endpoint = w.endpoint(self.config.cml.use_private_ip)?;
                        Some(CmlTarget {
                            worker_id: w.id,
                            endpoint,
                        })
                    }),
            );
        }
        for w in &self.config.sync.static_workers {
            if !targets.iter().any(|t| t.worker_id == w.id) {
                targets.push(CmlTarget {
                    worker_id: w.id.clone(),
                    endpoint: w.endpoint.clone(),
                });
            }
        }
        Ok(targets)
    }
}
