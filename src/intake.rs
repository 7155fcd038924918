//! Provider webhooks: verify the signature before storing anything, store the
//! event once per provider id, answer at once, and do the work in a worker.
//!
//! - Telegram: `X-Telegram-Bot-Api-Secret-Token` equals the tenant's webhook
//!   secret; deduplicated on `update_id`.
//! - WhatsApp Cloud: `GET` handshake (`hub.verify_token`), `POST` signed with
//!   `X-Hub-Signature-256` = HMAC-SHA256 of the raw body with the app secret;
//!   deduplicated on the message id.
//! - Twilio: `X-Twilio-Signature` = base64 HMAC-SHA1 over the public URL the
//!   provider called plus the sorted form parameters; deduplicated on `MessageSid`.
//!
//! Every comparison is constant-time. A bad or missing signature is a 401 and
//! nothing is stored.
//!
//! Processing (in a worker): the sender is resolved through the people
//! registry; `/claim <short id>` (also `/claim@Bot …`, the Claim button, or a
//! WhatsApp/SMS reply `claim <short id>`) from an executor and `/release <short
//! id> [reason]` from an operator become signals carrying their origin, so the
//! engine answers the sender with the outcome. Unknown senders get a polite
//! reply and never a transition; other chatter is ignored.

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sqlx::PgConnection;
use subtle::ConstantTimeEq;
use uuid::Uuid;
use workflows::{Actor, Role, Workflow};

use crate::channels::route::Router;
use crate::channels::ChannelError;
use crate::engine::{Engine, EngineError, SignalIn};
use crate::store::providers::{self, Person};

/// Constant-time string equality.
pub fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Verify Telegram's secret token header.
pub fn telegram_ok(configured_secret: &str, header: Option<&str>) -> bool {
    header.is_some_and(|h| !configured_secret.is_empty() && ct_eq(configured_secret, h))
}

/// Verify Meta's `X-Hub-Signature-256: sha256=<hex>` over the raw body.
pub fn meta_ok(app_secret: &str, body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(given) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(app_secret.as_bytes())
        .expect("HMAC takes any key");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// Twilio's signature of a request: base64(HMAC-SHA1(auth token, url + sorted key+value pairs)).
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut data = url.to_string();
    for (k, v) in sorted {
        data.push_str(k);
        data.push_str(v);
    }
    let mut mac = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(auth_token.as_bytes())
        .expect("HMAC takes any key");
    mac.update(data.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Verify Twilio's `X-Twilio-Signature`.
pub fn twilio_ok(
    auth_token: &str,
    url: &str,
    params: &[(String, String)],
    header: Option<&str>,
) -> bool {
    header.is_some_and(|h| ct_eq(&twilio_signature(auth_token, url, params), h.trim()))
}

/// Svix's signature (Resend webhooks): `svix-signature` holds space-separated
/// `v1,<base64(HMAC-SHA256(secret, id.timestamp.body))>`; the secret is
/// `whsec_<base64>`. Timestamps more than 5 minutes off `now` are refused.
pub fn svix_ok(
    secret: &str,
    id: Option<&str>,
    timestamp: Option<&str>,
    body: &[u8],
    header: Option<&str>,
    now: i64,
) -> bool {
    let (Some(id), Some(timestamp), Some(header)) = (id, timestamp, header) else {
        return false;
    };
    let Ok(ts) = timestamp.trim().parse::<i64>() else {
        return false;
    };
    if now.abs_diff(ts) > 300 {
        return false;
    }
    let Ok(key) = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
    else {
        return false;
    };
    if key.is_empty() {
        return false;
    }
    let mut mac =
        <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).expect("HMAC takes any key");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.trim().as_bytes());
    mac.update(b".");
    mac.update(body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    header
        .split_whitespace()
        .filter_map(|part| part.strip_prefix("v1,"))
        .any(|given| ct_eq(&expected, given))
}

/// SendGrid's signed event webhook: `X-Twilio-Email-Event-Webhook-Signature`
/// is a base64 DER ECDSA P-256 signature of SHA-256(timestamp + body), checked
/// with the verification key (base64 DER public key) from SendGrid's settings.
pub fn sendgrid_ok(
    public_key_b64: &str,
    timestamp: Option<&str>,
    body: &[u8],
    signature_b64: Option<&str>,
) -> bool {
    use p256::ecdsa::signature::Verifier;
    use p256::pkcs8::DecodePublicKey;
    let (Some(timestamp), Some(signature)) = (timestamp, signature_b64) else {
        return false;
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let (Ok(der), Ok(sig)) = (
        b64.decode(public_key_b64.trim()),
        b64.decode(signature.trim()),
    ) else {
        return false;
    };
    let (Ok(key), Ok(sig)) = (
        p256::ecdsa::VerifyingKey::from_public_key_der(&der),
        p256::ecdsa::Signature::from_der(&sig),
    ) else {
        return false;
    };
    let mut signed = timestamp.as_bytes().to_vec();
    signed.extend_from_slice(body);
    key.verify(&signed, &sig).is_ok()
}

/// What a provider delivery event says about an email we sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryEvent {
    /// The provider's message id (as our ledger recorded it).
    pub message_id: String,
    /// `delivered`, or `failed` with a reason.
    pub outcome: Result<(), String>,
}

/// Read a Resend or SendGrid event; `None` for events that change nothing
/// (sent, opened, delayed…).
pub fn read_delivery_event(provider: &str, payload: &Value) -> Option<DeliveryEvent> {
    let (message_id, outcome) = match provider {
        "resend" => {
            let id = payload["data"]["email_id"].as_str()?;
            let outcome = match payload["type"].as_str()? {
                "email.delivered" => Ok(()),
                "email.bounced" => Err("bounced".to_string()),
                "email.failed" => Err("failed".to_string()),
                _ => return None,
            };
            (id.to_string(), outcome)
        }
        "sendgrid" => {
            // `sg_message_id` is our `X-Message-Id` followed by `.filter…`.
            let id = payload["sg_message_id"].as_str()?.split('.').next()?;
            let outcome = match payload["event"].as_str()? {
                "delivered" => Ok(()),
                "bounce" => Err("bounced".to_string()),
                "dropped" => Err("dropped".to_string()),
                _ => return None,
            };
            (id.to_string(), outcome)
        }
        _ => return None,
    };
    Some(DeliveryEvent {
        message_id,
        outcome,
    })
}

/// A chat command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatCommand {
    /// `/claim <short id>`.
    Claim(String),
    /// `/release <short id> [reason]`.
    Release(String, Option<String>),
}

