//! Meet-and-greet (DOMAIN.md §2): the thread starts on the front-desk number;
//! the owner may let the assigned sitter message inside it, during the
//! meet-and-greet window only. The owner (only) approves — future service
//! messages move to the sitter's masked number — or fails it: the thread stays
//! front desk only and the sitter loses access.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> PENDING: start (operator, ops)
//!     PENDING --> PENDING: allow_sitter (operator, ops)
//!     PENDING --> APPROVED: approve (operator, ops)
//!     PENDING --> FAILED: fail (operator, ops)
//!     APPROVED --> [*]
//!     FAILED --> [*]
//! ```
//!
//! The key is the thread id. Routing reads this state in the message's own
//! transaction: the sitter may message only while PENDING, allowed, and inside
//! `[opens_at, closes_at)`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{decode, reason_of, Command, Ctx, Outcome, ParseError, Role, Workflow};

/// Effect names.
pub mod effects {
    /// Approved: the thread moves to the sitter's masked number.
    pub const APPROVED: &str = "msg_meet_greet_approved";
    /// Failed: the sitter loses access to the thread.
    pub const FAILED: &str = "msg_meet_greet_failed";
}

/// The meeting's parties and window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meeting {
    /// The client.
    pub client_id: String,
    /// The assigned sitter.
    pub sitter_id: String,
    /// The owner lets the sitter message in the thread (inside the window).
    #[serde(default)]
    pub sitter_may_message: bool,
    /// The meet-and-greet window opens.
    pub opens_at: DateTime<Utc>,
    /// It closes.
    pub closes_at: DateTime<Utc>,
}

impl Meeting {
    /// Whether the sitter may message at `now`.
    pub fn sitter_may_message_at(&self, now: DateTime<Utc>) -> bool {
        self.sitter_may_message && self.opens_at <= now && now < self.closes_at
    }
}

/// States.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MeetState {
    /// Waiting for the owner's decision.
    Pending(Meeting),
    /// The sitter takes the client on their masked number.
    Approved(Meeting),
    /// Front desk only; the sitter has no access.
    Failed {
        /// The meeting (the sitter's permission is withdrawn).
        meeting: Meeting,
        /// Why.
        reason: String,
    },
}

/// Signals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeetSignal {
    /// Let the sitter message in the thread (or withdraw that).
    AllowSitter(bool),
    /// It went well.
    Approve,
    /// It did not.
    Fail {
        /// Why.
        reason: String,
    },
}

/// The meet-and-greet workflow.
#[derive(Debug, Clone, Copy)]
pub struct MeetAndGreet;

impl Workflow for MeetAndGreet {
    const KIND: &'static str = "meet_and_greet";
    type State = MeetState;
    type Signal = MeetSignal;

