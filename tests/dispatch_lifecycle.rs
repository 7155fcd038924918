//! The dispatch lifecycle over real HTTP against a real PostgreSQL.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use dispatch::workflows::Role;
use dispatch::ProcessRole;
use serde_json::{json, Value};
use uuid::Uuid;

async fn published(app: &TestApp, deadline_s: Option<u64>) -> String {
    let lead = Uuid::new_v4().to_string();
    let (code, body) = app
        .start(
            &app.keys.integration,
            "dispatch",
            &lead,
            lead_input(deadline_s),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["state"], "NEW");
    app.wait_state(&lead, "PUBLISHED").await;
    lead
}

async fn step(
    app: &TestApp,
    key: &str,
    lead: &str,
    name: &str,
    payload: Value,
    expect_state: &str,
) {
    let (code, body) = app
        .signal(
            key,
            lead,
            &format!("{name}-{}", Uuid::new_v4()),
            name,
            payload,
            Some(10_000),
        )
        .await;
    assert_eq!(code, 200, "{name}: {body}");
    assert_eq!(body["status"], "applied", "{name}: {body}");
    assert_eq!(body["state"], expect_state, "{name}: {body}");
}

#[tokio::test]
async fn happy_path_reaches_details_released_with_every_effect_delivered() {
    let app = TestApp::spawn().await;
    let lead = published(&app, None).await;
    walk_to_details_released(&app, &lead).await;
}

