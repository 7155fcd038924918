//! The OpenAPI 3 description of the HTTP API, generated (utoipa) from the
//! same handler annotations the router is built from: every route the router
//! serves is in the document by construction (`utoipa_axum::routes!`).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

/// An error: `{"error": {"code": "...", "message": "..."}}`.
#[derive(ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A machine-readable code and a human message.
#[derive(ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `reason_required`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

/// A body carrying only the reason every mutating ops action needs.
#[derive(ToSchema)]
pub struct ReasonBody {
    /// Why (1..=500 printable characters); recorded in the audit log.
    pub reason: String,
}

/// The client errors every endpoint may answer with.
#[derive(IntoResponses)]
pub enum ClientErrors {
    /// Bad input, missing or wrong credentials, unknown resources, conflicts:
    /// a 4xx with a machine-readable code.
    #[response(status = "4XX")]
    Client(#[to_schema] ErrorBody),
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Dispatch",
        description = "A durable workflow runtime on PostgreSQL for small service businesses."
    ),
    modifiers(&BearerAuth),
    components(schemas(ErrorBody, ErrorDetail)),
    tags(
        (name = "workflows", description = "Start workflows, send signals, read state"),
        (name = "ops", description = "Find, understand and fix stuck workflows (audited)"),
        (name = "admin", description = "People, tenant configuration and providers"),
        (name = "courier", description = "Drivers, Telegram registration links, route dispatches"),
        (name = "intake", description = "Provider webhooks, verified by their signatures"),
        (name = "service", description = "Health, readiness, metrics, this document, the console")
    )
)]
struct Base;

/// The base document (info, security scheme, tags) the routes are added to.
pub fn base() -> utoipa::openapi::OpenApi {
    Base::openapi()
}
