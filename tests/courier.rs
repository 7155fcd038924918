//! Route dispatch to drivers (DOMAIN.md §3) against the fake providers:
//! registration by Telegram deep link (QR, email, `/start`, reuse and expiry
//! refused) and a batch of 200 dispatches with mixed channels, a failing email
//! provider, delivery webhooks and acknowledgements.

mod common;
#[path = "common/fake.rs"]
mod fake;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use fake::Fake;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};

const TG_SECRET: &str = "tg-hook-secret-for-tests";
const RESEND_KEY: &[u8] = b"resend-webhook-key-for-tests";

async fn call(app: &TestApp, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = app
        .http
        .request(method.parse().unwrap(), format!("{}{path}", app.url))
        .bearer_auth(&app.keys.operator);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn providers(app: &TestApp, fake: &Fake) {
    let put = |path: &str, body: Value| {
        let req = app
            .http
            .put(format!("{}{path}", app.url))
            .bearer_auth(&app.keys.ops)
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
    };
    put(
        "/v1/tenants/acme/providers/telegram",
        json!({"bot_token": "123456:TEST-not-a-real-token", "webhook_secret": TG_SECRET,
               "bot_username": "CourierBot", "base_url": fake.url}),
    )
    .await;
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(RESEND_KEY)
    );
    put(
        "/v1/tenants/acme/providers/resend",
        json!({"api_key": "re_test_key", "from": "routes@courier.example", "base_url": fake.url,
               "webhook_secret": secret}),
    )
    .await;
    // Private chats: let the test's bursts through quickly.
    put(
        "/v1/tenants/acme/config",
        json!({"rate_limits": {"telegram_chat_per_s": 50}}),
    )
    .await;
}

async fn add_driver(app: &TestApp, id: &str, email: Option<&str>) {
    let mut body = json!({"id": id, "name": format!("Driver {id}")});
    if let Some(e) = email {
        body["email"] = json!(e);
    }
    let (code, answer) = call(app, "POST", "/v1/drivers", Some(body)).await;
    assert_eq!(code, 201, "{answer}");
}

