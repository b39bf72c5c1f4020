//! `switchyard bench`: prefill and decode throughput of one sequence, median of several runs,
//! with the machine's measured read bandwidth and how close decode comes to the bound it sets
//! (decode reads every dense weight, one embedding row and the routed experts' weights once per
//! token), the per-layer time split of decode, and with `--concurrency 1,8,32` runs of that many
//! sequences through the continuous-batching scheduler. It measures embedded mode, and with
//! `--local-workers N` also a cluster of N loopback workers it starts itself, in the same run.
//! Modes and counts take turns run by run, so every ratio the report gives compares runs made
//! side by side.
//! Results go to stdout and `--out` as JSON, with a PNG plot.
//!
//! `mode.rs` holds one mode under measurement, `concurrent.rs` a run of many sequences,
//! `workers.rs` the loopback workers it starts, `bandwidth.rs` the bound it measures against;
//! `calibrate.rs` is `--calibrate`, the costs `switchyard plan` predicts from.

mod bandwidth;
mod calibrate;
mod concurrent;
mod mode;
mod workers;

use anyhow::Context;
use bandwidth::{decode_bytes_per_token, BandwidthProbe};
use mode::{Mode, ModeResult};
use std::io::Write;
use std::path::PathBuf;
use switchyard_model::KvDtype;
pub(crate) use workers::LocalWorkers;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face checkpoint folder.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    #[command(flatten)]
    cluster: crate::cluster::ClusterArgs,
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens decoded for the decode measurement.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Measured runs (the median is reported); one unmeasured warm-up run comes first.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also run this many sequences at once through the continuous-batching scheduler, e.g.
    /// 1,8,32: aggregate generated tok/s, time to first token and inter-token latency. The
    /// counts take turns run by run, so their ratios compare runs made side by side.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Prompt tokens of each sequence in the concurrency runs.
    #[arg(long, default_value_t = 32)]
    batch_prompt_tokens: usize,
    /// Tokens that every concurrency-run prompt starts with (a shared system prompt), before
    /// its own --batch-prompt-tokens. With the prefix cache on, runs after the first find them
    /// cached, as a server does once the first request with that system prompt has run.
    #[arg(long, default_value_t = 0)]
    shared_prefix_tokens: usize,
    /// Run the concurrency runs' schedulers without the prefix cache. Each run's own tokens
    /// differ from every other run's, so the cache only ever serves --shared-prefix-tokens.
    #[arg(long)]
    no_prefix_caching: bool,
    /// Also measure a cluster of this many worker processes on loopback, started by the bench
    /// (experts split evenly). Its runs take turns with embedded mode's, so both engines and
    /// the workers are in memory at once (see --one-mode-at-a-time).
    #[arg(long, default_value_t = 0)]
    local_workers: usize,
    /// Compute threads of each local worker (default: --threads). Workers and coordinator
    /// share this machine's cores: more threads in all than cores makes them wait on each
    /// other, which a cluster of machines does not.
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Every local worker hosts every expert (instead of an even split), and the coordinator
    /// spreads each layer's experts over them by load: at batch 1 a token's two experts run
    /// on two workers, one core each. Costs one copy of the experts per worker.
    #[arg(long)]
    replicate_experts: bool,
    /// Measure each mode to the end, and drop it, before loading the next (embedded mode
    /// first, then the workers and each cluster): memory for one engine at a time, for
    /// checkpoints too large to hold twice, but ratios between modes then compare runs
    /// minutes apart.
    #[arg(long)]
    one_mode_at_a_time: bool,
    /// Measure every cluster twice, with dual-batch overlap on and off (see --overlap).
    #[arg(long)]
    compare_overlap: bool,
    /// Measure embedded mode twice, with an f32 and a bf16 KV cache (see --kv-cache-dtype),
    /// side by side; clusters keep --kv-cache-dtype.
    #[arg(long)]
    compare_kv_dtypes: bool,
    /// Write bench.json and bench.png into this folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// TrueType font for the plot's text (default: DejaVu Sans from the system).
    #[arg(long)]
    font: Option<PathBuf>,
    /// MiB the read-bandwidth probe streams around every run (the bound decode is compared
    /// with); smaller for a host with little memory, as in `scripts/bench-hosts.sh`.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65536))]
    bandwidth_probe_mib: u64,
    /// Instead of throughput, measure the per-core costs `switchyard plan` predicts from
    /// (one thread's read bandwidth, an expert's time per weight byte at 1-128 rows in the
    /// checkpoint's format, Q8_0 and Q4_0, the coordinator's per-layer work, an expert call's
    /// overhead): written to --out as calibration.json, or to stdout.
    #[arg(long)]
    calibrate: bool,
}

/// The CPU activation mode this process runs in (`--cpu-activations`), which local workers
/// are started with too.
pub(super) fn activations() -> &'static str {
    if switchyard_model::backend::cpu::linear::bf16_activations() {
        "bf16"
    } else {
        "f32"
    }
}

/// The kernel mode this process runs in (`--deterministic`), which local workers are started
/// with too.
pub(super) fn deterministic() -> &'static str {
    if switchyard_model::backend::cpu::linear::deterministic() {
        "on"
    } else {
        "off"
    }
}