fn short_id_ok(s: &str) -> bool {
    s.len() == 8 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// Parse a chat text into a command (`/claim abcd1234`, `/claim@Bot abcd1234`,
/// `claim abcd1234`, `claim:abcd1234` from a button, `/release abcd1234 reason…`).
pub fn parse_command(text: &str) -> Option<ChatCommand> {
    let text = text.trim();
    if let Some(short) = text.strip_prefix("claim:") {
        let short = short.trim().to_lowercase();
        return short_id_ok(&short).then_some(ChatCommand::Claim(short));
    }
    let mut words = text.split_whitespace();
    let head = words.next()?.trim_start_matches('/').to_lowercase();
    let verb = head.split('@').next().unwrap_or("");
    let short = words.next()?.trim_start_matches('#').to_lowercase();
    if !short_id_ok(&short) {
        return None;
    }
    let rest: Vec<&str> = words.collect();
    match verb {
        "claim" => Some(ChatCommand::Claim(short)),
        "release" => Some(ChatCommand::Release(
            short,
            (!rest.is_empty()).then(|| rest.join(" ")),
        )),
        _ => None,
    }
}

/// The bot a command names (`/claim@MovesBot …` → `movesbot`), lower-cased.
pub fn addressed_bot(text: &str) -> Option<String> {
    let head = text.split_whitespace().next()?;
    head.strip_prefix('/')?
        .split_once('@')
        .map(|(_, bot)| bot.to_lowercase())
}

/// What a verified inbound event says, provider-neutral.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    /// Who sent it: a Telegram user id or an E.164 phone.
    pub sender: Sender,
    /// The text or button data.
    pub text: String,
    /// Where to answer (a `signal_reply` origin).
    pub origin: Value,
}

/// The sender's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// Telegram user id.
    Telegram(i64),
    /// E.164 phone number.
    Phone(String),
}

/// Read a stored event. `None` for updates that carry nothing to act on.
pub fn read_event(provider: &str, payload: &Value) -> Option<Inbound> {
    match provider {
        "telegram" => {
            if let Some(cb) = payload.get("callback_query") {
                return Some(Inbound {
                    sender: Sender::Telegram(cb["from"]["id"].as_i64()?),
                    text: cb["data"].as_str()?.to_string(),
                    origin: json!({
                        "provider": "telegram", "chat_id": cb["message"]["chat"]["id"],
                        "callback_query_id": cb["id"],
                    }),
                });
            }
            let m = payload.get("message")?;
            Some(Inbound {
                sender: Sender::Telegram(m["from"]["id"].as_i64()?),
                text: m["text"].as_str()?.to_string(),
                origin: json!({ "provider": "telegram", "chat_id": m["chat"]["id"], "message_id": m["message_id"] }),
            })
        }
        "whatsapp" => {
            let m = payload.get("message")?;
            let from = format!("+{}", m["from"].as_str()?.trim_start_matches('+'));
            let text = m["text"]["body"]
                .as_str()
                .or_else(|| m["interactive"]["button_reply"]["id"].as_str())
                .or_else(|| m["button"]["payload"].as_str())?;
            Some(Inbound {
                sender: Sender::Phone(from.clone()),
                text: text.to_string(),
                origin: json!({ "provider": "whatsapp", "from": from }),
            })
        }
        "twilio" => {
            let from = payload["From"].as_str()?.to_string();
            Some(Inbound {
                sender: Sender::Phone(from.clone()),
                text: payload["Body"].as_str()?.to_string(),
                origin: json!({ "provider": "twilio", "from": from }),
            })
        }
        _ => None,
    }
}

