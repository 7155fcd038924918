//! Chaos: one API process and three worker processes against one PostgreSQL
//! of their own; dispatch workflows are driven from start to the release
//! while a random worker is SIGKILLed every few seconds and PostgreSQL is
//! restarted once. Afterwards every workflow is DETAILS_RELEASED and every
//! effect was delivered exactly once (counted in `deliveries` by key).
//!
//! Size: `CHAOS_WORKFLOWS` (default 120 here; `ops/chaos` runs 10,000).

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rand::Rng;
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use uuid::Uuid;

fn process(db: &str, role: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dispatch"));
    c.args(["serve", "--role", role])
        .env("DATABASE_URL", db)
        .env("DISPATCH_LISTEN", "127.0.0.1:0")
        .env("DISPATCH_POLL_MS", "100")
        .env("DISPATCH_SWEEP_MS", "300")
        .env("DISPATCH_SWEEP_GRACE_MS", "2000")
        .env("DISPATCH_EFFECT_LEASE_MS", "2000")
        .env("DISPATCH_RETRY_MAX_MS", "1000")
        .env("DISPATCH_EFFECT_MAX_ATTEMPTS", "1000")
        .env(
            "RUST_LOG",
            if std::env::var("TEST_LOG").is_ok() {
                "info"
            } else {
                "off"
            },
        )
        .env_remove("DISPATCH_FAULT")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    c
}

async fn api(db: &str) -> (Child, String) {
    let mut child = process(db, "api")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.split("listening on http://").nth(1) {
                return a.trim().to_string();
            }
        }
        panic!("the API exited")
    })
    .await
    .expect("the API to listen");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

fn worker(db: &str) -> Child {
    process(db, "worker").stderr(Stdio::null()).spawn().unwrap()
}

