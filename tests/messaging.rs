//! Masked-number messaging (DOMAIN.md §2), one test per rule, each named
//! after it: real HTTP into the API, Twilio webhooks signed like Twilio's,
//! and Twilio itself played by the local fake provider, which records every
//! SMS and every number it provisions or configures.

mod common;
#[path = "common/fake.rs"]
mod fake;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use dispatch::workflows::Role;
use dispatch::ProcessRole;
use fake::Fake;
use serde_json::{json, Value};
use uuid::Uuid;

const TOKEN: &str = "twilio-auth-token-for-tests";
const FRONT: &str = "+15550100000";
const SAM_PHONE: &str = "+15551110001";
const PIA_PHONE: &str = "+15551110002";
const CARA: &str = "+15552220001";
const CARL: &str = "+15552220002";
const CLEO: &str = "+15552220003";
const WAIT: Duration = Duration::from_secs(20);

struct Pet {
    app: TestApp,
    fake: Fake,
    /// Inventory sitter numbers and pool numbers, in creation order.
    sitter_numbers: Vec<String>,
    pool: Vec<String>,
    sms_seq: std::sync::atomic::AtomicU64,
}

fn at_minutes(m: i64) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::minutes(m)
}

impl Pet {
    /// A tenant with Twilio on the fake, a front desk, `sitters` inventory
    /// numbers and `pool` pool numbers (all provisioned through Twilio), the
    /// sitters sam and pia, and the clients cara, carl and cleo.
    async fn new(sitters: usize, pool: usize) -> Pet {
        Pet::serving(sitters, pool, None).await
    }

