//! Bad input and other tenants: a clear 4xx with a machine-readable code,
//! nothing stored, and nothing of one tenant reachable with another's key.

mod common;

use common::*;
use serde_json::{json, Value};
use uuid::Uuid;

async fn count(app: &TestApp, table: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!("select count(*) from {table}")))
        .fetch_one(&app.pool)
        .await
        .unwrap();
    n
}

async fn raw(
    app: &TestApp,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let r = app
        .http
        .request(method.parse().unwrap(), format!("{}{path}", app.url))
        .bearer_auth(&app.keys.operator)
        .header("content-type", content_type)
        .header("Idempotency-Key", "hostile-1")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let json_ct = "application/json";
    let lead = Uuid::new_v4().to_string();
    let start = |input: Value| json!({"kind": "dispatch", "key": lead, "input": input});

    // Over the body limit (1 MiB by default).
    let mut big = start(lead_input(None));
    big["input"]["lead"]["notes"] = json!("x".repeat(1024 * 1024));
    let (code, body) = raw(
        &app,
        "POST",
        "/v1/workflows",
        json_ct,
        big.to_string().into_bytes(),
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (413, Some("body_too_large")),
        "{body}"
    );
    // Invalid UTF-8.
    let mut bytes = start(lead_input(None)).to_string().into_bytes();
    let at = bytes.len() - 10;
    bytes[at] = 0xff;
    let (code, body) = raw(&app, "POST", "/v1/workflows", json_ct, bytes).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("malformed_json")),
        "{body}"
    );
    // Deeply nested JSON.
    let deep = format!(
        "{{\"kind\": \"dispatch\", \"key\": \"{lead}\", \"input\": {}{}}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let (code, body) = raw(&app, "POST", "/v1/workflows", json_ct, deep.into_bytes()).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("malformed_json")),
        "{body}"
    );
    // Unknown fields, at the top and inside the input.
    let mut unknown = start(lead_input(None));
    unknown["surprise"] = json!(1);
    let (code, body) = raw(
        &app,
        "POST",
        "/v1/workflows",
        json_ct,
        unknown.to_string().into_bytes(),
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (422, Some("invalid_body")),
        "{body}"
    );
    let mut inner = start(lead_input(None));
    inner["input"]["lead"]["surprise"] = json!(1);
    let (code, _) = raw(
        &app,
        "POST",
        "/v1/workflows",
        json_ct,
        inner.to_string().into_bytes(),
    )
    .await;
    assert_eq!(code, 422);
    // NUL characters in text.
    let mut nul = start(lead_input(None));
    nul["input"]["lead"]["notes"] = json!("a\u{0}b");
    let (code, body) = raw(
        &app,
        "POST",
        "/v1/workflows",
        json_ct,
        nul.to_string().into_bytes(),
    )
    .await;
    assert!((400..500).contains(&code), "{code} {body}");
    assert!(body["error"]["code"].is_string());
    // Not JSON at all, and a method the route does not have.
    let (code, body) = raw(
        &app,
        "POST",
        "/v1/workflows",
        "text/plain",
        b"hello".to_vec(),
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("malformed_json")),
        "{body}"
    );
    let (code, body) = raw(&app, "PUT", "/v1/workflows", json_ct, b"{}".to_vec()).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    // The same for the courier batch: one bad item among many.
    let (code, body) = raw(&app, "POST", "/v1/dispatches/batch", json_ct, br#"{"items": [{"idempotency_key": "a", "driver_id": "d", "route": {"reference": "R", "text": "t"}, "extra": 1}]}"#.to_vec()).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (422, Some("invalid_body")),
        "{body}"
    );
    let items: Vec<Value> = (0..501)
        .map(|n| json!({"idempotency_key": format!("k{n}"), "driver_id": "d", "route": {"reference": "R", "text": "t"}}))
        .collect();
    let (code, _) = raw(
        &app,
        "POST",
        "/v1/dispatches/batch",
        json_ct,
        json!({"items": items}).to_string().into_bytes(),
    )
    .await;
    assert_eq!(code, 422, "more than 500 items");

    for table in [
        "workflows",
        "workflow_inputs",
        "signals",
        "effects",
        "timers",
        "drivers",
    ] {
        assert_eq!(count(&app, table).await, 0, "nothing stored in {table}");
    }
}

