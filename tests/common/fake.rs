//! A fake of the providers' HTTP APIs (Telegram, WhatsApp Cloud, Twilio,
//! Resend, SendGrid) on a random local port. It records every request, answers
//! like the provider, fails on demand, and can enforce a per-chat rate limit
//! the way Telegram does (429 with `retry_after`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
    pub status: u16,
}

/// Status, JSON body and extra headers of a fake answer.
type Answer = (u16, Value, Vec<(String, String)>);

struct Script {
    path_contains: String,
    /// Only requests whose body contains this text.
    body_contains: Option<String>,
    status: u16,
    body: Value,
    headers: Vec<(String, String)>,
    times: usize,
}

#[derive(Default)]
struct FakeState {
    requests: Vec<Recorded>,
    scripts: Vec<Script>,
    max_per_chat_per_s: Option<usize>,
    sent_per_chat: HashMap<String, Vec<Instant>>,
    counter: u64,
}

/// The running fake.
#[derive(Clone)]
pub struct Fake {
    pub url: String,
    state: Arc<Mutex<FakeState>>,
}

impl Fake {
    pub async fn start() -> Fake {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Fake { url, state }
    }

    /// Answer the next `times` requests whose path contains `path` with this status and body.
    pub fn fail(
        &self,
        path: &str,
        status: u16,
        body: Value,
        headers: &[(&str, &str)],
        times: usize,
    ) {
        self.state.lock().unwrap().scripts.push(Script {
            path_contains: path.into(),
            body_contains: None,
            status,
            body,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            times,
        });
    }

    /// Like [`Fake::fail`], for requests whose body contains `text` only.
    pub fn fail_matching(&self, path: &str, text: &str, status: u16, body: Value, times: usize) {
        self.state.lock().unwrap().scripts.push(Script {
            path_contains: path.into(),
            body_contains: Some(text.into()),
            status,
            body,
            headers: vec![],
            times,
        });
    }

    /// Refuse (429) a Telegram message to a chat that already got `n` in the
    /// last second, the way Telegram enforces its per-chat limit.
    pub fn enforce_chat_rate(&self, n: usize) {
        self.state.lock().unwrap().max_per_chat_per_s = Some(n);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Requests whose path contains `path`, answered with 2xx.
    pub fn ok_calls(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.contains(path) && r.status < 300)
            .collect()
    }
}

fn body_value(headers: &HeaderMap, body: &Bytes) -> Value {
    let form = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.contains("form"));
    if form {
        let map: serde_json::Map<String, Value> = url::form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), Value::from(v.into_owned())))
            .collect();
        Value::Object(map)
    } else {
        serde_json::from_slice(body).unwrap_or(Value::Null)
    }
}

async fn handle(
    State(state): State<Arc<Mutex<FakeState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let body = body_value(&headers, &body);
    let mut st = state.lock().unwrap();
    st.counter += 1;
    let n = st.counter;
    let mut response: Option<Answer> = None;
    let text = body.to_string();
    if let Some(i) = st.scripts.iter().position(|s| {
        path.contains(&s.path_contains)
            && s.times > 0
            && s.body_contains
                .as_ref()
                .is_none_or(|t| text.contains(t.as_str()))
    }) {
        let s = &mut st.scripts[i];
        s.times -= 1;
        response = Some((s.status, s.body.clone(), s.headers.clone()));
    }
    // Like Meta: template parameters may not contain newlines or tabs (error 132018).
    if response.is_none() && path.ends_with("/messages") {
        let params = body["template"]["components"][0]["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if params.iter().any(|p| {
            p["text"]
                .as_str()
                .is_some_and(|t| t.contains('\n') || t.contains('\t'))
        }) {
            response = Some((
                400,
                json!({"error": {"message": "(#132018) There was an issue with the parameters in your template.", "code": 132018}}),
                vec![],
            ));
        }
    }
    let telegram_send = path.contains("/sendMessage") || path.contains("/editMessageText");
    if response.is_none() && telegram_send {
        if let Some(max) = st.max_per_chat_per_s {
            let chat = body["chat_id"].to_string();
            let now = Instant::now();
            let sent = st.sent_per_chat.entry(chat).or_default();
            sent.retain(|t| now.duration_since(*t) < Duration::from_secs(1));
            if sent.len() >= max {
                response = Some((
                    429,
                    json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry after 1", "parameters": {"retry_after": 1}}),
                    vec![],
                ));
            } else {
                sent.push(now);
            }
        }
    }
    let (status, answer, extra) = response.unwrap_or_else(|| default_answer(&path, &body, n));
    st.requests.push(Recorded {
        at: Instant::now(),
        method: method.to_string(),
        path: path.clone(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body,
        status,
    });
    drop(st);
    let mut resp = (StatusCode::from_u16(status).unwrap(), axum::Json(answer)).into_response();
    for (k, v) in extra {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    resp
}

fn default_answer(path: &str, body: &Value, n: u64) -> Answer {
    if path.contains("/sendMessage") {
        (
            200,
            json!({"ok": true, "result": {"message_id": 1000 + n, "chat": {"id": body["chat_id"]}}}),
            vec![],
        )
    } else if path.contains("/editMessageText") || path.contains("/answerCallbackQuery") {
        (200, json!({"ok": true, "result": true}), vec![])
    } else if path.ends_with("/messages") {
        (
            200,
            json!({"messaging_product": "whatsapp", "messages": [{"id": format!("wamid.{n}")}]}),
            vec![],
        )
    } else if path.ends_with("/Messages.json") {
        (
            201,
            json!({"sid": format!("SM{n:032}"), "status": "queued"}),
            vec![],
        )
    } else if path.ends_with("/IncomingPhoneNumbers.json") {
        (
            201,
            json!({"sid": format!("PN{n:032}"), "phone_number": body["PhoneNumber"]}),
            vec![],
        )
    } else if path.contains("/IncomingPhoneNumbers/") {
        let sid = path
            .rsplit('/')
            .next()
            .unwrap_or("")
            .trim_end_matches(".json");
        (
            200,
            json!({"sid": sid, "friendly_name": body["FriendlyName"]}),
            vec![],
        )
    } else if path.ends_with("/emails") {
        (200, json!({"id": format!("email-{n}")}), vec![])
    } else if path.ends_with("/v3/mail/send") {
        (
            202,
            Value::Null,
            vec![("x-message-id".into(), format!("sg-{n}"))],
        )
    } else {
        (404, json!({"error": "unknown path"}), vec![])
    }
}
