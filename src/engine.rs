//! The engine: every state change of every workflow goes through here.
//!
//! Applying signals is one PostgreSQL transaction per batch: lock the workflow
//! row, turn due timers into signals, take the queued signals in arrival order,
//! run the pure transition for each, then write state (fenced on the version
//! read), history, timers, outbox effects and the jobs that run them. A crash
//! anywhere leaves either the old state or the new state with all of its
//! follow-up work recorded.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};
use tracing::instrument;
use uuid::Uuid;
use workflows::{Actor, Command, Ctx, ParseError, Registry, Role, Transition};

use crate::metrics as m;
use crate::store::jobs::{self, ApplyJob};
use crate::store::signals::{NewSignal, SignalRow};
use crate::store::workflows::{NewEvent, NewWorkflow, WorkflowRow};
use crate::store::writes::{FlushError, Writes};
use crate::store::{self, effects, hash_json, signals, tenants, timers};

// The NOTIFY channels and the attention prefix live with the SQL that uses
// them (the store); the engine re-exports them for its callers.
pub use crate::store::signals::{SIGNAL_CHANNEL, SIGNAL_QUEUED_CHANNEL};
pub use crate::store::timers::TIMER_CHANNEL;
pub use crate::store::workflows::CANNOT_ADVANCE;

/// Signals of one workflow one batch applies (the rest wait for the next
/// batch): keeps a batch transaction short and its row locks brief.
/// The effect that answers a chat-originated signal: written by the engine,
/// delivered by the channel the signal came from.
pub const SIGNAL_REPLY: &str = "signal_reply";

const BATCH_SIGNALS_PER_WORKFLOW: i64 = 16;

/// Engine errors. The HTTP layer maps each to a status code in one place.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No such workflow kind (or not enabled in this process).
    #[error("unknown workflow kind `{0}`")]
    UnknownKind(String),
    /// No such workflow.
    #[error("workflow not found")]
    NotFound,
    /// The same kind+key exists with a different input.
    #[error("a workflow with this kind and key exists with a different input")]
    WorkflowExists,
    /// The same idempotency key arrived with a different request.
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    /// The caller's role may not do this.
    #[error("role `{0}` may not {1}")]
    Forbidden(&'static str, String),
    /// Signal or input did not parse.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A writer lost the race to a newer version (stale worker fenced off).
    #[error("stale write fenced off: workflow {0} moved on")]
    Fenced(Uuid),
    /// The tenant switched this workflow kind off (`flags.<kind> = false`).
    #[error("workflow kind `{0}` is switched off for this tenant")]
    LayerDisabled(String),
    /// Persistence failed.
    #[error("database error")]
    Db(#[from] sqlx::Error),
}

impl From<store::StoreError> for EngineError {
    fn from(e: store::StoreError) -> Self {
        match e {
            store::StoreError::Db(e) => EngineError::Db(e),
            other => EngineError::Db(sqlx::Error::Protocol(other.to_string())),
        }
    }
}

/// Engine tuning.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Attempts before an effect is dead-lettered.
    pub effect_max_attempts: i32,
    /// Signals applied per transaction per workflow.
    pub apply_batch: i64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            effect_max_attempts: 8,
            apply_batch: 100,
        }
    }
}

/// One signal on its way in, whatever its source.
#[derive(Debug, Clone, Copy)]
pub struct SignalIn<'a> {
    /// The tenant.
    pub tenant_id: Uuid,
    /// The workflow's kind.
    pub kind: &'a str,
    /// The workflow's business key.
    pub key: &'a str,
    /// The sender's idempotency key (`Idempotency-Key`, a provider's event id).
    pub idempotency_key: &'a str,
    /// The signal's name.
    pub name: &'a str,
    /// Its payload (`null` is the same request as `{}`).
    pub payload: &'a Value,
    /// Who sends it.
    pub actor: &'a Actor,
    /// A chat-originated signal's sender, answered with the outcome (a
    /// `signal_reply` effect written with it).
    pub origin: Option<&'a Value>,
    /// Whether the actor's role must be allowed to send it (ops overrides
    /// and the system's own sources do not check).
    pub enforce_roles: bool,
    /// The sender waits for the outcome (`?wait_ms=`): it is announced on
    /// [`SIGNAL_CHANNEL`] when decided. Nobody else's signal is.
    pub awaited: bool,
}

impl<'a> SignalIn<'a> {
    /// A signal from `actor`, role-checked, with no origin to answer.
    pub fn new(
        tenant_id: Uuid,
        kind: &'a str,
        key: &'a str,
        idempotency_key: &'a str,
        name: &'a str,
        payload: &'a Value,
        actor: &'a Actor,
    ) -> Self {
        Self {
            tenant_id,
            kind,
            key,
            idempotency_key,
            name,
            payload,
            actor,
            origin: None,
            enforce_roles: true,
            awaited: false,
        }
    }

    /// The same signal, its sender waiting for the outcome.
    pub fn awaited(self, awaited: bool) -> Self {
        Self { awaited, ..self }
    }

    /// The same signal, answered at `origin` (when given) once decided.
    pub fn answered_at(self, origin: Option<&'a Value>) -> Self {
        Self { origin, ..self }
    }

    /// The same signal, its sender's role checked or not (ops overrides and
    /// the system's own sources are not).
    pub fn roles_checked(self, enforce_roles: bool) -> Self {
        Self {
            enforce_roles,
            ..self
        }
    }

    fn payload(&self) -> &'a Value {
        static EMPTY: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
        if self.payload.is_null() {
            EMPTY.get_or_init(|| json!({}))
        } else {
            self.payload
        }
    }
}

/// A signal's answer, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SignalAnswer {
    /// Signal id.
    pub signal_id: Uuid,
    /// `queued`, `applied` or `rejected`.
    pub status: String,
    /// State name after applying (when decided).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Rejection reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl From<&SignalRow> for SignalAnswer {
    fn from(s: &SignalRow) -> Self {
        SignalAnswer {
            signal_id: s.id,
            status: s.status.clone(),
            state: s.state_after.clone(),
            reason: s.reason.clone(),
        }
    }
}

