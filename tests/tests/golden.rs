//! `switchyard forward` against the Hugging Face goldens, every case of every fixture, through the
//! real binary and its JSON.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use serde_json::Value;
use switchyard_tests::{fixtures, run, run_ok};

/// A golden's token id array.
fn golden_ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

/// The index of a logits row's largest value.
fn argmax(row: &[f64]) -> u64 {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap_or(0) as u64
}

fn ids_arg(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn max_abs(a: &Value, b: &Value) -> f64 {
    a.as_array()
        .unwrap()
        .iter()
        .zip(b.as_array().unwrap())
        .map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs())
        .fold(0.0, f64::max)
}

#[test]
fn forward_matches_every_golden_case() {
    for name in [
        "tiny-mixtral",
        "tiny-mixtral-bf16-sharded",
        "tiny-mixtral-trained",
    ] {
        let dir = fixtures().join(name);
        let golden: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let tol_l = golden["tolerance"]["logits_max_abs"].as_f64().unwrap();
        let tol_w = golden["tolerance"]["router_weights_max_abs"]
            .as_f64()
            .unwrap();
        let (mut worst_l, mut worst_w) = (0.0f64, 0.0f64);
        for case in golden["cases"].as_array().unwrap() {
            let cname = case["name"].as_str().unwrap();
            let ids: Vec<u64> = case["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            let n = case["greedy"]["max_new_tokens"]
                .as_u64()
                .unwrap()
                .to_string();
            // The reference's f32 tolerances hold for exact activations; the default (`auto`)
            // rounds them on CPUs with AVX-512 BF16 and is checked statistically below.
            let out = run_ok(&[
                "forward",
                "--cpu-activations",
                "f32",
                "--model",
                dir.to_str().unwrap(),
                "--ids",
                &ids_arg(&ids),
                "--greedy",
                &n,
            ]);
            assert_eq!(out.lines().count(), 1, "forward prints one JSON object");
            let got: Value = serde_json::from_str(&out).unwrap();
            let (gl, wl) = (
                got["logits"].as_array().unwrap(),
                case["logits"].as_array().unwrap(),
            );
            assert_eq!(gl.len(), wl.len(), "{name}/{cname}");
            for (a, b) in gl.iter().zip(wl) {
                worst_l = worst_l.max(max_abs(a, b));
            }
            assert_eq!(
                got["experts"], case["experts"],
                "{name}/{cname}: expert choices"
            );
            for (la, lb) in got["router_weights"]
                .as_array()
                .unwrap()
                .iter()
                .zip(case["router_weights"].as_array().unwrap())
            {
                for (a, b) in la.as_array().unwrap().iter().zip(lb.as_array().unwrap()) {
                    worst_w = worst_w.max(max_abs(a, b));
                }
            }
            assert_eq!(
                got["greedy"], case["greedy"]["ids"],
                "{name}/{cname}: greedy ids"
            );
        }
        eprintln!("{name}: max |Δlogits| {worst_l:.2e}, max |Δrouter weight| {worst_w:.2e}");
        assert!(
            worst_l <= tol_l,
            "{name}: logits off by {worst_l} > {tol_l}"
        );
        assert!(
            worst_w <= tol_w,
            "{name}: router weights off by {worst_w} > {tol_w}"
        );
    }
}

/// The binary's default activation mode, `auto`, rounds activations to bf16 for bf16 weights on
/// CPUs with AVX-512 BF16. That leaves the f32 tolerances, so the check is the
/// statistical one the fixtures' README asks of bf16-compute paths: fed each case's prompt and
/// golden continuation, the argmax at each position is the golden's next token almost
/// everywhere. Where `auto` picks bf16 the logits must also differ from `--cpu-activations f32`'s
/// (the default really is the rounding mode); elsewhere they must be the same bits.
#[test]
fn the_default_activation_mode_follows_the_bf16_fixtures_greedy_continuations() {
    let dir = fixtures().join("tiny-mixtral-bf16-sharded");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let bf16 = switchyard_model::backend::cpu::linear::auto_bf16_activations();
    let (mut agree, mut total, mut differs) = (0usize, 0usize, false);
    for case in golden["cases"].as_array().unwrap() {
        let prompt = golden_ids(&case["input_ids"]);
        let cont = golden_ids(&case["greedy"]["ids"]);
        let seq: Vec<u64> = prompt.iter().chain(&cont).copied().collect();
        let seq = ids_arg(&seq);
        let forward = |mode: &[&str]| -> Value {
            let args = [
                mode,
                &["forward", "--model", dir.to_str().unwrap(), "--ids", &seq],
            ]
            .concat();
            serde_json::from_str(&run_ok(&args)).unwrap()
        };
        let default = forward(&[]);
        differs |= default["logits"] != forward(&["--cpu-activations", "f32"])["logits"];
        let logits = default["logits"].as_array().unwrap();
        // Position p predicts seq[p + 1]; the continuation starts after the prompt's last.
        for (i, &want) in cont.iter().enumerate() {
            let row: Vec<f64> = logits[prompt.len() - 1 + i]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            agree += usize::from(argmax(&row) == want);
            total += 1;
        }
    }
    eprintln!(
        "default activations ({}): {agree} of {total} golden greedy tokens",
        if bf16 { "bf16" } else { "f32" }
    );
    assert!(total >= 50, "too few golden tokens ({total}) to judge");
    assert!(
        agree * 100 >= total * 95,
        "the default mode agrees with {agree} of {total} golden greedy tokens"
    );
    assert_eq!(
        differs,
        bf16,
        "auto picks {} here, so its logits should {} f32's",
        if bf16 { "bf16" } else { "f32" },
        if bf16 { "differ from" } else { "equal" }
    );
}

/// `--kv-cache-dtype bf16` end to end: `forward` over each case's prompt and golden
/// continuation (one prefill, whose attention reads the rounded cache) picks the golden's next
/// token almost everywhere, and its logits differ from the f32 cache's (the flag took effect)
/// by under 1 % of their range.
#[test]
fn a_bf16_kv_cache_follows_the_trained_fixtures_greedy_continuations() {
    let dir = fixtures().join("tiny-mixtral-trained");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let rows = |v: &Value| -> Vec<Vec<f64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let (mut agree, mut total, mut worst, mut scale) = (0usize, 0usize, 0.0f64, 0.0f64);
    for case in golden["cases"].as_array().unwrap() {
        let prompt = golden_ids(&case["input_ids"]);
        let cont = golden_ids(&case["greedy"]["ids"]);
        let seq: Vec<u64> = prompt.iter().chain(&cont).copied().collect();
        let seq = ids_arg(&seq);
        let forward = |dtype: &str| -> Vec<Vec<f64>> {
            let out = run_ok(&[
                "forward",
                "--model",
                dir.to_str().unwrap(),
                "--kv-cache-dtype",
                dtype,
                "--ids",
                &seq,
            ]);
            rows(&serde_json::from_str::<Value>(&out).unwrap()["logits"])
        };
        let (exact, rounded) = (forward("f32"), forward("bf16"));
        for (a, b) in exact.iter().flatten().zip(rounded.iter().flatten()) {
            worst = worst.max((a - b).abs());
            scale = scale.max(a.abs());
        }
        for (i, &want) in cont.iter().enumerate() {
            agree += usize::from(argmax(&rounded[prompt.len() - 1 + i]) == want);
            total += 1;
        }
    }
    eprintln!("bf16 KV cache: {agree} of {total} golden greedy tokens, max |Δlogits| {worst:.3e} of {scale:.1}");
    assert!(total >= 50, "too few golden tokens ({total}) to judge");
    assert!(
        agree * 100 >= total * 95,
        "{agree} of {total} golden greedy tokens"
    );
    assert!(
        worst > 0.0,
        "the bf16 cache gave the f32 cache's logits exactly"
    );
    assert!(
        worst < 0.01 * scale,
        "logits off by {worst}, against logits up to {scale}"
    );
}

#[test]
fn generate_streams_english_from_the_trained_fixture() {
    let dir = fixtures().join("tiny-mixtral-trained");
    let out = run_ok(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "If the file does not exist, the",
        "--max-tokens",
        "12",
    ]);
    assert!(out.contains("file"), "{out:?}");
    let chat = run_ok(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "What does this module do?",
        "--chat",
        "--max-tokens",
        "8",
    ]);
    assert!(!chat.trim().is_empty());
}

