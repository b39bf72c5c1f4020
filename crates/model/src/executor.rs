//! The expert stage as a separate, batched step: given the normalised hidden states of N tokens
//! and their route plan, return the weighted sum of their experts' outputs per token. The layer
//! loop only ever calls experts through [`ExpertExecutor`], so it never knows whether they run
//! in this process ([`LocalExperts`]) or on remote workers.

use crate::{
    backend::Backend,
    ids::{ExpertSet, LayerId},
    moe::RoutePlan,
    weights::{names, Checkpoint, LoadProgress, WeightRole},
    ModelError, Result,
};
use std::sync::Mutex;

/// Runs one layer's experts for a batch of token rows.
pub trait ExpertExecutor: Send + Sync {
    /// `x` is `[plan.rows(), hidden]`; writes `out[r] = Σ_slots w · expert(x[r])` in slot order.
    ///
    /// The combine is a fixed-order sum of `w · y` terms starting from zero, never fused with
    /// the residual, so that partial sums computed elsewhere add up to the same bits.
    fn run(&self, layer: LayerId, x: &[f32], plan: &RoutePlan, out: &mut [f32]) -> Result<()>;

    /// Whether [`submit`](Self::submit) returns while the batch is still being worked on
    /// elsewhere. Only then does the layer loop split a step into two micro-batches and run one's
    /// attention while the other's experts are away; with experts on this machine's own cores
    /// the split would only add a second, smaller batch per layer.
    fn overlaps(&self) -> bool {
        false
    }

    /// Starts `job` and returns a handle to wait on. The default runs it to completion first.
    fn submit(&self, layer: LayerId, mut job: ExpertJob) -> Result<Box<dyn PendingExperts>> {
        self.run(layer, &job.x, &job.plan, &mut job.out)?;
        Ok(Box::new(Finished(job)))
    }
}

/// An expert batch that owns its buffers, so that it can be worked on in the background and its
/// buffers come back for the next layer.
#[derive(Debug, Default)]
pub struct ExpertJob {
    /// `[plan.rows(), hidden]` normalised hidden states.
    pub x: Vec<f32>,
    pub plan: RoutePlan,
    /// `[plan.rows(), hidden]`, written by the executor.
    pub out: Vec<f32>,
}

/// A submitted [`ExpertJob`].
pub trait PendingExperts: Send {
    /// Blocks until the batch is done and hands the job back with `out` written.
    fn wait(self: Box<Self>) -> Result<ExpertJob>;
}

/// A job that was run to completion when submitted.
pub struct Finished(pub ExpertJob);

impl PendingExperts for Finished {
    fn wait(self: Box<Self>) -> Result<ExpertJob> {
        Ok(self.0)
    }
}

/// One expert's SwiGLU FFN: `w2 · (silu(w1 · x) ⊙ (w3 · x))`.
pub struct ExpertFfn<B: Backend> {
    w1: B::Weight,
    w3: B::Weight,
    w2: B::Weight,
}

/// Reused buffers of the expert stage; sized by the largest batch seen.
struct Scratch<B: Backend> {
    /// Entry indices grouped by expert (counting sort), and each entry's row.
    order: Vec<u32>,
    entry_row: Vec<u32>,
    counts: Vec<usize>,
    starts: Vec<usize>,
    fill: Vec<usize>,
    /// Each entry's row in `ys` (the inverse of `order`).
    at: Vec<u32>,
    /// Expert outputs `[entries, hidden]` in expert order (`starts[e]..` is expert e's), so that
    /// experts running side by side each write a slice of their own; combined in slot order
    /// through `at`.
    ys: Vec<f32>,
    /// Buffer sets of experts not running now: one is taken per expert run and given back, so
    /// there are as many as experts ever ran at once (not one per expert).
    free: Mutex<Vec<ExpertBufs<B>>>,
}

/// One expert's rows gathered on the host and on the device, and its FFN's intermediates and
/// output.
struct ExpertBufs<B: Backend> {
    xe_host: Vec<f32>,
    xe: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    ye: B::Buf,
}

impl<B: Backend> ExpertBufs<B> {
    fn new(b: &B) -> Result<Self> {
        Ok(Self {
            xe_host: Vec::new(),
            xe: b.alloc(0)?,
            gate: b.alloc(0)?,
            up: b.alloc(0)?,
            ye: b.alloc(0)?,
        })
    }
}

/// Experts held by this process, for some or all experts of every layer.
pub struct LocalExperts<B: Backend> {
    backend: B,
    hidden: usize,
    inter: usize,
    hosted: ExpertSet,
    /// `[layer][expert]`, `None` where not hosted.
    layers: Vec<Vec<Option<ExpertFfn<B>>>>,
    scratch: Mutex<Scratch<B>>,
    bytes: usize,
}

