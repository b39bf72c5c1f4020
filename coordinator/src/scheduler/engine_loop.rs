//! The engine thread's loop. Each iteration: take in requests and commands, then
//! admit → budget → make the cache fit → run the step → sample and emit → retire.

use super::{
    sampler::{Pick, SampleContext},
    sequence::Seq,
    Admission, Command, FinishReason, SchedulerConfig, SchedulerStats, SeqEvent, SeqFailure,
};
use crate::engine::Engine;
use std::{collections::VecDeque, sync::Arc, time::Instant};
use switchyard_model::{
    structured::TokenBytes, AnyBackend, KvCache, Logits, ModelError, SeqStep, StepOutput,
    StepScratch,
};
use tokio::sync::{mpsc, watch};

pub(super) struct Loop {
    engine: Arc<Engine>,
    cfg: SchedulerConfig,
    kv: KvCache<AnyBackend>,
    stats: watch::Sender<SchedulerStats>,
    preemptions: usize,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    scratch: StepScratch<AnyBackend>,
    out: StepOutput,
    logprobs: Vec<f32>,
    /// Every token's bytes, built when the first sequence with a JSON constraint arrives.
    token_bytes: Option<TokenBytes>,
}

/// A sequence's end, decided while sampling.
enum Retire {
    /// Finished normally; its reader gets `Finished`.
    Done(FinishReason),
    /// Nobody listens any more.
    Gone,
}

impl Loop {
    pub fn new(
        engine: Arc<Engine>,
        cfg: SchedulerConfig,
        kv: KvCache<AnyBackend>,
        scratch: StepScratch<AnyBackend>,
        stats: watch::Sender<SchedulerStats>,
    ) -> Self {
        metrics::gauge!("switchyard_kv_cache_blocks", "state" => "total")
            .set(kv.num_blocks() as f64);
        set_gauges(&stats.borrow());
        Self {
            engine,
            cfg,
            kv,
            stats,
            preemptions: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            scratch,
            out: StepOutput::new(Logits::Last),
            logprobs: Vec::new(),
            token_bytes: None,
        }
    }

