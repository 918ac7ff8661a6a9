//! A client of the Cisco Modeling Labs 2.x REST API that fetches every lab of a server: cached
//! tokens per server, one `populate_lab_tiles` call with a bounded fallback, connections of
//! their own per piece of work, typed errors; and the lenient mapping of CML's lab payloads
//! (2.4 to 2.10+) to observed labs, with their groups read from the lab objects or, on 2.9+,
//! from the server's group associations; and CML's event stream (`events`, `/ws/ui`).

mod client;
mod error;
pub mod events;
pub mod payload;

pub use client::{
    CmlClient, CmlTarget, FetchSource, GroupsRead, LabListing, RequestHook, SystemInfo,
};
pub use error::{Error, Result};
