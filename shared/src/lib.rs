//! Lab records of a CML fleet: the record model, change detection, the MongoDB store and the
//! configuration shared by `sync-daemon` and `lab-api`.

pub mod change;
pub mod cli;
pub mod cml;
pub mod config;
pub mod cursor;
pub mod duration;
pub mod error;
pub mod lease;
pub mod mongo;
pub mod record;
pub mod secret;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod workers;

pub use error::{Error, Result};
