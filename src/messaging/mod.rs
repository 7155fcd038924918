//! Masked-number messaging for the pet-sitting company (DOMAIN.md §2), over
//! HTTP: numbers (front desk, sitter, pool) provisioned through Twilio,
//! sitters onboarded onto a dedicated number and offboarded off it, clients,
//! bookings with their assignment windows, meet-and-greets, threads and their
//! messages, the owner's inbox, poaching attempts and the detector itself.
//!
//! Roles: the owner is an `ops` or `operator` key; a sitter is an `executor`
//! key whose subject is the sitter id (they see and write only their own
//! threads, never billing). Clients only text.
//!
//! Choices where DOMAIN.md is silent:
//! - A client's booking uses the sitter's masked number when the client is
//!   recurring (a booking with a recurrence, a weekly plan, or
//!   `is_one_time_client = false`), and a leased pool number otherwise.
//! - The owner writes from the front-desk number, always.
//! - A sitter writing to their number while several of their clients have
//!   open windows is refused (the app, which names the thread, works).
//! - A former sitter number is never a sitter number again (stricter than "not
//!   within 90 days"): after its cooldown it is a pool number for good.
//! - Routing follows the booking's window times, which are the times the
//!   assignment-window timers fire at; a cancelled booking stops routing at once.
//! - The front desk is the owner's line: a client's text there reaches the
//!   owner even during a window (it may be about billing), and a sitter's
//!   text there reaches the owner (outside an open meet-and-greet).
//! - Every message is scanned, whatever its route; pictures (MMS) cannot be
//!   scanned and go to the owner with their links.
//! - A relay still queued when its sitter is offboarded is withheld and
//!   handed to the owner.

pub mod effects;
pub mod routing;

use crate::engine::SignalIn;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::PgConnection;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;
use workflows::assignment_window::{self, AssignmentWindow};
use workflows::meet_and_greet::MeetAndGreet;
use workflows::pool_number::PoolNumber;
use workflows::sitter_lifecycle::{SitterLifecycle, NUMBER_COOLDOWN_DAYS};
use workflows::{Actor, Role, Workflow};

use crate::http::{
    parse_body, reason_of, require, valid_id, ApiError, ApiState, Caller, IdempotencyKey,
};
use crate::scan;
use crate::store::audit;
use crate::store::providers::{self, db_now};
use crate::store::tenants;
use routing::{Author, Number, Sitter};

const OWNER: &[Role] = &[Role::Ops, Role::Operator];
/// Longest message accepted from the API (Twilio's own limit is 1,600).
const MAX_TEXT: usize = 1600;

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", message)
}

fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, code, message)
}

fn not_found(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such {what}"),
    )
}

/// E.164: `+`, then 7..=15 digits not starting with 0.
pub fn valid_e164(s: &str) -> bool {
    let digits = s.strip_prefix('+').unwrap_or("");
    (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

fn valid_name(s: &str) -> bool {
    workflows::text::check(s.trim(), workflows::text::TextKind::Name, 200).is_ok()
}

fn valid_text(s: &str) -> Result<(), ApiError> {
    if workflows::text::check(s, workflows::text::TextKind::Multiline, MAX_TEXT).is_err() {
        return Err(invalid(format!(
            "text: 1..={MAX_TEXT} characters, no control characters"
        )));
    }
    Ok(())
}

fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what}: 1..=64 of letters, digits, `_`, `.`, `-`"
        )))
    }
}

fn sitter_subject(caller: &Caller) -> Result<&str, ApiError> {
    match (caller.0.role, caller.0.subject.as_deref()) {
        (Role::Executor, Some(s)) => Ok(s),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a sitter's executor key (with its sitter id as subject) is required",
        )),
    }
}

/// `{name: [rows]}` for a query of JSON rows of one tenant (`$1`).
async fn list_of(
    st: &ApiState,
    tenant: Uuid,
    name: &str,
    sql: &'static str,
) -> Result<Json<Value>, ApiError> {
    let rows: Vec<(Value,)> = sqlx::query_as(sql)
        .bind(tenant)
        .fetch_all(st.engine.pool())
        .await?;
    let mut out = serde_json::Map::new();
    out.insert(
        name.to_string(),
        Value::Array(rows.into_iter().map(|r| r.0).collect()),
    );
    Ok(Json(Value::Object(out)))
}

/// An owner's override: the role check, the body, and its reason (checked
/// like every ops reason, and audited by the caller).
fn owner_override<T: for<'de> Deserialize<'de>>(
    caller: &Caller,
    body: &Bytes,
    what: &str,
) -> Result<(T, String), ApiError> {
    require(caller, OWNER, what)?;
    let reason = reason_of(&parse_body::<Value>(body)?)?;
    Ok((parse_body(body)?, reason))
}

// ---- the detector ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ScanBody {
    /// The message to check.
    text: String,
}

#[utoipa::path(post, path = "/v1/messages/scan", tag = "messaging", request_body = ScanBody, security(("bearer" = [])), responses((status = 200, description = "The verdict and what was found (character offsets, end exclusive). A scan error answers `block`: the detector fails closed.", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn scan_message(_caller: Caller, body: Bytes) -> Result<Json<Value>, ApiError> {
    let b: ScanBody = parse_body(&body)?;
    Ok(Json(match scan::scan(&b.text) {
        Ok(s) => json!(s),
        Err(e) => json!({ "verdict": "block", "findings": [], "error": e.to_string() }),
    }))
}

// ---- numbers ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NumberBody {
    /// The number, E.164.
    e164: String,
    /// `front_desk` (one per tenant), `sitter` (inventory for onboarding) or `pool`.
    class: String,
    /// A number the account already owns (`PN…`); without it the number is
    /// bought through Twilio when the tenant has Twilio configured.
    #[serde(default)]
    provider_sid: Option<String>,
}

#[utoipa::path(post, path = "/v1/messaging/numbers", tag = "messaging", request_body = NumberBody, security(("bearer" = [])), responses((status = 201, description = "Added (provisioned through Twilio when configured)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn add_number(
    State(st): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&caller, OWNER, "manage numbers")?;
    let b: NumberBody = parse_body(&body)?;
    if !valid_e164(&b.e164) {
        return Err(invalid("e164: `+` and 7..=15 digits"));
    }
    if !["front_desk", "sitter", "pool"].contains(&b.class.as_str()) {
        return Err(invalid("class: front_desk, sitter or pool"));
    }
    if b.provider_sid.as_deref().is_some_and(|s| !valid_id(s)) {
        return Err(invalid("provider_sid: letters and digits"));
    }
    let tenant = caller.0.tenant_id;
    let id = Uuid::now_v7();
    // The row first (a duplicate is refused before anything is bought), then
    // the provider, in the same transaction: a provider failure stores nothing.
    let mut tx = st.engine.pool().begin().await?;
    let inserted = sqlx::query(
        "insert into msg_numbers (tenant_id, id, e164, class, provider_sid) values ($1, $2, $3, $4, $5) on conflict do nothing",
    )
    .bind(tenant)
    .bind(id)
    .bind(&b.e164)
    .bind(&b.class)
    .bind(&b.provider_sid)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(conflict(
            "number_exists",
            "the number (or the front desk) exists already",
        ));
    }
    // Everything that can still fail comes before buying the number.
    if b.class == "pool" {
        st.engine
            .start_in(
                &mut tx,
                tenant,
                PoolNumber::KIND,
                &id.to_string(),
                &json!({}),
            )
            .await?;
    }
    let mut sid = b.provider_sid.clone();
    if let Some(row) = providers::get(&mut tx, tenant, "twilio").await? {
        let http = crate::channels::http_client();
        let twilio = crate::channels::twilio::Twilio::new(&http, &row).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "provider_not_configured",
                e.to_string(),
            )
        })?;
        let provider_error = |e: crate::channels::ChannelError| match e {
            crate::channels::ChannelError::Permanent { message } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "provider_rejected",
                message,
            ),
            other => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "provider_unavailable",
                other.to_string(),
            ),
        };
        match &b.provider_sid {
            // An owned number: point its SMS webhook at us (sitter numbers are
            // labelled for their sitter at onboarding).
            Some(owned) => {
                twilio
                    .configure(owned, "Dispatch number")
                    .await
                    .map_err(provider_error)?;
            }
            None => {
                let bought = twilio.provision(&b.e164).await.map_err(provider_error)?;
                sqlx::query(
                    "update msg_numbers set provider_sid = $3 where tenant_id = $1 and id = $2",
                )
                .bind(tenant)
                .bind(id)
                .bind(&bought)
                .execute(&mut *tx)
                .await?;
                sid = Some(bought);
            }
        }
    }
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id, "e164": b.e164, "class": b.class, "status": "available", "provider_sid": sid })))
        .into_response())
}

