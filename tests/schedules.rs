//! Recurring schedules: each tick fired once across worker processes, and
//! missed ticks caught up or skipped as the schedule declares.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use dispatch::ProcessRole;
use serde_json::{json, Value};

fn worker(db_url: &str) -> Child {
    worker_with(db_url, &[])
}

fn worker_with(db_url: &str, env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dispatch"))
        .args(["serve", "--role", "worker"])
        .envs(env.iter().copied())
        .env("DATABASE_URL", db_url)
        .env("DISPATCH_BENCH_WORKLOAD", "1")
        .env("ENABLED_WORKFLOWS", "bench_chain")
        .env("DISPATCH_POLL_MS", "100")
        .env(
            "RUST_LOG",
            if std::env::var("TEST_LOG").is_ok() {
                "info"
            } else {
                "off"
            },
        )
        .env_remove("DISPATCH_FAULT")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn worker")
}

async fn api() -> TestApp {
    TestApp::spawn_with(ProcessRole::Api, |s| s.bench_workload = true).await
}

async fn put_schedule(app: &TestApp, name: &str, body: Value) -> (u16, Value) {
    let r = app
        .http
        .put(format!("{}/v1/tenants/acme/schedules/{name}", app.url))
        .bearer_auth(&app.keys.ops)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn target(app: &TestApp, key: &str) {
    let (code, body) = app
        .start(&app.keys.integration, "bench_chain", key, json!({}))
        .await;
    assert_eq!(code, 201, "{body}");
}

/// The tick times of a schedule's signals, in order.
async fn ticks_of(app: &TestApp, name: &str) -> Vec<DateTime<Utc>> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "select payload from signals where idempotency_key like $1 order by received_at",
    )
    .bind(format!("schedule:{name}:%"))
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut ticks: Vec<DateTime<Utc>> = rows
        .into_iter()
        .map(|(p,)| serde_json::from_value(p["tick"].clone()).unwrap())
        .collect();
    ticks.sort();
    ticks
}

