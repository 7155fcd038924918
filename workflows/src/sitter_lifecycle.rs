//! Sitter onboarding and offboarding (DOMAIN.md §2): a sitter gets a dedicated
//! masked number from inventory, registered with the provider; offboarding
//! takes it away at once and cools it down for 90 days, after which it comes
//! back only as a pool number — never as another sitter's number.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> ONBOARDING: start (operator, ops)
//!     ONBOARDING --> ACTIVE: registered (the provider accepted the number)
//!     ONBOARDING --> COOLDOWN: offboard (operator, ops)
//!     ACTIVE --> COOLDOWN: offboard (operator, ops)
//!     COOLDOWN --> RETIRED: cooldown_over (timer, 90 days)
//!     RETIRED --> [*]
//! ```
//!
//! The key is the sitter id. The immediate part of offboarding (the number
//! deactivated, the sitter's threads reassigned, the audit record) is written
//! by the API in the same transaction that queues `offboard`, so no inbound
//! message can be routed to the sitter once the owner's request is answered;
//! this workflow owns the durable part: the 90-day timer and the recycling.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{decode, reason_of, Command, Ctx, Outcome, ParseError, Role, Workflow};

/// Days a deactivated sitter number is kept from everyone.
pub const NUMBER_COOLDOWN_DAYS: i64 = 90;

/// Effect names.
pub mod effects {
    /// Register the sitter's number with the provider (webhook URL, label).
    pub const REGISTER_NUMBER: &str = "msg_register_number";
    /// After the cooldown: the number becomes an available pool number.
    pub const RECYCLE_NUMBER: &str = "msg_recycle_number";
}

/// States.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SitterState {
    /// The number is being registered with the provider.
    Onboarding {
        /// The dedicated masked number.
        number_id: Uuid,
    },
    /// Working; the number carries the sitter's service messages.
    Active {
        /// The dedicated masked number.
        number_id: Uuid,
    },
    /// Offboarded; the number is deactivated and cooling down.
    Cooldown {
        /// The former number.
        number_id: Uuid,
        /// When it may be recycled (as a pool number).
        until: DateTime<Utc>,
        /// Who took over the sitter's threads (`None`: the owner).
        reassigned_to: Option<String>,
    },
    /// The number went back to the pool; the lifecycle is over.
    Retired {
        /// The former number (now a pool number).
        number_id: Uuid,
    },
}

/// Signals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SitterSignal {
    /// The provider registration effect succeeded.
    Registered,
    /// Take the sitter off the platform.
    Offboard {
        /// Who takes over the threads (`None`: the owner).
        reassign_to: Option<String>,
        /// Why (audited).
        reason: String,
    },
    /// The 90-day timer.
    CooldownOver,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    number_id: Uuid,
}

/// The sitter lifecycle workflow.
#[derive(Debug, Clone, Copy)]
pub struct SitterLifecycle;

impl SitterLifecycle {
    fn number(state: &SitterState) -> Uuid {
        match state {
            SitterState::Onboarding { number_id }
            | SitterState::Active { number_id }
            | SitterState::Cooldown { number_id, .. }
            | SitterState::Retired { number_id } => *number_id,
        }
    }
}

impl Workflow for SitterLifecycle {
    const KIND: &'static str = "sitter_lifecycle";
    type State = SitterState;
    type Signal = SitterSignal;

