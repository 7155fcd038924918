//! Privacy canaries: the real binary at TRACE runs every flow — lead
//! finalization, publish, a chat claim, the release, driver registration, a
//! route dispatch with its acknowledgement, ops views, metrics — with canary
//! personal data; no canary may appear in its logs, its metrics, or any
//! answer to a role that is not the business's operator.

mod common;
#[path = "common/fake.rs"]
mod fake;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use fake::Fake;
use serde_json::{json, Value};
use tokio::process::Command;
use uuid::Uuid;

const TG_SECRET: &str = "privacy-hook-secret";

/// Personal data beyond the lead's canaries.
const MORE_CANARIES: &[&str] = &[
    "Canary Executorname",
    "Canary Drivername",
    "canary.driver@canary.example",
    "Canary Route Stop",
    "Canary Sittername",
    "Canary Petowner",
    "Canary walk note",
    "Canary blocked note",
    "+15557770001",
    "+15557770002",
];

/// Phone numbers written so that an ASCII-digit count misses them, and a
/// client's name given as a place (issue 17): refused at the start, so none
/// may reach any crew, driver or executor-visible text, log or metric.
const DIGIT_CANARIES: &[&str] = &[
    "０７７７-０３１３-９９９",
    "٠٧٧٧٠٣١٣٩٩٩",
    "0777-0313-999",
    "07770313999",
    "+1 777",
    "Canary Placename",
];

struct Api {
    http: reqwest::Client,
    url: String,
    /// Every answer given to a non-operator role.
    seen: Arc<Mutex<String>>,
}

