//! Type erasure between the runtime (JSON rows) and typed workflows.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use serde_json::Value;

use crate::{Command, Ctx, Outcome, ParseError, Role, Workflow};

/// A freshly started workflow, serialized.
#[derive(Debug, Clone, PartialEq)]
pub struct Started {
    /// Serialized initial state.
    pub state: Value,
    /// Upper-case state name.
    pub state_name: &'static str,
    /// Commands to carry out.
    pub commands: Vec<Command>,
}

/// A transition's result, serialized.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Store the state and carry out the commands.
    Accept {
        /// Serialized next state.
        state: Value,
        /// Upper-case state name.
        state_name: &'static str,
        /// Whether the next state is final.
        is_final: bool,
        /// Follow-up work.
        commands: Vec<Command>,
    },
    /// Nothing changes.
    Reject {
        /// Machine-readable reason.
        reason: String,
    },
}

/// Object-safe view of a [`Workflow`], used by the runtime.
pub trait DynWorkflow: Send + Sync {
    /// Kind name.
    fn kind(&self) -> &'static str;
    /// See [`Workflow::start`].
    fn start(&self, key: &str, input: &Value, ctx: &Ctx<'_>) -> Result<Started, ParseError>;
    /// Check that a signal parses, without applying it.
    fn check_signal(&self, name: &str, payload: &Value) -> Result<(), ParseError>;
    /// See [`Workflow::allowed_roles`].
    fn allowed_roles(&self, name: &str) -> &'static [Role];
    /// See [`Workflow::VERSION`].
    fn version(&self) -> u32;
    /// See [`Workflow::STUCK_AFTER`].
    fn stuck_after(&self) -> &'static [(&'static str, u64)];
    /// See [`Workflow::EDGES`].
    fn edges(&self) -> &'static [(&'static str, &'static str, &'static str)];
    /// See [`Workflow::force_signal`]; `None` also when the target is not an
    /// edge out of the current state.
    fn force_signal(
        &self,
        state: &Value,
        state_name: &str,
        target: &str,
    ) -> Result<Option<(&'static str, Value)>, ParseError>;
    /// Upcast a stored state from version `from` to the current one, step by
    /// step, and check that the result decodes.
    fn upcast_to_current(&self, from: u32, state: Value) -> Result<Value, String>;
    /// Decode the state, apply the signal, encode the result.
    fn apply(
        &self,
        state: &Value,
        name: &str,
        payload: &Value,
        ctx: &Ctx<'_>,
    ) -> Result<Transition, ParseError>;
}

struct Erased<W>(PhantomData<fn() -> W>);

impl<W: Workflow> DynWorkflow for Erased<W> {
    fn kind(&self) -> &'static str {
        W::KIND
    }

    fn start(&self, key: &str, input: &Value, ctx: &Ctx<'_>) -> Result<Started, ParseError> {
        let (state, commands) = W::start(key, input, ctx)?;
        Ok(Started {
            state_name: W::state_name(&state),
            state: encode(&state),
            commands,
        })
    }

    fn check_signal(&self, name: &str, payload: &Value) -> Result<(), ParseError> {
        W::parse_signal(name, payload).map(|_| ())
    }

    fn version(&self) -> u32 {
        W::VERSION
    }

    fn stuck_after(&self) -> &'static [(&'static str, u64)] {
        W::STUCK_AFTER
    }

    fn edges(&self) -> &'static [(&'static str, &'static str, &'static str)] {
        W::EDGES
    }

    fn force_signal(
        &self,
        state: &Value,
        state_name: &str,
        target: &str,
    ) -> Result<Option<(&'static str, Value)>, ParseError> {
        if !W::EDGES
            .iter()
            .any(|(from, to, _)| *from == state_name && *to == target)
        {
            return Ok(None);
        }
        let state: W::State = serde_json::from_value(state.clone())
            .map_err(|e| ParseError::StoredState(e.to_string()))?;
        Ok(W::force_signal(&state, target))
    }

    fn upcast_to_current(&self, from: u32, mut state: Value) -> Result<Value, String> {
        if from > W::VERSION {
            return Err(format!(
                "state version {from} is newer than this definition ({})",
                W::VERSION
            ));
        }
        for v in from..W::VERSION {
            state = W::upcast(v, state)?;
        }
        serde_json::from_value::<W::State>(state.clone())
            .map_err(|e| format!("upcast state does not decode: {e}"))?;
        Ok(state)
    }

    fn allowed_roles(&self, name: &str) -> &'static [Role] {
        W::allowed_roles(name)
    }

    fn apply(
        &self,
        state: &Value,
        name: &str,
        payload: &Value,
        ctx: &Ctx<'_>,
    ) -> Result<Transition, ParseError> {
        let state: W::State = serde_json::from_value(state.clone())
            .map_err(|e| ParseError::StoredState(e.to_string()))?;
        let signal = W::parse_signal(name, payload)?;
        Ok(match W::on_signal(&state, signal, ctx) {
            Outcome::Accept { next, commands } => Transition::Accept {
                state_name: W::state_name(&next),
                is_final: W::is_final(&next),
                state: encode(&next),
                commands,
            },
            Outcome::Reject { reason } => Transition::Reject { reason },
        })
    }
}

