//! The error type of the CML client: what can go wrong talking to one CML server.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CML worker {worker}: unreachable: {detail}")]
    Unreachable { worker: String, detail: String },
    #[error("CML worker {worker}: no answer within {timeout_ms} ms")]
    Timeout { worker: String, timeout_ms: u64 },
    #[error("CML worker {worker}: authentication failed (wrong username or password)")]
    AuthFailed { worker: String },
    #[error("CML worker {worker}: {path} answered HTTP {status}: {description}")]
    Status {
        worker: String,
        path: String,
        status: u16,
        description: String,
    },
    #[error("CML worker {worker}: malformed answer from {path}: {detail}")]
    Malformed {
        worker: String,
        path: String,
        detail: String,
    },
    #[error("CML worker {worker}: bad endpoint `{endpoint}`: {detail}")]
    Endpoint {
        worker: String,
        endpoint: String,
        detail: String,
    },
    #[error("CML worker {worker}: {path} answered with a redirect ({status} to `{location}`); redirects are not followed")]
    Redirect {
        worker: String,
        path: String,
        status: u16,
        location: String,
    },
    #[error("CML worker {worker}: the answer of {path} is larger than {limit} bytes (cml.max_response_bytes)")]
    TooLarge {
        worker: String,
        path: String,
        limit: usize,
    },
    #[error("CML worker {worker}: it lists more than {limit} labs (cml.max_labs_per_worker)")]
    TooManyLabs { worker: String, limit: usize },
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
}

impl Error {
    /// A short, fixed label for metrics and logs (never the message: its cardinality is unbounded).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Unreachable { .. } => "cml_unreachable",
            Error::Timeout { .. } => "cml_timeout",
            Error::AuthFailed { .. } => "cml_auth_failed",
            Error::Status { .. } => "cml_http_status",
            Error::Malformed { .. } => "cml_malformed",
            Error::Endpoint { .. } => "cml_endpoint",
            Error::Redirect { .. } => "cml_redirect",
            Error::TooLarge { .. } => "cml_too_large",
            Error::TooManyLabs { .. } => "cml_too_many_labs",
            Error::HttpClient(_) => "http_client",
        }
    }
}
