//! switchyard's expert worker: hosts a subset of every layer's experts and answers expert batches
//! from coordinators over gRPC. The compute is `switchyard_model::LocalExperts`, the same code
//! embedded mode runs, so a cluster reproduces embedded results bit for bit (f32 wire).
//!
//! Lifecycle: load the hosted experts (only their bytes are touched) → bind → health SERVING →
//! serve → on stop: health NOT_SERVING, refuse new batches, finish in-flight ones → exit.

mod coalesce;
mod error;
mod membership;
mod service;

pub use error::WorkerError;
pub use membership::Membership;
pub use service::{ExpertServer, ExpertService};

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};
use switchyard_model::{
    AnyBackend, Checkpoint, Cpu, Device, ExpertSet, LoadProgress, LocalExperts, QuantPlan,
};
use switchyard_wire::pb::expert_service_server::ExpertServiceServer;
use tokio_util::sync::CancellationToken;

/// A worker's validated settings.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub model: PathBuf,
    /// `0-3,6`; `None` hosts every expert.
    pub experts: Option<String>,
    pub listen: SocketAddr,
    pub device: Device,
    /// Largest batch accepted in one call (rows); bounds memory per request.
    pub max_batch_rows: usize,
    /// Batches computing or waiting at once; more are refused with RESOURCE_EXHAUSTED so
    /// coordinators can go elsewhere instead of queueing without bound.
    pub max_queued_batches: usize,
    /// Written with the bound address once serving (lets tests and scripts use port 0).
    pub ready_file: Option<PathBuf>,
    /// How long in-flight batches may take to finish after a stop.
    pub shutdown_grace: Duration,
    /// Registers in etcd (and, without `experts`, follows the planner's assignment).
    pub membership: Option<Membership>,
    /// Serve over TLS; with a client CA, only coordinators with a certificate it signed (mTLS).
    pub tls: Option<TlsFiles>,
    /// Quantize the experts at load (`--quantize`); coordinators must ask for the same.
    pub quantize: QuantPlan,
    /// Also serve `grpc.health.v1` alone, in plaintext, here: for probes that cannot present a
    /// client certificate (Kubernetes' gRPC probe) when the expert port requires one.
    pub health_listen: Option<SocketAddr>,
    /// Run batches of one layer that arrive together as one expert call (`coalesce.rs`).
    pub coalesce: bool,
}

/// PEM files of a worker's TLS identity.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn server_config(&self) -> Result<tonic::transport::ServerTlsConfig, WorkerError> {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| WorkerError::Config(format!("TLS file {}: {e}", p.display())))
        };
        let mut c = ServerTlsConfig::new()
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?));
        if let Some(ca) = &self.client_ca {
            c = c.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        Ok(c)
    }
}

/// Loads the hosted experts (reporting progress) and returns the service, ready to serve.
pub fn load(cfg: &WorkerConfig, progress: &dyn LoadProgress) -> Result<ExpertServer, WorkerError> {
    let mut ck = Checkpoint::open(&cfg.model)?;
    ck.set_quantize(cfg.quantize)?;
    let n = ck.config().num_local_experts;
    let managed = cfg.membership.as_ref().is_some_and(|m| m.managed);
    let hosted = match &cfg.experts {
        Some(spec) => ExpertSet::parse(spec, n)?,
        // A managed worker starts empty and loads what the planner assigns it.
        None if managed => ExpertSet::from_indices(n, []),
        None => ExpertSet::all(n),
    };
    if hosted.is_empty() && !managed {
        return Err(WorkerError::Config("the worker hosts no experts".into()));
    }
    let backend = AnyBackend::new(cfg.device)?;
    progress.start(LocalExperts::<Cpu>::bytes_to_load(&ck, &hosted));
    let experts = LocalExperts::load(&backend, &ck, &hosted, progress)?;
    progress.finish();
    tracing::info!(
        experts = %hosted,
        weight_bytes = experts.weight_bytes(),
        device = %cfg.device,
        "experts loaded"
    );
    Ok(ExpertServer::new(&ck, backend, Arc::new(experts), cfg))
}

/// Bytes of memory available for expert weights by default: 90 % of what the kernel reports
/// as available now (Linux), or unlimited where it cannot tell.
#[must_use]
pub fn default_memory_budget() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb * 1024 / 10 * 9)
}

