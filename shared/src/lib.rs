//! The lab-record core both services share: the record model and change detection (pure), the
//! MongoDB store, configuration, metrics and telemetry, and the plumbing of a service process.

pub mod access;
pub mod accounts;
pub mod backoff;
pub mod change;
pub mod change_stream;
pub mod cli;
pub mod config;
pub mod cursor;
pub mod duration;
pub mod error;
pub mod fence;
pub mod fleet;
pub mod metrics;
pub mod mongo;
pub mod progress;
pub mod record;
pub mod registry;
pub mod secret;
pub mod service;
pub mod status;
pub mod store;
pub mod sync_request;
pub mod telemetry;

pub use error::{Error, Result};
