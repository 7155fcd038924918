//! The ops API: find stuck workflows, understand them, and fix them — every
//! mutating action with a reason, recorded in the audit log (who, what, why,
//! when, state before) and, through the engine, in the workflow's history.
//!
//! Roles: `ops` may do everything for its tenant; `operator` may list, show,
//! send signals by hand and cancel (its tenant's business actions).

use crate::engine::SignalIn;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::PgConnection;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;
use workflows::{Actor, Role};

use crate::http::{parse_body, ApiError, ApiState, Caller};
use crate::http::{reason_of, require, IdempotencyKey};
use crate::store::jobs::{self, ApplyJob, EffectJob};
use crate::store::{audit, effects, timers, workflows as wf_store};

/// A timer this far past due counts as overdue (stuck).
const TIMER_OVERDUE_S: f64 = 60.0;

fn not_found(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such {what}"),
    )
}

// ---- list and show ----

#[derive(Default)]
struct ListQuery {
    kind: Option<String>,
    state: Option<String>,
    status: Option<String>,
    stuck: bool,
    updated_before: Option<DateTime<Utc>>,
    updated_after: Option<DateTime<Utc>>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
}

fn bad_query(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message)
}

impl ListQuery {
    fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let mut q = ListQuery {
            limit: 50,
            ..Default::default()
        };
        let time = |v: &str| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| bad_query("times are RFC 3339"))
        };
        for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "kind" => q.kind = Some(v.into_owned()),
                "state" => q.state = Some(v.into_owned()),
                "status" => q.status = Some(v.into_owned()),
                "stuck" => q.stuck = v == "true",
                "updated_before" => q.updated_before = Some(time(&v)?),
                "updated_after" => q.updated_after = Some(time(&v)?),
                "limit" => {
                    q.limit = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=500).contains(n))
                        .ok_or_else(|| bad_query("limit is 1..=500"))?
                }
                "after" => {
                    let (t, id) = v.split_once('~').ok_or_else(|| {
                        bad_query("after is the `next` cursor of a previous page")
                    })?;
                    q.after = Some((time(t)?, id.parse().map_err(|_| bad_query("bad cursor"))?));
                }
                other => return Err(bad_query(format!("unknown parameter `{other}`"))),
            }
        }
        Ok(q)
    }
}

/// The per-state deadlines the workflows declare, as three parallel arrays
/// (kind, state, seconds) for an `unnest` join.
pub(crate) fn stuck_deadlines(
    registry: &workflows::Registry,
) -> (Vec<String>, Vec<String>, Vec<f64>) {
    let (mut kinds, mut states, mut secs) = (Vec::new(), Vec::new(), Vec::new());
    for kind in registry.kinds() {
        for (state, s) in registry.get(kind).map(|w| w.stuck_after()).unwrap_or(&[]) {
            kinds.push(kind.to_string());
            states.push(state.to_string());
            secs.push(*s as f64);
        }
    }
    (kinds, states, secs)
}

/// Why a workflow counts as stuck.
fn stuck_reasons(effect_dead: bool, timer_overdue: bool, no_progress: bool) -> Vec<&'static str> {
    [
        (effect_dead, "effect_dead"),
        (timer_overdue, "timer_overdue"),
        (no_progress, "no_progress"),
    ]
    .into_iter()
    .filter_map(|(on, why)| on.then_some(why))
    .collect()
}

type ListRow = (
    Uuid,
    String,
    String,
    String,
    String,
    DateTime<Utc>,
    Option<String>,
    bool,
    bool,
    bool,
);

