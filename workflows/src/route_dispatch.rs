//! Route dispatch (DOMAIN.md §3): a route assignment sent to a driver on each
//! of the driver's channels (Telegram, email), with a status per channel.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> DISPATCHED: start (operator, ops, integration)
//!     DISPATCHED --> ACKNOWLEDGED: acknowledge (driver's button, operator, ops)
//!     DISPATCHED --> CANCELLED: cancel (operator, ops, integration)
//!     ACKNOWLEDGED --> CLOSED: close (timer, 72 h later)
//!     CANCELLED --> [*]
//!     CLOSED --> [*]
//! ```
//!
//! Each channel moves `queued → sent → delivered`, or to `failed`, and the
//! Telegram one to `acknowledged` when the driver presses the button; a
//! channel the driver cannot be reached on is `skipped` with the reason (a
//! driver who never started the bot gets email, and the status says why).
//! `sent` comes back from the send effect (its reply), `delivered`/`failed`
//! from the provider's delivery webhooks; a send that dead-letters reads as
//! `failed` in the API (the runtime knows the effect is dead).
//!
//! Choices where DOMAIN.md is silent:
//! - Channel updates never go backwards (a late `sent` after `delivered` is a
//!   no-op) and keep arriving after the acknowledgement, for 72 hours, after
//!   which the dispatch closes.
//! - The route text (stops, addresses) lives only in the start input, which
//!   only the business's operators can read; the state holds the reference.
//! - Cancelling sends nothing to the driver (the business calls the driver).

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{Command, Ctx, Outcome, ParseError, Role, Workflow};

/// Effect names.
pub mod effects {
    /// The assignment as a Telegram message with an Acknowledge button.
    pub const TELEGRAM: &str = "route_dispatch_telegram";
    /// The assignment by email.
    pub const EMAIL: &str = "route_dispatch_email";
}

/// The channels a route can go out on.
pub const CHANNELS: &[&str] = &["telegram", "email"];

/// How long channel updates are still taken after the acknowledgement.
pub const SETTLE_HOURS: i64 = 72;

/// Phase of a dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    /// Sent (or being sent); waiting for the driver.
    Dispatched,
    /// The driver acknowledged; late delivery events are still recorded.
    Acknowledged,
    /// Final after acknowledgement.
    Closed,
    /// Final: called off.
    Cancelled,
}

/// One channel's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStatus {
    /// `queued`, `sent`, `delivered`, `failed`, `acknowledged` or `skipped`.
    pub status: String,
    /// Why (for `failed` and `skipped`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it last changed.
    pub at: DateTime<Utc>,
}

/// A dispatch's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteDispatchState {
    /// Where it is.
    pub phase: Phase,
    /// The driver.
    pub driver_id: String,
    /// The business's route reference.
    pub reference: String,
    /// Status per channel.
    pub channels: BTreeMap<String, ChannelStatus>,
    /// When the driver acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_at: Option<DateTime<Utc>>,
    /// Why it was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
}

/// Signals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteDispatchSignal {
    /// A channel's send effect went out (its reply).
    Sent(String),
    /// The provider reports delivery.
    Delivered(String),
    /// The provider reports a failure (bounce, drop).
    Failed(String, String),
    /// The driver (or an operator for them) acknowledged.
    Acknowledge(String),
    /// Call it off.
    Cancel(String),
    /// The settle timer.
    Close,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Route {
    reference: String,
    #[serde(default)]
    #[allow(dead_code)]
    date: Option<String>,
    #[allow(dead_code)]
    text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    driver_id: String,
    route: Route,
    channels: Vec<String>,
    #[serde(default)]
    skipped: BTreeMap<String, String>,
}

/// The route dispatch workflow.
#[derive(Debug, Clone, Copy)]
pub struct RouteDispatch;

fn channel_of(payload: &Value) -> Result<String, ParseError> {
    let c = payload["channel"].as_str().unwrap_or("telegram");
    if CHANNELS.contains(&c) {
        Ok(c.to_string())
    } else {
        Err(ParseError::InvalidPayload(format!(
            "channel must be one of {CHANNELS:?}"
        )))
    }
}

/// Whether a channel may move from `from` to `to` (never backwards).
fn moves(from: &str, to: &str) -> bool {
    match to {
        "sent" => from == "queued",
        "delivered" | "failed" => matches!(from, "queued" | "sent"),
        "acknowledged" => matches!(from, "queued" | "sent" | "delivered" | "failed"),
        _ => false,
    }
}

impl Workflow for RouteDispatch {
    const KIND: &'static str = "route_dispatch";
    type State = RouteDispatchState;
    type Signal = RouteDispatchSignal;

