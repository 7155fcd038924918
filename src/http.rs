//! The HTTP API (axum): JSON in and out, errors as
//! `{"error": {"code": "...", "message": "..."}}`, mapped in one place.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;
use workflows::{Actor, ParseError, Role};

use crate::engine::{Engine, EngineError, SignalAnswer, SignalIn};
use crate::store::tenants::{self, Principal};
use crate::store::{effects, timers, workflows as wf_store};

/// Longest `?wait_ms=` a caller may ask for.
pub const MAX_WAIT_MS: u64 = 30_000;

/// Shared state of the API.
#[derive(Clone)]
pub struct ApiState {
    /// The engine.
    pub engine: Engine,
    /// Signal-applied notifications, fanned out to waiting requests.
    pub applied: crate::notify::Waiters,
    /// The public base URL providers call (`DISPATCH_PUBLIC_URL`), for Twilio signatures.
    pub public_url: Option<String>,
    /// The largest request body accepted (`413 body_too_large` beyond).
    pub max_body_bytes: usize,
}

/// An API error: a status and a machine-readable code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl ApiError {
    /// The same error, its message prefixed (e.g. with the batch item it is about).
    pub(crate) fn prefixed(mut self, prefix: &str) -> Self {
        self.message = format!("{prefix}{}", self.message);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            // Full detail stays in the log (inside the request span); clients get an opaque 5xx.
            tracing::error!(error = %self.message, "request failed");
            let body = json!({"error": {"code": "internal", "message": "internal error"}});
            return (self.status, Json(body)).into_response();
        }
        // Errors name the field, never the value: whatever a message quotes
        // of the request is taken out, and the rest is bounded.
        let message = workflows::text::redact(&self.message);
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": message}})),
        )
            .into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        use StatusCode as S;
        match &e {
            EngineError::UnknownKind(_) => ApiError::new(
                S::NOT_FOUND,
                "unknown_kind",
                "`kind` is not a workflow kind this service runs",
            ),
            EngineError::NotFound => ApiError::new(S::NOT_FOUND, "not_found", e.to_string()),
            EngineError::LayerDisabled(_) => {
                ApiError::new(S::CONFLICT, "layer_disabled", e.to_string())
            }
            EngineError::WorkflowExists => {
                ApiError::new(S::CONFLICT, "workflow_exists", e.to_string())
            }
            EngineError::IdempotencyKeyReused => ApiError::new(
                S::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                e.to_string(),
            ),
            EngineError::Forbidden(..) => ApiError::new(S::FORBIDDEN, "forbidden", e.to_string()),
            EngineError::Parse(ParseError::UnknownSignal(_)) => ApiError::new(
                S::UNPROCESSABLE_ENTITY,
                "unknown_signal",
                "`name` is not a signal of this workflow kind",
            ),
            EngineError::Parse(ParseError::InvalidKey(_)) => {
                ApiError::new(S::UNPROCESSABLE_ENTITY, "invalid_key", e.to_string())
            }
            EngineError::Parse(ParseError::StoredState(_)) => {
                ApiError::new(S::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
            EngineError::Parse(ParseError::CrewUnsafe(_)) => {
                ApiError::new(S::UNPROCESSABLE_ENTITY, "crew_unsafe_field", e.to_string())
            }
            EngineError::Parse(ParseError::InvalidPayload(_)) => {
                ApiError::new(S::UNPROCESSABLE_ENTITY, "invalid_payload", e.to_string())
            }
            EngineError::Fenced(_) => ApiError::new(S::CONFLICT, "conflict", e.to_string()),
            EngineError::Db(err) => match err.as_database_error().and_then(|d| d.code()) {
                // NUL characters and invalid text encodings: the client's input.
                Some(c) if c == "22P05" || c == "22021" => ApiError::new(
                    S::UNPROCESSABLE_ENTITY,
                    "invalid_text",
                    "text must not contain NUL characters or invalid encodings",
                ),
                Some(c) if c == "23505" => {
                    ApiError::new(S::CONFLICT, "conflict", "conflicting write")
                }
                // Two requests crossed (a deadlock or serialization failure, rolled back whole): try again.
                Some(c) if c == "40P01" || c == "40001" => ApiError::new(
                    S::CONFLICT,
                    "concurrent_update",
                    "a concurrent request changed the same records; nothing was stored, try again",
                ),
                _ => ApiError::new(S::INTERNAL_SERVER_ERROR, "internal", format!("{e}: {err}")),
            },
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        EngineError::Db(e).into()
    }
}

/// The authenticated caller (`Authorization: Bearer <key>`).
pub struct Caller(pub Principal);

impl Caller {
    pub(crate) fn actor(&self) -> Actor {
        Actor {
            role: self.0.role,
            subject: self.0.subject.clone(),
        }
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        let unauthorized = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid `Authorization: Bearer <key>` is required",
            )
        };
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(unauthorized)?;
        let key = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty() && k.len() <= 256)
            .ok_or_else(unauthorized)?;
        let mut conn = state.engine.pool().acquire().await?;
        let principal = tenants::authenticate(&mut conn, key)
            .await?
            .ok_or_else(unauthorized)?;
        // Fill in the request span the edge opened (no-ops when disabled).
        let span = tracing::Span::current();
        if let Some(route) = parts.extensions.get::<axum::extract::MatchedPath>() {
            span.record("http.route", route.as_str());
        }
        span.record("tenant.id", tracing::field::display(principal.tenant_id));
        Ok(Caller(principal))
    }
}

