//! Provider settings per tenant, the people registry, the inbound webhook
//! ledger, WhatsApp service windows and shared rate-limit state.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// A tenant's settings for one provider.
#[derive(Debug, Clone, Default)]
pub struct ProviderRow {
    /// Non-secret settings (base URL, usernames, ids).
    pub settings: Value,
    /// Secrets (tokens, app secrets). Never returned by the API or logged.
    pub secrets: Value,
}

impl ProviderRow {
    /// A non-secret string setting.
    pub fn setting(&self, name: &str) -> Option<&str> {
        self.settings
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }
    /// A secret.
    pub fn secret(&self, name: &str) -> Option<&str> {
        self.secrets
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// Load one provider's settings.
pub async fn get(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    provider: &str,
) -> Result<Option<ProviderRow>, sqlx::Error> {
    let row: Option<(Value, Value)> = sqlx::query_as(
        "select settings, secrets from provider_settings where tenant_id = $1 and provider = $2",
    )
    .bind(tenant_id)
    .bind(provider)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(settings, secrets)| ProviderRow { settings, secrets }))
}

/// Update the settings: fields given replace the stored ones, fields omitted
/// (settings and secrets alike) keep their values. Returns (settings, secrets).
pub async fn put(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    provider: &str,
    settings: &Value,
    secrets: &Value,
) -> Result<(Value, Value), sqlx::Error> {
    sqlx::query_as(
        "insert into provider_settings (tenant_id, provider, settings, secrets) values ($1, $2, $3, $4)
         on conflict (tenant_id, provider) do update
           set settings = provider_settings.settings || excluded.settings,
               secrets = provider_settings.secrets || excluded.secrets, updated_at = now()
         returning settings, secrets",
    )
    .bind(tenant_id)
    .bind(provider)
    .bind(settings)
    .bind(secrets)
    .fetch_one(conn)
    .await
}

/// A tenant's id by its name (webhook URLs name the tenant).
pub async fn tenant_by_name(
    conn: &mut PgConnection,
    name: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    let row: Option<(Uuid,)> = sqlx::query_as("select id from tenants where name = $1")
        .bind(name)
        .fetch_optional(conn)
        .await?;
    Ok(row.map(|r| r.0))
}

/// A person in the registry.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Person {
    /// Id (an executor's id is its executor keys' subject).
    pub id: String,
    /// `executor` or `operator`.
    pub role: String,
    /// Display name.
    pub display_name: String,
    /// Telegram user id (also the private chat id).
    pub telegram_user_id: Option<i64>,
    /// Telegram @username, without the @.
    pub telegram_username: Option<String>,
    /// E.164 phone (WhatsApp/SMS).
    pub phone: Option<String>,
    /// Email.
    pub email: Option<String>,
}

const PERSON_COLS: &str =
    "id, role, display_name, telegram_user_id, telegram_username, phone, email";

/// Create or replace a person.
pub async fn upsert_person(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    p: &Person,
) -> Result<bool, sqlx::Error> {
    let (inserted,): (bool,) = sqlx::query_as(
        "insert into people (tenant_id, id, role, display_name, telegram_user_id, telegram_username, phone, email)
         values ($1, $2, $3, $4, $5, $6, $7, $8)
         on conflict (tenant_id, id) do update set role = excluded.role, display_name = excluded.display_name,
           telegram_user_id = excluded.telegram_user_id, telegram_username = excluded.telegram_username,
           phone = excluded.phone, email = excluded.email, updated_at = now()
         returning (xmax = 0)",
    )
    .bind(tenant_id)
    .bind(&p.id)
    .bind(&p.role)
    .bind(&p.display_name)
    .bind(p.telegram_user_id)
    .bind(&p.telegram_username)
    .bind(&p.phone)
    .bind(&p.email)
    .fetch_one(conn)
    .await?;
    Ok(inserted)
}

/// One person.
pub async fn person(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: &str,
) -> Result<Option<Person>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {PERSON_COLS} from people where tenant_id = $1 and id = $2"
    )))
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Everyone, by id.
pub async fn people(conn: &mut PgConnection, tenant_id: Uuid) -> Result<Vec<Person>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {PERSON_COLS} from people where tenant_id = $1 order by id"
    )))
    .bind(tenant_id)
    .fetch_all(conn)
    .await
}

/// Remove a person.
pub async fn delete_person(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("delete from people where tenant_id = $1 and id = $2")
        .bind(tenant_id)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Who sent a Telegram message.
pub async fn person_by_telegram(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    user_id: i64,
) -> Result<Option<Person>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {PERSON_COLS} from people where tenant_id = $1 and telegram_user_id = $2"
    )))
    .bind(tenant_id)
    .bind(user_id)
    .fetch_optional(conn)
    .await
}

/// Who sent a WhatsApp/SMS message.
pub async fn person_by_phone(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    phone: &str,
) -> Result<Option<Person>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {PERSON_COLS} from people where tenant_id = $1 and phone = $2"
    )))
    .bind(tenant_id)
    .bind(phone)
    .fetch_optional(conn)
    .await
}

/// Executors reachable by phone (the WhatsApp broadcast list).
pub async fn executors_with_phone(
    conn: &mut PgConnection,
    tenant_id: Uuid,
) -> Result<Vec<Person>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {PERSON_COLS} from people where tenant_id = $1 and role = 'executor' and phone is not null order by id"
    )))
    .bind(tenant_id)
    .fetch_all(conn)
    .await
}

