//! Mixtral GGUF files (llama.cpp's format) opened as a [`Checkpoint`], so that a file users
//! already have works unchanged: `--model model.gguf`.
//!
//! The file is memory-mapped and its tensors are taken in place where switchyard reads them as
//! they are: F32, F16, BF16, and the Q8_0 and Q4_0 blocks, whose layout is switchyard's own
//! (`weights::quant`). Each expert of a stacked `ffn_*_exps` tensor is a range of it. Two things
//! are copied once at open: the query and key projections, whose rows llama.cpp's converter
//! permutes for its interleaved RoPE (put back in Hugging Face's rotate-half order), and a Q6_K
//! LM head or embedding table (llama-quantize's choice for `output.weight`), dequantized to f32.
//! Config and tokenizer come from the metadata.
//!
//! Everything read from the file is bounds-checked: a truncated or corrupt file gets a named
//! error, never a panic or an allocation sized by the file.

use super::{
    quant::{QuantFormat, QuantPlan},
    Checkpoint, DType, Entry, Shard,
};
use crate::{config::MixtralConfig, ModelError, Result};
use memmap2::Mmap;
use std::{
    collections::HashMap,
    fs::File,
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

/// Whether `path` is a GGUF file (by its magic), rather than a checkpoint folder.
#[must_use]
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    fn as_u64(&self) -> Option<u64> {
        match self {
            Self::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
    fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Float(f) => Some(*f),
            Self::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's header: its dims innermost first, as GGUF stores them.
#[derive(Debug)]
struct TensorInfo {
    dims: Vec<u64>,
    ggml_type: u32,
    offset: u64,
}

/// ggml's type ids of the types read here.
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_Q4_0: u32 = 2;
const GGML_Q8_0: u32 = 8;
const GGML_Q6_K: u32 = 14;
const GGML_BF16: u32 = 30;

/// Elements and bytes per block of a type; None for types not read here.
fn type_block(t: u32) -> Option<(u64, u64)> {
    Some(match t {
        GGML_F32 => (1, 4),
        GGML_F16 | GGML_BF16 => (1, 2),
        GGML_Q4_0 => (32, 18),
        GGML_Q8_0 => (32, 34),
        GGML_Q6_K => (256, 210),
        _ => return None,
    })
}

fn type_name(t: u32) -> String {
    match t {
        GGML_F32 => "F32".into(),
        GGML_F16 => "F16".into(),
        GGML_Q4_0 => "Q4_0".into(),
        GGML_Q8_0 => "Q8_0".into(),
        GGML_Q6_K => "Q6_K".into(),
        GGML_BF16 => "BF16".into(),
        3 => "Q4_1".into(),
        6 => "Q5_0".into(),
        7 => "Q5_1".into(),
        10 => "Q2_K".into(),
        11 => "Q3_K".into(),
        12 => "Q4_K".into(),
        13 => "Q5_K".into(),
        other => format!("ggml type {other}"),
    }
}

/// The parsed header of a GGUF file.
struct Gguf {
    kv: HashMap<String, Value>,
    tensors: HashMap<String, TensorInfo>,
    data_start: u64,
}

/// A bounds-checked little-endian reader over the mapped file.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
    path: &'a Path,
}

/// Most metadata entries, tensors and array elements a header may declare: far above any real
/// model (Mixtral has ~1,000 tensors and a 32,000-token vocabulary), low enough that a corrupt
/// count fails instead of allocating.
const MAX_COUNT: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;

impl<'a> Cursor<'a> {
    fn err(&self, reason: impl Into<String>) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            reason: format!("{} (at byte {})", reason.into(), self.at),
        }
    }
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let n = usize::try_from(n).map_err(|_| self.err("length too large"))?;
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| self.err("truncated header"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn count(&mut self, what: &str) -> Result<u64> {
        let n = self.u64()?;
        if n > MAX_COUNT {
            return Err(self.err(format!("{what} count {n} is not plausible")));
        }
        Ok(n)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.count("string length")?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("a string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        let le = |b: &[u8]| {
            let mut a = [0u8; 8];
            a[..b.len()].copy_from_slice(b);
            a
        };
        Ok(match ty {
            0 => Value::Int(i128::from(self.take(1)?[0])),
            1 => Value::Int(i128::from(self.take(1)?[0] as i8)),
            2 => Value::Int(i128::from(u16::from_le_bytes(
                self.take(2)?.try_into().expect("2"),
            ))),
            3 => Value::Int(i128::from(i16::from_le_bytes(
                self.take(2)?.try_into().expect("2"),
            ))),
            4 => Value::Int(i128::from(self.u32()?)),
            5 => Value::Int(i128::from(self.u32()? as i32)),
            6 => Value::Float(f64::from(f32::from_bits(self.u32()?))),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("arrays nested too deep"));
                }
                let ety = self.u32()?;
                let n = self.count("array")?;
                let mut v = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::Int(i128::from(self.u64()?)),
            11 => Value::Int(i128::from(i64::from_le_bytes(le(self.take(8)?)))),
            12 => Value::Float(f64::from_bits(self.u64()?)),
            other => return Err(self.err(format!("unknown metadata type {other}"))),
        })
    }
}

