//! Tenant administration over HTTP: the people registry, the tenant's runtime
//! configuration, and provider settings (secrets write-only).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;
use workflows::Role;

use crate::http::{parse_body, require, ApiError, ApiState, Caller};
use crate::store::providers::{self, Person};
use crate::store::tenants;

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", message)
}

/// The caller's own tenant by name; another tenant's name is a 404.
async fn own_tenant(st: &ApiState, caller: &Caller, name: &str) -> Result<Uuid, ApiError> {
    let mut conn = st.engine.pool().acquire().await?;
    match tenants::by_name(&mut conn, name).await? {
        Some(t) if t.id == caller.0.tenant_id => Ok(t.id),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such tenant",
        )),
    }
}

// ---- people ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PersonBody {
    #[serde(default)]
    id: Option<String>,
    role: String,
    display_name: String,
    #[serde(default)]
    telegram_user_id: Option<i64>,
    #[serde(default)]
    telegram_username: Option<String>,
    #[serde(default)]
    phone: Option<String>,
    #[serde(default)]
    email: Option<String>,
}

/// An E.164 phone number: `+`, then 7 to 15 digits, no leading zero.
pub fn e164(s: &str) -> Option<String> {
    let compact: String = s
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')' | '.'))
        .collect();
    let digits = compact.strip_prefix('+')?;
    let ok = (7..=15).contains(&digits.len())
        && digits.chars().all(|c| c.is_ascii_digit())
        && !digits.starts_with('0');
    ok.then_some(compact)
}

fn validate_person(id: String, b: PersonBody) -> Result<Person, ApiError> {
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !id_ok {
        return Err(invalid(
            "id must be 1..=64 letters, digits, `_`, `.` or `-`",
        ));
    }
    if !matches!(b.role.as_str(), "executor" | "operator") {
        return Err(invalid("role must be `executor` or `operator`"));
    }
    let display_name = b.display_name.trim().to_string();
    if workflows::text::check(&display_name, workflows::text::TextKind::Name, 100).is_err() {
        return Err(invalid(
            "display_name must be 1..=100 printable characters, no bidirectional controls",
        ));
    }
    let username = match b.telegram_username {
        Some(u) => {
            let u = u.trim_start_matches('@').to_string();
            let ok = (5..=32).contains(&u.len())
                && u.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(invalid(
                    "telegram_username must be 5..=32 letters, digits or `_`",
                ));
            }
            Some(u)
        }
        None => None,
    };
    let phone = match b.phone {
        Some(p) => Some(
            e164(&p).ok_or_else(|| invalid("phone must be in E.164 form, e.g. +972501234567"))?,
        ),
        None => None,
    };
    if b.email.as_ref().is_some_and(|e| {
        !e.contains('@')
            || e.chars().any(char::is_whitespace)
            || workflows::text::check(e, workflows::text::TextKind::Line, 254).is_err()
    }) {
        return Err(invalid("email is not an address"));
    }
    Ok(Person {
        id,
        role: b.role,
        display_name,
        telegram_user_id: b.telegram_user_id,
        telegram_username: username,
        phone,
        email: b.email,
    })
}

async fn upsert(
    st: &ApiState,
    caller: &Caller,
    id: Option<String>,
    body: &Bytes,
) -> Result<Response, ApiError> {
    require(caller, &[Role::Ops, Role::Operator], "manage people")?;
    let b: PersonBody = parse_body(body)?;
    let id = id
        .or_else(|| b.id.clone())
        .ok_or_else(|| invalid("id is required"))?;
    if b.id.as_ref().is_some_and(|body_id| *body_id != id) {
        return Err(invalid("the body's id differs from the path"));
    }
    let person = validate_person(id, b)?;
    let mut conn = st.engine.pool().acquire().await?;
    let created = providers::upsert_person(&mut conn, caller.0.tenant_id, &person).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!(person))).into_response())
}

#[utoipa::path(post, path = "/v1/people", tag = "admin", request_body = PersonBody, security(("bearer" = [])), responses((status = 201, description = "Created", body = serde_json::Value), (status = 200, description = "Updated", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn create_person(
    State(st): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    upsert(&st, &caller, None, &body).await
}

#[utoipa::path(put, path = "/v1/people/{id}", tag = "admin", params(("id" = String, Path, description = "Person id")), request_body = PersonBody, security(("bearer" = [])), responses((status = 201, description = "Created", body = serde_json::Value), (status = 200, description = "Updated", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn put_person(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    upsert(&st, &caller, Some(id), &body).await
}

