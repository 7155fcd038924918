//! Real channels against a fake provider server: lead finalization, crew
//! publishing, chat claims, retries, verified webhooks, rate limits.

mod common;
#[path = "common/fake.rs"]
mod fake;

use std::time::{Duration, Instant};

use common::*;
use fake::Fake;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use uuid::Uuid;

const CREW_CHAT: &str = "-100200300";
const OPERATOR_CHAT: i64 = 5001;
const SECRET: &str = "hook-secret-for-tests";

async fn ops_put(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let r = app
        .http
        .put(format!("{}{path}", app.url))
        .bearer_auth(&app.keys.ops)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn add_person(app: &TestApp, body: Value) {
    let r = app
        .http
        .post(format!("{}/v1/people", app.url))
        .bearer_auth(&app.keys.operator)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

/// A tenant on Telegram: bot at the fake, crew group, operator chat, two executors and an operator.
async fn telegram_tenant(app: &TestApp, fake: &Fake, extra: Value) {
    let (code, body) = ops_put(
        app,
        "/v1/tenants/acme/providers/telegram",
        json!({"bot_token": "123456:TEST-not-a-real-token", "webhook_secret": SECRET, "bot_username": "DispatchBot", "base_url": fake.url}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let mut config = json!({"dispatch": {
        "operator": {"send_full": true, "send_crew_fallback": true, "provider": "telegram", "to": OPERATOR_CHAT},
        "crew": {"enabled": true, "provider": "telegram", "chat_id": CREW_CHAT}}});
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    let (code, body) = ops_put(app, "/v1/tenants/acme/config", config).await;
    assert_eq!(code, 200, "{body}");
    add_person(app, json!({"id": "executor-1", "role": "executor", "display_name": "Avi", "telegram_user_id": 7001, "telegram_username": "crew_one"})).await;
    add_person(app, json!({"id": "executor-2", "role": "executor", "display_name": "Benny", "telegram_user_id": 7002})).await;
    add_person(app, json!({"id": "op-1", "role": "operator", "display_name": "Dana", "telegram_user_id": OPERATOR_CHAT})).await;
}

async fn finalize(app: &TestApp) -> String {
    let lead = Uuid::new_v4().to_string();
    let (code, body) = app
        .start(
            &app.keys.integration,
            "lead_finalization",
            &lead,
            lead_input(None),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["state"], "FINALIZED");
    lead
}

async fn telegram_update(app: &TestApp, secret: Option<&str>, update: &Value) -> (u16, Value) {
    let mut r = app
        .http
        .post(format!("{}/v1/intake/telegram/acme", app.url))
        .json(update);
    if let Some(s) = secret {
        r = r.header("X-Telegram-Bot-Api-Secret-Token", s);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn text_update(update_id: i64, from: i64, text: &str) -> Value {
    json!({"update_id": update_id, "message": {"message_id": 50 + update_id, "from": {"id": from, "is_bot": false, "first_name": "X"},
           "chat": {"id": CREW_CHAT.parse::<i64>().unwrap(), "type": "supergroup"}, "text": text}})
}

fn button_update(update_id: i64, from: i64, data: &str, message_id: i64) -> Value {
    json!({"update_id": update_id, "callback_query": {"id": format!("cb-{update_id}"), "from": {"id": from},
           "message": {"message_id": message_id, "chat": {"id": CREW_CHAT.parse::<i64>().unwrap()}}, "data": data}})
}

async fn wait_calls(fake: &Fake, path: &str, n: usize) -> Vec<fake::Recorded> {
    wait_for(
        Duration::from_secs(20),
        &format!("{n} calls to {path}"),
        || {
            let calls = fake.ok_calls(path);
            async move { (calls.len() >= n).then_some(calls) }
        },
    )
    .await
}

fn chat_of(r: &fake::Recorded) -> String {
    r.body["chat_id"].to_string().trim_matches('"').to_string()
}

#[tokio::test]
async fn lead_finalized_notifies_the_operator_per_flags_and_publishes_a_crew_safe_post() {
    let app = TestApp::spawn().await;
    let fake = Fake::start().await;
    telegram_tenant(&app, &fake, json!({})).await;
    let lead = finalize(&app).await;
    let wf = app.wait_state(&lead, "PUBLISHED").await;
    let sends = wait_calls(&fake, "/sendMessage", 3).await;
    let to_operator: Vec<&fake::Recorded> = sends
        .iter()
        .filter(|r| chat_of(r) == OPERATOR_CHAT.to_string())
        .collect();
    assert_eq!(to_operator.len(), 2, "full lead + crew-safe copy");
    let full = to_operator
        .iter()
        .find(|r| {
            r.body["text"]
                .as_str()
                .unwrap()
                .contains("Canary Clientname")
        })
        .expect("full lead");
    assert_eq!(full.body["protect_content"], true);
    let fallback = to_operator
        .iter()
        .find(|r| r.body["text"].as_str().unwrap().starts_with("FOR CREW"))
        .expect("crew copy");
    let crew: Vec<&fake::Recorded> = sends.iter().filter(|r| chat_of(r) == CREW_CHAT).collect();
    assert_eq!(crew.len(), 1);
    for msg in [fallback, crew[0]] {
        let text = msg.body["text"].as_str().unwrap();
        for canary in CANARIES {
            assert!(!text.contains(canary), "{canary} leaked: {text}");
        }
        assert!(
            text.contains(&format!("Job #{}", &lead[..8]))
                && text.contains("Route: Haifa → Kiryat Ata")
        );
    }
    assert_eq!(
        crew[0].body["reply_markup"]["inline_keyboard"][0][0]["callback_data"],
        format!("claim:{}", &lead[..8])
    );
    assert_eq!(wf["data"]["post"]["provider"], "telegram");
    assert_eq!(wf["data"]["post"]["chat_id"], CREW_CHAT);

    // Flags change at run time: only the crew copy, no dispatch.
    let (code, _) = ops_put(&app, "/v1/tenants/acme/config", json!({"dispatch": {
        "operator": {"send_full": false, "send_crew_fallback": true, "provider": "telegram", "to": OPERATOR_CHAT},
        "crew": {"enabled": false}}}))
    .await;
    assert_eq!(code, 200);
    let before = fake.ok_calls("/sendMessage").len();
    let lead2 = finalize(&app).await;
    app.wait_effects_settled().await;
    let after = fake.ok_calls("/sendMessage");
    assert_eq!(after.len(), before + 1, "one message: the crew-safe copy");
    assert!(after.last().unwrap().body["text"]
        .as_str()
        .unwrap()
        .contains(&format!("Job #{}", &lead2[..8])));
    let (code, _) = app.get(&app.keys.operator, &lead2).await;
    assert_eq!(code, 404, "no dispatch workflow when crew is disabled");
}

#[tokio::test]
async fn claims_by_command_and_by_button_end_in_the_reserved_edit_and_losers_are_told() {
    let app = TestApp::spawn().await;
    let fake = Fake::start().await;
    telegram_tenant(&app, &fake, json!({})).await;
    let lead = finalize(&app).await;
    let wf = app.wait_state(&lead, "PUBLISHED").await;
    let post_id: i64 = wf["data"]["post"]["message_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let short = &lead[..8];

    // An unknown sender gets a polite reply and no transition.
    let (code, body) = telegram_update(
        &app,
        Some(SECRET),
        &text_update(1, 9999, &format!("/claim {short}")),
    )
    .await;
    assert_eq!((code, body["status"].as_str()), (200, Some("queued")));
    let polite = wait_for(Duration::from_secs(10), "the polite reply", || {
        let calls = fake.ok_calls("/sendMessage");
        async move {
            calls.into_iter().find(|r| {
                r.body["text"]
                    .as_str()
                    .unwrap_or("")
                    .contains("not registered")
            })
        }
    })
    .await;
    assert_eq!(chat_of(&polite), CREW_CHAT);
    assert_eq!(
        app.get(&app.keys.operator, &lead).await.1["state"],
        "PUBLISHED"
    );

    // The group command, with the bot's name, claims.
    let (code, _) = telegram_update(
        &app,
        Some(SECRET),
        &text_update(2, 7001, &format!("/claim@DispatchBot {short}")),
    )
    .await;
    assert_eq!(code, 200);
    // The same update delivered again is stored once.
    let (_, dup) = telegram_update(
        &app,
        Some(SECRET),
        &text_update(2, 7001, &format!("/claim@DispatchBot {short}")),
    )
    .await;
    assert_eq!(dup["status"], "duplicate");
    let wf = app.wait_state(&lead, "CLAIMED").await;
    assert_eq!(wf["data"]["claim"]["claimed_by"], "executor-1");
    let notice = wait_for(
        Duration::from_secs(10),
        "the operator's claim notice",
        || {
            let calls = fake.ok_calls("/sendMessage");
            async move {
                calls.into_iter().find(|r| {
                    r.body["text"]
                        .as_str()
                        .unwrap_or("")
                        .contains("was claimed by")
                })
            }
        },
    )
    .await;
    assert_eq!(chat_of(&notice), OPERATOR_CHAT.to_string());
    assert_eq!(
        notice.body["text"],
        format!("Job #{short} was claimed by @crew_one. Confirm or reject the claim.")
    );
    let edit = wait_calls(&fake, "/editMessageText", 1).await;
    assert_eq!(edit[0].body["message_id"], post_id);
    assert_eq!(
        edit[0].body["text"],
        format!("Job #{short} — Reserved by @crew_one")
    );

    // A second executor presses the button: told it is taken.
    let (code, _) = telegram_update(
        &app,
        Some(SECRET),
        &button_update(3, 7002, &format!("claim:{short}"), post_id),
    )
    .await;
    assert_eq!(code, 200);
    let answer = wait_calls(&fake, "/answerCallbackQuery", 1).await;
    assert_eq!(answer[0].body["callback_query_id"], "cb-3");
    assert!(answer[0].body["text"]
        .as_str()
        .unwrap()
        .contains("already taken"));
    let (signals,): (i64,) = sqlx::query_as("select count(*) from signals where name = 'claim'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        signals, 2,
        "the duplicate update and the unknown sender made no signal"
    );

    // A second job claimed by the button.
    let lead2 = finalize(&app).await;
    let wf2 = app.wait_state(&lead2, "PUBLISHED").await;
    let post2: i64 = wf2["data"]["post"]["message_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    telegram_update(
        &app,
        Some(SECRET),
        &button_update(4, 7002, &format!("claim:{}", &lead2[..8]), post2),
    )
    .await;
    let wf2 = app.wait_state(&lead2, "CLAIMED").await;
    assert_eq!(wf2["data"]["claim"]["claimed_by"], "executor-2");
    let edits = wait_calls(&fake, "/editMessageText", 2).await;
    assert!(edits.iter().any(|e| e.body["message_id"] == post2
        && e.body["text"] == format!("Job #{} — Reserved by Benny", &lead2[..8])));

    // The operator releases from the chat with a reason; the executor gets the details privately.
    telegram_update(
        &app,
        Some(SECRET),
        &text_update(5, OPERATOR_CHAT, &format!("/release {short} paid in cash")),
    )
    .await;
    app.wait_state(&lead, "DETAILS_RELEASED").await;
    let private = wait_for(Duration::from_secs(10), "the private release", || {
        let calls = fake.ok_calls("/sendMessage");
        async move { calls.into_iter().find(|r| chat_of(r) == "7001") }
    })
    .await;
    assert_eq!(private.body["protect_content"], true);
    assert!(private.body["text"]
        .as_str()
        .unwrap()
        .contains("Canary Clientname"));
}

#[tokio::test]
async fn provider_failures_are_retried_or_dead_lettered_and_identical_edits_succeed() {
    let app = TestApp::spawn().await;
    let fake = Fake::start().await;
    telegram_tenant(&app, &fake, json!({})).await;
    // The crew post: one 429 with retry_after, then one 500, then success.
    fake.fail("/sendMessage", 429, json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry after 1", "parameters": {"retry_after": 1}}), &[("retry-after", "1")], 1);
    fake.fail(
        "/sendMessage",
        500,
        json!({"ok": false, "error_code": 500, "description": "Internal Server Error"}),
        &[],
        1,
    );
    let lead = Uuid::new_v4().to_string();
    let (code, _) = app
        .start(&app.keys.integration, "dispatch", &lead, lead_input(None))
        .await;
    assert_eq!(code, 201);
    let wf = app.wait_state(&lead, "PUBLISHED").await;
    let publish = wf["effects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "dispatch_publish")
        .unwrap()
        .clone();
    assert_eq!(
        (publish["status"].as_str(), publish["attempts"].as_i64()),
        (Some("delivered"), Some(3)),
        "{publish}"
    );
    let tries: Vec<fake::Recorded> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/sendMessage"))
        .collect();
    let statuses: Vec<u16> = tries.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [429, 500, 200],
        "delivered once after two failures"
    );
    let waited = tries[1].at.duration_since(tries[0].at);
    assert!(
        waited >= Duration::from_millis(950),
        "Retry-After honoured: waited {waited:?}"
    );

    // An identical edit ("message is not modified") counts as success.
    fake.fail("/editMessageText", 400, json!({"ok": false, "error_code": 400, "description": "Bad Request: message is not modified: specified new message content and reply markup are exactly the same"}), &[], 1);
    let (_, body) = app
        .signal(
            &app.keys.executor,
            &lead,
            "c1",
            "claim",
            json!({}),
            Some(10_000),
        )
        .await;
    assert_eq!(body["state"], "CLAIMED");
    app.wait_effects_settled().await;
    let (_, wf) = app.get(&app.keys.ops, &lead).await;
    let edit = wf["effects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "crew_post_reserved")
        .unwrap()
        .clone();
    assert_eq!(
        (edit["status"].as_str(), edit["attempts"].as_i64()),
        (Some("delivered"), Some(1)),
        "{edit}"
    );

    // A permanent 400 dead-letters and the workflow shows it.
    fake.fail(
        "/editMessageText",
        400,
        json!({"ok": false, "error_code": 400, "description": "Bad Request: chat not found"}),
        &[],
        1,
    );
    let (_, body) = app
        .signal(
            &app.keys.operator,
            &lead,
            "r1",
            "reject_claim",
            json!({}),
            Some(10_000),
        )
        .await;
    assert_eq!(body["state"], "PUBLISHED");
    app.wait_effects_settled().await;
    let (_, wf) = app.get(&app.keys.ops, &lead).await;
    let restored = wf["effects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "crew_post_restored")
        .unwrap()
        .clone();
    assert_eq!(restored["status"], "dead");
    assert!(restored["last_error"]
        .as_str()
        .unwrap()
        .contains("chat not found"));
    assert!(wf["attention"]
        .as_str()
        .unwrap()
        .contains("crew_post_restored"));
}

#[tokio::test]
async fn webhooks_are_verified_before_anything_is_stored() {
    let app = TestApp::spawn().await;
    let fake = Fake::start().await;
    telegram_tenant(&app, &fake, json!({})).await;
    let update = text_update(10, 7001, "hello");
    assert_eq!(telegram_update(&app, None, &update).await.0, 401);
    assert_eq!(
        telegram_update(&app, Some("wrong-secret"), &update).await.0,
        401
    );
    let r = app
        .http
        .post(format!("{}/v1/intake/telegram/nobody", app.url))
        .header("X-Telegram-Bot-Api-Secret-Token", SECRET)
        .json(&update)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let stored = || async {
        sqlx::query_as::<_, (i64,)>("select count(*) from inbound_events")
            .fetch_one(&app.pool)
            .await
            .unwrap()
            .0
    };
    assert_eq!(stored().await, 0);
    assert_eq!(telegram_update(&app, Some(SECRET), &update).await.0, 200);
    assert_eq!(stored().await, 1);

    // WhatsApp: the verify-token handshake and the X-Hub-Signature-256 scheme.
    let (code, body) = ops_put(&app, "/v1/tenants/acme/providers/whatsapp", json!({
        "access_token": "wa-test-token", "app_secret": "meta-app-secret", "verify_token": "verify-me",
        "phone_number_id": "1234567890", "base_url": fake.url}))
    .await;
    assert_eq!(code, 200, "{body}");
    let hs = |token: &str| {
        app.http.get(format!("{}/v1/intake/whatsapp/acme?hub.mode=subscribe&hub.verify_token={token}&hub.challenge=1158201444", app.url)).send()
    };
    let ok = hs("verify-me").await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.unwrap(), "1158201444");
    assert_eq!(hs("nope").await.unwrap().status(), 403);
    let wa = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
        "messaging_product": "whatsapp", "metadata": {"phone_number_id": "1234567890"},
        "messages": [{"from": "972500000009", "id": "wamid.IN1", "timestamp": "1700000000", "type": "text", "text": {"body": "hi"}}]}}]}]});
    let raw = serde_json::to_vec(&wa).unwrap();
    let sign = |body: &[u8]| {
        let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(b"meta-app-secret").unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    let post = |body: Vec<u8>, sig: Option<String>| {
        let mut r = app
            .http
            .post(format!("{}/v1/intake/whatsapp/acme", app.url))
            .header("content-type", "application/json")
            .body(body);
        if let Some(s) = sig {
            r = r.header("X-Hub-Signature-256", s);
        }
        r.send()
    };
    let mut tampered = raw.clone();
    let at = tampered.iter().position(|b| *b == b'h').unwrap();
    tampered[at] = b'H';
    assert_eq!(
        post(tampered, Some(sign(&raw))).await.unwrap().status(),
        401
    );
    assert_eq!(post(raw.clone(), None).await.unwrap().status(), 401);
    assert_eq!(
        post(raw.clone(), Some("sha256=00".into()))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(stored().await, 1);
    let r = post(raw.clone(), Some(sign(&raw))).await.unwrap();
    assert_eq!(r.status(), 200);
    // A payload for another tenant's number (one Meta app, several tenants) is not ours.
    let foreign = serde_json::to_vec(&json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
        "metadata": {"phone_number_id": "999"},
        "messages": [{"from": "972500000009", "id": "wamid.OTHER", "type": "text", "text": {"body": "hi"}}]}}]}]})).unwrap();
    let r: Value = post(foreign.clone(), Some(sign(&foreign)))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["status"], "ignored");
    let second: Value = post(raw.clone(), Some(sign(&raw)))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(second["status"], "duplicate");
    assert_eq!(stored().await, 2);

    // Twilio: signed over the public URL plus the sorted form parameters.
    let (code, _) = ops_put(&app, "/v1/tenants/acme/providers/twilio", json!({"account_sid": "ACtest", "auth_token": "twilio-auth-token", "from": "+15550001111", "base_url": fake.url})).await;
    assert_eq!(code, 200);
    let params = vec![
        ("MessageSid".to_string(), "SM0001".to_string()),
        ("From".to_string(), "+15550002222".to_string()),
        ("Body".to_string(), "hello".to_string()),
    ];
    let url = format!("{}/v1/intake/twilio/acme", app.url);
    let good = dispatch::intake::twilio_signature("twilio-auth-token", &url, &params);
    let send = |sig: &str, params: &Vec<(String, String)>| {
        app.http
            .post(&url)
            .header("X-Twilio-Signature", sig)
            .form(params)
            .send()
    };
    assert_eq!(send("bogus", &params).await.unwrap().status(), 401);
    let mut changed = params.clone();
    changed[2].1 = "hell0".into();
    assert_eq!(send(&good, &changed).await.unwrap().status(), 401);
    assert_eq!(stored().await, 2);
    let r = send(&good, &params).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("<Response>"));
    assert_eq!(stored().await, 3);
}

