//! The messaging workflows' effects: sending a stored SMS (through the
//! `deliveries` ledger, so a retry never re-sends), registering a number with
//! Twilio, and keeping `msg_numbers`, `msg_threads` and the owner's inbox in
//! step with the workflows' timers. Every handler is idempotent.

use serde_json::{json, Value};
use sqlx::PgConnection;
use uuid::Uuid;
use workflows::{meet_and_greet, message_relay, poaching_strikes, pool_number, sitter_lifecycle};

use crate::channels::twilio::Twilio;
use crate::channels::{provider, ChannelError};
use crate::store::deliveries;
use crate::store::effects::EffectRow;
use crate::store::providers;

fn uuid_field(p: &Value, name: &str) -> Result<Uuid, ChannelError> {
    p[name]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| ChannelError::permanent(format!("effect payload has no `{name}`")))
}

async fn workflow_key(conn: &mut PgConnection, effect: &EffectRow) -> Result<String, ChannelError> {
    let (key,): (String,) =
        sqlx::query_as("select key from workflows where tenant_id = $1 and id = $2")
            .bind(effect.tenant_id)
            .bind(effect.workflow_id)
            .fetch_one(conn)
            .await?;
    Ok(key)
}

/// The effects this module carries out, registered by name with the
/// runtime's delivery (`delivery::ByName`) at start-up.
pub const NAMES: &[&str] = &[
    message_relay::effects::SEND,
    sitter_lifecycle::effects::REGISTER_NUMBER,
    sitter_lifecycle::effects::RECYCLE_NUMBER,
    pool_number::effects::RELEASED,
    pool_number::effects::AVAILABLE,
    meet_and_greet::effects::APPROVED,
    meet_and_greet::effects::FAILED,
    poaching_strikes::effects::OWNER_ALERT,
];

/// Messaging's effect handler (see [`NAMES`]), with its own HTTP client.
pub struct Effects {
    http: reqwest::Client,
}

impl Effects {
    /// A handler with the channels' HTTP client settings.
    pub fn new() -> Self {
        Effects {
            http: crate::channels::http_client(),
        }
    }
}

impl Default for Effects {
    fn default() -> Self {
        Self::new()
    }
}

impl crate::delivery::Deliver for Effects {
    fn deliver<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        effect: &'a EffectRow,
        _config: Option<&'a Value>,
        _send_after: Option<chrono::DateTime<chrono::Utc>>,
    ) -> futures::future::BoxFuture<'a, Result<crate::delivery::Sent, ChannelError>> {
        Box::pin(async move {
            deliver(&self.http, conn, effect)
                .await
                .map(crate::delivery::Sent::done)
        })
    }
}