#[utoipa::path(get, path = "/v1/messaging/numbers", tag = "messaging", security(("bearer" = [])), responses((status = 200, description = "Every number with its class, status and cooldown", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn list_numbers(State(st): State<ApiState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    require(&caller, OWNER, "read numbers")?;
    list_of(&st, caller.0.tenant_id, "numbers", "select json_build_object('id', id, 'e164', e164, 'class', class, 'status', status, 'sitter_id', sitter_id,
                'client_id', client_id, 'lease_until', lease_until, 'cooldown_until', cooldown_until,
                'former_sitter_number', retired_sitter)
           from msg_numbers where tenant_id = $1 order by created_at").await
}

// ---- sitters ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SitterBody {
    /// Sitter id (letters, digits, `_.-`).
    id: String,
    /// Name.
    name: String,
    /// The sitter's own phone, E.164 (relays reach it; never shown to clients).
    phone: String,
}

#[utoipa::path(post, path = "/v1/messaging/sitters", tag = "messaging", request_body = SitterBody, security(("bearer" = [])), responses((status = 201, description = "Onboarding: a dedicated masked number is assigned and being registered", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn onboard(
    State(st): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&caller, OWNER, "onboard sitters")?;
    let b: SitterBody = parse_body(&body)?;
    check_id("id", &b.id)?;
    if !valid_name(&b.name) || !valid_e164(&b.phone) {
        return Err(invalid("name: 1..=200 printable characters; phone: E.164"));
    }
    let tenant = caller.0.tenant_id;
    let mut tx = st.engine.pool().begin().await?;
    let inserted = sqlx::query(
        "insert into msg_sitters (tenant_id, id, name, phone) values ($1, $2, $3, $4) on conflict do nothing",
    )
    .bind(tenant)
    .bind(&b.id)
    .bind(b.name.trim())
    .bind(&b.phone)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(conflict(
            "sitter_exists",
            "a sitter with this id (or an active sitter with this phone) exists",
        ));
    }
    // Inventory only: never a former sitter's number.
    let number: Option<(Uuid, String)> = sqlx::query_as(
        "select id, e164 from msg_numbers where tenant_id = $1 and class = 'sitter' and status = 'available' and not retired_sitter
          order by created_at limit 1 for update skip locked",
    )
    .bind(tenant)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((number_id, e164)) = number else {
        return Err(conflict(
            "no_sitter_number",
            "no sitter number is free in inventory: add one first",
        ));
    };
    sqlx::query("update msg_numbers set status = 'assigned', sitter_id = $3, updated_at = now() where tenant_id = $1 and id = $2")
        .bind(tenant)
        .bind(number_id)
        .bind(&b.id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("update msg_sitters set number_id = $3 where tenant_id = $1 and id = $2")
        .bind(tenant)
        .bind(&b.id)
        .bind(number_id)
        .execute(&mut *tx)
        .await?;
    st.engine
        .start_in(
            &mut tx,
            tenant,
            SitterLifecycle::KIND,
            &b.id,
            &json!({ "number_id": number_id }),
        )
        .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": b.id, "number": e164, "status": "active", "lifecycle": "ONBOARDING" })),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/messaging/sitters", tag = "messaging", security(("bearer" = [])), responses((status = 200, description = "Sitters with their number, lifecycle and strikes", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn list_sitters(State(st): State<ApiState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    require(&caller, OWNER, "read sitters")?;
    list_of(&st, caller.0.tenant_id, "sitters", "select json_build_object('id', s.id, 'name', s.name, 'status', s.status, 'number', n.e164,
                'lifecycle', l.state_name, 'messaging', coalesce(p.state_name, 'CLEAR'),
                'strikes_in_30_days', coalesce(jsonb_array_length(p.state->'strikes'), 0))
           from msg_sitters s
           left join msg_numbers n on n.tenant_id = s.tenant_id and n.id = s.number_id
           left join workflows l on l.tenant_id = s.tenant_id and l.kind = 'sitter_lifecycle' and l.key = s.id
           left join workflows p on p.tenant_id = s.tenant_id and p.kind = 'poaching_strikes' and p.key = s.id
          where s.tenant_id = $1 order by s.created_at").await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct OffboardBody {
    /// Why (audited).
    #[allow(dead_code)] // read (and checked) by `reason_of`, like every ops reason
    reason: String,
    /// The sitter who takes over the threads and open bookings; the owner when absent.
    #[serde(default)]
    reassign_to: Option<String>,
}

#[utoipa::path(post, path = "/v1/messaging/sitters/{id}/offboard", tag = "messaging", params(("id" = String, Path, description = "Sitter id")), request_body = OffboardBody, security(("bearer" = [])), responses((status = 200, description = "Offboarded: the number is deactivated now and cools down for 90 days; threads reassigned (each audited)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn offboard(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let (b, reason): (OffboardBody, String) = owner_override(&caller, &body, "offboard sitters")?;
    let tenant = caller.0.tenant_id;
    let mut tx = st.engine.pool().begin().await?;
    // Lock order as in routing: the number first, then the sitter (no deadlock
    // with a message being routed through either).
    sqlx::query(
        "select id from msg_numbers where tenant_id = $1 and sitter_id = $2 and status = 'assigned' for update",
    )
    .bind(tenant)
    .bind(&id)
    .execute(&mut *tx)
    .await?;
    let sitter: Option<(String,)> = sqlx::query_as(
        "select status from msg_sitters where tenant_id = $1 and id = $2 for update",
    )
    .bind(tenant)
    .bind(&id)
    .fetch_optional(&mut *tx)
    .await?;
    match sitter {
        None => return Err(not_found("sitter")),
        Some((s,)) if s != "active" => {
            return Err(conflict(
                "already_offboarded",
                "the sitter is offboarded already",
            ))
        }
        _ => {}
    }
    let successor_number: Option<Uuid> = match &b.reassign_to {
        Some(to) if *to == id => return Err(invalid("reassign_to: another sitter")),
        Some(to) => {
            let n: Option<(Option<Uuid>,)> = sqlx::query_as(
                "select number_id from msg_sitters where tenant_id = $1 and id = $2 and status = 'active' for share",
            )
            .bind(tenant)
            .bind(to)
            .fetch_optional(&mut *tx)
            .await?;
            Some(
                n.and_then(|n| n.0)
                    .ok_or_else(|| invalid("reassign_to: an active sitter with a number"))?,
            )
        }
        None => None,
    };
    // Deactivated at once: from this commit on, no message reaches the sitter.
    let old: Option<(Uuid,)> = sqlx::query_as(
        "update msg_numbers set status = 'cooldown', cooldown_until = now() + make_interval(days => $3), updated_at = now()
          where tenant_id = $1 and sitter_id = $2 and status = 'assigned' returning id",
    )
    .bind(tenant)
    .bind(&id)
    .bind(NUMBER_COOLDOWN_DAYS as i32)
    .fetch_optional(&mut *tx)
    .await?;
    let old_number = old.map(|o| o.0);
    sqlx::query("update msg_sitters set status = 'offboarded' where tenant_id = $1 and id = $2")
        .bind(tenant)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    let threads: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "select id, number_id from msg_threads where tenant_id = $1 and sitter_id = $2 and status = 'active' for update",
    )
    .bind(tenant)
    .bind(&id)
    .fetch_all(&mut *tx)
    .await?;
    for (thread, number) in &threads {
        let new_number = match successor_number {
            Some(n) if Some(*number) == old_number => n,
            _ => *number,
        };
        sqlx::query("update msg_threads set sitter_id = $3, number_id = $4, updated_at = now() where tenant_id = $1 and id = $2")
            .bind(tenant)
            .bind(thread)
            .bind(&b.reassign_to)
            .bind(new_number)
            .execute(&mut *tx)
            .await?;
        audit::record(&mut tx, &caller.0, "thread_reassigned", None, Some(&thread.to_string()), &reason, None,
            json!({ "from_sitter": id, "to": b.reassign_to.as_deref().unwrap_or("owner"), "cause": "offboarding" })).await?;
    }
    // Open and future bookings follow the threads.
    sqlx::query(
        "update msg_bookings set sitter_id = $3,
                number_id = case when number_id = $4 and $5::uuid is not null then $5 else number_id end
          where tenant_id = $1 and sitter_id = $2 and not cancelled and closes_at > now()",
    )
    .bind(tenant)
    .bind(&id)
    .bind(&b.reassign_to)
    .bind(old_number)
    .bind(successor_number)
    .execute(&mut *tx)
    .await?;
    audit::record(&mut tx, &caller.0, "sitter_offboarded", None, Some(&id), &reason, None,
        json!({ "threads_reassigned": threads.len(), "to": b.reassign_to.as_deref().unwrap_or("owner") })).await?;
    st.engine
        .signal_in(
            &mut tx,
            SignalIn::new(
                tenant,
                SitterLifecycle::KIND,
                &id,
                "offboard",
                "offboard",
                &json!({ "reason": reason, "reassign_to": b.reassign_to }),
                &caller.actor(),
            )
            .roles_checked(true),
        )
        .await?;
    tx.commit().await?;
    Ok(Json(
        json!({ "id": id, "status": "offboarded", "threads_reassigned": threads.len(),
                    "reassigned_to": b.reassign_to.as_deref().unwrap_or("owner") }),
    ))
}

#[utoipa::path(post, path = "/v1/messaging/sitters/{id}/unlock", tag = "messaging", params(("id" = String, Path, description = "Sitter id")), request_body = crate::openapi::ReasonBody, security(("bearer" = [])), responses((status = 200, description = "Messaging unlocked after the owner's review (audited)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn unlock(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let (_, reason): (Value, String) = owner_override(&caller, &body, "unlock sitters")?;
    let tenant = caller.0.tenant_id;
    let mut tx = st.engine.pool().begin().await?;
    let exists: Option<(String,)> =
        sqlx::query_as("select id from msg_sitters where tenant_id = $1 and id = $2")
            .bind(tenant)
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
    if exists.is_none() {
        return Err(not_found("sitter"));
    }
    if !routing::sitter_locked(&mut tx, tenant, &id).await? {
        return Err(conflict(
            "not_locked",
            "the sitter's messaging is not locked",
        ));
    }
    audit::record(
        &mut tx,
        &caller.0,
        "sitter_unlocked",
        None,
        Some(&id),
        &reason,
        Some("LOCKED"),
        json!({}),
    )
    .await?;
    let answer = st
        .engine
        .signal_in(
            &mut tx,
            SignalIn::new(
                tenant,
                "poaching_strikes",
                &id,
                &format!("unlock:{}", Uuid::now_v7()),
                "unlock",
                &json!({ "reason": reason }),
                &caller.actor(),
            )
            .roles_checked(true),
        )
        .await?
        .0;
    tx.commit().await?;
    Ok(Json(json!({ "id": id, "signal": answer })))
}

