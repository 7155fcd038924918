//! The leaks found by probing the running service from outside (issue 17),
//! one test per finding, each with the hostile input quoted in the issue:
//! the answer's status and code, and that nothing was stored or sent.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dispatch::{ProcessRole, Settings};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

async fn count(app: &TestApp, sql: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&app.pool)
        .await
        .unwrap();
    n
}

/// POST a raw body (so duplicate keys reach the server as written).
async fn post_raw(app: &TestApp, key: &str, path: &str, body: &str) -> (u16, Value) {
    let r = app
        .http
        .post(format!("{}{path}", app.url))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn code(body: &Value) -> Option<&str> {
    body["error"]["code"].as_str()
}

/// Item 1: a phone number in any digit form, split across extras, or a
/// person's name as a locality never reaches the crew post: the start is
/// refused with 422 naming the field, and nothing is stored or sent.
#[tokio::test]
async fn a_phone_in_any_digit_form_or_a_name_in_a_place_field_never_reaches_the_crew() {
    let app = TestApp::spawn().await;
    app.set_config(json!({"dispatch": {"crew": {"enabled": true}}}))
        .await;
    // (what, where in the lead, the hostile value, the field the answer names)
    let cases = [
        (
            "full-width digits",
            "/volume",
            json!("０５５５-０１００-１９９"),
            "lead.volume",
        ),
        (
            "Arabic-Indic digits",
            "/volume",
            json!("٠٥٥٥٠١٠٠١٩٩"),
            "lead.volume",
        ),
        (
            "a number split across extras",
            "/extras",
            json!(["+1 555", "0100", "199"]),
            "lead.extras[0]",
        ),
        (
            "the client's name as a locality",
            "/to/locality",
            json!("Canary Clientname"),
            "lead.to.locality",
        ),
        (
            "digits in a locality",
            "/from/locality",
            json!("Haifa ０５５５０１００１９９"),
            "lead.from.locality",
        ),
    ];
    for kind in ["dispatch", "lead_finalization"] {
        for (what, at, value, field) in &cases {
            let mut input = lead_input(None);
            *input["lead"].pointer_mut(at).unwrap() = value.clone();
            let (status, body) = app
                .start(
                    &app.keys.integration,
                    kind,
                    &Uuid::new_v4().to_string(),
                    input,
                )
                .await;
            assert_eq!(
                (status, code(&body)),
                (422, Some("crew_unsafe_field")),
                "{kind}, {what}: {body}"
            );
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains(&format!("`{field}`")), "{what}: {message}");
            for value in ["０５５５", "٠٥٥٥", "555", "Canary"] {
                assert!(
                    !message.contains(value),
                    "{what}: the value is echoed: {message}"
                );
            }
        }
    }
    assert_eq!(count(&app, "select count(*) from workflows").await, 0);
    assert_eq!(count(&app, "select count(*) from effects").await, 0);
    assert_eq!(count(&app, "select count(*) from deliveries").await, 0);

    // A tenant's own lists replace the defaults; what they hold is a label.
    let (status, body) = app
        .http
        .put(format!("{}/v1/tenants/acme/config", app.url))
        .bearer_auth(&app.keys.ops)
        .json(&json!({"dispatch": {"crew": {"enabled": true, "extras": ["Fridge", "call 050-555-0199"]}}}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    let body: Value = body.json().await.unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("dispatch.crew.extras[1]"));

    // A clean lead passes both checks and is posted.
    let lead = Uuid::new_v4().to_string();
    let (status, body) = app
        .start(&app.keys.integration, "dispatch", &lead, lead_input(None))
        .await;
    assert_eq!(status, 201, "{body}");
    app.wait_state(&lead, "PUBLISHED").await;
    let posted: Vec<_> = app.deliveries().await;
    assert!(
        posted
            .iter()
            .any(|(_, _, text)| text.contains("Volume: 1BR")),
        "{posted:?}"
    );

    // Route dispatches are driver-visible: the same rule.
    let r = app
        .http
        .post(format!("{}/v1/drivers", app.url))
        .bearer_auth(&app.keys.operator)
        .json(&json!({"id": "drv-1", "name": "Dana Driver", "email": "dana@courier.example"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for text in [
        "Stop 1: call the client on ０５５５-０１００-１９９",
        "Stop 2, then text me",
    ] {
        let (status, body) = app
            .post(
                &app.keys.integration,
                "/v1/dispatches",
                json!({"driver_id": "drv-1", "route": {"reference": "R-1", "text": text}}),
                Some("route-x"),
            )
            .await;
        assert_eq!(
            (status, code(&body)),
            (422, Some("crew_unsafe_field")),
            "{body}"
        );
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`route.text`"));
    }
    // The generic start is held to the same rule as /v1/dispatches.
    let (status, body) = app
        .start(
            &app.keys.integration,
            "route_dispatch",
            "route-generic",
            json!({"driver_id": "drv-1", "channels": ["email"],
                   "route": {"reference": "R-2", "text": "Stop 1: ring ٠٥٥٥٠١٠٠١٩٩"}}),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (422, Some("crew_unsafe_field")),
        "{body}"
    );
    assert_eq!(
        count(
            &app,
            "select count(*) from workflows where kind = 'route_dispatch'"
        )
        .await,
        0
    );
}

/// Read what the server writes until it closes the connection (or `limit`).
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into(), false),
        }
    }
}