#[tokio::test]
async fn the_moving_product_runs_on_a_worker_serving_only_its_kinds() {
    // ENABLED_WORKFLOWS=dispatch,lead_finalization: a lead is finalized, its
    // dispatch published to the crew, claimed, paid and released.
    let app = TestApp::spawn_with(ProcessRole::All, |s| {
        s.enabled_workflows = Some(vec!["dispatch".into(), "lead_finalization".into()])
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
        "{body}"
    );
    app.wait_state(&lead, "PUBLISHED").await;
    walk_to_details_released(&app, &lead).await;
    let keys: Vec<String> = app.deliveries().await.into_iter().map(|d| d.0).collect();
    assert!(
        keys.contains(&format!("{lead}:operator_full_v1")),
        "lead finalization's own effect ran here: {keys:?}"
    );
}

/// Claim, confirm, invoice, pay and release a published job; every effect
/// delivered once, and the client's details only in the release.
async fn walk_to_details_released(app: &TestApp, lead: &str) {
    let lead = lead.to_string();
    let ops = app.keys.operator.clone();
    step(
        app,
        &app.keys.executor,
        &lead,
        "claim",
        json!({}),
        "CLAIMED",
    )
    .await;
    step(app, &ops, &lead, "confirm", json!({}), "OPERATOR_CONFIRMED").await;
    step(app, &ops, &lead, "invoice_sent", json!({}), "INVOICE_SENT").await;
    step(app, &app.keys.integration, &lead, "paid", json!({}), "PAID").await;
    step(app, &ops, &lead, "release", json!({}), "DETAILS_RELEASED").await;
    app.wait_effects_settled().await;

    let (_, wf) = app.get(&ops, &lead).await;
    assert_eq!(wf["status"], "completed");
    assert_eq!(wf["data"]["claim"]["claimed_by"], "executor-1");
    assert_eq!(wf["data"]["release"]["early"], false);
    assert!(
        wf["pending_timers"].as_array().unwrap().is_empty(),
        "claim cancelled the deadline timer"
    );
    let events: Vec<&str> = wf["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["started", "applied", "applied", "applied", "applied", "applied", "applied"]
    );

    let deliveries = app.deliveries().await;
    let keys: Vec<String> = deliveries.iter().map(|d| d.0.clone()).collect();
    for suffix in [
        "publish_v1",
        "claim_notify_v1:c1",
        "group_edit_v1:c1",
        "release_v1",
    ] {
        let want = format!("{lead}:{suffix}");
        assert_eq!(
            keys.iter().filter(|k| **k == want).count(),
            1,
            "{want} delivered once in {keys:?}"
        );
    }
    let body_of = |suffix: &str| {
        deliveries
            .iter()
            .find(|d| d.0 == format!("{lead}:{suffix}"))
            .unwrap()
    };
    let publish = body_of("publish_v1");
    assert_eq!(publish.1, "crew");
    assert!(
        publish.2.contains(&format!("Job #{}", &lead[..8])),
        "{}",
        publish.2
    );
    assert!(
        publish.2.contains("Route: Haifa → Kiryat Ata"),
        "{}",
        publish.2
    );
    for canary in CANARIES {
        // The release and the operator's own copy (lead finalization) carry them.
        for d in deliveries
            .iter()
            .filter(|d| !d.0.ends_with("release_v1") && !d.0.ends_with("operator_full_v1"))
        {
            assert!(
                !d.2.contains(canary),
                "{canary} leaked into {}: {}",
                d.0,
                d.2
            );
        }
    }
    assert!(body_of("group_edit_v1:c1")
        .2
        .contains("Reserved by @executor-1"));
    let release = body_of("release_v1");
    assert_eq!(release.1, "executor:executor-1");
    assert!(release.2.contains("Canary Clientname") && release.2.contains("12 Canary Street"));
}

#[tokio::test]
async fn fifty_concurrent_claims_have_exactly_one_winner() {
    let app = TestApp::spawn().await;
    let lead = published(&app, None).await;
    let mut keys = Vec::new();
    for i in 0..50 {
        keys.push(
            app.key(
                app.keys.tenant_id,
                Role::Executor,
                Some(&format!("exec-{i}")),
            )
            .await,
        );
    }
    let claims = keys.iter().enumerate().map(|(i, key)| {
        let app = &app;
        let lead = lead.clone();
        async move {
            app.signal(
                key,
                &lead,
                &format!("claim-{i}"),
                "claim",
                json!({}),
                Some(20_000),
            )
            .await
        }
    });
    let answers = futures::future::join_all(claims).await;
    let applied: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, (_, b))| b["status"] == "applied")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(applied.len(), 1, "exactly one winner: {answers:?}");
    for (code, body) in answers.iter().filter(|(_, b)| b["status"] != "applied") {
        assert_eq!(*code, 200);
        assert_eq!(body["status"], "rejected");
        assert_eq!(body["reason"], "already_claimed");
    }
    let (_, wf) = app.get(&app.keys.operator, &lead).await;
    assert_eq!(wf["state"], "CLAIMED");
    assert_eq!(
        wf["data"]["claim"]["claimed_by"],
        format!("exec-{}", applied[0])
    );
    app.wait_effects_settled().await;
    let edits = app
        .deliveries()
        .await
        .into_iter()
        .filter(|d| d.0.contains("group_edit"))
        .count();
    assert_eq!(edits, 1, "one Reserved edit");
}

