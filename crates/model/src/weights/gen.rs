//! `gen-model`: writes a random but well-conditioned Mixtral checkpoint as a Hugging Face folder
//! (config.json, safetensors shards with an index, tokenizer). Tests and benchmarks make their
//! larger and oddly-shaped checkpoints with it, so nothing large is committed.
//!
//! Linear weights are uniform with standard deviation `1/√in`, so every projection keeps
//! activations near unit scale and router logits are spread out (no near-ties from vanishing
//! logits); norm weights are `1 ± 0.1`. Each tensor's values depend only on the seed and its
//! name, so a checkpoint is reproducible whatever the shard count.

use super::{names, DType};
use crate::{ModelError, Result};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::json;
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// The shape and options of a generated checkpoint.
#[derive(Clone, Debug)]
pub struct GenSpec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Written to config.json when given (may differ from hidden/heads).
    pub head_dim: Option<usize>,
    pub experts: usize,
    pub experts_per_tok: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub sliding_window: Option<usize>,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub dtype: DType,
    pub shards: usize,
    pub seed: u64,
    /// Copy tokenizer files from this folder instead of writing the built-in byte-level one.
    pub tokenizer_from: Option<PathBuf>,
    /// Experts every token prefers, in every layer (skewed load, as real models have): every
    /// embedding gets a large constant in dimension 0, which survives RMSNorm and the residual
    /// stream, and these experts' router rows weight that dimension.
    pub hot_experts: Vec<usize>,
}

impl Default for GenSpec {
    fn default() -> Self {
        Self {
            hidden: 1024,
            layers: 8,
            heads: 16,
            kv_heads: 4,
            head_dim: None,
            experts: 8,
            experts_per_tok: 2,
            intermediate: 3584,
            vocab: 32000,
            sliding_window: None,
            max_position_embeddings: 4096,
            rope_theta: 1e6,
            tie_word_embeddings: false,
            dtype: DType::BF16,
            shards: 1,
            seed: 0,
            tokenizer_from: None,
            hot_experts: Vec::new(),
        }
    }
}

/// Special tokens of the built-in tokenizer, ids 0..5 (the layout of Mistral-style vocabularies).
const SPECIALS: [&str; 5] = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"];

/// Mistral's chat template, as shipped with Mixtral-Instruct.
const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

impl GenSpec {
    /// Applies `hot_experts` to tensor `name`.
    fn skew(&self, name: &str, values: &mut [f32]) {
        if self.hot_experts.is_empty() {
            return;
        }
        let h = self.hidden;
        if name == names::EMBED {
            for row in values.chunks_mut(h) {
                row[0] = 8.0;
            }
        } else if (0..self.layers).any(|l| names::router(l) == name) {
            for &e in &self.hot_experts {
                if let Some(w) = values.get_mut(e * h) {
                    *w = 1.0;
                }
            }
        }
    }

    fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads.max(1))
    }

    /// Every tensor name with its shape, in checkpoint order.
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let (qd, kvd) = (
            self.heads * self.head_dim(),
            self.kv_heads * self.head_dim(),
        );
        let mut t = vec![(names::EMBED.to_string(), vec![v, h])];
        for l in 0..self.layers {
            let n = |s: &str| names::layer(l, s);
            t.push((n("input_layernorm.weight"), vec![h]));
            t.push((n("self_attn.q_proj.weight"), vec![qd, h]));
            t.push((n("self_attn.k_proj.weight"), vec![kvd, h]));
            t.push((n("self_attn.v_proj.weight"), vec![kvd, h]));
            t.push((n("self_attn.o_proj.weight"), vec![h, qd]));
            t.push((n("post_attention_layernorm.weight"), vec![h]));
            t.push((names::router(l), vec![self.experts, h]));
            for e in 0..self.experts {
                t.push((names::expert(l, e, "w1"), vec![i, h]));
                t.push((names::expert(l, e, "w2"), vec![h, i]));
                t.push((names::expert(l, e, "w3"), vec![i, h]));
            }
        }
        t.push((names::FINAL_NORM.to_string(), vec![h]));
        if !self.tie_word_embeddings {
            t.push((names::LM_HEAD.to_string(), vec![v, h]));
        }
        t
    }

    /// Bytes of weights the checkpoint will hold.
    #[must_use]
    pub fn weight_bytes(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, s)| (s.iter().product::<usize>() * self.dtype.size()) as u64)
            .sum()
    }

    fn check(&self) -> Result<()> {
        if let Some(&e) = self.hot_experts.iter().find(|&&e| e >= self.experts) {
            return Err(ModelError::Input(format!(
                "hot expert {e} out of range (the model has {})",
                self.experts
            )));
        }
        let bad = |m: String| Err(ModelError::Input(format!("gen-model: {m}")));
        if let Some(q) = self.dtype.quant() {
            return bad(format!(
                "writes f32, f16 or bf16 weights, not {q} (quantize them with `switchyard quantize`)"
            ));
        }
        if [
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.experts,
            self.intermediate,
            self.vocab,
        ]
        .contains(&0)
        {
            return bad("every size must be positive".into());
        }
        if self.head_dim.is_none() && !self.hidden.is_multiple_of(self.heads) {
            return bad(format!(
                "hidden {} is not divisible by heads {}; give --head-dim",
                self.hidden, self.heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("head_dim {} must be even", self.head_dim()));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "heads {} is not a multiple of kv-heads {}",
                self.heads, self.kv_heads
            ));
        }
        if self.experts_per_tok == 0 || self.experts_per_tok > self.experts {
            return bad(format!(
                "experts-per-tok {} must be in 1..={}",
                self.experts_per_tok, self.experts
            ));
        }
        if self.tokenizer_from.is_none() && self.vocab < SPECIALS.len() + 256 {
            return bad(format!(
                "the built-in byte-level tokenizer needs vocab >= {}",
                SPECIALS.len() + 256
            ));
        }
        if self.shards == 0 {
            return bad("shards must be at least 1".into());
        }
        Ok(())
    }
}

/// Values of one tensor: deterministic in (seed, name).
fn tensor_values(seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let is_norm = shape.len() == 1;
    let fan_in = shape.last().copied().unwrap_or(1) as f32;
    // Uniform(-a, a) has standard deviation a/√3.
    let a = if name == names::EMBED {
        3f32.sqrt()
    } else {
        (3.0 / fan_in).sqrt()
    };
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(h.wrapping_add(ci as u64));
            for v in chunk.iter_mut() {
                let u: f32 = rng.random::<f32>() * 2.0 - 1.0;
                *v = if is_norm { 1.0 + 0.1 * u } else { a * u };
            }
        });
    out
}

fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::BF16 => {
            let v: Vec<bf16> = values.par_iter().map(|&x| bf16::from_f32(x)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::F16 => {
            let v: Vec<f16> = values.par_iter().map(|&x| f16::from_f32(x)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::Q8_0 | DType::Q4_0 => unreachable!("GenSpec::check refuses quantized dtypes"),
    }
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::Q8_0 | DType::Q4_0 => unreachable!("GenSpec::check refuses quantized dtypes"),
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| ModelError::Input(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

/// Writes the checkpoint into `out` (created if missing). `on_tensor(bytes)` is called after each
/// tensor is generated, for progress bars. Returns the total bytes of weights written.
pub fn generate(spec: &GenSpec, out: &Path, on_tensor: &(dyn Fn(u64) + Sync)) -> Result<u64> {
    spec.check()?;
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let total = spec.weight_bytes();
    // Contiguous shards of roughly equal size, in checkpoint order.
    let per_shard = total.div_ceil(spec.shards as u64).max(1);
    let mut groups: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new(); spec.shards];
    let mut acc = 0u64;
    for (name, shape) in spec.tensors() {
        let idx = ((acc / per_shard) as usize).min(spec.shards - 1);
        acc += (shape.iter().product::<usize>() * spec.dtype.size()) as u64;
        groups[idx].push((name, shape));
    }
    groups.retain(|g| !g.is_empty());
    write_shards(spec, out, &groups, total, on_tensor)?;
    write_config(spec, out)?;
    write_tokenizer(spec, out)?;
    Ok(total)
}

/// Each group of tensors as one safetensors shard, and the index when there are several.
fn write_shards(
    spec: &GenSpec,
    out: &Path,
    groups: &[Vec<(String, Vec<usize>)>],
    total: u64,
    on_tensor: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let k = groups.len();
    let mut weight_map = BTreeMap::new();
    for (si, group) in groups.iter().enumerate() {
        let file = if k == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, k)
        };
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = group
            .iter()
            .map(|(name, shape)| {
                let mut values = tensor_values(spec.seed, name, shape);
                spec.skew(name, &mut values);
                let bytes = encode(&values, spec.dtype);
                on_tensor(bytes.len() as u64);
                (name.clone(), shape.clone(), bytes)
            })
            .collect();
        let views = data
            .iter()
            .map(|(n, s, b)| {
                safetensors::tensor::TensorView::new(st_dtype(spec.dtype), s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| ModelError::Input(format!("gen-model: {n}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let path = out.join(&file);
        let meta = Some(
            [("format".to_string(), "pt".to_string())]
                .into_iter()
                .collect(),
        );
        safetensors::serialize_to_file(views, meta, &path).map_err(|e| {
            ModelError::Safetensors {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        for (n, _, _) in &data {
            weight_map.insert(n.clone(), file.clone());
        }
    }
    if k > 1 {
        write_json(
            &out.join("model.safetensors.index.json"),
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }

    Ok(())
}

/// config.json and generation_config.json.
fn write_config(spec: &GenSpec, out: &Path) -> Result<()> {
    let dtype_name = match spec.dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::Q8_0 | DType::Q4_0 => unreachable!("GenSpec::check refuses quantized dtypes"),
    };
    write_json(
        &out.join("config.json"),
        &json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": spec.vocab,
            "hidden_size": spec.hidden,
            "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads,
            "head_dim": spec.head_dim,
            "num_local_experts": spec.experts,
            "num_experts_per_tok": spec.experts_per_tok,
            "max_position_embeddings": spec.max_position_embeddings,
            "rope_theta": spec.rope_theta,
            "rms_norm_eps": 1e-5,
            "sliding_window": spec.sliding_window,
            "tie_word_embeddings": spec.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": dtype_name,
            "attention_dropout": 0.0,
            "router_jitter_noise": 0.0,
            "output_router_logits": false,
        }),
    )?;
    write_json(
        &out.join("generation_config.json"),
        &json!({"bos_token_id": 1, "eos_token_id": 2, "do_sample": false}),
    )?;
    Ok(())
}

/// The tokenizer files: copied from `tokenizer_from`, or the built-in byte-level one.
fn write_tokenizer(spec: &GenSpec, out: &Path) -> Result<()> {
    match &spec.tokenizer_from {
        Some(src) => {
            for f in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ] {
                let from = src.join(f);
                if from.exists() {
                    std::fs::copy(&from, out.join(f)).map_err(|e| ModelError::io(&from, e))?;
                }
            }
        }
        None => write_builtin_tokenizer(out)?,
    }
    Ok(())
}

/// GPT-2's reversible byte → printable-char mapping used by byte-level BPE.
fn bytes_to_unicode() -> Vec<char> {
    let mut keep: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = keep.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !keep.contains(&b) {
            keep.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in keep.iter().zip(chars) {
        table[*b as usize] = char::from_u32(c).unwrap_or(' ');
    }
    table
}

/// A byte-level BPE tokenizer with no merges: every byte is a token (ids 5..261) after the five
/// specials. It round-trips any text, which is all random weights need.
fn write_builtin_tokenizer(out: &Path) -> Result<()> {
    let mut vocab = serde_json::Map::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for (b, c) in bytes_to_unicode().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(SPECIALS.len() + b));
    }
    let added: Vec<_> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                             "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    write_json(&out.join("tokenizer.json"), &tok)?;
    write_json(
        &out.join("tokenizer_config.json"),
        &json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": true, "add_eos_token": false, "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast"}),
    )
}
