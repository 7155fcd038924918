//! The ops API: stuck workflows found and fixed, every action with a reason
//! and an audit entry.

mod common;

use common::*;
use serde_json::{json, Value};
use uuid::Uuid;

async fn ops_get(app: &TestApp, key: &str, path: &str) -> (u16, Value) {
    let r = app
        .http
        .get(format!("{}{path}", app.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn start(app: &TestApp, deadline: Option<u64>) -> (String, Uuid) {
    let lead = Uuid::new_v4().to_string();
    let (code, body) = app
        .start(
            &app.keys.integration,
            "dispatch",
            &lead,
            lead_input(deadline),
        )
        .await;
    assert_eq!(code, 201);
    (lead, body["id"].as_str().unwrap().parse().unwrap())
}

#[tokio::test]
async fn a_dead_effect_is_found_as_stuck_and_retried_with_an_audited_reason() {
    let app = TestApp::spawn().await;
    app.set_config(json!({"log_channel": {"fail_first": 100, "failure": "permanent"}}))
        .await;
    let (lead, id) = start(&app, None).await;
    app.wait_effects_settled().await;
    let (code, list) = ops_get(&app, &app.keys.ops, "/v1/ops/workflows?stuck=true").await;
    assert_eq!(code, 200, "{list}");
    let item = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["key"] == lead.as_str())
        .expect("listed as stuck")
        .clone();
    assert_eq!(item["stuck"], json!(["effect_dead"]));
    let (_, shown) = ops_get(&app, &app.keys.ops, &format!("/v1/ops/workflows/{id}")).await;
    assert!(
        shown.get("input").is_none(),
        "no personal data in the ops view"
    );
    let effect = shown["effects"][0]["id"].as_str().unwrap().to_string();
    let retry = format!("/v1/ops/workflows/{id}/effects/{effect}/retry");
    let (code, body) = app.post(&app.keys.ops, &retry, json!({}), None).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("reason_required"))
    );
    let (code, _) = app
        .post(&app.keys.operator, &retry, json!({"reason": "x"}), None)
        .await;
    assert_eq!(code, 403, "retrying is an ops action");
    app.set_config(json!({})).await;
    let (code, body) = app
        .post(
            &app.keys.ops,
            &retry,
            json!({"reason": "provider outage over"}),
            None,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let wf = app.wait_state(&lead, "PUBLISHED").await;
    assert!(wf["attention"].is_null(), "attention cleared");
    assert_eq!(wf["effects"][0]["status"], "delivered");
    let (code, again) = app
        .post(&app.keys.ops, &retry, json!({"reason": "twice"}), None)
        .await;
    assert_eq!(
        (code, again["error"]["code"].as_str()),
        (409, Some("not_dead"))
    );
    let (_, audit) = ops_get(
        &app,
        &app.keys.ops,
        &format!("/v1/ops/audit?workflow_id={id}"),
    )
    .await;
    let entry = &audit["items"][0];
    assert_eq!(
        (entry["action"].as_str(), entry["reason"].as_str()),
        (Some("retry_effect"), Some("provider outage over"))
    );
    assert_eq!(
        (entry["actor_role"].as_str(), entry["before_state"].as_str()),
        (Some("ops"), Some("NEW"))
    );
    assert!(entry["actor"].as_str().unwrap().starts_with("key:"));
    let (_, stuck) = ops_get(&app, &app.keys.ops, "/v1/ops/workflows?stuck=true").await;
    assert!(
        stuck["items"].as_array().unwrap().is_empty(),
        "nothing stuck any more: {stuck}"
    );
}

#[tokio::test]
async fn timers_fire_on_demand_and_workflows_are_cancelled_or_signalled_by_hand() {
    let app = TestApp::spawn().await;
    let (lead, id) = start(&app, Some(3600)).await;
    let wf = app.wait_state(&lead, "PUBLISHED").await;
    let timer = wf["pending_timers"][0]["id"].as_str().unwrap().to_string();
    let fire = format!("/v1/ops/workflows/{id}/timers/{timer}/fire");
    let (code, _) = app
        .post(&app.keys.ops, &fire, json!({"reason": ""}), None)
        .await;
    assert_eq!(code, 400);
    let (code, body) = app
        .post(
            &app.keys.ops,
            &fire,
            json!({"reason": "crew called: nobody can take it"}),
            None,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    app.wait_state(&lead, "EXPIRED").await;

    // Cancel by hand (operator), with the reason in the audit and in the signal.
    let (lead2, id2) = start(&app, None).await;
    app.wait_state(&lead2, "PUBLISHED").await;
    let (code, body) = app
        .post(
            &app.keys.operator,
            &format!("/v1/ops/workflows/{id2}/cancel"),
            json!({"reason": "client moved the date"}),
            Some("c-1"),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let wf = app.wait_state(&lead2, "CANCELLED").await;
    assert_eq!(wf["data"]["reason"], "client moved the date");
    // A system signal by hand: `published` for a workflow whose provider answer was lost.
    app.set_config(json!({"log_channel": {"fail_first": 100, "failure": "permanent"}}))
        .await;
    let (lead3, id3) = start(&app, None).await;
    app.wait_effects_settled().await;
    let path = format!("/v1/ops/workflows/{id3}/signals");
    let (code, _) = app
        .post(
            &app.keys.executor,
            &path,
            json!({"name": "published", "payload": {"message_id": "m-9"}, "reason": "x"}),
            Some("p-1"),
        )
        .await;
    assert_eq!(code, 403);
    let (code, _) = app.post(&app.keys.ops, &path, json!({"name": "published", "payload": {"message_id": "m-9"}, "reason": "posted by hand in the group"}), None).await;
    assert_eq!(code, 400, "an Idempotency-Key is required");
    let (code, body) = app.post(&app.keys.ops, &path, json!({"name": "published", "payload": {"message_id": "m-9"}, "reason": "posted by hand in the group"}), Some("p-1")).await;
    assert_eq!(code, 202, "{body}");
    let wf = app.wait_state(&lead3, "PUBLISHED").await;
    assert_eq!(wf["data"]["post"]["message_id"], "m-9");
    let applied = wf["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["signal_name"] == "published")
        .unwrap()
        .clone();
    assert_eq!(applied["actor_role"], "ops");

    let (_, audit) = ops_get(&app, &app.keys.ops, "/v1/ops/audit").await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["signal", "cancel", "fire_timer"], "newest first");
    let (_, by_op) = ops_get(&app, &app.keys.ops, "/v1/ops/audit?actor=op-1").await;
    assert_eq!(
        by_op["items"].as_array().unwrap().len(),
        1,
        "the operator's cancel"
    );
}

#[tokio::test]
async fn the_list_filters_pages_and_flags_workflows_without_progress() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (lead, id) = start(&app, None).await;
        app.wait_state(&lead, "PUBLISHED").await;
        ids.push(id);
    }
    let mut seen = Vec::new();
    let mut path = "/v1/ops/workflows?kind=dispatch&state=PUBLISHED&limit=2".to_string();
    loop {
        let (code, page) = ops_get(&app, &app.keys.operator, &path).await;
        assert_eq!(code, 200, "{page}");
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_str().unwrap().parse::<Uuid>().unwrap()),
        );
        match page["next"].as_str() {
            Some(next) => {
                path = format!(
                    "/v1/ops/workflows?kind=dispatch&state=PUBLISHED&limit=2&after={}",
                    url_encode(next)
                )
            }
            None => break,
        }
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "every workflow once across pages");
    let (code, _) = ops_get(&app, &app.keys.ops, "/v1/ops/workflows?limit=0").await;
    assert_eq!(code, 400);
    // A claim nobody confirmed for two days is stuck by the workflow's own deadline.
    sqlx::query("update workflows set state_name = 'CLAIMED', updated_at = now() - interval '2 days' where id = $1").bind(ids[0]).execute(&app.pool).await.unwrap();
    let (_, stuck) = ops_get(&app, &app.keys.ops, "/v1/ops/workflows?stuck=true").await;
    let items = stuck["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{stuck}");
    assert_eq!(items[0]["stuck"], json!(["no_progress"]));
    // Other tenants and executors see nothing.
    let other = make_tenant(&app.pool, "other").await;
    assert_eq!(
        ops_get(&app, &other.ops, &format!("/v1/ops/workflows/{}", ids[1]))
            .await
            .0,
        404
    );
    assert_eq!(
        ops_get(&app, &app.keys.executor, "/v1/ops/workflows")
            .await
            .0,
        403
    );
}

