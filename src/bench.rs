//! `dispatch bench`: the runtime measured against `pgbench -N` on the same
//! server, in the same run, so the numbers travel between machines as ratios.
//!
//! Every run creates two scratch databases (`dispatch_bench`, `dispatch_pgbench`)
//! on the server, runs the whole application in this process (API on a local
//! port, workers serving the `bench_chain` workload), and prints a table and
//! one JSON line per scenario.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;
use workflows::{Actor, Role};

use crate::config::{ProcessRole, Secret, Settings};
use crate::engine::{Engine, SignalIn};
use crate::store::{self, tenants};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    /// Scenarios: `workflows`, `latency`, `timers`, `ingest`.
    pub scenarios: Vec<String>,
    /// Workflows in the `workflows` scenario.
    pub workflows: usize,
    /// Concurrent clients (and pgbench clients).
    pub concurrency: usize,
    /// Pending timers in the `timers` scenario.
    pub timers: usize,
    /// Of which fall due inside the same second.
    pub due: usize,
    /// Signals per second in the `latency` scenario.
    pub rate: u32,
    /// Seconds for `latency`, `ingest` and pgbench.
    pub seconds: u64,
    /// Workers as separate processes (0: in the bench process).
    pub worker_processes: usize,
}

/// Worker processes the bench started; killed when dropped.
struct Workers(Vec<std::process::Child>);

impl Workers {
    fn spawn(n: usize, db_url: &str, base: &Settings) -> anyhow::Result<Workers> {
        let exe = std::env::current_exe().context("the dispatch binary")?;
        let mut children = Vec::with_capacity(n);
        for _ in 0..n {
            let child = std::process::Command::new(&exe)
                .args(["serve", "--role", "worker"])
                .env("DATABASE_URL", db_url)
                .env("DISPATCH_BENCH_WORKLOAD", "1")
                .env("ENABLED_WORKFLOWS", KIND)
                .env(
                    "DISPATCH_WORKER_CONCURRENCY",
                    base.workers.concurrency.to_string(),
                )
                .env("RUST_LOG", "warn")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .context("starting a worker process")?;
            children.push(child);
        }
        Ok(Workers(children))
    }

    /// The largest resident set of the worker processes, MiB (Linux).
    fn peak_rss_mib(&self) -> f64 {
        self.0
            .iter()
            .filter_map(|c| std::fs::read_to_string(format!("/proc/{}/status", c.id())).ok())
            .filter_map(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .fold(0.0, f64::max)
            / 1024.0
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms_stats(mut values: Vec<f64>) -> Value {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    json!({
        "n": values.len(),
        "p50_ms": percentile(&values, 50.0), "p95_ms": percentile(&values, 95.0),
        "p99_ms": percentile(&values, 99.0), "max_ms": values.last().copied().unwrap_or(f64::NAN),
    })
}

fn with_db(url: &str, db: &str) -> anyhow::Result<String> {
    let mut u = url::Url::parse(url).context("DATABASE_URL is not a URL")?;
    u.set_path(&format!("/{db}"));
    Ok(u.to_string())
}

async fn recreate(admin: &PgPool, db: &str) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "drop database if exists {db} with (force)"
    )))
    .execute(admin)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {db}")))
        .execute(admin)
        .await?;
    Ok(())
}

