//! Building and running the application: the API server and the workers are
//! sibling tasks sharing one cancellation token; shutdown drains in-flight work.

use std::net::SocketAddr;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::notify::Hub;
use tokio_util::sync::CancellationToken;
use workflows::Registry;

use crate::config::{ProcessRole, Settings};
use crate::delivery::ByName;
use crate::engine::Engine;
use crate::http::ApiState;
use crate::outbox::Outbox;
use crate::workers;

/// Errors at start-up.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// `ENABLED_WORKFLOWS` names a kind we do not have.
    #[error("ENABLED_WORKFLOWS names unknown workflow kind `{0}`")]
    UnknownWorkflow(String),
    /// Binding the listener failed.
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
}

/// Every kind this process knows (and accepts signals for): the built-in
/// ones, and the benchmark's workload only inside `dispatch bench`.
pub fn known(settings: &Settings) -> Registry {
    let all = Registry::builtin();
    if settings.bench_workload {
        all.with::<workflows::bench_chain::BenchChain>()
    } else {
        all
    }
}

/// The workflows this process runs: [`known`] filtered by
/// `ENABLED_WORKFLOWS` (default all). One list, so a kind added to
/// `Registry::builtin` can be enabled by name with nothing else to change.
pub fn registry(settings: &Settings) -> Result<Registry, AppError> {
    match &settings.enabled_workflows {
        // Every business workflow (the benchmark's only when named).
        None => Ok(Registry::builtin()),
        Some(enabled) => known(settings)
            .only(enabled)
            .map_err(AppError::UnknownWorkflow),
    }
}

/// A running application.
pub struct Running {
    /// Where the API listens (when the role serves it).
    pub addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    hub: Hub,
}

impl Running {
    /// The token that stops everything.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stop and wait for in-flight work to drain.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Wait until the token is cancelled elsewhere, then drain.
    pub async fn wait(mut self) {
        self.shutdown.cancelled().await;
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Embedded deploy mode: Dispatch inside a host application's process. The
/// workers of the enabled kinds run as tasks of this process, and the API is
/// returned as a router for the host to mount under a prefix
/// (`host_router.nest("/dispatch", router)`); the host serves it. Stop the
/// returned [`Running`] on shutdown to drain the workers.
pub async fn embed(settings: &Settings, pool: PgPool) -> Result<(axum::Router, Running), AppError> {
    let running = launch(settings, pool.clone(), ProcessRole::Worker, None).await?;
    let engine = Engine::new(
        pool.clone(),
        Arc::new(known(settings)),
        settings.engine.clone(),
    )
    .with_start_guard(Arc::new(crate::crew::start_guard));
    let applied = crate::notify::Waiters::default();
    running
        .hub
        .forward_applied(applied.clone(), running.shutdown.clone());
    let router = crate::api::router(ApiState {
        engine,
        applied,
        public_url: settings.public_url.clone(),
        max_body_bytes: settings.max_body_bytes,
    });
    Ok((router, running))
}

/// Start the parts of `role` over a migrated pool. With `listener` unset the
/// API binds `settings.listen`.
pub async fn launch(
    settings: &Settings,
    pool: PgPool,
    role: ProcessRole,
    listener: Option<TcpListener>,
) -> Result<Running, AppError> {
    // Every process knows every workflow (the API accepts signals for any kind,
    // durably); it runs the jobs of the kinds it serves only.
    let served = registry(settings)?;
    crate::metrics::handle();
    let engine = Engine::new(
        pool.clone(),
        Arc::new(known(settings)),
        settings.engine.clone(),
    )
    .with_start_guard(Arc::new(crate::crew::start_guard));
    let shutdown = CancellationToken::new();
    // One LISTEN connection for everything this process waits on.
    let hub = Hub::start(pool.clone(), shutdown.clone());
    // This process's pumps: work of the kinds they serve accepted here wakes
    // them directly (no NOTIFY round through the server).
    let wake = Arc::new(tokio::sync::Notify::new());
    let runs_workers = matches!(role, ProcessRole::Worker | ProcessRole::All);
    let engine = if runs_workers {
        let kinds = served.kinds().iter().map(|k| k.to_string()).collect();
        engine.with_local_wake(kinds, wake.clone())
    } else {
        engine
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut addr = None;
    if matches!(role, ProcessRole::Api | ProcessRole::All) {
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(&settings.listen).await?,
        };
        addr = Some(listener.local_addr()?);
        let applied = crate::notify::Waiters::default();
        hub.forward_applied(applied.clone(), shutdown.clone());
        let app = crate::api::router(ApiState {
            engine: engine.clone(),
            applied,
            public_url: settings.public_url.clone(),
            max_body_bytes: settings.max_body_bytes,
        });
        let edge = crate::edge::EdgeConfig {
            max_body_bytes: settings.max_body_bytes,
            ..settings.edge.clone()
        };
        tasks.spawn(crate::edge::serve(listener, app, edge, shutdown.clone()));
    }
    if matches!(role, ProcessRole::Worker | ProcessRole::All) {
        // Products' own effect handlers, by name; everything else goes
        // through the channel router.
        let router = crate::channels::route::Router::new();
        let deliver = ByName::new(Arc::new(router.clone())).with(
            crate::messaging::effects::NAMES,
            Arc::new(crate::messaging::effects::Effects::new()),
        );
        let outbox = Outbox::new(pool.clone(), settings.outbox.clone(), Arc::new(deliver));
        let mut set = workers::spawn(
            engine,
            outbox,
            Arc::new(crate::intake::Intake::new(router)),
            hub.clone(),
            wake,
            &served.kinds(),
            settings.workers.clone(),
            shutdown.clone(),
        );
        tasks.spawn(async move { while set.join_next().await.is_some() {} });
    }
    Ok(Running {
        addr,
        shutdown,
        tasks,
        hub,
    })
}
