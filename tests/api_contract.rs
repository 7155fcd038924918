//! `/openapi.json` describes every route the router serves: the router and
//! the document are built from one list (`utoipa_axum::routes!`), and here
//! every documented operation is called to show the router answers it.
//! (The document's validity is checked by `openapi-spec-validator` in CI.)

mod common;

use common::*;
use serde_json::Value;

#[tokio::test]
async fn every_documented_operation_is_served_and_nothing_else_is() {
    let app = TestApp::spawn().await;
    let doc: Value = app
        .http
        .get(format!("{}/openapi.json", app.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        // Fill path parameters with well-formed values.
        let concrete = path
            .replace("{id}", "0192f0c0-0000-7000-8000-000000000000")
            .replace("{effect_id}", "0192f0c0-0000-7000-8000-000000000001")
            .replace("{timer_id}", "0192f0c0-0000-7000-8000-000000000002")
            .replace("{tenant}", &app.keys.tenant)
            .replace("{provider}", "telegram")
            .replace("{kind}", "dispatch")
            .replace("{key}", "k1")
            .replace("{name}", "nightly");
        assert!(!concrete.contains('{'), "unfilled parameter in {path}");
        for method in item.as_object().unwrap().keys() {
            let m: reqwest::Method = method.to_uppercase().parse().unwrap();
            let r = app
                .http
                .request(m, format!("{}{concrete}", app.url))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert_ne!(status, 405, "{method} {path} is documented but not routed");
            assert_ne!(
                body["error"]["code"], "no_such_route",
                "{method} {path} is documented but not routed"
            );
            assert!(status < 500, "{method} {path} answered {status}");
            operations += 1;
        }
    }
    assert!(operations >= 30, "only {operations} operations documented");
    for must in [
        "/v1/workflows",
        "/v1/ops/workflows",
        "/v1/ops/audit",
        "/metrics",
        "/ops",
    ] {
        assert!(paths.contains_key(must), "{must} missing from the document");
    }
    // A route nobody declared is not served.
    let r = app
        .http
        .get(format!("{}/v1/nothing-here", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_such_route");
}
