//! Typed configuration: defaults, then `DISPATCH_…` environment variables
//! (a `.env.example` at the repository root documents each one).

use std::fmt;
use std::time::Duration;

use crate::engine::EngineConfig;
use crate::outbox::OutboxConfig;
use crate::workers::WorkerConfig;

/// A value that must never be printed (it may carry a password).
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    /// Wrap a value.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Which parts a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProcessRole {
    /// The HTTP API only.
    Api,
    /// Workers, timers and sweeps only.
    Worker,
    /// Both.
    All,
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
#[error("invalid {name}: {message}")]
pub struct ConfigError {
    name: &'static str,
    message: String,
}

/// Everything configurable.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `DATABASE_URL`; `None` means the embedded server (dev and tests).
    pub database_url: Option<Secret>,
    /// `DISPATCH_LISTEN` (default `127.0.0.1:8080`).
    pub listen: String,
    /// `DISPATCH_DATA_DIR` (default `.dispatch`): the embedded server lives in `<dir>/pg`.
    pub data_dir: String,
    /// `DISPATCH_DB_POOL` (default: 32, or what the served kinds need if more).
    pub db_pool: u32,
    /// `DISPATCH_PUBLIC_URL`: the base URL providers call (Twilio signs it).
    pub public_url: Option<String>,
    /// `DISPATCH_MAX_BODY_BYTES`: the largest request body accepted (default 1 MiB).
    pub max_body_bytes: usize,
    /// Know the benchmark's workload (`bench_chain`); set by `dispatch bench` only.
    pub bench_workload: bool,
    /// `ENABLED_WORKFLOWS`: comma-separated kinds this process runs (default: all).
    pub enabled_workflows: Option<Vec<String>>,
    /// Engine tuning (`DISPATCH_EFFECT_MAX_ATTEMPTS`).
    pub engine: EngineConfig,
    /// Outbox tuning (`DISPATCH_RETRY_MIN_MS`, `DISPATCH_RETRY_MAX_MS`, `DISPATCH_EFFECT_LEASE_MS`).
    pub outbox: OutboxConfig,
    /// Worker tuning (`DISPATCH_WORKER_CONCURRENCY`, `DISPATCH_POLL_MS`,
    /// `DISPATCH_SWEEP_MS`, `DISPATCH_SWEEP_GRACE_MS`, `DISPATCH_SHUTDOWN_GRACE_MS`).
    pub workers: WorkerConfig,
    /// HTTP edge limits (`DISPATCH_HTTP_HEADER_TIMEOUT_MS`,
    /// `DISPATCH_HTTP_BODY_TIMEOUT_MS`, `DISPATCH_HTTP_IDLE_TIMEOUT_MS`,
    /// `DISPATCH_HTTP_MAX_CONNECTIONS`); the body limit is `max_body_bytes`.
    pub edge: crate::edge::EdgeConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: None,
            listen: "127.0.0.1:8080".into(),
            data_dir: ".dispatch".into(),
            db_pool: 32,
            public_url: None,
            max_body_bytes: 1024 * 1024,
            bench_workload: false,
            enabled_workflows: None,
            engine: EngineConfig::default(),
            outbox: OutboxConfig::default(),
            workers: WorkerConfig::default(),
            edge: crate::edge::EdgeConfig::default(),
        }
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn num<T: std::str::FromStr>(name: &'static str) -> Result<Option<T>, ConfigError> {
    var(name)
        .map(|v| {
            v.trim().parse::<T>().map_err(|_| ConfigError {
                name,
                message: format!("`{v}` is not a number"),
            })
        })
        .transpose()
}

fn ms(name: &'static str, into: &mut Duration) -> Result<(), ConfigError> {
    if let Some(v) = num::<u64>(name)? {
        *into = Duration::from_millis(v);
    }
    Ok(())
}

