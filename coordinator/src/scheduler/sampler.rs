//! The per-sequence sampler: everything between a sequence's logits and its next token, the
//! same for every caller. Logit bias and penalties, `min_tokens` (eos and stop ids held off),
//! the JSON constraint's mask, the choice itself, logprobs, and whether the token ends it.

use super::FinishReason;
use crate::request::ValidatedRequest;
use switchyard_model::{
    sampling,
    structured::{JsonConstraint, TokenBytes},
    Sampler,
};

/// One choice's sampling state.
pub(crate) struct SeqSampler {
    sampler: Sampler,
    stop_ids: Vec<u32>,
    min_tokens: usize,
    ignore_eos: bool,
    json: Option<JsonConstraint>,
    logprobs: Option<usize>,
}

/// What the sampler chose.
pub(crate) enum Pick {
    Token {
        id: u32,
        logprob: Option<f32>,
        top: Vec<(u32, f32)>,
    },
    /// Nothing can continue the JSON (the vocabulary lacks the bytes): the choice ends here.
    Exhausted,
}

/// What every sequence's sampling shares in one step: the model's eos ids, every token's
/// bytes (for JSON constraints) and a log-softmax buffer.
pub(crate) struct SampleContext<'a> {
    pub eos: &'a [u32],
    pub token_bytes: Option<&'a TokenBytes>,
    pub logprobs: &'a mut Vec<f32>,
}

impl SeqSampler {
    /// Choice `index` of `req` (its seed offset by the choice's place among its prompt's).
    pub fn new(req: &ValidatedRequest, index: usize, prompt: &[u32]) -> Self {
        let mut params = req.sampling().clone();
        params.seed = params
            .seed
            .map(|s| s.wrapping_add((index % req.n()) as u64));
        Self {
            sampler: Sampler::new(params, prompt),
            stop_ids: req.stop_ids().to_vec(),
            min_tokens: req.min_tokens(),
            ignore_eos: req.ignore_eos(),
            json: req.json().cloned().map(JsonConstraint::new),
            logprobs: req.logprobs(),
        }
    }

    /// Whether this sampler needs every token's bytes.
    pub fn constrained(&self) -> bool {
        self.json.is_some()
    }

    /// Chooses the next token from `logits` (changed in place: bias, penalties, masks), the
    /// `generated`-th of its sequence.
    pub fn pick(
        &mut self,
        logits: &mut [f32],
        generated: usize,
        cx: &mut SampleContext<'_>,
    ) -> Pick {
        self.sampler.apply_penalties(logits);
        if generated < self.min_tokens {
            let eos: &[u32] = if self.ignore_eos { &[] } else { cx.eos };
            for &t in self.stop_ids.iter().chain(eos) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if let (Some(c), Some(vocab)) = (&mut self.json, cx.token_bytes) {
            if !c.mask(vocab, cx.eos, logits) {
                return Pick::Exhausted;
            }
        }
        let id = self.sampler.sample(logits);
        if let (Some(c), Some(vocab)) = (&mut self.json, cx.token_bytes) {
            c.advance(vocab, id);
        }
        let (logprob, top) = match self.logprobs {
            None => (None, Vec::new()),
            Some(n) => {
                sampling::log_softmax(logits, cx.logprobs);
                let top = if n > 0 {
                    top_k(cx.logprobs, n)
                } else {
                    Vec::new()
                };
                (Some(cx.logprobs[id as usize]), top)
            }
        };
        Pick::Token { id, logprob, top }
    }

    /// Whether token `id` ends the choice: eos (unless ignored) or a stop id.
    pub fn stops(&self, id: u32, eos: &[u32]) -> Option<FinishReason> {
        ((!self.ignore_eos && eos.contains(&id)) || self.stop_ids.contains(&id))
            .then_some(FinishReason::Stop)
    }
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
