//! `switchyard bench-dispatch`: latency of one layer's scatter + gather over loopback workers,
//! against the expert compute the workers report, for several batch sizes. Also measures the
//! machine's floor for such a round trip: a plain TCP echo over loopback whose server is busy
//! for the same compute time before it answers. What the floor costs (waking a thread whose CPU
//! went idle while it waited, on both sides) no RPC stack can remove; the overhead above it is
//! the dispatch path's own.

use anyhow::Context;
use rand::{Rng, SeedableRng};
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};
use switchyard_cluster::StaticPlacement;
use switchyard_coordinator::dispatch::{DispatchConfig, RemoteExperts};
use switchyard_model::{Checkpoint, ExpertExecutor, ExpertSet, LayerId, RoutePlan};
use switchyard_wire::WireDType;

use crate::bench::LocalWorkers;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face checkpoint folder.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    /// Loopback workers to start, experts split evenly between them.
    #[arg(long, default_value_t = 2)]
    spawn: usize,
    /// Compute threads of each spawned worker.
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Batch sizes (tokens) to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16,128")]
    tokens: Vec<usize>,
    /// Measured layer calls per batch size (after 10 warm-up calls).
    #[arg(long, default_value_t = 200)]
    iters: usize,
    /// Activation dtype on the wire (as `serve --wire-dtype`).
    #[arg(long, default_value = "bf16")]
    wire_dtype: WireDType,
}

/// Unmeasured calls before each measurement (connections, caches, thread pools warm up).
const WARMUP: usize = 10;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.spawn >= 1 && a.iters >= 1 && !a.tokens.is_empty() && a.tokens.iter().all(|&t| t >= 1),
        "--spawn, --iters and every --tokens batch size must be positive"
    );
    let ck =
        Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let cfg = ck.config().clone();
    let n = cfg.num_local_experts;
    let workers = LocalWorkers::start(&a.model, a.spawn, n, a.worker_threads, false, None)?;
    let placement = StaticPlacement::parse(&workers.spec)?;
    let dcfg = DispatchConfig {
        wire_dtype: a.wire_dtype,
        ..DispatchConfig::default()
    };
    let remote = RemoteExperts::connect(&placement, &cfg, &ck.fingerprint(), dcfg)?;
    let local = switchyard_model::LocalExperts::load(
        &switchyard_model::Cpu,
        &ck,
        &ExpertSet::all(n),
        &switchyard_model::NoProgress,
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut results = Vec::new();
    for &t in &a.tokens {
        let r = measure(&a, &cfg, t, &remote, &local, &mut rng)?;
        eprintln!(
            "{t:>4} tokens: layer p50 {:>8.0} µs  p99 {:>8.0} µs | worker compute p50 {:>8.0} µs | overhead p50 {:>6.0} µs  p99 {:>6.0} µs | TCP echo floor p50 {:>6.0} µs",
            r["layer_p50_us"].as_f64().unwrap_or(0.0),
            r["layer_p99_us"].as_f64().unwrap_or(0.0),
            r["worker_compute_p50_us"].as_f64().unwrap_or(0.0),
            r["overhead_p50_us"].as_f64().unwrap_or(0.0),
            r["overhead_p99_us"].as_f64().unwrap_or(0.0),
            r["loopback_floor_p50_us"].as_f64().unwrap_or(0.0),
        );
        results.push(r);
    }
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(
        &mut stdout,
        &serde_json::json!({
            "model": a.model.display().to_string(),
            "workers": a.spawn,
            "worker_threads": a.worker_threads,
            "wire_dtype": format!("{:?}", a.wire_dtype),
            "iters": a.iters,
            "results": results,
        }),
    )?;
    writeln!(stdout)?;
    Ok(())
}

/// One batch size: a random layer input of `t` tokens routed at random, through the workers
/// and in this process, and the loopback floor for the same bytes and compute time.
fn measure(
    a: &Args,
    cfg: &switchyard_model::MixtralConfig,
    t: usize,
    remote: &RemoteExperts,
    local: &switchyard_model::LocalExperts<switchyard_model::Cpu>,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> anyhow::Result<serde_json::Value> {
    let (h, n) = (cfg.hidden_size, cfg.num_local_experts);
    let layer = LayerId::new(0, cfg)?;
    let x: Vec<f32> = (0..t * h)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let logits: Vec<f32> = (0..t * n).map(|_| rng.random::<f32>() * 4.0).collect();
    let mut plan = RoutePlan::new();
    plan.route_into(&logits, t, n, cfg.num_experts_per_tok);
    let mut out = vec![0.0f32; t * h];
    let (mut total, mut over, mut comp, mut loc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // The remote calls first, then the in-process ones: interleaved, this process's compute
    // threads would still be spinning from the local run while the workers compute, and on
    // a machine with few cores they would take the workers' CPU time.
    for i in 0..a.iters + WARMUP {
        let before: Vec<u64> = remote.snapshot().iter().map(|w| w.compute_micros).collect();
        let s = Instant::now();
        remote.run(layer, &x, &plan, &mut out)?;
        let us = s.elapsed().as_secs_f64() * 1e6;
        let max_compute = remote
            .snapshot()
            .iter()
            .zip(&before)
            .map(|(w, b)| w.compute_micros - b)
            .max()
            .unwrap_or(0) as f64;
        if i >= WARMUP {
            total.push(us);
            over.push(us - max_compute);
            comp.push(max_compute);
        }
    }
    for i in 0..a.iters + WARMUP {
        let s = Instant::now();
        local.run(layer, &x, &plan, &mut out)?;
        if i >= WARMUP {
            loc.push(s.elapsed().as_secs_f64() * 1e6);
        }
    }
    let compute_p50 = pct(&mut comp, 0.5);
    // Rows each way as the busiest worker sees them: every token once (deduplicated).
    let bytes = t * h * a.wire_dtype.size();
    let mut floor = echo_floor(bytes, Duration::from_secs_f64(compute_p50 / 1e6), a.iters)
        .context("measuring the loopback floor")?;
    Ok(serde_json::json!({
        "tokens": t,
        "layer_p50_us": pct(&mut total, 0.5),
        "layer_p99_us": pct(&mut total, 0.99),
        "worker_compute_p50_us": compute_p50,
        "overhead_p50_us": pct(&mut over, 0.5),
        "overhead_p99_us": pct(&mut over, 0.99),
        "in_process_compute_p50_us": pct(&mut loc, 0.5),
        "loopback_floor_p50_us": pct(&mut floor, 0.5),
        "loopback_floor_p99_us": pct(&mut floor, 0.99),
    }))
}

/// Round trips of `bytes` each way to a loopback TCP echo whose server spins for `busy` before
/// answering (as a worker computes), after [`WARMUP`] unmeasured ones: each one's time beyond
/// `busy`, in µs.
fn echo_floor(bytes: usize, busy: Duration, iters: usize) -> std::io::Result<Vec<f64>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; bytes];
        // Ends when the client hangs up.
        while s.read_exact(&mut buf).is_ok() {
            let start = Instant::now();
            while start.elapsed() < busy {
                std::hint::spin_loop();
            }
            s.write_all(&buf)?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut buf = vec![1u8; bytes];
    let mut over = Vec::with_capacity(iters);
    for i in 0..iters + WARMUP {
        let s = Instant::now();
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
        if i >= WARMUP {
            over.push((s.elapsed().saturating_sub(busy)).as_secs_f64() * 1e6);
        }
    }
    drop(c);
    server
        .join()
        .map_err(|_| std::io::Error::other("the echo server panicked"))??;
    Ok(over)
}