// ---- clients ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ClientBody {
    /// Client id.
    id: String,
    /// Name.
    name: String,
    /// Phone, E.164.
    phone: String,
    /// The client has an active weekly plan (makes them recurring).
    #[serde(default)]
    weekly_plan: bool,
}

#[utoipa::path(post, path = "/v1/messaging/clients", tag = "messaging", request_body = ClientBody, security(("bearer" = [])), responses((status = 201, description = "Created (one-time until a recurring booking or a weekly plan)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn add_client(
    State(st): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&caller, OWNER, "manage clients")?;
    let b: ClientBody = parse_body(&body)?;
    check_id("id", &b.id)?;
    if !valid_name(&b.name) || !valid_e164(&b.phone) {
        return Err(invalid("name: 1..=200 printable characters; phone: E.164"));
    }
    let inserted = sqlx::query(
        "insert into msg_clients (tenant_id, id, name, phone, weekly_plan, is_one_time_client) values ($1, $2, $3, $4, $5, not $5)
         on conflict do nothing",
    )
    .bind(caller.0.tenant_id)
    .bind(&b.id)
    .bind(b.name.trim())
    .bind(&b.phone)
    .bind(b.weekly_plan)
    .execute(st.engine.pool())
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(conflict(
            "client_exists",
            "a client with this id or phone exists",
        ));
    }
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "id": b.id, "is_one_time_client": !b.weekly_plan, "recurring": b.weekly_plan }),
        ),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/messaging/clients", tag = "messaging", security(("bearer" = [])), responses((status = 200, description = "Clients; `recurring` is derived", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn list_clients(State(st): State<ApiState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    require(&caller, OWNER, "read clients")?;
    list_of(&st, caller.0.tenant_id, "clients", "select json_build_object('id', c.id, 'name', c.name, 'is_one_time_client', c.is_one_time_client,
                'recurring', c.weekly_plan or exists (select 1 from msg_bookings b where b.tenant_id = c.tenant_id
                             and b.client_id = c.id and b.recurrence is not null and not b.cancelled))
           from msg_clients c where c.tenant_id = $1 order by c.created_at").await
}

// ---- bookings ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BookingBody {
    /// The client.
    client_id: String,
    /// The assigned sitter.
    sitter_id: String,
    /// `walk`, `drop_in` or `house_sitting`.
    service_type: String,
    /// Start (check-in).
    starts_at: DateTime<Utc>,
    /// End (check-out).
    ends_at: DateTime<Utc>,
    /// `weekly`, `biweekly` or `monthly` marks the client recurring; absent: one-time.
    #[serde(default)]
    recurrence: Option<String>,
}

fn check_times(
    starts_at: DateTime<Utc>,
    ends_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    if ends_at <= starts_at || ends_at - starts_at > Duration::days(60) {
        return Err(invalid(
            "ends_at must be after starts_at, at most 60 days later",
        ));
    }
    if ends_at < now - Duration::days(1) || starts_at > now + Duration::days(730) {
        return Err(invalid(
            "the booking must end after yesterday and start within two years",
        ));
    }
    Ok(())
}

