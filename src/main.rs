//! The `dispatch` binary: thin — telemetry, config, build, run until a signal.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use dispatch::store::{self, tenants};
use dispatch::workflows::Role;
use dispatch::{ProcessRole, Settings};
use serde_json::json;

#[derive(Parser)]
#[command(name = "dispatch", about = "A durable workflow runtime on PostgreSQL")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything in one process; with DATABASE_URL unset, on a private embedded PostgreSQL.
    Dev,
    /// Production: run the API, the workers, or both (needs DATABASE_URL and
    /// a migrated database: run `dispatch migrate` first, from one place).
    Serve {
        /// Which parts to run.
        #[arg(long, value_enum, default_value = "all")]
        role: ProcessRole,
    },
    /// Apply database migrations (needs DATABASE_URL).
    Migrate,
    /// Manage tenants and their API keys (needs DATABASE_URL).
    Tenant {
        #[command(subcommand)]
        command: TenantCmd,
    },
    /// Workflow definitions.
    Workflows {
        #[command(subcommand)]
        command: WorkflowsCmd,
    },
    /// Print the HTTP API's OpenAPI 3 document (the same as `GET /openapi.json`).
    Openapi,
    /// Run the anti-poaching detector on a message (the same as
    /// `POST /v1/messages/scan`); exits 1 when it would be blocked.
    Scan {
        /// The message text.
        text: String,
    },
    /// Benchmark against `pgbench -N` on the same server (DATABASE_URL, or the
    /// embedded default). Build with `--release` for meaningful numbers.
    Bench {
        /// Scenarios to run (repeatable): workflows, latency, timers, ingest.
        #[arg(long = "scenario", default_values = ["workflows", "latency", "timers", "ingest"])]
        scenarios: Vec<String>,
        /// Workflows (3 transitions each) in `workflows`.
        #[arg(long, default_value_t = 5000)]
        workflows: usize,
        /// Concurrent clients and worker concurrency (and pgbench clients).
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Pending timers in `timers`.
        #[arg(long, default_value_t = 1_000_000)]
        timers: usize,
        /// Timers due inside the same second in `timers`.
        #[arg(long, default_value_t = 10_000)]
        due: usize,
        /// Signals per second in `latency`.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// Seconds for `latency`, `ingest` and pgbench.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Start the embedded server (when DATABASE_URL is unset) with the
        /// fast, non-durable settings (fsync, synchronous_commit and
        /// full_page_writes off) instead of PostgreSQL's durable defaults.
        #[arg(long)]
        fast_pg: bool,
        /// Run the workers as this many separate `dispatch serve --role
        /// worker` processes against the same server (0: inside the bench
        /// process, beside the API).
        #[arg(long, default_value_t = 0)]
        worker_processes: usize,
    },
    /// Operations on the running system (needs DATABASE_URL).
    Ops {
        #[command(subcommand)]
        command: OpsCmd,
    },
}

