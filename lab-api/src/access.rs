//! What a caller may see, decided once per request: from who it is ([`Caller`], set by the
//! auth middleware) and its accounts on the workers (one indexed read of `cml_accounts`), a
//! [`Grant`] that the store's queries and the live stream enforce. A request that reached a
//! handler without a caller (a route left outside the middleware) sees nothing.

use axum::{extract::FromRequestParts, http::request::Parts};
use shared::access::{self, Grant};

use crate::{auth::Caller, problem::ApiError, state::AppState};

/// The caller's grant, as an extractor.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub grant: Grant,
    /// The caller's username (empty for everyone-sees-everything and the fleet's admins).
    pub username: String,
}

impl Viewer {
    /// Sees nothing at all.
    fn nobody() -> Self {
        Self {
            grant: Grant::Principals {
                principals: Vec::new(),
                workers: Default::default(),
            },
            username: String::new(),
        }
    }

    /// Resolves a caller against its accounts.
    pub async fn resolve(state: &AppState, caller: Option<&Caller>) -> Result<Self, ApiError> {
        match caller {
            None => Ok(Self::nobody()),
            Some(Caller::Anyone) => Ok(Self {
                grant: Grant::All,
                username: String::new(),
            }),
            Some(Caller::Known(who)) if who.fleet_admin => Ok(Self {
                grant: Grant::All,
                username: who.username.clone(),
            }),
            Some(Caller::Known(who)) => {
                let accounts = state.accounts.of_user(&who.username).await?;
                Ok(Self {
                    grant: access::grant(who, &accounts),
                    username: who.username.clone(),
                })
            }
        }
    }

    /// The principals that reach the records of `worker_id`; `None`: all of them.
    pub fn on_worker(&self, worker_id: &str) -> Option<Vec<String>> {
        match &self.grant {
            Grant::All => None,
            g => Some(g.principals_on(worker_id).into_owned()),
        }
    }

    /// The principals that reach any record; `None`: all of them.
    pub fn anywhere(&self) -> Option<Vec<String>> {
        match &self.grant {
            Grant::All => None,
            Grant::Principals { principals, .. } => Some(principals.clone()),
        }
    }

    /// Whether the caller sees everything.
    pub fn sees_all(&self) -> bool {
        self.grant == Grant::All
    }
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Viewer::resolve(state, parts.extensions.get::<Caller>()).await
    }
}
