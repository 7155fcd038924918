//! Exhaustive transition tests for the dispatch workflow (DOMAIN.md §1).
//!
//! `every_state_signal_pair_has_the_expected_outcome` walks one table row per
//! (state, signal) pair: 9 states × 9 signals = 81 rows. Each fixture state is
//! reached from `Dispatch::start` through real transitions, so the table also
//! proves every state is reachable. The focused tests below it cover the rules
//! the table cannot show in one line: deadline precedence, re-arming, expiry
//! only at the current deadline, auto release, early release, parsing, start
//! validation (canonical keys) and roles.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::{json, Value};
use uuid::Uuid;
use workflows::dispatch::{
    effects, Dispatch, DispatchSignal, DispatchState, CLAIM_TIMER, DEFAULT_CLAIM_DEADLINE_S,
    SIGNALS,
};
use workflows::{Actor, Command, Ctx, Outcome, ParseError, Registry, Role, Workflow};

const LEAD: &str = "0952ef82-5b1c-4f3a-9d2e-7c4b1a0f6e11";
const SHORT_ID: &str = "0952ef82";
/// The claim window every fixture is started with (start input).
const DEADLINE_S: u64 = 3600;
/// Seconds after `t(0)` at which table rows apply their signal: after every
/// fixture step but before the PUBLISHED fixture's claim deadline, so the
/// table's `expire` in PUBLISHED is an early (stale) timer.
const TABLE_AT: i64 = 1000;
/// Seconds after `t(0)` when the PUBLISHED fixture's claim window ends
/// (published at `t(10)` with a `DEADLINE_S` window).
const POST_DEADLINE_AT: i64 = 10 + DEADLINE_S as i64;

const STATES: [&str; 9] = [
    "NEW",
    "PUBLISHED",
    "CLAIMED",
    "OPERATOR_CONFIRMED",
    "INVOICE_SENT",
    "PAID",
    "DETAILS_RELEASED",
    "CANCELLED",
    "EXPIRED",
];

// ---------------------------------------------------------------- harness --

fn t(seconds: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 2, 23, 8, 0, 0).unwrap() + Duration::seconds(seconds)
}

fn actor(role: Role, subject: Option<&str>) -> Actor {
    Actor {
        role,
        subject: subject.map(str::to_string),
    }
}

fn operator() -> Actor {
    actor(Role::Operator, Some("op1"))
}

fn executor(id: &str) -> Actor {
    actor(Role::Executor, Some(id))
}

fn no_config() -> Value {
    json!({})
}

fn auto_release_config(on: bool) -> Value {
    json!({ "dispatch": { "auto_release_on_paid": on } })
}

/// A start input whose lead carries PII canaries (see `pii_never_enters_state_or_commands`).
fn start_input(deadline_s: Option<u64>) -> Value {
    let mut input = json!({
        "lead": {
            "id": LEAD,
            "client": { "name": "Canary Name", "phone": "+972501234567" },
            "from": { "street": "Canary Street 5", "locality": "Haifa", "floor": 3 },
            "to": { "street": "Canary Road 1", "locality": "Kiryat Ata", "floor": 2 },
            "notes": "Canary notes",
        }
    });
    if let Some(s) = deadline_s {
        input["claim_deadline_s"] = json!(s);
    }
    input
}

fn start_with(input: &Value, config: &Value) -> Result<(DispatchState, Vec<Command>), ParseError> {
    let integration = actor(Role::Integration, Some("lead-core"));
    let ctx = Ctx {
        now: t(0),
        tenant_config: config,
        actor: &integration,
    };
    Dispatch::start(LEAD, input, &ctx)
}

fn started(config: &Value) -> DispatchState {
    start_with(&start_input(Some(DEADLINE_S)), config)
        .unwrap()
        .0
}

/// Parse and apply one signal, as the runtime does after its role check.
fn send(
    state: &DispatchState,
    name: &str,
    payload: Value,
    actor: &Actor,
    config: &Value,
    now: DateTime<Utc>,
) -> Outcome<DispatchState> {
    let signal = Dispatch::parse_signal(name, &payload)
        .unwrap_or_else(|e| panic!("`{name}` with {payload} does not parse: {e}"));
    let ctx = Ctx {
        now,
        tenant_config: config,
        actor,
    };
    Dispatch::on_signal(state, signal, &ctx)
}

fn accepted(outcome: Outcome<DispatchState>) -> (DispatchState, Vec<Command>) {
    match outcome {
        Outcome::Accept { next, commands } => (next, commands),
        Outcome::Reject { reason } => panic!("expected Accept, got Reject({reason})"),
    }
}

fn rejected(outcome: Outcome<DispatchState>) -> String {
    match outcome {
        Outcome::Accept { next, .. } => {
            panic!(
                "expected Reject, got Accept → {}",
                Dispatch::state_name(&next)
            )
        }
        Outcome::Reject { reason } => reason,
    }
}

/// The payload and actor a table row uses for each signal: the legitimate
/// sender, and `release` without a reason (the with-reason override has its own test).
fn canonical(name: &str) -> (Value, Actor) {
    match name {
        "published" => (
            json!({ "message_id": "m-1", "provider": "telegram", "chat_id": "crew-1" }),
            Actor::system(),
        ),
        "expire" => (json!({}), Actor::system()),
        "claim" => (json!({}), executor("e2")),
        _ => (json!({}), operator()),
    }
}

