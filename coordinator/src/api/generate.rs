//! `/v1/completions` and `/v1/chat/completions`: parse the body, validate it
//! (`crate::request::validation`), submit, and answer as one JSON body or as server-sent events.

use super::{
    error::ApiError,
    responses::{
        ChatChoice, ChatChunkChoice, ChatLogprobs, ChatMessageOut, ChatTokenLogprob, Completion,
        Delta, TextChoice, TextLogprobs, TopLogprob, Usage,
    },
    AppState,
};
use crate::{
    request::{
        openai::{ChatRequest, CompletionRequest},
        validation::{self, ResponseShape},
        ValidatedRequest,
    },
    scheduler::RequestStream,
    text::{ChoiceText, RequestText, Update},
};
use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, State},
    response::{sse::Event, IntoResponse, Response, Sse},
    Json,
};
use serde::Serialize;
use std::sync::Arc;
use tokio::sync::mpsc;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

impl Kind {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }
}

/// Parses a JSON body into `T`, with OpenAI-shaped errors for every way it can be wrong.
pub(super) fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) => ApiError::too_large(limit),
        other => ApiError::invalid(other.body_text(), None),
    })?;
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("body is not valid JSON: {e}"), None))?;
    if !v.is_object() {
        return Err(ApiError::invalid("body must be a JSON object", None));
    }
    serde_json::from_value(v).map_err(|e| ApiError::invalid(format!("invalid request: {e}"), None))
}

/// Runs `f` (JSON parsing, templating, tokenizing: up to a 4 MiB body's worth) on the blocking
/// pool, so that a large request never stalls the runtime that serves every other connection.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let span = tracing::debug_span!("validate");
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| ApiError::internal(&format!("request parsing stopped: {e}")))?
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

/// The request's span: a trace's root, or the caller's span where its `traceparent` header
/// names one.
fn request_span(endpoint: &'static str, headers: &axum::http::HeaderMap) -> tracing::Span {
    let span = tracing::info_span!("request", endpoint, otel.kind = "server");
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        switchyard_wire::trace::continue_trace(&span, tp);
    }
    span
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let span = request_span("completions", &headers);
    tracing::Instrument::instrument(completions_in(state, body), span).await
}

async fn completions_in(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let st = state.clone();
    let (req, shape) = off_runtime(move || {
        let body: CompletionRequest = parse(body, st.max_body_bytes)?;
        Ok(validation::completion(
            body,
            st.engine.tokenizer(),
            &st.limits,
        )?)
    })
    .await?;
    run(state, Kind::Completion, req, shape).await
}

pub async fn chat(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let span = request_span("chat", &headers);
    tracing::Instrument::instrument(chat_in(state, body), span).await
}

async fn chat_in(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let st = state.clone();
    let (req, shape) = off_runtime(move || {
        let body: ChatRequest = parse(body, st.max_body_bytes)?;
        Ok(validation::chat(body, st.engine.tokenizer(), &st.limits)?)
    })
    .await?;
    run(state, Kind::Chat, req, shape).await
}

/// One answer under way: what every chunk or the whole body repeats.
struct Answer {
    state: Arc<AppState>,
    kind: Kind,
    id: String,
    created: u64,
    req: ValidatedRequest,
    shape: ResponseShape,
}

async fn run(
    state: Arc<AppState>,
    kind: Kind,
    req: ValidatedRequest,
    shape: ResponseShape,
) -> Result<Response, ApiError> {
    let stream = state.scheduler.submit(&req)?;
    let endpoint = if kind == Kind::Chat {
        "chat"
    } else {
        "completions"
    };
    metrics::counter!("switchyard_requests_total", "endpoint" => endpoint).increment(1);
    let a = Answer {
        state,
        kind,
        id: request_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: now_secs(),
        req,
        shape,
    };
    let limit = a.state.request_timeout;
    Ok(if a.shape.stream {
        a.stream(stream).into_response()
    } else {
        // Past the limit the answer is dropped, and with it the stream: its choices cancel.
        match tokio::time::timeout(limit, a.collect(stream)).await {
            Ok(r) => r,
            Err(_) => ApiError::timeout(limit).into_response(),
        }
    })
}

