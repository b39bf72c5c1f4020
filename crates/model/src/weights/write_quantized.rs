//! `switchyard quantize`: a float checkpoint rewritten with its linears as Q8_0/Q4_0 blocks.
//!
//! The output is a Hugging Face-style folder that every command opens directly: the packed
//! blocks of each quantized `[out, in]` weight as a U8 safetensors tensor of
//! `[out, in / 32 · block bytes]` under the weight's own name, every other tensor copied as it
//! was, config.json with a `quantization_config` (`{"quant_method": "switchyard", "format":
//! "q4_0", "quantize_attention": false}`), and the tokenizer and generation files. The blocks are
//! the ones quantizing at load makes, so both give the same logits bit for bit.

use super::{names, quant::QuantPlan, Checkpoint, LoadProgress, WeightRole};
use crate::{ModelError, Result};
use rayon::prelude::*;
use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    path::Path,
};

/// What [`write_quantized`] wrote.
#[derive(Clone, Copy, Debug, Default)]
pub struct QuantizeReport {
    /// Tensors quantized, and all tensors written.
    pub quantized: usize,
    pub tensors: usize,
    /// Weight bytes read and written.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub shards: usize,
}

/// A tensor as written: name, dtype, shape, bytes (borrowed from the input where unchanged).
type Written<'a> = (String, safetensors::Dtype, Vec<usize>, Cow<'a, [u8]>);

/// Files copied beside the weights when present.
const SIDE_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
];

