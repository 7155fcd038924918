//! Enqueueing apalis jobs inside our own transactions.
//!
//! apalis' `push_tasks` raises a unique violation on a duplicate idempotency
//! key, which would abort the caller's transaction; we insert the row ourselves
//! with `on conflict do nothing` (APALIS.md §2). Jobs run once
//! (`max_attempts = 1`): attempts and backoff are ours.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

/// The queue that applies signals to workflows of one kind: a process
/// consumes only the kinds it runs (`ENABLED_WORKFLOWS`).
pub fn apply_queue(kind: &str) -> String {
    format!("dispatch.apply.{kind}")
}
/// The queue that processes verified inbound webhook events.
pub const INBOUND_QUEUE: &str = "dispatch.inbound";

/// Body of an `inbound` job: process one stored webhook event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InboundJob {
    /// Tenant.
    pub tenant_id: Uuid,
    /// The `inbound_events` row.
    pub inbound_id: Uuid,
}

/// Enqueue processing of an inbound event.
pub async fn enqueue_inbound(
    conn: &mut PgConnection,
    job: &InboundJob,
    idempotency_key: String,
) -> Result<(), sqlx::Error> {
    let body = serde_json::to_value(job).expect("serializes");
    push(
        conn,
        INBOUND_QUEUE,
        "inbound",
        body,
        None,
        Some(idempotency_key),
    )
    .await
}

/// Current envelope version.
pub const ENVELOPE_V: u32 = 1;

/// Job arguments: always decodable, versioned inside (APALIS.md §7).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// Envelope version.
    pub v: u32,
    /// `apply` or `effect`.
    pub kind: String,
    /// Kind-specific body.
    pub body: serde_json::Value,
}

/// Body of an `apply` job: apply the queued signals of one workflow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyJob {
    /// Tenant.
    pub tenant_id: Uuid,
    /// Workflow.
    pub workflow_id: Uuid,
}

/// Body of an `effect` job: run one outbox effect.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EffectJob {
    /// Tenant.
    pub tenant_id: Uuid,
    /// Effect.
    pub effect_id: Uuid,
    /// The attempts made when this job was enqueued: the job may run the next one only.
    #[serde(default)]
    pub after_attempts: Option<i32>,
}

async fn push(
    conn: &mut PgConnection,
    queue: &str,
    kind: &str,
    body: serde_json::Value,
    run_at: Option<DateTime<Utc>>,
    idempotency_key: Option<String>,
) -> Result<(), sqlx::Error> {
    let envelope = Envelope {
        v: ENVELOPE_V,
        kind: kind.to_string(),
        body,
    };
    let bytes = serde_json::to_vec(&envelope).expect("envelope serializes");
    let id = ulid::Ulid::from(Uuid::now_v7()).to_string();
    // run_at is whole seconds in apalis' fetch (`run_at < now()`); a delayed job
    // is rounded up so it never runs early.
    sqlx::query(
        "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority, idempotency_key)
         values ($1, $2, $3, 'Pending', 0, 1,
                 coalesce(date_trunc('second', $4::timestamptz) + interval '1 second', now()), 0, $5)
         on conflict (job_type, idempotency_key) do nothing",
    )
    .bind(id)
    .bind(queue)
    .bind(bytes)
    .bind(run_at)
    .bind(idempotency_key)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// How far behind the most backlogged of `queues` is: the age of its oldest
/// job waiting to be fetched, in milliseconds (0 when none waits). Served by
/// apalis' fetch index.
pub async fn queue_lag_ms(conn: &mut PgConnection, queues: &[String]) -> Result<i64, sqlx::Error> {
    let (lag,): (Option<f64>,) = sqlx::query_as(
        "select max(extract(epoch from now() - oldest) * 1000)::float8 from (
           select (select min(run_at) from apalis.jobs
                   where job_type = q and status = 'Pending' and priority = 0 and run_at <= now()) as oldest
           from unnest($1::text[]) as q) x",
    )
    .bind(queues)
    .fetch_one(conn)
    .await?;
    Ok(lag.unwrap_or(0.0).max(0.0) as i64)
}

/// Enqueue an apply job for a workflow of `kind`.
pub async fn enqueue_apply(
    conn: &mut PgConnection,
    kind: &str,
    job: &ApplyJob,
    idempotency_key: Option<String>,
) -> Result<(), sqlx::Error> {
    let body = serde_json::to_value(job).expect("serializes");
    push(
        conn,
        &apply_queue(kind),
        "apply",
        body,
        None,
        idempotency_key,
    )
    .await
}

/// The queue that runs effects of one workflow kind: a process runs the
/// effects of the kinds it serves only.
pub fn effect_queue(kind: &str) -> String {
    format!("dispatch.effect.{kind}")
}

/// Enqueue an effect job of a `kind` workflow, optionally delayed.
pub async fn enqueue_effect(
    conn: &mut PgConnection,
    kind: &str,
    job: &EffectJob,
    run_at: Option<DateTime<Utc>>,
    idempotency_key: Option<String>,
) -> Result<(), sqlx::Error> {
    let body = serde_json::to_value(job).expect("serializes");
    push(
        conn,
        &effect_queue(kind),
        "effect",
        body,
        run_at,
        idempotency_key,
    )
    .await
}

/// Kinds whose apply queue has a live worker (heard from within `within_s`).
pub async fn served_kinds(
    conn: &mut PgConnection,
    within_s: f64,
) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "select distinct substr(worker_type, length('dispatch.apply.') + 1) from apalis.workers
         where worker_type like 'dispatch.apply.%' and last_seen > now() - make_interval(secs => $1)",
    )
    .bind(within_s)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// Jobs waiting to run, per queue (for `/readyz`).
/// Counts waiting (`Pending`) jobs only, through apalis' partial fetch index.
pub async fn queue_depth(conn: &mut PgConnection) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "select job_type, count(*) from apalis.jobs
         where status = 'Pending' and job_type like 'dispatch.%'
         group by job_type order by job_type",
    )
    .fetch_all(conn)
    .await
}

/// Delete finished jobs older than `keep` (apalis never does, APALIS.md §10),
/// then worker rows nobody heard from in as long.
pub async fn purge_finished(conn: &mut PgConnection, keep_secs: i64) -> Result<u64, sqlx::Error> {
    // In batches: a long delete would hold locks and bloat one transaction.
    let mut jobs = 0;
    loop {
        let n = sqlx::query(
            "delete from apalis.jobs where id in (
                 select id from apalis.jobs where job_type like 'dispatch.%'
                   and status in ('Done', 'Failed', 'Killed')
                   and coalesce(done_at, run_at) < now() - make_interval(secs => $1)
                 limit 1000)",
        )
        .bind(keep_secs as f64)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        jobs += n;
        if n < 1000 {
            break;
        }
    }
    sqlx::query(
        "delete from apalis.workers w where w.last_seen < now() - make_interval(secs => $1)
           and not exists (select 1 from apalis.jobs j where j.lock_by = w.id)",
    )
    .bind(keep_secs as f64)
    .execute(&mut *conn)
    .await?;
    Ok(jobs)
}