    /// [`Pet::new`] on a process whose worker serves only `kinds`
    /// (`ENABLED_WORKFLOWS`), or every kind.
    async fn serving(sitters: usize, pool: usize, kinds: Option<&str>) -> Pet {
        let app = match kinds {
            None => TestApp::spawn().await,
            Some(kinds) => {
                TestApp::spawn_with(ProcessRole::All, |s| {
                    s.enabled_workflows = Some(kinds.split(',').map(str::to_string).collect())
                })
                .await
            }
        };
        let fake = Fake::start().await;
        let r = app
            .http
            .put(format!("{}/v1/tenants/acme/providers/twilio", app.url))
            .bearer_auth(&app.keys.ops)
            .json(
                &json!({"account_sid": "ACtest", "auth_token": TOKEN, "base_url": fake.url,
                          "webhook_url": format!("{}/v1/intake/twilio/acme", app.url)}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut pet = Pet {
            app,
            fake,
            sitter_numbers: vec![],
            pool: vec![],
            sms_seq: 0.into(),
        };
        pet.number(FRONT, "front_desk").await;
        for i in 0..sitters {
            let n = format!("+1555020{:04}", i + 1);
            pet.number(&n, "sitter").await;
            pet.sitter_numbers.push(n);
        }
        for i in 0..pool {
            let n = format!("+1555030{:04}", i + 1);
            pet.number(&n, "pool").await;
            pet.pool.push(n);
        }
        for (id, phone) in [("sam", SAM_PHONE), ("pia", PIA_PHONE)]
            .into_iter()
            .take(sitters.min(2))
        {
            let (code, body) = pet
                .owner(
                    "POST",
                    "/v1/messaging/sitters",
                    json!({"id": id, "name": id, "phone": phone}),
                )
                .await;
            assert_eq!(code, 201, "{body}");
        }
        for (id, phone) in [("cara", CARA), ("carl", CARL), ("cleo", CLEO)] {
            let (code, _) = pet
                .owner(
                    "POST",
                    "/v1/messaging/clients",
                    json!({"id": id, "name": id, "phone": phone}),
                )
                .await;
            assert_eq!(code, 201);
        }
        pet
    }

    async fn number(&self, e164: &str, class: &str) {
        let (code, body) = self
            .owner(
                "POST",
                "/v1/messaging/numbers",
                json!({"e164": e164, "class": class}),
            )
            .await;
        assert_eq!(code, 201, "{body}");
        assert!(
            body["provider_sid"].as_str().unwrap().starts_with("PN"),
            "provisioned through Twilio: {body}"
        );
    }

    async fn call(&self, key: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self
            .app
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.app.url))
            .bearer_auth(key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn owner(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let body = (method != "GET").then_some(body);
        self.call(&self.app.keys.operator, method, path, body).await
    }

    async fn sitter_key(&self, id: &str) -> String {
        self.app
            .key(self.app.keys.tenant_id, Role::Executor, Some(id))
            .await
    }

    /// A booking; returns its body.
    async fn book(
        &self,
        client: &str,
        sitter: &str,
        service: &str,
        start_min: i64,
        end_min: i64,
        recurrence: Option<&str>,
    ) -> Value {
        let mut b = json!({"client_id": client, "sitter_id": sitter, "service_type": service,
                           "starts_at": at_minutes(start_min), "ends_at": at_minutes(end_min)});
        if let Some(r) = recurrence {
            b["recurrence"] = json!(r);
        }
        let (code, body) = self.owner("POST", "/v1/messaging/bookings", b).await;
        assert_eq!(code, 201, "{body}");
        body
    }

    /// An SMS to one of our numbers, through the signed Twilio webhook; waits
    /// until it is routed and returns what became of it (its `msg_messages` row).
    async fn sms(&self, from: &str, to: &str, text: &str) -> Value {
        let sid = self.sms_nowait(from, to, text).await;
        self.routed(&sid).await
    }

    async fn sms_nowait(&self, from: &str, to: &str, text: &str) -> String {
        self.sms_with(from, to, text, &[]).await
    }

    /// An inbound SMS with extra Twilio parameters (e.g. `NumMedia`); returns its sid.
    async fn sms_with(&self, from: &str, to: &str, text: &str, extra: &[(&str, &str)]) -> String {
        let n = self
            .sms_seq
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let sid = format!("SMin{}{n:08}", Uuid::now_v7().simple());
        let mut params = vec![
            ("MessageSid".to_string(), sid.clone()),
            ("From".to_string(), from.to_string()),
            ("To".to_string(), to.to_string()),
            ("Body".to_string(), text.to_string()),
        ];
        params.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let url = format!("{}/v1/intake/twilio/acme", self.app.url);
        let sig = dispatch::intake::twilio_signature(TOKEN, &url, &params);
        let r = self
            .app
            .http
            .post(&url)
            .header("X-Twilio-Signature", sig)
            .form(&params)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        sid
    }

    async fn routed(&self, sid: &str) -> Value {
        let source = format!("twilio:{sid}");
        wait_for(WAIT, "the SMS to be routed", || async {
            let r: Option<(Value,)> = sqlx::query_as(
                "select json_build_object('id', id, 'status', status, 'reason', reason, 'thread_id', thread_id,
                        'deliver_to', deliver_to, 'deliver_from', deliver_from, 'sender_role', sender_role, 'sitter_id', sitter_id)
                   from msg_messages where source = $1",
            )
            .bind(&source)
            .fetch_optional(&self.app.pool)
            .await
            .unwrap();
            r.map(|r| r.0)
        })
        .await
    }

    /// SMS the fake Twilio accepted for `to`: (from, body).
    fn sent_to(&self, to: &str) -> Vec<(String, String)> {
        self.fake
            .ok_calls("/Messages.json")
            .into_iter()
            .filter(|r| r.body["To"] == to)
            .map(|r| {
                (
                    r.body["From"].as_str().unwrap().to_string(),
                    r.body["Body"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    async fn wait_sent(&self, to: &str, containing: &str) -> (String, String) {
        wait_for(
            WAIT,
            &format!("an SMS to {to} containing {containing:?}"),
            || async {
                self.sent_to(to)
                    .into_iter()
                    .find(|(_, b)| b.contains(containing))
            },
        )
        .await
    }

    async fn inbox(&self) -> Vec<Value> {
        let (code, body) = self.owner("GET", "/v1/messaging/inbox", json!(null)).await;
        assert_eq!(code, 200);
        body["items"].as_array().unwrap().clone()
    }

    async fn wait_inbox(&self, reason: &str) -> Value {
        wait_for(WAIT, &format!("an inbox item `{reason}`"), || async {
            self.inbox()
                .await
                .into_iter()
                .find(|i| i["reason"] == reason)
        })
        .await
    }

    async fn state(&self, kind: &str, key: &str) -> String {
        let r: Option<(String,)> =
            sqlx::query_as("select state_name from workflows where kind = $1 and key = $2")
                .bind(kind)
                .bind(key)
                .fetch_optional(&self.app.pool)
                .await
                .unwrap();
        r.map(|r| r.0).unwrap_or_default()
    }

    async fn wait_state(&self, kind: &str, key: &str, state: &str) {
        wait_for(WAIT, &format!("{kind} {key} to reach {state}"), || async {
            (self.state(kind, key).await == state).then_some(())
        })
        .await
    }

    /// Fire a pending timer now through the ops API (the clock, advanced by ops, audited).
    async fn fire(&self, kind: &str, key: &str, timer: &str) {
        let (wf, id): (Uuid, Uuid) = wait_for(WAIT, &format!("timer {timer} of {kind} {key}"), || async {
            sqlx::query_as(
                "select w.id, t.id from timers t join workflows w on w.tenant_id = t.tenant_id and w.id = t.workflow_id
                  where w.kind = $1 and w.key = $2 and t.name = $3 and t.status = 'pending'",
            )
            .bind(kind)
            .bind(key)
            .bind(timer)
            .fetch_optional(&self.app.pool)
            .await
            .unwrap()
        })
        .await;
        let path = format!("/v1/ops/workflows/{wf}/timers/{id}/fire");
        let (code, body) = self
            .call(
                &self.app.keys.ops,
                "POST",
                &path,
                Some(json!({"reason": "test clock"})),
            )
            .await;
        assert_eq!(code, 200, "{body}");
    }

    async fn number_row(&self, e164: &str) -> Value {
        let (_, body) = self
            .owner("GET", "/v1/messaging/numbers", json!(null))
            .await;
        body["numbers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["e164"] == e164)
            .cloned()
            .unwrap()
    }

    async fn sitter_number(&self, id: &str) -> String {
        let (_, body) = self
            .owner("GET", "/v1/messaging/sitters", json!(null))
            .await;
        let s = body["sitters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .cloned()
            .unwrap();
        s["number"].as_str().unwrap().to_string()
    }

    async fn audit(&self, action: &str) -> Vec<Value> {
        let (code, body) = self
            .call(&self.app.keys.ops, "GET", "/v1/ops/audit", None)
            .await;
        assert_eq!(code, 200);
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == action)
            .cloned()
            .collect()
    }
}

#[tokio::test]
async fn front_desk_takes_inquiries_and_anything_without_an_active_window() {
    let pet = Pet::new(1, 0).await;
    let sam = pet.sitter_number("sam").await;
    let m = pet
        .sms(CARA, FRONT, "Hi, do you have availability next week?")
        .await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("routed_to_owner"), Some("front_desk"))
    );
    // Cara's sitter number, but no booking window open: the owner, not the sitter.
    let m = pet.sms(CARA, &sam, "Are you coming today?").await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("routed_to_owner"), Some("no_active_window"))
    );
    let reasons: Vec<Value> = pet
        .inbox()
        .await
        .into_iter()
        .map(|i| i["reason"].clone())
        .collect();
    assert!(reasons.contains(&json!("front_desk")) && reasons.contains(&json!("no_active_window")));
    // Even with a window open, the front desk stays the owner's line (billing, scheduling).
    pet.book("cara", "sam", "walk", 10, 40, Some("weekly"))
        .await;
    let m = pet
        .sms(CARA, FRONT, "Can I pay the invoice on Friday?")
        .await;
    assert_eq!(m["reason"], "front_desk");
    // A picture cannot be scanned: held for the owner with its link, never relayed.
    let sid = pet
        .sms_with(
            CARA,
            &sam,
            "",
            &[
                ("NumMedia", "1"),
                ("MediaUrl0", "https://api.twilio.example/media/ME1"),
            ],
        )
        .await;
    let m = pet.routed(&sid).await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("routed_to_owner"), Some("media_not_relayed"))
    );
    let item = pet.wait_inbox("media_not_relayed").await;
    assert_eq!(
        item["detail"]["media"][0],
        "https://api.twilio.example/media/ME1"
    );
    assert!(
        pet.sent_to(SAM_PHONE).is_empty(),
        "nothing reached the sitter"
    );
}

#[tokio::test]
async fn sitter_masked_number_carries_service_messages_in_the_window_and_weekly_clients_stay_on_it()
{
    masked_numbers_main_flow(Pet::new(2, 1).await).await;
}

/// The product's kinds, as an operator enables them on a dedicated worker.
const MESSAGING_KINDS: &str =
    "sitter_lifecycle,pool_number,assignment_window,meet_and_greet,poaching_strikes,message_relay";

#[tokio::test]
async fn messaging_runs_on_a_worker_serving_only_its_kinds() {
    let pet = Pet::serving(2, 1, Some(MESSAGING_KINDS)).await;
    // Onboarding (sitter_lifecycle) and the pool (pool_number) ran here.
    pet.wait_state("sitter_lifecycle", "sam", "ACTIVE").await;
    masked_numbers_main_flow(pet).await;
}

/// Book a weekly client with a sitter and relay a message each way through
/// the sitter's masked number.
async fn masked_numbers_main_flow(pet: Pet) {
    let sam = pet.sitter_number("sam").await;
    let pia = pet.sitter_number("pia").await;
    assert_ne!(sam, pia, "one persistent number per sitter");
    let b = pet
        .book("cara", "sam", "walk", 10, 40, Some("weekly"))
        .await;
    assert_eq!(
        (b["number"].as_str(), b["number_class"].as_str()),
        (Some(sam.as_str()), Some("sitter"))
    );
    let m = pet.sms(CARA, &sam, "Bella is ready for her walk").await;
    assert_eq!(m["status"], "relayed");
    let (from, body) = pet.wait_sent(SAM_PHONE, "Bella is ready").await;
    assert_eq!(
        from, sam,
        "the sitter sees the client through the masked number"
    );
    assert_eq!(body, "Bella is ready for her walk");
    let m = pet.sms(SAM_PHONE, &sam, "On my way, 10 minutes").await;
    assert_eq!(m["status"], "relayed");
    assert_eq!(
        pet.wait_sent(CARA, "On my way").await.0,
        sam,
        "the client never sees the sitter's phone"
    );
    // The weekly client stays on the sitter's number; a second sitter means a second number.
    let b2 = pet
        .book(
            "cara",
            "sam",
            "walk",
            7 * 24 * 60 + 10,
            7 * 24 * 60 + 40,
            Some("weekly"),
        )
        .await;
    assert_eq!(b2["number"], sam.as_str());
    let b3 = pet
        .book(
            "cara",
            "pia",
            "drop_in",
            3 * 24 * 60,
            3 * 24 * 60 + 30,
            None,
        )
        .await;
    assert_eq!(
        b3["number"],
        pia.as_str(),
        "a recurring client meets each sitter on that sitter's number"
    );
}

#[tokio::test]
async fn onboarding_assigns_a_dedicated_masked_number_and_registers_it_with_the_provider() {
    let pet = Pet::new(2, 0).await;
    pet.wait_state("sitter_lifecycle", "sam", "ACTIVE").await;
    pet.wait_state("sitter_lifecycle", "pia", "ACTIVE").await;
    let (sam, pia) = (
        pet.sitter_number("sam").await,
        pet.sitter_number("pia").await,
    );
    assert!(pet.sitter_numbers.contains(&sam) && pet.sitter_numbers.contains(&pia) && sam != pia);
    // Provisioned (bought) through Twilio, then registered for the sitter: label and SMS webhook.
    let provisioned = pet.fake.ok_calls("/IncomingPhoneNumbers.json");
    assert_eq!(provisioned.len(), 3, "front desk + two inventory numbers");
    let configured = pet.fake.ok_calls("/IncomingPhoneNumbers/PN");
    assert_eq!(configured.len(), 2, "one registration per onboarded sitter");
    for c in &configured {
        assert_eq!(
            c.body["SmsUrl"],
            format!("{}/v1/intake/twilio/acme", pet.app.url)
        );
        assert_eq!(c.body["FriendlyName"], "Dispatch sitter line");
    }
    // The inventory is empty now: a third sitter waits for a number.
    let (code, body) = pet
        .owner(
            "POST",
            "/v1/messaging/sitters",
            json!({"id": "tom", "name": "Tom", "phone": "+15551110003"}),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (409, Some("no_sitter_number"))
    );
    let (_, sitters) = pet.owner("GET", "/v1/messaging/sitters", json!(null)).await;
    assert!(
        sitters["sitters"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["id"] != "tom"),
        "nothing partial is stored"
    );
}

#[tokio::test]
async fn offboarding_deactivates_the_number_immediately_and_reassigns_threads_with_audit() {
    let pet = Pet::new(2, 0).await;
    let (sam, pia) = (
        pet.sitter_number("sam").await,
        pet.sitter_number("pia").await,
    );
    pet.book("cara", "sam", "walk", 10, 40, Some("weekly"))
        .await;
    pet.book("carl", "sam", "walk", 5, 30, Some("weekly")).await;
    // Sam's clients: cara goes to pia, then everything else of sam's to the owner.
    let (code, body) = pet
        .owner(
            "POST",
            "/v1/messaging/sitters/sam/offboard",
            json!({"reason": "moved away"}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        (
            body["threads_reassigned"].as_u64(),
            body["reassigned_to"].as_str()
        ),
        (Some(2), Some("owner"))
    );
    // At once: the number is deactivated, nothing reaches sam any more.
    assert_eq!(pet.number_row(&sam).await["status"], "cooldown");
    let m = pet.sms(CARA, &sam, "Hello? Is anyone walking Bella?").await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("routed_to_owner"), Some("no_active_window"))
    );
    let m = pet.sms(SAM_PHONE, &sam, "I can still walk her").await;
    assert_eq!(
        m["sender_role"], "unknown",
        "an offboarded sitter is nobody"
    );
    assert!(pet
        .sent_to(SAM_PHONE)
        .iter()
        .all(|(_, b)| !b.contains("Bella")));
    let audits = pet.audit("thread_reassigned").await;
    assert_eq!(audits.len(), 2, "one audit record per reassigned thread");
    assert!(audits
        .iter()
        .all(|a| a["reason"] == "moved away" && a["detail"]["to"] == "owner"));
    assert_eq!(pet.audit("sitter_offboarded").await.len(), 1);
    pet.wait_state("sitter_lifecycle", "sam", "COOLDOWN").await;

