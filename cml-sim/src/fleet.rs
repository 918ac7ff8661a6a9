//! A fleet of simulated servers: generation from a seed, credentials, lookup by worker id.

use std::{collections::HashMap, sync::Arc, time::Duration};

use crate::model::{Personality, Rng, SimWorker};

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
}

impl Fleet {
    pub fn generate(cfg: &FleetConfig) -> Arc<Self> {
        let mut rng = Rng::new(cfg.seed);
        let personalities = if cfg.personalities.is_empty() {
            Personality::ALL.to_vec()
        } else {
            cfg.personalities.clone()
        };
        let workers: Vec<Arc<SimWorker>> = (0..cfg.workers)
            .map(|i| {
                Arc::new(SimWorker::generate(
                    i,
                    cfg.labs_per_worker,
                    personalities[i % personalities.len()],
                    &mut rng,
                ))
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
        })
    }

    pub fn worker(&self, id: &str) -> Option<Arc<SimWorker>> {
        self.by_id.get(id).cloned()
    }

    /// Moves `share` of every worker's labs to a random state; returns how many changed.
    pub fn churn(&self, share: f64) -> usize {
        self.workers.iter().map(|w| w.churn(share)).sum()
    }
}