fn short_edges(s: &mut Settings) {
    s.edge.header_timeout = Duration::from_millis(800);
    s.edge.body_timeout = Duration::from_millis(1500);
}

/// Item 2: a connection trickling its body is answered `408 body_timeout`
/// and closed after the body timeout, while another client is served; a
/// connection that sends nothing is closed after the header timeout.
#[tokio::test]
async fn a_slow_client_is_cut_off_at_the_body_timeout_while_others_are_served() {
    let app = TestApp::spawn_with(ProcessRole::All, short_edges).await;
    let addr = app.url.trim_start_matches("http://").to_string();
    let lead = Uuid::new_v4().to_string();
    let body = json!({"kind": "dispatch", "key": lead, "input": lead_input(None)}).to_string();
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/workflows HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        app.keys.integration,
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (mut reader, mut writer) = slow.into_split();
    let trickle = tokio::spawn(async move {
        // One byte every 100 ms: the whole body would take minutes.
        for b in body.bytes() {
            if writer.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // Meanwhile another client is served at once.
    let r = app
        .http
        .get(format!("{}/healthz", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        !trickle.is_finished(),
        "served while the slow one is still trickling"
    );
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), reader.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    let answer = String::from_utf8_lossy(&out).to_string();
    assert!(closed, "the slow connection is closed: {answer}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"body_timeout""#), "{answer}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(8),
        "closed at the body timeout, not before or long after: {took:?}"
    );
    trickle.abort();
    assert_eq!(
        count(&app, "select count(*) from workflows").await,
        0,
        "nothing stored"
    );

    // A connection that never sends a byte is closed after the header timeout.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(10)).await;
    assert!(closed, "an idle connection is closed");
}

/// Item 2: over the connection cap, one more connection is answered 503 in
/// the JSON error shape and closed; the others are still served.
#[tokio::test]
async fn connections_over_the_cap_are_refused_with_a_json_503() {
    let app = TestApp::spawn_with(ProcessRole::All, |s| s.edge.max_connections = 2).await;
    let addr = app.url.trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    // The two held connections occupy the slots once accepted.
    let answer = wait_for(Duration::from_secs(10), "a refusal over the cap", || {
        let addr = addr.clone();
        async move {
            let mut third = TcpStream::connect(&addr).await.ok()?;
            let (answer, closed) = read_until_closed(&mut third, Duration::from_secs(2)).await;
            (closed && answer.starts_with("HTTP/1.1 503")).then_some(answer)
        }
    })
    .await;
    assert!(
        answer.contains(r#""code":"too_many_connections""#),
        "{answer}"
    );
    drop(held);
    wait_for(Duration::from_secs(10), "a slot to free up", || async {
        let r = reqwest::Client::new()
            .get(format!("{}/healthz", app.url))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

/// Item 4: errors name the field, never the value; what is echoed is bounded.
#[tokio::test]
async fn errors_name_the_field_and_never_echo_the_value() {
    let app = TestApp::spawn().await;
    let phone = "+15550100199";
    let email = "dana.canary@example.com";
    let probes = [
        (
            "/v1/people",
            app.keys.operator.clone(),
            json!({"id": "p-1", "role": "executor", "display_name": "P", "telegram_user_id": phone}),
        ),
        (
            "/v1/workflows",
            app.keys.integration.clone(),
            json!({"kind": phone, "key": "k-1", "input": {}}),
        ),
        (
            "/v1/people",
            app.keys.operator.clone(),
            json!({"id": "p-2", "role": email, "display_name": "P"}),
        ),
    ];
    for (path, key, body) in probes {
        let (status, answer) = app.post(&key, path, body, None).await;
        assert!((400..500).contains(&status), "{answer}");
        let text = answer.to_string();
        assert!(code(&answer).is_some(), "{text}");
        for value in [phone, "5550100199", email] {
            assert!(!text.contains(value), "{path} echoes the value: {text}");
        }
    }
    let (status, answer) = app
        .post(
            &app.keys.ops.clone(),
            "/v1/tenants/acme/config",
            json!({}),
            None,
        )
        .await;
    assert!(status >= 400, "{answer}");
    let r = app
        .http
        .put(format!("{}/v1/tenants/acme/config", app.url))
        .bearer_auth(&app.keys.ops)
        .json(&json!({"dispatch": {"crew": {"provider": email}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let text = r.text().await.unwrap();
    assert!(!text.contains(email), "unknown variant echoed: {text}");
    // A 1,000,000-character kind comes back as a bounded message.
    let huge = "k".repeat(1_000_000);
    let (status, answer) = app
        .post(
            &app.keys.integration.clone(),
            "/v1/workflows",
            json!({"kind": huge, "key": "k-2", "input": {}}),
            None,
        )
        .await;
    assert_eq!(
        (status, code(&answer)),
        (404, Some("unknown_kind")),
        "{}",
        &answer.to_string()[..200.min(answer.to_string().len())]
    );
    assert!(
        answer.to_string().len() < 1000,
        "bounded: {} bytes",
        answer.to_string().len()
    );
    assert_eq!(count(&app, "select count(*) from workflows").await, 0);
    assert_eq!(count(&app, "select count(*) from people").await, 0);
}

/// Item 5: an object with the same key twice is refused, on every JSON
/// endpoint, and nothing is stored.
#[tokio::test]
async fn duplicate_json_keys_are_refused_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let (status, body) = post_raw(
        &app,
        &app.keys.operator,
        "/v1/people",
        r#"{"id": "p-1", "role":"operator","role":"executor", "display_name": "Dana"}"#,
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (400, Some("duplicate_key")),
        "{body}"
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`role`"));
    let lead = Uuid::new_v4();
    let nested = format!(
        r#"{{"kind": "dispatch", "key": "{lead}", "input": {{"lead": {{"volume": "1BR", "volume": "2BR"}}}}}}"#
    );
    let (status, body) = post_raw(&app, &app.keys.integration, "/v1/workflows", &nested).await;
    assert_eq!(
        (status, code(&body)),
        (400, Some("duplicate_key")),
        "{body}"
    );
    assert_eq!(count(&app, "select count(*) from people").await, 0);
    assert_eq!(count(&app, "select count(*) from workflows").await, 0);
}

/// Item 6: printable text only in stored free text (one rule), and no
/// bidirectional controls in names.
#[tokio::test]
async fn control_and_bidi_characters_are_refused_in_stored_text() {
    let app = TestApp::spawn().await;
    // A lead name and notes with control characters.
    for (path, value) in [
        ("/client/name", json!("Dana\u{7}Canary")),
        ("/notes", json!("gate code \u{1b}[2J4411")),
        ("/client/name", json!("Dana\u{202E}yraneC")),
    ] {
        let mut input = lead_input(None);
        *input["lead"].pointer_mut(path).unwrap() = value;
        let (status, body) = app
            .start(
                &app.keys.integration,
                "dispatch",
                &Uuid::new_v4().to_string(),
                input,
            )
            .await;
        assert_eq!(
            (status, code(&body)),
            (422, Some("invalid_payload")),
            "{path}: {body}"
        );
    }
    // A release reason with a control character, on a real job.
    let lead = Uuid::new_v4().to_string();
    let (status, _) = app
        .start(&app.keys.integration, "dispatch", &lead, lead_input(None))
        .await;
    assert_eq!(status, 201);
    let (status, body) = app
        .signal(
            &app.keys.operator,
            &lead,
            "rel-1",
            "release",
            json!({"reason": "paid in cash\u{7}"}),
            None,
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (422, Some("invalid_payload")),
        "{body}"
    );
    // Provider settings.
    let r = app
        .http
        .put(format!("{}/v1/tenants/acme/providers/resend", app.url))
        .bearer_auth(&app.keys.ops)
        .json(&json!({"api_key": "re_test", "from": "office@example.com\u{0}\u{1b}"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422, "{}", r.text().await.unwrap());
    // A right-to-left override in a driver's name.
    let (status, body) = app
        .post(
            &app.keys.operator.clone(),
            "/v1/drivers",
            json!({"id": "drv-1", "name": "Eve \u{202E}revird"}),
            None,
        )
        .await;
    assert_eq!((status, code(&body)), (422, Some("invalid_body")), "{body}");
    assert_eq!(
        count(&app, "select count(*) from workflows").await,
        1,
        "only the clean job"
    );
    assert_eq!(
        count(&app, "select count(*) from signals where name = 'release'").await,
        0
    );
    assert_eq!(count(&app, "select count(*) from drivers").await, 0);
    assert_eq!(
        count(&app, "select count(*) from provider_settings").await,
        0
    );
}

/// Item 7: the rejections the HTTP layer makes before any handler runs —
/// 431 for a huge header, 414 for a huge path, 400 for a control character
/// in a header — carry the JSON error shape too.
#[tokio::test]
async fn rejections_from_the_http_layer_have_the_json_error_shape() {
    let app = TestApp::spawn().await;
    let addr = app.url.trim_start_matches("http://").to_string();
    let cases = [
        (
            format!(
                "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
                "a".repeat(500_000)
            ),
            "431",
            "headers_too_large",
        ),
        (
            format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "p".repeat(70_000)),
            "414",
            "uri_too_long",
        ),
        (
            "GET /healthz HTTP/1.1\r\nhost: x\r\nx-bad: a\u{1}b\r\n\r\n".to_string(),
            "400",
            "malformed_request",
        ),
    ];
    for (request, status, want) in cases {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let _ = s.write_all(request.as_bytes()).await;
        let (answer, _) = read_until_closed(&mut s, Duration::from_secs(10)).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{want}: {answer}"
        );
        assert!(
            answer.contains("content-type: application/json"),
            "{answer}"
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        assert_eq!(code(&v), Some(want), "{answer}");
    }
}

/// Item 8: the embedded default is durable (PostgreSQL's own settings); the
/// fast settings are an explicit opt-in.
#[tokio::test]
async fn the_embedded_default_is_durable_and_fast_is_opt_in() {
    let root = std::env::temp_dir().join(format!("dispatch-durable-{}", Uuid::new_v4()));
    for (durability, want) in [
        (dispatch::pg::Durability::Durable, "on"),
        (dispatch::pg::Durability::Fast, "off"),
    ] {
        let dir = root.join(want);
        let d = dir.clone();
        let pg = tokio::task::spawn_blocking(move || dispatch::pg::start_on(&d, None, durability))
            .await
            .unwrap()
            .unwrap();
        let mut conn = connect_retry(&pg.url).await;
        for setting in ["fsync", "synchronous_commit", "full_page_writes"] {
            let (v,): (String,) = sqlx::query_as(sqlx::AssertSqlSafe(format!("show {setting}")))
                .fetch_one(&mut conn)
                .await
                .unwrap();
            assert_eq!(v, want, "{durability:?}: {setting}");
        }
        drop(conn);
        tokio::task::spawn_blocking(move || pg.stop())
            .await
            .unwrap()
            .unwrap();
    }
    // `dispatch dev` starts the embedded server with `pg::start`: the durable one.
    assert_eq!(
        dispatch::pg::Durability::default(),
        dispatch::pg::Durability::Durable
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// Starting the embedded server right after the previous process exited
/// (its server still shutting down, as after `dispatch bench` or a quick
/// restart of `dispatch dev`) waits for the old server instead of failing on
/// its lock file.
#[tokio::test]
async fn the_embedded_server_starts_while_the_previous_one_is_still_stopping() {
    let root = std::env::temp_dir().join(format!("dispatch-restart-{}", Uuid::new_v4()));
    let d = root.clone();
    let first = tokio::task::spawn_blocking(move || dispatch::pg::start_fast(&d))
        .await
        .unwrap()
        .unwrap();
    let mut conn = connect_retry(&first.url).await;
    sqlx::query("create table kept (n int)")
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    // What the parent-death signal does: ask for a shutdown, do not wait.
    // SAFETY: signalling the server this test started.
    unsafe { libc::kill(first.pid as i32, libc::SIGINT) };
    let d = root.clone();
    let second = tokio::task::spawn_blocking(move || dispatch::pg::start_fast(&d))
        .await
        .unwrap()
        .expect("the second start waits for the first server to stop");
    assert_ne!(second.pid, first.pid);
    let mut conn = connect_retry(&second.url).await;
    let (n,): (i64,) =
        sqlx::query_as("select count(*) from information_schema.tables where table_name = 'kept'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(n, 1, "the same cluster");
    drop(conn);
    tokio::task::spawn_blocking(move || second.stop())
        .await
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(&root);
}

/// A pool asked for more connections than the server admits is capped
/// below its `max_connections` (a burst used to open connections the server
/// refused, and every request waiting on one failed).
#[tokio::test]
async fn connection_pool_is_capped_at_what_the_server_admits() {
    let url = fresh_database().await;
    let pool = dispatch::store::connect(&url, 100_000).await.unwrap();
    let (admits,): (i32,) = sqlx::query_as(
        "select current_setting('max_connections')::int4 - current_setting('superuser_reserved_connections')::int4",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let max = pool.options().get_max_connections();
    assert!(
        max < admits as u32,
        "pool of {max} for a server admitting {admits}"
    );
    assert!(max >= 4);
    // A small request is left as asked.
    let small = dispatch::store::connect(&url, 3).await.unwrap();
    assert_eq!(small.options().get_max_connections(), 3);
}
