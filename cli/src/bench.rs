//! `switchyard bench`: prefill and decode throughput of one sequence (embedded or over
//! `--workers`), median of several runs, printed as JSON, with the machine's measured read
//! bandwidth and how close decode comes to the bound it sets (decode reads every dense weight,
//! one embedding row and the routed experts' weights once per token). `--concurrency 1,8,32`
//! adds runs of that many sequences through the continuous-batching scheduler. Plots come with
//! the rest of the performance work.

use anyhow::Context;
use std::io::Write;
use std::{path::PathBuf, time::Instant};
use switchyard_coordinator::GenerateRequest;
use switchyard_model::SamplingParams;

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
    /// 1,8,32: aggregate generated tok/s, time to first token and inter-token latency.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Prompt tokens of each sequence in the concurrency runs.
    #[arg(long, default_value_t = 32)]
    batch_prompt_tokens: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.runs >= 1 && a.prompt_tokens >= 1 && a.decode_tokens >= 2,
        "runs, prompt and decode tokens must be positive"
    );
    let loaded = a.cluster.load(&a.model)?;
    let engine = std::sync::Arc::new(loaded.engine);
    let engine = &engine;
    let vocab = engine.config().vocab_size as u32;
    // Deterministic token ids spread over the vocabulary (skipping the low special ids).
    let prompt: Vec<u32> = (0..a.prompt_tokens as u32)
        .map(|i| 5 + (i * 7919) % (vocab - 5))
        .collect();
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for run in 0..=a.runs {
        let req = GenerateRequest {
            prompt: prompt.clone(),
            max_tokens: a.decode_tokens,
            sampling: SamplingParams::default(),
            stop_ids: vec![],
            ignore_eos: true,
        };
        let start = Instant::now();
        let mut first = None;
        let mut n = 0usize;
        engine.generate(&req, |_| {
            n += 1;
            if first.is_none() {
                first = Some(Instant::now());
            }
            true
        })?;
        let end = Instant::now();
        let first = first.context("no token generated")?;
        if run == 0 {
            continue;
        }
        prefill.push(a.prompt_tokens as f64 / (first - start).as_secs_f64());
        if n > 1 {
            decode.push((n - 1) as f64 / (end - first).as_secs_f64());
        }
    }
    let batched = a
        .concurrency
        .iter()
        .map(|&n| concurrent(engine, n, &a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bytes = decode_bytes_per_token(&a.model)?;
    let bandwidth = read_bandwidth();
    let bound = bandwidth / bytes as f64;
    let decode_median = if decode.is_empty() {
        f64::NAN
    } else {
        median(decode.clone())
    };
    let result = serde_json::json!({
        "model": a.model.display().to_string(),
        "threads": rayon::current_num_threads(),
        "runs": a.runs,
        "prompt_tokens": a.prompt_tokens,
        "decode_tokens": a.decode_tokens,
        "prefill_tok_s_median": median(prefill.clone()),
        "decode_tok_s_median": decode_median,
        "decode_bytes_per_token": bytes,
        "memory_read_bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_bound_tok_s": bound,
        "decode_pct_of_bandwidth_bound": 100.0 * decode_median / bound,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "concurrency": batched,
    });
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &result)?;
    writeln!(out)?;
    Ok(())
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

/// Bytes per second the compute threads read from memory: best of five parallel passes summing
/// a 1 GiB buffer (far beyond any cache), after a pass that faults its pages in.
fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).into_par_iter().collect();
    let mut best = 0.0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let sum = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
            .reduce(|| 0, u64::wrapping_add);
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / secs);
    }
    best
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// `n` sequences submitted together to a scheduler of their own, `runs` times after a warm-up:
/// the median aggregate tok/s (generated tokens over wall time, prefill included) and the
/// latency percentiles of the median run.
fn concurrent(
    engine: &std::sync::Arc<switchyard_coordinator::Engine>,
    n: usize,
    a: &Args,
) -> anyhow::Result<serde_json::Value> {
    use switchyard_coordinator::scheduler::{self, SchedulerConfig, SeqEvent, SeqRequest};
    anyhow::ensure!(n >= 1, "concurrency must be positive");
    let sched = scheduler::start(
        engine.clone(),
        SchedulerConfig {
            max_running: n.max(1),
            max_waiting: n.max(1),
            ..SchedulerConfig::default()
        },
    )?;
    let vocab = engine.config().vocab_size as u32;
    let mut runs = Vec::new();
    for run in 0..=a.runs {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let start = Instant::now();
        for i in 0..n {
            let prompt = (0..a.batch_prompt_tokens as u32)
                .map(|t| 5 + (t * 7919 + i as u32 * 104_729) % (vocab - 5))
                .collect();
            sched
                .submit(SeqRequest {
                    prompt,
                    max_tokens: a.decode_tokens,
                    sampling: SamplingParams::default(),
                    stop_ids: vec![],
                    ignore_eos: true,
                    top_logprobs: 0,
                    index: i,
                    events: tx.clone(),
                    cancel: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
                })
                .map_err(|e| anyhow::anyhow!("submitting sequence {i}: {e}"))?;
        }
        drop(tx);
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
                SeqEvent::Finished { .. } => {}
                SeqEvent::Failed(f) => anyhow::bail!("sequence {i} failed: {f:?}"),
            }
        }
        let wall = start.elapsed().as_secs_f64();
        if run > 0 {
            runs.push((tokens as f64 / wall, ttft, itl));
        }
    }
    runs.sort_by(|x, y| x.0.total_cmp(&y.0));
    let tok_s: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let (median, mut ttft, mut itl) = runs.swap_remove(runs.len() / 2);
    Ok(serde_json::json!({
        "sequences": n,
        "prompt_tokens": a.batch_prompt_tokens,
        "decode_tokens": a.decode_tokens,
        "tok_s_median": median,
        "tok_s": tok_s,
        "ttft_ms_p50": pct(&mut ttft, 0.5),
        "ttft_ms_p99": pct(&mut ttft, 0.99),
        "itl_ms_p50": pct(&mut itl, 0.5),
        "itl_ms_p99": pct(&mut itl, 0.99),
    }))
}