/// Lease a pool number to the client until `until`: the one it already holds,
/// then one it held before (still cooling), then a free one, then — the pool
/// exhausted — the one whose cooldown ends first.
async fn lease_pool(
    conn: &mut PgConnection,
    tenant: Uuid,
    client: &str,
    until: DateTime<Utc>,
) -> Result<(Uuid, bool), ApiError> {
    // Plain `for update` (no skip locked): a number that is merely busy (a
    // message being routed through it) is waited for, not passed over. Two
    // bookings racing for one number: the loser's row no longer matches and
    // it looks again.
    let pick = |cond: &'static str| {
        format!("select id from msg_numbers where tenant_id = $1 and class = 'pool' and {cond} limit 1 for update")
    };
    let mut exhausted = false;
    let mut found: Option<(Uuid,)> = None;
    'attempts: for _ in 0..5 {
        for (cond, last_resort) in [
            (
                "status = 'leased' and client_id = $2 order by lease_until desc",
                false,
            ),
            (
                "status = 'cooldown' and client_id = $2 order by cooldown_until",
                false,
            ),
            (
                "status = 'available' and ($2 <> '' or true) order by updated_at",
                false,
            ),
            (
                "status = 'cooldown' and ($2 <> '' or true) order by cooldown_until",
                true,
            ),
        ] {
            found = sqlx::query_as(sqlx::AssertSqlSafe(pick(cond)))
                .bind(tenant)
                .bind(client)
                .fetch_optional(&mut *conn)
                .await?;
            if found.is_some() {
                exhausted = last_resort;
                break 'attempts;
            }
        }
        // Nothing matched: only an exhausted pool ends the search.
        let (free,): (bool,) = sqlx::query_as(
        "select exists (select 1 from msg_numbers where tenant_id = $1 and class = 'pool' and status in ('available', 'cooldown'))",
    )
    .bind(tenant)
    .fetch_one(&mut *conn)
    .await?;
        if !free {
            break;
        }
    }
    let (id,) = found.ok_or_else(|| {
        conflict(
            "pool_exhausted",
            "no pool number can be leased: add pool numbers",
        )
    })?;
    sqlx::query(
        "update msg_numbers set status = 'leased',
                lease_until = case when client_id = $3 and status = 'leased' then greatest(lease_until, $4) else $4 end,
                client_id = $3, cooldown_until = null, updated_at = now()
          where tenant_id = $1 and id = $2",
    )
    .bind(tenant)
    .bind(id)
    .bind(client)
    .bind(until)
    .execute(&mut *conn)
    .await?;
    Ok((id, exhausted))
}

#[utoipa::path(post, path = "/v1/messaging/bookings", tag = "messaging", request_body = BookingBody, security(("bearer" = [])), responses((status = 201, description = "Booked: its assignment window is scheduled on the sitter's number (recurring clients) or a leased pool number", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn book(
    State(st): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&caller, OWNER, "book")?;
    let b: BookingBody = parse_body(&body)?;
    check_id("client_id", &b.client_id)?;
    check_id("sitter_id", &b.sitter_id)?;
    if b.recurrence
        .as_deref()
        .is_some_and(|r| !["weekly", "biweekly", "monthly"].contains(&r))
    {
        return Err(invalid("recurrence: weekly, biweekly or monthly"));
    }
    let tenant = caller.0.tenant_id;
    let mut tx = st.engine.pool().begin().await?;
    let now = db_now(&mut tx).await?;
    check_times(b.starts_at, b.ends_at, now)?;
    let config = tenants::config(&mut tx, tenant).await?;
    let (opens_at, closes_at) =
        assignment_window::window(&b.service_type, b.starts_at, b.ends_at, &config)
            .map_err(|e| invalid(e.to_string()))?;
    let client: Option<(bool, bool)> =
        sqlx::query_as("select is_one_time_client, weekly_plan from msg_clients where tenant_id = $1 and id = $2 for no key update")
            .bind(tenant)
            .bind(&b.client_id)
            .fetch_optional(&mut *tx)
            .await?;
    let (one_time, weekly) = client.ok_or_else(|| not_found("client"))?;
    let sitter_number: Option<(Option<Uuid>,)> = sqlx::query_as(
        "select number_id from msg_sitters where tenant_id = $1 and id = $2 and status = 'active' for share",
    )
    .bind(tenant)
    .bind(&b.sitter_id)
    .fetch_optional(&mut *tx)
    .await?;
    let sitter_number = sitter_number
        .and_then(|s| s.0)
        .ok_or_else(|| invalid("sitter_id: an active sitter"))?;
    let recurring = b.recurrence.is_some() || weekly || !one_time;
    if b.recurrence.is_some() && one_time {
        sqlx::query(
            "update msg_clients set is_one_time_client = false where tenant_id = $1 and id = $2",
        )
        .bind(tenant)
        .bind(&b.client_id)
        .execute(&mut *tx)
        .await?;
    }
    let (number_id, pool) = if recurring {
        (sitter_number, None)
    } else {
        let (id, exhausted) = lease_pool(&mut tx, tenant, &b.client_id, closes_at).await?;
        (id, Some(exhausted))
    };
    let id = Uuid::now_v7();
    sqlx::query(
        "insert into msg_bookings (tenant_id, id, client_id, sitter_id, service_type, starts_at, ends_at, opens_at, closes_at, recurrence, number_id)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(tenant)
    .bind(id)
    .bind(&b.client_id)
    .bind(&b.sitter_id)
    .bind(&b.service_type)
    .bind(b.starts_at)
    .bind(b.ends_at)
    .bind(opens_at)
    .bind(closes_at)
    .bind(&b.recurrence)
    .bind(number_id)
    .execute(&mut *tx)
    .await?;
    let thread = routing::thread_for(
        &mut tx,
        tenant,
        &b.client_id,
        number_id,
        Some(&b.sitter_id),
        "service",
    )
    .await?;
    sqlx::query("update msg_threads set sitter_id = $3, updated_at = now() where tenant_id = $1 and id = $2")
        .bind(tenant)
        .bind(thread)
        .bind(&b.sitter_id)
        .execute(&mut *tx)
        .await?;
    let times =
        json!({ "service_type": b.service_type, "starts_at": b.starts_at, "ends_at": b.ends_at });
    st.engine
        .start_in(
            &mut tx,
            tenant,
            AssignmentWindow::KIND,
            &id.to_string(),
            &times,
        )
        .await?;
    if let Some(exhausted) = pool {
        st.engine
            .signal_in(&mut tx, SignalIn::new(tenant, PoolNumber::KIND, &number_id.to_string(), &format!("lease:{id}"), "lease", &json!({ "client_id": b.client_id, "until": closes_at, "pool_exhausted": exhausted }), &Actor::system()).roles_checked(false))
            .await?;
    }
    let e164: (String,) =
        sqlx::query_as("select e164 from msg_numbers where tenant_id = $1 and id = $2")
            .bind(tenant)
            .bind(number_id)
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(json!({
        "id": id, "thread_id": thread, "number": e164.0, "number_class": if pool.is_some() { "pool" } else { "sitter" },
        "window": { "opens_at": opens_at, "closes_at": closes_at }, "recurring": recurring,
    }))).into_response())
}

#[utoipa::path(get, path = "/v1/messaging/bookings", tag = "messaging", security(("bearer" = [])), responses((status = 200, description = "Bookings with their windows and window state", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn list_bookings(
    State(st): State<ApiState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    require(&caller, OWNER, "read bookings")?;
    list_of(&st, caller.0.tenant_id, "bookings", "select json_build_object('id', b.id, 'client_id', b.client_id, 'sitter_id', b.sitter_id, 'service_type', b.service_type,
                'starts_at', b.starts_at, 'ends_at', b.ends_at, 'opens_at', b.opens_at, 'closes_at', b.closes_at,
                'recurrence', b.recurrence, 'number', n.e164, 'number_class', n.class, 'window', w.state_name)
           from msg_bookings b
           join msg_numbers n on n.tenant_id = b.tenant_id and n.id = b.number_id
           left join workflows w on w.tenant_id = b.tenant_id and w.kind = 'assignment_window' and w.key = b.id::text
          where b.tenant_id = $1 order by b.starts_at").await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RescheduleBody {
    /// New start.
    starts_at: DateTime<Utc>,
    /// New end.
    ends_at: DateTime<Utc>,
}