#[test]
fn cli_errors_are_clear_and_not_panics() {
    let dir = fixtures().join("tiny-mixtral");
    let d = dir.to_str().unwrap();
    for (args, want) in [
        (
            vec!["forward", "--model", d, "--ids", "1,99999"],
            "outside the vocabulary",
        ),
        (
            vec!["forward", "--model", "/nonexistent/model", "--ids", "1"],
            "/nonexistent/model",
        ),
        (
            vec!["forward", "--model", d, "--ids", "1,x"],
            "invalid value",
        ),
        // No driver, no CUDA build or no such device: each says so before loading anything.
        (
            vec!["forward", "--model", d, "--ids", "1", "--device", "cuda:99"],
            "\"cuda:99\" is not available",
        ),
        (
            vec!["worker", "--model", d, "--device", "cuda:99"],
            "\"cuda:99\" is not available",
        ),
        (
            vec![
                "forward",
                "--model",
                d,
                "--ids",
                "1",
                "--kv-cache-dtype",
                "fp8",
            ],
            "unknown KV-cache dtype \"fp8\" (f32 or bf16)",
        ),
        (
            vec![
                "generate",
                "--model",
                d,
                "--prompt",
                "hi",
                "--temperature",
                "-1",
            ],
            "temperature",
        ),
        (
            vec![
                "generate",
                "--model",
                d,
                "--prompt",
                "hi",
                "--max-tokens",
                "100000",
            ],
            "context length",
        ),
        (
            vec![
                "gen-model",
                "--out",
                "/tmp/x",
                "--hidden",
                "30",
                "--heads",
                "4",
            ],
            "divisible",
        ),
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// One small sharded, windowed shape, written twice to check gen-model is deterministic.
const GEN_ARGS: &[&str] = &[
    "--hidden",
    "48",
    "--layers",
    "2",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--experts",
    "8",
    "--intermediate",
    "64",
    "--vocab",
    "300",
    "--shards",
    "3",
    "--dtype",
    "bf16",
    "--sliding-window",
    "4",
    "--seed",
    "5",
];

#[test]
fn gen_model_writes_a_sharded_checkpoint_that_forward_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let o = out.to_str().unwrap();
    run_ok(&[&["gen-model", "--out", o], GEN_ARGS].concat());
    assert!(out.join("model.safetensors.index.json").exists());
    assert!(out.join("model-00003-of-00003.safetensors").exists());
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["sliding_window"], 4);
    let json: Value = serde_json::from_str(&run_ok(&[
        "forward",
        "--model",
        o,
        "--ids",
        "1,5,9,200,7,7,3",
        "--greedy",
        "3",
    ]))
    .unwrap();
    assert_eq!(json["logits"].as_array().unwrap().len(), 7);
    assert_eq!(json["logits"][0].as_array().unwrap().len(), 300);
    assert_eq!(json["experts"].as_array().unwrap().len(), 2);
    // Same seed, same weights: a second generation is byte-identical.
    let again = tmp.path().join("m2");
    run_ok(&[&["gen-model", "--out", again.to_str().unwrap()], GEN_ARGS].concat());
    for f in [
        "model-00001-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap()
        );
    }
}

