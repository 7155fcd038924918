//! Where a message goes (DOMAIN.md §2), decided in one transaction that holds
//! a share lock on the number it came to: an offboarding (which updates that
//! number) is therefore either wholly before or wholly after each message, and
//! every message ends in exactly one stored outcome — relayed, held for the
//! owner, blocked or refused — with its outbound legs started in the same
//! transaction as durable `message_relay` workflows.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgConnection;
use uuid::Uuid;
use workflows::meet_and_greet::MeetState;
use workflows::{Actor, Workflow};

use crate::engine::{Engine, EngineError, SignalIn};
use crate::scan;
use crate::store::providers::db_now;

/// The auto-reply on a pool number to a sender it no longer serves.
pub const POOL_AUTO_REPLY: &str =
    "This booking is complete, so this number no longer reaches your sitter. We have passed your message to our front desk, who will get back to you.";

/// A number of the tenant's.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Number {
    /// Id.
    pub id: Uuid,
    /// E.164.
    pub e164: String,
    /// `front_desk`, `sitter` or `pool`.
    pub class: String,
    /// `available`, `assigned`, `leased` or `cooldown`.
    pub status: String,
    /// The sitter it is (or was) assigned to.
    pub sitter_id: Option<String>,
}

/// A sitter.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Sitter {
    /// Id.
    pub id: String,
    /// Their own phone.
    pub phone: String,
    /// `active` or `offboarded`.
    pub status: String,
}

/// A client.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Client {
    /// Id.
    pub id: String,
    /// Phone.
    pub phone: String,
}

/// An active assignment window: a booking, its sitter and its number.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Window {
    /// The booking.
    pub booking_id: Uuid,
    /// Its client.
    pub client_id: String,
    /// The client's phone.
    pub client_phone: String,
    /// Its sitter.
    pub sitter_id: String,
    /// The sitter's phone.
    pub sitter_phone: String,
    /// The number the booking talks on.
    pub number_id: Uuid,
    /// That number, E.164.
    pub number_e164: String,
}

const WINDOWS: &str =
    "select b.id as booking_id, b.client_id, c.phone as client_phone, b.sitter_id,
        s.phone as sitter_phone, b.number_id, n.e164 as number_e164
   from msg_bookings b
   join msg_clients c on c.tenant_id = b.tenant_id and c.id = b.client_id
   join msg_sitters s on s.tenant_id = b.tenant_id and s.id = b.sitter_id and s.status = 'active'
   join msg_numbers n on n.tenant_id = b.tenant_id and n.id = b.number_id and n.status in ('assigned', 'leased')
  where b.tenant_id = $1 and not b.cancelled and b.opens_at <= $2 and $2 < b.closes_at";

/// The client's active windows at `now`. The sitters' rows are share-locked:
/// a concurrent offboarding (which updates them) is decided before this
/// answers, and a sitter it took away is not a window any more.
pub async fn client_windows(
    conn: &mut PgConnection,
    tenant: Uuid,
    client_id: &str,
    now: DateTime<Utc>,
) -> Result<Vec<Window>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{WINDOWS} and b.client_id = $3 order by b.opens_at for share of s"
    )))
    .bind(tenant)
    .bind(now)
    .bind(client_id)
    .fetch_all(conn)
    .await
}

/// The sitter's active windows at `now` on one number (`None`: on any).
pub async fn sitter_windows(
    conn: &mut PgConnection,
    tenant: Uuid,
    sitter_id: &str,
    number_id: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<Vec<Window>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{WINDOWS} and b.sitter_id = $3 and ($4::uuid is null or b.number_id = $4) order by b.opens_at for share of s"
    )))
    .bind(tenant)
    .bind(now)
    .bind(sitter_id)
    .bind(number_id)
    .fetch_all(conn)
    .await
}

/// A number by its E.164 form, share-locked for the caller's transaction.
pub async fn number_by_e164(
    conn: &mut PgConnection,
    tenant: Uuid,
    e164: &str,
) -> Result<Option<Number>, sqlx::Error> {
    // The share lock orders this message against an offboarding of the number.
    sqlx::query_as(
        "select id, e164, class, status, sitter_id from msg_numbers where tenant_id = $1 and e164 = $2 for share",
    )
    .bind(tenant)
    .bind(e164)
    .fetch_optional(conn)
    .await
}