    // To a named sitter: the threads and the open bookings follow.
    let pet2 = Pet::new(2, 0).await;
    let sam2 = pet2.sitter_number("sam").await;
    let pia2 = pet2.sitter_number("pia").await;
    pet2.book("cara", "sam", "walk", 10, 40, Some("weekly"))
        .await;
    let (code, _) = pet2
        .owner(
            "POST",
            "/v1/messaging/sitters/sam/offboard",
            json!({"reason": "left", "reassign_to": "pia"}),
        )
        .await;
    assert_eq!(code, 200);
    let m = pet2.sms(CARA, &sam2, "Is the new sitter coming?").await;
    assert_eq!(m["status"], "relayed");
    assert_eq!(
        pet2.wait_sent(PIA_PHONE, "new sitter").await.0,
        pia2,
        "relayed to pia through pia's number"
    );
    assert_eq!(
        pet2.audit("thread_reassigned").await[0]["detail"]["to"],
        "pia"
    );
    let _ = pia;
}

#[tokio::test]
async fn offboarding_while_messages_arrive_loses_none() {
    let pet = std::sync::Arc::new(Pet::new(2, 0).await);
    let sam = pet.sitter_number("sam").await;
    pet.book("cara", "sam", "walk", 10, 40, Some("weekly"))
        .await;
    // Messages keep coming until 20 were sent after the offboarding
    // answered, however fast the first ones were routed (at most 400).
    const AFTER: usize = 20;
    let sender = {
        let pet = pet.clone();
        let sam = sam.clone();
        tokio::spawn(async move {
            let mut sids = Vec::new();
            let mut sent_after = 0;
            for i in 0..400 {
                // (sid, sent after the offboarding answered)
                let after = OFFBOARDED.load(std::sync::atomic::Ordering::SeqCst);
                sids.push((
                    pet.sms_nowait(CARA, &sam, &format!("update number {i}"))
                        .await,
                    after,
                ));
                sent_after += usize::from(after);
                if sent_after >= AFTER {
                    break;
                }
            }
            sids
        })
    };
    static OFFBOARDED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    wait_for(WAIT, "traffic to start", || async {
        let (n,): (i64,) =
            sqlx::query_as("select count(*) from msg_messages where direction = 'in'")
                .fetch_one(&pet.app.pool)
                .await
                .unwrap();
        (n >= 10).then_some(())
    })
    .await;
    let (code, body) = pet
        .owner(
            "POST",
            "/v1/messaging/sitters/sam/offboard",
            json!({"reason": "offboarded mid-conversation", "reassign_to": "pia"}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    OFFBOARDED.store(true, std::sync::atomic::Ordering::SeqCst);
    let sids = sender.await.unwrap();
    let n_sent = sids.len();
    let mut relayed_to = std::collections::HashMap::<String, usize>::new();
    for (sid, after) in &sids {
        let m = pet.routed(sid).await;
        let status = m["status"].as_str().unwrap();
        assert!(status == "relayed" || status == "routed_to_owner", "{m}");
        let to = m["deliver_to"].as_str().unwrap_or("owner").to_string();
        if *after {
            assert_ne!(to, SAM_PHONE, "nothing reaches the offboarded sitter: {m}");
        }
        *relayed_to.entry(to).or_default() += 1;
    }
    let (stored,): (i64,) = sqlx::query_as(
        "select count(*) from msg_messages where direction = 'in' and source like 'twilio:%'",
    )
    .fetch_one(&pet.app.pool)
    .await
    .unwrap();
    assert_eq!(stored as usize, n_sent, "every message stored exactly once");
    // Every relay actually went out, once.
    for (to, n) in &relayed_to {
        if to == "owner" {
            continue;
        }
        // Sent once each — or, for a relay still waiting when its sitter was
        // offboarded, withheld and handed to the owner instead.
        wait_for(WAIT, "the relays to go out", || async {
            let (withheld,): (i64,) = sqlx::query_as(
                "select count(*) from msg_messages m where m.direction = 'out' and m.to_number = $1 and m.status = 'withheld'
                    and exists (select 1 from msg_inbox i where i.source = 'message:' || m.id and i.reason = 'recipient_offboarded'
                                and i.message_id = split_part(m.source, ':', 1)::uuid)",
            )
            .bind(to)
            .fetch_one(&pet.app.pool)
            .await
            .unwrap();
            (pet.sent_to(to).len() + withheld as usize == *n).then_some(())
        })
        .await;
    }
    println!("where the {n_sent} messages went: {relayed_to:?}");
    assert!(
        relayed_to.get(SAM_PHONE).copied().unwrap_or(0) > 0,
        "the offboarding landed mid-traffic: {relayed_to:?}"
    );
    assert!(
        relayed_to.get(PIA_PHONE).copied().unwrap_or(0) > 0,
        "the successor got the later messages: {relayed_to:?}"
    );
    let (pending,): (i64,) =
        sqlx::query_as("select count(*) from inbound_events where status = 'queued'")
            .fetch_one(&pet.app.pool)
            .await
            .unwrap();
    assert_eq!(pending, 0);
}

#[tokio::test]
async fn a_deactivated_sitter_number_is_never_another_sitters_and_returns_only_as_a_pool_number_after_90_days(
) {
    let pet = Pet::new(1, 0).await;
    let sam = pet.sitter_number("sam").await;
    let (code, _) = pet
        .owner(
            "POST",
            "/v1/messaging/sitters/sam/offboard",
            json!({"reason": "left"}),
        )
        .await;
    assert_eq!(code, 200);
    let row = pet.number_row(&sam).await;
    let until: DateTime<Utc> = serde_json::from_value(row["cooldown_until"].clone()).unwrap();
    let days = (until - Utc::now()).num_hours() as f64 / 24.0;
    assert!((89.9..=90.1).contains(&days), "90-day cooldown, got {days}");
    // Within the cooldown another sitter cannot get it.
    let (code, body) = pet
        .owner(
            "POST",
            "/v1/messaging/sitters",
            json!({"id": "tom", "name": "Tom", "phone": "+15551110003"}),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (409, Some("no_sitter_number"))
    );
    // After the 90 days (the timer, fired by ops): back only as a pool number.
    pet.fire("sitter_lifecycle", "sam", "cooldown").await;
    pet.wait_state("sitter_lifecycle", "sam", "RETIRED").await;
    let row = wait_for(WAIT, "the number to be recycled", || async {
        let r = pet.number_row(&sam).await;
        (r["class"] == "pool").then_some(r)
    })
    .await;
    assert_eq!(
        (
            row["status"].as_str(),
            row["former_sitter_number"].as_bool()
        ),
        (Some("available"), Some(true))
    );
    pet.wait_state("pool_number", row["id"].as_str().unwrap(), "AVAILABLE")
        .await;
    let (code, _) = pet
        .owner(
            "POST",
            "/v1/messaging/sitters",
            json!({"id": "tom", "name": "Tom", "phone": "+15551110003"}),
        )
        .await;
    assert_eq!(code, 409, "never a sitter number again");
}

#[tokio::test]
async fn a_released_pool_number_is_kept_from_other_clients_for_30_days_unless_the_pool_is_exhausted(
) {
    let pet = Pet::new(1, 2).await;
    let (p1, p2) = (pet.pool[0].clone(), pet.pool[1].clone());
    let b = pet.book("cara", "sam", "walk", 10, 40, None).await;
    assert_eq!(
        (b["number"].as_str(), b["number_class"].as_str()),
        (Some(p1.as_str()), Some("pool"))
    );
    let p1_id = pet.number_row(&p1).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    pet.wait_state("pool_number", &p1_id, "LEASED").await;
    // The lease ends (its timer, fired by ops): 30 days of cooldown.
    pet.fire("pool_number", &p1_id, "lease_end").await;
    pet.wait_state("pool_number", &p1_id, "COOLDOWN").await;
    let row = wait_for(WAIT, "the release", || async {
        let r = pet.number_row(&p1).await;
        (r["status"] == "cooldown").then_some(r)
    })
    .await;
    let until: DateTime<Utc> = serde_json::from_value(row["cooldown_until"].clone()).unwrap();
    assert!(((until - Utc::now()).num_hours() as f64 / 24.0 - 30.0).abs() < 0.1);
    // Capacity allows: another client gets the free number.
    assert_eq!(
        pet.book("carl", "sam", "walk", 10, 40, None).await["number"],
        p2.as_str()
    );
    // Exhausted: the cooling number goes at once.
    assert_eq!(
        pet.book("cleo", "sam", "walk", 10, 40, None).await["number"],
        p1.as_str()
    );
    pet.wait_state("pool_number", &p1_id, "LEASED").await;
    // And when nothing at all is left: a clear refusal, nothing stored.
    let (_, before) = pet
        .owner("GET", "/v1/messaging/bookings", json!(null))
        .await;
    let (code, body) = pet
        .owner(
            "POST",
            "/v1/messaging/bookings",
            json!({"client_id": "cara", "sitter_id": "sam", "service_type": "walk",
            "starts_at": at_minutes(100), "ends_at": at_minutes(130)}),
        )
        .await;
    // cara held p1 before: it is cleo's now, and p2 is carl's.
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (409, Some("pool_exhausted"))
    );
    let (_, after) = pet
        .owner("GET", "/v1/messaging/bookings", json!(null))
        .await;
    assert_eq!(
        before["bookings"].as_array().unwrap().len(),
        after["bookings"].as_array().unwrap().len()
    );
}

#[tokio::test]
async fn inbound_on_a_pool_number_from_an_unmapped_sender_goes_to_the_owner_with_an_auto_reply() {
    let pet = Pet::new(1, 1).await;
    let p1 = pet.pool[0].clone();
    let p1_id = pet.number_row(&p1).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    pet.book("cara", "sam", "walk", 10, 40, None).await;
    pet.wait_state("pool_number", &p1_id, "LEASED").await;
    pet.fire("pool_number", &p1_id, "lease_end").await;
    wait_for(WAIT, "the release", || async {
        (pet.number_row(&p1).await["status"] == "cooldown").then_some(())
    })
    .await;
    // The exhausted pool hands the number to cleo at once.
    assert_eq!(
        pet.book("cleo", "sam", "walk", 10, 40, None).await["number"],
        p1.as_str()
    );
    // Cara, no longer mapped to it, writes to her old number: the owner, and an auto-reply; never cleo, never the sitter.
    let m = pet
        .sms(CARA, &p1, "Thanks again! Same time next week?")
        .await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("routed_to_owner"), Some("pool_sender_not_mapped"))
    );
    let (from, body) = pet.wait_sent(CARA, "booking is complete").await;
    assert_eq!(from, p1);
    assert!(body.contains("front desk"));
    // The same with contact details in it: still the owner and the auto-reply (flagged as an attempt).
    let m = pet.sms(CARA, &p1, "New number, it's 415-555-0101").await;
    assert_eq!(m["reason"], "pool_sender_not_mapped");
    wait_for(WAIT, "the second auto-reply", || async {
        (pet.sent_to(CARA)
            .iter()
            .filter(|(_, b)| b.contains("booking is complete"))
            .count()
            == 2)
            .then_some(())
    })
    .await;
    let m = pet.sms("+15559990000", &p1, "who is this?").await;
    assert_eq!(m["reason"], "unknown_sender");
    pet.wait_sent("+15559990000", "booking is complete").await;
    assert!(
        pet.sent_to(CLEO).is_empty() && pet.sent_to(SAM_PHONE).is_empty(),
        "never attached to the current client"
    );
    // Cleo, mapped, reaches her sitter.
    assert_eq!(
        pet.sms(CLEO, &p1, "Door is unlocked").await["status"],
        "relayed"
    );
    pet.wait_sent(SAM_PHONE, "Door is unlocked").await;
}

