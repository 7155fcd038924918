//! The effect outbox and the log channel's deliveries.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// An effect row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EffectRow {
    /// Effect id.
    pub id: Uuid,
    /// Tenant.
    #[serde(skip)]
    pub tenant_id: Uuid,
    /// Workflow.
    pub workflow_id: Uuid,
    /// Effect name.
    pub name: String,
    /// Idempotency key.
    pub idempotency_key: String,
    /// Payload (references only, no personal data).
    pub payload: Value,
    /// Signal the result comes back as.
    pub reply: Option<String>,
    /// `pending`, `running`, `delivered` or `dead`.
    pub status: String,
    /// Attempts so far (the fencing token of the current attempt).
    pub attempts: i32,
    /// Attempts before dead-lettering.
    pub max_attempts: i32,
    /// When the next attempt may run.
    pub next_attempt_at: DateTime<Utc>,
    /// Last error (classified, never personal data).
    pub last_error: Option<String>,
    /// Channel result.
    pub result: Option<Value>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Updated.
    pub updated_at: DateTime<Utc>,
    /// A rate-limit slot reserved by a deferred attempt.
    pub send_after: Option<DateTime<Utc>>,
}

impl EffectRow {
    /// A stand-in for a one-off send outside any workflow (e.g. a reply to an
    /// unknown chat sender): only the tenant and idempotency key matter.
    pub fn direct(tenant_id: Uuid, key: &str) -> Self {
        let epoch = DateTime::<Utc>::UNIX_EPOCH;
        EffectRow {
            id: Uuid::nil(),
            tenant_id,
            workflow_id: Uuid::nil(),
            name: "direct_reply".into(),
            idempotency_key: key.to_string(),
            payload: Value::Object(Default::default()),
            reply: None,
            status: "running".into(),
            attempts: 1,
            max_attempts: 1,
            next_attempt_at: epoch,
            last_error: None,
            result: None,
            created_at: epoch,
            updated_at: epoch,
            send_after: None,
        }
    }
}

const COLS: &str = "id, tenant_id, workflow_id, name, idempotency_key, payload, reply, status, attempts, max_attempts, next_attempt_at, last_error, result, created_at, updated_at, send_after";

/// Insert an effect; `None` if its key exists for the workflow.
#[allow(clippy::too_many_arguments)]
pub async fn insert(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    workflow_id: Uuid,
    name: &str,
    key: &str,
    payload: &Value,
    reply: Option<&str>,
    max_attempts: i32,
) -> Result<Option<Uuid>, sqlx::Error> {
    let r: Option<(Uuid,)> = sqlx::query_as(
        "insert into effects (tenant_id, id, workflow_id, name, idempotency_key, payload, reply, max_attempts)
         values ($1, $2, $3, $4, $5, $6, $7, $8)
         on conflict (tenant_id, workflow_id, idempotency_key) do nothing returning id",
    )
    .bind(tenant_id)
    .bind(Uuid::now_v7())
    .bind(workflow_id)
    .bind(name)
    .bind(key)
    .bind(payload)
    .bind(reply)
    .bind(max_attempts)
    .fetch_optional(conn)
    .await?;
    Ok(r.map(|r| r.0))
}

/// Claim a pending effect for one attempt: `running`, attempts + 1, leased.
/// With `after_attempts` (the attempts made when the job was enqueued) only
/// that next attempt may be claimed, and not before its backoff ends: a
/// duplicate job (lost ack, orphan re-enqueue, sweep) can neither double-claim
/// nor jump the backoff. `None` when there is nothing to claim.
pub async fn claim(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
    lease_ms: i64,
    after_attempts: Option<i32>,
) -> Result<Option<EffectRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "update effects set status = 'running', attempts = attempts + 1,
                lease_until = now() + make_interval(secs => $3 / 1000.0), updated_at = now()
         where tenant_id = $1 and id = $2 and status = 'pending'
           and ($4::int is null or (attempts = $4 and next_attempt_at <= clock_timestamp()))
         returning {COLS}"
    )))
    .bind(tenant_id)
    .bind(id)
    .bind(lease_ms as f64)
    .bind(after_attempts)
    .fetch_optional(conn)
    .await
}