/// What one apply batch did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyReport {
    /// Signals accepted.
    pub applied: usize,
    /// Signals rejected.
    pub rejected: usize,
    /// More signals remain queued (another job was enqueued).
    pub more: bool,
}

/// A product's extra check on a start input, run after the workflow's own
/// `start` accepted it and before anything is stored: `(kind, key, input,
/// tenant config)`. The moving product's keeps unsafe text from crews.
pub type StartGuard =
    Arc<dyn Fn(&str, &str, &Value, &Value) -> Result<(), ParseError> + Send + Sync>;

/// What applying one workflow did, counted once its transaction committed.
pub struct Applied {
    report: ApplyReport,
    kind: String,
    entered: Vec<&'static str>,
    lateness: Vec<f64>,
}

impl Applied {
    /// Record the metrics (call after the transaction committed).
    pub fn count(self) {
        let kind = self.kind;
        for s in self.entered {
            metrics::counter!(m::TRANSITIONS, "kind" => kind.clone(), "state" => s).increment(1);
        }
        metrics::counter!(m::SIGNALS_APPLIED, "kind" => kind.clone())
            .increment(self.report.applied as u64);
        metrics::counter!(m::SIGNALS_REJECTED, "kind" => kind.clone())
            .increment(self.report.rejected as u64);
        for l in self.lateness {
            metrics::histogram!(m::TIMER_LATENESS, "kind" => kind.clone()).record(l);
        }
    }
}

/// Why a batch was not applied.
#[derive(Debug, thiserror::Error)]
pub enum BatchFault {
    /// Claiming it, or applying it workflow by workflow, failed.
    #[error(transparent)]
    Read(EngineError),
    /// Writing it as one set failed: the transaction is failed; roll it
    /// back and apply the batch workflow by workflow.
    #[error("the batch could not be written as one set: {0}")]
    Set(EngineError),
}

impl BatchFault {
    /// The engine error inside.
    pub fn into_inner(self) -> EngineError {
        match self {
            BatchFault::Read(e) | BatchFault::Set(e) => e,
        }
    }
}

/// Why one workflow's apply stopped.
enum ApplyFault {
    /// Its state cannot be read or brought forward by this binary: flag it
    /// for ops, keep its signals queued.
    Attention { why: String, error: String },
    /// Anything else (fenced, database).
    Engine(EngineError),
}

impl<E: Into<EngineError>> From<E> for ApplyFault {
    fn from(e: E) -> Self {
        ApplyFault::Engine(e.into())
    }
}

/// Workflows of a failed batch applied one by one, each under a savepoint.
const FALLBACK_WORKFLOWS: usize = 50;

/// The durable engine.
#[derive(Clone)]
pub struct Engine {
    pool: PgPool,
    registry: Arc<Registry>,
    config: EngineConfig,
    start_guard: Option<StartGuard>,
    local: Option<LocalWake>,
}

/// This process's own pumps and the kinds they serve: work of those kinds
/// accepted here wakes them directly after commit instead of by NOTIFY
/// (every NOTIFY costs each listening process a transaction).
#[derive(Clone)]
struct LocalWake {
    kinds: Arc<Vec<String>>,
    wake: Arc<tokio::sync::Notify>,
}

/// How writes wake the workers that act on them: a NOTIFY sent with the
/// transaction (reaches every process), or noted for the caller, who wakes
/// its own pumps after commit — or needs no wake at all (a pump leases the
/// effects it wrote in the same transaction).
#[derive(Debug, Clone, Copy)]
struct Wakes {
    notify: bool,
    pending: bool,
}

impl Wakes {
    fn notify() -> Self {
        Wakes {
            notify: true,
            pending: false,
        }
    }

    fn deferred() -> Self {
        Wakes {
            notify: false,
            pending: false,
        }
    }
}

impl Engine {
    /// Build an engine over a pool and the workflows this process runs.
    pub fn new(pool: PgPool, registry: Arc<Registry>, config: EngineConfig) -> Self {
        Self {
            pool,
            registry,
            config,
            start_guard: None,
            local: None,
        }
    }

    /// Wake these pumps directly (after commit) for work of `kinds`
    /// accepted by this process, instead of by NOTIFY.
    pub fn with_local_wake(mut self, kinds: Vec<String>, wake: Arc<tokio::sync::Notify>) -> Self {
        self.local = Some(LocalWake {
            kinds: Arc::new(kinds),
            wake,
        });
        self
    }

    fn local_for(&self, kind: &str) -> Option<&LocalWake> {
        self.local
            .as_ref()
            .filter(|l| l.kinds.iter().any(|k| k == kind))
    }