#[utoipa::path(get, path = "/v1/ops/workflows", tag = "ops", params(("kind" = Option<String>, Query), ("state" = Option<String>, Query), ("status" = Option<String>, Query, description = "running, completed, cancelled"), ("stuck" = Option<bool>, Query, description = "Only stuck workflows"), ("updated_before" = Option<String>, Query, format = DateTime), ("updated_after" = Option<String>, Query, format = DateTime), ("after" = Option<String>, Query, description = "The `next` cursor of the previous page"), ("limit" = Option<i64>, Query, minimum = 1, maximum = 500)), security(("bearer" = [])), responses((status = 200, description = "A page of workflows, each with why it is stuck", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn list(
    State(st): State<ApiState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    require(&caller, &[Role::Ops, Role::Operator], "list workflows")?;
    let q = ListQuery::parse(raw.as_deref())?;
    let (kinds, states, secs) = stuck_deadlines(st.engine.registry());
    let (after_t, after_id) = q.after.map_or((None, None), |(t, id)| (Some(t), Some(id)));
    let rows: Vec<ListRow> = sqlx::query_as(
        "select * from (
           select w.id, w.kind, w.key, w.state_name, w.status, w.updated_at, w.attention,
                  exists (select 1 from effects e where e.tenant_id = w.tenant_id and e.workflow_id = w.id and e.status = 'dead')
                    as effect_dead,
                  exists (select 1 from timers t where t.tenant_id = w.tenant_id and t.workflow_id = w.id and t.status = 'pending'
                          and t.due_at < now() - make_interval(secs => $13)) as timer_overdue,
                  coalesce(w.status = 'running' and w.updated_at < now() - make_interval(secs => d.secs), false) as no_progress
           from workflows w
           left join unnest($2::text[], $3::text[], $4::float8[]) as d(kind, state, secs)
             on d.kind = w.kind and d.state = w.state_name
           where w.tenant_id = $1
             and ($5::text is null or w.kind = $5) and ($6::text is null or w.state_name = $6)
             and ($7::text is null or w.status = $7)
             and ($8::timestamptz is null or w.updated_at < $8) and ($9::timestamptz is null or w.updated_at > $9)
             and ($10::timestamptz is null or (w.updated_at, w.id) > ($10, $11))
           order by w.updated_at, w.id) x
         where not $12 or x.effect_dead or x.timer_overdue or x.no_progress
         order by updated_at, id
         limit $14",
    )
    .bind(caller.0.tenant_id)
    .bind(&kinds)
    .bind(&states)
    .bind(&secs)
    .bind(&q.kind)
    .bind(&q.state)
    .bind(&q.status)
    .bind(q.updated_before)
    .bind(q.updated_after)
    .bind(after_t)
    .bind(after_id)
    .bind(q.stuck)
    .bind(TIMER_OVERDUE_S)
    .bind(q.limit)
    .fetch_all(st.engine.pool())
    .await?;
    let next = (rows.len() as i64 == q.limit)
        .then(|| rows.last().map(|r| format!("{}~{}", r.5.to_rfc3339(), r.0)))
        .flatten();
    let items: Vec<Value> = rows
        .into_iter()
        .map(
            |(id, kind, key, state, status, updated_at, attention, dead, overdue, stale)| {
                json!({
                    "id": id, "kind": kind, "key": key, "state": state, "status": status,
                    "updated_at": updated_at, "attention": attention,
                    "stuck": stuck_reasons(dead, overdue, stale),
                })
            },
        )
        .collect();
    Ok(Json(json!({ "items": items, "next": next })))
}

