//! Workflow rows, their start input (kept apart) and the append-only history.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// A workflow row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct WorkflowRow {
    /// Tenant.
    #[serde(skip)]
    pub tenant_id: Uuid,
    /// Workflow id.
    pub id: Uuid,
    /// Kind (e.g. `dispatch`).
    pub kind: String,
    /// Business key (e.g. the lead id).
    pub key: String,
    /// Upper-case state name.
    #[serde(rename = "state")]
    pub state_name: String,
    /// Serialized state data.
    #[serde(rename = "data")]
    pub state: Value,
    /// `running`, `completed` or `failed`.
    pub status: String,
    /// Bumped by each accepted transition.
    pub version: i64,
    /// Why ops should look (e.g. a dead-lettered effect), if they should.
    pub attention: Option<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
    /// Hash of the start input (idempotent creation).
    #[serde(skip)]
    pub input_hash: Vec<u8>,
    /// The definition version the state is in.
    pub def_version: i32,
}

const COLS: &str =
    "tenant_id, id, kind, key, state_name, state, status, version, attention, created_at, updated_at, input_hash, def_version";

/// Fields of a new workflow.
pub struct NewWorkflow<'a> {
    /// Tenant.
    pub tenant_id: Uuid,
    /// Kind.
    pub kind: &'a str,
    /// Key.
    pub key: &'a str,
    /// Hash of the input.
    pub input_hash: &'a [u8],
    /// Initial state name.
    pub state_name: &'a str,
    /// Initial state.
    pub state: &'a Value,
    /// The definition version it starts in.
    pub def_version: i32,
}

/// Insert a workflow; `None` if (tenant, kind, key) exists.
pub async fn insert(
    conn: &mut PgConnection,
    w: &NewWorkflow<'_>,
) -> Result<Option<WorkflowRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "insert into workflows (tenant_id, id, kind, key, input_hash, state_name, state, def_version)
         values ($1, $2, $3, $4, $5, $6, $7, $8)
         on conflict (tenant_id, kind, key) do nothing returning {COLS}"
    )))
    .bind(w.tenant_id)
    .bind(Uuid::now_v7())
    .bind(w.kind)
    .bind(w.key)
    .bind(w.input_hash)
    .bind(w.state_name)
    .bind(w.state)
    .bind(w.def_version)
    .fetch_optional(conn)
    .await
}

/// Find by business key.
pub async fn find(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    kind: &str,
    key: &str,
) -> Result<Option<WorkflowRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLS} from workflows where tenant_id = $1 and kind = $2 and key = $3"
    )))
    .bind(tenant_id)
    .bind(kind)
    .bind(key)
    .fetch_optional(conn)
    .await
}

/// Lock a workflow row for a transition. `for no key update` does not block
/// the foreign-key checks of concurrent signal inserts.
pub async fn lock(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<Option<WorkflowRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLS} from workflows where tenant_id = $1 and id = $2 for no key update"
    )))
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// How the attention note of a workflow this binary cannot advance begins.
/// The pumps pass such workflows over (their signals wait for a
/// migration); other notes (a dead-lettered effect) do not stop signals.
pub const CANNOT_ADVANCE: &str = "cannot advance: ";

/// Flag a workflow this binary cannot advance, unless it carries another
/// note (a dead-lettered effect) that ops must not lose.
pub async fn flag_cannot_advance(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
    why: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update workflows set attention = $3, updated_at = now()
         where tenant_id = $1 and id = $2
           and (attention is null or starts_with(attention, $4))",
    )
    .bind(tenant_id)
    .bind(id)
    .bind(why)
    .bind(CANNOT_ADVANCE)
    .execute(conn)
    .await?;
    Ok(())
}

/// Clear a workflow's attention note if it begins with `prefix`.
pub async fn clear_attention(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
    prefix: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update workflows set attention = null
         where tenant_id = $1 and id = $2 and starts_with(attention, $3)",
    )
    .bind(tenant_id)
    .bind(id)
    .bind(prefix)
    .execute(conn)
    .await?;
    Ok(())
}

/// Store a new state, fenced on the version that was read. Returns false if
/// the row moved on (a stale writer).
pub async fn update_state(
    conn: &mut PgConnection,
    w: &WorkflowRow,
    expected_version: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "update workflows set state_name = $3, state = $4, status = $5, version = $6, def_version = $8,
                updated_at = now()
         where tenant_id = $1 and id = $2 and version = $7",
    )
    .bind(w.tenant_id)
    .bind(w.id)
    .bind(&w.state_name)
    .bind(&w.state)
    .bind(&w.status)
    .bind(w.version)
    .bind(expected_version)
    .bind(w.def_version)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Flag a workflow for ops.
