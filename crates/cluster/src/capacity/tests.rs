use super::*;

/// Round figures of the order this kind of machine measures: 0.05 ns per weight byte streaming
/// (20 GB/s), compute dearer per byte once rows pass 8.
fn cal() -> Calibration {
    let curve = |dtype: &str, scale: f64| LinearCost {
        dtype: dtype.into(),
        rows: vec![1, 8, 32, 128],
        ns_per_byte: [0.05, 0.06, 0.2, 0.8].iter().map(|t| t * scale).collect(),
    };
    Calibration {
        cpu: "test".into(),
        kernels: "test".into(),
        model: "test".into(),
        read_bytes_per_s_core: 20e9,
        expert: vec![curve("BF16", 1.0), curve("Q8_0", 1.5), curve("Q4_0", 2.0)],
        layer_fixed_ns: 20_000.0,
        layer_ns_per_token_hidden: 0.5,
        step_fixed_ns: 100_000.0,
        step_ns_per_token: 5_000.0,
        rpc: RpcCost {
            coordinator_fixed_ns: 30_000.0,
            coordinator_ns_per_byte: 0.5,
            worker_fixed_ns: 30_000.0,
            worker_ns_per_byte: 0.5,
            latency_ns: 50_000.0,
        },
    }
}

fn req(workers: &str, experts: DType) -> PlanRequest {
    PlanRequest {
        shape: Shape::mixtral_8x7b(32),
        dense: DType::BF16,
        experts,
        workers: workers.parse().unwrap(),
        coordinator: "24GiB:8c".parse().unwrap(),
        net: "10gbit,200us".parse().unwrap(),
        streams: 32,
        context: 1024,
        kv_elem_bytes: 2,
        wire_elem_bytes: 4,
        replicate: true,
        overlap: false,
        reserve_bytes: 1 << 30,
    }
}

#[test]
fn mixtral_in_bf16_takes_two_experts_per_24_gib_host() {
    let c = plan(&req("4x24GiB:8c", DType::BF16), &cal()).unwrap();
    // 3 · 4096 · 14336 bf16 weights in each of 32 layers.
    assert_eq!(c.expert_bytes, 3 * 4096 * 14336 * 2 * 32);
    assert_eq!(c.placement.len(), 4);
    assert!(
        c.placement.iter().all(|p| p.len() == 2),
        "{:?}",
        c.placement
    );
    assert_eq!(c.replicas, vec![1; 8]);
    assert!(c.worker_bytes.iter().all(|&b| b < 24 << 30));
    // Attention, embeddings and LM head: about 1.6 G parameters.
    assert!(
        (3.0e9..3.6e9).contains(&(c.coordinator_bytes as f64)),
        "{}",
        c.coordinator_bytes
    );
    // bf16 K and V of 8 heads of 128 in 32 layers.
    assert_eq!(c.kv_bytes_per_token, 32 * 2 * 1024 * 2);
    assert!(c.kv_tokens > 100_000);
}

#[test]
fn too_little_memory_says_what_would_fit() {
    let e = plan(&req("3x24GiB:8c", DType::BF16), &cal())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("need 4 such hosts") && e.contains("quantize"),
        "{e}"
    );
    // Q8_0 experts fit three hosts, with room for replicas of some.
    let c = plan(&req("3x24GiB:8c", DType::Q8_0), &cal()).unwrap();
    assert!(c.replicas.iter().all(|&r| r >= 1));
    assert!(c.placement.iter().all(|p| p.len() <= 4));
    let coord = PlanRequest {
        coordinator: "2GiB:8c".parse().unwrap(),
        ..req("4x24GiB:8c", DType::BF16)
    };
    assert!(plan(&coord, &cal())
        .unwrap_err()
        .to_string()
        .contains("coordinator"));
}

#[test]
fn an_uncalibrated_format_is_refused() {
    let e = plan(&req("4x24GiB:8c", DType::F16), &cal())
        .unwrap_err()
        .to_string();
    assert!(e.contains("F16") && e.contains("--calibrate"), "{e}");
}