async fn load(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<wf_store::WorkflowRow, ApiError> {
    let row: Option<(String, String)> =
        sqlx::query_as("select kind, key from workflows where tenant_id = $1 and id = $2")
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    let (kind, key) = row.ok_or_else(|| not_found("workflow"))?;
    wf_store::find(conn, tenant_id, &kind, &key)
        .await?
        .ok_or_else(|| not_found("workflow"))
}

#[utoipa::path(get, path = "/v1/ops/workflows/{id}", tag = "ops", params(("id" = Uuid, Path, description = "Workflow id")), security(("bearer" = [])), responses((status = 200, description = "State, history, timers, effects, audit; personal data left out", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn show(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<Value>, ApiError> {
    require(&caller, &[Role::Ops, Role::Operator], "inspect workflows")?;
    let mut conn = st.engine.pool().acquire().await?;
    let row = load(&mut conn, caller.0.tenant_id, id).await?;
    // State holds no personal data by design; the start input and the sent
    // messages (which do) are left out here.
    let mut view = serde_json::to_value(&row).expect("serializes");
    view["history"] = json!(wf_store::history(&mut conn, row.tenant_id, row.id).await?);
    view["pending_timers"] = json!(timers::pending(&mut conn, row.tenant_id, row.id).await?);
    // Effects without payloads and results: those can hold a sender's phone
    // (a chat reply's origin) or an executor's address (a release's chat id).
    let effects: Vec<Value> = effects::of_workflow(&mut conn, row.tenant_id, row.id)
        .await?
        .into_iter()
        .map(|e| {
            json!({ "id": e.id, "name": e.name, "idempotency_key": e.idempotency_key, "status": e.status,
                    "attempts": e.attempts, "max_attempts": e.max_attempts, "last_error": e.last_error,
                    "next_attempt_at": e.next_attempt_at, "created_at": e.created_at, "updated_at": e.updated_at })
        })
        .collect();
    view["effects"] = json!(effects);
    if let Some(wf) = st.engine.registry().get(&row.kind) {
        // The definition's graph (for the console's diagram) and where ops may
        // force this workflow from its current state.
        let edges: Vec<Value> = wf
            .edges()
            .iter()
            .map(|(from, to, label)| json!({ "from": from, "to": to, "label": label }))
            .collect();
        let mut targets: Vec<&str> = wf
            .edges()
            .iter()
            .flat_map(|(from, to, _)| [*from, *to])
            .filter(|s| matches!(wf.force_signal(&row.state, &row.state_name, s), Ok(Some(_))))
            .collect();
        targets.sort_unstable();
        targets.dedup();
        view["diagram"] = json!({ "edges": edges, "mermaid": workflows::mermaid(wf.edges()) });
        view["force_targets"] = json!(targets);
    }
    if caller.0.role == Role::Ops {
        view["audit"] = json!(audit_rows(&mut conn, caller.0.tenant_id, Some(id), None).await?);
    }
    Ok(Json(view))
}

// ---- actions ----

/// The workflow an ops action is about.
struct Target<'a> {
    workflow_id: Uuid,
    kind: &'a str,
    state: &'a str,
}

/// Give a dead effect a fresh allowance of attempts and a job, clear the
/// workflow's attention when it has no other dead effect, and audit it.
/// `None` when the effect is not dead (or not this workflow's). Its key still
/// keeps it from sending what already went out.
async fn revive(
    tx: &mut PgConnection,
    st: &ApiState,
    caller: &Caller,
    target: &Target<'_>,
    effect_id: Uuid,
    reason: &str,
    mut detail: Value,
) -> Result<Option<Uuid>, ApiError> {
    let revived: Option<(i32, String)> = sqlx::query_as(
        "update effects set status = 'pending', next_attempt_at = now(), send_after = null,
                max_attempts = attempts + $4, updated_at = now()
         where tenant_id = $1 and workflow_id = $2 and id = $3 and status = 'dead'
         returning attempts, name",
    )
    .bind(caller.0.tenant_id)
    .bind(target.workflow_id)
    .bind(effect_id)
    .bind(st.engine.config().effect_max_attempts)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((attempts, name)) = revived else {
        return Ok(None);
    };
    let job = EffectJob {
        tenant_id: caller.0.tenant_id,
        effect_id,
        after_attempts: Some(attempts),
    };
    let key = format!("ops:{effect_id}:{attempts}:{}", Uuid::now_v7());
    jobs::enqueue_effect(&mut *tx, target.kind, &job, None, Some(key)).await?;
    sqlx::query(
        "update workflows set attention = null where tenant_id = $1 and id = $2 and attention like '%dead-lettered'
           and not exists (select 1 from effects where tenant_id = $1 and workflow_id = $2 and status = 'dead')",
    )
    .bind(caller.0.tenant_id)
    .bind(target.workflow_id)
    .execute(&mut *tx)
    .await?;
    detail["effect_id"] = json!(effect_id);
    let id = audit::record(
        tx,
        &caller.0,
        "retry_effect",
        Some(target.workflow_id),
        Some(&name),
        reason,
        Some(target.state),
        detail,
    )
    .await?;
    Ok(Some(id))
}

