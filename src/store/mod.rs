//! Persistence: every SQL statement of the runtime lives below this module.
//!
//! Functions take a `&mut PgConnection` (a transaction derefs to one) so the
//! engine composes them into one atomic transition. Every lifecycle `UPDATE`
//! states the status/version it expects; zero rows is reported to the caller,
//! never ignored.
//!
//! The statements that claim work from the queue tables (queued signals, due
//! effects, due timers) run in a queue transaction ([`begin_queue_tx`]):
//! sequential scans, hash and merge joins and bitmap scans are off. On a
//! pump's own connection they also run on generic plans
//! ([`begin_generic_queue_tx_on`]), made again whenever the statistics were
//! refreshed: planning on every execution cost 1–2 ms of a 7 ms
//! signal-to-commit path (measured with statement logging), while a plan
//! kept from a nearly empty table walked whole tenants once it had grown.

pub mod audit;
pub mod batch;
pub mod deliveries;
pub mod drivers;
pub mod effects;
pub mod jobs;
pub mod providers;
pub mod schedules;
pub mod signals;
pub mod tenants;
pub mod timers;
pub mod workflows;
pub mod writes;

use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Errors from the persistence layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database error")]
    Db(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// apalis' own schema setup failed.
    #[error("job queue setup failed: {0}")]
    Queue(String),
}

/// A pooled connection idle this long is pinged before it is handed out.
const IDLE_BEFORE_PING: std::time::Duration = std::time::Duration::from_secs(1);

/// Server connections a pool leaves to others (an operator's `psql`, a
/// process starting up beside it).
const SERVER_SLOTS_SPARED: i32 = 10;

/// Open a pool sized for `max_connections`.
///
/// Never larger than the server admits: a pool sized above PostgreSQL's
/// `max_connections` (the default process wants 112, a default server has
/// 100) opened connections the server refused in a burst, and every
/// request waiting on one failed after the acquire timeout although idle
/// connections came back meanwhile (measured: `dispatch bench --scenario
/// latency`, callers waiting for outcomes). Capped, they wait for one.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let opts: PgConnectOptions = url.parse()?;
    let max_connections = {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect_with(&opts).await?;
        let (admits,): (i32,) = sqlx::query_as(
            "select current_setting('max_connections')::int4
                    - current_setting('superuser_reserved_connections')::int4",
        )
        .fetch_one(&mut conn)
        .await?;
        conn.close().await?;
        // Room for the operator's psql and a second process starting up.
        let cap = (admits - SERVER_SLOTS_SPARED).max(4) as u32;
        if max_connections > cap {
            tracing::warn!(
                wanted = max_connections,
                capped = cap,
                "connection pool capped below the server's max_connections; raise max_connections or lower DISPATCH_DB_POOL / DISPATCH_WORKER_CONCURRENCY"
            );
        }
        max_connections.min(cap)
    };
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        // sqlx pings every connection it hands out, and each ping is a
        // transaction of its own on the server (a third of all commits under
        // load). Like pgxpool, ping only one that sat idle for a while: a
        // connection that died since (a server restart) is found there, and
        // one that dies in use fails its statement and is discarded.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_BEFORE_PING {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_with(opts.application_name("dispatch"))
        .await?;
    Ok(pool)
}

/// Begin a transaction for queue work (the pumps' cycles): every statement
/// in it reaches its rows through an index (a claim, a batch by primary
/// key), so the planner is told not to take sequential scans, hash or merge
/// joins or bitmap scans. Statistics lag the queue tables by up to a
/// minute: planned from an empty table's statistics, a batch write took a
/// hash join over a sequential scan of every workflow, and a ledger lookup
/// walked the wrong index — 170 ms per statement, measured.
pub async fn begin_queue_tx(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    pool.begin_with(QUEUE_TX).await
}

/// [`begin_queue_tx`] on a connection already held.
pub async fn begin_queue_tx_on(
    conn: &mut sqlx::PgConnection,
) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, sqlx::Error> {
    sqlx::Connection::begin_with(conn, QUEUE_TX).await
}

/// [`begin_queue_tx_on`] on a pump's own connection: every statement runs
/// on its generic plan, made once. The pump replans (clears its statement
/// cache) whenever [`stats_epoch`] moved or its plans are older than
/// [`REPLAN_AFTER`]: a generic plan keeps the index choices of the
/// statistics it was made from, and one made while a table was nearly
/// empty probed a whole tenant's rows per lookup once it had grown
/// (measured with `auto_explain`).
pub async fn begin_generic_queue_tx_on(
    conn: &mut sqlx::PgConnection,
) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, sqlx::Error> {
    sqlx::Connection::begin_with(conn, GENERIC_QUEUE_TX).await
}

/// How long a pump's generic plans are kept at most.
pub const REPLAN_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

const QUEUE_TX: &str = "begin; set local enable_seqscan = off; set local enable_hashjoin = off; \
     set local enable_mergejoin = off; set local enable_bitmapscan = off";

const GENERIC_QUEUE_TX: &str =
    "begin; set local enable_seqscan = off; set local enable_hashjoin = off; \
     set local enable_mergejoin = off; set local enable_bitmapscan = off; \
     set local plan_cache_mode = force_generic_plan";

