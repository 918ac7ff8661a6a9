//! lab-api: the stateless HTTP API over `lab_records`, in the shape the UI reads. It never
//! writes lab data: a refresh on demand is a request the sync-daemon serves.
//!
//! [`state::AppState`] is what handlers share, built once from the configuration;
//! [`app::App`] is the service and [`app::router`] its application; [`api`] holds the read
//! endpoints with their documentation; [`refresh`] refresh on demand; [`events`] the live
//! event stream.

pub mod access;
pub mod api;
pub mod app;
pub mod auth;
pub mod dto;
pub mod etag;
pub mod events;
pub mod logs;
pub mod metrics;
pub mod openapi;
pub mod page;
pub mod params;
pub mod problem;
pub mod refresh;
pub mod state;