/// `pgbench -N` (simple update) with `clients` clients for `seconds`: TPS.
pub async fn pgbench(url: &str, clients: usize, seconds: u64) -> anyhow::Result<f64> {
    let u = url::Url::parse(url)?;
    let bin = crate::pg::find_bin_dir()
        .map(|d| d.join("pgbench"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "pgbench".into());
    let env = |c: &mut tokio::process::Command| {
        c.env("PGHOST", u.host_str().unwrap_or("127.0.0.1"))
            .env("PGPORT", u.port().unwrap_or(5432).to_string())
            .env(
                "PGUSER",
                if u.username().is_empty() {
                    "postgres"
                } else {
                    u.username()
                },
            )
            .env("PGDATABASE", u.path().trim_start_matches('/'));
        if let Some(p) = u.password() {
            c.env("PGPASSWORD", p);
        }
    };
    let mut init = tokio::process::Command::new(&bin);
    init.args(["-i", "-q", "-s", "10"]);
    env(&mut init);
    let out = init.output().await.context("running pgbench -i")?;
    if !out.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut run = tokio::process::Command::new(&bin);
    run.args([
        "-N",
        "-n",
        "-c",
        &clients.to_string(),
        "-j",
        &clients.min(4).to_string(),
        "-T",
        &seconds.to_string(),
    ]);
    env(&mut run);
    let out = run.output().await.context("running pgbench -N")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no tps in pgbench's output: {text}"))
}

/// Peak resident memory of this process, MiB (VmHWM).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// How long the bench waits for every backend to report its statistics.
const STATS_SETTLE: Duration = Duration::from_secs(11);

/// Statements the bench itself ran on the bench database (each one an
/// autocommit transaction counted by `pg_stat_database`).
static BENCH_QUERIES: AtomicU64 = AtomicU64::new(0);

struct Bench {
    pool: PgPool,
    engine: Engine,
    tenant: Uuid,
    key: String,
    url: String,
    http: reqwest::Client,
}

const KIND: &str = "bench_chain";

impl Bench {
    fn integration() -> Actor {
        Actor {
            role: Role::Integration,
            subject: None,
        }
    }

    /// Start `keys` concurrently; with `steps`, queue both steps right after.
    async fn start_all(
        &self,
        keys: Vec<String>,
        input: Value,
        steps: bool,
        concurrency: usize,
    ) -> anyhow::Result<()> {
        let items = keys.into_iter().map(|k| (k, input.clone())).collect();
        self.start_each(items, steps, concurrency).await
    }

    /// Start each `(key, input)` concurrently; with `steps`, queue both steps right after.
    async fn start_each(
        &self,
        items: Vec<(String, Value)>,
        steps: bool,
        concurrency: usize,
    ) -> anyhow::Result<()> {
        let items = Arc::new(items);
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (items, next, engine, tenant) = (
                items.clone(),
                next.clone(),
                self.engine.clone(),
                self.tenant,
            );
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((key, input)) = items.get(i) else {
                        return Ok::<_, anyhow::Error>(());
                    };
                    engine
                        .start(&Self::integration(), tenant, KIND, key, input)
                        .await?;
                    if steps {
                        for s in 1..=2 {
                            engine
                                .signal(SignalIn::new(
                                    tenant,
                                    KIND,
                                    key,
                                    &format!("s{s}"),
                                    "step",
                                    &json!({}),
                                    &Self::integration(),
                                ))
                                .await?;
                        }
                    }
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(())
    }

    async fn wait_count(
        &self,
        sql: &str,
        like: &str,
        want: i64,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            BENCH_QUERIES.fetch_add(1, Ordering::Relaxed);
            let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
                .bind(like)
                .fetch_one(&self.pool)
                .await?;
            if n >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out: {n} of {want} ({sql})");
            }
            // Polls are the measurement, not the work: few enough not to weigh.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Commits and row writes in the bench database so far (pg_stat_database).
    /// The bench's own statements (its polls) are taken out: they are
    /// the measurement, not the runtime's work.
    async fn db_work(&self) -> anyhow::Result<(i64, i64)> {
        let own = BENCH_QUERIES.fetch_add(1, Ordering::Relaxed) as i64;
        let (commits, writes): (i64, i64) = sqlx::query_as(
            "select xact_commit, tup_inserted + tup_updated + tup_deleted from pg_stat_database where datname = current_database()",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((commits - own, writes))
    }

    async fn workflows(&self, n: usize, c: usize) -> anyhow::Result<Value> {
        let keys: Vec<String> = (0..n).map(|i| format!("w-{i}")).collect();
        // A backend reports its counters to pg_stat_database when it has been
        // idle a while, at the latest after 10 s: settle before each reading
        // so neither earlier work nor this run's is counted in the wrong place.
        tokio::time::sleep(STATS_SETTLE).await;
        let (commits0, writes0) = self.db_work().await?;
        let t0 = Instant::now();
        self.start_all(keys, json!({}), true, c).await?;
        self.wait_count(
            "select count(*) from workflows where kind = 'bench_chain' and status = 'completed' and key like $1",
            "w-%",
            n as i64,
            Duration::from_secs(600),
        )
        .await?;
        self.wait_count(
            "select count(*) from effects e join workflows w on w.tenant_id = e.tenant_id and w.id = e.workflow_id
             where e.status = 'delivered' and w.key like $1",
            "w-%",
            3 * n as i64,
            Duration::from_secs(600),
        )
        .await?;
        let s = t0.elapsed().as_secs_f64();
        // Nothing lost, nothing doubled: one message per effect, two applied
        // signals per workflow, three applied transitions in history.
        let (messages, applied, transitions): (i64, i64, i64) = sqlx::query_as(
            "select (select count(*) from deliveries where idempotency_key like 'bench:w-%'),
                    (select count(*) from signals s join workflows w on w.id = s.workflow_id
                      where w.key like 'w-%' and s.status = 'applied'),
                    (select count(*) from history h join workflows w on w.id = h.workflow_id
                      where w.key like 'w-%' and h.event = 'applied')",
        )
        .fetch_one(&self.pool)
        .await?;
        BENCH_QUERIES.fetch_add(1, Ordering::Relaxed);
        if messages != 3 * n as i64 || applied != 2 * n as i64 {
            bail!("lost or doubled work: {messages} messages and {applied} applied signals for {n} workflows");
        }
        tokio::time::sleep(STATS_SETTLE).await;
        let (commits1, writes1) = self.db_work().await?;
        Ok(json!({
            "workflows": n, "concurrency": c, "seconds": s,
            "messages": messages, "signals_applied": applied, "history_transitions": transitions,
            "commits_per_workflow": (commits1 - commits0) as f64 / n as f64,
            "row_writes_per_workflow": (writes1 - writes0) as f64 / n as f64,
            "workflows_per_s": n as f64 / s, "transitions_per_s": 3.0 * n as f64 / s,
            "effects_per_s": 3.0 * n as f64 / s,
        }))
    }

    async fn post_signal(&self, key: &str, idem: &str) -> anyhow::Result<Uuid> {
        self.post_signal_waiting(key, idem, None)
            .await
            .map(|(id, _)| id)
    }

    /// Post a signal; with `wait_ms`, as a caller that waits for the
    /// outcome. Returns its id and its status.
    async fn post_signal_waiting(
        &self,
        key: &str,
        idem: &str,
        wait_ms: Option<u64>,
    ) -> anyhow::Result<(Uuid, String)> {
        let wait = wait_ms.map_or(String::new(), |ms| format!("?wait_ms={ms}"));
        let r = self
            .http
            .post(format!(
                "{}/v1/workflows/{KIND}/{key}/signals{wait}",
                self.url
            ))
            .bearer_auth(&self.key)
            .header("Idempotency-Key", idem)
            .json(&json!({"name": "step"}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("signal answered {}", r.status());
        }
        let v: Value = r.json().await?;
        let id = v["signal_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .context("no signal_id")?;
        Ok((id, v["status"].as_str().unwrap_or_default().to_string()))
    }

    async fn latency(&self, rate: u32, seconds: u64, c: usize) -> anyhow::Result<Value> {
        let total = (rate as u64 * seconds) as usize;
        let keys: Vec<String> = (0..total).map(|i| format!("l-{i}")).collect();
        self.start_all(keys.clone(), json!({}), false, c).await?;
        self.wait_count(
            "select count(*) from effects where status = 'delivered' and idempotency_key like $1",
            "bench:l-%",
            total as i64,
            Duration::from_secs(600),
        )
        .await?;
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut sent = tokio::task::JoinSet::new();
        for key in keys.clone() {
            ticker.tick().await;
            let me = self.clone_light();
            sent.spawn(async move { me.post_signal(&key, "lat").await });
        }
        let mut ids = Vec::with_capacity(total);
        while let Some(r) = sent.join_next().await {
            ids.push(r??);
        }
        self.wait_count(
            "select count(*) from signals where status = 'applied' and idempotency_key = $1",
            "lat",
            total as i64,
            Duration::from_secs(120),
        )
        .await?;
        let rows: Vec<(f64,)> = sqlx::query_as(
            "select extract(epoch from applied_at - received_at)::float8 * 1000 from signals where id = any($1)",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let mut out = ms_stats(rows.into_iter().map(|r| r.0).collect());
        out["rate"] = json!(rate);
        // The same rate from callers that wait for the outcome (`?wait_ms=`,
        // a claim button), woken by NOTIFY. Timed by the caller, from sending
        // the request to holding the answer, which comes after the commit.
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut sent = tokio::task::JoinSet::new();
        for key in keys {
            ticker.tick().await;
            let me = self.clone_light();
            sent.spawn(async move {
                let t = Instant::now();
                let (_, status) = me.post_signal_waiting(&key, "lat-wait", Some(5000)).await?;
                Ok::<_, anyhow::Error>((t.elapsed().as_secs_f64() * 1000.0, status))
            });
        }
        let mut waited = Vec::with_capacity(total);
        let mut fast = 0usize;
        while let Some(r) = sent.join_next().await {
            let (ms, status) = r??;
            if status != "applied" {
                bail!("a waiting caller was answered `{status}`");
            }
            fast += 1;
            waited.push(ms);
        }
        out["waiting_caller"] = ms_stats(waited);
        out["waiting_caller"]["applied"] = json!(fast);
        Ok(out)
    }

    async fn timers(&self, pending: usize, due: usize, c: usize) -> anyhow::Result<Value> {
        // The bulk: far-future timers on 1,000 holder workflows.
        let holders: Vec<String> = (0..1000).map(|i| format!("h-{i}")).collect();
        self.start_all(holders, json!({}), false, c).await?;
        let bulk = pending.saturating_sub(due);
        sqlx::query(
            "insert into timers (tenant_id, id, workflow_id, name, due_at, signal)
             select $1, gen_random_uuid(), w.id, 'hold-' || g, now() + interval '1 day' + g * interval '1 ms', 'tick'
             from generate_series(1, $2) g
             join lateral (select id from workflows where tenant_id = $1 and key = 'h-' || (g % 1000)) w on true",
        )
        .bind(self.tenant)
        .bind(bulk as i64)
        .execute(&self.pool)
        .await?;
        sqlx::query("analyze timers").execute(&self.pool).await?;
        // The due ones: spread over one second, far enough ahead for the setup.
        let setup = Duration::from_secs(10 + (due / 300) as u64);
        let second = chrono::Utc::now() + chrono::Duration::from_std(setup)?;
        let keys: Vec<String> = (0..due).map(|i| format!("t-{i}")).collect();
        let inputs: Vec<Value> = (0..due)
            .map(|i| json!({ "tick_at": second + chrono::Duration::microseconds((i as i64 * 1_000_000) / due.max(1) as i64) }))
            .collect();
        self.start_each(keys.into_iter().zip(inputs).collect(), false, c)
            .await?;
        if chrono::Utc::now() > second {
            bail!("setup took longer than planned: raise the lead time");
        }
        // Unrelated work while they fire: chains started at the due second.
        let wait = (second - chrono::Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
        let side: Vec<String> = (0..300).map(|i| format!("u-{i}")).collect();
        let t0 = Instant::now();
        self.start_all(side, json!({}), true, c).await?;
        self.wait_count(
            "select count(*) from workflows where status = 'completed' and key like $1",
            "u-%",
            300,
            Duration::from_secs(300),
        )
        .await?;
        let side_s = t0.elapsed().as_secs_f64();
        self.wait_count(
            "select count(*) from workflows where key like $1 and (state->>'ticks')::int >= 1",
            "t-%",
            due as i64,
            Duration::from_secs(300),
        )
        .await?;
        let rows: Vec<(f64,)> = sqlx::query_as(
            "select extract(epoch from h.at - t.due_at)::float8 * 1000
             from timers t join history h on h.tenant_id = t.tenant_id and h.workflow_id = t.workflow_id
              and h.signal_name = 'tick' and h.event = 'applied'
             where t.tenant_id = $1 and t.name = 'tick'",
        )
        .bind(self.tenant)
        .fetch_all(&self.pool)
        .await?;
        let mut out = ms_stats(rows.into_iter().map(|r| r.0).collect());
        out["pending"] = json!(pending);
        out["due_in_one_second"] = json!(due);
        out["unrelated_transitions_per_s"] = json!(900.0 / side_s);
        Ok(out)
    }

    async fn ingest(&self, seconds: u64, c: usize) -> anyhow::Result<Value> {
        let keys: Vec<String> = (0..1000).map(|i| format!("i-{i}")).collect();
        self.start_all(keys, json!({}), false, c).await?;
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..c {
            let (me, count) = (self.clone_light(), count.clone());
            tasks.spawn(async move {
                let mut i = 0usize;
                while Instant::now() < stop {
                    me.post_signal(
                        &format!("i-{}", (w * 7919 + i) % 1000),
                        &format!("in-{w}-{i}"),
                    )
                    .await?;
                    count.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        let n = count.load(Ordering::Relaxed);
        Ok(
            json!({ "signals": n, "seconds": seconds, "signals_per_s": n as f64 / seconds as f64, "clients": c }),
        )
    }

    fn clone_light(&self) -> Bench {
        Bench {
            pool: self.pool.clone(),
            engine: self.engine.clone(),
            tenant: self.tenant,
            key: self.key.clone(),
            url: self.url.clone(),
            http: self.http.clone(),
        }
    }
}

/// Run the benchmark against the server at `server_url` (any database on it).
pub async fn run(
    server_url: &str,
    base: &Settings,
    args: &BenchArgs,
) -> anyhow::Result<Vec<Value>> {
    let admin = store::connect(server_url, 2).await?;
    recreate(&admin, "dispatch_bench").await?;
    recreate(&admin, "dispatch_pgbench").await?;
    let bench_url = with_db(server_url, "dispatch_bench")?;
    let c = args.concurrency.max(1);
    eprintln!("bench: pgbench -N, {c} clients, {} s …", args.seconds);
    let tps = pgbench(&with_db(server_url, "dispatch_pgbench")?, c, args.seconds).await?;
    let mut settings = base.clone();
    settings.database_url = Some(Secret::new(bench_url.clone()));
    settings.enabled_workflows = Some(vec![KIND.into()]);
    settings.bench_workload = true;
    settings.workers.concurrency = c;
    settings.db_pool = ((3 * c + 8) as u32).max(settings.db_pool);
    let pool = store::connect(&bench_url, settings.db_pool).await?;
    store::migrate(&pool).await?;
    let mut conn = pool.acquire().await?;
    let tenant = tenants::create(&mut conn, "bench")
        .await?
        .context("bench tenant")?;
    let key = tenants::add_key(&mut conn, tenant.id, Role::Integration, None).await?;
    drop(conn);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (role, workers) = if args.worker_processes > 0 {
        (
            ProcessRole::Api,
            Some(Workers::spawn(
                args.worker_processes,
                &bench_url,
                &settings,
            )?),
        )
    } else {
        (ProcessRole::All, None)
    };
    let running = crate::launch(&settings, pool.clone(), role, Some(listener)).await?;
    let url = format!("http://{}", running.addr.context("API address")?);
    let engine = Engine::new(
        pool.clone(),
        Arc::new(crate::app::known(&settings)),
        settings.engine.clone(),
    );
    let b = Bench {
        pool,
        engine,
        tenant: tenant.id,
        key,
        url,
        http: reqwest::Client::new(),
    };
    let mut results = Vec::new();
    for scenario in &args.scenarios {
        eprintln!("bench: {scenario} …");
        let mut r = match scenario.as_str() {
            "workflows" => {
                let mut r = b.workflows(args.workflows, c).await?;
                r["ratio_to_pgbench"] = json!(r["workflows_per_s"].as_f64().unwrap_or(0.0) / tps);
                r
            }
            "latency" => b.latency(args.rate, args.seconds, c).await?,
            "timers" => b.timers(args.timers, args.due, c).await?,
            "ingest" => {
                let mut r = b.ingest(args.seconds, c).await?;
                r["ratio_to_pgbench"] = json!(r["signals_per_s"].as_f64().unwrap_or(0.0) / tps);
                r
            }
            other => bail!("unknown scenario `{other}` (workflows, latency, timers, ingest)"),
        };
        r["scenario"] = json!(scenario);
        r["pgbench_tps"] = json!(tps);
        r["peak_rss_mib"] = json!(peak_rss_mib());
        if let Some(w) = &workers {
            r["worker_processes"] = json!(w.0.len());
            r["worker_peak_rss_mib"] = json!(w.peak_rss_mib());
        }
        results.push(r);
    }
    drop(workers);
    running.stop().await;
    Ok(results)
}

/// One readable line per result.
pub fn table(results: &[Value]) -> String {
    let mut out = String::new();
    for r in results {
        let f = |k: &str| r[k].as_f64().map_or("-".to_string(), |v| format!("{v:.1}"));
        let line = match r["scenario"].as_str().unwrap_or("") {
            "workflows" => format!(
                "workflows  {:>8} wf/s  {:>8} transitions/s  {:>8} effects/s  = {:.3} × pgbench -N ({} tps); {} commits, {} row writes per workflow",
                f("workflows_per_s"), f("transitions_per_s"), f("effects_per_s"),
                r["ratio_to_pgbench"].as_f64().unwrap_or(0.0), f("pgbench_tps"),
                f("commits_per_workflow"), f("row_writes_per_workflow")
            ),
            "latency" => {
                let w = |k: &str| {
                    r["waiting_caller"][k]
                        .as_f64()
                        .map_or("-".to_string(), |v| format!("{v:.1}"))
                };
                format!(
                    "latency    accepted → committed at {} signals/s: p50 {} ms  p95 {} ms  p99 {} ms  max {} ms; \
                     waiting caller (?wait_ms), request → answer after commit: p50 {} ms  p95 {} ms  p99 {} ms  max {} ms",
                    r["rate"], f("p50_ms"), f("p95_ms"), f("p99_ms"), f("max_ms"),
                    w("p50_ms"), w("p95_ms"), w("p99_ms"), w("max_ms")
                )
            }
            "timers" => format!(
                "timers     {} pending, {} due in one second: lateness p50 {} ms  p99 {} ms  max {} ms; unrelated {} transitions/s",
                r["pending"], r["due_in_one_second"], f("p50_ms"), f("p99_ms"), f("max_ms"), f("unrelated_transitions_per_s")
            ),
            "ingest" => format!(
                "ingest     {} signals/s over HTTP ({} clients) = {:.3} × pgbench -N",
                f("signals_per_s"), r["clients"], r["ratio_to_pgbench"].as_f64().unwrap_or(0.0)
            ),
            _ => r.to_string(),
        };
        out.push_str(&line);
        if r.get("worker_processes").is_some() {
            out.push_str(&format!(
                "   [{} worker processes, peak RSS {} MiB each at most; bench process {} MiB]\n",
                f("worker_processes"),
                f("worker_peak_rss_mib"),
                f("peak_rss_mib")
            ));
        } else {
            out.push_str(&format!("   [peak RSS {} MiB]\n", f("peak_rss_mib")));
        }
    }
    out
}
