//! `switchyard bench --calibrate`: the per-core costs `switchyard plan` predicts from, measured
//! on this machine with this checkpoint. Each cost is one thread's, on one core:
//! - the read bandwidth of one thread streaming;
//! - one SwiGLU expert at 1-128 rows, per weight byte, in the checkpoint's format and as
//!   Q8_0 and Q4_0, cycling through every expert of every layer so that no weight is cached;
//! - the coordinator's per-layer work beyond its linears (decode steps with the experts left
//!   out), and a step's beyond its layers and LM head;
//! - one expert call to a loopback worker: CPU on each side beyond the experts, and the
//!   latency left over.

use super::{bandwidth::BandwidthProbe, median, Args, LocalWorkers};
use anyhow::Context;
use rand::{Rng, SeedableRng};
use std::time::Instant;
use switchyard_cluster::capacity::{Calibration, LinearCost, RpcCost, Shape};
use switchyard_cluster::StaticPlacement;
use switchyard_coordinator::dispatch::{DispatchConfig, RemoteExperts};
use switchyard_model::{
    Checkpoint, Cpu, ExpertExecutor, ExpertSet, KvCache, KvDtype, LayerId, LocalExperts, Logits,
    Mixtral, NoProgress, QuantFormat, QuantPlan, RoutePlan, SeqKv, SeqStep, StepOutput,
    StepScratch,
};

/// Row counts the expert curve is measured at.
const ROWS: [usize; 8] = [1, 2, 4, 8, 16, 32, 64, 128];
/// Decode batch sizes the coordinator's own work is measured at.
const BATCHES: [usize; 3] = [1, 8, 32];
/// Prompt tokens per sequence before the measured decode steps.
const CONTEXT: usize = 32;
const DECODE_STEPS: usize = 8;
/// Row counts of the calibrated expert calls.
const RPC_ROWS: [usize; 3] = [1, 8, 32];
const RPC_CALLS: usize = 50;
const RPC_BLOCKS: usize = 5;

pub(super) fn run(a: &Args) -> anyhow::Result<()> {
    let ck =
        Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    anyhow::ensure!(
        !ck.is_gguf() && ck.expert_format().is_none() && a.cluster.quant.quantize.is_none(),
        "calibrate on a float safetensors checkpoint, without --quantize: it measures Q8_0 and Q4_0 itself"
    );
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .context("starting a one-thread pool")?;
    eprintln!("calibrating on one core: read bandwidth");
    let read = one.install(|| BandwidthProbe::new(512).sample());
    let mut expert = Vec::new();
    let native = ck
        .dominant_dtype()
        .context("the checkpoint has no weights")?;
    for quant in [None, Some(QuantFormat::Q8_0), Some(QuantFormat::Q4_0)] {
        let name = quant.map_or(native.as_str(), |q| q.as_str());
        eprintln!("calibrating on one core: an expert in {name}");
        expert.push(expert_curve(&a.model, quant, &one)?);
    }
    eprintln!("calibrating on one core: the coordinator's layers");
    let dense = expert.first().context("no expert curve")?.clone();
    let (layer, step) = coordinator_costs(&ck, &dense, read, &one)?;
    eprintln!("calibrating: expert calls to a loopback worker");
    let rpc = rpc_cost(&a.model, &ck)?;
    let cal = Calibration {
        cpu: cpu_name(),
        kernels: switchyard_model::backend::cpu::linear::signature(),
        model: a.model.display().to_string(),
        read_bytes_per_s_core: read,
        expert,
        layer_fixed_ns: layer.0,
        layer_ns_per_token_hidden: layer.1,
        step_fixed_ns: step.0,
        step_ns_per_token: step.1,
        rpc,
    };
    let json = serde_json::to_string_pretty(&cal)?;
    match &a.out {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            let path = dir.join("calibration.json");
            std::fs::write(&path, json + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => {
            use std::io::Write as _;
            writeln!(std::io::stdout().lock(), "{json}")?;
        }
    }
    Ok(())
}

/// The CPU's model name, family and model from /proc/cpuinfo, where there is one (a VM may
/// name only the vendor's line, "AMD EPYC", and the family tells Zen 3 from Zen 4).
fn cpu_name() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    match (field("model name"), field("cpu family"), field("model")) {
        (Some(name), Some(fam), Some(model)) => format!("{name} (family {fam}, model {model})"),
        (Some(name), ..) => name,
        _ => std::env::consts::ARCH.to_string(),
    }
}