impl Gguf {
    fn parse(b: &[u8], path: &Path) -> Result<Self> {
        let mut c = Cursor { b, at: 0, path };
        if c.take(4)? != b"GGUF" {
            return Err(c.err("not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!("GGUF version {version} (2 and 3 are read)")));
        }
        let n_tensors = c.count("tensor")?;
        let n_kv = c.count("metadata")?;
        let mut kv = HashMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            kv.insert(key, v);
        }
        let mut tensors = HashMap::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()?;
            if nd == 0 || nd > MAX_DIMS {
                return Err(c.err(format!("tensor {name:?} has {nd} dimensions")));
            }
            let dims = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let ggml_type = c.u32()?;
            let offset = c.u64()?;
            tensors.insert(
                name,
                TensorInfo {
                    dims,
                    ggml_type,
                    offset,
                },
            );
        }
        let align = kv
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1);
        let data_start = (c.at as u64).next_multiple_of(align);
        Ok(Self {
            kv,
            tensors,
            data_start,
        })
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.kv.get(key)
    }
}

/// Opens a Mixtral GGUF file as a checkpoint.
pub(super) fn open(path: &Path) -> Result<Checkpoint> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: read-only map; as for safetensors shards, the file must not change while served.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let g = Gguf::parse(&map, path)?;
    let bad = |reason: String| ModelError::Gguf {
        path: path.to_path_buf(),
        reason,
    };
    let arch = g.get("general.architecture").and_then(Value::as_str);
    if arch != Some("llama") {
        return Err(bad(format!(
            "architecture {arch:?}: switchyard reads Mixtral GGUFs (\"llama\" with experts)"
        )));
    }
    let config = config_of(&g, path)?;
    let builder = Builder {
        g: &g,
        map: &map,
        path,
        cfg: &config,
        entries: HashMap::new(),
        owned: Vec::new(),
    };
    let (entries, owned) = builder.build()?;
    // The tensors copied at open, in a read-only anonymous map after the file's.
    let mut anon =
        memmap2::MmapMut::map_anon(owned.iter().map(|(_, b)| b.len()).sum::<usize>().max(1))
            .map_err(|e| ModelError::io(path, e))?;
    let mut at = 0;
    let mut tensors = entries;
    for (name, bytes) in &owned {
        anon[at..at + bytes.len()].copy_from_slice(bytes);
        if let Some(e) = tensors.get_mut(name) {
            e.shard = 1;
            e.range = at..at + bytes.len();
        }
        at += bytes.len();
    }
    let anon = anon.make_read_only().map_err(|e| ModelError::io(path, e))?;
    let expert_type = |l: usize| {
        tensors
            .get(&super::names::expert(l, 0, "w1"))
            .map(|e| e.dtype.clone())
    };
    let stored_format = match expert_type(0) {
        Some(Ok(DType::Q8_0)) => Some(QuantFormat::Q8_0),
        Some(Ok(DType::Q4_0)) => Some(QuantFormat::Q4_0),
        _ => None,
    };
    let attention = matches!(
        tensors
            .get(&super::names::layer(0, "self_attn.q_proj.weight"))
            .map(|e| &e.dtype),
        Some(Ok(DType::Q8_0 | DType::Q4_0))
    );
    let tokenizer = tokenizer_json(&g, path)?;
    Ok(Checkpoint {
        dir: path.to_path_buf(),
        config,
        shards: vec![
            Shard {
                path: path.to_path_buf(),
                map: Arc::new(map),
            },
            Shard {
                path: PathBuf::from(format!("{} (converted at open)", path.display())),
                map: Arc::new(anon),
            },
        ],
        tensors,
        stored: QuantPlan {
            format: stored_format,
            attention: attention && stored_format.is_some(),
        },
        plan: QuantPlan::default(),
        gguf_tokenizer: Some(tokenizer),
    })
}

