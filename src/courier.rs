//! Route dispatch to drivers over HTTP (DOMAIN.md §3): the drivers registry,
//! Telegram registration links with their QR codes, and route dispatches
//! (one, or a batch of up to 500) with a status per channel.
//!
//! Roles: `ops`, `operator` and `integration` (the host application) manage
//! drivers and dispatch routes; drivers act only through Telegram.
//!
//! Choices where DOMAIN.md is silent:
//! - A registration token is 32 random bytes, base64url (43 characters); only
//!   its SHA-256 is stored to find the registration. Links live 7 days unless
//!   `ttl_s` (60 s ..= 30 days) says otherwise.
//! - A dispatch's channels are decided when it is created, from the driver's
//!   preferences: Telegram needs a bound chat, email an address; a channel
//!   that cannot be used is recorded as `skipped` with the reason. A driver
//!   reachable on no channel is refused (422 `driver_unreachable`).
//! - The item's idempotency key is the dispatch's key: the same key with the
//!   same driver and route answers the existing dispatch (200) even if the
//!   driver's channels changed since; with anything else, 422
//!   `idempotency_key_reused`. A batch is validated whole before anything is
//!   stored.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use chrono::{Duration, Utc};
use rand::RngCore;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;
use workflows::driver_registration::DriverRegistration;
use workflows::route_dispatch::RouteDispatch;
use workflows::{Role, Workflow};

use crate::channels::qr::qr_png;
use crate::http::{parse_body, ApiError, ApiState, Caller};
use crate::http::{require, valid_id, IdempotencyKey};
use crate::store::drivers::{self, Driver};
use crate::store::{effects, providers, workflows as wf_store};

const MANAGERS: &[Role] = &[Role::Ops, Role::Operator, Role::Integration];
/// Most items in one batch.
pub const MAX_BATCH: usize = 500;

fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

fn not_found(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such {what}"),
    )
}

// ---- QR codes ----

/// The QR code of `text` as SVG.
pub fn qr_svg(text: &str) -> Result<String, qrcode::types::QrError> {
    let code = qrcode::QrCode::new(text.as_bytes())?;
    Ok(code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(256, 256)
        .quiet_zone(true)
        .build())
}

/// SHA-256 of a registration token: what the database keeps.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

// ---- drivers ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct DriverBody {
    /// Id (letters, digits, `_.-`; generated when absent on POST).
    #[serde(default)]
    id: Option<String>,
    /// Name (1..=200 characters).
    name: String,
    /// Email address, for email dispatches and registration links.
    #[serde(default)]
    email: Option<String>,
    /// Channels to dispatch on, in order; default `["telegram", "email"]`.
    #[serde(default)]
    channels: Option<Vec<String>>,
}

fn valid_email(e: &str) -> bool {
    let Some((local, domain)) = e.split_once('@') else {
        return false;
    };
    e.len() <= 254
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !e
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
}

fn validate_driver(id: String, b: DriverBody) -> Result<Driver, ApiError> {
    if !valid_id(&id) {
        return Err(invalid(
            "invalid_body",
            "id: 1..=64 of letters, digits, `_`, `.`, `-`, starting with a letter or digit",
        ));
    }
    let name = b.name.trim().to_string();
    if workflows::text::check(&name, workflows::text::TextKind::Name, 200).is_err() {
        return Err(invalid(
            "invalid_body",
            "name: 1..=200 printable characters, no bidirectional controls",
        ));
    }
    let email = match b.email.map(|e| e.trim().to_string()) {
        Some(e) if valid_email(&e) => Some(e),
        Some(_) => return Err(invalid("invalid_body", "email is not an email address")),
        None => None,
    };
    let channels = b
        .channels
        .unwrap_or_else(|| vec!["telegram".into(), "email".into()]);
    let distinct: HashSet<&String> = channels.iter().collect();
    if channels.is_empty()
        || distinct.len() != channels.len()
        || channels
            .iter()
            .any(|c| !workflows::route_dispatch::CHANNELS.contains(&c.as_str()))
    {
        return Err(invalid(
            "invalid_body",
            "channels: distinct values of `telegram`, `email`",
        ));
    }
    Ok(Driver {
        id,
        name,
        email,
        telegram_chat_id: None,
        channels,
    })
}

fn driver_view(d: &Driver) -> Value {
    json!({ "id": d.id, "name": d.name, "email": d.email, "channels": d.channels,
            "telegram_bound": d.telegram_chat_id.is_some() })
}

