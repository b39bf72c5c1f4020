//! One mode under measurement (embedded, or a cluster): its engine, its schedulers, and what
//! its measured runs gathered.

use super::{
    bandwidth::BandwidthProbe,
    concurrent::{run_once, summary, Run},
    median, Args,
};
use anyhow::Context;
use std::time::Instant;
use switchyard_coordinator::{
    request::{openai::CommonFields, validation, ValidatedRequest},
    scheduler::{SchedulerHandle, SeqEvent},
    Engine,
};

/// A greedy request for `prompts` (a choice each) that ignores eos and decodes `max_tokens`,
/// checked like any.
pub(super) fn fixed_request(
    engine: &Engine,
    sched: &SchedulerHandle,
    prompts: Vec<Vec<u32>>,
    max_tokens: usize,
) -> anyhow::Result<ValidatedRequest> {
    let common = CommonFields {
        max_tokens: Some(max_tokens as i64),
        temperature: Some(0.0),
        ignore_eos: Some(true),
        ..CommonFields::default()
    };
    let limits = switchyard_coordinator::request::RequestLimits {
        max_seq_len: sched.max_seq_len,
        ..engine.limits("bench")
    };
    Ok(validation::token_ids(prompts, &common, None, &limits)?)
}

/// One mode's measurements: JSON for the report, figures for the plot.
pub(super) struct ModeResult {
    pub(super) decode_median: f64,
    /// The machine's read bandwidth sampled around each measured run, GB/s.
    pub(super) read_gb_s: Vec<f64>,
    pub(super) json: serde_json::Value,
    pub(super) figures: crate::plot::ModeFigures,
}

/// One mode under measurement (embedded, or a cluster): its engine, a scheduler per
/// concurrency count, and what its measured runs have gathered so far.
pub(super) struct Mode {
    pub(super) name: String,
    pub(super) engine: std::sync::Arc<switchyard_coordinator::Engine>,
    pub(super) remote: Option<std::sync::Arc<switchyard_coordinator::dispatch::RemoteExperts>>,
    /// The registry watcher, in etcd mode (runs while this lives).
    pub(super) _membership: Option<switchyard_coordinator::membership::Membership>,
    /// One sequence at a time, no prefix cache: the batch-1 prefill and decode runs.
    pub(super) single: SchedulerHandle,
    pub(super) scheds: Vec<SchedulerHandle>,
    pub(super) prefill: Vec<f64>,
    pub(super) decode: Vec<f64>,
    /// Seconds in each layer phase over the measured decode steps, and their count.
    pub(super) phase_s: [f64; 4],
    pub(super) decoded: usize,
    /// Over a cluster: the workers' reported compute and the calls' wall time, µs.
    pub(super) compute_us: u64,
    pub(super) calls_us: u64,
    pub(super) read_gb_s: Vec<f64>,
    pub(super) pct_of_bound: Vec<f64>,
    /// Measured runs of each concurrency count.
    pub(super) runs: Vec<Vec<Run>>,
    /// Sequences submitted so far, warm-up included: numbers each sequence's own tokens.
    pub(super) submitted: usize,
}

impl Mode {
    /// Takes `loaded`'s engine and starts one scheduler per count in `counts`, sized for it:
    /// a KV cache that holds every sequence's `positions` at once (at least the default), so
    /// that no run is slowed by preemption.
    pub(super) fn new(
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
                        // What n sequences need and no more: a cache per concurrency, each
                        // of the serving default's 1 GiB, would not fit a small host
                        // (`scripts/bench-hosts.sh` runs the coordinator in 95 % of the model's
                        // size).
                        kv_cache_bytes: n * per_seq,
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
    pub(super) fn single(
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
    pub(super) fn concurrent(&mut self, c: usize, a: &Args, measured: bool) -> anyhow::Result<()> {
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
    pub(super) fn baseline(&self) -> Baseline {
        Baseline {
            decode: self.decode.clone(),
            tok_s: self
                .runs
                .iter()
                .map(|runs| runs.iter().map(|r| r.tok_s).collect())
                .collect(),
        }
    }

    /// ms per layer per decoded token in each phase; over a cluster the expert stage splits
    /// into the workers' reported compute and the rest of the calls' time (network, queueing,
    /// codec). Shares of one layer run in parallel, so both are scaled to the stage's wall time.
    fn layer_split(&self) -> Vec<(String, f64)> {
        let cfg = self.engine.config();
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
        split
    }

    /// The mode's report: medians, the decode's per-layer split, the concurrency summaries,
    /// and its figures against the first mode's run by run (`first`).
    pub(super) fn finish(self, a: &Args, first: &Baseline) -> ModeResult {
        let split = self.layer_split();
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
        let figures = figures(&self.name, decode_median, &batched, &split, a);
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

/// The plot's figures of one mode from its report.
fn figures(
    name: &str,
    decode_median: f64,
    batched: &[serde_json::Value],
    split: &[(String, f64)],
    a: &Args,
) -> crate::plot::ModeFigures {
    let num = |j: &serde_json::Value, k: &str| j[k].as_f64().unwrap_or(f64::NAN);
    crate::plot::ModeFigures {
        name: name.to_string(),
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
        split: split.to_vec(),
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
    }
}

/// The first mode's figures run by run (in run order): its batch-1 decode tok/s, and each
/// concurrency count's tok/s.
pub(super) struct Baseline {
    pub(super) decode: Vec<f64>,
    pub(super) tok_s: Vec<Vec<f64>>,
}

/// `xs[i] / ys[i]` run by run (both in run order).
pub(super) fn paired_ratios(xs: &[f64], ys: &[f64]) -> Vec<f64> {
    xs.iter().zip(ys).map(|(x, y)| x / y).collect()
}