    const EDGES: &'static [(&'static str, &'static str, &'static str)] = &[
        ("[*]", "PENDING", "start (operator, ops)"),
        ("PENDING", "PENDING", "allow_sitter (operator, ops)"),
        ("PENDING", "APPROVED", "approve (operator, ops)"),
        ("PENDING", "FAILED", "fail (operator, ops)"),
        ("APPROVED", "[*]", ""),
        ("FAILED", "[*]", ""),
    ];

    fn start(
        key: &str,
        input: &Value,
        _ctx: &Ctx<'_>,
    ) -> Result<(MeetState, Vec<Command>), ParseError> {
        uuid::Uuid::parse_str(key)
            .map_err(|_| ParseError::InvalidKey("the key is the thread id".into()))?;
        let m: Meeting = decode(input)?;
        if m.closes_at <= m.opens_at {
            return Err(ParseError::InvalidPayload(
                "closes_at must be after opens_at".into(),
            ));
        }
        Ok((MeetState::Pending(m), vec![]))
    }

    fn parse_signal(name: &str, payload: &Value) -> Result<MeetSignal, ParseError> {
        match name {
            "allow_sitter" => payload["allowed"]
                .as_bool()
                .map(MeetSignal::AllowSitter)
                .ok_or_else(|| ParseError::InvalidPayload("allowed (boolean) is required".into())),
            "approve" => Ok(MeetSignal::Approve),
            "fail" => Ok(MeetSignal::Fail {
                reason: reason_of(payload)?,
            }),
            other => Err(ParseError::UnknownSignal(other.into())),
        }
    }

    fn allowed_roles(name: &str) -> &'static [Role] {
        match name {
            // Owner only: never the sitter, never a machine.
            "allow_sitter" | "approve" | "fail" => &[Role::Operator, Role::Ops],
            _ => &[],
        }
    }

    fn on_signal(state: &MeetState, signal: MeetSignal, _ctx: &Ctx<'_>) -> Outcome<MeetState> {
        let MeetState::Pending(m) = state else {
            return Outcome::reject("already_decided");
        };
        match signal {
            MeetSignal::AllowSitter(allowed) => Outcome::Accept {
                next: MeetState::Pending(Meeting {
                    sitter_may_message: allowed,
                    ..m.clone()
                }),
                commands: vec![],
            },
            MeetSignal::Approve => Outcome::Accept {
                next: MeetState::Approved(Meeting {
                    sitter_may_message: false,
                    ..m.clone()
                }),
                commands: vec![
                    Command::Effect {
                        name: effects::APPROVED.into(),
                        idempotency_key: "meet_greet:approved".into(),
                        payload: json!({ "client_id": m.client_id, "sitter_id": m.sitter_id }),
                        reply: None,
                    },
                    Command::Complete,
                ],
            },
            MeetSignal::Fail { reason } => Outcome::Accept {
                next: MeetState::Failed {
                    meeting: Meeting {
                        sitter_may_message: false,
                        ..m.clone()
                    },
                    reason,
                },
                commands: vec![
                    Command::Effect {
                        name: effects::FAILED.into(),
                        idempotency_key: "meet_greet:failed".into(),
                        payload: json!({ "sitter_id": m.sitter_id }),
                        reply: None,
                    },
                    Command::Complete,
                ],
            },
        }
    }

    fn state_name(state: &MeetState) -> &'static str {
        match state {
            MeetState::Pending(_) => "PENDING",
            MeetState::Approved(_) => "APPROVED",
            MeetState::Failed { .. } => "FAILED",
        }
    }

    fn is_final(state: &MeetState) -> bool {
        !matches!(state, MeetState::Pending(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Actor;
    use chrono::{Duration, TimeZone};

    #[test]
    fn the_sitter_may_message_only_while_pending_allowed_and_inside_the_window() {
        let t0 = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        let (a, cfg) = (Actor::system(), json!({}));
        let ctx = Ctx {
            now: t0,
            tenant_config: &cfg,
            actor: &a,
        };
        let input = json!({"client_id": "c", "sitter_id": "s", "opens_at": t0, "closes_at": t0 + Duration::hours(1)});
        let (s, _) = MeetAndGreet::start(&uuid::Uuid::nil().to_string(), &input, &ctx).unwrap();
        let MeetState::Pending(m) = &s else { panic!() };
        assert!(!m.sitter_may_message_at(t0));
        let Outcome::Accept { next: s, .. } =
            MeetAndGreet::on_signal(&s, MeetSignal::AllowSitter(true), &ctx)
        else {
            panic!()
        };
        let MeetState::Pending(m) = &s else { panic!() };
        assert!(m.sitter_may_message_at(t0 + Duration::minutes(59)));
        assert!(!m.sitter_may_message_at(t0 + Duration::hours(1)));
        let Outcome::Accept { next: failed, .. } = MeetAndGreet::on_signal(
            &s,
            MeetSignal::Fail {
                reason: "no fit".into(),
            },
            &ctx,
        ) else {
            panic!()
        };
        assert!(
            matches!(&failed, MeetState::Failed { meeting, .. } if !meeting.sitter_may_message)
        );
        let Outcome::Accept { commands, .. } =
            MeetAndGreet::on_signal(&s, MeetSignal::Approve, &ctx)
        else {
            panic!()
        };
        assert!(commands
            .iter()
            .any(|c| matches!(c, Command::Effect { name, .. } if name == effects::APPROVED)));
        assert_eq!(
            MeetAndGreet::on_signal(&failed, MeetSignal::Approve, &ctx),
            Outcome::reject("already_decided")
        );
        assert_eq!(
            MeetAndGreet::allowed_roles("approve"),
            &[Role::Operator, Role::Ops]
        );
    }
}