#[test]
fn bench_measures_embedded_and_a_local_cluster_and_writes_json_and_a_plot() {
    let model = fixtures().join("tiny-mixtral-trained");
    let plots = tempfile::tempdir().unwrap();
    let out = run_ok(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--runs",
        "1",
        "--prompt-tokens",
        "8",
        "--decode-tokens",
        "4",
        "--concurrency",
        "1,3",
        "--local-workers",
        "2",
        "--compare-overlap",
        "--out",
        plots.path().to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    // Independently, from config.json (f32 weights, untied head): per layer q, k, v, o, two
    // norms and the router; the final norm, the LM head, one embedding row; top-k experts.
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let n = |k: &str| c[k].as_u64().unwrap();
    let (h, heads, kv, layers) = (
        n("hidden_size"),
        n("num_attention_heads"),
        n("num_key_value_heads"),
        n("num_hidden_layers"),
    );
    let hd = h / heads;
    let per_layer = 2 * h * heads * hd + 2 * h * kv * hd + 2 * h + n("num_local_experts") * h;
    let experts = n("num_experts_per_tok") * layers * 3 * h * n("intermediate_size");
    let floats = layers * per_layer + h + n("vocab_size") * h + h + experts;
    assert_eq!(v["decode_bytes_per_token"].as_u64().unwrap(), 4 * floats);
    assert!(v["memory_read_bandwidth_gb_s"].as_f64().unwrap() > 0.1);
    let pct = v["decode_pct_of_bandwidth_bound"].as_f64().unwrap();
    assert!(pct > 0.0 && pct.is_finite(), "{v}");
    // Embedded, then the two-worker cluster the bench started itself, with dual-batch overlap
    // on (three sequences split into two micro-batches) and off.
    let modes = v["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 3, "{v}");
    assert_eq!(modes[1]["mode"], "cluster (2 workers), overlap on");
    assert_eq!(modes[2]["mode"], "cluster (2 workers), overlap off");
    let cluster_phases = &["attention", "router", "dispatch", "expert", "combine"][..];
    for (m, phases) in modes.iter().zip([
        &["attention", "router", "expert", "combine"][..],
        cluster_phases,
        cluster_phases,
    ]) {
        assert!(m["decode_tok_s_median"].as_f64().unwrap() > 0.0, "{m}");
        let split = m["decode_ms_per_layer"].as_object().unwrap();
        let keys: Vec<&str> = split.keys().map(String::as_str).collect();
        for p in phases {
            assert!(keys.contains(p), "{p} missing from {keys:?}");
        }
        assert!(split["expert"].as_f64().unwrap() > 0.0, "{m}");
        // The scheduler runs: every sequence delivered its tokens.
        let runs = m["concurrency"].as_array().unwrap();
        assert_eq!(runs.len(), 2);
        for (r, n) in runs.iter().zip([1, 3]) {
            assert_eq!(r["sequences"], n);
            assert!(r["tok_s_median"].as_f64().unwrap() > 0.0, "{r}");
            let itl = r["itl_ms_p50"].as_f64().unwrap();
            assert!(itl > 0.0, "{r}");
            // The steady decode rate: n tokens every median step.
            let steady = r["decode_tok_s_from_itl_p50"].as_f64().unwrap();
            let want = n as f64 * 1e3 / itl;
            assert!((steady - want).abs() < 1e-9 * want, "{r}");
        }
        let steady = |r: &Value, k: &str| r[k].as_f64().unwrap();
        assert_eq!(
            steady(&runs[0], "decode_tok_s_from_itl_p50_vs_first_count"),
            1.0
        );
        let ratio = steady(&runs[1], "decode_tok_s_from_itl_p50_vs_first_count");
        let want = steady(&runs[1], "decode_tok_s_from_itl_p50")
            / steady(&runs[0], "decode_tok_s_from_itl_p50");
        assert!((ratio - want).abs() < 1e-9 * want, "{ratio} vs {want}");
        // Ratios pair runs of the same round: three sequences' run over one sequence's.
        let first = |r: &Value, k: &str| r[k].as_array().unwrap()[0].as_f64().unwrap();
        let ratio = first(&runs[1], "tok_s_vs_first_count_per_run");
        let want = first(&runs[1], "tok_s") / first(&runs[0], "tok_s");
        assert!((ratio - want).abs() < 1e-9 * want, "{ratio} vs {want}");
        assert_eq!(runs[1]["tok_s_vs_first_count"].as_f64().unwrap(), ratio);
    }
    // Each mode's decode, and each count's tok/s, over embedded mode's in the same round.
    let decode0 = |m: &Value| m["decode_tok_s"].as_array().unwrap()[0].as_f64().unwrap();
    let tok_s0 = |m: &Value, c: usize| {
        m["concurrency"][c]["tok_s"].as_array().unwrap()[0]
            .as_f64()
            .unwrap()
    };
    for m in modes {
        for c in 0..2 {
            let got = m["concurrency"][c]["tok_s_vs_first_mode_per_run"][0]
                .as_f64()
                .unwrap();
            let want = tok_s0(m, c) / tok_s0(&modes[0], c);
            assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
        }
        let per_run = m["decode_vs_first_mode_per_run"].as_array().unwrap();
        assert_eq!(per_run.len(), 1, "{m}");
        let want = decode0(m) / decode0(&modes[0]);
        let got = per_run[0].as_f64().unwrap();
        assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
        assert_eq!(m["decode_vs_first_mode"].as_f64().unwrap(), got);
    }
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(plots.path().join("bench.json")).unwrap())
            .unwrap();
    assert_eq!(saved, v);
    let png = std::fs::read(plots.path().join("bench.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

#[test]
fn bench_runs_one_mode_at_a_time_over_one_thread_workers_that_each_host_every_expert() {
    let model = fixtures().join("tiny-mixtral-trained");
    let out = run_ok(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--runs",
        "1",
        "--prompt-tokens",
        "4",
        "--decode-tokens",
        "3",
        "--local-workers",
        "2",
        "--worker-threads",
        "1",
        "--replicate-experts",
        // Embedded mode measured and dropped before the workers start.
        "--one-mode-at-a-time",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let modes = v["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 2, "{v}");
    assert_eq!(modes[0]["mode"], "embedded");
    assert_eq!(
        modes[1]["mode"],
        "cluster (2 workers, experts replicated, 1 thread each)"
    );
    assert!(
        modes[1]["decode_tok_s_median"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    assert!(
        modes[1]["decode_ms_per_layer"]["dispatch"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{v}"
    );
    // The worker shape only applies to workers the bench starts.
    let bad = run(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--replicate-experts",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("--local-workers"),
        "{err}"
    );
}

#[test]
fn bench_compares_an_f32_and_a_bf16_kv_cache_side_by_side() {
    let model = fixtures().join("tiny-mixtral-trained");
    let out = run_ok(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--runs",
        "2",
        "--prompt-tokens",
        "4",
        "--decode-tokens",
        "3",
        "--concurrency",
        "2",
        "--batch-prompt-tokens",
        "40",
        "--compare-kv-dtypes",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let modes = v["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 2, "{v}");
    for (m, dtype) in modes.iter().zip(["f32", "bf16"]) {
        assert_eq!(m["mode"], format!("embedded, {dtype} KV"));
        assert_eq!(m["kv_cache_dtype"], dtype);
        assert_eq!(m["concurrency"][0]["tok_s"].as_array().unwrap().len(), 2);
    }
    // bf16 against f32, run by run: each ratio is that round's two decode rates.
    let (f, b) = (&modes[0]["decode_tok_s"], &modes[1]["decode_tok_s"]);
    for (i, r) in modes[1]["decode_vs_first_mode_per_run"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let want = b[i].as_f64().unwrap() / f[i].as_f64().unwrap();
        assert!((r.as_f64().unwrap() - want).abs() < 1e-9, "{v}");
    }
    // The comparison is of embedded mode alone.
    let bad = run(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--workers",
        "127.0.0.1:1=0-7",
        "--compare-kv-dtypes",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("--compare-kv-dtypes"),
        "{err}"
    );
}

#[test]
fn bench_dispatch_reports_the_round_trip_against_the_workers_compute_and_the_loopback_floor() {
    let model = fixtures().join("tiny-mixtral-trained");
    let out = run_ok(&[
        "bench-dispatch",
        "--model",
        model.to_str().unwrap(),
        "--spawn",
        "2",
        "--tokens",
        "1,4",
        "--iters",
        "5",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["workers"], 2, "{v}");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{v}");
    for (r, t) in results.iter().zip([1, 4]) {
        assert_eq!(r["tokens"], t);
        let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {r}"));
        // A round trip takes at least the compute the workers report, and the floor of a plain
        // TCP echo is a positive time of the same kind.
        assert!(f("layer_p50_us") >= f("worker_compute_p50_us"), "{r}");
        assert!(f("worker_compute_p50_us") > 0.0, "{r}");
        assert!(f("in_process_compute_p50_us") > 0.0, "{r}");
        assert!(f("loopback_floor_p50_us") > 0.0, "{r}");
        assert!(
            f("loopback_floor_p99_us") >= f("loopback_floor_p50_us"),
            "{r}"
        );
    }
    // A batch of no tokens measures nothing: refused before any worker starts.
    let bad = run(&[
        "bench-dispatch",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        "1,0",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("--tokens"), "{err}");
}
