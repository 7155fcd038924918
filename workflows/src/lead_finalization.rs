//! Lead finalization: the one event Lead Core sends to Dispatch (DOMAIN.md §1).
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> FINALIZED: start = LeadFinalized (integration)
//!     FINALIZED --> [*]
//! ```
//!
//! Starting the workflow *is* the `LeadFinalized` event. In that one transition,
//! per the tenant's flags read at that moment:
//! - `dispatch.operator.send_full` (default true): the full lead to the operator
//!   (effect `notify_operator_full`, key `<lead_id>:operator_full_v1`);
//! - `dispatch.operator.send_crew_fallback` (default true): the crew-safe copy to
//!   the operator (effect `notify_operator_crew_fallback`, key `<lead_id>:crew_fallback_v1`);
//! - `dispatch.crew.enabled` (default false): start the `dispatch` workflow for the lead.
//!
//! The lifecycle then completes: later flag changes do not re-send. Defaults
//! are chosen so that a tenant without a `dispatch` section behaves like
//! before Dispatch existed: the operator is told, nothing is dispatched.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::lead::{short_id, FullLead};
use crate::{Command, Ctx, Outcome, ParseError, Role, Workflow};

/// Effect names.
pub mod effects {
    /// The full lead, privately to the operator.
    pub const NOTIFY_OPERATOR_FULL: &str = "notify_operator_full";
    /// The crew-safe copy, to the operator.
    pub const NOTIFY_OPERATOR_CREW_FALLBACK: &str = "notify_operator_crew_fallback";
}

/// What was done when the lead was finalized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LeadFinalizationState {
    /// Final: the operator was notified and dispatch started, per the flags.
    Finalized {
        /// The lead.
        lead_id: Uuid,
        /// The full lead went to the operator.
        sent_full: bool,
        /// The crew-safe copy went to the operator.
        sent_crew_fallback: bool,
        /// The dispatch workflow was started.
        dispatch_started: bool,
    },
}

/// No signals: the lifecycle is one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeadFinalizationSignal {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    lead: FullLead,
}

/// The lead finalization workflow.
#[derive(Debug, Clone, Copy)]
pub struct LeadFinalization;

fn flag(config: &Value, pointer: &str, default: bool) -> bool {
    config
        .pointer(pointer)
        .and_then(Value::as_bool)
        .unwrap_or(default)
}

impl Workflow for LeadFinalization {
    const KIND: &'static str = "lead_finalization";
    type State = LeadFinalizationState;
    type Signal = LeadFinalizationSignal;

    fn start(
        key: &str,
        input: &Value,
        ctx: &Ctx<'_>,
    ) -> Result<(Self::State, Vec<Command>), ParseError> {
        let lead_id = crate::parse_lead_key(Self::KIND, key)?;
        let parsed: Input = serde_json::from_value(input.clone())
            .map_err(|e| ParseError::InvalidPayload(e.to_string()))?;
        FullLead::parse_strict(&input["lead"]).map_err(ParseError::InvalidPayload)?;
        if parsed.lead.id.is_some_and(|id| id != lead_id) {
            return Err(ParseError::InvalidPayload(
                "lead.id differs from the workflow key".into(),
            ));
        }
        let cfg = ctx.tenant_config;
        let sent_full = flag(cfg, "/dispatch/operator/send_full", true);
        let sent_crew_fallback = flag(cfg, "/dispatch/operator/send_crew_fallback", true);
        let dispatch_started = flag(cfg, "/dispatch/crew/enabled", false);
        if sent_crew_fallback || dispatch_started {
            // The crew view is built now, so a lead no crew may read is refused
            // here, naming the field, instead of failing in a worker later.
            crate::lead::CrewLeadView::checked(lead_id, &parsed.lead, cfg)
                .map_err(|e| ParseError::CrewUnsafe(e.to_string()))?;
        }
        let refs = json!({ "lead_id": lead_id, "short_id": short_id(lead_id) });
        let mut commands = Vec::new();
        if sent_full {
            commands.push(Command::Effect {
                name: effects::NOTIFY_OPERATOR_FULL.into(),
                idempotency_key: format!("{lead_id}:operator_full_v1"),
                payload: refs.clone(),
                reply: None,
            });
        }
        if sent_crew_fallback {
            commands.push(Command::Effect {
                name: effects::NOTIFY_OPERATOR_CREW_FALLBACK.into(),
                idempotency_key: format!("{lead_id}:crew_fallback_v1"),
                payload: refs,
                reply: None,
            });
        }
        if dispatch_started {
            commands.push(Command::Start {
                kind: crate::dispatch::Dispatch::KIND.into(),
                key: lead_id.to_string(),
                input: json!({ "lead": input["lead"] }),
            });
        }
        commands.push(Command::Complete);
        let state = LeadFinalizationState::Finalized {
            lead_id,
            sent_full,
            sent_crew_fallback,
            dispatch_started,
        };
        Ok((state, commands))
    }

