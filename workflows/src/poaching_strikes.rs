//! Anti-poaching escalation per sitter (DOMAIN.md §2), over a rolling 30 days:
//! the 1st blocked attempt is blocked and warned (and flagged to the owner,
//! like every attempt); the 2nd raises a high-severity owner alert; the 3rd
//! locks the sitter's messaging pending the owner's review. The owner unlocks.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> CLEAR: start (first strike)
//!     CLEAR --> CLEAR: strike (1st, 2nd within 30 days) / expire (timer)
//!     CLEAR --> LOCKED: strike (3rd within 30 days)
//!     LOCKED --> LOCKED: strike / expire
//!     LOCKED --> CLEAR: unlock (operator, ops)
//! ```
//!
//! The key is the sitter id. Routing reads LOCKED in the message's own
//! transaction, so a locked sitter's next message is refused at once.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{reason_of, Command, Ctx, Outcome, ParseError, Role, Workflow};

/// Strikes count for this many days.
pub const WINDOW_DAYS: i64 = 30;

/// Effect names.
pub mod effects {
    /// An owner inbox alert (`high` severity; `locked` on the 3rd strike).
    pub const OWNER_ALERT: &str = "msg_owner_alert";
}

/// States: the strikes inside the rolling window, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StrikeState {
    /// The sitter may message.
    Clear {
        /// Strike times within the window.
        strikes: Vec<DateTime<Utc>>,
    },
    /// Messaging locked pending the owner's review.
    Locked {
        /// Strike times within the window.
        strikes: Vec<DateTime<Utc>>,
    },
}

/// Signals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrikeSignal {
    /// A blocked attempt by the sitter.
    Strike {
        /// The blocked message.
        message_id: String,
    },
    /// The oldest strike leaves the window (timer).
    Expire,
    /// The owner reviewed and unlocks.
    Unlock {
        /// Why (audited).
        reason: String,
    },
}

/// The poaching strikes workflow.
#[derive(Debug, Clone, Copy)]
pub struct PoachingStrikes;

fn live(strikes: &[DateTime<Utc>], now: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    strikes
        .iter()
        .copied()
        .filter(|t| now - *t < Duration::days(WINDOW_DAYS))
        .collect()
}

fn expiry(strikes: &[DateTime<Utc>]) -> Vec<Command> {
    match strikes.first() {
        Some(oldest) => vec![Command::SetTimer {
            name: "expire".into(),
            at: *oldest + Duration::days(WINDOW_DAYS),
            signal: "expire".into(),
        }],
        None => vec![Command::CancelTimer {
            name: "expire".into(),
        }],
    }
}

impl Workflow for PoachingStrikes {
    const KIND: &'static str = "poaching_strikes";
    type State = StrikeState;
    type Signal = StrikeSignal;