/// POST until the API answers (through worker kills and a database restart).
async fn post(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
    idem: Option<&str>,
) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut r = http
            .post(url)
            .bearer_auth(key)
            .json(body)
            .timeout(Duration::from_secs(10));
        if let Some(i) = idem {
            r = r.header("Idempotency-Key", i);
        }
        if let Ok(r) = r.send().await {
            let code = r.status().as_u16();
            if code < 500 {
                return (code, r.json().await.unwrap_or(Value::Null));
            }
        }
        assert!(Instant::now() < deadline, "the API never answered {url}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await
        .unwrap_or((-1,));
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_complete_with_every_effect_once_through_worker_kills_and_a_database_restart() {
    let n: usize = std::env::var("CHAOS_WORKFLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    // A PostgreSQL of our own: restarting the shared one would hit other tests.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pg = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || dispatch::pg::start_fast(&dir))
            .await
            .unwrap()
            .unwrap()
    };
    let admin = dispatch::store::connect(&pg.url, 2).await.unwrap();
    sqlx::query("create database chaos")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let db = format!("{}/chaos", pg.url.strip_suffix("/postgres").unwrap());
    let pool = dispatch::store::connect(&db, 4).await.unwrap();
    dispatch::store::migrate(&pool).await.unwrap();
    let keys = make_tenant(&pool, "acme").await;

    let (mut api_child, addr) = api(&db).await;
    let base = format!("http://{addr}");
    let workers = Arc::new(Mutex::new((0..3).map(|_| worker(&db)).collect::<Vec<_>>()));
    let http = reqwest::Client::new();
    let done = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));

    // Chaos: a random worker SIGKILLed every ~2 s (and replaced); PostgreSQL
    // restarted once, when a third of the work is done.
    let kills = Arc::new(AtomicUsize::new(0));
    // A third into the walk, the drivers pause until the database was restarted
    // (while the workers are still busy with what was queued).
    let restarted_flag = Arc::new(AtomicBool::new(false));
    let chaos = {
        let (workers, done, progress, kills, db) = (
            workers.clone(),
            done.clone(),
            progress.clone(),
            kills.clone(),
            db.clone(),
        );
        let restarted_flag = restarted_flag.clone();
        let (pg_dir, port, pg) = (dir.clone(), pg.port, Arc::new(Mutex::new(Some(pg))));
        tokio::spawn(async move {
            let mut restarted = false;
            while !done.load(Ordering::Relaxed) {
                let pause = rand::thread_rng().gen_range(1500..2500);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                {
                    let mut w = workers.lock().unwrap();
                    let i = rand::thread_rng().gen_range(0..w.len());
                    // SAFETY: killing our own child.
                    unsafe { libc::kill(w[i].id().unwrap() as i32, libc::SIGKILL) };
                    w[i] = worker(&db);
                }
                kills.fetch_add(1, Ordering::Relaxed);
                if !restarted && progress.load(Ordering::Relaxed) * 3 >= n * 4 {
                    restarted = true;
                    let old = pg.lock().unwrap().take().unwrap();
                    let pg_dir = pg_dir.clone();
                    let new = tokio::task::spawn_blocking(move || {
                        old.stop().unwrap();
                        dispatch::pg::start_on(&pg_dir, Some(port), dispatch::pg::Durability::Fast)
                            .unwrap()
                    })
                    .await
                    .unwrap();
                    *pg.lock().unwrap() = Some(new);
                    restarted_flag.store(true, Ordering::Relaxed);
                }
            }
            restarted
        })
    };

    // The business: start every lead, then walk each through claim → release.
    let leads: Arc<Vec<String>> = Arc::new((0..n).map(|_| Uuid::new_v4().to_string()).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let mut drivers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (leads, next, http, base, keys, progress) = (
            leads.clone(),
            next.clone(),
            http.clone(),
            base.clone(),
            keys.clone(),
            progress.clone(),
        );
        drivers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(lead) = leads.get(i) else { return };
                let (code, body) = post(
                    &http,
                    &format!("{base}/v1/workflows"),
                    &keys.integration,
                    &json!({"kind": "dispatch", "key": lead, "input": lead_input(None)}),
                    None,
                )
                .await;
                assert!(code == 201 || code == 200, "{code} {body}");
                progress.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while let Some(r) = drivers.join_next().await {
        r.unwrap();
    }
    let wait_all = |sql: String, what: &'static str| {
        let pool = pool.clone();
        async move {
            wait_for(Duration::from_secs(60 + n as u64 / 10), what, || {
                let (pool, sql) = (&pool, &sql);
                async move { (count(pool, sql).await == n as i64).then_some(()) }
            })
            .await
        }
    };
    wait_all(
        "select count(*) from workflows where kind = 'dispatch' and state_name = 'PUBLISHED'"
            .into(),
        "every lead published",
    )
    .await;
    let next = Arc::new(AtomicUsize::new(0));
    for _ in 0..8 {
        let (leads, next, http, base, keys, progress) = (
            leads.clone(),
            next.clone(),
            http.clone(),
            base.clone(),
            keys.clone(),
            progress.clone(),
        );
        let restarted_flag = restarted_flag.clone();
        drivers.spawn(async move {
            loop {
                let paused = Instant::now();
                while progress.load(Ordering::Relaxed) * 3 >= n * 4
                    && !restarted_flag.load(Ordering::Relaxed)
                {
                    assert!(
                        paused.elapsed() < Duration::from_secs(120),
                        "the database restart never happened"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(lead) = leads.get(i) else { return };
                let url = format!("{base}/v1/workflows/dispatch/{lead}/signals");
                let (code, body) = post(
                    &http,
                    &url,
                    &keys.executor,
                    &json!({"name": "claim"}),
                    Some("claim"),
                )
                .await;
                assert!(code < 300, "{code} {body}");
                for signal in ["confirm", "invoice_sent", "paid", "release"] {
                    let (code, body) = post(
                        &http,
                        &url,
                        &keys.operator,
                        &json!({"name": signal}),
                        Some(signal),
                    )
                    .await;
                    assert!(code < 300, "{code} {body}");
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while let Some(r) = drivers.join_next().await {
        r.unwrap();
    }
    wait_all("select count(*) from workflows where kind = 'dispatch' and state_name = 'DETAILS_RELEASED'".into(), "every lead released").await;
    wait_for(Duration::from_secs(120), "every effect to settle", || {
        let pool = &pool;
        async move {
            (count(
                pool,
                "select count(*) from effects where status <> 'delivered'",
            )
            .await
                == 0)
                .then_some(())
        }
    })
    .await;
    done.store(true, Ordering::Relaxed);
    let restarted = chaos.await.unwrap();

    // Exactly once, none missing: every effect delivered, one delivery per
    // effect key, and each lead's five messages there.
    let effects = count(&pool, "select count(*) from effects").await;
    let deliveries = count(&pool, "select count(*) from deliveries").await;
    let distinct = count(
        &pool,
        "select count(distinct (channel, idempotency_key)) from deliveries",
    )
    .await;
    let effects_without = count(&pool,
        "select count(*) from effects e where not exists (select 1 from deliveries d where d.tenant_id = e.tenant_id and d.effect_id = e.id)").await;
    let queued = count(
        &pool,
        "select count(*) from signals where status = 'queued'",
    )
    .await;
    for suffix in ["publish_v1", "release_v1"] {
        let have = count(
            &pool,
            &format!("select count(*) from deliveries where idempotency_key like '%:{suffix}'"),
        )
        .await;
        assert_eq!(have, n as i64, "{suffix}");
    }
    eprintln!(
        "chaos: {n} workflows, {} worker kills, database restarted: {restarted}; {effects} effects, {deliveries} deliveries",
        kills.load(Ordering::Relaxed)
    );
    assert!(restarted, "PostgreSQL was restarted once");
    assert!(kills.load(Ordering::Relaxed) >= 2);
    assert_eq!(deliveries, effects, "one delivery per effect");
    assert_eq!(distinct, deliveries, "no key delivered twice");
    assert_eq!(effects_without, 0, "none missing");
    assert_eq!(queued, 0);
    let _ = api_child.kill().await;
    for mut w in workers.lock().unwrap().drain(..) {
        let _ = w.start_kill();
    }
}
