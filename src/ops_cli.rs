//! `dispatch ops …` over the ops API: readable tables by default, `--json`
//! for scripts. The CLI holds no database access of its own for these
//! commands, so it works from any machine that reaches the API with an ops key.

use serde_json::{json, Value};

/// One ops call.
#[derive(Debug, Clone)]
pub enum OpsCall {
    /// List workflows (filters as query parameters).
    List(Vec<(String, String)>),
    /// Show one workflow.
    Show(String),
    /// Retry a dead effect.
    Retry {
        /// Workflow id.
        workflow: String,
        /// Effect id.
        effect: String,
        /// Why (audited).
        reason: String,
    },
    /// Fire a pending timer now.
    Fire {
        /// Workflow id.
        workflow: String,
        /// Timer id.
        timer: String,
        /// Why (audited).
        reason: String,
    },
    /// Send a signal by hand.
    Signal {
        /// Workflow id.
        workflow: String,
        /// Signal name.
        name: String,
        /// Signal payload.
        payload: Value,
        /// Why (audited).
        reason: String,
        /// Makes a retried command apply once.
        idempotency_key: String,
    },
    /// Cancel.
    Cancel {
        /// Workflow id.
        workflow: String,
        /// Why (audited).
        reason: String,
        /// Makes a retried command apply once.
        idempotency_key: String,
    },
    /// Force along a declared edge.
    Force {
        /// Workflow id.
        workflow: String,
        /// Target state.
        state: String,
        /// Why (audited).
        reason: String,
        /// Makes a retried command apply once.
        idempotency_key: String,
    },
    /// Read the audit log.
    Audit(Vec<(String, String)>),
}

/// Run a call against `base` with `key`; returns what to print.
pub async fn run(base: &str, key: &str, call: OpsCall, as_json: bool) -> Result<String, String> {
    let http = reqwest::Client::new();
    let base = base.trim_end_matches('/');
    let qs = |pairs: &[(String, String)]| -> String {
        let s: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        if s.is_empty() {
            s
        } else {
            format!("?{s}")
        }
    };
    let (method_post, path, body, idem) = match &call {
        OpsCall::List(q) => (false, format!("/v1/ops/workflows{}", qs(q)), None, None),
        OpsCall::Show(id) => (false, format!("/v1/ops/workflows/{id}"), None, None),
        OpsCall::Retry {
            workflow,
            effect,
            reason,
        } => (
            true,
            format!("/v1/ops/workflows/{workflow}/effects/{effect}/retry"),
            Some(json!({ "reason": reason })),
            None,
        ),
        OpsCall::Fire {
            workflow,
            timer,
            reason,
        } => (
            true,
            format!("/v1/ops/workflows/{workflow}/timers/{timer}/fire"),
            Some(json!({ "reason": reason })),
            None,
        ),
        OpsCall::Signal {
            workflow,
            name,
            payload,
            reason,
            idempotency_key,
        } => (
            true,
            format!("/v1/ops/workflows/{workflow}/signals"),
            Some(json!({ "name": name, "payload": payload, "reason": reason })),
            Some(idempotency_key.clone()),
        ),
        OpsCall::Cancel {
            workflow,
            reason,
            idempotency_key,
        } => (
            true,
            format!("/v1/ops/workflows/{workflow}/cancel"),
            Some(json!({ "reason": reason })),
            Some(idempotency_key.clone()),
        ),
        OpsCall::Force {
            workflow,
            state,
            reason,
            idempotency_key,
        } => (
            true,
            format!("/v1/ops/workflows/{workflow}/force"),
            Some(json!({ "state": state, "reason": reason })),
            Some(idempotency_key.clone()),
        ),
        OpsCall::Audit(q) => (false, format!("/v1/ops/audit{}", qs(q)), None, None),
    };
    let mut req = if method_post {
        http.post(format!("{base}{path}"))
    } else {
        http.get(format!("{base}{path}"))
    };
    req = req.bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    if let Some(k) = idem {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("cannot reach {base}: {e}"))?;
    let status = resp.status();
    let value: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let code = value["error"]["code"].as_str().unwrap_or("error");
        let message = value["error"]["message"].as_str().unwrap_or("");
        return Err(format!("{} {code}: {message}", status.as_u16()));
    }
    if as_json {
        return Ok(value.to_string());
    }
    Ok(match call {
        OpsCall::List(_) => {
            let rows: Vec<Vec<String>> = value["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| {
                    vec![
                        s(&i["id"]),
                        s(&i["kind"]),
                        s(&i["key"]),
                        s(&i["state"]),
                        s(&i["status"]),
                        s(&i["updated_at"]),
                        i["stuck"]
                            .as_array()
                            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            let mut out = table(
                &["ID", "KIND", "KEY", "STATE", "STATUS", "UPDATED", "STUCK"],
                &rows,
            );
            if let Some(next) = value["next"].as_str() {
                out.push_str(&format!("next page: --after '{next}'\n"));
            }
            out
        }
        OpsCall::Show(_) => {
            let mut out = format!(
                "{} {} {}  state {}  status {}  version {}\n",
                s(&value["kind"]),
                s(&value["key"]),
                s(&value["id"]),
                s(&value["state"]),
                s(&value["status"]),
                value["version"]
            );
            if let Some(a) = value["attention"].as_str() {
                out.push_str(&format!("attention: {a}\n"));
            }
            let effects: Vec<Vec<String>> = value["effects"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    vec![
                        s(&e["id"]),
                        s(&e["name"]),
                        s(&e["status"]),
                        e["attempts"].to_string(),
                        s(&e["last_error"]),
                    ]
                })
                .collect();
            out.push_str("\neffects\n");
            out.push_str(&table(
                &["ID", "NAME", "STATUS", "ATTEMPTS", "LAST ERROR"],
                &effects,
            ));
            let timers: Vec<Vec<String>> = value["pending_timers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| vec![s(&t["id"]), s(&t["name"]), s(&t["due_at"])])
                .collect();
            out.push_str("\ntimers\n");
            out.push_str(&table(&["ID", "NAME", "DUE"], &timers));
            let history: Vec<Vec<String>> = value["history"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| {
                    vec![
                        s(&h["at"]),
                        s(&h["event"]),
                        s(&h["signal_name"]),
                        s(&h["actor_role"]),
                        s(&h["to_state"]),
                        s(&h["reason"]),
                    ]
                })
                .collect();
            out.push_str("\nhistory\n");
            out.push_str(&table(
                &["AT", "EVENT", "SIGNAL", "ACTOR", "STATE", "REASON"],
                &history,
            ));
            out
        }
        OpsCall::Audit(_) => {
            let rows: Vec<Vec<String>> = value["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    vec![
                        s(&a["at"]),
                        s(&a["actor"]),
                        s(&a["action"]),
                        s(&a["workflow_id"]),
                        s(&a["target"]),
                        s(&a["reason"]),
                    ]
                })
                .collect();
            table(
                &["AT", "ACTOR", "ACTION", "WORKFLOW", "TARGET", "REASON"],
                &rows,
            )
        }
        _ => format!("{}\n", value),
    })
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A plain aligned table.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l: String = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}  "))
            .collect();
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}