    const EDGES: &'static [(&'static str, &'static str, &'static str)] = &[
        ("[*]", "FINALIZED", "start = LeadFinalized (integration)"),
        ("FINALIZED", "[*]", ""),
    ];

    fn parse_signal(name: &str, _payload: &Value) -> Result<Self::Signal, ParseError> {
        Err(ParseError::UnknownSignal(name.to_string()))
    }

    fn allowed_roles(_signal_name: &str) -> &'static [Role] {
        &[]
    }

    fn on_signal(
        _state: &Self::State,
        signal: Self::Signal,
        _ctx: &Ctx<'_>,
    ) -> Outcome<Self::State> {
        match signal {}
    }

    fn state_name(_state: &Self::State) -> &'static str {
        "FINALIZED"
    }

    fn is_final(_state: &Self::State) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Actor;
    use chrono::TimeZone;

    fn run(config: Value) -> (LeadFinalizationState, Vec<Command>) {
        let actor = Actor::system();
        let ctx = Ctx {
            now: chrono::Utc.timestamp_opt(0, 0).unwrap(),
            tenant_config: &config,
            actor: &actor,
        };
        let lead = json!({"lead": {"client": {"name": "Canary"}, "from": {"locality": "Haifa"}}});
        LeadFinalization::start("0952ef82-0000-4000-8000-000000000000", &lead, &ctx).unwrap()
    }

    fn effect_keys(commands: &[Command]) -> Vec<String> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Effect {
                    idempotency_key, ..
                } => Some(idempotency_key.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn defaults_notify_the_operator_twice_and_do_not_dispatch() {
        let (state, commands) = run(json!({}));
        assert_eq!(
            effect_keys(&commands),
            [
                "0952ef82-0000-4000-8000-000000000000:operator_full_v1",
                "0952ef82-0000-4000-8000-000000000000:crew_fallback_v1"
            ]
        );
        assert!(!commands.iter().any(|c| matches!(c, Command::Start { .. })));
        assert!(matches!(
            state,
            LeadFinalizationState::Finalized {
                dispatch_started: false,
                ..
            }
        ));
        assert_eq!(commands.last(), Some(&Command::Complete));
    }

    #[test]
    fn flags_select_the_messages_and_crew_enabled_starts_dispatch() {
        let cfg = json!({"dispatch": {"operator": {"send_full": false, "send_crew_fallback": true}, "crew": {"enabled": true}}});
        let (_, commands) = run(cfg);
        assert_eq!(
            effect_keys(&commands),
            ["0952ef82-0000-4000-8000-000000000000:crew_fallback_v1"]
        );
        let start = commands.iter().find_map(|c| match c {
            Command::Start { kind, key, input } => Some((kind.clone(), key.clone(), input.clone())),
            _ => None,
        });
        let (kind, key, input) = start.expect("dispatch started");
        assert_eq!(
            (kind.as_str(), key.as_str()),
            ("dispatch", "0952ef82-0000-4000-8000-000000000000")
        );
        assert_eq!(input["lead"]["from"]["locality"], "Haifa");
        let (_, none) = run(
            json!({"dispatch": {"operator": {"send_full": false, "send_crew_fallback": false}}}),
        );
        assert!(effect_keys(&none).is_empty());
    }

    #[test]
    fn effect_payloads_carry_no_personal_data() {
        let (_, commands) = run(json!({}));
        for c in commands {
            if let Command::Effect { payload, .. } = c {
                assert!(!payload.to_string().contains("Canary"));
            }
        }
    }
}