#[utoipa::path(post, path = "/v1/messaging/bookings/{id}/reschedule", tag = "messaging", params(("id" = Uuid, Path, description = "Booking id")), request_body = RescheduleBody, security(("bearer" = [])), responses((status = 200, description = "The window and its timers moved", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn reschedule(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    require(&caller, OWNER, "reschedule bookings")?;
    let b: RescheduleBody = parse_body(&body)?;
    let tenant = caller.0.tenant_id;
    let mut tx = st.engine.pool().begin().await?;
    let now = db_now(&mut tx).await?;
    check_times(b.starts_at, b.ends_at, now)?;
    let row: Option<(String, String, Uuid, String, bool)> = sqlx::query_as(
        "select b.service_type, b.client_id, b.number_id, n.class, b.cancelled from msg_bookings b
           join msg_numbers n on n.tenant_id = b.tenant_id and n.id = b.number_id
          where b.tenant_id = $1 and b.id = $2 for update of b",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let (service, client, number, class, cancelled) = row.ok_or_else(|| not_found("booking"))?;
    if cancelled {
        return Err(conflict("booking_cancelled", "the booking is cancelled"));
    }
    let (window,): (String,) = sqlx::query_as(
        "select state_name from workflows where tenant_id = $1 and kind = 'assignment_window' and key = $2",
    )
    .bind(tenant)
    .bind(id.to_string())
    .fetch_one(&mut *tx)
    .await?;
    if window == "CLOSED" || window == "CANCELLED" {
        return Err(conflict(
            "window_over",
            "the booking's window is over: book again instead",
        ));
    }
    let config = tenants::config(&mut tx, tenant).await?;
    let (opens_at, closes_at) =
        assignment_window::window(&service, b.starts_at, b.ends_at, &config)
            .map_err(|e| invalid(e.to_string()))?;
    sqlx::query("update msg_bookings set starts_at = $3, ends_at = $4, opens_at = $5, closes_at = $6 where tenant_id = $1 and id = $2")
        .bind(tenant)
        .bind(id)
        .bind(b.starts_at)
        .bind(b.ends_at)
        .bind(opens_at)
        .bind(closes_at)
        .execute(&mut *tx)
        .await?;
    let times = json!({ "service_type": service, "starts_at": b.starts_at, "ends_at": b.ends_at });
    let key = format!("reschedule:{}", Uuid::now_v7());
    let (answer, _) = st
        .engine
        .signal_in(
            &mut tx,
            SignalIn::new(
                tenant,
                AssignmentWindow::KIND,
                &id.to_string(),
                &key,
                "reschedule",
                &times,
                &caller.actor(),
            )
            .roles_checked(true),
        )
        .await?;
    if class == "pool" {
        let extended = sqlx::query("update msg_numbers set lease_until = greatest(lease_until, $3) where tenant_id = $1 and id = $2 and client_id = $4 and status = 'leased'")
            .bind(tenant)
            .bind(number)
            .bind(closes_at)
            .bind(&client)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        // The lease already ended (the number cools down or serves someone
        // else): lease again, maybe another number, and move the booking.
        let (number, exhausted) = if extended == 0 {
            let (n, exhausted) = lease_pool(&mut tx, tenant, &client, closes_at).await?;
            sqlx::query("update msg_bookings set number_id = $3 where tenant_id = $1 and id = $2")
                .bind(tenant)
                .bind(id)
                .bind(n)
                .execute(&mut *tx)
                .await?;
            let sitter: (Option<String>,) = sqlx::query_as(
                "select sitter_id from msg_bookings where tenant_id = $1 and id = $2",
            )
            .bind(tenant)
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            routing::thread_for(&mut tx, tenant, &client, n, sitter.0.as_deref(), "service")
                .await?;
            (n, exhausted)
        } else {
            (number, false)
        };
        st.engine
            .signal_in(&mut tx, SignalIn::new(tenant, PoolNumber::KIND, &number.to_string(), &format!("lease:{key}"), "lease", &json!({ "client_id": client, "until": closes_at, "pool_exhausted": exhausted }), &Actor::system()).roles_checked(false))
            .await?;
    }
    tx.commit().await?;
    Ok(Json(
        json!({ "id": id, "window": { "opens_at": opens_at, "closes_at": closes_at }, "signal": answer }),
    ))
}

#[utoipa::path(post, path = "/v1/messaging/bookings/{id}/cancel", tag = "messaging", params(("id" = Uuid, Path, description = "Booking id")), request_body = crate::openapi::ReasonBody, security(("bearer" = [])), responses((status = 200, description = "Cancelled: the window's timers are cancelled and it routes nothing from now on", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn cancel_booking(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let (_, reason): (Value, String) = owner_override(&caller, &body, "cancel bookings")?;
    let tenant = caller.0.tenant_id;
    let mut tx = st.engine.pool().begin().await?;
    let n = sqlx::query("update msg_bookings set cancelled = true where tenant_id = $1 and id = $2 and not cancelled")
        .bind(tenant)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if n == 0 {
        return Err(not_found("open booking"));
    }
    let (answer, _) = st
        .engine
        .signal_in(
            &mut tx,
            SignalIn::new(
                tenant,
                AssignmentWindow::KIND,
                &id.to_string(),
                "cancel",
                "cancel",
                &json!({ "reason": reason }),
                &caller.actor(),
            )
            .roles_checked(true),
        )
        .await?;
    tx.commit().await?;
    Ok(Json(
        json!({ "id": id, "cancelled": true, "signal": answer }),
    ))
}

// ---- meet-and-greet ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct MeetBody {
    /// The client.
    client_id: String,
    /// The sitter being introduced.
    sitter_id: String,
    /// The meet-and-greet window opens.
    opens_at: DateTime<Utc>,
    /// It closes.
    closes_at: DateTime<Utc>,
    /// Let the sitter message inside the thread, during the window only.
    #[serde(default)]
    sitter_may_message: bool,
}

#[utoipa::path(post, path = "/v1/messaging/meet-and-greets", tag = "messaging", request_body = MeetBody, security(("bearer" = [])), responses((status = 201, description = "A meet-and-greet thread on the front-desk number", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn meet(
    State(st): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&caller, OWNER, "arrange meet-and-greets")?;
    let b: MeetBody = parse_body(&body)?;
    check_id("client_id", &b.client_id)?;
    check_id("sitter_id", &b.sitter_id)?;
    if b.closes_at <= b.opens_at || b.closes_at - b.opens_at > Duration::days(30) {
        return Err(invalid(
            "closes_at must be after opens_at, at most 30 days later",
        ));
    }
    let tenant = caller.0.tenant_id;
    let mut tx = st.engine.pool().begin().await?;
    let fd = routing::front_desk(&mut tx, tenant)
        .await?
        .ok_or_else(|| conflict("no_front_desk_number", "add the front-desk number first"))?;
    let ok: Option<(i64,)> = sqlx::query_as(
        "select 1::bigint from msg_clients c, msg_sitters s where c.tenant_id = $1 and c.id = $2 and s.tenant_id = $1 and s.id = $3 and s.status = 'active' for share of s",
    )
    .bind(tenant)
    .bind(&b.client_id)
    .bind(&b.sitter_id)
    .fetch_optional(&mut *tx)
    .await?;
    if ok.is_none() {
        return Err(invalid(
            "client_id and sitter_id: an existing client and an active sitter",
        ));
    }
    let thread = Uuid::now_v7();
    sqlx::query("insert into msg_threads (tenant_id, id, client_id, sitter_id, number_id, scope) values ($1, $2, $3, $4, $5, 'meet_and_greet')")
        .bind(tenant)
        .bind(thread)
        .bind(&b.client_id)
        .bind(&b.sitter_id)
        .bind(fd.id)
        .execute(&mut *tx)
        .await?;
    let input = json!({ "client_id": b.client_id, "sitter_id": b.sitter_id, "opens_at": b.opens_at,
                        "closes_at": b.closes_at, "sitter_may_message": b.sitter_may_message });
    st.engine
        .start_in(
            &mut tx,
            tenant,
            MeetAndGreet::KIND,
            &thread.to_string(),
            &input,
        )
        .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": thread, "thread_id": thread, "number": fd.e164, "state": "PENDING" })),
    )
        .into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    /// `approve`, `fail`, `allow_sitter` or `disallow_sitter`.
    decision: String,
    /// Why (required for `fail`).
    #[serde(default)]
    reason: Option<String>,
}