/// Where the ops API is and the key to use.
#[derive(clap::Args)]
struct Api {
    /// API base URL.
    #[arg(long, env = "DISPATCH_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An ops (or operator) key.
    #[arg(long, env = "DISPATCH_KEY", hide_env_values = true)]
    key: String,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum WorkflowsCmd {
    /// Print a workflow's state diagram (Mermaid), generated from its definition.
    Diagram {
        /// Workflow kind (`dispatch`, `lead_finalization`).
        kind: String,
    },
}

#[derive(Subcommand)]
enum OpsCmd {
    /// Each workflow kind: whether a live worker serves it, and the work waiting for it.
    Kinds,
    /// List workflows (over the ops API).
    List {
        #[command(flatten)]
        api: Api,
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Only this state.
        #[arg(long)]
        state: Option<String>,
        /// Only this status (running, completed, failed).
        #[arg(long)]
        status: Option<String>,
        /// Only stuck workflows (dead effect, overdue timer, no progress).
        #[arg(long)]
        stuck: bool,
        /// Page size.
        #[arg(long)]
        limit: Option<u32>,
        /// The `next` cursor of the previous page.
        #[arg(long)]
        after: Option<String>,
    },
    /// Show one workflow: state, effects, timers, history.
    Show {
        #[command(flatten)]
        api: Api,
        /// Workflow id.
        id: String,
    },
    /// Retry a dead-lettered effect.
    Retry {
        #[command(flatten)]
        api: Api,
        /// Workflow id.
        id: String,
        /// Effect id.
        effect: String,
        /// Why (audited).
        #[arg(long)]
        reason: String,
    },
    /// Fire a pending timer now.
    Fire {
        #[command(flatten)]
        api: Api,
        /// Workflow id.
        id: String,
        /// Timer id.
        timer: String,
        /// Why (audited).
        #[arg(long)]
        reason: String,
    },
    /// Send a signal by hand.
    Signal {
        #[command(flatten)]
        api: Api,
        /// Workflow id.
        id: String,
        /// Signal name.
        name: String,
        /// Payload (JSON).
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Why (audited).
        #[arg(long)]
        reason: String,
        /// Idempotency key (default: a fresh one).
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Cancel a workflow.
    Cancel {
        #[command(flatten)]
        api: Api,
        /// Workflow id.
        id: String,
        /// Why (audited).
        #[arg(long)]
        reason: String,
        /// Idempotency key (default: a fresh one).
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Force a workflow into a state its definition declares reachable.
    Force {
        #[command(flatten)]
        api: Api,
        /// Workflow id.
        id: String,
        /// Target state.
        state: String,
        /// Why (audited).
        #[arg(long)]
        reason: String,
        /// Idempotency key (default: a fresh one).
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// The audit log (by workflow or actor).
    Audit {
        #[command(flatten)]
        api: Api,
        /// Only this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only this actor.
        #[arg(long)]
        actor: Option<String>,
    },
    /// Bring in-flight workflows of a kind to this binary's definition version
    /// (upcast as data, in batches, audited in each workflow's history).
    MigrateWorkflows {
        /// Workflow kind.
        #[arg(long)]
        kind: String,
        /// Target definition version (must be this binary's).
        #[arg(long)]
        to: u32,
        /// Show what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Instances per transaction.
        #[arg(long, default_value_t = 500)]
        batch: i64,
        /// Why (recorded in each migrated workflow's history).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Create a tenant and print one key per role.
    Create {
        /// Tenant name (lowercase letters, digits, `-`, `_`).
        name: String,
    },
    /// Add a key to a tenant.
    AddKey {
        /// Tenant name.
        name: String,
        /// ops, operator, executor or integration.
        #[arg(long)]
        role: String,
        /// Who the key acts as (the executor id for executor keys).
        #[arg(long)]
        subject: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    dispatch::telemetry::init();
    let cli = Cli::parse();
    let settings = Settings::from_env().context("while reading configuration")?;
    match cli.command {
        Cmd::Dev => dev(settings).await,
        Cmd::Serve { role } => {
            let pool = connect(&settings).await?;
            // Migrating is a deploy step of its own (`dispatch migrate`), run once.
            store::check_migrated(&pool)
                .await
                .context("while checking the schema")?;
            run(&settings, pool, role).await
        }
        Cmd::Migrate => {
            let pool = connect(&settings).await?;
            store::migrate(&pool).await.context("while migrating")?;
            eprintln!("migrations applied");
            Ok(())
        }
        Cmd::Ops {
            command:
                OpsCmd::MigrateWorkflows {
                    kind,
                    to,
                    dry_run,
                    batch,
                    reason,
                },
        } => {
            let pool = connect(&settings).await?;
            let engine = dispatch::Engine::new(
                pool,
                std::sync::Arc::new(dispatch::workflows::Registry::builtin()),
                settings.engine.clone(),
            );
            let report = engine
                .migrate_workflows(&kind, to, dry_run, batch, &reason)
                .await
                .context("while migrating workflows")?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Cmd::Bench {
            scenarios,
            workflows,
            concurrency,
            timers,
            due,
            rate,
            seconds,
            fast_pg,
            worker_processes,
        } => {
            let url = match &settings.database_url {
                Some(u) => u.expose().to_string(),
                None => {
                    let dir = std::path::Path::new(&settings.data_dir).join("pg");
                    let durability = if fast_pg {
                        dispatch::pg::Durability::Fast
                    } else {
                        dispatch::pg::Durability::Durable
                    };
                    tokio::task::spawn_blocking(move || {
                        dispatch::pg::start_on(&dir, None, durability)
                    })
                    .await??
                    .url
                }
            };
            let args = dispatch::bench::BenchArgs {
                scenarios,
                workflows,
                concurrency,
                timers,
                due,
                rate,
                seconds,
                worker_processes,
            };
            let results = dispatch::bench::run(&url, &settings, &args).await?;
            eprint!("{}", dispatch::bench::table(&results));
            for r in results {
                println!("{r}");
            }
            Ok(())
        }
        Cmd::Openapi => {
            println!("{}", dispatch::api::document_json());
            Ok(())
        }
        Cmd::Scan { text } => {
            let verdict = match dispatch::scan::scan(&text) {
                Ok(s) => {
                    println!("{}", serde_json::to_string(&s)?);
                    s.verdict
                }
                Err(e) => {
                    println!(
                        "{}",
                        serde_json::json!({ "verdict": "block", "findings": [], "error": e.to_string() })
                    );
                    dispatch::scan::Verdict::Block
                }
            };
            if verdict == dispatch::scan::Verdict::Block {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Workflows {
            command: WorkflowsCmd::Diagram { kind },
        } => {
            let registry = dispatch::workflows::Registry::builtin();
            let Some(wf) = registry.get(&kind) else {
                bail!(
                    "unknown workflow kind `{kind}` (known: {})",
                    registry.kinds().join(", ")
                );
            };
            print!("{}", dispatch::workflows::mermaid(wf.edges()));
            Ok(())
        }
        Cmd::Ops {
            command: OpsCmd::Kinds,
        } => {
            let pool = connect(&settings).await?;
            let mut conn = pool.acquire().await?;
            let served = store::jobs::served_kinds(&mut conn, 15.0).await?;
            let mut kinds = serde_json::Map::new();
            for kind in dispatch::workflows::Registry::builtin().kinds() {
                let (signals, effects): (i64, i64) = sqlx::query_as(
                    "select (select count(*) from signals s join workflows w on w.tenant_id = s.tenant_id and w.id = s.workflow_id
                             where w.kind = $1 and s.status = 'queued'),
                            (select count(*) from effects e join workflows w on w.tenant_id = e.tenant_id and w.id = e.workflow_id
                             where w.kind = $1 and e.status in ('pending', 'running'))",
                )
                .bind(kind)
                .fetch_one(&mut *conn)
                .await?;
                let status = if served.iter().any(|s| s == kind) {
                    "served"
                } else {
                    "unserved"
                };
                kinds.insert(
                    kind.into(),
                    json!({ "status": status, "queued_signals": signals, "open_effects": effects }),
                );
            }
            println!("{}", json!({ "kinds": kinds }));
            Ok(())
        }
        Cmd::Ops { command } => ops_api(command).await,
        Cmd::Tenant { command } => {
            let pool = connect(&settings).await?;
            let mut conn = pool.acquire().await?;
            let out = match command {
                TenantCmd::Create { name } => create_tenant(&mut conn, &name).await?,
                TenantCmd::AddKey {
                    name,
                    role,
                    subject,
                } => {
                    let Some(role) = Role::parse_api_role(&role) else {
                        bail!("unknown role `{role}` (ops, operator, executor, integration)");
                    };
                    let tenant = tenants::by_name(&mut conn, &name)
                        .await?
                        .with_context(|| format!("no tenant `{name}`"))?;
                    let key =
                        tenants::add_key(&mut conn, tenant.id, role, subject.as_deref()).await?;
                    json!({ "key": key })
                }
            };
            println!("{out}");
            Ok(())
        }
    }
}

async fn connect(settings: &Settings) -> anyhow::Result<sqlx::PgPool> {
    let Some(url) = &settings.database_url else {
        bail!("DATABASE_URL is not set (use `dispatch dev` for the embedded database)");
    };
    store::connect(url.expose(), settings.db_pool)
        .await
        .context("while connecting to DATABASE_URL")
}

async fn create_tenant(
    conn: &mut sqlx::PgConnection,
    name: &str,
) -> anyhow::Result<serde_json::Value> {
    let tenant = tenants::create(conn, name)
        .await
        .context("while creating the tenant")?
        .with_context(|| format!("tenant `{name}` exists"))?;
    let mut keys = serde_json::Map::new();
    for role in [Role::Ops, Role::Operator, Role::Executor, Role::Integration] {
        let subject = (role == Role::Executor).then_some("executor-1");
        keys.insert(
            role.as_str().into(),
            json!(tenants::add_key(conn, tenant.id, role, subject).await?),
        );
    }
    Ok(json!({ "tenant": tenant.name, "keys": keys }))
}

async fn dev(mut settings: Settings) -> anyhow::Result<()> {
    if settings.database_url.is_none() {
        let dir = std::path::Path::new(&settings.data_dir).join("pg");
        let pg = tokio::task::spawn_blocking(move || dispatch::pg::start(&dir)).await??;
        tracing::info!(port = pg.port, "embedded PostgreSQL started");
        eprintln!("embedded PostgreSQL: {}", pg.url);
        settings.database_url = Some(dispatch::config::Secret::new(pg.url));
    }
    let pool = connect(&settings).await?;
    store::migrate(&pool).await.context("while migrating")?;
    let mut conn = pool.acquire().await?;
    let keys_file = std::path::Path::new(&settings.data_dir).join("demo-keys.json");
    if tenants::by_name(&mut conn, "demo").await?.is_none() {
        let out = create_tenant(&mut conn, "demo").await?;
        // Dev convenience: the demo keys also go to a private file in the data folder.
        write_private(&keys_file, &out.to_string()).context("while saving the demo keys")?;
        eprintln!(
            "demo tenant created; keys (also in {}):",
            keys_file.display()
        );
        println!("{out}");
    } else {
        eprintln!(
            "demo tenant exists; its keys are in {}",
            keys_file.display()
        );
    }
    drop(conn);
    run(&settings, pool, ProcessRole::All).await
}

async fn ops_api(command: OpsCmd) -> anyhow::Result<()> {
    use dispatch::ops_cli::OpsCall;
    let fresh = |k: Option<String>| k.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let opt = |name: &str, v: Option<String>| v.map(|v| (name.to_string(), v));
    let (api, call) = match command {
        OpsCmd::List {
            api,
            kind,
            state,
            status,
            stuck,
            limit,
            after,
        } => {
            let q = [
                opt("kind", kind),
                opt("state", state),
                opt("status", status),
                stuck.then(|| ("stuck".to_string(), "true".to_string())),
                opt("limit", limit.map(|l| l.to_string())),
                opt("after", after),
            ];
            (api, OpsCall::List(q.into_iter().flatten().collect()))
        }
        OpsCmd::Show { api, id } => (api, OpsCall::Show(id)),
        OpsCmd::Retry {
            api,
            id,
            effect,
            reason,
        } => (
            api,
            OpsCall::Retry {
                workflow: id,
                effect,
                reason,
            },
        ),
        OpsCmd::Fire {
            api,
            id,
            timer,
            reason,
        } => (
            api,
            OpsCall::Fire {
                workflow: id,
                timer,
                reason,
            },
        ),
        OpsCmd::Signal {
            api,
            id,
            name,
            payload,
            reason,
            idempotency_key,
        } => {
            let payload = serde_json::from_str(&payload).context("--payload is not JSON")?;
            (
                api,
                OpsCall::Signal {
                    workflow: id,
                    name,
                    payload,
                    reason,
                    idempotency_key: fresh(idempotency_key),
                },
            )
        }
        OpsCmd::Cancel {
            api,
            id,
            reason,
            idempotency_key,
        } => (
            api,
            OpsCall::Cancel {
                workflow: id,
                reason,
                idempotency_key: fresh(idempotency_key),
            },
        ),
        OpsCmd::Force {
            api,
            id,
            state,
            reason,
            idempotency_key,
        } => (
            api,
            OpsCall::Force {
                workflow: id,
                state,
                reason,
                idempotency_key: fresh(idempotency_key),
            },
        ),
        OpsCmd::Audit {
            api,
            workflow,
            actor,
        } => (
            api,
            OpsCall::Audit(
                [opt("workflow_id", workflow), opt("actor", actor)]
                    .into_iter()
                    .flatten()
                    .collect(),
            ),
        ),
        OpsCmd::Kinds | OpsCmd::MigrateWorkflows { .. } => {
            unreachable!("handled with database access")
        }
    };
    match dispatch::ops_cli::run(&api.url, &api.key, call, api.json).await {
        Ok(out) => {
            print!("{out}");
            Ok(())
        }
        Err(e) => bail!(e),
    }
}

fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{contents}")
}

async fn run(settings: &Settings, pool: sqlx::PgPool, role: ProcessRole) -> anyhow::Result<()> {
    let running = dispatch::launch(settings, pool, role, None).await?;
    if let Some(addr) = running.addr {
        eprintln!("listening on http://{addr}");
    }
    let token = running.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested; draining");
        token.cancel();
    });
    running.wait().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
