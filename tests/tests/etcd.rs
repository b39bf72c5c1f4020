//! Live membership through a real etcd: workers joining, dying and being replaced under
//! streaming load, etcd itself restarting, and the planner replicating hot experts. Each test
//! runs its own etcd on free loopback ports, real worker processes and a real `serve`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use serde_json::{json, Value};
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};
use switchyard_tests::{fixtures, run_ok, Etcd, Server, Worker};

fn model() -> PathBuf {
    fixtures().join("tiny-mixtral-trained")
}

const PROMPTS: [&str; 8] = [
    "If the file does not exist, the",
    "Return the number of items in the",
    "The function returns",
    "When the user clicks the button,",
    "This class is used to",
    "Set the value of the",
    "The default value is",
    "Create a new instance of the",
];

fn body(i: usize, max_tokens: u32) -> Value {
    json!({
        "model": "tiny-mixtral-trained",
        "prompt": PROMPTS[i % PROMPTS.len()],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
}

/// A worker registered in `etcd` under `cluster`.
fn worker(etcd: &Etcd, cluster: &str, extra: &[&str]) -> Worker {
    worker_of(&model(), etcd, cluster, extra)
}

/// `--etcd E --cluster C --lease-ttl 2s`, then `extra`.
fn registry_args<'a>(etcd: &'a Etcd, cluster: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--etcd",
        &etcd.endpoint,
        "--cluster",
        cluster,
        "--lease-ttl",
        "2s",
    ];
    args.extend_from_slice(extra);
    args
}

fn worker_of(model: &Path, etcd: &Etcd, cluster: &str, extra: &[&str]) -> Worker {
    Worker::start_with(model, &registry_args(etcd, cluster, extra))
}

fn server(etcd: &Etcd, cluster: &str, extra: &[&str]) -> Server {
    server_of(&model(), etcd, cluster, extra)
}

fn server_of(model: &Path, etcd: &Etcd, cluster: &str, extra: &[&str]) -> Server {
    // f32 on the wire: outputs are compared across failovers, which may split a token's two
    // experts differently over workers; only f32 partial sums add up to the same bits.
    let mut args = registry_args(
        etcd,
        cluster,
        &["--rpc-timeout", "5s", "--wire-dtype", "f32"],
    );
    args.extend_from_slice(extra);
    let s = Server::start(model, &args);
    wait_until(
        Duration::from_secs(30),
        || s.get("/ready").0 == 200,
        || s.log(),
    );
    s
}

/// `switchyard cluster status --json` of `cluster`.
fn cluster_status(etcd: &Etcd, cluster: &str) -> Value {
    let out = run_ok(&[
        "cluster",
        "status",
        "--etcd",
        &etcd.endpoint,
        "--cluster",
        cluster,
        "--json",
    ]);
    serde_json::from_str(&out).unwrap()
}

fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool, log: impl Fn() -> String) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out; log:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A metric's value for a worker, if the server reports it.
fn worker_metric(s: &Server, name: &str, worker: &str) -> Option<f64> {
    let (_, text) = s.get("/metrics");
    let prefix = format!("{name}{{worker=\"{worker}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs `n` streaming completions at once; `during` runs once every stream has its first
/// token. Returns each stream's (status, text, done, errors).
fn streams(
    s: &Server,
    n: usize,
    max_tokens: u32,
    during: impl FnOnce(),
) -> Vec<(u16, String, bool, Vec<String>)> {
    let all_started = Arc::new(Barrier::new(n + 1));
    let out = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let b = all_started.clone();
                scope.spawn(move || {
                    let mut waited = false;
                    let r = s.stream(&body(i, max_tokens), || {
                        b.wait();
                        waited = true;
                    });
                    if !waited {
                        b.wait();
                    }
                    r
                })
            })
            .collect();
        all_started.wait();
        during();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    out
}

fn texts(rs: &[(u16, String, bool, Vec<String>)], log: impl Fn() -> String) -> Vec<String> {
    for (i, (status, _, done, errors)) in rs.iter().enumerate() {
        assert_eq!(*status, 200, "stream {i}");
        assert!(errors.is_empty(), "stream {i}: {errors:?}\n{}", log());
        assert!(done, "stream {i} did not finish\n{}", log());
    }
    rs.iter().map(|r| r.1.clone()).collect()
}

