//! Everything a sync needs, built once at start and passed explicitly.

use std::sync::Arc;

use cml_labs::{
    cml::{CmlClient, CmlTarget},
    config::Config,
    lease::Lease,
    mongo,
    status::SyncStatusStore,
    store::LabStore,
    workers::WorkerRegistry,
};
use mongodb::{
    event::{command::CommandEvent, EventHandler},
    Database,
};

use crate::{metrics::Metrics, Result};

/// The name of the lease document all replicas compete for.
pub const LEASE_NAME: &str = "sync-daemon";

#[derive(Debug)]
pub struct Context {
    pub config: Config,
    pub db: Database,
    pub store: LabStore,
    pub status: SyncStatusStore,
    pub registry: WorkerRegistry,
    pub cml: CmlClient,
    pub lease: Lease,
    pub metrics: Arc<Metrics>,
}

impl Context {
    /// Connects (lazily) to MongoDB and builds the clients. `instance` names this replica.
    pub async fn build(config: Config, instance: &str) -> Result<Arc<Self>> {
        let metrics = Arc::new(Metrics::default());
        let counted = metrics.clone();
        let monitor = EventHandler::callback(move |event: CommandEvent| {
            if let CommandEvent::Started(started) = event {
                counted.mongodb_command(&started.command_name);
            }
        });
        let client = mongo::connect(&config.mongodb, "sync-daemon", Some(monitor)).await?;
        let db = client.database(&config.mongodb.database);
        let requests = metrics.clone();
        let cml = CmlClient::new(&config.cml)?.with_request_hook(Arc::new(move || {
            requests.cml_requests.inc();
        }));
        Ok(Arc::new(Self {
            store: LabStore::new(&client, &config.mongodb, config.sync.history_limit),
            status: SyncStatusStore::new(&db, &config.mongodb.sync_status_collection),
            registry: WorkerRegistry::new(&db, &config.mongodb.workers_collection),
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
        self.status.ensure_indexes().await?;
        tracing::info!(
            collection = self.store.collection_name(),
            "Lab record indexes created"
        );
        let upgraded = self.store.upgrade_legacy_documents().await?;
        if upgraded > 0 {
            tracing::info!(
                upgraded,
                "Upgraded {upgraded} lab records written by the previous system"
            );
        }
        Ok(())
    }

    /// The workers to sync now: the active ones of the registry (when enabled) and the static
    /// ones of the configuration, each once.
    pub async fn workers(&self) -> Result<Vec<CmlTarget>> {
        let mut targets: Vec<CmlTarget> = Vec::new();
        if self.config.sync.workers_from_registry {
            targets.extend(
                self.registry
                    .active_workers()
                    .await?
                    .iter()
                    .filter_map(|w| w.target(self.config.cml.use_private_ip)),
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
