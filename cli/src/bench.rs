//! `switchyard bench`: prefill and decode throughput of one sequence in embedded mode, median of
//! several runs, printed as JSON. (Batched, cluster and plotted runs come with the performance work.)

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
    let engine = &loaded.engine;
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
    let result = serde_json::json!({
        "model": a.model.display().to_string(),
        "threads": rayon::current_num_threads(),
        "runs": a.runs,
        "prompt_tokens": a.prompt_tokens,
        "decode_tokens": a.decode_tokens,
        "prefill_tok_s_median": median(prefill.clone()),
        "decode_tok_s_median": if decode.is_empty() { f64::NAN } else { median(decode.clone()) },
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
    });
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &result)?;
    writeln!(out)?;
    Ok(())
}
