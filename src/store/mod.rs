//! Persistence: every SQL statement of the runtime lives below this module.
//!
//! Functions take a `&mut PgConnection` (a transaction derefs to one) so the
//! engine composes them into one atomic transition. Every lifecycle `UPDATE`
//! states the status/version it expects; zero rows is reported to the caller,
//! never ignored.

pub mod effects;
pub mod jobs;
pub mod providers;
pub mod signals;
pub mod tenants;
pub mod timers;
pub mod workflows;

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

/// Open a pool sized for `max_connections`.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let opts: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(opts.application_name("dispatch"))
        .await?;
    Ok(pool)
}

/// Apply our migrations and apalis' (which keep their own migration table in
/// the `apalis` schema).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    apalis_postgres::PostgresStorage::setup(pool)
        .await
        .map_err(|e| StoreError::Queue(e.to_string()))?;
    sqlx::migrate!("./migrations").run(pool).await?;
    Ok(())
}

/// SHA-256 of a JSON value's canonical serialization (object keys sorted).
pub(crate) fn hash_json(v: &serde_json::Value) -> Vec<u8> {
    Sha256::digest(serde_json::to_vec(v).expect("JSON values serialize")).to_vec()
}
