//! What a caller may see, decided once per request: from who it is ([`Caller`], set by the
//! auth middleware) and its accounts on the workers (one indexed read of `cml_accounts`, or
//! the grant [`Grants`] kept from the last one while the change stream tells of every change),
//! a [`Grant`] that the store's queries and the live stream enforce. A request that reached a
//! handler without a caller (a route left outside the middleware) sees nothing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use axum::{extract::FromRequestParts, http::request::Parts};
use shared::access::{self, Grant};

use crate::{auth::Caller, problem::ApiError, state::AppState};

/// The caller's grant, as an extractor.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub grant: Arc<Grant>,
    /// The caller's username (empty for everyone-sees-everything and the fleet's admins).
    pub username: String,
}

impl Viewer {
    /// Sees nothing at all.
    fn nobody() -> Self {
        Self {
            grant: Arc::new(Grant::Principals {
                principals: Vec::new(),
                workers: Default::default(),
            }),
            username: String::new(),
        }
    }

    /// Resolves a caller against its accounts.
    pub async fn resolve(state: &AppState, caller: Option<&Caller>) -> Result<Self, ApiError> {
        match caller {
            None => Ok(Self::nobody()),
            Some(Caller::Anyone) => Ok(Self {
                grant: Arc::new(Grant::All),
                username: String::new(),
            }),
            Some(Caller::Known(who)) if who.fleet_admin => Ok(Self {
                grant: Arc::new(Grant::All),
                username: who.username.clone(),
            }),
            Some(Caller::Known(who)) => {
                let grant = match state.grants.get(&who.username) {
                    Ok(grant) => grant,
                    Err(ticket) => {
                        let accounts = state.accounts.of_user(&who.username).await?;
                        let grant = Arc::new(access::grant(who, &accounts));
                        state.grants.put(&who.username, &grant, ticket);
                        grant
                    }
                };
                Ok(Self {
                    grant,
                    username: who.username.clone(),
                })
            }
        }
    }

    /// The principals that reach the records of `worker_id`; `None`: all of them.
    pub fn on_worker(&self, worker_id: &str) -> Option<Vec<String>> {
        match &*self.grant {
            Grant::All => None,
            g => Some(g.principals_on(worker_id).into_owned()),
        }
    }

    /// The principals that reach any record; `None`: all of them.
    pub fn anywhere(&self) -> Option<Vec<String>> {
        match &*self.grant {
            Grant::All => None,
            Grant::Principals { principals, .. } => Some(principals.clone()),
        }
    }

    /// Whether the caller sees everything.
    pub fn sees_all(&self) -> bool {
        *self.grant == Grant::All
    }
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Viewer::resolve(state, parts.extensions.get::<Caller>()).await
    }
}

/// Most principals the grants kept hold together (two or three per account: about 10 MB).
pub const GRANTS_MAX_PRINCIPALS: usize = 100_000;

/// The grants of the users who asked lately, so that each request of a user does not read its
/// accounts again. Kept only while the change stream is up: every write of an account comes
/// through it to [`Grants::forget`], and a grant read before a change that overtook it is not
/// kept (the epoch). So a change of access takes effect here as soon as this replica's change
/// stream delivers it, as it does for the live stream. Bounded by the principals it holds.
#[derive(Debug)]
pub struct Grants {
    inner: Mutex<GrantsInner>,
    max_principals: usize,
}

#[derive(Debug, Default)]
struct GrantsInner {
    /// The change stream is up: what it does not tell, did not happen.
    following: bool,
    /// Moves at every change of accounts and of the change stream's state.
    epoch: u64,
    principals: usize,
    users: HashMap<String, Arc<Grant>>,
}

/// What a read of accounts started under: its grant is kept only if nothing changed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

impl Grants {
    pub fn new(max_principals: usize) -> Self {
        Self {
            inner: Mutex::default(),
            max_principals,
        }
    }

    fn lock(&self) -> MutexGuard<'_, GrantsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The grant kept for `username`, or the ticket to put the one read now under.
    pub fn get(&self, username: &str) -> Result<Arc<Grant>, Ticket> {
        let inner = self.lock();
        match inner.users.get(username) {
            Some(g) if inner.following => Ok(g.clone()),
            _ => Err(Ticket(inner.epoch)),
        }
    }

