//! A client of the Cisco Modeling Labs 2.x REST API that fetches every lab of a server: cached
//! tokens per server, one `populate_lab_tiles` call with a bounded fallback, connections of
//! their own per piece of work, typed errors; and the lenient mapping of CML's lab payloads
//! (2.4 to 2.10+) to observed labs, with their groups read from the server's groups; its users
//! and groups, who may see which lab (`directory`); and CML's event stream (`events`, `/ws/ui`).

mod client;
pub mod directory;
mod error;
pub mod events;
pub mod payload;

pub use client::{
    AccessRead, CmlClient, CmlTarget, FetchSource, GroupsRead, LabListing, RequestHook, SystemInfo,
};
pub use error::{Error, Result};
