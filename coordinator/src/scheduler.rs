//! Continuous batching: one engine thread owns the paged KV cache and every running sequence,
//! and each iteration runs one step over all of them: a decode token for each sequence that has
//! finished its prompt, plus prompt chunks of sequences still prefilling, up to a token budget
//! (so a long prompt never stalls the decodes). New requests join at the next iteration; when
//! cache blocks run out, the youngest sequence is preempted and later recomputed. With prefix
//! caching on (the default), a sequence starts from the cached blocks of any earlier sequence
//! that began with the same tokens, so shared prompt beginnings and recomputes after preemption
//! cost only their new tokens.
//!
//! Requests arrive on a bounded channel (a full queue is the caller's 429) and answer on their
//! own event channel; a closed event channel (the client went away) cancels the sequence and
//! frees its blocks at the next iteration.

use crate::engine::{Engine, FinishReason};
use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Instant,
};
use switchyard_model::{
    sampling,
    structured::{JsonConstraint, TokenBytes},
    KvCache, Logits, ModelError, Sampler, SamplingParams, SeqKv, SeqStep, StepOutput, StepScratch,
};
use tokio::sync::mpsc;

/// Scheduler limits.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Tokens processed per step, decodes and prompt chunks together.
    pub max_batch_tokens: usize,
    /// Sequences decoding at once.
    pub max_running: usize,
    /// Requests queued before new ones are refused.
    pub max_waiting: usize,
    /// Bytes of KV cache (keys and values of all layers, in the engine's KV dtype: bf16 fits
    /// twice the positions of f32).
    pub kv_cache_bytes: usize,
    pub block_size: usize,
    /// Reuse the KV blocks of earlier sequences' identical prompt beginnings.
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 256,
            kv_cache_bytes: 1 << 30,
            block_size: switchyard_model::DEFAULT_BLOCK_SIZE,
            prefix_caching: true,
        }
    }
}

/// One sequence to generate, already validated.
#[derive(Debug)]
pub struct SeqRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_ids: Vec<u32>,
    /// Until this many tokens are generated, eos and `stop_ids` cannot be chosen.
    pub min_tokens: usize,
    /// Constrains the output to a JSON object (`response_format: json_object`).
    pub json: Option<JsonConstraint>,
    pub ignore_eos: bool,
    /// Report each chosen token's logprob and this many most likely alternatives (0: the
    /// chosen one alone). None reports none and skips the log-softmax over the vocabulary they
    /// take (at 32,000 tokens, 6 ms of a ~190 ms 32-sequence step on a Zen 3 VM).
    pub logprobs: Option<usize>,
    /// Which choice of its request this sequence is; events carry it.
    pub index: usize,
    /// Events of every choice of a request share one channel; dropping the receiver cancels all.
    pub events: mpsc::UnboundedSender<(usize, SeqEvent)>,
    /// Set to end this one sequence early (e.g. a stop string matched).
    pub cancel: Arc<std::sync::atomic::AtomicBool>,
    /// Set when the sequence starts: how many of its prompt tokens came from the prefix cache
    /// (the API's `usage.prompt_tokens_details.cached_tokens`). Shared rather than sent as an
    /// event because a choice ended by a stop string stops listening before it finishes.
    pub cached_tokens: Arc<AtomicUsize>,
}

/// What a sequence reports, in order: tokens, then exactly one `Finished` or `Failed`.
#[derive(Clone, Debug)]
pub enum SeqEvent {
    Token {
        id: u32,
        /// Where the request asked for logprobs.
        logprob: Option<f32>,
        /// (id, logprob), most likely first.
        top: Vec<(u32, f32)>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(SeqFailure),
}

/// Why a sequence could not finish.
#[derive(Clone, Debug)]
pub enum SeqFailure {
    /// Workers needed for its experts are unreachable.
    Unavailable(String),
    /// Anything else (a bug or a broken model); details are in the log.
    Internal(String),
}

/// Live counts, read by /metrics and /health.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    /// Sequences preempted (freed and queued for recompute) since start.
    pub preemptions: AtomicUsize,
}

/// The submitting side of the scheduler.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<SeqRequest>,
    pub stats: Arc<SchedulerStats>,
    /// Longest sequence the cache can ever hold (prompt + generated).
    pub max_seq_len: usize,
}

/// Why a request was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full")]
    QueueFull,
    #[error("the engine has stopped")]
    Stopped,
    /// A request the engine cannot run (an empty prompt, no tokens to generate).
    #[error("{0}")]
    Invalid(&'static str),
}