#[tokio::test]
async fn a_burst_to_one_chat_goes_out_at_the_configured_rate_without_provider_errors() {
    let app = TestApp::spawn().await;
    let fake = Fake::start().await;
    // 20 messages a second to the crew chat; the fake refuses a 22nd within any second.
    telegram_tenant(&app, &fake, json!({"rate_limits": {"telegram_chat_per_s": 20, "telegram_group_per_min": 100000, "telegram_bot_per_s": 1000}})).await;
    fake.enforce_chat_rate(21);
    let started = Instant::now();
    let mut leads = Vec::new();
    for _ in 0..100 {
        let lead = Uuid::new_v4().to_string();
        let (code, _) = app
            .start(&app.keys.integration, "dispatch", &lead, lead_input(None))
            .await;
        assert_eq!(code, 201);
        leads.push(lead);
    }
    let sends = wait_for(Duration::from_secs(60), "100 crew posts", || {
        let calls: Vec<fake::Recorded> = fake
            .requests()
            .into_iter()
            .filter(|r| r.path.contains("/sendMessage"))
            .collect();
        async move { (calls.iter().filter(|r| r.status == 200).count() >= 100).then_some(calls) }
    })
    .await;
    let elapsed = started.elapsed();
    assert!(
        sends.iter().all(|r| r.status == 200),
        "no provider errors: {:?}",
        sends.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(sends.len(), 100, "each post sent once");
    // 100 posts at 20/s take at least 99 intervals of 50 ms.
    let span = sends.last().unwrap().at.duration_since(sends[0].at);
    assert!(
        span >= Duration::from_millis(99 * 50 * 9 / 10),
        "paced: {span:?} (elapsed {elapsed:?})"
    );
    let max_in_any_second = sends
        .iter()
        .map(|a| {
            sends
                .iter()
                .filter(|b| b.at >= a.at && b.at < a.at + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    assert!(
        max_in_any_second <= 21,
        "at most 20 (+1 at the window edge) per second, saw {max_in_any_second}"
    );
    for lead in &leads {
        app.wait_state(lead, "PUBLISHED").await;
    }
}

#[tokio::test]
async fn whatsapp_crews_get_a_broadcast_and_claim_by_reply() {
    let app = TestApp::spawn().await;
    let fake = Fake::start().await;
    let (code, _) = ops_put(&app, "/v1/tenants/acme/providers/whatsapp", json!({
        "access_token": "wa-test-token", "app_secret": "meta-app-secret", "verify_token": "verify-me",
        "phone_number_id": "1234567890", "template_name": "job_update", "base_url": fake.url}))
    .await;
    assert_eq!(code, 200);
    let (code, body) = ops_put(
        &app,
        "/v1/tenants/acme/config",
        json!({"dispatch": {"crew": {"enabled": true, "provider": "whatsapp"}}}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    add_person(&app, json!({"id": "executor-1", "role": "executor", "display_name": "Avi", "phone": "+972500000001"})).await;
    add_person(&app, json!({"id": "executor-2", "role": "executor", "display_name": "Benny", "phone": "+972500000002"})).await;
    let lead = finalize(&app).await;
    app.wait_state(&lead, "PUBLISHED").await;
    let sent = wait_calls(&fake, "/1234567890/messages", 2).await;
    let to: Vec<&str> = sent
        .iter()
        .map(|r| r.body["to"].as_str().unwrap())
        .collect();
    assert!(
        to.contains(&"972500000001") && to.contains(&"972500000002"),
        "{to:?}"
    );
    // Outside the 24-hour window: the approved template, carrying the crew text.
    for r in &sent {
        assert_eq!(r.body["type"], "template");
        assert_eq!(r.body["template"]["name"], "job_update");
        assert!(r.body["template"]["components"][0]["parameters"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("FOR CREW"));
        assert_eq!(
            r.headers.get("authorization").map(String::as_str),
            Some("Bearer wa-test-token")
        );
    }
    // Executor 1 replies "claim <id>".
    let inbound = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
        "metadata": {"phone_number_id": "1234567890"},
        "messages": [{"from": "972500000001", "id": "wamid.CLAIM1", "type": "text", "text": {"body": format!("claim {}", &lead[..8])}}]}}]}]});
    let raw = serde_json::to_vec(&inbound).unwrap();
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(b"meta-app-secret").unwrap();
    mac.update(&raw);
    let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let r = app
        .http
        .post(format!("{}/v1/intake/whatsapp/acme", app.url))
        .header("X-Hub-Signature-256", sig)
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let wf = app.wait_state(&lead, "CLAIMED").await;
    assert_eq!(wf["data"]["claim"]["claimed_by"], "executor-1");
    // The claimer wrote within the window: the answer is plain text.
    let reply = wait_for(Duration::from_secs(10), "the claim answer", || {
        let calls = fake.ok_calls("/messages");
        async move {
            calls.into_iter().find(|r| {
                r.body["type"] == "text"
                    && r.body["to"] == "972500000001"
                    && r.body["text"]["body"]
                        .as_str()
                        .unwrap_or("")
                        .contains("reserved for you")
            })
        }
    })
    .await;
    assert!(reply.body["text"]["body"]
        .as_str()
        .unwrap()
        .contains("reserved for you"));
}