/// Runs a worker to completion on the current thread: a current-thread tokio runtime driven from
/// one of rayon's pool threads, so that the thread that decodes a batch also computes it (no
/// hand-offs on the latency-critical path). `on_runtime` runs first inside the runtime (signal
/// handlers). Blocks until `stop` is cancelled and in-flight batches are done.
pub fn serve_on_pool(
    server: Arc<ExpertServer>,
    cfg: &WorkerConfig,
    stop: CancellationToken,
    on_runtime: impl FnOnce(&tokio::runtime::Handle) + Send,
) -> Result<(), WorkerError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Config(format!("cannot start the runtime: {e}")))?;
    switchyard_model::backend::cpu::in_pool(|| {
        on_runtime(rt.handle());
        rt.block_on(serve(server, cfg, stop))
    })
}

/// Registers in etcd until `stop`: the lease is revoked before the drain, so coordinators stop
/// routing here at once.
fn register(
    server: &Arc<ExpertServer>,
    cfg: &WorkerConfig,
    m: &Membership,
    addr: std::net::SocketAddr,
    stop: &CancellationToken,
) {
    let mut m = m.clone();
    if m.advertise.is_empty() {
        m.advertise = addr.to_string();
    }
    tokio::spawn(membership::run(
        server.clone(),
        m,
        cfg.model.clone(),
        cfg.device.to_string(),
        stop.clone(),
    ));
}

/// Serves the health service alone on `at` (plaintext) until `stop`.
async fn serve_health<S>(
    at: SocketAddr,
    svc: tonic_health::pb::health_server::HealthServer<S>,
    stop: CancellationToken,
) -> Result<(), WorkerError>
where
    S: tonic_health::pb::health_server::Health,
{
    let listener = tokio::net::TcpListener::bind(at)
        .await
        .map_err(|e| WorkerError::Bind(at, e))?;
    tracing::info!(addr = %at, "serving grpc.health.v1 in plaintext");
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the health listener stopped");
        }
    });
    Ok(())
}

/// Serves `server` on `cfg.listen` until `stop` is cancelled, then drains.
pub async fn serve(
    server: Arc<ExpertServer>,
    cfg: &WorkerConfig,
    stop: CancellationToken,
) -> Result<(), WorkerError> {
    // TLS files are checked before binding, registering or writing the ready file: a worker
    // with a bad certificate must never look available.
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &cfg.tls {
        builder = builder
            .tls_config(tls.server_config()?)
            .map_err(|e| WorkerError::Config(format!("TLS: {e}")))?;
        tracing::info!(mtls = tls.client_ca.is_some(), "serving over TLS");
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| WorkerError::Bind(cfg.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| WorkerError::Bind(cfg.listen, e))?;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<ExpertServiceServer<ExpertService>>()
        .await;
    if let Some(at) = cfg.health_listen {
        serve_health(at, health_svc.clone(), stop.clone()).await?;
    }
    let draining = server.drain_flag();
    // Room for the largest batch in f32 plus framing.
    let max_msg = 1024 + cfg.max_batch_rows * server.hidden_size() * 4 * 2;
    if let Some(m) = &cfg.membership {
        register(&server, cfg, m, addr, &stop);
    }
    let stats = server.clone();
    let svc = ExpertServiceServer::new(ExpertService {
        server,
        stop: stop.clone(),
    })
    .max_decoding_message_size(max_msg)
    .max_encoding_message_size(max_msg);
    if let Some(path) = &cfg.ready_file {
        std::fs::write(path, addr.to_string())
            .map_err(|e| WorkerError::ReadyFile(path.clone(), e))?;
    }
    tracing::info!(%addr, "worker serving");
    // Expert batches are small request/response pairs: without TCP_NODELAY, Nagle and delayed
    // ACKs add ~40 ms to every call.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let grace = cfg.shutdown_grace;
    let shutdown = {
        let stop = stop.clone();
        async move {
            stop.cancelled().await;
            tracing::info!("stopping: health NOT_SERVING, draining in-flight batches");
            health
                .set_not_serving::<ExpertServiceServer<ExpertService>>()
                .await;
            draining.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    };
    let server = builder
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(health_svc)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r.map_err(WorkerError::Serve)?,
        () = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "in-flight batches did not finish within the grace period");
        }
    }
    let s = stats.stats();
    let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        batches = n(&s.batches),
        expert_calls = n(&s.calls),
        coalesced = n(&s.coalesced),
        joined = n(&s.joined),
        busy_ms = n(&s.busy_micros) / 1000,
        "worker stopped"
    );
    Ok(())
}
