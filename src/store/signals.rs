//! The signal inbox.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// A stored signal.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SignalRow {
    /// Signal id.
    pub id: Uuid,
    /// Workflow.
    pub workflow_id: Uuid,
    /// Signal name.
    pub name: String,
    /// Payload.
    #[serde(skip)]
    pub payload: Value,
    /// Hash of (name, payload, actor) for idempotency checks.
    #[serde(skip)]
    pub request_hash: Vec<u8>,
    /// Actor role.
    pub actor_role: String,
    /// Actor subject.
    pub actor_subject: Option<String>,
    /// `queued`, `applied` or `rejected`.
    pub status: String,
    /// Rejection reason.
    pub reason: Option<String>,
    /// State name after applying.
    pub state_after: Option<String>,
    /// When it arrived.
    pub received_at: DateTime<Utc>,
    /// The chat it came from (answered after applying), if any.
    #[serde(skip)]
    pub origin: Option<Value>,
}

const COLS: &str = "id, workflow_id, name, payload, request_hash, actor_role, actor_subject, status, reason, state_after, received_at, origin";

/// A signal to store.
pub struct NewSignal<'a> {
    /// Tenant.
    pub tenant_id: Uuid,
    /// Workflow.
    pub workflow_id: Uuid,
    /// Idempotency key.
    pub idempotency_key: &'a str,
    /// Name.
    pub name: &'a str,
    /// Payload.
    pub payload: &'a Value,
    /// Request hash.
    pub request_hash: &'a [u8],
    /// Actor role.
    pub actor_role: &'a str,
    /// Actor subject.
    pub actor_subject: Option<&'a str>,
    /// Arrival time override (timers arrive at their due time); `None` = now.
    pub received_at: Option<DateTime<Utc>>,
    /// The chat it came from, to answer the sender.
    pub origin: Option<&'a Value>,
    /// A caller waits for its outcome: announce it on [`SIGNAL_CHANNEL`].
    pub wake: bool,
}

/// Insert a signal unless its idempotency key was seen; `None` on a duplicate.
pub async fn insert(
    conn: &mut PgConnection,
    s: &NewSignal<'_>,
) -> Result<Option<SignalRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "insert into signals (tenant_id, id, workflow_id, idempotency_key, name, payload, request_hash,
                              actor_role, actor_subject, received_at, origin, wake)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, coalesce($10, clock_timestamp()), $11, $12)
         on conflict (tenant_id, workflow_id, idempotency_key) do nothing returning {COLS}"
    )))
    .bind(s.tenant_id)
    .bind(Uuid::now_v7())
    .bind(s.workflow_id)
    .bind(s.idempotency_key)
    .bind(s.name)
    .bind(s.payload)
    .bind(s.request_hash)
    .bind(s.actor_role)
    .bind(s.actor_subject)
    .bind(s.received_at)
    .bind(s.origin)
    .bind(s.wake)
    .fetch_optional(conn)
    .await
}

/// Where a signal is addressed by its workflow's business key.
pub struct ByKey<'a> {
    /// Workflow kind.
    pub kind: &'a str,
    /// Business key.
    pub key: &'a str,
    /// Wake the pumps of `kind` by NOTIFY at commit (a process that serves
    /// the kind wakes them in memory instead).
    pub notify: bool,
}

/// [`insert`] addressed by the workflow's (kind, key), in one statement:
/// the workflow is looked up, the signal stored unless its idempotency key
/// was seen, and with `to.notify` the pumps woken. `None` when nothing was
/// stored: the workflow does not exist or the key was seen (the caller
/// tells which). `s.workflow_id` is not read.
pub async fn insert_by_key(
    conn: &mut PgConnection,
    to: &ByKey<'_>,
    s: &NewSignal<'_>,
) -> Result<Option<SignalRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "with w as (select id from workflows where tenant_id = $1 and kind = $11 and key = $12),
         ins as (
             insert into signals (tenant_id, id, workflow_id, idempotency_key, name, payload, request_hash,
                                  actor_role, actor_subject, received_at, origin, wake)
             select $1, $2, w.id, $3, $4, $5, $6, $7, $8, coalesce($9, clock_timestamp()), $10, $14 from w
             on conflict (tenant_id, workflow_id, idempotency_key) do nothing returning {COLS})
         select {COLS}, (select count(*) from (select pg_notify($13, $11) where $13 is not null) n) as woken
         from ins"
    )))
    .bind(s.tenant_id)
    .bind(Uuid::now_v7())
    .bind(s.idempotency_key)
    .bind(s.name)
    .bind(s.payload)
    .bind(s.request_hash)
    .bind(s.actor_role)
    .bind(s.actor_subject)
    .bind(s.received_at)
    .bind(s.origin)
    .bind(to.kind)
    .bind(to.key)
    .bind(to.notify.then_some(SIGNAL_QUEUED_CHANNEL))
    .bind(s.wake)
    .fetch_optional(conn)
    .await
}

