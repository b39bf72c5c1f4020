//! The operator's view of a running coordinator: `GET /v1/cluster` (JSON, behind the API key
//! when keys are set) and `GET /dashboard`, a page built into the binary that polls it: which
//! experts are hot in which layer, each worker's load and health, the planner's last move, and
//! the requests' latencies as sparklines.

pub mod history;
pub mod prom;

use crate::{api::AppState, dispatch::WorkerSnapshot, membership::PlanChange};
use axum::{
    extract::State,
    http::header,
    response::{IntoResponse, Response},
    Json,
};
use history::{before, Sample, POINT, WINDOW};
use serde::Serialize;
use std::sync::Arc;

/// The page: HTML, CSS and script in one file, no requests beyond `/v1/cluster`.
const PAGE: &str = include_str!("page.html");

/// `GET /dashboard`. The page holds no data; it asks for the API key when `/v1/cluster`
/// answers 401.
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src data:",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /v1/cluster`.
pub async fn cluster(State(s): State<Arc<AppState>>) -> Response {
    let samples = s.history.samples();
    Json(view(&s, &samples)).into_response()
}

#[derive(Serialize)]
struct View {
    unix_ms: u64,
    model: String,
    /// `embedded`, or `cluster` (static placement or etcd).
    mode: &'static str,
    uptime_s: u64,
    /// Seconds the heatmap and the workers' figures cover (less just after start).
    window_s: f64,
    experts: Experts,
    workers: Vec<WorkerView>,
    /// Workers hosting each expert in every layer.
    replicas: Vec<usize>,
    planner: Option<PlanChange>,
    requests: Requests,
}

#[derive(Serialize)]
struct Experts {
    layers: usize,
    experts: usize,
    /// Tokens routed to `[layer][expert]` over the window.
    routed: Vec<Vec<u64>>,
    /// Summed over layers.
    per_expert: Vec<u64>,
    /// Largest cell over the mean cell; None with nothing routed.
    imbalance: Option<f64>,
}

#[derive(Serialize)]
struct WorkerView {
    id: String,
    up: bool,
    /// Experts it hosts in every layer.
    experts: Vec<u32>,
    rows_per_s: f64,
    calls_per_s: f64,
    /// Fraction of the window its replies say it spent computing for this coordinator.
    busy: f64,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    failures: u64,
    /// From its registry record (etcd only).
    device: Option<String>,
    weight_format: Option<String>,
    weight_bytes: Option<u64>,
    memory_budget_bytes: Option<u64>,
}

#[derive(Serialize)]
struct Requests {
    now: Point,
    /// One point per sample over the kept history, oldest first.
    series: Vec<Point>,
}

#[derive(Clone, Serialize)]
struct Point {
    /// Seconds relative to now (≤ 0).
    t: f64,
    running: usize,
    waiting: usize,
    kv_usage: f64,
    tok_per_s: f64,
    ttft_p50_ms: Option<f64>,
    ttft_p99_ms: Option<f64>,
    itl_p50_ms: Option<f64>,
    itl_p99_ms: Option<f64>,
    /// Prompt tokens served from the prefix cache over prompt tokens looked up.
    prefix_hit_rate: Option<f64>,
}

const TTFT: &str = "switchyard_time_to_first_token_seconds";
const ITL: &str = "switchyard_inter_token_latency_seconds";

fn ms(v: Option<f64>) -> Option<f64> {
    v.map(|s| (s * 1e5).round() / 100.0)
}

fn point(now: &Sample, then: &Sample, newest: &Sample) -> Point {
    let dt = now.at.duration_since(then.at).as_secs_f64();
    let rate = |k: &str| {
        if dt > 0.0 {
            now.prom.delta(&then.prom, k) / dt
        } else {
            0.0
        }
    };
    let queries = now
        .prom
        .delta(&then.prom, "switchyard_prefix_cache_queries_total");
    let hits = now
        .prom
        .delta(&then.prom, "switchyard_prefix_cache_hits_total");
    Point {
        t: -newest.at.duration_since(now.at).as_secs_f64(),
        running: now.sched.running,
        waiting: now.sched.waiting,
        kv_usage: now.sched.kv_blocks_used as f64 / now.sched.kv_blocks_total.max(1) as f64,
        tok_per_s: rate("switchyard_generation_tokens_total"),
        ttft_p50_ms: ms(now.prom.quantile(&then.prom, TTFT, 0.5)),
        ttft_p99_ms: ms(now.prom.quantile(&then.prom, TTFT, 0.99)),
        itl_p50_ms: ms(now.prom.quantile(&then.prom, ITL, 0.5)),
        itl_p99_ms: ms(now.prom.quantile(&then.prom, ITL, 0.99)),
        prefix_hit_rate: (queries > 0.0).then(|| hits / queries),
    }
}