    const EDGES: &'static [(&'static str, &'static str, &'static str)] = &[
        ("[*]", "ONBOARDING", "start (operator, ops)"),
        ("ONBOARDING", "ACTIVE", "registered"),
        ("ONBOARDING", "COOLDOWN", "offboard (operator, ops)"),
        ("ACTIVE", "COOLDOWN", "offboard (operator, ops)"),
        ("COOLDOWN", "RETIRED", "cooldown_over (timer, 90 days)"),
        ("RETIRED", "[*]", ""),
    ];

    const STUCK_AFTER: &'static [(&'static str, u64)] = &[("ONBOARDING", 3600)];

    fn start(
        key: &str,
        input: &Value,
        _ctx: &Ctx<'_>,
    ) -> Result<(SitterState, Vec<Command>), ParseError> {
        if key.is_empty() || key.len() > 64 {
            return Err(ParseError::InvalidKey("the key is the sitter id".into()));
        }
        let input: Input = decode(input)?;
        Ok((
            SitterState::Onboarding {
                number_id: input.number_id,
            },
            vec![Command::Effect {
                name: effects::REGISTER_NUMBER.into(),
                idempotency_key: format!("sitter:{key}:register"),
                payload: json!({ "sitter_id": key, "number_id": input.number_id }),
                reply: Some("registered".into()),
            }],
        ))
    }

    fn parse_signal(name: &str, payload: &Value) -> Result<SitterSignal, ParseError> {
        match name {
            "registered" => Ok(SitterSignal::Registered),
            "offboard" => Ok(SitterSignal::Offboard {
                reassign_to: payload["reassign_to"].as_str().map(str::to_string),
                reason: reason_of(payload)?,
            }),
            "cooldown_over" => Ok(SitterSignal::CooldownOver),
            other => Err(ParseError::UnknownSignal(other.into())),
        }
    }

    fn allowed_roles(name: &str) -> &'static [Role] {
        match name {
            "offboard" => &[Role::Operator, Role::Ops],
            "registered" | "cooldown_over" => &[Role::System],
            _ => &[],
        }
    }

    fn on_signal(state: &SitterState, signal: SitterSignal, ctx: &Ctx<'_>) -> Outcome<SitterState> {
        let number_id = Self::number(state);
        match (state, signal) {
            (SitterState::Onboarding { .. }, SitterSignal::Registered) => Outcome::Accept {
                next: SitterState::Active { number_id },
                commands: vec![],
            },
            (
                SitterState::Onboarding { .. } | SitterState::Active { .. },
                SitterSignal::Offboard { reassign_to, .. },
            ) => {
                let until = ctx.now + Duration::days(NUMBER_COOLDOWN_DAYS);
                Outcome::Accept {
                    next: SitterState::Cooldown {
                        number_id,
                        until,
                        reassigned_to: reassign_to,
                    },
                    commands: vec![Command::SetTimer {
                        name: "cooldown".into(),
                        at: until,
                        signal: "cooldown_over".into(),
                    }],
                }
            }
            // The timer (or ops firing it early, audited) ends the cooldown.
            (SitterState::Cooldown { .. }, SitterSignal::CooldownOver) => {
                Outcome::Accept {
                    next: SitterState::Retired { number_id },
                    commands: vec![
                        Command::Effect {
                            name: effects::RECYCLE_NUMBER.into(),
                            idempotency_key: format!("number:{number_id}:recycle"),
                            payload: json!({ "number_id": number_id }),
                            reply: None,
                        },
                        // From now on the number lives as a pool number.
                        Command::Start {
                            kind: crate::pool_number::PoolNumber::KIND.into(),
                            key: number_id.to_string(),
                            input: json!({}),
                        },
                        Command::Complete,
                    ],
                }
            }
            (
                SitterState::Cooldown { .. } | SitterState::Retired { .. },
                SitterSignal::Offboard { .. },
            ) => Outcome::reject("already_offboarded"),
            (_, SitterSignal::Registered) => Outcome::reject("not_onboarding"),
            (_, SitterSignal::CooldownOver) => Outcome::reject("not_cooling_down"),
        }
    }

    fn state_name(state: &SitterState) -> &'static str {
        match state {
            SitterState::Onboarding { .. } => "ONBOARDING",
            SitterState::Active { .. } => "ACTIVE",
            SitterState::Cooldown { .. } => "COOLDOWN",
            SitterState::Retired { .. } => "RETIRED",
        }
    }

    fn is_final(state: &SitterState) -> bool {
        matches!(state, SitterState::Retired { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Actor;
    use chrono::TimeZone;

    fn at(days: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000, 0).unwrap() + Duration::days(days)
    }

    fn run(state: &SitterState, signal: SitterSignal, now: DateTime<Utc>) -> Outcome<SitterState> {
        let (a, cfg) = (Actor::system(), json!({}));
        SitterLifecycle::on_signal(
            state,
            signal,
            &Ctx {
                now,
                tenant_config: &cfg,
                actor: &a,
            },
        )
    }

    #[test]
    fn onboarding_registers_the_number_then_offboarding_cools_it_for_90_days_and_recycles_it_as_pool(
    ) {
        let n = Uuid::from_u128(7);
        let (a, cfg) = (Actor::system(), json!({}));
        let ctx = Ctx {
            now: at(0),
            tenant_config: &cfg,
            actor: &a,
        };
        let (s, cmds) = SitterLifecycle::start("sam", &json!({ "number_id": n }), &ctx).unwrap();
        assert!(
            matches!(&cmds[0], Command::Effect { name, reply: Some(r), .. } if name == effects::REGISTER_NUMBER && r == "registered")
        );
        let Outcome::Accept { next: s, .. } = run(&s, SitterSignal::Registered, at(0)) else {
            panic!()
        };
        assert_eq!(SitterLifecycle::state_name(&s), "ACTIVE");
        let Outcome::Accept { next: s, commands } = run(
            &s,
            SitterSignal::Offboard {
                reassign_to: None,
                reason: "left".into(),
            },
            at(10),
        ) else {
            panic!()
        };
        assert!(matches!(&commands[0], Command::SetTimer { at: t, .. } if *t == at(100)));
        let Outcome::Accept { next, commands } = run(&s, SitterSignal::CooldownOver, at(100))
        else {
            panic!()
        };
        assert!(SitterLifecycle::is_final(&next));
        assert!(commands
            .iter()
            .any(|c| matches!(c, Command::Effect { name, .. } if name == effects::RECYCLE_NUMBER)));
        assert!(commands.iter().any(|c| matches!(c, Command::Start { kind, key, .. } if kind == "pool_number" && *key == n.to_string())));
        assert_eq!(
            run(
                &s,
                SitterSignal::Offboard {
                    reassign_to: None,
                    reason: "x".into()
                },
                at(11)
            ),
            Outcome::reject("already_offboarded")
        );
    }

    #[test]
    fn only_the_owner_offboards_and_a_reason_is_required() {
        assert_eq!(
            SitterLifecycle::allowed_roles("offboard"),
            &[Role::Operator, Role::Ops]
        );
        assert!(SitterLifecycle::parse_signal("offboard", &json!({})).is_err());
    }
}