#[utoipa::path(get, path = "/v1/people", tag = "admin", security(("bearer" = [])), responses((status = 200, description = "People of the caller's tenant", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn list_people(State(st): State<ApiState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    require(&caller, &[Role::Ops, Role::Operator], "list people")?;
    let mut conn = st.engine.pool().acquire().await?;
    Ok(Json(
        json!({ "people": providers::people(&mut conn, caller.0.tenant_id).await? }),
    ))
}

#[utoipa::path(get, path = "/v1/people/{id}", tag = "admin", params(("id" = String, Path, description = "Person id")), security(("bearer" = [])), responses((status = 200, description = "The person", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn get_person(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require(&caller, &[Role::Ops, Role::Operator], "read people")?;
    let mut conn = st.engine.pool().acquire().await?;
    let p = providers::person(&mut conn, caller.0.tenant_id, &id)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such person"))?;
    Ok(Json(json!(p)))
}

#[utoipa::path(delete, path = "/v1/people/{id}", tag = "admin", params(("id" = String, Path, description = "Person id")), security(("bearer" = [])), responses((status = 204, description = "Deleted"), crate::openapi::ClientErrors))]
async fn delete_person(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    require(&caller, &[Role::Ops, Role::Operator], "manage people")?;
    let mut conn = st.engine.pool().acquire().await?;
    if providers::delete_person(&mut conn, caller.0.tenant_id, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such person",
        ))
    }
}