fn encode<S: serde::Serialize>(s: &S) -> Value {
    serde_json::to_value(s).expect("workflow states serialize to JSON")
}

/// The set of workflows a process runs, by kind. Built explicitly: importing
/// this crate registers nothing.
#[derive(Default)]
pub struct Registry {
    map: BTreeMap<&'static str, Box<dyn DynWorkflow>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a workflow type.
    pub fn with<W: Workflow + 'static>(mut self) -> Self {
        self.map.insert(W::KIND, Box::new(Erased::<W>(PhantomData)));
        self
    }

    /// Every built-in workflow.
    pub fn builtin() -> Self {
        Self::new()
            .with::<crate::dispatch::Dispatch>()
            .with::<crate::lead_finalization::LeadFinalization>()
            .with::<crate::driver_registration::DriverRegistration>()
            .with::<crate::route_dispatch::RouteDispatch>()
            .with::<crate::sitter_lifecycle::SitterLifecycle>()
            .with::<crate::pool_number::PoolNumber>()
            .with::<crate::assignment_window::AssignmentWindow>()
            .with::<crate::meet_and_greet::MeetAndGreet>()
            .with::<crate::poaching_strikes::PoachingStrikes>()
            .with::<crate::message_relay::MessageRelay>()
    }

    /// Keep only the named kinds (`ENABLED_WORKFLOWS`); a name this
    /// registry does not have is returned as the error.
    pub fn only<S: AsRef<str>>(mut self, kinds: &[S]) -> Result<Self, String> {
        if let Some(unknown) = kinds
            .iter()
            .map(AsRef::as_ref)
            .find(|k| !self.map.contains_key(k))
        {
            return Err(unknown.to_string());
        }
        self.map
            .retain(|kind, _| kinds.iter().any(|k| k.as_ref() == *kind));
        Ok(self)
    }

    /// Look a kind up.
    pub fn get(&self, kind: &str) -> Option<&dyn DynWorkflow> {
        self.map.get(kind).map(|b| b.as_ref())
    }

    /// Kind names, sorted.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.map.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::Registry;

    #[test]
    fn only_keeps_the_named_kinds_and_names_an_unknown_one() {
        let every = Registry::builtin().kinds();
        for kind in &every {
            assert_eq!(
                Registry::builtin().only(&[kind]).unwrap().kinds(),
                [*kind],
                "every built-in kind can be enabled by name"
            );
        }
        let two = Registry::builtin()
            .only(&["message_relay", "dispatch"])
            .unwrap();
        assert_eq!(two.kinds(), ["dispatch", "message_relay"]);
        assert_eq!(
            Registry::builtin().only(&["dispatch", "nope"]).err(),
            Some("nope".to_string())
        );
    }
}
