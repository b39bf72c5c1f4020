//! Runs of many sequences at once through the scheduler, and their summary.

use super::{
    median,
    mode::{fixed_request, paired_ratios},
    Args,
};
use std::time::Instant;
use switchyard_coordinator::{
    scheduler::{SchedulerHandle, SeqEvent},
    Engine,
};

pub(super) fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// One run of a count's sequences.
pub(super) struct Run {
    /// Generated tokens over wall time.
    pub(super) tok_s: f64,
    pub(super) ttft_ms: Vec<f64>,
    pub(super) itl_ms: Vec<f64>,
    /// Seconds in each phase of the layer loop (where profiling was on).
    pub(super) phase_s: [f64; 4],
    pub(super) wall_s: f64,
}

/// One run of `n` sequences through `sched`, numbered from `first`, the layer phases profiled
/// where `profiled`. Each prompt is the shared prefix, then tokens of its own: no two
/// sequences of the bench share more than the prefix, so the prefix cache flatters nothing.
pub(super) fn run_once(
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
pub(super) fn summary(
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