#[utoipa::path(post, path = "/v1/ops/workflows/{id}/effects/{effect_id}/retry", tag = "ops", params(("id" = Uuid, Path, description = "Workflow id"), ("effect_id" = Uuid, Path)), request_body = crate::openapi::ReasonBody, security(("bearer" = [])), responses((status = 200, description = "Queued again", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn retry_effect(
    State(st): State<ApiState>,
    caller: Caller,
    Path((id, effect_id)): Path<(Uuid, Uuid)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    require(&caller, &[Role::Ops], "retry effects")?;
    let reason = reason_of(&parse_body(&body)?)?;
    let mut tx = st.engine.pool().begin().await?;
    let row = load(&mut tx, caller.0.tenant_id, id).await?;
    let target = Target {
        workflow_id: id,
        kind: &row.kind,
        state: &row.state_name,
    };
    let Some(audit_id) = revive(
        &mut tx,
        &st,
        &caller,
        &target,
        effect_id,
        &reason,
        json!({}),
    )
    .await?
    else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_dead",
            "only a dead-lettered effect of this workflow can be retried",
        ));
    };
    tx.commit().await?;
    Ok(Json(
        json!({ "status": "queued", "effect_id": effect_id, "audit_id": audit_id }),
    ))
}

#[utoipa::path(post, path = "/v1/ops/workflows/{id}/timers/{timer_id}/fire", tag = "ops", params(("id" = Uuid, Path, description = "Workflow id"), ("timer_id" = Uuid, Path)), request_body = crate::openapi::ReasonBody, security(("bearer" = [])), responses((status = 200, description = "The timer fires now", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn fire_timer(
    State(st): State<ApiState>,
    caller: Caller,
    Path((id, timer_id)): Path<(Uuid, Uuid)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    require(&caller, &[Role::Ops], "fire timers")?;
    let reason = reason_of(&parse_body(&body)?)?;
    let mut tx = st.engine.pool().begin().await?;
    let row = load(&mut tx, caller.0.tenant_id, id).await?;
    let fired: Option<(String,)> = sqlx::query_as(
        "update timers set fire_now = true, enqueued_at = now()
         where tenant_id = $1 and workflow_id = $2 and id = $3 and status = 'pending' returning name",
    )
    .bind(caller.0.tenant_id)
    .bind(id)
    .bind(timer_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((name,)) = fired else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_pending",
            "only a pending timer of this workflow can be fired",
        ));
    };
    let job = ApplyJob {
        tenant_id: caller.0.tenant_id,
        workflow_id: id,
    };
    jobs::enqueue_apply(
        &mut tx,
        &row.kind,
        &job,
        Some(format!("ops:tmr:{timer_id}")),
    )
    .await?;
    let audit_id = audit::record(
        &mut tx,
        &caller.0,
        "fire_timer",
        Some(id),
        Some(&name),
        &reason,
        Some(&row.state_name),
        json!({ "timer_id": timer_id }),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(
        json!({ "status": "queued", "timer_id": timer_id, "audit_id": audit_id }),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SignalBody {
    name: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    payload: Value,
    /// Why (1..=500 printable characters); audited. Read through `reason_of`,
    /// which is checked before the body's shape.
    reason: String,
}

#[allow(clippy::too_many_arguments)]
async fn send(
    st: &ApiState,
    caller: &Caller,
    id: Uuid,
    name: &str,
    payload: &Value,
    reason: &str,
    idem: &str,
    action: &str,
) -> Result<Value, ApiError> {
    // The signal and its audit entry commit together; a replay of the
    // Idempotency-Key audits nothing new.
    let mut tx = st.engine.pool().begin().await?;
    let row = load(&mut tx, caller.0.tenant_id, id).await?;
    let actor = Actor {
        role: caller.0.role,
        subject: Some(audit::actor_name(&caller.0)),
    };
    // Ops may send any signal (system ones too: an audited override);
    // operators only what their role may send anyway.
    let enforce_roles = caller.0.role != Role::Ops;
    let (answer, new) = st
        .engine
        .signal_in(
            &mut tx,
            SignalIn::new(
                caller.0.tenant_id,
                &row.kind,
                &row.key,
                idem,
                name,
                payload,
                &actor,
            )
            .roles_checked(enforce_roles),
        )
        .await?;
    let audit_id = if new {
        let detail = json!({ "signal_id": answer.signal_id, "signal": name });
        Some(
            audit::record(
                &mut tx,
                &caller.0,
                action,
                Some(id),
                Some(name),
                reason,
                Some(&row.state_name),
                detail,
            )
            .await?,
        )
    } else {
        None
    };
    tx.commit().await?;
    Ok(json!({ "signal_id": answer.signal_id, "status": answer.status, "audit_id": audit_id }))
}

/// Ops actions' keys live in their own namespace beside integrations' keys.
fn ops_key(IdempotencyKey(k): IdempotencyKey) -> String {
    format!("ops:{k}")
}

#[utoipa::path(post, path = "/v1/ops/workflows/{id}/signals", tag = "ops", params(("id" = Uuid, Path, description = "Workflow id"), ("Idempotency-Key" = String, Header, description = "One key per intended action")), request_body = SignalBody, security(("bearer" = [])), responses((status = 202, description = "Signal queued (audited)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn signal(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    idem: IdempotencyKey,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(
        &caller,
        &[Role::Ops, Role::Operator],
        "send signals by hand",
    )?;
    let raw: Value = parse_body(&body)?;
    let reason = reason_of(&raw)?;
    let b: SignalBody = serde_json::from_value(raw).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            e.to_string(),
        )
    })?;
    let out = send(
        &st,
        &caller,
        id,
        &b.name,
        &b.payload,
        &reason,
        &ops_key(idem),
        "signal",
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(out)).into_response())
}

