//! The real binary as separate processes: workers killed mid-flight, the
//! tenant CLI, graceful shutdown.

mod common;
#[path = "common/fake.rs"]
mod fake;

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use dispatch::ProcessRole;
use serde_json::{json, Value};
use uuid::Uuid;

fn dispatch_cmd(db_url: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dispatch"));
    c.env("DATABASE_URL", db_url)
        .env("DISPATCH_POLL_MS", "100")
        .env("DISPATCH_SWEEP_MS", "200")
        .env("DISPATCH_SWEEP_GRACE_MS", "1500")
        .env("DISPATCH_EFFECT_LEASE_MS", "1500")
        .env(
            "RUST_LOG",
            if std::env::var("TEST_LOG").is_ok() {
                "info"
            } else {
                "off"
            },
        )
        .env_remove("DISPATCH_FAULT")
        .stdin(Stdio::null());
    c
}

fn worker(db_url: &str, fault: Option<&str>) -> Child {
    let mut c = dispatch_cmd(db_url);
    c.args(["serve", "--role", "worker"]);
    if let Some(f) = fault {
        c.env("DISPATCH_FAULT", f);
    }
    c.spawn().expect("spawn worker")
}

async fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    wait_for(Duration::from_secs(30), what, || {
        let status = child.try_wait().unwrap();
        async move { status }
    })
    .await
}

async fn effect_row(app: &TestApp, key: &str) -> (String, i32) {
    sqlx::query_as("select status, attempts from effects where idempotency_key = $1")
        .bind(key)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn deliveries_of(app: &TestApp, key: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as("select count(*) from deliveries where idempotency_key = $1")
        .bind(key)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    n
}

/// Start a dispatch workflow with only a worker that aborts at `fault`; wait
/// until it died there. Returns the lead id.
async fn start_with_doomed_worker(app: &TestApp, fault: &str) -> String {
    let mut doomed = worker(&app.db_url, Some(fault));
    let lead = Uuid::new_v4().to_string();
    let (code, _) = app
        .start(&app.keys.integration, "dispatch", &lead, lead_input(None))
        .await;
    assert_eq!(code, 201);
    let status = wait_exit(&mut doomed, &format!("the worker to die at {fault}")).await;
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "killed at {fault}: {status:?}"
    );
    lead
}

#[tokio::test]
async fn a_worker_killed_after_the_transition_committed_delivers_the_effect_once_after_restart() {
    let app = TestApp::spawn_role(ProcessRole::Api).await;
    let lead = start_with_doomed_worker(&app, "before_effect").await;

    let publish = format!("{lead}:publish_v1");
    assert_eq!(
        effect_row(&app, &publish).await,
        ("pending".to_string(), 0),
        "the transition committed, the effect did not run"
    );
    assert_eq!(deliveries_of(&app, &publish).await, 0);

    let mut healthy = worker(&app.db_url, None);
    app.wait_state(&lead, "PUBLISHED").await;
    assert_eq!(
        deliveries_of(&app, &publish).await,
        1,
        "delivered exactly once"
    );
    assert_eq!(
        effect_row(&app, &publish).await,
        ("delivered".to_string(), 1)
    );
    healthy.kill().unwrap();
    healthy.wait().unwrap();
}

/// The crew group on Telegram at a fake Bot API: a send is an HTTP call
/// that cannot be taken back (the log channel's message, by contrast, is its
/// ledger row, written atomically with the outcome).
async fn crew_on_telegram(app: &TestApp, fake: &fake::Fake) {
    let put = |path: &'static str, body: Value| async move {
        let r = app
            .http
            .put(format!("{}{path}", app.url))
            .bearer_auth(&app.keys.ops)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}: {}", r.text().await.unwrap());
    };
    put(
        "/v1/tenants/acme/providers/telegram",
        json!({"bot_token": "123456:TEST-not-a-real-token", "webhook_secret": "s3cret", "bot_username": "DispatchBot", "base_url": fake.url}),
    )
    .await;
    put(
        "/v1/tenants/acme/config",
        json!({"dispatch": {"crew": {"enabled": true, "provider": "telegram", "chat_id": -100777}}}),
    )
    .await;
}

