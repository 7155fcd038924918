//! Recurring schedules (cron): rows whose due ticks are claimed once across
//! processes by locking the row and moving its `next_at` in one transaction.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

/// A schedule as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ScheduleRow {
    /// Id.
    pub id: Uuid,
    /// Tenant (none for the runtime's own schedules).
    #[serde(skip)]
    pub tenant_id: Option<Uuid>,
    /// Name, unique per tenant.
    pub name: String,
    /// Cron expression.
    pub cron: String,
    /// IANA time zone the expression is read in.
    pub timezone: String,
    /// `catch_up` or `skip`: what happens to ticks missed while no worker ran.
    pub policy: String,
    /// `signal` (to a workflow) or `purge` (the runtime's retention).
    pub action: String,
    /// Target workflow kind (signal).
    pub kind: Option<String>,
    /// Target workflow key (signal).
    pub key: Option<String>,
    /// Signal name (signal).
    pub signal: Option<String>,
    /// The next tick due.
    pub next_at: DateTime<Utc>,
    /// The last tick fired.
    pub last_tick_at: Option<DateTime<Utc>>,
    /// Ticks fired so far.
    pub ticks: i64,
    /// Ticks skipped (missed while down, policy `skip`).
    pub skipped: i64,
    /// Why the last tick could not be delivered, if it could not.
    pub last_error: Option<String>,
}

const COLS: &str = "id, tenant_id, name, cron, timezone, policy, action, kind, key, signal, next_at, last_tick_at, ticks, skipped, last_error";

/// What to create or replace.
pub struct NewSchedule<'a> {
    /// Tenant (none for the runtime's own).
    pub tenant_id: Option<Uuid>,
    /// Name.
    pub name: &'a str,
    /// Cron expression (validated by the caller).
    pub cron: &'a str,
    /// Time zone (validated by the caller).
    pub timezone: &'a str,
    /// `catch_up` or `skip`.
    pub policy: &'a str,
    /// `signal` or `purge`.
    pub action: &'a str,
    /// Target (signal).
    pub kind: Option<&'a str>,
    /// Target (signal).
    pub key: Option<&'a str>,
    /// Target (signal).
    pub signal: Option<&'a str>,
    /// First tick.
    pub next_at: DateTime<Utc>,
}

/// Create or replace a schedule by (tenant, name); a replaced one starts
/// counting from `next_at` again.
pub async fn put(conn: &mut PgConnection, s: &NewSchedule<'_>) -> Result<ScheduleRow, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "insert into schedules (id, tenant_id, name, cron, timezone, policy, action, kind, key, signal, next_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         on conflict (coalesce(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid), name) do update
         set cron = excluded.cron, timezone = excluded.timezone, policy = excluded.policy,
             action = excluded.action, kind = excluded.kind, key = excluded.key,
             signal = excluded.signal, next_at = excluded.next_at, last_error = null, updated_at = now()
         returning {COLS}"
    )))
    .bind(Uuid::now_v7())
    .bind(s.tenant_id)
    .bind(s.name)
    .bind(s.cron)
    .bind(s.timezone)
    .bind(s.policy)
    .bind(s.action)
    .bind(s.kind)
    .bind(s.key)
    .bind(s.signal)
    .bind(s.next_at)
    .fetch_one(conn)
    .await
}

/// Create the runtime's own schedule unless it exists (its settings then
/// stay as ops left them).
pub async fn ensure_system(
    conn: &mut PgConnection,
    s: &NewSchedule<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into schedules (id, tenant_id, name, cron, timezone, policy, action, next_at)
         values ($1, null, $2, $3, $4, $5, $6, $7)
         on conflict (coalesce(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid), name) do nothing",
    )
    .bind(Uuid::now_v7())
    .bind(s.name)
    .bind(s.cron)
    .bind(s.timezone)
    .bind(s.policy)
    .bind(s.action)
    .bind(s.next_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// A tenant's schedules, by name.
pub async fn list(
    conn: &mut PgConnection,
    tenant_id: Uuid,
) -> Result<Vec<ScheduleRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLS} from schedules where tenant_id = $1 order by name"
    )))
    .bind(tenant_id)
    .fetch_all(conn)
    .await
}

/// One of a tenant's schedules.
pub async fn get(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    name: &str,
) -> Result<Option<ScheduleRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLS} from schedules where tenant_id = $1 and name = $2"
    )))
    .bind(tenant_id)
    .bind(name)
    .fetch_optional(conn)
    .await
}

/// Delete one of a tenant's schedules; whether it existed.
pub async fn delete(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    name: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("delete from schedules where tenant_id = $1 and name = $2")
        .bind(tenant_id)
        .bind(name)
        .execute(conn)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Lock up to `limit` due schedules (others' locked ones are skipped: one
/// process fires a tick).
pub async fn lock_due(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<ScheduleRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLS} from schedules where next_at <= clock_timestamp()
         order by next_at limit $1 for update skip locked"
    )))
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Record what a claim fired and move the schedule to its next tick.
pub async fn advance(
    conn: &mut PgConnection,
    id: Uuid,
    next_at: DateTime<Utc>,
    last_tick_at: Option<DateTime<Utc>>,
    fired: i64,
    skipped: i64,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update schedules set next_at = $2, last_tick_at = coalesce($3, last_tick_at),
                ticks = ticks + $4, skipped = skipped + $5, last_error = $6, updated_at = now()
         where id = $1",
    )
    .bind(id)
    .bind(next_at)
    .bind(last_tick_at)
    .bind(fired)
    .bind(skipped)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// Milliseconds until the next schedule is due (none: no schedules).
pub async fn next_due_in_ms(conn: &mut PgConnection) -> Result<Option<i64>, sqlx::Error> {
    let r: Option<(f64,)> = sqlx::query_as(
        "select (extract(epoch from (next_at - clock_timestamp())) * 1000)::float8
         from schedules order by next_at limit 1",
    )
    .fetch_optional(conn)
    .await?;
    Ok(r.map(|(ms,)| ms.max(0.0) as i64))
}

/// The database's clock.
pub async fn now(conn: &mut PgConnection) -> Result<DateTime<Utc>, sqlx::Error> {
    let (now,): (DateTime<Utc>,) = sqlx::query_as("select clock_timestamp()")
        .fetch_one(conn)
        .await?;
    Ok(now)
}

/// Retention: delete finished workflows' applied or rejected signals older
/// than `older_than_s` (their idempotency window is over; history keeps
/// what happened), at most `limit` per call. Returns how many went.
pub async fn purge_signals(
    conn: &mut PgConnection,
    older_than_s: i64,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "delete from signals s using (
             select s.tenant_id, s.id from signals s
             join workflows w on w.tenant_id = s.tenant_id and w.id = s.workflow_id
             where s.status <> 'queued' and w.status <> 'running'
               and s.received_at < now() - make_interval(secs => $1)
             limit $2) old
         where s.tenant_id = old.tenant_id and s.id = old.id",
    )
    .bind(older_than_s as f64)
    .bind(limit)
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}