/// Dispatch workflows whose key starts with the short id (at most two).
async fn by_short_id(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    short: &str,
) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "select key from workflows where tenant_id = $1 and kind = 'dispatch' and key like $2 || '%' order by created_at desc limit 2",
    )
    .bind(tenant_id)
    .bind(short)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// The provider-event processor the workers run (`delivery::Inbound`):
/// replies go out through `router`.
pub struct Intake {
    router: Router,
}

impl Intake {
    /// Process events, replying through `router`.
    pub fn new(router: Router) -> Self {
        Intake { router }
    }
}

impl crate::delivery::Inbound for Intake {
    fn process<'a>(
        &'a self,
        engine: &'a Engine,
        tenant_id: Uuid,
        inbound_id: Uuid,
    ) -> futures::future::BoxFuture<'a, Result<&'static str, EngineError>> {
        Box::pin(process(engine, &self.router, tenant_id, inbound_id))
    }
}

/// Process one stored inbound event (idempotent: the signal is keyed by the
/// provider's event id, a polite reply by the event row).
pub async fn process(
    engine: &Engine,
    router: &Router,
    tenant_id: Uuid,
    inbound_id: Uuid,
) -> Result<&'static str, EngineError> {
    // The row lock (skip locked) keeps two workers off one event; it is
    // released with the outcome, so a failure leaves the event queued for the sweep.
    let mut tx = engine.pool().begin().await?;
    let Some(row) = providers::lock_inbound(&mut tx, tenant_id, inbound_id).await? else {
        return Ok("not_queued");
    };
    let mut conn = engine.pool().acquire().await?;
    if matches!(row.provider.as_str(), "resend" | "sendgrid") {
        let outcome = delivery_event(engine, &mut conn, tenant_id, &row).await?;
        providers::finish_inbound(&mut tx, tenant_id, inbound_id, outcome).await?;
        tx.commit().await?;
        tracing::info!(inbound.provider = %row.provider, outcome, "delivery event processed");
        return Ok(outcome);
    }
    if row.provider == "twilio" {
        // An SMS to one of the tenant's masked numbers is a message to route,
        // not a chat command.
        if let Some(outcome) =
            crate::messaging::routing::inbound(engine, tenant_id, &row.event_id, &row.payload)
                .await?
        {
            providers::finish_inbound(&mut tx, tenant_id, inbound_id, outcome).await?;
            tx.commit().await?;
            return Ok(outcome);
        }
    }
    let outcome = match read_event(&row.provider, &row.payload) {
        None => "ignored",
        Some(inbound) => {
            if let Sender::Phone(phone) = &inbound.sender {
                if row.provider == "whatsapp" {
                    providers::touch_whatsapp_window(&mut conn, tenant_id, phone).await?;
                }
            }
            let origin = inbound.origin.clone();
            let (outcome, polite) = act(
                engine,
                &mut conn,
                tenant_id,
                &row.provider,
                &row.event_id,
                inbound,
            )
            .await?;
            if let Some(text) = polite {
                let key = format!("inbound:{}:{}:reply", row.provider, row.event_id);
                match router
                    .reply_direct(&mut conn, tenant_id, &origin, text, &key)
                    .await
                {
                    Ok(()) => {}
                    // Not now: leave the event queued; the sweep retries it (the
                    // signal is idempotent, the reply deduplicated by its key).
                    Err(e @ (ChannelError::Transient { .. } | ChannelError::Deferred { .. })) => {
                        return Err(EngineError::Db(sqlx::Error::Protocol(format!(
                            "chat reply not sent yet: {e}"
                        ))));
                    }
                    Err(e) => tracing::warn!(error = %e, "reply to chat sender failed for good"),
                }
            }
            outcome
        }
    };
    providers::finish_inbound(&mut tx, tenant_id, inbound_id, outcome).await?;
    tx.commit().await?;
    tracing::info!(inbound.provider = %row.provider, outcome, "inbound event processed");
    Ok(outcome)
}