async fn counters(app: &TestApp, name: &str) -> (i64, i64) {
    sqlx::query_as("select ticks, skipped from schedules where name = $1")
        .bind(name)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn wf_ticks(app: &TestApp, key: &str) -> i64 {
    let (n,): (Option<i64>,) =
        sqlx::query_as("select (state->>'ticks')::bigint from workflows where key = $1")
            .bind(key)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    n.unwrap_or(0)
}

#[tokio::test]
async fn two_worker_processes_fire_a_per_second_schedule_once_per_tick() {
    let app = api().await;
    target(&app, "every-second").await;
    let (code, body) = put_schedule(
        &app,
        "each-second",
        json!({"cron": "* * * * * *", "policy": "catch_up", "signal": "tick",
               "workflow": {"kind": "bench_chain", "key": "every-second"}}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["policy"], "catch_up");

    let mut a = worker(&app.db_url);
    let mut b = worker(&app.db_url);
    wait_for(Duration::from_secs(30), "five ticks", || async {
        (counters(&app, "each-second").await.0 >= 5).then_some(())
    })
    .await;
    // Stop the ticks, then let the workers apply what fired.
    let (fired,): (i64,) =
        sqlx::query_as("update schedules set next_at = now() + interval '1 day' where name = 'each-second' returning ticks")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    wait_for(Duration::from_secs(30), "every tick applied", || async {
        (wf_ticks(&app, "every-second").await >= fired).then_some(())
    })
    .await;
    for w in [&mut a, &mut b] {
        w.kill().unwrap();
        w.wait().unwrap();
    }
    let ticks = ticks_of(&app, "each-second").await;
    let (fired, skipped) = counters(&app, "each-second").await;
    assert_eq!(ticks.len() as i64, fired, "one signal per tick fired");
    assert_eq!(skipped, 0);
    for pair in ticks.windows(2) {
        assert_eq!(
            (pair[1] - pair[0]).num_milliseconds(),
            1000,
            "consecutive seconds, none twice, none missing: {ticks:?}"
        );
    }
    assert_eq!(
        wf_ticks(&app, "every-second").await,
        fired,
        "every tick reached the workflow once"
    );
}

#[tokio::test]
async fn after_three_minutes_down_a_per_minute_schedule_catches_up_or_skips_as_declared() {
    let app = api().await;
    target(&app, "caught-up").await;
    target(&app, "skipped").await;
    for (name, policy, key) in [
        ("minutely-catch-up", "catch_up", "caught-up"),
        ("minutely-skip", "skip", "skipped"),
    ] {
        let (code, body) = put_schedule(
            &app,
            name,
            json!({"cron": "0 * * * * *", "policy": policy, "signal": "tick",
                   "workflow": {"kind": "bench_chain", "key": key}}),
        )
        .await;
        assert_eq!(code, 200, "{body}");
    }
    // No worker ran for three minutes: the next tick due is three minutes old.
    let (due,): (DateTime<Utc>,) = sqlx::query_as(
        "update schedules set next_at = date_trunc('minute', now()) - interval '3 minutes'
         returning next_at",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();

    let mut w = worker(&app.db_url);
    wait_for(Duration::from_secs(30), "both schedules fired", || async {
        let c = counters(&app, "minutely-catch-up").await.0;
        let s = counters(&app, "minutely-skip").await.0;
        (c >= 4 && s >= 1).then_some(())
    })
    .await;
    w.kill().unwrap();
    w.wait().unwrap();

    // catch_up: the three missed minutes and the current one, in order, once each.
    let caught = ticks_of(&app, "minutely-catch-up").await;
    let want: Vec<DateTime<Utc>> = (0..caught.len() as i64)
        .map(|i| due + chrono::Duration::minutes(i))
        .collect();
    assert!(caught.len() >= 4, "{caught:?}");
    assert_eq!(caught, want, "every missed minute, once");
    assert_eq!(counters(&app, "minutely-catch-up").await.1, 0);

    // skip: the three missed minutes counted as skipped, only the on-time one fired.
    let fired = ticks_of(&app, "minutely-skip").await;
    let (n, skipped) = counters(&app, "minutely-skip").await;
    assert_eq!(skipped, 3, "three missed ticks skipped");
    assert_eq!(fired.len() as i64, n);
    assert!(
        fired[0] >= due + chrono::Duration::minutes(3),
        "no missed tick fired: {fired:?}"
    );
}

#[tokio::test]
async fn a_schedule_is_validated_listed_and_deleted() {
    let app = api().await;
    let good = json!({"cron": "0 0 8 * * Mon-Fri", "timezone": "Asia/Jerusalem", "signal": "tick",
                      "workflow": {"kind": "bench_chain", "key": "digest"}});
    for (body, why) in [
        (
            json!({"cron": "every morning", "signal": "tick", "workflow": {"kind": "bench_chain", "key": "k"}}),
            "not cron",
        ),
        (
            json!({"cron": "0 8 * * *", "timezone": "Mars/Olympus", "signal": "tick", "workflow": {"kind": "bench_chain", "key": "k"}}),
            "not a zone",
        ),
        (
            json!({"cron": "0 8 * * *", "policy": "sometimes", "signal": "tick", "workflow": {"kind": "bench_chain", "key": "k"}}),
            "not a policy",
        ),
        (
            json!({"cron": "0 8 * * *", "signal": "tick", "workflow": {"kind": "nope", "key": "k"}}),
            "unknown kind",
        ),
        (
            json!({"cron": "0 8 * * *", "signal": "tick", "workflow": {"kind": "bench_chain", "key": "k"}, "extra": 1}),
            "unknown field",
        ),
    ] {
        let (code, body) = put_schedule(&app, "digest", body).await;
        assert!(code == 422 || code == 400, "{why}: {code} {body}");
        assert!(body["error"]["code"].is_string(), "{why}: {body}");
    }
    let (code, _) = put_schedule(&app, "Bad Name", good.clone()).await;
    assert_eq!(code, 422);
    let (code, body) = put_schedule(&app, "digest", good).await;
    assert_eq!(code, 200, "{body}");
    // 08:00 in Jerusalem is 05:00 or 06:00 UTC (daylight saving time).
    let next: DateTime<Utc> = serde_json::from_value(body["next_at"].clone()).unwrap();
    let hour = next.format("%H").to_string();
    assert!(hour == "05" || hour == "06", "{next}");

    let list: Value = app
        .http
        .get(format!("{}/v1/tenants/acme/schedules", app.url))
        .bearer_auth(&app.keys.operator)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["schedules"].as_array().unwrap().len(), 1);
    assert_eq!(list["schedules"][0]["name"], "digest");

    let del = |who: String| {
        let http = app.http.clone();
        let url = format!("{}/v1/tenants/acme/schedules/digest", app.url);
        async move {
            http.delete(url)
                .bearer_auth(who)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        del(app.keys.operator.clone()).await,
        403,
        "operators read, ops change"
    );
    assert_eq!(del(app.keys.ops.clone()).await, 204);
    assert_eq!(del(app.keys.ops.clone()).await, 404);
}

#[tokio::test]
async fn the_purge_schedule_removes_finished_workflows_old_signals_only() {
    let app = api().await;
    target(&app, "finished").await;
    target(&app, "running").await;
    for (key, steps) in [("finished", 2), ("running", 1)] {
        for i in 0..steps {
            let (code, body) = app
                .post(
                    &app.keys.integration,
                    &format!("/v1/workflows/bench_chain/{key}/signals"),
                    json!({"name": "step"}),
                    Some(&format!("s{i}")),
                )
                .await;
            assert_eq!(code, 202, "{body}");
        }
    }
    let mut w = worker_with(&app.db_url, &[("DISPATCH_RETENTION_MS", "1000")]);
    wait_for(
        Duration::from_secs(30),
        "the workflows advanced",
        || async {
            let (n,): (i64,) =
                sqlx::query_as("select count(*) from signals where status = 'applied'")
                    .fetch_one(&app.pool)
                    .await
                    .unwrap();
            (n == 3).then_some(())
        },
    )
    .await;
    // The signals are a day old; the purge is due now.
    sqlx::query("update signals set received_at = now() - interval '1 day'")
        .execute(&app.pool)
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        "the purge schedule exists",
        || async {
            let r: Option<(i64,)> = sqlx::query_as(
                "select ticks from schedules where name = 'purge' and tenant_id is null",
            )
            .fetch_optional(&app.pool)
            .await
            .unwrap();
            r.map(|_| ())
        },
    )
    .await;
    sqlx::query("update schedules set next_at = now() where name = 'purge'")
        .execute(&app.pool)
        .await
        .unwrap();
    wait_for(Duration::from_secs(30), "the purge ran", || async {
        let (n,): (i64,) = sqlx::query_as(
            "select count(*) from signals s join workflows w on w.id = s.workflow_id where w.key = 'finished'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        (n == 0).then_some(())
    })
    .await;
    w.kill().unwrap();
    w.wait().unwrap();
    let (kept,): (i64,) = sqlx::query_as(
        "select count(*) from signals s join workflows w on w.id = s.workflow_id where w.key = 'running'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(kept, 1, "a running workflow keeps its signals");
    let (history,): (i64,) = sqlx::query_as(
        "select count(*) from history h join workflows w on w.id = h.workflow_id where w.key = 'finished'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(history >= 3, "history keeps what happened");
    let (ticks,): (i64,) = sqlx::query_as("select ticks from schedules where name = 'purge'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(ticks, 1);
}
