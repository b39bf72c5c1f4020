//! The dense part of Mixtral (embeddings, attention, norms, router, LM head) and the layer loop
//! that calls the expert stage through an [`ExpertExecutor`].

use crate::{
    backend::{AttnSeq, AttnShape, Backend},
    config::MixtralConfig,
    executor::ExpertExecutor,
    ids::LayerId,
    kv_cache::{KvCache, SeqKv},
    moe::RoutePlan,
    profile::Phase,
    weights::{names, Checkpoint, HostTensor, LoadProgress},
    ModelError, Result,
};

/// Attention and routing weights of one decoder layer.
struct LayerWeights<B: Backend> {
    input_norm: B::Weight,
    q: B::Weight,
    k: B::Weight,
    v: B::Weight,
    o: B::Weight,
    post_norm: B::Weight,
    router: B::Weight,
}

/// Everything of Mixtral except the experts.
pub struct Mixtral<B: Backend> {
    cfg: MixtralConfig,
    backend: B,
    embed: B::Weight,
    layers: Vec<LayerWeights<B>>,
    norm: B::Weight,
    lm_head: B::Weight,
    rope_cos: B::Weight,
    rope_sin: B::Weight,
    bytes: usize,
}

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

/// Per-step buffers, reused across steps; they grow to the largest step and stay there.
pub struct StepScratch<B: Backend> {
    x: B::Buf,
    h: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    o: B::Buf,
    router: B::Buf,
    logits: B::Buf,
    ids: Vec<u32>,
    positions: Vec<u32>,
    last_rows: Vec<u32>,
    h_host: Vec<f32>,
    moe_host: Vec<f32>,
    plan: RoutePlan,
}

impl<B: Backend> StepScratch<B> {
    /// Empty buffers; the first step sizes them.
    pub fn new(backend: &B) -> Result<Self> {
        Ok(Self {
            x: backend.alloc(0)?,
            h: backend.alloc(0)?,
            q: backend.alloc(0)?,
            k: backend.alloc(0)?,
            v: backend.alloc(0)?,
            attn: backend.alloc(0)?,
            o: backend.alloc(0)?,
            router: backend.alloc(0)?,
            logits: backend.alloc(0)?,
            ids: Vec::new(),
            positions: Vec::new(),
            last_rows: Vec::new(),
            h_host: Vec::new(),
            moe_host: Vec::new(),
            plan: RoutePlan::new(),
        })
    }
}

/// Tensors a dense load reads, for progress bars.
fn dense_names(cfg: &MixtralConfig) -> Vec<String> {
    let mut n = vec![names::EMBED.to_string(), names::FINAL_NORM.to_string()];
    if !cfg.tie_word_embeddings {
        n.push(names::LM_HEAD.to_string());
    }
    for l in 0..cfg.num_hidden_layers {
        for s in [
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "block_sparse_moe.gate.weight",
        ] {
            n.push(names::layer(l, s));
        }
    }
    n
}

impl<B: Backend> Mixtral<B> {
    /// Bytes a dense load reads from `ck`.
    #[must_use]
    pub fn bytes_to_load(ck: &Checkpoint) -> u64 {
        dense_names(ck.config())
            .iter()
            .filter_map(|n| ck.tensor_bytes(n))
            .sum()
    }

