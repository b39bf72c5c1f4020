//! The workers a coordinator dispatches to: each one's channel, counters, load in flight and
//! back-off, and the `Topology` (workers plus who hosts what) that a layer works on.

use super::{
    config::{client, endpoint, error_chain, status_text},
    transport::BatchStream,
    DispatchConfig, DispatchError,
};
use futures::future::join_all;
use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use switchyard_cluster::{PlacementTable, StaticPlacement, WorkerId, WorkerRecord, WorkerSpec};
use switchyard_model::MixtralConfig;
use switchyard_wire::pb::{self, expert_service_client::ExpertServiceClient};
use tonic::transport::Channel;

/// Per-worker counters.
#[derive(Default, Debug)]
pub(super) struct WorkerStats {
    pub calls: AtomicU64,
    pub failures: AtomicU64,
    pub rows: AtomicU64,
    /// Sum of call latencies (send to reply decoded).
    pub latency_micros: AtomicU64,
    /// Sum of the compute time the worker reported.
    pub compute_micros: AtomicU64,
}

/// One worker's counters as read now (per-expert routed tokens are counted by
/// `crate::counting::Counting`, for every executor alike).
#[derive(Clone, Debug)]
pub struct WorkerSnapshot {
    pub id: WorkerId,
    pub calls: u64,
    pub failures: u64,
    pub rows: u64,
    pub latency_micros: u64,
    pub compute_micros: u64,
    /// Not in failure back-off.
    pub up: bool,
    /// Experts it hosts in every layer.
    pub experts: Vec<u32>,
}

pub(super) struct Worker {
    pub id: WorkerId,
    /// Registry instance (empty for static placements): a restarted worker is a new member.
    pub instance: String,
    pub client: ExpertServiceClient<Channel>,
    pub stats: WorkerStats,
    /// Work sent and not yet answered, in [`assign`]'s measure: the load for choosing among
    /// replicas.
    pub inflight: AtomicUsize,
    /// Work ever sent, in the same measure: breaks ties between equally loaded replicas, so
    /// that at batch 1 (nothing in flight between layers) every replica takes its turn instead
    /// of the lowest-numbered ones taking every call.
    pub given: AtomicU64,
    /// Out of routing until this instant (after a failure).
    pub down_until: Mutex<Option<Instant>>,
    /// The ForwardStream batches go down in [`RpcMode::Stream`], opened on first use and again
    /// after it breaks.
    pub stream: tokio::sync::Mutex<Option<Arc<BatchStream>>>,
    /// The worker answered ForwardStream with UNIMPLEMENTED (an older build): unary calls only.
    pub unary_only: std::sync::atomic::AtomicBool,
    /// Its call-latency histogram, made at the first call (after `serve` installs the
    /// recorder), so that a layer's call neither formats a label nor looks the metric up.
    latency: std::sync::OnceLock<metrics::Histogram>,
}

impl Worker {
    pub fn new(addr: &str, instance: String, client: ExpertServiceClient<Channel>) -> Self {
        Self {
            id: WorkerId::new(addr),
            instance,
            client,
            stats: WorkerStats::default(),
            inflight: AtomicUsize::new(0),
            given: AtomicU64::new(0),
            down_until: Mutex::new(None),
            stream: tokio::sync::Mutex::new(None),
            unary_only: std::sync::atomic::AtomicBool::new(false),
            latency: std::sync::OnceLock::new(),
        }
    }
    /// Records one call's latency.
    pub fn record_latency(&self, latency: Duration) {
        self.latency
            .get_or_init(|| {
                metrics::histogram!("switchyard_worker_dispatch_latency_seconds", "worker" => self.id.to_string())
            })
            .record(latency.as_secs_f64());
    }

    pub fn is_up(&self, now: Instant) -> bool {
        let g = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        g.is_none_or(|t| now >= t)
    }
    pub fn mark_down(&self, backoff: Duration) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + backoff);
    }
    pub fn mark_up(&self) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// The workers and who hosts what, replaced whole when membership changes; a layer works on
/// one snapshot from start to end.
pub(super) struct Topology {
    pub table: PlacementTable,
    pub workers: Vec<Arc<Worker>>,
}