#[tokio::test]
async fn assignment_window_is_the_booking_plus_buffer_opened_and_closed_by_timers() {
    let pet = Pet::new(1, 0).await;
    let start = at_minutes(600);
    let end = start + chrono::Duration::minutes(30);
    let b = pet
        .owner(
            "POST",
            "/v1/messaging/bookings",
            json!({"client_id": "cara", "sitter_id": "sam", "service_type": "walk",
        "starts_at": start, "ends_at": end, "recurrence": "weekly"}),
        )
        .await
        .1;
    let opens: DateTime<Utc> = serde_json::from_value(b["window"]["opens_at"].clone()).unwrap();
    let closes: DateTime<Utc> = serde_json::from_value(b["window"]["closes_at"].clone()).unwrap();
    assert_eq!(
        (start - opens, closes - end),
        (chrono::Duration::minutes(60), chrono::Duration::minutes(60))
    );
    let start = at_minutes(24 * 60);
    let end = start + chrono::Duration::days(3);
    let b = pet
        .owner(
            "POST",
            "/v1/messaging/bookings",
            json!({"client_id": "carl", "sitter_id": "sam", "service_type": "house_sitting",
        "starts_at": start, "ends_at": end, "recurrence": "monthly"}),
        )
        .await
        .1;
    let opens: DateTime<Utc> = serde_json::from_value(b["window"]["opens_at"].clone()).unwrap();
    let closes: DateTime<Utc> = serde_json::from_value(b["window"]["closes_at"].clone()).unwrap();
    assert_eq!(
        (start - opens, closes - end),
        (chrono::Duration::hours(2), chrono::Duration::hours(2))
    );
    // Configurable per service type; with no buffer, the timers open and close a short window.
    pet.app
        .set_config(
            json!({"messaging": {"windows": {"drop_in": {"before_min": 0, "after_min": 0}}}}),
        )
        .await;
    let start = Utc::now() + chrono::Duration::seconds(2);
    let b = pet.owner("POST", "/v1/messaging/bookings", json!({"client_id": "cleo", "sitter_id": "sam", "service_type": "drop_in",
        "starts_at": start, "ends_at": start + chrono::Duration::seconds(4), "recurrence": "weekly"})).await.1;
    let id = b["id"].as_str().unwrap();
    assert_eq!(b["window"]["opens_at"], json!(start));
    pet.wait_state("assignment_window", id, "OPEN").await;
    pet.wait_state("assignment_window", id, "CLOSED").await;
    let sam = pet.sitter_number("sam").await;
    let m = pet
        .sms(CLEO, &sam, "Forgot to say: the cat needs water")
        .await;
    assert_eq!(
        m["reason"], "no_active_window",
        "closed: the front desk answers"
    );
}

