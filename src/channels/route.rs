//! From an effect to messages: what to say (rendered from typed views, never
//! from free text), to whom (tenant config and the people registry), over which
//! provider — then send through the ledger, paced by the shared rate limits.
//!
//! Choices where DOMAIN.md is silent:
//! - The crew channel is `dispatch.crew.provider` (`telegram` → the group
//!   `crew.chat_id`; `whatsapp` → 1:1 to every registered executor with a
//!   phone, since groups cannot be posted to); unset → the `log` channel.
//! - Edits of a crew post go to the provider and chat the post was published on.
//!   WhatsApp messages cannot be edited: the update goes out as a new message.
//! - The operator is reached at `dispatch.operator.provider` (`telegram`,
//!   `whatsapp`, `sms`, `email`) and `dispatch.operator.to`; unset → `log`.
//! - An executor is reached privately on Telegram when the tenant has a bot and
//!   the person a Telegram id, else WhatsApp, SMS, email by what is configured
//!   and known; else `log`.
//! - A tenant without a provider keeps working on the `log` channel.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgConnection;
use uuid::Uuid;
use workflows::dispatch::effects as dispatch_effects;
use workflows::lead::{short_id, FullLead};
use workflows::lead_finalization::effects as lead_effects;

use super::email::Email;
use super::telegram::{claim_button, Telegram};
use super::twilio::Twilio;
use super::whatsapp::WhatsApp;
use super::{pace, provider, wait_for_slot, ChannelError, LogEntry, RateConfig, Sent};
use crate::store::drivers;
use crate::store::effects::EffectRow;
use crate::store::providers::{self, Person};
use crate::store::{deliveries, tenants, workflows as wf_store};
use workflows::driver_registration::effects as registration_effects;
use workflows::route_dispatch::effects as route_effects;

/// Longest wait for a slot reserved by an earlier, deferred attempt (the
/// deferred job wakes about 2 s early).
const SLOT_WAIT: Duration = Duration::from_secs(10);

use crate::engine::SIGNAL_REPLY;

/// Who a message is for.
#[derive(Debug, Clone, PartialEq)]
enum Audience {
    Crew,
    Operator,
    Executor(String),
    /// A driver, on one channel (`telegram` or `email`).
    Driver(String, &'static str),
    /// Only the built-in log channel.
    Log(String),
    Origin(Value),
}

/// A rendered message.
#[derive(Debug, Clone)]
struct Message {
    audience: Audience,
    text: String,
    subject: String,
    protect: bool,
    claim_button: Option<String>,
    /// Telegram reply markup other than the claim button.
    markup: Option<Value>,
    /// A file sent with an email (name, content type, bytes).
    attachment: Option<(String, &'static str, Vec<u8>)>,
    /// Edit this crew post instead of sending a new message.
    edit: Option<Post>,
}

#[derive(Debug, Clone)]
struct Post {
    provider: String,
    chat_id: String,
    message_id: String,
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq)]
enum Dest {
    Log(String),
    Telegram {
        chat_id: String,
        reply_to: Option<i64>,
        callback: Option<String>,
    },
    WhatsApp(Vec<String>),
    Sms(String),
    Email(String),
}

/// Delivers effects. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    http: reqwest::Client,
    horizon: Duration,
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl crate::delivery::Deliver for Router {
    fn deliver<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        effect: &'a EffectRow,
        config: Option<&'a Value>,
        send_after: Option<DateTime<Utc>>,
    ) -> futures::future::BoxFuture<'a, Result<Sent, ChannelError>> {
        Box::pin(Router::deliver(self, conn, effect, config, send_after))
    }
}

impl Router {
    /// A router with its own HTTP client.
    pub fn new() -> Self {
        Router {
            http: super::http_client(),
            horizon: Duration::from_secs(3),
        }
    }

