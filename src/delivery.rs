//! The contract between the runtime and whatever carries effects out and
//! takes provider events in. The core defines it; the channel adapters
//! implement it (`channels::route::Router`), products add their own effect
//! handlers by name, and start-up (`app`) wires them together. The outbox and
//! the workers see only these traits, never a channel or a product.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::engine::{Engine, EngineError};
use crate::store::effects::EffectRow;

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
    /// Will never succeed (4xx, missing configuration, unknown effect).
    #[error("permanent: {message}")]
    Permanent {
        /// Classified description.
        message: String,
    },
    /// Not yet: the rate limit reserved a slot at this time.
    #[error("deferred until {until}")]
    Deferred {
        /// The reserved slot.
        until: DateTime<Utc>,
    },
}

impl ChannelError {
    /// A failure that will never succeed.
    pub fn permanent(message: impl Into<String>) -> Self {
        ChannelError::Permanent {
            message: message.into(),
        }
    }

    /// A failure worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        ChannelError::Transient {
            message: message.into(),
            retry_after: None,
        }
    }
}

impl From<sqlx::Error> for ChannelError {
    fn from(e: sqlx::Error) -> Self {
        ChannelError::transient(format!("database: {e}"))
    }
}

/// What a delivery produced: the result reported back, and — for the
/// built-in `log` channel, whose "send" is its ledger row — that row, written
/// by the transaction that records the outcome, so it lands exactly once with
/// the effect's status and costs no commit of its own.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The result stored on the effect (and fed back as its reply signal).
    pub result: Value,
    /// The log channel's ledger row still to write.
    pub log: Option<LogEntry>,
}

impl Sent {
    /// Sent through a provider (its ledger row is already written).
    pub fn done(result: Value) -> Self {
        Sent { result, log: None }
    }
}

/// A log-channel message to record in the ledger.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// Who it is for (a role name, never personal data).
    pub recipient: String,
    /// The rendered text.
    pub body: String,
}

impl LogEntry {
    /// Write the ledger row; returns the message id to report (the first
    /// one when an earlier attempt already wrote it).
    pub async fn write(
        &self,
        conn: &mut PgConnection,
        effect: &crate::store::effects::EffectRow,
    ) -> Result<String, sqlx::Error> {
        crate::store::deliveries::insert(
            conn,
            effect.tenant_id,
            effect.id,
            "log",
            &effect.idempotency_key,
            &self.recipient,
            &effect.payload,
            &self.body,
            None,
        )
        .await
    }
}

/// Carries out one effect attempt.
pub trait Deliver: Send + Sync + 'static {
    /// Deliver `effect`. `config` is the tenant's configuration when the
    /// caller read it already; `send_after` is a rate-limit slot reserved by
    /// an earlier, deferred attempt.
    fn deliver<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        effect: &'a EffectRow,
        config: Option<&'a Value>,
        send_after: Option<DateTime<Utc>>,
    ) -> BoxFuture<'a, Result<Sent, ChannelError>>;
}

/// Effects a product carries out itself, registered by effect name; every
/// other effect goes to the fallback (the channel router).
#[derive(Clone)]
pub struct ByName {
    handlers: BTreeMap<&'static str, Arc<dyn Deliver>>,
    fallback: Arc<dyn Deliver>,
}

impl ByName {
    /// Everything through `fallback`.
    pub fn new(fallback: Arc<dyn Deliver>) -> Self {
        ByName {
            handlers: BTreeMap::new(),
            fallback,
        }
    }

    /// Effects named `names` go to `handler`.
    pub fn with(mut self, names: &[&'static str], handler: Arc<dyn Deliver>) -> Self {
        for name in names {
            self.handlers.insert(name, handler.clone());
        }
        self
    }
}

impl Deliver for ByName {
    fn deliver<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        effect: &'a EffectRow,
        config: Option<&'a Value>,
        send_after: Option<DateTime<Utc>>,
    ) -> BoxFuture<'a, Result<Sent, ChannelError>> {
        self.handlers
            .get(effect.name.as_str())
            .unwrap_or(&self.fallback)
            .deliver(conn, effect, config, send_after)
    }
}

/// Processes one acknowledged provider event (webhook) in a worker.
pub trait Inbound: Send + Sync + 'static {
    /// Process the stored event; returns what became of it.
    fn process<'a>(
        &'a self,
        engine: &'a Engine,
        tenant_id: Uuid,
        inbound_id: Uuid,
    ) -> BoxFuture<'a, Result<&'static str, EngineError>>;
}
