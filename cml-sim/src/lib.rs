//! A fleet of simulated Cisco Modeling Labs servers speaking the CML 2.x REST API closely
//! enough for Cisco's own Python client, with per-worker fault injection.
//!
//! Rust tests use it as a library ([`start`] returns a handle with the fleet and its endpoints);
//! scripts run the `cml-sim` binary and drive its HTTP control API.

// Handlers return a ready `Response` as their error: that is the axum idiom, size and all.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod control;
pub mod directory;
pub mod events;
pub mod fleet;
pub mod hostile;
pub mod model;
pub mod registry;
pub mod server;
pub mod tls;
pub mod token;
pub mod ws;

pub use fleet::{Fleet, FleetConfig};
pub use model::{
    EndpointFault, Faults, Personality, SimGroup, SimLab, SimShare, SimWorker, WsHostile,
};
pub use server::{serve, Addressing, RunningFleet, ServeOptions};

/// Generates a fleet and serves it: the one call Rust tests need.
pub async fn start(cfg: &FleetConfig, opts: &ServeOptions) -> std::io::Result<RunningFleet> {
    serve(Fleet::generate(cfg), opts).await
}