impl<B: Backend + Clone> LocalExperts<B> {
    /// Loads the experts in `hosted` for every layer; touches no other expert's bytes.
    pub fn load(
        backend: &B,
        ck: &Checkpoint,
        hosted: &ExpertSet,
        progress: &dyn LoadProgress,
    ) -> Result<Self> {
        let cfg = ck.config();
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let mut bytes = 0usize;
        for l in 0..cfg.num_hidden_layers {
            let mut row = Vec::with_capacity(cfg.num_local_experts);
            for e in 0..cfg.num_local_experts {
                if !hosted.contains(e) {
                    row.push(None);
                    continue;
                }
                let mut take = |w: &str, shape: [usize; 2]| -> Result<B::Weight> {
                    let name = names::expert(l, e, w);
                    let (t, quantize) = ck.linear(&name, shape, WeightRole::Expert)?;
                    let n = t.bytes().len();
                    bytes += quantize.map_or(n, |f| f.bytes_for(shape[0] * shape[1]));
                    let out = backend.upload_matrix(t, quantize)?;
                    progress.advance(n as u64);
                    Ok(out)
                };
                row.push(Some(ExpertFfn {
                    w1: take("w1", [i, h])?,
                    w3: take("w3", [i, h])?,
                    w2: take("w2", [h, i])?,
                }));
            }
            layers.push(row);
        }
        let scratch = Scratch {
            order: Vec::new(),
            entry_row: Vec::new(),
            counts: vec![0; cfg.num_local_experts],
            starts: vec![0; cfg.num_local_experts],
            fill: vec![0; cfg.num_local_experts],
            at: Vec::new(),
            ys: Vec::new(),
            free: Mutex::new(Vec::new()),
        };
        Ok(Self {
            backend: backend.clone(),
            hidden: h,
            inter: i,
            hosted: hosted.clone(),
            layers,
            scratch: Mutex::new(scratch),
            bytes,
        })
    }

    /// Bytes `hosted` holds once loaded from `ck`: quantized where `ck` quantizes at load
    /// (the planner's memory budget counts these).
    #[must_use]
    pub fn bytes_loaded(ck: &Checkpoint, hosted: &ExpertSet) -> u64 {
        let cfg = ck.config();
        (0..cfg.num_hidden_layers)
            .flat_map(|l| hosted.iter().map(move |e| (l, e)))
            .flat_map(|(l, e)| ["w1", "w2", "w3"].map(|w| names::expert(l, e, w)))
            .filter_map(|n| ck.loaded_bytes(&n, WeightRole::Expert))
            .sum()
    }

    /// Bytes needed to load `hosted` from `ck` (for progress bars).
    #[must_use]
    pub fn bytes_to_load(ck: &Checkpoint, hosted: &ExpertSet) -> u64 {
        let cfg = ck.config();
        (0..cfg.num_hidden_layers)
            .flat_map(|l| hosted.iter().map(move |e| (l, e)))
            .flat_map(|(l, e)| ["w1", "w2", "w3"].map(|w| names::expert(l, e, w)))
            .filter_map(|n| ck.tensor_bytes(&n))
            .sum()
    }
}

impl<B: Backend> LocalExperts<B> {
    /// The experts this instance holds (the same set for every layer).
    #[must_use]
    pub fn hosted(&self) -> &ExpertSet {
        &self.hosted
    }

    /// Bytes of expert weights held.
    #[must_use]
    pub fn weight_bytes(&self) -> usize {
        self.bytes
    }
}

impl<B: Backend> ExpertExecutor for LocalExperts<B> {
    fn run(&self, layer: LayerId, x: &[f32], plan: &RoutePlan, out: &mut [f32]) -> Result<()> {
        crate::backend::cpu::in_pool(|| self.run_inner(layer, x, plan, Out::Combined(out)))
    }
}

