//! The MongoDB connection and what every collection of ours needs from it: client options from
//! the configuration, liveness, server capabilities, idempotent indexes, reading server replies.

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::{
    error::ErrorKind,
    event::{command::CommandEvent, EventHandler},
    options::{ClientOptions, ReadPreference, SelectionCriteria},
    Client, Collection, Database, IndexModel,
};

use crate::{
    config::{ConfigError, ConfigProblem, MongoConfig, ReadPreferenceMode},
    secret::scrub,
    Error, Result,
};

/// Wire version of MongoDB 8.0, the first with the `bulkWrite` command.
pub const WIRE_VERSION_8_0: i32 = 25;
/// MongoDB's error code for a unique index violation.
pub const DUPLICATE_KEY: i32 = 11000;
/// MongoDB's error code for a collection or database that does not exist.
const NAMESPACE_NOT_FOUND: i32 = 26;
/// MongoDB's error codes for a document larger than 16 MiB (as sent, or after an update).
pub const DOCUMENT_TOO_LARGE: [i32; 3] = [10334, 17419, 17420];

/// Builds a client from the configuration. Connecting is lazy: this fails only on a bad URI.
///
/// `monitor` receives every command the driver sends (tests count round trips with it; the
/// daemon exports the count as a metric).
pub async fn connect(
    cfg: &MongoConfig,
    app_name: &str,
    monitor: Option<EventHandler<CommandEvent>>,
) -> Result<Client> {
    let mut options = ClientOptions::parse(cfg.uri.expose()).await.map_err(|e| {
        // The driver's message may quote the URI or parts of it; say what is wrong without them.
        let text = scrub(&e.to_string(), cfg.uri.expose());
        Error::Config(ConfigError(vec![ConfigProblem {
            key: "mongodb.uri".into(),
            source: None,
            message: text,
        }]))
    })?;
    options.app_name = Some(app_name.to_owned());
    options.server_selection_timeout = Some(cfg.server_selection_timeout.get());
    options.connect_timeout = Some(cfg.server_selection_timeout.get());
    options.selection_criteria = Some(SelectionCriteria::ReadPreference(read_preference(
        cfg.read_preference,
    )));
    options.command_event_handler = monitor;
    Ok(Client::with_options(options)?)
}

fn read_preference(mode: ReadPreferenceMode) -> ReadPreference {
    match mode {
        ReadPreferenceMode::Primary => ReadPreference::Primary,
        ReadPreferenceMode::PrimaryPreferred => ReadPreference::PrimaryPreferred { options: None },
        ReadPreferenceMode::Secondary => ReadPreference::Secondary { options: None },
        ReadPreferenceMode::SecondaryPreferred => {
            ReadPreference::SecondaryPreferred { options: None }
        }
        ReadPreferenceMode::Nearest => ReadPreference::Nearest { options: None },
    }
}

/// Round trip to the server; the readiness check of both binaries.
pub async fn ping(db: &Database) -> Result<()> {
    db.run_command(doc! { "ping": 1 }).await?;
    Ok(())
}

/// What the server says about itself, for start-up logs and capability checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    pub version: String,
    pub max_wire_version: i32,
}

impl ServerInfo {
    pub fn supports_bulk_write_command(&self) -> bool {
        self.max_wire_version >= WIRE_VERSION_8_0
    }
}

pub async fn server_info(db: &Database) -> Result<ServerInfo> {
    let hello = db.run_command(doc! { "hello": 1 }).await?;
    let build = db.run_command(doc! { "buildInfo": 1 }).await.ok();
    Ok(ServerInfo {
        version: build
            .as_ref()
            .and_then(|b| b.get_str("version").ok())
            .unwrap_or("unknown")
            .to_owned(),
        max_wire_version: hello
            .get("maxWireVersion")
            .and_then(as_i64)
            .and_then(|v| i32::try_from(v).ok())
            .unwrap_or(0),
    })
}

/// A count from a server reply, whatever integer width the server chose.
pub fn as_i64(b: &Bson) -> Option<i64> {
    match b {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        Bson::Double(n) if n.is_finite() => Some(*n as i64),
        _ => None,
    }
}