    fn start(
        key: &str,
        input: &Value,
        ctx: &Ctx<'_>,
    ) -> Result<(Self::State, Vec<Command>), ParseError> {
        let input: Input = serde_json::from_value(input.clone())
            .map_err(|e| ParseError::InvalidPayload(e.to_string()))?;
        let bad = |m: &str| Err(ParseError::InvalidPayload(m.to_string()));
        use crate::text::{check_field, TextKind};
        let reference = input.route.reference.trim();
        check_field("route.reference", reference, TextKind::Line, 100)
            .map_err(ParseError::InvalidPayload)?;
        check_field(
            "route.text",
            input.route.text.trim(),
            TextKind::Multiline,
            3500,
        )
        .map_err(ParseError::InvalidPayload)?;
        let mut channels = BTreeMap::new();
        let mut commands = Vec::new();
        for c in &input.channels {
            if !CHANNELS.contains(&c.as_str()) || channels.contains_key(c) {
                return bad("channels are distinct values of `telegram`, `email`");
            }
            channels.insert(
                c.clone(),
                ChannelStatus {
                    status: "queued".into(),
                    reason: None,
                    at: ctx.now,
                },
            );
            let (name, reply) = if c == "telegram" {
                (effects::TELEGRAM, "telegram_sent")
            } else {
                (effects::EMAIL, "email_sent")
            };
            commands.push(Command::Effect {
                name: name.into(),
                idempotency_key: format!("route:{key}:{c}"),
                payload: json!({ "driver_id": input.driver_id, "channel": c }),
                reply: Some(reply.into()),
            });
        }
        if channels.is_empty() {
            return bad("at least one channel is required");
        }
        for (c, reason) in input.skipped {
            if !CHANNELS.contains(&c.as_str()) || channels.contains_key(&c) {
                return bad("skipped names channels not dispatched on");
            }
            channels.insert(
                c,
                ChannelStatus {
                    status: "skipped".into(),
                    reason: Some(reason.chars().take(200).collect()),
                    at: ctx.now,
                },
            );
        }
        Ok((
            RouteDispatchState {
                phase: Phase::Dispatched,
                driver_id: input.driver_id,
                reference: reference.to_string(),
                channels,
                acknowledged_at: None,
                cancel_reason: None,
            },
            commands,
        ))
    }