    pub fn run(
        mut self,
        mut rx: mpsc::Receiver<Admission>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        loop {
            // Block only when there is nothing to do.
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.blocking_recv() {
                    Some(a) => self.enqueue(a),
                    None => break,
                }
            }
            while let Ok(a) = rx.try_recv() {
                self.enqueue(a);
            }
            while let Ok(c) = commands.try_recv() {
                self.command(c);
            }
            self.drop_cancelled();
            self.expire_waiting();
            self.iterate();
            self.publish();
        }
        tracing::info!("engine stopped");
    }

    /// Queues a request's sequences, or refuses them all when they would overfill the queue
    /// (a request larger than the queue still enters an empty one).
    fn enqueue(&mut self, a: Admission) {
        if !self.waiting.is_empty() && self.waiting.len() + a.seqs.len() > self.cfg.max_waiting {
            metrics::counter!("switchyard_requests_refused_total", "reason" => "queue_full")
                .increment(1);
            for s in a.seqs {
                s.send(SeqEvent::Failed(SeqFailure::QueueFull));
            }
            return;
        }
        for s in a.seqs {
            if s.sampler.constrained() && self.token_bytes.is_none() {
                let vocab = self.engine.config().vocab_size;
                self.token_bytes = Some(TokenBytes::new(self.engine.tokenizer(), vocab));
            }
            metrics::counter!("switchyard_prompt_tokens_total").increment(s.prompt_len as u64);
            self.waiting.push_back(s);
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Cancel { request, index } => {
                for s in self.running.iter_mut().chain(self.waiting.iter_mut()) {
                    if s.request == request && s.index == index {
                        s.cancelled = true;
                    }
                }
            }
            #[cfg(test)]
            Command::Panic => panic!("engine panic asked for by a test"),
        }
    }

    /// Fails the sequences that waited past the queue deadline without ever starting (a
    /// preempted one has started and waits for room again).
    fn expire_waiting(&mut self) {
        let limit = self.cfg.queue_timeout;
        self.waiting.retain(|s| {
            if s.started || s.arrived.elapsed() < limit {
                return true;
            }
            metrics::counter!("switchyard_requests_refused_total", "reason" => "queue_timeout")
                .increment(1);
            s.send(SeqEvent::Failed(SeqFailure::QueueTimeout(limit)));
            false
        });
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
        let stats = SchedulerStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_blocks_used: used,
            kv_blocks_total: self.kv.num_blocks(),
            preemptions: self.preemptions,
        };
        // Most decode steps change none of these: only a change is published.
        if *self.stats.borrow() == stats {
            return;
        }
        self.stats.send_replace(stats);
        set_gauges(&stats);
    }

    /// One iteration over the running sequences.
    fn iterate(&mut self) {
        self.admit();
        if self.running.is_empty() {
            return;
        }
        let mut take = self.budget();
        if !self.fit_cache(&mut take) {
            return;
        }
        let Some(in_step) = self.run_step(&take) else {
            return;
        };
        let finished = self.sample_and_emit(&in_step);
        self.retire(finished);
    }

    /// Moves waiting sequences to running while there is room for their first chunk. One whose
    /// prompt begins like that of a running sequence still prefilling waits for those blocks
    /// instead of computing them too (a request's `n` choices, a burst of requests with one
    /// system prompt); sequences behind it may go first.
    fn admit(&mut self) {
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

    /// Gives a sequence about to run the cached blocks its tokens begin with, and tells its
    /// reader it started the first time.
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
            s.send(SeqEvent::Started { cached_tokens: hit });
            s.started = true;
            s.queued = None;
        }
        if hit > 0 {
            tracing::debug!(
                tokens = s.tokens.len(),
                cached = hit,
                "sequence starts from the prefix cache"
            );
        }
    }

    /// Tokens each running sequence computes this step: every decode first, then prompt
    /// chunks in arrival order, up to the token budget.
    fn budget(&self) -> Vec<usize> {
        let mut take = vec![0usize; self.running.len()];
        let mut budget = self.cfg.max_batch_tokens;
        for decode in [true, false] {
            for (i, s) in self.running.iter().enumerate() {
                let pending = s.tokens.len() - s.kv.len();
                if (pending == 1) == decode && pending > 0 && budget > 0 {
                    take[i] = pending.min(budget);
                    budget -= take[i];
                }
            }
        }
        take
    }

    /// Makes the cache fit this step, preempting the youngest sequences if it does not.
    /// False when nothing can run (a single sequence that outgrew the whole cache is ended).
    fn fit_cache(&mut self, take: &mut Vec<usize>) -> bool {
        loop {
            let need: usize = self
                .running
                .iter()
                .zip(take.iter())
                .map(|(s, &n)| {
                    self.kv
                        .blocks_for(s.kv.len() + n)
                        .saturating_sub(s.kv.blocks().len())
                })
                .sum();
            if need <= self.kv.free_blocks() {
                return true;
            }
            if !self.preempt_youngest() {
                let s = self.running.remove(0);
                s.send(SeqEvent::Failed(SeqFailure::Internal(
                    "the sequence no longer fits in the KV cache".into(),
                )));
                return false;
            }
            take.truncate(self.running.len());
        }
    }

    /// Preempts the youngest running sequence but the oldest: frees its blocks and queues it
    /// first so it is recomputed (prompt and generated tokens) when room returns.
    fn preempt_youngest(&mut self) -> bool {
        if self.running.len() < 2 {
            return false;
        }
        let Some(mut s) = self.running.pop() else {
            return false;
        };
        self.kv.release(&mut s.kv);
        metrics::counter!("switchyard_preemptions_total").increment(1);
        self.preemptions += 1;
        tracing::debug!(
            tokens = s.tokens.len(),
            "preempted a sequence for recompute"
        );
        self.waiting.push_front(s);
        true
    }

    /// The step's span: a child of the first traced sequence's request (so a request traced
    /// alone has every step in its trace), following from the other traced ones.
    fn step_span(&self, in_step: &[usize], take: &[usize], tokens: usize) -> tracing::Span {
        let traced: Vec<&tracing::Span> = in_step
            .iter()
            .map(|&i| &self.running[i].span)
            .filter(|s| !s.is_disabled())
            .collect();
        let prefill: usize = in_step
            .iter()
            .filter(|&&i| take[i] > 1)
            .map(|&i| take[i])
            .sum();
        let Some((first, rest)) = traced.split_first() else {
            return tracing::debug_span!("engine.step", seqs = in_step.len(), tokens, prefill);
        };
        let span = tracing::debug_span!(parent: *first, "engine.step", seqs = in_step.len(), tokens, prefill);
        for other in rest {
            span.follows_from(*other);
        }
        span
    }

    /// Runs one model step over the sequences with tokens to compute, then indexes the blocks
    /// they filled and trims sliding windows. Returns their indices in `running` (the rows of
    /// the step's logits), or None when the step failed and its sequences were ended.
    fn run_step(&mut self, take: &[usize]) -> Option<Vec<usize>> {
        let in_step: Vec<usize> = (0..self.running.len()).filter(|&i| take[i] > 0).collect();
        let n_tokens: usize = take.iter().sum();
        let span = self.step_span(&in_step, take, n_tokens);
        let mut steps: Vec<SeqStep<'_>> = Vec::new();
        for (i, s) in self.running.iter_mut().enumerate() {
            if take[i] == 0 {
                continue;
            }
            let start = s.kv.len();
            steps.push(SeqStep {
                tokens: &s.tokens[start..start + take[i]],
                kv: &mut s.kv,
            });
        }
        let step_start = Instant::now();
        let res = {
            let _span = span.entered();
            self.engine.model().step(
                &mut steps,
                &mut self.kv,
                self.engine.experts(),
                &mut self.scratch,
                &mut self.out,
            )
        };
        drop(steps);
        metrics::histogram!("switchyard_step_duration_seconds")
            .record(step_start.elapsed().as_secs_f64());
        if let Err(e) = res {
            self.fail_step(&in_step, &e);
            return None;
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
        Some(in_step)
    }

    fn fail_step(&mut self, in_step: &[usize], e: &ModelError) {
        let failure = match e {
            ModelError::Dispatch(_) => SeqFailure::Unavailable(e.to_string()),
            _ => SeqFailure::Internal(e.to_string()),
        };
        tracing::error!(error = %e, "step failed; ending its sequences");
        for &i in in_step.iter().rev() {
            let mut s = self.running.remove(i);
            self.kv.release(&mut s.kv);
            s.send(SeqEvent::Failed(failure.clone()));
        }
    }

    /// Samples for every sequence whose pending tokens are now all in the cache and sends the
    /// token; returns the sequences that end, in `running` order.
    fn sample_and_emit(&mut self, in_step: &[usize]) -> Vec<(usize, Retire)> {
        let vocab = self.engine.config().vocab_size;
        let eos = &self.engine.config().eos_token_ids;
        let max_len = super::max_seq_len(
            self.engine.config(),
            self.kv.num_blocks(),
            self.kv.block_size(),
        );
        let mut cx = SampleContext {
            eos,
            token_bytes: self.token_bytes.as_ref(),
            logprobs: &mut self.logprobs,
        };
        let mut finished = Vec::new();
        for (row, &i) in in_step.iter().enumerate() {
            let s = &mut self.running[i];
            if s.kv.len() < s.tokens.len() {
                continue; // a prompt chunk; more to come
            }
            let logits = &mut self.out.logits[row * vocab..(row + 1) * vocab];
            let (id, logprob, top) = match s.sampler.pick(logits, s.generated(), &mut cx) {
                Pick::Token { id, logprob, top } => (id, logprob, top),
                Pick::Exhausted => {
                    finished.push((i, Retire::Done(FinishReason::Stop)));
                    continue;
                }
            };
            record_latency(s);
            s.tokens.push(id);
            metrics::counter!("switchyard_generation_tokens_total").increment(1);
            if !s.send(SeqEvent::Token { id, logprob, top }) {
                // The client went away between iterations.
                metrics::counter!("switchyard_requests_cancelled_total").increment(1);
                finished.push((i, Retire::Gone));
            } else if let Some(r) = s.sampler.stops(id, eos) {
                finished.push((i, Retire::Done(r)));
            } else if s.generated() >= s.max_tokens || s.tokens.len() >= max_len {
                finished.push((i, Retire::Done(FinishReason::Length)));
            }
        }
        finished
    }

    /// Frees the blocks of sequences that ended and tells their readers why.
    fn retire(&mut self, finished: Vec<(usize, Retire)>) {
        for (i, how) in finished.into_iter().rev() {
            let mut s = self.running.remove(i);
            self.kv.release(&mut s.kv);
            if let Retire::Done(reason) = how {
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
}

/// The scheduler's gauges in the metrics registry.
fn set_gauges(s: &SchedulerStats) {
    metrics::gauge!("switchyard_num_requests_running").set(s.running as f64);
    metrics::gauge!("switchyard_num_requests_waiting").set(s.waiting as f64);
    metrics::gauge!("switchyard_kv_cache_usage_perc")
        .set(s.kv_blocks_used as f64 / s.kv_blocks_total.max(1) as f64);
    metrics::gauge!("switchyard_kv_cache_blocks", "state" => "used").set(s.kv_blocks_used as f64);
}

/// Time to first token, or since the previous one.
fn record_latency(s: &mut Seq) {
    let now = Instant::now();
    match s.last_token {
        None => metrics::histogram!("switchyard_time_to_first_token_seconds")
            .record((now - s.arrived).as_secs_f64()),
        Some(t) => metrics::histogram!("switchyard_inter_token_latency_seconds")
            .record((now - t).as_secs_f64()),
    }
    s.last_token = Some(now);
}