/// Whether a write failed on a unique index.
pub fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match &*e.kind {
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// Creates each wanted index unless one with the same keys and uniqueness exists already
/// (under any name, e.g. made by the system this replaces).
pub async fn ensure_indexes(
    coll: &Collection<Document>,
    wanted: impl IntoIterator<Item = IndexModel>,
) -> Result<()> {
    let existing: Vec<IndexModel> = match coll.list_indexes().await {
        Ok(cursor) => cursor.try_collect().await?,
        Err(e) if matches!(*e.kind, ErrorKind::Command(ref c) if c.code == NAMESPACE_NOT_FOUND) => {
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    let unique = |m: &IndexModel| m.options.as_ref().and_then(|o| o.unique).unwrap_or(false);
    let missing: Vec<IndexModel> = wanted
        .into_iter()
        .filter(|w| {
            !existing
                .iter()
                .any(|e| e.keys == w.keys && unique(e) == unique(w))
        })
        .collect();
    if !missing.is_empty() {
        coll.create_indexes(missing).await.map_err(|e| match *e.kind {
            ErrorKind::Command(ref c) if c.code == DUPLICATE_KEY => Error::WriteErrors(format!(
                "collection {} holds duplicate records, so a unique index cannot be built; remove the duplicates first ({})",
                coll.name(),
                c.message
            )),
            _ => e.into(),
        })?;
    }
    Ok(())
}

/// An index on `keys` named `name`, unique when asked.
pub fn index(keys: Document, name: &str, unique: bool) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(
            mongodb::options::IndexOptions::builder()
                .name(name.to_owned())
                .unique(unique.then_some(true))
                .build(),
        )
        .build()
}

/// Sends a classic multi-statement `update` command (one round trip on every server version)
/// and reads its reply. `upsert` tells which statements may be retried after a duplicate key.
pub async fn update_command(
    db: &Database,
    collection: &str,
    statements: Vec<Document>,
    upsert: impl Fn(usize) -> bool,
) -> Result<UpdateReply> {
    let reply = db
        .run_command(doc! { "update": collection, "updates": statements, "ordered": false })
        .await?;
    let n = reply.get("n").and_then(as_i64).unwrap_or(0).max(0) as u64;
    let upserted = reply
        .get_array("upserted")
        .map(|a| a.len() as u64)
        .unwrap_or(0);
    let mut out = UpdateReply {
        matched: n.saturating_sub(upserted),
        upserted,
        duplicate_upserts: Vec::new(),
        too_large: Vec::new(),
    };
    let mut fatal = Vec::new();
    if let Ok(errors) = reply.get_array("writeErrors") {
        for e in errors.iter().filter_map(Bson::as_document) {
            let index = e.get("index").and_then(as_i64).unwrap_or(-1);
            let code = e.get("code").and_then(as_i64).unwrap_or(0);
            match usize::try_from(index) {
                Ok(i) if code == i64::from(DUPLICATE_KEY) && upsert(i) => {
                    out.duplicate_upserts.push(i)
                }
                Ok(i) if DOCUMENT_TOO_LARGE.iter().any(|c| i64::from(*c) == code) => {
                    out.too_large.push(i)
                }
                _ => fatal.push(format!(
                    "statement {index}: code {code}: {}",
                    e.get_str("errmsg").unwrap_or("")
                )),
            }
        }
    }
    if let Ok(wce) = reply.get_document("writeConcernError") {
        fatal.push(format!(
            "write concern: {}",
            wce.get_str("errmsg").unwrap_or("")
        ));
    }
    if fatal.is_empty() {
        Ok(out)
    } else {
        Err(Error::WriteErrors(fatal.join("; ")))
    }
}

/// What an `update` command did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateReply {
    pub matched: u64,
    pub upserted: u64,
    /// Statements (by index) that were upserts and lost a race on a unique index.
    pub duplicate_upserts: Vec<usize>,
    /// Statements (by index) refused because their document would pass 16 MiB.
    pub too_large: Vec<usize>,
}
