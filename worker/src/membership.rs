//! The worker's side of the etcd registry: a record under a lease that says where it listens,
//! what it hosts and how loaded it is; and, for a managed worker (started without
//! `--experts`), following the planner's assignment.
//!
//! Assignment changes are make-before-break: new experts are loaded and served before the
//! record advertises them; an expert leaves the record only once another live worker
//! advertises it, and stays served for a grace period after that, so coordinators that have not
//! yet seen the new record still get answers.

use crate::ExpertServer;
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};
use switchyard_cluster::{
    record::unix_ms, registry, PlanRecord, RegistryConfig, WorkerLoad, WorkerRecord,
};
use switchyard_model::{Checkpoint, Cpu, ExpertSet, LocalExperts, NoProgress};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How a worker takes part in a registry.
#[derive(Clone, Debug)]
pub struct Membership {
    pub registry: RegistryConfig,
    /// The address coordinators dial (the worker's key in the registry); empty: the bound one.
    pub advertise: String,
    /// Bytes of expert weights this worker may hold (the planner's capacity).
    pub memory_budget: u64,
    /// Follows the planner's assignment (no `--experts` given).
    pub managed: bool,
    /// How often the load in the record is refreshed.
    pub load_interval: Duration,
}

/// How long an expert stays served after the record stops advertising it.
const DROP_GRACE: Duration = Duration::from_secs(2);

struct Agent {
    server: Arc<ExpertServer>,
    m: Membership,
    ck: Option<Arc<Checkpoint>>,
    instance: String,
    bytes_per_expert: u64,
    device: String,
    /// Experts advertised in the record (may lag what is served).
    advertised: Vec<u32>,
    load: WorkerLoad,
    last_load: (Instant, u64, u64),
    record: watch::Sender<Vec<u8>>,
}

impl Agent {
    fn record(&self) -> WorkerRecord {
        let info = self.server.info();
        WorkerRecord {
            addr: self.m.advertise.clone(),
            instance: self.instance.clone(),
            hosted: (0..info.num_layers)
                .map(|_| self.advertised.clone())
                .collect(),
            managed: self.m.managed,
            device: self.device.clone(),
            memory_budget_bytes: self.m.memory_budget,
            bytes_per_expert: self.bytes_per_expert,
            weight_bytes: info.weight_bytes,
            model_fingerprint: info.model_fingerprint,
            weight_format: info.weight_dtype,
            protocol_version: info.protocol_version,
            worker_version: info.worker_version,
            kernels: info.kernels,
            load: self.load.clone(),
        }
    }

    fn publish(&self) {
        match serde_json::to_vec(&self.record()) {
            Ok(v) => {
                self.record.send_replace(v);
            }
            Err(e) => tracing::error!(error = %e, "cannot encode the worker record"),
        }
    }

    fn refresh_load(&mut self) {
        let s = self.server.stats();
        let (rows, busy) = (
            s.rows.load(Ordering::Relaxed),
            s.busy_micros.load(Ordering::Relaxed),
        );
        let (t0, rows0, busy0) = self.last_load;
        let dt = t0.elapsed().as_secs_f64().max(1e-3);
        self.load = WorkerLoad {
            batches_total: s.batches.load(Ordering::Relaxed),
            rows_total: rows,
            busy_micros: busy,
            rows_per_sec: (rows - rows0) as f64 / dt,
            busy_fraction: ((busy - busy0) as f64 / 1e6 / dt).min(1.0),
        };
        self.last_load = (Instant::now(), rows, busy);
    }

    fn served(&self) -> Vec<u32> {
        self.server
            .experts()
            .hosted()
            .iter()
            .map(|e| e as u32)
            .collect()
    }

    /// Loads `want` (on a plain thread: loading touches every page of the weights) and serves it.
    async fn serve_set(&self, want: &[u32]) -> bool {
        let Some(ck) = self.ck.clone() else {
            return false;
        };
        let n = self.server.config().num_local_experts;
        let set = ExpertSet::from_indices(n, want.iter().map(|&e| e as usize));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let backend = self.server.backend().clone();
        std::thread::spawn(move || {
            let _ = tx.send(LocalExperts::load(&backend, &ck, &set, &NoProgress));
        });
        match rx.await {
            Ok(Ok(experts)) => {
                self.server.set_experts(Arc::new(experts));
                true
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot load the assigned experts; keeping the current ones");
                false
            }
            Err(_) => false,
        }
    }