#[tokio::test]
async fn a_reschedule_or_cancel_moves_or_cancels_the_window_timers() {
    let pet = Pet::new(1, 0).await;
    let b = pet
        .book("cara", "sam", "walk", 300, 330, Some("weekly"))
        .await;
    let id = b["id"].as_str().unwrap().to_string();
    let timers = || async {
        let rows: Vec<(String, DateTime<Utc>, String)> = sqlx::query_as(
            "select t.name, t.due_at, t.status from timers t join workflows w on w.id = t.workflow_id
              where w.kind = 'assignment_window' and w.key = $1 order by t.created_at",
        )
        .bind(&id)
        .fetch_all(&pet.app.pool)
        .await
        .unwrap();
        rows
    };
    let new_start = at_minutes(1000);
    let (code, body) = pet
        .owner(
            "POST",
            &format!("/v1/messaging/bookings/{id}/reschedule"),
            json!({"starts_at": new_start, "ends_at": new_start + chrono::Duration::minutes(30)}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    wait_for(WAIT, "the timers to move", || async {
        let t = timers().await;
        let pending: Vec<_> = t.iter().filter(|(_, _, s)| s == "pending").collect();
        (pending.len() == 2
            && pending.iter().any(|(n, at, _)| {
                n == "open"
                    && (*at - (new_start - chrono::Duration::minutes(60)))
                        .num_milliseconds()
                        .abs()
                        < 5
            }))
        .then_some(())
    })
    .await;
    // Rescheduled into now: routing follows at once.
    let now_start = at_minutes(10);
    pet.owner(
        "POST",
        &format!("/v1/messaging/bookings/{id}/reschedule"),
        json!({"starts_at": now_start, "ends_at": now_start + chrono::Duration::minutes(30)}),
    )
    .await;
    let sam = pet.sitter_number("sam").await;
    assert_eq!(
        pet.sms(CARA, &sam, "See you soon").await["status"],
        "relayed"
    );
    let (code, _) = pet
        .owner(
            "POST",
            &format!("/v1/messaging/bookings/{id}/cancel"),
            json!({"reason": "client cancelled"}),
        )
        .await;
    assert_eq!(code, 200);
    pet.wait_state("assignment_window", &id, "CANCELLED").await;
    let t = timers().await;
    assert!(
        t.iter().all(|(_, _, s)| s != "pending"),
        "every timer cancelled: {t:?}"
    );
    assert_eq!(
        pet.sms(CARA, &sam, "Are you still coming?").await["reason"],
        "no_active_window"
    );
}

#[tokio::test]
async fn exactly_one_active_window_routes_to_its_sitter_several_go_to_the_owner_to_choose_none_to_the_front_desk(
) {
    let pet = Pet::new(2, 0).await;
    let sam = pet.sitter_number("sam").await;
    let b1 = pet
        .book("cara", "sam", "walk", 10, 40, Some("weekly"))
        .await;
    assert_eq!(
        pet.sms(CARA, &sam, "one window").await["deliver_to"],
        SAM_PHONE
    );
    let b2 = pet
        .book("cara", "pia", "drop_in", 20, 50, Some("weekly"))
        .await;
    let m = pet.sms(CARA, &sam, "Who is coming at noon?").await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("routed_to_owner"), Some("several_windows"))
    );
    let item = pet.wait_inbox("several_windows").await;
    let choices = item["detail"]["choose_from"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "the owner is prompted to choose: {item}");
    assert!(pet.sent_to(PIA_PHONE).is_empty());
    // The owner chooses pia's booking: the held message goes to her (audited).
    let (code, body) = pet
        .owner(
            "POST",
            &format!(
                "/v1/messaging/inbox/{}/resolve",
                item["id"].as_str().unwrap()
            ),
            json!({"reason": "pia has the noon visit", "booking_id": b2["id"]}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    pet.wait_sent(PIA_PHONE, "Who is coming at noon?").await;
    assert_eq!(pet.audit("inbox_resolved").await.len(), 1);
    // Contact details in a held message: logged and flagged as an attempt;
    // resolving it relays it only when the owner forces it (audited).
    let m = pet
        .sms(CARA, &sam, "Whoever comes, text me on 415 555 0123")
        .await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("routed_to_owner"), Some("several_windows"))
    );
    wait_for(WAIT, "the attempt flag", || async {
        pet.inbox()
            .await
            .into_iter()
            .find(|i| i["reason"] == "poaching_attempt" && i["message_id"] == m["id"])
    })
    .await;
    let item = wait_for(WAIT, "the held item", || async {
        pet.inbox()
            .await
            .into_iter()
            .find(|i| i["reason"] == "several_windows" && i["message_id"] == m["id"])
    })
    .await;
    let path = format!(
        "/v1/messaging/inbox/{}/resolve",
        item["id"].as_str().unwrap()
    );
    let (code, body) = pet
        .owner(
            "POST",
            &path,
            json!({"reason": "sam", "booking_id": b1["id"]}),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (409, Some("blocked_content"))
    );
    assert!(pet
        .sent_to(SAM_PHONE)
        .iter()
        .all(|(_, b)| !b.contains("415 555 0123")));
    let (code, _) = pet
        .owner(
            "POST",
            &path,
            json!({"reason": "her own number, fine", "booking_id": b1["id"], "force": true}),
        )
        .await;
    assert_eq!(code, 200);
    pet.wait_sent(SAM_PHONE, "415 555 0123").await;
    assert_eq!(
        pet.audit("blocked_message_forced").await[0]["reason"],
        "her own number, fine"
    );
    let _ = b1;
    let m = pet.sms(CARL, &sam, "hello?").await;
    assert_eq!(m["reason"], "no_active_window");
}

#[tokio::test]
async fn sitters_can_send_only_during_their_active_windows() {
    let pet = Pet::new(1, 0).await;
    let sam = pet.sitter_number("sam").await;
    let key = pet.sitter_key("sam").await;
    let m = pet.sms(SAM_PHONE, &sam, "Hi, I'm free tomorrow").await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("refused"), Some("outside_window"))
    );
    pet.wait_sent(SAM_PHONE, "only during your assignment windows")
        .await;
    let future = pet
        .book("cara", "sam", "walk", 600, 630, Some("weekly"))
        .await;
    let thread = future["thread_id"].as_str().unwrap();
    let (code, body) = pet
        .call(
            &key,
            "POST",
            &format!("/v1/messaging/threads/{thread}/messages"),
            Some(json!({"text": "Hello early"})),
        )
        .await;
    assert_eq!(
        (code, body["status"].as_str(), body["reason"].as_str()),
        (200, Some("refused"), Some("outside_window"))
    );
    assert!(pet.sent_to(CARA).is_empty());
    // In the window, by SMS and by the app.
    pet.book("cara", "sam", "walk", 10, 40, Some("weekly"))
        .await;
    assert_eq!(
        pet.sms(SAM_PHONE, &sam, "Walk done!").await["status"],
        "relayed"
    );
    pet.wait_sent(CARA, "Walk done!").await;
    let (code, body) = pet
        .call(
            &key,
            "POST",
            &format!("/v1/messaging/threads/{thread}/messages"),
            Some(json!({"text": "Photos coming"})),
        )
        .await;
    assert_eq!((code, body["status"].as_str()), (200, Some("relayed")));
    // Two clients open at once: by SMS the recipient is ambiguous, the app names it.
    let carl = pet
        .book("carl", "sam", "walk", 15, 45, Some("weekly"))
        .await;
    let m = pet.sms(SAM_PHONE, &sam, "Running late").await;
    assert_eq!(m["reason"], "several_windows");
    let (_, body) = pet
        .call(
            &key,
            "POST",
            &format!(
                "/v1/messaging/threads/{}/messages",
                carl["thread_id"].as_str().unwrap()
            ),
            Some(json!({"text": "Running late"})),
        )
        .await;
    assert_eq!(body["status"], "relayed");
    pet.wait_sent(CARL, "Running late").await;
    // Another sitter's thread is not theirs.
    let other = pet.sitter_key("pia").await;
    let (code, _) = pet
        .call(
            &other,
            "POST",
            &format!("/v1/messaging/threads/{thread}/messages"),
            Some(json!({"text": "hi"})),
        )
        .await;
    assert_eq!(code, 404);
}

