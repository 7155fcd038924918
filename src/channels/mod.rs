//! Outbound channels: real HTTP clients for Telegram, WhatsApp Cloud, Twilio
//! SMS and email (Resend, SendGrid), each with a base URL configurable per
//! tenant, plus the built-in `log` channel used when a tenant has no provider.
//!
//! Failures are classified in the type ([`ChannelError`]): 429 (honouring
//! `Retry-After`), 5xx and transport errors are transient; other 4xx are
//! permanent. Sends are paced by shared rate limits ([`pace`]) so a burst
//! queues instead of failing. Every send goes through the `deliveries` ledger
//! keyed by the effect's idempotency key (and recipient), so a retried effect
//! never re-sends what already went out.

pub mod email;
pub mod qr;
pub mod route;
pub mod telegram;
pub mod twilio;
pub mod whatsapp;

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::store::providers::{self, ProviderRow};

pub use crate::delivery::{ChannelError, LogEntry, Sent};

/// Classify a provider's HTTP answer. `description` must be the provider's
/// error text (it never contains our message body).
pub(crate) fn classify(
    provider: &str,
    status: StatusCode,
    retry_after: Option<Duration>,
    description: &str,
) -> ChannelError {
    classify_with(provider, status, retry_after, description, false)
}

/// [`classify`], with a provider-specific verdict that an error is transient
/// whatever its status (e.g. Meta's throughput errors come as HTTP 400).
pub(crate) fn classify_with(
    provider: &str,
    status: StatusCode,
    retry_after: Option<Duration>,
    description: &str,
    transient: bool,
) -> ChannelError {
    let message = format!(
        "{provider} {}: {}",
        status.as_u16(),
        redact(&truncate(description, 200))
    );
    let retryable = transient
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error();
    if retryable {
        ChannelError::Transient {
            message,
            retry_after,
        }
    } else {
        ChannelError::Permanent { message }
    }
}

/// Classify a transport failure (connect, timeout, body) as transient.
pub(crate) fn transport(provider: &str, e: reqwest::Error) -> ChannelError {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "transport"
    };
    ChannelError::transient(format!("{provider} {kind} error"))
}

/// `Retry-After` in seconds, if present.
pub(crate) fn retry_after_header(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Providers quote numbers and addresses in their errors ("The 'To' number
/// +1555… is not valid"): error text is kept for ops without them.
pub(crate) fn redact(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.chars().filter(|c| c.is_ascii_digit()).count() >= 5 {
            out.push_str("[redacted]");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for word in s.split_inclusive(' ') {
        if word.contains('@') {
            flush(&mut run, &mut out);
            out.push_str("[redacted]");
            if word.ends_with(' ') {
                out.push(' ');
            }
            continue;
        }
        for c in word.chars() {
            if c.is_ascii_digit()
                || (run.is_empty() && c == '+')
                || (!run.is_empty() && matches!(c, '-' | ' ' | '(' | ')'))
            {
                run.push(c);
            } else {
                flush(&mut run, &mut out);
                out.push(c);
            }
        }
    }
    flush(&mut run, &mut out);
    out
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// The shared HTTP client (timeouts set; no redirects to unexpected hosts).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("dispatch/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("HTTP client builds")
}

/// Load a provider's settings or fail permanently (misconfiguration).
pub(crate) async fn provider(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    name: &str,
) -> Result<ProviderRow, ChannelError> {
    providers::get(conn, tenant_id, name)
        .await?
        .ok_or_else(|| ChannelError::permanent(format!("{name} is not configured for this tenant")))
}

/// How much wider than a provider's limit sends are spaced.
pub const PACING_MARGIN: f64 = 1.1;

/// One rate limit: one send per `interval_ms` under a shared key.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    /// Shared key, e.g. `tg:chat:<bot>:-100123`.
    pub key: String,
    /// Time between sends, in milliseconds.
    pub interval_ms: f64,
}

/// Reserve a slot under every limit (one transaction, the database's clock)
/// and wait for it when it is within `horizon`; a slot further away is
/// returned as [`ChannelError::Deferred`] for the outbox to reschedule.
pub async fn pace(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    limits: &[Limit],
    horizon: Duration,
) -> Result<(), ChannelError> {
    if limits.is_empty() {
        return Ok(());
    }
    // Slots are spaced 10 % wider than the limit: a send leaves its slot a
    // little late now and then (scheduling, network), and the margin keeps a
    // late one and the next on-time one inside the provider's window.
    let keys: Vec<(String, f64)> = limits
        .iter()
        .map(|l| (l.key.clone(), l.interval_ms * PACING_MARGIN))
        .collect();
    let (slot, now) = providers::reserve_slots(conn, tenant_id, &keys).await?;
    sleep_until(slot, now, horizon).await
}

/// Wait for a slot reserved earlier (a deferred send), on the database's clock.
pub async fn wait_for_slot(
    conn: &mut PgConnection,
    slot: DateTime<Utc>,
    horizon: Duration,
) -> Result<(), ChannelError> {
    let now = providers::db_now(conn).await?;
    sleep_until(slot, now, horizon).await
}

async fn sleep_until(
    slot: DateTime<Utc>,
    now: DateTime<Utc>,
    horizon: Duration,
) -> Result<(), ChannelError> {
    let wait = (slot - now).to_std().unwrap_or_default();
    if wait > horizon {
        return Err(ChannelError::Deferred { until: slot });
    }
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    Ok(())
}

/// Per-tenant limits (tenant config `rate_limits`), with Telegram's and
/// WhatsApp's documented defaults.
#[derive(Debug, Clone, Copy)]
pub struct RateConfig {
    /// Messages per second to one Telegram chat (default 1).
    pub telegram_chat_per_s: f64,
    /// Messages per minute to one Telegram group (default 20).
    pub telegram_group_per_min: f64,
    /// Messages per second per bot (default 30).
    pub telegram_bot_per_s: f64,
    /// Messages per second per WhatsApp sender number (default 80).
    pub whatsapp_number_per_s: f64,
}

impl RateConfig {
    /// Read from tenant config; invalid values fall back to the defaults.
    pub fn from_tenant(config: &Value) -> Self {
        let get = |name: &str, default: f64| {
            config
                .pointer(&format!("/rate_limits/{name}"))
                .and_then(Value::as_f64)
                .filter(|v| *v > 0.0 && v.is_finite())
                .unwrap_or(default)
        };
        RateConfig {
            telegram_chat_per_s: get("telegram_chat_per_s", 1.0),
            telegram_group_per_min: get("telegram_group_per_min", 20.0),
            telegram_bot_per_s: get("telegram_bot_per_s", 30.0),
            whatsapp_number_per_s: get("whatsapp_number_per_s", 80.0),
        }
    }
}
