//! sync-daemon: polls every CML worker of the fleet and keeps `lab_records` in MongoDB up to date.

pub mod admin;
pub mod backoff;
pub mod context;
pub mod cycle;
pub mod daemon;
pub mod error;
pub mod metrics;
pub mod worker;

pub use error::{Error, Result};
