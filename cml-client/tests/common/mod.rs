//! What the client's tests against the simulator share: the client's settings and a worker's
//! target.

use std::time::Duration;

use cml_client::CmlTarget;
use cml_sim::RunningFleet;
use shared::{config::CmlConfig, duration::HumanDuration, secret::Secret};

/// The simulator's credentials and short timeouts.
pub fn config() -> CmlConfig {
    CmlConfig {
        password: Secret::new("local-dev-password"),
        request_timeout: HumanDuration(Duration::from_secs(5)),
        connect_timeout: HumanDuration(Duration::from_secs(2)),
        ..CmlConfig::default()
    }
}

/// The `i`-th worker of the fleet as the client reaches it.
pub fn target(f: &RunningFleet, i: usize) -> CmlTarget {
    let id = f.fleet.workers[i].id.clone();
    CmlTarget {
        endpoint: f.endpoint(&id).to_owned(),
        worker_id: id,
    }
}
