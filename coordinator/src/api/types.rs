//! OpenAI request bodies, and their validation into what the scheduler accepts.

use super::error::ApiError;
use serde::Deserialize;
use switchyard_model::{structured::Schema, ChatMessage, SamplingParams};

/// `prompt`: a string, several strings, token ids, or several lists of ids.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<i64>),
    IdLists(Vec<Vec<i64>>),
}

/// `stop`: one string or up to four.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields common to both endpoints (OpenAI's, plus vLLM's top_k, repetition_penalty,
/// stop_token_ids and ignore_eos).
#[derive(Deserialize, Debug, Default)]
pub struct CommonFields {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    pub min_p: Option<f32>,
    pub min_tokens: Option<i64>,
    /// `{"type": "text"}` or `{"type": "json_object"}` (chat in OpenAI's API; completions too,
    /// as vLLM).
    pub response_format: Option<serde_json::Value>,
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: CommonFields,
    pub prompt: Option<Prompt>,
    /// Legacy completions: number of top log-probabilities per token (0..=20).
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
}

/// Message content: a string or a list of `{"type": "text", "text": ...}` parts.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: CommonFields,
    pub messages: Option<Vec<ChatMessageIn>>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
}

/// Limits validation needs.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_n: usize,
    pub max_seq_len: usize,
    pub vocab_size: usize,
}

/// Everything a generation needs, checked.
#[derive(Debug)]
pub struct Validated {
    pub n: usize,
    /// `None`: as many as fit in the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop_strings: Vec<String>,
    pub stop_ids: Vec<u32>,
    /// Tokens generated before eos or a stop token id may end the choice.
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// Constrain each choice to JSON this schema allows (`response_format`: `json_object` is
    /// any object).
    pub json: Option<std::sync::Arc<Schema>>,
}

fn int_in(v: Option<i64>, name: &'static str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    match v {
        Some(x) if x < lo || x > hi => Err(ApiError::invalid(
            format!("{name} must be in [{lo}, {hi}], got {x}"),
            Some(name),
        )),
        other => Ok(other),
    }
}

fn float_in(v: Option<f32>, name: &'static str, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
    match v {
        Some(x) if !x.is_finite() || x < lo || x > hi => Err(ApiError::invalid(
            format!("{name} must be in [{lo}, {hi}], got {x}"),
            Some(name),
        )),
        other => Ok(other),
    }
}

/// `response_format`: None for text, else the schema every choice is held to.
fn response_format(f: &serde_json::Value) -> Result<Option<Schema>, ApiError> {
    let bad = |m: String| ApiError::invalid(m, Some("response_format"));
    match f.get("type").and_then(serde_json::Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Schema::any_object())),
        Some("json_schema") => {
            let schema = f
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(
                    || bad("response_format json_schema needs json_schema.schema".into()),
                )?;
            Schema::compile(schema)
                .map(Some)
                .map_err(|e| bad(format!("response_format json_schema: {e}")))
        }
        other => Err(bad(format!(
            "response_format type {} is not supported (text, json_object or json_schema)",
            other.map_or("missing".into(), |t| format!("{t:?}"))
        ))),
    }
}

