//! Who may see what, kept fresh: every active worker's users and groups are read at least
//! every `sync.access_interval`, in a sync of their own (`Scope::Access`: two calls, no lab
//! read), streaming or polled. The reads are spread over the interval, one worker at a time,
//! in the order of the fleet as last read; none while this replica does not hold the lease
//! (the fleet is `None` then).

use std::time::Duration;

use cml_client::CmlTarget;
use tokio::{sync::watch, time::Instant};

use super::{Trigger, Triggers};
use crate::schedule::Scope;

/// How long to wait between two workers' reads: the interval spread over the fleet.
pub fn step(interval: Duration, workers: usize) -> Duration {
    interval / u32::try_from(workers.max(1)).unwrap_or(u32::MAX)
}

/// Sends an access sync of each active worker in turn, `interval` per round of the fleet.
pub async fn run(
    interval: Duration,
    mut fleet: watch::Receiver<Option<Vec<CmlTarget>>>,
    triggers: Triggers,
) {
    loop {
        let targets = fleet.borrow_and_update().clone().unwrap_or_default();
        if targets.is_empty() {
            if fleet.changed().await.is_err() {
                return;
            }
            continue;
        }
        let step = step(interval, targets.len());
        for target in targets {
            tokio::time::sleep(step).await;
            // The lease lost: stop until the fleet is known again (workers added meanwhile are
            // read from the next round on).
            if fleet.borrow().is_none() {
                break;
            }
            let trigger = Trigger::Event {
                target,
                scope: Scope::Access,
                seen: Instant::now(),
            };
            if triggers.send(trigger).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(id: &str) -> CmlTarget {
        CmlTarget {
            worker_id: id.into(),
            endpoint: format!("https://{id}"),
        }
    }

    #[test]
    fn a_round_spreads_the_fleet_over_the_interval() {
        assert_eq!(step(Duration::from_secs(300), 100), Duration::from_secs(3));
        assert_eq!(step(Duration::from_secs(300), 0), Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn every_worker_is_asked_once_a_round_and_none_without_the_lease() {
        let (fleet, rx) = watch::channel(None);
        let (tx, mut got) = tokio::sync::mpsc::channel(16);
        let task = tokio::spawn(run(Duration::from_secs(60), rx, tx));
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(got.try_recv().is_err(), "no fleet, no reads");
        fleet.send_replace(Some(vec![target("a"), target("b"), target("c")]));
        let mut seen = Vec::new();
        for _ in 0..6 {
            match got.recv().await {
                Some(Trigger::Event { target, scope, .. }) => {
                    assert_eq!(scope, Scope::Access);
                    seen.push(target.worker_id);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seen, ["a", "b", "c", "a", "b", "c"]);
        fleet.send_replace(None);
        tokio::time::sleep(Duration::from_secs(600)).await;
        while got.try_recv().is_ok() {}
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(got.try_recv().is_err(), "the lease let go: no more reads");
        task.abort();
    }
}
