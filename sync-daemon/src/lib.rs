//! sync-daemon: polls every CML worker of the fleet and keeps `lab_records` in MongoDB up to date.
//!
//! [`app::App`] is the service; [`daemon`] its two modes (the loop and `once`); the
//! [`trigger`] sources say why a worker syncs, [`schedule::Schedule`] decides what syncs when
//! (pure), [`runner::Runner`] starts the syncs and hands what follows to its books, [`worker`]
//! syncs one worker; [`cml_events`] says which messages of a CML server's event stream call
//! for a sync (pure), [`stream_policy`] what a worker's stream watch does after each thing that
//! happens to it (pure).

pub mod app;
pub mod cml_events;
pub mod context;
pub mod daemon;
pub mod error;
pub mod known;
pub mod lease;
pub mod logs;
pub mod metrics;
pub mod pass;
pub mod runner;
pub mod schedule;
pub mod status;
pub mod stream_policy;
pub mod trigger;
pub mod watch;
pub mod worker;

pub use error::{Error, Result};
