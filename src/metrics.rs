//! Prometheus metrics (`GET /metrics`). Names live here, in one place; labels
//! are low-cardinality (workflow kind, state, effect name, failure class,
//! queue) — never a tenant, key or anything personal.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Connections refused over `DISPATCH_HTTP_MAX_CONNECTIONS`.
pub const HTTP_CONNECTIONS_REFUSED: &str = "dispatch_http_connections_refused_total";
/// Requests whose body did not arrive within the body timeout.
pub const HTTP_BODY_TIMEOUTS: &str = "dispatch_http_body_timeouts_total";
/// Signals accepted by the API or intake, by workflow kind.
pub const SIGNALS_RECEIVED: &str = "dispatch_signals_received_total";
/// Signals applied (accepted by the transition), by kind.
pub const SIGNALS_APPLIED: &str = "dispatch_signals_applied_total";
/// Signals rejected by the transition, by kind.
pub const SIGNALS_REJECTED: &str = "dispatch_signals_rejected_total";
/// Transitions, by kind and the state entered.
pub const TRANSITIONS: &str = "dispatch_transitions_total";
/// Effect attempts, by effect name.
pub const EFFECT_ATTEMPTS: &str = "dispatch_effect_attempts_total";
/// Effect failures, by effect name and class (`transient`, `permanent`, `dead`).
pub const EFFECT_FAILURES: &str = "dispatch_effect_failures_total";
/// Effect attempt duration in seconds, by effect name.
pub const EFFECT_LATENCY: &str = "dispatch_effect_latency_seconds";
/// How late timers fire (queued as a signal minus due time), in seconds, by kind.
pub const TIMER_LATENESS: &str = "dispatch_timer_lateness_seconds";
/// Jobs waiting per queue (sampled at scrape).
pub const QUEUE_DEPTH: &str = "dispatch_queue_depth";
/// Workflows stuck (a dead effect or an overdue timer), sampled at scrape.
pub const STUCK_WORKFLOWS: &str = "dispatch_stuck_workflows";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
            .expect("static buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding host app): then
        // our series go there and this handle renders only what it holds.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    metrics::describe_counter!(SIGNALS_RECEIVED, "Signals accepted by the API or intake");
    metrics::describe_counter!(SIGNALS_APPLIED, "Signals applied by a transition");
    metrics::describe_counter!(SIGNALS_REJECTED, "Signals rejected by a transition");
    metrics::describe_counter!(TRANSITIONS, "Transitions by kind and state entered");
    metrics::describe_counter!(EFFECT_ATTEMPTS, "Effect attempts");
    metrics::describe_counter!(EFFECT_FAILURES, "Effect failures by class");
    metrics::describe_histogram!(
        EFFECT_LATENCY,
        metrics::Unit::Seconds,
        "Effect attempt duration"
    );
    metrics::describe_histogram!(
        TIMER_LATENESS,
        metrics::Unit::Seconds,
        "Timer lateness (fired minus due)"
    );
    metrics::describe_gauge!(QUEUE_DEPTH, "Jobs waiting per queue");
    metrics::describe_gauge!(
        STUCK_WORKFLOWS,
        "Workflows with a dead effect or an overdue timer"
    );
}
