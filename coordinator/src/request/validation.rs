//! Every rule a generation request must pass, in one place: OpenAI bodies (and the CLI's,
//! which builds the same bodies) in, a [`ValidatedRequest`] and the answer's shape out.

use super::{
    openai::{ChatRequest, CommonFields, CompletionRequest, Content, Prompt, Stop},
    RequestError, RequestLimits, ValidatedRequest,
};
use std::sync::Arc;
use switchyard_model::{structured::Schema, ChatMessage, SamplingParams, Tokenizer};

type Result<T> = std::result::Result<T, RequestError>;

/// Longest stop string in bytes (a stream holds back that much text while it may match).
pub const MAX_STOP_BYTES: usize = 1024;
/// Most `stop_token_ids`.
pub const MAX_STOP_IDS: usize = 64;
/// Most `logit_bias` entries (OpenAI allows 300).
pub const MAX_LOGIT_BIAS: usize = 1024;

/// How the answer is delivered: the API's concern, checked with the rest.
#[derive(Clone, Debug, Default)]
pub struct ResponseShape {
    pub stream: bool,
    /// A last chunk with `usage` (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Completions' `echo`: each prompt's text, put before its choices' text.
    pub echo: Option<Vec<String>>,
}

/// `/v1/completions`: prompt (text, texts, ids or id lists), `max_tokens` (default 16),
/// legacy `logprobs` (0..=20), `echo`; `best_of` and `suffix` are refused.
pub fn completion(
    body: CompletionRequest,
    tok: &Tokenizer,
    limits: &RequestLimits,
) -> Result<(ValidatedRequest, ResponseShape)> {
    check_model(&body.common.model, limits)?;
    if body.best_of.is_some_and(|b| b != 1) {
        return Err(invalid("best_of is not supported", "best_of"));
    }
    if body.suffix.is_some() {
        return Err(invalid("suffix is not supported", "suffix"));
    }
    let logprobs = match body.logprobs {
        Some(l) if !(0..=20).contains(&l) => {
            return Err(invalid("logprobs must be in [0, 20]", "logprobs"))
        }
        l => l.map(|l| l as usize),
    };
    let common = common(&body.common, body.common.max_tokens.or(Some(16)), limits)?;
    let vocab = limits.vocab_size as i64;
    let check_ids = |ids: &[i64]| -> Result<Vec<u32>> {
        ids.iter()
            .map(|&t| {
                (0..vocab).contains(&t).then_some(t as u32).ok_or_else(|| {
                    invalid(
                        format!("prompt token {t} is not in the vocabulary"),
                        "prompt",
                    )
                })
            })
            .collect()
    };
    let enc = |s: &str| {
        tok.encode(s, true)
            .map_err(|e| invalid(e.to_string(), "prompt"))
    };
    let (prompts, texts): (Vec<Vec<u32>>, Vec<String>) = match body.prompt {
        None => return Err(invalid("prompt is required", "prompt")),
        Some(Prompt::Text(s)) => (vec![enc(&s)?], vec![s]),
        Some(Prompt::Texts(v)) if !v.is_empty() => {
            (v.iter().map(|s| enc(s)).collect::<Result<_>>()?, v)
        }
        Some(Prompt::Ids(ids)) if !ids.is_empty() => {
            let ids = check_ids(&ids)?;
            let t = tok.decode(&ids, false).unwrap_or_default();
            (vec![ids], vec![t])
        }
        Some(Prompt::IdLists(l)) if !l.is_empty() && l.iter().all(|x| !x.is_empty()) => {
            let ids = l.iter().map(|x| check_ids(x)).collect::<Result<Vec<_>>>()?;
            let t = ids
                .iter()
                .map(|i| tok.decode(i, false).unwrap_or_default())
                .collect();
            (ids, t)
        }
        Some(_) => return Err(invalid("prompt must not be empty", "prompt")),
    };
    let shape = ResponseShape {
        echo: body.echo.unwrap_or(false).then_some(texts),
        ..common.shape.clone()
    };
    Ok((common.build(prompts, logprobs, limits)?, shape))
}