/// config.json's fields from the `llama.*` metadata.
fn config_of(g: &Gguf, path: &Path) -> Result<MixtralConfig> {
    let bad = |reason: String| ModelError::Gguf {
        path: path.to_path_buf(),
        reason,
    };
    let int = |k: &str| -> Result<u64> {
        g.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("missing or invalid metadata {k}")))
    };
    let experts = int("llama.expert_count")
        .map_err(|_| bad("llama.expert_count is missing: not a mixture-of-experts model".into()))?;
    let heads = int("llama.attention.head_count")?;
    let hidden = int("llama.embedding_length")?;
    let head_dim = match g.get("llama.attention.key_length").and_then(Value::as_u64) {
        Some(d) => d,
        None => int("llama.rope.dimension_count").unwrap_or(hidden / heads.max(1)),
    };
    let vocab = match g.get("llama.vocab_size").and_then(Value::as_u64) {
        Some(v) => v,
        None => match g.get("tokenizer.ggml.tokens") {
            Some(Value::Array(t)) => t.len() as u64,
            _ => return Err(bad("no vocabulary size".into())),
        },
    };
    let tied = !g.tensors.contains_key("output.weight");
    let f = |k: &str, d: f64| g.get(k).and_then(Value::as_f64).unwrap_or(d);
    let v = serde_json::json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_act": "silu",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int("llama.feed_forward_length")?,
        "num_hidden_layers": int("llama.block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": g.get("llama.attention.head_count_kv").and_then(Value::as_u64).unwrap_or(heads),
        "head_dim": head_dim,
        "num_local_experts": experts,
        "num_experts_per_tok": int("llama.expert_used_count")?,
        "rope_theta": f("llama.rope.freq_base", 10000.0),
        "rms_norm_eps": f("llama.attention.layer_norm_rms_epsilon", 1e-5),
        "max_position_embeddings": int("llama.context_length")?,
        "sliding_window": g.get("llama.attention.sliding_window").and_then(Value::as_u64),
        "tie_word_embeddings": tied,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64),
        "eos_token_id": g.get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64),
    });
    MixtralConfig::from_json(&v.to_string(), path)
}

/// Maps GGUF tensors onto the Hugging Face names the loaders ask for.
struct Builder<'a> {
    g: &'a Gguf,
    map: &'a [u8],
    path: &'a Path,
    cfg: &'a MixtralConfig,
    entries: HashMap<String, Entry>,
    /// Tensors copied at open (name, bytes), placed in the second shard.
    owned: Vec<(String, Vec<u8>)>,
}

type Built = (HashMap<String, Entry>, Vec<(String, Vec<u8>)>);

/// A GGUF tensor's byte range in the file, ggml type and row-major shape.
type Raw = (Range<usize>, u32, Vec<usize>);

