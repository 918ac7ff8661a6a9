//! A fleet of simulated servers: generation from a seed, credentials, lookup by worker id,
//! client connections counted.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use crate::model::{Faults, Personality, Rng, SimWorker};

/// How to build a fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub workers: usize,
    pub labs_per_worker: usize,
    pub seed: u64,
    /// Assigned round-robin to the workers.
    pub personalities: Vec<Personality>,
    pub username: String,
    pub password: String,
    pub token_ttl: Duration,
    /// Added to every API call of every worker (the `latency_ms` fault), as a stand-in for
    /// the 0.5–2 s a real CML takes.
    pub latency: Duration,
    /// How often `/ws/ui` streams get `system_stats` (and `lab_stats` per running lab).
    pub stats_interval: Duration,
    /// More users on every server, in teams that each see a share of its labs (see
    /// [`SimWorker::add_teams`]); 0 for the seeded users only.
    pub users: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            workers: 5,
            labs_per_worker: 20,
            seed: 1,
            personalities: Personality::ALL.to_vec(),
            username: "admin".into(),
            password: "local-dev-password".into(),
            token_ttl: Duration::from_secs(24 * 3600),
            latency: Duration::ZERO,
            stats_interval: Duration::from_millis(3300),
            users: 0,
        }
    }
}

#[derive(Debug)]
pub struct Fleet {
    pub workers: Vec<Arc<SimWorker>>,
    by_id: HashMap<String, Arc<SimWorker>>,
    pub username: String,
    pub password: String,
    /// Signs the fleet's tokens.
    pub secret: Vec<u8>,
    pub token_ttl: Duration,
    /// How often `/ws/ui` streams get their stats messages.
    pub stats_interval: Duration,
    /// Client connections open now, over every listener (accepted and not yet closed).
    connections: AtomicUsize,
    /// Client connections accepted so far.
    accepted: AtomicU64,
    /// How far the fleet's clock runs ahead of the real one (tokens expire by it), in ms.
    clock_offset_ms: AtomicI64,
}

/// Counts a connection as open until dropped.
#[derive(Debug)]
pub struct OpenConnection(Arc<Fleet>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Fleet {
    /// Marks a connection as accepted; it counts as open until the guard is dropped.
    pub fn connection_opened(self: &Arc<Self>) -> OpenConnection {
        self.accepted.fetch_add(1, Ordering::SeqCst);
        self.connections.fetch_add(1, Ordering::SeqCst);
        OpenConnection(self.clone())
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Client connections accepted since start.
    pub fn accepted_connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn generate(cfg: &FleetConfig) -> Arc<Self> {
        let mut rng = Rng::new(cfg.seed);
        let personalities = if cfg.personalities.is_empty() {
            Personality::ALL.to_vec()
        } else {
            cfg.personalities.clone()
        };
        let workers: Vec<Arc<SimWorker>> = (0..cfg.workers)
            .map(|i| {
                let worker = SimWorker::generate(
                    i,
                    cfg.labs_per_worker,
                    personalities[i % personalities.len()],
                    &mut rng,
                );
                worker.add_teams(cfg.users);
                worker.set_faults(Faults {
                    latency_ms: u64::try_from(cfg.latency.as_millis()).unwrap_or(u64::MAX),
                    ..Faults::default()
                });
                Arc::new(worker)
            })
            .collect();
        let by_id = workers.iter().map(|w| (w.id.clone(), w.clone())).collect();
        let secret = rng
            .next_u64()
            .to_le_bytes()
            .into_iter()
            .chain(rng.next_u64().to_le_bytes())
            .collect();
        Arc::new(Self {
            workers,
            by_id,
            username: cfg.username.clone(),
            password: cfg.password.clone(),
            secret,
            token_ttl: cfg.token_ttl,
            stats_interval: cfg.stats_interval.max(Duration::from_millis(10)),
            connections: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            clock_offset_ms: AtomicI64::new(0),
        })
    }

    /// The fleet's time: the real time plus whatever [`Fleet::advance_clock`] added.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now()
            + chrono::Duration::milliseconds(self.clock_offset_ms.load(Ordering::SeqCst))
    }

    /// Moves the fleet's clock forward (tokens issued before expire by it), so tests need not wait.
    pub fn advance_clock(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.clock_offset_ms.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn worker(&self, id: &str) -> Option<Arc<SimWorker>> {
        self.by_id.get(id).cloned()
    }

    /// Moves `share` of every worker's labs to a random state; returns how many changed.
    pub fn churn(&self, share: f64, description_chars: usize) -> usize {
        self.workers
            .iter()
            .map(|w| w.churn(share, description_chars))
            .sum()
    }
}
