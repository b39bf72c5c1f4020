//! One choice as the engine thread keeps it: its tokens, cache blocks, sampler and reader.

use super::{sampler::SeqSampler, SeqEvent};
use crate::request::ValidatedRequest;
use std::time::Instant;
use switchyard_model::SeqKv;
use tokio::sync::mpsc;

pub(crate) struct Seq {
    /// Prompt followed by generated tokens: after a preemption all of it is recomputed.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub sampler: SeqSampler,
    pub kv: SeqKv,
    /// The request it belongs to, and which of its choices it is.
    pub request: u64,
    pub index: usize,
    events: mpsc::UnboundedSender<(usize, SeqEvent)>,
    /// Its reader asked for it to end (a stop string matched).
    pub cancelled: bool,
    /// Whether it has run before (a preempted sequence's cache hits are not its prompt's).
    pub started: bool,
    pub arrived: Instant,
    pub last_token: Option<Instant>,
    /// The request's span (disabled unless traced): steps that compute this sequence join it.
    pub span: tracing::Span,
    /// Open from arrival to its first step (`queue` in a trace).
    pub queued: Option<tracing::Span>,
}

impl Seq {
    /// Choice `index` of request `request`.
    pub fn new(
        req: &ValidatedRequest,
        request: u64,
        index: usize,
        events: mpsc::UnboundedSender<(usize, SeqEvent)>,
    ) -> Self {
        let p = index / req.n();
        let prompt = &req.prompts()[p];
        Self {
            tokens: prompt.clone(),
            prompt_len: prompt.len(),
            max_tokens: req.max_tokens(p),
            sampler: SeqSampler::new(req, index, prompt),
            kv: SeqKv::default(),
            request,
            index,
            events,
            cancelled: false,
            started: false,
            arrived: Instant::now(),
            last_token: None,
            span: tracing::Span::current(),
            queued: Some(tracing::debug_span!("queue", choice = index)),
        }
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Its reader went away or asked it to end.
    pub fn cancelled(&self) -> bool {
        self.cancelled || self.events.is_closed()
    }

    /// Tells its reader; false once nobody listens.
    pub fn send(&self, e: SeqEvent) -> bool {
        self.events.send((self.index, e)).is_ok()
    }
}