/// A concrete path for a documented one, with tenant A's resources.
fn fill(path: &str, a: &HashMapLike) -> String {
    let mut p = path.to_string();
    let m = &a.messaging;
    let id = if path.starts_with("/v1/messaging/sitters") {
        &m.sitter
    } else if path.starts_with("/v1/messaging/bookings") {
        &m.booking
    } else if path.starts_with("/v1/messaging/meet-and-greets") {
        &m.meet
    } else if path.starts_with("/v1/messaging/threads") {
        &m.thread
    } else if path.starts_with("/v1/messaging/inbox") {
        &m.inbox
    } else if path.starts_with("/v1/messaging/messages") {
        &m.message
    } else if path.starts_with("/v1/people") {
        &a.person
    } else if path.starts_with("/v1/drivers") {
        &a.driver
    } else if path.starts_with("/v1/dispatches") {
        &a.dispatch
    } else {
        &a.workflow
    };
    p = p.replace("{id}", id);
    p = p.replace("{effect_id}", &a.effect);
    p = p.replace("{timer_id}", &a.timer);
    p = p.replace("{tenant}", &a.tenant);
    p = p.replace("{provider}", "telegram");
    p = p.replace("{kind}", "dispatch");
    p.replace("{key}", &a.lead)
}

struct Messaging {
    sitter: String,
    booking: String,
    meet: String,
    thread: String,
    inbox: String,
    message: String,
}

struct HashMapLike {
    messaging: Messaging,
    tenant: String,
    workflow: String,
    lead: String,
    effect: String,
    timer: String,
    person: String,
    driver: String,
    dispatch: String,
}