pub async fn set_attention(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
    why: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update workflows set attention = $3, updated_at = now() where tenant_id = $1 and id = $2",
    )
    .bind(tenant_id)
    .bind(id)
    .bind(why)
    .execute(conn)
    .await?;
    Ok(())
}

/// Keep the start input apart from state.
pub async fn insert_input(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
    input: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("insert into workflow_inputs (tenant_id, workflow_id, input) values ($1, $2, $3)")
        .bind(tenant_id)
        .bind(id)
        .bind(input)
        .execute(conn)
        .await?;
    Ok(())
}

/// Read the start input (for renderers that need it, e.g. the release message).
pub async fn input(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<Option<Value>, sqlx::Error> {
    let r: Option<(Value,)> = sqlx::query_as(
        "select input from workflow_inputs where tenant_id = $1 and workflow_id = $2",
    )
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(conn)
    .await?;
    Ok(r.map(|r| r.0))
}

/// One history event.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct HistoryEvent {
    /// Order within the workflow.
    pub seq: i64,
    /// Workflow version after the event.
    pub version: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// `started`, `applied`, `rejected` or `effect_dead`.
    pub event: String,
    /// The signal, if any.
    pub signal_id: Option<Uuid>,
    /// Signal name.
    pub signal_name: Option<String>,
    /// Actor role.
    pub actor_role: Option<String>,
    /// Actor subject.
    pub actor_subject: Option<String>,
    /// State before.
    pub from_state: Option<String>,
    /// State after.
    pub to_state: Option<String>,
    /// Rejection or failure reason.
    pub reason: Option<String>,
    /// Commands the transition issued.
    pub commands: Value,
}

/// A history event to append.
pub struct NewEvent<'a> {
    /// Workflow version after the event.
    pub version: i64,
    /// Event type.
    pub event: &'a str,
    /// Signal id.
    pub signal_id: Option<Uuid>,
    /// Signal name.
    pub signal_name: Option<&'a str>,
    /// Actor role.
    pub actor_role: Option<&'a str>,
    /// Actor subject.
    pub actor_subject: Option<&'a str>,
    /// State before.
    pub from_state: Option<&'a str>,
    /// State after.
    pub to_state: Option<&'a str>,
    /// Reason.
    pub reason: Option<&'a str>,
    /// Commands.
    pub commands: Value,
}

impl<'a> NewEvent<'a> {
    /// An event that changes no state (an upcast, a migration, a dead
    /// letter): `actor_role` did it in `state`, for `reason`.
    pub fn note(
        version: i64,
        event: &'a str,
        actor_role: &'a str,
        state: &'a str,
        reason: &'a str,
        commands: Value,
    ) -> Self {
        NewEvent {
            version,
            event,
            signal_id: None,
            signal_name: None,
            actor_role: Some(actor_role),
            actor_subject: None,
            from_state: Some(state),
            to_state: Some(state),
            reason: Some(reason),
            commands,
        }
    }
}

/// Append to the history.
pub async fn append_history(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    workflow_id: Uuid,
    e: &NewEvent<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into history (tenant_id, workflow_id, version, event, signal_id, signal_name, actor_role,
                              actor_subject, from_state, to_state, reason, commands)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(tenant_id)
    .bind(workflow_id)
    .bind(e.version)
    .bind(e.event)
    .bind(e.signal_id)
    .bind(e.signal_name)
    .bind(e.actor_role)
    .bind(e.actor_subject)
    .bind(e.from_state)
    .bind(e.to_state)
    .bind(e.reason)
    .bind(&e.commands)
    .execute(conn)
    .await?;
    Ok(())
}

/// The whole history, oldest first.
pub async fn history(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    workflow_id: Uuid,
) -> Result<Vec<HistoryEvent>, sqlx::Error> {
    sqlx::query_as(
        "select seq, version, at, event, signal_id, signal_name, actor_role, actor_subject, from_state,
                to_state, reason, commands
         from history where tenant_id = $1 and workflow_id = $2 order by seq",
    )
    .bind(tenant_id)
    .bind(workflow_id)
    .fetch_all(conn)
    .await
}

/// Lock up to `limit` instances of `kind` older than definition `version`,
/// skipping rows another transaction holds (batched ops migrations).
pub async fn lock_older_than(
    conn: &mut PgConnection,
    kind: &str,
    version: i32,
    after: Option<(Uuid, Uuid)>,
    limit: i64,
) -> Result<Vec<WorkflowRow>, sqlx::Error> {
    let (t, i) = after.unwrap_or((Uuid::nil(), Uuid::nil()));
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLS} from workflows where kind = $1 and def_version < $2 and (tenant_id, id) > ($3, $4)
         order by tenant_id, id limit $5 for no key update skip locked"
    )))
    .bind(kind)
    .bind(version)
    .bind(t)
    .bind(i)
    .bind(limit)
    .fetch_all(conn)
    .await
}