    /// Deliver one effect attempt. `config` is the tenant's configuration
    /// when the caller read it already (a batch reads each tenant's once);
    /// `send_after` is a slot reserved by an earlier attempt that was
    /// deferred by the rate limit.
    pub async fn deliver(
        &self,
        conn: &mut PgConnection,
        effect: &EffectRow,
        config: Option<&Value>,
        send_after: Option<DateTime<Utc>>,
    ) -> Result<Sent, ChannelError> {
        let config = match config {
            Some(c) => std::borrow::Cow::Borrowed(c),
            None => std::borrow::Cow::Owned(tenants::config(&mut *conn, effect.tenant_id).await?),
        };
        let config = config.as_ref();
        inject_failure(config, effect)?;
        if effect.name == registration_effects::BIND_CHAT {
            // Local: the driver's chat is stored; nothing is sent.
            let (Some(driver), Some(chat)) = (
                str_field(&effect.payload, "driver_id"),
                effect.payload["chat_id"].as_i64(),
            ) else {
                return Err(ChannelError::permanent("bind payload incomplete"));
            };
            if !drivers::bind_chat(conn, effect.tenant_id, driver, chat).await? {
                return Err(ChannelError::permanent("the driver no longer exists"));
            }
            return Ok(Sent::done(json!({ "bound": true })));
        }
        let mut message = render(conn, effect, config).await?;
        gate(effect, &message)?;
        if message.edit.is_none() {
            if let Some(publish_key) = str_field(&effect.payload, "publish_key") {
                // Cancelled before the post was known: edit it once it exists.
                match published_post(conn, effect, publish_key).await? {
                    Some(post) => message.edit = Some(post),
                    None => return Ok(Sent::done(json!({ "skipped": "nothing was published" }))),
                }
            }
        }
        if message.edit.is_some() && superseded(conn, effect).await? {
            // A later edit of the same post already landed: a late retry of
            // this one must not put the post back in an older state.
            return Ok(Sent::done(
                json!({ "skipped": "superseded by a later edit" }),
            ));
        }
        let dest = resolve(conn, effect.tenant_id, config, &message).await?;
        let rate = RateConfig::from_tenant(config);
        self.send(conn, effect, &message, dest, &rate, send_after)
            .await
    }