/// Writes `ck` into `out` (created if missing) with the linears `plan` names quantized, in
/// shards of at most about `shard_bytes`.
pub fn write_quantized(
    ck: &Checkpoint,
    out: &Path,
    plan: QuantPlan,
    shard_bytes: u64,
    progress: &dyn LoadProgress,
) -> Result<QuantizeReport> {
    if ck.is_gguf() {
        return Err(ModelError::Input(format!(
            "quantize: {} is a GGUF file; switchyard quantize reads Hugging Face folders \
             (llama.cpp's llama-quantize requantizes GGUF files, and switchyard loads them)",
            ck.dir().display()
        )));
    }
    if plan.format.is_none() {
        return Err(ModelError::Input("quantize: no format given".into()));
    }
    if let Some(stored) = ck.stored.format {
        return Err(ModelError::Input(format!(
            "{} is already quantized ({stored}); quantize the original checkpoint",
            ck.dir().display()
        )));
    }
    if out.exists() && same_dir(out, ck.dir()) {
        return Err(ModelError::Input(
            "quantize: --out must differ from the input folder".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let roles = linear_roles(ck);
    let mut names: Vec<&String> = ck.tensors.keys().collect();
    names.sort();
    let out_bytes = |name: &str| -> u64 {
        let e = &ck.tensors[name];
        match (roles.get(name).and_then(|r| plan.for_role(*r)), &e.dtype) {
            (Some(f), Ok(d)) => f.bytes_for(e.range.len() / d.size()) as u64,
            _ => e.range.len() as u64,
        }
    };
    // Contiguous shards, in name order.
    let mut shards: Vec<Vec<&String>> = vec![Vec::new()];
    let mut size = 0u64;
    for name in names {
        let n = out_bytes(name);
        if size > 0 && size + n > shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().expect("one shard").push(name);
    }
    let total_in: u64 = ck.tensors.values().map(|e| e.range.len() as u64).sum();
    progress.start(total_in);
    let mut report = QuantizeReport {
        shards: shards.len(),
        bytes_in: total_in,
        ..QuantizeReport::default()
    };
    let k = shards.len();
    let mut weight_map = BTreeMap::new();
    for (si, shard) in shards.iter().enumerate() {
        let file = if k == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, k)
        };
        let mut data: Vec<Written<'_>> = Vec::new();
        for &name in shard {
            let e = &ck.tensors[name];
            let raw = &ck.shards[e.shard].map[e.range.clone()];
            let dtype = e.dtype.as_ref().map_err(|d| ModelError::Dtype {
                path: ck.shards[e.shard].path.clone(),
                tensor: name.clone(),
                dtype: d.clone(),
            })?;
            let quant = roles.get(name.as_str()).and_then(|r| plan.for_role(*r));
            match (quant, e.shape.as_slice()) {
                (Some(f), &[rows, inp]) => {
                    let t = ck.tensor(name, &e.shape)?;
                    if !inp.is_multiple_of(super::quant::BLOCK) {
                        return Err(ModelError::Input(format!(
                            "{name}: cannot quantize an input width of {inp}"
                        )));
                    }
                    let row_bytes = f.bytes_for(inp);
                    let mut packed = vec![0u8; rows * row_bytes];
                    let w = t.elems();
                    packed
                        .par_chunks_mut(row_bytes)
                        .enumerate()
                        .for_each(|(r, dst)| {
                            let mut row = vec![0f32; inp];
                            w.to_f32_into(r * inp..(r + 1) * inp, &mut row);
                            f.quantize_into(&row, dst);
                        });
                    report.quantized += 1;
                    data.push((
                        name.clone(),
                        safetensors::Dtype::U8,
                        vec![rows, row_bytes],
                        Cow::Owned(packed),
                    ));
                }
                _ => data.push((
                    name.clone(),
                    st_dtype(*dtype),
                    e.shape.clone(),
                    Cow::Borrowed(raw),
                )),
            }
            report.tensors += 1;
            progress.advance(raw.len() as u64);
        }
        let views = data
            .iter()
            .map(|(n, d, s, b)| {
                safetensors::tensor::TensorView::new(*d, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| ModelError::Input(format!("quantize: {n}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        report.bytes_out += data.iter().map(|d| d.3.len() as u64).sum::<u64>();
        let path = out.join(&file);
        let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        safetensors::serialize_to_file(views, meta, &path).map_err(|e| {
            ModelError::Safetensors {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        for (n, ..) in &data {
            weight_map.insert(n.clone(), file.clone());
        }
    }
    if k > 1 {
        write_json(
            &out.join("model.safetensors.index.json"),
            &serde_json::json!({
                "metadata": {"total_size": report.bytes_out},
                "weight_map": weight_map,
            }),
        )?;
    }
    write_config(ck, out, plan)?;
    for f in SIDE_FILES {
        let from = ck.dir().join(f);
        if from.exists() {
            std::fs::copy(&from, out.join(f)).map_err(|e| ModelError::io(&from, e))?;
        }
    }
    progress.finish();
    Ok(report)
}

/// The linears of `ck` by name, with their roles.
fn linear_roles(ck: &Checkpoint) -> HashMap<String, WeightRole> {
    let cfg = ck.config();
    let mut roles = HashMap::new();
    for l in 0..cfg.num_hidden_layers {
        for e in 0..cfg.num_local_experts {
            for w in ["w1", "w2", "w3"] {
                roles.insert(names::expert(l, e, w), WeightRole::Expert);
            }
        }
        for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            roles.insert(
                names::layer(l, &format!("self_attn.{p}.weight")),
                WeightRole::Attention,
            );
        }
    }
    if !cfg.tie_word_embeddings {
        roles.insert(names::LM_HEAD.to_string(), WeightRole::Head);
    }
    roles
}

/// The input's config.json with `quantization_config` added.
fn write_config(ck: &Checkpoint, out: &Path, plan: QuantPlan) -> Result<()> {
    let src = ck.dir().join("config.json");
    let text = std::fs::read_to_string(&src).map_err(|e| ModelError::io(&src, e))?;
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: src.clone(),
        reason: e.to_string(),
    })?;
    let obj = v.as_object_mut().ok_or_else(|| ModelError::Config {
        path: src.clone(),
        reason: "not a JSON object".into(),
    })?;
    obj.insert(
        "quantization_config".into(),
        serde_json::json!({
            "quant_method": "switchyard",
            "format": plan.format.map(|f| f.as_str()),
            "quantize_attention": plan.attention,
        }),
    );
    write_json(&out.join("config.json"), &v)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| ModelError::Input(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

fn st_dtype(d: super::DType) -> safetensors::Dtype {
    match d {
        super::DType::F32 => safetensors::Dtype::F32,
        super::DType::F16 => safetensors::Dtype::F16,
        super::DType::BF16 | super::DType::Q8_0 | super::DType::Q4_0 => safetensors::Dtype::BF16,
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        weights::{gen, quant::QuantFormat, NoProgress},
        Cpu, ExpertSet, LocalExperts, Mixtral,
    };

    fn small(dir: &Path) {
        let spec = gen::GenSpec {
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 96,
            vocab: 300,
            ..gen::GenSpec::default()
        };
        gen::generate(&spec, dir, &|_| {}).unwrap();
    }

    /// Logits of a short prompt from `dir`, quantized at load as `plan` says.
    fn logits(dir: &Path, plan: QuantPlan) -> Vec<f32> {
        crate::tests::logits_of(dir, plan, &[1, 5, 9, 42, 7])
    }

    #[test]
    fn saved_checkpoints_load_as_quantizing_at_load_does() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("f");
        small(&src);
        for (format, attention) in [
            (QuantFormat::Q8_0, false),
            (QuantFormat::Q4_0, false),
            (QuantFormat::Q4_0, true),
        ] {
            let plan = QuantPlan {
                format: Some(format),
                attention,
            };
            let dst = tmp.path().join(format!("{format}-{attention}"));
            let ck = Checkpoint::open(&src).unwrap();
            let r = write_quantized(&ck, &dst, plan, 64 << 10, &NoProgress).unwrap();
            assert!(r.shards > 1, "a 64 KiB shard limit splits this checkpoint");
            assert_eq!(
                r.quantized,
                2 * 8 * 3 + if attention { 2 * 4 + 1 } else { 0 }
            );
            let saved = Checkpoint::open(&dst).unwrap();
            let mut at_load = Checkpoint::open(&src).unwrap();
            at_load.set_quantize(plan).unwrap();
            assert_eq!(saved.expert_format(), Some(format));
            assert!(saved.fingerprint().contains(format.as_str()));
            let (a, b) = (logits(&dst, QuantPlan::default()), logits(&src, plan));
            let float = logits(&src, QuantPlan::default());
            assert!(
                a.iter().zip(&float).any(|(x, y)| x != y),
                "{format} changed nothing"
            );
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{format}"
            );
            // Experts hold the quantized bytes.
            let all = ExpertSet::all(8);
            let ex = LocalExperts::load(&Cpu, &saved, &all, &NoProgress).unwrap();
            assert_eq!(
                ex.weight_bytes() as u64,
                LocalExperts::<Cpu>::bytes_loaded(&at_load, &all)
            );
            let _ = Mixtral::load(Cpu, &saved, &NoProgress).unwrap();
        }
    }

    #[test]
    fn refuses_requantizing_and_mismatched_tensors() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("f");
        small(&src);
        let q8 = tmp.path().join("q8");
        let ck = Checkpoint::open(&src).unwrap();
        write_quantized(
            &ck,
            &q8,
            QuantPlan::experts(QuantFormat::Q8_0),
            u64::MAX,
            &NoProgress,
        )
        .unwrap();
        let saved = Checkpoint::open(&q8).unwrap();
        let again = write_quantized(
            &saved,
            &tmp.path().join("again"),
            QuantPlan::experts(QuantFormat::Q4_0),
            u64::MAX,
            &NoProgress,
        );
        assert!(again.unwrap_err().to_string().contains("already quantized"));
        let mut s = Checkpoint::open(&q8).unwrap();
        assert!(s
            .set_quantize(QuantPlan::experts(QuantFormat::Q4_0))
            .is_err());
        // A config that claims another format than the blocks have: a named shape error.
        let cfg = q8.join("config.json");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("q8_0", "q4_0");
        std::fs::write(&cfg, text).unwrap();
        let bad = Checkpoint::open(&q8).unwrap();
        let err = LocalExperts::load(&Cpu, &bad, &ExpertSet::all(8), &NoProgress)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("experts.0.w1.weight") && err.contains("shape"),
            "{err}"
        );
        // Packed bytes without a quantization_config.
        let text = std::fs::read_to_string(&cfg).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v.as_object_mut().unwrap().remove("quantization_config");
        std::fs::write(&cfg, v.to_string()).unwrap();
        let bad = Checkpoint::open(&q8).unwrap();
        let err = LocalExperts::load(&Cpu, &bad, &ExpertSet::all(8), &NoProgress)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no quantization_config"), "{err}");
        // An unknown method.
        v.as_object_mut().unwrap().insert(
            "quantization_config".into(),
            serde_json::json!({"quant_method": "gptq", "bits": 4}),
        );
        std::fs::write(&cfg, v.to_string()).unwrap();
        let err = Checkpoint::open(&q8).unwrap_err().to_string();
        assert!(err.contains("gptq"), "{err}");
    }
}
