//! Pure state machines for Dispatch.
//!
//! Every lifecycle here is a value-level state machine: a state (serde), a
//! signal enum and a transition function
//! `on_signal(&state, signal, &ctx) -> Outcome`. Nothing in this crate does I/O,
//! reads the clock or draws random numbers: the runtime hands in `now`, the
//! tenant's configuration and the acting principal through [`Ctx`], and turns the
//! returned [`Command`]s into durable rows (outbox effects, timers) inside the
//! same PostgreSQL transaction that stores the new state.
//!
//! The runtime talks to workflows through the type-erased [`Registry`], which
//! keeps the kind → workflow mapping explicit (no registration side effects).
#![warn(missing_docs)]

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod assignment_window;
pub mod bench_chain;
pub mod dispatch;
pub mod driver_registration;
pub mod lead;
pub mod lead_finalization;
pub mod meet_and_greet;
pub mod message_relay;
pub mod poaching_strikes;
pub mod pool_number;
mod registry;
pub mod route_dispatch;
pub mod sitter_lifecycle;
pub mod text;

pub use registry::{DynWorkflow, Registry, Started, Transition};

/// Who is acting. Roles mirror API key roles; `System` is the runtime itself
/// (timers firing, effect results coming back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Operations staff: may do everything an operator may, plus administration.
    Ops,
    /// The business's operator/dispatcher.
    Operator,
    /// A crew member / sitter / driver acting for themselves.
    Executor,
    /// A machine caller such as Lead Core or a payment provider.
    Integration,
    /// The runtime: timers and effect results.
    System,
}

impl Role {
    /// Parse the wire name of a role (`ops`, `operator`, `executor`, `integration`).
    /// `system` is never accepted from outside.
    pub fn parse_api_role(s: &str) -> Option<Role> {
        match s {
            "ops" => Some(Role::Ops),
            "operator" => Some(Role::Operator),
            "executor" => Some(Role::Executor),
            "integration" => Some(Role::Integration),
            _ => None,
        }
    }

    /// The wire name of the role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ops => "ops",
            Role::Operator => "operator",
            Role::Executor => "executor",
            Role::Integration => "integration",
            Role::System => "system",
        }
    }
}

/// The principal a signal comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The role the caller's key carries.
    pub role: Role,
    /// Who exactly (an executor id for executor keys); `None` when the key has no subject.
    pub subject: Option<String>,
}

impl Actor {
    /// The runtime itself.
    pub fn system() -> Self {
        Actor {
            role: Role::System,
            subject: None,
        }
    }
}

/// Everything a transition may know about the outside world.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// The transaction's clock reading, taken by the runtime.
    pub now: DateTime<Utc>,
    /// The tenant's configuration document (see DOMAIN.md "Tenant config").
    pub tenant_config: &'a Value,
    /// Who sent the signal.
    pub actor: &'a Actor,
}

/// What a transition asks the runtime to do, as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Run a side effect after commit, at most once per idempotency key.
    Effect {
        /// Effect name (e.g. `dispatch_publish`); selects the renderer/channel.
        name: String,
        /// Unique per workflow; the same key is never executed twice.
        idempotency_key: String,
        /// References only (ids, view names): never personal data.
        payload: Value,
        /// When set, the effect's result comes back as this signal.
        reply: Option<String>,
    },
    /// Arm (or re-arm) the named timer; a previous timer of that name is cancelled.
    SetTimer {
        /// Timer name, unique per workflow among pending timers.
        name: String,
        /// When it fires.
        at: DateTime<Utc>,
        /// The signal it delivers.
        signal: String,
    },
    /// Cancel the named timer if pending.
    CancelTimer {
        /// Timer name.
        name: String,
    },
    /// Start another workflow (idempotent on kind + key).
    Start {
        /// Workflow kind.
        kind: String,
        /// Business key.
        key: String,
        /// Start input.
        input: Value,
    },
    /// The lifecycle ended normally (including cancelled/expired ends).
    Complete,
    /// The lifecycle ended in failure.
    Fail {
        /// Why.
        reason: String,
    },
}

/// The result of a transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<S> {
    /// The signal applies: store `next` and carry out `commands`.
    Accept {
        /// The new state.
        next: S,
        /// Follow-up work.
        commands: Vec<Command>,
    },
    /// The signal does not apply in this state; nothing changes.
    Reject {
        /// Machine-readable reason, e.g. `already_claimed`.
        reason: String,
    },
}

impl<S> Outcome<S> {
    /// Shorthand for a rejection.
    pub fn reject(reason: impl Into<String>) -> Self {
        Outcome::Reject {
            reason: reason.into(),
        }
    }
}

