//! The capacity planner: where a model's experts go on given hosts, what each role holds, and
//! the decode throughput to expect, from a cost model calibrated on a real machine
//! (`switchyard bench --calibrate`).
//!
//! A decode step of `B` streams runs every layer as the coordinator does: attention for the
//! step's tokens (in two micro-batches with `--overlap on`, so one's attention overlaps the
//! other's experts), a call to each worker hosting a routed expert, and the gather. Expert
//! time is the calibrated per-byte cost of a SwiGLU expert at the rows routed to it, one
//! weight read per expert per call; which experts get tokens, and on which replica, is sampled
//! the way the coordinator routes and assigns (uniform top-k routing, heaviest expert first to
//! the least-loaded host). The step takes the longest of its critical path and what each
//! resource can deliver over a step: a worker's or coordinator's CPU share (a quota below a
//! core is throttled over time but runs at full speed while under it) and each link's rate.
//! Several coordinators share the workers' share and add their streams.
//!
//! What it leaves out: prefill (steps of many tokens), routing skew (real models route
//! unevenly; the prediction is for even routing), coalescing of coordinators' batches, memory
//! bandwidth shared between roles on one host, and CPU frequency differences beyond the
//! calibrated per-core costs.

mod calibration;
mod spec;

pub use calibration::{Calibration, LinearCost, RpcCost};
pub use spec::{HostSpec, NetSpec};

use crate::planner::{self, PlanInput, PlanWorker};
use rand::SeedableRng;
use switchyard_model::{weights::DType, MixtralConfig};

/// Why no plan.
#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    #[error("{0}")]
    Spec(String),
    #[error("{0}")]
    DoesNotFit(String),
    #[error("the calibration has no cost curve for {0} weights: run `switchyard bench --calibrate` on a checkpoint of that format (or with --quantize)")]
    Uncalibrated(String),
}

/// What a worker process holds beyond its experts (code, runtime, buffers), as measured: RSS is
/// 1.01-1.02× the experts' bytes at Mixtral-8x7B's shape.
pub const WORKER_RUNTIME_BYTES: u64 = 64 << 20;
/// What a coordinator holds beyond its weights and KV cache.
pub const COORDINATOR_RUNTIME_BYTES: u64 = 256 << 20;
/// The coordinator's assignment weighs an expert's weight read as this many tokens (its
/// `dispatch::assign::EXPERT_COST_TOKENS`).
const EXPERT_COST_TOKENS: usize = 16;
/// Bytes of one route entry on the wire (expert id and weight).
const ROUTE_ENTRY_BYTES: usize = 8;
/// Routing samples per prediction.
const SAMPLES: usize = 400;

/// A model's shape, as far as costs go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub q_dim: usize,
    pub kv_dim: usize,
    pub vocab: usize,
    pub experts: usize,
    pub top_k: usize,
    pub tied: bool,
}

impl Shape {
    #[must_use]
    pub fn of(cfg: &MixtralConfig) -> Self {
        Self {
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            layers: cfg.num_hidden_layers,
            q_dim: cfg.q_dim(),
            kv_dim: cfg.kv_dim(),
            vocab: cfg.vocab_size,
            experts: cfg.num_local_experts,
            top_k: cfg.num_experts_per_tok,
            tied: cfg.tie_word_embeddings,
        }
    }

    /// Mistral's Mixtral-8x7B at `layers` layers (32 in the real one).
    #[must_use]
    pub fn mixtral_8x7b(layers: usize) -> Self {
        Self {
            hidden: 4096,
            intermediate: 14336,
            layers,
            q_dim: 4096,
            kv_dim: 1024,
            vocab: 32000,
            experts: 8,
            top_k: 2,
            tied: false,
        }
    }

    /// Weights of one expert in one layer.
    #[must_use]
    pub fn expert_params(&self) -> usize {
        3 * self.hidden * self.intermediate
    }

    /// q, k, v, o and the router of one layer.
    #[must_use]
    pub fn attention_params(&self) -> usize {
        self.hidden * (2 * self.q_dim + 2 * self.kv_dim) + self.hidden * self.experts
    }
}