#[tokio::test]
async fn a_worker_killed_after_delivering_but_before_recording_it_does_not_deliver_twice() {
    let app = TestApp::spawn_role(ProcessRole::Api).await;
    let fake = fake::Fake::start().await;
    crew_on_telegram(&app, &fake).await;
    let lead = start_with_doomed_worker(&app, "after_delivery").await;
    let publish = format!("{lead}:publish_v1");
    assert_eq!(
        effect_row(&app, &publish).await,
        ("running".to_string(), 1),
        "delivered, not recorded"
    );
    assert_eq!(fake.ok_calls("/sendMessage").len(), 1, "sent once");
    assert_eq!(deliveries_of(&app, &publish).await, 1, "in the ledger");

    let mut healthy = worker(&app.db_url, None);
    let wf = app.wait_state(&lead, "PUBLISHED").await;
    assert_eq!(
        fake.ok_calls("/sendMessage").len(),
        1,
        "the retry found the send by its idempotency key and did not send again"
    );
    assert_eq!(deliveries_of(&app, &publish).await, 1);
    assert_eq!(
        effect_row(&app, &publish).await,
        ("delivered".to_string(), 2),
        "second attempt after the lease expired"
    );
    let (message_id,): (Option<String>,) =
        sqlx::query_as("select provider_message_id from deliveries where idempotency_key = $1")
            .bind(&publish)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        wf["data"]["post"]["message_id"].as_str(),
        message_id.as_deref(),
        "the post refers to the one message"
    );
    healthy.kill().unwrap();
    healthy.wait().unwrap();
}

#[tokio::test]
async fn a_log_channel_message_is_written_with_its_outcome_so_a_kill_between_leaves_none() {
    let app = TestApp::spawn_role(ProcessRole::Api).await;
    let lead = start_with_doomed_worker(&app, "after_delivery").await;
    let publish = format!("{lead}:publish_v1");
    assert_eq!(effect_row(&app, &publish).await, ("running".to_string(), 1));
    assert_eq!(
        deliveries_of(&app, &publish).await,
        0,
        "nothing of an unrecorded attempt is visible"
    );
    let mut healthy = worker(&app.db_url, None);
    let wf = app.wait_state(&lead, "PUBLISHED").await;
    assert_eq!(
        deliveries_of(&app, &publish).await,
        1,
        "exactly one message"
    );
    let (delivery_id,): (Uuid,) =
        sqlx::query_as("select id from deliveries where idempotency_key = $1")
            .bind(&publish)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(wf["data"]["post"]["message_id"], delivery_id.to_string());
    healthy.kill().unwrap();
    healthy.wait().unwrap();
}