    /// Loads the dense weights (no experts) from `ck`.
    pub fn load(backend: B, ck: &Checkpoint, progress: &dyn LoadProgress) -> Result<Self> {
        let cfg = ck.config().clone();
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let mut bytes = 0usize;
        let mut take = |name: &str, shape: &[usize]| -> Result<B::Weight> {
            let t = ck.tensor(name, shape)?;
            let n = t.bytes().len();
            bytes += n;
            let w = backend.upload(t)?;
            progress.advance(n as u64);
            Ok(w)
        };
        let embed = take(names::EMBED, &[v, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let n = |s: &str| names::layer(l, s);
            layers.push(LayerWeights {
                input_norm: take(&n("input_layernorm.weight"), &[h])?,
                q: take(&n("self_attn.q_proj.weight"), &[cfg.q_dim(), h])?,
                k: take(&n("self_attn.k_proj.weight"), &[cfg.kv_dim(), h])?,
                v: take(&n("self_attn.v_proj.weight"), &[cfg.kv_dim(), h])?,
                o: take(&n("self_attn.o_proj.weight"), &[h, cfg.q_dim()])?,
                post_norm: take(&n("post_attention_layernorm.weight"), &[h])?,
                router: take(&names::router(l), &[cfg.num_local_experts, h])?,
            });
        }
        let norm = take(names::FINAL_NORM, &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            take(names::EMBED, &[v, h])?
        } else {
            take(names::LM_HEAD, &[v, h])?
        };
        let (cos, sin) = crate::backend::cpu::ops::rope_tables(
            cfg.rope_theta,
            cfg.head_dim,
            cfg.max_position_embeddings,
        );
        let half = cfg.head_dim / 2;
        let rope_cos = backend.upload(HostTensor::from_f32(
            &cos,
            vec![cfg.max_position_embeddings, half],
        ))?;
        let rope_sin = backend.upload(HostTensor::from_f32(
            &sin,
            vec![cfg.max_position_embeddings, half],
        ))?;
        Ok(Self {
            cfg,
            backend,
            embed,
            layers,
            norm,
            lm_head,
            rope_cos,
            rope_sin,
            bytes,
        })
    }

    /// The model's config.
    #[must_use]
    pub fn config(&self) -> &MixtralConfig {
        &self.cfg
    }

    /// The backend the model runs on.
    #[must_use]
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Bytes of dense weights held.
    #[must_use]
    pub fn weight_bytes(&self) -> usize {
        self.bytes
    }

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

    fn step_inner(
        &self,
        seqs: &mut [SeqStep<'_>],
        kv: &mut KvCache<B>,
        experts: &dyn ExpertExecutor,
        scratch: &mut StepScratch<B>,
        out: &mut StepOutput,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let b = &self.backend;
        let (h, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let ne = cfg.num_local_experts;

        // Validate and reserve before touching anything.
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

        let t: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        scratch.positions.clear();
        scratch.last_rows.clear();
        scratch.ids.clear();
        for s in seqs.iter() {
            let p0 = s.kv.len();
            scratch
                .positions
                .extend((0..s.tokens.len()).map(|i| (p0 + i) as u32));
            scratch.ids.extend_from_slice(s.tokens);
            scratch.last_rows.push((scratch.ids.len() - 1) as u32);
        }
        for (buf, n) in [
            (&mut scratch.x, t * h),
            (&mut scratch.h, t * h),
            (&mut scratch.q, t * qd),
            (&mut scratch.k, t * kvd),
            (&mut scratch.v, t * kvd),
            (&mut scratch.attn, t * qd),
            (&mut scratch.o, t * h),
            (&mut scratch.router, t * ne),
        ] {
            b.ensure_len(buf, n)?;
        }
        scratch.h_host.resize(t * h, 0.0);
        scratch.moe_host.resize(t * h, 0.0);

        let shape = AttnShape {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            block_size: kv.block_size(),
            window: cfg.sliding_window,
        };
        let eps = cfg.rms_norm_eps as f32;

        b.embedding(&self.embed, &scratch.ids, &mut scratch.x)?;
        let mut attn_seqs = Vec::with_capacity(seqs.len());
        let mut row = 0;
        for s in seqs.iter() {
            attn_seqs.push(AttnSeq {
                q_row0: row,
                n_q: s.tokens.len(),
                pos0: s.kv.len(),
                blocks: s.kv.blocks(),
            });
            row += s.tokens.len();
        }
        for (l, lw) in self.layers.iter().enumerate() {
            let _span = tracing::trace_span!("layer", layer = l, tokens = t).entered();
            let mut clock = crate::profile::Clock::start();
            // Attention block.
            b.rms_norm(&scratch.x, t, &lw.input_norm, eps, &mut scratch.h)?;
            b.linear(&scratch.h, t, &lw.q, &mut scratch.q)?;
            b.linear(&scratch.h, t, &lw.k, &mut scratch.k)?;
            b.linear(&scratch.h, t, &lw.v, &mut scratch.v)?;
            b.rope(
                &mut scratch.q,
                qd,
                cfg.head_dim,
                &scratch.positions,
                &self.rope_cos,
                &self.rope_sin,
            )?;
            b.rope(
                &mut scratch.k,
                kvd,
                cfg.head_dim,
                &scratch.positions,
                &self.rope_cos,
                &self.rope_sin,
            )?;
            let (kc, vc) = kv.layer_mut(l);
            for a in &attn_seqs {
                b.kv_write(
                    kc,
                    &scratch.k,
                    a.q_row0,
                    a.n_q,
                    kvd,
                    a.pos0,
                    a.blocks,
                    shape.block_size,
                )?;
                b.kv_write(
                    vc,
                    &scratch.v,
                    a.q_row0,
                    a.n_q,
                    kvd,
                    a.pos0,
                    a.blocks,
                    shape.block_size,
                )?;
            }
            b.attention(&scratch.q, kc, vc, &attn_seqs, &shape, &mut scratch.attn)?;
            b.linear(&scratch.attn, t, &lw.o, &mut scratch.o)?;
            b.add_assign(&mut scratch.x, &scratch.o, t * h)?;
            clock.mark(Phase::Attention);

            // MoE block: route on the host (the router output is tiny), run experts, add.
            b.rms_norm(&scratch.x, t, &lw.post_norm, eps, &mut scratch.h)?;
            b.linear(&scratch.h, t, &lw.router, &mut scratch.router)?;
            b.route(
                &scratch.router,
                t,
                ne,
                cfg.num_experts_per_tok,
                &mut scratch.plan,
            )?;
            b.to_host(&scratch.h, &mut scratch.h_host)?;
            clock.mark(Phase::Router);
            let layer = LayerId::new(l, cfg)?;
            experts.run(layer, &scratch.h_host, &scratch.plan, &mut scratch.moe_host)?;
            clock.mark(Phase::Experts);
            b.write(&mut scratch.o, &scratch.moe_host)?;
            b.add_assign(&mut scratch.x, &scratch.o, t * h)?;
            clock.mark(Phase::Combine);
            if let Some(tr) = out.trace.as_mut() {
                if l == 0 {
                    tr.clear();
                }
                tr.push(scratch.plan.clone());
            }
        }

        drop(attn_seqs);
        for s in seqs.iter_mut() {
            let end = s.kv.len() + s.tokens.len();
            s.kv.set_len(end);
        }

        // Final norm and LM head, on every row or only each sequence's last.
        let rows = match out.which {
            Logits::All => t,
            Logits::Last => {
                // Compact each sequence's last row to the front (rows ascend, so in place).
                b.to_host(&scratch.x, &mut scratch.h_host)?;
                for (i, &r) in scratch.last_rows.iter().enumerate() {
                    let r = r as usize;
                    scratch.h_host.copy_within(r * h..(r + 1) * h, i * h);
                }
                let n = scratch.last_rows.len();
                b.write(&mut scratch.x, &scratch.h_host[..n * h])?;
                n
            }
        };
        b.rms_norm(&scratch.x, rows, &self.norm, eps, &mut scratch.h)?;
        b.ensure_len(&mut scratch.logits, rows * cfg.vocab_size)?;
        b.linear(&scratch.h, rows, &self.lm_head, &mut scratch.logits)?;
        out.logits.resize(rows * cfg.vocab_size, 0.0);
        b.to_host(&scratch.logits, &mut out.logits)?;
        Ok(())
    }
}