impl Answer {
    fn usage(&self, text: &RequestText<'_>) -> Usage {
        Usage::new(
            self.req.prompt_tokens(),
            text.completion_tokens(),
            text.cached_tokens(),
        )
    }

    fn body<C: Serialize>(
        &self,
        choices: Vec<C>,
        usage: Option<Usage>,
        chunk: bool,
    ) -> Completion<C> {
        Completion {
            id: self.id.clone(),
            object: self.kind.object(chunk),
            created: self.created,
            model: self.state.limits.model_name.clone(),
            choices,
            usage,
        }
    }

    fn echo(&self, index: usize) -> &str {
        self.shape
            .echo
            .as_ref()
            .map_or("", |e| e[index / self.req.n()].as_str())
    }

    /// The whole answer as one JSON body.
    async fn collect(self, mut stream: RequestStream) -> Response {
        let tok = self.state.engine.tokenizer();
        let mut text = RequestText::new(tok, &self.req);
        while text.is_open() {
            let Some((i, ev)) = stream.recv().await else {
                // The engine dropped the request without finishing it (it stopped or
                // panicked): never a success.
                return ended_early().into_response();
            };
            if let Update::Failed(f) = text.apply(i, ev, &stream) {
                return ApiError::from(f).into_response();
            }
        }
        let usage = Some(self.usage(&text));
        let want_lp = self.req.logprobs().is_some();
        let choices = text.choices.iter().enumerate();
        match self.kind {
            Kind::Chat => Json(
                self.body(
                    choices
                        .map(|(index, c)| ChatChoice {
                            index,
                            message: ChatMessageOut {
                                role: "assistant",
                                content: c.text.clone(),
                                refusal: None,
                            },
                            logprobs: want_lp.then(|| chat_logprobs(c, 0)),
                            finish_reason: c.finish,
                        })
                        .collect(),
                    usage,
                    false,
                ),
            )
            .into_response(),
            Kind::Completion => Json(
                self.body(
                    choices
                        .map(|(index, c)| TextChoice {
                            index,
                            text: format!("{}{}", self.echo(index), c.text),
                            logprobs: want_lp.then(|| text_logprobs(c, 0, 0)),
                            finish_reason: c.finish,
                        })
                        .collect(),
                    usage,
                    false,
                ),
            )
            .into_response(),
        }
    }

    fn chunk<C: Serialize>(&self, choice: C) -> Event {
        event(&self.body(vec![choice], None, true))
    }

    /// The chunk that opens choice `index`: the assistant role (chat) or the echoed prompt.
    fn opening(&self, index: usize) -> Option<Event> {
        match self.kind {
            Kind::Chat => Some(self.chunk(ChatChunkChoice {
                index,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                logprobs: None,
                finish_reason: None,
            })),
            Kind::Completion => self.shape.echo.as_ref().map(|_| {
                self.chunk(TextChoice {
                    index,
                    text: self.echo(index).to_string(),
                    logprobs: None,
                    finish_reason: None,
                })
            }),
        }
    }

    /// The chunk of choice `c`'s new text (`piece`) and logprobs from entry `lp_from`.
    fn delta(
        &self,
        index: usize,
        c: &ChoiceText<'_>,
        piece: String,
        done: bool,
        lp_from: usize,
        text_from: usize,
    ) -> Event {
        let finish_reason = if done { c.finish } else { None };
        let want_lp = self.req.logprobs().is_some();
        match self.kind {
            Kind::Chat => self.chunk(ChatChunkChoice {
                index,
                delta: Delta {
                    role: None,
                    content: (!piece.is_empty() || !done).then_some(piece),
                },
                logprobs: want_lp.then(|| chat_logprobs(c, lp_from)),
                finish_reason,
            }),
            Kind::Completion => self.chunk(TextChoice {
                index,
                text: piece,
                logprobs: want_lp.then(|| text_logprobs(c, lp_from, text_from)),
                finish_reason,
            }),
        }
    }

