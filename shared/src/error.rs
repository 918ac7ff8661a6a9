//! The error type of the core library: configuration, MongoDB, BSON, cursors.

use crate::config::ConfigError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("cannot decode a stored document: {0}")]
    Decode(#[from] bson::de::Error),
    #[error("cannot encode a document: {0}")]
    Encode(#[from] bson::ser::Error),
    #[error("MongoDB answered a write with errors: {0}")]
    WriteErrors(String),
    #[error("invalid page cursor")]
    InvalidCursor,
}

impl Error {
    /// A short, fixed label for metrics (never the message: messages have unbounded cardinality).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Mongo(_) => "mongodb",
            Error::Decode(_) | Error::Encode(_) => "bson",
            Error::WriteErrors(_) => "mongodb_write",
            Error::InvalidCursor => "invalid_cursor",
        }
    }

    /// True when MongoDB could not be reached at all (as opposed to rejecting a request).
    pub fn is_unavailable(&self) -> bool {
        use mongodb::error::ErrorKind;
        match self {
            Error::Mongo(e) => matches!(
                *e.kind,
                ErrorKind::ServerSelection { .. }
                    | ErrorKind::Io(_)
                    | ErrorKind::ConnectionPoolCleared { .. }
            ),
            _ => false,
        }
    }
}