#[tokio::test]
async fn the_tenant_cli_prints_keys_that_authenticate() {
    let db = fresh_database().await;
    let out = dispatch_cmd(&db)
        .args(["tenant", "create", "shop"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["tenant"], "shop");
    for role in ["ops", "operator", "executor", "integration"] {
        assert!(
            created["keys"][role].as_str().unwrap().starts_with("dsp_"),
            "{created}"
        );
    }
    let again = dispatch_cmd(&db)
        .args(["tenant", "create", "shop"])
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "a second create of the same tenant fails"
    );

    let out = dispatch_cmd(&db)
        .args([
            "tenant",
            "add-key",
            "shop",
            "--role",
            "executor",
            "--subject",
            "crew-7",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let added: Value = serde_json::from_slice(&out.stdout).unwrap();
    let exec_key = added["key"].as_str().unwrap().to_string();
    let bad = dispatch_cmd(&db)
        .args(["tenant", "add-key", "shop", "--role", "king"])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    // Which kinds are served: none without a worker.
    let out = dispatch_cmd(&db).args(["ops", "kinds"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kinds: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(kinds["kinds"]["dispatch"]["status"], "unserved");
    assert_eq!(kinds["kinds"]["lead_finalization"]["queued_signals"], 0);

    // Workflow migrations: a dry run for this binary's dispatch definition.
    let out = dispatch_cmd(&db)
        .args([
            "ops",
            "migrate-workflows",
            "--kind",
            "dispatch",
            "--to",
            "1",
            "--dry-run",
            "--reason",
            "check",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["migrated"].as_u64(), report["dry_run"].as_bool()),
        (Some(0), Some(true))
    );
    let wrong = dispatch_cmd(&db)
        .args([
            "ops",
            "migrate-workflows",
            "--kind",
            "dispatch",
            "--to",
            "9",
            "--reason",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!wrong.status.success(), "only to this binary's version");

    // The printed keys work against a server on the same database.
    let mut server = dispatch_cmd(&db)
        .args(["serve", "--role", "all"])
        .env("DISPATCH_LISTEN", "127.0.0.1:0")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = read_listen_addr(&mut server).await;
    let http = reqwest::Client::new();
    let lead = Uuid::new_v4().to_string();
    let r = http
        .post(format!("http://{addr}/v1/workflows"))
        .bearer_auth(created["keys"]["integration"].as_str().unwrap())
        .json(&json!({"kind": "dispatch", "key": lead, "input": lead_input(None)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let claimed = wait_for(Duration::from_secs(20), "the claim to apply", || {
        let http = http.clone();
        let (lead, key, addr) = (lead.clone(), exec_key.clone(), addr.clone());
        async move {
            let r: Value = http
                .post(format!(
                    "http://{addr}/v1/workflows/dispatch/{lead}/signals?wait_ms=2000"
                ))
                .bearer_auth(&key)
                .header("Idempotency-Key", format!("claim-{}", Uuid::new_v4()))
                .json(&json!({"name": "claim"}))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (r["status"] == "applied").then_some(r)
        }
    })
    .await;
    assert_eq!(claimed["state"], "CLAIMED");

    // SIGTERM drains and exits cleanly.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut server, "the server to shut down").await;
    assert!(status.success(), "{status:?}");
}

/// Read stderr until the "listening on http://ADDR" line.
async fn read_listen_addr(child: &mut Child) -> String {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("listening on http://").nth(1) {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    wait_for(Duration::from_secs(30), "the server to listen", || {
        let got = rx.try_recv().ok();
        async move { got }
    })
    .await
}

/// Spawn `dispatch serve --role api` on a free port; returns the child and its address.
async fn api_process(db: &str) -> (Child, String) {
    let mut child = dispatch_cmd(db)
        .args(["serve", "--role", "api"])
        .env("DISPATCH_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = read_listen_addr(&mut child).await;
    (child, addr)
}

#[tokio::test]
async fn two_apis_and_two_workers_drive_workflows_to_completion_with_every_effect_once() {
    let db = fresh_database().await;
    let pool = dispatch::store::connect(&db, 5).await.unwrap();
    let keys = make_tenant(&pool, "acme").await;
    let (mut api_a, a) = api_process(&db).await;
    let (mut api_b, b) = api_process(&db).await;
    let mut workers = [worker(&db, None), worker(&db, None)];
    let apis = [a, b];
    let http = reqwest::Client::new();
    let signal = |api: &str, key: &str, lead: &str, name: &str, idem: String| {
        http.post(format!(
            "http://{api}/v1/workflows/dispatch/{lead}/signals?wait_ms=10000"
        ))
        .bearer_auth(key)
        .header("Idempotency-Key", idem)
        .json(&json!({"name": name}))
        .send()
    };
    let leads: Vec<String> = (0..20).map(|_| Uuid::new_v4().to_string()).collect();
    for (i, lead) in leads.iter().enumerate() {
        let r = http
            .post(format!("http://{}/v1/workflows", apis[i % 2]))
            .bearer_auth(&keys.integration)
            .json(&json!({"kind": "dispatch", "key": lead, "input": lead_input(None)}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    for (i, lead) in leads.iter().enumerate() {
        let api = &apis[(i + 1) % 2];
        wait_for(Duration::from_secs(30), "the post", || {
            let r = http
                .get(format!("http://{api}/v1/workflows/dispatch/{lead}"))
                .bearer_auth(&keys.operator)
                .send();
            async move {
                (r.await.ok()?.json::<Value>().await.ok()?["state"] == "PUBLISHED").then_some(())
            }
        })
        .await;
        let steps = [
            (&keys.executor, "claim", "CLAIMED"),
            (&keys.operator, "confirm", "OPERATOR_CONFIRMED"),
            (&keys.operator, "invoice_sent", "INVOICE_SENT"),
            (&keys.operator, "paid", "PAID"),
            (&keys.operator, "release", "DETAILS_RELEASED"),
        ];
        for (j, (key, name, state)) in steps.iter().enumerate() {
            let api = &apis[(i + j) % 2];
            let r: Value = signal(api, key, lead, name, format!("{lead}-{name}"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(
                (r["status"].as_str(), r["state"].as_str()),
                (Some("applied"), Some(*state)),
                "{lead} {name}: {r}"
            );
        }
    }
    wait_for(Duration::from_secs(30), "every effect delivered", || {
        let pool = pool.clone();
        async move {
            let (open,): (i64,) =
                sqlx::query_as("select count(*) from effects where status <> 'delivered'")
                    .fetch_one(&pool)
                    .await
                    .ok()?;
            (open == 0).then_some(())
        }
    })
    .await;
    let (deliveries, distinct): (i64, i64) =
        sqlx::query_as("select count(*), count(distinct idempotency_key) from deliveries")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (deliveries, distinct),
        (20 * 4, 20 * 4),
        "publish, claim notice, reserved edit, release: each once"
    );
    for child in [&mut api_a, &mut api_b]
        .into_iter()
        .chain(workers.iter_mut())
    {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// Only signals a caller waits on are announced when decided (each
/// announcement wakes every listening process and takes PostgreSQL's
/// notify lock at commit). A caller that waits on a replayed idempotency
/// key — the signal was stored earlier by a caller that did not wait — is
/// announced too: it gets its answer when the workers decide it, not at its
/// two-second re-check.
#[tokio::test]
async fn only_signals_a_caller_waits_on_are_announced_and_a_replayed_wait_is_one_of_them() {
    let app = TestApp::spawn_role(ProcessRole::Api).await;
    let lead = Uuid::new_v4().to_string();
    let (status, _) = app
        .start(&app.keys.integration, "dispatch", &lead, lead_input(None))
        .await;
    assert_eq!(status, 201);
    let mut listener = sqlx::postgres::PgListener::connect(&app.db_url)
        .await
        .unwrap();
    listener.listen("dispatch_signal_done").await.unwrap();
    // No worker runs yet: both stay queued.
    let (s1, unwaited) = app
        .signal(
            &app.keys.operator,
            &lead,
            "nobody-waits",
            "confirm",
            json!({}),
            None,
        )
        .await;
    let (s2, replayed) = app
        .signal(
            &app.keys.operator,
            &lead,
            "replayed",
            "paid",
            json!({}),
            None,
        )
        .await;
    assert_eq!((s1, s2), (202, 202), "{unwaited} {replayed}");
    let replay = {
        let (http, url, key) = (
            app.http.clone(),
            format!(
                "{}/v1/workflows/dispatch/{lead}/signals?wait_ms=30000",
                app.url
            ),
            app.keys.operator.clone(),
        );
        tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(key)
                .header("Idempotency-Key", "replayed")
                .json(&json!({"name": "paid", "payload": {}}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    let (replayed_id, unwaited_id) = (
        replayed["signal_id"].as_str().unwrap().to_string(),
        unwaited["signal_id"].as_str().unwrap().to_string(),
    );
    wait_for(
        Duration::from_secs(10),
        "the replay marked as awaited",
        || {
            let (pool, id) = (app.pool.clone(), replayed_id.clone());
            async move {
                let (wake,): (bool,) =
                    sqlx::query_as("select wake from signals where id = $1::uuid")
                        .bind(id)
                        .fetch_one(&pool)
                        .await
                        .ok()?;
                wake.then_some(())
            }
        },
    )
    .await;
    let workers = dispatch::launch(
        &test_settings(&app.db_url),
        app.pool.clone(),
        ProcessRole::Worker,
        None,
    )
    .await
    .unwrap();
    let (status, answer) = replay.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["signal_id"].as_str(), Some(replayed_id.as_str()));
    assert!(
        matches!(answer["status"].as_str(), Some("applied" | "rejected")),
        "{answer}"
    );
    // Both were decided; only the awaited one was announced.
    wait_for(Duration::from_secs(10), "both signals decided", || {
        let pool = app.pool.clone();
        async move {
            let (queued,): (i64,) =
                sqlx::query_as("select count(*) from signals where status = 'queued'")
                    .fetch_one(&pool)
                    .await
                    .ok()?;
            (queued == 0).then_some(())
        }
    })
    .await;
    let mut announced = Vec::new();
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await {
        announced.extend(n.payload().split(',').map(str::to_string));
    }
    assert!(announced.contains(&replayed_id), "{announced:?}");
    assert!(!announced.contains(&unwaited_id), "{announced:?}");
    workers.stop().await;
}
