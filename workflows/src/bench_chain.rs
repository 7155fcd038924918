//! The benchmark's workload (`dispatch bench`): a chain of three transitions
//! — start, `step`, `step` — each with one effect through the built-in `log`
//! channel; optionally a timer (`tick_at`) whose `tick` is a transition too.
//! Not served unless a process enables it (`ENABLED_WORKFLOWS=bench_chain`).
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> STEP_0: start (integration, operator, ops)
//!     STEP_0 --> STEP_1: step
//!     STEP_1 --> DONE: step
//!     DONE --> [*]
//! ```

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{Command, Ctx, Outcome, ParseError, Role, Workflow};

/// Effect names.
pub mod effects {
    /// One step's message, to the `log` channel.
    pub const STEP: &str = "bench_step";
}

/// How far along the chain is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchState {
    /// The workflow's key (effects are keyed by it).
    pub key: String,
    /// Steps taken after the start (0..=2).
    pub step: u8,
    /// Timer ticks seen.
    #[serde(default)]
    pub ticks: u32,
}

/// Signals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchSignal {
    /// The next link of the chain.
    Step,
    /// The timer.
    Tick,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    #[serde(default)]
    tick_at: Option<DateTime<Utc>>,
}

/// The benchmark chain.
#[derive(Debug, Clone, Copy)]
pub struct BenchChain;

fn step_effect(key: &str, n: u8) -> Command {
    Command::Effect {
        name: effects::STEP.into(),
        idempotency_key: format!("bench:{key}:{n}"),
        payload: json!({ "key": key, "step": n }),
        reply: None,
    }
}

impl Workflow for BenchChain {
    const KIND: &'static str = "bench_chain";
    type State = BenchState;
    type Signal = BenchSignal;

    fn start(
        key: &str,
        input: &Value,
        _ctx: &Ctx<'_>,
    ) -> Result<(Self::State, Vec<Command>), ParseError> {
        let input: Input = serde_json::from_value(if input.is_null() {
            json!({})
        } else {
            input.clone()
        })
        .map_err(|e| ParseError::InvalidPayload(e.to_string()))?;
        let mut commands = vec![step_effect(key, 0)];
        if let Some(at) = input.tick_at {
            commands.push(Command::SetTimer {
                name: "tick".into(),
                at,
                signal: "tick".into(),
            });
        }
        Ok((
            BenchState {
                key: key.to_string(),
                step: 0,
                ticks: 0,
            },
            commands,
        ))
    }

    const EDGES: &'static [(&'static str, &'static str, &'static str)] = &[
        ("[*]", "STEP_0", "start (integration, operator, ops)"),
        ("STEP_0", "STEP_1", "step"),
        ("STEP_1", "DONE", "step"),
        ("DONE", "[*]", ""),
    ];

    fn parse_signal(name: &str, _payload: &Value) -> Result<Self::Signal, ParseError> {
        match name {
            "step" => Ok(BenchSignal::Step),
            "tick" => Ok(BenchSignal::Tick),
            other => Err(ParseError::UnknownSignal(other.to_string())),
        }
    }

    fn allowed_roles(signal_name: &str) -> &'static [Role] {
        match signal_name {
            "step" => &[Role::Integration, Role::Operator, Role::Ops, Role::System],
            "tick" => &[Role::System],
            _ => &[],
        }
    }

    fn on_signal(
        state: &Self::State,
        signal: Self::Signal,
        _ctx: &Ctx<'_>,
    ) -> Outcome<Self::State> {
        match signal {
            BenchSignal::Tick => Outcome::Accept {
                next: BenchState {
                    ticks: state.ticks + 1,
                    ..state.clone()
                },
                commands: vec![],
            },
            BenchSignal::Step if state.step >= 2 => Outcome::reject("done"),
            BenchSignal::Step => {
                let n = state.step + 1;
                let mut commands = vec![step_effect(&state.key, n)];
                if n == 2 {
                    commands.push(Command::Complete);
                }
                Outcome::Accept {
                    next: BenchState {
                        step: n,
                        ..state.clone()
                    },
                    commands,
                }
            }
        }
    }

    fn state_name(state: &Self::State) -> &'static str {
        match state.step {
            0 => "STEP_0",
            1 => "STEP_1",
            _ => "DONE",
        }
    }

    fn is_final(state: &Self::State) -> bool {
        state.step >= 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Actor;
    use chrono::TimeZone;

    #[test]
    fn three_transitions_three_effects() {
        let (a, cfg) = (Actor::system(), json!({}));
        let ctx = Ctx {
            now: Utc.timestamp_opt(0, 0).unwrap(),
            tenant_config: &cfg,
            actor: &a,
        };
        let (mut s, c) = BenchChain::start("k", &json!({}), &ctx).unwrap();
        let mut effects = c.len();
        for _ in 0..2 {
            let Outcome::Accept { next, commands } =
                BenchChain::on_signal(&s, BenchSignal::Step, &ctx)
            else {
                panic!()
            };
            effects += commands
                .iter()
                .filter(|c| matches!(c, Command::Effect { .. }))
                .count();
            s = next;
        }
        assert!(BenchChain::is_final(&s));
        assert_eq!(effects, 3);
        assert_eq!(
            BenchChain::on_signal(&s, BenchSignal::Step, &ctx),
            Outcome::reject("done")
        );
    }
}
