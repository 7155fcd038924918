//! Email through Resend or SendGrid.

use serde_json::{json, Value};

use super::{classify, retry_after_header, transport, ChannelError};
use crate::store::providers::ProviderRow;

/// Resend's API base.
pub const RESEND_BASE: &str = "https://api.resend.com";
/// SendGrid's API base.
pub const SENDGRID_BASE: &str = "https://api.sendgrid.com";

/// An email provider, from the tenant's `resend` or `sendgrid` settings
/// (`api_key` secret; `from`, `base_url` settings).
pub struct Email<'a> {
    http: &'a reqwest::Client,
    provider: &'static str,
    base: String,
    key: String,
    from: String,
}

impl<'a> Email<'a> {
    /// Build from settings for `resend` or `sendgrid`.
    pub fn new(
        http: &'a reqwest::Client,
        provider: &'static str,
        row: &ProviderRow,
    ) -> Result<Self, ChannelError> {
        let default = if provider == "resend" {
            RESEND_BASE
        } else {
            SENDGRID_BASE
        };
        Ok(Email {
            http,
            provider,
            base: row
                .setting("base_url")
                .unwrap_or(default)
                .trim_end_matches('/')
                .to_string(),
            key: row
                .secret("api_key")
                .ok_or_else(|| ChannelError::permanent(format!("{provider} api_key is not set")))?
                .to_string(),
            from: row
                .setting("from")
                .ok_or_else(|| ChannelError::permanent(format!("{provider} from is not set")))?
                .to_string(),
        })
    }

    /// Send a plain-text email. Resend deduplicates on `Idempotency-Key`.
    /// Returns the provider's message id.
    pub async fn send(
        &self,
        to: &str,
        subject: &str,
        text: &str,
        idempotency_key: &str,
        attachment: Option<&(String, &'static str, Vec<u8>)>,
    ) -> Result<String, ChannelError> {
        use base64::Engine as _;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let request = if self.provider == "resend" {
            let mut body =
                json!({ "from": self.from, "to": [to], "subject": subject, "text": text });
            if let Some((name, _, bytes)) = attachment {
                body["attachments"] = json!([{ "filename": name, "content": b64(bytes) }]);
            }
            self.http
                .post(format!("{}/emails", self.base))
                .header("Idempotency-Key", idempotency_key)
                .json(&body)
        } else {
            let mut body = json!({
                "personalizations": [{ "to": [{ "email": to }] }],
                "from": { "email": self.from },
                "subject": subject,
                "content": [{ "type": "text/plain", "value": text }],
                "custom_args": { "idempotency_key": idempotency_key }
            });
            if let Some((name, content_type, bytes)) = attachment {
                body["attachments"] = json!([{ "content": b64(bytes), "filename": name,
                                               "type": content_type, "disposition": "attachment" }]);
            }
            self.http
                .post(format!("{}/v3/mail/send", self.base))
                .json(&body)
        };
        let resp = request
            .bearer_auth(&self.key)
            .send()
            .await
            .map_err(|e| transport(self.provider, e.without_url()))?;
        let status = resp.status();
        let retry_after = retry_after_header(resp.headers());
        let header_id = resp
            .headers()
            .get("x-message-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(answer["id"]
                .as_str()
                .map(str::to_string)
                .or(header_id)
                .unwrap_or_else(|| "accepted".into()));
        }
        let description = answer["message"]
            .as_str()
            .or_else(|| answer["errors"][0]["message"].as_str())
            .unwrap_or("no description");
        Err(classify(self.provider, status, retry_after, description))
    }
}