impl Api {
    async fn send(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
        idem: Option<&str>,
    ) -> Value {
        let mut r = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.url))
            .bearer_auth(key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        if let Some(i) = idem {
            r = r.header("Idempotency-Key", i);
        }
        let r = r.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.as_u16() < 300, "{method} {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// A request that must be refused with 422 `code`; its answer is kept
    /// with the non-operator answers.
    async fn refused(&self, path: &str, key: &str, body: Value, code: &str) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .header("Idempotency-Key", Uuid::new_v4().to_string())
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, 422, "{path}: {text}");
        assert!(text.contains(code), "{path}: {text}");
        self.seen.lock().unwrap().push_str(&text);
    }

    /// A call by a role that must see no personal data: its answer is kept.
    async fn watched(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
        idem: Option<&str>,
    ) -> Value {
        let v = self.send(method, path, key, body, idem).await;
        self.seen.lock().unwrap().push_str(&v.to_string());
        v
    }

    async fn webhook(&self, update: Value) {
        let r = self
            .http
            .post(format!("{}/v1/intake/telegram/acme", self.url))
            .header("X-Telegram-Bot-Api-Secret-Token", TG_SECRET)
            .json(&update)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_level_run_of_every_flow_leaks_no_personal_data() {
    let db = fresh_database().await;
    let pool = dispatch::store::connect(&db, 5).await.unwrap();
    let keys = make_tenant(&pool, "acme").await;
    let fake = Fake::start().await;
    let mut server = Command::new(env!("CARGO_BIN_EXE_dispatch"))
        .args(["serve", "--role", "all"])
        .env("DATABASE_URL", &db)
        .env("DISPATCH_LISTEN", "127.0.0.1:0")
        .env("DISPATCH_POLL_MS", "100")
        .env("DISPATCH_SWEEP_MS", "200")
        .env("RUST_LOG", "trace")
        .env("DISPATCH_LOG_FORMAT", "json")
        .env_remove("DISPATCH_FAULT")
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Keep every log line; find the address in them.
    let logs = Arc::new(Mutex::new(String::new()));
    let mut readers = Vec::new();
    for stream in [
        Box::new(server.stderr.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(server.stdout.take().unwrap()),
    ] {
        let logs = logs.clone();
        readers.push(tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut l = logs.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        }));
    }
    let addr = wait_for(Duration::from_secs(30), "the server to listen", || {
        let text = logs.lock().unwrap().clone();
        async move {
            text.split("listening on http://")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| c == '"' || c.is_whitespace()).next())
                .map(str::to_string)
        }
    })
    .await;
    let api = Api {
        http: reqwest::Client::new(),
        url: format!("http://{addr}"),
        seen: Arc::new(Mutex::new(String::new())),
    };

    // The tenant on Telegram and email, at the fake providers.
    api.send("PUT", "/v1/tenants/acme/providers/telegram", &keys.ops, Some(json!({"bot_token": "123456:TEST-not-a-real-token", "webhook_secret": TG_SECRET, "bot_username": "PrivacyBot", "base_url": fake.url})), None).await;
    api.send(
        "PUT",
        "/v1/tenants/acme/providers/resend",
        &keys.ops,
        Some(json!({"api_key": "re_test", "from": "office@courier.example", "base_url": fake.url})),
        None,
    )
    .await;
    api.send(
        "PUT",
        "/v1/tenants/acme/config",
        &keys.ops,
        Some(json!({"dispatch": {
        "operator": {"provider": "telegram", "to": 5001},
        "crew": {"enabled": true, "provider": "telegram", "chat_id": "-100900"}},
        "rate_limits": {"telegram_chat_per_s": 50, "telegram_group_per_min": 600}})),
        None,
    )
    .await;
    api.send("POST", "/v1/people", &keys.operator, Some(json!({"id": "executor-1", "role": "executor", "display_name": "Canary Executorname", "telegram_user_id": 7001, "telegram_username": "crew_one"})), None).await;

    // Moving job: finalized, published, claimed by button, walked to release.
    let lead = Uuid::new_v4().to_string();
    api.send(
        "POST",
        "/v1/workflows",
        &keys.integration,
        Some(json!({"kind": "lead_finalization", "key": lead, "input": lead_input(None)})),
        None,
    )
    .await;
    let published = wait_for(Duration::from_secs(30), "the crew post", || {
        let api = &api;
        let (key, lead) = (&keys.operator, &lead);
        async move {
            let v = api
                .send(
                    "GET",
                    &format!("/v1/workflows/dispatch/{lead}"),
                    key,
                    None,
                    None,
                )
                .await;
            (v["state"] == "PUBLISHED").then_some(v)
        }
    })
    .await;
    let post_id = published["data"]["post"]["message_id"]
        .as_str()
        .unwrap_or("1")
        .parse::<i64>()
        .unwrap_or(1);
    api.webhook(json!({"update_id": 1, "callback_query": {"id": "cb-1", "from": {"id": 7001},
        "message": {"message_id": post_id, "chat": {"id": -100900}}, "data": format!("claim:{}", &lead[..8])}})).await;
    wait_for(Duration::from_secs(30), "the claim", || {
        let api = &api;
        let (key, lead) = (&keys.operator, &lead);
        async move {
            let v = api
                .send(
                    "GET",
                    &format!("/v1/workflows/dispatch/{lead}"),
                    key,
                    None,
                    None,
                )
                .await;
            (v["state"] == "CLAIMED").then_some(())
        }
    })
    .await;
    for (n, signal) in ["confirm", "invoice_sent", "paid", "release"]
        .iter()
        .enumerate()
    {
        api.send(
            "POST",
            &format!("/v1/workflows/dispatch/{lead}/signals?wait_ms=5000"),
            &keys.operator,
            Some(json!({"name": signal, "payload": {}})),
            Some(&format!("walk-{n}")),
        )
        .await;
    }
    // What the executor and ops may see of it.
    api.watched(
        "GET",
        &format!("/v1/workflows/dispatch/{lead}"),
        &keys.executor,
        None,
        None,
    )
    .await;
    let listed = api
        .watched("GET", "/v1/ops/workflows", &keys.ops, None, None)
        .await;
    for item in listed["items"].as_array().unwrap() {
        api.watched(
            "GET",
            &format!("/v1/ops/workflows/{}", item["id"].as_str().unwrap()),
            &keys.ops,
            None,
            None,
        )
        .await;
    }
    api.watched("GET", "/v1/ops/audit", &keys.ops, None, None)
        .await;

    // Hostile leads: every digit form, a split number, a name as a place.
    let hostile: [(&str, Value); 5] = [
        ("/volume", json!("０７７７-０３１３-９９９")),
        ("/volume", json!("٠٧٧٧٠٣١٣٩٩٩")),
        ("/time_window", json!("٠٧٧٧٠٣١٣٩٩٩")),
        ("/extras", json!(["+1 777", "0313", "999"])),
        ("/to/locality", json!("Canary Placename")),
    ];
    for (at, value) in hostile {
        let mut input = lead_input(None);
        if at == "/to/locality" {
            input["lead"]["client"]["name"] = json!("Canary Placename");
        }
        *input["lead"].pointer_mut(at).unwrap() = value;
        for kind in ["lead_finalization", "dispatch"] {
            api.refused(
                "/v1/workflows",
                &keys.integration,
                json!({"kind": kind, "key": Uuid::new_v4().to_string(), "input": input}),
                "crew_unsafe_field",
            )
            .await;
        }
    }

    // Courier: a driver registers by deep link and acknowledges a route.
    api.send("POST", "/v1/drivers", &keys.operator, Some(json!({"id": "drv-1", "name": "Canary Drivername", "email": "canary.driver@canary.example"})), None).await;
    let reg = api
        .send(
            "POST",
            "/v1/drivers/drv-1/registration",
            &keys.operator,
            Some(json!({"send_email": true})),
            None,
        )
        .await;
    let token = reg["link"]
        .as_str()
        .unwrap()
        .rsplit("start=")
        .next()
        .unwrap()
        .to_string();
    api.webhook(json!({"update_id": 2, "message": {"message_id": 2, "from": {"id": 9001}, "chat": {"id": 9001, "type": "private"}, "text": format!("/start {token}")}})).await;
    wait_for(Duration::from_secs(30), "the binding", || {
        let pool = &pool;
        async move {
            let (chat,): (Option<i64>,) =
                sqlx::query_as("select telegram_chat_id from drivers where id = 'drv-1'")
                    .fetch_one(pool)
                    .await
                    .unwrap();
            chat.map(|_| ())
        }
    })
    .await;
    api.refused(
        "/v1/dispatches",
        &keys.integration,
        json!({"driver_id": "drv-1", "route": {"reference": "R-8", "text": "Stop 1, the client is on ０７７７-０３１３-９９９"}}),
        "crew_unsafe_field",
    )
    .await;
    let d = api.send("POST", "/v1/dispatches", &keys.integration, Some(json!({"driver_id": "drv-1", "route": {"reference": "R-9", "text": "Canary Route Stop 1, then depot"}})), Some("route-9")).await;
    let id = d["id"].as_str().unwrap().to_string();
    wait_for(Duration::from_secs(30), "the route to go out", || {
        let api = &api;
        let (key, id) = (&keys.integration, &id);
        async move {
            let v = api
                .send("GET", &format!("/v1/dispatches/{id}"), key, None, None)
                .await;
            (v["channels"]["telegram"]["status"] == "sent").then_some(())
        }
    })
    .await;
    api.webhook(
        json!({"update_id": 3, "callback_query": {"id": "cb-3", "from": {"id": 9001},
        "message": {"message_id": 1, "chat": {"id": 9001}}, "data": format!("ack:{id}")}}),
    )
    .await;
    wait_for(Duration::from_secs(30), "the acknowledgement", || {
        let api = &api;
        let (key, id) = (&keys.integration, &id);
        async move {
            let v = api
                .send("GET", &format!("/v1/dispatches/{id}"), key, None, None)
                .await;
            (v["state"] == "ACKNOWLEDGED").then_some(())
        }
    })
    .await;
    api.watched(
        "GET",
        &format!("/v1/dispatches/{id}"),
        &keys.integration,
        None,
        None,
    )
    .await;
    api.watched(
        "GET",
        &format!("/v1/ops/workflows/{id}"),
        &keys.ops,
        None,
        None,
    )
    .await;
    // Masked-number messaging: a relayed SMS, a blocked one, the owner's and ops' views.
    api.send("PUT", "/v1/tenants/acme/providers/twilio", &keys.ops, Some(json!({"account_sid": "ACprivacy", "auth_token": "privacy-twilio-token", "base_url": fake.url})), None).await;
    for (e164, class) in [("+15550100000", "front_desk"), ("+15550200001", "sitter")] {
        api.send(
            "POST",
            "/v1/messaging/numbers",
            &keys.operator,
            Some(json!({"e164": e164, "class": class})),
            None,
        )
        .await;
    }
    api.send(
        "POST",
        "/v1/messaging/sitters",
        &keys.operator,
        Some(json!({"id": "sit-1", "name": "Canary Sittername", "phone": "+15557770001"})),
        None,
    )
    .await;
    api.send(
        "POST",
        "/v1/messaging/clients",
        &keys.operator,
        Some(json!({"id": "cli-1", "name": "Canary Petowner", "phone": "+15557770002"})),
        None,
    )
    .await;
    let now = chrono::Utc::now();
    api.send("POST", "/v1/messaging/bookings", &keys.operator, Some(json!({"client_id": "cli-1", "sitter_id": "sit-1", "service_type": "walk", "recurrence": "weekly",
        "starts_at": now + chrono::Duration::minutes(10), "ends_at": now + chrono::Duration::minutes(40)})), None).await;
    for (sid, body) in [
        ("SMpriv1", "Canary walk note: leash on the hook"),
        ("SMpriv2", "Canary blocked note, call me at 415-555-0177"),
    ] {
        let params = vec![
            ("MessageSid".to_string(), sid.to_string()),
            ("From".to_string(), "+15557770002".to_string()),
            ("To".to_string(), "+15550200001".to_string()),
            ("Body".to_string(), body.to_string()),
        ];
        let url = format!("{}/v1/intake/twilio/acme", api.url);
        let sig = dispatch::intake::twilio_signature("privacy-twilio-token", &url, &params);
        let r = api
            .http
            .post(&url)
            .header("X-Twilio-Signature", sig)
            .form(&params)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let relay: String = wait_for(Duration::from_secs(30), "the relay to go out", || {
        let pool = &pool;
        async move {
            let r: Option<(String,)> = sqlx::query_as(
                "select w.id::text from workflows w where w.kind = 'message_relay' and w.state_name = 'SENT' limit 1",
            )
            .fetch_optional(pool)
            .await
            .unwrap();
            r.map(|r| r.0)
        }
    })
    .await;
    wait_for(Duration::from_secs(30), "the block to be logged", || {
        let pool = &pool;
        async move {
            let (n,): (i64,) = sqlx::query_as("select count(*) from msg_poaching")
                .fetch_one(pool)
                .await
                .unwrap();
            (n == 1).then_some(())
        }
    })
    .await;
    api.watched(
        "GET",
        &format!("/v1/ops/workflows/{relay}"),
        &keys.ops,
        None,
        None,
    )
    .await;
    api.watched(
        "GET",
        "/v1/ops/workflows?kind=message_relay",
        &keys.ops,
        None,
        None,
    )
    .await;
    let inbox = api
        .send("GET", "/v1/messaging/poaching", &keys.operator, None, None)
        .await;
    assert!(
        inbox.to_string().contains("Canary blocked note"),
        "the owner sees the attempt"
    );
    let metrics = api
        .http
        .get(format!("{}/metrics", api.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("dispatch_transitions_total"), "{metrics}");
    // The personal data did go where it belongs: to the operator and the executor.
    let to_provider: String = fake.requests().iter().map(|r| r.body.to_string()).collect();
    assert!(to_provider.contains("Canary Clientname") && to_provider.contains("Canary Route Stop"));

    // Stop the server (SIGTERM drains), then read everything it wrote.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(30), server.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    for r in readers {
        r.await.unwrap();
    }
    let logs = logs.lock().unwrap().clone();
    assert!(
        logs.lines().count() > 1000,
        "TRACE is on: {} lines",
        logs.lines().count()
    );
    assert!(logs.contains("\"level\":\"TRACE\""), "JSON logs at TRACE");
    // Every request runs in a span with its route template and tenant (the
    // template, never the path), and every worker job in one with its ids.
    assert!(
        logs.contains("\"name\":\"request\"")
            && logs.contains("\"http.route\":\"/v1/workflows/{kind}/{key}/signals\""),
        "request spans carry the route template"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("\"name\":\"request\"") && l.contains("\"tenant.id\":")),
        "request spans carry the tenant"
    );
    let seen = api.seen.lock().unwrap().clone();
    // Nothing of the refused leads went to anyone: crew, driver, executor or operator.
    for canary in DIGIT_CANARIES {
        if let Some(at) = to_provider.find(canary) {
            let from = at.saturating_sub(200);
            panic!(
                "`{canary}` was sent to a provider: …{}…",
                &to_provider[from..(at + 50).min(to_provider.len())]
            );
        }
    }
    for canary in CANARIES.iter().chain(MORE_CANARIES).chain(DIGIT_CANARIES) {
        for (what, text) in [
            ("the logs", &logs),
            ("the metrics", &metrics),
            ("a non-operator answer", &seen),
        ] {
            if let Some(at) = text.find(canary) {
                let from = at.saturating_sub(300);
                panic!(
                    "`{canary}` in {what}: …{}…",
                    &text[from..(at + 100).min(text.len())]
                );
            }
        }
    }
    // Provider secrets and API keys stay out of the logs too.
    for secret in [
        "TEST-not-a-real-token",
        TG_SECRET,
        "re_test",
        keys.operator.as_str(),
        keys.ops.as_str(),
        "privacy-twilio-token",
    ] {
        assert!(!logs.contains(secret), "a secret in the logs");
    }
}