async fn upsert_driver(
    st: &ApiState,
    caller: &Caller,
    id: Option<String>,
    body: &Bytes,
) -> Result<Response, ApiError> {
    require(caller, MANAGERS, "manage drivers")?;
    let b: DriverBody = parse_body(body)?;
    let id = match (id, b.id.clone()) {
        (Some(path), Some(given)) if path != given => {
            return Err(invalid(
                "invalid_body",
                "the body's id differs from the path",
            ))
        }
        (Some(path), _) => path,
        (None, Some(given)) => given,
        (None, None) => Uuid::now_v7().simple().to_string(),
    };
    let d = validate_driver(id, b)?;
    let mut conn = st.engine.pool().acquire().await?;
    let created = drivers::upsert(&mut conn, caller.0.tenant_id, &d).await?;
    let d = drivers::get(&mut conn, caller.0.tenant_id, &d.id)
        .await?
        .ok_or_else(|| not_found("driver"))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(driver_view(&d))).into_response())
}

#[utoipa::path(post, path = "/v1/drivers", tag = "courier", request_body = DriverBody, security(("bearer" = [])), responses((status = 201, description = "Created", body = serde_json::Value), (status = 200, description = "Updated", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn create_driver(
    State(st): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    upsert_driver(&st, &caller, None, &body).await
}

#[utoipa::path(put, path = "/v1/drivers/{id}", tag = "courier", params(("id" = String, Path, description = "Driver id")), request_body = DriverBody, security(("bearer" = [])), responses((status = 201, description = "Created", body = serde_json::Value), (status = 200, description = "Updated", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn put_driver(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    upsert_driver(&st, &caller, Some(id), &body).await
}

#[utoipa::path(get, path = "/v1/drivers", tag = "courier", security(("bearer" = [])), responses((status = 200, description = "The tenant's drivers", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn list_drivers(State(st): State<ApiState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    require(&caller, MANAGERS, "list drivers")?;
    let mut conn = st.engine.pool().acquire().await?;
    let all = drivers::list(&mut conn, caller.0.tenant_id).await?;
    Ok(Json(
        json!({ "drivers": all.iter().map(driver_view).collect::<Vec<_>>() }),
    ))
}

#[utoipa::path(get, path = "/v1/drivers/{id}", tag = "courier", params(("id" = String, Path, description = "Driver id")), security(("bearer" = [])), responses((status = 200, description = "The driver", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn get_driver(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require(&caller, MANAGERS, "read drivers")?;
    let mut conn = st.engine.pool().acquire().await?;
    let d = drivers::get(&mut conn, caller.0.tenant_id, &id)
        .await?
        .ok_or_else(|| not_found("driver"))?;
    Ok(Json(driver_view(&d)))
}

#[utoipa::path(delete, path = "/v1/drivers/{id}", tag = "courier", params(("id" = String, Path, description = "Driver id")), security(("bearer" = [])), responses((status = 204, description = "Deleted"), crate::openapi::ClientErrors))]
async fn delete_driver(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    require(&caller, MANAGERS, "manage drivers")?;
    let mut conn = st.engine.pool().acquire().await?;
    if drivers::delete(&mut conn, caller.0.tenant_id, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found("driver"))
    }
}

// ---- registration ----

#[derive(Deserialize, utoipa::ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct RegistrationBody {
    /// Email the link and QR code to the driver (needs the driver's email).
    #[serde(default)]
    send_email: bool,
    /// How long the link works, in seconds (60 ..= 2592000; default 7 days).
    #[serde(default)]
    ttl_s: Option<i64>,
}

