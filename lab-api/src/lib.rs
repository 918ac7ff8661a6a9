//! lab-api: the stateless, read-only HTTP API over `lab_records`, in the shape the UI reads.
//!
//! [`app::App`] is the service and [`app::router`] its application; [`api`] holds the
//! endpoints with their documentation; [`events`] the live event stream.

pub mod api;
pub mod app;
pub mod auth;
pub mod dto;
pub mod etag;
pub mod events;
pub mod metrics;
pub mod openapi;
pub mod page;
pub mod params;
pub mod problem;