/// `/v1/chat/completions`: messages through the model's chat template, `max_completion_tokens`
/// (or `max_tokens`), `logprobs` / `top_logprobs`; tools are refused.
pub fn chat(
    body: ChatRequest,
    tok: &Tokenizer,
    limits: &RequestLimits,
) -> Result<(ValidatedRequest, ResponseShape)> {
    check_model(&body.common.model, limits)?;
    if body.tools.is_some() || body.tool_choice.is_some() {
        return Err(invalid("tools are not supported by this model", "tools"));
    }
    let messages = messages(&body)?;
    let top_logprobs = match (body.logprobs, body.top_logprobs) {
        (_, Some(t)) if !(0..=20).contains(&t) => {
            return Err(invalid("top_logprobs must be in [0, 20]", "top_logprobs"))
        }
        (Some(true), t) => Some(t.unwrap_or(0) as usize),
        (_, Some(_)) => {
            return Err(invalid(
                "top_logprobs requires logprobs: true",
                "top_logprobs",
            ))
        }
        _ => None,
    };
    let common = common(
        &body.common,
        body.max_completion_tokens.or(body.common.max_tokens),
        limits,
    )?;
    let text = tok
        .apply_chat_template(&messages, true)
        .map_err(|e| invalid(e.to_string(), "messages"))?;
    // The template already starts with the BOS token.
    let ids = tok
        .encode(&text, false)
        .map_err(|e| invalid(e.to_string(), "messages"))?;
    let shape = common.shape.clone();
    Ok((common.build(vec![ids], top_logprobs, limits)?, shape))
}

/// `switchyard forward --greedy N`: a greedy continuation of `ids` for up to `new_tokens`
/// (at least 1), ending after eos.
pub fn greedy(ids: &[u32], new_tokens: usize, limits: &RequestLimits) -> Result<ValidatedRequest> {
    let body = CommonFields {
        max_tokens: Some(new_tokens.max(1) as i64),
        temperature: Some(0.0),
        ..CommonFields::default()
    };
    token_ids(vec![ids.to_vec()], &body, None, limits)
}

/// Prompts given as token ids, a choice each (`n` each where `common` says), with `common`'s
/// fields (`max_tokens` 16 where absent, as completions) and `logprobs` alternatives: what the
/// CLI's runs and the tests submit, checked like any completion.
pub fn token_ids(
    prompts: Vec<Vec<u32>>,
    common_fields: &CommonFields,
    logprobs: Option<usize>,
    limits: &RequestLimits,
) -> Result<ValidatedRequest> {
    if logprobs.is_some_and(|l| l > 20) {
        return Err(invalid("logprobs must be in [0, 20]", "logprobs"));
    }
    common(common_fields, common_fields.max_tokens.or(Some(16)), limits)?
        .build(prompts, logprobs, limits)
}

/// The fields both endpoints share, checked, waiting for the prompts.
struct Common {
    n: usize,
    /// `None`: as many as fit in the context.
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop_strings: Vec<String>,
    stop_ids: Vec<u32>,
    min_tokens: usize,
    ignore_eos: bool,
    json: Option<Arc<Schema>>,
    shape: ResponseShape,
}

