//! OpenAI's request bodies as they arrive (serde types, nothing checked beyond JSON shape).
//! `switchyard generate` builds the same bodies, so the CLI and the API share every rule of
//! [`super::validation`].

use serde::Deserialize;

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

#[derive(Deserialize, Debug, Default)]
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

#[derive(Deserialize, Debug, Default)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Deserialize, Debug, Default)]
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
