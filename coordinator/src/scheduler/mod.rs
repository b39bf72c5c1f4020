//! Continuous batching, the one generation loop: the API, `generate`, `forward --greedy` and
//! `bench` all submit here.
//!
//! One engine thread owns the paged KV cache and every running sequence, and each iteration
//! runs one step over all of them: a decode token for each sequence that has finished its
//! prompt, plus prompt chunks of sequences still prefilling, up to a token budget (so a long
//! prompt never stalls the decodes). New requests join at the next iteration; when cache
//! blocks run out, the youngest sequence is preempted and later recomputed. With prefix
//! caching on (the default), a sequence starts from the cached blocks of any earlier sequence
//! that began with the same tokens, so shared prompt beginnings and recomputes after preemption
//! cost only their new tokens.
//!
//! The API and the engine thread share no state: requests arrive on a bounded channel (a full
//! queue is the caller's 429), each request's choices answer on its own event channel
//! ([`RequestStream`]), and cancellations travel as commands. A closed event channel (the
//! client went away) cancels every choice of its request at the next iteration.

mod engine_loop;
mod events;
mod sampler;
mod sequence;
#[cfg(test)]
mod tests;

pub use events::{FinishReason, RequestStream, SeqEvent, SeqFailure};

use crate::{engine::Engine, request::ValidatedRequest};
use engine_loop::Loop;
use sequence::Seq;
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};
use switchyard_model::{KvCache, ModelError, StepScratch};
use tokio::sync::{mpsc, watch};

/// Scheduler limits.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Tokens processed per step, decodes and prompt chunks together.
    pub max_batch_tokens: usize,
    /// Sequences decoding at once.
    pub max_running: usize,
    /// Sequences queued (not yet running) before new requests are refused; a request larger
    /// than this is admitted only into an empty queue.
    pub max_waiting: usize,
    /// How long a sequence may wait for its first step before it fails (the caller's 503).
    pub queue_timeout: std::time::Duration,
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
            queue_timeout: std::time::Duration::from_secs(120),
            kv_cache_bytes: 1 << 30,
            block_size: switchyard_model::DEFAULT_BLOCK_SIZE,
            prefix_caching: true,
        }
    }
}

impl SchedulerConfig {
    /// A scheduler for `sequences` at once of up to `positions` each and no more: what a
    /// one-off CLI run needs, however large the model.
    #[must_use]
    pub fn for_sequences(engine: &Engine, sequences: usize, positions: usize) -> Self {
        let block_size = switchyard_model::DEFAULT_BLOCK_SIZE;
        let block_bytes = KvCache::<switchyard_model::AnyBackend>::block_bytes(
            engine.config(),
            block_size,
            engine.kv_dtype(),
        );
        let blocks = sequences.max(1) * positions.div_ceil(block_size).max(1);
        Self {
            max_running: sequences.max(1),
            max_waiting: sequences.max(1),
            kv_cache_bytes: blocks * block_bytes,
            block_size,
            ..Self::default()
        }
    }
}

/// Live counts, as of the engine thread's last iteration (read by /metrics, /health, tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Sequences preempted (freed and queued for recompute) since start.
    pub preemptions: usize,
}

/// What the engine thread is told besides new requests.
#[derive(Debug)]
pub(crate) enum Command {
    /// End one choice of a request early (its reader matched a stop string).
    Cancel { request: u64, index: usize },
    /// Panic the engine thread (tests of what a panic leaves behind).
    #[cfg(test)]
    Panic,
}

/// A request's choices, ready to join the queue.
pub(crate) struct Admission {
    seqs: Vec<Seq>,
}

/// The submitting side of the scheduler.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Admission>,
    commands: mpsc::UnboundedSender<Command>,
    stats: watch::Receiver<SchedulerStats>,
    next_id: Arc<AtomicU64>,
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
}

impl SchedulerHandle {
    /// Whether the engine thread is still running.
    #[must_use]
    pub fn is_alive(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Resolves when the engine thread has stopped (every handle dropped, or a panic): a
    /// server must not go on answering health checks without it.
    pub async fn stopped(&self) {
        self.tx.closed().await;
    }

    /// Makes the engine thread panic at its next iteration.
    #[cfg(test)]
    pub(crate) fn panic_engine(&self) {
        let _ = self.commands.send(Command::Panic);
    }

    /// The counts as of the last iteration.
    #[must_use]
    pub fn stats(&self) -> SchedulerStats {
        *self.stats.borrow()
    }

    /// Queues every choice of `req`, or refuses at once when the queue is full. Choice `c`
    /// samples with seed `seed + c % n` where the request has a seed: distinct but
    /// reproducible choices.
    pub fn submit(&self, req: &ValidatedRequest) -> Result<RequestStream, SubmitError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = mpsc::unbounded_channel();
        let seqs = (0..req.choices())
            .map(|index| Seq::new(req, id, index, events.clone()))
            .collect();
        self.tx.try_send(Admission { seqs }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
        })?;
        Ok(RequestStream::new(id, rx, self.commands.clone()))
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
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (stats_tx, stats) = watch::channel(SchedulerStats {
        kv_blocks_total: num_blocks,
        ..SchedulerStats::default()
    });
    let mut kv = KvCache::new(
        engine.model().backend(),
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
    let scratch = StepScratch::new(engine.model().backend())?;
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let run = std::panic::AssertUnwindSafe(|| {
                Loop::new(engine, cfg, kv, scratch, stats_tx).run(rx, command_rx);
            });
            // A panic drops every sequence's event sender (their readers answer with an error)
            // and the request queue (the server sees `stopped` and exits non-zero).
            if std::panic::catch_unwind(run).is_err() {
                tracing::error!("the engine thread panicked; its requests fail");
            }
        })
        .map_err(|e| ModelError::Input(format!("cannot start the engine thread: {e}")))?;
    Ok(SchedulerHandle {
        tx,
        commands,
        stats,
        next_id: Arc::new(AtomicU64::new(0)),
        max_seq_len,
    })
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

/// Starts a scheduler sized for `req` alone and submits it: the whole engine of a CLI run.
/// Keep the handle until the stream ends.
pub fn run_alone(
    engine: Arc<Engine>,
    req: &ValidatedRequest,
) -> Result<(SchedulerHandle, RequestStream), crate::engine::EngineError> {
    let positions = (0..req.prompts().len())
        .map(|p| req.prompts()[p].len() + req.max_tokens(p))
        .max()
        .unwrap_or(1);
    let cfg = SchedulerConfig::for_sequences(&engine, req.choices(), positions);
    let handle = start(engine, cfg)?;
    let stream = handle.submit(req)?;
    Ok((handle, stream))
}
