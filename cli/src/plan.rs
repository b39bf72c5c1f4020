//! `switchyard plan`: how a model would run on given hosts (placement, memory per role, KV
//! capacity, network bytes) and the decode throughput to expect, predicted from costs that
//! `switchyard bench --calibrate` measured (switchyard's own calibration of a 2-core AMD EPYC
//! VM when none is given). The cost model is `switchyard_cluster::capacity`'s.

use anyhow::Context;
use std::fmt::Write as _;
use std::path::PathBuf;
use switchyard_cluster::capacity::{
    self, Calibration, HostSpec, NetSpec, PlanRequest, Rate, Shape,
};
use switchyard_model::{weights::DType, Checkpoint, KvDtype, QuantFormat};
use switchyard_wire::WireDType;

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face checkpoint folder (its config.json and weight format).
    #[arg(long, required_unless_present = "preset", conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// A real model's shape instead of a checkpoint.
    #[arg(long)]
    preset: Option<crate::gen_model::Preset>,
    /// Layers of the preset (its own count by default).
    #[arg(long, requires = "preset")]
    layers: Option<usize>,
    /// Weight format of the preset: bf16, f16 or f32.
    #[arg(long, requires = "preset", default_value = "bf16")]
    dtype: DType,
    /// Quantize the experts at load (as `serve --quantize`).
    #[arg(long)]
    quantize: Option<QuantFormat>,
    /// The expert workers' hosts: COUNTxMEMORY:CORESc[:BANDWIDTH], e.g. 4x24GiB:8c:40GBps
    /// (a fractional core count is a CPU quota; bandwidth defaults to the calibrated core's
    /// rate times the cores).
    #[arg(long)]
    hosts: HostSpec,
    /// Coordinators, each on a host of its own, sharing the workers.
    #[arg(long, default_value_t = 1)]
    coordinators: usize,
    /// The coordinators' host (default: the same kind as the workers').
    #[arg(long)]
    coordinator_host: Option<HostSpec>,
    /// Link rate and one-way latency between hosts.
    #[arg(long, default_value = "10gbit,200us")]
    net: NetSpec,
    /// Concurrent streams per coordinator.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    streams: u64,
    /// KV positions per stream while it decodes (prompt and output so far).
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// As `serve --kv-cache-dtype`.
    #[arg(long, default_value = "f32")]
    kv_cache_dtype: KvDtype,
    /// As `serve --wire-dtype`.
    #[arg(long, default_value = "f32")]
    wire_dtype: WireDType,
    /// fill: spare worker memory holds replicas, which the coordinator balances over; none:
    /// every expert once.
    #[arg(long, default_value = "fill", value_parser = ["fill", "none"])]
    replicas: String,
    /// As `serve --overlap` (two micro-batches per step).
    #[arg(long, default_value = "off", value_parser = crate::cluster::parse_on_off, action = clap::ArgAction::Set)]
    overlap: bool,
    /// Memory each host keeps for its system, e.g. 1GiB or 0.
    #[arg(long, default_value = "1GiB")]
    reserve: String,
    /// A calibration from `switchyard bench --calibrate` (default: the shipped one).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cal = match &a.calibration {
        Some(p) => serde_json::from_str::<Calibration>(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("{} is not a calibration", p.display()))
        .and_then(|c| {
            c.check()
                .with_context(|| format!("{} is not a usable calibration", p.display()))?;
            Ok(c)
        })?,
        None => Calibration::builtin(),
    };
    let (shape, dense, stored, name) = match (&a.model, a.preset) {
        (Some(dir), _) => {
            let ck = Checkpoint::open(dir).with_context(|| format!("opening {}", dir.display()))?;
            let dtype = ck
                .dominant_dtype()
                .context("the checkpoint has no weights")?;
            // A quantized checkpoint's attention, embeddings and head stay in a float type.
            let (dense, stored) = match dtype.quant() {
                Some(_) => (DType::BF16, Some(dtype)),
                None => (dtype, None),
            };
            (
                Shape::of(ck.config()),
                dense,
                stored,
                dir.display().to_string(),
            )
        }
        (None, Some(_)) => {
            let layers = a.layers.unwrap_or(32);
            anyhow::ensure!(layers >= 1, "--layers must be at least 1");
            anyhow::ensure!(
                a.dtype.quant().is_none(),
                "--dtype is bf16, f16 or f32; quantize with --quantize"
            );
            (
                Shape::mixtral_8x7b(layers),
                a.dtype,
                None,
                format!("Mixtral-8x7B's shape, {layers} layers"),
            )
        }
        (None, None) => anyhow::bail!("give --model or --preset"),
    };
    let experts = match (a.quantize, stored) {
        (Some(QuantFormat::Q8_0), _) => DType::Q8_0,
        (Some(QuantFormat::Q4_0), _) => DType::Q4_0,
        (None, Some(q)) => q,
        (None, None) => dense,
    };
    anyhow::ensure!(a.coordinators >= 1, "--coordinators must be at least 1");
    let mut coordinator = a.coordinator_host.unwrap_or(a.hosts);
    coordinator.count = a.coordinators;
    let req = PlanRequest {
        shape,
        dense,
        experts,
        workers: a.hosts,
        coordinator,
        net: a.net,
        streams: a.streams as usize,
        context: a.context,
        kv_elem_bytes: a.kv_cache_dtype.size(),
        wire_elem_bytes: a.wire_dtype.size(),
        replicate: a.replicas == "fill",
        overlap: a.overlap,
        reserve_bytes: parse_reserve(&a.reserve)?,
    };
    let c = capacity::plan(&req, &cal)?;
    let mut o = String::new();
    if a.json {
        writeln!(
            o,
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": name,
                "experts_dtype": experts.as_str(),
                "dense_dtype": dense.as_str(),
                "calibration": { "cpu": cal.cpu, "kernels": cal.kernels, "model": cal.model },
                "plan": c,
            }))?
        )?;
        return emit(&o);
    }
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    writeln!(
        o,
        "model       {name}: experts {}, dense {}",
        experts.as_str(),
        dense.as_str()
    )?;
    writeln!(
        o,
        "calibrated  on {} ({}), {}",
        cal.cpu, cal.kernels, cal.model
    )?;
    writeln!(
        o,
        "workers     {} × {:.1} GiB, {} cores; one expert in every layer is {:.2} GiB",
        req.workers.count,
        gib(req.workers.memory_bytes),
        req.workers.cores,
        gib(c.expert_bytes)
    )?;
    for (i, (p, b)) in c.placement.iter().zip(&c.worker_bytes).enumerate() {
        let list: Vec<String> = p.iter().map(u32::to_string).collect();
        writeln!(
            o,
            "  worker {i:<3} experts {:<16} {:>7.2} GiB",
            list.join(","),
            gib(*b)
        )?;
    }
    let reps: Vec<String> = c.replicas.iter().map(usize::to_string).collect();
    writeln!(o, "  replicas per expert: {}", reps.join(" "))?;
    writeln!(
        o,
        "coordinator {} × {:.1} GiB, {} cores: {:.2} GiB of weights and runtime; KV room for {} positions ({} bytes each, {})",
        req.coordinator.count,
        gib(req.coordinator.memory_bytes),
        req.coordinator.cores,
        gib(c.coordinator_bytes),
        c.kv_tokens,
        c.kv_bytes_per_token,
        a.kv_cache_dtype
    )?;
    writeln!(
        o,
        "network     {:.2} MB per token at batch 1; at {} streams {:.2} MB per token, {:.1} MB per step",
        c.net_bytes_per_token_batch1 / 1e6,
        a.streams,
        c.net_bytes_per_token / 1e6,
        c.net_bytes_per_step / 1e6
    )?;
    writeln!(o, "decode (context {} positions):", a.context)?;
    for (label, r) in [("batch 1", &c.batch1), ("streams", &c.at_streams)] {
        print_rate(&mut o, label, r, a.coordinators)?;
    }
    let f = &c.fill;
    let n = f.coordinators;
    if n == capacity::MAX_FILL {
        writeln!(
            o,
            "fill        {n} coordinators of {} streams each do not fill these workers: {:.1} tok/s, and more would add more",
            a.streams, f.tok_s
        )?;
    } else {
        writeln!(
            o,
            "fill        {n} coordinator{} of {} streams each fill{} these workers: {:.1} tok/s; one more would add under half of one's rate",
            if n == 1 { "" } else { "s" },
            a.streams,
            if n == 1 { "s" } else { "" },
            f.tok_s
        )?;
    }
    emit(&o)
}

/// Writes the report to stdout.
fn emit(o: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    std::io::stdout().lock().write_all(o.as_bytes())?;
    Ok(())
}

fn print_rate(o: &mut String, label: &str, r: &Rate, coordinators: usize) -> std::fmt::Result {
    let who = if coordinators > 1 {
        format!("{} streams × {coordinators} coordinators", r.streams)
    } else {
        format!("{} streams", r.streams)
    };
    writeln!(
        o,
        "  {label:<8} {who:<28} {:>8.1} tok/s  step {:>7.1} ms, limited by {:?}; per layer attention {:.2} ms, dispatch {:.2} ms, experts {:.2} ms",
        r.tok_s, r.step_ms, r.limit, r.attention_ms, r.dispatch_ms, r.experts_ms
    )
}

/// `1GiB`, `512MiB`, `0`.
fn parse_reserve(s: &str) -> anyhow::Result<u64> {
    if s.trim() == "0" {
        return Ok(0);
    }
    let h: HostSpec = format!("{s}:1c")
        .parse()
        .map_err(|_| anyhow::anyhow!("--reserve {s:?}: expected a size such as 1GiB or 0"))?;
    Ok(h.memory_bytes)
}
