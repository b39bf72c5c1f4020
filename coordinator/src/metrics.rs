//! Prometheus metrics, all through the `metrics` facade and its Prometheus exporter (names in
//! the style of vLLM's, `switchyard_` prefixed). Request, token and scheduler figures are
//! recorded where they happen; per-expert and per-worker counters live in atomics on the hot
//! path and are copied into the registry when /metrics is rendered.

use crate::api::AppState;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::Ordering::Relaxed;

/// Latency buckets in seconds: 1 ms to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the process-wide recorder (once) and returns the handle that renders it.
pub fn install() -> Result<PrometheusHandle, String> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
    describe();
    zero();
    Ok(handle)
}

/// Unlabelled counters start at 0 rather than appearing at their first event, so a dashboard's
/// `rate()` has a series from the start.
fn zero() {
    for name in [
        "switchyard_prompt_tokens_total",
        "switchyard_generation_tokens_total",
        "switchyard_preemptions_total",
        "switchyard_requests_cancelled_total",
        "switchyard_prefix_cache_queries_total",
        "switchyard_prefix_cache_hits_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
}

fn describe() {
    metrics::describe_counter!(
        "switchyard_expert_routed_tokens_total",
        "Token-expert assignments routed, per layer and expert."
    );
    metrics::describe_gauge!(
        "switchyard_kv_cache_blocks",
        "KV-cache blocks in use and in all."
    );
    metrics::describe_histogram!(
        "switchyard_worker_dispatch_latency_seconds",
        "Expert batch calls per worker: seconds from send to decoded reply."
    );
    metrics::describe_counter!(
        "switchyard_worker_dispatch_failures_total",
        "Expert batch calls per worker that failed."
    );
    metrics::describe_gauge!(
        "switchyard_worker_up",
        "Whether the worker is in routing (1) or in failure back-off (0)."
    );
}

/// Copies the per-expert routed-token counts and the per-worker failure counts and health into
/// the registry, just before it is rendered (each call's latency is recorded by the
/// dispatcher as it happens).
pub fn record_cluster(s: &AppState) {
    let c = &s.expert_counts;
    for (k, v) in c.counts.iter().enumerate() {
        let (layer, expert) = ((k / c.experts).to_string(), (k % c.experts).to_string());
        metrics::counter!("switchyard_expert_routed_tokens_total", "layer" => layer, "expert" => expert)
            .absolute(v.load(Relaxed));
    }
    let Some(r) = &s.remote else { return };
    for w in r.snapshot() {
        let id = w.id.to_string();
        metrics::counter!("switchyard_worker_dispatch_failures_total", "worker" => id.clone())
            .absolute(w.failures);
        metrics::gauge!("switchyard_worker_up", "worker" => id).set(f64::from(u8::from(w.up)));
    }
}