/// One expert's ns per weight byte at each of [`ROWS`], its experts in `quant` (or as stored).
fn expert_curve(
    model: &std::path::Path,
    quant: Option<QuantFormat>,
    one: &rayon::ThreadPool,
) -> anyhow::Result<LinearCost> {
    let mut ck = Checkpoint::open(model)?;
    let dtype = match quant {
        Some(q) => {
            ck.set_quantize(QuantPlan::experts(q))?;
            q.as_str().to_ascii_uppercase()
        }
        None => ck
            .dominant_dtype()
            .map(|d| d.as_str().to_string())
            .unwrap_or_default(),
    };
    let cfg = ck.config().clone();
    let all = ExpertSet::all(cfg.num_local_experts);
    let experts = LocalExperts::load(&Cpu, &ck, &all, &NoProgress)?;
    let per_layer = LocalExperts::<Cpu>::bytes_loaded(
        &ck,
        &ExpertSet::from_indices(cfg.num_local_experts, [0]),
    ) as f64
        / cfg.num_hidden_layers as f64;
    let h = cfg.hidden_size;
    let pairs: Vec<(usize, usize)> = (0..cfg.num_hidden_layers)
        .flat_map(|l| (0..cfg.num_local_experts).map(move |e| (l, e)))
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut ns_per_byte = Vec::new();
    for &rows in &ROWS {
        let x: Vec<f32> = (0..rows * h).map(|_| rng.random::<f32>() - 0.5).collect();
        let mut out = vec![0.0f32; rows * h];
        let plans: Vec<RoutePlan> = (0..cfg.num_local_experts)
            .map(|e| {
                let mut p = RoutePlan::new();
                for _ in 0..rows {
                    p.push_row([(e as u16, 1.0)]);
                }
                p
            })
            .collect();
        // At least two passes over every expert (the first unmeasured), and half a second.
        let mut times = Vec::new();
        let start = Instant::now();
        let mut pass = 0;
        while pass < 3 || (start.elapsed().as_secs_f64() < 0.5 && pass < 50) {
            for &(l, e) in &pairs {
                let layer = LayerId::new(l, &cfg)?;
                let t = Instant::now();
                one.install(|| experts.run(layer, &x, &plans[e], &mut out))?;
                if pass > 0 {
                    times.push(t.elapsed().as_secs_f64() * 1e9);
                }
            }
            pass += 1;
        }
        ns_per_byte.push(median(times) / per_layer);
    }
    Ok(LinearCost {
        dtype,
        rows: ROWS.to_vec(),
        ns_per_byte,
    })
}

/// An expert stage that computes nothing: the coordinator's own work alone.
struct NoExperts;

impl ExpertExecutor for NoExperts {
    fn run(
        &self,
        _: LayerId,
        _: &[f32],
        _: &RoutePlan,
        out: &mut [f32],
    ) -> switchyard_model::Result<()> {
        out.fill(0.0);
        Ok(())
    }
}

/// Least squares of `y = a + b·x`, both clamped at zero.
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let b = if sxx > 0.0 { (sxy / sxx).max(0.0) } else { 0.0 };
    ((my - b * mx).max(0.0), b)
}

/// Decode steps of each of [`BATCHES`] with no experts: per layer, what remains of the
/// attention, router and combine phases after the linears and KV reads the planner counts
/// itself (`fixed`, `per token·hidden` ns); per step, what remains after the layers and the LM
/// head (`fixed`, `per token`).
fn coordinator_costs(
    ck: &Checkpoint,
    dense: &LinearCost,
    read: f64,
    one: &rayon::ThreadPool,
) -> anyhow::Result<((f64, f64), (f64, f64))> {
    use switchyard_model::profile;
    let cfg = ck.config().clone();
    let dtype = ck.dominant_dtype().context("no weights")?;
    let shape = Shape::of(&cfg);
    let attention_bytes = dtype.bytes_for(shape.attention_params()) as f64;
    let lm_bytes = (cfg.vocab_size * cfg.hidden_size * dtype.size()) as f64;
    let model = Mixtral::load(Cpu, ck, &NoProgress)?;
    let (mut layer_pts, mut step_pts) = (Vec::new(), Vec::new());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for &b in &BATCHES {
        let positions = CONTEXT + DECODE_STEPS + 2;
        let mut kv = KvCache::new(&Cpu, &cfg, 16, b * positions.div_ceil(16) + 1, KvDtype::F32)?;
        let mut seqs: Vec<SeqKv> = (0..b).map(|_| SeqKv::default()).collect();
        let mut scratch = StepScratch::new(&Cpu)?;
        let mut out = StepOutput::new(Logits::Last);
        let vocab = cfg.vocab_size as u32;
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|_| (0..CONTEXT).map(|_| rng.random_range(0..vocab)).collect())
            .collect();
        let mut steps: Vec<SeqStep> = seqs
            .iter_mut()
            .zip(&prompts)
            .map(|(kv, p)| SeqStep { tokens: p, kv })
            .collect();
        one.install(|| model.step(&mut steps, &mut kv, &NoExperts, &mut scratch, &mut out))?;
        drop(steps);
        let next: Vec<[u32; 1]> = (0..b).map(|i| [i as u32 % vocab]).collect();
        profile::enable(true);
        profile::reset();
        let start = Instant::now();
        for _ in 0..DECODE_STEPS {
            let mut steps: Vec<SeqStep> = seqs
                .iter_mut()
                .zip(&next)
                .map(|(kv, t)| SeqStep { tokens: t, kv })
                .collect();
            one.install(|| model.step(&mut steps, &mut kv, &NoExperts, &mut scratch, &mut out))?;
        }
        let total = start.elapsed().as_secs_f64() * 1e9 / DECODE_STEPS as f64;
        let phases = profile::seconds();
        profile::enable(false);
        let layers_ns = (phases[0] + phases[1] + phases[3]) * 1e9 / DECODE_STEPS as f64;
        let per_layer = layers_ns / cfg.num_hidden_layers as f64;
        let ctx = (CONTEXT + DECODE_STEPS / 2) as f64;
        let kv_bytes = b as f64 * ctx * 2.0 * cfg.kv_dim() as f64 * 4.0;
        let counted = dense.at(b) * attention_bytes + kv_bytes / read * 1e9;
        layer_pts.push(((b * cfg.hidden_size) as f64, per_layer - counted));
        let head = total - layers_ns - phases[2] * 1e9 / DECODE_STEPS as f64;
        tracing::info!(
            batch = b,
            layer_ns = per_layer,
            layer_linears_ns = dense.at(b) * attention_bytes,
            kv_ns = kv_bytes / read * 1e9,
            head_ns = head,
            lm_head_ns = dense.at(b) * lm_bytes,
            "coordinator calibration point"
        );
        step_pts.push((b as f64, head - dense.at(b) * lm_bytes));
    }
    Ok((fit(&layer_pts), fit(&step_pts)))
}

