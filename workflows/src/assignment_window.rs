//! A booking's assignment window (DOMAIN.md §2): the sitter's masked line is
//! open for the client from the booking's start minus a buffer to its end plus
//! a buffer; timers open and close it, and a reschedule or cancel moves or
//! cancels them.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> SCHEDULED: start (operator, ops)
//!     SCHEDULED --> OPEN: open (timer)
//!     OPEN --> CLOSED: close (timer)
//!     SCHEDULED --> CLOSED: close (timer)
//!     SCHEDULED --> SCHEDULED: reschedule (operator, ops)
//!     OPEN --> SCHEDULED: reschedule (operator, ops)
//!     SCHEDULED --> CANCELLED: cancel (operator, ops)
//!     OPEN --> CANCELLED: cancel (operator, ops)
//!     CLOSED --> [*]
//!     CANCELLED --> [*]
//! ```
//!
//! Buffers: walk and drop-in 60 min before start to 60 min after end; house
//! sitting 2 h before check-in to 2 h after check-out. A tenant overrides them
//! per service type in its config: `messaging.windows.<service>.before_min` /
//! `.after_min`. The key is the booking id.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{decode, reason_of, Command, Ctx, Outcome, ParseError, Role, Workflow};

/// Service types.
pub const SERVICE_TYPES: &[&str] = &["walk", "drop_in", "house_sitting"];

/// The window of a booking: `(opens_at, closes_at)`, with the tenant's buffers.
pub fn window(
    service_type: &str,
    starts_at: DateTime<Utc>,
    ends_at: DateTime<Utc>,
    config: &Value,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ParseError> {
    let default = match service_type {
        "walk" | "drop_in" => 60,
        "house_sitting" => 120,
        _ => {
            return Err(ParseError::InvalidPayload(
                "`service_type` is not one of walk, drop_in, house_sitting".into(),
            ))
        }
    };
    if ends_at <= starts_at {
        return Err(ParseError::InvalidPayload(
            "ends_at must be after starts_at".into(),
        ));
    }
    let minutes = |edge: &str| {
        config
            .pointer(&format!("/messaging/windows/{service_type}/{edge}"))
            .and_then(Value::as_i64)
            .filter(|m| (0..=24 * 60).contains(m))
            .unwrap_or(default)
    };
    Ok((
        starts_at - Duration::minutes(minutes("before_min")),
        ends_at + Duration::minutes(minutes("after_min")),
    ))
}

/// States.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WindowState {
    /// Not open yet.
    Scheduled {
        /// Opens.
        opens_at: DateTime<Utc>,
        /// Closes.
        closes_at: DateTime<Utc>,
    },
    /// The client's messages reach the sitter; the sitter may message.
    Open {
        /// Opened.
        opens_at: DateTime<Utc>,
        /// Closes.
        closes_at: DateTime<Utc>,
    },
    /// Over.
    Closed,
    /// The booking was cancelled.
    Cancelled {
        /// Why.
        reason: String,
    },
}

/// A booking's times.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Times {
    /// `walk`, `drop_in` or `house_sitting`.
    pub service_type: String,
    /// Booking start (check-in).
    pub starts_at: DateTime<Utc>,
    /// Booking end (check-out).
    pub ends_at: DateTime<Utc>,
}

/// Signals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowSignal {
    /// The open timer.
    Open,
    /// The close timer.
    Close,
    /// New booking times.
    Reschedule(Times),
    /// The booking is off.
    Cancel {
        /// Why.
        reason: String,
    },
}

/// The assignment window workflow.
#[derive(Debug, Clone, Copy)]
pub struct AssignmentWindow;

fn timers(opens_at: DateTime<Utc>, closes_at: DateTime<Utc>) -> Vec<Command> {
    vec![
        Command::SetTimer {
            name: "open".into(),
            at: opens_at,
            signal: "open".into(),
        },
        Command::SetTimer {
            name: "close".into(),
            at: closes_at,
            signal: "close".into(),
        },
    ]
}