/// What to plan for.
#[derive(Clone, Debug)]
pub struct PlanRequest {
    pub shape: Shape,
    /// The coordinator's weights (attention, embeddings, LM head).
    pub dense: DType,
    /// The experts' weights (the checkpoint's, or what `--quantize` makes them).
    pub experts: DType,
    /// The expert workers' hosts.
    pub workers: HostSpec,
    /// The coordinators' hosts (`count` coordinators).
    pub coordinator: HostSpec,
    pub net: NetSpec,
    /// Concurrent streams per coordinator.
    pub streams: usize,
    /// Positions each stream has in its KV cache while decoding.
    pub context: usize,
    /// Bytes per KV cache element (4 for f32, 2 for bf16).
    pub kv_elem_bytes: usize,
    /// Bytes per activation on the wire (4 for f32, 2 for bf16).
    pub wire_elem_bytes: usize,
    /// Fill spare worker memory with replicas (the coordinator balances over them).
    pub replicate: bool,
    /// Dual-batch overlap (`serve --overlap on`): two micro-batches per step, one's attention
    /// while the other's experts are away.
    pub overlap: bool,
    /// Memory each host keeps for the system.
    pub reserve_bytes: u64,
}

/// What limits a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// The layer loop's own sequence of attention, dispatch and experts.
    Latency,
    WorkerCpu,
    CoordinatorCpu,
    Network,
}

/// A predicted decode rate.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Rate {
    /// Streams per coordinator.
    pub streams: usize,
    /// Tokens per second over all coordinators.
    pub tok_s: f64,
    pub step_ms: f64,
    pub limit: Limit,
    /// What each limit alone would make a step: its critical path at full speed, and the time
    /// the busiest worker's CPU share, a coordinator's share and the busiest link need for
    /// one step's work (every coordinator's, for the workers and their links), ms.
    pub path_ms: f64,
    pub worker_cpu_ms: f64,
    pub coordinator_cpu_ms: f64,
    pub network_ms: f64,
    /// One layer of one step on its critical path: the coordinator's attention, its dispatch
    /// (RPC CPU, links, latency) and the slowest worker's experts, ms.
    pub attention_ms: f64,
    pub dispatch_ms: f64,
    pub experts_ms: f64,
}

/// The planner's answer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Capacity {
    /// Each worker's experts (each in every layer).
    pub placement: Vec<Vec<u32>>,
    pub replicas: Vec<usize>,
    /// One expert in every layer.
    pub expert_bytes: u64,
    /// Each worker's resident memory: its experts and its runtime.
    pub worker_bytes: Vec<u64>,
    /// A coordinator's weights and runtime, before its KV cache.
    pub coordinator_bytes: u64,
    pub kv_bytes_per_token: u64,
    /// KV positions that fit in each coordinator's remaining memory.
    pub kv_tokens: u64,
    /// Bytes over the network per generated token (both ways, all layers), at 1 and at
    /// `streams` streams, and per step of `streams`.
    pub net_bytes_per_token_batch1: f64,
    pub net_bytes_per_token: f64,
    pub net_bytes_per_step: f64,
    pub batch1: Rate,
    pub at_streams: Rate,
    /// How many coordinators of `streams` streams these workers can feed.
    pub fill: Fill,
}

/// Coordinators the workers can feed: counting up from one, the last one that adds at least
/// half of what one coordinator alone decodes (at most [`MAX_FILL`]), and the rate of them all
/// at `streams` each. 1 where a single coordinator already keeps the workers (or the links)
/// busy; where the coordinators are the limit, each added one brings about its own rate until
/// the workers fill.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Fill {
    pub coordinators: usize,
    pub tok_s: f64,
}

/// The most coordinators [`Fill`] counts to.
pub const MAX_FILL: usize = 64;