#[utoipa::path(post, path = "/v1/ops/workflows/{id}/cancel", tag = "ops", params(("id" = Uuid, Path, description = "Workflow id"), ("Idempotency-Key" = String, Header, description = "One key per intended action")), request_body = crate::openapi::ReasonBody, security(("bearer" = [])), responses((status = 202, description = "Cancel queued (audited)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn cancel(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    idem: IdempotencyKey,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&caller, &[Role::Ops, Role::Operator], "cancel workflows")?;
    let reason = reason_of(&parse_body(&body)?)?;
    let out = send(
        &st,
        &caller,
        id,
        "cancel",
        &json!({ "reason": reason }),
        &reason,
        &ops_key(idem),
        "cancel",
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(out)).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ForceBody {
    state: String,
    reason: String,
}

/// Force a workflow along an edge its definition declares (and allows
/// forcing), by sending that edge's signal as an audited ops override.
#[utoipa::path(post, path = "/v1/ops/workflows/{id}/force", tag = "ops", params(("id" = Uuid, Path, description = "Workflow id"), ("Idempotency-Key" = String, Header, description = "One key per intended action")), request_body = ForceBody, security(("bearer" = [])), responses((status = 202, description = "Forced transition queued (audited)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn force(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    idem: IdempotencyKey,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&caller, &[Role::Ops], "force transitions")?;
    let raw: Value = parse_body(&body)?;
    let reason = reason_of(&raw)?;
    let b: ForceBody = serde_json::from_value(raw).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            e.to_string(),
        )
    })?;
    let idem = ops_key(idem);
    let mut conn = st.engine.pool().acquire().await?;
    let row = load(&mut conn, caller.0.tenant_id, id).await?;
    drop(conn);
    let wf = st
        .engine
        .registry()
        .get(&row.kind)
        .ok_or_else(|| not_found("workflow kind"))?;
    let (signal, payload) = wf
        .force_signal(&row.state, &row.state_name, &b.state)
        .map_err(crate::engine::EngineError::from)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "undeclared_target",
                format!(
                    "`{}` is not a state `{}` may be forced into from `{}`",
                    b.state, row.kind, row.state_name
                ),
            )
        })?;
    let mut out = send(&st, &caller, id, signal, &payload, &reason, &idem, "force").await?;
    out["target"] = json!(b.state);
    Ok((StatusCode::ACCEPTED, Json(out)).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct BulkRetry {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    effect: Option<String>,
    #[serde(default)]
    dry_run: bool,
    reason: String,
}

/// Retry every dead effect matching a filter; with `dry_run`, only count them.
#[utoipa::path(post, path = "/v1/ops/effects/retry", tag = "ops", request_body = BulkRetry, security(("bearer" = [])), responses((status = 200, description = "How many dead effects matched (and were retried unless dry_run)", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn bulk_retry(
    State(st): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    require(&caller, &[Role::Ops], "retry effects")?;
    let raw: Value = parse_body(&body)?;
    let reason = reason_of(&raw)?;
    let b: BulkRetry = serde_json::from_value(raw).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            e.to_string(),
        )
    })?;
    let dead: Vec<(Uuid, Uuid, String, String)> = sqlx::query_as(
        "select e.workflow_id, e.id, w.kind, w.state_name from effects e
         join workflows w on w.tenant_id = e.tenant_id and w.id = e.workflow_id
         where e.tenant_id = $1 and e.status = 'dead' and ($2::text is null or w.kind = $2) and ($3::text is null or e.name = $3)
         order by e.updated_at limit 10000",
    )
    .bind(caller.0.tenant_id)
    .bind(&b.kind)
    .bind(&b.effect)
    .fetch_all(st.engine.pool())
    .await?;
    if b.dry_run {
        return Ok(Json(json!({ "dry_run": true, "matched": dead.len() })));
    }
    let mut tx = st.engine.pool().begin().await?;
    let mut retried = 0;
    for (workflow_id, effect_id, kind, state) in &dead {
        let target = Target {
            workflow_id: *workflow_id,
            kind,
            state,
        };
        if revive(
            &mut tx,
            &st,
            &caller,
            &target,
            *effect_id,
            &reason,
            json!({ "bulk": true }),
        )
        .await?
        .is_some()
        {
            retried += 1;
        }
    }
    tx.commit().await?;
    Ok(Json(
        json!({ "dry_run": false, "matched": dead.len(), "retried": retried }),
    ))
}