    /// The same engine with a product's start guard (see [`StartGuard`]).
    pub fn with_start_guard(mut self, guard: StartGuard) -> Self {
        self.start_guard = Some(guard);
        self
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The workflow registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Engine tuning.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Start a workflow, idempotently on (tenant, kind, key): the same input
    /// returns the existing workflow (`created = false`), a different one is
    /// [`EngineError::WorkflowExists`].
    #[instrument(skip_all, fields(tenant.id = %tenant_id, workflow.kind = kind))]
    pub async fn start(
        &self,
        actor: &Actor,
        tenant_id: Uuid,
        kind: &str,
        key: &str,
        input: &Value,
    ) -> Result<(WorkflowRow, bool), EngineError> {
        if !matches!(actor.role, Role::Integration | Role::Operator | Role::Ops) {
            return Err(EngineError::Forbidden(
                actor.role.as_str(),
                "start workflows".into(),
            ));
        }
        let local = self.local_for(kind);
        let mut wakes = if local.is_some() {
            Wakes::deferred()
        } else {
            Wakes::notify()
        };
        let mut tx = store::begin_queue_tx(&self.pool).await?;
        let out = self
            .start_with(&mut tx, tenant_id, kind, key, input, &mut wakes)
            .await?;
        tx.commit().await?;
        if let (Some(l), true) = (local, wakes.pending) {
            l.wake.notify_one();
        }
        Ok(out)
    }

    /// [`Engine::start`] inside the caller's transaction (no role check: the
    /// caller has authorised it), so the workflow starts atomically with the
    /// caller's own rows.
    pub async fn start_in(
        &self,
        conn: &mut PgConnection,
        tenant_id: Uuid,
        kind: &str,
        key: &str,
        input: &Value,
    ) -> Result<(WorkflowRow, bool), EngineError> {
        self.start_with(conn, tenant_id, kind, key, input, &mut Wakes::notify())
            .await
    }

    fn start_with<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        tenant_id: Uuid,
        kind: &'a str,
        key: &'a str,
        input: &'a Value,
        wakes: &'a mut Wakes,
    ) -> futures::future::BoxFuture<'a, Result<(WorkflowRow, bool), EngineError>> {
        Box::pin(async move {
            let wf = self
                .registry
                .get(kind)
                .ok_or_else(|| EngineError::UnknownKind(kind.into()))?;
            let (config, now) = tenants::config_and_now(&mut *conn, tenant_id).await?;
            // Per-tenant switch, read in this transaction: a flip applies at once in
            // every process. Running workflows of the kind keep going.
            if config
                .pointer(&format!("/flags/{kind}"))
                .and_then(Value::as_bool)
                == Some(false)
            {
                return Err(EngineError::LayerDisabled(kind.to_string()));
            }
            let system = Actor::system();
            let ctx = Ctx {
                now,
                tenant_config: &config,
                actor: &system,
            };
            let started = wf.start(key, input, &ctx)?;
            let input_hash = hash_json(input);
            let new = NewWorkflow {
                tenant_id,
                kind,
                key,
                input_hash: &input_hash,
                state_name: started.state_name,
                state: &started.state,
                def_version: wf.version() as i32,
            };
            let Some(mut row) = store::workflows::insert(&mut *conn, &new).await? else {
                let existing = store::workflows::find(&mut *conn, tenant_id, kind, key)
                    .await?
                    .ok_or(EngineError::NotFound)?;
                return if existing.input_hash == input_hash {
                    Ok((existing, false))
                } else {
                    Err(EngineError::WorkflowExists)
                };
            };
            // A new workflow only: a replay of an identical start answers with
            // the existing one even if the tenant's lists changed since. An
            // error here rolls the insert back with the caller's transaction.
            if let Some(guard) = &self.start_guard {
                guard(kind, key, input, &config)?;
            }
            store::workflows::insert_input(&mut *conn, tenant_id, row.id, input).await?;
            let mut writes = Writes::default();
            let status = self
                .carry_out(&mut *conn, &row, &started.commands, wakes, &mut writes)
                .await?;
            writes.history(
                tenant_id,
                row.id,
                &NewEvent {
                    version: 0,
                    event: "started",
                    signal_id: None,
                    signal_name: None,
                    actor_role: None,
                    actor_subject: None,
                    from_state: None,
                    to_state: Some(started.state_name),
                    reason: None,
                    commands: history_commands(&started.commands),
                },
            );
            if let Some(status) = status {
                row.status = status.into();
                writes.state(&row, 0);
            }
            self.flush(&mut *conn, writes, wakes)
                .await
                .map_err(|e| flush_error(e, row.id))?;
            tracing::debug!(workflow.id = %row.id, workflow.kind = kind, "workflow started");
            Ok((row, true))
        })
    }

    /// The one way a signal comes in from outside the engine — HTTP, ops,
    /// chat commands and webhooks, the messaging layer — in its own
    /// transaction. Validates it first (nothing is stored for a bad one); the
    /// same idempotency key returns the first signal's answer; the same key
    /// with a different request is [`EngineError::IdempotencyKeyReused`].
    #[instrument(skip_all, fields(tenant.id = %signal.tenant_id, workflow.kind = signal.kind, signal.name = signal.name))]
    pub async fn signal(&self, signal: SignalIn<'_>) -> Result<SignalAnswer, EngineError> {
        self.check(&signal)?;
        let local = self.local_for(signal.kind);
        let mut wakes = if local.is_some() {
            Wakes::deferred()
        } else {
            Wakes::notify()
        };
        // One statement, committed on its own: no transaction round trips.
        let mut conn = self.pool.acquire().await?;
        let (answer, received) = self.queue_signal(&mut conn, &signal, &mut wakes).await?;
        drop(conn);
        if let (Some(l), true) = (local, wakes.pending) {
            l.wake.notify_one();
        }
        if received {
            metrics::counter!(m::SIGNALS_RECEIVED, "kind" => signal.kind.to_string()).increment(1);
        }
        Ok(answer)
    }

    /// [`Engine::signal`] inside the caller's transaction, so the caller can
    /// write its own records (an ops audit entry, a routed message)
    /// atomically with it. Returns the answer and whether this call stored a
    /// new signal (false for a replay of the idempotency key).
    pub async fn signal_in(
        &self,
        conn: &mut PgConnection,
        signal: SignalIn<'_>,
    ) -> Result<(SignalAnswer, bool), EngineError> {
        self.check(&signal)?;
        self.queue_signal(conn, &signal, &mut Wakes::notify()).await
    }

    /// Read-only checks, before any row is touched: the kind is known, the
    /// signal parses, and the actor's role may send it.
    fn check(&self, signal: &SignalIn<'_>) -> Result<(), EngineError> {
        let wf = self
            .registry
            .get(signal.kind)
            .ok_or_else(|| EngineError::UnknownKind(signal.kind.into()))?;
        wf.check_signal(signal.name, signal.payload())?;
        if signal.enforce_roles && !wf.allowed_roles(signal.name).contains(&signal.actor.role) {
            return Err(EngineError::Forbidden(
                signal.actor.role.as_str(),
                format!("send `{}`", signal.name),
            ));
        }
        Ok(())
    }

    async fn queue_signal(
        &self,
        tx: &mut PgConnection,
        signal: &SignalIn<'_>,
        wakes: &mut Wakes,
    ) -> Result<(SignalAnswer, bool), EngineError> {
        let (actor, payload) = (signal.actor, signal.payload());
        let request_hash = hash_json(&json!({
            "name": signal.name, "payload": payload, "role": actor.role, "subject": actor.subject,
        }));
        let new = NewSignal {
            tenant_id: signal.tenant_id,
            workflow_id: Uuid::nil(),
            idempotency_key: signal.idempotency_key,
            name: signal.name,
            payload,
            request_hash: &request_hash,
            actor_role: actor.role.as_str(),
            actor_subject: actor.subject.as_deref(),
            received_at: None,
            origin: signal.origin,
            wake: signal.awaited,
        };
        // The pumps claim it from `signals`; the wake-up only brings them
        // sooner than their poll.
        let to = signals::ByKey {
            kind: signal.kind,
            key: signal.key,
            notify: wakes.notify,
        };
        if let Some(sig) = signals::insert_by_key(&mut *tx, &to, &new).await? {
            wakes.pending = !wakes.notify;
            return Ok((SignalAnswer::from(&sig), true));
        }
        // Nothing stored: no such workflow, or a replay of the key.
        let row = store::workflows::find(&mut *tx, signal.tenant_id, signal.kind, signal.key)
            .await?
            .ok_or(EngineError::NotFound)?;
        let first = signals::by_key(&mut *tx, signal.tenant_id, row.id, signal.idempotency_key)
            .await?
            .ok_or(EngineError::NotFound)?;
        if first.request_hash != request_hash {
            return Err(EngineError::IdempotencyKeyReused);
        }
        let mut answer = SignalAnswer::from(&first);
        if signal.awaited
            && first.status == "queued"
            && !signals::mark_awaited(&mut *tx, signal.tenant_id, first.id).await?
        {
            // Decided meanwhile: answer with the outcome.
            let now = signals::by_id(&mut *tx, signal.tenant_id, first.id)
                .await?
                .ok_or(EngineError::NotFound)?;
            answer = SignalAnswer::from(&now);
        }
        Ok((answer, false))
    }

    /// The current answer for a signal.
    pub async fn signal_answer(
        &self,
        tenant_id: Uuid,
        signal_id: Uuid,
    ) -> Result<SignalAnswer, EngineError> {
        let mut conn = self.pool.acquire().await?;
        let s = signals::by_id(&mut conn, tenant_id, signal_id)
            .await?
            .ok_or(EngineError::NotFound)?;
        Ok(SignalAnswer::from(&s))
    }

    /// Apply the queued signals (and due timers) of one workflow, in one transaction.
    #[instrument(skip_all, fields(tenant.id = %tenant_id, workflow.id = %workflow_id, workflow.kind = tracing::field::Empty))]
    pub async fn apply_pending(
        &self,
        tenant_id: Uuid,
        workflow_id: Uuid,
    ) -> Result<ApplyReport, EngineError> {
        let mut tx = store::begin_queue_tx(&self.pool).await?;
        let Some(row) = store::workflows::lock(&mut tx, tenant_id, workflow_id).await? else {
            return Ok(ApplyReport::default());
        };
        tracing::Span::current().record("workflow.kind", row.kind.as_str());
        let mut wakes = Wakes::notify();
        let kind = row.kind.clone();
        match self.apply_locked(&mut tx, row, &mut wakes).await {
            Ok(applied) => {
                if applied.report.more {
                    // The rest in a job of its own (this path serves single
                    // apply jobs: ops retries, the sweep).
                    let job = ApplyJob {
                        tenant_id,
                        workflow_id,
                    };
                    jobs::enqueue_apply(&mut tx, &kind, &job, None).await?;
                }
                tx.commit().await?;
                let report = applied.report;
                applied.count();
                Ok(report)
            }
            Err(ApplyFault::Attention { why, error }) => {
                drop(tx);
                self.flag(tenant_id, workflow_id, &why, &error).await?;
                Err(EngineError::Parse(ParseError::StoredState(error)))
            }
            Err(ApplyFault::Engine(e)) => Err(e),
        }
    }

    /// Apply one locked workflow's due timers and queued signals (up to the
    /// batch size; `report.more` says if some remain) and write the result,
    /// in the caller's transaction. The caller commits, then counts.
    async fn apply_locked(
        &self,
        tx: &mut PgConnection,
        row: WorkflowRow,
        wakes: &mut Wakes,
    ) -> Result<Applied, ApplyFault> {
        let (tenant_id, workflow_id) = (row.tenant_id, row.id);
        let max = self.config.apply_batch;
        let lateness = self.fire_due_of(&mut *tx, tenant_id, workflow_id).await?;
        let queued = signals::queued(&mut *tx, tenant_id, workflow_id, max + 1).await?;
        let config = tenants::config(&mut *tx, tenant_id).await?;
        let now = db_now(&mut *tx).await?;
        let mut writes = Writes::default();
        let mut applied = self
            .transit(
                &mut *tx,
                row,
                &queued,
                max,
                &config,
                now,
                wakes,
                &mut writes,
            )
            .await?;
        self.flush(&mut *tx, writes, wakes)
            .await
            .map_err(|e| flush_error(e, workflow_id))?;
        applied.lateness = lateness;
        Ok(applied)
    }

    /// Turn the workflow's due timers into queued signals (it is locked);
    /// returns their lateness in seconds.
    async fn fire_due_of(
        &self,
        tx: &mut PgConnection,
        tenant_id: Uuid,
        workflow_id: Uuid,
    ) -> Result<Vec<f64>, EngineError> {
        let mut lateness = Vec::new();
        for timer in timers::take_due(&mut *tx, tenant_id, workflow_id).await? {
            let late = (db_now(&mut *tx).await? - timer.due_at)
                .num_microseconds()
                .unwrap_or(0);
            if late >= 0 {
                lateness.push(late as f64 / 1e6);
            }
            // The timer's own due time travels with its signal (stale-timer checks).
            let payload = json!({ "due": timer.due_at });
            let new = NewSignal {
                tenant_id,
                workflow_id,
                idempotency_key: &format!("timer:{}", timer.id),
                name: &timer.signal,
                payload: &payload,
                request_hash: &hash_json(&json!({"timer": timer.id})),
                actor_role: Role::System.as_str(),
                actor_subject: None,
                received_at: Some(timer.due_at),
                origin: None,
                wake: false,
            };
            signals::insert(&mut *tx, &new).await?;
        }
        Ok(lateness)
    }

    /// Apply the queued signals of up to `limit` workflows of `kinds` in one
    /// transaction (group commit): each workflow is locked (`SKIP LOCKED`:
    /// another loop is on it), its signals applied in arrival order through
    /// the pure transition, and the whole batch's states, history, signal
    /// outcomes and effects written with one statement. If that fails, the
    /// transaction is rolled back and the batch claimed again and applied
    /// workflow by workflow, each under a savepoint of its own, so one
    /// workflow that cannot advance is rolled back alone and flagged for ops
    /// while the others commit. Returns how many workflows were applied.
    #[instrument(skip_all, fields(batch.limit = limit, batch.size = tracing::field::Empty))]
    pub async fn apply_batch(&self, kinds: &[String], limit: i64) -> Result<usize, EngineError> {
        let mut careful = false;
        loop {
            let mut tx = store::begin_queue_tx(&self.pool).await?;
            let done = match self
                .apply_batch_with(&mut tx, kinds, limit, Wakes::notify(), careful)
                .await
            {
                Ok(done) => done,
                Err(BatchFault::Set(e)) if !careful => {
                    tracing::warn!(error = %e, "batch applied again workflow by workflow");
                    drop(tx);
                    careful = true;
                    continue;
                }
                Err(f) => return Err(f.into_inner()),
            };
            tx.commit().await?;
            let applied = done.len();
            for a in done {
                a.count();
            }
            // Workflows that failed do not count as progress (no hot loop on them).
            return Ok(applied);
        }
    }

    /// [`Engine::apply_batch`] inside the caller's transaction: returns what
    /// was applied, for the caller to [`Applied::count`] once it committed.
    /// Unless `careful`, the batch is written as one set with no savepoint:
    /// a [`BatchFault::Set`] leaves the transaction failed, and the caller
    /// rolls it back and calls again with `careful` (workflow by workflow).
    ///
    /// Effects it writes wake no one: the caller leases them in the same
    /// transaction (the pipeline's pumps do).
    pub async fn apply_batch_in(
        &self,
        tx: &mut PgConnection,
        kinds: &[String],
        limit: i64,
        careful: bool,
    ) -> Result<Vec<Applied>, BatchFault> {
        self.apply_batch_with(tx, kinds, limit, Wakes::deferred(), careful)
            .await
    }

    async fn apply_batch_with(
        &self,
        tx: &mut PgConnection,
        kinds: &[String],
        limit: i64,
        mut wakes: Wakes,
        careful: bool,
    ) -> Result<Vec<Applied>, BatchFault> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        // Lock, timers, signals, configurations and the clock: one statement.
        let batch = store::batch::claim(&mut *tx, kinds, limit, BATCH_SIGNALS_PER_WORKFLOW + 1)
            .await
            .map_err(|e| BatchFault::Read(e.into()))?;
        if batch.rows.is_empty() {
            return Ok(Vec::new());
        }
        tracing::Span::current().record("batch.size", batch.rows.len());
        let no_config = Value::Object(Default::default());
        let input = BatchInput {
            rows: &batch.rows,
            queued: &batch.queued,
            configs: &batch.configs,
            no_config: &no_config,
            now: batch.now,
        };
        let done = if careful {
            // Workflow by workflow, each under a savepoint of its own.
            self.apply_each(&mut *tx, &input, &mut wakes)
                .await
                .map_err(BatchFault::Read)?
        } else {
            // The whole set in one write, no savepoint: if it fails, the
            // caller rolls the transaction back and goes again carefully.
            self.apply_set(&mut *tx, &input, &mut wakes)
                .await
                .map_err(BatchFault::Set)?
        };
        Ok(done)
    }

    /// The batch's transitions written as one set. Any fault (a workflow
    /// this binary cannot advance, a fenced write, a database error) fails
    /// the whole set: the caller then applies the batch workflow by workflow.
    async fn apply_set(
        &self,
        tx: &mut PgConnection,
        b: &BatchInput<'_>,
        wakes: &mut Wakes,
    ) -> Result<Vec<Applied>, EngineError> {
        let mut writes = Writes::default();
        let mut done = Vec::with_capacity(b.rows.len());
        for row in b.rows {
            let applied = self
                .transit(
                    &mut *tx,
                    row.clone(),
                    b.signals_of(row.id),
                    BATCH_SIGNALS_PER_WORKFLOW,
                    b.config_of(row.tenant_id),
                    b.now,
                    wakes,
                    &mut writes,
                )
                .await
                .map_err(|f| match f {
                    ApplyFault::Engine(e) => e,
                    ApplyFault::Attention { error, .. } => {
                        EngineError::Parse(ParseError::StoredState(error))
                    }
                })?;
            done.push(applied);
        }
        self.flush(&mut *tx, writes, wakes)
            .await
            .map_err(|e| flush_error(e, Uuid::nil()))?;
        Ok(done)
    }

    /// The batch workflow by workflow, each under a savepoint: one that
    /// fails is rolled back alone (flagged for ops if this binary cannot
    /// advance it, else left queued) and the others go on.
    async fn apply_each(
        &self,
        tx: &mut PgConnection,
        b: &BatchInput<'_>,
        wakes: &mut Wakes,
    ) -> Result<Vec<Applied>, EngineError> {
        let mut done = Vec::with_capacity(b.rows.len());
        // The rest of a large batch stays queued for the next cycle: each
        // savepoint here is a subtransaction, and past 64 PostgreSQL spills
        // them out of shared memory, slowing every other backend's snapshot.
        for row in b.rows.iter().take(FALLBACK_WORKFLOWS) {
            let (tenant_id, workflow_id) = (row.tenant_id, row.id);
            sqlx::query("savepoint apply_one").execute(&mut *tx).await?;
            let mut writes = Writes::default();
            let outcome = match self
                .transit(
                    &mut *tx,
                    row.clone(),
                    b.signals_of(workflow_id),
                    BATCH_SIGNALS_PER_WORKFLOW,
                    b.config_of(tenant_id),
                    b.now,
                    wakes,
                    &mut writes,
                )
                .await
            {
                Ok(applied) => match self.flush(&mut *tx, writes, wakes).await {
                    Ok(()) => Ok(applied),
                    Err(e) => Err(ApplyFault::Engine(flush_error(e, workflow_id))),
                },
                Err(fault) => Err(fault),
            };
            let fault = match outcome {
                Ok(applied) => {
                    sqlx::query("release savepoint apply_one")
                        .execute(&mut *tx)
                        .await?;
                    done.push(applied);
                    continue;
                }
                Err(fault) => fault,
            };
            // This workflow alone is undone; the others of the batch go on.
            sqlx::query("rollback to savepoint apply_one")
                .execute(&mut *tx)
                .await?;
            sqlx::query("release savepoint apply_one")
                .execute(&mut *tx)
                .await?;
            match fault {
                ApplyFault::Attention { why, error } => {
                    // Flagged in the batch's own transaction: no other loop
                    // claims it again once this commits.
                    store::workflows::flag_cannot_advance(&mut *tx, tenant_id, workflow_id, &why)
                        .await?;
                    tracing::error!(workflow.id = %workflow_id, error = %error, "{why}");
                }
                ApplyFault::Engine(e) => {
                    // Left queued; a workflow that keeps failing costs its
                    // batches a savepoint, never the others' progress.
                    tracing::warn!(workflow.id = %workflow_id, error = %e, "workflow not applied in this batch");
                }
            }
        }
        Ok(done)
    }

    /// Write `writes` and wake whoever runs the effects it queued.
    async fn flush(
        &self,
        conn: &mut PgConnection,
        writes: Writes,
        wakes: &mut Wakes,
    ) -> Result<(), FlushError> {
        // The pumps lease effects from `effects` after commit; the wake-up
        // only brings them sooner than their poll.
        let notify = wakes.notify.then_some(effects::EFFECT_QUEUED_CHANNEL);
        let flushed = writes.flush(&mut *conn, notify).await?;
        if flushed.effects > 0 && !wakes.notify {
            wakes.pending = true;
        }
        Ok(())
    }

    /// A workflow this binary cannot advance: its signals stay queued and
    /// ops are told (set outside the failed transaction).
    async fn flag(
        &self,
        tenant_id: Uuid,
        workflow_id: Uuid,
        why: &str,
        error: &str,
    ) -> Result<(), EngineError> {
        let mut conn = self.pool.acquire().await?;
        store::workflows::set_attention(&mut conn, tenant_id, workflow_id, why).await?;
        tracing::error!(workflow.id = %workflow_id, error = %error, "{why}");
        Ok(())
    }

    /// The transitions of one locked workflow: decide (the pure transition,
    /// for each of up to `max_signals` of its `queued` signals in arrival
    /// order), then hand the rows to `writes` — state fenced on the version
    /// read, history, signal outcomes, effects. Timers and child workflows
    /// are written at once, in the caller's transaction. The caller flushes
    /// `writes`, commits, and then counts.
    #[allow(clippy::too_many_arguments)]
    async fn transit(
        &self,
        tx: &mut PgConnection,
        mut row: WorkflowRow,
        queued: &[SignalRow],
        max_signals: i64,
        config: &Value,
        now: DateTime<Utc>,
        wakes: &mut Wakes,
        writes: &mut Writes,
    ) -> Result<Applied, ApplyFault> {
        let (tenant_id, workflow_id) = (row.tenant_id, row.id);
        let read_version = row.version;
        let read_def_version = row.def_version;
        let wf = self
            .registry
            .get(&row.kind)
            .ok_or_else(|| EngineError::UnknownKind(row.kind.clone()))?;
        if row.def_version != wf.version() as i32 {
            // Started under an older definition and not migrated yet: upcast on
            // read, as data, recorded in history. A state this binary cannot
            // bring forward is a runtime fault: signals stay queued, ops are told.
            match wf.upcast_to_current(row.def_version as u32, row.state.clone()) {
                Ok(state) => {
                    let why = format!("definition v{} -> v{}", row.def_version, wf.version());
                    let event = NewEvent::note(
                        row.version,
                        "upcast",
                        "system",
                        &row.state_name,
                        &why,
                        json!([]),
                    );
                    writes.history(tenant_id, workflow_id, &event);
                    row.state = state;
                    row.def_version = wf.version() as i32;
                }
                Err(e) => {
                    let why = format!(
                        "{CANNOT_ADVANCE}state of definition v{} cannot be upcast",
                        row.def_version
                    );
                    return Err(ApplyFault::Attention { why, error: e });
                }
            }
        }
        let more = queued.len() as i64 > max_signals;
        let mut entered: Vec<&'static str> = Vec::new();
        let mut report = ApplyReport {
            more,
            ..Default::default()
        };
        for sig in queued.iter().take(max_signals as usize) {
            let actor = Actor {
                role: role_from_db(&sig.actor_role),
                subject: sig.actor_subject.clone(),
            };
            let ctx = Ctx {
                now,
                tenant_config: config,
                actor: &actor,
            };
            let from_state = row.state_name.clone();
            let transition = match wf.apply(&row.state, &sig.name, &sig.payload, &ctx) {
                Ok(t) => t,
                // State this binary cannot read is a runtime fault (e.g. a rolling
                // deploy): keep the signals queued and flag the workflow for ops.
                Err(ParseError::StoredState(e)) => {
                    let why =
                        format!("{CANNOT_ADVANCE}stored state does not decode in this version");
                    return Err(ApplyFault::Attention { why, error: e });
                }
                // A stored signal that no longer parses is rejected, never retried forever.
                Err(e) => Transition::Reject {
                    reason: workflows::text::redact(&format!("invalid_signal: {e}")),
                },
            };
            let mut event = NewEvent {
                version: row.version,
                event: "rejected",
                signal_id: Some(sig.id),
                signal_name: Some(&sig.name),
                actor_role: Some(&sig.actor_role),
                actor_subject: sig.actor_subject.as_deref(),
                from_state: Some(&from_state),
                to_state: Some(&from_state),
                reason: None,
                commands: json!([]),
            };
            match transition {
                Transition::Accept {
                    state,
                    state_name,
                    is_final,
                    commands,
                } => {
                    row.state = state;
                    row.state_name = state_name.to_string();
                    row.version += 1;
                    if let Some(status) = self
                        .carry_out(&mut *tx, &row, &commands, wakes, writes)
                        .await?
                    {
                        row.status = status.into();
                    } else if is_final {
                        row.status = "completed".into();
                    }
                    event.event = "applied";
                    event.version = row.version;
                    event.to_state = Some(state_name);
                    event.commands = history_commands(&commands);
                    writes.history(tenant_id, workflow_id, &event);
                    writes.finish(tenant_id, sig.id, "applied", None, state_name);
                    self.answer_origin(&row, sig, "applied", None, state_name, writes);
                    report.applied += 1;
                    entered.push(state_name);
                    tracing::debug!(signal.name = %sig.name, from = %from_state, to = state_name, "signal applied");
                }
                Transition::Reject { reason } => {
                    event.reason = Some(&reason);
                    writes.history(tenant_id, workflow_id, &event);
                    writes.finish(tenant_id, sig.id, "rejected", Some(&reason), &from_state);
                    self.answer_origin(&row, sig, "rejected", Some(&reason), &from_state, writes);
                    report.rejected += 1;
                    tracing::info!(signal.name = %sig.name, state = %from_state, reason = %reason, "signal rejected");
                }
            }
        }
        if row.version != read_version || row.def_version != read_def_version {
            writes.state(&row, read_version);
        }
        if row
            .attention
            .as_deref()
            .is_some_and(|a| a.starts_with(CANNOT_ADVANCE))
        {
            // This binary could read it after all (a rolling deploy finished).
            store::workflows::clear_attention(&mut *tx, tenant_id, workflow_id, CANNOT_ADVANCE)
                .await?;
        }
        Ok(Applied {
            report,
            kind: row.kind.clone(),
            entered,
            lateness: Vec::new(),
        })
    }

    /// Answer a chat-originated signal's sender with its outcome.
    fn answer_origin(
        &self,
        row: &WorkflowRow,
        sig: &SignalRow,
        status: &str,
        reason: Option<&str>,
        state: &str,
        writes: &mut Writes,
    ) {
        let Some(origin) = &sig.origin else {
            return;
        };
        let payload = json!({
            "origin": origin, "signal": sig.name, "status": status, "reason": reason,
            "state": state, "key": row.key,
        });
        writes.effect(
            row,
            SIGNAL_REPLY,
            &format!("{}:reply_v1", sig.id),
            &payload,
            None,
            self.config.effect_max_attempts,
        );
    }

    /// Turn commands into rows: effects into `writes`, timers and child
    /// workflows at once. Returns the terminal status a command set, if any.
    async fn carry_out(
        &self,
        conn: &mut PgConnection,
        row: &WorkflowRow,
        commands: &[Command],
        wakes: &mut Wakes,
        writes: &mut Writes,
    ) -> Result<Option<&'static str>, EngineError> {
        let mut status = None;
        for c in commands {
            match c {
                Command::Effect {
                    name,
                    idempotency_key,
                    payload,
                    reply,
                } => writes.effect(
                    row,
                    name,
                    idempotency_key,
                    payload,
                    reply.as_deref(),
                    self.config.effect_max_attempts,
                ),
                Command::SetTimer { name, at, signal } => {
                    timers::arm(&mut *conn, row.tenant_id, row.id, name, *at, signal).await?;
                }
                Command::CancelTimer { name } => {
                    timers::cancel(&mut *conn, row.tenant_id, row.id, name).await?
                }
                Command::Start { kind, key, input } => {
                    // A child that exists with other input, or whose input does not
                    // parse, must not wedge the parent's transition: record and go on.
                    match self
                        .start_with(&mut *conn, row.tenant_id, kind, key, input, &mut *wakes)
                        .await
                    {
                        Ok(_) => {}
                        Err(
                            e @ (EngineError::WorkflowExists
                            | EngineError::LayerDisabled(_)
                            | EngineError::Parse(_)
                            | EngineError::UnknownKind(_)),
                        ) => {
                            tracing::warn!(workflow.id = %row.id, child.kind = %kind, error = %e, "child workflow not started");
                        }
                        Err(e) => return Err(e),
                    }
                }
                Command::Complete => status = Some("completed"),
                Command::Fail { .. } => status = Some("failed"),
            }
        }
        Ok(status)
    }
}