/// A provider's report on an email: update the dispatch it belongs to. An
/// event that arrives before our ledger has the message (the provider answered
/// the send, we have not recorded it yet) waits: it stays queued for the sweep
/// for up to 10 minutes.
async fn delivery_event(
    engine: &Engine,
    conn: &mut PgConnection,
    tenant_id: Uuid,
    row: &providers::InboundRow,
) -> Result<&'static str, EngineError> {
    let Some(event) = read_delivery_event(&row.provider, &row.payload) else {
        return Ok("ignored");
    };
    let found: Option<(String, String, String)> = sqlx::query_as(
        "select w.kind, w.key, coalesce(e.payload->>'channel', '')
         from deliveries d
         join effects e on e.tenant_id = d.tenant_id and e.id = d.effect_id
         join workflows w on w.tenant_id = e.tenant_id and w.id = e.workflow_id
         where d.tenant_id = $1 and d.channel = $2 and d.provider_message_id = $3
         limit 1",
    )
    .bind(tenant_id)
    .bind(&row.provider)
    .bind(&event.message_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((kind, key, channel)) = found else {
        let (old,): (bool,) = sqlx::query_as(
            "select received_at < now() - interval '10 minutes' from inbound_events where tenant_id = $1 and id = $2",
        )
        .bind(tenant_id)
        .bind(row.id)
        .fetch_one(&mut *conn)
        .await?;
        if old {
            return Ok("unknown_message");
        }
        return Err(EngineError::Db(sqlx::Error::Protocol(
            "delivery event for a message not in the ledger yet".into(),
        )));
    };
    if kind != workflows::route_dispatch::RouteDispatch::KIND {
        return Ok("not_tracked");
    }
    let (signal, payload) = match &event.outcome {
        Ok(()) => ("delivered", json!({ "channel": channel })),
        Err(reason) => (
            "delivery_failed",
            json!({ "channel": channel, "reason": reason }),
        ),
    };
    let idem = format!("{}:{}", row.provider, row.event_id);
    engine
        .signal(SignalIn::new(
            tenant_id,
            &kind,
            &key,
            &idem,
            signal,
            &payload,
            &Actor::system(),
        ))
        .await?;
    Ok("signalled")
}

/// `/start <token>` (a deep link): `None` if not a `/start`; then the token
/// (`""` for a bare `/start`), or `"!"` for one that cannot be ours.
pub fn start_token(text: &str) -> Option<&str> {
    let mut parts = text.split_whitespace();
    let command = parts.next()?;
    let name = command.split('@').next()?;
    if name != "/start" {
        return None;
    }
    let token = parts.next().unwrap_or("");
    let ok = token.len() <= 64
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    Some(if ok { token } else { "!" })
}

/// `/start <token>` from a driver's private chat: bind it through the
/// registration workflow (which answers: welcome, or why not).
async fn start_registration(
    engine: &Engine,
    conn: &mut PgConnection,
    tenant_id: Uuid,
    event_id: &str,
    inbound: &Inbound,
    token: &str,
) -> Result<(&'static str, Option<&'static str>), EngineError> {
    const INVALID: &str =
        "This registration link is not valid. Please ask the office for a new one.";
    let Sender::Telegram(user) = inbound.sender else {
        return Ok(("ignored", None));
    };
    if token.is_empty() {
        return Ok((
            "no_token",
            Some("Hello! To register for route assignments, open the link the office sent you."),
        ));
    }
    let chat = inbound.origin["chat_id"].as_i64();
    if chat != Some(user) {
        return Ok((
            "not_private",
            Some("Please open the registration link in a private chat with the bot."),
        ));
    }
    if token == "!" {
        return Ok(("unknown_token", Some(INVALID)));
    }
    let hash = crate::courier::token_hash(token);
    let Some(registration) =
        crate::store::drivers::registration_by_hash(conn, tenant_id, &hash).await?
    else {
        return Ok(("unknown_token", Some(INVALID)));
    };
    let actor = Actor {
        role: Role::System,
        subject: Some(format!("telegram:{user}")),
    };
    match engine
        .signal(
            SignalIn::new(
                tenant_id,
                workflows::driver_registration::DriverRegistration::KIND,
                &registration.to_string(),
                &format!("telegram:{event_id}"),
                "bind",
                &json!({ "chat_id": user }),
                &actor,
            )
            .answered_at(Some(&inbound.origin)),
        )
        .await
    {
        Ok(_) => Ok(("signalled", None)),
        Err(EngineError::NotFound) => Ok(("unknown_token", Some(INVALID))),
        Err(e) => Err(e),
    }
}