    async fn send(
        &self,
        conn: &mut PgConnection,
        effect: &EffectRow,
        m: &Message,
        dest: Dest,
        rate: &RateConfig,
        send_after: Option<DateTime<Utc>>,
    ) -> Result<Sent, ChannelError> {
        let tenant = effect.tenant_id;
        let key = &effect.idempotency_key;
        let result = match dest {
            Dest::Log(recipient) => {
                // The ledger row is the message: written with the outcome. Its
                // id replaces this placeholder then.
                return Ok(Sent {
                    result: json!({ "message_id": null, "provider": "log", "chat_id": recipient }),
                    log: Some(LogEntry {
                        recipient,
                        body: m.text.clone(),
                    }),
                });
            }
            Dest::Telegram {
                chat_id,
                reply_to,
                callback,
            } => {
                if let Some(id) = deliveries::get(conn, tenant, "telegram", key).await? {
                    return Ok(Sent::done(
                        json!({ "message_id": id, "provider": "telegram", "chat_id": chat_id }),
                    ));
                }
                let row = provider(conn, tenant, "telegram").await?;
                let tg = Telegram::new(&self.http, &row)?;
                let markup = m
                    .markup
                    .clone()
                    .or_else(|| m.claim_button.as_deref().map(claim_button));
                let message_id = if let Some(cb) = callback {
                    // Button answers are not messages: not rate limited.
                    tg.answer_callback_query(&cb, &m.text).await?;
                    format!("callback:{cb}")
                } else {
                    let limits = tg.limits(&chat_id, rate);
                    match send_after {
                        // A deferred attempt kept its reserved slot.
                        Some(at) => wait_for_slot(conn, at, SLOT_WAIT).await?,
                        None => pace(conn, tenant, &limits, self.horizon).await?,
                    }
                    match &m.edit {
                        Some(post) => {
                            tg.edit_message_text(&chat_id, &post.message_id, &m.text, markup)
                                .await?;
                            post.message_id.clone()
                        }
                        None => {
                            tg.send_message(&chat_id, &m.text, markup, m.protect, reply_to)
                                .await?
                        }
                    }
                };
                let id = deliveries::insert(
                    conn,
                    tenant,
                    effect.id,
                    "telegram",
                    key,
                    &chat_id,
                    &effect.payload,
                    &m.text,
                    Some(&message_id),
                )
                .await?;
                json!({ "message_id": id, "provider": "telegram", "chat_id": chat_id })
            }
            Dest::WhatsApp(phones) => {
                let row = provider(conn, tenant, "whatsapp").await?;
                let wa = WhatsApp::new(&self.http, &row)?;
                let mut first = None;
                let mut slot = send_after;
                let (mut transient, mut permanent) = (None, Vec::new());
                for phone in &phones {
                    // One ledger row per recipient: a retry resumes the broadcast.
                    let k = if phones.len() == 1 && m.audience != Audience::Crew {
                        key.clone()
                    } else {
                        format!("{key}:{phone}")
                    };
                    let id = match deliveries::get(conn, tenant, "whatsapp", &k).await? {
                        Some(id) => id,
                        None => {
                            match slot.take() {
                                Some(at) => wait_for_slot(conn, at, SLOT_WAIT).await?,
                                None => pace(conn, tenant, &wa.limits(rate), self.horizon).await?,
                            }
                            let open = providers::whatsapp_window_open(conn, tenant, phone).await?;
                            let sent = match wa
                                .send(phone, &m.text, open, m.claim_button.as_deref())
                                .await
                            {
                                Ok(sent) => sent,
                                // One unreachable number must not keep the job from the others.
                                Err(e @ ChannelError::Permanent { .. }) => {
                                    permanent.push(e);
                                    continue;
                                }
                                Err(e) => {
                                    transient = Some(e);
                                    continue;
                                }
                            };
                            deliveries::insert(
                                conn,
                                tenant,
                                effect.id,
                                "whatsapp",
                                &k,
                                phone,
                                &effect.payload,
                                &m.text,
                                Some(&sent),
                            )
                            .await?
                        }
                    };
                    first.get_or_insert(id);
                }
                if let Some(e) = transient {
                    // The retry resends only to those not in the ledger yet.
                    return Err(e);
                }
                let Some(first) = first else {
                    return Err(permanent
                        .pop()
                        .unwrap_or_else(|| ChannelError::permanent("no recipient")));
                };
                if !permanent.is_empty() {
                    tracing::warn!(
                        failed = permanent.len(),
                        "whatsapp broadcast: some recipients are unreachable"
                    );
                }
                let chat_id = if m.audience == Audience::Crew {
                    "broadcast".to_string()
                } else {
                    phones.join(",")
                };
                json!({ "message_id": first, "provider": "whatsapp", "chat_id": chat_id, "unreachable": permanent.len() })
            }
            Dest::Sms(to) => {
                if let Some(id) = deliveries::get(conn, tenant, "twilio", key).await? {
                    return Ok(Sent::done(
                        json!({ "message_id": id, "provider": "twilio", "chat_id": to }),
                    ));
                }
                let row = provider(conn, tenant, "twilio").await?;
                let sid = Twilio::new(&self.http, &row)?.send(&to, &m.text).await?;
                let id = deliveries::insert(
                    conn,
                    tenant,
                    effect.id,
                    "twilio",
                    key,
                    &to,
                    &effect.payload,
                    &m.text,
                    Some(&sid),
                )
                .await?;
                json!({ "message_id": id, "provider": "twilio", "chat_id": to })
            }
            Dest::Email(to) => {
                let (name, row) = email_provider(conn, tenant).await?;
                if let Some(id) = deliveries::get(conn, tenant, name, key).await? {
                    return Ok(Sent::done(
                        json!({ "message_id": id, "provider": name, "chat_id": to }),
                    ));
                }
                let sent = Email::new(&self.http, name, &row)?
                    .send(&to, &m.subject, &m.text, key, m.attachment.as_ref())
                    .await?;
                let id = deliveries::insert(
                    conn,
                    tenant,
                    effect.id,
                    name,
                    key,
                    &to,
                    &effect.payload,
                    &m.text,
                    Some(&sent),
                )
                .await?;
                json!({ "message_id": id, "provider": name, "chat_id": to })
            }
        };
        Ok(Sent::done(result))
    }

    /// Send a one-off reply to a chat sender outside any workflow (an unknown
    /// sender's polite answer), deduplicated by `key`.
    pub async fn reply_direct(
        &self,
        conn: &mut PgConnection,
        tenant_id: Uuid,
        origin: &Value,
        text: &str,
        key: &str,
    ) -> Result<(), ChannelError> {
        let dest = origin_dest(origin)?;
        let effect = EffectRow::direct(tenant_id, key);
        let m = Message {
            audience: Audience::Origin(origin.clone()),
            text: text.to_string(),
            subject: "Dispatch".into(),
            protect: false,
            claim_button: None,
            markup: None,
            attachment: None,
            edit: None,
        };
        let config = tenants::config(&mut *conn, tenant_id).await?;
        // A one-off reply has no outbox row to keep a reserved slot across a
        // deferral, so it waits for its slot here (a busy group allows 20 a minute).
        let patient = Router {
            http: self.http.clone(),
            horizon: Duration::from_secs(30),
        };
        let sent = patient
            .send(
                conn,
                &effect,
                &m,
                dest,
                &RateConfig::from_tenant(&config),
                None,
            )
            .await?;
        if let Some(log) = sent.log {
            log.write(conn, &effect).await?;
        }
        Ok(())
    }
}