impl Workflow for AssignmentWindow {
    const KIND: &'static str = "assignment_window";
    type State = WindowState;
    type Signal = WindowSignal;

    const EDGES: &'static [(&'static str, &'static str, &'static str)] = &[
        ("[*]", "SCHEDULED", "start (operator, ops)"),
        ("SCHEDULED", "OPEN", "open (timer)"),
        ("OPEN", "CLOSED", "close (timer)"),
        ("SCHEDULED", "CLOSED", "close (timer)"),
        ("SCHEDULED", "SCHEDULED", "reschedule"),
        ("OPEN", "SCHEDULED", "reschedule"),
        ("SCHEDULED", "CANCELLED", "cancel"),
        ("OPEN", "CANCELLED", "cancel"),
        ("CLOSED", "[*]", ""),
        ("CANCELLED", "[*]", ""),
    ];

    fn start(
        key: &str,
        input: &Value,
        ctx: &Ctx<'_>,
    ) -> Result<(WindowState, Vec<Command>), ParseError> {
        uuid::Uuid::parse_str(key)
            .map_err(|_| ParseError::InvalidKey("the key is the booking id".into()))?;
        let t: Times = decode(input)?;
        let (opens_at, closes_at) =
            window(&t.service_type, t.starts_at, t.ends_at, ctx.tenant_config)?;
        Ok((
            WindowState::Scheduled {
                opens_at,
                closes_at,
            },
            timers(opens_at, closes_at),
        ))
    }

    fn parse_signal(name: &str, payload: &Value) -> Result<WindowSignal, ParseError> {
        match name {
            "open" => Ok(WindowSignal::Open),
            "close" => Ok(WindowSignal::Close),
            "reschedule" => Ok(WindowSignal::Reschedule(decode(payload)?)),
            "cancel" => Ok(WindowSignal::Cancel {
                reason: reason_of(payload)?,
            }),
            other => Err(ParseError::UnknownSignal(other.into())),
        }
    }

    fn allowed_roles(name: &str) -> &'static [Role] {
        match name {
            "open" | "close" => &[Role::System],
            "reschedule" | "cancel" => &[Role::Operator, Role::Ops],
            _ => &[],
        }
    }

    fn on_signal(state: &WindowState, signal: WindowSignal, ctx: &Ctx<'_>) -> Outcome<WindowState> {
        match (state, signal) {
            (
                WindowState::Scheduled {
                    opens_at,
                    closes_at,
                },
                WindowSignal::Open,
            ) => {
                if ctx.now < *opens_at {
                    return Outcome::reject("not_yet");
                }
                Outcome::Accept {
                    next: WindowState::Open {
                        opens_at: *opens_at,
                        closes_at: *closes_at,
                    },
                    commands: vec![],
                }
            }
            (
                WindowState::Scheduled { closes_at, .. } | WindowState::Open { closes_at, .. },
                WindowSignal::Close,
            ) => {
                if ctx.now < *closes_at {
                    return Outcome::reject("not_yet");
                }
                Outcome::Accept {
                    next: WindowState::Closed,
                    commands: vec![
                        Command::CancelTimer {
                            name: "open".into(),
                        },
                        Command::Complete,
                    ],
                }
            }
            (
                WindowState::Scheduled { .. } | WindowState::Open { .. },
                WindowSignal::Reschedule(t),
            ) => {
                match window(&t.service_type, t.starts_at, t.ends_at, ctx.tenant_config) {
                    // Back to SCHEDULED: the open timer fires at once when the
                    // new window has already begun.
                    Ok((opens_at, closes_at)) => Outcome::Accept {
                        next: WindowState::Scheduled {
                            opens_at,
                            closes_at,
                        },
                        commands: timers(opens_at, closes_at),
                    },
                    Err(e) => Outcome::reject(format!("invalid_times: {e}")),
                }
            }
            (
                WindowState::Scheduled { .. } | WindowState::Open { .. },
                WindowSignal::Cancel { reason },
            ) => Outcome::Accept {
                next: WindowState::Cancelled { reason },
                commands: vec![
                    Command::CancelTimer {
                        name: "open".into(),
                    },
                    Command::CancelTimer {
                        name: "close".into(),
                    },
                    Command::Complete,
                ],
            },
            (WindowState::Open { .. }, WindowSignal::Open) => Outcome::reject("already_open"),
            _ => Outcome::reject("window_over"),
        }
    }

    fn state_name(state: &WindowState) -> &'static str {
        match state {
            WindowState::Scheduled { .. } => "SCHEDULED",
            WindowState::Open { .. } => "OPEN",
            WindowState::Closed => "CLOSED",
            WindowState::Cancelled { .. } => "CANCELLED",
        }
    }

    fn is_final(state: &WindowState) -> bool {
        matches!(state, WindowState::Closed | WindowState::Cancelled { .. })
    }

    fn force_signal(state: &WindowState, target: &str) -> Option<(&'static str, Value)> {
        match (state, target) {
            (WindowState::Scheduled { .. } | WindowState::Open { .. }, "CANCELLED") => {
                Some(("cancel", json!({ "reason": "forced by ops" })))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Actor;
    use chrono::TimeZone;

    fn at(min: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000, 0).unwrap() + Duration::minutes(min)
    }

    #[test]
    fn buffers_by_service_type_and_tenant_overrides() {
        let none = json!({});
        assert_eq!(
            window("walk", at(0), at(30), &none).unwrap(),
            (at(-60), at(90))
        );
        assert_eq!(
            window("drop_in", at(0), at(30), &none).unwrap(),
            (at(-60), at(90))
        );
        assert_eq!(
            window("house_sitting", at(0), at(3000), &none).unwrap(),
            (at(-120), at(3120))
        );
        let cfg = json!({"messaging": {"windows": {"walk": {"before_min": 15, "after_min": 30}}}});
        assert_eq!(
            window("walk", at(0), at(30), &cfg).unwrap(),
            (at(-15), at(60))
        );
        assert!(window("grooming", at(0), at(30), &none).is_err());
        assert!(window("walk", at(30), at(0), &none).is_err());
    }

    #[test]
    fn timers_open_and_close_and_a_reschedule_moves_them() {
        let (a, cfg) = (Actor::system(), json!({}));
        let ctx = |now| Ctx {
            now,
            tenant_config: &cfg,
            actor: &a,
        };
        let input = json!({"service_type": "walk", "starts_at": at(0), "ends_at": at(30)});
        let (s, cmds) =
            AssignmentWindow::start(&uuid::Uuid::nil().to_string(), &input, &ctx(at(-500)))
                .unwrap();
        assert_eq!(cmds, timers(at(-60), at(90)));
        assert_eq!(
            AssignmentWindow::on_signal(&s, WindowSignal::Open, &ctx(at(-61))),
            Outcome::reject("not_yet")
        );
        let Outcome::Accept { next: open, .. } =
            AssignmentWindow::on_signal(&s, WindowSignal::Open, &ctx(at(-60)))
        else {
            panic!()
        };
        let t = Times {
            service_type: "walk".into(),
            starts_at: at(120),
            ends_at: at(150),
        };
        let Outcome::Accept { next, commands } =
            AssignmentWindow::on_signal(&open, WindowSignal::Reschedule(t), &ctx(at(0)))
        else {
            panic!()
        };
        assert_eq!(AssignmentWindow::state_name(&next), "SCHEDULED");
        assert_eq!(commands, timers(at(60), at(210)));
        let Outcome::Accept { next, commands } = AssignmentWindow::on_signal(
            &next,
            WindowSignal::Cancel {
                reason: "client".into(),
            },
            &ctx(at(1)),
        ) else {
            panic!()
        };
        assert!(AssignmentWindow::is_final(&next));
        assert!(commands.contains(&Command::CancelTimer {
            name: "close".into()
        }));
        let Outcome::Accept { next, .. } =
            AssignmentWindow::on_signal(&open, WindowSignal::Close, &ctx(at(90)))
        else {
            panic!()
        };
        assert_eq!(AssignmentWindow::state_name(&next), "CLOSED");
    }
}
