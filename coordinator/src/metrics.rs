//! Prometheus metrics. Request and token metrics go through the `metrics` facade (names in the
//! style of vLLM's, `switchyard_` prefixed); per-expert and per-worker counters are read from
//! their atomics when /metrics is rendered.

use crate::api::AppState;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::{fmt::Write, sync::atomic::Ordering::Relaxed};

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
    Ok(handle)
}

/// Appends the per-expert routed-token counters, KV-cache usage and per-worker dispatch figures.
pub fn append_cluster_metrics(text: &mut String, s: &AppState) {
    let c = &s.expert_counts;
    let _ = writeln!(text, "# HELP switchyard_expert_routed_tokens_total Token-expert assignments routed, per layer and expert.");
    let _ = writeln!(text, "# TYPE switchyard_expert_routed_tokens_total counter");
    for (k, v) in c.counts.iter().enumerate() {
        let _ = writeln!(
            text,
            "switchyard_expert_routed_tokens_total{{layer=\"{}\",expert=\"{}\"}} {}",
            k / c.experts,
            k % c.experts,
            v.load(Relaxed)
        );
    }
    let st = &s.scheduler.stats;
    let _ = writeln!(text, "# TYPE switchyard_kv_cache_blocks gauge");
    let _ = writeln!(
        text,
        "switchyard_kv_cache_blocks{{state=\"used\"}} {}",
        st.kv_blocks_used.load(Relaxed)
    );
    let _ = writeln!(
        text,
        "switchyard_kv_cache_blocks{{state=\"total\"}} {}",
        st.kv_blocks_total.load(Relaxed)
    );
    if let Some(r) = &s.remote {
        let _ = writeln!(text, "# HELP switchyard_worker_dispatch_latency_seconds Expert batch calls per worker: time from send to decoded reply.");
        let _ = writeln!(
            text,
            "# TYPE switchyard_worker_dispatch_latency_seconds summary"
        );
        let workers = r.snapshot();
        for w in &workers {
            let id = &w.id;
            let _ = writeln!(
                text,
                "switchyard_worker_dispatch_latency_seconds_sum{{worker=\"{id}\"}} {}",
                w.latency_micros as f64 / 1e6
            );
            let _ = writeln!(
                text,
                "switchyard_worker_dispatch_latency_seconds_count{{worker=\"{id}\"}} {}",
                w.calls
            );
        }
        let _ = writeln!(
            text,
            "# TYPE switchyard_worker_dispatch_failures_total counter"
        );
        for w in &workers {
            let _ = writeln!(
                text,
                "switchyard_worker_dispatch_failures_total{{worker=\"{}\"}} {}",
                w.id, w.failures
            );
        }
        let _ = writeln!(text, "# HELP switchyard_worker_up Whether the worker is in routing (1) or in failure back-off (0).");
        let _ = writeln!(text, "# TYPE switchyard_worker_up gauge");
        for w in &workers {
            let _ = writeln!(
                text,
                "switchyard_worker_up{{worker=\"{}\"}} {}",
                w.id,
                u8::from(w.up)
            );
        }
    }
}