impl Builder<'_> {
    fn bad(&self, reason: String) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    /// The byte range, dtype and row-major shape of GGUF tensor `name`, if present.
    fn raw(&self, name: &str) -> Result<Option<Raw>> {
        let Some(t) = self.g.tensors.get(name) else {
            return Ok(None);
        };
        let elems = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| self.bad(format!("{name}: dimensions overflow")))?;
        let bytes = match type_block(t.ggml_type) {
            Some((be, bb)) if elems % be == 0 && t.dims[0] % be == 0 => elems / be * bb,
            Some(_) => return Err(self.bad(format!("{name}: rows are not whole blocks"))),
            // Unknown types still need a range for the error the loader gives; 0 bytes.
            None => 0,
        };
        let start = self
            .g
            .data_start
            .checked_add(t.offset)
            .ok_or_else(|| self.bad(format!("{name}: offset overflows")))?;
        let end = start
            .checked_add(bytes)
            .filter(|&e| e <= self.map.len() as u64)
            .ok_or_else(|| {
                self.bad(format!(
                    "{name}: data runs past the end of the file (truncated?)"
                ))
            })?;
        let shape = t.dims.iter().rev().map(|&d| d as usize).collect();
        Ok(Some((start as usize..end as usize, t.ggml_type, shape)))
    }

    fn dtype(t: u32) -> Result<DType, String> {
        match t {
            GGML_F32 => Ok(DType::F32),
            GGML_F16 => Ok(DType::F16),
            GGML_BF16 => Ok(DType::BF16),
            GGML_Q8_0 => Ok(DType::Q8_0),
            GGML_Q4_0 => Ok(DType::Q4_0),
            other => Err(type_name(other)),
        }
    }

    /// `to` as GGUF tensor `from` in place (Q6_K dequantized to f32 where `allow_q6k`).
    fn take(&mut self, from: &str, to: String, allow_q6k: bool) -> Result<()> {
        let Some((range, ty, shape)) = self.raw(from)? else {
            return Ok(());
        };
        if ty == GGML_Q6_K && allow_q6k {
            let f = dequantize_q6_k(&self.map[range]);
            self.entries
                .insert(to.clone(), entry(0..0, Ok(DType::F32), shape));
            self.owned.push((to, bytemuck::cast_slice(&f).to_vec()));
            return Ok(());
        }
        self.entries
            .insert(to, entry(range, Self::dtype(ty), shape));
        Ok(())
    }

    /// A q or k projection with each head's rows put back from llama.cpp's interleaved RoPE
    /// order (`2i + j`) into rotate-half order (`j · hd/2 + i`).
    fn take_unpermuted(&mut self, from: &str, to: String, heads: usize) -> Result<()> {
        let Some((range, ty, shape)) = self.raw(from)? else {
            return Ok(());
        };
        let rows = shape[0];
        if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
            return Err(self.bad(format!(
                "{from}: {rows} rows do not split into {heads} heads"
            )));
        }
        let row_bytes = range.len() / rows.max(1);
        let src = &self.map[range];
        let (hd, half) = (rows / heads, rows / heads / 2);
        let mut out = vec![0u8; src.len()];
        for h in 0..heads {
            for i in 0..half {
                for j in 0..2 {
                    let hf = h * hd + j * half + i;
                    let gg = h * hd + 2 * i + j;
                    out[hf * row_bytes..(hf + 1) * row_bytes]
                        .copy_from_slice(&src[gg * row_bytes..(gg + 1) * row_bytes]);
                }
            }
        }
        self.entries
            .insert(to.clone(), entry(0..0, Self::dtype(ty), shape));
        self.owned.push((to, out));
        Ok(())
    }

    /// Each expert of a stacked `[experts, out, in]` tensor as a range of it.
    fn take_experts(&mut self, from: &str, l: usize, w: &str) -> Result<()> {
        use super::names::expert;
        let n = self.cfg.num_local_experts;
        match self.raw(from)? {
            Some((range, ty, shape)) => {
                if shape.len() != 3 || shape[0] != n {
                    return Err(
                        self.bad(format!("{from}: shape {shape:?}, expected [{n}, out, in]"))
                    );
                }
                let per = range.len() / n;
                for e in 0..n {
                    let r = range.start + e * per..range.start + (e + 1) * per;
                    self.entries.insert(
                        expert(l, e, w),
                        entry(r, Self::dtype(ty), shape[1..].to_vec()),
                    );
                }
            }
            // Older files: one tensor per expert.
            None => {
                let short = match w {
                    "w1" => "gate",
                    "w2" => "down",
                    _ => "up",
                };
                for e in 0..n {
                    self.take(
                        &format!("blk.{l}.ffn_{short}.{e}.weight"),
                        expert(l, e, w),
                        false,
                    )?;
                }
            }
        }
        Ok(())
    }

    fn build(mut self) -> Result<Built> {
        use super::names::{layer, EMBED, FINAL_NORM, LM_HEAD};
        let (heads, kv_heads) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
        self.take("token_embd.weight", EMBED.into(), true)?;
        self.take("output_norm.weight", FINAL_NORM.into(), false)?;
        self.take("output.weight", LM_HEAD.into(), true)?;
        for l in 0..self.cfg.num_hidden_layers {
            let b = |s: &str| format!("blk.{l}.{s}.weight");
            self.take(&b("attn_norm"), layer(l, "input_layernorm.weight"), false)?;
            self.take(
                &b("ffn_norm"),
                layer(l, "post_attention_layernorm.weight"),
                false,
            )?;
            self.take_unpermuted(&b("attn_q"), layer(l, "self_attn.q_proj.weight"), heads)?;
            self.take_unpermuted(&b("attn_k"), layer(l, "self_attn.k_proj.weight"), kv_heads)?;
            self.take(&b("attn_v"), layer(l, "self_attn.v_proj.weight"), false)?;
            self.take(
                &b("attn_output"),
                layer(l, "self_attn.o_proj.weight"),
                false,
            )?;
            self.take(
                &b("ffn_gate_inp"),
                layer(l, "block_sparse_moe.gate.weight"),
                false,
            )?;
            self.take_experts(&b("ffn_gate_exps"), l, "w1")?;
            self.take_experts(&b("ffn_up_exps"), l, "w3")?;
            self.take_experts(&b("ffn_down_exps"), l, "w2")?;
        }
        Ok((self.entries, self.owned))
    }
}

