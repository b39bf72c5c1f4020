//! `/v1/completions` and `/v1/chat/completions`: validate, submit one sequence per choice, and
//! answer as one JSON body or as server-sent events.

use super::{
    error::ApiError,
    text::ChoiceText,
    types::{ChatRequest, CompletionRequest, Prompt, Validated},
    AppState,
};
use crate::{
    engine::FinishReason,
    scheduler::{SeqEvent, SeqFailure, SeqRequest, SubmitError},
};
use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, State},
    response::{sse::Event, IntoResponse, Response, Sse},
    Json,
};
use serde_json::{json, Value};
use std::sync::{
    atomic::{AtomicBool, AtomicUsize},
    Arc,
};
use switchyard_model::structured::JsonConstraint;
use tokio::sync::mpsc;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// Parses a JSON body into `T`, with OpenAI-shaped errors for every way it can be wrong.
fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) => ApiError::too_large(limit),
        other => ApiError::invalid(other.body_text(), None),
    })?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("body is not valid JSON: {e}"), None))?;
    if !v.is_object() {
        return Err(ApiError::invalid("body must be a JSON object", None));
    }
    serde_json::from_value(v).map_err(|e| ApiError::invalid(format!("invalid request: {e}"), None))
}

fn check_model(state: &AppState, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        None => Err(ApiError::invalid("model is required", Some("model"))),
        Some(m) if *m != state.model_name => Err(ApiError::unknown_model(m, &state.model_name)),
        Some(_) => Ok(()),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    use rand::Rng;
    format!("{prefix}-{:016x}", rand::rng().random::<u64>())
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(body, state.max_body_bytes)?;
    check_model(&state, &req.common.model)?;
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid(
            "best_of is not supported",
            Some("best_of"),
        ));
    }
    if req.suffix.is_some() {
        return Err(ApiError::invalid("suffix is not supported", Some("suffix")));
    }
    let top = super::types::Limits::clone(&state.limits);
    let logprobs = match req.logprobs {
        Some(l) if !(0..=20).contains(&l) => {
            return Err(ApiError::invalid(
                "logprobs must be in [0, 20]",
                Some("logprobs"),
            ))
        }
        l => l.map(|l| l as usize),
    };
    let v = req
        .common
        .validate(req.common.max_tokens.or(Some(16)), &top)?;
    let tok = state.engine.tokenizer();
    let vocab = state.limits.vocab_size as i64;
    let check_ids = |ids: &[i64]| -> Result<Vec<u32>, ApiError> {
        ids.iter()
            .map(|&t| {
                if (0..vocab).contains(&t) {
                    Ok(t as u32)
                } else {
                    Err(ApiError::invalid(
                        format!("prompt token {t} is not in the vocabulary"),
                        Some("prompt"),
                    ))
                }
            })
            .collect()
    };
    let enc = |s: &str| {
        tok.encode(s, true)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))
    };
    let (prompts, texts): (Vec<Vec<u32>>, Vec<String>) = match req.prompt {
        None => return Err(ApiError::invalid("prompt is required", Some("prompt"))),
        Some(Prompt::Text(s)) => (vec![enc(&s)?], vec![s]),
        Some(Prompt::Texts(v)) if !v.is_empty() => {
            (v.iter().map(|s| enc(s)).collect::<Result<_, _>>()?, v)
        }
        Some(Prompt::Ids(ids)) if !ids.is_empty() => {
            let ids = check_ids(&ids)?;
            let t = tok.decode(&ids, false).unwrap_or_default();
            (vec![ids], vec![t])
        }
        Some(Prompt::IdLists(l)) if !l.is_empty() && l.iter().all(|x| !x.is_empty()) => {
            let ids = l
                .iter()
                .map(|x| check_ids(x))
                .collect::<Result<Vec<_>, _>>()?;
            let t = ids
                .iter()
                .map(|i| tok.decode(i, false).unwrap_or_default())
                .collect();
            (ids, t)
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "prompt must not be empty",
                Some("prompt"),
            ))
        }
    };
    let echo = req.echo.unwrap_or(false).then_some(texts);
    run(state, Kind::Completion, prompts, v, logprobs, echo).await
}