#[tokio::test]
async fn operators_can_be_reached_by_sms_and_email() {
    let app = TestApp::spawn().await;
    let fake = Fake::start().await;
    let put = |p: &'static str, b: Value| ops_put(&app, p, b);
    assert_eq!(put("/v1/tenants/acme/providers/twilio", json!({"account_sid": "ACtest", "auth_token": "tw-token", "from": "+15550001111", "base_url": fake.url})).await.0, 200);
    assert_eq!(put("/v1/tenants/acme/config", json!({"dispatch": {"operator": {"send_full": false, "provider": "sms", "to": "+15550009999"}}})).await.0, 200);
    finalize(&app).await;
    let sms = wait_calls(&fake, "/Accounts/ACtest/Messages.json", 1).await;
    assert_eq!(sms[0].body["To"], "+15550009999");
    assert_eq!(sms[0].body["From"], "+15550001111");
    assert!(sms[0].body["Body"]
        .as_str()
        .unwrap()
        .starts_with("FOR CREW"));
    assert!(sms[0].headers["authorization"].starts_with("Basic "));

    assert_eq!(
        put(
            "/v1/tenants/acme/providers/resend",
            json!({"api_key": "re-test-key", "from": "ops@example.test", "base_url": fake.url})
        )
        .await
        .0,
        200
    );
    assert_eq!(put("/v1/tenants/acme/config", json!({"dispatch": {"operator": {"send_full": false, "provider": "email", "to": "dana@example.test"}}})).await.0, 200);
    finalize(&app).await;
    let mail = wait_calls(&fake, "/emails", 1).await;
    assert_eq!(mail[0].body["to"], json!(["dana@example.test"]));
    assert!(mail[0].headers["idempotency-key"].ends_with(":crew_fallback_v1"));
    assert!(mail[0].body["subject"]
        .as_str()
        .unwrap()
        .starts_with("Job #"));
}