/// What a batch read before deciding: its locked workflows, their queued
/// signals, their tenants' configurations and the batch's clock.
struct BatchInput<'a> {
    rows: &'a [WorkflowRow],
    queued: &'a std::collections::HashMap<Uuid, Vec<SignalRow>>,
    configs: &'a std::collections::HashMap<Uuid, Arc<Value>>,
    no_config: &'a Value,
    now: DateTime<Utc>,
}

impl BatchInput<'_> {
    fn signals_of(&self, workflow_id: Uuid) -> &[SignalRow] {
        self.queued.get(&workflow_id).map_or(&[], Vec::as_slice)
    }

    fn config_of(&self, tenant_id: Uuid) -> &Value {
        self.configs
            .get(&tenant_id)
            .map_or(self.no_config, |c| c.as_ref())
    }
}

fn flush_error(e: FlushError, workflow_id: Uuid) -> EngineError {
    match e {
        FlushError::Db(e) => EngineError::Db(e),
        FlushError::Fenced => EngineError::Fenced(workflow_id),
    }
}

/// What an ops migration of in-flight workflows did (or would do).
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    /// Workflow kind.
    pub kind: String,
    /// Target definition version.
    pub to: u32,
    /// Nothing was written.
    pub dry_run: bool,
    /// Instances migrated (or that would be).
    pub migrated: usize,
    /// Instances that cannot be upcast: (tenant id, key, why). Left as they are.
    pub failed: Vec<(Uuid, String, String)>,
}