/// Send `name` with its canonical payload and actor.
fn send_canonical(
    state: &DispatchState,
    name: &str,
    config: &Value,
    now: DateTime<Utc>,
) -> Outcome<DispatchState> {
    let (payload, actor) = canonical(name);
    send(state, name, payload, &actor, config, now)
}

/// Drive a fresh workflow to `state` through real transitions (`e1` claims).
/// The happy path advances ten seconds per step: published t(10), claimed
/// t(20), confirmed t(30), invoice t(40), paid t(50), released t(60).
/// Cancelled at t(70); expired exactly at the post's deadline, t(3610).
fn drive_to(state: &str, config: &Value) -> DispatchState {
    let step = |from: &str, signal: &str, at: i64| {
        let from = drive_to(from, config);
        let actor = if signal == "claim" {
            executor("e1")
        } else {
            canonical(signal).1
        };
        accepted(send(
            &from,
            signal,
            canonical(signal).0,
            &actor,
            config,
            t(at),
        ))
        .0
    };
    let reached = match state {
        "NEW" => started(config),
        "PUBLISHED" => step("NEW", "published", 10),
        "CLAIMED" => step("PUBLISHED", "claim", 20),
        "OPERATOR_CONFIRMED" => step("CLAIMED", "confirm", 30),
        "INVOICE_SENT" => step("OPERATOR_CONFIRMED", "invoice_sent", 40),
        "PAID" => step("INVOICE_SENT", "paid", 50),
        "DETAILS_RELEASED" => step("PAID", "release", 60),
        "CANCELLED" => step("CLAIMED", "cancel", 70),
        "EXPIRED" => step("PUBLISHED", "expire", POST_DEADLINE_AT),
        other => panic!("no fixture for {other}"),
    };
    assert_eq!(
        Dispatch::state_name(&reached),
        state,
        "fixture path is wrong"
    );
    reached
}

fn fixture(state: &str) -> DispatchState {
    drive_to(state, &no_config())
}

