//! The error type of the shared library.

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
    #[error("CML worker {worker}: unreachable: {detail}")]
    CmlUnreachable { worker: String, detail: String },
    #[error("CML worker {worker}: no answer within {timeout_ms} ms")]
    CmlTimeout { worker: String, timeout_ms: u64 },
    #[error("CML worker {worker}: authentication failed (wrong username or password)")]
    CmlAuthFailed { worker: String },
    #[error("CML worker {worker}: {path} answered HTTP {status}: {description}")]
    CmlStatus {
        worker: String,
        path: String,
        status: u16,
        description: String,
    },
    #[error("CML worker {worker}: malformed answer from {path}: {detail}")]
    CmlMalformed {
        worker: String,
        path: String,
        detail: String,
    },
    #[error("CML worker {worker}: bad endpoint `{endpoint}`: {detail}")]
    CmlEndpoint {
        worker: String,
        endpoint: String,
        detail: String,
    },
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
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
            Error::CmlUnreachable { .. } => "cml_unreachable",
            Error::CmlTimeout { .. } => "cml_timeout",
            Error::CmlAuthFailed { .. } => "cml_auth_failed",
            Error::CmlStatus { .. } => "cml_http_status",
            Error::CmlMalformed { .. } => "cml_malformed",
            Error::CmlEndpoint { .. } => "cml_endpoint",
            Error::HttpClient(_) => "http_client",
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