async fn client_row(pet: &Pet, id: &str) -> Value {
    let (_, body) = pet.owner("GET", "/v1/messaging/clients", json!(null)).await;
    body["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn new_bookings_default_to_one_time_and_recurring_is_derived() {
    let pet = Pet::new(1, 1).await;
    let sam = pet.sitter_number("sam").await;

    let c = client_row(&pet, "cara").await;
    assert_eq!(
        (c["is_one_time_client"].as_bool(), c["recurring"].as_bool()),
        (Some(true), Some(false))
    );
    let b = pet.book("cara", "sam", "walk", 10, 40, None).await;
    assert_eq!(
        (b["number_class"].as_str(), b["recurring"].as_bool()),
        (Some("pool"), Some(false))
    );
    let b = pet
        .book("cara", "sam", "walk", 24 * 60, 24 * 60 + 30, Some("weekly"))
        .await;
    assert_eq!(
        (b["number"].as_str(), b["recurring"].as_bool()),
        (Some(sam.as_str()), Some(true))
    );
    let c = client_row(&pet, "cara").await;
    assert_eq!(
        (c["is_one_time_client"].as_bool(), c["recurring"].as_bool()),
        (Some(false), Some(true))
    );
    // Marked recurring, later bookings stay on the sitter's number.
    assert_eq!(
        pet.book("cara", "sam", "walk", 48 * 60, 48 * 60 + 30, None)
            .await["number"],
        sam.as_str()
    );
    let (code, _) = pet
        .owner(
            "POST",
            "/v1/messaging/clients",
            json!({"id": "wes", "name": "Wes", "phone": "+15552220009", "weekly_plan": true}),
        )
        .await;
    assert_eq!(code, 201);
    assert_eq!(
        client_row(&pet, "wes").await["recurring"],
        true,
        "an active weekly plan makes a client recurring"
    );
}

#[tokio::test]
async fn poaching_is_blocked_never_delivered_and_the_sender_warned_the_owner_flagged_and_the_attempt_logged(
) {
    let pet = Pet::new(1, 0).await;
    let sam = pet.sitter_number("sam").await;
    pet.book("cara", "sam", "walk", 10, 40, Some("weekly"))
        .await;
    let m = pet
        .sms(
            CARA,
            &sam,
            "Next time just call me at 415-555-0134, cheaper than the app",
        )
        .await;
    assert_eq!(m["status"], "blocked");
    let (from, warning) = pet.wait_sent(CARA, "was not delivered").await;
    assert_eq!(from, sam);
    assert!(warning.contains("phone numbers"));
    let m2 = pet
        .sms(SAM_PHONE, &sam, "Follow my insta @sam.walks for pics")
        .await;
    assert_eq!(m2["status"], "blocked");
    pet.wait_sent(SAM_PHONE, "was not delivered").await;
    // Never delivered.
    assert!(pet
        .sent_to(SAM_PHONE)
        .iter()
        .all(|(_, b)| !b.contains("415-555")));
    assert!(pet.sent_to(CARA).iter().all(|(_, b)| !b.contains("insta")));
    let (_, attempts) = pet
        .owner("GET", "/v1/messaging/poaching", json!(null))
        .await;
    let attempts = attempts["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    for a in attempts {
        assert_eq!(a["sitter_id"], "sam");
        assert!(a["thread_id"].is_string() && a["message_id"].is_string() && a["text"].is_string());
        assert!(!a["findings"].as_array().unwrap().is_empty());
    }
    let roles: Vec<&str> = attempts
        .iter()
        .map(|a| a["sender_role"].as_str().unwrap())
        .collect();
    assert!(roles.contains(&"client") && roles.contains(&"sitter"));
    let flags = pet
        .inbox()
        .await
        .into_iter()
        .filter(|i| i["reason"] == "poaching_blocked")
        .count();
    assert_eq!(flags, 2, "every attempt is flagged to the owner");
    // The sitter's view of the thread never shows what was blocked.
    let key = pet.sitter_key("sam").await;
    let thread = m["thread_id"].as_str().unwrap();
    let (code, t) = pet
        .call(
            &key,
            "GET",
            &format!("/v1/messaging/threads/{thread}"),
            None,
        )
        .await;
    assert_eq!(code, 200);
    let shown = t["messages"].to_string();
    assert!(
        !shown.contains("415-555") && !shown.contains("insta"),
        "{shown}"
    );
    // A clean message in the same window still flows.
    assert_eq!(
        pet.sms(
            CARA,
            &sam,
            "Gate code is 4821, leash by the door, $45 as usual"
        )
        .await["status"],
        "relayed"
    );
}

#[tokio::test]
async fn poaching_escalates_per_sitter_within_30_days_and_only_the_owner_unlocks() {
    let pet = Pet::new(1, 0).await;
    let sam = pet.sitter_number("sam").await;
    pet.book("cara", "sam", "walk", 10, 40, Some("weekly"))
        .await;
    // Writing to the office is not poaching: the owner gets it, flagged, with no warning and no strike.
    let m = pet
        .sms(SAM_PHONE, FRONT, "Locked out at the Smiths, call me")
        .await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("routed_to_owner"), Some("from_sitter"))
    );
    pet.wait_inbox("poaching_attempt").await;
    assert_eq!(pet.state("poaching_strikes", "sam").await, "", "no strike");
    assert!(pet.sent_to(SAM_PHONE).is_empty(), "no warning");
    assert_eq!(
        pet.sms(SAM_PHONE, &sam, "text me on whatsapp").await["status"],
        "blocked"
    );
    pet.wait_state("poaching_strikes", "sam", "CLEAR").await;
    assert!(
        pet.inbox().await.iter().all(|i| i["severity"] != "high"),
        "1st offense: block and warn only"
    );
    assert_eq!(
        pet.sms(SAM_PHONE, &sam, "my email is sam at gmail dot com")
            .await["status"],
        "blocked"
    );
    let alert = pet.wait_inbox("repeat_poaching_attempt").await;
    assert_eq!(
        (
            alert["severity"].as_str(),
            alert["detail"]["strikes_in_30_days"].as_u64()
        ),
        (Some("high"), Some(2))
    );
    assert_eq!(
        pet.sms(SAM_PHONE, &sam, "sam-walks.com has my rates").await["status"],
        "blocked"
    );
    pet.wait_state("poaching_strikes", "sam", "LOCKED").await;
    let lock = pet.wait_inbox("sitter_locked_pending_review").await;
    assert_eq!(lock["severity"], "high");
    let m = pet.sms(SAM_PHONE, &sam, "Walk done, all good").await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("refused"), Some("messaging_locked"))
    );
    pet.wait_sent(SAM_PHONE, "paused pending a review").await;
    // The sitter cannot unlock themselves; the owner does, with a reason, audited.
    let key = pet.sitter_key("sam").await;
    let (code, _) = pet
        .call(
            &key,
            "POST",
            "/v1/messaging/sitters/sam/unlock",
            Some(json!({"reason": "please"})),
        )
        .await;
    assert_eq!(code, 403);
    let (code, _) = pet
        .owner("POST", "/v1/messaging/sitters/sam/unlock", json!({}))
        .await;
    assert_eq!(code, 400, "a reason is required");
    let (code, body) = pet
        .owner(
            "POST",
            "/v1/messaging/sitters/sam/unlock",
            json!({"reason": "talked it through"}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    pet.wait_state("poaching_strikes", "sam", "CLEAR").await;
    assert_eq!(
        pet.audit("sitter_unlocked").await[0]["reason"],
        "talked it through"
    );
    assert_eq!(
        pet.sms(SAM_PHONE, &sam, "Walk done, all good").await["status"],
        "relayed"
    );
}

#[tokio::test]
async fn the_owner_can_force_send_a_blocked_message_only_with_a_reason_and_it_is_audited() {
    let pet = Pet::new(1, 0).await;
    let sam = pet.sitter_number("sam").await;
    pet.book("cara", "sam", "walk", 10, 40, Some("weekly"))
        .await;
    let m = pet
        .sms(CARA, &sam, "The vet is at 415-555-0199 if anything happens")
        .await;
    assert_eq!(m["status"], "blocked");
    let id = m["id"].as_str().unwrap();
    let path = format!("/v1/messaging/messages/{id}/force");
    let key = pet.sitter_key("sam").await;
    assert_eq!(
        pet.call(&key, "POST", &path, Some(json!({"reason": "x"})))
            .await
            .0,
        403
    );
    let (code, body) = pet.owner("POST", &path, json!({})).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("reason_required"))
    );
    assert!(pet
        .sent_to(SAM_PHONE)
        .iter()
        .all(|(_, b)| !b.contains("415-555-0199")));
    let (code, _) = pet
        .owner(
            "POST",
            &path,
            json!({"reason": "the vet's number is fine to share"}),
        )
        .await;
    assert_eq!(code, 200);
    let (from, _) = pet.wait_sent(SAM_PHONE, "415-555-0199").await;
    assert_eq!(from, sam);
    let audit = pet.audit("blocked_message_forced").await;
    assert_eq!(
        (audit.len(), audit[0]["reason"].as_str()),
        (1, Some("the vet's number is fine to share"))
    );
    assert_eq!(
        pet.owner("POST", &path, json!({"reason": "again"})).await.0,
        404,
        "forced once"
    );
}