fn effect_named<'a>(commands: &'a [Command], wanted: &str) -> (&'a str, &'a Value) {
    commands
        .iter()
        .find_map(|c| match c {
            Command::Effect {
                name,
                idempotency_key,
                payload,
                ..
            } if name == wanted => Some((idempotency_key.as_str(), payload)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no `{wanted}` effect in {commands:?}"))
}

// ------------------------------------------------------------ the table --

/// A command reduced to what the table asserts (effect payloads have their own tests).
#[derive(Debug, Clone, PartialEq)]
enum Cmd {
    Effect {
        name: String,
        key: String,
    },
    SetTimer {
        name: String,
        at: DateTime<Utc>,
        signal: String,
    },
    CancelTimer {
        name: String,
    },
    Complete,
    Other(String),
}

fn summarize(commands: &[Command]) -> Vec<Cmd> {
    commands
        .iter()
        .map(|c| match c {
            Command::Effect {
                name,
                idempotency_key,
                ..
            } => Cmd::Effect {
                name: name.clone(),
                key: idempotency_key.clone(),
            },
            Command::SetTimer { name, at, signal } => Cmd::SetTimer {
                name: name.clone(),
                at: *at,
                signal: signal.clone(),
            },
            Command::CancelTimer { name } => Cmd::CancelTimer { name: name.clone() },
            Command::Complete => Cmd::Complete,
            other => Cmd::Other(format!("{other:?}")),
        })
        .collect()
}

fn eff(name: &str, key_suffix: &str) -> Cmd {
    Cmd::Effect {
        name: name.to_string(),
        key: format!("{LEAD}:{key_suffix}"),
    }
}

/// The claim deadline timer, armed at the table's `now`.
fn arm() -> Cmd {
    Cmd::SetTimer {
        name: CLAIM_TIMER.to_string(),
        at: t(TABLE_AT) + Duration::seconds(DEADLINE_S as i64),
        signal: "expire".to_string(),
    }
}

fn disarm() -> Cmd {
    Cmd::CancelTimer {
        name: CLAIM_TIMER.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Expect {
    To(&'static str, Vec<Cmd>),
    Reject(String),
}

fn to(state: &'static str, commands: Vec<Cmd>) -> Expect {
    Expect::To(state, commands)
}

fn rej(reason: &str) -> Expect {
    Expect::Reject(reason.to_string())
}

/// Cancel from any live state: the crew post edit is emitted with or without a
/// post (without one it is found through the publish key, see
/// `cancel_edits_the_post_or_finds_it_through_the_publish_key`).
fn cancelled() -> Expect {
    to(
        "CANCELLED",
        vec![
            disarm(),
            eff(effects::CREW_POST_CANCELLED, "group_cancel_v1"),
            Cmd::Complete,
        ],
    )
}

/// Final states reject everything; the expiry timer firing late is `stale_timer`.
fn final_rows(state: &'static str) -> Vec<(&'static str, &'static str, Expect)> {
    SIGNALS
        .iter()
        .map(|&signal| {
            let reason = if signal == "expire" {
                "stale_timer"
            } else {
                "final_state"
            };
            (state, signal, rej(reason))
        })
        .collect()
}

#[rustfmt::skip]
fn table() -> Vec<(&'static str, &'static str, Expect)> {
    let mut rows = vec![
        ("NEW", "published",    to("PUBLISHED", vec![arm()])),
        ("NEW", "claim",        rej("not_published")),
        ("NEW", "reject_claim", rej("not_claimed")),
        ("NEW", "confirm",      rej("not_claimed")),
        ("NEW", "invoice_sent", rej("not_confirmed")),
        ("NEW", "paid",         rej("invoice_not_sent")),
        ("NEW", "release",      rej("not_claimed")),
        ("NEW", "cancel",       cancelled()),
        ("NEW", "expire",       rej("stale_timer")),

        ("PUBLISHED", "published",    rej("already_published")),
        ("PUBLISHED", "claim",        to("CLAIMED", vec![
            disarm(),
            eff(effects::NOTIFY_OPERATOR_CLAIMED, "claim_notify_v1:c1"),
            eff(effects::CREW_POST_RESERVED, "group_edit_v1:c1"),
        ])),
        ("PUBLISHED", "reject_claim", rej("not_claimed")),
        ("PUBLISHED", "confirm",      rej("not_claimed")),
        ("PUBLISHED", "invoice_sent", rej("not_confirmed")),
        ("PUBLISHED", "paid",         rej("invoice_not_sent")),
        ("PUBLISHED", "release",      rej("not_claimed")),
        ("PUBLISHED", "cancel",       cancelled()),
        // TABLE_AT is before the post's deadline: a timer from an earlier window.
        // Expiry at the deadline: `expire_applies_only_from_the_current_deadline_on`.
        ("PUBLISHED", "expire",       rej("stale_timer")),

        ("CLAIMED", "published",    rej("already_published")),
        ("CLAIMED", "claim",        rej("already_claimed")),
        ("CLAIMED", "reject_claim", to("PUBLISHED", vec![
            arm(),
            eff(effects::CREW_POST_RESTORED, "group_restore_v1:c1"),
        ])),
        ("CLAIMED", "confirm",      to("OPERATOR_CONFIRMED", vec![])),
        ("CLAIMED", "invoice_sent", rej("not_confirmed")),
        ("CLAIMED", "paid",         rej("invoice_not_sent")),
        ("CLAIMED", "release",      rej("not_paid")),
        ("CLAIMED", "cancel",       cancelled()),
        ("CLAIMED", "expire",       rej("stale_timer")),

        ("OPERATOR_CONFIRMED", "published",    rej("already_published")),
        ("OPERATOR_CONFIRMED", "claim",        rej("already_claimed")),
        ("OPERATOR_CONFIRMED", "reject_claim", rej("not_claimed")),
        ("OPERATOR_CONFIRMED", "confirm",      rej("already_confirmed")),
        ("OPERATOR_CONFIRMED", "invoice_sent", to("INVOICE_SENT", vec![])),
        ("OPERATOR_CONFIRMED", "paid",         rej("invoice_not_sent")),
        ("OPERATOR_CONFIRMED", "release",      rej("not_paid")),
        ("OPERATOR_CONFIRMED", "cancel",       cancelled()),
        ("OPERATOR_CONFIRMED", "expire",       rej("stale_timer")),

        ("INVOICE_SENT", "published",    rej("already_published")),
        ("INVOICE_SENT", "claim",        rej("already_claimed")),
        ("INVOICE_SENT", "reject_claim", rej("not_claimed")),
        ("INVOICE_SENT", "confirm",      rej("already_confirmed")),
        ("INVOICE_SENT", "invoice_sent", rej("invoice_already_sent")),
        ("INVOICE_SENT", "paid",         to("PAID", vec![])),
        ("INVOICE_SENT", "release",      rej("not_paid")),
        ("INVOICE_SENT", "cancel",       cancelled()),
        ("INVOICE_SENT", "expire",       rej("stale_timer")),

        ("PAID", "published",    rej("already_published")),
        ("PAID", "claim",        rej("already_claimed")),
        ("PAID", "reject_claim", rej("not_claimed")),
        ("PAID", "confirm",      rej("already_confirmed")),
        ("PAID", "invoice_sent", rej("invoice_already_sent")),
        ("PAID", "paid",         rej("already_paid")),
        ("PAID", "release",      to("DETAILS_RELEASED", vec![
            eff(effects::RELEASE_DETAILS, "release_v1"),
            Cmd::Complete,
        ])),
        ("PAID", "cancel",       cancelled()),
        ("PAID", "expire",       rej("stale_timer")),
    ];
    for state in ["DETAILS_RELEASED", "CANCELLED", "EXPIRED"] {
        rows.extend(final_rows(state));
    }
    rows
}

#[test]
fn the_signal_list_is_the_documented_one() {
    assert_eq!(
        SIGNALS,
        [
            "published",
            "claim",
            "reject_claim",
            "confirm",
            "invoice_sent",
            "paid",
            "release",
            "cancel",
            "expire"
        ]
    );
}

#[test]
fn the_table_covers_every_state_signal_pair_once() {
    let rows = table();
    assert_eq!(rows.len(), 81);
    let pairs: BTreeSet<(&str, &str)> = rows.iter().map(|(s, g, _)| (*s, *g)).collect();
    assert_eq!(pairs.len(), 81, "a pair appears twice");
    for state in STATES {
        for signal in SIGNALS {
            assert!(
                pairs.contains(&(state, *signal)),
                "missing ({state}, {signal})"
            );
        }
    }
}

#[test]
fn every_state_signal_pair_has_the_expected_outcome() {
    let config = no_config();
    let mut mismatches = Vec::new();
    for (state, signal, expected) in table() {
        let from = fixture(state);
        let got = match send_canonical(&from, signal, &config, t(TABLE_AT)) {
            Outcome::Accept { next, commands } => {
                Expect::To(Dispatch::state_name(&next), summarize(&commands))
            }
            Outcome::Reject { reason } => Expect::Reject(reason),
        };
        if got != expected {
            mismatches.push(format!(
                "({state}, {signal}):\n  expected {expected:?}\n  got      {got:?}"
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of 81 pairs differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

// ------------------------------------------------------- state details --

#[test]
fn final_flag_and_state_names_match_each_fixture() {
    for state in STATES {
        let s = fixture(state);
        assert_eq!(Dispatch::state_name(&s), state);
        let final_state = matches!(state, "DETAILS_RELEASED" | "CANCELLED" | "EXPIRED");
        assert_eq!(Dispatch::is_final(&s), final_state, "{state}");
    }
}

#[test]
fn every_state_round_trips_through_json_with_its_name_as_tag() {
    for state in STATES {
        let s = fixture(state);
        let value = serde_json::to_value(&s).unwrap();
        assert_eq!(value["state"], json!(state));
        let back: DispatchState = serde_json::from_value(value).unwrap();
        assert_eq!(back, s, "{state} does not round-trip");
    }
}

#[test]
fn start_records_the_job_and_asks_for_publication() {
    let (state, commands) = start_with(&start_input(Some(DEADLINE_S)), &no_config()).unwrap();
    let DispatchState::New { job } = &state else {
        panic!("start gave {state:?}");
    };
    assert_eq!(job.lead_id, Uuid::parse_str(LEAD).unwrap());
    assert_eq!(job.short_id, SHORT_ID);
    assert_eq!(job.claim_deadline_s, DEADLINE_S);
    assert_eq!(job.created_at, t(0));
    assert_eq!(job.claims, 0);
    assert_eq!(
        commands,
        vec![Command::Effect {
            name: effects::PUBLISH.to_string(),
            idempotency_key: format!("{LEAD}:publish_v1"),
            payload: json!({ "lead_id": LEAD, "short_id": SHORT_ID, "view": "crew" }),
            reply: Some("published".to_string()),
        }]
    );
}

#[test]
fn published_stores_the_post_and_its_deadline() {
    let s = fixture("PUBLISHED");
    let DispatchState::Published { post, .. } = &s else {
        panic!("{s:?}");
    };
    assert_eq!(post.message_id, "m-1");
    assert_eq!(post.provider.as_deref(), Some("telegram"));
    assert_eq!(post.chat_id.as_deref(), Some("crew-1"));
    assert_eq!(post.published_at, t(10));
    assert_eq!(post.deadline, t(10) + Duration::seconds(DEADLINE_S as i64));
}

#[test]
fn claim_records_the_executor_notifies_the_operator_and_reserves_the_post() {
    let (next, commands) = accepted(send(
        &fixture("PUBLISHED"),
        "claim",
        json!({}),
        &executor("e7"),
        &no_config(),
        t(99),
    ));
    let claim = next.claim().expect("claimed state has a claim");
    assert_eq!(claim.claimed_by, "e7");
    assert_eq!(claim.claimed_at, t(99));
    assert_eq!(next.job().claims, 1);
    let (_, notify) = effect_named(&commands, effects::NOTIFY_OPERATOR_CLAIMED);
    assert_eq!(
        notify,
        &json!({ "lead_id": LEAD, "short_id": SHORT_ID, "executor": "e7" })
    );
    let (_, reserved) = effect_named(&commands, effects::CREW_POST_RESERVED);
    assert_eq!(
        reserved,
        &json!({ "lead_id": LEAD, "short_id": SHORT_ID, "executor": "e7", "message_id": "m-1", "provider": "telegram", "chat_id": "crew-1" })
    );
}

#[test]
fn of_several_claims_exactly_the_first_wins() {
    let config = no_config();
    let mut state = fixture("PUBLISHED");
    let mut winners = Vec::new();
    for (i, who) in ["e1", "e2", "e3", "e1"].into_iter().enumerate() {
        match send(
            &state,
            "claim",
            json!({}),
            &executor(who),
            &config,
            t(100 + i as i64),
        ) {
            Outcome::Accept { next, .. } => {
                winners.push(who);
                state = next;
            }
            Outcome::Reject { reason } => assert_eq!(reason, "already_claimed"),
        }
    }
    assert_eq!(winners, ["e1"]);
    assert_eq!(state.claim().unwrap().claimed_by, "e1");
}

#[test]
fn claim_without_an_executor_subject_is_rejected() {
    let anonymous = actor(Role::Executor, None);
    let reason = rejected(send(
        &fixture("PUBLISHED"),
        "claim",
        json!({}),
        &anonymous,
        &no_config(),
        t(99),
    ));
    assert_eq!(reason, "executor_identity_required");
}

#[test]
fn cancel_keeps_the_post_and_claim_for_the_record() {
    let (next, commands) = accepted(send(
        &fixture("CLAIMED"),
        "cancel",
        json!({ "reason": "client cancelled" }),
        &operator(),
        &no_config(),
        t(500),
    ));
    let DispatchState::Cancelled {
        post,
        claim,
        cancelled_at,
        reason,
        ..
    } = &next
    else {
        panic!("{next:?}");
    };
    assert_eq!(post.as_ref().unwrap().message_id, "m-1");
    assert_eq!(claim.as_ref().unwrap().claimed_by, "e1");
    assert_eq!(*cancelled_at, t(500));
    assert_eq!(reason.as_deref(), Some("client cancelled"));
    assert_eq!(
        commands,
        vec![
            Command::CancelTimer {
                name: CLAIM_TIMER.to_string(),
            },
            Command::Effect {
                name: effects::CREW_POST_CANCELLED.to_string(),
                idempotency_key: format!("{LEAD}:group_cancel_v1"),
                payload: json!({ "lead_id": LEAD, "short_id": SHORT_ID, "message_id": "m-1", "provider": "telegram", "chat_id": "crew-1" }),
                reply: None,
            },
            Command::Complete,
        ]
    );
}

#[test]
fn cancel_before_publication_finds_the_post_through_the_publish_key() {
    let (from_new, commands) = accepted(send(
        &fixture("NEW"),
        "cancel",
        json!({ "reason": "client cancelled" }),
        &operator(),
        &no_config(),
        t(5),
    ));
    let DispatchState::Cancelled {
        post,
        claim,
        cancelled_at,
        reason,
        ..
    } = &from_new
    else {
        panic!("{from_new:?}");
    };
    assert_eq!(*post, None, "nothing was published yet");
    assert_eq!(*claim, None);
    assert_eq!(*cancelled_at, t(5));
    assert_eq!(reason.as_deref(), Some("client cancelled"));
    // The publish may still be on its way: the cancel edit carries the publish
    // effect's key instead of a message id.
    assert_eq!(
        commands,
        vec![
            Command::CancelTimer {
                name: CLAIM_TIMER.to_string(),
            },
            Command::Effect {
                name: effects::CREW_POST_CANCELLED.to_string(),
                idempotency_key: format!("{LEAD}:group_cancel_v1"),
                payload: json!({ "lead_id": LEAD, "short_id": SHORT_ID, "publish_key": format!("{LEAD}:publish_v1") }),
                reply: None,
            },
            Command::Complete,
        ]
    );
    let (_, start_commands) = start_with(&start_input(Some(DEADLINE_S)), &no_config()).unwrap();
    let Command::Effect {
        idempotency_key: publish_key,
        ..
    } = &start_commands[0]
    else {
        panic!("{start_commands:?}");
    };
    assert_eq!(
        effect_named(&commands, effects::CREW_POST_CANCELLED).1["publish_key"],
        json!(publish_key),
        "publish_key is the start's publish effect key"
    );
}

#[test]
fn expire_records_when_the_post_expired() {
    let s = fixture("EXPIRED");
    let DispatchState::Expired {
        post, expired_at, ..
    } = &s
    else {
        panic!("{s:?}");
    };
    assert_eq!(post.message_id, "m-1");
    assert_eq!(post.deadline, t(POST_DEADLINE_AT));
    assert_eq!(*expired_at, t(POST_DEADLINE_AT));
}

#[test]
fn expire_applies_only_from_the_current_deadline_on() {
    let config = no_config();
    let published = fixture("PUBLISHED");
    let deadline = t(POST_DEADLINE_AT);

    for early in [t(10), t(TABLE_AT), deadline - Duration::seconds(1)] {
        let reason = rejected(send_canonical(&published, "expire", &config, early));
        assert_eq!(reason, "stale_timer", "expire at {early}");
    }

    for late in [deadline, deadline + Duration::seconds(500)] {
        let (next, commands) = accepted(send_canonical(&published, "expire", &config, late));
        let DispatchState::Expired {
            post, expired_at, ..
        } = &next
        else {
            panic!("expire at {late}: {next:?}");
        };
        assert_eq!(*expired_at, late);
        assert_eq!(post.deadline, deadline);
        assert_eq!(
            commands,
            vec![
                Command::Effect {
                    name: effects::CREW_POST_EXPIRED.to_string(),
                    idempotency_key: format!("{LEAD}:group_expire_v1"),
                    payload: json!({ "lead_id": LEAD, "short_id": SHORT_ID, "message_id": "m-1", "provider": "telegram", "chat_id": "crew-1" }),
                    reply: None,
                },
                Command::Complete,
            ],
            "expire at {late}"
        );
    }
}

// ---------------------------------------------------------- deadlines --

#[test]
fn claim_deadline_prefers_input_then_tenant_then_24h() {
    let tenant = json!({ "dispatch": { "claim_deadline_s": 7200 } });
    let cases = [
        (Some(600), tenant.clone(), 600),
        (None, tenant, 7200),
        (None, json!({ "dispatch": {} }), DEFAULT_CLAIM_DEADLINE_S),
        (None, no_config(), DEFAULT_CLAIM_DEADLINE_S),
    ];
    assert_eq!(DEFAULT_CLAIM_DEADLINE_S, 24 * 60 * 60);
    for (input, config, expected) in cases {
        let (state, _) = start_with(&start_input(input), &config).unwrap();
        assert_eq!(
            state.job().claim_deadline_s,
            expected,
            "input {input:?}, tenant {config}"
        );

        let (_, commands) = accepted(send_canonical(&state, "published", &config, t(10)));
        assert_eq!(
            summarize(&commands),
            vec![Cmd::SetTimer {
                name: CLAIM_TIMER.to_string(),
                at: t(10) + Duration::seconds(expected as i64),
                signal: "expire".to_string(),
            }],
            "input {input:?}, tenant {config}"
        );
    }
}

#[test]
fn reject_claim_rearms_a_full_window_and_reopens_the_post() {
    let config = no_config();
    let claimed = fixture("CLAIMED");
    let (reopened, commands) = accepted(send(
        &claimed,
        "reject_claim",
        json!({ "reason": "no van" }),
        &operator(),
        &config,
        t(2000),
    ));
    let fresh_deadline = t(2000) + Duration::seconds(DEADLINE_S as i64);
    let DispatchState::Published { post, job } = &reopened else {
        panic!("{reopened:?}");
    };
    assert_eq!(post.deadline, fresh_deadline);
    assert_eq!(post.published_at, t(10), "the post itself is the same");
    assert_eq!(post.message_id, "m-1");
    assert_eq!(job.claims, 1, "the claim count keys later effects");
    assert!(reopened.claim().is_none());
    assert_eq!(
        commands[0],
        Command::SetTimer {
            name: CLAIM_TIMER.to_string(),
            at: fresh_deadline,
            signal: "expire".to_string(),
        }
    );
    let (key, restored) = effect_named(&commands, effects::CREW_POST_RESTORED);
    assert_eq!(key, format!("{LEAD}:group_restore_v1:c1"));
    assert_eq!(
        restored,
        &json!({ "lead_id": LEAD, "short_id": SHORT_ID, "message_id": "m-1", "provider": "telegram", "chat_id": "crew-1" }),
        "the operator's reason stays out of the crew post edit"
    );

    // A second claim gets its own effect keys, and its rejection re-arms again.
    let (second, commands) = accepted(send(
        &reopened,
        "claim",
        json!({}),
        &executor("e2"),
        &config,
        t(2100),
    ));
    assert_eq!(second.claim().unwrap().claimed_by, "e2");
    assert_eq!(
        summarize(&commands),
        vec![
            disarm(),
            eff(effects::NOTIFY_OPERATOR_CLAIMED, "claim_notify_v1:c2"),
            eff(effects::CREW_POST_RESERVED, "group_edit_v1:c2"),
        ]
    );
    let (again, commands) = accepted(send_canonical(&second, "reject_claim", &config, t(3000)));
    assert_eq!(
        effect_named(&commands, effects::CREW_POST_RESTORED).0,
        format!("{LEAD}:group_restore_v1:c2")
    );
    assert!(commands.contains(&Command::SetTimer {
        name: CLAIM_TIMER.to_string(),
        at: t(3000) + Duration::seconds(DEADLINE_S as i64),
        signal: "expire".to_string(),
    }));

    // Timers armed for earlier windows (the first window ended at t(3610), the
    // second at t(5600)) fire late as no-ops, as does any expiry before the
    // current deadline.
    for stale in [t(POST_DEADLINE_AT), t(5600), t(6599)] {
        let reason = rejected(send_canonical(&again, "expire", &config, stale));
        assert_eq!(reason, "stale_timer", "expire at {stale}");
    }

    // The re-armed timer can still expire the job.
    let (expired, _) = accepted(send_canonical(&again, "expire", &config, t(6600)));
    assert_eq!(Dispatch::state_name(&expired), "EXPIRED");
}

// ------------------------------------------------------------ release --

#[test]
fn release_after_payment_sends_the_details_to_the_claimant() {
    let (next, commands) = accepted(send_canonical(
        &fixture("PAID"),
        "release",
        &no_config(),
        t(60),
    ));
    let DispatchState::DetailsReleased { release, claim, .. } = &next else {
        panic!("{next:?}");
    };
    assert_eq!(claim.claimed_by, "e1");
    assert_eq!(release.released_at, t(60));
    assert_eq!(release.released_by.as_deref(), Some("op1"));
    assert!(!release.early);
    assert_eq!(release.operator_confirmed_at, Some(t(30)));
    assert_eq!(release.paid_at, Some(t(50)));
    let (key, payload) = effect_named(&commands, effects::RELEASE_DETAILS);
    assert_eq!(key, format!("{LEAD}:release_v1"));
    assert_eq!(
        payload,
        &json!({ "lead_id": LEAD, "short_id": SHORT_ID, "to": "e1", "early": false })
    );
    assert_eq!(commands.last(), Some(&Command::Complete));
}

#[test]
fn paid_releases_automatically_when_the_tenant_says_so() {
    let config = auto_release_config(true);
    let invoiced = drive_to("INVOICE_SENT", &config);
    let webhook = actor(Role::Integration, Some("payments"));
    let (next, commands) = accepted(send(
        &invoiced,
        "paid",
        json!({}),
        &webhook,
        &config,
        t(500),
    ));
    let DispatchState::DetailsReleased { release, .. } = &next else {
        panic!("auto release did not release: {next:?}");
    };
    assert_eq!(release.released_by.as_deref(), Some("auto"));
    assert!(!release.early);
    assert_eq!(release.reason, None);
    assert_eq!(release.released_at, t(500));
    assert_eq!(release.paid_at, Some(t(500)));
    assert_eq!(release.operator_confirmed_at, Some(t(30)));
    assert_eq!(
        summarize(&commands),
        vec![eff(effects::RELEASE_DETAILS, "release_v1"), Cmd::Complete]
    );
    assert_eq!(
        effect_named(&commands, effects::RELEASE_DETAILS).1["to"],
        "e1"
    );
}

#[test]
fn paid_waits_for_a_release_when_auto_release_is_off() {
    let config = auto_release_config(false);
    let (next, commands) = accepted(send_canonical(
        &drive_to("INVOICE_SENT", &config),
        "paid",
        &config,
        t(500),
    ));
    assert_eq!(Dispatch::state_name(&next), "PAID");
    assert!(commands.is_empty());
}

#[test]
fn early_release_needs_a_reason_and_is_recorded_as_early() {
    let config = no_config();
    for state in ["CLAIMED", "OPERATOR_CONFIRMED", "INVOICE_SENT"] {
        let from = fixture(state);
        for blank in [
            json!({}),
            json!(null),
            json!({ "reason": "   " }),
            json!({ "reason": null }),
        ] {
            let reason = rejected(send(
                &from,
                "release",
                blank.clone(),
                &operator(),
                &config,
                t(500),
            ));
            assert_eq!(reason, "not_paid", "{state} release with {blank}");
        }

        let ops = actor(Role::Ops, Some("ops1"));
        let (next, commands) = accepted(send(
            &from,
            "release",
            json!({ "reason": "  client paid cash  " }),
            &ops,
            &config,
            t(500),
        ));
        let DispatchState::DetailsReleased { release, .. } = &next else {
            panic!("{state}: {next:?}");
        };
        assert!(release.early, "{state}");
        assert_eq!(release.reason.as_deref(), Some("client paid cash"));
        assert_eq!(release.released_by.as_deref(), Some("ops1"));
        assert_eq!(release.paid_at, None);
        let confirmed = (state != "CLAIMED").then(|| t(30));
        assert_eq!(release.operator_confirmed_at, confirmed, "{state}");
        let (key, payload) = effect_named(&commands, effects::RELEASE_DETAILS);
        assert_eq!(key, format!("{LEAD}:release_v1"));
        assert_eq!(payload["early"], true);
        assert_eq!(payload["to"], "e1");
    }
}

#[test]
fn release_with_a_reason_still_needs_a_claimant() {
    for state in ["NEW", "PUBLISHED"] {
        let reason = rejected(send(
            &fixture(state),
            "release",
            json!({ "reason": "urgent" }),
            &operator(),
            &no_config(),
            t(500),
        ));
        assert_eq!(reason, "not_claimed", "{state}");
    }
}

#[test]
fn pii_never_enters_state_or_commands() {
    let config = no_config();
    let (mut state, mut commands) = start_with(&start_input(Some(DEADLINE_S)), &config).unwrap();
    let path = [
        "published",
        "claim",
        "confirm",
        "invoice_sent",
        "paid",
        "release",
    ];
    for (i, signal) in path.into_iter().enumerate() {
        let text = format!("{}{}", json!(state), json!(commands));
        assert!(
            !text.contains("Canary"),
            "PII leaked before `{signal}`: {text}"
        );
        assert!(
            !text.contains("972501234567"),
            "PII leaked before `{signal}`: {text}"
        );
        (state, commands) = accepted(send_canonical(
            &state,
            signal,
            &config,
            t(10 * (i as i64 + 1)),
        ));
    }
    assert_eq!(Dispatch::state_name(&state), "DETAILS_RELEASED");
    let text = format!("{}{}", json!(state), json!(commands));
    assert!(!text.contains("Canary"), "PII leaked at release: {text}");
}

// ------------------------------------------------------------- parsing --

#[test]
fn unknown_signals_are_parse_errors() {
    for name in ["bogus", "", "CLAIM", "publish"] {
        assert_eq!(
            Dispatch::parse_signal(name, &json!({})).unwrap_err(),
            ParseError::UnknownSignal(name.to_string())
        );
    }
}

#[test]
fn malformed_payloads_are_parse_errors() {
    let bad = [
        ("claim", json!({ "bogus": 1 })),
        ("confirm", json!({ "bogus": 1 })),
        ("invoice_sent", json!({ "bogus": 1 })),
        ("paid", json!({ "amount": 100 })),
        ("expire", json!({ "bogus": 1 })),
        ("published", json!({})),
        ("published", json!({ "message_id": 42 })),
        (
            "published",
            json!({ "provider": "telegram", "chat_id": "crew-1" }),
        ),
        ("published", json!({ "message_id": null, "extra": true })),
        ("release", json!({ "reason": 5 })),
        ("release", json!({ "why": "x" })),
        ("reject_claim", json!({ "bogus": 1 })),
        ("cancel", json!("just a string")),
        ("claim", json!([1, 2])),
    ];
    for (name, payload) in bad {
        let err = Dispatch::parse_signal(name, &payload).unwrap_err();
        assert!(
            matches!(err, ParseError::InvalidPayload(_)),
            "`{name}` with {payload} gave {err:?}"
        );
    }
}

#[test]
fn published_ignores_unknown_fields_but_needs_a_message_id() {
    let signal = Dispatch::parse_signal(
        "published",
        &json!({
            "message_id": "m-9",
            "provider": "telegram",
            "chat_id": "crew-1",
            "date": 1767225600,
            "raw": { "ok": true },
        }),
    )
    .unwrap();
    assert_eq!(
        signal,
        DispatchSignal::Published {
            message_id: "m-9".to_string(),
            provider: Some("telegram".to_string()),
            chat_id: Some("crew-1".to_string()),
        }
    );
    let bare = Dispatch::parse_signal("published", &json!({ "message_id": "m-9", "extra": true }))
        .unwrap();
    assert_eq!(
        bare,
        DispatchSignal::Published {
            message_id: "m-9".to_string(),
            provider: None,
            chat_id: None,
        }
    );
    let err = Dispatch::parse_signal("published", &json!({ "extra": true })).unwrap_err();
    assert!(matches!(err, ParseError::InvalidPayload(_)), "{err:?}");
}

#[test]
fn empty_payloads_parse_for_signals_without_fields() {
    for name in SIGNALS.iter().filter(|n| **n != "published") {
        for payload in [json!(null), json!({})] {
            assert!(
                Dispatch::parse_signal(name, &payload).is_ok(),
                "`{name}` with {payload}"
            );
        }
    }
}

// --------------------------------------------------------------- start --

#[test]
fn start_rejects_a_key_that_is_not_a_uuid() {
    let integration = actor(Role::Integration, None);
    let config = no_config();
    let ctx = Ctx {
        now: t(0),
        tenant_config: &config,
        actor: &integration,
    };
    for key in ["lead-1", "", "0952ef82"] {
        let err = Dispatch::start(key, &start_input(None), &ctx).unwrap_err();
        assert!(
            matches!(err, ParseError::InvalidKey(_)),
            "{key:?} gave {err:?}"
        );
    }
}

#[test]
fn start_rejects_a_key_that_is_not_the_canonical_uuid_spelling() {
    let integration = actor(Role::Integration, None);
    let config = no_config();
    let ctx = Ctx {
        now: t(0),
        tenant_config: &config,
        actor: &integration,
    };
    // One lead, one workflow: other spellings of the same UUID are not keys.
    for key in [
        LEAD.to_uppercase(),
        "0952EF82-5b1c-4f3a-9d2e-7c4b1a0f6e11".to_string(),
        LEAD.replace('-', ""),
        format!("{{{LEAD}}}"),
        format!("urn:uuid:{LEAD}"),
        format!(" {LEAD}"),
    ] {
        let err = Dispatch::start(&key, &start_input(None), &ctx).unwrap_err();
        assert!(
            matches!(err, ParseError::InvalidKey(_)),
            "{key:?} gave {err:?}"
        );
    }
    let (state, _) = Dispatch::start(LEAD, &start_input(None), &ctx).unwrap();
    assert_eq!(state.job().lead_id, Uuid::parse_str(LEAD).unwrap());
}

#[test]
fn start_rejects_a_lead_id_that_differs_from_the_key() {
    let mut input = start_input(None);
    input["lead"]["id"] = json!("11111111-2222-4333-8444-555555555555");
    let err = start_with(&input, &no_config()).unwrap_err();
    assert!(matches!(err, ParseError::InvalidPayload(_)), "{err:?}");
}

#[test]
fn start_accepts_a_lead_without_an_id() {
    let mut input = start_input(None);
    input["lead"].as_object_mut().unwrap().remove("id");
    let (state, _) = start_with(&input, &no_config()).unwrap();
    assert_eq!(state.job().lead_id, Uuid::parse_str(LEAD).unwrap());
}

#[test]
fn start_rejects_an_out_of_range_deadline() {
    for bad in [0, 90 * 24 * 3600 + 1] {
        let err = start_with(&start_input(Some(bad)), &no_config()).unwrap_err();
        assert!(
            matches!(err, ParseError::InvalidPayload(_)),
            "{bad}: {err:?}"
        );
    }
    for good in [1, 90 * 24 * 3600] {
        let (state, _) = start_with(&start_input(Some(good)), &no_config()).unwrap();
        assert_eq!(state.job().claim_deadline_s, good);
    }
}

#[test]
fn start_rejects_malformed_input() {
    let bad = [
        json!({}),
        json!({ "lead": {}, "unexpected": 1 }),
        json!({ "lead": {}, "claim_deadline_s": "soon" }),
        json!({ "lead": {}, "claim_deadline_s": -5 }),
        json!(null),
    ];
    for input in bad {
        let err = start_with(&input, &no_config()).unwrap_err();
        assert!(
            matches!(err, ParseError::InvalidPayload(_)),
            "{input}: {err:?}"
        );
    }
}

// --------------------------------------------------------------- roles --

#[test]
fn allowed_roles_per_signal() {
    use Role::*;
    let expected: [(&str, &[Role]); 9] = [
        ("published", &[System]),
        ("claim", &[Executor]),
        ("reject_claim", &[Operator, Ops]),
        ("confirm", &[Operator, Ops]),
        ("invoice_sent", &[Operator, Ops]),
        ("paid", &[Operator, Ops, Integration]),
        ("release", &[Operator, Ops]),
        ("cancel", &[Operator, Ops]),
        ("expire", &[System]),
    ];
    for (signal, roles) in expected {
        let mut got = Dispatch::allowed_roles(signal).to_vec();
        let mut want = roles.to_vec();
        got.sort_by_key(|r| r.as_str());
        want.sort_by_key(|r| r.as_str());
        assert_eq!(got, want, "roles for `{signal}`");
    }
    assert!(Dispatch::allowed_roles("bogus").is_empty());
}

// ------------------------------------------------------------ registry --

#[test]
fn the_registry_applies_the_same_transition_on_json_state() {
    let registry = Registry::builtin();
    let dispatch = registry.get(Dispatch::KIND).expect("dispatch is built in");
    let config = no_config();
    let from = fixture("PUBLISHED");
    let e1 = executor("e1");
    let ctx = Ctx {
        now: t(TABLE_AT),
        tenant_config: &config,
        actor: &e1,
    };
    let transition = dispatch
        .apply(
            &serde_json::to_value(&from).unwrap(),
            "claim",
            &json!({}),
            &ctx,
        )
        .unwrap();
    let (next, commands) = accepted(send(&from, "claim", json!({}), &e1, &config, t(TABLE_AT)));
    assert_eq!(
        transition,
        workflows::Transition::Accept {
            state: serde_json::to_value(&next).unwrap(),
            state_name: "CLAIMED",
            is_final: false,
            commands,
        }
    );
}
