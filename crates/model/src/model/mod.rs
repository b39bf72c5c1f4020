//! The dense part of Mixtral (embeddings, attention, norms, router, LM head) and the layer loop
//! that calls the expert stage through an [`ExpertExecutor`].

mod step;

pub use step::{Logits, SeqStep, StepOutput, StepScratch};

use crate::{
    backend::Backend,
    config::MixtralConfig,
    weights::{names, Checkpoint, HostTensor, LoadProgress, WeightRole},
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
    /// Bytes the dense weights hold once loaded from `ck`, quantized where `ck` quantizes at
    /// load; the embedding table counted whole.
    #[must_use]
    pub fn bytes_loaded(ck: &Checkpoint) -> u64 {
        dense_names(ck.config())
            .iter()
            .filter_map(|n| {
                let role = if n == names::LM_HEAD {
                    Some(WeightRole::Head)
                } else if n.contains("self_attn.") {
                    Some(WeightRole::Attention)
                } else {
                    None
                };
                match role {
                    Some(r) => ck.loaded_bytes(n, r),
                    None => ck.tensor_bytes(n),
                }
            })
            .sum()
    }

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
        // A linear's weight (`role`) may be kept in the layout the backend's linears read
        // fastest, and quantized where the checkpoint asks (`Backend::upload_matrix`): the
        // attention projections and an untied LM head. The embedding table is also read by
        // row, and the router is tiny; they stay as stored.
        let mut take =
            |name: &str, shape: &[usize], role: Option<WeightRole>| -> Result<B::Weight> {
                let (t, quantize) = match (role, shape) {
                    (Some(role), &[out, inp]) => ck.linear(name, [out, inp], role)?,
                    _ => (ck.tensor(name, shape)?, None),
                };
                let n = t.bytes().len();
                bytes += quantize.map_or(n, |f| f.bytes_for(shape.iter().product()));
                let w = if role.is_some() {
                    backend.upload_matrix(t, quantize)?
                } else {
                    backend.upload(t)?
                };
                progress.advance(n as u64);
                Ok(w)
            };
        let (attn, head) = (Some(WeightRole::Attention), Some(WeightRole::Head));
        let embed = take(names::EMBED, &[v, h], None)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let n = |s: &str| names::layer(l, s);
            layers.push(LayerWeights {
                input_norm: take(&n("input_layernorm.weight"), &[h], None)?,
                q: take(&n("self_attn.q_proj.weight"), &[cfg.q_dim(), h], attn)?,
                k: take(&n("self_attn.k_proj.weight"), &[cfg.kv_dim(), h], attn)?,
                v: take(&n("self_attn.v_proj.weight"), &[cfg.kv_dim(), h], attn)?,
                o: take(&n("self_attn.o_proj.weight"), &[h, cfg.q_dim()], attn)?,
                post_norm: take(&n("post_attention_layernorm.weight"), &[h], None)?,
                router: take(&names::router(l), &[cfg.num_local_experts, h], None)?,
            });
        }
        let norm = take(names::FINAL_NORM, &[h], None)?;
        let lm_head = if cfg.tie_word_embeddings {
            // The same mapped table the embedding lookup reads by row: kept in place.
            take(names::EMBED, &[v, h], None)?
        } else {
            take(names::LM_HEAD, &[v, h], head)?
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
