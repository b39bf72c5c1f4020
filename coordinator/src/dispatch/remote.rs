//! `RemoteExperts`: scatter/gather of one layer's expert batches over long-lived gRPC channels.

use super::DispatchError;
use futures::future::join_all;
use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};
use switchyard_cluster::{PlacementTable, StaticPlacement, WorkerId, WorkerRecord, WorkerSpec};
use switchyard_model::{
    ExpertExecutor, ExpertJob, Finished, LayerId, MixtralConfig, ModelError, PendingExperts,
    RoutePlan,
};
use switchyard_wire::{
    decode_rows, encode_batch, pb, pb::expert_service_client::ExpertServiceClient, WireDType,
};
use tonic::transport::{Channel, Endpoint};

/// How the coordinator talks to workers.
#[derive(Clone, Debug)]
pub struct DispatchConfig {
    /// Activation dtype on the wire (f32: bit-exact with embedded mode).
    pub wire_dtype: WireDType,
    /// Deadline of one expert batch call.
    pub rpc_timeout: Duration,
    /// Deadline of connecting (and the startup Info call).
    pub connect_timeout: Duration,
    /// How long a worker whose call failed stays out of routing before it is tried again.
    pub failure_backoff: Duration,
    /// How long a layer whose expert has no live host waits for one (a replacement worker
    /// registering, a failed one coming back) before its sequences fail.
    pub expert_wait: Duration,
    /// Talk to workers over TLS (mutual, with `identity`).
    pub tls: Option<ClientTls>,
    /// Split steps of several sequences into two micro-batches and compute one's attention
    /// while the other's experts are away (dual-batch overlap). It pays where the network
    /// wait is long next to attention and the coordinator has cores of its own: each
    /// micro-batch reads the experts' weights again, and batches then run on a dispatch thread
    /// instead of the engine thread, a thread hand-off per layer even for steps of one
    /// sequence. Off by default: on a 2-core machine shared with the workers it cost 5–20 %.
    pub overlap: bool,
    /// How batches travel to a worker.
    pub rpc: RpcMode,
}

/// How expert batches travel to a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpcMode {
    /// One unary Forward call per batch: an HTTP/2 stream with headers and a deadline each.
    Unary,
    /// One long-lived ForwardStream per worker that every batch goes down; workers that do not
    /// know it get unary calls.
    Stream,
}

impl std::str::FromStr for RpcMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "unary" => Ok(Self::Unary),
            "stream" => Ok(Self::Stream),
            o => Err(format!("unknown RPC mode {o:?} (unary or stream)")),
        }
    }
}

/// TLS towards workers: the CA that signed their certificates, the name their certificates carry
/// (workers are dialled by IP, so one shared name is checked instead), and this coordinator's
/// own certificate for workers that require one.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca_pem: Vec<u8>,
    pub domain: String,
    /// (certificate, key), PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            wire_dtype: WireDType::BF16,
            rpc_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            failure_backoff: Duration::from_secs(2),
            expert_wait: Duration::from_secs(30),
            tls: None,
            overlap: false,
            rpc: RpcMode::Stream,
        }
    }
}

/// Per-worker counters.
#[derive(Default, Debug)]
struct WorkerStats {
    calls: AtomicU64,
    failures: AtomicU64,
    rows: AtomicU64,
    /// Sum of call latencies (send to reply decoded).
    latency_micros: AtomicU64,
    /// Sum of the compute time the worker reported.
    compute_micros: AtomicU64,
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
}

struct Worker {
    id: WorkerId,
    /// Registry instance (empty for static placements): a restarted worker is a new member.
    instance: String,
    client: ExpertServiceClient<Channel>,
    stats: WorkerStats,
    /// Work sent and not yet answered, in [`assign`]'s measure: the load for choosing among
    /// replicas.
    inflight: AtomicUsize,
    /// Out of routing until this instant (after a failure).
    down_until: Mutex<Option<Instant>>,
    /// The ForwardStream batches go down in [`RpcMode::Stream`], opened on first use and again
    /// after it breaks.
    stream: tokio::sync::Mutex<Option<Arc<BatchStream>>>,
    /// The worker answered ForwardStream with UNIMPLEMENTED (an older build): unary calls only.
    unary_only: std::sync::atomic::AtomicBool,
}

type Reply = Result<pb::ExpertResult, tonic::Status>;

