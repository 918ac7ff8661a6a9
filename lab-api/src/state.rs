//! What handlers share, built once from the configuration: the stores, the live events of this
//! replica, the callers waiting for a refresh's outcome, and the settings handlers read. The
//! composition root of the service; [`crate::app`] binds and runs it.

use std::{sync::Arc, time::Duration};

use mongodb::{Client, Database};
use shared::{
    accounts::AccountStore,
    config::{ApiConfig, Config},
    registry::WorkerRegistry,
    status::SyncStatusReader,
    store::LabStore,
    sync_request::RequestStore,
};

use crate::{
    access::{Grants, GRANTS_MAX_PRINCIPALS},
    events::{follow::Watched, waiters::Waiters, EventMetrics, Hub},
    refresh::RefreshSettings,
};

/// What handlers need; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: LabStore,
    /// Each user's account on each worker: what a caller may see is decided from its own.
    pub accounts: AccountStore,
    /// The grants of the users who asked lately, kept while the change stream is up.
    pub grants: Arc<Grants>,
    pub status: SyncStatusReader,
    pub registry: WorkerRegistry,
    pub db: Database,
    /// A worker without a success for this long is stale: two sync intervals (`sync.interval`).
    pub stale_after: Duration,
    /// `api.max_labs_per_response`.
    pub max_labs_per_response: usize,
    /// The live events of this replica (`api.events`), fed by the change stream
    /// [`crate::app::App::run`] follows.
    pub events: Arc<Hub>,
    /// Refreshes asked for on demand (`sync_requests`): the only collection lab-api writes.
    pub requests: RequestStore,
    /// Callers waiting for a request's outcome, woken by the change stream.
    pub waiters: Arc<Waiters>,
    pub refresh: RefreshSettings,
    /// The collections whose changes are events.
    pub watched: Watched,
}

impl AppState {
    /// Everything from `config` (its `mongodb`, `api` and the `sync`/`cml` keys lab-api reads);
    /// `client` connects lazily.
    pub fn from_config(config: &Config, client: &Client) -> Self {
        let mongo = &config.mongodb;
        let db = client.database(&mongo.database);
        Self {
            // The API never writes records: the history limit is the daemon's business.
            store: LabStore::new(client, mongo, 1),
            accounts: AccountStore::new(&db, &mongo.cml_accounts_collection),
            grants: Arc::new(Grants::new(GRANTS_MAX_PRINCIPALS)),
            status: SyncStatusReader::new(&db, &mongo.sync_status_collection),
            registry: WorkerRegistry::new(&db, &mongo.workers_collection),
            requests: RequestStore::new(&db, &mongo.sync_requests_collection),
            db,
            // At most 7 days (validated), so twice it cannot overflow.
            stale_after: 2 * config.sync.interval.get(),
            max_labs_per_response: config.api.max_labs_per_response,
            events: Hub::new(&config.api.events, EventMetrics::default()),
            waiters: Arc::new(Waiters::new(waiting_callers(&config.api))),
            refresh: RefreshSettings::new(
                config.api.refresh_enabled,
                config.sync.clone(),
                config.cml.use_private_ip,
            ),
            watched: Watched {
                labs: mongo.lab_records_collection.clone(),
                status: mongo.sync_status_collection.clone(),
                requests: mongo.sync_requests_collection.clone(),
                accounts: mongo.cml_accounts_collection.clone(),
            },
        }
    }
}

/// Callers that may wait for a refresh's outcome at once: a quarter of the requests in
/// flight, so that waiting never crowds out reads.
pub fn waiting_callers(cfg: &ApiConfig) -> usize {
    (cfg.max_concurrent_requests / 4).max(1)
}