impl Common {
    /// Checks the prompts against the vocabulary and the context and makes the request.
    fn build(
        self,
        prompts: Vec<Vec<u32>>,
        logprobs: Option<usize>,
        limits: &RequestLimits,
    ) -> Result<ValidatedRequest> {
        if prompts.len() > limits.max_prompts {
            return Err(invalid(
                format!("at most {} prompts per request", limits.max_prompts),
                "prompt",
            ));
        }
        let max_len = limits.max_seq_len;
        let mut max_tokens = Vec::with_capacity(prompts.len());
        for p in &prompts {
            // A tokenizer may know more tokens than the model has rows for, or encode to nothing.
            if p.is_empty() {
                return Err(invalid("the prompt encodes to no tokens", "prompt"));
            }
            if let Some(t) = p.iter().find(|&&t| t as usize >= limits.vocab_size) {
                return Err(invalid(
                    format!(
                        "the prompt contains token {t}, outside the vocabulary (size {})",
                        limits.vocab_size
                    ),
                    "prompt",
                ));
            }
            let want = self.max_tokens.unwrap_or(1);
            if p.len() + want > max_len {
                return Err(invalid(
                    format!("the prompt has {} tokens and {want} new tokens were asked for, but the context length is {max_len} tokens", p.len()),
                    if self.max_tokens.is_some() { "max_tokens" } else { "messages" },
                ));
            }
            let max = self.max_tokens.unwrap_or(max_len - p.len());
            if self.min_tokens > max {
                return Err(invalid(
                    format!(
                        "min_tokens {} exceeds the {max} tokens the context leaves after the prompt",
                        self.min_tokens
                    ),
                    "min_tokens",
                ));
            }
            max_tokens.push(max);
        }
        if prompts.is_empty() {
            return Err(invalid("prompt must not be empty", "prompt"));
        }
        Ok(ValidatedRequest {
            prompts,
            max_tokens,
            n: self.n,
            sampling: self.sampling,
            stop_strings: self.stop_strings,
            stop_ids: self.stop_ids,
            min_tokens: self.min_tokens,
            ignore_eos: self.ignore_eos,
            logprobs,
            json: self.json,
        })
    }
}

fn invalid(message: impl Into<String>, param: &'static str) -> RequestError {
    RequestError::invalid(message, Some(param))
}

fn check_model(model: &Option<String>, limits: &RequestLimits) -> Result<()> {
    match model {
        None => Err(invalid("model is required", "model")),
        Some(m) if *m != limits.model_name => Err(RequestError::UnknownModel {
            given: m.clone(),
            served: limits.model_name.clone(),
        }),
        Some(_) => Ok(()),
    }
}

fn int_in(v: Option<i64>, name: &'static str, lo: i64, hi: i64) -> Result<Option<i64>> {
    match v {
        Some(x) if x < lo || x > hi => Err(invalid(
            format!("{name} must be in [{lo}, {hi}], got {x}"),
            name,
        )),
        other => Ok(other),
    }
}

fn float_in(v: Option<f32>, name: &'static str, lo: f32, hi: f32) -> Result<Option<f32>> {
    match v {
        Some(x) if !x.is_finite() || x < lo || x > hi => Err(invalid(
            format!("{name} must be in [{lo}, {hi}], got {x}"),
            name,
        )),
        other => Ok(other),
    }
}

/// `response_format`: None for text, else the schema every choice is held to.
fn response_format(f: &serde_json::Value) -> Result<Option<Schema>> {
    let bad = |m: String| invalid(m, "response_format");
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

fn stop_strings(stop: &Option<Stop>) -> Result<Vec<String>> {
    let strings = match stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if strings.len() > 4 {
        return Err(invalid("at most 4 stop sequences are allowed", "stop"));
    }
    if strings.iter().any(String::is_empty) {
        return Err(invalid("stop sequences must not be empty", "stop"));
    }
    if strings.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(invalid(
            format!("stop sequences may be at most {MAX_STOP_BYTES} bytes"),
            "stop",
        ));
    }
    Ok(strings)
}

fn stop_ids(ids: &Option<Vec<i64>>, vocab: usize) -> Result<Vec<u32>> {
    if ids.as_ref().is_some_and(|v| v.len() > MAX_STOP_IDS) {
        return Err(invalid(
            format!("at most {MAX_STOP_IDS} stop_token_ids are allowed"),
            "stop_token_ids",
        ));
    }
    ids.iter()
        .flatten()
        .map(|&t| {
            u32::try_from(t)
                .ok()
                .filter(|&t| (t as usize) < vocab)
                .ok_or_else(|| {
                    invalid(
                        format!("stop_token_ids: {t} is not a token id"),
                        "stop_token_ids",
                    )
                })
        })
        .collect()
}