/// Plans `req` with `cal`'s costs.
pub fn plan(req: &PlanRequest, cal: &Calibration) -> Result<Capacity, CapacityError> {
    let s = &req.shape;
    if s.experts == 0 || s.top_k == 0 || s.top_k > s.experts || s.layers == 0 {
        return Err(CapacityError::Spec(format!(
            "a model of {} experts, top-{}, {} layers cannot be planned",
            s.experts, s.top_k, s.layers
        )));
    }
    if req.streams == 0 {
        return Err(CapacityError::Spec("--streams must be at least 1".into()));
    }
    let costs = Costs::new(req, cal)?;
    let (placement, replicas) = place(req, costs.expert_bytes)?;
    let coordinator_bytes = costs.coordinator_weights + COORDINATOR_RUNTIME_BYTES;
    let kv_bytes_per_token = (s.layers * 2 * s.kv_dim * req.kv_elem_bytes) as u64;
    let room = req
        .coordinator
        .memory_bytes
        .checked_sub(req.reserve_bytes + coordinator_bytes)
        .filter(|r| *r >= kv_bytes_per_token * req.context.max(1) as u64)
        .ok_or_else(|| {
            CapacityError::DoesNotFit(format!(
                "a coordinator needs {} for its weights and runtime, {} reserved, and a KV cache; its host has {}",
                gib(coordinator_bytes),
                gib(req.reserve_bytes),
                gib(req.coordinator.memory_bytes)
            ))
        })?;
    let sim = Simulation {
        costs: &costs,
        placement: &placement,
    };
    let coords = req.coordinator.count;
    let batch1 = sim.rate(1, coords);
    let at_streams = sim.rate(req.streams, coords);
    let fill = sim.fill(req.streams);
    Ok(Capacity {
        worker_bytes: placement
            .iter()
            .map(|p| p.len() as u64 * costs.expert_bytes + WORKER_RUNTIME_BYTES)
            .collect(),
        placement,
        replicas,
        expert_bytes: costs.expert_bytes,
        coordinator_bytes,
        kv_bytes_per_token,
        kv_tokens: room / kv_bytes_per_token,
        net_bytes_per_token_batch1: batch1.1,
        net_bytes_per_token: at_streams.1 / req.streams as f64,
        net_bytes_per_step: at_streams.1,
        batch1: batch1.0,
        at_streams: at_streams.0,
        fill,
    })
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Experts per worker: as many whole experts (each in every layer) as its memory holds, every
/// expert at least once, and with `replicate` every slot filled: as many even copies as fit,
/// then one more copy of as many experts as slots are left.
fn place(
    req: &PlanRequest,
    expert_bytes: u64,
) -> Result<(Vec<Vec<u32>>, Vec<usize>), CapacityError> {
    let (n, e_n) = (req.workers.count, req.shape.experts);
    let room = req
        .workers
        .memory_bytes
        .saturating_sub(req.reserve_bytes + WORKER_RUNTIME_BYTES);
    let cap = ((room / expert_bytes.max(1)) as usize).min(e_n);
    if cap * n < e_n {
        let per_host = cap.max(1);
        return Err(CapacityError::DoesNotFit(format!(
            "{e_n} experts of {} each (every layer) need {} such hosts ({} holds {cap} after {} reserved and {} runtime); quantize the experts, or use more or larger hosts",
            gib(expert_bytes),
            e_n.div_ceil(per_host),
            gib(req.workers.memory_bytes),
            gib(req.reserve_bytes),
            gib(WORKER_RUNTIME_BYTES),
        )));
    }
    let workers: Vec<PlanWorker> = (0..n)
        .map(|i| PlanWorker {
            addr: format!("w{i:05}"),
            capacity: cap,
            current: Vec::new(),
        })
        .collect();
    // Even copies of every expert, then the slots left over to one expert each.
    let slots = cap * n;
    let (replication, spare) = if req.replicate {
        (slots / e_n, slots % e_n)
    } else {
        (1, 0)
    };
    let even = vec![1.0; e_n];
    let p = planner::plan(&PlanInput {
        experts: e_n,
        replication,
        hot_replicas: spare,
        workers: &workers,
        fixed: &[],
        load: (spare > 0).then_some(&even[..]),
    });
    if !p.uncovered.is_empty() {
        return Err(CapacityError::DoesNotFit(format!(
            "experts {:?} found no host",
            p.uncovered
        )));
    }
    Ok((p.assign.into_values().collect(), p.replicas))
}

/// Byte counts and per-role speeds of one request.
struct Costs<'a> {
    req: &'a PlanRequest,
    cal: &'a Calibration,
    expert_curve: &'a LinearCost,
    dense_curve: &'a LinearCost,
    /// One expert, one layer.
    expert_layer_bytes: f64,
    /// One expert, every layer.
    expert_bytes: u64,
    attention_layer_bytes: f64,
    lm_head_bytes: f64,
    coordinator_weights: u64,
    worker_bw: f64,
    coordinator_bw: f64,
}

