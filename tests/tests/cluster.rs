//! The expert-parallel cluster with real worker processes on loopback: results equal embedded
//! mode bit for bit (f32 wire), workers dying mid-run, and malformed batches.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use serde_json::Value;
use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};
use switchyard_tests::{bin, fixtures, run, run_ok, Worker};

fn ids_of(case: &Value) -> String {
    case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn forward(model: &Path, ids: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        ids,
        "--greedy",
        "8",
    ];
    args.extend_from_slice(extra);
    run_ok(&args)
}

/// Starts one worker per expert set and returns them with the `--workers` spec.
fn cluster(model: &Path, sets: &[&str]) -> (Vec<Worker>, String) {
    cluster_env(model, sets, &[])
}

/// [`cluster`] with extra environment variables for every worker.
fn cluster_env(model: &Path, sets: &[&str], env: &[(&str, &str)]) -> (Vec<Worker>, String) {
    let ws: Vec<Worker> = sets
        .iter()
        .map(|s| Worker::start_env(model, &["--experts", s], env))
        .collect();
    let spec = ws
        .iter()
        .zip(sets)
        .map(|(w, s)| format!("{}={}", w.addr, s))
        .collect::<Vec<_>>()
        .join(",");
    (ws, spec)
}

const PLACEMENTS: [&[&str]; 4] = [
    &["0-3", "4-7"],
    &["0-1", "2-3", "4-5", "6-7"],
    &["0-3", "3-5", "6-7"], // expert 3 on two workers
    &["0", "1-7"],
];

fn generated_model(dir: &Path) -> PathBuf {
    let out = dir.join("gen");
    run_ok(&[
        "gen-model",
        "--out",
        out.to_str().unwrap(),
        "--hidden",
        "96",
        "--layers",
        "3",
        "--heads",
        "6",
        "--kv-heads",
        "2",
        "--experts",
        "8",
        "--intermediate",
        "80",
        "--vocab",
        "400",
        "--dtype",
        "bf16",
        "--shards",
        "2",
        "--seed",
        "9",
    ]);
    out
}

#[test]
fn cluster_forward_equals_embedded_bit_for_bit_for_every_placement() {
    let tmp = tempfile::tempdir().unwrap();
    let gen = generated_model(tmp.path());
    let mut models: Vec<(PathBuf, Vec<String>)> = [
        "tiny-mixtral",
        "tiny-mixtral-bf16-sharded",
        "tiny-mixtral-trained",
    ]
    .iter()
    .map(|n| {
        let dir = fixtures().join(n);
        let g: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let cases: Vec<String> = g["cases"]
            .as_array()
            .unwrap()
            .iter()
            .skip(1)
            .take(3)
            .map(ids_of)
            .collect();
        (dir, cases)
    })
    .collect();
    models.push((gen, vec!["1,17,300,5,5,99,123,7,2,45,250,11".into()]));
    // Every process runs in the default activation mode (bf16 for bf16 weights where the CPU has
    // AVX-512 BF16), and the bf16 models also with exact f32 activations, pinned on both sides
    // (workers by environment).
    let both: &[&str] = &["auto", "f32"];
    for (model, cases) in &models {
        let bf16_weights = std::fs::read_to_string(model.join("config.json"))
            .unwrap()
            .contains("bfloat16");
        for mode in if bf16_weights { both } else { &both[..1] } {
            cluster_equals_embedded(model, cases, mode);
        }
    }
}

fn cluster_equals_embedded(model: &Path, cases: &[String], mode: &str) {
    let embedded: Vec<String> = cases
        .iter()
        .map(|ids| forward(model, ids, &["--cpu-activations", mode]))
        .collect();
    for sets in PLACEMENTS {
        let (_workers, spec) = cluster_env(model, sets, &[("SWITCHYARD_CPU_ACTIVATIONS", mode)]);
        for (ids, want) in cases.iter().zip(&embedded) {
            for rpc in ["stream", "unary"] {
                let got = forward(
                    model,
                    ids,
                    &[
                        "--cpu-activations",
                        mode,
                        "--workers",
                        &spec,
                        "--wire-dtype",
                        "f32",
                        "--dispatch-rpc",
                        rpc,
                    ],
                );
                assert!(
                    got == *want,
                    "{} placement {sets:?} ids {ids} ({rpc}, {mode} activations): cluster differs from embedded",
                    model.display()
                );
            }
        }
    }
}

