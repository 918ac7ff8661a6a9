//! The OpenAPI document: its base (info, security, shared schemas), and the error responses
//! every read endpoint shares. Paths come from the handlers themselves, as they are routed.

use utoipa::{
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    IntoResponses, Modify, OpenApi,
};

use shared::record::LabState;

use crate::{
    dto::{FieldChangeDto, LabEntry},
    events::payload::{
        Changed, Connected, DataRefreshed, EventEnvelope, Heartbeat, LabChange, LabHidden,
        LabUpdated, RefreshThrottled, Reset, SyncFailed,
    },
    params::{Cursor, Id, Region, Username, Wait},
    problem::Problem,
};

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "lab-api", description = "Read-only access to the labs of a CML fleet, kept fresh by sync-daemon."),
    // Parameter types: the routes reference them, the document must define them. The live
    // stream's envelope and payloads: what a client of the stream reads, by event type.
    components(schemas(
        Problem, Id, Region, Username, Cursor, Wait, LabState,
        EventEnvelope, Connected, Heartbeat, Reset, LabUpdated, LabHidden, LabChange, Changed,
        LabEntry, FieldChangeDto, DataRefreshed, SyncFailed, RefreshThrottled
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// What any authenticated read can answer besides its data.
#[derive(Debug, IntoResponses)]
pub enum ReadErrors {
    /// Unchanged since the ETag given in If-None-Match.
    #[response(status = 304)]
    NotModified,
    /// A bad parameter: `param` names it.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// No token, or a bad one.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// MongoDB or the identity provider unreachable, the request too slow, or overloaded.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

/// What any authenticated write can answer besides its outcome.
#[derive(Debug, IntoResponses)]
pub enum WriteErrors {
    /// A bad parameter: `param` names it.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// No token, or a bad one.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// MongoDB or the identity provider unreachable, the request too slow, or overloaded.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}