impl Engine {
    /// Bring in-flight instances of `kind` to definition version `to` (this
    /// binary's), in batches of `batch`, each batch one transaction; every
    /// migrated instance gets a `migrated` history entry with the reason.
    /// Instances that cannot be upcast are listed, not touched. With
    /// `dry_run`, every batch is rolled back.
    pub async fn migrate_workflows(
        &self,
        kind: &str,
        to: u32,
        dry_run: bool,
        batch: i64,
        reason: &str,
    ) -> Result<MigrationReport, EngineError> {
        let wf = self
            .registry
            .get(kind)
            .ok_or_else(|| EngineError::UnknownKind(kind.into()))?;
        if to != wf.version() {
            return Err(EngineError::Parse(ParseError::InvalidPayload(format!(
                "this binary's `{kind}` definition is version {}",
                wf.version()
            ))));
        }
        let mut report = MigrationReport {
            kind: kind.into(),
            to,
            dry_run,
            migrated: 0,
            failed: Vec::new(),
        };
        // First pass: batches of rows nobody holds (skip locked), keyset-paged.
        let mut seen = std::collections::HashSet::new();
        let mut after = None;
        loop {
            let mut tx = self.pool.begin().await?;
            let rows =
                store::workflows::lock_older_than(&mut tx, kind, to as i32, after, batch.max(1))
                    .await?;
            let Some(last) = rows.last() else {
                break;
            };
            after = Some((last.tenant_id, last.id));
            for row in rows {
                seen.insert((row.tenant_id, row.id));
                migrate_one(&mut tx, wf, row, to, reason, &mut report).await?;
            }
            if dry_run {
                tx.rollback().await?;
            } else {
                tx.commit().await?;
            }
        }
        // Second pass: rows a transition held during the first pass, one by
        // one, waiting for the lock, so every instance is migrated or listed.
        let left: Vec<(Uuid, Uuid)> =
            sqlx::query_as("select tenant_id, id from workflows where kind = $1 and def_version < $2 order by tenant_id, id")
                .bind(kind)
                .bind(to as i32)
                .fetch_all(&self.pool)
                .await?;
        for (tenant_id, id) in left.into_iter().filter(|k| !seen.contains(k)) {
            let mut tx = self.pool.begin().await?;
            if let Some(row) = store::workflows::lock(&mut tx, tenant_id, id)
                .await?
                .filter(|r| r.def_version < to as i32)
            {
                migrate_one(&mut tx, wf, row, to, reason, &mut report).await?;
            }
            if dry_run {
                tx.rollback().await?;
            } else {
                tx.commit().await?;
            }
        }
        tracing::info!(
            workflow.kind = kind,
            migrated = report.migrated,
            failed = report.failed.len(),
            dry_run,
            "workflow migration"
        );
        Ok(report)
    }
}

