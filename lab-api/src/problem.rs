//! Errors as RFC 9457 problem documents. Client mistakes say exactly what is wrong; server
//! failures say only that something failed. Their details travel to the request middleware
//! (a response extension), which logs them once; they never reach the client.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;
use utoipa::ToSchema;

/// The error type of the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid parameter `{param}`: {detail}")]
    BadRequest { param: String, detail: String },
    #[error("{0}")]
    NotFound(String),
    /// The request cannot be served in the resource's present state (a worker not running).
    #[error("{0}")]
    Conflict(String),
    /// A refresh refused by the per-worker throttle: the request that holds it back, and when
    /// to ask again.
    #[error("refresh of worker {} throttled for {retry_after_s} s", request.worker_id)]
    Throttled {
        retry_after_s: u64,
        request: Box<crate::dto::SyncRequestDto>,
    },
    #[error("worker {worker_id} has more than {max} labs")]
    TooManyLabs { worker_id: String, max: usize },
    #[error("{0}")]
    Unauthorized(String),
    /// A browser request from another site to an endpoint that changes something.
    #[error("{0}")]
    Forbidden(String),
    /// MongoDB cannot be reached right now.
    #[error("dependency unavailable: {0}")]
    Unavailable(String),
    /// The identity provider's key set cannot be fetched, and the token's key is not known.
    #[error("identity provider unavailable: {0}")]
    AuthUnavailable(String),
    #[error("too many requests in flight")]
    Overloaded,
    #[error("this replica serves as many event streams as it may")]
    TooManyStreams,
    #[error("the request took too long")]
    Timeout,
    #[error("internal error: {0}")]
    Internal(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// What a 5xx response leaves for the request middleware to log: its kind and the details the
/// client never sees.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn bad(param: &str, detail: impl Into<String>) -> Self {
        ApiError::BadRequest {
            param: param.to_owned(),
            detail: detail.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::TooManyLabs { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Unavailable(_)
            | ApiError::AuthUnavailable(_)
            | ApiError::Overloaded
            | ApiError::TooManyStreams
            | ApiError::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) | ApiError::Listen { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<shared::Error> for ApiError {
    fn from(e: shared::Error) -> Self {
        match e {
            shared::Error::InvalidCursor => {
                ApiError::bad("cursor", "is not a cursor this API issued")
            }
            e if e.is_unavailable() => ApiError::Unavailable(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The query or path parameter at fault, for 400s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// For 429: when to ask again (as `Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// For 429: the refresh that holds the worker back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<crate::dto::SyncRequestDto>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (kind, detail, param) = match &self {
            ApiError::BadRequest { param, detail } => (
                "bad-request",
                format!("`{param}` {detail}"),
                Some(param.clone()),
            ),
            ApiError::NotFound(d) => ("not-found", d.clone(), None),
            ApiError::Conflict(d) => ("conflict", d.clone(), None),
            ApiError::Throttled {
                retry_after_s,
                request,
            } => (
                "refresh-throttled",
                format!(
                    "Worker {} was refreshed too recently, or a refresh of it is pending or \
                     running; try again in {retry_after_s} s.",
                    request.worker_id
                ),
                None,
            ),
            ApiError::TooManyLabs { worker_id, max } => (
                "too-many-labs",
                format!(
                    "Worker {worker_id} has more than {max} labs, more than one response carries \
                     (api.max_labs_per_response); page through them with \
                     GET /api/labs?worker_id={worker_id}."
                ),
                None,
            ),
            ApiError::Unauthorized(d) => ("unauthorized", d.clone(), None),
            ApiError::Forbidden(d) => ("cross-site", d.clone(), None),
            ApiError::Unavailable(_) => (
                "unavailable",
                "The lab store cannot be reached right now; try again shortly.".to_owned(),
                None,
            ),
            ApiError::AuthUnavailable(_) => (
                "auth-unavailable",
                "The identity provider cannot be reached to check the token's key; try again \
                 shortly."
                    .to_owned(),
                None,
            ),
            ApiError::Overloaded => (
                "overloaded",
                "Too many requests are in flight; try again shortly.".to_owned(),
                None,
            ),
            ApiError::TooManyStreams => (
                "streams-full",
                "This replica serves as many event streams as it may; try again shortly."
                    .to_owned(),
                None,
            ),
            ApiError::Timeout => (
                "timeout",
                "The request took too long; try again shortly.".to_owned(),
                None,
            ),
            ApiError::Internal(_) | ApiError::Listen { .. } => (
                "internal",
                "The request failed on the server.".to_owned(),
                None,
            ),
        };
        let (retry_after_seconds, request) = match &self {
            ApiError::Throttled {
                retry_after_s,
                request,
            } => (Some(*retry_after_s), Some(request.as_ref().clone())),
            _ => (None, None),
        };
        let body = Problem {
            kind: format!("https://cml-labs.invalid/problems/{kind}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            param,
            retry_after_seconds,
            request,
        };
        let mut response = (status, Json(body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        }
        if let Some(secs) = retry_after_seconds {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status.is_server_error() {
            response.extensions_mut().insert(Failure {
                kind,
                detail: self.to_string(),
            });
        }
        response
    }
}