#[utoipa::path(post, path = "/v1/messaging/meet-and-greets/{id}/decision", tag = "messaging", params(("id" = Uuid, Path, description = "Meet-and-greet (thread) id")), request_body = DecisionBody, security(("bearer" = [])), responses((status = 200, description = "Decided (owner only)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn decide(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let b: DecisionBody = parse_body(&body)?;
    let (signal, payload) = match b.decision.as_str() {
        "approve" => ("approve", json!({})),
        "fail" => ("fail", json!({ "reason": b.reason })),
        "allow_sitter" => ("allow_sitter", json!({ "allowed": true })),
        "disallow_sitter" => ("allow_sitter", json!({ "allowed": false })),
        _ => {
            return Err(invalid(
                "decision: approve, fail, allow_sitter or disallow_sitter",
            ))
        }
    };
    // The workflow's roles decide who may (owner only: 403 for anyone else).
    let answer = st
        .engine
        .signal(SignalIn::new(
            caller.0.tenant_id,
            MeetAndGreet::KIND,
            &id.to_string(),
            &format!("decision:{}", Uuid::now_v7()),
            signal,
            &payload,
            &caller.actor(),
        ))
        .await?;
    Ok(Json(json!({ "id": id, "signal": answer })))
}

// ---- threads and messages ----

#[utoipa::path(get, path = "/v1/messaging/threads", tag = "messaging", security(("bearer" = [])), responses((status = 200, description = "The owner sees every thread; a sitter, their own active ones", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn list_threads(State(st): State<ApiState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let sitter = if OWNER.contains(&caller.0.role) {
        None
    } else {
        Some(sitter_subject(&caller)?.to_string())
    };
    let rows: Vec<(Value,)> = sqlx::query_as(
        "select json_build_object('id', t.id, 'client_id', t.client_id, 'sitter_id', t.sitter_id, 'number', n.e164,
                'number_class', n.class, 'scope', t.scope, 'status', t.status)
           from msg_threads t join msg_numbers n on n.tenant_id = t.tenant_id and n.id = t.number_id
          where t.tenant_id = $1 and ($2::text is null or (t.status = 'active'
            and exists (select 1 from msg_sitters s where s.tenant_id = $1 and s.id = $2 and s.status = 'active')
            and (t.sitter_id = $2 or exists (
                select 1 from msg_bookings b where b.tenant_id = t.tenant_id and b.sitter_id = $2
                   and b.client_id = t.client_id and b.number_id = t.number_id and not b.cancelled and b.closes_at > now()))))
          order by t.created_at",
    )
    .bind(caller.0.tenant_id)
    .bind(sitter)
    .fetch_all(st.engine.pool())
    .await?;
    Ok(Json(
        json!({ "threads": rows.into_iter().map(|r| r.0).collect::<Vec<_>>() }),
    ))
}

/// Whether a sitter may see and write in a thread: an active thread that is
/// theirs, or where they have a booking with the client on its number.
async fn sitter_sees(
    conn: &mut PgConnection,
    tenant: Uuid,
    thread: Uuid,
    sitter: &str,
) -> Result<bool, ApiError> {
    let (ok,): (bool,) = sqlx::query_as(
        "select exists (select 1 from msg_threads t where t.tenant_id = $1 and t.id = $2 and t.status = 'active'
            and exists (select 1 from msg_sitters s where s.tenant_id = $1 and s.id = $3 and s.status = 'active')
            and (t.sitter_id = $3 or exists (select 1 from msg_bookings b where b.tenant_id = t.tenant_id and b.sitter_id = $3
                 and b.client_id = t.client_id and b.number_id = t.number_id and not b.cancelled and b.closes_at > now())))",
    )
    .bind(tenant)
    .bind(thread)
    .bind(sitter)
    .fetch_one(conn)
    .await?;
    Ok(ok)
}

async fn thread_row(
    conn: &mut PgConnection,
    tenant: Uuid,
    id: Uuid,
) -> Result<(String, Option<String>, Uuid, String), ApiError> {
    let r: Option<(String, Option<String>, Uuid, String)> =
        sqlx::query_as("select client_id, sitter_id, number_id, status from msg_threads where tenant_id = $1 and id = $2")
            .bind(tenant)
            .bind(id)
            .fetch_optional(conn)
            .await?;
    r.ok_or_else(|| not_found("thread"))
}

#[utoipa::path(get, path = "/v1/messaging/threads/{id}", tag = "messaging", params(("id" = Uuid, Path, description = "Thread id")), security(("bearer" = [])), responses((status = 200, description = "The thread and its messages (a sitter never sees billing)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn get_thread(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.0.tenant_id;
    let mut conn = st.engine.pool().acquire().await?;
    let (client, sitter, _, status) = thread_row(&mut conn, tenant, id).await?;
    let owner = OWNER.contains(&caller.0.role);
    let me = if owner {
        None
    } else {
        let me = sitter_subject(&caller)?.to_string();
        if !sitter_sees(&mut conn, tenant, id, &me).await? {
            return Err(not_found("thread"));
        }
        Some(me)
    };
    // A sitter sees the conversation as relayed to and from them: never
    // billing, notices, or what was blocked, refused or held for the owner.
    let rows: Vec<(Value,)> = sqlx::query_as(
        "select json_build_object('id', id, 'direction', direction, 'sender_role', sender_role, 'kind', kind,
                'text', body, 'status', status, 'reason', reason, 'at', created_at)
           from msg_messages where tenant_id = $1 and thread_id = $2
            and ($3::text is null or (direction = 'in' and sitter_id = $3 and kind = 'service' and status in ('relayed', 'forced')))
          order by created_at",
    )
    .bind(tenant)
    .bind(id)
    .bind(&me)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Json(
        json!({ "id": id, "client_id": client, "sitter_id": sitter, "status": status,
                    "messages": rows.into_iter().map(|r| r.0).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SendBody {
    /// The message (1..=1600 characters).
    text: String,
    /// `service` (default) or `billing` (owner only; always from the front desk).
    #[serde(default)]
    kind: Option<String>,
}

#[utoipa::path(post, path = "/v1/messaging/threads/{id}/messages", tag = "messaging", params(("id" = Uuid, Path, description = "Thread id"), ("Idempotency-Key" = Option<String>, Header, description = "One key per intended message")), request_body = SendBody, security(("bearer" = [])), responses((status = 200, description = "What became of it: relayed, blocked (poaching), refused (outside the window, locked) or queued (owner)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn send_message(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    idem: Option<IdempotencyKey>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let b: SendBody = parse_body(&body)?;
    valid_text(&b.text)?;
    let kind = b.kind.as_deref().unwrap_or("service");
    if !["service", "billing"].contains(&kind) {
        return Err(invalid("kind: service or billing"));
    }
    let tenant = caller.0.tenant_id;
    let who = caller
        .0
        .subject
        .clone()
        .unwrap_or_else(|| caller.0.key_id.to_string());
    let key = idem.map(|k| k.0);
    let source = format!(
        "api:{who}:{}",
        key.clone().unwrap_or_else(|| Uuid::now_v7().to_string())
    );
    let mut tx = st.engine.pool().begin().await?;
    // Like every other Idempotency-Key: scoped to the caller, bound to the
    // request (thread, text, kind). A replay gets the first answer; the same
    // key for another message is refused, never silently dropped.
    let request = crate::store::hash_json(&json!({ "thread": id, "text": b.text, "kind": kind }));
    if key.is_some() {
        if let Some(answer) = claim_request(&mut tx, tenant, &source, &request).await? {
            return Ok(Json(answer));
        }
    }
    let answer = send_message_in(&st, &caller, &mut tx, id, &b.text, kind, &source).await?;
    if key.is_some() {
        sqlx::query("update msg_api_requests set answer = $3 where tenant_id = $1 and source = $2")
            .bind(tenant)
            .bind(&source)
            .bind(&answer)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Json(answer))
}

/// Take `source` for this request: `None` when it is new (the caller goes
/// on and records its answer in the same transaction), the first answer when
/// it is a replay, `422 idempotency_key_reused` when the key was used for
/// another request. A concurrent twin waits on the first one's row.
async fn claim_request(
    tx: &mut sqlx::PgConnection,
    tenant: Uuid,
    source: &str,
    request: &[u8],
) -> Result<Option<Value>, ApiError> {
    let inserted = sqlx::query(
        "insert into msg_api_requests (tenant_id, source, request_hash) values ($1, $2, $3) on conflict do nothing",
    )
    .bind(tenant)
    .bind(source)
    .bind(request)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(None);
    }
    let (hash, answer): (Vec<u8>, Option<Value>) = sqlx::query_as(
        "select request_hash, answer from msg_api_requests where tenant_id = $1 and source = $2",
    )
    .bind(tenant)
    .bind(source)
    .fetch_one(&mut *tx)
    .await?;
    if hash != request {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request",
        ));
    }
    answer.map(Some).ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "concurrent_update",
            "the first request with this key is still in flight; try again",
        )
    })
}