#[tokio::test]
async fn one_signal_delivered_twenty_times_applies_once() {
    let app = TestApp::spawn().await;
    let lead = published(&app, None).await;
    let sends = (0..20).map(|_| {
        app.signal(
            &app.keys.executor,
            &lead,
            "dup-claim",
            "claim",
            json!({}),
            None,
        )
    });
    let answers = futures::future::join_all(sends).await;
    let ids: HashSet<String> = answers
        .iter()
        .map(|(_, b)| b["signal_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "every replay answers with the first signal: {answers:?}"
    );
    for (code, _) in &answers {
        assert!(*code == 202 || *code == 200);
    }
    app.wait_state(&lead, "CLAIMED").await;
    app.wait_effects_settled().await;
    // A replay after the outcome answers with the outcome.
    let (code, body) = app
        .signal(
            &app.keys.executor,
            &lead,
            "dup-claim",
            "claim",
            json!({}),
            None,
        )
        .await;
    assert_eq!((code, &body["status"]), (200, &json!("applied")));
    // The same key with another body is refused and stores nothing.
    let (code, body) = app
        .signal(
            &app.keys.executor,
            &lead,
            "dup-claim",
            "claim",
            json!(null),
            None,
        )
        .await;
    assert_eq!(
        code, 200,
        "null payload is the same request as an empty one? {body}"
    );
    let (code, body) = app
        .signal(
            &app.keys.operator,
            &lead,
            "dup-claim",
            "confirm",
            json!({}),
            None,
        )
        .await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"]["code"], "idempotency_key_reused");

    let (transitions,): (i64,) = sqlx::query_as(
        "select count(*) from history where signal_name = 'claim' and event = 'applied'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(transitions, 1);
    let (signals,): (i64,) = sqlx::query_as("select count(*) from signals where name = 'claim'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(signals, 1);
    let notices = app
        .deliveries()
        .await
        .into_iter()
        .filter(|d| d.0.contains("claim_notify"))
        .count();
    assert_eq!(notices, 1, "one effect");
}

#[tokio::test]
async fn an_unclaimed_job_expires_by_its_timer() {
    let app = TestApp::spawn().await;
    let lead = published(&app, Some(1)).await;
    let wf = app.wait_state(&lead, "EXPIRED").await;
    assert_eq!(wf["status"], "completed");
    let fired = wf["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["signal_name"] == "expire")
        .unwrap()
        .clone();
    assert_eq!(fired["actor_role"], "system");
    app.wait_effects_settled().await;
    assert!(app
        .deliveries()
        .await
        .iter()
        .any(|d| d.0 == format!("{lead}:group_expire_v1")));
    // A claim after expiry is refused.
    let (_, body) = app
        .signal(
            &app.keys.executor,
            &lead,
            "late",
            "claim",
            json!({}),
            Some(5_000),
        )
        .await;
    assert_eq!(
        (body["status"].as_str(), body["reason"].as_str()),
        (Some("rejected"), Some("final_state"))
    );
}

#[tokio::test]
async fn a_claim_cancels_the_timer_and_a_rejected_claim_rearms_it() {
    let app = TestApp::spawn().await;
    let lead = published(&app, Some(2)).await;
    step(
        &app,
        &app.keys.executor,
        &lead,
        "claim",
        json!({}),
        "CLAIMED",
    )
    .await;
    let (_, wf) = app.get(&app.keys.operator, &lead).await;
    assert!(wf["pending_timers"].as_array().unwrap().is_empty());
    step(
        &app,
        &app.keys.operator,
        &lead,
        "reject_claim",
        json!({"reason": "no van"}),
        "PUBLISHED",
    )
    .await;
    let (_, wf) = app.get(&app.keys.operator, &lead).await;
    assert_eq!(
        wf["pending_timers"].as_array().unwrap().len(),
        1,
        "re-armed: {wf}"
    );
    let wf = app.wait_state(&lead, "EXPIRED").await;
    let expires = wf["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["signal_name"] == "expire")
        .count();
    assert_eq!(expires, 1, "the cancelled first timer never fired");
}

#[tokio::test]
async fn roles_and_tenants_are_enforced() {
    let app = TestApp::spawn().await;
    let lead = published(&app, None).await;
    step(
        &app,
        &app.keys.executor,
        &lead,
        "claim",
        json!({}),
        "CLAIMED",
    )
    .await;

    // An executor cannot release (or confirm); nothing is stored for the refused signal.
    for name in ["release", "confirm"] {
        let (code, body) = app
            .signal(
                &app.keys.executor,
                &lead,
                &format!("x-{name}"),
                name,
                json!({}),
                None,
            )
            .await;
        assert_eq!(code, 403, "{body}");
        assert_eq!(body["error"]["code"], "forbidden");
    }
    let (n,): (i64,) =
        sqlx::query_as("select count(*) from signals where idempotency_key like 'x-%'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(n, 0);

    // An operator can release before payment only as an explicit, reasoned override.
    let (_, body) = app
        .signal(
            &app.keys.operator,
            &lead,
            "r1",
            "release",
            json!({}),
            Some(5_000),
        )
        .await;
    assert_eq!(
        (body["status"].as_str(), body["reason"].as_str()),
        (Some("rejected"), Some("not_paid"))
    );
    let (_, body) = app
        .signal(
            &app.keys.operator,
            &lead,
            "r2",
            "release",
            json!({"reason": "client asked by phone"}),
            Some(5_000),
        )
        .await;
    assert_eq!(body["state"], "DETAILS_RELEASED", "{body}");
    let (_, wf) = app.get(&app.keys.operator, &lead).await;
    assert_eq!(wf["data"]["release"]["early"], true);
    assert_eq!(wf["data"]["release"]["released_by"], "op-1");
    let audit = wf["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["signal_name"] == "release" && e["event"] == "applied")
        .unwrap()
        .clone();
    assert_eq!(
        (
            audit["actor_role"].as_str(),
            audit["actor_subject"].as_str()
        ),
        (Some("operator"), Some("op-1"))
    );

    // The start input (personal data) is shown to operators only.
    assert!(wf["input"]["lead"]["client"]["name"].is_string());
    let (_, as_exec) = app.get(&app.keys.executor, &lead).await;
    assert!(as_exec.get("input").is_none(), "{as_exec}");
    assert!(!as_exec.to_string().contains("Canary"));

    // No key, a bad key: 401. Another tenant: 404.
    let r = app
        .http
        .get(format!("{}/v1/workflows/dispatch/{lead}", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (code, _) = app.get("dsp_not_a_key", &lead).await;
    assert_eq!(code, 401);
    let other = make_tenant(&app.pool, "other").await;
    let (code, body) = app.get(&other.operator, &lead).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (code, _) = app
        .signal(&other.operator, &lead, "o1", "cancel", json!({}), None)
        .await;
    assert_eq!(code, 404);
    // Executors cannot start workflows.
    let (code, _) = app
        .start(
            &app.keys.executor,
            "dispatch",
            &Uuid::new_v4().to_string(),
            lead_input(None),
        )
        .await;
    assert_eq!(code, 403);
}

#[tokio::test]
async fn creating_a_workflow_is_idempotent_on_kind_and_key() {
    let app = TestApp::spawn().await;
    let lead = Uuid::new_v4().to_string();
    let (c1, b1) = app
        .start(&app.keys.integration, "dispatch", &lead, lead_input(None))
        .await;
    let (c2, b2) = app
        .start(&app.keys.integration, "dispatch", &lead, lead_input(None))
        .await;
    assert_eq!((c1, c2), (201, 200));
    assert_eq!(b1["id"], b2["id"]);
    let (c3, b3) = app
        .start(
            &app.keys.integration,
            "dispatch",
            &lead,
            lead_input(Some(60)),
        )
        .await;
    assert_eq!(
        (c3, b3["error"]["code"].as_str()),
        (409, Some("workflow_exists"))
    );
    app.wait_state(&lead, "PUBLISHED").await;
    app.wait_effects_settled().await;
    assert_eq!(app.deliveries().await.len(), 1, "one publish");
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_stores_nothing() {
    let app = TestApp::spawn().await;
    let key = app.keys.integration.clone();
    let post_raw = |path: &str, body: &'static str, idem: Option<&'static str>| {
        let mut r = app
            .http
            .post(format!("{}{path}", app.url))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body);
        if let Some(i) = idem {
            r = r.header("Idempotency-Key", i);
        }
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let lead = Uuid::new_v4().to_string();
    let cases: Vec<(u16, &str, Value)> = vec![
        (
            400,
            "malformed_json",
            post_raw("/v1/workflows", "{not json", None).await.1,
        ),
        (
            422,
            "invalid_body",
            post_raw("/v1/workflows", r#"{"kind": "dispatch"}"#, None)
                .await
                .1,
        ),
        (
            404,
            "unknown_kind",
            app.start(&key, "nope", &lead, json!({})).await.1,
        ),
        (
            422,
            "invalid_key",
            app.start(&key, "dispatch", "not-a-uuid", lead_input(None))
                .await
                .1,
        ),
        (
            422,
            "invalid_payload",
            app.start(&key, "dispatch", &lead, json!({"lead": {"date": "soon"}}))
                .await
                .1,
        ),
        (
            422,
            "invalid_payload",
            app.start(
                &key,
                "dispatch",
                &lead,
                json!({"lead": {}, "claim_deadline_s": 0}),
            )
            .await
            .1,
        ),
    ];
    for (code, want, body) in &cases {
        assert_eq!(
            body["error"]["code"], *want,
            "expected {code} {want}: {body}"
        );
        assert!(body["error"]["message"].is_string());
    }
    assert_eq!(post_raw("/v1/workflows", "{not json", None).await.0, 400);
    let (n,): (i64,) = sqlx::query_as("select count(*) from workflows")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing stored for bad starts");

    let lead = published(&app, None).await;
    let path = format!("/v1/workflows/dispatch/{lead}/signals");
    let (code, body) = post_raw(&path, r#"{"name": "claim"}"#, None).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("idempotency_key_required"))
    );
    let long: &'static str = "k".repeat(256).leak();
    let (code, body) = post_raw(&path, r#"{"name": "claim"}"#, Some(long)).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("invalid_idempotency_key"))
    );
    let (code, body) = post_raw(&path, "[1,2", Some("k1")).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("malformed_json"))
    );
    let (code, body) = app
        .signal(&app.keys.operator, &lead, "k2", "teleport", json!({}), None)
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (422, Some("unknown_signal"))
    );
    let (code, body) = app
        .signal(
            &app.keys.operator,
            &lead,
            "k3",
            "cancel",
            json!({"reason": 5}),
            None,
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (422, Some("invalid_payload"))
    );
    let (code, body) = app
        .signal(
            &app.keys.operator,
            &lead,
            "k4",
            "cancel",
            json!({}),
            Some(60_000),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("invalid_wait"))
    );
    let r = app
        .http
        .get(format!(
            "{}/v1/workflows/dispatch/{}",
            app.url,
            Uuid::new_v4()
        ))
        .bearer_auth(&app.keys.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let (n,): (i64,) =
        sqlx::query_as("select count(*) from signals where idempotency_key like 'k%'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(n, 0, "nothing stored for bad signals");
}

#[tokio::test]
async fn transient_failures_retry_with_backoff_and_permanent_ones_dead_letter() {
    let app = TestApp::spawn().await;
    app.set_config(json!({"log_channel": {"fail_first": 2, "failure": "transient"}}))
        .await;
    let lead = published(&app, None).await;
    let (_, wf) = app.get(&app.keys.operator, &lead).await;
    let publish = &wf["effects"][0];
    assert_eq!(
        (publish["status"].as_str(), publish["attempts"].as_i64()),
        (Some("delivered"), Some(3)),
        "{publish}"
    );
    assert_eq!(app.deliveries().await.len(), 1);

    app.set_config(json!({"log_channel": {"fail_first": 100, "failure": "permanent"}}))
        .await;
    step(
        &app,
        &app.keys.executor,
        &lead,
        "claim",
        json!({}),
        "CLAIMED",
    )
    .await;
    app.wait_effects_settled().await;
    let (_, wf) = app.get(&app.keys.ops, &lead).await;
    let dead: Vec<&Value> = wf["effects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["status"] == "dead")
        .collect();
    assert_eq!(
        dead.len(),
        2,
        "claim notice and group edit dead-lettered: {wf}"
    );
    assert!(dead
        .iter()
        .all(|e| e["attempts"] == 1 && e["last_error"].as_str().unwrap().starts_with("permanent")));
    assert!(wf["attention"].as_str().unwrap().contains("dead-lettered"));
    assert!(wf["history"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["event"] == "effect_dead"));

    // Transient failures past max attempts dead-letter too.
    app.set_config(json!({"log_channel": {"fail_first": 100, "failure": "transient"}}))
        .await;
    step(
        &app,
        &app.keys.operator,
        &lead,
        "cancel",
        json!({}),
        "CANCELLED",
    )
    .await;
    app.wait_effects_settled().await;
    let (_, wf) = app.get(&app.keys.ops, &lead).await;
    let cancel = wf["effects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "crew_post_cancelled")
        .unwrap()
        .clone();
    assert_eq!(
        (cancel["status"].as_str(), cancel["attempts"].as_i64()),
        (Some("dead"), Some(8)),
        "{cancel}"
    );
}

#[tokio::test]
async fn health_and_readiness() {
    let app = TestApp::spawn().await;
    let r: Value = app
        .http
        .get(format!("{}/healthz", app.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["status"], "ok");
    let r = app
        .http
        .get(format!("{}/readyz", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r: Value = r.json().await.unwrap();
    assert_eq!(
        (r["status"].as_str(), r["database"].as_str()),
        (Some("ready"), Some("ok"))
    );
    assert!(r["queue_depth"].is_object());
    let _ = Duration::ZERO;
}

#[tokio::test]
async fn a_stale_attempt_or_version_is_fenced_off() {
    use dispatch::store::{effects, workflows};
    // API only: no worker touches the effect while we play two racing workers.
    let app = TestApp::spawn_role(dispatch::ProcessRole::Api).await;
    let lead = Uuid::new_v4().to_string();
    let (code, _) = app
        .start(&app.keys.integration, "dispatch", &lead, lead_input(None))
        .await;
    assert_eq!(code, 201);
    let tenant = app.keys.tenant_id;
    let (effect_id,): (Uuid,) = sqlx::query_as("select id from effects where idempotency_key = $1")
        .bind(format!("{lead}:publish_v1"))
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let mut conn = app.pool.acquire().await.unwrap();
    let first = effects::claim(&mut conn, tenant, effect_id, 1, Some(0))
        .await
        .unwrap()
        .expect("claimable");
    assert_eq!(first.attempts, 1);
    assert!(
        effects::claim(&mut conn, tenant, effect_id, 60_000, Some(0))
            .await
            .unwrap()
            .is_none(),
        "held by the first attempt"
    );
    // The first worker stalls past its lease; the sweep hands the effect to a second one.
    wait_for(Duration::from_secs(10), "the lease to expire", || {
        let pool = app.pool.clone();
        async move {
            let mut c = pool.acquire().await.unwrap();
            effects::recover(&mut c).await.unwrap();
            let (status,): (String,) =
                sqlx::query_as("select status from effects where tenant_id = $1 and id = $2")
                    .bind(tenant)
                    .bind(effect_id)
                    .fetch_one(&mut *c)
                    .await
                    .unwrap();
            (status == "pending").then_some(())
        }
    })
    .await;
    assert!(
        effects::claim(&mut conn, tenant, effect_id, 60_000, Some(0))
            .await
            .unwrap()
            .is_none(),
        "a duplicate job for the first attempt cannot claim the second"
    );
    let second = effects::claim(&mut conn, tenant, effect_id, 60_000, Some(1))
        .await
        .unwrap()
        .expect("reclaimable");
    assert_eq!(second.attempts, 2);
    assert!(
        !effects::delivered(&mut conn, tenant, effect_id, 1, &json!({}))
            .await
            .unwrap(),
        "the stale attempt is fenced off"
    );
    assert!(
        effects::delivered(&mut conn, tenant, effect_id, 2, &json!({"message_id": "m"}))
            .await
            .unwrap()
    );

    // A state write that read an old version changes nothing.
    let mut row = workflows::find(&mut conn, tenant, "dispatch", &lead)
        .await
        .unwrap()
        .unwrap();
    row.state_name = "EXPIRED".into();
    row.version += 1;
    assert!(!workflows::update_state(&mut conn, &row, row.version + 5)
        .await
        .unwrap());
    let (_, wf) = app.get(&app.keys.operator, &lead).await;
    assert_eq!(wf["state"], "NEW");
}

#[tokio::test]
async fn a_job_cancelled_before_its_post_was_published_gets_the_post_marked_cancelled() {
    let app = TestApp::spawn().await;
    // Hold every effect back for two attempts so the cancel lands while the publish is pending.
    app.set_config(json!({"log_channel": {"fail_first": 2, "failure": "transient"}}))
        .await;
    let lead = Uuid::new_v4().to_string();
    let (code, _) = app
        .start(&app.keys.integration, "dispatch", &lead, lead_input(None))
        .await;
    assert_eq!(code, 201);
    step(
        &app,
        &app.keys.operator,
        &lead,
        "cancel",
        json!({}),
        "CANCELLED",
    )
    .await;
    app.wait_effects_settled().await;
    let keys: Vec<String> = app.deliveries().await.into_iter().map(|d| d.0).collect();
    assert_eq!(
        keys,
        [
            format!("{lead}:publish_v1"),
            format!("{lead}:group_cancel_v1")
        ],
        "the post went out, then was marked cancelled"
    );
    // The publish effect's reply is a signal of its own, applied after the
    // effect settled: wait for it in the history.
    let published = wait_for(
        Duration::from_secs(20),
        "the late `published` reply",
        || async {
            let (_, wf) = app.get(&app.keys.operator, &lead).await;
            assert_eq!(wf["state"], "CANCELLED");
            wf["history"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["signal_name"] == "published")
                .cloned()
        },
    )
    .await;
    assert_eq!(published["reason"], "final_state");
}

#[tokio::test]
async fn keys_paths_and_text_are_validated_before_anything_is_stored() {
    let app = TestApp::spawn().await;
    let lead = Uuid::new_v4().to_string();
    let upper = lead.to_uppercase();
    let (code, body) = app
        .start(&app.keys.integration, "dispatch", &upper, lead_input(None))
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (422, Some("invalid_key"))
    );
    // A NUL is a control character: the one text rule refuses it, naming the field.
    let mut nul = lead_input(None);
    nul["lead"]["notes"] = json!("a\u{0}b");
    let (code, body) = app
        .start(&app.keys.integration, "dispatch", &lead, nul)
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (422, Some("invalid_payload")),
        "{body}"
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`lead.notes`"));
    let (n,): (i64,) = sqlx::query_as("select count(*) from workflows")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);

    let lead = published(&app, None).await;
    let r = app
        .http
        .post(format!(
            "{}/v1/workflows/dispatch/{lead}/signals?wait_ms=soon",
            app.url
        ))
        .bearer_auth(&app.keys.operator)
        .header("Idempotency-Key", "w1")
        .json(&json!({"name": "confirm"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_wait");
    let r = app
        .http
        .get(format!("{}/v1/workflows/dispatch/a%00b", app.url))
        .bearer_auth(&app.keys.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);

    // Executors see the job's standing, not its history or effects.
    step(
        &app,
        &app.keys.executor,
        &lead,
        "claim",
        json!({}),
        "CLAIMED",
    )
    .await;
    let (_, view) = app.get(&app.keys.executor, &lead).await;
    assert_eq!(view["claimed_by"], "executor-1");
    assert!(
        view.get("history").is_none()
            && view.get("effects").is_none()
            && view.get("data").is_none()
    );
}
