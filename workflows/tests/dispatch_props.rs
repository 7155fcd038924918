//! Property tests for the dispatch workflow's invariants (DOMAIN.md §1).
//!
//! Each case starts a dispatch and drives it with up to 40 random signals from
//! random actors, with random payloads, a random tenant config and a clock
//! that only moves forward. Like the runtime, a signal whose sender's role is
//! not in `Dispatch::allowed_roles` is dropped before the workflow sees it
//! (the edge answers 403). After every step [`Run::step`] checks:
//! - the full lead (`dispatch_release`) leaves only after OPERATOR_CONFIRMED and
//!   PAID, by an operator/ops `release` with a reason (audited override), or by
//!   tenant auto-release on `paid` (which comes after confirm + invoice);
//! - one claim holder at a time, and a holder only changes via `reject_claim`;
//! - final states accept nothing;
//! - `dispatch_release` at most once, and no idempotency key twice, per run;
//! - the state round-trips through serde_json.

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};
use workflows::dispatch::{effects, Dispatch, DispatchState, SIGNALS};
use workflows::{Actor, Command, Ctx, Outcome, Role, Workflow};

const LEAD: &str = "0952ef82-5b1c-4f3a-9d2e-7c4b1a0f6e11";
const EXECUTORS: [&str; 3] = ["e1", "e2", "e3"];
const MAX_STEPS: usize = 40;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 2, 23, 8, 0, 0).unwrap()
}

fn tenant_config(auto_release: bool) -> Value {
    json!({ "dispatch": { "auto_release_on_paid": auto_release } })
}

/// The trimmed, non-empty `reason` of a payload, as an audit log would need it.
fn reason(payload: &Value) -> Option<&str> {
    payload
        .get("reason")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|r| !r.is_empty())
}

// ------------------------------------------------------------ generators --

#[derive(Debug, Clone)]
struct Step {
    signal: &'static str,
    payload: Value,
    actor: Actor,
    /// Seconds the clock moves before this step (0: same instant).
    advance_s: i64,
}

fn any_role() -> impl Strategy<Value = Role> {
    select(vec![
        Role::Ops,
        Role::Operator,
        Role::Executor,
        Role::Integration,
        Role::System,
    ])
}

fn subject_for(role: Role) -> BoxedStrategy<Option<String>> {
    let named = |names: Vec<&'static str>| select(names).prop_map(|s| Some(s.to_string()));
    match role {
        Role::Executor => prop_oneof![1 => Just(None), 4 => named(EXECUTORS.to_vec())].boxed(),
        Role::Ops | Role::Operator => prop_oneof![Just(None), named(vec!["op1", "ops1"])].boxed(),
        Role::Integration => prop_oneof![Just(None), named(vec!["payments"])].boxed(),
        Role::System => Just(None).boxed(),
    }
}

fn actor_with(roles: impl Strategy<Value = Role>) -> impl Strategy<Value = Actor> {
    roles.prop_flat_map(|role| subject_for(role).prop_map(move |subject| Actor { role, subject }))
}

/// Mostly a sender the signal allows, sometimes anyone (then dropped as a 403).
fn actor_for(signal: &'static str) -> impl Strategy<Value = Actor> {
    let allowed = select(Dispatch::allowed_roles(signal).to_vec());
    prop_oneof![3 => actor_with(allowed), 1 => actor_with(any_role())]
}

fn reason_payload() -> impl Strategy<Value = Value> {
    select(vec![
        Value::Null,
        json!({}),
        json!({ "reason": null }),
        json!({ "reason": "" }),
        json!({ "reason": "   " }),
        json!({ "reason": "client paid cash" }),
    ])
}

fn payload_for(signal: &'static str) -> BoxedStrategy<Value> {
    match signal {
        "published" => (
            0u32..1000,
            proptest::option::of(select(vec!["telegram", "whatsapp"])),
        )
            .prop_map(
                |(n, provider)| json!({ "message_id": format!("m-{n}"), "provider": provider }),
            )
            .boxed(),
        "release" | "cancel" | "reject_claim" => reason_payload().boxed(),
        _ => select(vec![Value::Null, json!({})]).boxed(),
    }
}

