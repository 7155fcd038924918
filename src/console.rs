//! The ops web console at `/ops`: a static page and a little JavaScript,
//! compiled into the binary, driving the ops API with an ops key the browser
//! keeps for the tab's session only. No separate server, no build step.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// Scripts and styles only from this origin; no framing; no referrer leaks.
fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[utoipa::path(get, path = "/ops", tag = "service", responses((status = 200, description = "The ops console (sign in with an ops key)", body = String, content_type = "text/html")))]
pub(crate) async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX)
}

#[utoipa::path(get, path = "/ops/console.js", tag = "service", responses((status = 200, description = "The console's script", body = String, content_type = "text/javascript")))]
pub(crate) async fn script() -> Response {
    page("text/javascript; charset=utf-8", SCRIPT)
}

#[utoipa::path(get, path = "/ops/console.css", tag = "service", responses((status = 200, description = "The console's styles", body = String, content_type = "text/css")))]
pub(crate) async fn style() -> Response {
    page("text/css; charset=utf-8", STYLE)
}