impl SchedulerHandle {
    /// Whether the engine thread is still running.
    #[must_use]
    pub fn is_alive(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Queues a sequence, or refuses at once when the queue is full.
    pub fn submit(&self, req: SeqRequest) -> Result<(), SubmitError> {
        // Caught here, not in the engine loop: a sequence with nothing to prefill would never
        // produce its first token.
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt has no tokens"));
        }
        if req.max_tokens == 0 {
            return Err(SubmitError::Invalid("max_tokens must be at least 1"));
        }
        self.tx.try_send(req).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
        })
    }
}

struct Seq {
    /// Prompt followed by generated tokens: after a preemption all of it is recomputed.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    sampler: Sampler,
    stop_ids: Vec<u32>,
    min_tokens: usize,
    json: Option<JsonConstraint>,
    ignore_eos: bool,
    logprobs: Option<usize>,
    kv: SeqKv,
    index: usize,
    events: mpsc::UnboundedSender<(usize, SeqEvent)>,
    cancel: Arc<std::sync::atomic::AtomicBool>,
    cached_tokens: Arc<AtomicUsize>,
    /// Whether it has run before (a preempted sequence's cache hits are not its prompt's).
    started: bool,
    arrived: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
    fn cancelled(&self) -> bool {
        self.events.is_closed() || self.cancel.load(Ordering::Relaxed)
    }
    fn send(&self, e: SeqEvent) -> bool {
        self.events.send((self.index, e)).is_ok()
    }
}

/// Starts the engine thread; it stops when every handle is dropped.
pub fn start(engine: Arc<Engine>, cfg: SchedulerConfig) -> Result<SchedulerHandle, ModelError> {
    let mcfg = engine.config().clone();
    let kv_dtype = engine.kv_dtype();
    let block_bytes =
        KvCache::<switchyard_model::AnyBackend>::block_bytes(&mcfg, cfg.block_size, kv_dtype);
    let num_blocks = (cfg.kv_cache_bytes / block_bytes).max(1);
    let max_seq_len = max_seq_len(&mcfg, num_blocks, cfg.block_size);
    let (tx, rx) = mpsc::channel(cfg.max_waiting.max(1));
    let stats = Arc::new(SchedulerStats::default());
    stats.kv_blocks_total.store(num_blocks, Ordering::Relaxed);
    let mut kv = KvCache::new(
        engine.parts().0.backend(),
        &mcfg,
        cfg.block_size,
        num_blocks,
        kv_dtype,
    )?;
    if cfg.prefix_caching {
        kv = kv.with_prefix_cache();
    }
    tracing::info!(
        num_blocks,
        block_size = cfg.block_size,
        dtype = %kv_dtype,
        prefix_caching = cfg.prefix_caching,
        max_seq_len,
        "KV cache allocated"
    );
    let scratch = StepScratch::new(engine.parts().0.backend())?;
    let st = stats.clone();
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || Loop::new(engine, cfg, kv, scratch, st).run(rx))
        .map_err(|e| ModelError::Input(format!("cannot start the engine thread: {e}")))?;
    Ok(SchedulerHandle {
        tx,
        stats,
        max_seq_len,
    })
}

struct Loop {
    engine: Arc<Engine>,
    cfg: SchedulerConfig,
    kv: KvCache<switchyard_model::AnyBackend>,
    stats: Arc<SchedulerStats>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    scratch: StepScratch<switchyard_model::AnyBackend>,
    out: StepOutput,
    logprobs: Vec<f32>,
    /// Every token's bytes, built when the first sequence with a JSON constraint arrives.
    token_bytes: Option<TokenBytes>,
}

impl Loop {
    fn new(
        engine: Arc<Engine>,
        cfg: SchedulerConfig,
        kv: KvCache<switchyard_model::AnyBackend>,
        scratch: StepScratch<switchyard_model::AnyBackend>,
        stats: Arc<SchedulerStats>,
    ) -> Self {
        Self {
            engine,
            cfg,
            kv,
            stats,
            waiting: VecDeque::new(),
            running: Vec::new(),
            scratch,
            out: StepOutput::new(Logits::Last),
            logprobs: Vec::new(),
            token_bytes: None,
        }
    }

    fn admit(&mut self, r: SeqRequest) {
        if r.json.is_some() && self.token_bytes.is_none() {
            let vocab = self.engine.config().vocab_size;
            self.token_bytes = Some(TokenBytes::new(self.engine.tokenizer(), vocab));
        }
        metrics::counter!("switchyard_prompt_tokens_total").increment(r.prompt.len() as u64);
        let sampler = Sampler::new(r.sampling, &r.prompt);
        self.waiting.push_back(Seq {
            prompt_len: r.prompt.len(),
            tokens: r.prompt,
            max_tokens: r.max_tokens,
            sampler,
            stop_ids: r.stop_ids,
            min_tokens: r.min_tokens,
            json: r.json,
            ignore_eos: r.ignore_eos,
            logprobs: r.logprobs,
            kv: SeqKv::default(),
            index: r.index,
            events: r.events,
            cancel: r.cancel,
            cached_tokens: r.cached_tokens,
            started: false,
            arrived: Instant::now(),
            first_token: None,
            last_token: None,
        });
    }

