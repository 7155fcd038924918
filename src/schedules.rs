//! Recurring schedules: cron expressions whose ticks become signals.
//!
//! A schedule belongs to a tenant (a digest hour, an archival run: each tick
//! is a signal to one of its workflows) or to the runtime (`purge`, the
//! retention of finished jobs and signals). Workers claim due schedules with
//! `FOR UPDATE SKIP LOCKED` and move `next_at` in the transaction that fires
//! them, so a tick fires once however many processes run; a tick's signal is
//! keyed `schedule:<name>:<tick time>`, so even a replayed claim cannot send
//! it twice.
//!
//! After downtime `policy` decides: `catch_up` fires every missed tick (at
//! most [`CATCH_UP_MAX`] per claim, oldest first), `skip` counts them as
//! skipped and fires only ticks that are on time (due within
//! [`ON_TIME`]). Expressions have six fields (seconds first) or the classic
//! five, and are read in the schedule's IANA time zone (default UTC), so a
//! digest "at 08:00" follows daylight saving time.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;
use workflows::Actor;

use crate::engine::{Engine, EngineError, SignalIn};
use crate::store::schedules::{self as store, NewSchedule, ScheduleRow};

/// A tick later than this after its time counts as missed (policy `skip`).
pub const ON_TIME: Duration = Duration::from_secs(60);

/// Missed ticks one claim fires at most (policy `catch_up`); the rest follow.
pub const CATCH_UP_MAX: usize = 1000;

/// The runtime's retention schedule.
pub const PURGE: &str = "purge";

/// Why a schedule is refused.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// Not a cron expression.
    #[error("`cron` is not a cron expression (six fields, seconds first, or five): {0}")]
    Cron(String),
    /// Not an IANA zone.
    #[error("`timezone` is not an IANA time zone name")]
    Timezone,
    /// Never fires.
    #[error("`cron` never fires")]
    Never,
}

/// A parsed expression in its zone.
#[derive(Debug, Clone)]
pub struct Cron {
    schedule: cron::Schedule,
    tz: chrono_tz::Tz,
}

impl Cron {
    /// Parse `expr` (five or six fields, optional year) in `timezone`.
    pub fn parse(expr: &str, timezone: &str) -> Result<Cron, ScheduleError> {
        let fields = expr.split_whitespace().count();
        let expr = if fields == 5 {
            format!("0 {expr}")
        } else {
            expr.to_string()
        };
        let schedule =
            cron::Schedule::from_str(&expr).map_err(|e| ScheduleError::Cron(e.to_string()))?;
        let tz = chrono_tz::Tz::from_str(timezone).map_err(|_| ScheduleError::Timezone)?;
        Ok(Cron { schedule, tz })
    }

    /// The first tick strictly after `t`.
    pub fn after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule
            .after(&t.with_timezone(&self.tz))
            .next()
            .map(|d| d.with_timezone(&Utc))
    }
}

/// Create or replace a tenant's schedule whose ticks signal a workflow.
#[allow(clippy::too_many_arguments)]
pub async fn put(
    pool: &PgPool,
    tenant_id: uuid::Uuid,
    name: &str,
    expr: &str,
    timezone: &str,
    policy: &str,
    kind: &str,
    key: &str,
    signal: &str,
) -> Result<Result<ScheduleRow, ScheduleError>, sqlx::Error> {
    let c = match Cron::parse(expr, timezone) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    let mut conn = pool.acquire().await?;
    let now = store::now(&mut conn).await?;
    let Some(next_at) = c.after(now) else {
        return Ok(Err(ScheduleError::Never));
    };
    let row = store::put(
        &mut conn,
        &NewSchedule {
            tenant_id: Some(tenant_id),
            name,
            cron: expr,
            timezone,
            policy,
            action: "signal",
            kind: Some(kind),
            key: Some(key),
            signal: Some(signal),
            next_at,
        },
    )
    .await?;
    Ok(Ok(row))
}

/// What one pass fired.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fired {
    /// Ticks fired.
    pub ticks: usize,
    /// Ticks skipped.
    pub skipped: usize,
}

/// Fires due schedules. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    engine: Engine,
    /// Finished jobs and signals are kept this long.
    pub retention: Duration,
}

impl Scheduler {
    /// Over `engine`'s pool.
    pub fn new(engine: Engine, retention: Duration) -> Self {
        Scheduler { engine, retention }
    }

    /// Create the runtime's own schedules when missing (purge, hourly).
    pub async fn ensure_system(&self) -> Result<(), sqlx::Error> {
        let mut conn = self.engine.pool().acquire().await?;
        let now = store::now(&mut conn).await?;
        let c = Cron::parse("0 17 * * * *", "UTC").expect("the purge schedule parses");
        let next_at = c.after(now).expect("hourly fires");
        store::ensure_system(
            &mut conn,
            &NewSchedule {
                tenant_id: None,
                name: PURGE,
                cron: "0 17 * * * *",
                timezone: "UTC",
                policy: "skip",
                action: "purge",
                kind: None,
                key: None,
                signal: None,
                next_at,
            },
        )
        .await
    }

