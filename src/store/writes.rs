//! Set-based writes for transitions: a batch of workflows' new states,
//! history, signal outcomes and effects, gathered in memory and written with
//! one statement of `UNNEST`s instead of one statement per row.
//!
//! The engine decides every transition first (the pure step) and hands the
//! rows to a [`Writes`]; [`Writes::flush`] writes them in the caller's
//! transaction, in one statement. A flush is all or nothing: on any error the caller rolls the
//! whole set back (the pumps then apply the batch workflow by workflow).

use std::collections::BTreeSet;

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::workflows::{NewEvent, WorkflowRow};

/// Rows to write, in the order they were added (per table).
#[derive(Debug, Default)]
pub struct Writes {
    history: History,
    effects: Effects,
    finished: Finished,
    states: States,
    /// Kinds of workflows that queued effects (to wake their pumps).
    effect_kinds: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct History {
    tenant_id: Vec<Uuid>,
    workflow_id: Vec<Uuid>,
    version: Vec<i64>,
    event: Vec<String>,
    signal_id: Vec<Option<Uuid>>,
    signal_name: Vec<Option<String>>,
    actor_role: Vec<Option<String>>,
    actor_subject: Vec<Option<String>>,
    from_state: Vec<Option<String>>,
    to_state: Vec<Option<String>>,
    reason: Vec<Option<String>>,
    commands: Vec<Value>,
}

#[derive(Debug, Default)]
struct Effects {
    tenant_id: Vec<Uuid>,
    id: Vec<Uuid>,
    workflow_id: Vec<Uuid>,
    name: Vec<String>,
    key: Vec<String>,
    payload: Vec<Value>,
    reply: Vec<Option<String>>,
    max_attempts: Vec<i32>,
}

#[derive(Debug, Default)]
struct Finished {
    tenant_id: Vec<Uuid>,
    id: Vec<Uuid>,
    status: Vec<String>,
    reason: Vec<Option<String>>,
    state_after: Vec<String>,
}

#[derive(Debug, Default)]
struct States {
    tenant_id: Vec<Uuid>,
    id: Vec<Uuid>,
    state_name: Vec<String>,
    state: Vec<Value>,
    status: Vec<String>,
    version: Vec<i64>,
    read_version: Vec<i64>,
    def_version: Vec<i32>,
}

/// What a flush wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Effects stored (an effect whose key the workflow had is not).
    pub effects: u64,
}

/// A flush that could not write everything.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// The database failed.
    #[error("database error")]
    Db(#[from] sqlx::Error),
    /// A workflow's row moved on from the version its transition read.
    #[error("a workflow moved on from the version its transition read")]
    Fenced,
}