/// A number by id, share-locked for the caller's transaction.
pub async fn number_by_id(
    conn: &mut PgConnection,
    tenant: Uuid,
    id: Uuid,
) -> Result<Option<Number>, sqlx::Error> {
    sqlx::query_as("select id, e164, class, status, sitter_id from msg_numbers where tenant_id = $1 and id = $2 for share")
        .bind(tenant)
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// The tenant's front-desk number.
pub async fn front_desk(
    conn: &mut PgConnection,
    tenant: Uuid,
) -> Result<Option<Number>, sqlx::Error> {
    sqlx::query_as("select id, e164, class, status, sitter_id from msg_numbers where tenant_id = $1 and class = 'front_desk'")
        .bind(tenant)
        .fetch_optional(conn)
        .await
}

async fn active_sitter_by_phone(
    conn: &mut PgConnection,
    tenant: Uuid,
    phone: &str,
) -> Result<Option<Sitter>, sqlx::Error> {
    // Share-locked: an offboarding in flight decides first, and this sees its outcome.
    sqlx::query_as("select id, phone, status from msg_sitters where tenant_id = $1 and phone = $2 and status = 'active' for share")
        .bind(tenant)
        .bind(phone)
        .fetch_optional(conn)
        .await
}

async fn client_by_phone(
    conn: &mut PgConnection,
    tenant: Uuid,
    phone: &str,
) -> Result<Option<Client>, sqlx::Error> {
    sqlx::query_as("select id, phone from msg_clients where tenant_id = $1 and phone = $2")
        .bind(tenant)
        .bind(phone)
        .fetch_optional(conn)
        .await
}

/// Whether the sitter's messaging is locked (read from the strikes workflow).
pub async fn sitter_locked(
    conn: &mut PgConnection,
    tenant: Uuid,
    sitter_id: &str,
) -> Result<bool, sqlx::Error> {
    // The workflow's LOCKED, or — before its strike signal is applied — the
    // attempts this very transaction can see: three within 30 days since the
    // owner last unlocked the sitter.
    let (locked,): (bool,) = sqlx::query_as(
        "select exists (select 1 from workflows where tenant_id = $1 and kind = 'poaching_strikes' and key = $2 and state_name = 'LOCKED')
             or (select count(*) from msg_poaching p
                  join msg_messages m on m.tenant_id = p.tenant_id and m.id = p.message_id and m.status in ('blocked', 'forced')
                  where p.tenant_id = $1 and p.sitter_id = $2 and p.sender_role = 'sitter'
                    and p.at > greatest(now() - interval '30 days',
                        coalesce((select max(at) from audit_log a where a.tenant_id = $1 and a.action = 'sitter_unlocked' and a.target = $2), '-infinity'))) >= 3",
    )
    .bind(tenant)
    .bind(sitter_id)
    .fetch_one(conn)
    .await?;
    Ok(locked)
}

/// The client's active thread on a number, created when missing.
pub async fn thread_for(
    conn: &mut PgConnection,
    tenant: Uuid,
    client_id: &str,
    number_id: Uuid,
    sitter_id: Option<&str>,
    scope: &str,
) -> Result<Uuid, sqlx::Error> {
    // One active thread per client and number, even for two first messages at once.
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1::text || '/' || $2 || '/' || $3::text, 0))")
        .bind(tenant)
        .bind(client_id)
        .bind(number_id)
        .execute(&mut *conn)
        .await?;
    let found: Option<(Uuid,)> = sqlx::query_as(
        "select id from msg_threads where tenant_id = $1 and client_id = $2 and number_id = $3 and status = 'active' and scope <> 'meet_and_greet'
          order by created_at limit 1",
    )
    .bind(tenant)
    .bind(client_id)
    .bind(number_id)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((id,)) = found {
        return Ok(id);
    }
    let id = Uuid::now_v7();
    sqlx::query(
        "insert into msg_threads (tenant_id, id, client_id, sitter_id, number_id, scope) values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(tenant)
    .bind(id)
    .bind(client_id)
    .bind(sitter_id)
    .bind(number_id)
    .bind(scope)
    .execute(conn)
    .await?;
    Ok(id)
}

