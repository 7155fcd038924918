//! WhatsApp Cloud API client: text inside the 24-hour customer service
//! window, an approved template outside it.

use serde_json::{json, Value};

use super::{classify_with, retry_after_header, transport, ChannelError, Limit, RateConfig};
use crate::store::providers::ProviderRow;

/// Default API base.
pub const DEFAULT_BASE: &str = "https://graph.facebook.com";
/// Graph API version used.
pub const API_VERSION: &str = "v21.0";

/// A sender number, from the tenant's `whatsapp` provider settings
/// (`access_token`, `app_secret`, `verify_token` secrets; `phone_number_id`,
/// `template_name`, `template_language`, `base_url` settings).
pub struct WhatsApp<'a> {
    http: &'a reqwest::Client,
    base: String,
    token: String,
    phone_number_id: String,
    template: String,
    language: String,
}

impl<'a> WhatsApp<'a> {
    /// Build from settings.
    pub fn new(http: &'a reqwest::Client, row: &ProviderRow) -> Result<Self, ChannelError> {
        let token = row
            .secret("access_token")
            .ok_or_else(|| ChannelError::permanent("whatsapp access_token is not set"))?;
        let phone_number_id = row
            .setting("phone_number_id")
            .ok_or_else(|| ChannelError::permanent("whatsapp phone_number_id is not set"))?;
        Ok(WhatsApp {
            http,
            base: row
                .setting("base_url")
                .unwrap_or(DEFAULT_BASE)
                .trim_end_matches('/')
                .to_string(),
            token: token.to_string(),
            phone_number_id: phone_number_id.to_string(),
            template: row
                .setting("template_name")
                .unwrap_or("dispatch_notification")
                .to_string(),
            language: row.setting("template_language").unwrap_or("en").to_string(),
        })
    }

    /// The sender number's limit.
    pub fn limits(&self, rate: &RateConfig) -> Vec<Limit> {
        vec![Limit {
            key: format!("wa:{}", self.phone_number_id),
            interval_ms: 1000.0 / rate.whatsapp_number_per_s,
        }]
    }

    /// Send `text` to an E.164 number: as text when the window is open, else
    /// as the configured template with the text as its one body parameter.
    /// Returns the message id (`wamid…`).
    pub async fn send(
        &self,
        to: &str,
        text: &str,
        window_open: bool,
        claim_button_for: Option<&str>,
    ) -> Result<String, ChannelError> {
        let to = to.trim_start_matches('+');
        let body = match (window_open, claim_button_for) {
            (true, Some(short_id)) => json!({
                "messaging_product": "whatsapp", "to": to, "type": "interactive",
                "interactive": { "type": "button", "body": { "text": text },
                    "action": { "buttons": [{ "type": "reply", "reply": { "id": format!("claim:{short_id}"), "title": "Claim" } }] } }
            }),
            (true, None) => {
                json!({ "messaging_product": "whatsapp", "to": to, "type": "text", "text": { "body": text } })
            }
            (false, _) => json!({
                "messaging_product": "whatsapp", "to": to, "type": "template",
                "template": { "name": self.template, "language": { "code": self.language },
                    "components": [{ "type": "body", "parameters": [{ "type": "text", "text": one_line(text) }] }] }
            }),
        };
        let url = format!(
            "{}/{API_VERSION}/{}/messages",
            self.base, self.phone_number_id
        );
        let resp = self
            .http
            .post(url)
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .map_err(|e| transport("whatsapp", e.without_url()))?;
        let status = resp.status();
        let retry_after = retry_after_header(resp.headers());
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return answer["messages"][0]["id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| ChannelError::transient("whatsapp answered without a message id"));
        }
        let description = answer["error"]["message"]
            .as_str()
            .unwrap_or("no description");
        // Meta reports throughput limits as HTTP 400 with these codes: retry them.
        let code = answer["error"]["code"].as_i64().unwrap_or(0);
        let throttled = matches!(code, 4 | 80007 | 130429 | 131056 | 131000 | 133004);
        Err(classify_with(
            "whatsapp",
            status,
            retry_after,
            description,
            throttled,
        ))
    }
}

/// Template parameters may not contain newlines, tabs or runs of spaces
/// (Meta error 132018): lines are joined with " · ".
pub fn one_line(text: &str) -> String {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" · ")
}
