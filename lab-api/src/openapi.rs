//! The OpenAPI document, generated from the handlers' annotations and the DTO types.

use utoipa::{
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi,
};

use crate::{api, dto, problem};

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "lab-api", description = "Read-only access to the labs of a CML fleet, kept fresh by sync-daemon."),
    paths(api::worker_labs, api::legacy_worker_labs, api::lab, api::fleet_labs, api::sync_status),
    components(schemas(api::LabState, dto::UiLab, dto::FleetLab, dto::LabPage, dto::LabRecordDto, dto::HistoryEntryDto, dto::FieldChangeDto, dto::SyncStatusDto, problem::Problem)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

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