/// The `Idempotency-Key` header: one key per intended request, 1..=255
/// printable characters (trimmed). Required as `IdempotencyKey` (absent or
/// blank: `400 idempotency_key_required`), optional as
/// `Option<IdempotencyKey>`; present but too long or with control
/// characters, `400 invalid_idempotency_key` either way.
pub struct IdempotencyKey(pub String);

impl IdempotencyKey {
    fn read(parts: &Parts) -> Result<Option<Self>, ApiError> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(None);
        };
        let invalid = || {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_idempotency_key",
                "Idempotency-Key: 1..=255 printable characters",
            )
        };
        let key = value.to_str().map_err(|_| invalid())?.trim();
        if key.is_empty() {
            return Ok(None);
        }
        if key.len() > 255 || key.chars().any(char::is_control) {
            return Err(invalid());
        }
        Ok(Some(IdempotencyKey(key.to_string())))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        IdempotencyKey::read(parts)?.ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "idempotency_key_required",
                "an `Idempotency-Key` header (1..=255 printable characters) is required",
            )
        })
    }
}

impl<S: Send + Sync> axum::extract::OptionalFromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        IdempotencyKey::read(parts)
    }
}

pub(crate) fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    let value = parse_json(body)?;
    serde_json::from_value(value).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            e.to_string(),
        )
    })
}

/// Parse a JSON body strictly: malformed JSON is `400 malformed_json`, and an
/// object with the same key twice is `400 duplicate_key` — a proxy or an
/// audit reading the first of two `role`s must see the request we act on.
pub(crate) fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    let malformed = |e: serde_json::Error| {
        if let Some(key) = e.to_string().strip_prefix(DUPLICATE) {
            let key = key.split(" at line").next().unwrap_or("");
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "duplicate_key",
                format!("an object holds the key `{key}` twice"),
            );
        }
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!(
                "body is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    };
    let strict: Strict = serde_json::from_slice(body).map_err(malformed)?;
    Ok(strict.0)
}

const DUPLICATE: &str = "duplicate key ";

