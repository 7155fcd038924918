//! Running outbox effects: claim one attempt, deliver through a channel,
//! record the outcome fenced on that attempt.
//!
//! Failures are classified in the type ([`ChannelError`]): transient ones are
//! retried with backon's exponential policy (honouring a provider's
//! `Retry-After`), permanent ones and exhausted attempts dead-letter the effect
//! and flag the workflow for ops. The retry is a new job with a future run time,
//! written in the same transaction that records the failure (APALIS.md §3).
//! An effect with a `reply` feeds its result back as a signal.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};
use tracing::instrument;
use uuid::Uuid;

use crate::delivery::Deliver;
pub use crate::delivery::{ChannelError, Sent};
use crate::engine::EngineError;
use crate::metrics as m;
use crate::store::effects::{self, EffectRow};
use crate::store::signals::{self, NewSignal};
use crate::store::{hash_json, workflows as wf_store};

/// What happened to one effect job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EffectOutcome {
    /// Nothing to do: already delivered, dead, or running elsewhere.
    Skipped,
    /// Delivered now.
    Delivered,
    /// Failed transiently; a retry is scheduled.
    Retrying,
    /// Dead-lettered.
    Dead,
    /// Another worker took the attempt over meanwhile; our result was dropped.
    Fenced,
    /// Waiting for a rate-limit slot; rescheduled without counting an attempt.
    Deferred,
}

/// Retry policy and lease for effects.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// First retry delay.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// How long one attempt may hold an effect before the sweep takes it back.
    pub lease: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(300),
            lease: Duration::from_secs(60),
        }
    }
}

/// Fault points for crash tests (`DISPATCH_FAULT`): the process aborts at the
/// named point, like a `kill -9`. Unset in production.
pub(crate) fn fault(point: &str) {
    if std::env::var("DISPATCH_FAULT").is_ok_and(|v| v.split(',').any(|p| p == point)) {
        tracing::error!(fault = point, "fault injection: aborting");
        std::process::abort();
    }
}

pub use crate::store::effects::EFFECT_QUEUED_CHANNEL;

/// Deliveries one batch runs at once (each holds a connection while it sends).
const DELIVERIES_AT_ONCE: usize = 8;

/// An effect leased for delivery, with its tenant's configuration.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The leased attempt.
    pub effect: EffectRow,
    /// The tenant's configuration, read with the claim.
    pub config: Option<std::sync::Arc<Value>>,
}

/// One delivered (or failed) attempt, waiting to be recorded.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The attempt.
    pub effect: EffectRow,
    /// What the channel said.
    pub result: Result<Sent, ChannelError>,
}

/// The effect runner.
#[derive(Clone)]
pub struct Outbox {
    pool: PgPool,
    config: OutboxConfig,
    deliver: Arc<dyn Deliver>,
}

impl Outbox {
    /// Build over a pool; effects are carried out by `deliver`.
    pub fn new(pool: PgPool, config: OutboxConfig, deliver: Arc<dyn Deliver>) -> Self {
        Self {
            pool,
            config,
            deliver,
        }
    }