/// Replies awaited on a stream, by batch id; once the stream has ended, why.
#[derive(Default)]
struct Waiting {
    replies: std::collections::HashMap<u64, tokio::sync::oneshot::Sender<Reply>>,
    ended: Option<tonic::Status>,
}

/// One worker's ForwardStream: batches go out on `tx`, and a reader task hands each reply to
/// the call waiting for its id.
struct BatchStream {
    tx: futures::channel::mpsc::UnboundedSender<pb::StreamBatch>,
    next_id: AtomicU64,
    waiting: Arc<Mutex<Waiting>>,
}

impl BatchStream {
    /// Opens the stream; must run inside the dispatch runtime (the reader task is spawned there).
    async fn open(client: &ExpertServiceClient<Channel>) -> Result<Self, tonic::Status> {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut replies = client.clone().forward_stream(rx).await?.into_inner();
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let w = waiting.clone();
        tokio::spawn(async move {
            let ended = loop {
                match replies.message().await {
                    Ok(Some(r)) => {
                        let mut g = w.lock().unwrap_or_else(|p| p.into_inner());
                        // A reply nobody waits for belongs to a call that timed out.
                        if let Some(tx) = g.replies.remove(&r.id) {
                            let _ = tx.send(reply_result(r));
                        }
                    }
                    Ok(None) => {
                        break tonic::Status::unavailable("the worker closed the batch stream")
                    }
                    Err(s) => break s,
                }
            };
            let mut g = w.lock().unwrap_or_else(|p| p.into_inner());
            for (_, tx) in g.replies.drain() {
                let _ = tx.send(Err(ended.clone()));
            }
            g.ended = Some(ended);
        });
        Ok(Self {
            tx,
            next_id: AtomicU64::new(0),
            waiting,
        })
    }

    fn is_open(&self) -> bool {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ended
            .is_none()
    }

    /// Sends `batch` and waits up to `timeout` for its reply.
    async fn call(&self, batch: pb::ExpertBatch, timeout: Duration) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let rx = {
            let mut g = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = &g.ended {
                return Err(s.clone());
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            g.replies.insert(id, tx);
            let msg = pb::StreamBatch {
                id,
                batch: Some(batch),
            };
            if self.tx.unbounded_send(msg).is_err() {
                g.replies.remove(&id);
                return Err(tonic::Status::unavailable("the batch stream is closed"));
            }
            rx
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(tonic::Status::unavailable("the batch stream ended")),
            Err(_) => {
                self.waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replies
                    .remove(&id);
                Err(tonic::Status::deadline_exceeded(
                    "no reply on the batch stream",
                ))
            }
        }
    }
}

/// A stream reply as the unary call would have answered it.
fn reply_result(r: pb::StreamReply) -> Reply {
    if r.status == 0 {
        return r
            .result
            .ok_or_else(|| tonic::Status::internal("stream reply without a result"));
    }
    let mut s = tonic::Status::new(tonic::Code::from_i32(r.status), r.message);
    if let Ok(v) = r.error_code.parse() {
        s.metadata_mut().insert(switchyard_wire::ERROR_CODE_KEY, v);
    }
    Err(s)
}

impl Worker {
    fn new(addr: &str, instance: String, client: ExpertServiceClient<Channel>) -> Self {
        Self {
            id: WorkerId::new(addr),
            instance,
            client,
            stats: WorkerStats::default(),
            inflight: AtomicUsize::new(0),
            down_until: Mutex::new(None),
            stream: tokio::sync::Mutex::new(None),
            unary_only: std::sync::atomic::AtomicBool::new(false),
        }
    }
    fn is_up(&self, now: Instant) -> bool {
        let g = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        g.is_none_or(|t| now >= t)
    }
    fn mark_down(&self, backoff: Duration) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + backoff);
    }
    fn mark_up(&self) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// The workers and who hosts what, replaced whole when membership changes; a layer works on
/// one snapshot from start to end.
struct Topology {
    table: PlacementTable,
    workers: Vec<Arc<Worker>>,
}