#[tokio::test]
async fn meet_and_greet_is_owner_approved_and_the_sitter_messages_only_inside_its_window_when_allowed(
) {
    let pet = Pet::new(1, 0).await;
    let sam = pet.sitter_number("sam").await;
    let (code, mg) = pet.owner("POST", "/v1/messaging/meet-and-greets",
        json!({"client_id": "cara", "sitter_id": "sam", "opens_at": at_minutes(-10), "closes_at": at_minutes(60)})).await;
    assert_eq!(code, 201, "{mg}");
    assert_eq!(mg["number"], FRONT, "it starts on the front desk");
    let id = mg["id"].as_str().unwrap().to_string();
    let decision = format!("/v1/messaging/meet-and-greets/{id}/decision");
    let decide = |body: Value| pet.owner("POST", &decision, body);
    // Not allowed yet: the sitter's text to the front desk reaches only the owner.
    let m = pet
        .sms(
            SAM_PHONE,
            FRONT,
            "Hi Cara, can I say hello before Saturday?",
        )
        .await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("routed_to_owner"), Some("from_sitter"))
    );
    // A client's text to the front desk reaches the owner, not the sitter.
    let m = pet.sms(CARA, FRONT, "Is Sam nice with cats?").await;
    assert_eq!(m["reason"], "front_desk");
    let (code, _) = decide(json!({"decision": "allow_sitter"})).await;
    assert_eq!(code, 200);
    wait_for(WAIT, "the permission", || async {
        let r: (Value,) = sqlx::query_as(
            "select state from workflows where kind = 'meet_and_greet' and key = $1",
        )
        .bind(&id)
        .fetch_one(&pet.app.pool)
        .await
        .unwrap();
        (r.0["sitter_may_message"] == true).then_some(())
    })
    .await;
    let m = pet
        .sms(
            SAM_PHONE,
            FRONT,
            "Hi Cara, looking forward to meeting Bella",
        )
        .await;
    assert_eq!(m["status"], "relayed");
    assert_eq!(
        pet.wait_sent(CARA, "looking forward").await.0,
        FRONT,
        "inside the meet-and-greet, from the front desk"
    );
    // And the client's answer on the front desk reaches the sitter, inside it.
    assert_eq!(
        pet.sms(CARA, FRONT, "Saturday 10am works").await["status"],
        "relayed"
    );
    assert_eq!(pet.wait_sent(SAM_PHONE, "Saturday 10am").await.0, FRONT);
    assert!(pet
        .sent_to(CARA)
        .iter()
        .all(|(_, b)| !b.contains("before Saturday")));
    // Only the owner decides.
    let key = pet.sitter_key("sam").await;
    let (code, _) = pet
        .call(
            &key,
            "POST",
            &format!("/v1/messaging/meet-and-greets/{id}/decision"),
            Some(json!({"decision": "approve"})),
        )
        .await;
    assert_eq!(code, 403);
    let (code, _) = decide(json!({"decision": "approve"})).await;
    assert_eq!(code, 200);
    pet.wait_state("meet_and_greet", &id, "APPROVED").await;
    wait_for(
        WAIT,
        "the thread to move to the sitter's number",
        || async {
            let (_, t) = pet
                .call(&pet.app.keys.operator, "GET", "/v1/messaging/threads", None)
                .await;
            t["threads"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["id"] == id.as_str() && t["number"] == sam.as_str())
                .cloned()
        },
    )
    .await;
    assert_eq!(
        pet.sms(SAM_PHONE, FRONT, "One more thing").await["reason"],
        "from_sitter",
        "approved: the front-desk thread is over for the sitter"
    );

    // Failed: front desk only, the sitter's access removed.
    let (_, mg2) = pet.owner("POST", "/v1/messaging/meet-and-greets",
        json!({"client_id": "carl", "sitter_id": "sam", "opens_at": at_minutes(-10), "closes_at": at_minutes(60), "sitter_may_message": true})).await;
    let id2 = mg2["id"].as_str().unwrap().to_string();
    assert_eq!(
        pet.sms(SAM_PHONE, FRONT, "Hello Carl").await["status"],
        "relayed"
    );
    let (code, _) = pet
        .owner(
            "POST",
            &format!("/v1/messaging/meet-and-greets/{id2}/decision"),
            json!({"decision": "fail", "reason": "not a fit"}),
        )
        .await;
    assert_eq!(code, 200);
    pet.wait_state("meet_and_greet", &id2, "FAILED").await;
    assert_eq!(
        pet.sms(SAM_PHONE, FRONT, "Hello again Carl").await["reason"],
        "from_sitter"
    );
    assert!(pet
        .sent_to(CARL)
        .iter()
        .all(|(_, b)| !b.contains("Hello again")));
    // Access removed: the sitter no longer sees or writes in the thread.
    wait_for(WAIT, "the sitter's access to go", || async {
        let (_, mine) = pet.call(&key, "GET", "/v1/messaging/threads", None).await;
        (!mine["threads"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == id2.as_str()))
        .then_some(())
    })
    .await;
    let (code, _) = pet
        .call(
            &key,
            "POST",
            &format!("/v1/messaging/threads/{id2}/messages"),
            Some(json!({"text": "hi"})),
        )
        .await;
    assert_eq!(code, 404);
    // Outside the window even when allowed.
    let (_, mg3) = pet.owner("POST", "/v1/messaging/meet-and-greets",
        json!({"client_id": "cleo", "sitter_id": "sam", "opens_at": at_minutes(120), "closes_at": at_minutes(180), "sitter_may_message": true})).await;
    let id3 = mg3["id"].as_str().unwrap();
    let (code, body) = pet
        .call(
            &key,
            "POST",
            &format!("/v1/messaging/threads/{id3}/messages"),
            Some(json!({"text": "Hi Cleo"})),
        )
        .await;
    assert_eq!(
        (code, body["status"].as_str(), body["reason"].as_str()),
        (200, Some("refused"), Some("outside_window"))
    );
    assert!(pet
        .sent_to(CLEO)
        .iter()
        .all(|(_, b)| !b.contains("Hi Cleo")));
}

