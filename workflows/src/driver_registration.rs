//! Driver registration (DOMAIN.md §3): a Telegram bot cannot message a driver
//! who never started it, so the admin asks for a registration link; the driver
//! presses Start, and the `/start <token>` webhook binds the driver's chat.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> ISSUED: start (operator, ops, integration)
//!     ISSUED --> BOUND: bind (the /start webhook)
//!     ISSUED --> EXPIRED: expire (timer)
//!     ISSUED --> REVOKED: revoke (operator, ops)
//!     BOUND --> [*]
//!     EXPIRED --> [*]
//!     REVOKED --> [*]
//! ```
//!
//! The workflow key is the registration id; the single-use token itself is
//! never in the state (the API keeps only its hash, to find this workflow). The
//! link is in the start input, which only the business's operators can read,
//! because the registration email is rendered from it.
//!
//! Choices where DOMAIN.md is silent:
//! - A token is single-use: the first `/start` binds, any later one is refused
//!   (`already_used`) and binds nothing; after `expires_at` it is refused
//!   (`expired`) even before the expiry timer has fired.
//! - Issuing a new link does not revoke older unexpired ones (each is
//!   single-use anyway); `revoke` ends one early.
//! - The welcome is the answer to the `/start` message itself (the runtime's
//!   reply to a chat-originated signal); the refusals are answered the same way.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{Command, Ctx, Outcome, ParseError, Role, Workflow};

/// Effect names.
pub mod effects {
    /// The deep link and its QR code, by email to the driver.
    pub const REGISTRATION_EMAIL: &str = "driver_registration_email";
    /// Store the driver's Telegram chat id (a local effect: no message).
    pub const BIND_CHAT: &str = "driver_bind_chat";
}

/// Registration states.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RegistrationState {
    /// The link is out; waiting for the driver to press Start.
    Issued {
        /// The driver.
        driver_id: String,
        /// The token stops working at.
        expires_at: DateTime<Utc>,
        /// Whether the link was emailed.
        emailed: bool,
    },
    /// The driver's chat is bound.
    Bound {
        /// The driver.
        driver_id: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// Nobody used it in time.
    Expired {
        /// The driver.
        driver_id: String,
    },
    /// Ended early by the business.
    Revoked {
        /// The driver.
        driver_id: String,
        /// Why.
        reason: String,
    },
}

/// Registration signals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationSignal {
    /// `/start <token>` from a Telegram private chat.
    Bind {
        /// The chat to bind (the driver's private chat with the bot).
        chat_id: i64,
    },
    /// The expiry timer.
    Expire,
    /// End it early.
    Revoke {
        /// Why.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    driver_id: String,
    expires_at: DateTime<Utc>,
    #[serde(default)]
    send_email: bool,
    /// The deep link (rendered into the email); not kept in the state.
    link: String,
}

/// The driver registration workflow.
#[derive(Debug, Clone, Copy)]
pub struct DriverRegistration;

fn driver_of(state: &RegistrationState) -> &str {
    match state {
        RegistrationState::Issued { driver_id, .. }
        | RegistrationState::Bound { driver_id, .. }
        | RegistrationState::Expired { driver_id }
        | RegistrationState::Revoked { driver_id, .. } => driver_id,
    }
}

impl Workflow for DriverRegistration {
    const KIND: &'static str = "driver_registration";
    type State = RegistrationState;
    type Signal = RegistrationSignal;

    fn start(
        key: &str,
        input: &Value,
        ctx: &Ctx<'_>,
    ) -> Result<(Self::State, Vec<Command>), ParseError> {
        let id = uuid::Uuid::parse_str(key)
            .map_err(|_| ParseError::InvalidKey("the registration key is a UUID".into()))?;
        let input: Input = serde_json::from_value(input.clone())
            .map_err(|e| ParseError::InvalidPayload(e.to_string()))?;
        if input.expires_at <= ctx.now {
            return Err(ParseError::InvalidPayload(
                "expires_at must be in the future".into(),
            ));
        }
        if !input.link.starts_with("https://t.me/") {
            return Err(ParseError::InvalidPayload(
                "link must be a t.me deep link".into(),
            ));
        }
        let mut commands = vec![Command::SetTimer {
            name: "expiry".into(),
            at: input.expires_at,
            signal: "expire".into(),
        }];
        if input.send_email {
            commands.push(Command::Effect {
                name: effects::REGISTRATION_EMAIL.into(),
                idempotency_key: format!("registration:{id}:email_v1"),
                payload: json!({ "driver_id": input.driver_id, "registration_id": id }),
                reply: None,
            });
        }
        Ok((
            RegistrationState::Issued {
                driver_id: input.driver_id,
                expires_at: input.expires_at,
                emailed: input.send_email,
            },
            commands,
        ))
    }

