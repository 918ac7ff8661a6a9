//! The CML REST API client: one connection pool for the fleet, cached tokens, the bulk call
//! with its fallback, and typed errors.

mod client;
pub mod payload;

pub use client::{CmlClient, CmlTarget, FetchSource, LabListing, RequestHook, SystemInfo};