/// Experts on remote workers.
///
/// It owns a current-thread tokio runtime and drives it from the calling (engine) thread in
/// `run`: the request is written and the reply read on the thread that needs it, with no
/// hand-off to I/O threads (each hand-off costs a wake-up, tens of µs, twice per call). Between
/// calls nothing polls the connections; an idle connection the worker drops is re-dialled on
/// the next call.
///
/// Membership is either fixed at `connect` (a static placement) or live: the registry watcher
/// calls [`apply_members`](Self::apply_members) on every change, and the next layer uses the
/// new table.
pub struct RemoteExperts {
    rt: tokio::runtime::Runtime,
    inner: Arc<Dispatcher>,
}

/// The state a layer's scatter/gather works on, shared with batches running in the background.
struct Dispatcher {
    /// Where channels to new workers are made (their connection tasks run on it).
    rt: tokio::runtime::Handle,
    topo: RwLock<Arc<Topology>>,
    /// Bumped on every membership change; layers waiting for a host watch it.
    generation: tokio::sync::watch::Sender<u64>,
    model: MixtralConfig,
    fingerprint: String,
    hidden: usize,
    layers: usize,
    experts: usize,
    cfg: DispatchConfig,
}

/// One worker's share of a layer.
struct Share {
    worker: usize,
    /// Its work in [`assign`]'s measure, counted in flight while it is away.
    cost: usize,
    /// Global row index of each row sent.
    rows: Vec<usize>,
    plan: RoutePlan,
}

/// What running one expert costs a worker beyond its tokens, in tokens. Each expert of a batch
/// reads its weights once whatever its token count, and at decode batch sizes that read is
/// most of the work: a CPU worker's AMX kernel takes up to 16 tokens per pass over a weight
/// at about the cost of one, and an accelerator streams the weights once per batch too.
const EXPERT_COST_TOKENS: usize = 16;

/// Chooses a host for every expert with tokens (`count[e]` of them) among `hosts(e)`: heaviest
/// expert first, each to the host with the least load, that is `base[w]` plus what this call
/// gave it so far (lowest index on ties), where an expert of `c` tokens weighs
/// `c + EXPERT_COST_TOKENS`. Returns each expert's host (`usize::MAX` where it has no tokens)
/// and each worker's load given; `Err(e)`: expert `e` has tokens and no host.
///
/// Counting tokens alone, a layer of evenly used experts could give one worker five experts'
/// weights to read and the other three; placing the heaviest first keeps the last choices
/// small, so the loads end close.
fn assign<I: Iterator<Item = usize>>(
    count: &[usize],
    hosts: impl Fn(usize) -> I,
    base: &[usize],
) -> Result<(Vec<usize>, Vec<usize>), usize> {
    let mut order: Vec<usize> = (0..count.len()).filter(|&e| count[e] > 0).collect();
    order.sort_by_key(|&e| (std::cmp::Reverse(count[e]), e));
    let mut given = vec![0usize; base.len()];
    let mut choice = vec![usize::MAX; count.len()];
    for e in order {
        let best = hosts(e).min_by_key(|&w| (base[w] + given[w], w)).ok_or(e)?;
        choice[e] = best;
        given[best] += count[e] + EXPERT_COST_TOKENS;
    }
    Ok((choice, given))
}

