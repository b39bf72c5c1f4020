//! A generation request, parsed once into a type that cannot be wrong.
//!
//! [`validation`] is the one place a request is checked: every OpenAI field, the prompt's
//! token ids against the vocabulary and the context, `n` and every limit. It produces a
//! [`ValidatedRequest`], whose fields are private, and the scheduler accepts nothing else, so
//! nothing downstream checks again. The API and every CLI command build the same
//! [`openai`] bodies and go through the same rules.

pub mod openai;
pub mod validation;

use std::sync::Arc;
use switchyard_model::{structured::Schema, SamplingParams};

/// Prompts one request to the server may carry by default.
pub const DEFAULT_MAX_PROMPTS: usize = 64;

/// What a request is checked against.
#[derive(Clone, Debug)]
pub struct RequestLimits {
    /// The name clients pass as `model`.
    pub model_name: String,
    /// Largest `n`.
    pub max_n: usize,
    /// Most prompts in one completions request (each gets `n` choices).
    pub max_prompts: usize,
    /// Longest sequence (prompt + generated) the KV cache can hold.
    pub max_seq_len: usize,
    pub vocab_size: usize,
}

/// Why a request was refused; the API maps each to its status (`ApiError: From`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A field is missing, malformed or out of range (`param` names it).
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<&'static str>,
    },
    /// The request names a model this server does not serve.
    #[error("model {given:?} does not exist; this server serves {served:?}")]
    UnknownModel { given: String, served: String },
}

impl RequestError {
    pub(crate) fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::Invalid {
            message: message.into(),
            param,
        }
    }
}

/// A request every rule of [`validation`] has passed: at least one prompt, each non-empty,
/// every id in the vocabulary, each prompt plus its `max_tokens` (at least 1) within the
/// context, `n` in range, sampling values in range, `min_tokens <= max_tokens`.
#[derive(Clone, Debug)]
pub struct ValidatedRequest {
    prompts: Vec<Vec<u32>>,
    /// Per prompt: tokens to generate at most.
    max_tokens: Vec<usize>,
    n: usize,
    sampling: SamplingParams,
    stop_strings: Vec<String>,
    stop_ids: Vec<u32>,
    min_tokens: usize,
    ignore_eos: bool,
    logprobs: Option<usize>,
    json: Option<Arc<Schema>>,
}

impl ValidatedRequest {
    /// The prompts' token ids; each gets `n` choices.
    #[must_use]
    pub fn prompts(&self) -> &[Vec<u32>] {
        &self.prompts
    }
    /// Tokens prompt `i` may generate at most.
    #[must_use]
    pub fn max_tokens(&self, prompt: usize) -> usize {
        self.max_tokens[prompt]
    }
    /// Choices per prompt.
    #[must_use]
    pub fn n(&self) -> usize {
        self.n
    }
    /// Choices in all: prompts × n. Choice `c` belongs to prompt `c / n`.
    #[must_use]
    pub fn choices(&self) -> usize {
        self.prompts.len() * self.n
    }
    #[must_use]
    pub fn sampling(&self) -> &SamplingParams {
        &self.sampling
    }
    /// Strings that end a choice (matched on its text, by whoever reads it: `crate::text`).
    #[must_use]
    pub fn stop_strings(&self) -> &[String] {
        &self.stop_strings
    }
    /// Token ids that end a choice, beyond the model's eos ids.
    #[must_use]
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }
    /// Tokens generated before eos or a stop id may end a choice.
    #[must_use]
    pub fn min_tokens(&self) -> usize {
        self.min_tokens
    }
    /// Keep going past eos (benchmarks want fixed lengths).
    #[must_use]
    pub fn ignore_eos(&self) -> bool {
        self.ignore_eos
    }
    /// Report each token's logprob and this many alternatives; `None` reports none and skips
    /// the log-softmax over the vocabulary.
    #[must_use]
    pub fn logprobs(&self) -> Option<usize> {
        self.logprobs
    }
    /// The JSON schema every choice is held to (`json_object` is any object).
    #[must_use]
    pub fn json(&self) -> Option<&Arc<Schema>> {
        self.json.as_ref()
    }
    /// Prompt tokens of the request, each prompt counted once.
    #[must_use]
    pub fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(Vec::len).sum()
    }
}
