//! `RemoteExperts`: scatter/gather of one layer's expert batches over long-lived gRPC channels.

use super::DispatchError;
use futures::future::join_all;
use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};
use switchyard_cluster::{PlacementTable, StaticPlacement, WorkerId};
use switchyard_model::{ExpertExecutor, LayerId, MixtralConfig, ModelError, RoutePlan};
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
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            wire_dtype: WireDType::F32,
            rpc_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            failure_backoff: Duration::from_secs(2),
        }
    }
}

/// Per-worker counters.
#[derive(Default, Debug)]
pub struct WorkerStats {
    pub calls: AtomicU64,
    pub failures: AtomicU64,
    pub rows: AtomicU64,
    /// Sum of call latencies (send to reply decoded).
    pub latency_micros: AtomicU64,
    /// Sum of the compute time the worker reported.
    pub compute_micros: AtomicU64,
}

/// Dispatch counters per worker (per-expert routed tokens are counted by
/// `crate::counting::Counting`, for every executor alike).
#[derive(Debug)]
pub struct DispatchStats {
    pub workers: Vec<WorkerStats>,
}

struct Worker {
    id: WorkerId,
    client: ExpertServiceClient<Channel>,
    /// Tokens sent and not yet answered: the load measure for choosing among replicas.
    inflight: AtomicUsize,
    /// Out of routing until this instant (after a failure).
    down_until: Mutex<Option<Instant>>,
}