fn endpoint(addr: &str, cfg: &DispatchConfig) -> Result<Endpoint, tonic::transport::Error> {
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))?;
    if let Some(t) = &cfg.tls {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut c = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&t.ca_pem))
            .domain_name(t.domain.clone());
        if let Some((cert, key)) = &t.identity {
            c = c.identity(Identity::from_pem(cert, key));
        }
        ep = ep.tls_config(c)?;
    }
    Ok(ep
        .connect_timeout(cfg.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

/// Without overlap, a current-thread runtime that the engine thread drives itself; with it, one
/// I/O thread that keeps batches moving while the engine thread computes.
fn dispatch_runtime(overlap: bool) -> Result<tokio::runtime::Runtime, DispatchError> {
    let mut b = if overlap {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(1).thread_name("dispatch");
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().map_err(|e| DispatchError::Connect {
        worker: WorkerId::new("-"),
        message: format!("cannot start the dispatch runtime: {e}"),
    })
}

fn client(channel: Channel) -> ExpertServiceClient<Channel> {
    ExpertServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

impl RemoteExperts {
    /// Connects to every worker of `placement`, asks each what it hosts, and builds the table.
    /// Blocks; must not be called from inside an async runtime.
    pub fn connect(
        placement: &StaticPlacement,
        model: &MixtralConfig,
        fingerprint: &str,
        cfg: DispatchConfig,
    ) -> Result<Self, DispatchError> {
        let rt = dispatch_runtime(cfg.overlap)?;
        let infos = rt
            .block_on(join_all(placement.workers.iter().map(|spec| {
                let cfg = cfg.clone();
                async move {
                    let id = WorkerId::new(&spec.addr);
                    let connect_err = |message: String| DispatchError::Connect {
                        worker: id.clone(),
                        message,
                    };
                    let channel = endpoint(&spec.addr, &cfg)
                        .map_err(|e| connect_err(e.to_string()))?
                        .connect()
                        .await
                        .map_err(|e| connect_err(error_chain(&e)))?;
                    let mut client = client(channel);
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
                                && (m.contains("connection closed")
                                    || m.contains("CertificateRequired"))
                            {
                                m.push_str(
                                    " (a worker requiring a client certificate? see --worker-tls-cert)",
                                );
                            }
                            connect_err(format!("Info failed: {m}"))
                        })?
                        .into_inner();
                    Ok::<_, DispatchError>((spec.clone(), info, client))
                }
            })))
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
        }
        Ok(Self::with_topology(
            rt,
            Topology { table, workers },
            model,
            fingerprint,
            cfg,
        ))
    }

    /// A dispatcher with no workers yet, for live membership: the registry watcher fills it in
    /// with [`apply_members`](Self::apply_members); until then layers wait for hosts.
    pub fn empty(
        model: &MixtralConfig,
        fingerprint: &str,
        cfg: DispatchConfig,
    ) -> Result<Self, DispatchError> {
        let rt = dispatch_runtime(cfg.overlap)?;
        let table = PlacementTable::partial(model, fingerprint, &[])?;
        Ok(Self::with_topology(
            rt,
            Topology {
                table,
                workers: Vec::new(),
            },
            model,
            fingerprint,
            cfg,
        ))
    }

    fn with_topology(
        rt: tokio::runtime::Runtime,
        topo: Topology,
        model: &MixtralConfig,
        fingerprint: &str,
        cfg: DispatchConfig,
    ) -> Self {
        let inner = Arc::new(Dispatcher {
            rt: rt.handle().clone(),
            topo: RwLock::new(Arc::new(topo)),
            generation: tokio::sync::watch::Sender::new(0),
            model: model.clone(),
            fingerprint: fingerprint.to_string(),
            hidden: model.hidden_size,
            layers: model.num_hidden_layers,
            experts: model.num_local_experts,
            cfg,
        });
        Self { rt, inner }
    }

    /// Replaces the membership with `members` (the registry's live workers, by address).
    /// Workers already known with the same instance keep their connection, counters and
    /// back-off; records of another model or protocol are skipped with a warning. Returns the
    /// (layer, expert) pairs left without a host.
    pub fn apply_members(&self, members: &BTreeMap<String, WorkerRecord>) -> Vec<(usize, usize)> {
        self.inner.apply_members(members)
    }

    /// Every worker's counters since it joined.
    #[must_use]
    pub fn snapshot(&self) -> Vec<WorkerSnapshot> {
        self.inner.snapshot()
    }

    /// The first (layer, expert) with no worker outside failure back-off, if any (readiness).
    #[must_use]
    pub fn first_unreachable_expert(&self) -> Option<(usize, usize)> {
        self.inner.first_unreachable_expert()
    }

    /// Experts per layer of the model served.
    #[must_use]
    pub fn num_experts(&self) -> usize {
        self.inner.experts
    }

    /// Waits until every expert of every layer has a live host, or `timeout`. Blocking.
    pub fn wait_for_coverage(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.first_unreachable_expert().is_none() {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Worker ids in placement order.
    #[must_use]
    pub fn workers(&self) -> Vec<WorkerId> {
        self.inner
            .topology()
            .workers
            .iter()
            .map(|w| w.id.clone())
            .collect()
    }
}

impl Dispatcher {
    fn topology(&self) -> Arc<Topology> {
        self.topo
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn apply_members(&self, members: &BTreeMap<String, WorkerRecord>) -> Vec<(usize, usize)> {
        let old = self.topology();
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
            if let Err(e) = PlacementTable::partial(&self.model, &self.fingerprint, &one) {
                tracing::warn!(worker = %addr, error = %e, "ignoring a registered worker");
                continue;
            }
            let known = old
                .workers
                .iter()
                .find(|w| w.id.as_str() == addr && w.instance == rec.instance);
            let worker = match known {
                Some(w) => w.clone(),
                None => {
                    let _rt = self.rt.enter();
                    match endpoint(addr, &self.cfg) {
                        Ok(ep) => {
                            tracing::info!(worker = %addr, experts = ?rec.experts_everywhere(), device = %rec.device, "worker joined");
                            Arc::new(Worker::new(
                                addr,
                                rec.instance.clone(),
                                client(ep.connect_lazy()),
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
        for w in &old.workers {
            if !workers.iter().any(|n| Arc::ptr_eq(n, w)) {
                tracing::info!(worker = %w.id, "worker left");
            }
        }
        let table = match PlacementTable::partial(&self.model, &self.fingerprint, &pairs) {
            Ok(t) => t,
            Err(e) => {
                // Each record passed alone, so this cannot happen; keep the old table if it does.
                tracing::error!(error = %e, "membership rejected; keeping the previous placement");
                return old.table.uncovered();
            }
        };
        let missing = table.uncovered();
        *self
            .topo
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Arc::new(Topology { table, workers });
        self.generation.send_modify(|g| *g += 1);
        missing
    }

    fn snapshot(&self) -> Vec<WorkerSnapshot> {
        let now = Instant::now();
        self.topology()
            .workers
            .iter()
            .map(|w| WorkerSnapshot {
                id: w.id.clone(),
                calls: w.stats.calls.load(Ordering::Relaxed),
                failures: w.stats.failures.load(Ordering::Relaxed),
                rows: w.stats.rows.load(Ordering::Relaxed),
                latency_micros: w.stats.latency_micros.load(Ordering::Relaxed),
                compute_micros: w.stats.compute_micros.load(Ordering::Relaxed),
                up: w.is_up(now),
            })
            .collect()
    }

    fn first_unreachable_expert(&self) -> Option<(usize, usize)> {
        let now = Instant::now();
        let topo = self.topology();
        (0..self.layers)
            .flat_map(|l| (0..self.experts).map(move |e| (l, e)))
            .find(|&(l, e)| {
                !topo
                    .table
                    .hosts(l, e)
                    .iter()
                    .any(|&w| topo.workers[w].is_up(now))
            })
    }

    /// Picks a worker for every expert used in `plan` ([`assign`], over the hosts not in
    /// back-off, with the work each has in flight) and splits the plan into per-worker shares.
    /// Row `i` of `plan` is global row `global[i]`.
    fn split(
        &self,
        topo: &Topology,
        layer: usize,
        plan: &RoutePlan,
        global: &[usize],
    ) -> Result<Vec<Share>, DispatchError> {
        let now = Instant::now();
        let mut count = vec![0usize; self.experts];
        for &e in plan.experts() {
            count[e as usize] += 1;
        }
        let inflight: Vec<usize> = topo
            .workers
            .iter()
            .map(|w| w.inflight.load(Ordering::Relaxed))
            .collect();
        let (choice, cost) = assign(
            &count,
            |e| {
                topo.table
                    .hosts(layer, e)
                    .iter()
                    .copied()
                    .filter(|&w| topo.workers[w].is_up(now))
            },
            &inflight,
        )
        .map_err(|expert| DispatchError::NoReplica {
            layer,
            expert,
            cause: None,
        })?;
        let mut shares: Vec<Share> = Vec::new();
        let mut slot = vec![usize::MAX; topo.workers.len()];
        for (r, &g) in global.iter().enumerate().take(plan.rows()) {
            let exps = plan.row_experts(r);
            let ws = plan.row_weights(r);
            // Visit this row's workers in the order of their first slot.
            for (i, &e) in exps.iter().enumerate() {
                let w = choice[e as usize];
                if exps[..i].iter().any(|&p| choice[p as usize] == w) {
                    continue;
                }
                if slot[w] == usize::MAX {
                    slot[w] = shares.len();
                    shares.push(Share {
                        worker: w,
                        cost: cost[w],
                        rows: Vec::new(),
                        plan: RoutePlan::new(),
                    });
                }
                let s = &mut shares[slot[w]];
                s.rows.push(g);
                s.plan.push_row(
                    exps.iter()
                        .zip(ws)
                        .filter(|(e, _)| choice[**e as usize] == w)
                        .map(|(e, w)| (*e, *w)),
                );
            }
        }
        shares.sort_by_key(|s| s.worker);
        Ok(shares)
    }

    /// The worker's batch stream, opened if need be; `None` for unary calls.
    async fn stream(&self, w: &Worker) -> Result<Option<Arc<BatchStream>>, tonic::Status> {
        if self.cfg.rpc == RpcMode::Unary || w.unary_only.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let mut g = w.stream.lock().await;
        if let Some(s) = g.as_ref().filter(|s| s.is_open()) {
            return Ok(Some(s.clone()));
        }
        *g = None;
        let opened = tokio::time::timeout(self.cfg.connect_timeout, BatchStream::open(&w.client))
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::unavailable(
                    "opening the batch stream timed out",
                ))
            });
        match opened {
            Ok(s) => {
                let s = Arc::new(s);
                *g = Some(s.clone());
                Ok(Some(s))
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                tracing::info!(worker = %w.id, "worker has no batch stream; using unary calls");
                w.unary_only.store(true, Ordering::Relaxed);
                Ok(None)
            }
            Err(s) => Err(s),
        }
    }

    /// Sends one share and returns its decoded partial sums `[rows, hidden]`.
    async fn call(
        &self,
        w: &Worker,
        layer: usize,
        x: &[f32],
        share: &Share,
    ) -> Result<Vec<f32>, DispatchError> {
        let h = self.hidden;
        let mut xs = Vec::with_capacity(share.rows.len() * h);
        for &r in &share.rows {
            xs.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let batch = encode_batch(
            &self.fingerprint,
            layer as u32,
            h,
            &xs,
            &share.plan,
            self.cfg.wire_dtype,
        );
        drop(xs);
        let n = share.rows.len();
        let mut req = tonic::Request::new(batch);
        req.set_timeout(self.cfg.rpc_timeout);
        let span = tracing::debug_span!("dispatch", layer, worker = %w.id, rows = n);
        let _e = span.enter();
        let st = &w.stats;
        w.inflight.fetch_add(share.cost, Ordering::Relaxed);
        let start = Instant::now();
        let res = match self.stream(w).await {
            Ok(Some(stream)) => {
                let r = stream.call(req.into_inner(), self.cfg.rpc_timeout).await;
                if r.as_ref()
                    .is_err_and(|s| s.code() == tonic::Code::DeadlineExceeded)
                {
                    // The stream may be stuck behind the lost reply; the next batch opens anew.
                    *w.stream.lock().await = None;
                }
                r
            }
            Ok(None) => w.client.clone().forward(req).await.map(|r| r.into_inner()),
            Err(s) => Err(s),
        };
        w.inflight.fetch_sub(share.cost, Ordering::Relaxed);
        st.calls.fetch_add(1, Ordering::Relaxed);
        let reply = match res {
            Ok(r) => r,
            Err(s) => {
                st.failures.fetch_add(1, Ordering::Relaxed);
                return Err(DispatchError::from_status(&w.id, &s, self.cfg.rpc_timeout));
            }
        };
        let bad = |reason: String| DispatchError::BadReply {
            worker: w.id.clone(),
            reason,
        };
        let dtype = WireDType::from_pb(reply.dtype, None).map_err(|e| bad(e.to_string()))?;
        if reply.rows as usize != n
            || reply.hidden_size as usize != h
            || reply.output.len() != n * h * dtype.size()
        {
            return Err(bad(format!(
                "{} rows × {} ({} bytes of {dtype:?}) for a batch of {n} × {h}",
                reply.rows,
                reply.hidden_size,
                reply.output.len()
            )));
        }
        let mut out = vec![0.0f32; n * h];
        decode_rows(&reply.output, dtype, &mut out);
        st.rows.fetch_add(n as u64, Ordering::Relaxed);
        let latency = start.elapsed();
        st.latency_micros
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        metrics::histogram!("switchyard_worker_dispatch_latency_seconds", "worker" => w.id.to_string())
            .record(latency.as_secs_f64());
        st.compute_micros
            .fetch_add(reply.compute_micros, Ordering::Relaxed);
        w.mark_up();
        Ok(out)
    }

    /// Scatters one layer, gathers the partial sums into `out`.
    ///
    /// A share whose worker fails retryably (gone, overloaded, draining, past its deadline, no
    /// longer hosting an expert) is sent again, to other hosts of its experts; the failed
    /// worker stays out of routing for the back-off. When an expert has no live host, the
    /// layer waits for the membership to change (a worker registering or coming back), up to
    /// `expert_wait`. Only the experts of the failed share are recomputed: the attention state
    /// of the step is untouched on this side.
    async fn run_async(
        &self,
        layer: usize,
        x: &[f32],
        plan: &RoutePlan,
        out: &mut [f32],
    ) -> Result<(), DispatchError> {
        let h = self.hidden;
        let started = Instant::now();
        let mut generation = self.generation.subscribe();
        let mut partials: Vec<(Vec<usize>, Vec<f32>)> = Vec::new();
        // Work left: a plan over some global rows. First the whole layer.
        let mut pending = std::borrow::Cow::Borrowed(plan);
        let mut global: Vec<usize> = (0..plan.rows()).collect();
        let mut last_failure: Option<String> = None;
        while pending.rows() > 0 {
            let topo = self.topology();
            generation.borrow_and_update();
            let shares = match self.split(&topo, layer, &pending, &global) {
                Ok(s) => s,
                Err(DispatchError::NoReplica { expert, .. }) => {
                    let waited = started.elapsed();
                    if waited >= self.cfg.expert_wait {
                        return Err(DispatchError::NoReplica {
                            layer,
                            expert,
                            cause: Some(match &last_failure {
                                Some(c) => format!("{c}; waited {waited:.1?} for a host"),
                                None => format!("waited {waited:.1?} for a host"),
                            }),
                        });
                    }
                    if waited.is_zero() || last_failure.is_none() {
                        tracing::warn!(layer, expert, wait = ?self.cfg.expert_wait, "no live host for an expert; waiting for one");
                    }
                    last_failure.get_or_insert_with(|| "no live host".into());
                    // Wake on a membership change, or poll for back-offs running out.
                    let nap = Duration::from_millis(100).min(self.cfg.expert_wait - waited);
                    let _ = tokio::time::timeout(nap, generation.changed()).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let results = join_all(
                shares
                    .iter()
                    .map(|s| self.call(&topo.workers[s.worker], layer, x, s)),
            )
            .await;
            let mut next = RoutePlan::new();
            let mut next_global = Vec::new();
            for (s, r) in shares.into_iter().zip(results) {
                match r {
                    Ok(p) => partials.push((s.rows, p)),
                    Err(e) if e.retryable() => {
                        let w = &topo.workers[s.worker];
                        tracing::warn!(layer, worker = %w.id, error = %e, "expert batch failed; sending it to other hosts");
                        w.mark_down(self.cfg.failure_backoff);
                        last_failure = Some(e.to_string());
                        for (i, &g) in s.rows.iter().enumerate() {
                            next.push_row(
                                s.plan
                                    .row_experts(i)
                                    .iter()
                                    .copied()
                                    .zip(s.plan.row_weights(i).iter().copied()),
                            );
                            next_global.push(g);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            pending = std::borrow::Cow::Owned(next);
            global = next_global;
        }

        // Gather: zero, then add partials in a fixed order. For top-2 routing each row receives at
        // most two partials, and a + b == b + a exactly, so the bits equal embedded mode's.
        out.fill(0.0);
        for (rows, p) in &partials {
            for (i, &r) in rows.iter().enumerate() {
                for (o, v) in out[r * h..(r + 1) * h]
                    .iter_mut()
                    .zip(&p[i * h..(i + 1) * h])
                {
                    *o += v;
                }
            }
        }
        Ok(())
    }
}

/// A status's message and the chain of its source (transport and TLS errors hide there).
fn status_text(s: &tonic::Status) -> String {
    with_sources(s.message().to_string(), std::error::Error::source(s))
}

/// `outer: inner: innermost`, the way transport errors are worth reading.
fn error_chain(e: &dyn std::error::Error) -> String {
    with_sources(e.to_string(), e.source())
}

fn with_sources(mut s: String, mut cur: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A layer's batch running on the dispatch runtime.
struct InFlight {
    rt: tokio::runtime::Handle,
    layer: usize,
    task: tokio::task::JoinHandle<Result<ExpertJob, DispatchError>>,
}

impl PendingExperts for InFlight {
    fn wait(self: Box<Self>) -> switchyard_model::Result<ExpertJob> {
        let layer = self.layer;
        let r = match self.rt.block_on(self.task) {
            Ok(r) => r,
            Err(e) => Err(DispatchError::Lost {
                layer,
                message: e.to_string(),
            }),
        };
        r.map_err(|e| ModelError::Dispatch(Box::new(e)))
    }
}

impl ExpertExecutor for RemoteExperts {
    fn overlaps(&self) -> bool {
        self.inner.cfg.overlap
    }

    fn submit(
        &self,
        layer: LayerId,
        mut job: ExpertJob,
    ) -> switchyard_model::Result<Box<dyn PendingExperts>> {
        if !self.inner.cfg.overlap {
            self.run(layer, &job.x, &job.plan, &mut job.out)?;
            return Ok(Box::new(Finished(job)));
        }
        let inner = self.inner.clone();
        let layer = layer.index();
        let task = self.rt.spawn(async move {
            let ExpertJob { x, plan, mut out } = job;
            inner.run_async(layer, &x, &plan, &mut out).await?;
            Ok(ExpertJob { x, plan, out })
        });
        Ok(Box::new(InFlight {
            rt: self.rt.handle().clone(),
            layer,
            task,
        }))
    }

    fn run(
        &self,
        layer: LayerId,
        x: &[f32],
        plan: &RoutePlan,
        out: &mut [f32],
    ) -> switchyard_model::Result<()> {
        let started = Instant::now();
        let r = self
            .rt
            .block_on(self.inner.run_async(layer.index(), x, plan, out));
        tracing::trace!(
            layer = layer.index(),
            rows = plan.rows(),
            micros = started.elapsed().as_micros() as u64,
            "layer dispatched"
        );
        r.map_err(|e| ModelError::Dispatch(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::{assign, EXPERT_COST_TOKENS};

    /// Hosts 0..n for every expert.
    fn everywhere(n: usize) -> impl Fn(usize) -> std::ops::Range<usize> {
        move |_| 0..n
    }

    #[test]
    fn evenly_used_experts_split_evenly_over_replicas() {
        // A decode step of 32 sequences: 64 picks over 8 experts, unevenly.
        let count = [12, 5, 9, 6, 10, 7, 8, 7];
        let (choice, given) = assign(&count, everywhere(2), &[0, 0]).unwrap();
        let on0 = choice.iter().filter(|&&w| w == 0).count();
        assert_eq!(on0, 4, "experts per worker: {choice:?}");
        let total: usize = count.iter().map(|c| c + EXPERT_COST_TOKENS).sum();
        assert_eq!(given.iter().sum::<usize>(), total);
        assert!(
            given[0].abs_diff(given[1]) <= 12 + EXPERT_COST_TOKENS,
            "{given:?}"
        );
    }

    #[test]
    fn each_worker_reads_about_as_many_weights_whatever_the_token_counts() {
        // Counting tokens alone, in index order, the first worker would take the big expert
        // and the second six small ones.
        let count = [30, 3, 3, 3, 3, 3, 3, 3];
        let (choice, _) = assign(&count, everywhere(2), &[0, 0]).unwrap();
        let on1 = choice.iter().filter(|&&w| w == 1).count();
        assert!((3..=5).contains(&on1), "experts per worker: {choice:?}");
    }

    #[test]
    fn load_in_flight_and_placement_steer_the_choice() {
        let count = [1, 1, 0, 1];
        // Expert 3 lives on worker 0 alone; the others anywhere; worker 0 is busy.
        let hosts = |e: usize| if e == 3 { 0..1 } else { 0..2 };
        let (choice, given) = assign(&count, hosts, &[1000, 0]).unwrap();
        assert_eq!(choice, vec![1, 1, usize::MAX, 0]);
        assert_eq!(
            given,
            vec![1 + EXPERT_COST_TOKENS, 2 * (1 + EXPERT_COST_TOKENS)]
        );
    }

    #[test]
    fn an_expert_with_tokens_and_no_host_is_named() {
        let hosts = |e: usize| if e == 2 { 0..0 } else { 0..1 };
        assert_eq!(assign(&[1, 0, 4], hosts, &[0]), Err(2));
        // Without tokens it needs no host.
        assert!(assign(&[1, 0, 0], hosts, &[0]).is_ok());
    }
}