#[utoipa::path(post, path = "/v1/drivers/{id}/registration", tag = "courier", params(("id" = String, Path, description = "Driver id")), request_body = RegistrationBody, security(("bearer" = [])), responses((status = 201, description = "A single-use deep link with its QR code (SVG, and PNG in base64)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn register(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&caller, MANAGERS, "issue registration links")?;
    let b: RegistrationBody = if body.is_empty() {
        RegistrationBody::default()
    } else {
        parse_body(&body)?
    };
    let ttl = b.ttl_s.unwrap_or(7 * 24 * 3600);
    if !(60..=30 * 24 * 3600).contains(&ttl) {
        return Err(invalid("invalid_body", "ttl_s must be 60..=2592000"));
    }
    let tenant = caller.0.tenant_id;
    let mut conn = st.engine.pool().acquire().await?;
    let driver = drivers::get(&mut conn, tenant, &id)
        .await?
        .ok_or_else(|| not_found("driver"))?;
    if b.send_email && driver.email.is_none() {
        return Err(invalid(
            "driver_has_no_email",
            "the driver has no email address to send the link to",
        ));
    }
    let bot = providers::get(&mut conn, tenant, "telegram")
        .await?
        .and_then(|row| row.setting("bot_username").map(str::to_string))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "telegram_not_configured",
                "set the tenant's telegram provider `bot_username` first",
            )
        })?;
    drop(conn);
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let link = format!("https://t.me/{bot}?start={token}");
    let registration_id = Uuid::now_v7();
    let expires_at = Utc::now() + Duration::seconds(ttl);
    let svg = qr_svg(&link)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let png = qr_png(&link)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let input = json!({ "driver_id": driver.id, "expires_at": expires_at, "send_email": b.send_email, "link": link });
    // The hash row first: a `/start` that races the answer finds its workflow
    // or, until the start commits, is told the link is not valid yet.
    let mut conn = st.engine.pool().acquire().await?;
    drivers::insert_registration(
        &mut conn,
        tenant,
        &token_hash(&token),
        registration_id,
        &driver.id,
    )
    .await?;
    drop(conn);
    st.engine
        .start(
            &caller_actor(&caller),
            tenant,
            DriverRegistration::KIND,
            &registration_id.to_string(),
            &input,
        )
        .await?;
    tracing::info!(registration.id = %registration_id, "driver registration link issued");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "registration_id": registration_id, "driver_id": driver.id, "link": link,
            "expires_at": expires_at, "emailed": b.send_email,
            "qr": { "svg": svg, "png_base64": base64::engine::general_purpose::STANDARD.encode(png) },
        })),
    )
        .into_response())
}

fn caller_actor(caller: &Caller) -> workflows::Actor {
    workflows::Actor {
        role: caller.0.role,
        subject: caller.0.subject.clone(),
    }
}

// ---- dispatches ----

#[derive(Deserialize, utoipa::ToSchema, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct RouteBody {
    /// The business's route reference (1..=100 characters).
    reference: String,
    /// The route's date, as the business writes it.
    #[serde(default)]
    date: Option<String>,
    /// The assignment: stops, times, instructions (1..=3500 characters).
    text: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct DispatchBody {
    /// The driver.
    driver_id: String,
    /// The route.
    route: RouteBody,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchItem {
    /// This item's idempotency key (1..=200 printable characters).
    idempotency_key: String,
    /// The driver.
    driver_id: String,
    /// The route.
    route: RouteBody,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    /// Up to 500 dispatches.
    items: Vec<BatchItem>,
}

/// A dispatch checked and planned, ready to start.
struct Planned {
    key: String,
    input: Value,
    existing: Option<wf_store::WorkflowRow>,
}

/// A route is driver-visible: the one text rule and the detector, checked
/// before anything of a batch is stored ([`crate::crew::check_route`]).
fn check_route(r: &RouteBody) -> Result<(), RouteRefusal> {
    let route = serde_json::json!({"reference": r.reference, "date": r.date, "text": r.text});
    crate::crew::check_route(&route).map_err(|e| match e {
        workflows::ParseError::CrewUnsafe(m) => RouteRefusal::Unsafe(m),
        other => RouteRefusal::Invalid(other.to_string()),
    })
}

/// Why a route was refused: bad text (`invalid_body`) or contact details a
/// driver may not receive (`crew_unsafe_field`).
enum RouteRefusal {
    Invalid(String),
    Unsafe(String),
}

fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 200 || key.chars().any(char::is_control) {
        Err("the idempotency key must be 1..=200 printable characters".into())
    } else {
        Ok(())
    }
}

/// Which channels reach the driver now, and why the others do not.
fn plan(driver: &Driver) -> (Vec<&'static str>, BTreeMap<&'static str, &'static str>) {
    let (mut channels, mut skipped) = (Vec::new(), BTreeMap::new());
    for c in &driver.channels {
        match c.as_str() {
            "telegram" if driver.telegram_chat_id.is_some() => channels.push("telegram"),
            "telegram" => {
                skipped.insert(
                    "telegram",
                    "no bound Telegram chat: the driver has not started the bot (send a registration link)",
                );
            }
            "email" if driver.email.is_some() => channels.push("email"),
            "email" => {
                skipped.insert("email", "the driver has no email address");
            }
            _ => {}
        }
    }
    // A driver Telegram cannot reach yet gets email, even if it was not
    // among the preferences (the status says why).
    if skipped.contains_key("telegram") && !channels.contains(&"email") && driver.email.is_some() {
        channels.push("email");
    }
    (channels, skipped)
}