    const EDGES: &'static [(&'static str, &'static str, &'static str)] = &[
        ("[*]", "CLEAR", "start (first strike)"),
        ("CLEAR", "CLEAR", "strike (1st, 2nd) / expire"),
        ("CLEAR", "LOCKED", "strike (3rd within 30 days)"),
        ("LOCKED", "LOCKED", "strike / expire"),
        ("LOCKED", "CLEAR", "unlock (operator, ops)"),
    ];

    fn start(
        key: &str,
        input: &Value,
        _ctx: &Ctx<'_>,
    ) -> Result<(StrikeState, Vec<Command>), ParseError> {
        if key.is_empty() || key.len() > 64 {
            return Err(ParseError::InvalidKey("the key is the sitter id".into()));
        }
        if !input.as_object().is_some_and(|o| o.is_empty()) {
            return Err(ParseError::InvalidPayload("the start input is `{}`".into()));
        }
        Ok((StrikeState::Clear { strikes: vec![] }, vec![]))
    }

    fn parse_signal(name: &str, payload: &Value) -> Result<StrikeSignal, ParseError> {
        match name {
            "strike" => Ok(StrikeSignal::Strike {
                message_id: payload["message_id"]
                    .as_str()
                    .ok_or_else(|| ParseError::InvalidPayload("message_id is required".into()))?
                    .to_string(),
            }),
            "expire" => Ok(StrikeSignal::Expire),
            "unlock" => Ok(StrikeSignal::Unlock {
                reason: reason_of(payload)?,
            }),
            other => Err(ParseError::UnknownSignal(other.into())),
        }
    }

    fn allowed_roles(name: &str) -> &'static [Role] {
        match name {
            "strike" | "expire" => &[Role::System],
            "unlock" => &[Role::Operator, Role::Ops],
            _ => &[],
        }
    }

    fn on_signal(state: &StrikeState, signal: StrikeSignal, ctx: &Ctx<'_>) -> Outcome<StrikeState> {
        let (strikes, locked) = match state {
            StrikeState::Clear { strikes } => (strikes, false),
            StrikeState::Locked { strikes } => (strikes, true),
        };
        match signal {
            StrikeSignal::Strike { message_id } => {
                let mut now_live = live(strikes, ctx.now);
                now_live.push(ctx.now);
                let n = now_live.len();
                let mut commands = expiry(&now_live);
                let lock = locked || n >= 3;
                if n >= 2 && !locked {
                    commands.push(Command::Effect {
                        name: effects::OWNER_ALERT.into(),
                        idempotency_key: format!("strike:{message_id}:alert"),
                        payload: json!({ "message_id": message_id, "strikes": n, "locked": lock }),
                        reply: None,
                    });
                }
                let next = if lock {
                    StrikeState::Locked { strikes: now_live }
                } else {
                    StrikeState::Clear { strikes: now_live }
                };
                Outcome::Accept { next, commands }
            }
            StrikeSignal::Expire => {
                let now_live = live(strikes, ctx.now);
                let commands = expiry(&now_live);
                let next = if locked {
                    StrikeState::Locked { strikes: now_live }
                } else {
                    StrikeState::Clear { strikes: now_live }
                };
                Outcome::Accept { next, commands }
            }
            StrikeSignal::Unlock { .. } if locked => Outcome::Accept {
                // The review resets the count.
                next: StrikeState::Clear { strikes: vec![] },
                commands: expiry(&[]),
            },
            StrikeSignal::Unlock { .. } => Outcome::reject("not_locked"),
        }
    }

    fn state_name(state: &StrikeState) -> &'static str {
        match state {
            StrikeState::Clear { .. } => "CLEAR",
            StrikeState::Locked { .. } => "LOCKED",
        }
    }

    fn is_final(_: &StrikeState) -> bool {
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

    fn strike(s: &StrikeState, day: i64) -> (StrikeState, Vec<Command>) {
        let (a, cfg) = (Actor::system(), json!({}));
        let signal = StrikeSignal::Strike {
            message_id: format!("m{day}"),
        };
        match PoachingStrikes::on_signal(
            s,
            signal,
            &Ctx {
                now: at(day),
                tenant_config: &cfg,
                actor: &a,
            },
        ) {
            Outcome::Accept { next, commands } => (next, commands),
            Outcome::Reject { reason } => panic!("{reason}"),
        }
    }

    fn alerts(c: &[Command]) -> usize {
        c.iter()
            .filter(|c| matches!(c, Command::Effect { name, .. } if name == effects::OWNER_ALERT))
            .count()
    }

    #[test]
    fn second_strike_alerts_third_within_30_days_locks_and_old_strikes_expire() {
        let s = StrikeState::Clear { strikes: vec![] };
        let (s, c) = strike(&s, 0);
        assert_eq!((PoachingStrikes::state_name(&s), alerts(&c)), ("CLEAR", 0));
        let (s, c) = strike(&s, 10);
        assert_eq!((PoachingStrikes::state_name(&s), alerts(&c)), ("CLEAR", 1));
        // Day 31: the day-0 strike has left the window; this is the 2nd again.
        let (s2, c) = strike(&s, 31);
        assert_eq!((PoachingStrikes::state_name(&s2), alerts(&c)), ("CLEAR", 1));
        let (s3, c) = strike(&s, 20);
        assert_eq!(
            (PoachingStrikes::state_name(&s3), alerts(&c)),
            ("LOCKED", 1)
        );
        let (a, cfg) = (Actor::system(), json!({}));
        let ctx = Ctx {
            now: at(21),
            tenant_config: &cfg,
            actor: &a,
        };
        let Outcome::Accept { next, .. } = PoachingStrikes::on_signal(
            &s3,
            StrikeSignal::Unlock {
                reason: "reviewed".into(),
            },
            &ctx,
        ) else {
            panic!()
        };
        assert_eq!(next, StrikeState::Clear { strikes: vec![] });
        assert_eq!(
            PoachingStrikes::allowed_roles("unlock"),
            &[Role::Operator, Role::Ops]
        );
    }
}
