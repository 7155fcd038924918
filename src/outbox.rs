//! Running outbox effects: claim one attempt, deliver through a channel,
//! record the outcome fenced on that attempt.
//!
//! Failures are classified in the type ([`ChannelError`]): transient ones are
//! retried with backon's exponential policy (honouring a provider's
//! `Retry-After`), permanent ones and exhausted attempts dead-letter the effect
//! and flag the workflow for ops. The retry is a new job with a future run time,
//! written in the same transaction that records the failure (APALIS.md §3).
//! An effect with a `reply` feeds its result back as a signal.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};
use tracing::instrument;
use uuid::Uuid;
use workflows::dispatch::effects as dispatch_effects;
use workflows::lead::{short_id, CrewLeadView, FullLead};

use crate::engine::EngineError;
use crate::store::effects::{self, EffectRow};
use crate::store::jobs::{self, ApplyJob, EffectJob};
use crate::store::signals::{self, NewSignal};
use crate::store::{hash_json, tenants, workflows as wf_store};

/// How a delivery failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChannelError {
    /// Worth retrying (timeouts, 5xx, 429).
    #[error("transient: {message}")]
    Transient {
        /// Classified description (never personal data).
        message: String,
        /// The provider's `Retry-After`, if it gave one.
        retry_after: Option<Duration>,
    },
    /// Will never succeed (4xx, unknown effect).
    #[error("permanent: {message}")]
    Permanent {
        /// Classified description.
        message: String,
    },
}

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
fn fault(point: &str) {
    if std::env::var("DISPATCH_FAULT").is_ok_and(|v| v.split(',').any(|p| p == point)) {
        tracing::error!(fault = point, "fault injection: aborting");
        std::process::abort();
    }
}

/// The effect runner.
#[derive(Clone)]
pub struct Outbox {
    pool: PgPool,
    config: OutboxConfig,
}

