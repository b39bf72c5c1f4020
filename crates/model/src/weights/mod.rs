//! Hugging Face checkpoint folders: `config.json` plus one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped.
//!
//! Opening a checkpoint maps every shard and validates every header (a truncated or corrupt file
//! fails here, naming the file). Tensors are then taken by name with the expected shape, so a
//! worker can take only the experts it hosts and never touch the rest of the file.

pub mod gen;
pub mod gguf;
pub mod names;
pub mod quant;
mod tensor;
mod write_quantized;

pub use quant::{QuantFormat, QuantPlan, WeightRole};
pub use tensor::{DType, Elems, HostTensor};
pub use write_quantized::{write_quantized, QuantizeReport};

use crate::{config::MixtralConfig, ModelError, Result};
use memmap2::Mmap;
use std::{
    collections::{BTreeSet, HashMap},
    fs::File,
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

/// Where a tensor lives.
#[derive(Debug)]
struct Entry {
    shard: usize,
    dtype: Result<DType, String>,
    shape: Vec<usize>,
    range: Range<usize>,
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
}

/// An opened checkpoint folder.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: MixtralConfig,
    shards: Vec<Shard>,
    tensors: HashMap<String, Entry>,
    /// How the linears are stored, from config.json's `quantization_config`.
    stored: QuantPlan,
    /// What to quantize at load ([`Checkpoint::set_quantize`]).
    plan: QuantPlan,
    /// A GGUF file's tokenizer, from its metadata (a folder has tokenizer.json).
    gguf_tokenizer: Option<gguf::GgufTokenizer>,
}

/// Told how many bytes a load will touch and how far it is; the CLI draws a progress bar with it.
pub trait LoadProgress: Sync {
    /// Called once before any bytes are read.
    fn start(&self, total_bytes: u64);
    /// Called as bytes become resident.
    fn advance(&self, bytes: u64);
    /// Called once at the end.
    fn finish(&self) {}
}

/// A `LoadProgress` that reports nothing.
pub struct NoProgress;

impl LoadProgress for NoProgress {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}