/// An inbound or held message, as stored.
#[allow(missing_docs)] // the columns of `msg_messages`, documented in its migration
pub struct Stored<'a> {
    pub source: &'a str,
    pub thread_id: Option<Uuid>,
    pub direction: &'a str,
    pub sender_role: &'a str,
    pub sitter_id: Option<&'a str>,
    pub from_number: &'a str,
    pub to_number: &'a str,
    pub body: &'a str,
    pub kind: &'a str,
    pub status: &'a str,
    pub reason: Option<&'a str>,
    pub deliver_from: Option<&'a str>,
    pub deliver_to: Option<&'a str>,
}

/// Store a message once per source; `None` when the source was stored before.
pub async fn store_message(
    conn: &mut PgConnection,
    tenant: Uuid,
    m: &Stored<'_>,
) -> Result<Option<Uuid>, sqlx::Error> {
    let id = Uuid::now_v7();
    let r: Option<(Uuid,)> = sqlx::query_as(
        "insert into msg_messages (tenant_id, id, source, thread_id, direction, sender_role, sitter_id, from_number,
                                   to_number, body, kind, status, reason, deliver_from, deliver_to)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
         on conflict (tenant_id, source) do nothing returning id",
    )
    .bind(tenant)
    .bind(id)
    .bind(m.source)
    .bind(m.thread_id)
    .bind(m.direction)
    .bind(m.sender_role)
    .bind(m.sitter_id)
    .bind(m.from_number)
    .bind(m.to_number)
    .bind(m.body)
    .bind(m.kind)
    .bind(m.status)
    .bind(m.reason)
    .bind(m.deliver_from)
    .bind(m.deliver_to)
    .fetch_optional(conn)
    .await?;
    Ok(r.map(|r| r.0))
}

/// One outbound SMS, stored and started as a `message_relay` workflow in the
/// caller's transaction. Idempotent on `source`.
#[allow(clippy::too_many_arguments)]
pub async fn send(
    engine: &Engine,
    conn: &mut PgConnection,
    tenant: Uuid,
    source: &str,
    thread_id: Option<Uuid>,
    sender_role: &str,
    sitter_id: Option<&str>,
    from: &str,
    to: &str,
    body: &str,
    kind: &str,
) -> Result<Option<Uuid>, EngineError> {
    let m = Stored {
        source,
        thread_id,
        direction: "out",
        sender_role,
        sitter_id,
        from_number: from,
        to_number: to,
        body,
        kind,
        status: "queued",
        reason: None,
        deliver_from: Some(from),
        deliver_to: Some(to),
    };
    let Some(id) = store_message(&mut *conn, tenant, &m).await? else {
        return Ok(None);
    };
    engine
        .start_in(
            conn,
            tenant,
            workflows::message_relay::MessageRelay::KIND,
            &id.to_string(),
            &json!({}),
        )
        .await?;
    Ok(Some(id))
}

/// An owner inbox item, once per source.
#[allow(clippy::too_many_arguments)]
pub async fn inbox(
    conn: &mut PgConnection,
    tenant: Uuid,
    source: &str,
    message_id: Option<Uuid>,
    thread_id: Option<Uuid>,
    reason: &str,
    severity: &str,
    detail: Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into msg_inbox (tenant_id, id, source, message_id, thread_id, reason, severity, detail)
         values ($1, $2, $3, $4, $5, $6, $7, $8) on conflict (tenant_id, source) do nothing",
    )
    .bind(tenant)
    .bind(Uuid::now_v7())
    .bind(source)
    .bind(message_id)
    .bind(thread_id)
    .bind(reason)
    .bind(severity)
    .bind(detail)
    .execute(conn)
    .await?;
    Ok(())
}