    const EDGES: &'static [(&'static str, &'static str, &'static str)] = &[
        ("[*]", "ISSUED", "start (operator, ops, integration)"),
        ("ISSUED", "BOUND", "bind (the /start webhook)"),
        ("ISSUED", "EXPIRED", "expire (timer)"),
        ("ISSUED", "REVOKED", "revoke (operator, ops)"),
        ("BOUND", "[*]", ""),
        ("EXPIRED", "[*]", ""),
        ("REVOKED", "[*]", ""),
    ];

    fn parse_signal(name: &str, payload: &Value) -> Result<Self::Signal, ParseError> {
        match name {
            "bind" => Ok(RegistrationSignal::Bind {
                chat_id: payload["chat_id"].as_i64().ok_or_else(|| {
                    ParseError::InvalidPayload("chat_id (integer) is required".into())
                })?,
            }),
            "expire" => Ok(RegistrationSignal::Expire),
            "revoke" => Ok(RegistrationSignal::Revoke {
                reason: crate::reason_of(payload)?,
            }),
            other => Err(ParseError::UnknownSignal(other.to_string())),
        }
    }

    fn allowed_roles(signal_name: &str) -> &'static [Role] {
        match signal_name {
            // Only the Telegram intake binds (as the system, for the chat it saw).
            "bind" | "expire" => &[Role::System],
            "revoke" => &[Role::Operator, Role::Ops],
            _ => &[],
        }
    }

    fn on_signal(state: &Self::State, signal: Self::Signal, ctx: &Ctx<'_>) -> Outcome<Self::State> {
        let driver_id = driver_of(state).to_string();
        match (state, signal) {
            (
                RegistrationState::Issued { expires_at, .. },
                RegistrationSignal::Bind { chat_id },
            ) => {
                if ctx.now >= *expires_at {
                    return Outcome::reject("expired");
                }
                Outcome::Accept {
                    next: RegistrationState::Bound {
                        driver_id: driver_id.clone(),
                        at: ctx.now,
                    },
                    commands: vec![
                        Command::Effect {
                            name: effects::BIND_CHAT.into(),
                            idempotency_key: format!("registration:{driver_id}:{chat_id}:bind"),
                            payload: json!({ "driver_id": driver_id, "chat_id": chat_id }),
                            reply: None,
                        },
                        Command::CancelTimer {
                            name: "expiry".into(),
                        },
                        Command::Complete,
                    ],
                }
            }
            (RegistrationState::Bound { .. }, RegistrationSignal::Bind { .. }) => {
                Outcome::reject("already_used")
            }
            (
                RegistrationState::Expired { .. } | RegistrationState::Revoked { .. },
                RegistrationSignal::Bind { .. },
            ) => Outcome::reject("expired"),
            (RegistrationState::Issued { .. }, RegistrationSignal::Expire) => Outcome::Accept {
                next: RegistrationState::Expired { driver_id },
                commands: vec![Command::Complete],
            },
            (RegistrationState::Issued { .. }, RegistrationSignal::Revoke { reason }) => {
                Outcome::Accept {
                    next: RegistrationState::Revoked { driver_id, reason },
                    commands: vec![
                        Command::CancelTimer {
                            name: "expiry".into(),
                        },
                        Command::Complete,
                    ],
                }
            }
            (_, RegistrationSignal::Expire | RegistrationSignal::Revoke { .. }) => {
                Outcome::reject("not_issued")
            }
        }
    }

    fn state_name(state: &Self::State) -> &'static str {
        match state {
            RegistrationState::Issued { .. } => "ISSUED",
            RegistrationState::Bound { .. } => "BOUND",
            RegistrationState::Expired { .. } => "EXPIRED",
            RegistrationState::Revoked { .. } => "REVOKED",
        }
    }

    fn is_final(state: &Self::State) -> bool {
        !matches!(state, RegistrationState::Issued { .. })
    }

    fn force_signal(state: &Self::State, target: &str) -> Option<(&'static str, Value)> {
        match (state, target) {
            (RegistrationState::Issued { .. }, "EXPIRED") => Some(("expire", json!({}))),
            (RegistrationState::Issued { .. }, "REVOKED") => {
                Some(("revoke", json!({ "reason": "forced by ops" })))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Actor;
    use chrono::{Duration, TimeZone};

    const KEY: &str = "0192f0c0-0000-7000-8000-00000000abcd";

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }

    fn ctx<'a>(now: DateTime<Utc>, actor: &'a Actor, cfg: &'a Value) -> Ctx<'a> {
        Ctx {
            now,
            tenant_config: cfg,
            actor,
        }
    }

    fn issued(send_email: bool) -> (RegistrationState, Vec<Command>) {
        let (a, cfg) = (Actor::system(), json!({}));
        let input = json!({"driver_id": "d1", "expires_at": at(3600), "send_email": send_email,
                           "link": "https://t.me/CourierBot?start=abc"});
        DriverRegistration::start(KEY, &input, &ctx(at(0), &a, &cfg)).unwrap()
    }

    #[test]
    fn issuing_arms_the_expiry_and_emails_only_when_asked() {
        let (state, commands) = issued(true);
        assert_eq!(DriverRegistration::state_name(&state), "ISSUED");
        assert!(commands
            .iter()
            .any(|c| matches!(c, Command::SetTimer { at: t, .. } if *t == at(3600))));
        assert!(commands.iter().any(
            |c| matches!(c, Command::Effect { name, .. } if name == effects::REGISTRATION_EMAIL)
        ));
        let (_, commands) = issued(false);
        assert!(!commands.iter().any(|c| matches!(c, Command::Effect { .. })));
        // The token never reaches the state.
        assert!(!serde_json::to_string(&state).unwrap().contains("start=abc"));
    }

    #[test]
    fn the_first_start_binds_and_later_or_late_ones_are_refused() {
        let (state, _) = issued(false);
        let (a, cfg) = (Actor::system(), json!({}));
        let Outcome::Accept { next, commands } = DriverRegistration::on_signal(
            &state,
            RegistrationSignal::Bind { chat_id: 42 },
            &ctx(at(10), &a, &cfg),
        ) else {
            panic!("bind refused")
        };
        assert_eq!(DriverRegistration::state_name(&next), "BOUND");
        assert!(commands
            .iter()
            .any(|c| matches!(c, Command::Effect { name, payload, .. }
            if name == effects::BIND_CHAT && payload["chat_id"] == 42)));
        assert_eq!(
            DriverRegistration::on_signal(
                &next,
                RegistrationSignal::Bind { chat_id: 43 },
                &ctx(at(11), &a, &cfg)
            ),
            Outcome::reject("already_used")
        );
        // Past expires_at, even before the timer fired.
        assert_eq!(
            DriverRegistration::on_signal(
                &state,
                RegistrationSignal::Bind { chat_id: 42 },
                &ctx(at(3600) + Duration::seconds(1), &a, &cfg)
            ),
            Outcome::reject("expired")
        );
        let Outcome::Accept { next: expired, .. } = DriverRegistration::on_signal(
            &state,
            RegistrationSignal::Expire,
            &ctx(at(3600), &a, &cfg),
        ) else {
            panic!("expire refused")
        };
        assert_eq!(
            DriverRegistration::on_signal(
                &expired,
                RegistrationSignal::Bind { chat_id: 42 },
                &ctx(at(3601), &a, &cfg)
            ),
            Outcome::reject("expired")
        );
    }

    #[test]
    fn only_the_system_binds() {
        assert_eq!(DriverRegistration::allowed_roles("bind"), &[Role::System]);
        assert!(DriverRegistration::parse_signal("bind", &json!({})).is_err());
        assert!(DriverRegistration::parse_signal("revoke", &json!({"reason": " "})).is_err());
    }
}