#[test]
fn bf16_wire_keeps_greedy_choices_except_near_ties() {
    for name in ["tiny-mixtral", "tiny-mixtral-trained"] {
        let dir = fixtures().join(name);
        let g: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let tol = g["tolerance"]["logits_max_abs"].as_f64().unwrap();
        let (_w, spec) = cluster(&dir, &["0-3", "4-7"]);
        let mut worst = 0.0f64;
        let mut argmax_agree = (0usize, 0usize);
        for case in g["cases"].as_array().unwrap() {
            let out: Value = serde_json::from_str(&forward(
                &dir,
                &ids_of(case),
                &["--workers", &spec, "--wire-dtype", "bf16"],
            ))
            .unwrap();
            for (a, b) in out["logits"]
                .as_array()
                .unwrap()
                .iter()
                .zip(case["logits"].as_array().unwrap())
            {
                let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs())
                    .fold(0.0, f64::max);
                worst = worst.max(d);
                let am = |v: &Vec<Value>| {
                    v.iter()
                        .enumerate()
                        .max_by(|x, y| x.1.as_f64().unwrap().total_cmp(&y.1.as_f64().unwrap()))
                        .unwrap()
                        .0
                };
                argmax_agree.1 += 1;
                let (ga, wa) = (am(a), am(b));
                if ga == wa {
                    argmax_agree.0 += 1;
                } else {
                    // A flip is only acceptable where the reference itself nearly ties.
                    let gap = b[wa].as_f64().unwrap() - b[ga].as_f64().unwrap();
                    assert!(
                        gap < 0.1,
                        "{name}: bf16 wire flipped a clear choice (reference gap {gap})"
                    );
                }
            }
        }
        // Rounding activations to bf16 is a bf16 path: the fixtures' README asks for statistical
        // checks there (the 1e-3 tolerance assumes f32 throughout), so the bar is the argmax.
        eprintln!("{name}: bf16 wire max |Δlogits| {worst:.2e} (f32 tolerance {tol}), argmax agreement {}/{}", argmax_agree.0, argmax_agree.1);
        assert!(
            argmax_agree.0 * 100 >= argmax_agree.1 * 95,
            "{name}: bf16 wire changed too many greedy choices"
        );
    }
}

/// Runs `generate` over `spec`, kills `victim` once the first text arrives, and returns
/// (success, stdout, stderr).
fn generate_and_kill(
    model: &Path,
    spec: &str,
    victim: &mut Worker,
    tokens: &str,
) -> (bool, String, String) {
    let mut child = Command::new(bin())
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Return the number of items in the",
        ])
        .args([
            "--max-tokens",
            tokens,
            "--ignore-eos",
            "--workers",
            spec,
            // Compared bit for bit with embedded mode.
            "--wire-dtype",
            "f32",
            "--rpc-timeout",
            "5s",
            "--expert-wait",
            "1s",
        ])
        .env("SWITCHYARD_THREADS", "1")
        .env("SWITCHYARD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    victim.kill();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    let mut out = first.to_vec();
    out.extend(rest);
    (status.success(), String::from_utf8(out).unwrap(), err)
}

#[test]
fn killing_a_replicated_worker_mid_run_changes_nothing() {
    let model = fixtures().join("tiny-mixtral-trained");
    let want = run_ok(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Return the number of items in the",
        "--max-tokens",
        "300",
        "--ignore-eos",
    ]);
    // B replicates 4-7, so A can take over everything B did.
    let mut a = Worker::start(&model, "0-7");
    let mut b = Worker::start(&model, "4-7");
    let spec = format!("{}=0-7,{}=4-7", a.addr, b.addr);
    let (ok, out, err) = generate_and_kill(&model, &spec, &mut b, "300");
    assert!(ok, "{err}");
    assert!(
        err.contains("sending it to other hosts"),
        "the kill should have hit a batch in flight or the next one: {err}"
    );
    assert_eq!(out, want, "output with a failure equals output without");
    a.kill();
}