/// The median of `v` (the upper one of an even count), NaN for none.
pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.calibrate {
        return calibrate::run(&a);
    }
    check(&a)?;
    let specs = mode_specs(&a);
    let bytes = decode_bytes_per_token(&a.model, a.cluster.quant.plan())?;
    let results = measure(&a, &specs, bytes)?;
    report(&a, results, bytes)
}

/// Flags that contradict each other.
fn check(a: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.runs >= 1 && a.prompt_tokens >= 1 && a.decode_tokens >= 2,
        "runs, prompt and decode tokens must be positive"
    );
    anyhow::ensure!(
        a.concurrency.iter().all(|&n| n >= 1) && a.batch_prompt_tokens >= 1,
        "--concurrency counts and --batch-prompt-tokens must be positive"
    );
    let own_cluster = own_cluster(a);
    anyhow::ensure!(
        !own_cluster || a.local_workers == 0,
        "--local-workers starts its own workers; leave out --workers, --placement and --etcd"
    );
    anyhow::ensure!(
        !(own_cluster && a.compare_kv_dtypes),
        "--compare-kv-dtypes compares embedded mode; leave out --workers, --placement and --etcd"
    );
    anyhow::ensure!(
        a.local_workers > 0 || (a.worker_threads.is_none() && !a.replicate_experts),
        "--worker-threads and --replicate-experts shape the workers of --local-workers"
    );
    Ok(())
}

/// Whether the user named the cluster (rather than embedded mode and `--local-workers`).
fn own_cluster(a: &Args) -> bool {
    a.cluster.workers.is_some()
        || a.cluster.placement.is_some()
        || a.cluster.registry.etcd.is_some()
}

/// The modes to measure: embedded (unless the cluster is the user's own), then each cluster once
/// per overlap setting.
fn mode_specs(a: &Args) -> Vec<ModeSpec> {
    let own_cluster = own_cluster(a);
    let overlaps = if a.compare_overlap {
        vec![true, false]
    } else {
        vec![a.cluster.overlap]
    };
    // The modes: embedded (unless the cluster is the user's own), then each cluster once per
    // overlap setting.
    let mut specs = Vec::new();
    let (label, local) = if own_cluster {
        ("cluster".to_string(), false)
    } else {
        if a.compare_kv_dtypes {
            for dtype in [KvDtype::F32, KvDtype::Bf16] {
                let mut cluster = a.cluster.clone();
                cluster.kv_cache_dtype = dtype;
                specs.push(ModeSpec {
                    name: format!("embedded, {dtype} KV"),
                    cluster,
                    local: false,
                });
            }
        } else {
            specs.push(ModeSpec {
                name: "embedded".into(),
                cluster: a.cluster.clone(),
                local: false,
            });
        }
        (local_label(a), true)
    };
    if own_cluster || a.local_workers > 0 {
        for &overlap in &overlaps {
            let mut cluster = a.cluster.clone();
            cluster.overlap = overlap;
            let name = if overlaps.len() == 1 {
                label.clone()
            } else if overlap {
                format!("{label}, overlap on")
            } else {
                format!("{label}, overlap off")
            };
            specs.push(ModeSpec {
                name,
                cluster,
                local,
            });
        }
    }
    specs
}

/// Loads the modes and runs their rounds: by default every mode is loaded first and the modes
/// take turns run by run, so a ratio between modes compares runs made side by side, not runs
/// minutes apart on a host whose bandwidth drifts. One at a time, each mode is dropped before
/// the next loads.
fn measure(a: &Args, specs: &[ModeSpec], bytes: u64) -> anyhow::Result<Vec<ModeResult>> {
    let per_mode = (a.runs + 1) * (1 + a.concurrency.len());
    let probe = BandwidthProbe::new(a.bandwidth_probe_mib as usize);
    let bar = progress_bar((per_mode * specs.len()) as u64);
    // By default every mode is loaded first and the modes take turns run by run: a ratio
    // between modes then compares runs made side by side, not runs minutes apart on a host
    // whose bandwidth drifts. One at a time, each mode is dropped before the next loads.
    let groups: Vec<Vec<usize>> = if a.one_mode_at_a_time {
        (0..specs.len()).map(|i| vec![i]).collect()
    } else {
        vec![(0..specs.len()).collect()]
    };
    // Local workers start before the first cluster mode loads and live until every run is
    // done.
    let mut workers: Option<LocalWorkers> = None;
    let mut baseline = None;
    let mut results = Vec::new();
    for group in groups {
        let mut modes = Vec::new();
        for &i in &group {
            let spec = &specs[i];
            let mut cluster = spec.cluster.clone();
            if spec.local {
                if workers.is_none() {
                    bar.set_message("starting local workers");
                    workers = Some(LocalWorkers::for_args(a)?);
                }
                cluster.workers = workers.as_ref().map(|w| w.spec.clone());
            }
            bar.set_message(format!("loading {}", spec.name));
            let loaded = cluster.load(&a.model)?;
            let positions = a.shared_prefix_tokens + a.batch_prompt_tokens + a.decode_tokens;
            modes.push(Mode::new(
                spec.name.clone(),
                loaded,
                &a.concurrency,
                positions,
                a.prompt_tokens + a.decode_tokens,
                !a.no_prefix_caching,
            )?);
        }
        rounds(&mut modes, a, &probe, bytes, &bar)?;
        let first = baseline.get_or_insert_with(|| modes[0].baseline());
        results.extend(modes.into_iter().map(|m| m.finish(a, first)));
    }
    drop(workers);
    bar.finish_and_clear();

    Ok(results)
}

