//! Tenants, their configuration, and hashed API keys.

use rand::RngCore;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;
use workflows::Role;

/// A tenant row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Tenant {
    /// Tenant id.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Runtime configuration (DOMAIN.md "Tenant config").
    pub config: Value,
}

/// The principal behind an API key.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Tenant the key belongs to.
    pub tenant_id: Uuid,
    /// Role.
    pub role: Role,
    /// Subject (executor id for executor keys).
    pub subject: Option<String>,
    /// The key's id (names the actor in audit entries when it has no subject).
    pub key_id: Uuid,
}

/// Generate a new random key: `dsp_` + 64 hex digits (256 bits).
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("dsp_{}", hex::encode(bytes))
}

fn hash_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// Create a tenant; `None` when the name is taken.
pub async fn create(conn: &mut PgConnection, name: &str) -> Result<Option<Tenant>, sqlx::Error> {
    sqlx::query_as(
        "insert into tenants (id, name) values ($1, $2) on conflict (name) do nothing
         returning id, name, config",
    )
    .bind(Uuid::now_v7())
    .bind(name)
    .fetch_optional(conn)
    .await
}

/// Find a tenant by name.
pub async fn by_name(conn: &mut PgConnection, name: &str) -> Result<Option<Tenant>, sqlx::Error> {
    sqlx::query_as("select id, name, config from tenants where name = $1")
        .bind(name)
        .fetch_optional(conn)
        .await
}

/// A tenant's configuration document.
pub async fn config(conn: &mut PgConnection, tenant_id: Uuid) -> Result<Value, sqlx::Error> {
    let row: Option<(Value,)> = sqlx::query_as("select config from tenants where id = $1")
        .bind(tenant_id)
        .fetch_optional(conn)
        .await?;
    Ok(row
        .map(|r| r.0)
        .unwrap_or_else(|| Value::Object(Default::default())))
}

/// [`config`] and the database clock, in one statement.
pub async fn config_and_now(
    conn: &mut PgConnection,
    tenant_id: Uuid,
) -> Result<(Value, chrono::DateTime<chrono::Utc>), sqlx::Error> {
    sqlx::query_as(
        "select coalesce((select config from tenants where id = $1), '{}'::jsonb), clock_timestamp()",
    )
    .bind(tenant_id)
    .fetch_one(conn)
    .await
}

/// Several tenants' configuration documents, read in one statement.
pub async fn configs(
    conn: &mut PgConnection,
    tenant_ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, std::sync::Arc<Value>>, sqlx::Error> {
    let rows: Vec<(Uuid, Value)> =
        sqlx::query_as("select id, config from tenants where id = any($1)")
            .bind(tenant_ids)
            .fetch_all(conn)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(id, c)| (id, std::sync::Arc::new(c)))
        .collect())
}

/// Replace a tenant's configuration.
pub async fn set_config(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    config: &Value,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("update tenants set config = $2 where id = $1")
        .bind(tenant_id)
        .bind(config)
        .execute(conn)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Store a new key for a tenant and return its plaintext (shown once).
pub async fn add_key(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    role: Role,
    subject: Option<&str>,
) -> Result<String, sqlx::Error> {
    let key = generate_key();
    sqlx::query(
        "insert into api_keys (tenant_id, id, role, subject, key_hash) values ($1, $2, $3, $4, $5)",
    )
    .bind(tenant_id)
    .bind(Uuid::now_v7())
    .bind(role.as_str())
    .bind(subject)
    .bind(hash_key(&key))
    .execute(conn)
    .await?;
    Ok(key)
}

/// Resolve a presented key. The lookup is by hash (an index probe), so the
/// comparison leaks nothing about the stored value.
pub async fn authenticate(
    conn: &mut PgConnection,
    key: &str,
) -> Result<Option<Principal>, sqlx::Error> {
    let row: Option<(Uuid, String, Option<String>, Uuid)> = sqlx::query_as(
        "select tenant_id, role, subject, id from api_keys where key_hash = $1 and revoked_at is null",
    )
    .bind(hash_key(key))
    .fetch_optional(conn)
    .await?;
    Ok(row.and_then(|(tenant_id, role, subject, key_id)| {
        Some(Principal {
            tenant_id,
            role: Role::parse_api_role(&role)?,
            subject,
            key_id,
        })
    }))
}