    fn backoff(&self, attempt: i32, retry_after: Option<Duration>) -> Duration {
        let policy = ExponentialBuilder::default()
            .with_min_delay(self.config.retry_min)
            .with_max_delay(self.config.retry_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build();
        let delay = policy
            .take(attempt.max(1) as usize)
            .last()
            .unwrap_or(self.config.retry_min);
        retry_after.map_or(delay, |ra| ra.max(delay))
    }

    /// Run one attempt of an effect (an apalis job from the sweep: a lost
    /// or stranded effect). The loops run effects in batches ([`Outbox::run_batch`]).
    #[instrument(skip_all, fields(tenant.id = %tenant_id, effect.id = %effect_id, workflow.id = tracing::field::Empty))]
    pub async fn run(
        &self,
        tenant_id: Uuid,
        effect_id: Uuid,
        after_attempts: Option<i32>,
    ) -> Result<EffectOutcome, EngineError> {
        fault("before_effect");
        let lease_ms = self.config.lease.as_millis() as i64;
        let mut conn = self.pool.acquire().await?;
        let Some(effect) =
            effects::claim(&mut conn, tenant_id, effect_id, lease_ms, after_attempts).await?
        else {
            return Ok(EffectOutcome::Skipped);
        };
        tracing::Span::current().record("workflow.id", tracing::field::display(effect.workflow_id));
        let result = self.attempt(&mut conn, &effect, None).await;
        drop(conn);
        fault("after_delivery");
        let mut tx = self.pool.begin().await?;
        let outcome = self.record(&mut tx, &effect, result).await?;
        if outcome != EffectOutcome::Fenced {
            tx.commit().await?;
        }
        Ok(outcome)
    }

    /// Run up to `limit` due effects of `kinds` on their own: lease them in
    /// one statement, deliver them concurrently, record every outcome in one
    /// transaction. The worker pipeline does the same with its claim and
    /// record folded into its own transactions ([`Outbox::claim_in`],
    /// [`Outbox::record_all`]). Returns how many were claimed.
    #[instrument(skip_all, fields(batch.size = tracing::field::Empty))]
    pub async fn run_batch(&self, kinds: &[String], limit: i64) -> Result<usize, EngineError> {
        let mut tx = self.pool.begin().await?;
        let claimed = self.claim_in(&mut tx, kinds, limit).await?;
        if claimed.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        // The claim is not committed yet: dying here leaves every effect pending.
        fault("before_effect");
        tx.commit().await?;
        let n = claimed.len();
        tracing::Span::current().record("batch.size", n);
        let results: Vec<Delivery> = futures::stream::iter(claimed)
            .map(|c| self.deliver(c))
            .buffer_unordered(DELIVERIES_AT_ONCE)
            .collect()
            .await;
        let mut tx = self.pool.begin().await?;
        self.record_all(&mut tx, results).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Lease up to `limit` due effects of `kinds` in the caller's transaction
    /// (effects it wrote itself included), each with its tenant's
    /// configuration read once for the batch. They must be delivered only
    /// after that transaction commits.
    pub async fn claim_in(
        &self,
        tx: &mut PgConnection,
        kinds: &[String],
        limit: i64,
    ) -> Result<Vec<Claimed>, EngineError> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        let lease_ms = self.config.lease.as_millis() as i64;
        let claimed = effects::claim_due(&mut *tx, kinds, limit, lease_ms).await?;
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        let mut tenants: Vec<Uuid> = claimed.iter().map(|e| e.tenant_id).collect();
        tenants.sort_unstable();
        tenants.dedup();
        let configs = crate::store::tenants::configs(&mut *tx, &tenants).await?;
        Ok(claimed
            .into_iter()
            .map(|effect| {
                let config = configs.get(&effect.tenant_id).cloned();
                Claimed { effect, config }
            })
            .collect())
    }

    /// Deliver one leased effect (after the claim committed). Never fails:
    /// a failure is the delivery's result, recorded like any other.
    pub async fn deliver(&self, c: Claimed) -> Delivery {
        let result = match self.pool.acquire().await {
            Ok(mut conn) => {
                self.attempt(&mut conn, &c.effect, c.config.as_deref())
                    .await
            }
            Err(e) => Err(ChannelError::transient(format!("no connection: {e}"))),
        };
        // Sent (or failed) but not recorded: dying here must not lose or
        // double what went out (the ledger, then the lease, see to it).
        fault("after_delivery");
        Delivery {
            effect: c.effect,
            result,
        }
    }

    /// Record deliveries' outcomes in the caller's transaction (fenced each
    /// on its attempt). Returns how many were recorded (not fenced).
    pub async fn record_all(
        &self,
        tx: &mut PgConnection,
        deliveries: Vec<Delivery>,
    ) -> Result<usize, EngineError> {
        // Plain successes (no reply signal to queue) are written as one set;
        // every other outcome one by one.
        let (plain, rest): (Vec<Delivery>, Vec<Delivery>) = deliveries
            .into_iter()
            .partition(|d| d.result.is_ok() && d.effect.reply.is_none());
        let mut recorded = 0;
        if !plain.is_empty() {
            let attempts: Vec<effects::DeliveredAttempt<'_>> = plain
                .iter()
                .filter_map(|d| {
                    let sent = d.result.as_ref().ok()?;
                    Some(effects::DeliveredAttempt {
                        effect: &d.effect,
                        result: &sent.result,
                        log: sent
                            .log
                            .as_ref()
                            .map(|l| (l.recipient.as_str(), l.body.as_str())),
                    })
                })
                .collect();
            recorded += effects::delivered_all(&mut *tx, &attempts).await?.len();
        }
        for d in rest {
            // A fenced outcome wrote nothing (the fence is each branch's first write).
            if self.record(&mut *tx, &d.effect, d.result).await? != EffectOutcome::Fenced {
                recorded += 1;
            }
        }
        Ok(recorded)
    }

    /// Deliver one claimed attempt, inside its lease.
    async fn attempt(
        &self,
        conn: &mut PgConnection,
        effect: &EffectRow,
        config: Option<&Value>,
    ) -> Result<Sent, ChannelError> {
        // An attempt must end inside its lease, or the sweep would hand the
        // effect to another worker while this one may still be sending.
        let budget = self.config.lease.mul_f64(0.8);
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(
            budget,
            self.deliver
                .deliver(conn, effect, config, effect.send_after),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ChannelError::transient(
                "delivery timed out inside its lease",
            )),
        };
        if !matches!(result, Err(ChannelError::Deferred { .. })) {
            let name = effect.name.clone();
            metrics::counter!(m::EFFECT_ATTEMPTS, "effect" => name.clone()).increment(1);
            metrics::histogram!(m::EFFECT_LATENCY, "effect" => name)
                .record(started.elapsed().as_secs_f64());
        }
        result
    }