fn url_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn force_moves_only_along_declared_edges_and_bulk_retry_counts_first() {
    let app = TestApp::spawn().await;
    let (lead, id) = start(&app, None).await;
    app.wait_state(&lead, "PUBLISHED").await;
    let force = format!("/v1/ops/workflows/{id}/force");
    let (code, body) = app
        .post(
            &app.keys.ops,
            &force,
            json!({"state": "PAID", "reason": "x"}),
            Some("f-0"),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (422, Some("undeclared_target")),
        "PUBLISHED has no edge to PAID"
    );
    let (code, body) = app
        .post(
            &app.keys.ops,
            &force,
            json!({"state": "EXPIRED"}),
            Some("f-1"),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("reason_required"))
    );
    let (code, _) = app
        .post(
            &app.keys.operator,
            &force,
            json!({"state": "EXPIRED", "reason": "x"}),
            Some("f-1"),
        )
        .await;
    assert_eq!(code, 403);
    let (code, body) = app
        .post(
            &app.keys.ops,
            &force,
            json!({"state": "EXPIRED", "reason": "job withdrawn by phone"}),
            Some("f-1"),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    app.wait_state(&lead, "EXPIRED").await;
    let (_, audit) = ops_get(
        &app,
        &app.keys.ops,
        &format!("/v1/ops/audit?workflow_id={id}"),
    )
    .await;
    assert_eq!(
        (
            audit["items"][0]["action"].as_str(),
            audit["items"][0]["before_state"].as_str()
        ),
        (Some("force"), Some("PUBLISHED"))
    );

    // Bulk retry: a dry run counts, the real run retries and audits each.
    app.wait_effects_settled().await;
    app.set_config(json!({"log_channel": {"fail_first": 100, "failure": "permanent"}}))
        .await;
    for _ in 0..3 {
        start(&app, None).await;
    }
    app.wait_effects_settled().await;
    let (code, dry) = app
        .post(
            &app.keys.ops,
            "/v1/ops/effects/retry",
            json!({"effect": "dispatch_publish", "dry_run": true, "reason": "outage over"}),
            None,
        )
        .await;
    assert_eq!((code, dry["matched"].as_u64()), (200, Some(3)), "{dry}");
    let (stuck,): (i64,) = sqlx::query_as(
        "select count(*) from effects where status = 'dead' and name = 'dispatch_publish'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stuck, 3, "a dry run changes nothing");
    app.set_config(json!({})).await;
    let (_, real) = app
        .post(
            &app.keys.ops,
            "/v1/ops/effects/retry",
            json!({"effect": "dispatch_publish", "reason": "outage over"}),
            None,
        )
        .await;
    assert_eq!(real["retried"], 3);
    app.wait_effects_settled().await;
    let (dead,): (i64,) = sqlx::query_as("select count(*) from effects where status = 'dead'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);
    let (_, audit) = ops_get(&app, &app.keys.ops, "/v1/ops/audit").await;
    assert_eq!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "retry_effect")
            .count(),
        3
    );
}