#[tokio::test]
async fn every_route_keeps_one_tenants_data_from_another_tenants_keys() {
    let app = TestApp::spawn().await;
    // Tenant A (the app's own): a workflow with a timer and an effect, a person, a driver, a dispatch.
    let lead = Uuid::new_v4().to_string();
    let (code, wf) = app
        .start(&app.keys.integration, "dispatch", &lead, lead_input(None))
        .await;
    assert_eq!(code, 201);
    let before = app.wait_state(&lead, "PUBLISHED").await;
    let post = |path: &str, body: Value, idem: Option<&str>| {
        let mut r = app
            .http
            .post(format!("{}{path}", app.url))
            .bearer_auth(&app.keys.operator)
            .json(&body);
        if let Some(i) = idem {
            r = r.header("Idempotency-Key", i);
        }
        async move {
            let r = r.send().await.unwrap();
            let code = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            assert!(code < 300, "{body}");
            body
        }
    };
    post(
        "/v1/people",
        json!({"id": "a-exec", "role": "executor", "display_name": "Canary Person"}),
        None,
    )
    .await;
    post(
        "/v1/drivers",
        json!({"id": "a-driver", "name": "Canary Driver", "email": "canary@drivers.example"}),
        None,
    )
    .await;
    let dispatch = post(
        "/v1/dispatches",
        json!({"driver_id": "a-driver", "route": {"reference": "R-A", "text": "Canary Street stops"}}),
        Some("a-route"),
    )
    .await;
    let (effect,): (Uuid,) =
        sqlx::query_as("select id from effects where workflow_id = $1 limit 1")
            .bind(before["id"].as_str().unwrap().parse::<Uuid>().unwrap())
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let (timer,): (Uuid,) = sqlx::query_as("select id from timers where workflow_id = $1 limit 1")
        .bind(before["id"].as_str().unwrap().parse::<Uuid>().unwrap())
        .fetch_one(&app.pool)
        .await
        .unwrap();
    // Masked-number messaging: numbers, a sitter, a client, a booking in its
    // window, a meet-and-greet, and a blocked message with its inbox item.
    for (e164, class) in [("+15550100000", "front_desk"), ("+15550200001", "sitter")] {
        post(
            "/v1/messaging/numbers",
            json!({"e164": e164, "class": class}),
            None,
        )
        .await;
    }
    post(
        "/v1/messaging/sitters",
        json!({"id": "a-sitter", "name": "Canary Sitter", "phone": "+15551110001"}),
        None,
    )
    .await;
    post(
        "/v1/messaging/clients",
        json!({"id": "a-client", "name": "Canary Client", "phone": "+15552220001"}),
        None,
    )
    .await;
    let now = chrono::Utc::now();
    let booking = post(
        "/v1/messaging/bookings",
        json!({"client_id": "a-client", "sitter_id": "a-sitter", "service_type": "walk", "recurrence": "weekly",
               "starts_at": now + chrono::Duration::minutes(10), "ends_at": now + chrono::Duration::minutes(40)}),
        None,
    )
    .await;
    let meet = post(
        "/v1/messaging/meet-and-greets",
        json!({"client_id": "a-client", "sitter_id": "a-sitter",
               "opens_at": now, "closes_at": now + chrono::Duration::hours(1)}),
        None,
    )
    .await;
    let sitter_key = app
        .key(
            app.keys.tenant_id,
            dispatch::workflows::Role::Executor,
            Some("a-sitter"),
        )
        .await;
    let thread = booking["thread_id"].as_str().unwrap().to_string();
    let sent: Value = app
        .http
        .post(format!(
            "{}/v1/messaging/threads/{thread}/messages",
            app.url
        ))
        .bearer_auth(&sitter_key)
        .json(&json!({"text": "Canary: call me at 415-555-0134"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sent["status"], "blocked");
    let (inbox_item,): (Uuid,) =
        sqlx::query_as("select id from msg_inbox where tenant_id = $1 limit 1")
            .bind(app.keys.tenant_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let messaging = Messaging {
        sitter: "a-sitter".into(),
        booking: booking["id"].as_str().unwrap().to_string(),
        meet: meet["id"].as_str().unwrap().to_string(),
        thread,
        inbox: inbox_item.to_string(),
        message: sent["message_id"].as_str().unwrap().to_string(),
    };
    let a = HashMapLike {
        messaging,
        tenant: app.keys.tenant.clone(),
        workflow: wf["id"].as_str().unwrap().to_string(),
        lead: lead.clone(),
        effect: effect.to_string(),
        timer: timer.to_string(),
        person: "a-exec".into(),
        driver: "a-driver".into(),
        dispatch: dispatch["id"].as_str().unwrap().to_string(),
    };
    let b = make_tenant(&app.pool, "beta").await;
    let doc: Value = app
        .http
        .get(format!("{}/openapi.json", app.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let a_marks = [
        a.workflow.as_str(),
        a.lead.as_str(),
        a.dispatch.as_str(),
        "Canary",
        "a-exec",
        "a-driver",
    ];
    // A well-formed body for each operation, so the request reaches the
    // tenant check instead of stopping at the body's shape.
    let body_for = |method: &str, path: &str| -> Value {
        let reason = "cross-tenant probe";
        match (method, path) {
            ("post", p) if p.ends_with("/signals") && p.starts_with("/v1/ops/") => {
                json!({"name": "cancel", "payload": {}, "reason": reason})
            }
            ("post", p) if p.ends_with("/signals") => json!({"name": "cancel", "payload": {}}),
            ("post", p) if p.ends_with("/force") => json!({"state": "CANCELLED", "reason": reason}),
            ("post", p) if p.ends_with("/registration") => json!({}),
            ("post", p) if p.ends_with("/reschedule") => {
                json!({"starts_at": "2027-06-01T10:00:00Z", "ends_at": "2027-06-01T11:00:00Z"})
            }
            ("post", p) if p.ends_with("/decision") => json!({"decision": "approve"}),
            ("post", p) if p.ends_with("/messages") => json!({"text": "probe"}),
            ("post", _) => json!({"reason": reason}),
            ("put", p) if p.ends_with("/config") => json!({}),
            ("put", p) if p.contains("/providers/") => json!({"bot_username": "BetaProbeBot"}),
            _ => Value::Null,
        }
    };
    // Creating in a collection, and PUT by id, act in the caller's own
    // namespace (tenant B may have its own person `a-exec`): not probes of A.
    let own_namespace = |method: &str, path: &str| {
        (method == "post" && !path.contains('{') && path != "/v1/ops/effects/retry")
            || (method == "put"
                && (path.starts_with("/v1/people/") || path.starts_with("/v1/drivers/")))
    };
    let mut walked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/") || path.starts_with("/v1/intake/") {
            continue; // public service routes; intake is signature-checked per tenant
        }
        for method in item.as_object().unwrap().keys() {
            if own_namespace(method, path) {
                continue;
            }
            for key in [&b.ops, &b.operator, &b.executor, &b.integration] {
                let url = format!("{}{}", app.url, fill(path, &a));
                let mut req = app
                    .http
                    .request(method.to_uppercase().parse().unwrap(), &url)
                    .bearer_auth(key)
                    .header("Idempotency-Key", format!("b-{walked}"));
                let body = body_for(method, path);
                if !body.is_null() {
                    req = req.json(&body);
                }
                let r = req.send().await.unwrap();
                let code = r.status().as_u16();
                let text = r.text().await.unwrap();
                walked += 1;
                for mark in a_marks {
                    assert!(
                        !text.contains(mark),
                        "{method} {path} with tenant B's key answered {code} with A's `{mark}`: {text}"
                    );
                }
                // Lists and the bulk retry answer with B's own (empty) world.
                let b_world =
                    method == "get" && !path.contains('{') || path == "/v1/ops/effects/retry";
                if b_world {
                    assert!(code == 200 || code == 403, "{method} {path}: {code} {text}");
                } else {
                    assert!(
                        code == 403 || code == 404,
                        "{method} {path} with tenant B's key: {code} {text}"
                    );
                }
            }
        }
    }
    assert!(walked >= 80, "{walked} probes");
    // The same operations with A's own ops key reach A's data (the probes above
    // were refused for the tenant, not for their shape).
    for path in [
        "/v1/ops/workflows/{id}",
        "/v1/workflows/{kind}/{key}",
        "/v1/dispatches/{id}",
        "/v1/drivers/{id}",
        "/v1/people/{id}",
        "/v1/tenants/{tenant}/config",
        "/v1/messaging/threads/{id}",
    ] {
        let r = app
            .http
            .get(format!("{}{}", app.url, fill(path, &a)))
            .bearer_auth(&app.keys.ops)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path} with A's own key");
    }
    // Tenant A is untouched.
    let after = app.wait_state(&lead, "PUBLISHED").await;
    assert_eq!(after["version"], before["version"]);
    assert_eq!(
        after["history"].as_array().unwrap().len(),
        before["history"].as_array().unwrap().len()
    );
    let (driver,): (String,) =
        sqlx::query_as("select name from drivers where tenant_id = $1 and id = 'a-driver'")
            .bind(app.keys.tenant_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(driver, "Canary Driver");
    let (people,): (i64,) = sqlx::query_as("select count(*) from people where tenant_id = $1")
        .bind(app.keys.tenant_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(people, 1);
}

#[test]
fn settings_debug_output_never_prints_secrets() {
    let settings = test_settings("postgres://dispatch:s3cret-canary-pw@db.internal/dispatch");
    let shown = format!("{settings:?}");
    assert!(!shown.contains("s3cret-canary-pw"), "{shown}");
    assert!(shown.contains("[redacted]"));
}
