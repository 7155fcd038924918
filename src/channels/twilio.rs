//! Twilio Programmable Messaging (SMS).

use serde_json::Value;

use super::{classify, retry_after_header, transport, ChannelError};
use crate::store::providers::ProviderRow;

/// Default API base.
pub const DEFAULT_BASE: &str = "https://api.twilio.com";

/// An account, from the tenant's `twilio` provider settings (`auth_token`
/// secret; `account_sid`, `from`, `base_url`, `webhook_url` settings).
pub struct Twilio<'a> {
    http: &'a reqwest::Client,
    base: String,
    sid: String,
    token: String,
    from: Option<String>,
    webhook_url: Option<String>,
}

impl<'a> Twilio<'a> {
    /// Build from settings.
    pub fn new(http: &'a reqwest::Client, row: &ProviderRow) -> Result<Self, ChannelError> {
        let need = |v: Option<&str>, what: &str| {
            v.map(str::to_string)
                .ok_or_else(|| ChannelError::permanent(format!("twilio {what} is not set")))
        };
        Ok(Twilio {
            http,
            base: row
                .setting("base_url")
                .unwrap_or(DEFAULT_BASE)
                .trim_end_matches('/')
                .to_string(),
            sid: need(row.setting("account_sid"), "account_sid")?,
            token: need(row.secret("auth_token"), "auth_token")?,
            from: row.setting("from").map(str::to_string),
            webhook_url: row.setting("webhook_url").map(str::to_string),
        })
    }

    /// Send an SMS; returns the `MessageSid`. Twilio's Messages API takes no
    /// idempotency key: the `deliveries` ledger keeps retries from re-sending,
    /// except after a crash between Twilio's answer and the ledger write.
    pub async fn send(&self, to: &str, text: &str) -> Result<String, ChannelError> {
        let from = self
            .from
            .clone()
            .ok_or_else(|| ChannelError::permanent("twilio from is not set"))?;
        self.send_from(&from, to, text).await
    }

    /// Send an SMS from one of the account's numbers (masked-number messaging).
    pub async fn send_from(
        &self,
        from: &str,
        to: &str,
        text: &str,
    ) -> Result<String, ChannelError> {
        let form = [("To", to), ("From", from), ("Body", text)];
        self.post("Messages.json", &form).await
    }

    /// Buy (provision) a number and point its SMS webhook at us; returns its `PN…` sid.
    pub async fn provision(&self, e164: &str) -> Result<String, ChannelError> {
        let mut form = vec![("PhoneNumber", e164)];
        if let Some(url) = &self.webhook_url {
            form.push(("SmsUrl", url.as_str()));
        }
        self.post("IncomingPhoneNumbers.json", &form).await
    }

    /// Register an owned number for a use: its label and SMS webhook.
    pub async fn configure(&self, number_sid: &str, label: &str) -> Result<String, ChannelError> {
        let mut form = vec![("FriendlyName", label)];
        if let Some(url) = &self.webhook_url {
            form.push(("SmsUrl", url.as_str()));
        }
        self.post(&format!("IncomingPhoneNumbers/{number_sid}.json"), &form)
            .await
    }

    async fn post(&self, resource: &str, form: &[(&str, &str)]) -> Result<String, ChannelError> {
        let url = format!("{}/2010-04-01/Accounts/{}/{resource}", self.base, self.sid);
        let resp = self
            .http
            .post(url)
            .basic_auth(&self.sid, Some(&self.token))
            .form(form)
            .send()
            .await
            .map_err(|e| transport("twilio", e.without_url()))?;
        let status = resp.status();
        let retry_after = retry_after_header(resp.headers());
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return answer["sid"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| ChannelError::transient("twilio answered without a sid"));
        }
        Err(classify(
            "twilio",
            status,
            retry_after,
            answer["message"].as_str().unwrap_or("no description"),
        ))
    }
}