impl Worker {
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

/// Experts on remote workers.
///
/// It owns a current-thread tokio runtime and drives it from the calling (engine) thread in
/// `run`: the request is written and the reply read on the thread that needs it, with no
/// hand-off to I/O threads (each hand-off costs a wake-up, tens of µs, twice per call). Between
/// calls nothing polls the connections; an idle connection the worker drops is re-dialled on
/// the next call.
pub struct RemoteExperts {
    rt: tokio::runtime::Runtime,
    table: PlacementTable,
    workers: Vec<Worker>,
    fingerprint: String,
    hidden: usize,
    layers: usize,
    experts: usize,
    cfg: DispatchConfig,
    stats: DispatchStats,
}

/// One worker's share of a layer.
struct Share {
    worker: usize,
    /// Global row index of each row sent.
    rows: Vec<usize>,
    plan: RoutePlan,
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DispatchError::Connect {
                worker: WorkerId::new("-"),
                message: format!("cannot start the dispatch runtime: {e}"),
            })?;
        let infos = rt
            .block_on(join_all(placement.workers.iter().map(|spec| {
                let cfg = cfg.clone();
                async move {
                    let id = WorkerId::new(&spec.addr);
                    let connect_err = |message: String| DispatchError::Connect {
                        worker: id.clone(),
                        message,
                    };
                    let ep = Endpoint::from_shared(format!("http://{}", spec.addr))
                        .map_err(|e| connect_err(e.to_string()))?
                        .connect_timeout(cfg.connect_timeout)
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(10))
                        .keep_alive_timeout(Duration::from_secs(5))
                        .keep_alive_while_idle(true);
                    let channel = ep
                        .connect()
                        .await
                        .map_err(|e| connect_err(error_chain(&e)))?;
                    let max_msg = usize::MAX;
                    let mut client = ExpertServiceClient::new(channel)
                        .max_decoding_message_size(max_msg)
                        .max_encoding_message_size(max_msg);
                    let mut req = tonic::Request::new(pb::InfoRequest {});
                    req.set_timeout(cfg.connect_timeout);
                    let info = client
                        .info(req)
                        .await
                        .map_err(|s| connect_err(format!("Info failed: {}", s.message())))?
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
        let workers: Vec<Worker> = infos
            .into_iter()
            .map(|(spec, _, client)| Worker {
                id: WorkerId::new(&spec.addr),
                client,
                inflight: AtomicUsize::new(0),
                down_until: Mutex::new(None),
            })
            .collect();
        for (w, (spec, info)) in workers.iter().zip(&pairs) {
            let experts: Vec<u32> = info
                .hosted
                .first()
                .map(|l| l.experts.clone())
                .unwrap_or_default();
            tracing::info!(worker = %w.id, ?experts, device = %info.device, weight_bytes = info.weight_bytes, spec = ?spec.experts, "worker joined");
        }
        Ok(Self {
            rt,
            stats: DispatchStats {
                workers: workers.iter().map(|_| WorkerStats::default()).collect(),
            },
            table,
            workers,
            fingerprint: fingerprint.to_string(),
            hidden: model.hidden_size,
            layers: model.num_hidden_layers,
            experts: model.num_local_experts,
            cfg,
        })
    }

    /// Counters since start.
    #[must_use]
    pub fn stats(&self) -> &DispatchStats {
        &self.stats
    }

    /// The first (layer, expert) with no worker outside failure back-off, if any (readiness).
    #[must_use]
    pub fn first_unreachable_expert(&self) -> Option<(usize, usize)> {
        let now = Instant::now();
        (0..self.layers)
            .flat_map(|l| (0..self.experts).map(move |e| (l, e)))
            .find(|&(l, e)| {
                !self
                    .table
                    .hosts(l, e)
                    .iter()
                    .any(|&w| self.workers[w].is_up(now))
            })
    }

    /// Worker ids in placement order.
    #[must_use]
    pub fn workers(&self) -> Vec<WorkerId> {
        self.workers.iter().map(|w| w.id.clone()).collect()
    }

    /// Picks a worker for every expert used in `plan` (least tokens in flight plus tokens
    /// already given to it in this layer; lowest index on ties), skipping `exclude` and workers
    /// in back-off, and splits the plan into per-worker shares.
    fn split(
        &self,
        layer: usize,
        plan: &RoutePlan,
        rows: &[usize],
        exclude: &[usize],
    ) -> Result<Vec<Share>, DispatchError> {
        let now = Instant::now();
        let mut count = vec![0usize; self.experts];
        for &r in rows {
            for &e in plan.row_experts(r) {
                count[e as usize] += 1;
            }
        }
        let mut assigned = vec![0usize; self.workers.len()];
        let mut choice = vec![usize::MAX; self.experts];
        for (e, &c) in count.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let hosts = self.table.hosts(layer, e);
            let best = hosts
                .iter()
                .copied()
                .filter(|w| !exclude.contains(w) && self.workers[*w].is_up(now))
                .min_by_key(|&w| {
                    (
                        self.workers[w].inflight.load(Ordering::Relaxed) + assigned[w],
                        w,
                    )
                })
                .ok_or(DispatchError::NoReplica {
                    layer,
                    expert: e,
                    cause: None,
                })?;
            choice[e] = best;
            assigned[best] += c;
        }
        let mut shares: Vec<Share> = Vec::new();
        let mut slot = vec![usize::MAX; self.workers.len()];
        for &r in rows {
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
                        rows: Vec::new(),
                        plan: RoutePlan::new(),
                    });
                }
                let s = &mut shares[slot[w]];
                s.rows.push(r);
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

    /// Sends one share and returns its decoded partial sums `[rows, hidden]`.
    async fn call(
        &self,
        layer: usize,
        x: &[f32],
        share: &Share,
    ) -> Result<Vec<f32>, DispatchError> {
        let w = &self.workers[share.worker];
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
        let st = &self.stats.workers[share.worker];
        w.inflight.fetch_add(n, Ordering::Relaxed);
        let start = Instant::now();
        let res = w.client.clone().forward(req).await;
        w.inflight.fetch_sub(n, Ordering::Relaxed);
        st.calls.fetch_add(1, Ordering::Relaxed);
        let reply = match res {
            Ok(r) => r.into_inner(),
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
        st.latency_micros
            .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        st.compute_micros
            .fetch_add(reply.compute_micros, Ordering::Relaxed);
        w.mark_up();
        Ok(out)
    }

    async fn run_async(
        &self,
        layer: usize,
        x: &[f32],
        plan: &RoutePlan,
        out: &mut [f32],
    ) -> Result<(), DispatchError> {
        let h = self.hidden;
        let all: Vec<usize> = (0..plan.rows()).collect();
        let shares = self.split(layer, plan, &all, &[])?;
        let results = join_all(shares.iter().map(|s| self.call(layer, x, s))).await;

        // Retry each retryable failure once, on replicas of that share's experts.
        let mut partials: Vec<(Vec<usize>, Vec<f32>)> = Vec::new();
        let mut failed: Vec<usize> = Vec::new();
        let mut retry: Vec<(&Share, DispatchError)> = Vec::new();
        for (s, r) in shares.iter().zip(results) {
            match r {
                Ok(p) => partials.push((s.rows.clone(), p)),
                Err(e) if e.retryable() => {
                    tracing::warn!(layer, worker = %self.workers[s.worker].id, error = %e, "expert batch failed; retrying on replicas");
                    self.workers[s.worker].mark_down(self.cfg.failure_backoff);
                    failed.push(s.worker);
                    retry.push((s, e));
                }
                Err(e) => return Err(e),
            }
        }
        for (s, cause) in retry {
            // The failed share's entries, as a plan over the original rows.
            let mut sub = RoutePlan::new();
            let mut rows = Vec::with_capacity(s.rows.len());
            for i in 0..s.rows.len() {
                sub.push_row(
                    s.plan
                        .row_experts(i)
                        .iter()
                        .copied()
                        .zip(s.plan.row_weights(i).iter().copied()),
                );
                rows.push(i);
            }
            let again = self
                .split(layer, &sub, &rows, &failed)
                .map_err(|e| match e {
                    DispatchError::NoReplica { layer, expert, .. } => DispatchError::NoReplica {
                        layer,
                        expert,
                        cause: Some(cause.to_string()),
                    },
                    other => other,
                })?;
            // `again` indexes rows of `sub`; map them back to global rows. `x` rows are global.
            let global: Vec<usize> = s.rows.clone();
            let xs: Vec<f32> = global
                .iter()
                .flat_map(|&r| x[r * h..(r + 1) * h].iter().copied())
                .collect();
            let res = join_all(again.iter().map(|a| self.call(layer, &xs, a))).await;
            for (a, r) in again.iter().zip(res) {
                let p = r?;
                partials.push((a.rows.iter().map(|&i| global[i]).collect(), p));
            }
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

/// `outer: inner: innermost`, the way transport errors are worth reading.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
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

impl ExpertExecutor for RemoteExperts {
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
            .block_on(self.run_async(layer.index(), x, plan, out));
        tracing::trace!(
            layer = layer.index(),
            rows = plan.rows(),
            micros = started.elapsed().as_micros() as u64,
            "layer dispatched"
        );
        r.map_err(|e| ModelError::Dispatch(Box::new(e)))
    }
}