fn signal() -> impl Strategy<Value = &'static str> {
    // Cancel and expire end the run; keep them rarer so later states get reached.
    prop_oneof![
        3 => Just("published"),
        4 => Just("claim"),
        2 => Just("reject_claim"),
        3 => Just("confirm"),
        3 => Just("invoice_sent"),
        3 => Just("paid"),
        3 => Just("release"),
        1 => Just("cancel"),
        1 => Just("expire"),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    signal().prop_flat_map(|signal| {
        (payload_for(signal), actor_for(signal), 0i64..=7200).prop_map(
            move |(payload, actor, advance_s)| Step {
                signal,
                payload,
                actor,
                advance_s,
            },
        )
    })
}

fn scenario() -> impl Strategy<Value = (bool, Vec<Step>)> {
    (any::<bool>(), prop::collection::vec(step(), 0..=MAX_STEPS))
}

// --------------------------------------------------------------- checker --

/// One workflow run and everything the invariants need to remember about it.
struct Run {
    config: Value,
    auto_release: bool,
    now: DateTime<Utc>,
    state: DispatchState,
    visited: BTreeSet<&'static str>,
    effect_keys: HashSet<String>,
    releases: usize,
}

impl Run {
    fn start(auto_release: bool) -> Result<Self, TestCaseError> {
        let config = tenant_config(auto_release);
        let lead_core = Actor {
            role: Role::Integration,
            subject: Some("lead-core".into()),
        };
        let ctx = Ctx {
            now: t0(),
            tenant_config: &config,
            actor: &lead_core,
        };
        let input = json!({ "lead": { "id": LEAD }, "claim_deadline_s": 3600 });
        let (state, commands) = Dispatch::start(LEAD, &input, &ctx)
            .map_err(|e| TestCaseError::fail(format!("start failed: {e}")))?;
        let mut run = Run {
            auto_release,
            now: t0(),
            visited: BTreeSet::from([Dispatch::state_name(&state)]),
            state,
            config,
            effect_keys: HashSet::new(),
            releases: 0,
        };
        run.record_effects(&commands, None)?;
        check_round_trip(&run.state)?;
        Ok(run)
    }

