//! One step of the layer loop over any number of sequences: prepare → layer loop → head.

use super::{LayerWeights, Mixtral};
use crate::{
    backend::{AttnSeq, AttnShape, Backend},
    executor::{ExpertExecutor, ExpertJob, PendingExperts},
    ids::LayerId,
    kv_cache::{KvCache, SeqKv},
    moe::RoutePlan,
    profile::Phase,
    ModelError, Result,
};

/// One sequence's part of a step: its new tokens and its cache (`kv.len()` is the position of
/// the first new token).
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub kv: &'a mut SeqKv,
}

/// Which logits a step returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// `[total_tokens, vocab]`: every position (the verification interface wants these).
    All,
    /// `[sequences, vocab]`: the last position of each sequence (generation).
    Last,
}

/// What a step returns, reused across steps.
#[derive(Debug)]
pub struct StepOutput {
    /// Which positions get logits.
    pub which: Logits,
    /// `[rows, vocab]` where rows follow `which`.
    pub logits: Vec<f32>,
    /// When `Some`, receives each layer's route plan (the verification interface reports them).
    pub trace: Option<Vec<RoutePlan>>,
}

impl StepOutput {
    /// Logits of `which` positions, no trace.
    #[must_use]
    pub fn new(which: Logits) -> Self {
        Self {
            which,
            logits: Vec::new(),
            trace: None,
        }
    }

    /// Logits of `which` positions and every layer's route plan.
    #[must_use]
    pub fn traced(which: Logits) -> Self {
        Self {
            trace: Some(Vec::new()),
            ..Self::new(which)
        }
    }
}

/// One micro-batch's buffers: a run of whole sequences of the step, carried through every layer
/// together. A step has one lane, or two when the expert stage can overlap (see
/// [`ExpertExecutor::overlaps`]).
struct Lane<B: Backend> {
    x: B::Buf,
    h: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    o: B::Buf,
    router: B::Buf,
    ids: Vec<u32>,
    positions: Vec<u32>,
    /// Each sequence's last row, lane-relative.
    last_rows: Vec<u32>,
    /// Token rows of this lane in the current step.
    rows: usize,
    /// The expert batch's buffers while they are here (between layers).
    job: Option<ExpertJob>,
    /// The expert batch while it is away.
    pending: Option<Box<dyn PendingExperts>>,
}

impl<B: Backend> Lane<B> {
    fn new(backend: &B) -> Result<Self> {
        Ok(Self {
            x: backend.alloc(0)?,
            h: backend.alloc(0)?,
            q: backend.alloc(0)?,
            k: backend.alloc(0)?,
            v: backend.alloc(0)?,
            attn: backend.alloc(0)?,
            o: backend.alloc(0)?,
            router: backend.alloc(0)?,
            ids: Vec::new(),
            positions: Vec::new(),
            last_rows: Vec::new(),
            rows: 0,
            job: Some(ExpertJob::default()),
            pending: None,
        })
    }
}

/// Per-step buffers, reused across steps; they grow to the largest step and stay there.
pub struct StepScratch<B: Backend> {
    lanes: [Lane<B>; 2],
    logits: B::Buf,
    host: Vec<f32>,
}

impl<B: Backend> StepScratch<B> {
    /// Empty buffers; the first step sizes them.
    pub fn new(backend: &B) -> Result<Self> {
        Ok(Self {
            lanes: [Lane::new(backend)?, Lane::new(backend)?],
            logits: backend.alloc(0)?,
            host: Vec::new(),
        })
    }
}