async fn email_provider(
    conn: &mut PgConnection,
    tenant: Uuid,
) -> Result<(&'static str, providers::ProviderRow), ChannelError> {
    for name in ["resend", "sendgrid"] {
        if let Some(row) = providers::get(conn, tenant, name).await? {
            return Ok((name, row));
        }
    }
    Err(ChannelError::permanent(
        "no email provider is configured for this tenant",
    ))
}

/// Testing aid kept from the log channel: tenant config
/// `{"log_channel": {"fail_first": N, "failure": "transient"|"permanent"}}`
/// fails the first N attempts of every effect.
fn inject_failure(config: &Value, effect: &EffectRow) -> Result<(), ChannelError> {
    if let Some(n) = config
        .pointer("/log_channel/fail_first")
        .and_then(Value::as_i64)
    {
        if i64::from(effect.attempts) <= n {
            let message = format!(
                "log channel: injected failure on attempt {}",
                effect.attempts
            );
            return Err(
                match config
                    .pointer("/log_channel/failure")
                    .and_then(Value::as_str)
                {
                    Some("permanent") => ChannelError::Permanent { message },
                    _ => ChannelError::Transient {
                        message,
                        retry_after: None,
                    },
                },
            );
        }
    }
    Ok(())
}

/// Whether the tenant has any messaging provider configured.
async fn has_any_provider(conn: &mut PgConnection, tenant: Uuid) -> Result<bool, ChannelError> {
    let (any,): (bool,) =
        sqlx::query_as("select exists (select 1 from provider_settings where tenant_id = $1)")
            .bind(tenant)
            .fetch_one(conn)
            .await?;
    Ok(any)
}

/// Whether a later crew-post edit of this workflow was already delivered.
async fn superseded(conn: &mut PgConnection, effect: &EffectRow) -> Result<bool, ChannelError> {
    let (later,): (bool,) = sqlx::query_as(
        "select exists (select 1 from effects where tenant_id = $1 and workflow_id = $2
                          and name like 'crew\\_post\\_%' and status = 'delivered' and created_at > $3)",
    )
    .bind(effect.tenant_id)
    .bind(effect.workflow_id)
    .bind(effect.created_at)
    .fetch_one(conn)
    .await?;
    Ok(later)
}

/// The post a publish effect made: from the ledger once sent; a publish still
/// pending or running is waited for (transient); one that never went out
/// (dead) leaves nothing to edit.
async fn published_post(
    conn: &mut PgConnection,
    effect: &EffectRow,
    publish_key: &str,
) -> Result<Option<Post>, ChannelError> {
    let sent: Option<(String, String, String)> = sqlx::query_as(
        "select channel, recipient, coalesce(provider_message_id, id::text) from deliveries
         where tenant_id = $1 and (idempotency_key = $2 or idempotency_key like $2 || ':%')
         order by delivered_at limit 1",
    )
    .bind(effect.tenant_id)
    .bind(publish_key)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((provider, chat_id, message_id)) = sent {
        return Ok(Some(Post {
            provider,
            chat_id,
            message_id,
        }));
    }
    let status: Option<(String,)> = sqlx::query_as("select status from effects where tenant_id = $1 and workflow_id = $2 and idempotency_key = $3")
        .bind(effect.tenant_id)
        .bind(effect.workflow_id)
        .bind(publish_key)
        .fetch_optional(&mut *conn)
        .await?;
    match status.as_ref().map(|s| s.0.as_str()) {
        Some("pending") | Some("running") => Err(ChannelError::transient(
            "waiting for the crew post to be published",
        )),
        _ => Ok(None),
    }
}

fn str_field<'a>(p: &'a Value, name: &str) -> Option<&'a str> {
    p.get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

async fn load_lead(conn: &mut PgConnection, effect: &EffectRow) -> Result<FullLead, ChannelError> {
    let input = wf_store::input(&mut *conn, effect.tenant_id, effect.workflow_id)
        .await?
        .ok_or_else(|| ChannelError::permanent("workflow input missing"))?;
    serde_json::from_value::<FullLead>(input.get("lead").cloned().unwrap_or_default())
        .map_err(|_| ChannelError::permanent("stored lead does not decode"))
}

