//! OpenAI's response bodies as typed structs, after OpenAI's published OpenAPI schema: every
//! field it marks required is present, `null` where there is no value (`message.refusal`,
//! `logprobs`, a running chunk's `finish_reason`).

use crate::scheduler::FinishReason;
use serde::Serialize;

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedTokens {
    pub cached_tokens: usize,
}

/// `usage`.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: CachedTokens,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: CachedTokens { cached_tokens },
        }
    }
}

/// `/v1/completions`' body and its stream's chunks (`object` says which).
#[derive(Serialize, Debug)]
pub struct Completion<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A choice of `/v1/completions`, whole or as a chunk.
#[derive(Serialize, Debug)]
pub struct TextChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<TextLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// Legacy completions' logprobs.
#[derive(Serialize, Debug, Default)]
pub struct TextLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    pub text_offset: Vec<usize>,
}

/// A choice of `/v1/chat/completions`.
#[derive(Serialize, Debug)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Serialize, Debug)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
    /// This server never refuses through the model.
    pub refusal: Option<String>,
}

/// A chunk's choice of a chat stream.
#[derive(Serialize, Debug)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Serialize, Debug, Default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// Chat's logprobs.
#[derive(Serialize, Debug, Default)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
    pub refusal: Option<Vec<ChatTokenLogprob>>,
}

#[derive(Serialize, Debug)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Serialize, Debug)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// `/v1/models`.
#[derive(Serialize, Debug)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Serialize, Debug)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_fields_are_present_and_null_where_empty() {
        let c = Completion {
            id: "chatcmpl-1".into(),
            object: "chat.completion",
            created: 1,
            model: "m".into(),
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessageOut {
                    role: "assistant",
                    content: "hi".into(),
                    refusal: None,
                },
                logprobs: None,
                finish_reason: Some(FinishReason::Stop),
            }],
            usage: Some(Usage::new(3, 1, 0)),
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v["choices"][0]["message"]["refusal"],
            serde_json::Value::Null
        );
        assert_eq!(v["choices"][0]["logprobs"], serde_json::Value::Null);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["total_tokens"], 4);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        let chunk = ChatChunkChoice {
            index: 0,
            delta: Delta::default(),
            logprobs: None,
            finish_reason: None,
        };
        let v = serde_json::to_value(&chunk).unwrap();
        assert_eq!(v["delta"], serde_json::json!({}));
        assert!(v.as_object().unwrap().contains_key("finish_reason"));
    }
}