/// A JSON value whose objects refuse a repeated key.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                let shown: String = if key.len() <= 64
                    && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    key
                } else {
                    "(a key)".into()
                };
                return Err(serde::de::Error::custom(format!("{DUPLICATE}{shown}")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    /// Workflow kind, e.g. `dispatch`.
    kind: String,
    /// Business key, unique per tenant and kind (1..=200 characters).
    key: String,
    /// The kind's start input.
    #[serde(default)]
    #[schema(value_type = Object)]
    input: Value,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SignalRequest {
    /// Signal name, e.g. `claim`.
    name: String,
    /// The signal's payload.
    #[serde(default)]
    #[schema(value_type = Object)]
    payload: Value,
}

#[derive(Deserialize)]
struct WaitQuery {
    wait_ms: Option<u64>,
}

impl WaitQuery {
    /// Parse `?wait_ms=N` ourselves so a bad value gets our JSON error.
    fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let mut wait_ms = None;
        for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == "wait_ms" {
                let ms = v.parse::<u64>().ok().filter(|ms| *ms <= MAX_WAIT_MS).ok_or_else(|| {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_wait", format!("wait_ms must be a whole number of milliseconds, at most {MAX_WAIT_MS}"))
                })?;
                wait_ms = Some(ms);
            }
        }
        Ok(WaitQuery { wait_ms })
    }
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > 200 || key.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_key",
            "key must be 1..=200 printable characters",
        ));
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/workflows", tag = "workflows", request_body = StartRequest, security(("bearer" = [])), responses((status = 201, description = "Started", body = serde_json::Value), (status = 200, description = "Already started with this key and the same input", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn start_workflow(
    State(st): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: StartRequest = parse_body(&body)?;
    check_key(&req.key)?;
    let (row, created) = st
        .engine
        .start(
            &caller.actor(),
            caller.0.tenant_id,
            &req.kind,
            &req.key,
            &req.input,
        )
        .await?;
    let view = workflow_view(&st, &caller, row).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

#[utoipa::path(get, path = "/v1/workflows/{kind}/{key}", tag = "workflows", params(("kind" = String, Path, description = "Workflow kind"), ("key" = String, Path, description = "Business key (1..=200 characters)")), security(("bearer" = [])), responses((status = 200, description = "The workflow as the caller's role may see it", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn get_workflow(
    State(st): State<ApiState>,
    caller: Caller,
    Path((kind, key)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    check_key(&key)?;
    let mut conn = st.engine.pool().acquire().await?;
    let row = wf_store::find(&mut conn, caller.0.tenant_id, &kind, &key)
        .await?
        .ok_or(EngineError::NotFound)?;
    drop(conn);
    Ok(Json(workflow_view(&st, &caller, row).await?))
}

async fn workflow_view(
    st: &ApiState,
    caller: &Caller,
    row: wf_store::WorkflowRow,
) -> Result<Value, ApiError> {
    let mut conn = st.engine.pool().acquire().await?;
    let history = wf_store::history(&mut conn, row.tenant_id, row.id).await?;
    let timers = timers::pending(&mut conn, row.tenant_id, row.id).await?;
    let effects = effects::of_workflow(&mut conn, row.tenant_id, row.id).await?;
    let mut view = serde_json::to_value(&row).expect("serializes");
    if caller.0.role == Role::Executor {
        // Executors see where the job stands and who holds it, nothing else.
        let claimed_by = row
            .state
            .pointer("/claim/claimed_by")
            .cloned()
            .unwrap_or(Value::Null);
        return Ok(json!({
            "id": row.id, "kind": row.kind, "key": row.key, "state": row.state_name,
            "status": row.status, "version": row.version, "claimed_by": claimed_by,
            "created_at": row.created_at, "updated_at": row.updated_at,
        }));
    }
    view["pending_timers"] = json!(timers);
    view["effects"] = json!(effects);
    view["history"] = json!(history);
    // The start input (a FullLead) and the messages sent carry personal data:
    // the business's operators only; ops see the runtime view without them.
    if caller.0.role == Role::Operator {
        view["input"] = wf_store::input(&mut conn, row.tenant_id, row.id)
            .await?
            .unwrap_or(Value::Null);
        view["deliveries"] = json!(effects::deliveries_of(&mut conn, row.tenant_id, row.id).await?);
    }
    Ok(view)
}