/// One message from the API, inside the caller's transaction; its answer.
async fn send_message_in(
    st: &ApiState,
    caller: &Caller,
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    id: Uuid,
    text: &str,
    kind: &str,
    source: &str,
) -> Result<Value, ApiError> {
    let tenant = caller.0.tenant_id;
    let (client_id, _, number_id, _) = thread_row(&mut *tx, tenant, id).await?;
    if OWNER.contains(&caller.0.role) {
        // The owner writes from the front desk; billing goes on the client's front-desk thread.
        let fd = routing::front_desk(&mut *tx, tenant)
            .await?
            .ok_or_else(|| conflict("no_front_desk_number", "add the front-desk number first"))?;
        let phone: (String,) =
            sqlx::query_as("select phone from msg_clients where tenant_id = $1 and id = $2")
                .bind(tenant)
                .bind(&client_id)
                .fetch_one(&mut **tx)
                .await?;
        let thread = if kind == "billing" {
            routing::thread_for(&mut *tx, tenant, &client_id, fd.id, None, "front_desk").await?
        } else {
            id
        };
        let sent = routing::send(
            &st.engine,
            &mut *tx,
            tenant,
            source,
            Some(thread),
            "owner",
            None,
            &fd.e164,
            &phone.0,
            text,
            kind,
        )
        .await?;
        let status = if sent.is_some() {
            "queued"
        } else {
            "duplicate"
        };
        return Ok(json!({ "thread_id": thread, "status": status, "from": fd.e164 }));
    }
    let me = sitter_subject(caller)?.to_string();
    if !sitter_sees(&mut *tx, tenant, id, &me).await? {
        return Err(not_found("thread"));
    }
    if kind == "billing" {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "billing_front_desk_only",
            "billing messages come only from the front desk",
        ));
    }
    let sitter: Option<Sitter> = sqlx::query_as("select id, phone, status from msg_sitters where tenant_id = $1 and id = $2 and status = 'active'")
        .bind(tenant)
        .bind(&me)
        .fetch_optional(&mut **tx)
        .await?;
    let sitter = sitter.ok_or_else(|| not_found("thread"))?;
    let number: Number = routing::number_by_id(&mut *tx, tenant, number_id)
        .await?
        .ok_or_else(|| not_found("thread"))?;
    routing::handle(
        &st.engine,
        &mut *tx,
        tenant,
        source,
        Author::Sitter(&sitter),
        &number,
        text,
        Some(&client_id),
        None,
    )
    .await?;
    let row: Option<(Uuid, String, Option<String>)> = sqlx::query_as(
        "select id, status, reason from msg_messages where tenant_id = $1 and source = $2",
    )
    .bind(tenant)
    .bind(source)
    .fetch_optional(&mut **tx)
    .await?;
    let (message_id, status, reason) = row.ok_or_else(|| not_found("message"))?;
    Ok(json!({ "message_id": message_id, "status": status, "reason": reason }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ReassignBody {
    /// The new sitter; absent or null: the owner.
    #[serde(default)]
    sitter_id: Option<String>,
    /// Why (audited).
    #[allow(dead_code)] // read (and checked) by `reason_of`, like every ops reason
    reason: String,
}

#[utoipa::path(post, path = "/v1/messaging/threads/{id}/reassign", tag = "messaging", params(("id" = Uuid, Path, description = "Thread id")), request_body = ReassignBody, security(("bearer" = [])), responses((status = 200, description = "Reassigned, with the client's open bookings on it (audited)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn reassign(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let (b, reason): (ReassignBody, String) = owner_override(&caller, &body, "reassign threads")?;
    let tenant = caller.0.tenant_id;
    let mut tx = st.engine.pool().begin().await?;
    // Locked: an offboarding of the thread's sitter is either before or after.
    sqlx::query("select id from msg_threads where tenant_id = $1 and id = $2 for update")
        .bind(tenant)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let (client, from, number, _) = thread_row(&mut tx, tenant, id).await?;
    // The new sitter's own number (share-locked: not offboarded under us).
    let successor_number: Option<Uuid> = match &b.sitter_id {
        Some(to) => {
            let n: Option<(Option<Uuid>,)> = sqlx::query_as(
                "select number_id from msg_sitters where tenant_id = $1 and id = $2 and status = 'active' for share",
            )
            .bind(tenant)
            .bind(to)
            .fetch_optional(&mut *tx)
            .await?;
            n.ok_or_else(|| invalid("sitter_id: an active sitter"))?.0
        }
        None => None,
    };
    // A thread on the old sitter's own number moves to the new sitter's
    // number (a pool number stays): each sitter works on their own line.
    let (class,): (String,) =
        sqlx::query_as("select class from msg_numbers where tenant_id = $1 and id = $2")
            .bind(tenant)
            .bind(number)
            .fetch_one(&mut *tx)
            .await?;
    let new_number = match successor_number {
        Some(n) if class == "sitter" => n,
        _ => number,
    };
    sqlx::query("update msg_threads set sitter_id = $3, number_id = $4, updated_at = now() where tenant_id = $1 and id = $2")
        .bind(tenant)
        .bind(id)
        .bind(&b.sitter_id)
        .bind(new_number)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "update msg_bookings set sitter_id = $5, number_id = $6 where tenant_id = $1 and client_id = $2 and number_id = $3
            and sitter_id is not distinct from $4 and not cancelled and closes_at > now()",
    )
    .bind(tenant)
    .bind(&client)
    .bind(number)
    .bind(&from)
    .bind(&b.sitter_id)
    .bind(new_number)
    .execute(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        &caller.0,
        "thread_reassigned",
        None,
        Some(&id.to_string()),
        &reason,
        None,
        json!({ "from_sitter": from, "to": b.sitter_id.as_deref().unwrap_or("owner") }),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(json!({ "id": id, "sitter_id": b.sitter_id })))
}

// ---- the owner's inbox, overrides, attempts ----