/// The Acknowledge button of a route dispatch: only the driver it was sent to.
async fn acknowledge(
    engine: &Engine,
    conn: &mut PgConnection,
    tenant_id: Uuid,
    event_id: &str,
    inbound: &Inbound,
    dispatch: Uuid,
) -> Result<(&'static str, Option<&'static str>), EngineError> {
    let Sender::Telegram(user) = inbound.sender else {
        return Ok(("ignored", None));
    };
    let found: Option<(String, Option<i64>, String)> = sqlx::query_as(
        "select w.key, d.telegram_chat_id, d.id from workflows w
         join drivers d on d.tenant_id = w.tenant_id and d.id = w.state->>'driver_id'
         where w.tenant_id = $1 and w.id = $2 and w.kind = $3",
    )
    .bind(tenant_id)
    .bind(dispatch)
    .bind(workflows::route_dispatch::RouteDispatch::KIND)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((key, chat, driver)) = found else {
        return Ok((
            "no_such_route",
            Some("Sorry, this route is no longer known."),
        ));
    };
    if chat != Some(user) {
        return Ok((
            "not_allowed",
            Some("Sorry, this route was not sent to you."),
        ));
    }
    let actor = Actor {
        role: Role::Executor,
        subject: Some(format!("driver:{driver}")),
    };
    engine
        .signal(
            SignalIn::new(
                tenant_id,
                workflows::route_dispatch::RouteDispatch::KIND,
                &key,
                &format!("telegram:{event_id}"),
                "acknowledge",
                &json!({ "channel": "telegram" }),
                &actor,
            )
            .answered_at(Some(&inbound.origin)),
        )
        .await?;
    Ok(("signalled", None))
}

