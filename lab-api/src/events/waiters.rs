//! Callers waiting for a sync request's outcome (`?wait=`): each registers the request's id
//! and is woken when the replica's change stream sees that request finish, instead of reading
//! MongoDB in a loop. How many wait at once is bounded; past it, a caller gets its answer
//! without waiting.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Default)]
struct Entry {
    notify: Arc<Notify>,
    waiting: usize,
}

/// The requests someone waits for, by id.
#[derive(Debug)]
pub struct Waiters {
    by_id: Arc<Mutex<HashMap<String, Entry>>>,
    slots: Arc<Semaphore>,
}

/// One caller's wait; leaving it (drop) unregisters.
#[derive(Debug)]
pub struct Waiting {
    id: String,
    by_id: Weak<Mutex<HashMap<String, Entry>>>,
    /// Woken (all waiters of the id) when the request finishes.
    pub notify: Arc<Notify>,
    _slot: OwnedSemaphorePermit,
}

impl Waiters {
    /// At most `max` callers wait at once.
    pub fn new(max: usize) -> Self {
        Self {
            by_id: Arc::default(),
            slots: Arc::new(Semaphore::new(max.max(1))),
        }
    }

    fn lock(
        map: &Mutex<HashMap<String, Entry>>,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a wait for request `id`; `None` when as many callers wait as may.
    pub fn wait_for(&self, id: &str) -> Option<Waiting> {
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        let mut map = Self::lock(&self.by_id);
        let entry = map.entry(id.to_owned()).or_default();
        entry.waiting += 1;
        Some(Waiting {
            id: id.to_owned(),
            by_id: Arc::downgrade(&self.by_id),
            notify: entry.notify.clone(),
            _slot: slot,
        })
    }

    /// Request `id` finished: its waiters wake.
    pub fn finished(&self, id: &str) {
        if let Some(entry) = Self::lock(&self.by_id).get(id) {
            entry.notify.notify_waiters();
        }
    }

    /// Requests someone waits for.
    pub fn len(&self) -> usize {
        Self::lock(&self.by_id).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(map) = self.by_id.upgrade() {
            let mut map = Waiters::lock(&map);
            if let Some(entry) = map.get_mut(&self.id) {
                entry.waiting -= 1;
                if entry.waiting == 0 {
                    map.remove(&self.id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn every_waiter_of_a_request_wakes_when_it_finishes_and_leaves_nothing_behind() {
        let w = Waiters::new(8);
        let a = w.wait_for("r1").expect("slot");
        let b = w.wait_for("r1").expect("slot");
        let other = w.wait_for("r2").expect("slot");
        let (a_notify, b_notify, o_notify) =
            (a.notify.clone(), b.notify.clone(), other.notify.clone());
        let (na, nb, no) = (
            a_notify.notified(),
            b_notify.notified(),
            o_notify.notified(),
        );
        tokio::pin!(na, nb, no);
        na.as_mut().enable();
        nb.as_mut().enable();
        no.as_mut().enable();
        w.finished("r1");
        tokio::time::timeout(Duration::from_secs(5), async {
            na.await;
            nb.await
        })
        .await
        .expect("both woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), no)
                .await
                .is_err(),
            "r2 did not finish"
        );
        assert_eq!(w.len(), 2);
        drop((a, b, other));
        assert!(w.is_empty());
    }

    #[test]
    fn waits_are_bounded() {
        let w = Waiters::new(2);
        let _a = w.wait_for("r1").expect("slot");
        let b = w.wait_for("r2").expect("slot");
        assert!(w.wait_for("r3").is_none(), "full");
        drop(b);
        assert!(w.wait_for("r3").is_some(), "a slot came free");
    }
}
