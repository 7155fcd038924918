//! Background work: apalis workers that apply signals and run effects, the
//! timer loop, and the sweep that recovers lost jobs and expired leases.
//!
//! apalis (apalis-postgres) carries jobs: its table, `SKIP LOCKED` batch claims,
//! LISTEN/NOTIFY wake-ups and heartbeats. Around it (APALIS.md):
//! - each worker is woken by pubsub **and** a fixed-interval poll of our own
//!   ([`WakeStrategy`]), because either alone can fall asleep until a heartbeat;
//! - jobs run once; attempts and backoff live in our tables;
//! - a worker that stops on a backend error is restarted by a supervisor with
//!   backoff and a fresh name;
//! - every handler is idempotent (fenced on workflow version / effect attempt),
//!   since a crash before the asynchronous ack re-runs a job.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::*;
use apalis_postgres::{Config as QueueConfig, PostgresStorage};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tracing::Instrument;

use crate::delivery::Inbound;
use crate::engine::{Engine, TIMER_CHANNEL};
use crate::notify::{Hub, Note, APALIS_INSERT_CHANNEL};
use crate::outbox::Outbox;
use crate::pipeline::{self, Pump, PumpConfig};
use crate::schedules::Scheduler;
use crate::store::jobs::{self, ApplyJob, EffectJob, Envelope, InboundJob, INBOUND_QUEUE};
use crate::store::{effects, signals, timers};

/// Worker tuning.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs handled at once per queue.
    pub concurrency: usize,
    /// Jobs claimed per fetch.
    pub batch_size: usize,
    /// Workflows one apply transaction claims (`DISPATCH_APPLY_BATCH`).
    pub apply_batch: i64,
    /// Effects one effect batch leases (`DISPATCH_EFFECT_BATCH`).
    pub effect_batch: i64,
    /// Pipeline pumps per process (`DISPATCH_PUMPS`).
    pub pumps: usize,
    /// Deliveries in progress at once per process (`DISPATCH_DELIVERIES`).
    pub deliveries: usize,
    /// Fallback poll interval (LISTEN/NOTIFY is the fast path).
    pub poll_interval: Duration,
    /// apalis heartbeat.
    pub heartbeat: Duration,
    /// How often the sweep runs.
    pub sweep_interval: Duration,
    /// How long something may look lost before the sweep re-enqueues it.
    pub sweep_grace: Duration,
    /// How long finished jobs, and finished workflows' signals, are kept
    /// (`DISPATCH_RETENTION_MS`; the hourly `purge` schedule removes older ones).
    pub job_retention: Duration,
    /// How long shutdown waits for in-flight jobs.
    pub shutdown_grace: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            batch_size: 20,
            apply_batch: 128,
            effect_batch: 32,
            pumps: 2,
            deliveries: 16,
            poll_interval: Duration::from_millis(500),
            heartbeat: Duration::from_secs(5),
            sweep_interval: Duration::from_secs(5),
            sweep_grace: Duration::from_secs(30),
            job_retention: Duration::from_secs(24 * 3600),
            shutdown_grace: Duration::from_secs(20),
        }
    }
}

/// Wakes a worker on a NOTIFY for its queue or on a fixed interval, whichever
/// comes first. Unlike apalis' combinator it polls every source each time, so
/// a waker is always registered with each (no lost wake-ups).
struct WakeStrategy {
    inserted: Arc<tokio::sync::Notify>,
    notified: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    interval: tokio::time::Interval,
}

impl WakeStrategy {
    fn new(inserted: Arc<tokio::sync::Notify>, every: Duration) -> Self {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            notified: Self::wait(&inserted),
            inserted,
            interval,
        }
    }

    fn wait(n: &Arc<tokio::sync::Notify>) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let n = n.clone();
        Box::pin(async move { n.notified().await })
    }
}