/// How an executor is shown to others: @username, else display name, else id.
async fn handle(
    conn: &mut PgConnection,
    tenant: Uuid,
    executor: &str,
) -> Result<String, ChannelError> {
    let person = providers::person(conn, tenant, executor).await?;
    let username = |u: &str| {
        (3..=64).contains(&u.len())
            && u.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    };
    let shown = match person {
        Some(Person {
            telegram_username: Some(u),
            ..
        }) if username(&u) => format!("@{u}"),
        Some(p) => p.display_name,
        None if username(executor) => format!("@{executor}"),
        None => String::new(),
    };
    // A name that reads as contact details is not repeated to the crew.
    let plain = !shown.is_empty()
        && crate::crew::check(&shown, shown.starts_with('@'), |_| String::new()).is_ok();
    Ok(if plain { shown } else { "a crew member".into() })
}

/// The second check (see [`crate::crew`]): whatever a crew or a driver will
/// read passes the detector right before it is sent. A hit fails the effect
/// permanently, so ops see it and nothing reaches the chat.
fn gate(effect: &EffectRow, m: &Message) -> Result<(), ChannelError> {
    let name = effect.name.as_str();
    let claim_notice = name == dispatch_effects::CREW_POST_RESERVED
        || name == dispatch_effects::NOTIFY_OPERATOR_CLAIMED;
    // Driver messages are checked field by field in `render_courier`.
    let crew_visible = m.audience == Audience::Crew
        || name == lead_effects::NOTIFY_OPERATOR_CREW_FALLBACK
        || claim_notice;
    if !crew_visible {
        return Ok(());
    }
    crate::crew::check(&m.text, claim_notice, |_| format!("{name} text"))
        .map_err(|e| ChannelError::permanent(format!("not sent: {e}")))
}

/// The checked crew post (see [`crate::crew`]): refused, never scrubbed.
fn crew_post(lead_id: Uuid, lead: &FullLead, config: &Value) -> Result<String, ChannelError> {
    crate::crew::crew_post(lead_id, lead, config, false)
        .map_err(|e| ChannelError::permanent(format!("crew post refused: {e}")))
}

async fn render(
    conn: &mut PgConnection,
    effect: &EffectRow,
    config: &Value,
) -> Result<Message, ChannelError> {
    let p = &effect.payload;
    let tenant = effect.tenant_id;
    if effect.name == SIGNAL_REPLY {
        let origin = p.get("origin").cloned().unwrap_or(Value::Null);
        return Ok(Message {
            audience: Audience::Origin(origin),
            text: reply_text(p),
            subject: "Dispatch".into(),
            protect: false,
            claim_button: None,
            markup: None,
            attachment: None,
            edit: None,
        });
    }
    if let Some(m) = render_courier(conn, effect).await? {
        return Ok(m);
    }
    if effect.name == workflows::bench_chain::effects::STEP {
        // The benchmark's workload: a small message to the log channel.
        return Ok(Message {
            audience: Audience::Log("bench".into()),
            text: format!("bench step {}", effect.payload["step"]),
            subject: "bench".into(),
            protect: false,
            claim_button: None,
            markup: None,
            attachment: None,
            edit: None,
        });
    }
    let lead_id: Uuid = str_field(p, "lead_id")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ChannelError::permanent("effect payload has no lead_id"))?;
    let short = short_id(lead_id);
    let executor = str_field(p, "executor")
        .or(str_field(p, "to"))
        .unwrap_or("")
        .to_string();
    let post = str_field(p, "message_id").map(|m| Post {
        provider: str_field(p, "provider").unwrap_or("log").to_string(),
        chat_id: str_field(p, "chat_id").unwrap_or("crew").to_string(),
        message_id: m.to_string(),
    });
    let m = |audience, text: String| Message {
        audience,
        text,
        subject: format!("Job #{short}"),
        protect: false,
        claim_button: None,
        markup: None,
        attachment: None,
        edit: None,
    };
    Ok(match effect.name.as_str() {
        dispatch_effects::PUBLISH => Message {
            claim_button: Some(short.clone()),
            ..m(
                Audience::Crew,
                crew_post(lead_id, &load_lead(conn, effect).await?, config)?,
            )
        },
        dispatch_effects::CREW_POST_RESERVED => Message {
            edit: post,
            ..m(
                Audience::Crew,
                format!(
                    "Job #{short} — Reserved by {}",
                    handle(conn, tenant, &executor).await?
                ),
            )
        },
        dispatch_effects::CREW_POST_RESTORED => Message {
            edit: post,
            claim_button: Some(short.clone()),
            ..m(
                Audience::Crew,
                crew_post(lead_id, &load_lead(conn, effect).await?, config)?,
            )
        },
        dispatch_effects::CREW_POST_CANCELLED => Message {
            edit: post,
            ..m(Audience::Crew, format!("Job #{short} — Cancelled"))
        },
        dispatch_effects::CREW_POST_EXPIRED => Message {
            edit: post,
            ..m(
                Audience::Crew,
                format!("Job #{short} — Expired (not claimed in time)"),
            )
        },
        dispatch_effects::NOTIFY_OPERATOR_CLAIMED => m(
            Audience::Operator,
            format!(
                "Job #{short} was claimed by {}. Confirm or reject the claim.",
                handle(conn, tenant, &executor).await?
            ),
        ),
        dispatch_effects::RELEASE_DETAILS => Message {
            protect: true,
            ..m(
                Audience::Executor(executor.clone()),
                load_lead(conn, effect).await?.render_full(lead_id),
            )
        },
        lead_effects::NOTIFY_OPERATOR_FULL => Message {
            protect: true,
            ..m(
                Audience::Operator,
                load_lead(conn, effect).await?.render_full(lead_id),
            )
        },
        lead_effects::NOTIFY_OPERATOR_CREW_FALLBACK => m(
            Audience::Operator,
            crew_post(lead_id, &load_lead(conn, effect).await?, config)?,
        ),
        _ => return Err(ChannelError::permanent("no renderer for this effect")),
    })
}