/// Check one item against the drivers and what already exists; the error
/// message names what is wrong.
async fn prepare(
    conn: &mut PgConnection,
    tenant: Uuid,
    drivers_by_id: &HashMap<String, Driver>,
    key: &str,
    driver_id: &str,
    route: &RouteBody,
) -> Result<Planned, ApiError> {
    check_key(key).map_err(|m| invalid("invalid_key", m))?;
    check_route(route).map_err(|r| match r {
        RouteRefusal::Invalid(m) => invalid("invalid_body", m),
        RouteRefusal::Unsafe(m) => invalid("crew_unsafe_field", m),
    })?;
    let request = json!({ "driver_id": driver_id, "route": { "reference": route.reference.trim(), "date": route.date, "text": route.text } });
    if let Some(row) = wf_store::find(conn, tenant, RouteDispatch::KIND, key).await? {
        let stored = wf_store::input(conn, tenant, row.id)
            .await?
            .unwrap_or_default();
        let same =
            stored["driver_id"] == request["driver_id"] && stored["route"] == request["route"];
        if !same {
            return Err(invalid(
                "idempotency_key_reused",
                "this idempotency key was used for a different dispatch",
            ));
        }
        return Ok(Planned {
            key: key.to_string(),
            input: stored,
            existing: Some(row),
        });
    }
    let driver = drivers_by_id
        .get(driver_id)
        .ok_or_else(|| invalid("unknown_driver", "`driver_id` names no driver"))?;
    let (channels, skipped) = plan(driver);
    if channels.is_empty() {
        return Err(invalid(
            "driver_unreachable",
            format!("the driver has no usable channel: {skipped:?}"),
        ));
    }
    let mut input = request;
    input["channels"] = json!(channels);
    input["skipped"] = json!(skipped);
    Ok(Planned {
        key: key.to_string(),
        input,
        existing: None,
    })
}

async fn dispatch_view(
    conn: &mut PgConnection,
    tenant: Uuid,
    row: &wf_store::WorkflowRow,
) -> Result<Value, ApiError> {
    let mut channels = row.state["channels"].clone();
    // A send that dead-lettered reads as failed, with its (redacted) error.
    for e in effects::of_workflow(conn, tenant, row.id).await? {
        if e.status != "dead" {
            continue;
        }
        let channel = e.payload["channel"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(ch) = channels.get_mut(&channel) {
            if ch["status"] == "queued" {
                ch["status"] = json!("failed");
                ch["reason"] = json!(e.last_error.unwrap_or_else(|| "could not be sent".into()));
                ch["at"] = json!(e.updated_at);
            }
        }
    }
    Ok(json!({
        "id": row.id, "idempotency_key": row.key, "state": row.state_name, "status": row.status,
        "driver_id": row.state["driver_id"], "reference": row.state["reference"],
        "acknowledged_at": row.state.get("acknowledged_at"), "channels": channels,
        "created_at": row.created_at, "updated_at": row.updated_at,
    }))
}

async fn start_planned(
    st: &ApiState,
    caller: &Caller,
    p: Planned,
) -> Result<(Value, bool), ApiError> {
    let tenant = caller.0.tenant_id;
    let (row, created) = match p.existing {
        Some(row) => (row, false),
        None => {
            st.engine
                .start(
                    &caller_actor(caller),
                    tenant,
                    RouteDispatch::KIND,
                    &p.key,
                    &p.input,
                )
                .await?
        }
    };
    let mut conn = st.engine.pool().acquire().await?;
    Ok((dispatch_view(&mut conn, tenant, &row).await?, created))
}

async fn drivers_map(
    conn: &mut PgConnection,
    tenant: Uuid,
    ids: Vec<String>,
) -> Result<HashMap<String, Driver>, sqlx::Error> {
    Ok(drivers::get_many(conn, tenant, &ids)
        .await?
        .into_iter()
        .map(|d| (d.id.clone(), d))
        .collect())
}

#[utoipa::path(post, path = "/v1/dispatches", tag = "courier", params(("Idempotency-Key" = String, Header, description = "The dispatch's key (1..=200 characters)")), request_body = DispatchBody, security(("bearer" = [])), responses((status = 201, description = "Dispatched; status per channel", body = serde_json::Value), (status = 200, description = "The existing dispatch for this key", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn create_dispatch(
    State(st): State<ApiState>,
    caller: Caller,
    IdempotencyKey(key): IdempotencyKey,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&caller, MANAGERS, "dispatch routes")?;
    let b: DispatchBody = parse_body(&body)?;
    let tenant = caller.0.tenant_id;
    let mut conn = st.engine.pool().acquire().await?;
    let by_id = drivers_map(&mut conn, tenant, vec![b.driver_id.clone()]).await?;
    let planned = prepare(&mut conn, tenant, &by_id, &key, &b.driver_id, &b.route).await?;
    drop(conn);
    let (view, created) = start_planned(&st, &caller, planned).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