static STATS_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bumped each time this process refreshed the hot tables' statistics
/// ([`refresh_stats`]): plans made before are to be made again.
pub fn stats_epoch() -> u64 {
    STATS_EPOCH.load(std::sync::atomic::Ordering::Acquire)
}

/// The tables queue work reads by index on every cycle.
const HOT_TABLES: [&str; 6] = [
    "workflows",
    "signals",
    "effects",
    "deliveries",
    "history",
    "timers",
];

/// Keep the planner's statistics of the hot tables current: `ANALYZE`
/// each one that changed by more rows than it holds (at least 1,000) since
/// its last analyze — a table that doubles is planned afresh, a large
/// steady one is left to autovacuum. Autovacuum looks once a minute at best, and a table
/// that grew from empty in that minute is planned as if it were empty
/// (wrong indexes, sequential scans: 50–170 ms statements, measured). One
/// process at a time (an advisory lock); returns the tables analyzed (or
/// skipped, when an autovacuum held them).
pub async fn refresh_stats(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let (mine,): (bool,) =
        sqlx::query_as("select pg_try_advisory_lock(hashtext('dispatch:refresh_stats'))")
            .fetch_one(&mut *conn)
            .await?;
    if !mine {
        return Ok(Vec::new());
    }
    let analyzed = analyze_stale(&mut conn).await;
    sqlx::query("select pg_advisory_unlock(hashtext('dispatch:refresh_stats'))")
        .execute(&mut *conn)
        .await?;
    if analyzed.as_ref().is_ok_and(|t| !t.is_empty()) {
        STATS_EPOCH.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
    analyzed
}

async fn analyze_stale(conn: &mut sqlx::PgConnection) -> Result<Vec<String>, sqlx::Error> {
    // Tables this role may analyze only (it owns them), that changed by more
    // rows than they hold.
    let stale: Vec<(String,)> = sqlx::query_as(
        "select s.relname::text from pg_stat_user_tables s join pg_class c on c.oid = s.relid
         where s.schemaname = current_schema() and s.relname = any($1)
           and pg_has_role(c.relowner, 'USAGE')
           and s.n_mod_since_analyze > greatest(1000, s.n_live_tup)",
    )
    .bind(HOT_TABLES)
    .fetch_all(&mut *conn)
    .await?;
    let mut done = Vec::with_capacity(stale.len());
    for (table,) in stale {
        // Only names from HOT_TABLES reach this statement. Each in its own
        // transaction, and never waiting on (or cancelling) an autovacuum
        // that holds the table.
        if let Some(t) = HOT_TABLES.iter().find(|t| **t == table) {
            sqlx::query(sqlx::AssertSqlSafe(format!("analyze (skip_locked) {t}")))
                .execute(&mut *conn)
                .await?;
            done.push(table);
        }
    }
    Ok(done)
}

/// Apply our migrations and apalis' (which keep their own migration table in
/// the `apalis` schema).
///
/// Run from one place only (`dispatch migrate`, a deploy step): a concurrent
/// index build waits for every other transaction, so a second migrator queued
/// on the migration lock would deadlock it.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    apalis_postgres::PostgresStorage::setup(pool)
        .await
        .map_err(|e| StoreError::Queue(e.to_string()))?;
    migrator().run(pool).await?;
    // A cancelled concurrent build leaves an invalid index behind that a rerun
    // (`if not exists`) would skip: say so instead of running without it.
    let invalid: Vec<(String,)> = sqlx::query_as(
        "select c.relname::text from pg_index i join pg_class c on c.oid = i.indexrelid
         join pg_namespace n on n.oid = c.relnamespace
         where not i.indisvalid and n.nspname = current_schema()",
    )
    .fetch_all(pool)
    .await?;
    if let Some((name,)) = invalid.first() {
        return Err(StoreError::Queue(format!(
            "index `{name}` is invalid (an interrupted concurrent build): run `drop index concurrently {name};` and migrate again"
        )));
    }
    Ok(())
}

/// Our migrations. A binary tolerates migrations newer than itself (a rolled
/// back binary against an expanded schema) but not missing ones.
fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.set_ignore_missing(true);
    m
}

/// Check that every migration this binary knows is applied (for `serve`,
/// which does not migrate). Newer applied migrations are fine.
pub async fn check_migrated(pool: &PgPool) -> Result<(), StoreError> {
    let applied: Vec<(i64,)> = sqlx::query_as("select version from _sqlx_migrations where success")
        .fetch_all(pool)
        .await
        .map_err(|e| {
            StoreError::Queue(format!(
                "no migrations applied ({e}): run `dispatch migrate` first"
            ))
        })?;
    let applied: std::collections::HashSet<i64> = applied.into_iter().map(|r| r.0).collect();
    if let Some(m) = migrator().iter().find(|m| !applied.contains(&m.version)) {
        return Err(StoreError::Queue(format!(
            "migration {} ({}) is not applied: run `dispatch migrate` first",
            m.version, m.description
        )));
    }
    Ok(())
}

/// SHA-256 of a JSON value's canonical serialization (object keys sorted).
pub(crate) fn hash_json(v: &serde_json::Value) -> Vec<u8> {
    Sha256::digest(serde_json::to_vec(v).expect("JSON values serialize")).to_vec()
}