/// Claim up to `limit` due effects of `kinds` for one attempt each, in one
/// statement (`SKIP LOCKED`: another loop has the rest): `running`, attempts +
/// 1, leased for `lease_ms`. Oldest due first.
pub async fn claim_due(
    conn: &mut PgConnection,
    kinds: &[String],
    limit: i64,
    lease_ms: i64,
) -> Result<Vec<EffectRow>, sqlx::Error> {
    let cols = COLS
        .split(", ")
        .map(|c| format!("e.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "with due as (
             select x.tenant_id, x.id from effects x
             join workflows w on w.tenant_id = x.tenant_id and w.id = x.workflow_id
             where x.status = 'pending' and x.next_attempt_at <= statement_timestamp()
               and w.kind = any($1)
             order by x.next_attempt_at limit $2
             for update of x skip locked)
         update effects e set status = 'running', attempts = e.attempts + 1,
                lease_until = now() + make_interval(secs => $3 / 1000.0), updated_at = now()
         from due where e.tenant_id = due.tenant_id and e.id = due.id
         returning {cols}"
    )))
    .bind(kinds)
    .bind(limit)
    .bind(lease_ms as f64)
    .fetch_all(conn)
    .await
}

/// NOTIFY channel poked when an effect is written or re-scheduled (payload:
/// the workflow kind); the pumps wake on it. Defined here, in the
/// lowest layer that sends it.
pub const EFFECT_QUEUED_CHANNEL: &str = "dispatch_effect_queued";

/// Wake the pumps for a new or re-scheduled effect of `kind`
/// (delivered at commit).
pub async fn wake_runners(conn: &mut PgConnection, kind: &str) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_notify($1, $2)")
        .bind(EFFECT_QUEUED_CHANNEL)
        .bind(kind)
        .execute(conn)
        .await?;
    Ok(())
}

/// Mark delivered, fenced on the attempt that was claimed.
pub async fn delivered(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
    attempt: i32,
    result: &Value,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "update effects set status = 'delivered', result = $4, lease_until = null, last_error = null, updated_at = now()
         where tenant_id = $1 and id = $2 and status = 'running' and attempts = $3",
    )
    .bind(tenant_id)
    .bind(id)
    .bind(attempt)
    .bind(result)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// One delivered attempt for [`delivered_all`].
pub struct DeliveredAttempt<'a> {
    /// The attempt (its tenant, id and attempt number fence the write).
    pub effect: &'a EffectRow,
    /// What the channel reported.
    pub result: &'a Value,
    /// The log channel's ledger row to write with it: (recipient, body).
    pub log: Option<(&'a str, &'a str)>,
}

/// [`delivered`] for many attempts in one statement, each with its log
/// channel ledger row (written once per idempotency key; the message id
/// reported in the result is that row's, the first one's on a repeat), in
/// two statements.
/// Returns the ids of the effects recorded; a stale attempt is fenced off
/// and not among them.
pub async fn delivered_all(
    conn: &mut PgConnection,
    attempts: &[DeliveredAttempt<'_>],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let n = attempts.len();
    let (mut tenant, mut id, mut attempt, mut result) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut log_id, mut key, mut recipient, mut payload, mut body) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for a in attempts {
        let e = a.effect;
        tenant.push(e.tenant_id);
        id.push(e.id);
        attempt.push(e.attempts);
        result.push(a.result);
        log_id.push(a.log.map(|_| Uuid::now_v7()));
        key.push(e.idempotency_key.as_str());
        recipient.push(a.log.map(|l| l.0));
        payload.push(&e.payload);
        body.push(a.log.map(|l| l.1));
    }
    // Two statements: the ledger rows first, then the outcomes, whose
    // message ids are read by a statement of its own — its snapshot sees a
    // row another transaction committed while the insert waited on it.
    sqlx::query(
        "insert into deliveries (tenant_id, id, effect_id, channel, idempotency_key, recipient, payload, body)
         select tenant_id, log_id, id, 'log', key, recipient, payload, body
         from unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::jsonb[], $7::text[])
              u(tenant_id, id, log_id, key, recipient, payload, body)
         where log_id is not null
         on conflict (tenant_id, channel, idempotency_key) do nothing",
    )
    .bind(&tenant)
    .bind(&id)
    .bind(&log_id)
    .bind(&key)
    .bind(&recipient)
    .bind(&payload)
    .bind(&body)
    .execute(&mut *conn)
    .await?;
    let logged: Vec<bool> = log_id.iter().map(Option::is_some).collect();
    let rows: Vec<(Uuid,)> = sqlx::query_as(
        "with u as (
             select * from unnest($1::uuid[], $2::uuid[], $3::int4[], $4::jsonb[], $5::bool[], $6::text[])
                 u(tenant_id, id, attempt, result, logged, key)),
         msg as (
             select u.tenant_id, u.id, u.attempt,
                    case when not u.logged then u.result
                         else (case when jsonb_typeof(u.result) = 'object' then u.result else '{}'::jsonb end)
                              || jsonb_build_object('message_id',
                                     (select d.id from deliveries d where d.tenant_id = u.tenant_id
                                       and d.channel = 'log' and d.idempotency_key = u.key)::text) end as result
             from u)
         update effects e set status = 'delivered', result = msg.result, lease_until = null,
                last_error = null, updated_at = now()
         from msg
         where e.tenant_id = msg.tenant_id and e.id = msg.id and e.status = 'running' and e.attempts = msg.attempt
         returning e.id",
    )
    .bind(&tenant)
    .bind(&id)
    .bind(&attempt)
    .bind(&result)
    .bind(&logged)
    .bind(&key)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// Put back for a retry after `delay` (on the database clock), fenced on the