/// Who is writing.
pub enum Author<'a> {
    /// A known client.
    Client(&'a Client),
    /// An active sitter.
    Sitter(&'a Sitter),
    /// Anyone else (their phone).
    Unknown(&'a str),
}

impl Author<'_> {
    fn role(&self) -> &'static str {
        match self {
            Author::Client(_) => "client",
            Author::Sitter(_) => "sitter",
            Author::Unknown(_) => "unknown",
        }
    }

    fn phone(&self) -> &str {
        match self {
            Author::Client(c) => &c.phone,
            Author::Sitter(s) => &s.phone,
            Author::Unknown(p) => p,
        }
    }

    fn sitter_id(&self) -> Option<&str> {
        match self {
            Author::Sitter(s) => Some(&s.id),
            _ => None,
        }
    }
}

/// The decision for one message.
enum Route {
    /// Relay to `to` from `from`, in `thread`.
    Relay {
        thread: Uuid,
        from: String,
        to: String,
        sitter_id: Option<String>,
    },
    /// Hold for the owner.
    Owner {
        thread: Option<Uuid>,
        reason: &'static str,
        detail: Value,
        auto_reply: Option<&'static str>,
    },
    /// Refuse, telling the sender why.
    Refuse {
        reason: &'static str,
        reply: &'static str,
    },
}

/// Refusal texts, by reason.
fn refusal(reason: &'static str) -> Route {
    let reply = match reason {
        "messaging_locked" => "Your messaging is paused pending a review by the owner. Your message was not delivered.",
        "several_windows" => "You have more than one active booking right now; send this from the app, choosing the client. Your message was not delivered.",
        "billing_front_desk_only" => "Billing is handled by the front desk only. Your message was not delivered.",
        _ => "You can message clients only during your assignment windows. Your message was not delivered.",
    };
    Route::Refuse { reason, reply }
}

/// A pending meet-and-greet the owner opened to its sitter, inside its window now.
struct Meeting {
    thread: Uuid,
    client_phone: String,
    sitter_id: String,
    sitter_phone: String,
}

async fn open_meetings(
    conn: &mut PgConnection,
    tenant: Uuid,
    sitter: Option<&str>,
    client: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Vec<Meeting>, sqlx::Error> {
    let rows: Vec<(Uuid, Value, String, String, String)> = sqlx::query_as(
        "select t.id, w.state, c.phone, s.id, s.phone from msg_threads t
           join workflows w on w.tenant_id = t.tenant_id and w.kind = 'meet_and_greet' and w.key = t.id::text
           join msg_clients c on c.tenant_id = t.tenant_id and c.id = t.client_id
           join msg_sitters s on s.tenant_id = t.tenant_id and s.id = t.sitter_id and s.status = 'active'
          where t.tenant_id = $1 and t.scope = 'meet_and_greet' and t.status = 'active' and w.state_name = 'PENDING'
            and ($2::text is null or t.sitter_id = $2) and ($3::text is null or t.client_id = $3)
          for share of s",
    )
    .bind(tenant)
    .bind(sitter)
    .bind(client)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter(|(_, state, ..)| {
            matches!(serde_json::from_value::<MeetState>(state.clone()), Ok(MeetState::Pending(m)) if m.sitter_may_message_at(now))
        })
        .map(|(thread, _, client_phone, sitter_id, sitter_phone)| Meeting { thread, client_phone, sitter_id, sitter_phone })
        .collect())
}