#[test]
fn throughput_grows_with_quota_bound_workers() {
    // A small model on workers of a quarter core each: the workers bound the step.
    let small = |n: usize, replicate: bool| PlanRequest {
        shape: Shape {
            hidden: 1024,
            intermediate: 3584,
            layers: 8,
            q_dim: 1024,
            kv_dim: 256,
            vocab: 32000,
            experts: 8,
            top_k: 2,
            tied: false,
        },
        workers: format!("{n}x2GiB:0.25c").parse().unwrap(),
        coordinator: "2GiB:1c".parse().unwrap(),
        replicate,
        reserve_bytes: 0,
        ..req("1x1GiB:1c", DType::BF16)
    };
    let rate = |n, rep| plan(&small(n, rep), &cal()).unwrap().at_streams;
    let one = rate(1, false);
    assert_eq!(one.limit, Limit::WorkerCpu);
    for (n, rep) in [(2, false), (4, false), (2, true), (4, true)] {
        let r = rate(n, rep);
        let x = r.tok_s / one.tok_s;
        assert!(
            x > 0.8 * n as f64 && x < 1.05 * n as f64,
            "{n} workers (replicas {rep}): {x:.2}x"
        );
    }
    // At batch 1 an even split puts a token's two experts on one worker 3 times in 7; with
    // replicas the coordinator always spreads them.
    let b1 = |rep| {
        let r = PlanRequest {
            workers: "2x2GiB:1c".parse().unwrap(),
            ..small(2, rep)
        };
        plan(&r, &cal()).unwrap().batch1.tok_s
    };
    assert!(b1(true) > 1.1 * b1(false), "{} vs {}", b1(true), b1(false));
    // On quota-bound workers full replicas take turns at batch 1, so all four quotas serve
    // it, as in an even split.
    let q1 = |rep| plan(&small(4, rep), &cal()).unwrap().batch1.tok_s;
    assert!(q1(true) > 0.95 * q1(false), "{} vs {}", q1(true), q1(false));
}

#[test]
fn coordinators_add_throughput_until_the_workers_are_full() {
    let mut r = req("8x24GiB:16c", DType::BF16);
    r.streams = 1;
    let one = plan(&r, &cal()).unwrap().at_streams;
    assert_eq!(one.limit, Limit::Latency);
    r.coordinator.count = 2;
    let two = plan(&r, &cal()).unwrap().at_streams;
    assert!(
        (two.tok_s / one.tok_s - 2.0).abs() < 0.01,
        "{}",
        two.tok_s / one.tok_s
    );
    // Workers of a tenth of a core are the limit whoever sends them work.
    let mut slow = req("8x24GiB:0.1c", DType::BF16);
    let one = plan(&slow, &cal()).unwrap().at_streams;
    slow.coordinator.count = 2;
    let two = plan(&slow, &cal()).unwrap().at_streams;
    assert_eq!(two.limit, Limit::WorkerCpu);
    assert!(two.tok_s / one.tok_s < 1.1, "{}", two.tok_s / one.tok_s);
}

#[test]
fn coordinators_to_fill_the_workers() {
    // Workers of a tenth of a core: one coordinator already keeps them busy.
    let slow = req("8x24GiB:0.1c", DType::BF16);
    assert_eq!(plan(&slow, &cal()).unwrap().fill.coordinators, 1);
    // Large hosts at batch 1: the latency chain leaves the workers idle, so coordinators add
    // throughput for a while, and the rate reported is that of all of them.
    let mut fast = req("8x24GiB:16c", DType::BF16);
    fast.streams = 1;
    let c = plan(&fast, &cal()).unwrap();
    let (n, tok_s, one) = (c.fill.coordinators, c.fill.tok_s, c.at_streams.tok_s);
    assert!(n > 2 && n < MAX_FILL, "{n}");
    // Each coordinator counted added at least half of one's rate.
    assert!(
        tok_s >= one * (1.0 + (n - 1) as f64 / 2.0) - 1e-9,
        "{n} at {tok_s} against {one}"
    );
    fast.coordinator.count = n;
    assert!((plan(&fast, &cal()).unwrap().at_streams.tok_s - tok_s).abs() < 1e-9);
    // The same answer whatever count the request names.
    assert_eq!(plan(&fast, &cal()).unwrap().fill.coordinators, n);
}

#[test]
fn network_bytes_follow_the_rows_sent() {
    let mut r = req("8x24GiB:8c", DType::BF16);
    r.streams = 1;
    let c = plan(&r, &cal()).unwrap();
    // One expert per worker: a token's two experts are on two workers, each sent the hidden
    // state and sending back a partial sum (f32), plus two route entries, in every layer.
    let want = 32.0 * (2.0 * 2.0 * 4096.0 * 4.0 + 2.0 * 8.0);
    assert!(
        (c.net_bytes_per_token_batch1 - want).abs() < 1e-6,
        "{}",
        c.net_bytes_per_token_batch1
    );
    // A slow link becomes the limit.
    r.net = "100mbit".parse().unwrap();
    r.streams = 64;
    assert_eq!(plan(&r, &cal()).unwrap().at_streams.limit, Limit::Network);
}

#[test]
fn the_prediction_is_the_same_every_time() {
    let a = plan(&req("4x24GiB:8c", DType::BF16), &cal()).unwrap();
    let b = plan(&req("4x24GiB:8c", DType::BF16), &cal()).unwrap();
    assert_eq!(a.at_streams.tok_s.to_bits(), b.at_streams.tok_s.to_bits());
}
