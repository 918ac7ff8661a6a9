//! The error type of the daemon.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// MongoDB, the store or the configuration.
    #[error(transparent)]
    Store(#[from] shared::Error),
    /// Talking to a CML worker.
    #[error(transparent)]
    Cml(#[from] cml_client::Error),
    #[error("worker sync did not finish within {0:?}")]
    Deadline(Duration),
    #[error("worker sync panicked: {0}")]
    Panicked(String),
    #[error("cannot listen on the admin address {addr}: {source}")]
    AdminListen {
        addr: String,
        source: std::io::Error,
    },
    #[error("the admin server failed: {0}")]
    AdminServe(std::io::Error),
    #[error(
        "another replica ({holder}) holds the sync lease; to have it refresh one worker now, \
         run `sync-daemon refresh WORKER_ID`"
    )]
    LeaseHeld { holder: String },
    #[error("worker {0} is not an active worker (registry or sync.static_workers)")]
    UnknownWorker(String),
    #[error("worker {worker_id} is not running (status {status})")]
    NotRunning { worker_id: String, status: String },
    #[error(
        "worker {worker_id} was refreshed on demand too recently, or a refresh of it is still \
         pending or running (request {request_id}); try again in {retry_after_s} s"
    )]
    Throttled {
        worker_id: String,
        request_id: String,
        retry_after_s: u64,
    },
    #[error("worker syncs in flight did not finish within the shutdown grace of {0:?}")]
    Drain(Duration),
}

impl Error {
    /// A short, fixed label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Store(e) => e.metric_label(),
            Error::Cml(e) => e.metric_label(),
            Error::Deadline(_) => "deadline",
            Error::Panicked(_) => "panic",
            Error::AdminListen { .. } => "admin_listen",
            Error::AdminServe(_) => "admin_serve",
            Error::LeaseHeld { .. } => "lease_held",
            Error::UnknownWorker(_) => "unknown_worker",
            Error::NotRunning { .. } => "not_running",
            Error::Throttled { .. } => "throttled",
            Error::Drain(_) => "drain",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