// ---- audit ----

type AuditRow = (
    Uuid,
    DateTime<Utc>,
    String,
    Option<String>,
    String,
    Option<Uuid>,
    Option<String>,
    String,
    Option<String>,
    Value,
);

async fn audit_rows(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    workflow_id: Option<Uuid>,
    actor: Option<&str>,
) -> Result<Vec<Value>, sqlx::Error> {
    let rows: Vec<AuditRow> = sqlx::query_as(
        "select id, at, actor_role, actor_subject, action, workflow_id, target, reason, before_state, detail from audit_log
         where tenant_id = $1 and ($2::uuid is null or workflow_id = $2) and ($3::text is null or actor_subject = $3)
         order by at desc limit 500",
    )
    .bind(tenant_id)
    .bind(workflow_id)
    .bind(actor)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, at, role, subject, action, wf, target, reason, before, detail)| {
            json!({ "id": id, "at": at, "actor_role": role, "actor": subject, "action": action, "workflow_id": wf,
                    "target": target, "reason": reason, "before_state": before, "detail": detail })
        })
        .collect())
}

#[utoipa::path(get, path = "/v1/ops/audit", tag = "ops", params(("workflow_id" = Option<Uuid>, Query), ("actor" = Option<String>, Query)), security(("bearer" = [])), responses((status = 200, description = "Audit entries, newest first", body = serde_json::Value), crate::openapi::ClientErrors))]
async fn audit_log(
    State(st): State<ApiState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    require(&caller, &[Role::Ops], "read the audit log")?;
    let (mut workflow, mut actor) = (None, None);
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "workflow_id" => {
                workflow = Some(
                    v.parse::<Uuid>()
                        .map_err(|_| bad_query("workflow_id is a UUID"))?,
                )
            }
            "actor" => actor = Some(v.into_owned()),
            other => return Err(bad_query(format!("unknown parameter `{other}`"))),
        }
    }
    let mut conn = st.engine.pool().acquire().await?;
    Ok(Json(
        json!({ "items": audit_rows(&mut conn, caller.0.tenant_id, workflow, actor.as_deref()).await? }),
    ))
}

/// The ops routes.
pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show))
        .routes(routes!(retry_effect))
        .routes(routes!(fire_timer))
        .routes(routes!(signal))
        .routes(routes!(cancel))
        .routes(routes!(force))
        .routes(routes!(bulk_retry))
        .routes(routes!(audit_log))
}