async fn telegram(app: &TestApp, update: Value) {
    let r = app
        .http
        .post(format!("{}/v1/intake/telegram/acme", app.url))
        .header("X-Telegram-Bot-Api-Secret-Token", TG_SECRET)
        .json(&update)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

fn private_text(update_id: i64, user: i64, text: &str) -> Value {
    json!({"update_id": update_id, "message": {"message_id": update_id, "from": {"id": user, "is_bot": false, "first_name": "D"},
           "chat": {"id": user, "type": "private"}, "text": text}})
}

fn button(update_id: i64, user: i64, data: &str) -> Value {
    json!({"update_id": update_id, "callback_query": {"id": format!("cb-{update_id}"), "from": {"id": user},
           "message": {"message_id": 1, "chat": {"id": user}}, "data": data}})
}

/// Messages the fake Telegram got for one chat, in order.
fn sent_to(fake: &Fake, chat: i64) -> Vec<String> {
    fake.ok_calls("/sendMessage")
        .into_iter()
        .filter(|r| r.body["chat_id"] == chat)
        .map(|r| r.body["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn answers(fake: &Fake, callback: &str) -> Vec<String> {
    fake.ok_calls("/answerCallbackQuery")
        .into_iter()
        .filter(|r| r.body["callback_query_id"] == callback)
        .map(|r| r.body["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn bound_chat(app: &TestApp, driver: &str) -> Option<i64> {
    let (chat,): (Option<i64>,) =
        sqlx::query_as("select telegram_chat_id from drivers where id = $1")
            .bind(driver)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    chat
}

fn decode_qr(png_bytes: &[u8]) -> String {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let (w, h) = (info.width as usize, info.height as usize);
    let mut img = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| buf[y * w + x]);
    let grids = img.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code");
    grids[0].decode().unwrap().1
}

/// Issue a link and bind it from `user`'s private chat; returns the link.
async fn register(app: &TestApp, fake: &Fake, driver: &str, user: i64, update_id: i64) -> String {
    let (code, reg) = call(
        app,
        "POST",
        &format!("/v1/drivers/{driver}/registration"),
        Some(json!({})),
    )
    .await;
    assert_eq!(code, 201, "{reg}");
    let link = reg["link"].as_str().unwrap().to_string();
    let token = link.rsplit("start=").next().unwrap().to_string();
    telegram(
        app,
        private_text(update_id, user, &format!("/start {token}")),
    )
    .await;
    wait_for(Duration::from_secs(20), "the welcome", || async {
        sent_to(fake, user)
            .iter()
            .any(|t| t.starts_with("Welcome"))
            .then_some(())
    })
    .await;
    wait_for(Duration::from_secs(20), "the chat bound", || async {
        (bound_chat(app, driver).await == Some(user)).then_some(())
    })
    .await;
    link
}

#[tokio::test]
async fn registration_links_bind_a_driver_once_and_refuse_reuse_and_expiry() {
    let app = TestApp::spawn().await;
    let fake = Fake::start().await;
    providers(&app, &fake).await;
    add_driver(&app, "drv-1", Some("dora@drivers.example")).await;
    add_driver(&app, "drv-2", None).await;

    // The link, its QR code (PNG and SVG), and the email with both.
    let (code, reg) = call(
        &app,
        "POST",
        "/v1/drivers/drv-1/registration",
        Some(json!({"send_email": true})),
    )
    .await;
    assert_eq!(code, 201, "{reg}");
    let link = reg["link"].as_str().unwrap().to_string();
    let token = link
        .strip_prefix("https://t.me/CourierBot?start=")
        .expect("a deep link to the tenant's bot")
        .to_string();
    assert!(token.len() <= 64 && token.len() >= 40, "{token}");
    assert!(token
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    let png = base64::engine::general_purpose::STANDARD
        .decode(reg["qr"]["png_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        decode_qr(&png),
        link,
        "the QR code decodes back to the link"
    );
    assert!(reg["qr"]["svg"].as_str().unwrap().contains("<svg"));
    let emails = wait_for(
        Duration::from_secs(20),
        "the registration email",
        || async {
            let calls = fake.ok_calls("/emails");
            (!calls.is_empty()).then_some(calls)
        },
    )
    .await;
    assert_eq!(emails.len(), 1);
    let email = &emails[0].body;
    assert_eq!(email["to"], json!(["dora@drivers.example"]));
    assert!(email["text"].as_str().unwrap().contains(&link));
    let attached = base64::engine::general_purpose::STANDARD
        .decode(email["attachments"][0]["content"].as_str().unwrap())
        .unwrap();
    assert_eq!(decode_qr(&attached), link);
    // The token is never stored, only its hash.
    let (stored,): (i64,) = sqlx::query_as(
        "select count(*) from workflows w where w.state::text like '%' || $1 || '%'",
    )
    .bind(&token)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, 0);
    // Another link for the same driver is another token.
    let (_, other) = call(&app, "POST", "/v1/drivers/drv-1/registration", None).await;
    assert_ne!(other["link"], reg["link"]);
    // A driver without email cannot be sent one.
    let (code, body) = call(
        &app,
        "POST",
        "/v1/drivers/drv-2/registration",
        Some(json!({"send_email": true})),
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (422, Some("driver_has_no_email"))
    );

    // `/start <token>` binds the chat and welcomes the driver.
    telegram(&app, private_text(1, 9001, &format!("/start {token}"))).await;
    wait_for(Duration::from_secs(20), "the welcome", || async {
        sent_to(&fake, 9001)
            .iter()
            .any(|t| t.starts_with("Welcome"))
            .then_some(())
    })
    .await;
    wait_for(Duration::from_secs(20), "the binding", || async {
        (bound_chat(&app, "drv-1").await == Some(9001)).then_some(())
    })
    .await;
    let (_, driver) = call(&app, "GET", "/v1/drivers/drv-1", None).await;
    assert_eq!(driver["telegram_bound"], true);

    // The same token again, from someone else: refused, nothing rebound.
    telegram(&app, private_text(2, 9002, &format!("/start {token}"))).await;
    wait_for(Duration::from_secs(20), "the refusal", || async {
        sent_to(&fake, 9002)
            .iter()
            .any(|t| t.contains("already used"))
            .then_some(())
    })
    .await;
    assert_eq!(bound_chat(&app, "drv-1").await, Some(9001));
    // The same update delivered twice is one event: one welcome only.
    telegram(&app, private_text(1, 9001, &format!("/start {token}"))).await;
    // An unknown token.
    telegram(&app, private_text(3, 9003, "/start notARealToken123")).await;
    wait_for(
        Duration::from_secs(20),
        "the unknown-token answer",
        || async {
            sent_to(&fake, 9003)
                .iter()
                .any(|t| t.contains("not valid"))
                .then_some(())
        },
    )
    .await;

    // An expired link: its expiry timer fires (here by ops, now), then `/start` is refused.
    let (_, late) = call(&app, "POST", "/v1/drivers/drv-2/registration", None).await;
    let late_token = late["link"]
        .as_str()
        .unwrap()
        .rsplit("start=")
        .next()
        .unwrap()
        .to_string();
    let reg_id = late["registration_id"].as_str().unwrap();
    let (timer,): (uuid::Uuid,) = sqlx::query_as(
        "select t.id from timers t join workflows w on w.id = t.workflow_id where w.key = $1 and t.status = 'pending'",
    )
    .bind(reg_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let (wf_id,): (uuid::Uuid,) = sqlx::query_as("select id from workflows where key = $1")
        .bind(reg_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let r = app
        .http
        .post(format!(
            "{}/v1/ops/workflows/{wf_id}/timers/{timer}/fire",
            app.url
        ))
        .bearer_auth(&app.keys.ops)
        .json(&json!({"reason": "test: let the link lapse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_for(Duration::from_secs(20), "the link to expire", || async {
        let (state,): (String,) = sqlx::query_as("select state_name from workflows where id = $1")
            .bind(wf_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        (state == "EXPIRED").then_some(())
    })
    .await;
    telegram(&app, private_text(4, 9004, &format!("/start {late_token}"))).await;
    wait_for(Duration::from_secs(20), "the expiry answer", || async {
        sent_to(&fake, 9004)
            .iter()
            .any(|t| t.contains("expired"))
            .then_some(())
    })
    .await;
    assert_eq!(bound_chat(&app, "drv-2").await, None, "nothing bound");
    app.wait_effects_settled().await;
    assert_eq!(
        sent_to(&fake, 9001)
            .iter()
            .filter(|t| t.starts_with("Welcome"))
            .count(),
        1,
        "welcomed once"
    );
}

fn svix_headers(id: &str, body: &str) -> Vec<(String, String)> {
    let ts = chrono::Utc::now().timestamp().to_string();
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(RESEND_KEY).unwrap();
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    vec![
        ("svix-id".into(), id.into()),
        ("svix-timestamp".into(), ts),
        ("svix-signature".into(), format!("v1,{sig}")),
    ]
}

#[tokio::test]
async fn courier_runs_on_a_worker_serving_only_its_kinds() {
    // ENABLED_WORKFLOWS=driver_registration,route_dispatch: a driver registers
    // by deep link, gets a route on Telegram and by email, and acknowledges it.
    let app = TestApp::spawn_with(dispatch::ProcessRole::All, |s| {
        s.enabled_workflows = Some(vec!["driver_registration".into(), "route_dispatch".into()])
    })
    .await;
    let fake = Fake::start().await;
    providers(&app, &fake).await;
    add_driver(&app, "t0", Some("t0@drivers.example")).await;
    register(&app, &fake, "t0", 8100, 300).await;
    let route = json!({"idempotency_key": "route-solo", "driver_id": "t0",
        "route": {"reference": "R-900", "date": "2026-11-23", "text": "Stops for R-900: depot → depot"}});
    let (code, batch) = call(
        &app,
        "POST",
        "/v1/dispatches/batch",
        Some(json!({"items": [route]})),
    )
    .await;
    assert_eq!(code, 200, "{batch}");
    let id = batch["items"][0]["id"].as_str().unwrap().to_string();
    wait_for(Duration::from_secs(20), "the route on Telegram", || async {
        sent_to(&fake, 8100)
            .iter()
            .any(|t| t.starts_with("Route R-900"))
            .then_some(())
    })
    .await;
    telegram(&app, button(301, 8100, &format!("ack:{id}"))).await;
    let d = wait_for(Duration::from_secs(20), "the acknowledgement", || async {
        let (_, d) = call(&app, "GET", &format!("/v1/dispatches/{id}"), None).await;
        (d["state"] == "ACKNOWLEDGED" && d["channels"]["email"]["status"] == "sent").then_some(d)
    })
    .await;
    assert_eq!(d["channels"]["telegram"]["status"], "acknowledged", "{d}");
    let emails = fake
        .ok_calls("/emails")
        .into_iter()
        .filter(|r| {
            r.body["subject"]
                .as_str()
                .unwrap_or("")
                .starts_with("Route R-900")
        })
        .count();
    assert_eq!(emails, 1, "the email sent once");
}

async fn resend_event(app: &TestApp, id: &str, event: Value) -> u16 {
    let body = event.to_string();
    let mut r = app
        .http
        .post(format!("{}/v1/intake/resend/acme", app.url))
        .header("content-type", "application/json")
        .body(body.clone());
    for (k, v) in svix_headers(id, &body) {
        r = r.header(k, v);
    }
    r.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_200_dispatches_ends_with_every_channel_status_right_and_nothing_sent_twice() {
    let app = TestApp::spawn().await;
    let fake = Fake::start().await;
    providers(&app, &fake).await;
    // Ten drivers on Telegram and email, ten on email only (never started the
    // bot), one whose mailbox the provider refuses.
    for i in 0..10 {
        add_driver(
            &app,
            &format!("t{i}"),
            Some(&format!("t{i}@drivers.example")),
        )
        .await;
        register(&app, &fake, &format!("t{i}"), 8000 + i, 100 + i).await;
    }
    for i in 0..10 {
        add_driver(
            &app,
            &format!("e{i}"),
            Some(&format!("e{i}@drivers.example")),
        )
        .await;
    }
    add_driver(&app, "broken", Some("broken@drivers.example")).await;
    add_driver(&app, "nowhere", None).await;
    app.wait_effects_settled().await;

    let drivers: Vec<String> = (0..10)
        .map(|i| format!("t{i}"))
        .chain((0..10).map(|i| format!("e{i}")))
        .chain(["broken".to_string()])
        .collect();
    let item = |n: usize| {
        json!({"idempotency_key": format!("route-{n}"), "driver_id": drivers[n % drivers.len()],
               "route": {"reference": format!("R-{n:03}"), "date": "2026-11-23", "text": format!("Stops for R-{n:03}: depot → 12 Harbour Rd → depot")}})
    };
    let items: Vec<Value> = (0..200).map(item).collect();

    // A bad item refuses the whole batch, and nothing is stored.
    let mut bad = items.clone();
    bad[7]["driver_id"] = json!("nobody");
    let (code, body) = call(
        &app,
        "POST",
        "/v1/dispatches/batch",
        Some(json!({"items": bad})),
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (422, Some("unknown_driver")),
        "{body}"
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("items[7]"));
    let mut unreachable = items.clone();
    unreachable[3]["driver_id"] = json!("nowhere");
    let (code, body) = call(
        &app,
        "POST",
        "/v1/dispatches/batch",
        Some(json!({"items": unreachable})),
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (422, Some("driver_unreachable"))
    );
    let (stored,): (i64,) =
        sqlx::query_as("select count(*) from workflows where kind = 'route_dispatch'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored, 0, "nothing partial stored");

    // The email provider fails: 25 server errors (retried), and one mailbox for good.
    fake.fail(
        "/emails",
        500,
        json!({"message": "upstream unavailable"}),
        &[],
        25,
    );
    fake.fail_matching(
        "/emails",
        "broken@drivers.example",
        422,
        json!({"message": "The recipient is invalid"}),
        usize::MAX,
    );
    let (code, batch) = call(
        &app,
        "POST",
        "/v1/dispatches/batch",
        Some(json!({"items": items})),
    )
    .await;
    assert_eq!(code, 200, "{batch}");
    let created = batch["items"].as_array().unwrap();
    assert_eq!(created.len(), 200);
    assert!(created.iter().all(|i| i["created"] == true));
    let ids: Vec<String> = created
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    // Drivers who never started the bot get email, and the status says why.
    let e_item = &created[10];
    assert_eq!(e_item["driver_id"], "e0");
    assert_eq!(e_item["channels"]["telegram"]["status"], "skipped");
    assert!(e_item["channels"]["telegram"]["reason"]
        .as_str()
        .unwrap()
        .contains("not started the bot"));
    assert_eq!(e_item["channels"]["email"]["status"], "queued");

    app.wait_effects_settled().await;

    // Delivery webhooks: every third email delivered, every fifth bounced.
    let mut delivered = HashMap::new();
    for (n, id) in ids.iter().enumerate() {
        if drivers[n % drivers.len()] == "broken" {
            continue;
        }
        let (message_id,): (String,) = sqlx::query_as(
            "select provider_message_id from deliveries where channel = 'resend' and idempotency_key = $1",
        )
        .bind(format!("route:route-{n}:email"))
        .fetch_one(&app.pool)
        .await
        .unwrap();
        let event = if n % 5 == 0 {
            Some(("email.bounced", "failed"))
        } else if n % 3 == 0 {
            Some(("email.delivered", "delivered"))
        } else {
            None
        };
        if let Some((kind, expect)) = event {
            let body = json!({"type": kind, "created_at": "2026-11-22T10:00:00Z", "data": {"email_id": message_id}});
            assert_eq!(
                resend_event(&app, &format!("msg_{n}"), body.clone()).await,
                200
            );
            // Providers retry: the same event twice is stored once.
            assert_eq!(resend_event(&app, &format!("msg_{n}"), body).await, 200);
            delivered.insert(id.clone(), expect);
        }
    }
    // A forged event is refused.
    let r = app
        .http
        .post(format!("{}/v1/intake/resend/acme", app.url))
        .header("svix-id", "msg_forged")
        .header("svix-timestamp", chrono::Utc::now().timestamp().to_string())
        .header("svix-signature", "v1,AAAA")
        .json(&json!({"type": "email.delivered", "data": {"email_id": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Acknowledgements: the driver presses the button on every other Telegram route;
    // someone else's press changes nothing.
    let mut acked = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let driver = &drivers[n % drivers.len()];
        if !driver.starts_with('t') || n % 2 != 0 {
            continue;
        }
        let chat = 8000 + driver[1..].parse::<i64>().unwrap();
        telegram(&app, button(10_000 + n as i64, chat, &format!("ack:{id}"))).await;
        acked.push(id.clone());
    }
    let intruder = ids[1].clone(); // t1's route
    telegram(&app, button(20_000, 8000, &format!("ack:{intruder}"))).await;
    wait_for(
        Duration::from_secs(30),
        "the intruder's refusal",
        || async {
            answers(&fake, "cb-20000")
                .iter()
                .any(|t| t.contains("not sent to you"))
                .then_some(())
        },
    )
    .await;

    // Every item's final status.
    let expected_ack = acked.len();
    wait_for(Duration::from_secs(60), "every status to settle", || {
        let (app, ids, delivered, acked, drivers) = (&app, &ids, &delivered, &acked, &drivers);
        async move {
            for (n, id) in ids.iter().enumerate() {
                let driver = &drivers[n % drivers.len()];
                let (code, d) = call(app, "GET", &format!("/v1/dispatches/{id}"), None).await;
                assert_eq!(code, 200);
                let tg = d["channels"]["telegram"]["status"].as_str().unwrap_or("");
                let mail = d["channels"]["email"]["status"].as_str().unwrap_or("");
                let want_tg = if driver.starts_with('t') {
                    if acked.contains(id) {
                        "acknowledged"
                    } else {
                        "sent"
                    }
                } else {
                    "skipped"
                };
                let want_mail = if driver == "broken" {
                    "failed"
                } else {
                    delivered.get(id).copied().unwrap_or("sent")
                };
                let want_state = if acked.contains(id) {
                    "ACKNOWLEDGED"
                } else {
                    "DISPATCHED"
                };
                if (tg, mail, d["state"].as_str().unwrap()) != (want_tg, want_mail, want_state) {
                    return None;
                }
                if driver == "broken" {
                    assert!(d["channels"]["email"]["reason"]
                        .as_str()
                        .unwrap()
                        .contains("recipient is invalid"));
                }
                if delivered.get(id) == Some(&"failed") {
                    assert_eq!(d["channels"]["email"]["reason"], "bounced");
                }
            }
            Some(())
        }
    })
    .await;
    assert!(expected_ack >= 40);
    assert_eq!(answers(&fake, "cb-10000"), ["Thanks, route acknowledged."]);

    // Nothing sent twice: one Telegram message per Telegram route, one
    // accepted email per email route.
    let routes_on_telegram = fake
        .ok_calls("/sendMessage")
        .into_iter()
        .filter(|r| {
            r.body["text"]
                .as_str()
                .unwrap_or("")
                .starts_with("Route R-")
        })
        .map(|r| r.body["text"].as_str().unwrap()[6..11].to_string())
        .collect::<Vec<_>>();
    let mut unique = routes_on_telegram.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        routes_on_telegram.len(),
        100,
        "t-drivers hold 100 of the routes"
    );
    assert_eq!(unique.len(), 100, "each once");
    let emails: Vec<String> = fake
        .ok_calls("/emails")
        .into_iter()
        .map(|r| r.body["subject"].as_str().unwrap().to_string())
        .filter(|s| s.starts_with("Route R-"))
        .collect();
    let mut unique = emails.clone();
    unique.sort();
    unique.dedup();
    let broken_routes = (0..200)
        .filter(|n| drivers[n % drivers.len()] == "broken")
        .count();
    assert_eq!(emails.len(), 200 - broken_routes);
    assert_eq!(unique.len(), emails.len(), "each email once");
    // The Telegram message carries the Acknowledge button.
    let first = fake
        .ok_calls("/sendMessage")
        .into_iter()
        .find(|r| {
            r.body["text"]
                .as_str()
                .unwrap_or("")
                .starts_with("Route R-000")
        })
        .unwrap();
    assert_eq!(
        first.body["reply_markup"]["inline_keyboard"][0][0]["callback_data"],
        format!("ack:{}", ids[0])
    );

    // Replaying the batch creates nothing and sends nothing.
    let before = fake.requests().len();
    let (code, again) = call(
        &app,
        "POST",
        "/v1/dispatches/batch",
        Some(json!({"items": (0..200).map(item).collect::<Vec<_>>()})),
    )
    .await;
    assert_eq!(code, 200);
    assert!(again["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["created"] == false));
    let mut changed = (0..200).map(item).collect::<Vec<_>>();
    changed[0]["route"]["text"] = json!("something else");
    let (code, body) = call(
        &app,
        "POST",
        "/v1/dispatches/batch",
        Some(json!({"items": changed})),
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    app.wait_effects_settled().await;
    assert_eq!(fake.requests().len(), before, "nothing more sent");
}

#[tokio::test]
async fn the_routes_mount_under_a_prefix_inside_a_host_application() {
    // Embedded mode: the host owns the server and mounts Dispatch at /courier;
    // Dispatch's workers run inside the host's process.
    let db_url = fresh_database().await;
    let settings = test_settings(&db_url);
    let pool = dispatch::store::connect(&db_url, settings.db_pool)
        .await
        .unwrap();
    let keys = make_tenant(&pool, "acme").await;
    let (courier, running) = dispatch::embed(&settings, pool.clone()).await.unwrap();
    let host = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "host ok" }))
        .nest("/courier", courier);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, host).await.unwrap() });
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{url}/health"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "host ok"
    );
    let r = http
        .post(format!("{url}/courier/v1/drivers"))
        .bearer_auth(&keys.integration)
        .json(&json!({"id": "d1", "name": "Driver One", "email": "d1@drivers.example"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .post(format!("{url}/courier/v1/dispatches"))
        .bearer_auth(&keys.integration)
        .header("Idempotency-Key", "route-1")
        .json(&json!({"driver_id": "d1", "route": {"reference": "R-1", "text": "depot → 3 Mill Lane"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let d: Value = r.json().await.unwrap();
    let id = d["id"].as_str().unwrap().to_string();
    // Without providers the tenant's messages go to the built-in log channel.
    let done = wait_for(Duration::from_secs(20), "the email to go out", || {
        let (http, url, key, id) = (&http, &url, &keys.integration, &id);
        async move {
            let d: Value = http
                .get(format!("{url}/courier/v1/dispatches/{id}"))
                .bearer_auth(key)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (d["channels"]["email"]["status"] == "sent").then_some(d)
        }
    })
    .await;
    assert_eq!(done["channels"]["telegram"]["status"], "skipped");
    let r = http
        .get(format!("{url}/v1/drivers"))
        .bearer_auth(&keys.integration)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "only under the host's prefix");
    running.stop().await;
}