/// CPU time of every thread of process `pid` (`self` for this one), ns.
fn cpu_ns(pid: &str) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .context("reading /proc (calibration needs Linux)")?
    {
        let stat = std::fs::read_to_string(t?.path().join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    Ok(total)
}

/// Calls to one loopback worker of one thread hosting every expert, at each of [`RPC_ROWS`]:
/// each side's CPU beyond the experts (`fixed + per byte`) and the latency neither accounts for.
fn rpc_cost(model: &std::path::Path, ck: &Checkpoint) -> anyhow::Result<RpcCost> {
    let cfg = ck.config().clone();
    let n = cfg.num_local_experts;
    let workers = LocalWorkers::start(model, 1, n, 1, false, None)?;
    let pid = workers
        .children
        .first()
        .context("no worker started")?
        .id()
        .to_string();
    let placement = StaticPlacement::parse(&workers.spec)?;
    let dcfg = DispatchConfig::default();
    let wire = dcfg.wire_dtype.size();
    let remote = RemoteExperts::connect(&placement, &cfg, &ck.fingerprint(), dcfg)?;
    let layer = LayerId::new(0, &cfg)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let (mut coord, mut work, mut lat) = (Vec::new(), Vec::new(), Vec::new());
    for &t in &RPC_ROWS {
        let x: Vec<f32> = (0..t * cfg.hidden_size)
            .map(|_| rng.random::<f32>() - 0.5)
            .collect();
        let logits: Vec<f32> = (0..t * n).map(|_| rng.random::<f32>() * 4.0).collect();
        let mut plan = RoutePlan::new();
        plan.route_into(&logits, t, n, cfg.num_experts_per_tok);
        let mut out = vec![0.0f32; t * cfg.hidden_size];
        for _ in 0..10 {
            remote.run(layer, &x, &plan, &mut out)?;
        }
        let compute =
            |r: &RemoteExperts| r.snapshot().iter().map(|w| w.compute_micros).sum::<u64>();
        // Blocks of calls, each block's means; the median block's (a shared machine's
        // hiccups land in one block or two).
        let (mut cs, mut ws, mut ls) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RPC_BLOCKS {
            let (c0, w0, k0) = (cpu_ns("self")?, cpu_ns(&pid)?, compute(&remote));
            let start = Instant::now();
            for _ in 0..RPC_CALLS {
                remote.run(layer, &x, &plan, &mut out)?;
            }
            let calls = RPC_CALLS as f64;
            let wall = start.elapsed().as_secs_f64() * 1e9 / calls;
            let c = (cpu_ns("self")? - c0) / calls;
            let k = (compute(&remote) - k0) as f64 * 1e3 / calls;
            let w = (cpu_ns(&pid)? - w0) / calls;
            cs.push(c);
            ws.push((w - k).max(0.0));
            ls.push((wall - c - w).max(0.0));
        }
        let bytes = (2 * t * cfg.hidden_size * wire + t * cfg.num_experts_per_tok * 8) as f64;
        coord.push((bytes, median(cs)));
        work.push((bytes, median(ws)));
        lat.push(median(ls));
    }
    let (cf, cb) = fit(&coord);
    let (wf, wb) = fit(&work);
    Ok(RpcCost {
        coordinator_fixed_ns: cf,
        coordinator_ns_per_byte: cb,
        worker_fixed_ns: wf,
        worker_ns_per_byte: wb,
        latency_ns: median(lat),
    })
}
