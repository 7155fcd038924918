//! The integration-test harness: a real PostgreSQL (embedded unless
//! `DATABASE_URL` is set), a fresh database per test cloned from a migrated
//! template, the real app on a random port, typed request helpers, and waits
//! that poll a condition until a deadline (never a bare sleep).
#![allow(dead_code)]

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dispatch::config::Secret;
use dispatch::store::{self, tenants};
use dispatch::workflows::Role;
use dispatch::{ProcessRole, Settings};
use serde_json::{json, Value};
use sqlx::{Connection, PgPool};
use uuid::Uuid;

static SERVER: OnceLock<String> = OnceLock::new();
static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

/// The server URL (a `postgres` maintenance database URL).
fn server_url() -> String {
    SERVER
        .get_or_init(|| {
            if std::env::var("TEST_LOG").is_ok() {
                dispatch::telemetry::init();
            }
            if let Ok(url) = std::env::var("DATABASE_URL") {
                return url;
            }
            let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pg");
            // Clusters of earlier runs whose process is gone are scratch.
            if let Ok(entries) = std::fs::read_dir(&root) {
                for e in entries.flatten() {
                    let pid: i32 = e.file_name().to_string_lossy().parse().unwrap_or(0);
                    // SAFETY: signal 0 only probes for existence.
                    if pid > 0 && unsafe { libc::kill(pid, 0) } != 0 {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
            let dir = root.join(std::process::id().to_string());
            dispatch::pg::start_fast(&dir)
                .expect("start embedded PostgreSQL")
                .url
        })
        .clone()
}

fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("URL has a database");
    format!("{base}/{db}")
}

async fn template() -> String {
    TEMPLATE
        .get_or_init(|| async {
            let url = server_url();
            // One migrated template per schema version, shared by concurrent test processes.
            let migrations: String =
                std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
                    .unwrap()
                    .flatten()
                    .map(|e| std::fs::read_to_string(e.path()).unwrap())
                    .collect();
            let digest = format!("{:x}", sha2_digest(migrations.as_bytes()));
            let name = format!("dispatch_tmpl_{}", &digest[..16]);
            let mut admin = connect_retry(&url).await;
            sqlx::query("select pg_advisory_lock(4242)")
                .execute(&mut admin)
                .await
                .unwrap();
            let exists: Option<(i32,)> =
                sqlx::query_as("select 1 from pg_database where datname = $1")
                    .bind(&name)
                    .fetch_optional(&mut admin)
                    .await
                    .unwrap();
            if exists.is_none() {
                let building = format!("{name}_building");
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "drop database if exists {building}"
                )))
                .execute(&mut admin)
                .await
                .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!("create database {building}")))
                    .execute(&mut admin)
                    .await
                    .unwrap();
                let pool = PgPool::connect(&with_db(&url, &building)).await.unwrap();
                store::migrate(&pool).await.expect("migrate template");
                pool.close().await;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "alter database {building} rename to {name}"
                )))
                .execute(&mut admin)
                .await
                .unwrap();
            }
            drop_old_test_databases(&mut admin).await;
            sqlx::query("select pg_advisory_unlock(4242)")
                .execute(&mut admin)
                .await
                .unwrap();
            name
        })
        .await
        .clone()
}

/// Test databases of earlier runs (older than an hour, by their UUIDv7 name)
/// are dropped, so a shared `DATABASE_URL` server does not fill up.
async fn drop_old_test_databases(admin: &mut sqlx::PgConnection) {
    let names: Vec<(String,)> =
        sqlx::query_as("select datname from pg_database where datname like 't\\_%'")
            .fetch_all(&mut *admin)
            .await
            .unwrap();
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for (name,) in names {
        let created = Uuid::parse_str(&name[2..])
            .ok()
            .and_then(|u| u.get_timestamp())
            .map(|ts| {
                let (secs, nanos) = ts.to_unix();
                std::time::UNIX_EPOCH + Duration::new(secs, nanos)
            });
        if created.is_some_and(|c| c < hour_ago) {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "drop database if exists {name} with (force)"
            )))
            .execute(&mut *admin)
            .await;
        }
    }
}