/// Why a signal or start input could not be parsed (a 4xx at the edge).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The workflow has no signal of this name.
    #[error("unknown signal `{0}`")]
    UnknownSignal(String),
    /// The payload or input does not have the expected shape.
    #[error("invalid payload: {0}")]
    InvalidPayload(String),
    /// The business key is not valid for this workflow.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// A field a crew or driver would read is not safe to show them (it names
    /// the field and why, never the value).
    #[error("{0}")]
    CrewUnsafe(String),
    /// The stored state does not decode (e.g. an older binary reading a newer
    /// state): a runtime fault, never the signal's fault.
    #[error("stored state does not decode: {0}")]
    StoredState(String),
}

/// Parse a lead id key: a UUID in its canonical lower-case hyphenated form only,
/// so one lead can never have two workflows under two spellings of its id.
pub fn parse_lead_key(kind: &str, key: &str) -> Result<uuid::Uuid, ParseError> {
    uuid::Uuid::parse_str(key)
        .ok()
        .filter(|id| id.hyphenated().to_string() == key)
        .ok_or_else(|| {
            ParseError::InvalidKey(format!(
                "the {kind} key must be the lead id as a lower-case hyphenated UUID"
            ))
        })
}

/// Decode a signal payload or start input into `T` (unknown fields refused
/// where `T` says so).
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(v: &Value) -> Result<T, ParseError> {
    serde_json::from_value(v.clone()).map_err(|e| ParseError::InvalidPayload(e.to_string()))
}

/// The `reason` of an override: 1..=500 printable characters after trimming.
pub(crate) fn reason_of(payload: &Value) -> Result<String, ParseError> {
    let r = payload["reason"].as_str().map(str::trim).ok_or_else(|| {
        ParseError::InvalidPayload("a reason (1..=500 characters) is required".into())
    })?;
    text::check_field("reason", r, text::TextKind::Line, 500)
        .map_err(ParseError::InvalidPayload)?;
    Ok(r.to_string())
}

/// A Mermaid state diagram from a workflow's [`Workflow::EDGES`].
pub fn mermaid(edges: &[(&str, &str, &str)]) -> String {
    let mut out = String::from("stateDiagram-v2\n");
    for (from, to, label) in edges {
        if label.is_empty() {
            out.push_str(&format!("    {from} --> {to}\n"));
        } else {
            out.push_str(&format!("    {from} --> {to}: {label}\n"));
        }
    }
    out
}

/// A lifecycle: the typed interface every workflow module implements.
pub trait Workflow {
    /// The kind name used on the wire and in the database.
    const KIND: &'static str;
    /// Persisted state.
    type State: Serialize + for<'de> Deserialize<'de> + Clone + std::fmt::Debug;
    /// Signals it accepts.
    type Signal: std::fmt::Debug;

    /// Validate the start input and produce the initial state and commands.
    fn start(
        key: &str,
        input: &Value,
        ctx: &Ctx<'_>,
    ) -> Result<(Self::State, Vec<Command>), ParseError>;
    /// Parse a signal from its wire form.
    fn parse_signal(name: &str, payload: &Value) -> Result<Self::Signal, ParseError>;
    /// Which roles may send the signal of this name (checked at the edge → 403).
    fn allowed_roles(signal_name: &str) -> &'static [Role];
    /// The pure transition.
    fn on_signal(state: &Self::State, signal: Self::Signal, ctx: &Ctx<'_>) -> Outcome<Self::State>;
    /// The state's upper-case name (`PUBLISHED`).
    fn state_name(state: &Self::State) -> &'static str;
    /// Whether the state is final (accepts nothing).
    fn is_final(state: &Self::State) -> bool;

    /// The state diagram as data: `(from, to, label)`, with `[*]` for the start
    /// and the end. Drives the generated Mermaid diagram and which states ops
    /// may force a workflow into.
    const EDGES: &'static [(&'static str, &'static str, &'static str)] = &[];

    /// The signal that moves `state` to `target` by hand (ops "force"), if the
    /// workflow allows forcing that edge. Personal-data releases never are.
    fn force_signal(state: &Self::State, target: &str) -> Option<(&'static str, Value)> {
        let _ = (state, target);
        None
    }

    /// How long an instance may sit in a state before ops call it stuck
    /// (state name, seconds). States not listed never count as stuck by age.
    const STUCK_AFTER: &'static [(&'static str, u64)] = &[];

    /// The definition's version. Instances record the version they were
    /// started with; a definition whose state changes incompatibly bumps it and
    /// ships an upcaster.
    const VERSION: u32 = 1;

    /// Upcast a stored state from `from` to `from + 1`, as data (no I/O).
    /// The default knows no older versions.
    fn upcast(from: u32, state: Value) -> Result<Value, String> {
        let _ = state;
        Err(format!("no upcaster from version {from}"))
    }
}