#[test]
fn a_new_worker_gets_traffic_without_a_restart() {
    let etcd = Etcd::start();
    let _a = worker(&etcd, "join", &["--experts", "0-3"]);
    let _b = worker(&etcd, "join", &["--experts", "4-7"]);
    let s = server(&etcd, "join", &[]);
    assert_eq!(s.post("/v1/completions", &body(0, 4)).0, 200);

    // Keep requests coming while the third worker (every expert, so it replicates both) starts.
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (code, text) = s.post("/v1/completions", &body(1, 8));
                assert_eq!(code, 200, "{text}");
            }
        });
        let started = Instant::now();
        let c = worker(&etcd, "join", &["--experts", "0-7"]);
        wait_until(
            Duration::from_secs(30),
            || {
                worker_metric(
                    &s,
                    "switchyard_worker_dispatch_latency_seconds_count",
                    &c.addr,
                )
                .unwrap_or(0.0)
                    > 0.0
            },
            || s.log(),
        );
        eprintln!(
            "join-to-traffic: {:.2} s from spawning the worker process to its first routed batch",
            started.elapsed().as_secs_f64()
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let v = cluster_status(&etcd, "join");
    assert_eq!(v["workers"].as_array().unwrap().len(), 3);
    assert!(v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .all(|hosts| hosts.as_array().unwrap().len() == 2));
}

#[test]
fn killing_a_replicated_worker_loses_no_stream() {
    let etcd = Etcd::start();
    let mut all = worker(&etcd, "replica", &["--experts", "0-7"]);
    let _lo = worker(&etcd, "replica", &["--experts", "0-3"]);
    let _hi = worker(&etcd, "replica", &["--experts", "4-7"]);
    let s = server(&etcd, "replica", &[]);
    let want = texts(&streams(&s, 16, 48, || {}), || s.log());
    let failures_before =
        worker_metric(&s, "switchyard_worker_dispatch_failures_total", &all.addr).unwrap_or(0.0);
    let got = texts(&streams(&s, 16, 48, || all.kill()), || s.log());
    assert_eq!(got, want, "outputs differ from the run without a failure");
    assert!(
        s.log()
            .contains("expert batch failed; sending it to other hosts")
            || worker_metric(&s, "switchyard_worker_dispatch_failures_total", &all.addr)
                .unwrap_or(0.0)
                > failures_before
            || !s.log().contains(&all.addr),
        "the kill should have hit a batch; log:\n{}",
        s.log()
    );
}

#[test]
fn requests_wait_for_a_replacement_of_the_only_host_and_fail_clearly_without_one() {
    let etcd = Etcd::start();
    let _lo = worker(&etcd, "only", &["--experts", "0-3"]);
    let mut hi = worker(&etcd, "only", &["--experts", "4-7"]);
    let s = server(&etcd, "only", &["--expert-wait", "8s"]);
    let want = texts(&streams(&s, 4, 32, || {}), || s.log());

    // The only host of experts 4-7 dies mid-stream; a replacement starts a second later.
    let mut replacement = None;
    let got = texts(
        &streams(&s, 4, 32, || {
            hi.kill();
            std::thread::sleep(Duration::from_secs(1));
            replacement = Some(worker(&etcd, "only", &["--experts", "4-7"]));
        }),
        || s.log(),
    );
    assert_eq!(got, want, "outputs differ from the run without a failure");

    // No replacement this time: a clear 503 once the wait is over, not a hang.
    replacement.unwrap().kill();
    let started = Instant::now();
    let (code, text) = s.post("/v1/completions", &body(2, 8));
    let waited = started.elapsed();
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("no live worker hosts expert"), "{text}");
    assert!(waited >= Duration::from_secs(7), "gave up after {waited:?}");
    assert!(waited < Duration::from_secs(60), "took {waited:?}");
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn an_etcd_restart_under_load_fails_no_request() {
    let mut etcd = Etcd::start();
    let _lo = worker(&etcd, "outage", &["--experts", "0-3"]);
    let _hi = worker(&etcd, "outage", &["--experts", "4-7"]);
    let s = server(&etcd, "outage", &[]);
    let want = texts(&streams(&s, 8, 64, || {}), || s.log());
    let got = texts(
        &streams(&s, 8, 64, || {
            etcd.kill();
            std::thread::sleep(Duration::from_secs(2));
            etcd.restart();
        }),
        || s.log(),
    );
    assert_eq!(got, want);
    // The coordinator's watch came back: a worker started after the outage gets routed to.
    let c = worker(&etcd, "outage", &["--experts", "0-7"]);
    wait_until(
        Duration::from_secs(30),
        || worker_metric(&s, "switchyard_worker_up", &c.addr).is_some(),
        || s.log(),
    );
    // And the workers re-registered (or kept) their records.
    wait_until(
        Duration::from_secs(30),
        || {
            let v = cluster_status(&etcd, "outage");
            v["workers"].as_array().unwrap().len() == 3
        },
        || s.log(),
    );
}