fn view(s: &AppState, samples: &[Arc<Sample>]) -> View {
    let layers = s.engine.config().num_hidden_layers;
    let experts = s.expert_counts.experts;
    let empty = || Sample {
        at: std::time::Instant::now(),
        unix_ms: switchyard_cluster::record::unix_ms(),
        routed: vec![0; layers * experts],
        workers: Vec::new(),
        sched: s.scheduler.stats(),
        prom: prom::Exposition::default(),
    };
    let (newest, oldest) = match samples.last() {
        Some(n) => (n.as_ref().clone(), before(samples, n, WINDOW).cloned()),
        None => (empty(), None),
    };
    let oldest = oldest.unwrap_or_else(|| newest.clone());
    let dt = newest.at.duration_since(oldest.at).as_secs_f64();
    let routed: Vec<Vec<u64>> = (0..layers)
        .map(|l| {
            (0..experts)
                .map(|e| {
                    let at = |x: &Sample| x.routed.get(l * experts + e).copied().unwrap_or(0);
                    at(&newest).saturating_sub(at(&oldest))
                })
                .collect()
        })
        .collect();
    let per_expert: Vec<u64> = (0..experts)
        .map(|e| routed.iter().map(|l| l[e]).sum())
        .collect();
    let cells: Vec<u64> = routed.iter().flatten().copied().collect();
    let total: u64 = cells.iter().sum();
    let imbalance = (total > 0).then(|| {
        let mean = total as f64 / cells.len() as f64;
        *cells.iter().max().unwrap_or(&0) as f64 / mean
    });
    let members = s
        .registry
        .as_ref()
        .map(|r| r.members.read().unwrap_or_else(|e| e.into_inner()).clone())
        .unwrap_or_default();
    let workers: Vec<WorkerView> = newest
        .workers
        .iter()
        .map(|w| {
            let then = oldest.workers.iter().find(|o| o.id == w.id);
            let d = |f: fn(&WorkerSnapshot) -> u64| f(w).saturating_sub(then.map_or(0, f));
            let per_s = |n: u64| if dt > 0.0 { n as f64 / dt } else { 0.0 };
            let key = format!(
                "switchyard_worker_dispatch_latency_seconds{{worker=\"{}\"}}",
                w.id
            );
            let rec = members.get(w.id.as_str());
            WorkerView {
                id: w.id.to_string(),
                up: w.up,
                experts: w.experts.clone(),
                rows_per_s: per_s(d(|x| x.rows)),
                calls_per_s: per_s(d(|x| x.calls)),
                busy: if dt > 0.0 {
                    (d(|x| x.compute_micros) as f64 / 1e6 / dt).min(1.0)
                } else {
                    0.0
                },
                latency_p50_ms: ms(newest.prom.quantile(&oldest.prom, &key, 0.5)),
                latency_p99_ms: ms(newest.prom.quantile(&oldest.prom, &key, 0.99)),
                failures: w.failures,
                device: rec.map(|r| r.device.clone()),
                weight_format: rec.map(|r| r.weight_format.clone()),
                weight_bytes: rec.map(|r| r.weight_bytes),
                memory_budget_bytes: rec.map(|r| r.memory_budget_bytes),
            }
        })
        .collect();
    let replicas = (0..experts)
        .map(|e| {
            workers
                .iter()
                .filter(|w| w.experts.contains(&(e as u32)))
                .count()
        })
        .collect();
    let series: Vec<Point> = samples
        .iter()
        .skip(1)
        .map(|n| {
            let then = before(samples, n, POINT).unwrap_or(n);
            point(n, then, &newest)
        })
        .collect();
    let now = series
        .last()
        .cloned()
        .unwrap_or_else(|| point(&newest, &newest, &newest));
    View {
        unix_ms: newest.unix_ms,
        model: s.limits.model_name.clone(),
        mode: if s.remote.is_some() {
            "cluster"
        } else {
            "embedded"
        },
        uptime_s: switchyard_cluster::record::unix_ms().saturating_sub(s.started * 1000) / 1000,
        window_s: (dt * 10.0).round() / 10.0,
        experts: Experts {
            layers,
            experts,
            routed,
            per_expert,
            imbalance,
        },
        workers,
        replicas,
        planner: s
            .registry
            .as_ref()
            .and_then(|r| r.plan.read().unwrap_or_else(|e| e.into_inner()).clone()),
        requests: Requests { now, series },
    }
}