    /// Sends choice `i`'s new text and logprobs, if any; false once the client went away.
    async fn send_delta(
        &self,
        out: &mpsc::Sender<Result<Event, std::convert::Infallible>>,
        text: &mut RequestText<'_>,
        i: usize,
        done: bool,
        sent: &mut [(usize, usize)],
    ) -> bool {
        let c = &mut text.choices[i];
        let piece = c.ready(done);
        let want_lp = self.req.logprobs().is_some();
        if piece.is_empty() && !done && !want_lp {
            return true;
        }
        let (lp_from, text_from) = sent[i];
        sent[i] = (c.logprobs.len(), text_from + piece.len());
        let e = self.delta(i, c, piece, done, lp_from, text_from);
        out.send(Ok(e)).await.is_ok()
    }

    /// The answer as server-sent events.
    fn stream(self, mut stream: RequestStream) -> impl IntoResponse {
        // A bounded channel to the HTTP body: when the client goes away the body is dropped, the
        // send below fails, this task ends and drops `stream`, and the engine cancels the
        // choices.
        let (out, body) = mpsc::channel::<Result<Event, std::convert::Infallible>>(64);
        tokio::spawn(async move {
            for index in 0..self.req.choices() {
                if let Some(e) = self.opening(index) {
                    if out.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
            }
            let tok = self.state.engine.tokenizer();
            let mut text = RequestText::new(tok, &self.req);
            // Per choice: logprob entries and text bytes sent so far.
            let mut sent = vec![(0usize, 0usize); self.req.choices()];
            let limit = self.state.request_timeout;
            let deadline = tokio::time::sleep(limit);
            tokio::pin!(deadline);
            while text.is_open() {
                // An error ends the stream with an `error` event, then `[DONE]`.
                let next = tokio::select! {
                    e = stream.recv() => e,
                    () = &mut deadline => {
                        let _ = out.send(Ok(event(&ApiError::timeout(limit).body()))).await;
                        let _ = out.send(Ok(Event::default().data("[DONE]"))).await;
                        return;
                    }
                };
                let failure = match next {
                    None => Some(ended_early()),
                    Some((i, ev)) => match text.apply(i, ev, &stream) {
                        Update::Nothing => continue,
                        Update::Failed(f) => Some(ApiError::from(f)),
                        Update::Choice { done, .. } => {
                            if !self.send_delta(&out, &mut text, i, done, &mut sent).await {
                                return;
                            }
                            None
                        }
                    },
                };
                if let Some(e) = failure {
                    let _ = out.send(Ok(event(&e.body()))).await;
                    let _ = out.send(Ok(Event::default().data("[DONE]"))).await;
                    return;
                }
            }

            if self.shape.include_usage {
                let usage = self.body::<TextChoice>(vec![], Some(self.usage(&text)), true);
                let _ = out.send(Ok(event(&usage))).await;
            }
            let _ = out.send(Ok(Event::default().data("[DONE]"))).await;
        });
        Sse::new(tokio_stream::wrappers::ReceiverStream::new(body))
    }
}

/// A request whose events ended before every choice finished.
fn ended_early() -> ApiError {
    ApiError::internal("the engine ended the request before it finished")
}

fn event<T: Serialize>(body: &T) -> Event {
    Event::default().data(serde_json::to_string(body).unwrap_or_default())
}

fn chat_logprobs(c: &ChoiceText<'_>, from: usize) -> ChatLogprobs {
    ChatLogprobs {
        content: c.logprobs[from..]
            .iter()
            .map(|e| ChatTokenLogprob {
                token: e.text.clone(),
                logprob: e.logprob,
                bytes: e.text.as_bytes().to_vec(),
                top_logprobs: e
                    .top
                    .iter()
                    .map(|(t, l)| TopLogprob {
                        token: t.clone(),
                        logprob: *l,
                        bytes: t.as_bytes().to_vec(),
                    })
                    .collect(),
            })
            .collect(),
        refusal: None,
    }
}

fn text_logprobs(c: &ChoiceText<'_>, from: usize, offset0: usize) -> TextLogprobs {
    let entries = &c.logprobs[from..];
    let mut offset = offset0;
    let mut lp = TextLogprobs::default();
    for e in entries {
        lp.text_offset.push(offset);
        offset += e.text.len();
        lp.tokens.push(e.text.clone());
        lp.token_logprobs.push(e.logprob);
        lp.top_logprobs.push(
            e.top
                .iter()
                .map(|(t, l)| (t.clone(), serde_json::json!(l)))
                .collect(),
        );
    }
    lp
}