#[utoipa::path(get, path = "/v1/messaging/inbox", tag = "messaging", security(("bearer" = [])), responses((status = 200, description = "Open owner inbox items, newest first", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn list_inbox(State(st): State<ApiState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    require(&caller, OWNER, "read the inbox")?;
    list_of(&st, caller.0.tenant_id, "items", "select json_build_object('id', i.id, 'reason', i.reason, 'severity', i.severity, 'detail', i.detail,
                'message_id', i.message_id, 'thread_id', i.thread_id, 'text', m.body, 'from', m.from_number,
                'to', m.to_number, 'sender_role', m.sender_role, 'at', i.created_at)
           from msg_inbox i left join msg_messages m on m.tenant_id = i.tenant_id and m.id = i.message_id
          where i.tenant_id = $1 and i.resolved_at is null order by i.created_at desc limit 500").await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    /// Why (audited).
    #[allow(dead_code)] // read (and checked) by `reason_of`, like every ops reason
    reason: String,
    /// For a message held because several windows were open: relay it to this booking's sitter.
    #[serde(default)]
    booking_id: Option<Uuid>,
    /// Relay it even though the anti-poaching rules would block it (audited
    /// as a forced send, with this reason).
    #[serde(default)]
    force: bool,
}

#[utoipa::path(post, path = "/v1/messaging/inbox/{id}/resolve", tag = "messaging", params(("id" = Uuid, Path, description = "Inbox item id")), request_body = ResolveBody, security(("bearer" = [])), responses((status = 200, description = "Resolved (audited); with a booking, the held message is relayed to its sitter", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn resolve(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let (b, reason): (ResolveBody, String) = owner_override(&caller, &body, "resolve inbox items")?;
    let tenant = caller.0.tenant_id;
    let mut tx = st.engine.pool().begin().await?;
    let item: Option<(Option<Uuid>,)> = sqlx::query_as(
        "update msg_inbox set resolved_at = now() where tenant_id = $1 and id = $2 and resolved_at is null returning message_id",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let (message,) = item.ok_or_else(|| not_found("open inbox item"))?;
    let mut relayed = None;
    if let Some(booking) = b.booking_id {
        let message = message.ok_or_else(|| invalid("this item holds no message"))?;
        let held: Option<(String, String, String)> = sqlx::query_as(
            "select m.body, m.sender_role, coalesce(c.id, '') from msg_messages m
               left join msg_clients c on c.tenant_id = m.tenant_id and c.phone = m.from_number
              where m.tenant_id = $1 and m.id = $2 and m.status = 'routed_to_owner'",
        )
        .bind(tenant)
        .bind(message)
        .fetch_optional(&mut *tx)
        .await?;
        let (text, role, client) = held.ok_or_else(|| invalid("the item's message is not held"))?;
        // Held is not cleared: the same rule as any relay (a blocked message
        // goes out only by force-send, with its own reason).
        if text.trim().is_empty() {
            return Err(invalid(
                "the held message has no text to relay (a picture message)",
            ));
        }
        let blocked = scan::verdict(&text) == scan::Verdict::Block;
        if blocked && !b.force {
            return Err(conflict(
                "blocked_content",
                "the held message would be blocked by the anti-poaching rules; resolve with `force: true` to send it anyway",
            ));
        }
        if blocked {
            audit::record(
                &mut tx,
                &caller.0,
                "blocked_message_forced",
                None,
                Some(&message.to_string()),
                &reason,
                Some("routed_to_owner"),
                json!({ "via": "inbox" }),
            )
            .await?;
        }
        let w: Option<(String, String, Uuid, String)> = sqlx::query_as(
            "select s.phone, n.e164, b.number_id, s.id from msg_bookings b
               join msg_sitters s on s.tenant_id = b.tenant_id and s.id = b.sitter_id and s.status = 'active'
               join msg_numbers n on n.tenant_id = b.tenant_id and n.id = b.number_id
              where b.tenant_id = $1 and b.id = $2 and b.client_id = $3 and not b.cancelled and b.closes_at > now()
              for share of s",
        )
        .bind(tenant)
        .bind(booking)
        .bind(&client)
        .fetch_optional(&mut *tx)
        .await?;
        let (to, from, number, sitter) = w
            .filter(|_| role == "client")
            .ok_or_else(|| invalid("booking_id: an open booking of the message's client"))?;
        let thread = routing::thread_for(&mut tx, tenant, &client, number, None, "service").await?;
        relayed = routing::send(
            &st.engine,
            &mut tx,
            tenant,
            &format!("resolve:{id}"),
            Some(thread),
            "client",
            Some(&sitter),
            &from,
            &to,
            &text,
            "service",
        )
        .await?;
        sqlx::query("update msg_messages set status = 'relayed', thread_id = $3, sitter_id = $4 where tenant_id = $1 and id = $2")
            .bind(tenant)
            .bind(message)
            .bind(thread)
            .bind(&sitter)
            .execute(&mut *tx)
            .await?;
    }
    audit::record(
        &mut tx,
        &caller.0,
        "inbox_resolved",
        None,
        Some(&id.to_string()),
        &reason,
        None,
        json!({ "relayed_to_booking": b.booking_id }),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(
        json!({ "id": id, "resolved": true, "relayed_message": relayed }),
    ))
}

#[utoipa::path(post, path = "/v1/messaging/messages/{id}/force", tag = "messaging", params(("id" = Uuid, Path, description = "A blocked message")), request_body = crate::openapi::ReasonBody, security(("bearer" = [])), responses((status = 200, description = "Sent anyway, with the owner's reason audited", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn force_send(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let (_, reason): (Value, String) =
        owner_override(&caller, &body, "force-send blocked messages")?;
    let tenant = caller.0.tenant_id;
    let mut tx = st.engine.pool().begin().await?;
    #[allow(clippy::type_complexity)]
    let m: Option<(Option<Uuid>, String, Option<String>, Option<String>, Option<String>, String)> = sqlx::query_as(
        "update msg_messages set status = 'forced' where tenant_id = $1 and id = $2 and status = 'blocked'
         returning thread_id, sender_role, sitter_id, deliver_from, deliver_to, body",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let (thread, role, sitter, Some(from), Some(to), text) =
        m.ok_or_else(|| not_found("blocked message"))?
    else {
        return Err(not_found("blocked message"));
    };
    let sent = routing::send(
        &st.engine,
        &mut tx,
        tenant,
        &format!("force:{id}"),
        thread,
        &role,
        sitter.as_deref(),
        &from,
        &to,
        &text,
        "service",
    )
    .await?;
    audit::record(
        &mut tx,
        &caller.0,
        "blocked_message_forced",
        None,
        Some(&id.to_string()),
        &reason,
        Some("blocked"),
        json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(
        json!({ "id": id, "status": "forced", "relayed_message": sent }),
    ))
}

#[utoipa::path(get, path = "/v1/messaging/poaching", tag = "messaging", security(("bearer" = [])), responses((status = 200, description = "Every blocked attempt: message, thread, sender role, sitter", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn list_poaching(
    State(st): State<ApiState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    require(&caller, OWNER, "read poaching attempts")?;
    list_of(&st, caller.0.tenant_id, "attempts", "select json_build_object('id', p.id, 'message_id', p.message_id, 'thread_id', p.thread_id, 'sender_role', p.sender_role,
                'sitter_id', p.sitter_id, 'findings', p.findings, 'text', m.body, 'status', m.status, 'at', p.at)
           from msg_poaching p join msg_messages m on m.tenant_id = p.tenant_id and m.id = p.message_id
          where p.tenant_id = $1 order by p.at desc limit 500").await
}

/// The messaging routes.
pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(scan_message))
        .routes(routes!(add_number, list_numbers))
        .routes(routes!(onboard, list_sitters))
        .routes(routes!(offboard))
        .routes(routes!(unlock))
        .routes(routes!(add_client, list_clients))
        .routes(routes!(book, list_bookings))
        .routes(routes!(reschedule))
        .routes(routes!(cancel_booking))
        .routes(routes!(meet))
        .routes(routes!(decide))
        .routes(routes!(list_threads))
        .routes(routes!(get_thread))
        .routes(routes!(send_message))
        .routes(routes!(reassign))
        .routes(routes!(list_inbox))
        .routes(routes!(resolve))
        .routes(routes!(force_send))
        .routes(routes!(list_poaching))
}