/// Carry out one messaging effect.
pub async fn deliver(
    http: &reqwest::Client,
    conn: &mut PgConnection,
    effect: &EffectRow,
) -> Result<Value, ChannelError> {
    let tenant = effect.tenant_id;
    let p = &effect.payload;
    match effect.name.as_str() {
        message_relay::effects::SEND => {
            let id = uuid_field(p, "message_id")?;
            #[allow(clippy::type_complexity)]
            let row: Option<(String, String, String, String, Option<Uuid>, String)> = sqlx::query_as(
                "select from_number, to_number, body, sender_role, thread_id, source from msg_messages where tenant_id = $1 and id = $2",
            )
            .bind(tenant)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
            let (from, to, body, role, thread, source) =
                row.ok_or_else(|| ChannelError::permanent("the message is gone"))?;
            // A client's message still waiting (a provider outage) when its
            // sitter was offboarded goes to the owner instead.
            let (offboarded,): (bool,) = sqlx::query_as(
                "select $3 = 'client'
                    and exists (select 1 from msg_sitters where tenant_id = $1 and phone = $2 and status = 'offboarded')
                    and not exists (select 1 from msg_sitters where tenant_id = $1 and phone = $2 and status = 'active')",
            )
            .bind(tenant)
            .bind(&to)
            .bind(&role)
            .fetch_one(&mut *conn)
            .await?;
            if offboarded
                && deliveries::get(&mut *conn, tenant, "twilio", &effect.idempotency_key)
                    .await?
                    .is_none()
            {
                sqlx::query(
                    "update msg_messages set status = 'withheld' where tenant_id = $1 and id = $2",
                )
                .bind(tenant)
                .bind(id)
                .execute(&mut *conn)
                .await?;
                // The owner gets the client's original message, held for them
                // (so it can be resolved to the successor like any other).
                let original = source
                    .strip_suffix(":relay")
                    .and_then(|s| Uuid::parse_str(s).ok())
                    .unwrap_or(id);
                sqlx::query(
                    "update msg_messages set status = 'routed_to_owner', reason = 'recipient_offboarded'
                      where tenant_id = $1 and id = $2 and direction = 'in' and status = 'relayed'",
                )
                .bind(tenant)
                .bind(original)
                .execute(&mut *conn)
                .await?;
                super::routing::inbox(
                    &mut *conn,
                    tenant,
                    &format!("message:{id}"),
                    Some(original),
                    thread,
                    "recipient_offboarded",
                    "normal",
                    json!({}),
                )
                .await?;
                return Ok(json!({ "withheld": "the recipient sitter was offboarded" }));
            }
            let key = &effect.idempotency_key;
            let twilio = providers::get(&mut *conn, tenant, "twilio").await?;
            let (channel, sent) = match twilio {
                Some(_) => match deliveries::get(&mut *conn, tenant, "twilio", key).await? {
                    Some(sid) => ("twilio", sid),
                    None => {
                        let row = provider(&mut *conn, tenant, "twilio").await?;
                        let sid = Twilio::new(http, &row)?
                            .send_from(&from, &to, &body)
                            .await?;
                        let id = deliveries::insert(
                            &mut *conn,
                            tenant,
                            effect.id,
                            "twilio",
                            key,
                            &to,
                            p,
                            &body,
                            Some(&sid),
                        )
                        .await?;
                        ("twilio", id)
                    }
                },
                // A tenant without Twilio (development): the log channel.
                None => (
                    "log",
                    deliveries::insert(
                        &mut *conn, tenant, effect.id, "log", key, &to, p, &body, None,
                    )
                    .await?,
                ),
            };
            sqlx::query("update msg_messages set status = 'sent' where tenant_id = $1 and id = $2 and status = 'queued'")
                .bind(tenant)
                .bind(id)
                .execute(&mut *conn)
                .await?;
            Ok(json!({ "provider": channel, "message_id": sent }))
        }
        sitter_lifecycle::effects::REGISTER_NUMBER => {
            let id = uuid_field(p, "number_id")?;
            let sid: Option<(Option<String>,)> = sqlx::query_as(
                "select provider_sid from msg_numbers where tenant_id = $1 and id = $2",
            )
            .bind(tenant)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
            match (
                sid.and_then(|s| s.0),
                providers::get(&mut *conn, tenant, "twilio").await?,
            ) {
                (Some(sid), Some(row)) => {
                    Twilio::new(http, &row)?
                        .configure(&sid, "Dispatch sitter line")
                        .await?;
                    Ok(json!({ "registered": "twilio" }))
                }
                _ => Ok(json!({ "registered": "local" })),
            }
        }
        sitter_lifecycle::effects::RECYCLE_NUMBER => {
            // Back only as a pool number, marked as a former sitter number for good.
            sqlx::query(
                "update msg_numbers set class = 'pool', status = 'available', sitter_id = null, client_id = null,
                        cooldown_until = null, retired_sitter = true, updated_at = now()
                  where tenant_id = $1 and id = $2 and class = 'sitter' and status = 'cooldown'",
            )
            .bind(tenant)
            .bind(uuid_field(p, "number_id")?)
            .execute(&mut *conn)
            .await?;
            Ok(json!({ "recycled": true }))
        }
        pool_number::effects::RELEASED => {
            let number = Uuid::parse_str(&workflow_key(&mut *conn, effect).await?)
                .map_err(|_| ChannelError::permanent("pool workflow key is not a number id"))?;
            let client = p["client_id"].as_str().unwrap_or_default();
            let until = p["cooldown_until"].as_str().unwrap_or_default();
            // Not when the lease was extended after the workflow saw it end.
            let lease_until = p["lease_until"].as_str().unwrap_or_default();
            let released = sqlx::query(
                "update msg_numbers set status = 'cooldown', cooldown_until = $4::timestamptz, updated_at = now()
                  where tenant_id = $1 and id = $2 and client_id = $3 and status = 'leased' and lease_until <= $5::timestamptz",
            )
            .bind(tenant)
            .bind(number)
            .bind(client)
            .bind(until)
            .bind(lease_until)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if released > 0 {
                // The client's thread on the number ends with the lease.
                sqlx::query(
                    "update msg_threads set status = 'closed', updated_at = now()
                      where tenant_id = $1 and number_id = $2 and client_id = $3 and status = 'active'",
                )
                .bind(tenant)
                .bind(number)
                .bind(client)
                .execute(&mut *conn)
                .await?;
            }
            Ok(json!({ "released": released > 0 }))
        }
        pool_number::effects::AVAILABLE => {
            let number = Uuid::parse_str(&workflow_key(&mut *conn, effect).await?)
                .map_err(|_| ChannelError::permanent("pool workflow key is not a number id"))?;
            sqlx::query(
                "update msg_numbers set status = 'available', client_id = null, cooldown_until = null, updated_at = now()
                  where tenant_id = $1 and id = $2 and status = 'cooldown'",
            )
            .bind(tenant)
            .bind(number)
            .execute(&mut *conn)
            .await?;
            Ok(json!({ "available": true }))
        }
        meet_and_greet::effects::APPROVED => {
            // Future service messages move to the sitter's masked number.
            let thread = Uuid::parse_str(&workflow_key(&mut *conn, effect).await?)
                .map_err(|_| ChannelError::permanent("meet-and-greet key is not a thread id"))?;
            let sitter = p["sitter_id"].as_str().unwrap_or_default();
            let moved = sqlx::query(
                "update msg_threads t set number_id = n.id, scope = 'service', updated_at = now()
                   from msg_numbers n
                  where t.tenant_id = $1 and t.id = $2 and n.tenant_id = t.tenant_id and n.sitter_id = $3 and n.status = 'assigned'",
            )
            .bind(tenant)
            .bind(thread)
            .bind(sitter)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok(json!({ "moved_to_sitter_number": moved > 0 }))
        }
        meet_and_greet::effects::FAILED => {
            // Front desk only from now on: the sitter is taken off the thread.
            let thread = Uuid::parse_str(&workflow_key(&mut *conn, effect).await?)
                .map_err(|_| ChannelError::permanent("meet-and-greet key is not a thread id"))?;
            sqlx::query("update msg_threads set sitter_id = null, updated_at = now() where tenant_id = $1 and id = $2")
                .bind(tenant)
                .bind(thread)
                .execute(&mut *conn)
                .await?;
            Ok(json!({ "sitter_removed": true }))
        }
        poaching_strikes::effects::OWNER_ALERT => {
            let sitter = workflow_key(&mut *conn, effect).await?;
            let locked = p["locked"].as_bool().unwrap_or(false);
            let message = p["message_id"]
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok());
            super::routing::inbox(
                &mut *conn,
                tenant,
                &format!("alert:{}:{}", effect.workflow_id, effect.idempotency_key),
                message,
                None,
                if locked { "sitter_locked_pending_review" } else { "repeat_poaching_attempt" },
                "high",
                json!({ "sitter_id": sitter, "strikes_in_30_days": p["strikes"], "locked": locked }),
            )
            .await?;
            Ok(json!({ "alerted": true }))
        }
        other => Err(ChannelError::permanent(format!(
            "unknown messaging effect `{other}`"
        ))),
    }
}