    /// Keeps `grant` for `username` if the change stream is up and nothing changed since
    /// `ticket`; makes room by dropping others (any) when the bound is reached.
    pub fn put(&self, username: &str, grant: &Arc<Grant>, ticket: Ticket) {
        let size = principals_of(grant);
        let mut inner = self.lock();
        if !inner.following || inner.epoch != ticket.0 || size > self.max_principals {
            return;
        }
        if let Some(old) = inner.users.remove(username) {
            inner.principals -= principals_of(&old);
        }
        while inner.principals + size > self.max_principals {
            let Some(any) = inner.users.keys().next().cloned() else {
                break;
            };
            if let Some(old) = inner.users.remove(&any) {
                inner.principals -= principals_of(&old);
            }
        }
        inner.principals += size;
        inner.users.insert(username.to_owned(), grant.clone());
    }

    /// The accounts of `username` changed: its grant is read again, and reads in flight are
    /// not kept.
    pub fn forget(&self, username: &str) {
        let mut inner = self.lock();
        inner.epoch += 1;
        if let Some(old) = inner.users.remove(username) {
            inner.principals -= principals_of(&old);
        }
    }

    /// The change stream came up (`true`) or went down: nothing kept before is trusted.
    pub fn following(&self, up: bool) {
        let mut inner = self.lock();
        inner.following = up;
        inner.epoch += 1;
        inner.users.clear();
        inner.principals = 0;
    }

    /// How many users' grants are kept.
    pub fn len(&self) -> usize {
        self.lock().users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a grant counts for against the bound.
fn principals_of(grant: &Grant) -> usize {
    match grant {
        Grant::All => 1,
        Grant::Principals { principals, .. } => principals.len().max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant_of(principals: &[&str]) -> Arc<Grant> {
        Arc::new(Grant::Principals {
            principals: principals.iter().map(|p| (*p).to_owned()).collect(),
            workers: Default::default(),
        })
    }

    fn kept(g: &Grants, user: &str) -> Option<Arc<Grant>> {
        g.get(user).ok()
    }

    #[test]
    fn nothing_is_kept_until_the_change_stream_is_up_nor_after_it_went_down() {
        let g = Grants::new(100);
        let t = g.get("bob").expect_err("empty");
        g.put("bob", &grant_of(&["u:w:bob"]), t);
        assert!(kept(&g, "bob").is_none(), "not following yet");
        g.following(true);
        let t = g.get("bob").expect_err("empty");
        g.put("bob", &grant_of(&["u:w:bob"]), t);
        assert_eq!(kept(&g, "bob"), Some(grant_of(&["u:w:bob"])));
        g.following(false);
        assert!(kept(&g, "bob").is_none(), "down: dropped");
        g.following(true);
        assert!(kept(&g, "bob").is_none(), "up again: read again");
    }

    #[test]
    fn a_change_drops_the_users_grant_and_any_read_it_overtook() {
        let g = Grants::new(100);
        g.following(true);
        let t = g.get("bob").expect_err("empty");
        g.put("bob", &grant_of(&["u:w:bob"]), t);
        let t_ann = g.get("ann").expect_err("empty");
        g.forget("bob");
        assert!(kept(&g, "bob").is_none());
        g.put("ann", &grant_of(&["u:w:ann"]), t_ann);
        assert!(
            kept(&g, "ann").is_none(),
            "read before a change of accounts: not kept"
        );
        let t = g.get("ann").expect_err("empty");
        g.put("ann", &grant_of(&["u:w:ann"]), t);
        assert!(kept(&g, "ann").is_some());
    }

    #[test]
    fn the_principals_kept_stay_within_the_bound() {
        let g = Grants::new(5);
        g.following(true);
        for user in ["a", "b", "c", "d", "e", "f"] {
            let t = g.get(user).expect_err("new");
            g.put(user, &grant_of(&["p1", "p2"]), t);
        }
        assert_eq!(g.len(), 2, "two of two principals each fit in five");
        let t = g.get("big").expect_err("new");
        g.put("big", &grant_of(&["1", "2", "3", "4", "5", "6"]), t);
        assert!(
            kept(&g, "big").is_none(),
            "larger than the bound: never kept"
        );
        assert_eq!(g.len(), 2);
    }
}