/// Messages of the courier workflows (route dispatch, driver registration);
/// `None` for other effects.
async fn render_courier(
    conn: &mut PgConnection,
    effect: &EffectRow,
) -> Result<Option<Message>, ChannelError> {
    let name = effect.name.as_str();
    if ![
        registration_effects::REGISTRATION_EMAIL,
        route_effects::TELEGRAM,
        route_effects::EMAIL,
    ]
    .contains(&name)
    {
        return Ok(None);
    }
    let driver_id = str_field(&effect.payload, "driver_id")
        .ok_or_else(|| ChannelError::permanent("effect payload has no driver_id"))?
        .to_string();
    let input = wf_store::input(&mut *conn, effect.tenant_id, effect.workflow_id)
        .await?
        .ok_or_else(|| ChannelError::permanent("workflow input missing"))?;
    let base = |audience, subject: String, text: String| Message {
        audience,
        text,
        subject,
        protect: false,
        claim_button: None,
        markup: None,
        attachment: None,
        edit: None,
    };
    if name == registration_effects::REGISTRATION_EMAIL {
        let link = str_field(&input, "link")
            .ok_or_else(|| ChannelError::permanent("registration link missing"))?;
        let driver = drivers::get(conn, effect.tenant_id, &driver_id)
            .await?
            .ok_or_else(|| ChannelError::permanent("the driver no longer exists"))?;
        let expires = str_field(&input, "expires_at").unwrap_or("soon");
        let png = super::qr::qr_png(link)
            .map_err(|e| ChannelError::permanent(format!("QR code: {e}")))?;
        let text = format!(
            "Hello {},\n\nTo receive your route assignments on Telegram, open this link on your phone and press Start:\n\n{link}\n\nOr scan the attached QR code with your phone's camera. The link works once and expires at {expires} (UTC).\n",
            driver.name
        );
        return Ok(Some(Message {
            attachment: Some(("telegram-registration.png".into(), "image/png", png)),
            ..base(
                Audience::Driver(driver_id, "email"),
                "Register for route assignments on Telegram".into(),
                text,
            )
        }));
    }
    let route = &input["route"];
    let reference = str_field(route, "reference").unwrap_or("");
    let date = str_field(route, "date")
        .map(|d| format!(" — {d}"))
        .unwrap_or_default();
    let body = str_field(route, "text").unwrap_or("");
    // The second check of what a driver reads (the first ran when the
    // dispatch was accepted): the route's own fields, not our wording around them.
    for (field, text) in [
        ("route.reference", reference),
        ("route.date", str_field(route, "date").unwrap_or("")),
        ("route.text", body),
    ] {
        crate::crew::check(text, false, |_| field.to_string())
            .map_err(|e| ChannelError::permanent(format!("not sent: {e}")))?;
    }
    let subject = format!("Route {reference}{date}");
    if name == route_effects::TELEGRAM {
        let ack = json!({ "inline_keyboard": [[{
            "text": "Acknowledge", "callback_data": format!("ack:{}", effect.workflow_id)
        }]] });
        return Ok(Some(Message {
            markup: Some(ack),
            ..base(
                Audience::Driver(driver_id, "telegram"),
                subject.clone(),
                format!("{subject}\n\n{body}"),
            )
        }));
    }
    Ok(Some(base(
        Audience::Driver(driver_id, "email"),
        subject.clone(),
        format!("{subject}\n\n{body}\n\nPlease acknowledge this route with the button in Telegram, or tell the office.\n"),
    )))
}