#[test]
fn killing_the_only_host_of_an_expert_fails_clearly() {
    let model = fixtures().join("tiny-mixtral-trained");
    let _a = Worker::start(&model, "0-3");
    let mut b = Worker::start(&model, "4-7");
    let spec = format!("{}=0-3,{}=4-7", _a.addr, b.addr);
    let (ok, _out, err) = generate_and_kill(&model, &spec, &mut b, "400");
    assert!(!ok);
    assert!(err.contains("no live worker hosts expert"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn coordinator_keeps_serving_requests_that_do_not_need_a_dead_worker() {
    use switchyard_cluster::StaticPlacement;
    use switchyard_coordinator::{
        dispatch::DispatchConfig, forward_report, Engine, EngineError, ExpertSource, LoadOptions,
    };
    let model = fixtures().join("tiny-mixtral");
    let load = |source, opts: &LoadOptions| {
        Engine::load(&model, source, opts, &switchyard_model::NoProgress)
            .unwrap()
            .engine
    };
    // Which experts does a BOS-only prompt use? Put one it never uses on its own worker.
    let embedded = load(ExpertSource::Embedded, &LoadOptions::default());
    let used: Vec<u16> = forward_report(&embedded, &[1], None)
        .unwrap()
        .experts
        .iter()
        .flatten()
        .flatten()
        .copied()
        .collect();
    let lonely = (0..8u16).find(|e| !used.contains(e)).unwrap();
    let rest: Vec<String> = (0..8u16)
        .filter(|e| *e != lonely)
        .map(|e| e.to_string())
        .collect();
    let a = Worker::start(&model, &rest.join(","));
    let mut b = Worker::start(&model, &lonely.to_string());
    let placement = StaticPlacement::parse(&format!(
        "{}={},{}={}",
        a.addr,
        rest.join(","),
        b.addr,
        lonely
    ))
    .unwrap();
    let cfg = DispatchConfig {
        rpc_timeout: Duration::from_secs(5),
        expert_wait: Duration::from_secs(1),
        // Compared bit for bit with embedded mode.
        wire_dtype: switchyard_wire::WireDType::F32,
        ..DispatchConfig::default()
    };
    let opts = LoadOptions {
        dispatch: cfg,
        ..LoadOptions::default()
    };
    let engine = load(ExpertSource::Static(placement), &opts);
    let want = forward_report(&embedded, &[1], Some(1)).unwrap();
    b.kill();
    // A prompt that needs the dead worker fails with a clear, coded error...
    let long: Vec<u32> = (1..60).collect();
    match forward_report(&engine, &long, None) {
        Err(EngineError::Model(e)) => {
            assert!(e.to_string().contains(&format!("expert {lonely}")), "{e}")
        }
        other => panic!("expected a dispatch error, got {other:?}"),
    }
    // ...while one that does not is still answered, correctly.
    for _ in 0..2 {
        let got = forward_report(&engine, &[1], Some(1)).unwrap();
        assert_eq!(got.logits, want.logits);
        assert_eq!(got.experts, want.experts);
    }
}

#[test]
fn coordinator_refuses_workers_of_another_model() {
    let w = Worker::start(&fixtures().join("tiny-mixtral-bf16-sharded"), "0-7");
    let out = run(&[
        "forward",
        "--model",
        fixtures().join("tiny-mixtral").to_str().unwrap(),
        "--ids",
        "1",
        "--workers",
        &w.addr,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("serves model"), "{err}");
}

#[test]
fn worker_rejects_malformed_batches_with_clear_statuses() {
    use switchyard_model::{Checkpoint, RoutePlan};
    use switchyard_wire::{
        encode_batch, pb, pb::expert_service_client::ExpertServiceClient, status_code_of, WireDType,
    };
    let model = fixtures().join("tiny-mixtral");
    let fp = Checkpoint::open(&model).unwrap().fingerprint();
    let w = Worker::start(&model, "0-3");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = ExpertServiceClient::connect(format!("http://{}", w.addr))
            .await
            .unwrap();
        let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.model_fingerprint, fp);
        assert_eq!(info.hosted[0].experts, vec![0, 1, 2, 3]);
        let mut plan = RoutePlan::new();
        plan.push_row([(1u16, 0.6f32), (2, 0.4)]);
        let x = vec![0.1f32; 64];
        let good = encode_batch(&fp, 1, 64, &x, &plan, WireDType::F32);
        assert_eq!(
            c.forward(good.clone())
                .await
                .unwrap()
                .into_inner()
                .output
                .len(),
            64 * 4
        );

        type Edit = Box<dyn Fn(&mut pb::ExpertBatch)>;
        let cases: Vec<(&str, Edit, tonic::Code, &str)> = vec![
            (
                "layer it lacks",
                Box::new(|b| b.layer = 7),
                tonic::Code::InvalidArgument,
                "SY:WIRE:Layer",
            ),
            (
                "expert it lacks",
                Box::new(|b| b.experts[1] = 6),
                tonic::Code::NotFound,
                "SY:WORKER:ExpertNotHosted",
            ),
            (
                "wrong hidden size",
                Box::new(|b| b.hidden_size = 65),
                tonic::Code::InvalidArgument,
                "SY:WIRE:HiddenSize",
            ),
            (
                "truncated payload",
                Box::new(|b| b.hidden = b.hidden.slice(..100)),
                tonic::Code::InvalidArgument,
                "SY:WIRE:Payload",
            ),
            (
                "mismatched model",
                Box::new(|b| b.model_fingerprint = "mixtral-other".into()),
                tonic::Code::FailedPrecondition,
                "SY:WIRE:Fingerprint",
            ),
            (
                "other protocol",
                Box::new(|b| b.protocol_version = 99),
                tonic::Code::FailedPrecondition,
                "SY:WIRE:Version",
            ),
            (
                "too many rows",
                Box::new(|b| b.rows = 1_000_000),
                tonic::Code::ResourceExhausted,
                "SY:WIRE:TooLarge",
            ),
        ];
        let mut stream_batches = Vec::new();
        let mut stream_want = Vec::new();
        for (what, edit, code, sy) in &cases {
            let mut b = good.clone();
            edit(&mut b);
            stream_batches.push(Some(b.clone()));
            stream_want.push((*what, *code, *sy));
            let s = c.forward(b).await.unwrap_err();
            assert_eq!(s.code(), *code, "{what}: {s:?}");
            assert_eq!(status_code_of(&s), Some(*sy), "{what}");
            assert!(!s.message().is_empty(), "{what}");
        }
        // Still healthy and answering afterwards.
        assert!(c.forward(good.clone()).await.is_ok());

        // The same refusals on one ForwardStream, which stays open through them: every reply
        // carries its batch's id and what Forward answered, and a good batch still works last.
        stream_batches.push(None);
        stream_want.push(("no batch", tonic::Code::InvalidArgument, "SY:WIRE:Missing"));
        stream_batches.push(Some(good));
        let n = stream_batches.len() as u64;
        let msgs: Vec<pb::StreamBatch> = stream_batches
            .into_iter()
            .enumerate()
            .map(|(i, batch)| pb::StreamBatch {
                id: 100 + i as u64,
                batch,
            })
            .collect();
        let mut replies = c
            .forward_stream(futures::stream::iter(msgs))
            .await
            .unwrap()
            .into_inner();
        for (i, (what, code, sy)) in stream_want.iter().enumerate() {
            let r = replies.message().await.unwrap().unwrap();
            assert_eq!(r.id, 100 + i as u64, "{what}");
            assert!(r.result.is_none(), "{what}");
            assert_eq!(r.status, *code as i32, "{what}: {}", r.message);
            assert_eq!(r.error_code, *sy, "{what}");
            assert!(!r.message.is_empty(), "{what}");
        }
        let last = replies.message().await.unwrap().unwrap();
        assert_eq!((last.id, last.status), (100 + n - 1, 0));
        assert_eq!(last.result.unwrap().output.len(), 64 * 4);
        assert!(
            replies.message().await.unwrap().is_none(),
            "stream ends with the requests"
        );

        let load = c.load(pb::LoadRequest {}).await.unwrap().into_inner();
        assert_eq!(load.batches_total, 3, "the three good batches");
    });
}

#[test]
fn worker_drains_and_exits_cleanly_on_sigterm() {
    let mut w = Worker::start(&fixtures().join("tiny-mixtral"), "0-7");
    let pid = w.proc.0.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    // Bounded wait: the worker's grace period is 10 s; it should be far quicker when idle.
    let start = std::time::Instant::now();
    loop {
        if let Some(st) = w.proc.0.try_wait().unwrap() {
            assert!(st.success(), "worker exited with {st}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "worker did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn overlapped_micro_batches_over_workers_equal_embedded_mode() {
    use switchyard_cluster::StaticPlacement;
    use switchyard_coordinator::dispatch::{DispatchConfig, RemoteExperts, RpcMode};
    use switchyard_model::{
        Checkpoint, Cpu, ExpertExecutor, ExpertSet, KvCache, LocalExperts, Logits, Mixtral,
        NoProgress, SeqKv, SeqStep, StepOutput, StepScratch,
    };
    let model = fixtures().join("tiny-mixtral-trained");
    let ck = Checkpoint::open(&model).unwrap();
    let cfg = ck.config().clone();
    let dense = Mixtral::load(Cpu, &ck, &NoProgress).unwrap();
    let local = LocalExperts::load(
        &Cpu,
        &ck,
        &ExpertSet::all(cfg.num_local_experts),
        &NoProgress,
    )
    .unwrap();
    let (_workers, spec) = cluster(&model, &["0-3", "4-7"]);
    let prompts: [&[u32]; 3] = [&[1, 415, 2936, 906], &[1, 22, 7], &[1, 5, 6, 7, 8, 9, 10]];
    // Three sequences: a prefill step, then two decode steps, all logits traced.
    let run = |experts: &dyn ExpertExecutor| {
        let mut kv = KvCache::new(&Cpu, &cfg, 16, 8, switchyard_model::KvDtype::F32).unwrap();
        let mut seqs = [SeqKv::default(), SeqKv::default(), SeqKv::default()];
        let mut scratch = StepScratch::new(&Cpu).unwrap();
        let mut next: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let mut results = Vec::new();
        for which in [Logits::All, Logits::Last, Logits::Last] {
            let mut out = StepOutput::traced(which);
            let mut steps: Vec<SeqStep<'_>> = next
                .iter()
                .zip(seqs.iter_mut())
                .map(|(t, kv)| SeqStep { tokens: t, kv })
                .collect();
            dense
                .step(&mut steps, &mut kv, experts, &mut scratch, &mut out)
                .unwrap();
            let v = cfg.vocab_size;
            let rows = out.logits.len() / v;
            next = (rows - 3..rows)
                .map(|r| {
                    vec![switchyard_model::sampling::argmax(
                        &out.logits[r * v..(r + 1) * v],
                    )]
                })
                .collect();
            results.push((out.logits, out.trace.unwrap()));
        }
        results
    };
    let embedded = run(&local);
    for rpc in [RpcMode::Stream, RpcMode::Unary] {
        let dcfg = DispatchConfig {
            wire_dtype: switchyard_wire::WireDType::F32,
            overlap: true,
            rpc,
            ..DispatchConfig::default()
        };
        let remote = RemoteExperts::connect(
            &StaticPlacement::parse(&spec).unwrap(),
            &cfg,
            &ck.fingerprint(),
            dcfg,
        )
        .unwrap();
        assert!(remote.overlaps());
        let got = run(&remote);
        // Two micro-batches may take other kernel paths than one batch: equal to rounding.
        for ((le, te), (lg, tg)) in embedded.iter().zip(&got) {
            assert_eq!(le.len(), lg.len());
            for (pe, pg) in te.iter().zip(tg) {
                assert_eq!(pe.experts(), pg.experts(), "{rpc:?}: routing differs");
            }
            let d = le
                .iter()
                .zip(lg)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4, "{rpc:?}: logits differ by {d}");
        }
    }
}

/// Sends `sig` (STOP, CONT) to a worker process.
fn signal(w: &Worker, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(w.proc.0.id().to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig}");
}

#[test]
fn a_layer_gives_up_on_hung_workers_within_expert_wait_and_recovers() {
    use switchyard_cluster::StaticPlacement;
    use switchyard_coordinator::{
        dispatch::DispatchConfig, forward_report, Engine, ExpertSource, LoadOptions,
    };
    let model = fixtures().join("tiny-mixtral");
    let a = Worker::start(&model, "0-7");
    let b = Worker::start(&model, "0-7");
    let placement = StaticPlacement::parse(&format!("{}=0-7,{}=0-7", a.addr, b.addr)).unwrap();
    // Back-offs shorter than a call's deadline: unless `expert_wait` bounded the whole layer,
    // retries included, it would cycle between the two hung replicas while they stay hung.
    let opts = LoadOptions {
        dispatch: DispatchConfig {
            rpc_timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_millis(500),
            failure_backoff: Duration::from_millis(50),
            expert_wait: Duration::from_secs(2),
            wire_dtype: switchyard_wire::WireDType::F32,
            ..DispatchConfig::default()
        },
        ..LoadOptions::default()
    };
    let engine = Engine::load(
        &model,
        ExpertSource::Static(placement),
        &opts,
        &switchyard_model::NoProgress,
    )
    .unwrap()
    .engine;
    let want = forward_report(&engine, &[1, 2, 3], None).unwrap();
    signal(&a, "STOP");
    signal(&b, "STOP");
    let started = std::time::Instant::now();
    let err = forward_report(&engine, &[1, 2, 3], None).unwrap_err();
    let took = started.elapsed();
    signal(&a, "CONT");
    signal(&b, "CONT");
    assert!(err.to_string().contains("gave up after"), "{err}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "gave up after {took:?}"
    );
    // Once the workers answer again (and their back-offs end), the same request succeeds.
    let got = forward_report(&engine, &[1, 2, 3], None).unwrap();
    assert_eq!(got.logits, want.logits);
}

/// Quantized experts over workers: the same bits as embedded mode with an f32 wire, in both
/// formats, quantized at load and from a checkpoint `switchyard quantize` wrote; and a
/// coordinator refuses workers whose experts are quantized differently from its own view.
#[test]
fn quantized_cluster_equals_embedded_and_refuses_mixed_formats() {
    let trained = fixtures().join("tiny-mixtral-trained");
    let tmp = tempfile::tempdir().unwrap();
    let saved = tmp.path().join("q4_0");
    run_ok(&[
        "quantize",
        "--model",
        trained.to_str().unwrap(),
        "--out",
        saved.to_str().unwrap(),
        "--format",
        "q4_0",
    ]);
    let ids = "1,17,300,5,42,99,7";
    // Workers take the format from the environment (SWITCHYARD_QUANTIZE), the coordinator from
    // the flag.
    type Run<'a> = (&'a Path, &'a [&'a str], &'a [(&'a str, &'a str)]);
    let runs: [Run<'_>; 3] = [
        (
            &trained,
            &["--quantize", "q8_0"],
            &[("SWITCHYARD_QUANTIZE", "q8_0")],
        ),
        (
            &trained,
            &["--quantize", "q4_0"],
            &[("SWITCHYARD_QUANTIZE", "q4_0")],
        ),
        (&saved, &[], &[]),
    ];
    for (model, flags, env) in runs {
        let embedded = forward(model, ids, flags);
        for sets in [PLACEMENTS[0], PLACEMENTS[2]] {
            let (_workers, spec) = cluster_env(model, sets, env);
            let mut args = flags.to_vec();
            args.extend_from_slice(&["--workers", &spec, "--wire-dtype", "f32"]);
            let got = forward(model, ids, &args);
            assert!(
                got == embedded,
                "{} {flags:?} placement {sets:?}: cluster differs from embedded",
                model.display()
            );
        }
    }
    // Workers quantizing to q4_0 and a coordinator expecting q8_0 (or float) experts.
    let w = Worker::start_with(&trained, &["--experts", "0-7", "--quantize", "q4_0"]);
    for flags in [&["--quantize", "q8_0"][..], &[]] {
        let mut args = vec![
            "forward",
            "--model",
            trained.to_str().unwrap(),
            "--ids",
            "1",
            "--workers",
            &w.addr,
        ];
        args.extend_from_slice(flags);
        let out = run(&args);
        assert!(
            !out.status.success(),
            "{flags:?}: a coordinator used mismatched workers"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("serves model") && err.contains("q4_0"),
            "{err}"
        );
    }
}