impl Topology {
    /// Connects to every worker of `placement`, asks each what it hosts, and builds the table.
    pub(super) async fn dial(
        placement: &StaticPlacement,
        model: &MixtralConfig,
        fingerprint: &str,
        cfg: &DispatchConfig,
    ) -> Result<Self, DispatchError> {
        let infos = join_all(placement.workers.iter().map(|spec| async move {
            let id = WorkerId::new(&spec.addr);
            let connect_err = |message: String| DispatchError::Connect {
                worker: id.clone(),
                message,
            };
            let channel = endpoint(&spec.addr, cfg)
                .map_err(|e| connect_err(e.to_string()))?
                .connect()
                .await
                .map_err(|e| connect_err(error_chain(&e)))?;
            let mut client = client(channel, model.hidden_size);
            let mut req = tonic::Request::new(pb::InfoRequest {});
            req.set_timeout(cfg.connect_timeout);
            let info = client
                .info(req)
                .await
                .map_err(|s| {
                    let mut m = status_text(&s);
                    if cfg.tls.is_none() && m.contains("frame with invalid size") {
                        m.push_str(" (a worker serving TLS? see --worker-tls-ca)");
                    }
                    if cfg.tls.as_ref().is_some_and(|t| t.identity.is_none())
                        && (m.contains("connection closed") || m.contains("CertificateRequired"))
                    {
                        m.push_str(
                            " (a worker requiring a client certificate? see --worker-tls-cert)",
                        );
                    }
                    connect_err(format!("Info failed: {m}"))
                })?
                .into_inner();
            Ok::<_, DispatchError>((spec.clone(), info, client))
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
        let pairs: Vec<_> = infos
            .iter()
            .map(|(s, i, _)| (s.clone(), i.clone()))
            .collect();
        let table = PlacementTable::build(model, fingerprint, &pairs)?;
        let workers: Vec<Arc<Worker>> = infos
            .into_iter()
            .map(|(spec, _, client)| Arc::new(Worker::new(&spec.addr, String::new(), client)))
            .collect();
        for (w, (spec, info)) in workers.iter().zip(&pairs) {
            let experts: Vec<u32> = info
                .hosted
                .first()
                .map(|l| l.experts.clone())
                .unwrap_or_default();
            tracing::info!(worker = %w.id, ?experts, device = %info.device, weight_bytes = info.weight_bytes, spec = ?spec.experts, "worker joined");
            warn_if_kernels_differ(&w.id, &info.kernels);
        }
        Ok(Self { table, workers })
    }

    /// This topology with the registry's live workers `members` (by address): workers
    /// already known with the same instance keep their connection, counters and back-off;
    /// records of another model or protocol are skipped with a warning. None where the whole
    /// membership is refused (the old topology stays).
    pub(super) fn with_members(
        &self,
        members: &BTreeMap<String, WorkerRecord>,
        model: &MixtralConfig,
        fingerprint: &str,
        cfg: &DispatchConfig,
        rt: &tokio::runtime::Handle,
    ) -> Option<Self> {
        let mut pairs = Vec::new();
        let mut workers = Vec::new();
        for (addr, rec) in members {
            let info = switchyard_wire::pb::WorkerInfo {
                protocol_version: rec.protocol_version,
                model_fingerprint: rec.model_fingerprint.clone(),
                hosted: rec
                    .hosted
                    .iter()
                    .enumerate()
                    .map(|(l, e)| switchyard_wire::pb::LayerExperts {
                        layer: l as u32,
                        experts: e.clone(),
                    })
                    .collect(),
                ..Default::default()
            };
            let spec = WorkerSpec {
                addr: addr.clone(),
                experts: None,
            };
            let one = [(spec, info)];
            if let Err(e) = PlacementTable::partial(model, fingerprint, &one) {
                tracing::warn!(worker = %addr, error = %e, "ignoring a registered worker");
                continue;
            }
            let known = self
                .workers
                .iter()
                .find(|w| w.id.as_str() == addr && w.instance == rec.instance);
            let worker = match known {
                Some(w) => w.clone(),
                None => {
                    let _rt = rt.enter();
                    match endpoint(addr, cfg) {
                        Ok(ep) => {
                            tracing::info!(worker = %addr, experts = ?rec.experts_everywhere(), device = %rec.device, "worker joined");
                            warn_if_kernels_differ(&WorkerId::new(addr), &rec.kernels);
                            Arc::new(Worker::new(
                                addr,
                                rec.instance.clone(),
                                client(ep.connect_lazy(), model.hidden_size),
                            ))
                        }
                        Err(e) => {
                            tracing::warn!(worker = %addr, error = %e, "ignoring a worker with a bad address");
                            continue;
                        }
                    }
                }
            };
            workers.push(worker);
            pairs.extend(one);
        }
        for w in &self.workers {
            if !workers.iter().any(|n| Arc::ptr_eq(n, w)) {
                tracing::info!(worker = %w.id, "worker left");
            }
        }
        let table = match PlacementTable::partial(model, fingerprint, &pairs) {
            Ok(t) => t,
            Err(e) => {
                // Each record passed alone, so this cannot happen; keep the old table if it does.
                tracing::error!(error = %e, "membership rejected; keeping the previous placement");
                return None;
            }
        };
        Some(Self { table, workers })
    }
}

/// Warns where worker `id` computes with other CPU kernels than this process: its experts'
/// rows then round differently, and results differ from embedded mode's in the last bits
/// (docs/determinism.md). Workers too old to say stay silent.
fn warn_if_kernels_differ(id: &WorkerId, theirs: &str) {
    let ours = switchyard_model::backend::cpu::linear::signature();
    if !theirs.is_empty() && theirs != ours {
        tracing::warn!(
            worker = %id,
            worker_kernels = theirs,
            coordinator_kernels = %ours,
            "worker computes with other kernels: results may differ from embedded mode's in \
             the last bits (give both the same --cpu-activations and --deterministic)"
        );
    }
}