// ---- tenant config ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ConfigDoc {
    #[serde(default)]
    dispatch: Option<DispatchCfg>,
    #[serde(default)]
    rate_limits: Option<RateCfg>,
    #[serde(default)]
    log_channel: Option<LogCfg>,
    /// Per-tenant switches by workflow kind (`false` stops new instances).
    #[serde(default)]
    flags: Option<std::collections::BTreeMap<String, bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct DispatchCfg {
    #[serde(default)]
    operator: Option<OperatorCfg>,
    #[serde(default)]
    crew: Option<CrewCfg>,
    #[serde(default)]
    claim_deadline_s: Option<u64>,
    #[serde(default)]
    auto_release_on_paid: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct OperatorCfg {
    #[serde(default)]
    send_full: Option<bool>,
    #[serde(default)]
    send_crew_fallback: Option<bool>,
    #[serde(default)]
    provider: Option<OperatorProvider>,
    #[serde(default)]
    to: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum OperatorProvider {
    Telegram,
    Whatsapp,
    Sms,
    Email,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct CrewCfg {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    provider: Option<CrewProvider>,
    #[serde(default)]
    chat_id: Option<Value>,
    /// The closed lists crew posts draw from (defaults in `workflows::lead`).
    #[serde(default)]
    volumes: Option<Vec<String>>,
    #[serde(default)]
    extras: Option<Vec<String>>,
    #[serde(default)]
    time_windows: Option<Vec<String>>,
    #[serde(default)]
    localities: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum CrewProvider {
    Telegram,
    Whatsapp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RateCfg {
    #[serde(default)]
    telegram_chat_per_s: Option<f64>,
    #[serde(default)]
    telegram_group_per_min: Option<f64>,
    #[serde(default)]
    telegram_bot_per_s: Option<f64>,
    #[serde(default)]
    whatsapp_number_per_s: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct LogCfg {
    #[serde(default)]
    fail_first: Option<u32>,
    #[serde(default)]
    failure: Option<String>,
}

/// Every string of the config document under the one text rule.
fn printable_strings(v: &Value, at: &str) -> Result<(), ApiError> {
    match v {
        Value::String(s) if s.is_empty() => Ok(()),
        Value::String(s) => {
            workflows::text::check_field(at, s, workflows::text::TextKind::Multiline, 2048)
                .map_err(invalid)
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .try_for_each(|(i, x)| printable_strings(x, &format!("{at}[{i}]"))),
        Value::Object(o) => o
            .iter()
            .try_for_each(|(k, x)| printable_strings(x, &format!("{at}.{k}"))),
        _ => Ok(()),
    }
}

/// A crew list: 1..=200 entries, each a one-line label of at most 40
/// characters that the detector passes (what crews will read).
fn check_crew_list(name: &str, list: &Option<Vec<String>>) -> Result<(), ApiError> {
    let Some(list) = list else { return Ok(()) };
    if list.is_empty() || list.len() > 200 {
        return Err(invalid(format!(
            "dispatch.crew.{name} must hold 1..=200 entries"
        )));
    }
    for (i, item) in list.iter().enumerate() {
        let field = format!("dispatch.crew.{name}[{i}]");
        let label = workflows::lead::normalize(item);
        workflows::text::check_field(&field, &label, workflows::text::TextKind::Name, 40)
            .map_err(invalid)?;
        crate::crew::check(&label, false, |_| field.clone()).map_err(|e| invalid(e.to_string()))?;
    }
    Ok(())
}

fn validate_config(doc: &Value) -> Result<(), ApiError> {
    printable_strings(doc, "config")?;
    let parsed: ConfigDoc =
        serde_json::from_value(doc.clone()).map_err(|e| invalid(e.to_string()))?;
    if let Some(c) = parsed.dispatch.as_ref().and_then(|d| d.crew.as_ref()) {
        check_crew_list("volumes", &c.volumes)?;
        check_crew_list("extras", &c.extras)?;
        check_crew_list("time_windows", &c.time_windows)?;
        check_crew_list("localities", &c.localities)?;
    }
    let known = workflows::Registry::builtin().kinds();
    if let Some(flag) = parsed
        .flags
        .iter()
        .flat_map(|f| f.keys())
        .find(|k| !known.contains(&k.as_str()))
    {
        return Err(invalid(format!("flags: unknown workflow kind `{flag}`")));
    }
    if let Some(d) = &parsed.dispatch {
        if d.claim_deadline_s
            .is_some_and(|s| !(1..=workflows::dispatch::MAX_CLAIM_DEADLINE_S).contains(&s))
        {
            return Err(invalid("dispatch.claim_deadline_s must be 1..=7776000"));
        }
        if let Some(c) = &d.crew {
            if c.enabled == Some(true)
                && c.provider.is_some()
                && c.chat_id.is_none()
                && matches!(c.provider, Some(CrewProvider::Telegram))
            {
                return Err(invalid(
                    "dispatch.crew.chat_id is required for a telegram crew",
                ));
            }
        }
        if let Some(o) = &d.operator {
            if o.provider.is_some() && o.to.is_none() {
                return Err(invalid("dispatch.operator.to is required with a provider"));
            }
        }
    }
    if let Some(r) = &parsed.rate_limits {
        let all = [
            r.telegram_chat_per_s,
            r.telegram_group_per_min,
            r.telegram_bot_per_s,
            r.whatsapp_number_per_s,
        ];
        if all.iter().flatten().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(invalid("rate limits must be positive numbers"));
        }
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/config", tag = "admin", params(("tenant" = String, Path, description = "Tenant name (the caller's own)")), security(("bearer" = [])), responses((status = 200, description = "The tenant configuration", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn get_config(
    State(st): State<ApiState>,
    caller: Caller,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require(
        &caller,
        &[Role::Ops, Role::Operator],
        "read the tenant config",
    )?;
    let tenant_id = own_tenant(&st, &caller, &tenant).await?;
    let mut conn = st.engine.pool().acquire().await?;
    Ok(Json(tenants::config(&mut conn, tenant_id).await?))
}

#[utoipa::path(put, path = "/v1/tenants/{tenant}/config", tag = "admin", params(("tenant" = String, Path, description = "Tenant name (the caller's own)")), request_body(content = serde_json::Value, description = "The whole configuration document (validated)"), security(("bearer" = [])), responses((status = 200, description = "Stored; takes effect without a restart", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn put_config(
    State(st): State<ApiState>,
    caller: Caller,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    require(&caller, &[Role::Ops], "change the tenant config")?;
    let tenant_id = own_tenant(&st, &caller, &tenant).await?;
    let doc: Value = parse_body(&body)?;
    validate_config(&doc)?;
    let mut conn = st.engine.pool().acquire().await?;
    tenants::set_config(&mut conn, tenant_id, &doc).await?;
    // Read per transition and per delivery: takes effect without a restart.
    Ok(Json(doc))
}

// ---- providers ----

/// Settings and secrets each provider accepts.
fn provider_fields(provider: &str) -> Option<(&'static [&'static str], &'static [&'static str])> {
    Some(match provider {
        "telegram" => (
            &["base_url", "bot_username"],
            &["bot_token", "webhook_secret"],
        ),
        "whatsapp" => (
            &[
                "base_url",
                "phone_number_id",
                "template_name",
                "template_language",
            ],
            &["access_token", "app_secret", "verify_token"],
        ),
        "twilio" => (
            &["base_url", "account_sid", "from", "webhook_url"],
            &["auth_token"],
        ),
        "resend" => (&["base_url", "from"], &["api_key", "webhook_secret"]),
        "sendgrid" => (&["base_url", "from", "webhook_public_key"], &["api_key"]),
        _ => return None,
    })
}

fn provider_view(provider: &str, settings: &Value, secrets: &Value) -> Value {
    let mut set: Vec<&str> = secrets
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    set.sort();
    json!({ "provider": provider, "settings": settings, "secrets_set": set })
}

#[utoipa::path(put, path = "/v1/tenants/{tenant}/providers/{provider}", tag = "admin", params(("tenant" = String, Path, description = "Tenant name (the caller's own)"), ("provider" = String, Path, description = "telegram, whatsapp, twilio, resend or sendgrid")), request_body(content = std::collections::HashMap<String, String>, description = "Settings and write-only secrets, merged into what is stored"), security(("bearer" = [])), responses((status = 200, description = "Settings and the names of the secrets set", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn put_provider(
    State(st): State<ApiState>,
    caller: Caller,
    Path((tenant, provider)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    require(&caller, &[Role::Ops], "configure providers")?;
    let tenant_id = own_tenant(&st, &caller, &tenant).await?;
    let (setting_names, secret_names) = provider_fields(&provider).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_provider",
            "no such provider",
        )
    })?;
    let doc: Map<String, Value> = parse_body(&body)?;
    let (mut settings, mut secrets) = (Map::new(), Map::new());
    for (k, v) in doc {
        let Some(s) = v.as_str() else {
            return Err(invalid(format!("`{k}` must be a non-empty string")));
        };
        // Settings and secrets alike: one printable line.
        workflows::text::check_field(&k, s, workflows::text::TextKind::Line, 2048)
            .map_err(invalid)?;
        if setting_names.contains(&k.as_str()) {
            if (k == "base_url" || k == "webhook_url")
                && !(s.starts_with("https://") || s.starts_with("http://"))
            {
                return Err(invalid("base_url must be an http(s) URL"));
            }
            let s = if k == "bot_username" {
                // The deep links are t.me/<bot_username>: Telegram's own rules.
                let name = s.trim_start_matches('@');
                if !(5..=32).contains(&name.len())
                    || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    return Err(invalid("bot_username: 5..=32 letters, digits or `_`"));
                }
                name
            } else {
                s
            };
            settings.insert(k, Value::from(s));
        } else if secret_names.contains(&k.as_str()) {
            secrets.insert(k, Value::from(s));
        } else {
            return Err(invalid(format!("unknown field `{k}` for {provider}")));
        }
    }
    let mut conn = st.engine.pool().acquire().await?;
    let settings = Value::Object(settings);
    let (settings, merged) = providers::put(
        &mut conn,
        tenant_id,
        &provider,
        &settings,
        &Value::Object(secrets),
    )
    .await?;
    tracing::info!(provider = %provider, "provider settings updated");
    Ok(Json(provider_view(&provider, &settings, &merged)))
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/providers/{provider}", tag = "admin", params(("tenant" = String, Path, description = "Tenant name (the caller's own)"), ("provider" = String, Path, description = "telegram, whatsapp, twilio, resend or sendgrid")), security(("bearer" = [])), responses((status = 200, description = "Settings and the names of the secrets set (never their values)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn get_provider(
    State(st): State<ApiState>,
    caller: Caller,
    Path((tenant, provider)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    require(&caller, &[Role::Ops], "read provider settings")?;
    let tenant_id = own_tenant(&st, &caller, &tenant).await?;
    let mut conn = st.engine.pool().acquire().await?;
    let row = providers::get(&mut conn, tenant_id, &provider)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "provider not configured",
            )
        })?;
    Ok(Json(provider_view(&provider, &row.settings, &row.secrets)))
}

