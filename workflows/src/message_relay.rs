//! One outbound SMS of masked-number messaging (a relay, an owner message, an
//! auto-reply or a warning): the send is an outbox effect, so it survives
//! crashes, retries with backoff, is sent at most once per key, and a dead one
//! shows in ops with a Retry button.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> SENDING: start (the message was stored)
//!     SENDING --> SENT: sent (the provider accepted it)
//!     SENT --> [*]
//! ```
//!
//! The key is the message id; the text, the numbers and the recipient live in
//! `msg_messages`, never in the workflow.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{Command, Ctx, Outcome, ParseError, Role, Workflow};

/// Effect names.
pub mod effects {
    /// Send the stored message.
    pub const SEND: &str = "msg_send";
}

/// States.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RelayState {
    /// Waiting for the provider.
    Sending,
    /// Accepted by the provider.
    Sent,
}

/// The message relay workflow.
#[derive(Debug, Clone, Copy)]
pub struct MessageRelay;

impl Workflow for MessageRelay {
    const KIND: &'static str = "message_relay";
    type State = RelayState;
    type Signal = ();

    const EDGES: &'static [(&'static str, &'static str, &'static str)] = &[
        ("[*]", "SENDING", "start"),
        ("SENDING", "SENT", "sent"),
        ("SENT", "[*]", ""),
    ];

    const STUCK_AFTER: &'static [(&'static str, u64)] = &[("SENDING", 900)];

    fn start(
        key: &str,
        input: &Value,
        _ctx: &Ctx<'_>,
    ) -> Result<(RelayState, Vec<Command>), ParseError> {
        let id = uuid::Uuid::parse_str(key)
            .map_err(|_| ParseError::InvalidKey("the key is the message id".into()))?;
        if !input.as_object().is_some_and(|o| o.is_empty()) {
            return Err(ParseError::InvalidPayload("the start input is `{}`".into()));
        }
        Ok((
            RelayState::Sending,
            vec![Command::Effect {
                name: effects::SEND.into(),
                idempotency_key: format!("message:{id}:send"),
                payload: json!({ "message_id": id }),
                reply: Some("sent".into()),
            }],
        ))
    }

    fn parse_signal(name: &str, _payload: &Value) -> Result<(), ParseError> {
        match name {
            "sent" => Ok(()),
            other => Err(ParseError::UnknownSignal(other.into())),
        }
    }

    fn allowed_roles(name: &str) -> &'static [Role] {
        match name {
            "sent" => &[Role::System],
            _ => &[],
        }
    }

    fn on_signal(state: &RelayState, _signal: (), _ctx: &Ctx<'_>) -> Outcome<RelayState> {
        match state {
            RelayState::Sending => Outcome::Accept {
                next: RelayState::Sent,
                commands: vec![Command::Complete],
            },
            RelayState::Sent => Outcome::reject("already_sent"),
        }
    }

    fn state_name(state: &RelayState) -> &'static str {
        match state {
            RelayState::Sending => "SENDING",
            RelayState::Sent => "SENT",
        }
    }

    fn is_final(state: &RelayState) -> bool {
        *state == RelayState::Sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Actor;

    #[test]
    fn a_message_is_sent_once_through_one_keyed_effect() {
        let (a, cfg) = (Actor::system(), json!({}));
        let ctx = Ctx {
            now: chrono::DateTime::UNIX_EPOCH,
            tenant_config: &cfg,
            actor: &a,
        };
        let id = uuid::Uuid::from_u128(9).to_string();
        let (s, c) = MessageRelay::start(&id, &json!({}), &ctx).unwrap();
        assert!(
            matches!(&c[0], Command::Effect { idempotency_key, .. } if *idempotency_key == format!("message:{id}:send"))
        );
        let Outcome::Accept { next, .. } = MessageRelay::on_signal(&s, (), &ctx) else {
            panic!()
        };
        assert!(MessageRelay::is_final(&next));
        assert_eq!(
            MessageRelay::on_signal(&next, (), &ctx),
            Outcome::reject("already_sent")
        );
    }
}