impl<'a> Costs<'a> {
    fn new(req: &'a PlanRequest, cal: &'a Calibration) -> Result<Self, CapacityError> {
        let s = &req.shape;
        let curve = |d: DType| {
            cal.curve(d.as_str())
                .ok_or_else(|| CapacityError::Uncalibrated(d.as_str().to_string()))
        };
        // Embeddings and norms stay in a float type whatever the linears are.
        let table_elem = if req.dense.quant().is_some() {
            2
        } else {
            req.dense.size()
        };
        let table = (s.vocab * s.hidden * table_elem) as u64;
        let attention_layer = req.dense.bytes_for(s.attention_params()) as u64;
        let norms = (s.layers * 2 * s.hidden * 4) as u64;
        let expert_layer = req.experts.bytes_for(s.expert_params()) as u64;
        let bw = |h: &HostSpec| {
            h.read_bytes_per_s
                .unwrap_or(cal.read_bytes_per_s_core * h.threads() as f64)
        };
        Ok(Self {
            req,
            cal,
            expert_curve: curve(req.experts)?,
            dense_curve: curve(req.dense)?,
            expert_layer_bytes: expert_layer as f64,
            expert_bytes: expert_layer * s.layers as u64,
            attention_layer_bytes: attention_layer as f64,
            lm_head_bytes: table as f64,
            coordinator_weights: s.layers as u64 * attention_layer
                + norms
                + if s.tied { table } else { 2 * table },
            worker_bw: bw(&req.workers),
            coordinator_bw: bw(&req.coordinator),
        })
    }

    /// ns of a linear of `bytes` at `rows` on `threads` cores reading at `bw`.
    fn linear_ns(curve: &LinearCost, bytes: f64, rows: usize, threads: usize, bw: f64) -> f64 {
        (curve.at(rows) * bytes / threads as f64).max(bytes / bw * 1e9)
    }

    /// One expert of one layer at `rows` on a worker, full speed.
    fn expert_ns(&self, rows: usize) -> f64 {
        Self::linear_ns(
            self.expert_curve,
            self.expert_layer_bytes,
            rows,
            self.req.workers.threads(),
            self.worker_bw,
        )
    }

    /// The coordinator's per-layer work for `b` tokens: linears, KV reads, the rest.
    fn layer_ns(&self, b: usize) -> f64 {
        let (r, c) = (self.req, &self.req.coordinator);
        let kv = (b * r.context * 2 * r.shape.kv_dim * r.kv_elem_bytes) as f64;
        Self::linear_ns(
            self.dense_curve,
            self.attention_layer_bytes,
            b,
            c.threads(),
            self.coordinator_bw,
        ) + kv / self.coordinator_bw * 1e9
            + (self.cal.layer_fixed_ns
                + self.cal.layer_ns_per_token_hidden * (b * r.shape.hidden) as f64)
                / c.threads() as f64
    }

    /// The LM head and the step's own work for `b` sequences.
    fn head_ns(&self, b: usize) -> f64 {
        let c = &self.req.coordinator;
        Self::linear_ns(
            self.dense_curve,
            self.lm_head_bytes,
            b,
            c.threads(),
            self.coordinator_bw,
        ) + (self.cal.step_fixed_ns + self.cal.step_ns_per_token * b as f64) / c.threads() as f64
    }
}

/// A step's time as each limit alone would make it, ns.
struct Step {
    path: f64,
    worker_cpu: f64,
    coordinator_cpu: f64,
    network: f64,
}

