//! The OpenAI-compatible HTTP API (axum): routes, authentication, body limits, and the
//! translation between OpenAI's JSON and the scheduler's sequences.
//!
//! **Architecture invariant:** the only module that knows about HTTP and OpenAI's formats. Every
//! failure leaves through `ApiError`.

mod body;
mod error;
mod generate;
mod responses;

pub use error::ApiError;

use crate::{
    dispatch::RemoteExperts, engine::Engine, request::RequestLimits, scheduler::SchedulerHandle,
};
use axum::{
    extract::{Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use std::sync::Arc;

/// What every handler shares.
pub struct AppState {
    pub engine: Arc<Engine>,
    pub scheduler: SchedulerHandle,
    /// What requests are checked against, the served model's name included.
    pub limits: RequestLimits,
    /// How long a generation may take, queueing included, before it is answered with a 504
    /// (or, streaming, an error event) and cancelled.
    pub request_timeout: std::time::Duration,
    /// Keys `/v1` and the tokenizer routes accept; none: open.
    pub api_keys: ApiKeys,
    pub max_body_bytes: usize,
    /// How long a request's body may take to arrive.
    pub body_read_timeout: std::time::Duration,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub remote: Option<Arc<RemoteExperts>>,
    pub started: u64,
    pub expert_counts: Arc<crate::counting::ExpertCounts>,
    /// Samples of the counters for the dashboard (`/v1/cluster`).
    pub history: crate::dashboard::history::History,
    /// What etcd says (members, the plan), with a registry.
    pub registry: Option<Arc<crate::membership::RegistryView>>,
}

/// The router with every route; `/metrics` among them unless `separate_metrics` (then
/// [`metrics_router`] serves it on a port of its own). With API keys set, `/metrics` here needs
/// a key too: it names workers and reveals load.
pub fn router(state: Arc<AppState>, separate_metrics: bool) -> Router {
    let v1 = Router::new()
        .route("/completions", post(generate::completions))
        .route("/chat/completions", post(generate::chat))
        .route("/models", get(models))
        .route("/cluster", get(crate::dashboard::cluster))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let mut guarded = Router::new()
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize));
    if !separate_metrics {
        guarded = guarded.route("/metrics", get(metrics_text));
    }
    let guarded = guarded.route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .nest("/v1", v1)
        .merge(guarded)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/dashboard", get(crate::dashboard::page))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                message: "no such route".into(),
                param: None,
                code: "SY:API:NoRoute",
                retry_after: None,
            }
        })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            body::read_body,
        ))
        .with_state(state)
}

async fn require_key(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if !s.api_keys.is_open() {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| s.api_keys.allows(given));
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// The API keys a server accepts, kept as SHA-256 digests and compared in constant time: a
/// caller learns nothing from how long a refusal takes, neither which bytes matched nor how
/// long a key is.
#[derive(Clone, Default)]
pub struct ApiKeys(Vec<[u8; 32]>);

impl ApiKeys {
    /// `keys`, blank ones dropped.
    #[must_use]
    pub fn new<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> Self {
        Self(
            keys.into_iter()
                .map(|k| k.as_ref().trim().to_string())
                .filter(|k| !k.is_empty())
                .map(|k| digest(&k))
                .collect(),
        )
    }

    /// No key set: every request is let in.
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `given` is one of the keys; every key is compared, whichever matches.
    #[must_use]
    pub fn allows(&self, given: &str) -> bool {
        use subtle::ConstantTimeEq;
        let d = digest(given);
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |acc, k| acc | k.ct_eq(&d))
            .into()
    }
}

/// Says how many keys, never which.
impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

fn digest(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

#[derive(serde::Deserialize)]
struct TokenizeRequest {
    prompt: String,
    #[serde(default = "yes")]
    add_special_tokens: bool,
}

#[derive(serde::Deserialize)]
struct DetokenizeRequest {
    tokens: Vec<i64>,
}

fn yes() -> bool {
    true
}

/// vLLM's `/tokenize`: the ids of a text (with special tokens unless told otherwise).
async fn tokenize(
    State(s): State<Arc<AppState>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let r: TokenizeRequest = generate::parse(body, s.max_body_bytes)?;
    let ids = s
        .engine
        .tokenizer()
        .encode(&r.prompt, r.add_special_tokens)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?;
    Ok(Json(
        serde_json::json!({"tokens": ids, "count": ids.len(), "max_model_len": s.limits.max_seq_len}),
    ))
}

/// vLLM's `/detokenize`: the text of ids (special tokens skipped, as in completions).
async fn detokenize(
    State(s): State<Arc<AppState>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let r: DetokenizeRequest = generate::parse(body, s.max_body_bytes)?;
    let vocab = s.limits.vocab_size as i64;
    let ids =
        r.tokens
            .iter()
            .map(|&t| {
                u32::try_from(t).ok().filter(|_| t < vocab).ok_or_else(|| {
                    ApiError::invalid(format!("{t} is not a token id"), Some("tokens"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
    let text = s
        .engine
        .tokenizer()
        .decode(&ids, true)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("tokens")))?;
    Ok(Json(serde_json::json!({"prompt": text})))
}

async fn models(State(s): State<Arc<AppState>>) -> Json<responses::ModelList> {
    Json(responses::ModelList {
        object: "list",
        data: vec![responses::ModelCard {
            id: s.limits.model_name.clone(),
            object: "model",
            created: s.started,
            owned_by: "switchyard",
            max_model_len: s.limits.max_seq_len,
        }],
    })
}

/// Liveness: the process serves HTTP and its engine thread runs.
async fn health(State(s): State<Arc<AppState>>) -> Response {
    if s.scheduler.is_alive() {
        Json(serde_json::json!({"status": "ok"})).into_response()
    } else {
        ApiError::unavailable("the engine thread has stopped").into_response()
    }
}

/// Readiness: the model is loaded (it is, or we would not be serving) and every expert of every
/// layer has a worker that is not in failure back-off.
async fn ready(State(s): State<Arc<AppState>>) -> Response {
    if !s.scheduler.is_alive() {
        return ApiError::unavailable("the engine thread has stopped").into_response();
    }
    if let Some(r) = &s.remote {
        if let Some((layer, expert)) = r.first_unreachable_expert() {
            return ApiError::unavailable(format!(
                "no live worker hosts expert {expert} of layer {layer}"
            ))
            .into_response();
        }
    }
    Json(serde_json::json!({"status": "ready", "model": s.limits.model_name})).into_response()
}

/// `/metrics` alone, for a port of its own (`serve --metrics-port`) that only the monitoring
/// network reaches: no key.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    crate::metrics::record_cluster(&s);
    let text = s.metrics.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::ApiKeys;

    #[test]
    fn any_of_several_keys_lets_in_and_nothing_else_does() {
        let keys = ApiKeys::new(["alpha", " beta ", ""]);
        assert!(!keys.is_open());
        assert!(keys.allows("alpha") && keys.allows("beta"));
        for wrong in ["", "alph", "alphaa", "ALPHA", "beta "] {
            assert!(!keys.allows(wrong), "{wrong:?}");
        }
        assert!(ApiKeys::new(Vec::<String>::new()).is_open());
        assert!(ApiKeys::new([" "]).is_open(), "blank keys are no keys");
    }
}