/// Decide where a sitter's message goes (SMS to `number`, or the app's thread on it).
async fn sitter_route(
    conn: &mut PgConnection,
    tenant: Uuid,
    sitter: &Sitter,
    number: &Number,
    now: DateTime<Utc>,
    client_hint: Option<&str>,
) -> Result<Route, EngineError> {
    if sitter_locked(&mut *conn, tenant, &sitter.id).await? {
        return Ok(refusal("messaging_locked"));
    }
    if number.class == "front_desk" {
        // Meet-and-greet: only a pending meeting the owner opened to the sitter, inside its window.
        let open = open_meetings(&mut *conn, tenant, Some(&sitter.id), client_hint, now).await?;
        return Ok(match open.as_slice() {
            [m] => Route::Relay {
                thread: m.thread,
                from: number.e164.clone(),
                to: m.client_phone.clone(),
                sitter_id: Some(sitter.id.clone()),
            },
            // Writing to the office by SMS reaches the owner; in the app's
            // meet-and-greet thread, outside its window, it is refused.
            [] if client_hint.is_none() => Route::Owner {
                thread: None,
                reason: "from_sitter",
                detail: json!({ "sitter_id": sitter.id }),
                auto_reply: None,
            },
            [] => refusal("outside_window"),
            _ => refusal("several_windows"),
        });
    }
    let windows: Vec<Window> = sitter_windows(&mut *conn, tenant, &sitter.id, Some(number.id), now)
        .await?
        .into_iter()
        .filter(|w| client_hint.is_none_or(|c| c == w.client_id))
        .collect();
    // One client with several overlapping bookings is still one recipient.
    let mut clients: Vec<&Window> = windows.iter().collect();
    clients.dedup_by(|a, b| a.client_id == b.client_id);
    Ok(match clients.as_slice() {
        [w] => Route::Relay {
            thread: thread_for(
                &mut *conn,
                tenant,
                &w.client_id,
                number.id,
                Some(&sitter.id),
                "service",
            )
            .await?,
            from: number.e164.clone(),
            to: w.client_phone.clone(),
            sitter_id: Some(sitter.id.clone()),
        },
        [] => refusal("outside_window"),
        _ => refusal("several_windows"),
    })
}

/// Decide where a client's (or an unknown sender's) message to `number` goes.
async fn client_route(
    conn: &mut PgConnection,
    tenant: Uuid,
    client: Option<&Client>,
    number: &Number,
    now: DateTime<Utc>,
) -> Result<Route, EngineError> {
    let Some(client) = client else {
        let auto_reply = (number.class == "pool").then_some(POOL_AUTO_REPLY);
        return Ok(Route::Owner {
            thread: None,
            reason: "unknown_sender",
            detail: json!({}),
            auto_reply,
        });
    };
    if number.class == "front_desk" {
        // The front desk is the owner's line (inquiries, scheduling, billing):
        // a sitter sees a client's message there only inside a meet-and-greet
        // the owner opened to them.
        let open = open_meetings(&mut *conn, tenant, None, Some(&client.id), now).await?;
        if let [m] = open.as_slice() {
            return Ok(Route::Relay {
                thread: m.thread,
                from: number.e164.clone(),
                to: m.sitter_phone.clone(),
                sitter_id: Some(m.sitter_id.clone()),
            });
        }
        return Ok(Route::Owner {
            thread: Some(
                thread_for(
                    &mut *conn,
                    tenant,
                    &client.id,
                    number.id,
                    None,
                    "front_desk",
                )
                .await?,
            ),
            reason: "front_desk",
            detail: json!({}),
            auto_reply: None,
        });
    }
    if number.class == "pool" {
        // Only a sender mapped to an active thread on this number reaches anyone but the owner.
        let mapped: Option<(Uuid,)> = sqlx::query_as(
            "select id from msg_threads where tenant_id = $1 and number_id = $2 and client_id = $3 and status = 'active' limit 1",
        )
        .bind(tenant)
        .bind(number.id)
        .bind(&client.id)
        .fetch_optional(&mut *conn)
        .await?;
        if mapped.is_none() {
            return Ok(Route::Owner {
                thread: None,
                reason: "pool_sender_not_mapped",
                detail: json!({}),
                auto_reply: Some(POOL_AUTO_REPLY),
            });
        }
    }
    let windows = client_windows(&mut *conn, tenant, &client.id, now).await?;
    let mut sitters: Vec<&Window> = windows.iter().collect();
    sitters.dedup_by(|a, b| a.sitter_id == b.sitter_id && a.number_id == b.number_id);
    Ok(match sitters.as_slice() {
        [w] => Route::Relay {
            thread: thread_for(
                &mut *conn,
                tenant,
                &client.id,
                w.number_id,
                Some(&w.sitter_id),
                "service",
            )
            .await?,
            from: w.number_e164.clone(),
            to: w.sitter_phone.clone(),
            sitter_id: Some(w.sitter_id.clone()),
        },
        [] => Route::Owner {
            thread: Some(match front_desk(&mut *conn, tenant).await? {
                Some(fd) => {
                    thread_for(&mut *conn, tenant, &client.id, fd.id, None, "front_desk").await?
                }
                None => {
                    thread_for(
                        &mut *conn,
                        tenant,
                        &client.id,
                        number.id,
                        None,
                        "front_desk",
                    )
                    .await?
                }
            }),
            reason: if number.class == "front_desk" {
                "front_desk"
            } else {
                "no_active_window"
            },
            detail: json!({}),
            auto_reply: None,
        },
        several => Route::Owner {
            thread: None,
            reason: "several_windows",
            detail: json!({ "choose_from": several.iter().map(|w| json!({
                "booking_id": w.booking_id, "sitter_id": w.sitter_id, "number": w.number_e164 })).collect::<Vec<_>>() }),
            auto_reply: None,
        },
    })
}

