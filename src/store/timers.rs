//! Durable timers: rows with millisecond due times on the server clock.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

/// NOTIFY channel poked when a timer is armed.
pub const TIMER_CHANNEL: &str = "dispatch_timer_armed";

/// A pending timer, as shown to ops.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TimerRow {
    /// Timer id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// When it fires.
    pub due_at: DateTime<Utc>,
    /// Signal it delivers.
    pub signal: String,
    /// `pending`, `fired` or `cancelled`.
    pub status: String,
}

/// Arm a timer, cancelling a pending one of the same name (re-arm).
pub async fn arm(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    workflow_id: Uuid,
    name: &str,
    at: DateTime<Utc>,
    signal: &str,
) -> Result<(), sqlx::Error> {
    cancel(&mut *conn, tenant_id, workflow_id, name).await?;
    sqlx::query(
        "insert into timers (tenant_id, id, workflow_id, name, due_at, signal) values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(tenant_id)
    .bind(Uuid::now_v7())
    .bind(workflow_id)
    .bind(name)
    .bind(at)
    .bind(signal)
    .execute(&mut *conn)
    .await?;
    // Wake timer loops whose next wake-up is later than this timer. The
    // payload is how many milliseconds away it is by the server's clock (a
    // listener gets it after commit, so it errs early, never late).
    sqlx::query(
        "select pg_notify($1, greatest(0, extract(epoch from ($2 - clock_timestamp())) * 1000)::int8::text)",
    )
    .bind(TIMER_CHANNEL)
    .bind(at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Cancel the pending timer of that name, if any.
pub async fn cancel(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    workflow_id: Uuid,
    name: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update timers set status = 'cancelled', closed_at = now()
         where tenant_id = $1 and workflow_id = $2 and name = $3 and status = 'pending'",
    )
    .bind(tenant_id)
    .bind(workflow_id)
    .bind(name)
    .execute(conn)
    .await?;
    Ok(())
}

/// Mark the workflow's due timers fired and return them, earliest first. The
/// caller holds the workflow lock and turns each into a signal in the same
/// transaction, so a timer cancelled by an earlier transition never fires.
pub async fn take_due(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    workflow_id: Uuid,
) -> Result<Vec<TimerRow>, sqlx::Error> {
    sqlx::query_as(
        "update timers set status = 'fired', closed_at = now()
         where tenant_id = $1 and workflow_id = $2 and status = 'pending' and (due_at <= clock_timestamp() or fire_now)
         returning id, name, due_at, signal, status",
    )
    .bind(tenant_id)
    .bind(workflow_id)
    .fetch_all(conn)
    .await
}

/// Fire up to `limit` due timers of `kinds` (by the clock, or fired early
/// by ops): each is marked fired and becomes a queued signal of its
/// workflow in the same statement — received at its due time, idempotency
/// key `timer:<id>`, payload `{"due": <due time>}` — for the pumps to
/// take in arrival order. A transition applied later than the due time sees
/// the signal after its own; workflows treat a timer signal whose state
/// moved on as stale. Returns each fired timer's kind and lateness in seconds.
pub async fn fire_due(
    conn: &mut PgConnection,
    limit: i64,
    kinds: &[String],
) -> Result<Vec<(String, f64)>, sqlx::Error> {
    // Two shapes, each served by its own partial index: timers due by the
    // clock (a range on `timers_due`, however many are pending further out),
    // and timers ops fired early (`timers_fire_now`). One OR would walk
    // every pending timer when none is due. `statement_timestamp()` is stable
    // (an index bound); `clock_timestamp()` is volatile and would not be.
    let mut late = fire(conn, limit, kinds, "t.due_at <= statement_timestamp()").await?;
    if (late.len() as i64) < limit {
        late.extend(fire(conn, limit - late.len() as i64, kinds, "t.fire_now").await?);
    }
    Ok(late)
}

async fn fire(
    conn: &mut PgConnection,
    limit: i64,
    kinds: &[String],
    condition: &'static str,
) -> Result<Vec<(String, f64)>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "with due as (
             select t.tenant_id, t.id, w.kind from timers t
             join workflows w on w.tenant_id = t.tenant_id and w.id = t.workflow_id
             where t.status = 'pending' and {condition} and w.kind = any($2)
             order by t.due_at limit $1 for update of t skip locked),
         fired as (
             update timers t set status = 'fired', closed_at = now() from due
             where t.tenant_id = due.tenant_id and t.id = due.id
             returning t.tenant_id, t.id, t.workflow_id, t.due_at, t.signal, due.kind),
         queued as (
             insert into signals (tenant_id, id, workflow_id, idempotency_key, name, payload,
                                  request_hash, actor_role, received_at)
             select f.tenant_id, gen_random_uuid(), f.workflow_id, 'timer:' || f.id, f.signal,
                    jsonb_build_object('due', f.due_at),
                    sha256(convert_to('{{\"timer\":\"' || f.id || '\"}}', 'UTF8')), 'system', least(f.due_at, clock_timestamp())
             from fired f
             on conflict (tenant_id, workflow_id, idempotency_key) do nothing)
         select kind, (extract(epoch from clock_timestamp() - due_at))::float8 from fired"
    )))
    .bind(limit)
    .bind(kinds)
    // Planned on every execution: the timer loop runs on any pooled
    // connection, and a plan kept from an empty table would walk every
    // pending timer.
    .persistent(false)
    .fetch_all(conn)
    .await
}

/// Milliseconds until the next pending timer that is not due yet, of any
/// kind (None if none). Kinds are not looked at: `min()` over the
/// `timers_due` index is one index probe however many timers are pending,
/// while a join to find the first of a served kind walked and sorted every
/// pending timer (6 ms a call with 2,000 pending, measured, on a loop that
/// runs every few milliseconds while timers fall due). A timer of a kind
/// this process does not serve wakes it once, at its due time, for nothing.
pub async fn next_due_in_ms(conn: &mut PgConnection) -> Result<Option<i64>, sqlx::Error> {
    let r: (Option<f64>,) = sqlx::query_as(
        "select (extract(epoch from (min(due_at) - clock_timestamp())) * 1000)::float8 from timers
         where status = 'pending' and due_at > statement_timestamp()",
    )
    .fetch_one(conn)
    .await?;
    Ok(r.0.map(|ms| ms.max(0.0) as i64))
}

/// Pending timers of a workflow.
pub async fn pending(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    workflow_id: Uuid,
) -> Result<Vec<TimerRow>, sqlx::Error> {
    sqlx::query_as(
        "select id, name, due_at, signal, status from timers
         where tenant_id = $1 and workflow_id = $2 and status = 'pending' order by due_at",
    )
    .bind(tenant_id)
    .bind(workflow_id)
    .fetch_all(conn)
    .await
}
