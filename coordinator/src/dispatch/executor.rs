//! `RemoteExperts`: the cluster's `ExpertExecutor`. Per layer it assigns experts to workers
//! (`assign`), sends each its share over its transport concurrently, retries failed shares on
//! other hosts, and gathers the partial sums in a fixed order.

use super::{
    assign::{assign, split_rows, Share},
    config::dispatch_runtime,
    topology::{Topology, Worker, WorkerSnapshot},
    transport::{BatchStream, Transport, Unary},
    DispatchConfig, DispatchError, RpcMode,
};
use futures::future::join_all;
use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc, RwLock},
    time::{Duration, Instant},
};
use switchyard_cluster::{PlacementTable, StaticPlacement, WorkerId, WorkerRecord};
use switchyard_model::{
    ExpertExecutor, ExpertJob, Finished, LayerId, MixtralConfig, ModelError, PendingExperts,
    RoutePlan,
};
use switchyard_wire::{encode_batch, ExpertReply};

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
        let topo = rt.block_on(Topology::dial(placement, model, fingerprint, &cfg))?;
        Ok(Self::with_topology(rt, topo, model, fingerprint, cfg))
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
        let Some(topo) =
            old.with_members(members, &self.model, &self.fingerprint, &self.cfg, &self.rt)
        else {
            return old.table.uncovered();
        };
        let missing = topo.table.uncovered();
        *self
            .topo
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(topo);
        self.generation.send_modify(|g| *g += 1);
        missing
    }

    fn snapshot(&self) -> Vec<WorkerSnapshot> {
        let now = Instant::now();
        let topo = self.topology();
        topo.workers
            .iter()
            .enumerate()
            .map(|(i, w)| WorkerSnapshot {
                experts: topo.table.everywhere(i),
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
        let past: Vec<u64> = topo
            .workers
            .iter()
            .map(|w| w.given.load(Ordering::Relaxed))
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
            &past,
        )
        .map_err(|expert| DispatchError::NoReplica {
            layer,
            expert,
            cause: None,
        })?;
        Ok(split_rows(plan, global, &choice, &cost))
    }

    /// How a batch goes to `w`: its batch stream, opened if need be, or unary calls.
    async fn transport(&self, w: &Worker) -> Result<Arc<dyn Transport>, tonic::Status> {
        let unary = || -> Arc<dyn Transport> { Arc::new(Unary(w.client.clone())) };
        if self.cfg.rpc == RpcMode::Unary || w.unary_only.load(Ordering::Relaxed) {
            return Ok(unary());
        }
        let mut g = w.stream.lock().await;
        if let Some(s) = g.as_ref().filter(|s| s.is_open()) {
            return Ok(s.clone());
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
                Ok(s)
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                tracing::info!(worker = %w.id, "worker has no batch stream; using unary calls");
                w.unary_only.store(true, Ordering::Relaxed);
                Ok(unary())
            }
            Err(s) => Err(s),
        }
    }

    /// Sends one share and returns its decoded partial sums `[rows, hidden]`, in a `dispatch`
    /// span (whose trace context a traced batch carries to the worker).
    async fn call(
        &self,
        w: &Worker,
        layer: usize,
        x: &[f32],
        share: &Share,
    ) -> Result<Vec<f32>, DispatchError> {
        let span = tracing::debug_span!(
            "dispatch",
            layer,
            worker = %w.id,
            rows = share.rows.len(),
            experts = tracing::field::Empty,
        );
        if !span.is_disabled() {
            let mut distinct: Vec<u16> = share.plan.experts().to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            span.record("experts", format!("{distinct:?}"));
        }
        tracing::Instrument::instrument(self.send(w, layer, x, share), span).await
    }

    async fn send(
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
        let n = share.rows.len();
        // Inside the dispatch span: a traced batch carries its context to the worker.
        let batch = encode_batch(
            &self.fingerprint,
            layer as u32,
            h,
            &xs,
            &share.plan,
            self.cfg.wire_dtype,
        );
        drop(xs);
        let st = &w.stats;
        w.inflight.fetch_add(share.cost, Ordering::Relaxed);
        w.given.fetch_add(share.cost as u64, Ordering::Relaxed);
        let start = Instant::now();
        let res = match self.transport(w).await {
            Ok(t) => {
                let r = t.call(batch, self.cfg.rpc_timeout).await;
                if t.broken_by_timeout()
                    && r.as_ref()
                        .is_err_and(|s| s.code() == tonic::Code::DeadlineExceeded)
                {
                    // The stream may be stuck behind the lost reply; the next batch opens anew.
                    *w.stream.lock().await = None;
                }
                r
            }
            Err(s) => Err(s),
        };
        w.inflight.fetch_sub(share.cost, Ordering::Relaxed);
        st.calls.fetch_add(1, Ordering::Relaxed);
        let reply = res
            .map_err(|s| DispatchError::from_status(&w.id, &s, self.cfg.rpc_timeout))
            .and_then(|r| {
                ExpertReply::decode(&r, n, h).map_err(|e| DispatchError::BadReply {
                    worker: w.id.clone(),
                    reason: e.to_string(),
                })
            });
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                st.failures.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        st.rows.fetch_add(n as u64, Ordering::Relaxed);
        let latency = start.elapsed();
        st.latency_micros
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        w.record_latency(latency);
        st.compute_micros
            .fetch_add(reply.compute_micros, Ordering::Relaxed);
        w.mark_up();
        Ok(reply.output)
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
                    self.wait_for_host(layer, expert, started, &mut last_failure, &mut generation)
                        .await?;
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
                        // A worker that let a call time out is likely stuck: it sits out at
                        // least as long as a call may take.
                        let backoff = if e.timed_out() {
                            self.cfg.failure_backoff.max(self.cfg.rpc_timeout)
                        } else {
                            self.cfg.failure_backoff
                        };
                        w.mark_down(backoff);
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
            // `expert_wait` bounds the whole layer, retries included: with every host failing
            // in turn (slow, stuck), resends would otherwise cycle as back-offs run out.
            if next.rows() > 0 && started.elapsed() >= self.cfg.expert_wait {
                return Err(DispatchError::NoReplica {
                    layer,
                    expert: next.experts().first().map_or(0, |&e| e as usize),
                    cause: Some(format!(
                        "{}; gave up after {:.1?}",
                        last_failure.as_deref().unwrap_or("every host failed"),
                        started.elapsed()
                    )),
                });
            }
            pending = std::borrow::Cow::Owned(next);
            global = next_global;
        }

        gather(&partials, h, out);
        Ok(())
    }

    /// Expert `expert` of `layer` has no live host: waits for a membership change or a
    /// back-off to run out, or fails once the layer has waited `expert_wait`.
    async fn wait_for_host(
        &self,
        layer: usize,
        expert: usize,
        started: Instant,
        last_failure: &mut Option<String>,
        generation: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Result<(), DispatchError> {
        let waited = started.elapsed();
        if waited >= self.cfg.expert_wait {
            return Err(DispatchError::NoReplica {
                layer,
                expert,
                cause: Some(match last_failure {
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
        Ok(())
    }
}

/// Zero, then add the partials in a fixed order. For top-2 routing each row receives at most
/// two partials, and a + b == b + a exactly, so the bits equal embedded mode's.
fn gather(partials: &[(Vec<usize>, Vec<f32>)], h: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (rows, p) in partials {
        for (i, &r) in rows.iter().enumerate() {
            for (o, v) in out[r * h..(r + 1) * h]
                .iter_mut()
                .zip(&p[i * h..(i + 1) * h])
            {
                *o += v;
            }
        }
    }
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
