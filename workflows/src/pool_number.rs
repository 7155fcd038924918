//! A pool number's cycle (DOMAIN.md §2): leased to one client for a one-time
//! booking (or overflow), released when the lease ends, then kept from other
//! clients for 30 days — unless the pool is exhausted, when it may be leased at
//! once (routing protects against leakage: a sender not mapped to an active
//! thread on the number reaches only the owner).
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> AVAILABLE: start (operator, ops; or a recycled sitter number)
//!     AVAILABLE --> LEASED: lease
//!     LEASED --> LEASED: lease (same client, later end)
//!     LEASED --> COOLDOWN: lease_end (timer)
//!     COOLDOWN --> AVAILABLE: cooldown_over (timer, 30 days)
//!     COOLDOWN --> LEASED: lease (same client, or the pool is exhausted)
//! ```
//!
//! The key is the number id. The API picks the number and writes the lease
//! into `msg_numbers` in the transaction that queues `lease`; this workflow
//! owns the lease end and cooldown timers. It never ends: a pool number cycles.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{decode, Command, Ctx, Outcome, ParseError, Role, Workflow};

/// Days a released pool number is kept from other clients.
pub const POOL_COOLDOWN_DAYS: i64 = 30;

/// Effect names.
pub mod effects {
    /// The lease ended: the number's threads close and it cools down.
    pub const RELEASED: &str = "msg_pool_released";
    /// The cooldown ended: the number is available again.
    pub const AVAILABLE: &str = "msg_pool_available";
}

/// States. `cycle` counts leases, so each cycle's effects have their own keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PoolState {
    /// Free.
    Available {
        /// Leases so far.
        cycle: u64,
    },
    /// One client's.
    Leased {
        /// Leases so far (this one included).
        cycle: u64,
        /// The client.
        client_id: String,
        /// The lease ends (the last window's close).
        until: DateTime<Utc>,
    },
    /// Released; kept from other clients until `until`.
    Cooldown {
        /// Leases so far.
        cycle: u64,
        /// The client it was released from.
        last_client: String,
        /// The cooldown ends.
        until: DateTime<Utc>,
    },
}

/// Signals.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// The client.
    pub client_id: String,
    /// The lease ends.
    pub until: DateTime<Utc>,
    /// No cooled number was free: a number in cooldown may go to another client.
    #[serde(default)]
    pub pool_exhausted: bool,
}

/// Signals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolSignal {
    /// Lease (or extend the lease) to a client.
    Lease(Lease),
    /// The lease-end timer.
    LeaseEnd,
    /// The cooldown timer.
    CooldownOver,
}

/// The pool number workflow.
#[derive(Debug, Clone, Copy)]
pub struct PoolNumber;

fn leased(cycle: u64, l: Lease, commands: Vec<Command>) -> Outcome<PoolState> {
    let mut commands = commands;
    commands.push(Command::SetTimer {
        name: "lease_end".into(),
        at: l.until,
        signal: "lease_end".into(),
    });
    Outcome::Accept {
        next: PoolState::Leased {
            cycle,
            client_id: l.client_id,
            until: l.until,
        },
        commands,
    }
}

impl Workflow for PoolNumber {
    const KIND: &'static str = "pool_number";
    type State = PoolState;
    type Signal = PoolSignal;

