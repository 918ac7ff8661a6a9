//! The active workers as the lease holder last read them, and what changed since: workers that
//! started running, moved to another endpoint, or stopped. Pure: the runner reads the registry.

use std::collections::HashMap;

use cml_client::CmlTarget;

/// What changed between two reads of the active workers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Active now, not before.
    pub appeared: Vec<CmlTarget>,
    /// Active before and now, at another endpoint.
    pub moved: Vec<CmlTarget>,
    /// Active before, not now.
    pub stopped: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.appeared.is_empty() && self.moved.is_empty() && self.stopped.is_empty()
    }
}

/// The last list read, by worker id (its endpoint).
#[derive(Debug, Default)]
pub struct Known {
    workers: Option<HashMap<String, String>>,
}

impl Known {
    /// Takes the active workers as read now and returns what changed since the last read.
    /// The first read (since start, or since the lease was taken) is the baseline: nothing
    /// changed.
    pub fn update(&mut self, current: &[CmlTarget]) -> Changes {
        let now: HashMap<String, String> = current
            .iter()
            .map(|t| (t.worker_id.clone(), t.endpoint.clone()))
            .collect();
        let Some(before) = self.workers.replace(now) else {
            return Changes::default();
        };
        let mut changes = Changes::default();
        for t in current {
            match before.get(&t.worker_id) {
                None => changes.appeared.push(t.clone()),
                Some(endpoint) if *endpoint != t.endpoint => changes.moved.push(t.clone()),
                Some(_) => {}
            }
        }
        let mut stopped: Vec<String> = before
            .into_keys()
            .filter(|id| !current.iter().any(|t| t.worker_id == *id))
            .collect();
        stopped.sort();
        changes.stopped = stopped;
        changes
    }

    /// Forgets the list: the next read is a new baseline (the lease was lost).
    pub fn forget(&mut self) {
        self.workers = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: &str, endpoint: &str) -> CmlTarget {
        CmlTarget {
            worker_id: id.into(),
            endpoint: endpoint.into(),
        }
    }

    #[test]
    fn the_first_read_is_a_baseline_then_changes_are_reported_once() {
        let mut k = Known::default();
        assert!(k
            .update(&[t("a", "https://a"), t("b", "https://b")])
            .is_empty());
        let c = k.update(&[t("a", "https://a2"), t("c", "https://c")]);
        assert_eq!(c.appeared, [t("c", "https://c")]);
        assert_eq!(c.moved, [t("a", "https://a2")]);
        assert_eq!(c.stopped, ["b"]);
        assert!(
            k.update(&[t("a", "https://a2"), t("c", "https://c")])
                .is_empty(),
            "each change once"
        );
        k.forget();
        assert!(
            k.update(&[t("d", "https://d")]).is_empty(),
            "a new baseline"
        );
    }
}