// ---- schedules ----

/// A recurring schedule whose ticks signal one of the tenant's workflows.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ScheduleBody {
    /// Cron expression: six fields (seconds first) or the classic five.
    #[schema(example = "0 0 8 * * Mon-Fri")]
    cron: String,
    /// IANA time zone the expression is read in (default `UTC`).
    #[serde(default)]
    timezone: Option<String>,
    /// `catch_up` (fire ticks missed while no worker ran) or `skip` (default).
    #[serde(default)]
    policy: Option<String>,
    /// The workflow each tick signals.
    workflow: ScheduleTarget,
    /// The signal each tick sends (payload `{"schedule": name, "tick": time}`).
    signal: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ScheduleTarget {
    kind: String,
    key: String,
}

fn schedule_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "a schedule name is 1-63 of a-z 0-9 _ . - starting with a letter or digit",
        ))
    }
}

fn schedule_json(s: &crate::store::schedules::ScheduleRow) -> Value {
    json!({
        "name": s.name, "cron": s.cron, "timezone": s.timezone, "policy": s.policy,
        "workflow": {"kind": s.kind, "key": s.key}, "signal": s.signal,
        "next_at": s.next_at, "last_tick_at": s.last_tick_at, "ticks": s.ticks,
        "skipped": s.skipped, "last_error": s.last_error,
    })
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/schedules", tag = "admin", params(("tenant" = String, Path, description = "Tenant name (the caller's own)")), security(("bearer" = [])), responses((status = 200, description = "The tenant's schedules, by name", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn list_schedules(
    State(st): State<ApiState>,
    caller: Caller,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require(&caller, &[Role::Ops, Role::Operator], "read schedules")?;
    let tenant_id = own_tenant(&st, &caller, &tenant).await?;
    let mut conn = st.engine.pool().acquire().await?;
    let rows = crate::store::schedules::list(&mut conn, tenant_id).await?;
    Ok(Json(
        json!({ "schedules": rows.iter().map(schedule_json).collect::<Vec<_>>() }),
    ))
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/schedules/{name}", tag = "admin", params(("tenant" = String, Path, description = "Tenant name (the caller's own)"), ("name" = String, Path, description = "Schedule name")), security(("bearer" = [])), responses((status = 200, description = "The schedule, its next tick and what it fired", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn get_schedule(
    State(st): State<ApiState>,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    require(&caller, &[Role::Ops, Role::Operator], "read schedules")?;
    let tenant_id = own_tenant(&st, &caller, &tenant).await?;
    let mut conn = st.engine.pool().acquire().await?;
    match crate::store::schedules::get(&mut conn, tenant_id, &name).await? {
        Some(s) => Ok(Json(schedule_json(&s))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such schedule",
        )),
    }
}

#[utoipa::path(put, path = "/v1/tenants/{tenant}/schedules/{name}", tag = "admin", params(("tenant" = String, Path, description = "Tenant name (the caller's own)"), ("name" = String, Path, description = "Schedule name")), request_body = ScheduleBody, security(("bearer" = [])), responses((status = 200, description = "Stored; the next tick is computed from now", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn put_schedule(
    State(st): State<ApiState>,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    require(&caller, &[Role::Ops], "change schedules")?;
    let tenant_id = own_tenant(&st, &caller, &tenant).await?;
    schedule_name(&name)?;
    let b: ScheduleBody = parse_body(&body)?;
    let policy = b.policy.as_deref().unwrap_or("skip");
    if !matches!(policy, "catch_up" | "skip") {
        return Err(invalid("`policy` is `catch_up` or `skip`"));
    }
    if b.cron.len() > 200 {
        return Err(invalid("`cron` is at most 200 characters"));
    }
    if !st
        .engine
        .registry()
        .kinds()
        .contains(&b.workflow.kind.as_str())
    {
        return Err(invalid(format!(
            "unknown workflow kind `{}`",
            b.workflow.kind
        )));
    }
    for (field, v) in [("workflow.key", &b.workflow.key), ("signal", &b.signal)] {
        if v.is_empty() || v.len() > 200 || v.chars().any(char::is_control) {
            return Err(invalid(format!("`{field}` is 1-200 printable characters")));
        }
    }
    let timezone = b.timezone.as_deref().unwrap_or("UTC");
    match crate::schedules::put(
        st.engine.pool(),
        tenant_id,
        &name,
        &b.cron,
        timezone,
        policy,
        &b.workflow.kind,
        &b.workflow.key,
        &b.signal,
    )
    .await?
    {
        Ok(row) => Ok(Json(schedule_json(&row))),
        Err(e) => Err(invalid(e.to_string())),
    }
}

#[utoipa::path(delete, path = "/v1/tenants/{tenant}/schedules/{name}", tag = "admin", params(("tenant" = String, Path, description = "Tenant name (the caller's own)"), ("name" = String, Path, description = "Schedule name")), security(("bearer" = [])), responses((status = 204, description = "Deleted; no further ticks"), crate::openapi::ClientErrors))]
async fn delete_schedule(
    State(st): State<ApiState>,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    require(&caller, &[Role::Ops], "change schedules")?;
    let tenant_id = own_tenant(&st, &caller, &tenant).await?;
    let mut conn = st.engine.pool().acquire().await?;
    if crate::store::schedules::delete(&mut conn, tenant_id, &name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such schedule",
        ))
    }
}

/// The administration routes.
pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_schedules))
        .routes(routes!(get_schedule, put_schedule, delete_schedule))
        .routes(routes!(list_people, create_person))
        .routes(routes!(get_person, put_person, delete_person))
        .routes(routes!(get_config, put_config))
        .routes(routes!(put_provider, get_provider))
}