    fn name(&self) -> &'static str {
        Dispatch::state_name(&self.state)
    }

    /// Apply one step as the runtime would and check every invariant.
    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        self.now += Duration::seconds(step.advance_s);
        if !Dispatch::allowed_roles(step.signal).contains(&step.actor.role) {
            return Ok(());
        }
        let signal = Dispatch::parse_signal(step.signal, &step.payload)
            .map_err(|e| TestCaseError::fail(format!("generated payload did not parse: {e}")))?;
        let ctx = Ctx {
            now: self.now,
            tenant_config: &self.config,
            actor: &step.actor,
        };
        let Outcome::Accept { next, commands } = Dispatch::on_signal(&self.state, signal, &ctx)
        else {
            return Ok(());
        };
        prop_assert!(
            !Dispatch::is_final(&self.state),
            "final state {} accepted {:?}",
            self.name(),
            step
        );
        self.check_claim_holder(&next, step)?;
        self.record_effects(&commands, Some(step))?;
        check_round_trip(&next)?;
        self.visited.insert(Dispatch::state_name(&next));
        self.state = next;
        Ok(())
    }

    /// One holder at a time; it appears only through a claim by that executor
    /// and goes away only through `reject_claim` (or into a final record).
    fn check_claim_holder(&self, next: &DispatchState, step: &Step) -> Result<(), TestCaseError> {
        let before = self.state.claim().map(|c| c.claimed_by.as_str());
        let after = next.claim().map(|c| c.claimed_by.as_str());
        match (before, after) {
            (Some(x), Some(y)) => prop_assert_eq!(x, y, "claim moved without reject_claim"),
            (Some(_), None) => prop_assert!(
                step.signal == "reject_claim" || Dispatch::is_final(next),
                "claim dropped by {:?}",
                step
            ),
            (None, Some(y)) => {
                prop_assert_eq!(step.signal, "claim");
                prop_assert_eq!(step.actor.role, Role::Executor);
                prop_assert_eq!(step.actor.subject.as_deref(), Some(y));
                prop_assert_eq!(next.job().claims, self.state.job().claims + 1);
            }
            (None, None) => {}
        }
        Ok(())
    }

    /// Unique idempotency keys over the run; `dispatch_release` once, and only
    /// when the rules allow the full lead out. `step` is `None` for start.
    fn record_effects(
        &mut self,
        commands: &[Command],
        step: Option<&Step>,
    ) -> Result<(), TestCaseError> {
        for command in commands {
            let Command::Effect {
                name,
                idempotency_key,
                payload,
                ..
            } = command
            else {
                continue;
            };
            prop_assert!(
                idempotency_key.starts_with(&format!("{LEAD}:")),
                "key {} is not under the lead id",
                idempotency_key
            );
            prop_assert!(
                self.effect_keys.insert(idempotency_key.clone()),
                "idempotency key {} emitted twice",
                idempotency_key
            );
            if name == effects::RELEASE_DETAILS {
                self.releases += 1;
                prop_assert_eq!(self.releases, 1, "dispatch_release emitted twice");
                let step = step.ok_or_else(|| TestCaseError::fail("release at start"))?;
                prop_assert!(
                    self.release_permitted(step),
                    "full lead released from {} (visited {:?}) by {:?}",
                    self.name(),
                    self.visited,
                    step
                );
                let holder = self.state.claim().map(|c| c.claimed_by.as_str());
                prop_assert_eq!(payload["to"].as_str(), holder, "released to a non-holder");
            }
        }
        Ok(())
    }

    fn release_permitted(&self, step: &Step) -> bool {
        let passed = |s: &str| self.visited.contains(s);
        let confirmed_and_paid = passed("OPERATOR_CONFIRMED") && passed("PAID");
        let audited_override = step.signal == "release"
            && matches!(step.actor.role, Role::Operator | Role::Ops)
            && reason(&step.payload).is_some();
        let auto_release = step.signal == "paid"
            && self.auto_release
            && passed("OPERATOR_CONFIRMED")
            && self.name() == "INVOICE_SENT";
        confirmed_and_paid || audited_override || auto_release
    }

    /// Once final, every signal with every payload is refused.
    fn check_final_refuses_everything(&self) -> Result<(), TestCaseError> {
        if !Dispatch::is_final(&self.state) {
            return Ok(());
        }
        let payloads = [
            json!({}),
            json!({ "reason": "client paid cash" }),
            json!({ "message_id": "m-late" }),
        ];
        let actors = [
            Actor::system(),
            Actor {
                role: Role::Operator,
                subject: Some("op1".into()),
            },
            Actor {
                role: Role::Executor,
                subject: Some("e1".into()),
            },
        ];
        for name in SIGNALS {
            for payload in &payloads {
                let Ok(signal) = Dispatch::parse_signal(name, payload) else {
                    continue;
                };
                for actor in &actors {
                    let ctx = Ctx {
                        now: self.now,
                        tenant_config: &self.config,
                        actor,
                    };
                    let outcome = Dispatch::on_signal(&self.state, signal.clone(), &ctx);
                    prop_assert!(
                        matches!(outcome, Outcome::Reject { .. }),
                        "final {} accepted `{}`",
                        self.name(),
                        name
                    );
                }
            }
        }
        Ok(())
    }
}

fn check_round_trip(state: &DispatchState) -> Result<(), TestCaseError> {
    let value = serde_json::to_value(state).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(value["state"].as_str(), Some(Dispatch::state_name(state)));
    let back: DispatchState =
        serde_json::from_value(value).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, state);
    Ok(())
}

fn run_scenario(auto_release: bool, steps: &[Step]) -> Result<Run, TestCaseError> {
    let mut run = Run::start(auto_release)?;
    for step in steps {
        run.step(step)?;
    }
    run.check_final_refuses_everything()?;
    Ok(run)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_runs_keep_the_dispatch_invariants((auto_release, steps) in scenario()) {
        run_scenario(auto_release, &steps)?;
    }
}

