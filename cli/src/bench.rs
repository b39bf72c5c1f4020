//! `switchyard bench`: prefill and decode throughput of one sequence, median of several runs,
//! with the machine's measured read bandwidth and how close decode comes to the bound it sets
//! (decode reads every dense weight, one embedding row and the routed experts' weights once per
//! token), the per-layer time split of decode, and with `--concurrency 1,8,32` runs of that many
//! sequences through the continuous-batching scheduler. It measures embedded mode, and with
//! `--local-workers N` also a cluster of N loopback workers it starts itself, in the same run.
//! Modes and counts take turns run by run, so every ratio the report gives compares runs made
//! side by side.
//! Results go to stdout and `--out` as JSON, with a PNG plot.

use anyhow::Context;
use std::io::Write;
use std::{path::PathBuf, time::Instant};
use switchyard_coordinator::{
    request::{
        openai::{CommonFields, CompletionRequest, Prompt},
        validation, ValidatedRequest,
    },
    scheduler::{SchedulerHandle, SeqEvent},
    Engine,
};
use switchyard_model::KvDtype;

/// A greedy request for `prompts` (a choice each) that ignores eos and decodes `max_tokens`,
/// checked like any.
fn fixed_request(
    engine: &Engine,
    sched: &SchedulerHandle,
    prompts: Vec<Vec<u32>>,
    max_tokens: usize,
) -> anyhow::Result<ValidatedRequest> {
    const NAME: &str = "bench";
    let body = CompletionRequest {
        common: CommonFields {
            model: Some(NAME.into()),
            max_tokens: Some(max_tokens as i64),
            temperature: Some(0.0),
            ignore_eos: Some(true),
            ..CommonFields::default()
        },
        prompt: Some(Prompt::IdLists(
            prompts
                .into_iter()
                .map(|p| p.into_iter().map(i64::from).collect())
                .collect(),
        )),
        ..CompletionRequest::default()
    };
    let limits = switchyard_coordinator::request::RequestLimits {
        max_seq_len: sched.max_seq_len,
        ..engine.limits(NAME)
    };
    Ok(validation::completion(body, engine.tokenizer(), &limits)?.0)
}

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
}

/// The CPU activation mode this process runs in (`--cpu-activations`), which local workers
/// are started with too.
fn activations() -> &'static str {
    if switchyard_model::backend::cpu::linear::bf16_activations() {
        "bf16"
    } else {
        "f32"
    }
}

/// The median of `v` (the upper one of an even count), NaN for none.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.runs >= 1 && a.prompt_tokens >= 1 && a.decode_tokens >= 2,
        "runs, prompt and decode tokens must be positive"
    );
    anyhow::ensure!(
        a.concurrency.iter().all(|&n| n >= 1) && a.batch_prompt_tokens >= 1,
        "--concurrency counts and --batch-prompt-tokens must be positive"
    );
    let own_cluster = a.cluster.workers.is_some()
        || a.cluster.placement.is_some()
        || a.cluster.registry.etcd.is_some();
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
        (local_label(&a), true)
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
    let per_mode = (a.runs + 1) * (1 + a.concurrency.len());
    let bytes = decode_bytes_per_token(&a.model)?;
    let probe = BandwidthProbe::new();
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
                    workers = Some(LocalWorkers::for_args(&a)?);
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
        rounds(&mut modes, &a, &probe, bytes, &bar)?;
        let first = baseline.get_or_insert_with(|| modes[0].baseline());
        results.extend(modes.into_iter().map(|m| m.finish(&a, first)));
    }
    drop(workers);
    bar.finish_and_clear();

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
        "runs": a.runs,
        "prompt_tokens": a.prompt_tokens,
        "decode_tokens": a.decode_tokens,
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

/// One mode's measurements: JSON for the report, figures for the plot.
struct ModeResult {
    decode_median: f64,
    /// The machine's read bandwidth sampled around each measured run, GB/s.
    read_gb_s: Vec<f64>,
    json: serde_json::Value,
    figures: crate::plot::ModeFigures,
}