impl CommonFields {
    /// Checks every field; `max_tokens` may come from elsewhere (chat's max_completion_tokens).
    pub fn validate(
        &self,
        max_tokens: Option<i64>,
        limits: &Limits,
    ) -> Result<Validated, ApiError> {
        let n = int_in(self.n, "n", 1, limits.max_n as i64)?.unwrap_or(1) as usize;
        let max_tokens =
            int_in(max_tokens, "max_tokens", 1, limits.max_seq_len as i64)?.map(|v| v as usize);
        let temperature = float_in(self.temperature, "temperature", 0.0, 2.0)?.unwrap_or(1.0);
        let top_p = float_in(self.top_p, "top_p", 0.0, 1.0)?.unwrap_or(1.0);
        if top_p == 0.0 {
            return Err(ApiError::invalid(
                "top_p must be greater than 0",
                Some("top_p"),
            ));
        }
        let top_k = int_in(self.top_k, "top_k", -1, limits.vocab_size as i64)?
            .unwrap_or(0)
            .max(0) as usize;
        let presence =
            float_in(self.presence_penalty, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0);
        let frequency =
            float_in(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0);
        let repetition =
            float_in(self.repetition_penalty, "repetition_penalty", 0.01, 10.0)?.unwrap_or(1.0);
        let stop_strings = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop_strings.len() > 4 {
            return Err(ApiError::invalid(
                "at most 4 stop sequences are allowed",
                Some("stop"),
            ));
        }
        if stop_strings.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop sequences must not be empty",
                Some("stop"),
            ));
        }
        let stop_ids = self
            .stop_token_ids
            .iter()
            .flatten()
            .map(|&t| {
                u32::try_from(t)
                    .ok()
                    .filter(|&t| (t as usize) < limits.vocab_size)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!("stop_token_ids: {t} is not a token id"),
                            Some("stop_token_ids"),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let logit_bias = self
            .logit_bias
            .iter()
            .flatten()
            .map(|(k, v)| {
                let bad = |m: String| ApiError::invalid(m, Some("logit_bias"));
                let id = k
                    .parse::<u32>()
                    .ok()
                    .filter(|&t| (t as usize) < limits.vocab_size)
                    .ok_or_else(|| bad(format!("logit_bias: {k:?} is not a token id")))?;
                let b = v
                    .as_f64()
                    .filter(|b| (-100.0..=100.0).contains(b))
                    .ok_or_else(|| {
                        bad(format!(
                            "logit_bias: the bias of token {k} must be a number in [-100, 100], got {v}"
                        ))
                    })?;
                Ok((id, b as f32))
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let min_p = float_in(self.min_p, "min_p", 0.0, 1.0)?.unwrap_or(0.0);
        let json = self
            .response_format
            .as_ref()
            .map(response_format)
            .transpose()?
            .flatten()
            .map(std::sync::Arc::new);
        let min_tokens = int_in(self.min_tokens, "min_tokens", 0, limits.max_seq_len as i64)?
            .unwrap_or(0) as usize;
        if max_tokens.is_some_and(|m| min_tokens > m) {
            return Err(ApiError::invalid(
                "min_tokens must not exceed max_tokens",
                Some("min_tokens"),
            ));
        }
        let seed = match self.seed {
            Some(s) if s < 0 => {
                return Err(ApiError::invalid("seed must be non-negative", Some("seed")))
            }
            s => s.map(|s| s as u64),
        };
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::invalid(
                "stream_options is only allowed with stream: true",
                Some("stream_options"),
            ));
        }
        Ok(Validated {
            n,
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p,
                repetition_penalty: repetition,
                presence_penalty: presence,
                frequency_penalty: frequency,
                min_p,
                logit_bias,
                seed,
            },
            stop_strings,
            stop_ids,
            min_tokens,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            json,
        })
    }
}

impl ChatRequest {
    /// The messages as the chat template wants them, checked.
    pub fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        let msgs = self
            .messages
            .as_ref()
            .ok_or_else(|| ApiError::invalid("messages is required", Some("messages")))?;
        if msgs.is_empty() {
            return Err(ApiError::invalid(
                "messages must not be empty",
                Some("messages"),
            ));
        }
        msgs.iter()
            .map(|m| {
                if !["system", "user", "assistant"].contains(&m.role.as_str()) {
                    return Err(ApiError::invalid(
                        format!("invalid role {:?} (system, user or assistant)", m.role),
                        Some("messages"),
                    ));
                }
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut s = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => s.push_str(t),
                                (k, _) => {
                                    return Err(ApiError::invalid(
                                        format!(
                                        "content part of type {k:?} is not supported (text only)"
                                    ),
                                        Some("messages"),
                                    ))
                                }
                            }
                        }
                        s
                    }
                };
                Ok(ChatMessage {
                    role: m.role.clone(),
                    content,
                })
            })
            .collect()
    }
}