/// Where a driver is reached on one channel.
async fn driver_dest(
    conn: &mut PgConnection,
    tenant: Uuid,
    id: &str,
    channel: &str,
) -> Result<Dest, ChannelError> {
    let driver = drivers::get(conn, tenant, id)
        .await?
        .ok_or_else(|| ChannelError::permanent(format!("no driver `{id}`")))?;
    let configured = if channel == "telegram" {
        providers::get(conn, tenant, "telegram").await?.is_some()
    } else {
        email_provider(conn, tenant).await.is_ok()
    };
    if !configured {
        if has_any_provider(conn, tenant).await? {
            return Err(ChannelError::permanent(format!(
                "no {channel} provider is configured for this tenant"
            )));
        }
        return Ok(Dest::Log(format!("driver:{id}:{channel}")));
    }
    if channel == "telegram" {
        let chat = driver
            .telegram_chat_id
            .ok_or_else(|| ChannelError::permanent("the driver has no bound Telegram chat"))?;
        return Ok(Dest::Telegram {
            chat_id: chat.to_string(),
            reply_to: None,
            callback: None,
        });
    }
    driver
        .email
        .map(Dest::Email)
        .ok_or_else(|| ChannelError::permanent("the driver has no email address"))
}

/// What the sender of a chat command is told about its outcome.
fn reply_text(p: &Value) -> String {
    let short = str_field(p, "key")
        .map(|k| k.chars().take(8).collect::<String>())
        .unwrap_or_default();
    match (
        str_field(p, "signal"),
        str_field(p, "status"),
        str_field(p, "reason"),
    ) {
        (Some("claim"), Some("applied"), _) => {
            format!("Job #{short} is reserved for you. The operator will confirm.")
        }
        (Some("claim"), _, Some("already_claimed")) => {
            format!("Sorry, job #{short} is already taken.")
        }
        (Some("release"), Some("applied"), _) => {
            format!("Details of job #{short} were sent to the executor.")
        }
        (Some("bind"), Some("applied"), _) => {
            "Welcome! You are registered: your route assignments will arrive in this chat.".into()
        }
        (Some("bind"), _, Some("already_used")) => {
            "This registration link was already used. Please ask the office for a new one.".into()
        }
        (Some("bind"), _, _) => {
            "This registration link has expired. Please ask the office for a new one.".into()
        }
        (Some("acknowledge"), Some("applied"), _) => "Thanks, route acknowledged.".into(),
        (Some("acknowledge"), _, Some("already_acknowledged")) => {
            "This route was already acknowledged.".into()
        }
        (Some("acknowledge"), _, _) => "This route can no longer be acknowledged.".into(),
        (_, Some("applied"), _) => format!("Done: job #{short}."),
        (_, _, Some(reason)) => format!("Job #{short}: not done ({reason})."),
        _ => format!("Job #{short}: not done."),
    }
}

fn origin_dest(origin: &Value) -> Result<Dest, ChannelError> {
    match str_field(origin, "provider") {
        Some("telegram") => Ok(Dest::Telegram {
            chat_id: origin
                .get("chat_id")
                .map(|c| c.to_string().trim_matches('"').to_string())
                .unwrap_or_default(),
            reply_to: origin.get("message_id").and_then(Value::as_i64),
            callback: str_field(origin, "callback_query_id").map(str::to_string),
        }),
        Some("whatsapp") => Ok(Dest::WhatsApp(vec![str_field(origin, "from")
            .unwrap_or_default()
            .to_string()])),
        Some("twilio") => Ok(Dest::Sms(
            str_field(origin, "from").unwrap_or_default().to_string(),
        )),
        _ => Err(ChannelError::permanent("reply origin has no provider")),
    }
}

