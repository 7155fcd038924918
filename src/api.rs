//! The API surface: every route of the runtime, the products and ops in one
//! router with one OpenAPI document, plus the service endpoints (health,
//! readiness, metrics, the document itself). The top of the house: it
//! imports the layers below, nothing imports it but start-up.

use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::{json, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::{ApiError, ApiState};
use crate::store::jobs;

#[utoipa::path(get, path = "/healthz", tag = "service", responses((status = 200, description = "The process is up", body = serde_json::Value)))]
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "service", responses((status = 200, description = "Ready: database reachable; queue depth and served kinds", body = serde_json::Value), (status = 503, description = "The database is unreachable", body = serde_json::Value)))]
async fn readyz(State(st): State<ApiState>) -> Response {
    let probe = async {
        let mut conn = st.engine.pool().acquire().await?;
        let depth = jobs::queue_depth(&mut conn).await?;
        // A kind is served while some worker on its apply queue heartbeats.
        let served = jobs::served_kinds(&mut conn, 15.0).await?;
        Ok::<_, sqlx::Error>((depth, served))
    };
    match tokio::time::timeout(Duration::from_secs(3), probe).await {
        Ok(Ok((rows, served))) => {
            let queues: serde_json::Map<String, Value> =
                rows.into_iter().map(|(q, n)| (q, json!(n))).collect();
            // Signals for an unserved kind are accepted and wait durably.
            let kinds: serde_json::Map<String, Value> = st
                .engine
                .registry()
                .kinds()
                .into_iter()
                .map(|k| {
                    (
                        k.to_string(),
                        json!(if served.iter().any(|s| s == k) {
                            "served"
                        } else {
                            "unserved"
                        }),
                    )
                })
                .collect();
            Json(json!({"status": "ready", "database": "ok", "queue_depth": queues, "workflows": kinds}))
                .into_response()
        }
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "database": "unreachable"})),
        )
            .into_response(),
    }
}

/// Prometheus exposition; gauges are sampled from the database at scrape.
#[utoipa::path(get, path = "/metrics", tag = "service", responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain")))]
async fn metrics_endpoint(State(st): State<ApiState>) -> Response {
    let handle = crate::metrics::handle();
    let sample = async {
        let mut conn = st.engine.pool().acquire().await?;
        let depth = jobs::queue_depth(&mut conn).await?;
        // The same three reasons as the ops list: dead effect, overdue timer,
        // no progress past the workflow's own deadline for its state.
        let (kinds, states, secs) = crate::ops::stuck_deadlines(st.engine.registry());
        let (stuck,): (i64,) = sqlx::query_as(
            "select count(*) from workflows w
             left join unnest($1::text[], $2::text[], $3::float8[]) as d(kind, state, secs)
               on d.kind = w.kind and d.state = w.state_name
             where exists (select 1 from effects e where e.tenant_id = w.tenant_id and e.workflow_id = w.id and e.status = 'dead')
                or exists (select 1 from timers t where t.tenant_id = w.tenant_id and t.workflow_id = w.id
                           and t.status = 'pending' and t.due_at < now() - interval '60 seconds')
                or (w.status = 'running' and w.updated_at < now() - make_interval(secs => d.secs))",
        )
        .bind(&kinds)
        .bind(&states)
        .bind(&secs)
        .fetch_one(&mut *conn)
        .await?;
        Ok::<_, sqlx::Error>((depth, stuck))
    };
    if let Ok(Ok((depth, stuck))) = tokio::time::timeout(Duration::from_secs(3), sample).await {
        // Every queue this deployment knows, so an emptied one reads 0.
        let mut queues: Vec<String> = vec![jobs::INBOUND_QUEUE.to_string()];
        for kind in st.engine.registry().kinds() {
            queues.push(jobs::apply_queue(kind));
            queues.push(jobs::effect_queue(kind));
        }
        for queue in queues {
            let n = depth
                .iter()
                .find(|(q, _)| *q == queue)
                .map_or(0, |(_, n)| *n);
            metrics::gauge!(crate::metrics::QUEUE_DEPTH, "queue" => queue).set(n as f64);
        }
        metrics::gauge!(crate::metrics::STUCK_WORKFLOWS).set(stuck as f64);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        handle.render(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_such_route", "no such route")
}

#[utoipa::path(get, path = "/openapi.json", tag = "service", responses((status = 200, description = "This OpenAPI 3 document", body = serde_json::Value)))]
async fn openapi_json() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
        .into_response()
}

/// Every route with its OpenAPI description: the router and `/openapi.json`
/// come from this one list, so neither can miss a route.
pub fn api_router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(crate::openapi::base())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics_endpoint))
        .routes(routes!(openapi_json))
        .routes(routes!(crate::console::index))
        .routes(routes!(crate::console::script))
        .routes(routes!(crate::console::style))
        .merge(crate::http::routes())
        .merge(crate::intake::routes::router())
        .merge(crate::admin::router())
        .merge(crate::ops::router())
        .merge(crate::courier::router())
        .merge(crate::messaging::router())
}

/// Rejections axum answers by itself (a body over the limit, a wrong method or
/// content type) get our JSON error shape and a machine-readable code too.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::NOT_FOUND => "no_such_route",
        _ => "bad_request",
    };
    let allow = response.headers().get(axum::http::header::ALLOW).cloned();
    let message = status
        .canonical_reason()
        .unwrap_or("bad request")
        .to_lowercase();
    let mut out = (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response();
    if let Some(allow) = allow {
        out.headers_mut().insert(axum::http::header::ALLOW, allow);
    }
    out
}

/// Build the router.
pub fn router(state: ApiState) -> Router {
    let (router, _) = api_router().split_for_parts();
    let limit = state.max_body_bytes;
    router
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// The full OpenAPI document as JSON, built once from [`api_router`].
pub fn document_json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let doc = api_router().into_openapi();
        doc.to_pretty_json()
            .expect("the OpenAPI document serializes")
    })
}