/// Find by idempotency key.
pub async fn by_key(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    workflow_id: Uuid,
    key: &str,
) -> Result<Option<SignalRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLS} from signals where tenant_id = $1 and workflow_id = $2 and idempotency_key = $3"
    )))
    .bind(tenant_id)
    .bind(workflow_id)
    .bind(key)
    .fetch_optional(conn)
    .await
}

/// Find by id.
pub async fn by_id(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<Option<SignalRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLS} from signals where tenant_id = $1 and id = $2"
    )))
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// The queued signals of a workflow, in arrival order. The caller holds the
/// workflow row lock, so nobody else applies them concurrently.
pub async fn queued(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    workflow_id: Uuid,
    limit: i64,
) -> Result<Vec<SignalRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLS} from signals where tenant_id = $1 and workflow_id = $2 and status = 'queued'
         order by received_at, seq limit $3"
    )))
    .bind(tenant_id)
    .bind(workflow_id)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// NOTIFY channel carrying the id of each signal that was applied or rejected.
pub const SIGNAL_CHANNEL: &str = "dispatch_signal_done";

/// NOTIFY channel poked when a signal is queued (payload: the workflow kind);
/// the pumps wake on it. Defined here, in the lowest layer that sends it.
pub const SIGNAL_QUEUED_CHANNEL: &str = "dispatch_signal_queued";

/// Wake the pumps for a queued signal of `kind` (delivered at commit;
/// identical notifications of one transaction are folded into one).
pub async fn wake_appliers(conn: &mut PgConnection, kind: &str) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_notify($1, $2)")
        .bind(SIGNAL_QUEUED_CHANNEL)
        .bind(kind)
        .execute(conn)
        .await?;
    Ok(())
}

/// Record a signal's outcome. Its waiters are woken by [`announce_done`],
/// once per transaction for all the signals it finished.
pub async fn finish(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
    status: &str,
    reason: Option<&str>,
    state_after: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "update signals set status = $3, reason = $4, state_after = $5, applied_at = clock_timestamp()
         where tenant_id = $1 and id = $2 and status = 'queued'",
    )
    .bind(tenant_id)
    .bind(id)
    .bind(status)
    .bind(reason)
    .bind(state_after)
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A caller now waits for a signal stored before without a waiter (a
/// replayed idempotency key): its outcome is to be announced too. False if
/// it is no longer queued (the caller reads the outcome). An apply already
/// writing the outcome holds the row: this waits for its commit and then
/// finds the signal decided.
pub async fn mark_awaited(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "update signals set wake = true where tenant_id = $1 and id = $2 and status = 'queued'",
    )
    .bind(tenant_id)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() > 0)
}

/// Workflows flagged as ones this binary cannot advance whose signals have
/// waited longer than `older_than_ms`: the sweep retries them one by one now
/// and then (a rolling deploy may have finished). Every other queued signal
/// is the pumps' to claim.
/// Only `kinds` (those some worker serves) are considered, oldest first: work
/// for an unserved kind waits for its worker, not for the sweep.
pub async fn stale_queued(
    conn: &mut PgConnection,
    older_than_ms: i64,
    limit: i64,
    kinds: &[String],
) -> Result<Vec<(Uuid, Uuid, String)>, sqlx::Error> {
    sqlx::query_as(
        "select s.tenant_id, s.workflow_id, w.kind from signals s
         join workflows w on w.tenant_id = s.tenant_id and w.id = s.workflow_id
         where s.status = 'queued' and s.received_at < now() - make_interval(secs => $1 / 1000.0)
           and w.kind = any($3) and starts_with(w.attention, $4)
         group by s.tenant_id, s.workflow_id, w.kind
         order by min(s.received_at) limit $2",
    )
    .bind(older_than_ms as f64)
    .bind(limit)
    .bind(kinds)
    .bind(crate::store::workflows::CANNOT_ADVANCE)
    .fetch_all(conn)
    .await
}