impl Step {
    /// The step's time and what limits it. The larger limit wins, except that a CPU quota
    /// below a core adds to the rest in quadrature (a smooth maximum, `√(a² + b²)`): a role
    /// under a quota runs at full speed until its period's share is spent and then stalls to
    /// the period's end, and every step waits for it. Where the critical path alone would
    /// spend about the whole quota, those stalls land at random points of the step instead of
    /// never, so the two bounds do not simply meet.
    fn combine(&self, r: &PlanRequest) -> (f64, Limit) {
        let quota = |h: &HostSpec| h.cores < h.threads() as f64;
        let all = [
            (self.path, Limit::Latency, false),
            (self.worker_cpu, Limit::WorkerCpu, quota(&r.workers)),
            (
                self.coordinator_cpu,
                Limit::CoordinatorCpu,
                quota(&r.coordinator),
            ),
            (self.network, Limit::Network, false),
        ];
        let limit = all
            .iter()
            .fold((0.0, Limit::Latency), |a, x| {
                if x.0 > a.0 {
                    (x.0, x.1)
                } else {
                    a
                }
            })
            .1;
        let free = all.iter().filter(|x| !x.2).map(|x| x.0).fold(0.0, f64::max);
        let capped = all.iter().filter(|x| x.2).map(|x| x.0).fold(0.0, f64::max);
        (free.hypot(capped), limit)
    }
}

/// Routing sampled over a placement.
struct Simulation<'a> {
    costs: &'a Costs<'a>,
    placement: &'a [Vec<u32>],
}

/// One sampled layer: per lane, per worker, its rows, route entries and expert time.
struct LaneSample {
    rows: Vec<usize>,
    entries: Vec<usize>,
    expert_ns: Vec<f64>,
}

