//! Telegram Bot API client: `sendMessage`, `editMessageText`, `answerCallbackQuery`.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{classify, retry_after_header, transport, ChannelError, Limit, RateConfig};
use crate::store::providers::ProviderRow;

/// Default API base.
pub const DEFAULT_BASE: &str = "https://api.telegram.org";

/// A bot, configured from the tenant's `telegram` provider settings
/// (`bot_token` secret; `bot_username`, `base_url` settings).
pub struct Telegram<'a> {
    http: &'a reqwest::Client,
    base: String,
    token: String,
}

/// Inline keyboard with one Claim button.
pub fn claim_button(short_id: &str) -> Value {
    json!({ "inline_keyboard": [[{ "text": "Claim", "callback_data": format!("claim:{short_id}") }]] })
}

fn chat(chat_id: &str) -> Value {
    chat_id
        .parse::<i64>()
        .map(Value::from)
        .unwrap_or_else(|_| Value::from(chat_id))
}

impl<'a> Telegram<'a> {
    /// Build from settings; a missing token is a permanent misconfiguration.
    pub fn new(http: &'a reqwest::Client, row: &ProviderRow) -> Result<Self, ChannelError> {
        let token = row
            .secret("bot_token")
            .ok_or_else(|| ChannelError::permanent("telegram bot_token is not set"))?;
        Ok(Telegram {
            http,
            base: row
                .setting("base_url")
                .unwrap_or(DEFAULT_BASE)
                .trim_end_matches('/')
                .to_string(),
            token: token.to_string(),
        })
    }

    /// A key naming the bot without revealing its token.
    pub fn bot_key(&self) -> String {
        hex::encode(&Sha256::digest(self.token.as_bytes())[..8])
    }

    /// The limits a message to `chat_id` is subject to.
    pub fn limits(&self, chat_id: &str, rate: &RateConfig) -> Vec<Limit> {
        let mut limits = vec![
            Limit {
                key: format!("tg:bot:{}", self.bot_key()),
                interval_ms: 1000.0 / rate.telegram_bot_per_s,
            },
            Limit {
                key: format!("tg:chat:{}:{chat_id}", self.bot_key()),
                interval_ms: 1000.0 / rate.telegram_chat_per_s,
            },
        ];
        if chat_id.starts_with('-') {
            limits.push(Limit {
                key: format!("tg:group:{}:{chat_id}", self.bot_key()),
                interval_ms: 60_000.0 / rate.telegram_group_per_min,
            });
        }
        limits
    }

    async fn call(&self, method: &str, body: Value) -> Result<Value, ChannelError> {
        let url = format!("{}/bot{}/{method}", self.base, self.token);
        let resp = self
            .http
            .post(url)
            .json(&body)
            .send()
            .await
            .map_err(|e| transport("telegram", e.without_url()))?;
        let status = resp.status();
        let header_retry = retry_after_header(resp.headers());
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() && body["ok"] == true {
            return Ok(body["result"].clone());
        }
        let description = body["description"].as_str().unwrap_or("no description");
        if method == "editMessageText" && description.contains("message is not modified") {
            // An identical edit already holds: success.
            return Ok(Value::Null);
        }
        let retry_after = body["parameters"]["retry_after"]
            .as_u64()
            .map(std::time::Duration::from_secs)
            .or(header_retry);
        let status = if status.is_success() {
            reqwest::StatusCode::from_u16(body["error_code"].as_u64().unwrap_or(500) as u16)
                .unwrap_or(reqwest::StatusCode::INTERNAL_SERVER_ERROR)
        } else {
            status
        };
        Err(classify("telegram", status, retry_after, description))
    }

    /// Send a message; returns the message id.
    pub async fn send_message(
        &self,
        chat_id: &str,
        text: &str,
        markup: Option<Value>,
        protect: bool,
        reply_to: Option<i64>,
    ) -> Result<String, ChannelError> {
        let mut body =
            json!({ "chat_id": chat(chat_id), "text": text, "protect_content": protect });
        if let Some(m) = markup {
            body["reply_markup"] = m;
        }
        if let Some(r) = reply_to {
            body["reply_parameters"] =
                json!({ "message_id": r, "allow_sending_without_reply": true });
        }
        let result = self.call("sendMessage", body).await?;
        result["message_id"]
            .as_i64()
            .map(|id| id.to_string())
            .ok_or_else(|| {
                ChannelError::transient("telegram sendMessage answered without a message_id")
            })
    }

    /// Replace a message's text (and keyboard: none unless given).
    pub async fn edit_message_text(
        &self,
        chat_id: &str,
        message_id: &str,
        text: &str,
        markup: Option<Value>,
    ) -> Result<(), ChannelError> {
        let message_id: i64 = message_id
            .parse()
            .map_err(|_| ChannelError::permanent("telegram message id is not a number"))?;
        let mut body = json!({ "chat_id": chat(chat_id), "message_id": message_id, "text": text });
        body["reply_markup"] = markup.unwrap_or_else(|| json!({ "inline_keyboard": [] }));
        self.call("editMessageText", body).await.map(|_| ())
    }

    /// Answer a button press (a toast for the presser).
    pub async fn answer_callback_query(
        &self,
        callback_query_id: &str,
        text: &str,
    ) -> Result<(), ChannelError> {
        self.call(
            "answerCallbackQuery",
            json!({ "callback_query_id": callback_query_id, "text": text }),
        )
        .await
        .map(|_| ())
    }
}
