//! The dense part of Mixtral (embeddings, attention, norms, router, LM head) and the layer loop
//! that calls the expert stage through an [`ExpertExecutor`].

mod step;

pub use step::{Logits, SeqStep, StepOutput, StepScratch};

use crate::{
    backend::Backend,
    config::MixtralConfig,
    weights::{names, Checkpoint, HostTensor, LoadProgress},
    Result,
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
        // `matrix`: only ever a linear's weight, so the backend may keep it in the layout its
        // linears read fastest (`Backend::upload_matrix`). The attention projections and an
        // untied LM head are; the embedding table is also read by row, and the router is tiny.
        let mut take = |name: &str, shape: &[usize], matrix: bool| -> Result<B::Weight> {
            let t = ck.tensor(name, shape)?;
            let n = t.bytes().len();
            bytes += n;
            let w = if matrix {
                backend.upload_matrix(t)?
            } else {
                backend.upload(t)?
            };
            progress.advance(n as u64);
            Ok(w)
        };
        let embed = take(names::EMBED, &[v, h], false)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let n = |s: &str| names::layer(l, s);
            layers.push(LayerWeights {
                input_norm: take(&n("input_layernorm.weight"), &[h], false)?,
                q: take(&n("self_attn.q_proj.weight"), &[cfg.q_dim(), h], true)?,
                k: take(&n("self_attn.k_proj.weight"), &[cfg.kv_dim(), h], true)?,
                v: take(&n("self_attn.v_proj.weight"), &[cfg.kv_dim(), h], true)?,
                o: take(&n("self_attn.o_proj.weight"), &[h, cfg.q_dim()], true)?,
                post_norm: take(&n("post_attention_layernorm.weight"), &[h], false)?,
                router: take(&names::router(l), &[cfg.num_local_experts, h], false)?,
            });
        }
        let norm = take(names::FINAL_NORM, &[h], false)?;
        let lm_head = if cfg.tie_word_embeddings {
            // The same mapped table the embedding lookup reads by row: kept in place.
            take(names::EMBED, &[v, h], false)?
        } else {
            take(names::LM_HEAD, &[v, h], true)?
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
}
