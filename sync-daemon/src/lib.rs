//! sync-daemon: polls every CML worker of the fleet and keeps `lab_records` in MongoDB up to date.
//!
//! [`app::App`] is the service; [`daemon`] its loop and `once`; [`schedule::Schedule`] decides
//! what syncs when (pure), [`runner::Runner`] does it, [`worker`] syncs one worker.

pub mod app;
pub mod backoff;
pub mod context;
pub mod daemon;
pub mod error;
pub mod events;
pub mod known;
pub mod lease;
pub mod metrics;
pub mod pass;
pub mod runner;
pub mod schedule;
pub mod status;
pub mod watch;
pub mod worker;

pub use error::{Error, Result};
