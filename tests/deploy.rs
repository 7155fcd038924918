//! Deploying and evolving: which workflows a process serves, per-tenant
//! switches at run time, and in-flight workflow versioning.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use dispatch::engine::SignalIn;
use dispatch::store;
use dispatch::workflows::{Actor, Command, Ctx, Outcome, ParseError, Registry, Role, Workflow};
use dispatch::{Engine, ProcessRole};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

async fn readyz(app: &TestApp) -> Value {
    app.http
        .get(format!("{}/readyz", app.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_kind_no_process_serves_waits_and_completes_once_one_starts() {
    let app = TestApp::spawn_with(ProcessRole::All, |s| {
        s.enabled_workflows = Some(vec!["dispatch".into()])
    })
    .await;
    app.set_config(json!({"dispatch": {"crew": {"enabled": true}}}))
        .await;
    let lead = Uuid::new_v4().to_string();
    let (code, body) = app
        .start(
            &app.keys.integration,
            "lead_finalization",
            &lead,
            lead_input(None),
        )
        .await;
    assert_eq!(
        (code, body["state"].as_str()),
        (201, Some("FINALIZED")),
        "accepted although unserved: {body}"
    );
    // The dispatch workflow it started is served here and publishes.
    app.wait_state(&lead, "PUBLISHED").await;
    let served = wait_for(
        Duration::from_secs(20),
        "readyz to list the kinds",
        || async {
            let r = readyz(&app).await;
            (r["workflows"]["dispatch"] == "served").then_some(r)
        },
    )
    .await;
    assert_eq!(served["workflows"]["lead_finalization"], "unserved");
    // Lead finalization's own effects wait: no process runs them.
    let pending = || async {
        sqlx::query_as::<_, (i64,)>("select count(*) from effects e join workflows w on w.id = e.workflow_id where w.kind = 'lead_finalization' and e.status in ('pending', 'running')")
            .fetch_one(&app.pool)
            .await
            .unwrap()
            .0
    };
    assert_eq!(pending().await, 2);
    assert!(app
        .deliveries()
        .await
        .iter()
        .all(|d| !d.0.ends_with("operator_full_v1")));

    // A worker serving lead finalization starts: the waiting work completes.
    let mut settings = test_settings(&app.db_url);
    settings.enabled_workflows = Some(vec!["lead_finalization".into()]);
    let pool = store::connect(&app.db_url, 20).await.unwrap();
    let worker = dispatch::launch(&settings, pool, ProcessRole::Worker, None)
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        "lead finalization effects to run",
        || async { (pending().await == 0).then_some(()) },
    )
    .await;
    let keys: Vec<String> = app.deliveries().await.into_iter().map(|d| d.0).collect();
    assert!(
        keys.contains(&format!("{lead}:operator_full_v1"))
            && keys.contains(&format!("{lead}:crew_fallback_v1")),
        "{keys:?}"
    );
    wait_for(
        Duration::from_secs(20),
        "readyz to list lead finalization as served",
        || async {
            (readyz(&app).await["workflows"]["lead_finalization"] == "served").then_some(())
        },
    )
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn a_tenant_switch_takes_effect_at_once_and_spares_running_workflows() {
    let app = TestApp::spawn().await;
    let running = Uuid::new_v4().to_string();
    assert_eq!(
        app.start(
            &app.keys.integration,
            "dispatch",
            &running,
            lead_input(None)
        )
        .await
        .0,
        201
    );
    app.wait_state(&running, "PUBLISHED").await;
    let put = |cfg: Value| {
        let r = app
            .http
            .put(format!("{}/v1/tenants/acme/config", app.url))
            .bearer_auth(&app.keys.ops)
            .json(&cfg)
            .send();
        async move { r.await.unwrap().status().as_u16() }
    };
    assert_eq!(put(json!({"flags": {"dispatch": false}})).await, 200);
    let (code, body) = app
        .start(
            &app.keys.integration,
            "dispatch",
            &Uuid::new_v4().to_string(),
            lead_input(None),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (409, Some("layer_disabled"))
    );
    // Lead finalization still notifies the operator but starts no dispatch.
    assert_eq!(
        put(json!({"flags": {"dispatch": false}, "dispatch": {"crew": {"enabled": true}}})).await,
        200
    );
    let lead = Uuid::new_v4().to_string();
    assert_eq!(
        app.start(
            &app.keys.integration,
            "lead_finalization",
            &lead,
            lead_input(None)
        )
        .await
        .0,
        201
    );
    app.wait_effects_settled().await;
    assert_eq!(
        app.get(&app.keys.operator, &lead).await.0,
        404,
        "no dispatch while switched off"
    );
    // The running workflow keeps its guarantees.
    let (_, body) = app
        .signal(
            &app.keys.executor,
            &running,
            "c1",
            "claim",
            json!({}),
            Some(10_000),
        )
        .await;
    assert_eq!(body["state"], "CLAIMED");
    assert_eq!(
        put(json!({"flags": {"nope": true}})).await,
        422,
        "unknown kinds are refused"
    );
    assert_eq!(put(json!({"flags": {"dispatch": true}})).await, 200);
    assert_eq!(
        app.start(
            &app.keys.integration,
            "dispatch",
            &Uuid::new_v4().to_string(),
            lead_input(None)
        )
        .await
        .0,
        201
    );
}

// A tiny workflow in two versions, as an old and a new binary would have it.
// v1 state: {"state": "OPEN", "count": n}; v2 moves the count into a tally.

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
enum V1 {
    Open { count: u32 },
    Done { count: u32 },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Tally {
    count: u32,
    goal: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
enum V2 {
    Open { tally: Tally },
    Done { tally: Tally },
}

struct CounterV1;
struct CounterV2;

fn bump() -> Result<(), ParseError> {
    Ok(())
}

impl Workflow for CounterV1 {
    const KIND: &'static str = "counter";
    type State = V1;
    type Signal = ();
    fn start(_: &str, _: &Value, _: &Ctx<'_>) -> Result<(V1, Vec<Command>), ParseError> {
        Ok((V1::Open { count: 0 }, vec![]))
    }
    fn parse_signal(name: &str, _: &Value) -> Result<(), ParseError> {
        if name == "bump" {
            bump()
        } else {
            Err(ParseError::UnknownSignal(name.into()))
        }
    }
    fn allowed_roles(_: &str) -> &'static [Role] {
        &[Role::Operator]
    }
    fn on_signal(s: &V1, _: (), _: &Ctx<'_>) -> Outcome<V1> {
        match s {
            V1::Open { count } => Outcome::Accept {
                next: V1::Open { count: count + 1 },
                commands: vec![],
            },
            V1::Done { .. } => Outcome::reject("final_state"),
        }
    }
    fn state_name(s: &V1) -> &'static str {
        match s {
            V1::Open { .. } => "OPEN",
            V1::Done { .. } => "DONE",
        }
    }
    fn is_final(s: &V1) -> bool {
        matches!(s, V1::Done { .. })
    }
}

impl Workflow for CounterV2 {
    const KIND: &'static str = "counter";
    const VERSION: u32 = 2;
    type State = V2;
    type Signal = ();
    fn start(_: &str, _: &Value, _: &Ctx<'_>) -> Result<(V2, Vec<Command>), ParseError> {
        Ok((
            V2::Open {
                tally: Tally { count: 0, goal: 3 },
            },
            vec![],
        ))
    }
    fn parse_signal(name: &str, p: &Value) -> Result<(), ParseError> {
        CounterV1::parse_signal(name, p)
    }
    fn allowed_roles(_: &str) -> &'static [Role] {
        &[Role::Operator]
    }
    fn on_signal(s: &V2, _: (), _: &Ctx<'_>) -> Outcome<V2> {
        match s {
            V2::Open { tally } if tally.count + 1 >= tally.goal => Outcome::Accept {
                next: V2::Done {
                    tally: Tally {
                        count: tally.count + 1,
                        ..tally.clone()
                    },
                },
                commands: vec![Command::Complete],
            },
            V2::Open { tally } => Outcome::Accept {
                next: V2::Open {
                    tally: Tally {
                        count: tally.count + 1,
                        ..tally.clone()
                    },
                },
                commands: vec![],
            },
            V2::Done { .. } => Outcome::reject("final_state"),
        }
    }
    fn state_name(s: &V2) -> &'static str {
        match s {
            V2::Open { .. } => "OPEN",
            V2::Done { .. } => "DONE",
        }
    }
    fn is_final(s: &V2) -> bool {
        matches!(s, V2::Done { .. })
    }
    fn upcast(from: u32, state: Value) -> Result<Value, String> {
        match from {
            1 => {
                let old: V1 =
                    serde_json::from_value(state).map_err(|e| format!("not a v1 counter: {e}"))?;
                Ok(serde_json::to_value(match old {
                    V1::Open { count } => V2::Open {
                        tally: Tally { count, goal: 3 },
                    },
                    V1::Done { count } => V2::Done {
                        tally: Tally { count, goal: count },
                    },
                })
                .unwrap())
            }
            v => Err(format!("no upcaster from version {v}")),
        }
    }
}

async fn drive(engine: &Engine, tenant: Uuid, key: &str, idem: &str) -> String {
    let actor = Actor {
        role: Role::Operator,
        subject: Some("op-1".into()),
    };
    let answer = engine
        .signal(SignalIn::new(
            tenant,
            "counter",
            key,
            idem,
            "bump",
            &json!({}),
            &actor,
        ))
        .await
        .unwrap();
    let row: (Uuid,) = sqlx::query_as("select workflow_id from signals where id = $1")
        .bind(answer.signal_id)
        .fetch_one(engine.pool())
        .await
        .unwrap();
    engine.apply_pending(tenant, row.0).await.unwrap();
    engine
        .signal_answer(tenant, answer.signal_id)
        .await
        .unwrap()
        .state
        .unwrap()
}

#[tokio::test]
async fn in_flight_workflows_migrate_to_a_new_definition_as_data() {
    let db = fresh_database().await;
    let pool = store::connect(&db, 10).await.unwrap();
    let keys = make_tenant(&pool, "acme").await;
    let tenant = keys.tenant_id;
    let ops = Actor {
        role: Role::Operator,
        subject: Some("op-1".into()),
    };
    // The old binary starts four counters and bumps them once.
    let old = Engine::new(
        pool.clone(),
        Arc::new(Registry::new().with::<CounterV1>()),
        Default::default(),
    );
    for k in ["a", "b", "c", "broken"] {
        old.start(&ops, tenant, "counter", k, &json!({}))
            .await
            .unwrap();
        assert_eq!(drive(&old, tenant, k, &format!("{k}-1")).await, "OPEN");
    }
    sqlx::query("update workflows set state = '{\"state\": \"OPEN\", \"count\": \"many\"}' where key = 'broken'").execute(&pool).await.unwrap();

    // The new binary: a dry run first shows what would change and writes nothing.
    let new = Engine::new(
        pool.clone(),
        Arc::new(Registry::new().with::<CounterV2>()),
        Default::default(),
    );
    let dry = new
        .migrate_workflows("counter", 2, true, 2, "tally counts")
        .await
        .unwrap();
    assert_eq!((dry.migrated, dry.failed.len()), (3, 1));
    assert_eq!(dry.failed[0].1, "broken");
    let (v1,): (i64,) = sqlx::query_as("select count(*) from workflows where def_version = 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(v1, 4, "a dry run writes nothing");
    assert!(
        new.migrate_workflows("counter", 3, true, 2, "x")
            .await
            .is_err(),
        "only to this binary's version"
    );

    // Migrate for real, in batches of 2.
    let report = new
        .migrate_workflows("counter", 2, false, 2, "tally counts")
        .await
        .unwrap();
    assert_eq!((report.migrated, report.failed.len()), (3, 1), "{report:?}");
    // An old binary still running during the roll starts one more v1 instance;
    // it is upcast lazily on its next signal.
    old.start(&ops, tenant, "counter", "d", &json!({}))
        .await
        .unwrap();
    assert_eq!(drive(&old, tenant, "d", "d-1").await, "OPEN");
    let rows: Vec<(String, i32, Value)> =
        sqlx::query_as("select key, def_version, state from workflows order by key")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        rows[0],
        (
            "a".into(),
            2,
            json!({"state": "OPEN", "tally": {"count": 1, "goal": 3}})
        )
    );
    assert_eq!(rows[2].0, "broken");
    assert_eq!(rows[2].1, 1, "listed, not broken");
    let audit: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "select w.key, h.actor_role, h.reason from history h join workflows w on w.id = h.workflow_id where h.event = 'migrated' order by w.key",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(audit.len(), 3);
    assert_eq!((audit[0].0.as_str(), audit[0].1.as_str()), ("a", "ops"));
    assert_eq!(
        audit[0].2.as_deref(),
        Some("definition v1 -> v2: tally counts")
    );

    // The migrated instances, and the lazily upcast one, finish their lifecycle under v2.
    for k in ["a", "b", "c", "d"] {
        assert_eq!(drive(&new, tenant, k, &format!("{k}-2")).await, "OPEN");
        assert_eq!(drive(&new, tenant, k, &format!("{k}-3")).await, "DONE");
    }
    let (done,): (i64,) = sqlx::query_as(
        "select count(*) from workflows where status = 'completed' and def_version = 2",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(done, 4);
    let (upcasts,): (i64,) = sqlx::query_as("select count(*) from history h join workflows w on w.id = h.workflow_id where w.key = 'd' and h.event = 'upcast'").fetch_one(&pool).await.unwrap();
    assert_eq!(upcasts, 1);
    // The broken one is flagged for ops when a signal arrives, and its signal waits.
    let actor = Actor {
        role: Role::Operator,
        subject: None,
    };
    let a = new
        .signal(SignalIn::new(
            tenant,
            "counter",
            "broken",
            "broken-2",
            "bump",
            &json!({}),
            &actor,
        ))
        .await
        .unwrap();
    let wf: (Uuid,) = sqlx::query_as("select id from workflows where key = 'broken'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(new.apply_pending(tenant, wf.0).await.is_err());
    assert_eq!(
        new.signal_answer(tenant, a.signal_id).await.unwrap().status,
        "queued"
    );
    let (attention,): (Option<String>,) =
        sqlx::query_as("select attention from workflows where key = 'broken'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(attention.unwrap().contains("cannot be upcast"));
}

/// Batched apply (group commit): one transaction applies many workflows'
/// queued signals, each in arrival order; a workflow this binary cannot read
/// is rolled back alone, flagged, and passed over by the next batches (no hot
/// loop), while one that only has a dead-lettered effect keeps applying.
#[tokio::test]
async fn one_batch_applies_many_workflows_and_isolates_one_that_cannot_advance() {
    let db = fresh_database().await;
    let pool = store::connect(&db, 10).await.unwrap();
    let keys = make_tenant(&pool, "acme").await;
    let tenant = keys.tenant_id;
    let ops = Actor {
        role: Role::Operator,
        subject: Some("op-1".into()),
    };
    let engine = Engine::new(
        pool.clone(),
        Arc::new(Registry::new().with::<CounterV1>()),
        Default::default(),
    );
    let keys: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
    for k in keys
        .iter()
        .chain(["broken".to_string(), "noted".to_string()].iter())
    {
        engine
            .start(&ops, tenant, "counter", k, &json!({}))
            .await
            .unwrap();
        // Two signals each: both must apply, in order, in the same batch.
        for n in 1..=2 {
            engine
                .signal(SignalIn::new(
                    tenant,
                    "counter",
                    k,
                    &format!("{k}-{n}"),
                    "bump",
                    &json!({}),
                    &ops,
                ))
                .await
                .unwrap();
        }
    }
    sqlx::query("update workflows set state = '{\"state\": \"OPEN\", \"count\": \"many\"}' where key = 'broken'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("update workflows set attention = 'effect `x` dead-lettered' where key = 'noted'")
        .execute(&pool)
        .await
        .unwrap();
    let kinds = vec!["counter".to_string()];
    let applied_workflows = engine.apply_batch(&kinds, 32).await.unwrap();
    assert_eq!(
        applied_workflows, 11,
        "all twelve claimed in one batch; the unreadable one rolled back alone"
    );
    let (applied,): (i64,) =
        sqlx::query_as("select count(*) from signals where status = 'applied'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(applied, 22, "both signals of the 11 readable workflows");
    let versions: Vec<(String, i64)> =
        sqlx::query_as("select key, version from workflows order by key")
            .fetch_all(&pool)
            .await
            .unwrap();
    for (k, v) in &versions {
        assert_eq!(*v, if k == "broken" { 0 } else { 2 }, "{k}");
    }
    let (attention,): (Option<String>,) =
        sqlx::query_as("select attention from workflows where key = 'broken'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(attention
        .unwrap()
        .starts_with(dispatch::engine::CANNOT_ADVANCE));
    let (waiting,): (i64,) = sqlx::query_as(
        "select count(*) from signals s join workflows w on w.id = s.workflow_id where w.key = 'broken' and s.status = 'queued'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(waiting, 2, "its signals wait for a migration");
    // The next batch passes it over: nothing to claim, nothing written.
    let flagged_at = |pool: sqlx::PgPool| async move {
        let (t,): (chrono::DateTime<chrono::Utc>,) =
            sqlx::query_as("select updated_at from workflows where key = 'broken'")
                .fetch_one(&pool)
                .await
                .unwrap();
        t
    };
    let before = flagged_at(pool.clone()).await;
    assert_eq!(engine.apply_batch(&kinds, 32).await.unwrap(), 0);
    assert_eq!(
        flagged_at(pool.clone()).await,
        before,
        "not retried in a hot loop"
    );
}