#[tokio::test]
async fn provider_secrets_are_write_only_and_config_is_validated() {
    let app = TestApp::spawn().await;
    let (code, body) = ops_put(&app, "/v1/tenants/acme/providers/telegram", json!({"bot_token": "123456:TEST-secret-value", "webhook_secret": "s3cret", "bot_username": "DispatchBot"})).await;
    assert_eq!(code, 200);
    assert_eq!(body["secrets_set"], json!(["bot_token", "webhook_secret"]));
    assert!(
        !body.to_string().contains("TEST-secret-value") && !body.to_string().contains("s3cret")
    );
    // A later PUT without secrets keeps them.
    let (_, body) = ops_put(
        &app,
        "/v1/tenants/acme/providers/telegram",
        json!({"bot_username": "OtherBot"}),
    )
    .await;
    assert_eq!(body["secrets_set"], json!(["bot_token", "webhook_secret"]));
    let r = app
        .http
        .get(format!("{}/v1/tenants/acme/providers/telegram", app.url))
        .bearer_auth(&app.keys.ops)
        .send()
        .await
        .unwrap();
    let got: Value = r.json().await.unwrap();
    assert_eq!(got["settings"]["bot_username"], "OtherBot");
    assert!(!got.to_string().contains("TEST-secret-value"));
    let (code, body) = ops_put(
        &app,
        "/v1/tenants/acme/providers/telegram",
        json!({"bot_tokn": "x"}),
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (422, Some("invalid_body"))
    );
    let r = app
        .http
        .put(format!("{}/v1/tenants/acme/providers/telegram", app.url))
        .bearer_auth(&app.keys.operator)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let other = make_tenant(&app.pool, "other").await;
    let r = app
        .http
        .put(format!("{}/v1/tenants/acme/providers/telegram", app.url))
        .bearer_auth(&other.ops)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let (code, body) = ops_put(
        &app,
        "/v1/tenants/acme/config",
        json!({"dispatch": {"crew": {"enabeld": true}}}),
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (422, Some("invalid_body"))
    );
    let (code, _) = ops_put(
        &app,
        "/v1/tenants/acme/config",
        json!({"dispatch": {"crew": {"enabled": true, "provider": "telegram"}}}),
    )
    .await;
    assert_eq!(code, 422, "a telegram crew needs a chat id");
    let (code, _) = ops_put(
        &app,
        "/v1/tenants/acme/config",
        json!({"dispatch": {"crew": {"enabled": true, "provider": "telegram", "chat_id": -1001}}}),
    )
    .await;
    assert_eq!(code, 200);
    let r = app
        .http
        .get(format!("{}/v1/tenants/acme/config", app.url))
        .bearer_auth(&app.keys.operator)
        .send()
        .await
        .unwrap();
    let cfg: Value = r.json().await.unwrap();
    assert_eq!(cfg["dispatch"]["crew"]["chat_id"], -1001);

    let r = app
        .http
        .post(format!("{}/v1/people", app.url))
        .bearer_auth(&app.keys.operator)
        .json(&json!({"id": "e9", "role": "executor", "display_name": "X", "phone": "0501234567"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422, "phones are E.164");
    let r = app
        .http
        .post(format!("{}/v1/people", app.url))
        .bearer_auth(&app.keys.executor)
        .json(&json!({"id": "e9", "role": "executor", "display_name": "X"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn the_post_is_restored_on_reject_and_marked_on_expiry() {
    let app = TestApp::spawn().await;
    let fake = Fake::start().await;
    telegram_tenant(&app, &fake, json!({})).await;
    let lead = Uuid::new_v4().to_string();
    let (code, _) = app
        .start(
            &app.keys.integration,
            "dispatch",
            &lead,
            lead_input(Some(2)),
        )
        .await;
    assert_eq!(code, 201);
    let wf = app.wait_state(&lead, "PUBLISHED").await;
    let post_id: i64 = wf["data"]["post"]["message_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (_, body) = app
        .signal(
            &app.keys.executor,
            &lead,
            "c1",
            "claim",
            json!({}),
            Some(10_000),
        )
        .await;
    assert_eq!(body["state"], "CLAIMED");
    let (_, body) = app
        .signal(
            &app.keys.operator,
            &lead,
            "r1",
            "reject_claim",
            json!({}),
            Some(10_000),
        )
        .await;
    assert_eq!(body["state"], "PUBLISHED");
    let edits = wait_calls(&fake, "/editMessageText", 2).await;
    let restore = &edits[1];
    assert_eq!(restore.body["message_id"], post_id);
    assert!(
        restore.body["text"]
            .as_str()
            .unwrap()
            .starts_with("FOR CREW"),
        "{}",
        restore.body
    );
    assert_eq!(
        restore.body["reply_markup"]["inline_keyboard"][0][0]["callback_data"],
        format!("claim:{}", &lead[..8])
    );
    app.wait_state(&lead, "EXPIRED").await;
    let edits = wait_calls(&fake, "/editMessageText", 3).await;
    assert_eq!(edits[2].body["message_id"], post_id);
    assert_eq!(
        edits[2].body["text"],
        format!("Job #{} — Expired (not claimed in time)", &lead[..8])
    );
    assert_eq!(
        edits[2].body["reply_markup"]["inline_keyboard"],
        json!([]),
        "no Claim button on an expired job"
    );
}

#[tokio::test]
async fn claims_for_another_bot_or_outside_the_crew_group_do_nothing() {
    let app = TestApp::spawn().await;
    let fake = Fake::start().await;
    telegram_tenant(&app, &fake, json!({})).await;
    let lead = finalize(&app).await;
    app.wait_state(&lead, "PUBLISHED").await;
    let short = &lead[..8];
    telegram_update(
        &app,
        Some(SECRET),
        &text_update(1, 7001, &format!("/claim@OtherBot {short}")),
    )
    .await;
    let mut private = text_update(2, 7001, &format!("/claim {short}"));
    private["message"]["chat"]["id"] = json!(7001);
    telegram_update(&app, Some(SECRET), &private).await;
    let told = wait_for(Duration::from_secs(10), "the wrong-chat answer", || {
        let calls = fake.ok_calls("/sendMessage");
        async move {
            calls.into_iter().find(|r| {
                r.body["text"]
                    .as_str()
                    .unwrap_or("")
                    .contains("claimed in the crew group")
            })
        }
    })
    .await;
    assert_eq!(chat_of(&told), "7001");
    // The two events are processed independently: wait for both outcomes.
    let outcomes: Vec<(String,)> = wait_for(Duration::from_secs(10), "both outcomes", || async {
        let rows: Vec<(Option<String>,)> =
            sqlx::query_as("select outcome from inbound_events order by received_at")
                .fetch_all(&app.pool)
                .await
                .unwrap();
        rows.iter()
            .all(|r| r.0.is_some())
            .then(|| rows.into_iter().map(|r| (r.0.unwrap(),)).collect())
    })
    .await;
    assert_eq!(
        outcomes,
        [("other_bot".to_string(),), ("wrong_chat".to_string(),)]
    );
    assert_eq!(
        app.get(&app.keys.operator, &lead).await.1["state"],
        "PUBLISHED"
    );
}

#[tokio::test]
async fn twilio_signatures_cover_the_public_url() {
    let app = TestApp::spawn_with(dispatch::ProcessRole::All, |s| {
        s.public_url = Some("https://dispatch.example.test".into())
    })
    .await;
    let fake = Fake::start().await;
    let (code, _) = ops_put(&app, "/v1/tenants/acme/providers/twilio", json!({"account_sid": "ACtest", "auth_token": "twilio-auth-token", "from": "+15550001111", "base_url": fake.url})).await;
    assert_eq!(code, 200);
    let params = vec![
        ("MessageSid".to_string(), "SM0002".to_string()),
        ("From".to_string(), "+15550002222".to_string()),
        ("Body".to_string(), "hi".to_string()),
    ];
    let local = format!("{}/v1/intake/twilio/acme?src=sms", app.url);
    let public = "https://dispatch.example.test/v1/intake/twilio/acme?src=sms";
    let post = |sig: Option<String>| {
        let mut r = app.http.post(&local).form(&params);
        if let Some(s) = sig {
            r = r.header("X-Twilio-Signature", s);
        }
        r.send()
    };
    assert_eq!(post(None).await.unwrap().status(), 401, "missing signature");
    let over_local = dispatch::intake::twilio_signature("twilio-auth-token", &local, &params);
    assert_eq!(
        post(Some(over_local)).await.unwrap().status(),
        401,
        "signed over the wrong URL"
    );
    let (stored,): (i64,) = sqlx::query_as("select count(*) from inbound_events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    let over_public = dispatch::intake::twilio_signature("twilio-auth-token", public, &params);
    assert_eq!(post(Some(over_public)).await.unwrap().status(), 200);
}
