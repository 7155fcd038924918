//! The read half of a batched apply, in one statement.
//!
//! A pump's cycle used to read its batch in five round trips: lock the
//! workflows with queued signals, read their tenants' configurations, fire
//! their due timers into signals, read the queued signals, read the clock.
//! On an idle system those round trips were most of the time from a signal's
//! arrival to its commit; [`claim`] does all five in one statement.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{FromRow, PgConnection, Row};
use uuid::Uuid;

use super::signals::SignalRow;
use super::workflows::{WorkflowRow, CANNOT_ADVANCE};

/// What one batch read: locked workflows (oldest queued signal first), each
/// one's queued signals in arrival order, their tenants' configurations and
/// one clock reading.
#[derive(Debug, Default)]
pub struct Batch {
    /// The workflows, locked until the transaction ends.
    pub rows: Vec<WorkflowRow>,
    /// Up to `per_workflow` queued signals of each, in arrival order (due
    /// timers just fired into signals included).
    pub queued: HashMap<Uuid, Vec<SignalRow>>,
    /// Each tenant's configuration, once.
    pub configs: HashMap<Uuid, Arc<Value>>,
    /// The database clock, read once for the batch, not before any signal
    /// of the batch arrived.
    pub now: DateTime<Utc>,
}

/// Lock up to `limit` workflows of `kinds` with queued signals (`SKIP
/// LOCKED`: another pump is on it; workflows flagged as ones this binary
/// cannot advance are left to the sweep), fire their due timers into queued
/// signals (so they take their place in arrival order: the timer loop may
/// lag), and read up to `per_workflow` queued signals of each, their
/// tenants' configurations and the clock.
///
/// Rows are read as the locks took them, not as the statement's snapshot
/// saw them: a workflow another pump applied and committed after the
/// snapshot was taken comes back in its new version, and its signals that
/// pump decided are not queued any more (each signal is locked, and its
/// status checked again on the version the lock took). Writing a batch
/// also fences on every signal still being queued
/// ([`super::writes::Writes::flush`]): nothing is applied twice.
/// The signals a timer fires are inserted by this statement, which does not
/// see its own inserts: they come from the insert's `RETURNING`, beside the
/// signals that were queued before.
pub async fn claim(
    conn: &mut PgConnection,
    kinds: &[String],
    limit: i64,
    per_workflow: i64,
) -> Result<Batch, sqlx::Error> {
    let rows = sqlx::query(
        "with c as materialized (
             select w.tenant_id, w.id, w.kind, w.key, w.state_name, w.state, w.status, w.version,
                    w.attention, w.created_at, w.updated_at, w.input_hash, w.def_version,
                    s.received_at as first_at, s.seq as first_seq
             from signals s
             join workflows w on w.tenant_id = s.tenant_id and w.id = s.workflow_id
             where s.status = 'queued' and w.kind = any($1)
               and (w.attention is null or not starts_with(w.attention, $3))
             order by s.received_at, s.seq
             limit $2 * 4
             for no key update of w skip locked),
         l as materialized (
             select * from (
                 select c.*, row_number() over (partition by c.tenant_id, c.id
                                                order by c.first_at, c.first_seq) as k
                 from c) x
             where k = 1 order by first_at, first_seq limit $2),
         due as (
             -- Lateral: each workflow's timers by index, whatever the
             -- planner guesses of the volatile due condition.
             select t.tenant_id, t.id from l cross join lateral (
                 select x.tenant_id, x.id from timers x
                 where x.tenant_id = l.tenant_id and x.workflow_id = l.id and x.status = 'pending'
                   and (x.due_at <= clock_timestamp() or x.fire_now)
                 for update of x skip locked) t),
         fired as (
             update timers t set status = 'fired', closed_at = now() from due
             where t.tenant_id = due.tenant_id and t.id = due.id
             returning t.tenant_id, t.id, t.workflow_id, t.due_at, t.signal),
         ins as (
             insert into signals (tenant_id, id, workflow_id, idempotency_key, name, payload,
                                  request_hash, actor_role, received_at)
             select f.tenant_id, gen_random_uuid(), f.workflow_id, 'timer:' || f.id, f.signal,
                    jsonb_build_object('due', f.due_at),
                    sha256(convert_to('{\"timer\":\"' || f.id || '\"}', 'UTF8')), 'system',
                    least(f.due_at, clock_timestamp())
             from fired f
             on conflict (tenant_id, workflow_id, idempotency_key) do nothing
             returning tenant_id, id, workflow_id, name, payload, request_hash, actor_role,
                       actor_subject, status, reason, state_after, received_at, origin, seq),
         qs as (
             select s.tenant_id, s.id, s.workflow_id, s.name, s.payload, s.request_hash, s.actor_role,
                    s.actor_subject, s.status, s.reason, s.state_after, s.received_at, s.origin, s.seq
             from signals s join l on s.tenant_id = l.tenant_id and s.workflow_id = l.id
             where s.status = 'queued'
             for no key update of s),
         q as (select * from qs union all select * from ins),
         qn as (
             select q.*, row_number() over (partition by q.tenant_id, q.workflow_id
                                            order by q.received_at, q.seq) as rn
             from q)
         select l.tenant_id, l.id, l.kind, l.key, l.state_name, l.state, l.status, l.version,
                l.attention, l.created_at, l.updated_at, l.input_hash, l.def_version,
                t.config as tenant_config, (select clock_timestamp()) as now_at,
                qn.id as s_id, qn.name as s_name, qn.payload as s_payload,
                qn.request_hash as s_request_hash, qn.actor_role as s_actor_role,
                qn.actor_subject as s_actor_subject, qn.status as s_status, qn.reason as s_reason,
                qn.state_after as s_state_after, qn.received_at as s_received_at,
                qn.origin as s_origin
         from l
         left join tenants t on t.id = l.tenant_id
         left join qn on qn.tenant_id = l.tenant_id and qn.workflow_id = l.id and qn.rn <= $4
         order by l.first_at, l.first_seq, l.id, qn.rn",
    )
    .bind(kinds)
    .bind(limit)
    .bind(CANNOT_ADVANCE)
    .bind(per_workflow)
    .fetch_all(conn)
    .await?;
    let mut batch = Batch::default();
    let mut now: Option<DateTime<Utc>> = None;
    for r in &rows {
        let at: DateTime<Utc> = r.try_get("now_at")?;
        now = Some(now.map_or(at, |n| n.max(at)));
        let tenant_id: Uuid = r.try_get("tenant_id")?;
        let workflow_id: Uuid = r.try_get("id")?;
        if batch.rows.last().is_none_or(|w| w.id != workflow_id) {
            batch.rows.push(WorkflowRow::from_row(r)?);
            if let Some(config) = r.try_get::<Option<Value>, _>("tenant_config")? {
                batch
                    .configs
                    .entry(tenant_id)
                    .or_insert_with(|| Arc::new(config));
            }
        }
        let Some(id) = r.try_get::<Option<Uuid>, _>("s_id")? else {
            continue;
        };
        let signal = SignalRow {
            id,
            workflow_id,
            name: r.try_get("s_name")?,
            payload: r.try_get("s_payload")?,
            request_hash: r.try_get("s_request_hash")?,
            actor_role: r.try_get("s_actor_role")?,
            actor_subject: r.try_get("s_actor_subject")?,
            status: r.try_get("s_status")?,
            reason: r.try_get("s_reason")?,
            state_after: r.try_get("s_state_after")?,
            received_at: r.try_get("s_received_at")?,
            origin: r.try_get("s_origin")?,
        };
        // The transitions never see a clock before a signal they apply.
        now = now.map(|n| n.max(signal.received_at));
        batch.queued.entry(workflow_id).or_default().push(signal);
    }
    batch.now = now.unwrap_or_default();
    Ok(batch)
}
