//! The worker pipeline: group commit for everything a worker does.
//!
//! A pump runs cycles. One cycle is one transaction that
//! 1. records the outcomes of deliveries that finished since the last cycle
//!    (ledger, status, retry schedule, reply signals),
//! 2. applies queued signals of up to `apply_batch` workflows (the reply
//!    signals just written included), and
//! 3. leases up to `effect_batch` due effects (the effects just written
//!    included),
//!
//! and commits once. Only then are the leased effects delivered, concurrently
//! (at most `deliveries` at a time per process), each result going back to
//! the pump for the next cycle. Under load a cycle carries many workflows and
//! effects for one commit; when idle a signal is applied, its effect leased,
//! delivered and recorded in two short transactions.
//!
//! Nothing here weakens a guarantee: effects are delivered only after the
//! transaction that wrote them committed; every outcome is fenced on its
//! attempt; a pump that dies leaves leases the sweep takes back; a cycle that
//! fails is rolled back whole and its outcomes retried (then left to the lease).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::engine::{BatchFault, Engine, EngineError};
use crate::notify::{self, Hub, Note};
use crate::outbox::{Claimed, Delivery, Outbox};
use crate::store::effects::EFFECT_QUEUED_CHANNEL;
use crate::store::signals::SIGNAL_QUEUED_CHANNEL;

/// Pump tuning.
#[derive(Debug, Clone)]
pub struct PumpConfig {
    /// Workflows one cycle applies at most.
    pub apply_batch: i64,
    /// Effects one cycle leases at most.
    pub effect_batch: i64,
    /// Effects a pump has out for delivery at most (leased, not recorded).
    pub in_flight: usize,
    /// Fallback poll interval (NOTIFY and in-process wake-ups are the fast path).
    pub poll: Duration,
}

/// One pump: cycles until `shutdown`, then records what is still out.
pub struct Pump {
    engine: Engine,
    outbox: Outbox,
    kinds: Vec<String>,
    cfg: PumpConfig,
    deliveries: Arc<Semaphore>,
}

/// How long a pump woken by a finished delivery waits for the others still
/// out before it records (outcomes only: signals never wait for this).
const RECORD_LINGER: Duration = Duration::from_millis(2);

/// Cycles a failing cycle's outcomes are retried before they are dropped
/// (their leases expire and the sweep hands the effects out again).
const RECORD_RETRIES: u32 = 3;

impl Pump {
    /// A pump serving `kinds`, delivering through the process-wide
    /// `deliveries` semaphore.
    pub fn new(
        engine: Engine,
        outbox: Outbox,
        kinds: Vec<String>,
        cfg: PumpConfig,
        deliveries: Arc<Semaphore>,
    ) -> Self {
        Pump {
            engine,
            outbox,
            kinds,
            cfg,
            deliveries,
        }
    }

    /// One cycle: record `done`, apply, lease; commit. Returns how many
    /// workflows were applied and the effects leased for delivery. A batch
    /// that cannot be written as one set fails the transaction (there is no
    /// savepoint to spare on the common path): it is then gone through again,
    /// workflow by workflow.
    async fn cycle(
        &self,
        conn: &mut PgConnection,
        done: &[Delivery],
        lease: i64,
    ) -> Result<(usize, Vec<Claimed>), EngineError> {
        match self.attempt(&mut *conn, done, lease, false).await {
            Err(BatchFault::Set(e)) => {
                tracing::warn!(error = %e, "batch applied again workflow by workflow");
                self.attempt(conn, done, lease, true)
                    .await
                    .map_err(BatchFault::into_inner)
            }
            other => other.map_err(BatchFault::into_inner),
        }
    }

    async fn attempt(
        &self,
        conn: &mut PgConnection,
        done: &[Delivery],
        lease: i64,
        careful: bool,
    ) -> Result<(usize, Vec<Claimed>), BatchFault> {
        let read = BatchFault::Read;
        let mut tx = crate::store::begin_generic_queue_tx_on(conn)
            .await
            .map_err(|e| read(e.into()))?;
        self.outbox
            .record_all(&mut tx, done.to_vec())
            .await
            .map_err(read)?;
        let applied = self
            .engine
            .apply_batch_in(&mut tx, &self.kinds, self.cfg.apply_batch, careful)
            .await?;
        let claimed = self
            .outbox
            .claim_in(&mut tx, &self.kinds, lease)
            .await
            .map_err(read)?;
        if done.is_empty() && applied.is_empty() && claimed.is_empty() {
            tx.rollback().await.map_err(|e| read(e.into()))?;
            return Ok((0, claimed));
        }
        if !claimed.is_empty() {
            // The lease is not committed yet: dying here leaves every effect pending.
            crate::outbox::fault("before_effect");
        }
        tx.commit().await.map_err(|e| read(e.into()))?;
        let n = applied.len();
        for a in applied {
            a.count();
        }
        Ok((n, claimed))
    }