fn sha2_digest(bytes: &[u8]) -> u128 {
    // FNV-1a is enough to name a template after its migrations.
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in bytes {
        h ^= *b as u128;
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    h
}

pub async fn connect_retry(url: &str) -> sqlx::PgConnection {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match sqlx::PgConnection::connect(url).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to test PostgreSQL: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A fresh database cloned from the migrated template; returns its URL.
pub async fn fresh_database() -> String {
    let tmpl = template().await;
    let url = server_url();
    let name = format!("t_{}", Uuid::now_v7().simple());
    let mut admin = connect_retry(&url).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "create database {name} template {tmpl}"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    with_db(&url, &name)
}

/// Settings tuned for tests: fast polls, sweeps and retries.
pub fn test_settings(url: &str) -> Settings {
    let mut s = Settings {
        database_url: Some(Secret::new(url)),
        db_pool: 40,
        ..Settings::default()
    };
    s.workers.poll_interval = Duration::from_millis(100);
    s.workers.sweep_interval = Duration::from_millis(200);
    s.workers.sweep_grace = Duration::from_millis(1500);
    s.workers.shutdown_grace = Duration::from_secs(5);
    s.outbox.retry_min = Duration::from_millis(50);
    s.outbox.retry_max = Duration::from_millis(400);
    s.outbox.lease = Duration::from_secs(5);
    s
}

/// Keys of a test tenant.
#[derive(Debug, Clone)]
pub struct Keys {
    pub tenant: String,
    pub tenant_id: Uuid,
    pub ops: String,
    pub operator: String,
    pub executor: String,
    pub integration: String,
}

/// A running app against its own database.
pub struct TestApp {
    pub url: String,
    pub db_url: String,
    pub pool: PgPool,
    pub http: reqwest::Client,
    pub keys: Keys,
    running: Option<dispatch::Running>,
}

impl TestApp {
    /// Spawn API + workers in-process.
    pub async fn spawn() -> TestApp {
        Self::spawn_role(ProcessRole::All).await
    }

    /// Spawn only some parts in-process (e.g. the API, with workers in a child process).
    pub async fn spawn_role(role: ProcessRole) -> TestApp {
        Self::spawn_with(role, |_| {}).await
    }

    /// Spawn with adjusted settings.
    pub async fn spawn_with(role: ProcessRole, adjust: impl FnOnce(&mut Settings)) -> TestApp {
        let db_url = fresh_database().await;
        let mut settings = test_settings(&db_url);
        adjust(&mut settings);
        let pool = store::connect(&db_url, settings.db_pool).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = dispatch::launch(&settings, pool.clone(), role, Some(listener))
            .await
            .unwrap();
        let url = format!("http://{}", running.addr.expect("api address"));
        let keys = make_tenant(&pool, "acme").await;
        TestApp {
            url,
            db_url,
            pool,
            http: reqwest::Client::new(),
            keys,
            running: Some(running),
        }
    }

    /// Stop the in-process app (drains in-flight work).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }

    /// Add a key.
    pub async fn key(&self, tenant_id: Uuid, role: Role, subject: Option<&str>) -> String {
        let mut conn = self.pool.acquire().await.unwrap();
        tenants::add_key(&mut conn, tenant_id, role, subject)
            .await
            .unwrap()
    }

    /// Set the tenant's config.
    pub async fn set_config(&self, config: Value) {
        let mut conn = self.pool.acquire().await.unwrap();
        assert!(tenants::set_config(&mut conn, self.keys.tenant_id, &config)
            .await
            .unwrap());
    }

    /// POST /v1/workflows.
    pub async fn start(&self, key: &str, kind: &str, wf_key: &str, input: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/workflows", self.url))
            .bearer_auth(key)
            .json(&json!({"kind": kind, "key": wf_key, "input": input}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// POST a JSON body to `path`, with an optional `Idempotency-Key`.
    pub async fn post(
        &self,
        key: &str,
        path: &str,
        body: Value,
        idem: Option<&str>,
    ) -> (u16, Value) {
        let mut r = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .json(&body);
        if let Some(i) = idem {
            r = r.header("Idempotency-Key", i);
        }
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// POST a signal, optionally waiting for its outcome.
    pub async fn signal(
        &self,
        key: &str,
        wf_key: &str,
        idem: &str,
        name: &str,
        payload: Value,
        wait_ms: Option<u64>,
    ) -> (u16, Value) {
        let mut url = format!("{}/v1/workflows/dispatch/{wf_key}/signals", self.url);
        if let Some(ms) = wait_ms {
            url.push_str(&format!("?wait_ms={ms}"));
        }
        let r = self
            .http
            .post(url)
            .bearer_auth(key)
            .header("Idempotency-Key", idem)
            .json(&json!({"name": name, "payload": payload}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// GET a dispatch workflow.
    pub async fn get(&self, key: &str, wf_key: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}/v1/workflows/dispatch/{wf_key}", self.url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Wait until the workflow is in `state` (operator view).
    pub async fn wait_state(&self, wf_key: &str, state: &str) -> Value {
        let key = self.keys.operator.clone();
        wait_for(
            Duration::from_secs(20),
            &format!("{wf_key} to reach {state}"),
            || async {
                let (code, body) = self.get(&key, wf_key).await;
                (code == 200 && body["state"] == state).then_some(body)
            },
        )
        .await
    }

    /// Deliveries recorded by the log channel, oldest first: (key, recipient, body).
    pub async fn deliveries(&self) -> Vec<(String, String, String)> {
        sqlx::query_as(
            "select idempotency_key, recipient, body from deliveries order by delivered_at, id",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Wait until every effect of the tenant is settled (delivered or dead).
    pub async fn wait_effects_settled(&self) {
        wait_for(Duration::from_secs(20), "effects to settle", || async {
            let (n,): (i64,) = sqlx::query_as(
                "select count(*) from effects where status in ('pending', 'running')",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap();
            (n == 0).then_some(())
        })
        .await
    }
}

/// Create a tenant with one key per role (executor subject `executor-1`).
pub async fn make_tenant(pool: &PgPool, name: &str) -> Keys {
    let mut conn = pool.acquire().await.unwrap();
    let t = tenants::create(&mut conn, name)
        .await
        .unwrap()
        .expect("new tenant");
    let ops = tenants::add_key(&mut conn, t.id, Role::Ops, None)
        .await
        .unwrap();
    let operator = tenants::add_key(&mut conn, t.id, Role::Operator, Some("op-1"))
        .await
        .unwrap();
    let executor = tenants::add_key(&mut conn, t.id, Role::Executor, Some("executor-1"))
        .await
        .unwrap();
    let integration = tenants::add_key(&mut conn, t.id, Role::Integration, None)
        .await
        .unwrap();
    Keys {
        tenant: name.into(),
        tenant_id: t.id,
        ops,
        operator,
        executor,
        integration,
    }
}

/// Poll `check` until it yields a value or the deadline passes (then panic).
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A lead with canary personal data.
pub fn lead_input(deadline_s: Option<u64>) -> Value {
    let mut input = json!({
        "lead": {
            "client": {"name": "Canary Clientname", "phone": "+972-50-555-0199"},
            "from": {"street": "12 Canary Street", "locality": "Haifa", "floor": 3, "elevator": false},
            "to": {"street": "7 Hidden Road", "locality": "Kiryat Ata", "floor": 2, "elevator": false},
            "date": "2026-02-23", "time_window": "Morning", "volume": "1BR",
            "extras": ["Fridge", "Washing machine"],
            "estimate": {"min": 850, "max": 950},
            "notes": "canary note: gate code 4411",
            "media": ["https://canary.example/photo.jpg"]
        }
    });
    if let Some(s) = deadline_s {
        input["claim_deadline_s"] = json!(s);
    }
    input
}

/// The personal canaries of [`lead_input`].
pub const CANARIES: &[&str] = &[
    "Canary Clientname",
    "555-0199",
    "Canary Street",
    "Hidden Road",
    "canary note",
    "canary.example",
];