/// Where to split `seqs` into two lanes of about equal tokens, each non-empty.
fn split_point(seqs: &[SeqStep<'_>]) -> usize {
    let total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    let mut acc = 0;
    let mut best = (usize::MAX, 1);
    for (i, s) in seqs.iter().enumerate().take(seqs.len() - 1) {
        acc += s.tokens.len();
        let diff = acc.abs_diff(total - acc);
        if diff < best.0 {
            best = (diff, i + 1);
        }
    }
    best.1
}

impl<B: Backend> Mixtral<B> {
    /// Runs one step: appends every sequence's new tokens to its cache and computes logits.
    ///
    /// All cache blocks are reserved before any compute, so a full cache fails the step cleanly
    /// with nothing half-written.
    pub fn step(
        &self,
        seqs: &mut [SeqStep<'_>],
        kv: &mut KvCache<B>,
        experts: &dyn ExpertExecutor,
        scratch: &mut StepScratch<B>,
        out: &mut StepOutput,
    ) -> Result<()> {
        crate::backend::cpu::in_pool(|| self.step_inner(seqs, kv, experts, scratch, out))
    }

    /// prepare → layer loop → head.
    fn step_inner(
        &self,
        seqs: &mut [SeqStep<'_>],
        kv: &mut KvCache<B>,
        experts: &dyn ExpertExecutor,
        scratch: &mut StepScratch<B>,
        out: &mut StepOutput,
    ) -> Result<()> {
        self.check_and_reserve(seqs, kv)?;
        // Lanes: one, or two runs of whole sequences when the expert stage overlaps.
        let n_lanes = if experts.overlaps() && seqs.len() >= 2 {
            2
        } else {
            1
        };
        let attn_seqs = self.prepare_lanes(seqs, n_lanes, scratch)?;
        let mut cx = LayerCx {
            kv,
            shape: AttnShape {
                heads: self.cfg.num_attention_heads,
                kv_heads: self.cfg.num_key_value_heads,
                head_dim: self.cfg.head_dim,
                block_size: 0,
                window: self.cfg.sliding_window,
            },
            eps: self.cfg.rms_norm_eps as f32,
        };
        cx.shape.block_size = cx.kv.block_size();
        self.layer_loop(&attn_seqs, n_lanes, &mut cx, experts, scratch, out)?;
        drop(attn_seqs);
        for s in seqs.iter_mut() {
            let end = s.kv.len() + s.tokens.len();
            s.kv.set_len(end);
        }
        self.head(seqs.len(), n_lanes, cx.eps, scratch, out)
    }

    /// Checks the step's bounds (a library guard: callers pass validated requests) and reserves
    /// every cache block before anything is computed.
    fn check_and_reserve(&self, seqs: &mut [SeqStep<'_>], kv: &mut KvCache<B>) -> Result<()> {
        let cfg = &self.cfg;
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                return Err(ModelError::Input(
                    "a sequence in the step has no tokens".into(),
                ));
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(ModelError::Input(format!(
                    "token id {t} is outside the vocabulary (size {})",
                    cfg.vocab_size
                )));
            }
            let end = s.kv.len() + s.tokens.len();
            if end > cfg.max_position_embeddings {
                return Err(ModelError::Input(format!(
                    "sequence of {end} positions exceeds max_position_embeddings {}",
                    cfg.max_position_embeddings
                )));
            }
        }
        for s in seqs.iter_mut() {
            let end = s.kv.len() + s.tokens.len();
            kv.reserve(s.kv, end)?;
        }
        Ok(())
    }

    /// Fills each lane's ids, positions and buffers and embeds its tokens; returns each lane's
    /// sequences as attention sees them.
    fn prepare_lanes<'a>(
        &self,
        seqs: &'a [SeqStep<'_>],
        n_lanes: usize,
        scratch: &mut StepScratch<B>,
    ) -> Result<[Vec<AttnSeq<'a>>; 2]> {
        let cfg = &self.cfg;
        let b = &self.backend;
        let (h, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let split = if n_lanes == 2 {
            split_point(seqs)
        } else {
            seqs.len()
        };
        let ranges = [0..split, split..seqs.len()];
        let mut attn_seqs: [Vec<AttnSeq<'a>>; 2] = [Vec::new(), Vec::new()];
        for ((lane, range), lane_attn) in scratch
            .lanes
            .iter_mut()
            .zip(ranges)
            .zip(attn_seqs.iter_mut())
            .take(n_lanes)
        {
            lane.ids.clear();
            lane.positions.clear();
            lane.last_rows.clear();
            for s in &seqs[range] {
                let p0 = s.kv.len();
                lane_attn.push(AttnSeq {
                    q_row0: lane.ids.len(),
                    n_q: s.tokens.len(),
                    pos0: p0,
                    blocks: s.kv.blocks(),
                });
                lane.positions
                    .extend((0..s.tokens.len()).map(|i| (p0 + i) as u32));
                lane.ids.extend_from_slice(s.tokens);
                lane.last_rows.push((lane.ids.len() - 1) as u32);
            }
            let t = lane.ids.len();
            lane.rows = t;
            for (buf, n) in [
                (&mut lane.x, t * h),
                (&mut lane.h, t * h),
                (&mut lane.q, t * qd),
                (&mut lane.k, t * kvd),
                (&mut lane.v, t * kvd),
                (&mut lane.attn, t * qd),
                (&mut lane.o, t * h),
                (&mut lane.router, t * cfg.num_local_experts),
            ] {
                b.ensure_len(buf, n)?;
            }
            // A job lost to an earlier failed step is replaced; its buffers grow below.
            let job = lane.job.get_or_insert_with(ExpertJob::default);
            job.x.resize(t * h, 0.0);
            job.out.resize(t * h, 0.0);
            lane.pending = None;
            b.embedding(&self.embed, &lane.ids, &mut lane.x)?;
        }
        Ok(attn_seqs)
    }

    /// Every layer, each lane in turn: take back its expert sums of the previous layer, then
    /// attention and routing, then send its expert batch off. With two lanes, one lane's
    /// attention runs while the other's experts are away (dual-batch overlap).
    fn layer_loop(
        &self,
        attn_seqs: &[Vec<AttnSeq<'_>>; 2],
        n_lanes: usize,
        cx: &mut LayerCx<'_, B>,
        experts: &dyn ExpertExecutor,
        scratch: &mut StepScratch<B>,
        out: &mut StepOutput,
    ) -> Result<()> {
        if let Some(tr) = out.trace.as_mut() {
            tr.clear();
        }
        for (l, lw) in self.layers.iter().enumerate() {
            let layer = LayerId::new(l, &self.cfg)?;
            for (lane, lane_attn) in scratch.lanes.iter_mut().zip(attn_seqs).take(n_lanes) {
                let _span = tracing::trace_span!("layer", layer = l, tokens = lane.rows).entered();
                let mut clock = crate::profile::Clock::start();
                if l > 0 {
                    self.take_experts(lane, &mut clock)?;
                }
                self.attention(lw, l, lane, lane_attn, cx)?;
                clock.mark(Phase::Attention);
                self.route(lw, lane, cx.eps)?;
                let job = lane.job.take().ok_or_else(|| {
                    ModelError::Input("expert batch buffers missing (internal)".into())
                })?;
                if let Some(tr) = out.trace.as_mut() {
                    record_trace(tr, l, &job.plan);
                }
                clock.mark(Phase::Router);
                lane.pending = Some(experts.submit(layer, job)?);
                clock.mark(Phase::Experts);
            }
        }
        for lane in scratch.lanes.iter_mut().take(n_lanes) {
            let mut clock = crate::profile::Clock::start();
            self.take_experts(lane, &mut clock)?;
        }
        Ok(())
    }

    /// Final norm and LM head, on every row or only each sequence's last, lane by lane (lanes
    /// are consecutive runs of sequences, so their rows append in order).
    fn head(
        &self,
        n_seqs: usize,
        n_lanes: usize,
        eps: f32,
        scratch: &mut StepScratch<B>,
        out: &mut StepOutput,
    ) -> Result<()> {
        let b = &self.backend;
        let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let total_rows: usize = match out.which {
            Logits::All => scratch.lanes.iter().take(n_lanes).map(|l| l.rows).sum(),
            Logits::Last => n_seqs,
        };
        out.logits.resize(total_rows * v, 0.0);
        let mut row0 = 0;
        for lane in scratch.lanes.iter_mut().take(n_lanes) {
            let rows = match out.which {
                Logits::All => lane.rows,
                Logits::Last => {
                    // Compact each sequence's last row to the front (rows ascend, so in place).
                    scratch.host.resize(lane.rows * h, 0.0);
                    b.to_host(&lane.x, &mut scratch.host)?;
                    for (i, &r) in lane.last_rows.iter().enumerate() {
                        let r = r as usize;
                        scratch.host.copy_within(r * h..(r + 1) * h, i * h);
                    }
                    let n = lane.last_rows.len();
                    b.write(&mut lane.x, &scratch.host[..n * h])?;
                    n
                }
            };
            b.rms_norm(&lane.x, rows, &self.norm, eps, &mut lane.h)?;
            b.ensure_len(&mut scratch.logits, rows * v)?;
            b.linear(&lane.h, rows, &self.lm_head, &mut scratch.logits)?;
            b.to_host(
                &scratch.logits,
                &mut out.logits[row0 * v..(row0 + rows) * v],
            )?;
            row0 += rows;
        }
        Ok(())
    }

    /// Waits for `lane`'s expert batch and adds its weighted sums to the residual stream.
    fn take_experts(&self, lane: &mut Lane<B>, clock: &mut crate::profile::Clock) -> Result<()> {
        let b = &self.backend;
        let pending = lane.pending.take().ok_or_else(|| {
            ModelError::Input("no expert batch in flight for this lane (internal)".into())
        })?;
        let job = pending.wait()?;
        clock.mark(Phase::Experts);
        let n = lane.rows * self.cfg.hidden_size;
        b.write(&mut lane.o, &job.out[..n])?;
        b.add_assign(&mut lane.x, &lane.o, n)?;
        lane.job = Some(job);
        clock.mark(Phase::Combine);
        Ok(())
    }

    /// The attention block of layer `l` for `lane`, residual included.
    fn attention(
        &self,
        lw: &LayerWeights<B>,
        l: usize,
        lane: &mut Lane<B>,
        attn_seqs: &[AttnSeq<'_>],
        cx: &mut LayerCx<'_, B>,
    ) -> Result<()> {
        let (shape, eps) = (&cx.shape, cx.eps);
        let cfg = &self.cfg;
        let b = &self.backend;
        let (h, qd, kvd, t) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), lane.rows);
        b.rms_norm(&lane.x, t, &lw.input_norm, eps, &mut lane.h)?;
        b.linear_many(
            &lane.h,
            t,
            &mut [
                (&lw.q, &mut lane.q),
                (&lw.k, &mut lane.k),
                (&lw.v, &mut lane.v),
            ],
        )?;
        for (buf, dim) in [(&mut lane.q, qd), (&mut lane.k, kvd)] {
            b.rope(
                buf,
                dim,
                cfg.head_dim,
                &lane.positions,
                &self.rope_cos,
                &self.rope_sin,
            )?;
        }
        let (kc, vc) = cx.kv.layer_mut(l);
        for a in attn_seqs {
            for (cache, src) in [(&mut *kc, &lane.k), (&mut *vc, &lane.v)] {
                b.kv_write(cache, src, a, kvd, shape.block_size)?;
            }
        }
        b.attention(&lane.q, kc, vc, attn_seqs, shape, &mut lane.attn)?;
        b.linear(&lane.attn, t, &lw.o, &mut lane.o)?;
        b.add_assign(&mut lane.x, &lane.o, t * h)
    }

    /// Post-attention norm and routing for `lane`: fills its expert job's input and plan (the
    /// router output is tiny, so routing happens on the host).
    fn route(&self, lw: &LayerWeights<B>, lane: &mut Lane<B>, eps: f32) -> Result<()> {
        let cfg = &self.cfg;
        let b = &self.backend;
        let t = lane.rows;
        let job = lane
            .job
            .as_mut()
            .ok_or_else(|| ModelError::Input("expert batch buffers missing (internal)".into()))?;
        b.rms_norm(&lane.x, t, &lw.post_norm, eps, &mut lane.h)?;
        b.linear(&lane.h, t, &lw.router, &mut lane.router)?;
        b.route(
            &lane.router,
            t,
            cfg.num_local_experts,
            cfg.num_experts_per_tok,
            &mut job.plan,
        )?;
        b.to_host(&lane.h, &mut job.x[..t * cfg.hidden_size])
    }
}

/// What every layer of a step shares: the cache, attention's shape and the norms' epsilon.
struct LayerCx<'a, B: Backend> {
    kv: &'a mut KvCache<B>,
    shape: AttnShape,
    eps: f32,
}

/// Appends layer `l`'s routing of `plan` to the trace.
fn record_trace(tr: &mut Vec<RoutePlan>, l: usize, plan: &RoutePlan) {
    if tr.len() == l {
        tr.push(RoutePlan::new());
    }
    for r in 0..plan.rows() {
        tr[l].push_row(
            plan.row_experts(r)
                .iter()
                .copied()
                .zip(plan.row_weights(r).iter().copied()),
        );
    }
}