#[utoipa::path(post, path = "/v1/workflows/{kind}/{key}/signals", tag = "workflows", params(("kind" = String, Path, description = "Workflow kind"), ("key" = String, Path, description = "Business key"), ("Idempotency-Key" = String, Header, description = "One key per intended signal (1..=255 characters)"), ("wait_ms" = Option<u64>, Query, description = "Wait up to this long (≤ 30000) for the outcome")), request_body = SignalRequest, security(("bearer" = [])), responses((status = 200, description = "Decided: applied or rejected", body = serde_json::Value), (status = 202, description = "Accepted and queued durably", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn send_signal(
    State(st): State<ApiState>,
    caller: Caller,
    Path((kind, key)): Path<(String, String)>,
    RawQuery(raw_query): RawQuery,
    IdempotencyKey(idem): IdempotencyKey,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_key(&key)?;
    let q = WaitQuery::parse(raw_query.as_deref())?;
    let req: SignalRequest = parse_body(&body)?;
    let actor = caller.actor();
    let signal = SignalIn::new(
        caller.0.tenant_id,
        &kind,
        &key,
        &idem,
        &req.name,
        &req.payload,
        &actor,
    )
    .awaited(q.wait_ms.is_some_and(|ms| ms > 0));
    // A caller that waits is woken by the pumps' NOTIFY as its signal is
    // applied. Applying it in this request's own transaction instead (a
    // fast lane, tried) measured slower: eight round trips per request
    // against one, on the same two cores as the pumps (ops/BENCHMARKS.md).
    let answer = st.engine.signal(signal).await?;
    let answer = match q.wait_ms {
        Some(ms) if answer.status == "queued" && ms > 0 => {
            wait_for(&st, caller.0.tenant_id, answer, Duration::from_millis(ms)).await?
        }
        _ => answer,
    };
    let status = if answer.status == "queued" {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(answer)).into_response())
}

/// Wait for a signal's outcome, woken by LISTEN/NOTIFY (with a slow re-check
/// in case the listener reconnected and missed one).
async fn wait_for(
    st: &ApiState,
    tenant_id: Uuid,
    first: SignalAnswer,
    wait: Duration,
) -> Result<SignalAnswer, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Registered before looking, so an outcome cannot slip between.
        let mut waiting = st.applied.register(first.signal_id);
        let current = st.engine.signal_answer(tenant_id, first.signal_id).await?;
        if current.status != "queued" || tokio::time::Instant::now() >= deadline {
            return Ok(current);
        }
        let recheck = tokio::time::Instant::now() + Duration::from_secs(2);
        waiting.until(deadline.min(recheck)).await;
    }
}

/// `caller` must hold one of `roles` to `what` (403 `forbidden`).
pub fn require(caller: &Caller, roles: &[Role], what: &str) -> Result<(), ApiError> {
    if roles.contains(&caller.0.role) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("role `{}` may not {what}", caller.0.role.as_str()),
        ))
    }
}

/// Every mutating ops or owner action needs a reason (1..=500 printable
/// characters; 400 `reason_required`).
pub fn reason_of(body: &Value) -> Result<String, ApiError> {
    use workflows::text::{check, TextKind};
    body.get("reason")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|r| check(r, TextKind::Line, 500).is_ok())
        .map(str::to_string)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "reason_required",
                "a `reason` (1..=500 printable characters) is required",
            )
        })
}

/// An id a caller chooses (drivers, sitters, clients): 1..=64 letters,
/// digits and `_.-`, starting with a letter or digit.
pub fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    id.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// The runtime's own routes: start a workflow, read it, signal it. The API
/// surface (the `api` module) merges them with the products' and ops' routes.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(start_workflow))
        .routes(routes!(get_workflow))
        .routes(routes!(send_signal))
}