/// Store a verified inbound event once; `None` if the provider id was seen.
pub async fn insert_inbound(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    provider: &str,
    event_id: &str,
    payload: &Value,
) -> Result<Option<Uuid>, sqlx::Error> {
    let r: Option<(Uuid,)> = sqlx::query_as(
        "insert into inbound_events (tenant_id, id, provider, event_id, payload) values ($1, $2, $3, $4, $5)
         on conflict (tenant_id, provider, event_id) do nothing returning id",
    )
    .bind(tenant_id)
    .bind(Uuid::now_v7())
    .bind(provider)
    .bind(event_id)
    .bind(payload)
    .fetch_optional(conn)
    .await?;
    Ok(r.map(|r| r.0))
}

/// An inbound event to process.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InboundRow {
    /// Row id.
    pub id: Uuid,
    /// Provider.
    pub provider: String,
    /// Provider's event id.
    pub event_id: String,
    /// The verified payload.
    pub payload: Value,
    /// `queued` or `processed`.
    pub status: String,
}

/// Lock a queued inbound event for processing.
pub async fn lock_inbound(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<Option<InboundRow>, sqlx::Error> {
    sqlx::query_as("select id, provider, event_id, payload, status from inbound_events where tenant_id = $1 and id = $2 and status = 'queued' for update skip locked")
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// Mark processed with a short outcome (no personal data).
pub async fn finish_inbound(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
    outcome: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("update inbound_events set status = 'processed', outcome = $3, processed_at = now() where tenant_id = $1 and id = $2 and status = 'queued'")
        .bind(tenant_id)
        .bind(id)
        .bind(outcome)
        .execute(conn)
        .await?;
    Ok(())
}

/// Inbound events queued longer than `older_than_ms` (lost jobs).
pub async fn stale_inbound(
    conn: &mut PgConnection,
    older_than_ms: i64,
    limit: i64,
) -> Result<Vec<(Uuid, Uuid)>, sqlx::Error> {
    sqlx::query_as(
        "select tenant_id, id from inbound_events where status = 'queued'
         and received_at < now() - make_interval(secs => $1 / 1000.0) limit $2",
    )
    .bind(older_than_ms as f64)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Record an inbound WhatsApp message (opens the 24-hour window).
pub async fn touch_whatsapp_window(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    phone: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into whatsapp_windows (tenant_id, phone, last_inbound) values ($1, $2, now())
         on conflict (tenant_id, phone) do update set last_inbound = now()",
    )
    .bind(tenant_id)
    .bind(phone)
    .execute(conn)
    .await?;
    Ok(())
}

/// Whether the 24-hour customer service window is open for a number.
pub async fn whatsapp_window_open(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    phone: &str,
) -> Result<bool, sqlx::Error> {
    let r: Option<(DateTime<Utc>,)> = sqlx::query_as(
        "select last_inbound from whatsapp_windows where tenant_id = $1 and phone = $2 and last_inbound > now() - interval '24 hours'",
    )
    .bind(tenant_id)
    .bind(phone)
    .fetch_optional(conn)
    .await?;
    Ok(r.is_some())
}

/// Reserve one send under several GCRA limits at once, shared by every worker
/// process through their rows: each `(key, interval_ms)` allows one send per
/// interval. The send's slot is the earliest time every key allows; each key is
/// then advanced from that slot, so a send held back by one limit does not use
/// another's capacity early. Keys are locked in sorted order (no deadlocks).
/// Returns the slot and the database's current time (one clock for all hosts).
pub async fn reserve_slots(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    limits: &[(String, f64)],
) -> Result<(DateTime<Utc>, DateTime<Utc>), sqlx::Error> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    let (now,): (DateTime<Utc>,) = sqlx::query_as("select clock_timestamp()")
        .fetch_one(&mut *tx)
        .await?;
    let mut sorted: Vec<&(String, f64)> = limits.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut slot = now;
    let mut tats = Vec::with_capacity(sorted.len());
    for (key, _) in &sorted {
        sqlx::query("insert into rate_limits (tenant_id, key, tat) values ($1, $2, $3) on conflict do nothing")
            .bind(tenant_id)
            .bind(key)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let (tat,): (DateTime<Utc>,) = sqlx::query_as(
            "select tat from rate_limits where tenant_id = $1 and key = $2 for update",
        )
        .bind(tenant_id)
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
        slot = slot.max(tat);
        tats.push(tat);
    }
    for (key, interval_ms) in &sorted {
        let t = chrono::Duration::microseconds((interval_ms * 1000.0) as i64);
        sqlx::query("update rate_limits set tat = $3 where tenant_id = $1 and key = $2")
            .bind(tenant_id)
            .bind(key)
            .bind(slot + t)
            .execute(&mut *tx)
            .await?;
    }
    // The clock as the reservation completes: waiting is measured from here,
    // not from before any lock waits above.
    let (done,): (DateTime<Utc>,) = sqlx::query_as("select clock_timestamp()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((slot, done))
}

/// The database's clock.
pub async fn db_now(conn: &mut PgConnection) -> Result<DateTime<Utc>, sqlx::Error> {
    let (now,): (DateTime<Utc>,) = sqlx::query_as("select clock_timestamp()")
        .fetch_one(conn)
        .await?;
    Ok(now)
}
