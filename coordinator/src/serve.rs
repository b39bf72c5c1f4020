//! `switchyard serve`: load the model (embedded or over workers), start the scheduler and serve
//! the API until stopped, then drain.

use crate::{
    api::{self, AppState},
    engine::{Engine, EngineError},
    loader::{ExpertSource, LoadOptions, Loaded},
    request::RequestLimits,
    scheduler::{self, SchedulerConfig},
};
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};
use switchyard_model::LoadProgress;
use tokio_util::sync::CancellationToken;

/// Settings of a serving coordinator.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub model: PathBuf,
    /// The name clients pass as `model` (default: the folder name).
    pub served_model_name: Option<String>,
    pub listen: SocketAddr,
    /// Where the experts run.
    pub experts: ExpertSource,
    /// Device, KV dtype, dispatch settings.
    pub load: LoadOptions,
    pub scheduler: SchedulerConfig,
    /// How long a generation may take before it is answered with a timeout and cancelled.
    pub request_timeout: Duration,
    /// Keys the API accepts (none: open).
    pub api_keys: crate::api::ApiKeys,
    pub max_body_bytes: usize,
    /// How long a request's body may take to arrive (a 408 after it).
    pub body_read_timeout: Duration,
    pub max_n: usize,
    /// How long in-flight requests may run after a stop before they are cancelled.
    pub shutdown_grace: Duration,
    /// Header read timeout and connection bound of the API.
    pub connections: crate::http::ConnectionLimits,
    /// The API's certificate and key (PEM); plaintext without.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Serve `/metrics` on this port of the API's host instead of the API's port.
    pub metrics_port: Option<u16>,
    /// Written with the bound address once serving.
    pub ready_file: Option<PathBuf>,
}

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Model(#[from] switchyard_model::ModelError),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the API's TLS certificate: {0}")]
    Tls(#[from] crate::http::TlsError),
    #[error("the engine thread stopped; the server stops with it so that it is restarted")]
    EngineStopped,
}

/// Loads the model as `serve` runs it: counting routed tokens and, with a registry, publishing
/// them for the planner (blocking; call before entering the async runtime).
pub fn load(cfg: &ServeConfig, progress: &dyn LoadProgress) -> Result<Loaded, ServeError> {
    let opts = LoadOptions {
        publish_load: true,
        ..cfg.load.clone()
    };
    Ok(Engine::load(
        &cfg.model,
        cfg.experts.clone(),
        &opts,
        progress,
    )?)
}

/// Serves until `stop`, then stops admitting, gives in-flight requests `shutdown_grace` to finish
/// and returns.
pub async fn run(
    cfg: ServeConfig,
    loaded: Loaded,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    let Loaded {
        engine,
        remote,
        counts,
        membership,
    } = loaded;
    let metrics = crate::metrics::install().map_err(ServeError::Metrics)?;
    let sched = scheduler::start(engine.clone(), cfg.scheduler.clone())?;
    let model_name = cfg.served_model_name.clone().unwrap_or_else(|| {
        cfg.model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let state = Arc::new(AppState {
        limits: RequestLimits {
            model_name: model_name.clone(),
            max_n: cfg.max_n,
            max_prompts: crate::request::DEFAULT_MAX_PROMPTS,
            max_seq_len: sched.max_seq_len,
            vocab_size: engine.config().vocab_size,
        },
        engine,
        scheduler: sched,
        api_keys: cfg.api_keys.clone(),
        request_timeout: cfg.request_timeout,
        max_body_bytes: cfg.max_body_bytes,
        body_read_timeout: cfg.body_read_timeout,
        metrics,
        remote,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        expert_counts: counts,
        history: crate::dashboard::history::History::default(),
        registry: membership.as_ref().map(crate::membership::Membership::view),
    });
    tokio::spawn(crate::dashboard::history::run(state.clone(), stop.clone()));
    let app = api::router(state.clone(), cfg.metrics_port.is_some())
        .layer(axum::extract::DefaultBodyLimit::max(cfg.max_body_bytes));
    if let Some(port) = cfg.metrics_port {
        let at = SocketAddr::new(cfg.listen.ip(), port);
        let listener = tokio::net::TcpListener::bind(at)
            .await
            .map_err(|e| ServeError::Bind(at, e))?;
        tracing::info!(addr = %at, "serving /metrics");
        let stopping = stop.clone();
        let metrics_app = api::metrics_router(state.clone());
        tokio::spawn(async move {
            let served = axum::serve(listener, metrics_app)
                .with_graceful_shutdown(async move { stopping.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the /metrics listener stopped");
            }
        });
    }
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(crate::http::ApiTls::load(cert, key)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| ServeError::Bind(cfg.listen, e))?;
    let addr = listener.local_addr()?;
    if let Some(p) = &cfg.ready_file {
        std::fs::write(p, addr.to_string())?;
    }
    tracing::info!(%addr, model = %model_name, tls = tls.is_some(), "serving the OpenAI API");
    if tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, keys = !cfg.api_keys.is_open(), "the API is served in plaintext beyond this host; pass --tls-cert/--tls-key or put TLS in front of it");
    }
    let server = crate::http::serve(listener, app, cfg.connections, tls, stop.clone());
    let engine_alive = state.scheduler.clone();
    tokio::select! {
        r = server => r?,
        () = engine_alive.stopped() => {
            tracing::error!("the engine thread stopped; stopping the server");
            return Err(ServeError::EngineStopped);
        }
        () = async { stop.cancelled().await; tokio::time::sleep(cfg.shutdown_grace).await } => {
            tracing::warn!(grace = ?cfg.shutdown_grace, "in-flight requests did not finish in time; cancelling them");
        }
    }
    tracing::info!("server stopped");
    Ok(())
}