// --------------------------------------------- the checker is not vacuous --

fn by(role: Role, subject: Option<&str>, signal: &'static str, payload: Value) -> Step {
    Step {
        signal,
        payload,
        actor: Actor {
            role,
            subject: subject.map(str::to_string),
        },
        advance_s: 60,
    }
}

fn happy_path() -> Vec<Step> {
    vec![
        by(
            Role::System,
            None,
            "published",
            json!({ "message_id": "m-1" }),
        ),
        by(Role::Executor, Some("e1"), "claim", json!({})),
        by(Role::Operator, Some("op1"), "confirm", json!({})),
        by(Role::Operator, Some("op1"), "invoice_sent", json!({})),
        by(Role::Integration, Some("payments"), "paid", json!({})),
        by(Role::Operator, Some("op1"), "release", json!({})),
    ]
}

#[test]
fn the_checker_accepts_every_legitimate_release_path() {
    let released = |run: Run| run.releases == 1 && run.name() == "DETAILS_RELEASED";

    assert!(released(run_scenario(false, &happy_path()).unwrap()));

    let auto = &happy_path()[..5];
    assert!(released(run_scenario(true, auto).unwrap()));

    let mut early = happy_path()[..2].to_vec();
    early.push(by(
        Role::Ops,
        Some("ops1"),
        "release",
        json!({ "reason": "urgent" }),
    ));
    assert!(released(run_scenario(false, &early).unwrap()));
}

#[test]
fn the_checker_refuses_releases_the_rules_do_not_allow() {
    let claimed = run_scenario(false, &happy_path()[..2]).unwrap();
    assert_eq!(claimed.name(), "CLAIMED");
    let unaudited = [
        by(Role::Operator, Some("op1"), "release", json!({})),
        by(
            Role::Operator,
            Some("op1"),
            "release",
            json!({ "reason": "  " }),
        ),
        by(
            Role::Executor,
            Some("e1"),
            "release",
            json!({ "reason": "mine" }),
        ),
        by(Role::Integration, None, "paid", json!({})),
    ];
    for step in &unaudited {
        assert!(!claimed.release_permitted(step), "{step:?}");
    }
}

#[test]
fn the_checker_drops_signals_from_roles_the_edge_refuses() {
    let steps = [
        by(
            Role::System,
            None,
            "published",
            json!({ "message_id": "m-1" }),
        ),
        by(Role::Operator, Some("e1"), "claim", json!({})),
        by(
            Role::Executor,
            Some("e1"),
            "release",
            json!({ "reason": "please" }),
        ),
    ];
    let run = run_scenario(false, &steps).unwrap();
    assert_eq!(run.name(), "PUBLISHED");
    assert_eq!(run.releases, 0);
}

/// Random runs must actually reach every state and every release path, or
/// the properties above would hold vacuously.
#[test]
fn random_runs_reach_every_state_and_release_path() {
    let mut runner = TestRunner::deterministic();
    let strategy = scenario();
    let mut visited = BTreeSet::new();
    let (mut normal, mut auto, mut early) = (0, 0, 0);
    for _ in 0..512 {
        let (auto_release, steps) = strategy.new_tree(&mut runner).unwrap().current();
        let run = run_scenario(auto_release, &steps).unwrap();
        visited.extend(run.visited.iter().copied());
        if let DispatchState::DetailsReleased { release, .. } = &run.state {
            match (release.early, release.released_by.as_deref()) {
                (true, _) => early += 1,
                (false, Some("auto")) => auto += 1,
                (false, _) => normal += 1,
            }
        }
    }
    let all: BTreeSet<&str> = [
        "NEW",
        "PUBLISHED",
        "CLAIMED",
        "OPERATOR_CONFIRMED",
        "INVOICE_SENT",
        "PAID",
        "DETAILS_RELEASED",
        "CANCELLED",
        "EXPIRED",
    ]
    .into();
    assert_eq!(visited, all);
    assert!(
        normal > 0 && auto > 0 && early > 0,
        "release paths reached: normal {normal}, auto {auto}, early {early}"
    );
}