    /// Run until `shutdown`; `wake` is poked by NOTIFY listeners and the
    /// timer loop.
    pub async fn run(self: Arc<Self>, wake: Arc<Notify>, shutdown: CancellationToken) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Delivery>();
        let out = Arc::new(AtomicUsize::new(0));
        let mut done: Vec<Delivery> = Vec::new();
        let mut failures = 0u32;
        // A pump keeps its own connection: its statements are prepared and
        // planned once (the batch read costs milliseconds to plan), not on
        // every pooled connection it happens to be handed.
        let mut conn: Option<PoolConnection<Postgres>> = None;
        let mut plans = Plans::new();
        while !shutdown.is_cancelled() {
            if let Some(c) = conn.as_mut() {
                if plans.stale()
                    && sqlx::Connection::clear_cached_statements(&mut **c)
                        .await
                        .is_err()
                {
                    conn = None;
                }
            }
            while let Ok(d) = done_rx.try_recv() {
                done.push(d);
            }
            let free = self
                .cfg
                .in_flight
                .saturating_sub(out.load(Ordering::Acquire));
            let lease = (free as i64).min(self.cfg.effect_batch);
            let mut busy = false;
            let outcome = match conn.as_mut() {
                Some(c) => self.cycle(c, &done, lease).await,
                None => match self.engine.pool().acquire().await {
                    Ok(c) => self.cycle(conn.insert(c), &done, lease).await,
                    Err(e) => Err(e.into()),
                },
            };
            match outcome {
                Ok((applied, claimed)) => {
                    failures = 0;
                    plans.worked(applied + claimed.len() + done.len());
                    done.clear();
                    busy = applied as i64 >= self.cfg.apply_batch
                        || (lease > 0 && claimed.len() as i64 >= lease);
                    for c in claimed {
                        out.fetch_add(1, Ordering::AcqRel);
                        let (me, tx, out, wake) =
                            (self.clone(), done_tx.clone(), out.clone(), wake.clone());
                        tokio::spawn(async move {
                            let d = match me.deliveries.clone().acquire_owned().await {
                                Ok(_permit) => me.outbox.deliver(c).await,
                                Err(_) => return,
                            };
                            out.fetch_sub(1, Ordering::AcqRel);
                            let _ = tx.send(d);
                            // A sibling pump may be idle while this one waits.
                            wake.notify_one();
                        });
                    }
                    if busy {
                        // A full batch: there may be more; recruit a sibling too.
                        wake.notify_one();
                    }
                }
                Err(e) => {
                    // The connection may be what failed: take a fresh one.
                    conn = None;
                    failures += 1;
                    tracing::warn!(error = %e, outcomes = done.len(), "pipeline cycle failed");
                    if failures >= RECORD_RETRIES {
                        // Left to their leases: the sweep hands them out again.
                        done.clear();
                    }
                }
            }
            if busy {
                continue;
            }
            let first_done = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => None,
                d = done_rx.recv() => d,
                _ = tokio::time::sleep(self.cfg.poll) => None,
            };
            if let Some(d) = first_done {
                done.push(d);
                // Deliveries leased together finish together: gather the rest
                // of the burst (briefly) so their outcomes share one commit.
                let until = tokio::time::Instant::now() + RECORD_LINGER;
                while out.load(Ordering::Acquire) > 0 {
                    match tokio::time::timeout_at(until, done_rx.recv()).await {
                        Ok(Some(d)) => done.push(d),
                        _ => break,
                    }
                }
            }
        }
        // Record what is still out (bounded: a stuck send is the lease's).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while out.load(Ordering::Acquire) > 0 {
            match tokio::time::timeout_at(deadline, done_rx.recv()).await {
                Ok(Some(d)) => done.push(d),
                _ => break,
            }
        }
        while let Ok(d) = done_rx.try_recv() {
            done.push(d);
        }
        if !done.is_empty() {
            if let Err(e) = self.record_only(done).await {
                tracing::warn!(error = %e, "recording outcomes at shutdown failed");
            }
        }
    }

    async fn record_only(&self, done: Vec<Delivery>) -> Result<(), EngineError> {
        let mut tx = crate::store::begin_queue_tx(self.engine.pool()).await?;
        self.outbox.record_all(&mut tx, done).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// When a pump's generic plans are made again: a plan keeps the index
/// choices of the table sizes it was made at, and one made while a table
/// was nearly empty probed every row of a tenant per lookup once the table
/// had grown (121 ms for a claim of 19 effects, measured with
/// `auto_explain`). The planner reads a table's current size, so replanning
/// as the work grows (after 64, 256, 1,024, … rows of work), when this
/// process refreshed the statistics, and every [`crate::store::REPLAN_AFTER`]
/// keeps the plans matched to the tables for a few milliseconds of planning.
struct Plans {
    epoch: u64,
    at: tokio::time::Instant,
    work: usize,
    next: usize,
}

impl Plans {
    fn new() -> Self {
        Plans {
            epoch: crate::store::stats_epoch(),
            at: tokio::time::Instant::now(),
            work: 0,
            next: 64,
        }
    }

    fn worked(&mut self, rows: usize) {
        self.work = self.work.saturating_add(rows);
    }

    /// Whether to replan now (and count from here if so).
    fn stale(&mut self) -> bool {
        let epoch = crate::store::stats_epoch();
        let grown = self.work >= self.next;
        if !grown && epoch == self.epoch && self.at.elapsed() < crate::store::REPLAN_AFTER {
            return false;
        }
        if grown {
            self.next = self.next.saturating_mul(4);
        }
        self.epoch = epoch;
        self.at = tokio::time::Instant::now();
        true
    }
}

/// Wake `wake` on every notification that work of one of `kinds` was
/// queued (and whenever the hub resumed listening: anything may have been
/// missed); the pumps' poll interval covers the time the hub is down.
pub async fn wake_on_notes(
    hub: Hub,
    kinds: Vec<String>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut rx = hub.subscribe();
    let wanted = |n: &Note| match n {
        Note::Resumed => true,
        n => {
            (n.is(SIGNAL_QUEUED_CHANNEL) || n.is(EFFECT_QUEUED_CHANNEL))
                && kinds.iter().any(|k| k == n.payload())
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ok = notify::next(&mut rx, wanted) => {
                if !ok { break; }
                wake.notify_one();
            }
        }
    }
}