fn entry(range: Range<usize>, dtype: Result<DType, String>, shape: Vec<usize>) -> Entry {
    Entry {
        shard: 0,
        dtype,
        shape,
        range,
    }
}

/// Q6_K blocks (256 weights: 128 bytes of low nibbles, 64 of high bit pairs, 16 signed scales,
/// an f16 scale) to f32, as llama.cpp's `dequantize_row_q6_K`.
fn dequantize_q6_k(b: &[u8]) -> Vec<f32> {
    let mut y = Vec::with_capacity(b.len() / 210 * 256);
    for blk in b.chunks_exact(210) {
        let (ql, rest) = blk.split_at(128);
        let (qh, rest) = rest.split_at(64);
        let (sc, d) = rest.split_at(16);
        let d = half::f16::from_bits(u16::from_le_bytes([d[0], d[1]])).to_f32();
        let mut out = [0f32; 256];
        for n in 0..2 {
            let (ql, qh, sc) = (&ql[n * 64..], &qh[n * 32..], &sc[n * 8..]);
            for l in 0..32 {
                let is = l / 16;
                let q = |lo: u8, hi: u8| f32::from(((lo | (hi << 4)) as i8) - 32);
                let s = |i: usize| f32::from(sc[i] as i8);
                let o = &mut out[n * 128..];
                o[l] = d * s(is) * q(ql[l] & 0xF, qh[l] & 3);
                o[l + 32] = d * s(is + 2) * q(ql[l + 32] & 0xF, (qh[l] >> 2) & 3);
                o[l + 64] = d * s(is + 4) * q(ql[l] >> 4, (qh[l] >> 4) & 3);
                o[l + 96] = d * s(is + 6) * q(ql[l + 32] >> 4, (qh[l] >> 6) & 3);
            }
        }
        y.extend_from_slice(&out);
    }
    y
}