    fn run(mut self, mut rx: mpsc::Receiver<SeqRequest>) {
        loop {
            // Block only when there is nothing to do.
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.blocking_recv() {
                    Some(r) => self.admit(r),
                    None => break,
                }
            }
            while let Ok(r) = rx.try_recv() {
                self.admit(r);
            }
            self.drop_cancelled();
            self.iterate();
            self.publish();
        }
        tracing::info!("engine stopped");
    }

    fn drop_cancelled(&mut self) {
        let kv = &mut self.kv;
        self.running.retain_mut(|s| {
            if s.cancelled() {
                kv.release(&mut s.kv);
                metrics::counter!("switchyard_requests_cancelled_total").increment(1);
                false
            } else {
                true
            }
        });
        self.waiting.retain(|s| !s.cancelled());
    }

    fn publish(&self) {
        let used = self.kv.num_blocks() - self.kv.free_blocks();
        self.stats
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.stats
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
        self.stats.kv_blocks_used.store(used, Ordering::Relaxed);
        metrics::gauge!("switchyard_num_requests_running").set(self.running.len() as f64);
        metrics::gauge!("switchyard_num_requests_waiting").set(self.waiting.len() as f64);
        metrics::gauge!("switchyard_kv_cache_usage_perc")
            .set(used as f64 / self.kv.num_blocks() as f64);
    }

    /// Preempts the youngest running sequence (not `keep`): frees its blocks and queues it first
    /// so it is recomputed (prompt and generated tokens) when room returns.
    fn preempt_one(&mut self, keep: usize) -> bool {
        let Some(idx) = (0..self.running.len()).rev().find(|&i| i != keep) else {
            return false;
        };
        let mut s = self.running.remove(idx);
        self.kv.release(&mut s.kv);
        metrics::counter!("switchyard_preemptions_total").increment(1);
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            tokens = s.tokens.len(),
            "preempted a sequence for recompute"
        );
        self.waiting.push_front(s);
        true
    }

    /// Whether a running sequence is still prefilling whole blocks that `s`'s tokens begin
    /// with: once it has, `s` finds them in the prefix cache.
    fn awaits_prefill_of_running(&self, s: &Seq) -> bool {
        if !self.kv.prefix_cache_enabled() {
            return false;
        }
        let bs = self.kv.block_size();
        // Blocks `s` could take: whole ones before its last token.
        let usable = (s.tokens.len() - 1) / bs * bs;
        self.running.iter().any(|r| {
            let done = r.kv.len() / bs * bs;
            if done >= usable || r.kv.len() >= r.prompt_len {
                return false;
            }
            let common = s.tokens[..usable]
                .iter()
                .zip(&r.tokens[..r.prompt_len])
                .take_while(|(a, b)| a == b)
                .count();
            common / bs * bs > done
        })
    }

    /// Gives a sequence about to run the cached blocks its tokens begin with.
    fn start_from_cache(&mut self, s: &mut Seq) {
        let hit = if self.kv.prefix_cache_enabled() {
            let hit = self.kv.attach_prefix(&mut s.kv, &s.tokens);
            metrics::counter!("switchyard_prefix_cache_queries_total")
                .increment(s.tokens.len() as u64);
            metrics::counter!("switchyard_prefix_cache_hits_total").increment(hit as u64);
            hit
        } else {
            0
        };
        if !s.started {
            s.cached_tokens.store(hit, Ordering::Relaxed);
            s.started = true;
        }
        if hit > 0 {
            tracing::debug!(
                tokens = s.tokens.len(),
                cached = hit,
                "sequence starts from the prefix cache"
            );
        }
    }

    fn iterate(&mut self) {
        // Admit waiting sequences while there is room for their first chunk. One whose prompt
        // begins like that of a running sequence still prefilling waits for those blocks
        // instead of computing them too (a request's `n` choices, a burst of requests with one
        // system prompt); sequences behind it may go first.
        let mut held = Vec::new();
        while self.running.len() < self.cfg.max_running {
            let Some(s) = self.waiting.front() else { break };
            let first = s.tokens.len().min(self.cfg.max_batch_tokens);
            if self.kv.blocks_for(first) > self.kv.free_blocks() && !self.running.is_empty() {
                break;
            }
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            if self.awaits_prefill_of_running(&s) {
                held.push(s);
                continue;
            }
            self.start_from_cache(&mut s);
            self.running.push(s);
        }
        for s in held.into_iter().rev() {
            self.waiting.push_front(s);
        }
        if self.running.is_empty() {
            return;
        }
        // Token budget: every decode first, then prompt chunks in arrival order.
        let mut take = vec![0usize; self.running.len()];
        let mut budget = self.cfg.max_batch_tokens;
        for (i, s) in self.running.iter().enumerate() {
            let pending = s.tokens.len() - s.kv.len();
            if pending == 1 && budget > 0 {
                take[i] = 1;
                budget -= 1;
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            let pending = s.tokens.len() - s.kv.len();
            if pending > 1 && budget > 0 {
                take[i] = pending.min(budget);
                budget -= take[i];
            }
        }
        // Make the cache fit, preempting the youngest sequences if it does not.
        loop {
            let need: usize = self
                .running
                .iter()
                .zip(&take)
                .map(|(s, &n)| {
                    self.kv
                        .blocks_for(s.kv.len() + n)
                        .saturating_sub(s.kv.blocks().len())
                })
                .sum();
            if need <= self.kv.free_blocks() {
                break;
            }
            let keep = 0;
            if !self.preempt_one(keep) {
                // A single sequence that outgrew the whole cache: end it.
                let s = self.running.remove(0);
                s.send(SeqEvent::Failed(SeqFailure::Internal(
                    "the sequence no longer fits in the KV cache".into(),
                )));
                return;
            }
            take.truncate(self.running.len());
        }

        let mut steps: Vec<SeqStep<'_>> = Vec::new();
        let mut in_step: Vec<usize> = Vec::new();
        for (i, s) in self.running.iter_mut().enumerate() {
            if take[i] == 0 {
                continue;
            }
            let start = s.kv.len();
            steps.push(SeqStep {
                tokens: &s.tokens[start..start + take[i]],
                kv: &mut s.kv,
            });
            in_step.push(i);
        }
        let step_start = Instant::now();
        let n_tokens: usize = take.iter().sum();
        let (model, experts) = self.engine.parts();
        let res = {
            let _span = tracing::debug_span!("engine.step", seqs = steps.len(), tokens = n_tokens)
                .entered();
            model.step(
                &mut steps,
                &mut self.kv,
                experts,
                &mut self.scratch,
                &mut self.out,
            )
        };
        drop(steps);
        metrics::histogram!("switchyard_step_duration_seconds")
            .record(step_start.elapsed().as_secs_f64());
        if let Err(e) = res {
            let failure = match &e {
                ModelError::Dispatch(_) => SeqFailure::Unavailable(e.to_string()),
                _ => SeqFailure::Internal(e.to_string()),
            };
            tracing::error!(error = %e, "step failed; ending its sequences");
            for &i in in_step.iter().rev() {
                let mut s = self.running.remove(i);
                self.kv.release(&mut s.kv);
                s.send(SeqEvent::Failed(failure.clone()));
            }
            return;
        }

        // Blocks that filled in this step become findable by later sequences.
        for &i in &in_step {
            let s = &mut self.running[i];
            self.kv.commit(&mut s.kv, &s.tokens);
        }
        // Sliding-window models: blocks no future query can see go back to the pool.
        if let Some(w) = self.engine.config().sliding_window {
            for &i in &in_step {
                self.kv.trim_window(&mut self.running[i].kv, w);
            }
        }

        // Sample for every sequence whose pending tokens are now all in the cache.
        let vocab = self.engine.config().vocab_size;
        let eos = self.engine.config().eos_token_ids.clone();
        let mut finished = Vec::new();
        for (row, &i) in in_step.iter().enumerate() {
            let s = &mut self.running[i];
            if s.kv.len() < s.tokens.len() {
                continue; // a prompt chunk; more to come
            }
            let logits = &mut self.out.logits[row * vocab..(row + 1) * vocab];
            s.sampler.apply_penalties(logits);
            if s.generated() < s.min_tokens {
                let ends = s
                    .stop_ids
                    .iter()
                    .chain(if s.ignore_eos { &[][..] } else { &eos });
                for &t in ends {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            if let (Some(c), Some(vocab)) = (&mut s.json, &self.token_bytes) {
                if !c.mask(vocab, &eos, logits) {
                    // Nothing can continue the JSON (the vocabulary lacks the bytes): end here.
                    finished.push((i, Some(FinishReason::Stop)));
                    continue;
                }
            }
            let id = s.sampler.sample(logits);
            if let (Some(c), Some(vocab)) = (&mut s.json, &self.token_bytes) {
                c.advance(vocab, id);
            }
            let (logprob, top) = match s.logprobs {
                None => (None, Vec::new()),
                Some(n) => {
                    sampling::log_softmax(logits, &mut self.logprobs);
                    let top = if n > 0 {
                        top_k(&self.logprobs, n)
                    } else {
                        Vec::new()
                    };
                    (Some(self.logprobs[id as usize]), top)
                }
            };
            let now = Instant::now();
            match s.last_token {
                None => metrics::histogram!("switchyard_time_to_first_token_seconds")
                    .record((now - s.arrived).as_secs_f64()),
                Some(t) => metrics::histogram!("switchyard_inter_token_latency_seconds")
                    .record((now - t).as_secs_f64()),
            }
            s.first_token.get_or_insert(now);
            s.last_token = Some(now);
            s.tokens.push(id);
            metrics::counter!("switchyard_generation_tokens_total").increment(1);
            let sent = s.send(SeqEvent::Token { id, logprob, top });
            let stop = (!s.ignore_eos && eos.contains(&id)) || s.stop_ids.contains(&id);
            let reason = if stop {
                Some(FinishReason::Stop)
            } else if s.generated() >= s.max_tokens || s.tokens.len() >= self.max_len() {
                Some(FinishReason::Length)
            } else {
                None
            };
            if !sent {
                // The client went away between iterations.
                metrics::counter!("switchyard_requests_cancelled_total").increment(1);
                finished.push((i, None));
            } else if let Some(r) = reason {
                finished.push((i, Some(r)));
            }
        }
        for (i, reason) in finished.into_iter().rev() {
            let mut s = self.running.remove(i);
            self.kv.release(&mut s.kv);
            if let Some(reason) = reason {
                metrics::histogram!("switchyard_e2e_request_latency_seconds")
                    .record(s.arrived.elapsed().as_secs_f64());
                s.send(SeqEvent::Finished {
                    reason,
                    prompt_tokens: s.prompt_len,
                    completion_tokens: s.generated(),
                });
            }
        }
    }

    fn max_len(&self) -> usize {
        max_seq_len(
            self.engine.config(),
            self.kv.num_blocks(),
            self.kv.block_size(),
        )
    }
}

/// Longest sequence the cache can hold: with a sliding window only the window's blocks (plus the
/// partly filled ones at either end) are ever live, so the context is the model's own limit.
fn max_seq_len(
    cfg: &switchyard_model::MixtralConfig,
    num_blocks: usize,
    block_size: usize,
) -> usize {
    let by_cache = match cfg.sliding_window {
        Some(w) if w.div_ceil(block_size) + 2 <= num_blocks => usize::MAX,
        _ => num_blocks * block_size,
    };
    by_cache.min(cfg.max_position_embeddings)
}

/// The `k` largest log-probabilities, descending.
fn top_k(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |a, b| b.1.total_cmp(&a.1));
    idx.truncate(k);
    idx.sort_by(|a, b| b.1.total_cmp(&a.1));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::GenerateRequest;
    use switchyard_model::{weights::gen, KvDtype, NoProgress};

    /// An embedded engine over a random f32 checkpoint of hidden 64, 4 heads over 2 kv heads,
    /// vocabulary 300 and `layers` layers, shaped further by `spec`; the folder lives as long
    /// as the returned guard.
    fn random_engine(layers: usize, spec: gen::GenSpec) -> (tempfile::TempDir, Arc<Engine>) {
        let tmp = tempfile::tempdir().unwrap();
        let spec = gen::GenSpec {
            hidden: 64,
            layers,
            heads: 4,
            kv_heads: 2,
            intermediate: 64,
            vocab: 300,
            dtype: switchyard_model::DType::F32,
            ..spec
        };
        gen::generate(&spec, tmp.path(), &|_| {}).unwrap();
        let engine = Arc::new(Engine::load_embedded(tmp.path(), &NoProgress).unwrap());
        (tmp, engine)
    }

    /// A greedy request that ignores eos, reporting to `events`.
    fn greedy(
        prompt: Vec<u32>,
        max_tokens: usize,
        events: mpsc::UnboundedSender<(usize, SeqEvent)>,
    ) -> SeqRequest {
        SeqRequest {
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop_ids: vec![],
            min_tokens: 0,
            json: None,
            ignore_eos: true,
            logprobs: None,
            index: 0,
            events,
            cancel: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            cached_tokens: Arc::default(),
        }
    }

    /// Submits one greedy request that ignores eos and waits for it: its tokens, why it
    /// finished and how many tokens it reported.
    fn run_one(
        handle: &SchedulerHandle,
        prompt: Vec<u32>,
        max_tokens: usize,
    ) -> (Vec<u32>, FinishReason, usize) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        handle.submit(greedy(prompt, max_tokens, tx)).unwrap();
        let mut got = Vec::new();
        loop {
            match rx.blocking_recv().unwrap().1 {
                SeqEvent::Token { id, .. } => got.push(id),
                SeqEvent::Finished {
                    reason,
                    completion_tokens,
                    ..
                } => return (got, reason, completion_tokens),
                SeqEvent::Failed(f) => panic!("{f:?}"),
            }
        }
    }

    #[test]
    fn requests_with_nothing_to_prefill_or_generate_are_refused_at_submit() {
        let (_dir, engine) = random_engine(1, gen::GenSpec::default());
        let mcfg = engine.config().clone();
        let cfg = SchedulerConfig {
            kv_cache_bytes: 4 * KvCache::<switchyard_model::AnyBackend>::block_bytes(
                &mcfg,
                16,
                KvDtype::F32,
            ),
            ..SchedulerConfig::default()
        };
        let handle = start(engine, cfg).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let req = |prompt: Vec<u32>, max_tokens| greedy(prompt, max_tokens, tx.clone());
        let err = handle.submit(req(vec![], 4)).unwrap_err();
        assert!(matches!(err, SubmitError::Invalid(_)), "{err}");
        let err = handle.submit(req(vec![1, 2], 0)).unwrap_err();
        assert!(matches!(err, SubmitError::Invalid(_)), "{err}");
        // The engine still serves a good request after both.
        handle.submit(req(vec![1, 2], 2)).unwrap();
        drop(tx);
        let mut tokens = 0;
        while let Some((_, ev)) = rx.blocking_recv() {
            match ev {
                SeqEvent::Token { .. } => tokens += 1,
                SeqEvent::Finished { .. } => break,
                SeqEvent::Failed(f) => panic!("{f:?}"),
            }
        }
        assert_eq!(tokens, 2);
    }

    #[test]
    fn sliding_window_sequences_outgrow_the_cache_and_match_full_cache_generation() {
        let (_dir, engine) = random_engine(
            2,
            gen::GenSpec {
                sliding_window: Some(8),
                max_position_embeddings: 256,
                ..gen::GenSpec::default()
            },
        );
        let prompt: Vec<u32> = vec![1, 40, 41, 42, 43];
        let mut want = Vec::new();
        let req = GenerateRequest {
            prompt: prompt.clone(),
            max_tokens: 150,
            sampling: SamplingParams::default(),
            stop_ids: vec![],
            ignore_eos: true,
            logprobs: false,
        };
        engine
            .generate(&req, |e| {
                want.push(e.id);
                true
            })
            .unwrap();

        // Room for 6 blocks of 16 positions: far less than the 155 positions generated.
        let mcfg = engine.config().clone();
        let cfg = SchedulerConfig {
            kv_cache_bytes: 6 * KvCache::<switchyard_model::AnyBackend>::block_bytes(
                &mcfg,
                16,
                KvDtype::F32,
            ),
            ..SchedulerConfig::default()
        };
        let handle = start(engine, cfg).unwrap();
        assert_eq!(handle.max_seq_len, 256);
        let (got, reason, completion_tokens) = run_one(&handle, prompt, 150);
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(completion_tokens, 150);
        assert_eq!(got, want);
    }

    #[test]
    fn a_bf16_cache_holds_twice_the_positions_and_generates_as_the_engine_alone() {
        let (dir, _) = random_engine(2, gen::GenSpec::default());
        let engine = Arc::new(
            Engine::load_embedded(dir.path(), &NoProgress)
                .unwrap()
                .with_kv_dtype(KvDtype::Bf16)
                .unwrap(),
        );
        let prompt: Vec<u32> = vec![1, 40, 41, 42, 43];
        let req = GenerateRequest {
            prompt: prompt.clone(),
            max_tokens: 40,
            sampling: SamplingParams::default(),
            stop_ids: vec![],
            ignore_eos: true,
            logprobs: false,
        };
        let mut want = Vec::new();
        engine
            .generate(&req, |e| {
                want.push(e.id);
                true
            })
            .unwrap();
        // The bytes of 4 f32 blocks hold 8 bf16 ones.
        let mcfg = engine.config().clone();
        let f32_block =
            KvCache::<switchyard_model::AnyBackend>::block_bytes(&mcfg, 16, KvDtype::F32);
        let cfg = SchedulerConfig {
            kv_cache_bytes: 4 * f32_block,
            ..SchedulerConfig::default()
        };
        let handle = start(engine, cfg).unwrap();
        assert_eq!(handle.stats.kv_blocks_total.load(Ordering::Relaxed), 8);
        assert_eq!(handle.max_seq_len, 8 * 16);
        let (got, reason, _) = run_one(&handle, prompt, 40);
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(got, want);
    }

    #[test]
    fn preempted_sequences_are_recomputed_and_finish_with_the_same_output() {
        let dir = std::env::var_os("SWITCHYARD_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
            });
        let engine =
            Arc::new(Engine::load_embedded(&dir.join("tiny-mixtral"), &NoProgress).unwrap());
        let prompts: Vec<Vec<u32>> = vec![vec![1, 10, 11], vec![1, 20, 21, 22], vec![1, 30]];
        let want: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let mut ids = Vec::new();
                let req = GenerateRequest {
                    prompt: p.clone(),
                    max_tokens: 60,
                    sampling: SamplingParams::default(),
                    stop_ids: vec![],
                    ignore_eos: true,
                    logprobs: false,
                };
                engine
                    .generate(&req, |e| {
                        ids.push(e.id);
                        true
                    })
                    .unwrap();
                ids
            })
            .collect();
        // 6 blocks of 16 positions for three sequences of ~63 positions each.
        let mcfg = engine.config().clone();
        let cfg = SchedulerConfig {
            kv_cache_bytes: 6 * KvCache::<switchyard_model::AnyBackend>::block_bytes(
                &mcfg,
                16,
                KvDtype::F32,
            ),
            ..SchedulerConfig::default()
        };
        let handle = start(engine, cfg).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        for (index, p) in prompts.iter().enumerate() {
            handle
                .submit(SeqRequest {
                    prompt: p.clone(),
                    max_tokens: 60,
                    sampling: SamplingParams::default(),
                    stop_ids: vec![],
                    min_tokens: 0,
                    json: None,
                    ignore_eos: true,
                    logprobs: None,
                    index,
                    events: tx.clone(),
                    cancel: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                    cached_tokens: Arc::default(),
                })
                .unwrap();
        }
        drop(tx);
        let mut got = vec![Vec::new(); 3];
        let mut done = 0;
        while done < 3 {
            let (i, ev) = rx.blocking_recv().unwrap();
            match ev {
                SeqEvent::Token { id, .. } => got[i].push(id),
                SeqEvent::Finished { .. } => done += 1,
                SeqEvent::Failed(f) => panic!("{f:?}"),
            }
        }
        assert_eq!(got, want);
        assert!(
            handle.stats.preemptions.load(Ordering::Relaxed) > 0,
            "the cache was too small not to preempt"
        );
        // Stats are published at the end of the iteration that sent the last event.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while handle.stats.kv_blocks_used.load(Ordering::Relaxed) != 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            handle.stats.kv_blocks_used.load(Ordering::Relaxed),
            0,
            "every block returned"
        );
    }

    /// Runs one greedy request with logprobs: its tokens, their logprobs and how many prompt
    /// tokens came from the prefix cache.
    fn run_logged(
        handle: &SchedulerHandle,
        prompt: Vec<u32>,
        max_tokens: usize,
    ) -> (Vec<u32>, Vec<f32>, usize) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cached = Arc::new(AtomicUsize::new(usize::MAX));
        let req = SeqRequest {
            logprobs: Some(0),
            cached_tokens: cached.clone(),
            ..greedy(prompt, max_tokens, tx)
        };
        handle.submit(req).unwrap();
        let (mut ids, mut lps) = (Vec::new(), Vec::new());
        loop {
            match rx.blocking_recv().unwrap().1 {
                SeqEvent::Token { id, logprob, .. } => {
                    ids.push(id);
                    lps.push(logprob.unwrap());
                }
                SeqEvent::Finished { .. } => break,
                SeqEvent::Failed(f) => panic!("{f:?}"),
            }
        }
        (ids, lps, cached.load(Ordering::Relaxed))
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} against {b}");
        }
    }

    #[test]
    fn prompts_that_share_a_beginning_reuse_its_blocks_and_generate_the_same() {
        let (dir, engine) = random_engine(2, gen::GenSpec::default());
        let mcfg = engine.config().clone();
        let cfg = |prefix_caching| SchedulerConfig {
            kv_cache_bytes: 32
                * KvCache::<switchyard_model::AnyBackend>::block_bytes(&mcfg, 16, KvDtype::F32),
            prefix_caching,
            ..SchedulerConfig::default()
        };
        let cached = start(engine, cfg(true)).unwrap();
        let plain = start(
            Arc::new(Engine::load_embedded(dir.path(), &NoProgress).unwrap()),
            cfg(false),
        )
        .unwrap();
        let prompt: Vec<u32> = (0..40).map(|i| 1 + (i * 37) % 299).collect();

        let (ids, lps, hit) = run_logged(&cached, prompt.clone(), 20);
        assert_eq!(hit, 0, "nothing cached yet");
        assert_eq!(
            run_logged(&plain, prompt.clone(), 20),
            (ids.clone(), lps.clone(), 0)
        );

        // The same prompt again: its two full blocks come from the cache and only the last 8
        // tokens are computed, in a step of another shape (so the sums may round differently,
        // as between any two batch shapes).
        let (ids1, lps1, hit1) = run_logged(&cached, prompt.clone(), 20);
        assert_eq!((&ids1, hit1), (&ids, 32));
        assert_close(&lps1, &lps);

        // The next turn of a conversation: the prompt and its answer, then a new question. The
        // blocks filled while decoding are found too.
        let mut turn: Vec<u32> = prompt.iter().chain(&ids).copied().collect();
        turn.extend([7, 8, 9]);
        let (ids2, lps2, hit2) = run_logged(&cached, turn.clone(), 12);
        assert_eq!(hit2, 48, "(63 - 1) / 16 whole blocks");
        let (want_ids, want_lps, _) = run_logged(&plain, turn.clone(), 12);
        assert_eq!(ids2, want_ids);
        assert_close(&lps2, &want_lps);

        // A prompt that differs in its first token shares nothing.
        let mut other = prompt.clone();
        other[0] = 2;
        assert_eq!(run_logged(&cached, other, 4).2, 0);
        // Blocks are held only while their sequences run.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while cached.stats.kv_blocks_used.load(Ordering::Relaxed) != 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(cached.stats.kv_blocks_used.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn sequences_arriving_together_with_one_prompt_compute_it_once() {
        let (_dir, engine) = random_engine(2, gen::GenSpec::default());
        let mcfg = engine.config().clone();
        let cfg = SchedulerConfig {
            kv_cache_bytes: 32
                * KvCache::<switchyard_model::AnyBackend>::block_bytes(&mcfg, 16, KvDtype::F32),
            ..SchedulerConfig::default()
        };
        let handle = start(engine, cfg).unwrap();
        let prompt: Vec<u32> = (0..40).map(|i| 1 + (i * 37) % 299).collect();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cached: Vec<_> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        for (index, c) in cached.iter().enumerate() {
            let req = SeqRequest {
                index,
                cached_tokens: c.clone(),
                ..greedy(prompt.clone(), 6, tx.clone())
            };
            handle.submit(req).unwrap();
        }
        drop(tx);
        let mut got = vec![Vec::new(); 3];
        while let Some((i, ev)) = rx.blocking_recv() {
            match ev {
                SeqEvent::Token { id, .. } => got[i].push(id),
                SeqEvent::Finished { .. } => {}
                SeqEvent::Failed(f) => panic!("{f:?}"),
            }
        }
        let mut hits: Vec<usize> = cached.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        hits.sort_unstable();
        assert_eq!(
            hits,
            [0, 32, 32],
            "one computes the prompt, the others wait for its blocks"
        );
        assert!(got.iter().all(|g| g.len() == 6 && *g == got[0]), "{got:?}");
    }

    #[test]
    fn a_json_constraint_keeps_every_choice_a_valid_json_object() {
        use switchyard_model::structured::{JsonMachine, Schema};
        let any = Schema::any_object();
        let (_dir, engine) = random_engine(2, gen::GenSpec::default());
        let vocab = TokenBytes::new(engine.tokenizer(), engine.config().vocab_size);
        let handle = start(engine, SchedulerConfig::default()).unwrap();
        let mut stopped = 0;
        for seed in 0..6u64 {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let req = SeqRequest {
                sampling: SamplingParams {
                    temperature: 1.0,
                    seed: Some(seed),
                    ..SamplingParams::default()
                },
                json: Some(JsonConstraint::default()),
                ignore_eos: false,
                ..greedy(vec![1, 40, 41, 42], 60, tx)
            };
            handle.submit(req).unwrap();
            let mut machine = JsonMachine::default();
            loop {
                match rx.blocking_recv().unwrap().1 {
                    SeqEvent::Token { id, .. } => {
                        if let Some(b) = vocab.get(id) {
                            assert!(machine.feed_all(&any, b), "token {id} breaks the JSON");
                        } else {
                            assert!(machine.is_complete(), "a special token mid-object");
                        }
                    }
                    SeqEvent::Finished { reason, .. } => {
                        if reason == FinishReason::Stop {
                            assert!(machine.is_complete());
                            stopped += 1;
                        }
                        break;
                    }
                    SeqEvent::Failed(f) => panic!("{f:?}"),
                }
            }
        }
        // Random weights ramble, but some choices close their object and stop.
        assert!(stopped > 0);
    }
}
