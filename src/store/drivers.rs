//! Drivers and their registration tokens (route dispatch, DOMAIN.md §3).

use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

/// A driver of a tenant.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Driver {
    /// Id, chosen by the business (or generated).
    pub id: String,
    /// Name.
    pub name: String,
    /// Email, if known.
    pub email: Option<String>,
    /// The driver's private Telegram chat, once bound by registration.
    pub telegram_chat_id: Option<i64>,
    /// Channels to dispatch on, in order (`telegram`, `email`).
    pub channels: Vec<String>,
}

const COLS: &str = "id, name, email, telegram_chat_id, channels";

/// Create or update a driver (the chat binding is kept: only registration sets it).
pub async fn upsert(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    d: &Driver,
) -> Result<bool, sqlx::Error> {
    let (inserted,): (bool,) = sqlx::query_as(
        "insert into drivers (tenant_id, id, name, email, channels) values ($1, $2, $3, $4, $5)
         on conflict (tenant_id, id) do update set name = excluded.name, email = excluded.email,
           channels = excluded.channels, updated_at = now()
         returning (xmax = 0)",
    )
    .bind(tenant_id)
    .bind(&d.id)
    .bind(&d.name)
    .bind(&d.email)
    .bind(&d.channels)
    .fetch_one(conn)
    .await?;
    Ok(inserted)
}

/// One driver.
pub async fn get(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: &str,
) -> Result<Option<Driver>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLS} from drivers where tenant_id = $1 and id = $2"
    )))
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Drivers by id (for a batch), in one query.
pub async fn get_many(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    ids: &[String],
) -> Result<Vec<Driver>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLS} from drivers where tenant_id = $1 and id = any($2)"
    )))
    .bind(tenant_id)
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// All drivers of a tenant.
pub async fn list(conn: &mut PgConnection, tenant_id: Uuid) -> Result<Vec<Driver>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLS} from drivers where tenant_id = $1 order by id"
    )))
    .bind(tenant_id)
    .fetch_all(conn)
    .await
}

/// Remove a driver.
pub async fn delete(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: &str,
) -> Result<bool, sqlx::Error> {
    // Its registration links die with it: an old link must never bind a
    // chat to a later driver who reuses the id.
    let (deleted,): (i64,) = sqlx::query_as(
        "with links as (delete from driver_registrations where tenant_id = $1 and driver_id = $2),
              gone as (delete from drivers where tenant_id = $1 and id = $2 returning 1)
         select count(*) from gone",
    )
    .bind(tenant_id)
    .bind(id)
    .fetch_one(conn)
    .await?;
    Ok(deleted == 1)
}

/// Bind the driver's Telegram chat (idempotent).
pub async fn bind_chat(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: &str,
    chat_id: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "update drivers set telegram_chat_id = $3, updated_at = now() where tenant_id = $1 and id = $2",
    )
    .bind(tenant_id)
    .bind(id)
    .bind(chat_id)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Remember a registration token by its hash.
pub async fn insert_registration(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    token_hash: &[u8],
    registration_id: Uuid,
    driver_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into driver_registrations (tenant_id, token_hash, registration_id, driver_id) values ($1, $2, $3, $4)",
    )
    .bind(tenant_id)
    .bind(token_hash)
    .bind(registration_id)
    .bind(driver_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The registration a token hash belongs to.
pub async fn registration_by_hash(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    token_hash: &[u8],
) -> Result<Option<Uuid>, sqlx::Error> {
    let row: Option<(Uuid,)> = sqlx::query_as(
        "select registration_id from driver_registrations where tenant_id = $1 and token_hash = $2",
    )
    .bind(tenant_id)
    .bind(token_hash)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| r.0))
}