/// What [`crate::Tokenizer`] needs, built from the `tokenizer.ggml.*` metadata: a Hugging Face
/// tokenizer.json, the chat template, the bos and eos texts.
#[derive(Clone, Debug)]
pub(crate) struct GgufTokenizer {
    pub json: String,
    pub chat_template: Option<String>,
    pub bos: String,
    pub eos: String,
}

/// tokenizer.json for the file's vocabulary: SentencePiece-style BPE (`llama`: merges ranked by
/// the merged piece's score, byte fallback, `▁` for spaces) or byte-level BPE (`gpt2`: the
/// merges the file lists).
fn tokenizer_json(g: &Gguf, path: &Path) -> Result<GgufTokenizer> {
    use serde_json::json;
    let bad = |reason: String| ModelError::Gguf {
        path: path.to_path_buf(),
        reason: format!("tokenizer: {reason}"),
    };
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("");
    let tokens: Vec<String> = match g.get("tokenizer.ggml.tokens") {
        Some(Value::Array(t)) => t
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("tokens are not strings".into()))?,
        _ => return Err(bad("no tokenizer.ggml.tokens".into())),
    };
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
        Some(Value::Array(t)) => t.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let id = |k: &str| g.get(k).and_then(Value::as_u64).map(|i| i as usize);
    let text_of = |i: Option<usize>, d: &str| {
        i.and_then(|i| tokens.get(i).cloned())
            .unwrap_or_else(|| d.to_string())
    };
    let bos = text_of(id("tokenizer.ggml.bos_token_id"), "<s>");
    let eos = text_of(id("tokenizer.ggml.eos_token_id"), "</s>");
    let unk = id("tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i).cloned());
    let add_bos = !matches!(
        g.get("tokenizer.ggml.add_bos_token"),
        Some(Value::Bool(false))
    );
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Control (3) and user-defined (4) tokens are matched whole, as added tokens.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3 | 4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": types[i] == 3})
        })
        .collect();
    let post = if add_bos {
        json!({"type": "TemplateProcessing",
               "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
               "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                        {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
               "special_tokens": {bos.clone(): {"id": bos, "ids": [id("tokenizer.ggml.bos_token_id").unwrap_or(1)], "tokens": [bos]}}})
    } else {
        serde_json::Value::Null
    };
    let json = match model {
        "llama" => {
            let scores: Vec<f64> = match g.get("tokenizer.ggml.scores") {
                Some(Value::Array(s)) => s.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
                _ => return Err(bad("no tokenizer.ggml.scores for a llama vocabulary".into())),
            };
            let index: HashMap<&str, usize> = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.as_str(), i))
                .collect();
            // Every split of a normal piece into two pieces of the vocabulary is a merge, ranked
            // by the merged piece's score (as transformers converts SentencePiece models).
            let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
            for (i, t) in tokens.iter().enumerate() {
                if types.get(i) != Some(&1) {
                    continue;
                }
                for (k, _) in t.char_indices().skip(1) {
                    let (a, b) = t.split_at(k);
                    if let (Some(&ia), Some(&ib)) = (index.get(a), index.get(b)) {
                        let _ = (ia, ib);
                        merges.push((scores.get(i).copied().unwrap_or(0.0), i, k, a, b));
                    }
                }
            }
            merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
            let merges: Vec<String> = merges.iter().map(|m| format!("{} {}", m.3, m.4)).collect();
            json!({
                "version": "1.0",
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "▁"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
                "pre_tokenizer": null,
                "post_processor": post,
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                          "vocab": vocab, "merges": merges},
            })
        }
        "gpt2" => {
            let merges: Vec<String> = match g.get("tokenizer.ggml.merges") {
                Some(Value::Array(m)) => m
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => return Err(bad("no tokenizer.ggml.merges for a gpt2 vocabulary".into())),
            };
            json!({
                "version": "1.0",
                "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
                "post_processor": post,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                          "vocab": vocab, "merges": merges},
            })
        }
        other => {
            return Err(bad(format!(
                "vocabulary type {other:?} (llama and gpt2 are read)"
            )))
        }
    };
    Ok(GgufTokenizer {
        json: json.to_string(),
        chat_template: g
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string),
        bos,
        eos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_headers_are_named_errors() {
        let p = Path::new("x.gguf");
        let mut h = b"GGUF".to_vec();
        h.extend_from_slice(&3u32.to_le_bytes());
        assert!(Gguf::parse(&h, p).is_err(), "truncated counts");
        h.extend_from_slice(&0u64.to_le_bytes());
        h.extend_from_slice(&u64::MAX.to_le_bytes());
        let e = Gguf::parse(&h, p).err().unwrap().to_string();
        assert!(e.contains("not plausible"), "{e}");
        assert!(Gguf::parse(b"GGML\x03\0\0\0", p).is_err());
        // Every prefix of a valid header fails cleanly.
        let mut ok = b"GGUF".to_vec();
        ok.extend_from_slice(&3u32.to_le_bytes());
        ok.extend_from_slice(&1u64.to_le_bytes());
        ok.extend_from_slice(&1u64.to_le_bytes());
        ok.extend_from_slice(&4u64.to_le_bytes());
        ok.extend_from_slice(b"name");
        ok.extend_from_slice(&8u32.to_le_bytes());
        ok.extend_from_slice(&2u64.to_le_bytes());
        ok.extend_from_slice(b"hi");
        ok.extend_from_slice(&1u64.to_le_bytes());
        ok.extend_from_slice(b"t");
        ok.extend_from_slice(&2u32.to_le_bytes());
        ok.extend_from_slice(&32u64.to_le_bytes());
        ok.extend_from_slice(&2u64.to_le_bytes());
        ok.extend_from_slice(&GGML_F32.to_le_bytes());
        ok.extend_from_slice(&0u64.to_le_bytes());
        let g = Gguf::parse(&ok, p).unwrap();
        assert_eq!(g.get("name"), Some(&Value::Str("hi".into())));
        assert_eq!(g.tensors["t"].dims, vec![32, 2]);
        for n in 0..ok.len() {
            assert!(Gguf::parse(&ok[..n], p).is_err(), "prefix {n}");
        }
    }

    proptest::proptest! {
        /// Any bytes after a valid magic and version parse or fail with an error; none panic
        /// or allocate by a count the file declares.
        #[test]
        fn arbitrary_headers_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut h = b"GGUF\x03\0\0\0".to_vec();
            h.extend_from_slice(&body);
            let _ = Gguf::parse(&h, Path::new("fuzz.gguf"));
        }
    }

    #[test]
    fn q6_k_dequantizes_as_llama_cpp() {
        // One block: d = 1, scales 1..16, ql/qh chosen so that element 0 is q = 5 - 32.
        let mut b = vec![0u8; 210];
        b[0] = 5;
        for (i, s) in b[192..208].iter_mut().enumerate() {
            *s = (i + 1) as u8;
        }
        b[208..].copy_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes());
        let y = dequantize_q6_k(&b);
        assert_eq!(y.len(), 256);
        assert_eq!(y[0], 1.0 * 1.0 * (5.0 - 32.0));
        // Element 32 uses scale 3 and q = 0 - 32.
        assert_eq!(y[32], 3.0 * -32.0);
    }
}