impl Checkpoint {
    /// Opens `dir`: reads and validates `config.json`, maps and validates every shard header.
    /// A GGUF file (llama.cpp's format) opens as a checkpoint too ([`gguf`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if gguf::is_gguf(&dir) {
            return gguf::open(&dir);
        }
        if !dir.is_dir() {
            return Err(ModelError::io(
                &dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not a checkpoint folder"),
            ));
        }
        let mut config = MixtralConfig::from_file(&dir.join("config.json"))?;
        config.merge_generation_config(&dir)?;
        let stored = read_quantization_config(&dir.join("config.json"))?;
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");

        let mut ck = Self {
            dir: dir.clone(),
            config,
            shards: Vec::new(),
            tensors: HashMap::new(),
            stored,
            plan: QuantPlan::default(),
            gguf_tokenizer: None,
        };
        if index_path.exists() {
            let weight_map = read_index(&index_path)?;
            let files: BTreeSet<&String> = weight_map.values().collect();
            let mut shard_of_file = HashMap::new();
            for file in files {
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(ModelError::Index {
                        path: index_path.clone(),
                        reason: format!("shard name {file:?} must be a plain file name"),
                    });
                }
                let path = dir.join(file);
                if !path.is_file() {
                    return Err(ModelError::Index {
                        path: index_path.clone(),
                        reason: format!("points at shard {file:?}, which does not exist"),
                    });
                }
                shard_of_file.insert(file.clone(), ck.add_shard(path)?);
            }
            for (name, file) in &weight_map {
                let shard = shard_of_file[file];
                match ck.tensors.get(name) {
                    Some(e) if e.shard == shard => {}
                    _ => {
                        return Err(ModelError::MissingTensor {
                            tensor: name.clone(),
                            where_: format!(
                                "{} (the index says it is there)",
                                ck.shards[shard].path.display()
                            ),
                        })
                    }
                }
            }
        } else if single.exists() {
            ck.add_shard(single)?;
        } else {
            return Err(ModelError::io(
                &dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json",
                ),
            ));
        }
        Ok(ck)
    }

    /// Maps one shard and records its tensors; returns its index.
    fn add_shard(&mut self, path: PathBuf) -> Result<usize> {
        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        // SAFETY: the map is read-only. Like every mmap-based loader we rely on the checkpoint not
        // being modified while it is served; a truncation would fault, not corrupt memory silently.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
        // Ask for 2 MiB pages: decode streams every weight byte each token, and with 4 KiB pages
        // that is a TLB miss per 4 KiB. Where the kernel can (Linux with large page-cache folios),
        // pages read in after this advice are mapped 2 MiB at a time. Batch-1 decode on a Zen 5 VM,
        // page cache dropped before each run, five interleaved pairs: median 74.8 tok/s against
        // 70.5 (4 of 5 pairs faster, by 10-36 %). Advice only: where it is refused, 4 KiB pages.
        #[cfg(target_os = "linux")]
        if let Err(e) = map.advise(memmap2::Advice::HugePage) {
            tracing::debug!(path = %path.display(), error = %e, "no huge-page advice for the weights");
        }
        let (header_len, meta) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| ModelError::Safetensors {
                path: path.clone(),
                reason: describe_st_error(&e),
            })?;
        let base = 8 + header_len;
        let shard = self.shards.len();
        for (name, info) in meta.tensors() {
            let dtype = match info.dtype {
                safetensors::Dtype::F32 => Ok(DType::F32),
                safetensors::Dtype::F16 => Ok(DType::F16),
                safetensors::Dtype::BF16 => Ok(DType::BF16),
                // The packed blocks of a quantized linear (`quantization_config`).
                safetensors::Dtype::U8 => Err(PACKED.to_string()),
                other => Err(format!("{other:?}")),
            };
            let (a, b) = info.data_offsets;
            if let Some(prev) = self.tensors.get(&name) {
                return Err(ModelError::Safetensors {
                    path: path.clone(),
                    reason: format!(
                        "tensor {name:?} is also in {}",
                        self.shards[prev.shard].path.display()
                    ),
                });
            }
            self.tensors.insert(
                name,
                Entry {
                    shard,
                    dtype,
                    shape: info.shape.clone(),
                    range: base + a..base + b,
                },
            );
        }
        self.shards.push(Shard {
            path,
            map: Arc::new(map),
        });
        Ok(shard)
    }

    /// The validated config.
    #[must_use]
    pub fn config(&self) -> &MixtralConfig {
        &self.config
    }

    /// The folder this checkpoint was opened from (the file, for a GGUF file).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether this checkpoint is a GGUF file.
    #[must_use]
    pub fn is_gguf(&self) -> bool {
        self.gguf_tokenizer.is_some()
    }

    /// The tokenizer: tokenizer.json and tokenizer_config.json of a folder, or a GGUF file's
    /// metadata.
    pub fn tokenizer(&self) -> Result<crate::Tokenizer> {
        match &self.gguf_tokenizer {
            Some(t) => crate::Tokenizer::from_json(
                &t.json,
                t.chat_template.clone(),
                t.bos.clone(),
                t.eos.clone(),
            ),
            None => crate::Tokenizer::from_dir(&self.dir),
        }
    }

    /// Every tensor's name and stored shape, by name.
    #[must_use]
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<_> = self
            .tensors
            .iter()
            .map(|(n, e)| (n.clone(), e.shape.clone()))
            .collect();
        v.sort();
        v
    }

    /// Takes tensor `name`, checking it has exactly `shape` and a supported dtype.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                tensor: name.to_string(),
                where_: self.describe_files(),
            })?;
        let shard = &self.shards[e.shard];
        if matches!(&e.dtype, Err(d) if d == PACKED) {
            return self.packed(name, e, shape);
        }
        let dtype = e.dtype.clone().map_err(|dtype| ModelError::Dtype {
            path: shard.path.clone(),
            tensor: name.to_string(),
            dtype,
        })?;
        if e.shape != shape {
            return Err(ModelError::Shape {
                path: shard.path.clone(),
                tensor: name.to_string(),
                found: e.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(HostTensor::mapped(
            shard.map.clone(),
            e.range.clone(),
            dtype,
            e.shape.clone(),
        ))
    }

    /// A linear's weight `[out, in]` stored as packed blocks: `[out, in / 32 · block bytes]`
    /// bytes in the checkpoint's stored format.
    fn packed(&self, name: &str, e: &Entry, shape: &[usize]) -> Result<HostTensor> {
        let path = &self.shards[e.shard].path;
        let bad = |reason: String| ModelError::Quantized {
            path: path.clone(),
            tensor: name.to_string(),
            reason,
        };
        let Some(format) = self.stored.format else {
            return Err(bad(
                "is packed bytes (U8), but config.json has no quantization_config".into(),
            ));
        };
        let &[out, inp] = shape else {
            return Err(bad(format!(
                "is packed bytes, but a tensor of shape {shape:?} is never quantized"
            )));
        };
        if !inp.is_multiple_of(quant::BLOCK) {
            return Err(bad(format!(
                "input width {inp} is not a multiple of the {}-weight block",
                quant::BLOCK
            )));
        }
        let want = [out, format.bytes_for(inp)];
        if e.shape != want {
            return Err(ModelError::Shape {
                path: path.clone(),
                tensor: name.to_string(),
                found: e.shape.clone(),
                expected: want.to_vec(),
            });
        }
        Ok(HostTensor::mapped(
            self.shards[e.shard].map.clone(),
            e.range.clone(),
            format.into(),
            shape.to_vec(),
        ))
    }

    /// Takes the weight of a linear of `role`, `[out, in]`, and the format to quantize it to
    /// at upload where [`Checkpoint::set_quantize`] asked for one and it is stored in floats.
    pub fn linear(
        &self,
        name: &str,
        shape: [usize; 2],
        role: WeightRole,
    ) -> Result<(HostTensor, Option<QuantFormat>)> {
        let t = self.tensor(name, &shape)?;
        let q = self
            .plan
            .for_role(role)
            .filter(|_| t.dtype().quant().is_none());
        if q.is_some() && !shape[1].is_multiple_of(quant::BLOCK) {
            return Err(ModelError::Input(format!(
                "{name}: cannot quantize an input width of {} (not a multiple of {})",
                shape[1],
                quant::BLOCK
            )));
        }
        Ok((t, q))
    }

    /// Asks for the linears to be quantized at load as `plan` says. A checkpoint stored in one
    /// format is not quantized again to another.
    pub fn set_quantize(&mut self, plan: QuantPlan) -> Result<()> {
        if let (Some(stored), Some(want)) = (self.stored.format, plan.format) {
            if stored != want {
                return Err(ModelError::Input(format!(
                    "{} is stored in {stored}; it cannot be quantized again to {want} \
                     (quantize the original checkpoint instead)",
                    self.dir.display()
                )));
            }
        }
        self.plan = plan;
        Ok(())
    }

    /// The quantization the loaded linears have, stored or at load ("q4_0", "q8_0+attention"),
    /// or None for float weights.
    #[must_use]
    pub fn quantization(&self) -> Option<String> {
        let format = self.stored.format.or(self.plan.format)?;
        let attention = self.stored.attention || self.plan.attention;
        Some(if attention {
            format!("{format}+attention")
        } else {
            format.to_string()
        })
    }

    /// The format the experts are loaded in, stored or at load; None for float experts.
    #[must_use]
    pub fn expert_format(&self) -> Option<QuantFormat> {
        self.stored.format.or(self.plan.format)
    }

    /// Bytes a linear of `role` named `name` holds once loaded: quantized at load where the
    /// plan says so, else as stored (the planner's memory budget counts these).
    #[must_use]
    pub fn loaded_bytes(&self, name: &str, role: WeightRole) -> Option<u64> {
        let e = self.tensors.get(name)?;
        let stored = e.range.len() as u64;
        match (&e.dtype, self.plan.for_role(role)) {
            (Ok(d), Some(f)) if d.quant().is_none() => {
                Some(f.bytes_for(e.range.len() / d.size()) as u64)
            }
            _ => Some(stored),
        }
    }

    /// Bytes `name` occupies, if present (used to size progress bars before loading).
    #[must_use]
    pub fn tensor_bytes(&self, name: &str) -> Option<u64> {
        self.tensors.get(name).map(|e| e.range.len() as u64)
    }

    /// The dtype most weight bytes are stored in (what `forward` reports and gen-model copies).
    #[must_use]
    pub fn dominant_dtype(&self) -> Option<DType> {
        let mut by: HashMap<DType, usize> = HashMap::new();
        for e in self.tensors.values() {
            if let Ok(d) = e.dtype {
                *by.entry(d).or_default() += e.range.len();
            }
        }
        by.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }

    /// A digest that differs between checkpoints that compute differently: the config's shape,
    /// and every tensor's name, dtype, shape and first and last 64 bytes. Coordinator and workers
    /// compare it so that nobody mixes two models. Reads a few bytes per tensor, not the weights.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.config.shape_fingerprint().as_bytes());
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for name in names {
            let e = &self.tensors[name];
            h.update(name.as_bytes());
            h.update(format!("{:?}{:?}", e.dtype, e.shape).as_bytes());
            let data = &self.shards[e.shard].map[e.range.clone()];
            let n = data.len().min(64);
            h.update(&data[..n]);
            h.update(&data[data.len() - n..]);
        }
        // The experts' format, stored or at load: a worker and a coordinator whose experts
        // compute differently must not meet. (How the coordinator's own attention is stored is
        // its business alone.)
        let quant = self.expert_format();
        if let Some(q) = &quant {
            h.update(format!("quant={q}").as_bytes());
        }
        let digest = h.finalize();
        let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        match quant {
            Some(q) => format!("{}-{q}-{hex}", self.config.shape_fingerprint()),
            None => format!("{}-{hex}", self.config.shape_fingerprint()),
        }
    }

    fn describe_files(&self) -> String {
        let names: Vec<String> = self
            .shards
            .iter()
            .map(|s| s.path.display().to_string())
            .collect();
        names.join(", ")
    }
}

