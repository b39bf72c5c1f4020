//! `switchyard serve`: load the model (embedded or over workers), start the scheduler and serve
//! the API until stopped, then drain.

use crate::{
    api::{self, AppState, Limits},
    counting::{Counting, ExpertCounts},
    dispatch::{DispatchConfig, RemoteExperts},
    engine::{Engine, EngineError},
    membership::{Membership, MembershipConfig},
    scheduler::{self, SchedulerConfig},
};
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};
use switchyard_cluster::StaticPlacement;
use switchyard_model::{
    AnyBackend, Checkpoint, Cpu, ExpertExecutor, ExpertSet, LoadProgress, LocalExperts, Mixtral,
};
use tokio_util::sync::CancellationToken;

/// Settings of a serving coordinator.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub model: PathBuf,
    /// The name clients pass as `model` (default: the folder name).
    pub served_model_name: Option<String>,
    pub listen: SocketAddr,
    pub placement: Option<StaticPlacement>,
    /// Live membership from etcd (instead of `placement`).
    pub membership: Option<MembershipConfig>,
    pub dispatch: DispatchConfig,
    pub scheduler: SchedulerConfig,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub max_n: usize,
    /// How long in-flight requests may run after a stop before they are cancelled.
    pub shutdown_grace: Duration,
    /// Written with the bound address once serving.
    pub ready_file: Option<PathBuf>,
    /// Where the dense layers (and, embedded, the experts) run.
    pub device: switchyard_model::Device,
    /// The KV cache's element type.
    pub kv_dtype: switchyard_model::KvDtype,
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
}

/// A loaded model, ready to serve.
pub struct Loaded {
    pub engine: Arc<Engine>,
    pub remote: Option<Arc<RemoteExperts>>,
    pub counts: Arc<ExpertCounts>,
    /// The registry watcher (and planner), running while this lives.
    pub membership: Option<Membership>,
}

/// Loads everything (blocking; call before entering the async runtime).
pub fn load(cfg: &ServeConfig, progress: &dyn LoadProgress) -> Result<Loaded, ServeError> {
    let backend = AnyBackend::new(cfg.device).map_err(EngineError::from)?;
    crate::engine::check_kv_dtype(&backend, cfg.kv_dtype)?;
    let ck = Checkpoint::open(&cfg.model).map_err(EngineError::from)?;
    let mc = ck.config();
    let counts = Arc::new(ExpertCounts::new(
        mc.num_hidden_layers,
        mc.num_local_experts,
    ));
    let mut membership = None;
    let (inner, remote): (Arc<dyn ExpertExecutor>, _) = match (&cfg.placement, &cfg.membership) {
        (_, Some(m)) => {
            let r = Arc::new(
                RemoteExperts::empty(mc, &ck.fingerprint(), cfg.dispatch.clone())
                    .map_err(EngineError::from)?,
            );
            let started = Membership::start(m.clone(), r.clone(), Some(counts.clone()))?;
            // Serving starts either way; /ready says when every expert has a host.
            if started.wait_synced(std::time::Duration::from_secs(5)) {
                r.wait_for_coverage(std::time::Duration::from_secs(5));
            } else {
                tracing::warn!("etcd has not answered yet; serving, and waiting for workers");
            }
            membership = Some(started);
            progress.start(Mixtral::<Cpu>::bytes_to_load(&ck));
            (r.clone() as Arc<dyn ExpertExecutor>, Some(r))
        }
        (Some(p), None) => {
            let r = Arc::new(
                RemoteExperts::connect(p, mc, &ck.fingerprint(), cfg.dispatch.clone())
                    .map_err(EngineError::from)?,
            );
            progress.start(Mixtral::<Cpu>::bytes_to_load(&ck));
            (r.clone() as Arc<dyn ExpertExecutor>, Some(r))
        }
        (None, None) => {
            let all = ExpertSet::all(mc.num_local_experts);
            progress.start(
                Mixtral::<Cpu>::bytes_to_load(&ck) + LocalExperts::<Cpu>::bytes_to_load(&ck, &all),
            );
            (
                Arc::new(LocalExperts::load(&backend, &ck, &all, progress)?)
                    as Arc<dyn ExpertExecutor>,
                None,
            )
        }
    };
    let experts = Arc::new(Counting {
        inner,
        counts: counts.clone(),
    });
    let engine =
        Arc::new(Engine::load_with(backend, &ck, experts, progress)?.with_kv_dtype(cfg.kv_dtype)?);
    progress.finish();
    Ok(Loaded {
        engine,
        remote,
        counts,
        membership,
    })
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
        membership: _membership,
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
        limits: Limits {
            max_n: cfg.max_n,
            max_seq_len: sched.max_seq_len,
            vocab_size: engine.config().vocab_size,
        },
        engine,
        scheduler: sched,
        model_name: model_name.clone(),
        api_key: cfg.api_key.clone(),
        max_body_bytes: cfg.max_body_bytes,
        metrics,
        remote,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        expert_counts: counts,
    });
    let app =
        api::router(state.clone()).layer(axum::extract::DefaultBodyLimit::max(cfg.max_body_bytes));
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| ServeError::Bind(cfg.listen, e))?;
    let addr = listener.local_addr()?;
    if let Some(p) = &cfg.ready_file {
        std::fs::write(p, addr.to_string())?;
    }
    tracing::info!(%addr, model = %model_name, "serving the OpenAI API");
    let graceful = stop.clone();
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(async move { graceful.cancelled().await });
    tokio::select! {
        r = server => r?,
        () = async { stop.cancelled().await; tokio::time::sleep(cfg.shutdown_grace).await } => {
            tracing::warn!(grace = ?cfg.shutdown_grace, "in-flight requests did not finish in time; cancelling them");
        }
    }
    tracing::info!("server stopped");
    Ok(())
}