    /// Record one attempt's outcome in the caller's transaction, fenced on
    /// the attempt: a stale one writes nothing and is `Fenced`.
    async fn record(
        &self,
        tx: &mut PgConnection,
        effect: &EffectRow,
        result: Result<Sent, ChannelError>,
    ) -> Result<EffectOutcome, EngineError> {
        let tenant_id = effect.tenant_id;
        let name = effect.name.clone();
        let outcome = match result {
            Ok(Sent { mut result, log }) => {
                if let Some(log) = log {
                    // The log channel's message is this row: written with the
                    // outcome, once (a repeat reports the first row's id).
                    result["message_id"] = json!(log.write(&mut *tx, effect).await?);
                }
                if !effects::delivered(&mut *tx, tenant_id, effect.id, effect.attempts, &result)
                    .await?
                {
                    return Ok(EffectOutcome::Fenced);
                }
                if let Some(reply) = &effect.reply {
                    reply_signal(&mut *tx, effect, reply, &result).await?;
                }
                tracing::debug!(effect.name = %effect.name, attempt = effect.attempts, "effect delivered");
                EffectOutcome::Delivered
            }
            Err(ChannelError::Deferred { until }) => {
                // Picked up again shortly before the reserved slot; the router
                // then waits for the slot itself.
                let wake = until - chrono::Duration::seconds(2);
                if !effects::defer(&mut *tx, tenant_id, effect.id, effect.attempts, wake, until)
                    .await?
                {
                    return Ok(EffectOutcome::Fenced);
                }
                EffectOutcome::Deferred
            }
            Err(ChannelError::Transient {
                message,
                retry_after,
            }) if effect.attempts < effect.max_attempts => {
                let delay = self.backoff(effect.attempts, retry_after);
                if effects::retry_after(
                    &mut *tx,
                    tenant_id,
                    effect.id,
                    effect.attempts,
                    delay,
                    &message,
                )
                .await?
                .is_none()
                {
                    return Ok(EffectOutcome::Fenced);
                }
                tracing::warn!(effect.name = %effect.name, attempt = effect.attempts, delay_ms = delay.as_millis() as u64, error = %message, "effect failed, retrying");
                metrics::counter!(m::EFFECT_FAILURES, "effect" => name.clone(), "class" => "transient").increment(1);
                EffectOutcome::Retrying
            }
            Err(e) => {
                let message = e.to_string();
                if !effects::dead(&mut *tx, tenant_id, effect.id, effect.attempts, &message).await?
                {
                    return Ok(EffectOutcome::Fenced);
                }
                let why = format!("effect `{}` dead-lettered", effect.name);
                wf_store::set_attention(&mut *tx, tenant_id, effect.workflow_id, &why).await?;
                let (version, state): (i64, String) = sqlx::query_as(
                    "select version, state_name from workflows where tenant_id = $1 and id = $2",
                )
                .bind(tenant_id)
                .bind(effect.workflow_id)
                .fetch_one(&mut *tx)
                .await?;
                wf_store::append_history(
                    &mut *tx,
                    tenant_id,
                    effect.workflow_id,
                    &wf_store::NewEvent::note(
                        version,
                        "effect_dead",
                        "system",
                        &state,
                        &message,
                        json!([{"effect": effect.name, "idempotency_key": effect.idempotency_key}]),
                    ),
                )
                .await?;
                tracing::error!(effect.name = %effect.name, attempt = effect.attempts, error = %message, "effect dead-lettered");
                metrics::counter!(m::EFFECT_FAILURES, "effect" => name.clone(), "class" => "dead")
                    .increment(1);
                EffectOutcome::Dead
            }
        };
        Ok(outcome)
    }
}

async fn reply_signal(
    conn: &mut PgConnection,
    effect: &EffectRow,
    reply: &str,
    result: &Value,
) -> Result<(), EngineError> {
    let key = format!("effect:{}", effect.id);
    let new = NewSignal {
        tenant_id: effect.tenant_id,
        workflow_id: effect.workflow_id,
        idempotency_key: &key,
        name: reply,
        payload: result,
        request_hash: &hash_json(&json!({"effect": effect.id})),
        actor_role: "system",
        actor_subject: None,
        received_at: None,
        origin: None,
        wake: false,
    };
    if signals::insert(&mut *conn, &new).await?.is_some() {
        let kind = workflow_kind(&mut *conn, effect).await?;
        signals::wake_appliers(&mut *conn, &kind).await?;
    }
    Ok(())
}

/// The kind of an effect's workflow (its jobs go to that kind's queues).
async fn workflow_kind(conn: &mut PgConnection, effect: &EffectRow) -> Result<String, sqlx::Error> {
    let (kind,): (String,) =
        sqlx::query_as("select kind from workflows where tenant_id = $1 and id = $2")
            .bind(effect.tenant_id)
            .bind(effect.workflow_id)
            .fetch_one(conn)
            .await?;
    Ok(kind)
}
