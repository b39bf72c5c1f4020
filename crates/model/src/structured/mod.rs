//! Structured output: generation constrained to valid JSON (OpenAI's `response_format:
//! {"type": "json_object"}`). Before each choice, every token whose bytes would break the
//! grammar gets a logit of -inf, and end-of-sequence is allowed only once the object is closed,
//! so what the model writes parses whatever it would have written unconstrained.
//!
//! Hand-written rather than a grammar crate: the mask runs for every vocabulary token before
//! every sampled token, so it must cost well under a millisecond at 32,000 tokens
//! (`examples/bench_json_mask`: 0.2-0.5 ms), which needs a recogniser that steps one byte at a
//! time, clones cheaply and skips tokens by their first byte. The schema subset is small and
//! its compile step refuses everything it cannot enforce.

mod json;
mod schema;

pub use json::{JsonMachine, MAX_WHITESPACE_RUN};
pub use schema::Schema;
use std::sync::Arc;

/// The bytes each token adds to the text (`None`: a special token, which adds none), indexed
/// by token id up to the model's vocabulary size.
pub struct TokenBytes {
    bytes: Vec<Option<Box<[u8]>>>,
    /// Per token: its bytes may stand anywhere inside a string (no `"`, `\` or control
    /// characters), which is most of a vocabulary; masking inside a string checks only this.
    plain: Vec<bool>,
}

impl TokenBytes {
    /// Token bytes as `tokenizer` spells them, padded with `None` to `vocab_size` (a model may
    /// have more rows than its tokenizer has tokens).
    #[must_use]
    pub fn new(tokenizer: &crate::Tokenizer, vocab_size: usize) -> Self {
        let mut bytes: Vec<Option<Box<[u8]>>> = tokenizer
            .token_bytes()
            .into_iter()
            .map(|b| b.map(Vec::into_boxed_slice))
            .collect();
        bytes.resize(vocab_size, None);
        Self::from_bytes(bytes)
    }

    fn from_bytes(bytes: Vec<Option<Box<[u8]>>>) -> Self {
        let plain = bytes
            .iter()
            .map(|b| {
                b.as_deref().is_some_and(|b| {
                    !b.is_empty() && b.iter().all(|&c| c >= 0x20 && c != b'"' && c != b'\\')
                })
            })
            .collect();
        Self { bytes, plain }
    }

    /// What token `id` adds to the text.
    #[must_use]
    pub fn get(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize)?.as_deref()
    }
}

/// One sequence's JSON constraint.
#[derive(Debug)]
pub struct JsonConstraint {
    schema: Arc<Schema>,
    machine: JsonMachine,
    /// Reused for trying tokens, so that masking allocates nothing.
    trial: JsonMachine,
}

impl Default for JsonConstraint {
    /// Any JSON object.
    fn default() -> Self {
        Self::new(Arc::new(Schema::any_object()))
    }
}

impl JsonConstraint {
    /// Output that `schema` allows (shared by a request's choices).
    #[must_use]
    pub fn new(schema: Arc<Schema>) -> Self {
        Self {
            schema,
            machine: JsonMachine::default(),
            trial: JsonMachine::default(),
        }
    }

    /// Sets the logit of every token that cannot come next to -inf; `eos` tokens stay only once
    /// the object is complete. Returns false when no token at all may come next (a vocabulary
    /// without the bytes the grammar needs), where the caller should end the sequence.
    pub fn mask(&mut self, vocab: &TokenBytes, eos: &[u32], logits: &mut [f32]) -> bool {
        let complete = self.machine.is_complete();
        let in_string = self.machine.in_plain_string();
        // Most tokens fail on their first byte: try each byte once, and run only tokens whose
        // first byte passes through the machine.
        let mut first = [false; 256];
        for (b, ok) in first.iter_mut().enumerate() {
            self.trial.clone_from(&self.machine);
            *ok = self.trial.feed(&self.schema, b as u8);
        }
        let mut any = false;
        for (id, l) in logits.iter_mut().enumerate() {
            let ok = if eos.contains(&(id as u32)) {
                complete
            } else {
                match vocab.get(id as u32) {
                    Some(_) if in_string && vocab.plain[id] => true,
                    Some(b) if !b.is_empty() && first[b[0] as usize] => {
                        self.trial.clone_from(&self.machine);
                        self.trial.feed_all(&self.schema, b)
                    }
                    _ => false,
                }
            };
            if ok {
                any |= *l != f32::NEG_INFINITY;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        any
    }

    /// Records the token chosen.
    pub fn advance(&mut self, vocab: &TokenBytes, id: u32) {
        if let Some(b) = vocab.get(id) {
            // Masked choices always feed cleanly; a token chosen unmasked could not.
            let _ = self.machine.feed_all(&self.schema, b);
        }
    }

    /// Whether the text so far is a whole JSON object.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.machine.is_complete()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[&str]) -> TokenBytes {
        TokenBytes::from_bytes(
            tokens
                .iter()
                .map(|t| (!t.is_empty()).then(|| t.as_bytes().into()))
                .collect(),
        )
    }

    #[test]
    fn masking_keeps_exactly_the_tokens_that_continue_valid_json() {
        // Token 0 stands for eos (no bytes).
        let v = vocab(&["", "{", "}", "\"a\"", ":", " 1", "x", "{\"", "\"}"]);
        let mut c = JsonConstraint::default();
        let allowed = |c: &mut JsonConstraint| {
            let mut logits = vec![0.0f32; 9];
            assert!(c.mask(&v, &[0], &mut logits));
            (0..9).filter(|&i| logits[i] == 0.0).collect::<Vec<_>>()
        };
        assert_eq!(allowed(&mut c), [1, 7]);
        c.advance(&v, 1);
        // `"}` opens a key that starts with a brace: valid so far.
        assert_eq!(allowed(&mut c), [2, 3, 8]);
        for id in [3, 4, 5] {
            c.advance(&v, id);
        }
        assert_eq!(allowed(&mut c), [2]);
        c.advance(&v, 2);
        assert!(c.is_complete());
        assert_eq!(allowed(&mut c), [0], "only eos once the object is closed");
    }

    #[test]
    fn a_vocabulary_that_cannot_continue_reports_it() {
        let v = vocab(&["", "x"]);
        let mut c = JsonConstraint::default();
        let mut logits = vec![0.0f32; 2];
        assert!(!c.mask(&v, &[0], &mut logits));
    }
}