    const EDGES: &'static [(&'static str, &'static str, &'static str)] = &[
        ("[*]", "AVAILABLE", "start"),
        ("AVAILABLE", "LEASED", "lease"),
        ("LEASED", "LEASED", "lease (same client, later end)"),
        ("LEASED", "COOLDOWN", "lease_end (timer)"),
        ("COOLDOWN", "AVAILABLE", "cooldown_over (timer, 30 days)"),
        (
            "COOLDOWN",
            "LEASED",
            "lease (same client, or pool exhausted)",
        ),
    ];

    fn start(
        key: &str,
        input: &Value,
        _ctx: &Ctx<'_>,
    ) -> Result<(PoolState, Vec<Command>), ParseError> {
        uuid::Uuid::parse_str(key)
            .map_err(|_| ParseError::InvalidKey("the key is the number id".into()))?;
        if !input.as_object().is_some_and(|o| o.is_empty()) {
            return Err(ParseError::InvalidPayload("the start input is `{}`".into()));
        }
        Ok((PoolState::Available { cycle: 0 }, vec![]))
    }

    fn parse_signal(name: &str, payload: &Value) -> Result<PoolSignal, ParseError> {
        match name {
            "lease" => Ok(PoolSignal::Lease(decode(payload)?)),
            "lease_end" => Ok(PoolSignal::LeaseEnd),
            "cooldown_over" => Ok(PoolSignal::CooldownOver),
            other => Err(ParseError::UnknownSignal(other.into())),
        }
    }

    fn allowed_roles(name: &str) -> &'static [Role] {
        match name {
            // Leases come from bookings (the API picks the number).
            "lease" => &[Role::System],
            "lease_end" | "cooldown_over" => &[Role::System],
            _ => &[],
        }
    }

    fn on_signal(state: &PoolState, signal: PoolSignal, ctx: &Ctx<'_>) -> Outcome<PoolState> {
        match (state, signal) {
            (PoolState::Available { cycle }, PoolSignal::Lease(l)) => leased(cycle + 1, l, vec![]),
            (
                PoolState::Leased {
                    cycle,
                    client_id,
                    until,
                },
                PoolSignal::Lease(l),
            ) => {
                if *client_id != l.client_id {
                    return Outcome::reject("leased_to_another_client");
                }
                let until = (*until).max(l.until);
                leased(*cycle, Lease { until, ..l }, vec![])
            }
            (
                PoolState::Cooldown {
                    cycle,
                    last_client,
                    until,
                },
                PoolSignal::Lease(l),
            ) => {
                if *last_client != l.client_id && !l.pool_exhausted && ctx.now < *until {
                    return Outcome::reject("cooling_down");
                }
                let cancel = Command::CancelTimer {
                    name: "cooldown".into(),
                };
                leased(cycle + 1, l, vec![cancel])
            }
            (
                PoolState::Leased {
                    cycle,
                    client_id,
                    until,
                },
                PoolSignal::LeaseEnd,
            ) => {
                // The timer (re-armed by every extension) ends the lease; ops may fire it early.
                let cooldown_until = ctx.now + Duration::days(POOL_COOLDOWN_DAYS);
                Outcome::Accept {
                    next: PoolState::Cooldown {
                        cycle: *cycle,
                        last_client: client_id.clone(),
                        until: cooldown_until,
                    },
                    commands: vec![
                        Command::Effect {
                            name: effects::RELEASED.into(),
                            idempotency_key: format!("pool:{cycle}:released"),
                            payload: json!({ "client_id": client_id, "lease_until": until, "cooldown_until": cooldown_until }),
                            reply: None,
                        },
                        Command::SetTimer {
                            name: "cooldown".into(),
                            at: cooldown_until,
                            signal: "cooldown_over".into(),
                        },
                    ],
                }
            }
            (PoolState::Cooldown { cycle, .. }, PoolSignal::CooldownOver) => Outcome::Accept {
                next: PoolState::Available { cycle: *cycle },
                commands: vec![Command::Effect {
                    name: effects::AVAILABLE.into(),
                    idempotency_key: format!("pool:{cycle}:available"),
                    payload: json!({}),
                    reply: None,
                }],
            },
            (_, PoolSignal::LeaseEnd) => Outcome::reject("not_leased"),
            (_, PoolSignal::CooldownOver) => Outcome::reject("not_cooling_down"),
        }
    }

    fn state_name(state: &PoolState) -> &'static str {
        match state {
            PoolState::Available { .. } => "AVAILABLE",
            PoolState::Leased { .. } => "LEASED",
            PoolState::Cooldown { .. } => "COOLDOWN",
        }
    }

    fn is_final(_: &PoolState) -> bool {
        false
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

    fn run(state: &PoolState, signal: PoolSignal, now: DateTime<Utc>) -> Outcome<PoolState> {
        let (a, cfg) = (Actor::system(), json!({}));
        PoolNumber::on_signal(
            state,
            signal,
            &Ctx {
                now,
                tenant_config: &cfg,
                actor: &a,
            },
        )
    }

    fn lease(client: &str, until: i64, exhausted: bool) -> PoolSignal {
        PoolSignal::Lease(Lease {
            client_id: client.into(),
            until: at(until),
            pool_exhausted: exhausted,
        })
    }

    fn accept(o: Outcome<PoolState>) -> PoolState {
        match o {
            Outcome::Accept { next, .. } => next,
            Outcome::Reject { reason } => panic!("rejected: {reason}"),
        }
    }

    #[test]
    fn a_released_number_cools_for_30_days_unless_the_pool_is_exhausted() {
        let s = accept(run(
            &PoolState::Available { cycle: 0 },
            lease("c1", 1, false),
            at(0),
        ));
        assert_eq!(
            run(&s, lease("c2", 2, false), at(0)),
            Outcome::reject("leased_to_another_client")
        );
        let s = accept(run(&s, lease("c1", 2, false), at(0)));
        assert!(matches!(&s, PoolState::Leased { until, .. } if *until == at(2)));
        let s = accept(run(&s, PoolSignal::LeaseEnd, at(2)));
        assert!(matches!(&s, PoolState::Cooldown { until, .. } if *until == at(32)));
        assert_eq!(
            run(&s, lease("c2", 40, false), at(3)),
            Outcome::reject("cooling_down")
        );
        // The same client comes back to the same number.
        assert_eq!(
            PoolNumber::state_name(&accept(run(&s, lease("c1", 40, false), at(3)))),
            "LEASED"
        );
        // Exhausted pool: reused at once.
        assert_eq!(
            PoolNumber::state_name(&accept(run(&s, lease("c2", 40, true), at(3)))),
            "LEASED"
        );
        let s = accept(run(&s, PoolSignal::CooldownOver, at(32)));
        assert_eq!(s, PoolState::Available { cycle: 1 });
        assert!(matches!(
            accept(run(&s, lease("c2", 40, false), at(33))),
            PoolState::Leased { cycle: 2, .. }
        ));
    }
}
