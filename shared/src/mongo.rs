//! The MongoDB connection: client options from the configuration, liveness, server capabilities.

use mongodb::{
    bson::doc,
    event::{command::CommandEvent, EventHandler},
    options::{ClientOptions, ReadPreference, SelectionCriteria},
    Client, Database,
};

use crate::{
    config::{MongoConfig, ReadPreferenceMode},
    secret::redact_uri,
    Error, Result,
};

/// Wire version of MongoDB 8.0, the first with the `bulkWrite` command.
pub const WIRE_VERSION_8_0: i32 = 25;

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
        // The driver's message may quote the URI; say what is wrong without it.
        let text = e
            .to_string()
            .replace(cfg.uri.expose(), &redact_uri(cfg.uri.expose()));
        Error::Config(crate::config::ConfigError(vec![
            crate::config::ConfigProblem {
                key: "mongodb.uri".into(),
                source: None,
                message: text,
            },
        ]))
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

pub fn read_preference(mode: ReadPreferenceMode) -> ReadPreference {
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
            .and_then(crate::store::as_i64)
            .and_then(|v| i32::try_from(v).ok())
            .unwrap_or(0),
    })
}