/// Upcast one locked instance and record it, or list it as failed.
async fn migrate_one(
    conn: &mut PgConnection,
    wf: &dyn workflows::DynWorkflow,
    mut row: WorkflowRow,
    to: u32,
    reason: &str,
    report: &mut MigrationReport,
) -> Result<(), EngineError> {
    match wf.upcast_to_current(row.def_version as u32, row.state.clone()) {
        Ok(state) => {
            let why = format!("definition v{} -> v{to}: {reason}", row.def_version);
            let event = NewEvent::note(
                row.version,
                "migrated",
                "ops",
                &row.state_name,
                &why,
                json!([]),
            );
            store::workflows::append_history(&mut *conn, row.tenant_id, row.id, &event).await?;
            row.state = state;
            row.def_version = to as i32;
            if !store::workflows::update_state(&mut *conn, &row, row.version).await? {
                return Err(EngineError::Fenced(row.id));
            }
            report.migrated += 1;
        }
        Err(e) => report.failed.push((row.tenant_id, row.key.clone(), e)),
    }
    Ok(())
}

/// The transaction's clock: one clock (the database's) for every process.
async fn db_now(conn: &mut PgConnection) -> Result<DateTime<Utc>, sqlx::Error> {
    let (now,): (DateTime<Utc>,) = sqlx::query_as("select clock_timestamp()")
        .fetch_one(conn)
        .await?;
    Ok(now)
}

/// Commands as recorded in history: a child's start input may carry personal
/// data (a FullLead), so only its kind and key are kept.
fn history_commands(commands: &[Command]) -> Value {
    Value::Array(
        commands
            .iter()
            .map(|c| match c {
                Command::Start { kind, key, .. } => {
                    json!({"type": "start", "kind": kind, "key": key})
                }
                other => json!(other),
            })
            .collect(),
    )
}

fn role_from_db(s: &str) -> Role {
    Role::parse_api_role(s).unwrap_or(Role::System)
}