/// Bytes of one expert in every layer of `model` (f32 weights).
fn bytes_per_expert(model: &Path) -> u64 {
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let n = |k: &str| c[k].as_u64().unwrap();
    3 * n("hidden_size") * n("intermediate_size") * n("num_hidden_layers") * 4
}

#[test]
fn the_planner_assigns_managed_workers_and_replicates_hot_experts() {
    // A checkpoint whose tokens route mostly to experts 5 and 6, both in the second worker's
    // block of the first plan.
    let tmp = tempfile::tempdir().unwrap();
    let skewed = tmp.path().join("skewed");
    run_ok(&[
        "gen-model",
        "--out",
        skewed.to_str().unwrap(),
        "--hidden",
        "64",
        "--layers",
        "2",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--intermediate",
        "128",
        "--vocab",
        "300",
        "--dtype",
        "f32",
        "--hot-experts",
        "5,6",
    ]);
    let etcd = Etcd::start();
    // Room for five of the eight experts each: two spare slots for hot replicas.
    let budget = (5 * bytes_per_expert(&skewed)).to_string();
    let _a = worker_of(&skewed, &etcd, "plan", &["--memory-budget", &budget]);
    let _b = worker_of(&skewed, &etcd, "plan", &["--memory-budget", &budget]);
    let s = server_of(
        &skewed,
        &etcd,
        "plan",
        &["--rebalance-interval", "2s", "--hot-replicas", "2"],
    );
    let status = || cluster_status(&etcd, "plan");
    // Before any load: blocks, as a static placement would be.
    let first = status();
    let hosted: Vec<Value> = first["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["hosted"][0].clone())
        .collect();
    assert_eq!(
        hosted,
        vec![json!([0, 1, 2, 3]), json!([4, 5, 6, 7])],
        "{first}"
    );
    let req = |i: usize| {
        json!({"model": "skewed", "prompt": format!("request {i}: some text to route"),
               "max_tokens": 16, "temperature": 0, "ignore_eos": true})
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for i in 0..2 {
            let (s, stop, req) = (&s, &stop, &req);
            scope.spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (code, text) = s.post("/v1/completions", &req(i));
                    assert_eq!(code, 200, "{text}");
                }
            });
        }
        wait_until(
            Duration::from_secs(60),
            || {
                status()["plan"]["reason"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("rebalance")
            },
            || format!("{}\n{}", status(), s.log()),
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let v = status();
    let load: Vec<f64> = v["plan"]["expert_load"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let mut by_load: Vec<usize> = (0..load.len()).collect();
    by_load.sort_by(|&a, &b| load[b].total_cmp(&load[a]));
    let mut hot = by_load[..2].to_vec();
    hot.sort_unstable();
    assert_eq!(hot, vec![5, 6], "measured load {load:?}");
    // The workers follow: both hot experts end up on both workers, and traffic still flows.
    wait_until(
        Duration::from_secs(30),
        || {
            let v = status();
            hot.iter()
                .all(|&e| v["replicas"][e].as_array().unwrap().len() == 2)
        },
        || format!("{}\n{}", status(), s.log()),
    );
    assert_eq!(s.post("/v1/completions", &req(9)).0, 200);
    // The operator's view shows the rebalancing plan, what it moved, each worker's budget, and
    // (once this coordinator has applied the new membership) the hot experts' replicas.
    let view = || -> Value {
        let (code, text) = s.get("/v1/cluster");
        assert_eq!(code, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    };
    wait_until(
        Duration::from_secs(30),
        || hot.iter().all(|&e| view()["replicas"][e] == json!(2)),
        || view().to_string(),
    );
    let view = view();
    let planner = &view["planner"];
    assert!(
        planner["plan"]["generation"].as_u64().unwrap() >= 2
            && planner["plan"]["reason"]
                .as_str()
                .unwrap()
                .starts_with("rebalance"),
        "{planner}"
    );
    let moved: Vec<&str> = planner["moved"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(moved.iter().any(|m| m.starts_with('+')), "{moved:?}");
    for w in view["workers"].as_array().unwrap() {
        assert!(w["memory_budget_bytes"].as_u64().unwrap() > 0, "{w}");
    }
    assert!(
        hot.iter().all(|&e| view["replicas"][e] == json!(2)),
        "{view}"
    );
}

#[test]
fn two_coordinators_elect_one_planner_and_hand_over_when_it_dies() {
    let etcd = Etcd::start();
    let _w = worker(&etcd, "elect", &["--experts", "0-7"]);
    let mut first = server(&etcd, "elect", &[]);
    let second = server(&etcd, "elect", &[]);
    let leader = || -> String {
        let v = cluster_status(&etcd, "elect");
        v["planner"].as_str().unwrap_or("").to_string()
    };
    let pid = |s: &Server| s.proc.0.id().to_string();
    wait_until(
        Duration::from_secs(20),
        || leader().ends_with(&format!("-{}", pid(&first))),
        || first.log(),
    );
    // Both serve; only one plans.
    assert_eq!(first.post("/v1/completions", &body(0, 4)).0, 200);
    assert_eq!(second.post("/v1/completions", &body(1, 4)).0, 200);
    assert!(second.log().contains("registered") && !second.log().contains("elected planner"));
    // The planner crashes: the other coordinator takes over once its lease expires.
    let _ = first.proc.0.kill();
    let _ = first.proc.0.wait();
    let second_pid = pid(&second);
    wait_until(
        Duration::from_secs(20),
        || leader().ends_with(&format!("-{second_pid}")),
        || second.log(),
    );
    assert!(second.log().contains("elected planner"));
    assert_eq!(second.post("/v1/completions", &body(2, 4)).0, 200);
}

/// A worker quantizing its experts at load registers their format and their quantized size per
/// expert (what the planner divides its memory budget by), and `cluster status` shows both.
#[test]
fn quantized_workers_register_their_format_and_quantized_bytes() {
    let etcd = Etcd::start();
    let _w = worker(&etcd, "quant", &["--experts", "0-3", "--quantize", "q4_0"]);
    let mut v = Value::Null;
    wait_until(
        Duration::from_secs(30),
        || {
            v = cluster_status(&etcd, "quant");
            v["workers"].as_array().is_some_and(|w| w.len() == 1)
        },
        String::new,
    );
    let w = &v["workers"][0];
    assert_eq!(w["weight_format"], "q4_0", "{w}");
    // f32 bytes per expert, at 18 bytes per 32 weights instead of 128.
    let want = bytes_per_expert(&model()) / 128 * 18;
    assert_eq!(w["bytes_per_expert"].as_u64().unwrap(), want, "{w}");
    assert!(
        w["model_fingerprint"].as_str().unwrap().contains("-q4_0-"),
        "{w}"
    );
    let text = run_ok(&[
        "cluster",
        "status",
        "--etcd",
        &etcd.endpoint,
        "--cluster",
        "quant",
    ]);
    assert!(text.contains("q4_0"), "{text}");
}