/// Where [`LocalExperts::run_inner`] writes: each row's weighted sum, or each entry's output.
enum Out<'a> {
    Combined(&'a mut [f32]),
    Entries(&'a mut [f32]),
}

impl<B: Backend> LocalExperts<B> {
    /// Each entry's unweighted expert output, `ys[i] = expert(x[row of entry i])`, as
    /// `[plan.entries(), hidden]` in plan order; [`combine_entries`] sums them as
    /// [`ExpertExecutor::run`] would. For a caller that runs one batch's experts in parts: a
    /// worker lets a batch that arrives mid-call join the experts not yet run. An entry's output
    /// has the same bits whatever other rows share its call.
    pub fn run_entries(
        &self,
        layer: LayerId,
        x: &[f32],
        plan: &RoutePlan,
        ys: &mut [f32],
    ) -> Result<()> {
        crate::backend::cpu::in_pool(|| self.run_inner(layer, x, plan, Out::Entries(ys)))
    }

    /// How many experts run side by side on this backend, so that a caller running a batch's
    /// experts in parts can keep as many threads busy as one whole call would.
    #[must_use]
    pub fn side_by_side(&self) -> usize {
        if self.backend.concurrent_ops() {
            crate::backend::cpu::in_pool(rayon::current_num_threads).max(1)
        } else {
            1
        }
    }
}

impl<B: Backend> LocalExperts<B> {
    /// check → group rows by expert → each expert's FFN (side by side where the backend may)
    /// → combine in slot order.
    fn run_inner(
        &self,
        layer: LayerId,
        x: &[f32],
        plan: &RoutePlan,
        mut out: Out<'_>,
    ) -> Result<()> {
        let h = self.hidden;
        let out_len = match &out {
            Out::Combined(o) => (o.len(), plan.rows()),
            Out::Entries(ys) => (ys.len(), plan.entries()),
        };
        let experts = self.check(layer, x, plan, out_len)?;
        // A poisoned lock only means another batch panicked mid-way; the scratch holds no
        // invariants across calls, so it is safe to keep using.
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *guard;
        s.group(plan, h);
        let n_entries = plan.entries();
        let Scratch {
            order,
            entry_row,
            counts,
            starts,
            at,
            ys,
            free,
            ..
        } = s;
        let (order, entry_row, counts, starts, free) =
            (&*order, &*entry_row, &*counts, &*starts, &*free);
        // Expert e's FFN on its rows, into `ye` (its `counts[e]` output rows).
        let one = |e: usize, ye: &mut [f32]| -> Result<()> {
            let n = counts[e];
            let Some(ffn) = experts[e].as_ref().filter(|_| n > 0) else {
                return Ok(());
            };
            let rows = order[starts[e]..starts[e] + n]
                .iter()
                .map(|&entry| entry_row[entry as usize] as usize);
            self.ffn(ffn, rows, n, x, ye, free)
        };
        run_experts(
            &one,
            self.backend.concurrent_ops(),
            0..experts.len(),
            (counts, starts),
            h,
            &mut ys[..n_entries * h],
        )?;
        match &mut out {
            Out::Combined(o) => combine(plan, ys, at, h, o),
            Out::Entries(dst) => {
                for (d, &a) in dst.chunks_exact_mut(h).zip(at.iter()) {
                    let a = a as usize * h;
                    d.copy_from_slice(&ys[a..a + h]);
                }
            }
        }
        Ok(())
    }

    /// The layer's experts, once the batch's shapes and every expert it names are checked.
    fn check(
        &self,
        layer: LayerId,
        x: &[f32],
        plan: &RoutePlan,
        (out_len, out_rows): (usize, usize),
    ) -> Result<&[Option<ExpertFfn<B>>]> {
        let h = self.hidden;
        let rows = plan.rows();
        if x.len() != rows * h || out_len != out_rows * h {
            return Err(ModelError::Input(format!(
                "expert batch: {rows} rows need {} values of hidden {h} in and {} out, got x {} / out {out_len}",
                rows * h,
                out_rows * h,
                x.len(),
            )));
        }
        let experts = self
            .layers
            .get(layer.index())
            .ok_or_else(|| ModelError::Input(format!("layer {layer} out of range")))?;
        for &e in plan.experts() {
            if experts.get(e as usize).is_none_or(|f| f.is_none()) {
                return Err(ModelError::ExpertNotHosted {
                    layer: layer.index(),
                    expert: e as usize,
                });
            }
        }
        Ok(experts)
    }

    /// One expert's SwiGLU FFN on `n` rows of `x` (their indices in `rows`), into `ye`, with a
    /// buffer set taken from (and given back to) `free`.
    fn ffn(
        &self,
        ffn: &ExpertFfn<B>,
        rows: impl Iterator<Item = usize>,
        n: usize,
        x: &[f32],
        ye: &mut [f32],
        free: &Mutex<Vec<ExpertBufs<B>>>,
    ) -> Result<()> {
        let (b, h, inter) = (&self.backend, self.hidden, self.inter);
        let taken = free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut bufs = match taken {
            Some(bufs) => bufs,
            None => ExpertBufs::new(b)?,
        };
        bufs.xe_host.resize(n * h, 0.0);
        for (dst, r) in bufs.xe_host.chunks_mut(h).zip(rows) {
            dst.copy_from_slice(&x[r * h..(r + 1) * h]);
        }
        b.ensure_len(&mut bufs.xe, n * h)?;
        b.ensure_len(&mut bufs.gate, n * inter)?;
        b.ensure_len(&mut bufs.up, n * inter)?;
        b.ensure_len(&mut bufs.ye, n * h)?;
        b.write(&mut bufs.xe, &bufs.xe_host)?;
        b.linear_many(
            &bufs.xe,
            n,
            &mut [(&ffn.w1, &mut bufs.gate), (&ffn.w3, &mut bufs.up)],
        )?;
        b.silu_mul(&mut bufs.gate, &bufs.up, n * inter)?;
        b.linear(&bufs.gate, n, &ffn.w2, &mut bufs.ye)?;
        b.to_host(&bufs.ye, ye)?;
        free.lock().unwrap_or_else(|p| p.into_inner()).push(bufs);
        Ok(())
    }
}

impl<B: Backend> Scratch<B> {
    /// Groups `plan`'s entries by expert, keeping row order within each expert (a counting
    /// sort): `order`, `starts`, `counts`, `at` and room for the outputs in `ys`.
    fn group(&mut self, plan: &RoutePlan, h: usize) {
        let n_entries = plan.entries();
        self.entry_row.clear();
        for r in 0..plan.rows() {
            self.entry_row.extend(plan.row_range(r).map(|_| r as u32));
        }
        self.counts.iter_mut().for_each(|c| *c = 0);
        for &e in plan.experts() {
            self.counts[e as usize] += 1;
        }
        let mut acc = 0;
        for (st, &c) in self.starts.iter_mut().zip(&self.counts) {
            *st = acc;
            acc += c;
        }
        self.fill.copy_from_slice(&self.starts);
        self.order.resize(n_entries, 0);
        self.at.resize(n_entries, 0);
        for (i, &e) in plan.experts().iter().enumerate() {
            let p = self.fill[e as usize];
            self.order[p] = i as u32;
            self.at[i] = p as u32;
            self.fill[e as usize] += 1;
        }
        if self.ys.len() < n_entries * h {
            self.ys.resize(n_entries * h, 0.0);
        }
    }
}

/// Runs `one` for experts `range`, whose outputs lie in `ys` in expert order (expert e's
/// `counts[e]` rows at `starts[e]`, relative to the range's first). Side by side
/// (`concurrent`), the range is halved and both halves forked, each with its own part of `ys`;
/// each thread then streams its own experts' weights, and an idle one steals row blocks of
/// another's linear. Every expert computes exactly as it would alone.
fn run_experts(
    one: &(dyn Fn(usize, &mut [f32]) -> Result<()> + Sync),
    concurrent: bool,
    range: std::ops::Range<usize>,
    (counts, starts): (&[usize], &[usize]),
    h: usize,
    ys: &mut [f32],
) -> Result<()> {
    if range.len() <= 1 || !concurrent {
        let base = starts.get(range.start).copied().unwrap_or(0);
        for e in range {
            let lo = (starts[e] - base) * h;
            one(e, &mut ys[lo..lo + counts[e] * h])?;
        }
        return Ok(());
    }
    let mid = range.start + range.len() / 2;
    let (a, b) = ys.split_at_mut((starts[mid] - starts[range.start]) * h);
    let (ra, rb) = rayon::join(
        || run_experts(one, concurrent, range.start..mid, (counts, starts), h, a),
        || run_experts(one, concurrent, mid..range.end, (counts, starts), h, b),
    );
    ra.and(rb)
}

/// `out[r] = Σ_{entries of r, in slot order} w · y[entry]`, starting from zero, where entry i's
/// `y` is row `at[i]` of `ys`. Written as separate multiply and add (never fused) so that the
/// sum of partials computed on different workers is bit-identical to this for top-2 routing.
pub fn combine(plan: &RoutePlan, ys: &[f32], at: &[u32], h: usize, out: &mut [f32]) {
    combine_at(plan, ys, |i| at[i] as usize, h, out);
}

/// [`combine`] of outputs in plan order (entry i's at row i), as [`LocalExperts::run_entries`]
/// writes them.
pub fn combine_entries(plan: &RoutePlan, ys: &[f32], h: usize, out: &mut [f32]) {
    combine_at(plan, ys, |i| i, h, out);
}

fn combine_at(
    plan: &RoutePlan,
    ys: &[f32],
    at: impl Fn(usize) -> usize,
    h: usize,
    out: &mut [f32],
) {
    for r in 0..plan.rows() {
        let o = &mut out[r * h..(r + 1) * h];
        o.fill(0.0);
        for i in plan.row_range(r) {
            let w = plan.weights()[i];
            let y = at(i) * h;
            for (ov, yv) in o.iter_mut().zip(&ys[y..y + h]) {
                *ov += w * yv;
            }
        }
    }
}
