//! The audit log: one row per ops or owner action, with who, why and what
//! it changed. Written in the transaction of the change it records.

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::store::tenants::Principal;

/// Who acted: the key's subject, or the key itself when it has none.
pub fn actor_name(actor: &Principal) -> String {
    actor
        .subject
        .clone()
        .unwrap_or_else(|| format!("key:{}", actor.key_id))
}

/// Record an action by `actor` (in the caller's transaction); returns the
/// audit row's id.
#[allow(clippy::too_many_arguments)]
pub async fn record(
    conn: &mut PgConnection,
    actor: &Principal,
    action: &str,
    workflow_id: Option<Uuid>,
    target: Option<&str>,
    reason: &str,
    before: Option<&str>,
    detail: Value,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    sqlx::query(
        "insert into audit_log (tenant_id, id, actor_role, actor_subject, action, workflow_id, target, reason, before_state, detail)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(actor.tenant_id)
    .bind(id)
    .bind(actor.role.as_str())
    .bind(actor_name(actor))
    .bind(action)
    .bind(workflow_id)
    .bind(target)
    .bind(reason)
    .bind(before)
    .bind(detail)
    .execute(conn)
    .await?;
    tracing::info!(ops.action = action, workflow.id = ?workflow_id, "ops action audited");
    Ok(id)
}