/// The dtype error text that marks packed quantized blocks (stored as U8).
const PACKED: &str = "U8";

/// Reads config.json's `quantization_config` as `switchyard quantize` writes it:
/// `{"quant_method": "switchyard", "format": "q4_0", "quantize_attention": false}`. Absent: float
/// weights.
fn read_quantization_config(path: &Path) -> Result<QuantPlan> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let bad = |reason: String| ModelError::Config {
        path: path.to_path_buf(),
        reason,
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let Some(q) = v.get("quantization_config") else {
        return Ok(QuantPlan::default());
    };
    let bad = |m: String| bad(format!("quantization_config: {m}"));
    let method = q.get("quant_method").and_then(|m| m.as_str());
    if method != Some("switchyard") {
        return Err(bad(format!(
            "quant_method {method:?} is not one switchyard reads (\"switchyard\", written by \
             `switchyard quantize`)"
        )));
    }
    let format = q
        .get("format")
        .and_then(|f| f.as_str())
        .ok_or_else(|| bad("missing \"format\"".into()))?
        .parse::<QuantFormat>()
        .map_err(bad)?;
    let attention = match q.get("quantize_attention") {
        None => false,
        Some(a) => a
            .as_bool()
            .ok_or_else(|| bad("\"quantize_attention\" must be true or false".into()))?,
    };
    Ok(QuantPlan {
        format: Some(format),
        attention,
    })
}

/// Reads `{"weight_map": {tensor: file}}`.
fn read_index(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Index {
        path: path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Index {
            path: path.to_path_buf(),
            reason: "missing object \"weight_map\"".into(),
        })?;
    map.iter()
        .map(|(k, v)| {
            v.as_str()
                .map(|f| (k.clone(), f.to_string()))
                .ok_or_else(|| ModelError::Index {
                    path: path.to_path_buf(),
                    reason: format!("weight_map[{k:?}] is not a file name"),
                })
        })
        .collect()
}

fn describe_st_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            "file length does not match its header (truncated or padded)".into()
        }
        E::HeaderTooSmall => "file too small for a header".into(),
        E::InvalidHeaderLength => "header length points past the end of the file".into(),
        E::InvalidHeaderDeserialization(err) => format!("header is not valid: {err}"),
        other => format!("{other}"),
    }
}

#[cfg(test)]
mod hostile_files;