pub async fn chat(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(body, state.max_body_bytes)?;
    check_model(&state, &req.common.model)?;
    if req.tools.is_some() || req.tool_choice.is_some() {
        return Err(ApiError::invalid(
            "tools are not supported by this model",
            Some("tools"),
        ));
    }
    let messages = req.messages()?;
    let top_logprobs = match (req.logprobs, req.top_logprobs) {
        (_, Some(t)) if !(0..=20).contains(&t) => {
            return Err(ApiError::invalid(
                "top_logprobs must be in [0, 20]",
                Some("top_logprobs"),
            ))
        }
        (Some(true), t) => Some(t.unwrap_or(0) as usize),
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs requires logprobs: true",
                Some("top_logprobs"),
            ))
        }
        _ => None,
    };
    let v = req.common.validate(
        req.max_completion_tokens.or(req.common.max_tokens),
        &state.limits,
    )?;
    let tok = state.engine.tokenizer();
    let text = tok
        .apply_chat_template(&messages, true)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    // The template already starts with the BOS token.
    let ids = tok
        .encode(&text, false)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    run(state, Kind::Chat, vec![ids], v, top_logprobs, None).await
}

/// One submitted choice.
struct Choice {
    prompt: usize,
    cancel: Arc<AtomicBool>,
    /// Its prompt tokens found in the prefix cache, set when it starts.
    cached: Arc<AtomicUsize>,
}

/// The response's `usage`: each prompt counts once however many choices it has, and its cached
/// tokens are those of its choice that found the most.
fn usage(choices: &[Choice], prompt_tokens: usize, completion_tokens: usize) -> Value {
    let mut cached = std::collections::BTreeMap::<usize, usize>::new();
    for c in choices {
        let n = c.cached.load(std::sync::atomic::Ordering::Relaxed);
        let e = cached.entry(c.prompt).or_default();
        *e = (*e).max(n);
    }
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached.values().sum::<usize>()}})
}