/// Decide what an inbound message does: signal a workflow, or answer politely
/// (the outcome and the reply text).
async fn act(
    engine: &Engine,
    conn: &mut PgConnection,
    tenant_id: Uuid,
    provider: &str,
    event_id: &str,
    inbound: Inbound,
) -> Result<(&'static str, Option<&'static str>), EngineError> {
    if provider == "telegram" {
        if let Some(token) = start_token(&inbound.text) {
            return start_registration(engine, conn, tenant_id, event_id, &inbound, token).await;
        }
        if let Some(id) = inbound
            .text
            .strip_prefix("ack:")
            .and_then(|s| s.parse::<Uuid>().ok())
        {
            return acknowledge(engine, conn, tenant_id, event_id, &inbound, id).await;
        }
    }
    let Some(command) = parse_command(&inbound.text) else {
        return Ok(("no_command", None));
    };
    let config = crate::store::tenants::config(&mut *conn, tenant_id).await?;
    if provider == "telegram" {
        // `/claim@OtherBot …` in a group with several bots is not for us.
        let bot = providers::get(&mut *conn, tenant_id, "telegram").await?;
        let ours = bot
            .as_ref()
            .and_then(|b| b.setting("bot_username"))
            .map(str::to_lowercase);
        if let (Some(ours), Some(named)) = (ours, addressed_bot(&inbound.text)) {
            if ours != named {
                return Ok(("other_bot", None));
            }
        }
        // Claims are taken in the crew group, where the post is.
        if matches!(command, ChatCommand::Claim(_)) {
            let crew = config
                .pointer("/dispatch/crew/chat_id")
                .map(|c| c.to_string().trim_matches('"').to_string());
            let chat = inbound
                .origin
                .get("chat_id")
                .map(|c| c.to_string().trim_matches('"').to_string());
            if crew.is_some() && crew != chat {
                return Ok(("wrong_chat", Some("Jobs are claimed in the crew group.")));
            }
        }
    }
    let person: Option<Person> = match &inbound.sender {
        Sender::Telegram(id) => providers::person_by_telegram(conn, tenant_id, *id).await?,
        Sender::Phone(p) => providers::person_by_phone(conn, tenant_id, p).await?,
    };
    let Some(person) = person else {
        return Ok((
            "unknown_sender",
            Some("Sorry, this chat is not registered with us. Please contact the office."),
        ));
    };
    let (short, role, signal, payload) = match command {
        ChatCommand::Claim(short) if person.role == "executor" => {
            (short, Role::Executor, "claim", json!({}))
        }
        ChatCommand::Release(short, reason) if person.role == "operator" => (
            short,
            Role::Operator,
            "release",
            json!({ "reason": reason }),
        ),
        _ => return Ok(("not_allowed", Some("Sorry, you cannot do that here."))),
    };
    let keys = by_short_id(conn, tenant_id, &short).await?;
    let [key] = keys.as_slice() else {
        let text = if keys.is_empty() {
            "No job with that number."
        } else {
            "That job number is ambiguous; please use the button."
        };
        return Ok(("no_such_job", Some(text)));
    };
    let actor = Actor {
        role,
        subject: Some(person.id.clone()),
    };
    let idem = format!("{provider}:{event_id}");
    engine
        .signal(
            SignalIn::new(tenant_id, "dispatch", key, &idem, signal, &payload, &actor)
                .answered_at(Some(&inbound.origin)),
        )
        .await?;
    Ok(("signalled", None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twilio_documented_example_vector() {
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]
        .into_iter()
        .rev()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            twilio_signature("12345", url, &params),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
        assert!(twilio_ok(
            "12345",
            url,
            &params,
            Some("0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
        ));
        assert!(!twilio_ok(
            "12345",
            url,
            &params,
            Some("0/KCTR6DLpKmkAf8muzZqo1nDgQ")
        ));
        assert!(!twilio_ok(
            "12345",
            "https://mycompany.com/myapp.php?foo=1&bar=3",
            &params,
            Some("0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
        ));
        assert!(!twilio_ok("12345", url, &params, None));
        let mut tampered = params.clone();
        tampered[0].1 = "+18005551213".into();
        assert!(!twilio_ok(
            "12345",
            url,
            &tampered,
            Some("0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
        ));
    }

    #[test]
    fn meta_signature_scheme() {
        let body = br#"{"object":"whatsapp_business_account"}"#;
        let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(b"app-secret").unwrap();
        mac.update(body);
        let good = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert!(meta_ok("app-secret", body, Some(&good)));
        assert!(!meta_ok("other-secret", body, Some(&good)));
        assert!(!meta_ok(
            "app-secret",
            br#"{"object":"whatsapp_business_accounT"}"#,
            Some(&good)
        ));
        assert!(!meta_ok(
            "app-secret",
            body,
            Some(good.trim_start_matches("sha256="))
        ));
        assert!(!meta_ok("app-secret", body, None));
    }

    #[test]
    fn telegram_secret_token() {
        assert!(telegram_ok("s3cret-token", Some("s3cret-token")));
        assert!(!telegram_ok("s3cret-token", Some("s3cret-tokem")));
        assert!(!telegram_ok("s3cret-token", None));
        assert!(!telegram_ok("", Some("")));
    }

    #[test]
    fn chat_commands() {
        assert_eq!(
            parse_command("/claim 0952ef82"),
            Some(ChatCommand::Claim("0952ef82".into()))
        );
        assert_eq!(
            parse_command("/claim@MovesBot 0952EF82"),
            Some(ChatCommand::Claim("0952ef82".into()))
        );
        assert_eq!(
            parse_command("claim #0952ef82"),
            Some(ChatCommand::Claim("0952ef82".into()))
        );
        assert_eq!(
            parse_command("claim:0952ef82"),
            Some(ChatCommand::Claim("0952ef82".into()))
        );
        assert_eq!(
            parse_command("/release 0952ef82 paid in cash"),
            Some(ChatCommand::Release(
                "0952ef82".into(),
                Some("paid in cash".into())
            ))
        );
        assert_eq!(
            parse_command("/release 0952ef82"),
            Some(ChatCommand::Release("0952ef82".into(), None))
        );
        assert_eq!(parse_command("/claim 0952ef8"), None);
        assert_eq!(parse_command("/claim zzzzzzzz"), None);
        assert_eq!(parse_command("hello crew"), None);
        assert_eq!(parse_command("/start"), None);
    }
}

/// HTTP side of the intake: verify, store once, enqueue, answer.
pub mod routes {
    use axum::body::Bytes;
    use axum::extract::{OriginalUri, Path, RawQuery, State};
    use axum::http::{header, HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::Json;
    use serde_json::{json, Value};
    use utoipa_axum::router::OpenApiRouter;
    use utoipa_axum::routes;
    use uuid::Uuid;

    use crate::http::{ApiError, ApiState};
    use crate::store::jobs::{self, InboundJob};
    use crate::store::providers::{self, ProviderRow};

    fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
        headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
            "the webhook signature is missing or wrong",
        )
    }

    async fn settings(
        st: &ApiState,
        tenant: &str,
        provider: &str,
    ) -> Result<(Uuid, ProviderRow), ApiError> {
        let mut conn = st.engine.pool().acquire().await?;
        let not_found = || {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such tenant or provider",
            )
        };
        let tenant_id = providers::tenant_by_name(&mut conn, tenant)
            .await?
            .ok_or_else(not_found)?;
        let row = providers::get(&mut conn, tenant_id, provider)
            .await?
            .ok_or_else(not_found)?;
        Ok((tenant_id, row))
    }

    /// Store verified events once each and enqueue their processing, in one transaction.
    async fn store(
        st: &ApiState,
        tenant_id: Uuid,
        provider: &str,
        events: Vec<(String, Value)>,
    ) -> Result<Value, ApiError> {
        let mut tx = st.engine.pool().begin().await?;
        let mut answers = Vec::new();
        for (event_id, payload) in events {
            let status =
                match providers::insert_inbound(&mut tx, tenant_id, provider, &event_id, &payload)
                    .await?
                {
                    Some(inbound_id) => {
                        jobs::enqueue_inbound(
                            &mut tx,
                            &InboundJob {
                                tenant_id,
                                inbound_id,
                            },
                            format!("in:{inbound_id}"),
                        )
                        .await?;
                        "queued"
                    }
                    None => "duplicate",
                };
            answers.push(json!({ "event_id": event_id, "status": status }));
        }
        tx.commit().await?;
        Ok(match answers.len() {
            1 => answers.remove(0),
            0 => json!({ "status": "ignored" }),
            _ => json!({ "events": answers, "status": "queued" }),
        })
    }

    #[utoipa::path(post, path = "/v1/intake/telegram/{tenant}", tag = "intake", params(("tenant" = String, Path, description = "Tenant name"), ("X-Telegram-Bot-Api-Secret-Token" = String, Header)), request_body(content = serde_json::Value, description = "A Telegram Update"), responses((status = 200, description = "Stored (or a verified duplicate)", body = serde_json::Value), crate::openapi::ClientErrors))]
    async fn telegram(
        State(st): State<ApiState>,
        Path(tenant): Path<String>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Json<Value>, ApiError> {
        let (tenant_id, row) = settings(&st, &tenant, "telegram").await?;
        let secret = row.secret("webhook_secret").unwrap_or("");
        if !super::telegram_ok(
            secret,
            header_str(&headers, "x-telegram-bot-api-secret-token"),
        ) {
            return Err(unauthorized());
        }
        let update: Value = crate::http::parse_body(&body)?;
        let update_id = update["update_id"].as_i64().ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                "update_id is required",
            )
        })?;
        Ok(Json(
            store(
                &st,
                tenant_id,
                "telegram",
                vec![(update_id.to_string(), update)],
            )
            .await?,
        ))
    }

    #[utoipa::path(get, path = "/v1/intake/whatsapp/{tenant}", tag = "intake", params(("tenant" = String, Path, description = "Tenant name"), ("hub.mode" = Option<String>, Query), ("hub.verify_token" = Option<String>, Query), ("hub.challenge" = Option<String>, Query)), responses((status = 200, description = "The challenge, echoed", body = String, content_type = "text/plain"), crate::openapi::ClientErrors))]
    async fn whatsapp_handshake(
        State(st): State<ApiState>,
        Path(tenant): Path<String>,
        RawQuery(q): RawQuery,
    ) -> Result<Response, ApiError> {
        let (_, row) = settings(&st, &tenant, "whatsapp").await?;
        let params: Vec<(String, String)> = serde_urlencoded_pairs(q.as_deref().unwrap_or(""));
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let token_ok = match (row.secret("verify_token"), get("hub.verify_token")) {
            (Some(want), Some(given)) => super::ct_eq(want, given),
            _ => false,
        };
        if get("hub.mode") != Some("subscribe") || !token_ok {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "verification_failed",
                "hub.mode or hub.verify_token is wrong",
            ));
        }
        let challenge = get("hub.challenge").unwrap_or("").to_string();
        Ok(([(header::CONTENT_TYPE, "text/plain")], challenge).into_response())
    }

    #[utoipa::path(post, path = "/v1/intake/whatsapp/{tenant}", tag = "intake", params(("tenant" = String, Path, description = "Tenant name"), ("X-Hub-Signature-256" = String, Header)), request_body(content = serde_json::Value, description = "A WhatsApp Cloud webhook payload"), responses((status = 200, description = "Stored (or a verified duplicate)", body = serde_json::Value), crate::openapi::ClientErrors))]
    async fn whatsapp(
        State(st): State<ApiState>,
        Path(tenant): Path<String>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Json<Value>, ApiError> {
        let (tenant_id, row) = settings(&st, &tenant, "whatsapp").await?;
        let secret = row.secret("app_secret").unwrap_or("");
        if secret.is_empty()
            || !super::meta_ok(secret, &body, header_str(&headers, "x-hub-signature-256"))
        {
            return Err(unauthorized());
        }
        let doc: Value = crate::http::parse_body(&body)?;
        let mut events = Vec::new();
        for entry in doc["entry"].as_array().into_iter().flatten() {
            for change in entry["changes"].as_array().into_iter().flatten() {
                let value = &change["value"];
                // One Meta app may serve several tenants' numbers: only this
                // tenant's number is accepted here.
                if value["metadata"]["phone_number_id"].as_str() != row.setting("phone_number_id") {
                    continue;
                }
                for m in value["messages"].as_array().into_iter().flatten() {
                    if let Some(id) = m["id"].as_str() {
                        events.push((
                            id.to_string(),
                            json!({ "message": m, "metadata": value["metadata"] }),
                        ));
                    }
                }
            }
        }
        Ok(Json(store(&st, tenant_id, "whatsapp", events).await?))
    }

    #[utoipa::path(post, path = "/v1/intake/twilio/{tenant}", tag = "intake", params(("tenant" = String, Path, description = "Tenant name"), ("X-Twilio-Signature" = String, Header)), request_body(content = std::collections::HashMap<String, String>, content_type = "application/x-www-form-urlencoded", description = "A Twilio messaging webhook"), responses((status = 200, description = "TwiML (empty response)", body = String, content_type = "text/xml"), crate::openapi::ClientErrors))]
    async fn twilio(
        State(st): State<ApiState>,
        Path(tenant): Path<String>,
        OriginalUri(uri): OriginalUri,
        RawQuery(q): RawQuery,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response, ApiError> {
        let (tenant_id, row) = settings(&st, &tenant, "twilio").await?;
        let token = row.secret("auth_token").unwrap_or("");
        let params = serde_urlencoded_pairs(std::str::from_utf8(&body).unwrap_or(""));
        // Twilio signs the URL it called: our public base URL plus path and query.
        let base = st.public_url.clone().unwrap_or_else(|| {
            format!(
                "http://{}",
                header_str(&headers, "host").unwrap_or("localhost")
            )
        });
        // The path as called: under a host's prefix when embedded.
        let mut url = format!("{base}{}", uri.path());
        if let Some(q) = q.filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(&q);
        }
        if token.is_empty()
            || !super::twilio_ok(
                token,
                &url,
                &params,
                header_str(&headers, "x-twilio-signature"),
            )
        {
            return Err(unauthorized());
        }
        let payload: serde_json::Map<String, Value> = params
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect();
        let sid = payload
            .get("MessageSid")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_body",
                    "MessageSid is required",
                )
            })?;
        store(
            &st,
            tenant_id,
            "twilio",
            vec![(sid, Value::Object(payload))],
        )
        .await?;
        // Twilio expects TwiML: an empty response sends nothing back by itself.
        Ok((
            [(header::CONTENT_TYPE, "text/xml")],
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>",
        )
            .into_response())
    }

    #[utoipa::path(post, path = "/v1/intake/resend/{tenant}", tag = "intake", params(("tenant" = String, Path, description = "Tenant name"), ("svix-id" = String, Header), ("svix-timestamp" = String, Header), ("svix-signature" = String, Header)), request_body(content = serde_json::Value, description = "A Resend webhook event (email.delivered, email.bounced, …)"), responses((status = 200, description = "Stored (or a verified duplicate)", body = serde_json::Value), crate::openapi::ClientErrors))]
    async fn resend(
        State(st): State<ApiState>,
        Path(tenant): Path<String>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Json<Value>, ApiError> {
        let (tenant_id, row) = settings(&st, &tenant, "resend").await?;
        let secret = row.secret("webhook_secret").unwrap_or("");
        let id = header_str(&headers, "svix-id");
        if secret.is_empty()
            || !super::svix_ok(
                secret,
                id,
                header_str(&headers, "svix-timestamp"),
                &body,
                header_str(&headers, "svix-signature"),
                chrono::Utc::now().timestamp(),
            )
        {
            return Err(unauthorized());
        }
        let event: Value = crate::http::parse_body(&body)?;
        let id = id.unwrap_or_default().to_string();
        Ok(Json(
            store(&st, tenant_id, "resend", vec![(id, event)]).await?,
        ))
    }

    #[utoipa::path(post, path = "/v1/intake/sendgrid/{tenant}", tag = "intake", params(("tenant" = String, Path, description = "Tenant name"), ("X-Twilio-Email-Event-Webhook-Signature" = String, Header), ("X-Twilio-Email-Event-Webhook-Timestamp" = String, Header)), request_body(content = Vec<serde_json::Value>, description = "SendGrid event webhook: an array of events"), responses((status = 200, description = "Stored (duplicates once)", body = serde_json::Value), crate::openapi::ClientErrors))]
    async fn sendgrid(
        State(st): State<ApiState>,
        Path(tenant): Path<String>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Json<Value>, ApiError> {
        let (tenant_id, row) = settings(&st, &tenant, "sendgrid").await?;
        let key = row.setting("webhook_public_key").unwrap_or("");
        if key.is_empty()
            || !super::sendgrid_ok(
                key,
                header_str(&headers, "x-twilio-email-event-webhook-timestamp"),
                &body,
                header_str(&headers, "x-twilio-email-event-webhook-signature"),
            )
        {
            return Err(unauthorized());
        }
        let events: Vec<Value> = crate::http::parse_body(&body)?;
        let mut stored = Vec::with_capacity(events.len());
        for e in events {
            let Some(id) = e["sg_event_id"]
                .as_str()
                .filter(|s| !s.is_empty() && s.len() <= 200)
            else {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_body",
                    "every event needs its sg_event_id",
                ));
            };
            stored.push((id.to_string(), e));
        }
        Ok(Json(store(&st, tenant_id, "sendgrid", stored).await?))
    }

    /// Decode `a=b&c=d` form/query pairs (`+` is a space, `%XX` escapes).
    pub fn serde_urlencoded_pairs(s: &str) -> Vec<(String, String)> {
        url::form_urlencoded::parse(s.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    /// The intake routes.
    pub fn router() -> OpenApiRouter<ApiState> {
        OpenApiRouter::new()
            .routes(routes!(telegram))
            .routes(routes!(whatsapp, whatsapp_handshake))
            .routes(routes!(twilio))
            .routes(routes!(resend))
            .routes(routes!(sendgrid))
    }
}