impl Settings {
    /// Defaults overlaid with the environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut s = Settings {
            database_url: var("DATABASE_URL").map(Secret::new),
            ..Settings::default()
        };
        if let Some(v) = var("DISPATCH_LISTEN") {
            s.listen = v;
        }
        if let Some(v) = var("DISPATCH_DATA_DIR") {
            s.data_dir = v;
        }
        s.public_url = var("DISPATCH_PUBLIC_URL").map(|u| u.trim_end_matches('/').to_string());
        if let Some(v) = num::<usize>("DISPATCH_MAX_BODY_BYTES")? {
            if !(1024..=64 * 1024 * 1024).contains(&v) {
                return Err(ConfigError {
                    name: "DISPATCH_MAX_BODY_BYTES",
                    message: "must be 1024..=67108864".into(),
                });
            }
            s.max_body_bytes = v;
        }
        if let Some(v) = var("DISPATCH_BENCH_WORKLOAD") {
            // The benchmark's `bench_chain` kind, for tests and benchmarks
            // that drive the binary.
            s.bench_workload = match v.as_str() {
                "1" | "true" => true,
                "0" | "false" => false,
                _ => {
                    return Err(ConfigError {
                        name: "DISPATCH_BENCH_WORKLOAD",
                        message: "must be true or false".into(),
                    })
                }
            };
        }
        let pool_set = num("DISPATCH_DB_POOL")?;
        if let Some(v) = pool_set {
            s.db_pool = v;
        }
        s.enabled_workflows = var("ENABLED_WORKFLOWS").map(|v| {
            v.split(',')
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect()
        });
        if let Some(v) = num("DISPATCH_EFFECT_MAX_ATTEMPTS")? {
            s.engine.effect_max_attempts = v;
        }
        if let Some(v) = num("DISPATCH_WORKER_CONCURRENCY")? {
            s.workers.concurrency = v;
        }
        if let Some(v) = num::<i64>("DISPATCH_APPLY_BATCH")? {
            // A batch is written as one set; only a failing one is applied
            // workflow by workflow, at most 50 of it (a savepoint each;
            // PostgreSQL keeps 64 subtransactions per backend in shared
            // memory before it spills), the rest in the next cycle.
            if !(1..=1000).contains(&v) {
                return Err(ConfigError {
                    name: "DISPATCH_APPLY_BATCH",
                    message: "must be 1..=1000".into(),
                });
            }
            s.workers.apply_batch = v;
        }
        if let Some(v) = num::<i64>("DISPATCH_EFFECT_BATCH")? {
            if !(1..=1000).contains(&v) {
                return Err(ConfigError {
                    name: "DISPATCH_EFFECT_BATCH",
                    message: "must be 1..=1000".into(),
                });
            }
            s.workers.effect_batch = v;
        }
        if let Some(v) = num::<usize>("DISPATCH_PUMPS")? {
            if !(1..=16).contains(&v) {
                return Err(ConfigError {
                    name: "DISPATCH_PUMPS",
                    message: "must be 1..=16".into(),
                });
            }
            s.workers.pumps = v;
        }
        if let Some(v) = num::<usize>("DISPATCH_DELIVERIES")? {
            if !(1..=256).contains(&v) {
                return Err(ConfigError {
                    name: "DISPATCH_DELIVERIES",
                    message: "must be 1..=256".into(),
                });
            }
            s.workers.deliveries = v;
        }
        ms("DISPATCH_RETRY_MIN_MS", &mut s.outbox.retry_min)?;
        ms("DISPATCH_RETRY_MAX_MS", &mut s.outbox.retry_max)?;
        ms("DISPATCH_EFFECT_LEASE_MS", &mut s.outbox.lease)?;
        ms("DISPATCH_POLL_MS", &mut s.workers.poll_interval)?;
        ms("DISPATCH_SWEEP_MS", &mut s.workers.sweep_interval)?;
        ms("DISPATCH_RETENTION_MS", &mut s.workers.job_retention)?;
        ms("DISPATCH_SWEEP_GRACE_MS", &mut s.workers.sweep_grace)?;
        ms("DISPATCH_SHUTDOWN_GRACE_MS", &mut s.workers.shutdown_grace)?;
        ms(
            "DISPATCH_HTTP_HEADER_TIMEOUT_MS",
            &mut s.edge.header_timeout,
        )?;
        ms("DISPATCH_HTTP_BODY_TIMEOUT_MS", &mut s.edge.body_timeout)?;
        ms("DISPATCH_HTTP_IDLE_TIMEOUT_MS", &mut s.edge.idle_timeout)?;
        for (name, d) in [
            ("DISPATCH_HTTP_HEADER_TIMEOUT_MS", s.edge.header_timeout),
            ("DISPATCH_HTTP_BODY_TIMEOUT_MS", s.edge.body_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError {
                    name,
                    message: "must be at least 1 ms".into(),
                });
            }
        }
        // A long poll (`?wait_ms=`) moves no byte while it waits.
        if s.edge.idle_timeout <= Duration::from_millis(crate::http::MAX_WAIT_MS) {
            return Err(ConfigError {
                name: "DISPATCH_HTTP_IDLE_TIMEOUT_MS",
                message: format!(
                    "must exceed the longest wait_ms ({})",
                    crate::http::MAX_WAIT_MS
                ),
            });
        }
        if let Some(v) = num::<usize>("DISPATCH_HTTP_MAX_CONNECTIONS")? {
            if !(1..=65_536).contains(&v) {
                return Err(ConfigError {
                    name: "DISPATCH_HTTP_MAX_CONNECTIONS",
                    message: "must be 1..=65536".into(),
                });
            }
            s.edge.max_connections = v;
        }
        // Each served kind has an apply and an effect queue, plus the intake
        // queue; every handler may hold a connection.
        let kinds = s
            .enabled_workflows
            .as_ref()
            .map_or(workflows::Registry::builtin().kinds().len(), Vec::len);
        // ... the pipeline's pumps and deliveries (each holds one), its
        // listener, the timer loop and its listener, the sweep.
        let need =
            (2 * kinds + 2) * s.workers.concurrency + s.workers.pumps + s.workers.deliveries + 6;
        if pool_set.is_none() {
            // Unset: large enough for what this process serves.
            s.db_pool = s.db_pool.max(need as u32);
        } else if (s.db_pool as usize) < need {
            return Err(ConfigError {
                name: "DISPATCH_DB_POOL",
                message: format!(
                    "must be at least (2 × kinds + 2) × DISPATCH_WORKER_CONCURRENCY + DISPATCH_PUMPS + DISPATCH_DELIVERIES + 6 = {need}"
                ),
            });
        }
        Ok(s)
    }
}