async fn run(
    state: Arc<AppState>,
    kind: Kind,
    prompts: Vec<Vec<u32>>,
    v: Validated,
    logprobs: Option<usize>,
    echo: Option<Vec<String>>,
) -> Result<Response, ApiError> {
    let max_len = state.limits.max_seq_len;
    for p in &prompts {
        // A tokenizer may know more tokens than the model has rows for, or encode to nothing.
        if p.is_empty() {
            return Err(ApiError::invalid(
                "the prompt encodes to no tokens",
                Some("prompt"),
            ));
        }
        if let Some(t) = p.iter().find(|&&t| t as usize >= state.limits.vocab_size) {
            return Err(ApiError::invalid(
                format!(
                    "the prompt contains token {t}, outside the model's vocabulary of {}",
                    state.limits.vocab_size
                ),
                Some("prompt"),
            ));
        }
        let want = v.max_tokens.unwrap_or(1);
        if p.len() + want > max_len {
            return Err(ApiError::invalid(
                format!("the prompt has {} tokens and {} new tokens were asked for, but the context is {max_len} tokens", p.len(), want),
                Some(if v.max_tokens.is_some() { "max_tokens" } else { "messages" }),
            ));
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let mut choices = Vec::new();
    for (pi, p) in prompts.iter().enumerate() {
        for i in 0..v.n {
            let index = choices.len();
            let cancel = Arc::new(AtomicBool::new(false));
            let cached = Arc::new(AtomicUsize::new(0));
            let mut sampling = v.sampling.clone();
            // Distinct but reproducible choices under one seed.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            let req = SeqRequest {
                prompt: p.clone(),
                max_tokens: v.max_tokens.unwrap_or(max_len - p.len()),
                sampling,
                stop_ids: v.stop_ids.clone(),
                min_tokens: v.min_tokens,
                json: v.json.clone().map(JsonConstraint::new),
                ignore_eos: v.ignore_eos,
                logprobs,
                index,
                events: tx.clone(),
                cancel: cancel.clone(),
                cached_tokens: cached.clone(),
            };
            state.scheduler.submit(req).map_err(|e| match e {
                SubmitError::QueueFull => ApiError::queue_full(),
                SubmitError::Stopped => ApiError::unavailable("the engine is shutting down"),
                SubmitError::Invalid(m) => ApiError::invalid(m, None),
            })?;
            choices.push(Choice {
                prompt: pi,
                cancel,
                cached,
            });
        }
    }
    drop(tx);
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let id = request_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    metrics::counter!("switchyard_requests_total", "endpoint" => if kind == Kind::Chat { "chat" } else { "completions" }).increment(1);
    if v.stream {
        Ok(stream(
            state,
            kind,
            id,
            choices,
            rx,
            v,
            logprobs,
            echo,
            prompt_tokens,
        )
        .into_response())
    } else {
        collect(
            state,
            kind,
            id,
            choices,
            rx,
            &v,
            logprobs,
            echo,
            prompt_tokens,
        )
        .await
    }
}

fn finish_str(f: Option<FinishReason>) -> Value {
    match f {
        Some(FinishReason::Stop) => json!("stop"),
        Some(FinishReason::Length) => json!("length"),
        None => Value::Null,
    }
}

fn failure_error(f: &SeqFailure) -> ApiError {
    match f {
        SeqFailure::Unavailable(m) => ApiError::unavailable(m.clone()),
        SeqFailure::Internal(m) => ApiError::internal(m),
    }
}

fn logprobs_json(kind: Kind, c: &ChoiceText<'_>, from: usize, offset0: usize) -> Value {
    let entries = &c.logprobs[from..];
    match kind {
        Kind::Chat => json!({"content": entries.iter().map(|e| json!({
            "token": e.text, "logprob": e.logprob, "bytes": e.text.as_bytes(),
            "top_logprobs": e.top.iter().map(|(t, l)| json!({"token": t, "logprob": l, "bytes": t.as_bytes()})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()}),
        Kind::Completion => {
            let mut offset = offset0;
            let mut offsets = Vec::new();
            for e in entries {
                offsets.push(offset);
                offset += e.text.len();
            }
            json!({
                "tokens": entries.iter().map(|e| &e.text).collect::<Vec<_>>(),
                "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
                "top_logprobs": entries.iter().map(|e| e.top.iter().map(|(t, l)| (t.clone(), json!(l))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn collect(
    state: Arc<AppState>,
    kind: Kind,
    id: String,
    choices: Vec<Choice>,
    mut rx: mpsc::UnboundedReceiver<(usize, SeqEvent)>,
    v: &Validated,
    logprobs: Option<usize>,
    echo: Option<Vec<String>>,
    prompt_tokens: usize,
) -> Result<Response, ApiError> {
    let tok = state.engine.tokenizer();
    let mut texts: Vec<ChoiceText<'_>> = choices
        .iter()
        .map(|_| ChoiceText::new(tok, &v.stop_strings))
        .collect();
    let mut open = choices.len();
    while open > 0 {
        let Some((i, ev)) = rx.recv().await else {
            break;
        };
        let c = &mut texts[i];
        if c.finish.is_some() {
            continue;
        }
        match ev {
            SeqEvent::Token { id, logprob, top } => {
                if c.push(id, logprob.map(|lp| (lp, top.as_slice()))) {
                    choices[i]
                        .cancel
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    open -= 1;
                }
            }
            SeqEvent::Finished { reason, .. } => {
                c.finish = Some(reason);
                open -= 1;
            }
            SeqEvent::Failed(f) => return Err(failure_error(&f)),
        }
    }
    let completion_tokens: usize = texts.iter().map(|c| c.completion_tokens).sum();
    let out: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let lp = logprobs.map(|_| logprobs_json(kind, c, 0, 0));
            match kind {
                Kind::Chat => {
                    json!({"index": i, "message": {"role": "assistant", "content": c.text},
                                     "logprobs": lp, "finish_reason": finish_str(c.finish)})
                }
                Kind::Completion => {
                    let prefix = echo
                        .as_ref()
                        .map(|e| e[choices[i].prompt].as_str())
                        .unwrap_or("");
                    json!({"index": i, "text": format!("{prefix}{}", c.text), "logprobs": lp,
                           "finish_reason": finish_str(c.finish)})
                }
            }
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": now_secs(),
        "model": state.model_name,
        "choices": out,
        "usage": usage(&choices, prompt_tokens, completion_tokens),
    }))
    .into_response())
}

#[allow(clippy::too_many_arguments)]
fn stream(
    state: Arc<AppState>,
    kind: Kind,
    id: String,
    choices: Vec<Choice>,
    mut rx: mpsc::UnboundedReceiver<(usize, SeqEvent)>,
    v: Validated,
    logprobs: Option<usize>,
    echo: Option<Vec<String>>,
    prompt_tokens: usize,
) -> impl IntoResponse {
    // A bounded channel to the HTTP body: when the client goes away the body is dropped, the
    // send below fails, this task ends and drops `rx`, and the engine cancels the sequences.
    let (out, body) = mpsc::channel::<Result<Event, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let tok = state.engine.tokenizer();
        let created = now_secs();
        let object = if kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = |choice: Value| {
            Event::default().data(json!({"id": id, "object": object, "created": created, "model": state.model_name, "choices": [choice]}).to_string())
        };
        let mut texts: Vec<ChoiceText<'_>> = choices
            .iter()
            .map(|_| ChoiceText::new(tok, &v.stop_strings))
            .collect();
        let mut lp_sent = vec![0usize; choices.len()];
        let mut text_sent = vec![0usize; choices.len()];
        // Opening chunks: the assistant role (chat) or the echoed prompt (completions).
        for (i, c) in choices.iter().enumerate() {
            let first = match kind {
                Kind::Chat => Some(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})),
                Kind::Completion => echo.as_ref().map(|e| json!({"index": i, "text": e[c.prompt], "logprobs": null, "finish_reason": null})),
            };
            if let Some(f) = first {
                if out.send(Ok(chunk(f))).await.is_err() {
                    return;
                }
            }
        }
        let mut open = choices.len();
        while open > 0 {
            let Some((i, ev)) = rx.recv().await else {
                break;
            };
            if texts[i].finish.is_some() {
                continue;
            }
            let done = match ev {
                SeqEvent::Token { id, logprob, top } => {
                    let stop = texts[i].push(id, logprob.map(|lp| (lp, top.as_slice())));
                    if stop {
                        choices[i]
                            .cancel
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    stop
                }
                SeqEvent::Finished { reason, .. } => {
                    texts[i].finish = Some(reason);
                    true
                }
                SeqEvent::Failed(f) => {
                    let _ = out
                        .send(Ok(
                            Event::default().data(failure_error(&f).body().to_string())
                        ))
                        .await;
                    return;
                }
            };
            let c = &mut texts[i];
            let piece = c.ready(done);
            let lp = logprobs.map(|_| {
                let j = logprobs_json(kind, c, lp_sent[i], text_sent[i]);
                lp_sent[i] = c.logprobs.len();
                j
            });
            text_sent[i] += piece.len();
            let fin = if done {
                finish_str(c.finish)
            } else {
                Value::Null
            };
            if !piece.is_empty() || done || lp.is_some() {
                let body = match kind {
                    Kind::Chat => {
                        json!({"index": i, "delta": if piece.is_empty() && done { json!({}) } else { json!({"content": piece}) }, "logprobs": lp, "finish_reason": fin})
                    }
                    Kind::Completion => {
                        json!({"index": i, "text": piece, "logprobs": lp, "finish_reason": fin})
                    }
                };
                if out.send(Ok(chunk(body))).await.is_err() {
                    return;
                }
            }
            if done {
                open -= 1;
            }
        }
        if v.include_usage {
            let completion_tokens: usize = texts.iter().map(|c| c.completion_tokens).sum();
            let usage = json!({"id": id, "object": object, "created": created, "model": state.model_name, "choices": [],
                               "usage": usage(&choices, prompt_tokens, completion_tokens)});
            let _ = out.send(Ok(Event::default().data(usage.to_string()))).await;
        }
        let _ = out.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(body))
}