#[test]
fn the_readme_embeds_the_generated_diagrams() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let registry = dispatch::workflows::Registry::builtin();
    for kind in registry.kinds() {
        let diagram = dispatch::workflows::mermaid(registry.get(kind).unwrap().edges());
        assert!(
            readme.contains(&diagram),
            "README is missing the generated `{kind}` diagram:\n{diagram}"
        );
    }
}

#[tokio::test]
async fn metrics_expose_the_runtime_series_and_nothing_personal() {
    let app = TestApp::spawn().await;
    app.set_config(json!({"log_channel": {"fail_first": 1, "failure": "transient"}}))
        .await;
    let (lead, _) = start(&app, Some(1)).await;
    app.wait_state(&lead, "EXPIRED").await;
    let (lead2, _) = start(&app, None).await;
    app.wait_state(&lead2, "PUBLISHED").await;
    let (_, body) = app
        .signal(
            &app.keys.executor,
            &lead2,
            "m-1",
            "claim",
            json!({}),
            Some(10_000),
        )
        .await;
    assert_eq!(body["state"], "CLAIMED");
    app.wait_effects_settled().await;
    let text = app
        .http
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{series}` in:\n{text}"))
    };
    assert!(value(r#"dispatch_signals_received_total{kind="dispatch"}"#) >= 1.0);
    assert!(value(r#"dispatch_transitions_total{kind="dispatch",state="PUBLISHED"}"#) >= 1.0);
    assert!(value(r#"dispatch_transitions_total{kind="dispatch",state="EXPIRED"}"#) >= 1.0);
    assert!(value(r#"dispatch_signals_applied_total{kind="dispatch"}"#) >= 2.0);
    assert!(value(r#"dispatch_effect_attempts_total{effect="dispatch_publish"}"#) >= 2.0);
    assert!(
        value(r#"dispatch_effect_failures_total{effect="dispatch_publish",class="transient"}"#)
            >= 1.0
    );
    assert!(value(r#"dispatch_effect_latency_seconds_count{effect="dispatch_publish"}"#) >= 2.0);
    assert!(value(r#"dispatch_timer_lateness_seconds_count{kind="dispatch"}"#) >= 1.0);
    assert!(value(r#"dispatch_queue_depth{queue="dispatch.apply.dispatch"}"#) >= 0.0);
    assert_eq!(value("dispatch_stuck_workflows"), 0.0);
    // A claim unconfirmed for two days is stuck by the workflow's own deadline.
    sqlx::query("update workflows set updated_at = now() - interval '2 days' where key = $1")
        .bind(&lead2)
        .execute(&app.pool)
        .await
        .unwrap();
    let again = app
        .http
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        again.lines().any(|l| l == "dispatch_stuck_workflows 1"),
        "{again}"
    );
    for canary in CANARIES {
        assert!(!text.contains(canary));
    }
    assert!(!text.contains(&lead), "no workflow keys in labels");
}

#[tokio::test]
async fn the_ops_cli_drives_the_same_api() {
    let app = TestApp::spawn().await;
    let (lead, id) = start(&app, None).await;
    app.wait_state(&lead, "PUBLISHED").await;
    // Async: the app under test runs on this test's runtime.
    let cli = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatch"));
        cmd.arg("ops")
            .args(args)
            .env("DISPATCH_URL", &app.url)
            .env("DISPATCH_KEY", &app.keys.ops)
            .env("RUST_LOG", "off");
        async move {
            let out = cmd.output().await.unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (ok, table, err) = cli(&["list", "--kind", "dispatch"]).await;
    assert!(ok, "{err}");
    assert!(
        table.starts_with("ID") && table.contains(&lead) && table.contains("PUBLISHED"),
        "{table}"
    );
    let (ok, shown, _) = cli(&["show", &id.to_string(), "--json"]).await;
    assert!(ok);
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["state"], "PUBLISHED");
    let (ok, _, err) = cli(&["force", &id.to_string(), "PAID", "--reason", "x"]).await;
    assert!(!ok && err.contains("undeclared_target"), "{err}");
    let (ok, _, err) = cli(&[
        "force",
        &id.to_string(),
        "CANCELLED",
        "--reason",
        "duplicate lead",
    ])
    .await;
    assert!(ok, "{err}");
    app.wait_state(&lead, "CANCELLED").await;
    let (ok, audit, _) = cli(&["audit", "--workflow", &id.to_string()]).await;
    assert!(
        ok && audit.contains("force") && audit.contains("duplicate lead"),
        "{audit}"
    );
}

#[tokio::test]
async fn operators_send_only_what_their_role_may_and_every_action_stays_in_its_tenant() {
    let app = TestApp::spawn().await;
    app.set_config(json!({"log_channel": {"fail_first": 100, "failure": "permanent"}}))
        .await;
    let (_, id) = start(&app, None).await;
    app.wait_effects_settled().await;
    let path = format!("/v1/ops/workflows/{id}/signals");
    let published = json!({"name": "published", "payload": {"message_id": "x"}, "reason": "try"});
    let (code, _) = app
        .post(&app.keys.operator, &path, published.clone(), Some("op-1"))
        .await;
    assert_eq!(code, 403, "a system signal is an ops override only");
    // A replayed ops command is audited once.
    for _ in 0..2 {
        let (code, _) = app
            .post(&app.keys.ops, &path, published.clone(), Some("ops-1"))
            .await;
        assert_eq!(code, 202);
    }
    let (_, audit) = ops_get(
        &app,
        &app.keys.ops,
        &format!("/v1/ops/audit?workflow_id={id}"),
    )
    .await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 1);
    let (code, body) = app
        .post(
            &app.keys.ops,
            &path,
            json!({"name": "cancel", "reason": "bad\u{0}reason"}),
            Some("ops-2"),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("reason_required"))
    );
    // The ops view carries no effect payloads or results.
    let (_, shown) = ops_get(&app, &app.keys.ops, &format!("/v1/ops/workflows/{id}")).await;
    assert!(shown["effects"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e.get("payload").is_none() && e.get("result").is_none()));
    // Another tenant's ops key reaches nothing of this one.
    let other = make_tenant(&app.pool, "other").await;
    let effect = shown["effects"][0]["id"].as_str().unwrap().to_string();
    let attempts = [
        (
            format!("/v1/ops/workflows/{id}/effects/{effect}/retry"),
            json!({"reason": "x"}),
        ),
        (
            format!("/v1/ops/workflows/{id}/cancel"),
            json!({"reason": "x"}),
        ),
        (
            format!("/v1/ops/workflows/{id}/force"),
            json!({"state": "CANCELLED", "reason": "x"}),
        ),
        (path.clone(), json!({"name": "cancel", "reason": "x"})),
    ];
    for (p, body) in attempts {
        let (code, _) = app.post(&other.ops, &p, body, Some("t-1")).await;
        assert_eq!(code, 404, "{p}");
    }
    let (_, theirs) = ops_get(&app, &other.ops, "/v1/ops/workflows").await;
    assert!(theirs["items"].as_array().unwrap().is_empty());
    let (_, their_audit) = ops_get(&app, &other.ops, "/v1/ops/audit").await;
    assert!(their_audit["items"].as_array().unwrap().is_empty());
}