    const EDGES: &'static [(&'static str, &'static str, &'static str)] = &[
        ("[*]", "DISPATCHED", "start (operator, ops, integration)"),
        (
            "DISPATCHED",
            "ACKNOWLEDGED",
            "acknowledge (driver's button, operator, ops)",
        ),
        (
            "DISPATCHED",
            "CANCELLED",
            "cancel (operator, ops, integration)",
        ),
        ("ACKNOWLEDGED", "CLOSED", "close (timer, 72 h later)"),
        ("CANCELLED", "[*]", ""),
        ("CLOSED", "[*]", ""),
    ];

    const STUCK_AFTER: &'static [(&'static str, u64)] = &[("DISPATCHED", 24 * 3600)];

    fn parse_signal(name: &str, payload: &Value) -> Result<Self::Signal, ParseError> {
        let reason = |default: &str| {
            payload["reason"]
                .as_str()
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .unwrap_or(default)
                .chars()
                .take(200)
                .collect::<String>()
        };
        Ok(match name {
            "telegram_sent" => RouteDispatchSignal::Sent("telegram".into()),
            "email_sent" => RouteDispatchSignal::Sent("email".into()),
            "delivered" => RouteDispatchSignal::Delivered(channel_of(payload)?),
            "delivery_failed" => {
                RouteDispatchSignal::Failed(channel_of(payload)?, reason("failed"))
            }
            "acknowledge" => RouteDispatchSignal::Acknowledge(channel_of(payload)?),
            "cancel" => RouteDispatchSignal::Cancel(reason("cancelled")),
            "close" => RouteDispatchSignal::Close,
            other => return Err(ParseError::UnknownSignal(other.to_string())),
        })
    }

    fn allowed_roles(signal_name: &str) -> &'static [Role] {
        match signal_name {
            "telegram_sent" | "email_sent" | "delivered" | "delivery_failed" | "close" => {
                &[Role::System]
            }
            "acknowledge" => &[Role::Executor, Role::Operator, Role::Ops],
            "cancel" => &[Role::Operator, Role::Ops, Role::Integration],
            _ => &[],
        }
    }

    fn on_signal(state: &Self::State, signal: Self::Signal, ctx: &Ctx<'_>) -> Outcome<Self::State> {
        let open = matches!(state.phase, Phase::Dispatched | Phase::Acknowledged);
        if !open {
            return Outcome::reject("finished");
        }
        let update = |channel: &str, to: &str, reason: Option<String>| {
            let Some(current) = state.channels.get(channel) else {
                return Outcome::reject("channel_not_dispatched");
            };
            if !moves(&current.status, to) {
                return Outcome::reject("no_change");
            }
            let mut next = state.clone();
            next.channels.insert(
                channel.to_string(),
                ChannelStatus {
                    status: to.into(),
                    reason,
                    at: ctx.now,
                },
            );
            Outcome::Accept {
                next,
                commands: vec![],
            }
        };
        match signal {
            RouteDispatchSignal::Sent(c) => update(&c, "sent", None),
            RouteDispatchSignal::Delivered(c) => update(&c, "delivered", None),
            RouteDispatchSignal::Failed(c, reason) => update(&c, "failed", Some(reason)),
            RouteDispatchSignal::Acknowledge(c) => {
                // A driver acknowledges only their own route.
                if ctx.actor.role == Role::Executor
                    && ctx.actor.subject.as_deref() != Some(&format!("driver:{}", state.driver_id))
                {
                    return Outcome::reject("not_your_route");
                }
                if state.phase != Phase::Dispatched {
                    return Outcome::reject("already_acknowledged");
                }
                let mut next = state.clone();
                if let Some(ch) = next
                    .channels
                    .get_mut(&c)
                    .filter(|ch| moves(&ch.status, "acknowledged"))
                {
                    ch.status = "acknowledged".into();
                    ch.reason = None;
                    ch.at = ctx.now;
                }
                next.phase = Phase::Acknowledged;
                next.acknowledged_at = Some(ctx.now);
                Outcome::Accept {
                    next,
                    commands: vec![Command::SetTimer {
                        name: "settle".into(),
                        at: ctx.now + Duration::hours(SETTLE_HOURS),
                        signal: "close".into(),
                    }],
                }
            }
            RouteDispatchSignal::Cancel(reason) => {
                if state.phase != Phase::Dispatched {
                    return Outcome::reject("already_acknowledged");
                }
                let mut next = state.clone();
                next.phase = Phase::Cancelled;
                next.cancel_reason = Some(reason);
                Outcome::Accept {
                    next,
                    commands: vec![Command::Complete],
                }
            }
            RouteDispatchSignal::Close => {
                if state.phase != Phase::Acknowledged {
                    return Outcome::reject("not_acknowledged");
                }
                let mut next = state.clone();
                next.phase = Phase::Closed;
                Outcome::Accept {
                    next,
                    commands: vec![Command::Complete],
                }
            }
        }
    }

    fn state_name(state: &Self::State) -> &'static str {
        match state.phase {
            Phase::Dispatched => "DISPATCHED",
            Phase::Acknowledged => "ACKNOWLEDGED",
            Phase::Closed => "CLOSED",
            Phase::Cancelled => "CANCELLED",
        }
    }

    fn is_final(state: &Self::State) -> bool {
        matches!(state.phase, Phase::Closed | Phase::Cancelled)
    }

    fn force_signal(state: &Self::State, target: &str) -> Option<(&'static str, Value)> {
        match (state.phase, target) {
            (Phase::Dispatched, "ACKNOWLEDGED") => {
                Some(("acknowledge", json!({ "channel": "telegram" })))
            }
            (Phase::Dispatched, "CANCELLED") => {
                Some(("cancel", json!({ "reason": "forced by ops" })))
            }
            (Phase::Acknowledged, "CLOSED") => Some(("close", json!({}))),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Actor;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000, 0).unwrap()
    }

    fn run(state: &RouteDispatchState, name: &str, payload: Value) -> Outcome<RouteDispatchState> {
        let (a, cfg) = (Actor::system(), json!({}));
        let ctx = Ctx {
            now: now(),
            tenant_config: &cfg,
            actor: &a,
        };
        RouteDispatch::on_signal(
            state,
            RouteDispatch::parse_signal(name, &payload).unwrap(),
            &ctx,
        )
    }

    fn started(channels: Value, skipped: Value) -> (RouteDispatchState, Vec<Command>) {
        let (a, cfg) = (Actor::system(), json!({}));
        let ctx = Ctx {
            now: now(),
            tenant_config: &cfg,
            actor: &a,
        };
        let input = json!({"driver_id": "d1", "route": {"reference": "R-17", "text": "12 Canary St → depot"},
                           "channels": channels, "skipped": skipped});
        RouteDispatch::start("item-1", &input, &ctx).unwrap()
    }

    fn status(s: &RouteDispatchState, c: &str) -> String {
        s.channels[c].status.clone()
    }

    fn accept(o: Outcome<RouteDispatchState>) -> RouteDispatchState {
        match o {
            Outcome::Accept { next, .. } => next,
            Outcome::Reject { reason } => panic!("rejected: {reason}"),
        }
    }

    #[test]
    fn one_effect_per_channel_and_skipped_channels_say_why() {
        let (s, commands) = started(
            json!(["email"]),
            json!({"telegram": "the driver has not started the Telegram bot"}),
        );
        assert_eq!(commands.len(), 1);
        assert!(
            matches!(&commands[0], Command::Effect { name, idempotency_key, reply, .. }
            if name == effects::EMAIL && idempotency_key == "route:item-1:email" && reply.as_deref() == Some("email_sent"))
        );
        assert_eq!(status(&s, "email"), "queued");
        assert_eq!(status(&s, "telegram"), "skipped");
        assert!(s.channels["telegram"]
            .reason
            .as_deref()
            .unwrap()
            .contains("not started"));
        // The route text stays out of the state.
        assert!(!serde_json::to_string(&s).unwrap().contains("Canary"));
    }

    #[test]
    fn channels_move_forward_only_and_acknowledgement_settles_later() {
        let (s, _) = started(json!(["telegram", "email"]), json!({}));
        let s = accept(run(&s, "telegram_sent", json!({"message_id": "1"})));
        let s = accept(run(&s, "delivered", json!({"channel": "email"})));
        // A late `sent` does not undo `delivered`.
        assert_eq!(
            run(&s, "email_sent", json!({})),
            Outcome::reject("no_change")
        );
        let s = accept(run(&s, "acknowledge", json!({"channel": "telegram"})));
        assert_eq!(RouteDispatch::state_name(&s), "ACKNOWLEDGED");
        assert_eq!(status(&s, "telegram"), "acknowledged");
        assert_eq!(status(&s, "email"), "delivered");
        assert_eq!(
            run(&s, "acknowledge", json!({})),
            Outcome::reject("already_acknowledged")
        );
        let s = accept(run(&s, "close", json!({})));
        assert!(RouteDispatch::is_final(&s));
    }

    #[test]
    fn a_driver_acknowledges_only_their_own_route() {
        let (s, _) = started(json!(["telegram"]), json!({}));
        let cfg = json!({});
        let ack = |subject: &str| {
            let actor = Actor {
                role: Role::Executor,
                subject: Some(subject.to_string()),
            };
            let ctx = Ctx {
                now: now(),
                tenant_config: &cfg,
                actor: &actor,
            };
            let signal = RouteDispatch::parse_signal("acknowledge", &json!({})).unwrap();
            RouteDispatch::on_signal(&s, signal, &ctx)
        };
        assert_eq!(ack("driver:d2"), Outcome::reject("not_your_route"));
        assert_eq!(ack("executor-1"), Outcome::reject("not_your_route"));
        assert!(matches!(ack("driver:d1"), Outcome::Accept { .. }));
    }

    #[test]
    fn a_bounce_fails_the_channel_with_its_reason() {
        let (s, _) = started(json!(["email"]), json!({}));
        let s = accept(run(&s, "email_sent", json!({})));
        let s = accept(run(
            &s,
            "delivery_failed",
            json!({"channel": "email", "reason": "bounced"}),
        ));
        assert_eq!(status(&s, "email"), "failed");
        assert_eq!(s.channels["email"].reason.as_deref(), Some("bounced"));
        assert_eq!(
            run(&s, "delivered", json!({"channel": "telegram"})),
            Outcome::reject("channel_not_dispatched")
        );
    }

    #[test]
    fn bad_inputs_are_refused() {
        let (a, cfg) = (Actor::system(), json!({}));
        let ctx = Ctx {
            now: now(),
            tenant_config: &cfg,
            actor: &a,
        };
        for input in [
            json!({"driver_id": "d1", "route": {"reference": "R", "text": "x"}, "channels": []}),
            json!({"driver_id": "d1", "route": {"reference": "R", "text": "x"}, "channels": ["fax"]}),
            json!({"driver_id": "d1", "route": {"reference": "", "text": "x"}, "channels": ["email"]}),
            json!({"driver_id": "d1", "route": {"reference": "R", "text": "x"}, "channels": ["email", "email"]}),
        ] {
            assert!(RouteDispatch::start("k", &input, &ctx).is_err(), "{input}");
        }
    }
}
