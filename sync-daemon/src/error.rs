//! The error type of the daemon.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Store, MongoDB, CML client or configuration failure.
    #[error(transparent)]
    Labs(#[from] cml_labs::Error),
    #[error("worker sync did not finish within {0:?}")]
    Deadline(Duration),
    #[error("cannot listen on the admin address {addr}: {source}")]
    AdminListen {
        addr: String,
        source: std::io::Error,
    },
    #[error("another replica ({holder}) holds the sync lease")]
    LeaseHeld { holder: String },
    #[error("worker {0} is not an active worker (registry or sync.static_workers)")]
    UnknownWorker(String),
}

impl Error {
    /// A short, fixed label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Labs(e) => e.metric_label(),
            Error::Deadline(_) => "deadline",
            Error::AdminListen { .. } => "admin_listen",
            Error::LeaseHeld { .. } => "lease_held",
            Error::UnknownWorker(_) => "unknown_worker",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