/// Route apalis' insert notifications from the hub to each queue's worker.
/// Every wake-up of an apalis worker is a fetch, so a queue is woken only
/// for its own jobs (and when the hub resumed: anything may have been missed).
fn route_inserts(
    hub: &Hub,
    queues: &[String],
    shutdown: CancellationToken,
) -> Vec<Arc<tokio::sync::Notify>> {
    let senders: Vec<Arc<tokio::sync::Notify>> = queues
        .iter()
        .map(|_| Arc::new(tokio::sync::Notify::new()))
        .collect();
    let receivers = senders.clone();
    let queues = queues.to_vec();
    let mut rx = hub.subscribe();
    tokio::spawn(async move {
        let all = |senders: &[Arc<tokio::sync::Notify>]| {
            for s in senders {
                s.notify_one();
            }
        };
        loop {
            let note = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = rx.recv() => n,
            };
            match note {
                Ok(Note::Resumed) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    all(&senders)
                }
                Ok(n) if n.is(APALIS_INSERT_CHANNEL) => {
                    let Ok(v) = serde_json::from_str::<Value>(n.payload()) else {
                        continue;
                    };
                    if let Some(i) = queues.iter().position(|q| v["job_type"] == q.as_str()) {
                        senders[i].notify_one();
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    receivers
}

impl PollStrategy for WakeStrategy {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let mut fired = false;
        while self.notified.as_mut().poll(cx).is_ready() {
            fired = true;
            self.notified = Self::wait(&self.inserted);
        }
        while self.interval.poll_tick(cx).is_ready() {
            fired = true;
        }
        if fired {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}

#[derive(Clone)]
struct Handlers {
    engine: Engine,
    outbox: Outbox,
    inbound: Arc<dyn Inbound>,
}

async fn handle(job: Value, h: Data<Arc<Handlers>>) -> Result<(), BoxDynError> {
    // Always decodable at the transport; decode and version here (APALIS.md §7).
    let env: Envelope = match serde_json::from_value(job) {
        Ok(env) => env,
        Err(e) => {
            tracing::error!(error = %e, "job envelope does not decode; dropped");
            return Ok(());
        }
    };
    if env.v != jobs::ENVELOPE_V {
        tracing::error!(v = env.v, "unknown job envelope version; dropped");
        return Ok(());
    }
    match env.kind.as_str() {
        // A span per job: ids only, never personal data.
        "apply" => {
            let job: ApplyJob = serde_json::from_value(env.body)?;
            let span = tracing::info_span!("job", job.kind = "apply", tenant.id = %job.tenant_id, workflow.id = %job.workflow_id);
            h.engine
                .apply_pending(job.tenant_id, job.workflow_id)
                .instrument(span)
                .await?;
        }
        "effect" => {
            let job: EffectJob = serde_json::from_value(env.body)?;
            let span = tracing::info_span!("job", job.kind = "effect", tenant.id = %job.tenant_id, effect.id = %job.effect_id);
            h.outbox
                .run(job.tenant_id, job.effect_id, job.after_attempts)
                .instrument(span)
                .await?;
        }
        "inbound" => {
            let job: InboundJob = serde_json::from_value(env.body)?;
            let span = tracing::info_span!("job", job.kind = "inbound", tenant.id = %job.tenant_id, inbound.id = %job.inbound_id);
            h.inbound
                .process(&h.engine, job.tenant_id, job.inbound_id)
                .instrument(span)
                .await?;
        }
        other => tracing::error!(kind = other, "unknown job kind; dropped"),
    }
    Ok(())
}

/// Run one queue's worker until shutdown, restarting it (fresh name, backoff)
/// whenever it stops on an error.
async fn supervise(
    queue: String,
    pool: PgPool,
    inserted: Arc<tokio::sync::Notify>,
    h: Arc<Handlers>,
    cfg: WorkerConfig,
    shutdown: CancellationToken,
) {
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "host".into());
    let mut delay = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let name = format!("{host}-{queue}-{}", Uuid::now_v7());
        let qc = QueueConfig::default()
            .queue(&queue)
            .batch_size(cfg.batch_size)
            .heartbeat_interval(cfg.heartbeat)
            .missed_heartbeats(3)
            .persist_results(true);
        let storage = PostgresStorage::<Value>::new(&pool).with_config(qc);
        let backend = PollWith::new(
            storage,
            // Woken by their own inserts through the hub (coalesced: one
            // wake-up fetches a batch), and by the poll, which drains a
            // backlog that arrived faster than the wake-ups.
            WakeStrategy::new(inserted.clone(), cfg.poll_interval),
        );
        let worker = WorkerBuilder::new(name.as_str())
            .backend(backend)
            .data(h.clone())
            .concurrency(cfg.concurrency)
            .build(handle);
        let stop = shutdown.clone();
        let run = worker.run_until(async move {
            stop.cancelled().await;
            Ok::<(), std::io::Error>(())
        });
        tokio::pin!(run);
        let result = tokio::select! {
            r = &mut run => r,
            _ = shutdown.cancelled() => {
                match tokio::time::timeout(cfg.shutdown_grace, &mut run).await {
                    Ok(r) => r,
                    Err(_) => { tracing::warn!(worker = %name, "shutdown grace elapsed; leaving in-flight jobs to recovery"); Ok(()) }
                }
            }
        };
        if shutdown.is_cancelled() {
            break;
        }
        match result {
            Ok(()) => tracing::warn!(worker = %name, "worker stopped; restarting"),
            Err(e) => tracing::error!(worker = %name, error = %e, "worker failed; restarting"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break,
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Fires due timers: turns every due timer into a queued signal (once
/// across processes), a burst of them in a few statements, and wakes the
/// pumps to apply them. Sleeps until the next due time, a NOTIFY that a
/// timer was armed, or the poll interval, whichever is first.
async fn timer_loop(
    pool: PgPool,
    cfg: WorkerConfig,
    kinds: Vec<String>,
    hub: Hub,
    wake: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let mut notes = hub.subscribe();
    while !shutdown.is_cancelled() {
        let wait = match fire_due_timers(&pool, &kinds, &wake).await {
            // Timers due close together fire together: a burst spread over
            // a second fires every few milliseconds as one statement and
            // one batch for the pumps, not one transaction per timer.
            Ok(next) => next
                .unwrap_or(cfg.poll_interval)
                .max(TIMER_COALESCE)
                .min(cfg.poll_interval),
            Err(e) => {
                tracing::warn!(error = %e, "timer loop error");
                cfg.poll_interval
            }
        };
        let mut until = tokio::time::Instant::now() + wait;
        // A timer armed meanwhile moves the wake-up earlier when it is due
        // sooner; one due later changes nothing (a burst of arms does not
        // make the loop look again each time).
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(until) => break,
                note = notes.recv() => match note {
                    Ok(crate::notify::Note::On { channel, payload }) if &*channel == TIMER_CHANNEL => {
                        match payload.parse::<u64>() {
                            Ok(ms) => {
                                let at = tokio::time::Instant::now() + Duration::from_millis(ms);
                                until = until.min(at.max(tokio::time::Instant::now() + TIMER_COALESCE));
                            }
                            Err(_) => break,
                        }
                    }
                    Ok(crate::notify::Note::On { .. }) => {}
                    // Resumed or lagged: anything may have been missed.
                    Ok(crate::notify::Note::Resumed)
                    | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        tokio::time::sleep_until(until).await;
                        break;
                    }
                },
            }
        }
    }
}

/// Fires recurring schedules (the runtime's purge among them) as they fall
/// due; a schedule written meanwhile is seen within a second.
async fn schedule_loop(scheduler: Scheduler, shutdown: CancellationToken) {
    if let Err(e) = scheduler.ensure_system().await {
        tracing::warn!(error = %e, "system schedules not created (retried at next start)");
    }
    while !shutdown.is_cancelled() {
        let wait = match scheduler.run_due().await {
            Ok((fired, next)) => {
                if fired.ticks > 0 {
                    tracing::debug!(ticks = fired.ticks, "schedules fired");
                }
                next.unwrap_or(SCHEDULE_RECHECK).min(SCHEDULE_RECHECK)
            }
            Err(e) => {
                tracing::warn!(error = %e, "schedule pass failed");
                SCHEDULE_RECHECK
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Longest a schedule loop sleeps (a new schedule may be due sooner).
const SCHEDULE_RECHECK: Duration = Duration::from_secs(1);

/// Timers fired per statement.
const TIMER_BATCH: i64 = 1000;

/// Shortest sleep of the timer loop: timers due within it of each other are
/// fired together (measured: 2,000 timers spread over one second, fired one
/// by one as each fell due, woke the pumps 2,000 times for one workflow each
/// and ran 1.1–1.7 s late at p50).
const TIMER_COALESCE: Duration = Duration::from_millis(5);

/// Timers of the kinds this process serves only: another kind's timers are
/// fired by its own workers (and wait while it has none).
async fn fire_due_timers(
    pool: &PgPool,
    kinds: &[String],
    wake: &tokio::sync::Notify,
) -> Result<Option<Duration>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    loop {
        // The queue-transaction settings: the claim's cached plan is the
        // index plan whatever the table sizes were when it was prepared.
        let mut tx = crate::store::begin_queue_tx_on(&mut conn).await?;
        let late = timers::fire_due(&mut tx, TIMER_BATCH, kinds).await?;
        tx.commit().await?;
        if !late.is_empty() {
            wake.notify_one();
            for (kind, l) in &late {
                metrics::histogram!(crate::metrics::TIMER_LATENESS, "kind" => kind.clone())
                    .record(l.max(0.0));
            }
        }
        if (late.len() as i64) < TIMER_BATCH {
            break;
        }
    }
    Ok(timers::next_due_in_ms(&mut conn)
        .await?
        .map(|ms| Duration::from_millis(ms as u64 + 1)))
}

/// One sweep pass: re-enqueue what looks lost. Returns how many jobs it made.
/// Only the `kinds` this process serves are swept: work of an unserved kind
/// waits for a worker that serves it (whose sweep then picks it up).
pub async fn sweep_once(
    pool: &PgPool,
    cfg: &WorkerConfig,
    kinds: &[String],
) -> Result<usize, sqlx::Error> {
    let grace = cfg.sweep_grace.as_millis() as i64;
    let mut tx = pool.begin().await?;
    // One sweep job per workflow per grace period, however many processes sweep.
    let bucket = chrono::Utc::now().timestamp_millis() / grace.max(1);
    // Work is "lost" only once it is older than the grace *plus* how far the
    // queue is behind: under a backlog the jobs exist, they are just waiting,
    // and re-enqueueing every waiting workflow each grace period would bury
    // the queue under duplicates (seen in the chaos run: 187,000 pending
    // apply jobs for 6,600 workflows, throughput down to 5 signals/s).
    let apply_queues: Vec<String> = kinds.iter().map(|k| jobs::apply_queue(k)).collect();
    let apply_lag = jobs::queue_lag_ms(&mut tx, &apply_queues).await?;
    let inbound_lag = jobs::queue_lag_ms(&mut tx, &[jobs::INBOUND_QUEUE.to_string()]).await?;
    let stale = signals::stale_queued(&mut tx, grace + apply_lag, 500, kinds).await?;
    for (tenant_id, workflow_id, kind) in &stale {
        let job = ApplyJob {
            tenant_id: *tenant_id,
            workflow_id: *workflow_id,
        };
        jobs::enqueue_apply(
            &mut tx,
            kind,
            &job,
            Some(format!("sweep:{workflow_id}:{bucket}")),
        )
        .await?;
    }
    let inbound = crate::store::providers::stale_inbound(&mut tx, grace + inbound_lag, 500).await?;
    for (tenant_id, inbound_id) in &inbound {
        let job = InboundJob {
            tenant_id: *tenant_id,
            inbound_id: *inbound_id,
        };
        jobs::enqueue_inbound(&mut tx, &job, format!("sweep:in:{inbound_id}:{bucket}")).await?;
    }
    let released = effects::recover(&mut tx).await?;
    tx.commit().await?;
    let made = stale.len() + inbound.len();
    if made > 0 || released > 0 {
        tracing::warn!(
            signals = stale.len(),
            inbound = inbound.len(),
            effects_released = released,
            "sweep recovered lost work"
        );
    }
    Ok(made)
}

async fn sweep_loop(
    pool: PgPool,
    cfg: WorkerConfig,
    kinds: Vec<String>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(cfg.sweep_interval) => {}
        }
        if let Err(e) = sweep_once(&pool, &cfg, &kinds).await {
            tracing::warn!(error = %e, "sweep failed");
        }
        match crate::store::refresh_stats(&pool).await {
            Ok(tables) if !tables.is_empty() => {
                tracing::debug!(tables = ?tables, "planner statistics refreshed");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "refreshing planner statistics failed"),
        }
    }
}

/// Spawn every background task of the worker role; they stop when `shutdown`
/// is cancelled, draining in-flight jobs for up to the shutdown grace.
#[allow(clippy::too_many_arguments)] // each is a separate part start-up wires in
pub fn spawn(
    engine: Engine,
    outbox: Outbox,
    inbound: Arc<dyn Inbound>,
    hub: Hub,
    wake: Arc<tokio::sync::Notify>,
    served: &[&str],
    cfg: WorkerConfig,
    shutdown: CancellationToken,
) -> tokio::task::JoinSet<()> {
    let pool = engine.pool().clone();
    // An apply and an effect queue per workflow kind this process serves
    // (ENABLED_WORKFLOWS); intake is shared.
    let mut queues: Vec<String> = served
        .iter()
        .flat_map(|kind| [jobs::apply_queue(kind), jobs::effect_queue(kind)])
        .collect();
    queues.push(INBOUND_QUEUE.to_string());
    let kinds: Vec<String> = served.iter().map(|k| k.to_string()).collect();
    let mut set = tokio::task::JoinSet::new();
    // The pipeline: pumps apply, lease and record in one transaction per
    // cycle; deliveries run beside them, at most `deliveries` at a time.
    let deliveries = Arc::new(tokio::sync::Semaphore::new(cfg.deliveries.max(1)));
    let pump_cfg = PumpConfig {
        apply_batch: cfg.apply_batch,
        effect_batch: cfg.effect_batch,
        in_flight: (cfg.effect_batch as usize * 2).max(cfg.deliveries),
        poll: cfg.poll_interval,
    };
    for _ in 0..cfg.pumps.max(1) {
        let pump = Arc::new(Pump::new(
            engine.clone(),
            outbox.clone(),
            kinds.clone(),
            pump_cfg.clone(),
            deliveries.clone(),
        ));
        set.spawn(pump.run(wake.clone(), shutdown.clone()));
    }
    set.spawn(pipeline::wake_on_notes(
        hub.clone(),
        kinds.clone(),
        wake.clone(),
        shutdown.clone(),
    ));
    let engine_for_schedules = engine.clone();
    let h = Arc::new(Handlers {
        engine,
        outbox,
        inbound,
    });
    let inserted = route_inserts(&hub, &queues, shutdown.clone());
    for (queue, inserted) in queues.into_iter().zip(inserted) {
        set.spawn(supervise(
            queue,
            pool.clone(),
            inserted,
            h.clone(),
            cfg.clone(),
            shutdown.clone(),
        ));
    }
    set.spawn(timer_loop(
        pool.clone(),
        cfg.clone(),
        kinds.clone(),
        hub.clone(),
        wake.clone(),
        shutdown.clone(),
    ));
    let scheduler = Scheduler::new(engine_for_schedules, cfg.job_retention);
    set.spawn(schedule_loop(scheduler, shutdown.clone()));
    set.spawn(sweep_loop(pool, cfg, kinds, shutdown));
    set
}