/// One mode under measurement (embedded, or a cluster): its engine, a scheduler per
/// concurrency count, and what its measured runs have gathered so far.
struct Mode {
    name: String,
    engine: std::sync::Arc<switchyard_coordinator::Engine>,
    remote: Option<std::sync::Arc<switchyard_coordinator::dispatch::RemoteExperts>>,
    /// The registry watcher, in etcd mode (runs while this lives).
    _membership: Option<switchyard_coordinator::membership::Membership>,
    /// One sequence at a time, no prefix cache: the batch-1 prefill and decode runs.
    single: SchedulerHandle,
    scheds: Vec<SchedulerHandle>,
    prefill: Vec<f64>,
    decode: Vec<f64>,
    /// Seconds in each layer phase over the measured decode steps, and their count.
    phase_s: [f64; 4],
    decoded: usize,
    /// Over a cluster: the workers' reported compute and the calls' wall time, µs.
    compute_us: u64,
    calls_us: u64,
    read_gb_s: Vec<f64>,
    pct_of_bound: Vec<f64>,
    /// Measured runs of each concurrency count.
    runs: Vec<Vec<Run>>,
    /// Sequences submitted so far, warm-up included: numbers each sequence's own tokens.
    submitted: usize,
}

impl Mode {
    /// Takes `loaded`'s engine and starts one scheduler per count in `counts`, sized for it:
    /// a KV cache that holds every sequence's `positions` at once (at least the default), so
    /// that no run is slowed by preemption.
    fn new(
        name: String,
        loaded: switchyard_coordinator::Loaded,
        counts: &[usize],
        positions: usize,
        single_positions: usize,
        prefix_caching: bool,
    ) -> anyhow::Result<Self> {
        use switchyard_coordinator::scheduler::{self, SchedulerConfig};
        use switchyard_model::KvCache;
        let engine = loaded.engine;
        let single = scheduler::start(
            engine.clone(),
            SchedulerConfig {
                prefix_caching: false,
                ..SchedulerConfig::for_sequences(&engine, 1, single_positions)
            },
        )?;
        let defaults = SchedulerConfig::default();
        let block_bytes = KvCache::<switchyard_model::AnyBackend>::block_bytes(
            engine.config(),
            defaults.block_size,
            engine.kv_dtype(),
        );
        let per_seq = positions.div_ceil(defaults.block_size) * block_bytes;
        let scheds = counts
            .iter()
            .map(|&n| {
                scheduler::start(
                    engine.clone(),
                    SchedulerConfig {
                        max_running: n,
                        max_waiting: n,
                        kv_cache_bytes: defaults.kv_cache_bytes.max(n * per_seq),
                        prefix_caching,
                        ..defaults.clone()
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name,
            engine,
            remote: loaded.remote,
            _membership: loaded.membership,
            single,
            scheds,
            prefill: Vec::new(),
            decode: Vec::new(),
            phase_s: [0.0; 4],
            decoded: 0,
            compute_us: 0,
            calls_us: 0,
            read_gb_s: Vec::new(),
            pct_of_bound: Vec::new(),
            runs: counts.iter().map(|_| Vec::new()).collect(),
            submitted: 0,
        })
    }

    /// One batch-1 run straight on the engine: prefill of `--prompt-tokens`, then decode,
    /// recorded where `measured`. The decode is set against the bandwidth sampled just before
    /// and after it (`bytes` read per token): a shared machine's bandwidth drifts by tens of
    /// percent over minutes, and a bound taken at another moment would misstate how close a
    /// run came.
    fn single(
        &mut self,
        a: &Args,
        probe: &BandwidthProbe,
        bytes: u64,
        measured: bool,
    ) -> anyhow::Result<()> {
        use switchyard_model::profile;
        let vocab = self.engine.config().vocab_size as u32;
        // Deterministic token ids spread over the vocabulary (skipping the low special ids).
        let prompt: Vec<u32> = (0..a.prompt_tokens as u32)
            .map(|i| 5 + (i * 7919) % (vocab - 5))
            .collect();
        let read_before = if measured { probe.sample() } else { 0.0 };
        let req = fixed_request(&self.engine, &self.single, vec![prompt], a.decode_tokens)?;
        let before = self.remote.as_ref().map(|r| r.snapshot());
        let start = Instant::now();
        let mut first = None;
        let mut n = 0usize;
        let mut stream = self.single.submit(&req)?;
        while let Some((_, ev)) = stream.blocking_recv() {
            match ev {
                SeqEvent::Token { .. } => {
                    n += 1;
                    if first.is_none() {
                        first = Some(Instant::now());
                        // Time only the decode steps.
                        profile::reset();
                        profile::enable(measured);
                    }
                }
                SeqEvent::Started { .. } => {}
                SeqEvent::Finished { .. } => break,
                SeqEvent::Failed(f) => anyhow::bail!("the batch-1 run failed: {f:?}"),
            }
        }
        let end = Instant::now();
        profile::enable(false);
        let first = first.context("no token generated")?;
        if !measured {
            return Ok(());
        }
        let read = (read_before + probe.sample()) / 2.0;
        self.read_gb_s.push(read / 1e9);
        for (acc, v) in self.phase_s.iter_mut().zip(profile::seconds()) {
            *acc += v;
        }
        self.decoded += n - 1;
        if let (Some(r), Some(b)) = (&self.remote, before) {
            for (w1, w0) in r.snapshot().iter().zip(&b) {
                self.compute_us += w1.compute_micros - w0.compute_micros;
                self.calls_us += w1.latency_micros - w0.latency_micros;
            }
        }
        self.prefill
            .push(a.prompt_tokens as f64 / (first - start).as_secs_f64());
        if n > 1 {
            let tok_s = (n - 1) as f64 / (end - first).as_secs_f64();
            self.decode.push(tok_s);
            self.pct_of_bound.push(100.0 * tok_s * bytes as f64 / read);
        }
        Ok(())
    }

    /// One run of the `c`th concurrency count through its scheduler, kept where `measured`.
    fn concurrent(&mut self, c: usize, a: &Args, measured: bool) -> anyhow::Result<()> {
        let vocab = self.engine.config().vocab_size as u32;
        let first = self.submitted;
        self.submitted += a.concurrency[c];
        let r = run_once(
            &self.engine,
            &self.scheds[c],
            a.concurrency[c],
            first,
            vocab,
            a,
            measured,
        )?;
        if measured {
            self.runs[c].push(r);
        }
        Ok(())
    }

    /// This mode's figures run by run, for the modes after it to be set against.
    fn baseline(&self) -> Baseline {
        Baseline {
            decode: self.decode.clone(),
            tok_s: self
                .runs
                .iter()
                .map(|runs| runs.iter().map(|r| r.tok_s).collect())
                .collect(),
        }
    }

    /// The mode's report: medians, the decode's per-layer split, the concurrency summaries,
    /// and its figures against the first mode's run by run (`first`).
    fn finish(self, a: &Args, first: &Baseline) -> ModeResult {
        let cfg = self.engine.config();
        // ms per layer per decoded token; over a cluster the expert stage splits into the
        // workers' reported compute and the rest of the calls' time (network, queueing, codec).
        // Shares of one layer run in parallel, so both are scaled to the stage's wall time.
        let per = 1e3 / (self.decoded.max(1) * cfg.num_hidden_layers) as f64;
        let mut split: Vec<(String, f64)> = Vec::new();
        for (i, (_, label)) in switchyard_model::profile::PHASES.iter().enumerate() {
            let ms = self.phase_s[i] * per;
            if *label == "experts" && self.calls_us > 0 {
                let compute = ms * self.compute_us as f64 / self.calls_us as f64;
                split.push(("dispatch".into(), ms - compute));
                split.push(("expert".into(), compute));
            } else if *label == "experts" {
                split.push(("expert".into(), ms));
            } else {
                split.push(((*label).into(), ms));
            }
        }
        let first_count: Vec<f64> = self
            .runs
            .first()
            .map(|runs| runs.iter().map(|r| r.tok_s).collect())
            .unwrap_or_default();
        let mut batched: Vec<serde_json::Value> = a
            .concurrency
            .iter()
            .zip(self.runs)
            .zip(&first.tok_s)
            .map(|((&n, runs), first_mode)| summary(n, runs, &first_count, first_mode, a))
            .collect();
        let steady = |j: &serde_json::Value| j["decode_tok_s_from_itl_p50"].as_f64();
        if let Some(first) = batched.first().and_then(steady) {
            for j in &mut batched {
                let ratio = steady(j).map(|v| v / first);
                j["decode_tok_s_from_itl_p50_vs_first_count"] = serde_json::json!(ratio);
            }
        }
        let decode_median = median(self.decode.clone());
        let num = |j: &serde_json::Value, k: &str| j[k].as_f64().unwrap_or(f64::NAN);
        let figures = crate::plot::ModeFigures {
            name: self.name.clone(),
            throughput: std::iter::once((1, decode_median))
                .filter(|_| !a.concurrency.contains(&1))
                .chain(batched.iter().map(|j| {
                    (
                        j["sequences"].as_u64().unwrap_or(0) as usize,
                        num(j, "tok_s_median"),
                    )
                }))
                .collect(),
            steady: batched
                .iter()
                .map(|j| {
                    (
                        j["sequences"].as_u64().unwrap_or(0) as usize,
                        num(j, "decode_tok_s_from_itl_p50"),
                    )
                })
                .collect(),
            split: split.clone(),
            latency: batched
                .iter()
                .map(|j| {
                    (
                        j["sequences"].as_u64().unwrap_or(0) as usize,
                        num(j, "ttft_ms_p50"),
                        num(j, "ttft_ms_p99"),
                        num(j, "itl_ms_p50"),
                        num(j, "itl_ms_p99"),
                    )
                })
                .collect(),
        };
        let vs_first = paired_ratios(&self.decode, &first.decode);
        let json = serde_json::json!({
            "mode": self.name,
            "kv_cache_dtype": self.engine.kv_dtype().as_str(),
            "prefill_tok_s_median": median(self.prefill.clone()),
            "decode_tok_s_median": decode_median,
            "prefill_tok_s": self.prefill,
            "decode_tok_s": self.decode,
            // Each run's decode over the first mode's in the same run, and their median: a
            // ratio of runs made side by side.
            "decode_vs_first_mode_per_run": vs_first,
            "decode_vs_first_mode": median(vs_first.clone()),
            "decode_read_gb_s": self.read_gb_s,
            "decode_pct_of_bandwidth_bound": median(self.pct_of_bound),
            "decode_ms_per_layer": split.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "concurrency": batched,
        });
        ModeResult {
            decode_median,
            read_gb_s: self.read_gb_s,
            json,
            figures,
        }
    }
}

/// The first mode's figures run by run (in run order): its batch-1 decode tok/s, and each
/// concurrency count's tok/s.
struct Baseline {
    decode: Vec<f64>,
    tok_s: Vec<Vec<f64>>,
}

/// `xs[i] / ys[i]` run by run (both in run order).
fn paired_ratios(xs: &[f64], ys: &[f64]) -> Vec<f64> {
    xs.iter().zip(ys).map(|(x, y)| x / y).collect()
}

/// Worker processes on loopback, each with an even share of the experts; stopped on drop.
struct LocalWorkers {
    children: Vec<std::process::Child>,
    spec: String,
    dir: tempfile::TempDir,
}

impl LocalWorkers {
    /// The workers `--local-workers`, `--worker-threads` and `--replicate-experts` ask for.
    fn for_args(a: &Args) -> anyhow::Result<Self> {
        let ck = switchyard_model::Checkpoint::open(&a.model)?;
        Self::start(
            &a.model,
            a.local_workers,
            ck.config().num_local_experts,
            a.worker_threads.unwrap_or(rayon::current_num_threads()),
            a.replicate_experts,
        )
    }

    /// `n` workers of `threads` compute threads, each hosting every expert where `replicate`,
    /// an even share otherwise.
    fn start(
        model: &std::path::Path,
        n: usize,
        experts: usize,
        threads: usize,
        replicate: bool,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            replicate || n <= experts,
            "{n} workers for {experts} experts"
        );
        anyhow::ensure!(threads >= 1, "--worker-threads must be at least 1");
        let exe = std::env::current_exe().context("finding the switchyard binary")?;
        let dir = tempfile::tempdir()?;
        let mut me = Self {
            children: Vec::new(),
            spec: String::new(),
            dir,
        };
        let mut parts = Vec::new();
        for i in 0..n {
            let (lo, hi) = if replicate {
                (0, experts - 1)
            } else {
                (i * experts / n, (i + 1) * experts / n - 1)
            };
            let ready = me.dir.path().join(format!("worker-{i}.addr"));
            let child = std::process::Command::new(&exe)
                .arg("--threads")
                .arg(threads.to_string())
                .arg("--cpu-activations")
                .arg(activations())
                .args(["worker", "--listen", "127.0.0.1:0", "--experts"])
                .arg(format!("{lo}-{hi}"))
                .arg("--model")
                .arg(model)
                .arg("--ready-file")
                .arg(&ready)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .context("starting a worker")?;
            me.children.push(child);
            let deadline = Instant::now() + std::time::Duration::from_secs(120);
            let addr = loop {
                if let Ok(s) = std::fs::read_to_string(&ready) {
                    if !s.is_empty() {
                        break s;
                    }
                }
                if let Some(st) = me.children[i].try_wait()? {
                    anyhow::bail!("worker {i} exited while loading: {st}");
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "worker {i} not ready after 120 s"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            };
            parts.push(format!("{}={lo}-{hi}", addr.trim()));
        }
        me.spec = parts.join(",");
        Ok(me)
    }
}

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Weight bytes one decoded token reads: every dense tensor once (the LM head included), one
/// embedding row instead of the table (unless tied: then the LM head reads it all), and
/// `experts_per_tok` experts in every layer.
fn decode_bytes_per_token(model: &std::path::Path) -> anyhow::Result<u64> {
    use switchyard_model::{weights::names, Checkpoint, Cpu, ExpertSet, LocalExperts, Mixtral};
    let ck = Checkpoint::open(model)?;
    let cfg = ck.config();
    let mut dense = Mixtral::<Cpu>::bytes_to_load(&ck);
    if !cfg.tie_word_embeddings {
        let table = ck.tensor_bytes(names::EMBED).unwrap_or(0);
        dense = dense - table + table / cfg.vocab_size.max(1) as u64;
    }
    // Every expert of a layer has the same size; expert 0 in every layer stands for any.
    let per_expert = LocalExperts::<Cpu>::bytes_to_load(
        &ck,
        &ExpertSet::from_indices(cfg.num_local_experts, [0]),
    );
    Ok(dense + cfg.num_experts_per_tok as u64 * per_expert)
}

/// Reads 1 GiB with every compute thread, summing it as the decode kernels read weights
/// (`linear::stream_sum`: their loads and prefetch): the bytes per second this machine's
/// threads stream from memory now. Allocated once, so a sample costs one pass (tens of ms).
struct BandwidthProbe {
    buf: Vec<u64>,
}

impl BandwidthProbe {
    fn new() -> Self {
        use rayon::prelude::*;
        let words = (1usize << 30) / 8;
        Self {
            buf: (0..words as u64).into_par_iter().collect(),
        }
    }

    /// Bytes per second of the faster of two passes (the first may still be faulting in
    /// pages or competing with a run's last writes).
    fn sample(&self) -> f64 {
        use rayon::prelude::*;
        let mut best = 0.0f64;
        for _ in 0..2 {
            let start = Instant::now();
            let sum = self
                .buf
                .par_chunks(1 << 16)
                .map(switchyard_model::backend::cpu::linear::stream_sum)
                .reduce(|| 0, u64::wrapping_add);
            let secs = start.elapsed().as_secs_f64();
            std::hint::black_box(sum);
            best = best.max((self.buf.len() * 8) as f64 / secs);
        }
        best
    }
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// One run of a count's sequences.
struct Run {
    /// Generated tokens over wall time.
    tok_s: f64,
    ttft_ms: Vec<f64>,
    itl_ms: Vec<f64>,
    /// Seconds in each phase of the layer loop (where profiling was on).
    phase_s: [f64; 4],
    wall_s: f64,
}

/// One run of `n` sequences through `sched`, numbered from `first`, the layer phases profiled
/// where `profiled`. Each prompt is the shared prefix, then tokens of its own: no two
/// sequences of the bench share more than the prefix, so the prefix cache flatters nothing.
fn run_once(
    engine: &Engine,
    sched: &SchedulerHandle,
    n: usize,
    first: usize,
    vocab: u32,
    a: &Args,
    profiled: bool,
) -> anyhow::Result<Run> {
    switchyard_model::profile::reset();
    switchyard_model::profile::enable(profiled);
    let start = Instant::now();
    let prompts = (0..n)
        .map(|i| {
            let seq = (first + i) as u64;
            (0..a.shared_prefix_tokens as u64)
                .map(|t| 5 + (t * 7919 + 17) % (u64::from(vocab) - 5))
                .chain(
                    (0..a.batch_prompt_tokens as u64)
                        .map(|t| 5 + (t * 7919 + (seq + 1) * 104_729) % (u64::from(vocab) - 5)),
                )
                .map(|t| t as u32)
                .collect()
        })
        .collect();
    // One request of n choices: one queue entry, every sequence's events on one stream.
    let req = fixed_request(engine, sched, prompts, a.decode_tokens)?;
    let mut rx = sched
        .submit(&req)
        .map_err(|e| anyhow::anyhow!("submitting {n} sequences: {e}"))?;
    let mut last = vec![None::<Instant>; n];
    let (mut ttft, mut itl, mut tokens) = (Vec::new(), Vec::new(), 0usize);
    while let Some((i, ev)) = rx.blocking_recv() {
        match ev {
            SeqEvent::Token { .. } => {
                let now = Instant::now();
                match last[i] {
                    None => ttft.push((now - start).as_secs_f64() * 1e3),
                    Some(t) => itl.push((now - t).as_secs_f64() * 1e3),
                }
                last[i] = Some(now);
                tokens += 1;
            }
            SeqEvent::Started { .. } | SeqEvent::Finished { .. } => {}
            SeqEvent::Failed(f) => anyhow::bail!("sequence {i} of {n} failed: {f:?}"),
        }
    }
    let wall = start.elapsed().as_secs_f64();
    switchyard_model::profile::enable(false);
    Ok(Run {
        tok_s: tokens as f64 / wall,
        ttft_ms: ttft,
        itl_ms: itl,
        phase_s: switchyard_model::profile::seconds(),
        wall_s: wall,
    })
}

/// The JSON of one count's measured runs: the median run's figures, every run's tok/s (in
/// run order) and its ratios to the runs of the same round of the first count of this mode
/// (`first_count`) and of this count in the first mode (`first_mode`), and each layer phase's
/// share of their wall time.
fn summary(
    n: usize,
    mut runs: Vec<Run>,
    first_count: &[f64],
    first_mode: &[f64],
    a: &Args,
) -> serde_json::Value {
    let wall_s: f64 = runs.iter().map(|r| r.wall_s).sum();
    let mut phase_s = [0.0f64; 4];
    for r in &runs {
        for (acc, v) in phase_s.iter_mut().zip(r.phase_s) {
            *acc += v;
        }
    }
    let tok_s: Vec<f64> = runs.iter().map(|r| r.tok_s).collect();
    let vs_count = paired_ratios(&tok_s, first_count);
    let vs_mode = paired_ratios(&tok_s, first_mode);
    runs.sort_by(|x, y| x.tok_s.total_cmp(&y.tok_s));
    let (median_tok_s, mut ttft, mut itl) = if runs.is_empty() {
        (f64::NAN, Vec::new(), Vec::new())
    } else {
        let m = runs.swap_remove(runs.len() / 2);
        (m.tok_s, m.ttft_ms, m.itl_ms)
    };
    let itl_p50 = pct(&mut itl, 0.5);
    serde_json::json!({
        "sequences": n,
        "prompt_tokens": a.batch_prompt_tokens,
        "shared_prefix_tokens": a.shared_prefix_tokens,
        "decode_tokens": a.decode_tokens,
        "tok_s_median": median_tok_s,
        "tok_s": tok_s,
        // Each run's tok/s over the first count's run in the same round, and over this count's
        // run in the first mode, with their medians.
        "tok_s_vs_first_count_per_run": vs_count,
        "tok_s_vs_first_count": median(vs_count.clone()),
        "tok_s_vs_first_mode_per_run": vs_mode,
        "tok_s_vs_first_mode": median(vs_mode.clone()),
        "ttft_ms_p50": pct(&mut ttft, 0.5),
        "ttft_ms_p99": pct(&mut ttft, 0.99),
        "itl_ms_p50": itl_p50,
        // The rate between the prompts and the end: every sequence gets a token each ITL p50
        // (the median step). `tok_s_median` counts the whole run, the prompts' prefill
        // included; this one is llama-batched-bench's S_TG.
        "decode_tok_s_from_itl_p50": n as f64 * 1e3 / itl_p50,
        "itl_ms_p99": pct(&mut itl, 0.99),
        // Share of the wall time each phase of the layer loop took (the rest: sampling,
        // scheduling, embedding and LM head).
        "wall_share": switchyard_model::profile::PHASES
            .iter()
            .zip(phase_s)
            .map(|((_, name), s)| ((*name).to_string(), serde_json::json!(s / wall_s)))
            .collect::<serde_json::Map<_, _>>(),
    })
}