fn logit_bias(
    bias: &Option<serde_json::Map<String, serde_json::Value>>,
    vocab: usize,
) -> Result<Vec<(u32, f32)>> {
    if bias.as_ref().is_some_and(|m| m.len() > MAX_LOGIT_BIAS) {
        return Err(invalid(
            format!("logit_bias may list at most {MAX_LOGIT_BIAS} tokens"),
            "logit_bias",
        ));
    }
    bias.iter()
        .flatten()
        .map(|(k, v)| {
            let bad = |m: String| invalid(m, "logit_bias");
            let id = k
                .parse::<u32>()
                .ok()
                .filter(|&t| (t as usize) < vocab)
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
        .collect()
}

fn sampling(c: &CommonFields, limits: &RequestLimits) -> Result<SamplingParams> {
    let temperature = float_in(c.temperature, "temperature", 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = float_in(c.top_p, "top_p", 0.0, 1.0)?.unwrap_or(1.0);
    if top_p == 0.0 {
        return Err(invalid("top_p must be greater than 0", "top_p"));
    }
    let top_k = int_in(c.top_k, "top_k", -1, limits.vocab_size as i64)?
        .unwrap_or(0)
        .max(0) as usize;
    let presence_penalty =
        float_in(c.presence_penalty, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0);
    let frequency_penalty =
        float_in(c.frequency_penalty, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0);
    let repetition_penalty =
        float_in(c.repetition_penalty, "repetition_penalty", 0.01, 10.0)?.unwrap_or(1.0);
    let logit_bias = logit_bias(&c.logit_bias, limits.vocab_size)?;
    let min_p = float_in(c.min_p, "min_p", 0.0, 1.0)?.unwrap_or(0.0);
    let seed = match c.seed {
        Some(s) if s < 0 => return Err(invalid("seed must be non-negative", "seed")),
        s => s.map(|s| s as u64),
    };
    Ok(SamplingParams {
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        presence_penalty,
        frequency_penalty,
        min_p,
        logit_bias,
        seed,
    })
}

/// Checks every shared field; `max_tokens` may come from elsewhere (chat's
/// `max_completion_tokens`).
fn common(c: &CommonFields, max_tokens: Option<i64>, limits: &RequestLimits) -> Result<Common> {
    let n = int_in(c.n, "n", 1, limits.max_n as i64)?.unwrap_or(1) as usize;
    let max_tokens = match max_tokens {
        Some(m) if m > limits.max_seq_len as i64 => {
            return Err(invalid(
                format!(
                    "max_tokens {m} exceeds the context length {}",
                    limits.max_seq_len
                ),
                "max_tokens",
            ))
        }
        m => int_in(m, "max_tokens", 1, limits.max_seq_len as i64)?.map(|v| v as usize),
    };
    let sampling = sampling(c, limits)?;
    let stop_strings = stop_strings(&c.stop)?;
    let stop_ids = stop_ids(&c.stop_token_ids, limits.vocab_size)?;
    let json = c
        .response_format
        .as_ref()
        .map(response_format)
        .transpose()?
        .flatten()
        .map(Arc::new);
    let min_tokens =
        int_in(c.min_tokens, "min_tokens", 0, limits.max_seq_len as i64)?.unwrap_or(0) as usize;
    if max_tokens.is_some_and(|m| min_tokens > m) {
        return Err(invalid(
            "min_tokens must not exceed max_tokens",
            "min_tokens",
        ));
    }
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(invalid(
            "stream_options is only allowed with stream: true",
            "stream_options",
        ));
    }
    Ok(Common {
        n,
        max_tokens,
        sampling,
        stop_strings,
        stop_ids,
        min_tokens,
        ignore_eos: c.ignore_eos.unwrap_or(false),
        json,
        shape: ResponseShape {
            stream,
            include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
            echo: None,
        },
    })
}

/// The messages as the chat template wants them, checked.
fn messages(body: &ChatRequest) -> Result<Vec<ChatMessage>> {
    let msgs = body
        .messages
        .as_ref()
        .ok_or_else(|| invalid("messages is required", "messages"))?;
    if msgs.is_empty() {
        return Err(invalid("messages must not be empty", "messages"));
    }
    msgs.iter()
        .map(|m| {
            if !["system", "user", "assistant"].contains(&m.role.as_str()) {
                return Err(invalid(
                    format!("invalid role {:?} (system, user or assistant)", m.role),
                    "messages",
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
                                return Err(invalid(
                                    format!(
                                        "content part of type {k:?} is not supported (text only)"
                                    ),
                                    "messages",
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

#[cfg(test)]
mod tests;
