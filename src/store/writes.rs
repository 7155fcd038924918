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

    /// Write everything in one statement: one data-modifying `WITH` part
    /// per table that has rows, each an `UNNEST` of column arrays, and with
    /// `notify` a NOTIFY on it for each kind that queued effects; decided
    /// signals a caller waits on are announced on
    /// [`super::signals::SIGNAL_CHANNEL`]. (Only the
    /// parts with rows are in the statement: an empty part still costs its
    /// plan and its scans.)
    pub async fn flush(
        self,
        conn: &mut PgConnection,
        notify: Option<&str>,
    ) -> Result<Flushed, FlushError> {
        if self.is_empty() {
            return Ok(Flushed::default());
        }
        let (e, h, f, s) = (self.effects, self.history, self.finished, self.states);
        let want_decided = f.tenant_id.len() as i64;
        let kinds: Vec<String> = self.effect_kinds.into_iter().collect();
        let mut parts = Vec::new();
        let mut next = 0;
        let mut params = |n: usize| {
            let p: Vec<usize> = (next + 1..=next + n).collect();
            next += n;
            p
        };
        let has = (
            !e.tenant_id.is_empty(),
            !h.tenant_id.is_empty(),
            !f.tenant_id.is_empty(),
            !s.tenant_id.is_empty(),
        );
        if has.0 {
            let p = params(8);
            parts.push(format!(
                "e as (
                 insert into effects (tenant_id, id, workflow_id, name, idempotency_key, payload, reply, max_attempts)
                 select * from unnest(${}::uuid[], ${}::uuid[], ${}::uuid[], ${}::text[], ${}::text[],
                                      ${}::jsonb[], ${}::text[], ${}::int4[])
                 on conflict (tenant_id, workflow_id, idempotency_key) do nothing
                 returning 1)",
                p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
            ));
        }
        if has.1 {
            let p = params(12);
            parts.push(format!(
                "h as (
                 insert into history (tenant_id, workflow_id, version, event, signal_id, signal_name, actor_role,
                                      actor_subject, from_state, to_state, reason, commands)
                 select * from unnest(${}::uuid[], ${}::uuid[], ${}::int8[], ${}::text[], ${}::uuid[], ${}::text[],
                                      ${}::text[], ${}::text[], ${}::text[], ${}::text[], ${}::text[], ${}::jsonb[]))",
                p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11]
            ));
        }
        if has.2 {
            let p = params(5);
            parts.push(format!(
                "f as (
                 update signals s set status = u.status, reason = u.reason, state_after = u.state_after,
                        applied_at = clock_timestamp()
                 from unnest(${}::uuid[], ${}::uuid[], ${}::text[], ${}::text[], ${}::text[])
                      u(tenant_id, id, status, reason, state_after)
                 where s.tenant_id = u.tenant_id and s.id = u.id and s.status = 'queued'
                 returning s.id, s.wake)",
                p[0], p[1], p[2], p[3], p[4]
            ));
        }
        if has.3 {
            let p = params(8);
            parts.push(format!(
                "s as (
                 update workflows w set state_name = u.state_name, state = u.state, status = u.status,
                        version = u.version, def_version = u.def_version, updated_at = now()
                 from unnest(${}::uuid[], ${}::uuid[], ${}::text[], ${}::jsonb[], ${}::text[], ${}::int8[],
                             ${}::int8[], ${}::int4[])
                      u(tenant_id, id, state_name, state, status, version, read_version, def_version)
                 where w.tenant_id = u.tenant_id and w.id = u.id and w.version = u.read_version
                 returning 1)",
                p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
            ));
        }
        let effects = if has.0 {
            "(select count(*) from e)"
        } else {
            "0::int8"
        };
        let updated = if has.3 {
            "(select count(*) from s)"
        } else {
            "0::int8"
        };
        let woken = if has.0 && notify.is_some() {
            let p = params(2);
            format!(
                "(select count(*) from (select pg_notify(${}, k) from unnest(${}::text[]) k) n)",
                p[0], p[1]
            )
        } else {
            "0::int8".to_string()
        };
        // Callers waiting on a decided signal (its row says so: `RETURNING`
        // reads the version this update wrote, a waiter's mark included)
        // are told at commit, 200 ids to a notification.
        let announced = if has.2 {
            let p = params(1);
            format!(
                "(select count(*) from (
                     select pg_notify(${}, string_agg(id::text, ',')) from (
                         select id, (row_number() over () - 1) / 200 as g from f where wake) x
                     group by g) n)",
                p[0]
            )
        } else {
            "0::int8".to_string()
        };
        let decided = if has.2 {
            "(select count(*) from f)"
        } else {
            "0::int8"
        };
        let sql = format!(
            "with {}, counts as (select {effects} as effects, {updated} as updated,
                                        {decided} as decided)
             select effects, updated, decided, case when effects > 0 then {woken} else 0 end,
                    {announced} from counts",
            parts.join(",\n")
        );
        let mut q = sqlx::query_as::<_, (i64, i64, i64, i64, i64)>(sqlx::AssertSqlSafe(sql));
        if has.0 {
            q = q
                .bind(e.tenant_id)
                .bind(e.id)
                .bind(e.workflow_id)
                .bind(e.name)
                .bind(e.key)
                .bind(e.payload)
                .bind(e.reply)
                .bind(e.max_attempts);
        }
        if has.1 {
            q = q
                .bind(h.tenant_id)
                .bind(h.workflow_id)
                .bind(h.version)
                .bind(h.event)
                .bind(h.signal_id)
                .bind(h.signal_name)
                .bind(h.actor_role)
                .bind(h.actor_subject)
                .bind(h.from_state)
                .bind(h.to_state)
                .bind(h.reason)
                .bind(h.commands);
        }
        if has.2 {
            q = q
                .bind(f.tenant_id)
                .bind(f.id)
                .bind(f.status)
                .bind(f.reason)
                .bind(f.state_after);
        }
        let want = s.tenant_id.len() as i64;
        if has.3 {
            q = q
                .bind(s.tenant_id)
                .bind(s.id)
                .bind(s.state_name)
                .bind(s.state)
                .bind(s.status)
                .bind(s.version)
                .bind(s.read_version)
                .bind(s.def_version);
        }
        if let (true, Some(channel)) = (has.0, notify) {
            q = q.bind(channel.to_string()).bind(kinds);
        }
        if has.2 {
            q = q.bind(super::signals::SIGNAL_CHANNEL);
        }
        let (effects, updated, decided, _woken, _announced) = q.fetch_one(&mut *conn).await?;
        // A signal decided by someone else since it was read (the batch read
        // it from an older snapshot) fences the write like a moved workflow.
        if updated != want || decided != want_decided {
            return Err(FlushError::Fenced);
        }
        Ok(Flushed {
            effects: effects as u64,
        })
    }
}
