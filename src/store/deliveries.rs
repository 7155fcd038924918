//! The `deliveries` ledger: one row per message sent, keyed by channel and
//! the effect's idempotency key, so a retried effect never sends twice.

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// The id to report for a ledger row, if the send was recorded.
pub async fn get(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    channel: &str,
    key: &str,
) -> Result<Option<String>, sqlx::Error> {
    let r: Option<(Option<String>, Uuid)> = sqlx::query_as(
        "select provider_message_id, id from deliveries where tenant_id = $1 and channel = $2 and idempotency_key = $3",
    )
    .bind(tenant_id)
    .bind(channel)
    .bind(key)
    .fetch_optional(conn)
    .await?;
    Ok(r.map(|(pid, id)| pid.unwrap_or_else(|| id.to_string())))
}

/// Record a send once per (channel, idempotency key); returns the message id
/// to report (the first one on a repeat).
#[allow(clippy::too_many_arguments)]
pub async fn insert(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    effect_id: Uuid,
    channel: &str,
    key: &str,
    recipient: &str,
    payload: &Value,
    body: &str,
    provider_message_id: Option<&str>,
) -> Result<String, sqlx::Error> {
    let inserted: Option<(Uuid,)> = sqlx::query_as(
        "insert into deliveries (tenant_id, id, effect_id, channel, idempotency_key, recipient, payload, body, provider_message_id)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         on conflict (tenant_id, channel, idempotency_key) do nothing returning id",
    )
    .bind(tenant_id)
    .bind(Uuid::now_v7())
    .bind(effect_id)
    .bind(channel)
    .bind(key)
    .bind(recipient)
    .bind(payload)
    .bind(body)
    .bind(provider_message_id)
    .fetch_optional(&mut *conn)
    .await?;
    match inserted {
        Some((id,)) => Ok(provider_message_id
            .map(str::to_string)
            .unwrap_or_else(|| id.to_string())),
        None => Ok(get(conn, tenant_id, channel, key)
            .await?
            .unwrap_or_default()),
    }
}