    /// One reconciliation step towards the plan's assignment.
    async fn follow(
        &mut self,
        plan: Option<&PlanRecord>,
        members: &BTreeMap<String, WorkerRecord>,
    ) {
        let Some(want) = plan.and_then(|p| p.assign.get(&self.m.advertise)) else {
            return;
        };
        let want: BTreeSet<u32> = want.iter().copied().collect();
        let served: BTreeSet<u32> = self.served().into_iter().collect();
        // Make: load and serve what is new, then advertise it.
        if !want.is_subset(&served) {
            let union: Vec<u32> = served.union(&want).copied().collect();
            tracing::info!(experts = ?union, "loading newly assigned experts");
            if !self.serve_set(&union).await {
                return;
            }
            self.advertised = union;
            self.publish();
        }
        // Break: stop advertising what another live worker advertises, wait, stop serving.
        let others = |e: u32| {
            members.values().any(|r| {
                r.addr != self.m.advertise
                    && r.model_fingerprint == self.server.fingerprint()
                    && r.experts_everywhere().contains(&e)
            })
        };
        let drop: Vec<u32> = self
            .advertised
            .iter()
            .copied()
            .filter(|e| !want.contains(e) && others(*e))
            .collect();
        if drop.is_empty() {
            return;
        }
        tracing::info!(experts = ?drop, "handing over experts assigned elsewhere");
        self.advertised.retain(|e| !drop.contains(e));
        self.publish();
        tokio::time::sleep(DROP_GRACE).await;
        let keep = self.advertised.clone();
        self.serve_set(&keep).await;
    }
}

impl Agent {
    /// The agent of `server`, advertising what it hosts now.
    fn new(
        server: Arc<ExpertServer>,
        m: Membership,
        model: &std::path::Path,
        device: String,
        record: watch::Sender<Vec<u8>>,
    ) -> Self {
        let opened = Checkpoint::open(model).and_then(|mut ck| {
            ck.set_quantize(server.quantize())?;
            Ok(ck)
        });
        let ck = match opened {
            Ok(ck) => Some(Arc::new(ck)),
            Err(e) => {
                tracing::error!(error = %e, "cannot reopen the checkpoint; assignments cannot be followed");
                None
            }
        };
        let experts = server.config().num_local_experts;
        let bytes_per_expert = ck.as_ref().map_or(0, |ck| {
            LocalExperts::<Cpu>::bytes_loaded(ck, &ExpertSet::from_indices(experts, [0]))
        });
        Self {
            advertised: server.experts().hosted().iter().map(|e| e as u32).collect(),
            server,
            instance: format!("{}-{}", std::process::id(), unix_ms()),
            bytes_per_expert,
            device,
            ck,
            load: WorkerLoad::default(),
            last_load: (Instant::now(), 0, 0),
            record,
            m,
        }
    }
}

/// Registers the worker (serving `server` on the bound address) and, if managed, follows the
/// planner until `stop`. Runs on the worker's runtime.
pub async fn run(
    server: Arc<ExpertServer>,
    m: Membership,
    model: std::path::PathBuf,
    device: String,
    stop: CancellationToken,
) {
    let (record_tx, record_rx) = watch::channel(Vec::new());
    let mut agent = Agent::new(server, m, &model, device, record_tx);
    agent.publish();
    let keys = agent.m.registry.keys().clone();
    tokio::spawn(registry::keep_alive(
        agent.m.registry.clone(),
        keys.worker(&agent.m.advertise),
        record_rx,
        stop.clone(),
    ));
    let (plan_tx, mut plan_rx) = watch::channel(None);
    let (members_tx, mut members_rx) = watch::channel(None);
    if agent.m.managed {
        tokio::spawn(registry::watch_prefix(
            agent.m.registry.clone(),
            keys.plan(),
            plan_tx,
            stop.clone(),
        ));
        tokio::spawn(registry::watch_prefix(
            agent.m.registry.clone(),
            keys.workers(),
            members_tx,
            stop.clone(),
        ));
    }
    let mut tick = tokio::time::interval(agent.m.load_interval);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                agent.refresh_load();
                agent.publish();
            }
            r = plan_rx.changed(), if agent.m.managed => { if r.is_err() { return; } }
            r = members_rx.changed(), if agent.m.managed => { if r.is_err() { return; } }
        }
        if agent.m.managed {
            let plan: Option<PlanRecord> = plan_rx
                .borrow_and_update()
                .as_ref()
                .and_then(|m| m.get(""))
                .and_then(|v| serde_json::from_slice(v).ok());
            let members = members_rx
                .borrow_and_update()
                .as_ref()
                .map(registry::parse_workers)
                .unwrap_or_default();
            agent.follow(plan.as_ref(), &members).await;
        }
    }
}