impl Simulation<'_> {
    /// The predicted rate at `b` streams per coordinator over `coordinators` of them, and
    /// network bytes per step.
    fn rate(&self, b: usize, coordinators: usize) -> (Rate, f64) {
        let c = self.costs;
        let r = c.req;
        let s = &r.shape;
        let lanes: Vec<usize> = if r.overlap && b >= 2 {
            vec![b.div_ceil(2), b / 2]
        } else {
            vec![b]
        };
        let n = self.placement.len();
        let rpc = &c.cal.rpc;
        let row_up = s.hidden * r.wire_elem_bytes;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed);
        let (mut worker_sum, mut link_sum) = (vec![0.0f64; n], vec![0.0f64; n]);
        let (mut layer_ns, mut crit_experts, mut crit_dispatch, mut bytes_total) =
            (0.0, 0.0, 0.0, 0.0);
        let mut coord_rpc_total = 0.0;
        let attn: Vec<f64> = lanes.iter().map(|&l| c.layer_ns(l)).collect();
        // What each worker was given over the samples so far: the coordinator's tie-break.
        let mut past = vec![0u64; n];
        for _ in 0..SAMPLES {
            let mut base = vec![0usize; n];
            let mut w_total = vec![0.0f64; n];
            let (mut coord_cpu, mut path_worst, mut path_exp, mut path_disp) =
                (0.0f64, 0.0f64, 0.0, 0.0);
            for (li, &l) in lanes.iter().enumerate() {
                let ls = self.sample_lane(l, &mut base, &mut past, &mut rng);
                let mut crpc = 0.0;
                let mut worst = (0.0f64, 0.0f64);
                for w in 0..n {
                    if ls.rows[w] == 0 {
                        continue;
                    }
                    let bytes =
                        (2 * ls.rows[w] * row_up + ls.entries[w] * ROUTE_ENTRY_BYTES) as f64;
                    crpc += rpc.coordinator_fixed_ns + rpc.coordinator_ns_per_byte * bytes;
                    let wk = ls.expert_ns[w] + rpc.worker_fixed_ns + rpc.worker_ns_per_byte * bytes;
                    w_total[w] += wk;
                    let link = bytes * 8.0 / r.net.bits_per_s * 1e9
                        + 2.0 * r.net.latency_s * 1e9
                        + rpc.latency_ns;
                    link_sum[w] += bytes;
                    bytes_total += bytes;
                    if link + wk > worst.0 + worst.1 {
                        worst = (link, wk);
                    }
                }
                coord_cpu += attn[li] + crpc;
                coord_rpc_total += crpc;
                let path = attn[li] + crpc + worst.0 + worst.1;
                if path > path_worst {
                    path_worst = path;
                    path_exp = worst.1;
                    path_disp = crpc + worst.0;
                }
            }
            let busiest = w_total.iter().copied().fold(0.0, f64::max);
            for (a, t) in worker_sum.iter_mut().zip(&w_total) {
                *a += t;
            }
            layer_ns += path_worst.max(coord_cpu).max(busiest);
            crit_experts += path_exp;
            crit_dispatch += path_disp;
        }
        let k = SAMPLES as f64;
        let layers = s.layers as f64;
        let head = c.head_ns(b);
        let latency = layers * layer_ns / k + head;
        let coords = coordinators as f64;
        let throttle = |h: &HostSpec| (h.threads() as f64 / h.cores).max(1.0);
        let worker_cpu = worker_sum.iter().copied().fold(0.0, f64::max) / k
            * layers
            * throttle(&r.workers)
            * coords;
        let coord_cpu = (layers * (attn.iter().sum::<f64>() + coord_rpc_total / k) + head)
            * throttle(&r.coordinator);
        let link = |bytes: f64| bytes * 8.0 / r.net.bits_per_s * 1e9;
        let network = (link(link_sum.iter().copied().fold(0.0, f64::max) / k * layers) * coords)
            .max(link(bytes_total / k * layers));
        let step = Step {
            path: latency,
            worker_cpu,
            coordinator_cpu: coord_cpu,
            network,
        };
        let (total, limit) = step.combine(r);
        let rate = Rate {
            streams: b,
            tok_s: coords * b as f64 / (total / 1e9),
            step_ms: total / 1e6,
            limit,
            path_ms: step.path / 1e6,
            worker_cpu_ms: step.worker_cpu / 1e6,
            coordinator_cpu_ms: step.coordinator_cpu / 1e6,
            network_ms: step.network / 1e6,
            attention_ms: attn.iter().sum::<f64>() / 1e6,
            dispatch_ms: crit_dispatch / k / 1e6,
            experts_ms: crit_experts / k / 1e6,
        };
        (rate, bytes_total / k * layers)
    }

    /// [`Fill`] at `b` streams per coordinator.
    fn fill(&self, b: usize) -> Fill {
        let one = self.rate(b, 1).0.tok_s;
        let mut at = one;
        for n in 1..MAX_FILL {
            let next = self.rate(b, n + 1).0.tok_s;
            if next - at < one / 2.0 {
                return Fill {
                    coordinators: n,
                    tok_s: at,
                };
            }
            at = next;
        }
        Fill {
            coordinators: MAX_FILL,
            tok_s: at,
        }
    }

    /// Routes `tokens` tokens (uniform top-k), chooses each routed expert's host as the
    /// coordinator does (`base`: load already in flight, `past`: load given before, both
    /// updated), and costs each worker's part.
    fn sample_lane(
        &self,
        tokens: usize,
        base: &mut [usize],
        past: &mut [u64],
        rng: &mut rand_chacha::ChaCha8Rng,
    ) -> LaneSample {
        let s = &self.costs.req.shape;
        let n = self.placement.len();
        let mut chosen: Vec<Vec<usize>> = Vec::with_capacity(tokens);
        let mut count = vec![0usize; s.experts];
        for _ in 0..tokens {
            let picks = rand::seq::index::sample(rng, s.experts, s.top_k).into_vec();
            for &e in &picks {
                count[e] += 1;
            }
            chosen.push(picks);
        }
        let mut order: Vec<usize> = (0..s.experts).filter(|&e| count[e] > 0).collect();
        order.sort_by_key(|&e| (std::cmp::Reverse(count[e]), e));
        let mut host = vec![usize::MAX; s.experts];
        let mut expert_ns = vec![0.0f64; n];
        for e in order {
            let w = (0..n)
                .filter(|&w| self.placement[w].contains(&(e as u32)))
                .min_by_key(|&w| (base[w], past[w], w))
                .expect("every expert is placed");
            host[e] = w;
            base[w] += count[e] + EXPERT_COST_TOKENS;
            past[w] += (count[e] + EXPERT_COST_TOKENS) as u64;
            expert_ns[w] += self.costs.expert_ns(count[e]);
        }
        let (mut rows, mut entries) = (vec![0usize; n], vec![0usize; n]);
        for picks in &chosen {
            // A token goes once to each worker that hosts any of its experts.
            for (i, &e) in picks.iter().enumerate() {
                let w = host[e];
                entries[w] += 1;
                if !picks[..i].iter().any(|&p| host[p] == w) {
                    rows[w] += 1;
                }
            }
        }
        LaneSample {
            rows,
            entries,
            expert_ns,
        }
    }
}

#[cfg(test)]
mod tests;