#[utoipa::path(post, path = "/v1/dispatches/batch", tag = "courier", request_body = BatchBody, security(("bearer" = [])), responses((status = 200, description = "Every item, created or existing, with its status per channel", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn create_batch(
    State(st): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    require(&caller, MANAGERS, "dispatch routes")?;
    let b: BatchBody = parse_body(&body)?;
    if b.items.is_empty() || b.items.len() > MAX_BATCH {
        return Err(invalid(
            "invalid_body",
            format!("items: 1..={MAX_BATCH} dispatches"),
        ));
    }
    let mut seen = HashSet::new();
    if let Some(i) = b
        .items
        .iter()
        .position(|it| !seen.insert(it.idempotency_key.as_str()))
    {
        return Err(invalid(
            "invalid_body",
            format!("items[{i}]: idempotency_key repeats an earlier item"),
        ));
    }
    let tenant = caller.0.tenant_id;
    let mut conn = st.engine.pool().acquire().await?;
    let ids: Vec<String> = b.items.iter().map(|it| it.driver_id.clone()).collect();
    let by_id = drivers_map(&mut conn, tenant, ids).await?;
    // Validate everything before storing anything.
    let mut planned = Vec::with_capacity(b.items.len());
    for (i, it) in b.items.iter().enumerate() {
        let p = prepare(
            &mut conn,
            tenant,
            &by_id,
            &it.idempotency_key,
            &it.driver_id,
            &it.route,
        )
        .await
        .map_err(|e| e.prefixed(&format!("items[{i}]: ")))?;
        planned.push(p);
    }
    drop(conn);
    let mut out = Vec::with_capacity(planned.len());
    for p in planned {
        let (view, created) = start_planned(&st, &caller, p).await?;
        let mut view = view;
        view["created"] = json!(created);
        out.push(view);
    }
    Ok(Json(json!({ "items": out })))
}

#[utoipa::path(get, path = "/v1/dispatches/{id}", tag = "courier", params(("id" = Uuid, Path, description = "Dispatch id")), security(("bearer" = [])), responses((status = 200, description = "The dispatch and its status per channel (queued, sent, delivered, failed, acknowledged, skipped)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn get_dispatch(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<Value>, ApiError> {
    require(&caller, MANAGERS, "read dispatches")?;
    let tenant = caller.0.tenant_id;
    let mut conn = st.engine.pool().acquire().await?;
    let key: Option<(String,)> =
        sqlx::query_as("select key from workflows where tenant_id = $1 and id = $2 and kind = $3")
            .bind(tenant)
            .bind(id)
            .bind(RouteDispatch::KIND)
            .fetch_optional(&mut *conn)
            .await?;
    let (key,) = key.ok_or_else(|| not_found("dispatch"))?;
    let row = wf_store::find(&mut conn, tenant, RouteDispatch::KIND, &key)
        .await?
        .ok_or_else(|| not_found("dispatch"))?;
    Ok(Json(dispatch_view(&mut conn, tenant, &row).await?))
}

/// The courier routes.
pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_drivers, create_driver))
        .routes(routes!(get_driver, put_driver, delete_driver))
        .routes(routes!(register))
        .routes(routes!(create_dispatch))
        .routes(routes!(create_batch))
        .routes(routes!(get_dispatch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qr_codes_render_in_both_formats() {
        let link = "https://t.me/CourierBot?start=abcDEF123_-xyz";
        // Decoded back to the link in tests/courier.rs.
        assert!(qr_png(link).unwrap().starts_with(b"\x89PNG"));
        assert!(qr_svg(link).unwrap().contains("<svg"));
    }

    #[test]
    fn emails_and_ids() {
        assert!(valid_email("driver@example.com"));
        assert!(!valid_email("driver@example"));
        assert!(!valid_email("a b@example.com"));
        assert!(!valid_email("<x>@example.com"));
        assert!(valid_id("d-17.a_b"));
        assert!(!valid_id("-d"));
        assert!(!valid_id(""));
    }
}