impl Writes {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.history.tenant_id.is_empty()
            && self.effects.tenant_id.is_empty()
            && self.finished.tenant_id.is_empty()
            && self.states.tenant_id.is_empty()
    }

    /// Append a history event.
    pub fn history(&mut self, tenant_id: Uuid, workflow_id: Uuid, e: &NewEvent<'_>) {
        let h = &mut self.history;
        h.tenant_id.push(tenant_id);
        h.workflow_id.push(workflow_id);
        h.version.push(e.version);
        h.event.push(e.event.to_string());
        h.signal_id.push(e.signal_id);
        h.signal_name.push(e.signal_name.map(str::to_string));
        h.actor_role.push(e.actor_role.map(str::to_string));
        h.actor_subject.push(e.actor_subject.map(str::to_string));
        h.from_state.push(e.from_state.map(str::to_string));
        h.to_state.push(e.to_state.map(str::to_string));
        h.reason.push(e.reason.map(str::to_string));
        h.commands.push(e.commands.clone());
    }

    /// Queue an effect of `row` (kept once per idempotency key).
    #[allow(clippy::too_many_arguments)]
    pub fn effect(
        &mut self,
        row: &WorkflowRow,
        name: &str,
        key: &str,
        payload: &Value,
        reply: Option<&str>,
        max_attempts: i32,
    ) {
        let e = &mut self.effects;
        e.tenant_id.push(row.tenant_id);
        e.id.push(Uuid::now_v7());
        e.workflow_id.push(row.id);
        e.name.push(name.to_string());
        e.key.push(key.to_string());
        e.payload.push(payload.clone());
        e.reply.push(reply.map(str::to_string));
        e.max_attempts.push(max_attempts);
        if !self.effect_kinds.contains(&row.kind) {
            self.effect_kinds.insert(row.kind.clone());
        }
    }

    /// Record a queued signal's outcome.
    pub fn finish(
        &mut self,
        tenant_id: Uuid,
        signal_id: Uuid,
        status: &str,
        reason: Option<&str>,
        state_after: &str,
    ) {
        let f = &mut self.finished;
        f.tenant_id.push(tenant_id);
        f.id.push(signal_id);
        f.status.push(status.to_string());
        f.reason.push(reason.map(str::to_string));
        f.state_after.push(state_after.to_string());
    }

    /// Store `row`'s new state, fenced on `read_version`.
    pub fn state(&mut self, row: &WorkflowRow, read_version: i64) {
        let s = &mut self.states;
        s.tenant_id.push(row.tenant_id);
        s.id.push(row.id);
        s.state_name.push(row.state_name.clone());
        s.state.push(row.state.clone());
        s.status.push(row.status.clone());
        s.version.push(row.version);
        s.read_version.push(read_version);
        s.def_version.push(row.def_version);
    }

    /// Write everything in one statement (one data-modifying `WITH` part
    /// per table, each an `UNNEST` of column arrays; empty parts write
    /// nothing), and with `notify` send it for each kind that queued effects.
    pub async fn flush(
        self,
        conn: &mut PgConnection,
        notify: Option<&str>,
    ) -> Result<Flushed, FlushError> {
        if self.is_empty() {
            return Ok(Flushed::default());
        }
        let (e, h, f, s) = (self.effects, self.history, self.finished, self.states);
        let kinds: Vec<String> = self.effect_kinds.into_iter().collect();
        let (effects, updated, _woken): (i64, i64, i64) = sqlx::query_as(
            "with e as (
                 insert into effects (tenant_id, id, workflow_id, name, idempotency_key, payload, reply, max_attempts)
                 select * from unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[],
                                      $6::jsonb[], $7::text[], $8::int4[])
                 on conflict (tenant_id, workflow_id, idempotency_key) do nothing
                 returning 1),
             h as (
                 insert into history (tenant_id, workflow_id, version, event, signal_id, signal_name, actor_role,
                                      actor_subject, from_state, to_state, reason, commands)
                 select * from unnest($9::uuid[], $10::uuid[], $11::int8[], $12::text[], $13::uuid[], $14::text[],
                                      $15::text[], $16::text[], $17::text[], $18::text[], $19::text[], $20::jsonb[])),
             f as (
                 update signals s set status = u.status, reason = u.reason, state_after = u.state_after,
                        applied_at = now()
                 from unnest($21::uuid[], $22::uuid[], $23::text[], $24::text[], $25::text[])
                      u(tenant_id, id, status, reason, state_after)
                 where s.tenant_id = u.tenant_id and s.id = u.id and s.status = 'queued'),
             s as (
                 update workflows w set state_name = u.state_name, state = u.state, status = u.status,
                        version = u.version, def_version = u.def_version, updated_at = now()
                 from unnest($26::uuid[], $27::uuid[], $28::text[], $29::jsonb[], $30::text[], $31::int8[],
                             $32::int8[], $33::int4[])
                      u(tenant_id, id, state_name, state, status, version, read_version, def_version)
                 where w.tenant_id = u.tenant_id and w.id = u.id and w.version = u.read_version
                 returning 1),
             effects as (select count(*) as n from e)
             select effects.n, (select count(*) from s),
                    (select count(*) from (select pg_notify($34, k) from unnest($35::text[]) k
                                           where $34 is not null and effects.n > 0) woken)
             from effects",
        )
        .bind(&e.tenant_id)
        .bind(&e.id)
        .bind(&e.workflow_id)
        .bind(&e.name)
        .bind(&e.key)
        .bind(&e.payload)
        .bind(&e.reply)
        .bind(&e.max_attempts)
        .bind(&h.tenant_id)
        .bind(&h.workflow_id)
        .bind(&h.version)
        .bind(&h.event)
        .bind(&h.signal_id)
        .bind(&h.signal_name)
        .bind(&h.actor_role)
        .bind(&h.actor_subject)
        .bind(&h.from_state)
        .bind(&h.to_state)
        .bind(&h.reason)
        .bind(&h.commands)
        .bind(&f.tenant_id)
        .bind(&f.id)
        .bind(&f.status)
        .bind(&f.reason)
        .bind(&f.state_after)
        .bind(&s.tenant_id)
        .bind(&s.id)
        .bind(&s.state_name)
        .bind(&s.state)
        .bind(&s.status)
        .bind(&s.version)
        .bind(&s.read_version)
        .bind(&s.def_version)
        .bind(notify)
        .bind(&kinds)
        .fetch_one(&mut *conn)
        .await?;
        if updated != s.tenant_id.len() as i64 {
            return Err(FlushError::Fenced);
        }
        Ok(Flushed {
            effects: effects as u64,
        })
    }
}
