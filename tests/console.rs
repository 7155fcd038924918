//! The ops web console end to end, in headless Chromium driven over the W3C
//! WebDriver protocol (Debian's `chromium` + `chromedriver`, installed by
//! `.ci/run`): sign in with an ops key, find the stuck workflow, retry its
//! dead effect with a reason, and see the workflow move on.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use uuid::Uuid;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A few WebDriver commands over reqwest (the protocol is JSON over HTTP).
struct Browser {
    http: reqwest::Client,
    session: String,
    _driver: Child,
}

impl Browser {
    async fn launch() -> Browser {
        let driver_bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start `{driver_bin}` ({e}): install Debian's chromium and chromium-driver (.ci/run does)")
            });
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        wait_for(
            Duration::from_secs(20),
            "chromedriver to listen",
            || async {
                let r = http.get(format!("{base}/status")).send().await.ok()?;
                let v: Value = r.json().await.ok()?;
                (v["value"]["ready"] == true).then_some(())
            },
        )
        .await;
        let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]
            }
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_string();
        Browser {
            http,
            session: format!("{base}/session/{session}"),
            _driver: driver,
        }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.session));
        if method != reqwest::Method::GET {
            req = req.json(&body);
        }
        let r: Value = req.send().await.unwrap().json().await.unwrap();
        r["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    /// Run a script in the page and return its result.
    async fn js(&self, script: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    /// Find an element by CSS selector, waiting for it to appear.
    async fn find(&self, css: &str) -> String {
        wait_for(Duration::from_secs(20), css, || async {
            let v = self
                .cmd(
                    reqwest::Method::POST,
                    "/element",
                    json!({ "using": "css selector", "value": css }),
                )
                .await;
            v[ELEMENT].as_str().map(str::to_string)
        })
        .await
    }

    /// Click, finding the element again if the page re-rendered it meanwhile.
    async fn click(&self, css: &str) {
        wait_for(
            Duration::from_secs(20),
            &format!("a click on {css}"),
            || async {
                let id = self.find(css).await;
                let v = self
                    .cmd(
                        reqwest::Method::POST,
                        &format!("/element/{id}/click"),
                        json!({}),
                    )
                    .await;
                if v["error"] == "stale element reference" {
                    return None;
                }
                assert!(v.is_null(), "click on {css} failed: {v}");
                Some(())
            },
        )
        .await
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        let v = self
            .cmd(
                reqwest::Method::POST,
                &format!("/element/{id}/value"),
                json!({ "text": text }),
            )
            .await;
        assert!(v.is_null(), "typing into {css} failed: {v}");
    }

    /// Wait until `script` returns something truthy, and return it.
    async fn until(&self, what: &str, script: &str) -> Value {
        wait_for(Duration::from_secs(30), what, || async {
            let v = self.js(script).await;
            let truthy = !(v.is_null() || v == false || v == "" || v == 0);
            truthy.then_some(v)
        })
        .await
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the browser; the driver process is killed with the Child.
        let url = self.session.clone();
        let http = self.http.clone();
        tokio::spawn(async move {
            let _ = http.delete(url).send().await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_finds_a_stuck_workflow_retries_it_and_sees_it_complete() {
    let app = TestApp::spawn().await;
    // The channel is down: the publish dead-letters and the workflow is stuck.
    app.set_config(json!({"log_channel": {"fail_first": 100, "failure": "permanent"}}))
        .await;
    let lead = Uuid::new_v4().to_string();
    let (code, started) = app
        .start(&app.keys.integration, "dispatch", &lead, lead_input(None))
        .await;
    assert_eq!(code, 201, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    app.wait_effects_settled().await;
    // Someone else's healthy workflow, which the stuck filter must leave out.
    let healthy = Uuid::new_v4().to_string();
    app.set_config(json!({})).await;
    app.start(
        &app.keys.integration,
        "dispatch",
        &healthy,
        lead_input(None),
    )
    .await;
    app.wait_state(&healthy, "PUBLISHED").await;

    let b = Browser::launch().await;
    b.goto(&format!("{}/ops", app.url)).await;
    // A wrong key is refused.
    b.type_into("#key", "dsp_wrong").await;
    b.click("#signin button[type=submit]").await;
    b.until(
        "the refusal",
        "return document.querySelector('#signin-error')?.textContent",
    )
    .await;
    b.js("document.querySelector('#key').value = ''").await;
    b.type_into("#key", &app.keys.ops).await;
    b.click("#signin button[type=submit]").await;

    // Filter to stuck workflows: ours is there, with its reason; the healthy one is not.
    b.click("#filter-stuck").await;
    b.click("#filters button[type=submit]").await;
    let row = b
        .until(
            "the stuck list",
            &format!(
                "const t = document.querySelector('#workflows'); \
                 return location.hash.includes('stuck=true') && t && t.textContent.includes('{lead}') && t.textContent"
            ),
        )
        .await;
    let listed = row.as_str().unwrap();
    assert!(listed.contains("effect_dead"), "{listed}");
    assert!(!listed.contains(&healthy), "only stuck workflows: {listed}");
    b.click(&format!("tr[data-key='{lead}'] a.open")).await;

    // The workflow page: diagram with the current state, the dead effect.
    let current = b
        .until(
            "the diagram",
            "return document.querySelector('#diagram g.state.current')?.dataset.state",
        )
        .await;
    assert_eq!(current, "NEW");
    let states = b
        .js("return [...document.querySelectorAll('#diagram g.state')].map(g => g.dataset.state)")
        .await;
    for s in ["PUBLISHED", "CLAIMED", "DETAILS_RELEASED", "CANCELLED"] {
        assert!(
            states.as_array().unwrap().iter().any(|x| x == s),
            "{s} in {states}"
        );
    }
    assert!(b
        .js("return document.querySelector('#history').textContent")
        .await
        .as_str()
        .unwrap()
        .contains("effect_dead"));

    // Retry: the reason prompt must be answered.
    b.click("#effects tr[data-status=dead] button.retry").await;
    b.until(
        "the reason prompt",
        "return document.querySelector('#reason-dialog').open",
    )
    .await;
    b.type_into("#reason-input", "provider outage over (console)")
        .await;
    b.click("#reason-ok").await;

    // The page refreshes by itself until the workflow has moved on.
    b.until(
        "the workflow to reach PUBLISHED in the console",
        "return document.querySelector('#state')?.textContent === 'PUBLISHED' \
         && document.querySelector('#diagram g.state.current')?.dataset.state === 'PUBLISHED' \
         && document.querySelector('#effects tr[data-status=delivered]') !== null \
         && !document.querySelector('#attention')",
    )
    .await;
    let audit_text = b
        .until(
            "the audit entry on the page",
            "return document.querySelector('#audit')?.textContent",
        )
        .await;
    assert!(audit_text
        .as_str()
        .unwrap()
        .contains("provider outage over (console)"));

    if let Ok(path) = std::env::var("CONSOLE_SCREENSHOT") {
        // For people: `CONSOLE_SCREENSHOT=/tmp/console.png cargo test --test console`.
        use base64::Engine as _;
        let png = b
            .cmd(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    // The API agrees: delivered once, audited with the typed reason.
    let wf = app.wait_state(&lead, "PUBLISHED").await;
    assert_eq!(wf["effects"][0]["status"], "delivered");
    let r: Value = app
        .http
        .get(format!("{}/v1/ops/audit?workflow_id={id}", app.url))
        .bearer_auth(&app.keys.ops)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = r["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{r}");
    assert_eq!(items[0]["action"], "retry_effect");
    assert_eq!(items[0]["reason"], "provider outage over (console)");
    let publish_key = wf["effects"][0]["idempotency_key"].as_str().unwrap();
    let publishes = app
        .deliveries()
        .await
        .into_iter()
        .filter(|(k, _, _)| k == publish_key)
        .count();
    assert_eq!(publishes, 1, "the retried publish went out once");
}