/// What became of a message (the intake's outcome name).
pub type Outcome = &'static str;

/// Carry one message through scanning and routing. `number` is locked by the
/// caller's transaction. `source` makes it idempotent.
#[allow(clippy::too_many_arguments)]
pub async fn handle(
    engine: &Engine,
    conn: &mut PgConnection,
    tenant: Uuid,
    source: &str,
    author: Author<'_>,
    number: &Number,
    body: &str,
    client_hint: Option<&str>,
    hold: Option<(&'static str, Value)>,
) -> Result<Outcome, EngineError> {
    let exists: Option<(Uuid,)> =
        sqlx::query_as("select id from msg_messages where tenant_id = $1 and source = $2")
            .bind(tenant)
            .bind(source)
            .fetch_optional(&mut *conn)
            .await?;
    if exists.is_some() {
        return Ok("duplicate");
    }
    let now = db_now(&mut *conn).await?;
    // Relays switched off for the tenant (`flags.message_relay = false`, read
    // in this transaction): nothing goes out; every message waits for the owner.
    let config = crate::store::tenants::config(&mut *conn, tenant).await?;
    let hold = if config
        .pointer("/flags/message_relay")
        .and_then(Value::as_bool)
        == Some(false)
    {
        Some(("relays_switched_off", json!({})))
    } else {
        hold
    };
    let held = hold.is_some();
    let route = match &author {
        // Held for the owner whoever wrote it (e.g. a picture message).
        _ if hold.is_some() => {
            let (reason, detail) = hold.unwrap_or_default();
            Route::Owner {
                thread: None,
                reason,
                detail,
                auto_reply: None,
            }
        }
        Author::Sitter(s) => sitter_route(&mut *conn, tenant, s, number, now, client_hint).await?,
        Author::Client(c) => client_route(&mut *conn, tenant, Some(c), number, now).await?,
        Author::Unknown(_) => client_route(&mut *conn, tenant, None, number, now).await?,
    };
    let role = author.role();
    let sender_phone = author.phone().to_string();
    let mut stored = Stored {
        source,
        thread_id: None,
        direction: "in",
        sender_role: role,
        sitter_id: author.sitter_id(),
        from_number: &sender_phone,
        to_number: &number.e164,
        body,
        kind: "service",
        status: "",
        reason: None,
        deliver_from: None,
        deliver_to: None,
    };
    // Every attempt counts, wherever the message was going (a sitter, the
    // owner, or nowhere): fail closed, a scan error blocks.
    // Every message is scanned, whatever its route (fail closed: a scan error
    // counts as a finding). Only a relay is blocked, warned and struck; a
    // message for the owner (or refused) keeps its route, and the attempt is
    // logged and flagged.
    let findings = match scan::scan(body) {
        Ok(s) if s.verdict == scan::Verdict::Allow => None,
        Ok(s) => Some(json!(s.findings)),
        Err(e) => Some(json!([{ "kind": "scan_error", "error": e.to_string() }])),
    };
    if let (
        Some(findings),
        false,
        Route::Relay {
            thread,
            from,
            to,
            sitter_id,
        },
    ) = (&findings, held, &route)
    {
        // Where it would have gone, for the owner's force-send.
        let blocked = Stored {
            deliver_from: Some(from),
            deliver_to: Some(to),
            thread_id: Some(*thread),
            sitter_id: sitter_id.as_deref(),
            status: "blocked",
            reason: Some("poaching"),
            ..stored
        };
        let id = store_message(&mut *conn, tenant, &blocked)
            .await?
            .ok_or(EngineError::NotFound)?;
        log_attempt(
            &mut *conn,
            tenant,
            id,
            Some(*thread),
            role,
            sitter_id.as_deref(),
            findings,
            "poaching_blocked",
        )
        .await?;
        warn_and_strike(
            engine,
            conn,
            tenant,
            id,
            Some(*thread),
            author.sitter_id(),
            &number.e164,
            &sender_phone,
        )
        .await?;
        return Ok("blocked");
    }
    match route {
        Route::Refuse { reason, reply } => {
            stored.status = "refused";
            stored.reason = Some(reason);
            let id = store_message(&mut *conn, tenant, &stored)
                .await?
                .ok_or(EngineError::NotFound)?;
            if let Some(f) = &findings {
                log_attempt(
                    &mut *conn,
                    tenant,
                    id,
                    None,
                    role,
                    author.sitter_id(),
                    f,
                    "poaching_attempt",
                )
                .await?;
            }
            send(
                engine,
                conn,
                tenant,
                &format!("{id}:refusal"),
                None,
                "system",
                None,
                &number.e164,
                &sender_phone,
                reply,
                "notice",
            )
            .await?;
            Ok("refused")
        }
        Route::Owner {
            thread,
            reason,
            detail,
            auto_reply,
        } => {
            stored.status = "routed_to_owner";
            stored.reason = Some(reason);
            stored.thread_id = thread;
            let id = store_message(&mut *conn, tenant, &stored)
                .await?
                .ok_or(EngineError::NotFound)?;
            if let Some(f) = &findings {
                log_attempt(
                    &mut *conn,
                    tenant,
                    id,
                    thread,
                    role,
                    author.sitter_id(),
                    f,
                    "poaching_attempt",
                )
                .await?;
            }
            inbox(
                &mut *conn,
                tenant,
                &format!("message:{id}"),
                Some(id),
                thread,
                reason,
                "normal",
                detail,
            )
            .await?;
            if let Some(text) = auto_reply {
                send(
                    engine,
                    conn,
                    tenant,
                    &format!("{id}:auto_reply"),
                    None,
                    "system",
                    None,
                    &number.e164,
                    &sender_phone,
                    text,
                    "notice",
                )
                .await?;
            }
            Ok("routed_to_owner")
        }
        Route::Relay {
            thread,
            from,
            to,
            sitter_id,
        } => {
            stored.thread_id = Some(thread);
            stored.deliver_from = Some(&from);
            stored.deliver_to = Some(&to);
            // The sitter of the conversation, whoever wrote (what the sitter's views show).
            stored.sitter_id = sitter_id.as_deref();
            stored.status = "relayed";
            let id = store_message(&mut *conn, tenant, &stored)
                .await?
                .ok_or(EngineError::NotFound)?;
            send(
                engine,
                conn,
                tenant,
                &format!("{id}:relay"),
                Some(thread),
                role,
                sitter_id.as_deref(),
                &from,
                &to,
                body,
                "service",
            )
            .await?;
            Ok("relayed")
        }
    }
}

/// Log a poaching attempt (message, thread, sender role, sitter) and flag it
/// in the owner's inbox (`reason`: `poaching_blocked`, or `poaching_attempt`
/// for a message that was going to the owner anyway).
#[allow(clippy::too_many_arguments)]
async fn log_attempt(
    conn: &mut PgConnection,
    tenant: Uuid,
    message_id: Uuid,
    thread: Option<Uuid>,
    role: &str,
    sitter: Option<&str>,
    findings: &Value,
    reason: &str,
) -> Result<(), EngineError> {
    sqlx::query(
        "insert into msg_poaching (tenant_id, id, message_id, thread_id, sender_role, sitter_id, findings)
         values ($1, $2, $3, $4, $5, $6, $7) on conflict do nothing",
    )
    .bind(tenant)
    .bind(Uuid::now_v7())
    .bind(message_id)
    .bind(thread)
    .bind(role)
    .bind(sitter)
    .bind(findings)
    .execute(&mut *conn)
    .await?;
    inbox(
        &mut *conn,
        tenant,
        &format!("poaching:{message_id}"),
        Some(message_id),
        thread,
        reason,
        "normal",
        json!({ "sender_role": role, "sitter_id": sitter, "findings": findings }),
    )
    .await?;
    Ok(())
}

/// A blocked relay: warn the sender, and count a sitter's strike.
#[allow(clippy::too_many_arguments)]
async fn warn_and_strike(
    engine: &Engine,
    conn: &mut PgConnection,
    tenant: Uuid,
    message_id: Uuid,
    thread: Option<Uuid>,
    striking_sitter: Option<&str>,
    warn_from: &str,
    warn_to: &str,
) -> Result<(), EngineError> {
    let warning = "Your message was not delivered: sharing phone numbers, emails, links or social handles is not allowed here. Please keep the conversation on this number.";
    send(
        engine,
        conn,
        tenant,
        &format!("{message_id}:warning"),
        thread,
        "system",
        None,
        warn_from,
        warn_to,
        warning,
        "notice",
    )
    .await?;
    if let Some(sitter) = striking_sitter {
        use workflows::poaching_strikes::PoachingStrikes;
        // With the strikes workflow switched off for the tenant the attempt
        // still counts: `sitter_locked` also reads the attempts log.
        let started = engine
            .start_in(
                &mut *conn,
                tenant,
                PoachingStrikes::KIND,
                sitter,
                &json!({}),
            )
            .await;
        match started {
            Err(EngineError::LayerDisabled(_)) => return Ok(()),
            other => {
                other?;
            }
        }
        engine
            .signal_in(
                conn,
                SignalIn::new(
                    tenant,
                    PoachingStrikes::KIND,
                    sitter,
                    &format!("strike:{message_id}"),
                    "strike",
                    &json!({ "message_id": message_id.to_string() }),
                    &Actor::system(),
                )
                .roles_checked(false),
            )
            .await?;
    }
    Ok(())
}

/// A Twilio SMS to one of the tenant's masked numbers: route it. `None` when
/// the number is not one of them (the chat-command intake handles it).
pub async fn inbound(
    engine: &Engine,
    tenant: Uuid,
    event_id: &str,
    payload: &Value,
) -> Result<Option<Outcome>, EngineError> {
    let (Some(to), Some(from)) = (payload["To"].as_str(), payload["From"].as_str()) else {
        return Ok(None);
    };
    // What is stored is what is scanned and relayed: no NULs, at most 10,000 characters.
    let body: String = payload["Body"]
        .as_str()
        .unwrap_or("")
        .chars()
        .filter(|c| *c != '\0')
        .take(10_000)
        .collect();
    let mut tx = engine.pool().begin().await?;
    let Some(number) = number_by_e164(&mut tx, tenant, to).await? else {
        return Ok(None);
    };
    let sitter = active_sitter_by_phone(&mut tx, tenant, from).await?;
    let client = client_by_phone(&mut tx, tenant, from).await?;
    let author = match (&sitter, &client) {
        (Some(s), _) => Author::Sitter(s),
        (None, Some(c)) => Author::Client(c),
        (None, None) => Author::Unknown(from),
    };
    let source = format!("twilio:{event_id}");
    // Pictures cannot be scanned for contact details: a picture message (or
    // an empty one) goes to the owner, with its media links, never relayed.
    let media: Vec<Value> = (0..10)
        .filter_map(|i| payload[format!("MediaUrl{i}")].as_str().map(Value::from))
        .collect();
    let has_media = !media.is_empty()
        || payload["NumMedia"]
            .as_str()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
            > 0;
    let hold = (has_media || body.trim().is_empty())
        .then(|| ("media_not_relayed", json!({ "media": media })));
    let outcome = handle(
        engine, &mut tx, tenant, &source, author, &number, &body, None, hold,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(outcome, number.class = %number.class, "masked-number message routed");
    Ok(Some(outcome))
}