    /// Fire every due tick of every due schedule (once across processes).
    /// Returns what fired and the time until the next schedule is due.
    pub async fn run_due(&self) -> Result<(Fired, Option<Duration>), EngineError> {
        let mut total = Fired::default();
        loop {
            let mut tx = self.engine.pool().begin().await?;
            let due = store::lock_due(&mut tx, 50).await?;
            if due.is_empty() {
                tx.rollback().await?;
                break;
            }
            let now = store::now(&mut tx).await?;
            let mut purges = 0;
            for s in &due {
                let fired = self.fire(&mut tx, s, now).await?;
                total.ticks += fired.ticks;
                total.skipped += fired.skipped;
                if s.action == "purge" && fired.ticks > 0 {
                    purges += 1;
                }
            }
            tx.commit().await?;
            if purges > 0 {
                self.purge().await?;
            }
            if due.len() < 50 {
                break;
            }
        }
        let mut conn = self.engine.pool().acquire().await?;
        let next = store::next_due_in_ms(&mut conn)
            .await?
            .map(|ms| Duration::from_millis(ms as u64 + 1));
        Ok((total, next))
    }

    /// Fire one locked schedule's due ticks and move it on.
    async fn fire(
        &self,
        tx: &mut sqlx::PgConnection,
        s: &ScheduleRow,
        now: DateTime<Utc>,
    ) -> Result<Fired, EngineError> {
        let Ok(c) = Cron::parse(&s.cron, &s.timezone) else {
            // Stored before a stricter parser: park it a day, say why.
            let later = now + chrono::Duration::days(1);
            store::advance(
                tx,
                s.id,
                later,
                None,
                0,
                0,
                Some("the cron expression no longer parses"),
            )
            .await?;
            return Ok(Fired::default());
        };
        let on_time = chrono::Duration::from_std(ON_TIME).expect("ON_TIME fits");
        let mut ticks = Vec::new();
        let mut skipped = 0usize;
        let mut t = Some(s.next_at);
        while let Some(at) = t.filter(|at| *at <= now) {
            if s.policy == "skip" && now - at > on_time {
                skipped += 1;
            } else {
                ticks.push(at);
            }
            t = c.after(at);
            if ticks.len() >= CATCH_UP_MAX || skipped >= 1_000_000 {
                break;
            }
        }
        // The first tick not fired now: the next due, or the rest of a long catch-up.
        let next_at = t.unwrap_or(now + chrono::Duration::days(365 * 100));
        let mut error = None;
        if s.action == "signal" {
            for at in &ticks {
                if let Err(e) = self.signal(tx, s, *at).await {
                    // A missing workflow must not wedge the schedule: say so, go on.
                    error = Some(format!("tick not delivered: {e}"));
                }
            }
        }
        store::advance(
            tx,
            s.id,
            next_at,
            ticks.last().copied(),
            ticks.len() as i64,
            skipped as i64,
            error.as_deref(),
        )
        .await?;
        if skipped > 0 {
            tracing::warn!(schedule = %s.name, skipped, "missed ticks skipped by policy");
        }
        Ok(Fired {
            ticks: ticks.len(),
            skipped,
        })
    }

    async fn signal(
        &self,
        tx: &mut sqlx::PgConnection,
        s: &ScheduleRow,
        at: DateTime<Utc>,
    ) -> Result<(), EngineError> {
        let (Some(tenant), Some(kind), Some(key), Some(name)) = (
            s.tenant_id,
            s.kind.as_deref(),
            s.key.as_deref(),
            s.signal.as_deref(),
        ) else {
            return Ok(());
        };
        let idem = format!("schedule:{}:{}", s.name, at.timestamp_millis());
        let payload = json!({ "schedule": s.name, "tick": at });
        let actor = Actor::system();
        sqlx::query("savepoint schedule_tick")
            .execute(&mut *tx)
            .await?;
        let r = self
            .engine
            .signal_in(
                &mut *tx,
                SignalIn::new(tenant, kind, key, &idem, name, &payload, &actor)
                    .roles_checked(false),
            )
            .await;
        match r {
            Ok(_) => {
                sqlx::query("release savepoint schedule_tick")
                    .execute(&mut *tx)
                    .await?;
                Ok(())
            }
            Err(e) => {
                sqlx::query("rollback to savepoint schedule_tick")
                    .execute(&mut *tx)
                    .await?;
                Err(e)
            }
        }
    }

    /// The retention pass: finished apalis jobs and finished workflows'
    /// signals older than the retention, in bounded chunks.
    pub async fn purge(&self) -> Result<(), EngineError> {
        let secs = self.retention.as_secs() as i64;
        let mut conn = self.engine.pool().acquire().await?;
        crate::store::jobs::purge_finished(&mut conn, secs).await?;
        let mut signals = 0;
        loop {
            let n = store::purge_signals(&mut conn, secs, 5000).await?;
            signals += n;
            if n < 5000 {
                break;
            }
        }
        tracing::info!(signals, "retention purge done");
        Ok(())
    }
}