/// The JSON report on stdout, and with `--out` in a folder with its plot.
fn report(a: &Args, results: Vec<ModeResult>, bytes: u64) -> anyhow::Result<()> {
    let samples: Vec<f64> = results
        .iter()
        .flat_map(|r| r.read_gb_s.iter().copied())
        .collect();
    let bandwidth = 1e9 * median(samples.clone());
    let bound = bandwidth / bytes as f64;
    let embedded_decode = results[0].decode_median;
    let modes_json: Vec<_> = results.iter().map(|r| r.json.clone()).collect();
    let kernels = switchyard_model::backend::cpu::linear::isa().as_str();
    let result = serde_json::json!({
        "model": a.model.display().to_string(),
        "threads": rayon::current_num_threads(),
        "cpu_kernels": kernels,
        "cpu_activations": activations(),
        "deterministic": deterministic(),
        "runs": a.runs,
        "prompt_tokens": a.prompt_tokens,
        "decode_tokens": a.decode_tokens,
        "quantize": a.cluster.quant.quantize.map(|q| q.as_str()),
        "quantize_attention": a.cluster.quant.quantize_attention,
        "decode_bytes_per_token": bytes,
        "prefix_caching": !a.no_prefix_caching,
        "memory_read_bandwidth_gb_s": bandwidth / 1e9,
        "memory_read_bandwidth_gb_s_range": [
            samples.iter().copied().fold(f64::INFINITY, f64::min),
            samples.iter().copied().fold(0.0, f64::max),
        ],
        "bandwidth_bound_tok_s": bound,
        "prefill_tok_s_median": results[0].json["prefill_tok_s_median"],
        "decode_tok_s_median": embedded_decode,
        "decode_pct_of_bandwidth_bound": results[0].json["decode_pct_of_bandwidth_bound"],
        "modes": modes_json,
    });
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &result)?;
    writeln!(out)?;
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join("bench.json");
        std::fs::write(&json, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", json.display()))?;
        let title = format!(
            "switchyard bench: {} ({} threads, {}, {} activations, {:.0} GB/s read)",
            a.model.file_name().unwrap_or_default().to_string_lossy(),
            rayon::current_num_threads(),
            kernels,
            activations(),
            bandwidth / 1e9
        );
        let figures: Vec<_> = results.into_iter().map(|r| r.figures).collect();
        crate::plot::write(&dir.join("bench.png"), &title, &figures, a.font.as_deref())?;
    }
    Ok(())
}

/// A mode to measure: its name, and the flags its engine loads with (`local`: over the
/// bench's own loopback workers, whose addresses are filled in once they run).
struct ModeSpec {
    name: String,
    cluster: crate::cluster::ClusterArgs,
    local: bool,
}

/// The name of the cluster of `--local-workers`.
fn local_label(a: &Args) -> String {
    let mut label = format!("cluster ({} workers", a.local_workers);
    if a.replicate_experts {
        label.push_str(", experts replicated");
    }
    if let Some(t) = a.worker_threads {
        label.push_str(&format!(
            ", {t} thread{} each",
            if t == 1 { "" } else { "s" }
        ));
    }
    label.push(')');
    label
}

/// Rounds of runs over `modes`: in each, every mode's single sequence, then its concurrency
/// counts, in an order that alternates round by round so that neither end of a round is
/// favoured. Round 0 warms up, unmeasured.
fn rounds(
    modes: &mut [Mode],
    a: &Args,
    probe: &BandwidthProbe,
    bytes: u64,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    let cells: Vec<(usize, Option<usize>)> = (0..modes.len())
        .flat_map(|m| {
            std::iter::once((m, None)).chain((0..a.concurrency.len()).map(move |c| (m, Some(c))))
        })
        .collect();
    for run in 0..=a.runs {
        let measured = run > 0;
        let order: Box<dyn Iterator<Item = &(usize, Option<usize>)>> = if run % 2 == 0 {
            Box::new(cells.iter())
        } else {
            Box::new(cells.iter().rev())
        };
        for &(m, count) in order {
            let mode = &mut modes[m];
            bar.set_message(mode.name.clone());
            match count {
                None => mode.single(a, probe, bytes, measured)?,
                Some(c) => mode.concurrent(c, a, measured)?,
            }
            bar.inc(1);
        }
    }
    Ok(())
}

fn progress_bar(len: u64) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::hidden();
    pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    pb.set_length(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "bench {msg} [{bar:30}] {pos}/{len} runs ({elapsed})",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}