#[tokio::test]
async fn billing_comes_only_from_the_front_desk_and_sitters_never_see_it() {
    let pet = Pet::new(1, 0).await;
    let b = pet
        .book("cara", "sam", "walk", 10, 40, Some("weekly"))
        .await;
    let thread = b["thread_id"].as_str().unwrap();
    let (code, body) = pet.owner("POST", &format!("/v1/messaging/threads/{thread}/messages"),
        json!({"text": "Your invoice for November: $180. Pay here: https://pay.example/inv/1", "kind": "billing"})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["from"], FRONT);
    let (from, _) = pet.wait_sent(CARA, "Your invoice").await;
    assert_eq!(from, FRONT, "billing originates only from the front desk");
    assert!(pet.sent_to(SAM_PHONE).is_empty());
    let key = pet.sitter_key("sam").await;
    let (code, t) = pet
        .call(
            &key,
            "GET",
            &format!("/v1/messaging/threads/{thread}"),
            None,
        )
        .await;
    assert_eq!(code, 200);
    assert!(t["messages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["kind"] != "billing"));
    let (_, threads) = pet.call(&key, "GET", "/v1/messaging/threads", None).await;
    for t in threads["threads"].as_array().unwrap() {
        let (_, full) = pet
            .call(
                &key,
                "GET",
                &format!("/v1/messaging/threads/{}", t["id"].as_str().unwrap()),
                None,
            )
            .await;
        assert!(full["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["kind"] != "billing" && !m["text"].as_str().unwrap().contains("invoice")));
    }
    let (code, body) = pet
        .call(
            &key,
            "POST",
            &format!("/v1/messaging/threads/{thread}/messages"),
            Some(json!({"text": "You owe $20", "kind": "billing"})),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (403, Some("billing_front_desk_only"))
    );
}

#[tokio::test]
async fn the_owner_sees_every_thread_window_and_number_class_and_every_override_is_audited() {
    let pet = Pet::new(2, 1).await;
    pet.book("cara", "sam", "walk", 10, 40, None).await;
    pet.book("carl", "pia", "walk", 10, 40, Some("weekly"))
        .await;
    let (_, numbers) = pet.owner("GET", "/v1/messaging/numbers", json!(null)).await;
    let classes: std::collections::BTreeSet<&str> = numbers["numbers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["class"].as_str().unwrap())
        .collect();
    assert_eq!(
        classes,
        ["front_desk", "pool", "sitter"].into_iter().collect()
    );
    let (_, bookings) = pet
        .owner("GET", "/v1/messaging/bookings", json!(null))
        .await;
    assert!(bookings["bookings"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["opens_at"].is_string() && b["window"].is_string()));
    let (_, threads) = pet.owner("GET", "/v1/messaging/threads", json!(null)).await;
    assert_eq!(threads["threads"].as_array().unwrap().len(), 2);
    // A sitter sees only their own; the owner's views are the owner's.
    let key = pet.sitter_key("sam").await;
    let (_, mine) = pet.call(&key, "GET", "/v1/messaging/threads", None).await;
    assert_eq!(mine["threads"].as_array().unwrap().len(), 1);
    for path in [
        "/v1/messaging/numbers",
        "/v1/messaging/inbox",
        "/v1/messaging/bookings",
        "/v1/messaging/poaching",
    ] {
        assert_eq!(pet.call(&key, "GET", path, None).await.0, 403, "{path}");
    }
    // Reassigning a thread is an override: audited with its reason.
    let thread = threads["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["client_id"] == "cara")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, _) = pet
        .owner(
            "POST",
            &format!("/v1/messaging/threads/{thread}/reassign"),
            json!({"sitter_id": "pia", "reason": "sam is sick"}),
        )
        .await;
    assert_eq!(code, 200);
    let a = pet.audit("thread_reassigned").await;
    assert_eq!(
        (a[0]["reason"].as_str(), a[0]["detail"]["to"].as_str()),
        (Some("sam is sick"), Some("pia"))
    );
    let p1 = pet.pool[0].clone();
    assert_eq!(
        pet.sms(CARA, &p1, "Who is coming?").await["deliver_to"],
        PIA_PHONE,
        "the booking followed the thread"
    );
    // On a sitter's own number, the thread and its bookings move to the new sitter's number.
    let carl_thread = threads["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["client_id"] == "carl")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, _) = pet
        .owner(
            "POST",
            &format!("/v1/messaging/threads/{carl_thread}/reassign"),
            json!({"sitter_id": "sam", "reason": "pia is away"}),
        )
        .await;
    assert_eq!(code, 200);
    let sam = pet.sitter_number("sam").await;
    let pia = pet.sitter_number("pia").await;
    let m = pet.sms(CARL, &pia, "Same time tomorrow?").await;
    assert_eq!(
        (m["deliver_to"].as_str(), m["deliver_from"].as_str()),
        (Some(SAM_PHONE), Some(sam.as_str()))
    );
    // The detector, as the owner's UI previews with it.
    let (code, scan) = pet
        .owner(
            "POST",
            "/v1/messages/scan",
            json!({"text": "email me: a@b.co"}),
        )
        .await;
    assert_eq!((code, scan["verdict"].as_str()), (200, Some("block")));
    assert_eq!(scan["findings"][0]["kind"], "email");
    let (_, scan) = pet
        .owner(
            "POST",
            "/v1/messages/scan",
            json!({"text": "Back at 3:30, gate code 1234"}),
        )
        .await;
    assert_eq!(
        (
            scan["verdict"].as_str(),
            scan["findings"].as_array().map(Vec::len)
        ),
        (Some("allow"), Some(0))
    );
}

#[test]
fn dispatch_scan_prints_the_verdict_and_exits_1_on_block() {
    let bin = env!("CARGO_BIN_EXE_dispatch");
    let out = std::process::Command::new(bin)
        .args(["scan", "add me on snap: bella_dog"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "block");
    let out = std::process::Command::new(bin)
        .args(["scan", "Fed at 6pm, 2 scoops"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "allow");
}

#[tokio::test]
async fn the_messaging_layer_switches_off_per_tenant_at_run_time_without_losing_a_message() {
    let pet = Pet::new(1, 0).await;
    let sam = pet.sitter_number("sam").await;
    let b = pet
        .book("cara", "sam", "walk", 10, 40, Some("weekly"))
        .await;
    // Relays off: nothing goes out, every message waits for the owner.
    pet.app
        .set_config(json!({"flags": {"message_relay": false, "assignment_window": false}}))
        .await;
    let m = pet.sms(CARA, &sam, "Leash is on the hook").await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("routed_to_owner"), Some("relays_switched_off"))
    );
    pet.wait_inbox("relays_switched_off").await;
    let thread = b["thread_id"].as_str().unwrap();
    let (code, body) = pet
        .owner(
            "POST",
            &format!("/v1/messaging/threads/{thread}/messages"),
            json!({"text": "See you at 10"}),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (409, Some("layer_disabled"))
    );
    // No new windows while their kind is off; nothing partial is stored.
    let (code, body) = pet
        .owner(
            "POST",
            "/v1/messaging/bookings",
            json!({"client_id": "carl", "sitter_id": "sam", "service_type": "walk",
            "starts_at": at_minutes(60), "ends_at": at_minutes(90), "recurrence": "weekly"}),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (409, Some("layer_disabled"))
    );
    let (_, bookings) = pet
        .owner("GET", "/v1/messaging/bookings", json!(null))
        .await;
    assert_eq!(bookings["bookings"].as_array().unwrap().len(), 1);
    assert!(pet.sent_to(SAM_PHONE).is_empty());
    // Back on, at once, in every process.
    pet.app.set_config(json!({})).await;
    assert_eq!(
        pet.sms(CARA, &sam, "Leash is on the hook, again").await["status"],
        "relayed"
    );
    pet.wait_sent(SAM_PHONE, "again").await;
}

/// Issue 17, item 3: a messaging send honours `Idempotency-Key` like every
/// other endpoint. The same key and message replays the first answer; the
/// same key with another text or on another thread is `422
/// idempotency_key_reused`, and that other message is neither stored nor sent.
#[tokio::test]
async fn a_reused_idempotency_key_with_another_message_is_refused_not_dropped() {
    let pet = Pet::new(1, 0).await;
    let b = pet
        .book("cara", "sam", "walk", 10, 40, Some("weekly"))
        .await;
    let thread = b["thread_id"].as_str().unwrap().to_string();
    let other = pet
        .book("carl", "sam", "walk", 10, 40, Some("weekly"))
        .await;
    let other = other["thread_id"].as_str().unwrap().to_string();
    let send = |thread: String, text: &'static str, key: &'static str| {
        let pet = &pet;
        async move {
            let r = pet
                .app
                .http
                .post(format!(
                    "{}/v1/messaging/threads/{thread}/messages",
                    pet.app.url
                ))
                .bearer_auth(&pet.app.keys.operator)
                .header("Idempotency-Key", key)
                .json(&json!({"text": text}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (code, first) = send(thread.clone(), "See you at 10 tomorrow", "owner-msg-1").await;
    assert_eq!(
        (code, first["status"].as_str()),
        (200, Some("queued")),
        "{first}"
    );
    let (code, replay) = send(thread.clone(), "See you at 10 tomorrow", "owner-msg-1").await;
    assert_eq!(code, 200);
    assert_eq!(replay, first, "a replay returns the first answer");
    for (thread, text) in [
        (thread.clone(), "Actually, make it 11"),
        (other.clone(), "See you at 10 tomorrow"),
    ] {
        let (code, body) = send(thread, text, "owner-msg-1").await;
        assert_eq!(
            (code, body["error"]["code"].as_str()),
            (422, Some("idempotency_key_reused")),
            "{body}"
        );
    }
    // Another caller's key space is its own.
    let sam = pet.sitter_key("sam").await;
    let r = pet
        .app
        .http
        .post(format!(
            "{}/v1/messaging/threads/{thread}/messages",
            pet.app.url
        ))
        .bearer_auth(&sam)
        .header("Idempotency-Key", "owner-msg-1")
        .json(&json!({"text": "On my way"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    pet.wait_sent(CARA, "See you at 10 tomorrow").await;
    pet.app.wait_effects_settled().await;
    let (stored,): (i64,) = sqlx::query_as(
        "select count(*) from msg_messages where body in ('Actually, make it 11') or (body = 'See you at 10 tomorrow' and thread_id <> $1)",
    )
    .bind(Uuid::parse_str(&thread).unwrap())
    .fetch_one(&pet.app.pool)
    .await
    .unwrap();
    assert_eq!(stored, 0, "the refused messages are not stored");
    let to_cara: Vec<_> = pet.sent_to(CARA);
    assert_eq!(
        to_cara
            .iter()
            .filter(|(_, t)| t.contains("See you at 10"))
            .count(),
        1,
        "sent once: {to_cara:?}"
    );
    assert!(
        pet.sent_to(CARL).is_empty(),
        "nothing went to the other thread's client"
    );
    assert!(!to_cara.iter().any(|(_, t)| t.contains("make it 11")));
}