async fn resolve(
    conn: &mut PgConnection,
    tenant: Uuid,
    config: &Value,
    m: &Message,
) -> Result<Dest, ChannelError> {
    if let Some(post) = &m.edit {
        // Edits go where the post is.
        return Ok(match post.provider.as_str() {
            "telegram" => Dest::Telegram {
                chat_id: post.chat_id.clone(),
                reply_to: None,
                callback: None,
            },
            "whatsapp" => Dest::WhatsApp(
                providers::executors_with_phone(conn, tenant)
                    .await?
                    .into_iter()
                    .filter_map(|p| p.phone)
                    .collect(),
            ),
            _ => Dest::Log(post.chat_id.clone()),
        });
    }
    match &m.audience {
        Audience::Origin(origin) => origin_dest(origin),
        Audience::Driver(id, channel) => driver_dest(conn, tenant, id, channel).await,
        Audience::Log(to) => Ok(Dest::Log(to.clone())),
        Audience::Crew => match config
            .pointer("/dispatch/crew/provider")
            .and_then(Value::as_str)
        {
            Some("telegram") => {
                let chat_id = config
                    .pointer("/dispatch/crew/chat_id")
                    .map(|c| c.to_string().trim_matches('"').to_string())
                    .filter(|c| !c.is_empty() && c != "null")
                    .ok_or_else(|| ChannelError::permanent("dispatch.crew.chat_id is not set"))?;
                Ok(Dest::Telegram {
                    chat_id,
                    reply_to: None,
                    callback: None,
                })
            }
            Some("whatsapp") => {
                let phones: Vec<String> = providers::executors_with_phone(conn, tenant)
                    .await?
                    .into_iter()
                    .filter_map(|p| p.phone)
                    .collect();
                if phones.is_empty() {
                    return Err(ChannelError::permanent(
                        "no executor with a phone to broadcast to",
                    ));
                }
                Ok(Dest::WhatsApp(phones))
            }
            _ => Ok(Dest::Log("crew".into())),
        },
        Audience::Operator => {
            let to = config
                .pointer("/dispatch/operator/to")
                .map(|c| c.to_string().trim_matches('"').to_string())
                .filter(|c| !c.is_empty() && c != "null");
            match (
                config
                    .pointer("/dispatch/operator/provider")
                    .and_then(Value::as_str),
                to,
            ) {
                (Some("telegram"), Some(to)) => Ok(Dest::Telegram {
                    chat_id: to,
                    reply_to: None,
                    callback: None,
                }),
                (Some("whatsapp"), Some(to)) => Ok(Dest::WhatsApp(vec![to])),
                (Some("sms"), Some(to)) => Ok(Dest::Sms(to)),
                (Some("email"), Some(to)) => Ok(Dest::Email(to)),
                (Some(p), _) => Err(ChannelError::permanent(format!(
                    "dispatch.operator: provider `{p}` needs `to`"
                ))),
                (None, _) if has_any_provider(conn, tenant).await? => Err(ChannelError::permanent(
                    "dispatch.operator.provider is not set: the operator cannot be reached",
                )),
                (None, _) => Ok(Dest::Log("operator".into())),
            }
        }
        Audience::Executor(id) => {
            let person = providers::person(conn, tenant, id).await?;
            let has = |row: Option<providers::ProviderRow>| row.is_some();
            let telegram = has(providers::get(conn, tenant, "telegram").await?);
            let whatsapp = has(providers::get(conn, tenant, "whatsapp").await?);
            let twilio = has(providers::get(conn, tenant, "twilio").await?);
            let email = has(providers::get(conn, tenant, "resend").await?)
                || has(providers::get(conn, tenant, "sendgrid").await?);
            Ok(match person {
                Some(Person {
                    telegram_user_id: Some(uid),
                    ..
                }) if telegram => Dest::Telegram {
                    chat_id: uid.to_string(),
                    reply_to: None,
                    callback: None,
                },
                Some(Person {
                    phone: Some(phone), ..
                }) if whatsapp => Dest::WhatsApp(vec![phone]),
                Some(Person {
                    phone: Some(phone), ..
                }) if twilio => Dest::Sms(phone),
                Some(Person { email: Some(e), .. }) if email => Dest::Email(e),
                // A tenant with real channels must not "deliver" personal data to
                // the log: an unreachable executor is a dead letter ops will see.
                _ if telegram || whatsapp || twilio || email => {
                    return Err(ChannelError::permanent(format!(
                        "no configured channel reaches executor `{id}`"
                    )))
                }
                _ => Dest::Log(format!("executor:{id}")),
            })
        }
    }
}