/// attempt. Returns when the retry is due, or `None` if fenced off.
pub async fn retry_after(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
    attempt: i32,
    delay: std::time::Duration,
    error: &str,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let r: Option<(DateTime<Utc>,)> = sqlx::query_as(
        "update effects set status = 'pending', next_attempt_at = clock_timestamp() + make_interval(secs => $4),
                send_after = null,
                last_error = $5, lease_until = null, updated_at = now()
         where tenant_id = $1 and id = $2 and status = 'running' and attempts = $3
         returning next_attempt_at",
    )
    .bind(tenant_id)
    .bind(id)
    .bind(attempt)
    .bind(delay.as_secs_f64())
    .bind(error)
    .fetch_optional(conn)
    .await?;
    Ok(r.map(|r| r.0))
}

/// Put back untried until a reserved rate-limit slot (`send_after`), to be
/// picked up from `wake`: the attempt does not count.
pub async fn defer(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
    attempt: i32,
    wake: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "update effects set status = 'pending', attempts = attempts - 1, next_attempt_at = $4, send_after = $5,
                lease_until = null, updated_at = now()
         where tenant_id = $1 and id = $2 and status = 'running' and attempts = $3",
    )
    .bind(tenant_id)
    .bind(id)
    .bind(attempt)
    .bind(wake)
    .bind(until)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Dead-letter, fenced on the attempt.
pub async fn dead(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
    attempt: i32,
    error: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "update effects set status = 'dead', last_error = $4, lease_until = null, updated_at = now()
         where tenant_id = $1 and id = $2 and status = 'running' and attempts = $3",
    )
    .bind(tenant_id)
    .bind(id)
    .bind(attempt)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Effects of a workflow.
pub async fn of_workflow(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    workflow_id: Uuid,
) -> Result<Vec<EffectRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLS} from effects where tenant_id = $1 and workflow_id = $2 order by created_at, id"
    )))
    .bind(tenant_id)
    .bind(workflow_id)
    .fetch_all(conn)
    .await
}

/// Sweep: effects whose lease expired (the process delivering them died
/// mid-attempt) go back to pending, due now, for any pump to claim. A
/// pending effect needs nothing else: pumps claim every due one from this
/// table, however long the backlog. Returns how many were released.
pub async fn recover(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "update effects set status = 'pending', lease_until = null, updated_at = now(), send_after = null,
                last_error = coalesce(last_error, 'lease expired')
         where status = 'running' and lease_until < now()",
    )
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected())
}

/// A message the log channel recorded.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeliveryRow {
    /// Idempotency key of the effect.
    pub idempotency_key: String,
    /// Who it went to (`crew`, `operator`, `executor:<id>`).
    pub recipient: String,
    /// The rendered message.
    pub body: String,
    /// When.
    pub delivered_at: DateTime<Utc>,
}

/// The log channel's deliveries for a workflow's effects, oldest first.
pub async fn deliveries_of(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    workflow_id: Uuid,
) -> Result<Vec<DeliveryRow>, sqlx::Error> {
    sqlx::query_as(
        "select d.idempotency_key, d.recipient, d.body, d.delivered_at
         from deliveries d join effects e on e.tenant_id = d.tenant_id and e.id = d.effect_id
         where d.tenant_id = $1 and e.workflow_id = $2 order by d.delivered_at, d.id",
    )
    .bind(tenant_id)
    .bind(workflow_id)
    .fetch_all(conn)
    .await
}