impl Outbox {
    /// Build over a pool.
    pub fn new(pool: PgPool, config: OutboxConfig) -> Self {
        Self { pool, config }
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

    /// Run one attempt of an effect.
    #[instrument(skip_all, fields(effect.id = %effect_id, workflow.id = tracing::field::Empty))]
    pub async fn run(
        &self,
        tenant_id: Uuid,
        effect_id: Uuid,
    ) -> Result<EffectOutcome, EngineError> {
        fault("before_effect");
        let lease_ms = self.config.lease.as_millis() as i64;
        let mut conn = self.pool.acquire().await?;
        let Some(effect) = effects::claim(&mut conn, tenant_id, effect_id, lease_ms).await? else {
            return Ok(EffectOutcome::Skipped);
        };
        tracing::Span::current().record("workflow.id", tracing::field::display(effect.workflow_id));
        let result = deliver(&mut conn, &effect).await;
        drop(conn);
        fault("after_delivery");
        let mut tx = self.pool.begin().await?;
        let outcome = match result {
            Ok(result) => {
                if !effects::delivered(&mut tx, tenant_id, effect.id, effect.attempts, &result)
                    .await?
                {
                    return Ok(EffectOutcome::Fenced);
                }
                if let Some(reply) = &effect.reply {
                    reply_signal(&mut tx, &effect, reply, &result).await?;
                }
                tracing::info!(effect.name = %effect.name, attempt = effect.attempts, "effect delivered");
                EffectOutcome::Delivered
            }
            Err(ChannelError::Transient {
                message,
                retry_after,
            }) if effect.attempts < effect.max_attempts => {
                let delay = self.backoff(effect.attempts, retry_after);
                let next = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                if !effects::retry_at(
                    &mut tx,
                    tenant_id,
                    effect.id,
                    effect.attempts,
                    next,
                    &message,
                )
                .await?
                {
                    return Ok(EffectOutcome::Fenced);
                }
                let job = EffectJob {
                    tenant_id,
                    effect_id: effect.id,
                };
                let key = format!("eff:{}:{}", effect.id, effect.attempts + 1);
                jobs::enqueue_effect(&mut tx, &job, Some(next), Some(key)).await?;
                tracing::warn!(effect.name = %effect.name, attempt = effect.attempts, delay_ms = delay.as_millis() as u64, error = %message, "effect failed, retrying");
                EffectOutcome::Retrying
            }
            Err(e) => {
                let message = e.to_string();
                if !effects::dead(&mut tx, tenant_id, effect.id, effect.attempts, &message).await? {
                    return Ok(EffectOutcome::Fenced);
                }
                let why = format!("effect `{}` dead-lettered", effect.name);
                wf_store::set_attention(&mut tx, tenant_id, effect.workflow_id, &why).await?;
                let (version, state): (i64, String) = sqlx::query_as(
                    "select version, state_name from workflows where tenant_id = $1 and id = $2",
                )
                .bind(tenant_id)
                .bind(effect.workflow_id)
                .fetch_one(&mut *tx)
                .await?;
                wf_store::append_history(
                    &mut tx,
                    tenant_id,
                    effect.workflow_id,
                    &wf_store::NewEvent {
                        version,
                        event: "effect_dead",
                        signal_id: None,
                        signal_name: None,
                        actor_role: Some("system"),
                        actor_subject: None,
                        from_state: Some(&state),
                        to_state: Some(&state),
                        reason: Some(&message),
                        commands: json!([{"effect": effect.name, "idempotency_key": effect.idempotency_key}]),
                    },
                )
                .await?;
                tracing::error!(effect.name = %effect.name, attempt = effect.attempts, error = %message, "effect dead-lettered");
                EffectOutcome::Dead
            }
        };
        tx.commit().await?;
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
    };
    if signals::insert(&mut *conn, &new).await?.is_some() {
        let job = ApplyJob {
            tenant_id: effect.tenant_id,
            workflow_id: effect.workflow_id,
        };
        jobs::enqueue_apply(&mut *conn, &job, Some(key)).await?;
    }
    Ok(())
}

/// The built-in `log` channel: renders the message and records it in
/// `deliveries`, once per idempotency key (a repeat returns the first delivery).
///
/// Testing aid: tenant config `{"log_channel": {"fail_first": N, "failure":
/// "transient"|"permanent"}}` makes the first N attempts of every effect fail.
async fn deliver(conn: &mut PgConnection, effect: &EffectRow) -> Result<Value, ChannelError> {
    let transient = |e: sqlx::Error| ChannelError::Transient {
        message: format!("database: {e}"),
        retry_after: None,
    };
    let config = tenants::config(&mut *conn, effect.tenant_id)
        .await
        .map_err(transient)?;
    if let Some(n) = config
        .pointer("/log_channel/fail_first")
        .and_then(Value::as_i64)
    {
        if i64::from(effect.attempts) <= n {
            let message = format!(
                "log channel: injected failure on attempt {}",
                effect.attempts
            );
            return Err(
                match config
                    .pointer("/log_channel/failure")
                    .and_then(Value::as_str)
                {
                    Some("permanent") => ChannelError::Permanent { message },
                    _ => ChannelError::Transient {
                        message,
                        retry_after: None,
                    },
                },
            );
        }
    }
    let (recipient, body) = render(conn, effect).await?;
    let id = effects::record_delivery(
        &mut *conn,
        effect.tenant_id,
        effect.id,
        "log",
        &effect.idempotency_key,
        &recipient,
        &effect.payload,
        &body,
    )
    .await
    .map_err(transient)?;
    Ok(json!({ "message_id": id.to_string(), "provider": "log", "chat_id": recipient }))
}

async fn render(
    conn: &mut PgConnection,
    effect: &EffectRow,
) -> Result<(String, String), ChannelError> {
    let permanent = |m: &str| ChannelError::Permanent {
        message: m.to_string(),
    };
    let p = &effect.payload;
    let lead_id: Uuid = p
        .get("lead_id")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| permanent("effect payload has no lead_id"))?;
    let short = short_id(lead_id);
    let executor = p
        .get("executor")
        .or(p.get("to"))
        .and_then(Value::as_str)
        .unwrap_or("");
    Ok(match effect.name.as_str() {
        dispatch_effects::PUBLISH => (
            "crew".into(),
            CrewLeadView::from_lead(lead_id, &load_lead(conn, effect).await?).render(),
        ),
        dispatch_effects::NOTIFY_OPERATOR_CLAIMED => (
            "operator".into(),
            format!("Job #{short} was claimed by @{executor}. Confirm or reject the claim."),
        ),
        dispatch_effects::CREW_POST_RESERVED => (
            "crew".into(),
            format!("Job #{short} — Reserved by @{executor}"),
        ),
        dispatch_effects::CREW_POST_RESTORED => (
            "crew".into(),
            CrewLeadView::from_lead(lead_id, &load_lead(conn, effect).await?).render(),
        ),
        dispatch_effects::CREW_POST_CANCELLED => {
            ("crew".into(), format!("Job #{short} — Cancelled"))
        }
        dispatch_effects::CREW_POST_EXPIRED => (
            "crew".into(),
            format!("Job #{short} — Expired (not claimed in time)"),
        ),
        dispatch_effects::RELEASE_DETAILS => (
            format!("executor:{executor}"),
            load_lead(conn, effect).await?.render_full(lead_id),
        ),
        _ => return Err(permanent("no renderer for this effect")),
    })
}

async fn load_lead(conn: &mut PgConnection, effect: &EffectRow) -> Result<FullLead, ChannelError> {
    let input = wf_store::input(&mut *conn, effect.tenant_id, effect.workflow_id)
        .await
        .map_err(|e| ChannelError::Transient {
            message: format!("database: {e}"),
            retry_after: None,
        })?
        .ok_or_else(|| ChannelError::Permanent {
            message: "workflow input missing".into(),
        })?;
    serde_json::from_value::<FullLead>(input.get("lead").cloned().unwrap_or_default()).map_err(
        |_| ChannelError::Permanent {
            message: "stored lead does not decode".into(),
        },
    )
}
