//! `MixtralConfig`: the model's shape and constants, read from a Hugging Face `config.json` and
//! checked once, so that nothing downstream has to re-validate shapes.

use crate::{ModelError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Validated Mixtral hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MixtralConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head width; `hidden_size / num_attention_heads` unless config.json gives it.
    pub head_dim: usize,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// Keys a position may attend to, itself included; `None` for full causal attention.
    pub sliding_window: Option<usize>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (config.json may give one or a list).
    pub eos_token_ids: Vec<u32>,
}

/// The raw file: every field optional so that a missing one gets a message naming it.
#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<i64>,
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    num_local_experts: Option<i64>,
    num_experts_per_tok: Option<i64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    rms_norm_eps: Option<f64>,
    sliding_window: Option<i64>,
    max_position_embeddings: Option<i64>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
}

/// transformers 5.x writes `"rope_parameters": {"rope_theta": ..., "rope_type": "default"}`.
#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    fn into_vec(self) -> Vec<i64> {
        match self {
            Self::One(i) => vec![i],
            Self::Many(v) => v,
        }
    }
}

impl MixtralConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let f = Fields { path };
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| f.err(format!("not valid JSON: {e}")))?;
        f.supported(&raw)?;
        let (hidden_size, num_attention_heads, num_key_value_heads, head_dim) =
            f.attention_shape(&raw)?;
        let (num_local_experts, num_experts_per_tok, num_hidden_layers, vocab_size) =
            f.sizes(&raw)?;
        let (rope_theta, rms_norm_eps, sliding_window) = f.numerics(&raw)?;
        let (bos_token_id, eos_token_ids) = f.special_tokens(&raw, vocab_size)?;
        Ok(Self {
            vocab_size,
            hidden_size,
            intermediate_size: f.positive("intermediate_size", raw.intermediate_size)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            num_local_experts,
            num_experts_per_tok,
            rope_theta,
            rms_norm_eps,
            sliding_window,
            max_position_embeddings: f
                .positive("max_position_embeddings", raw.max_position_embeddings)?,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id,
            eos_token_ids,
        })
    }

    /// Adds the eos ids of `generation_config.json` in `dir` (when present) to the stop ids.
    /// transformers stops on the union, so a chat model's end-of-turn id counts too.
    pub fn merge_generation_config(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.clone(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let ids = match v.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => vec![n.as_i64()],
            Some(serde_json::Value::Array(a)) => a.iter().map(serde_json::Value::as_i64).collect(),
            _ => vec![],
        };
        for id in ids {
            match id {
                Some(i) if (0..self.vocab_size as i64).contains(&i) => {
                    if !self.eos_token_ids.contains(&(i as u32)) {
                        self.eos_token_ids.push(i as u32);
                    }
                }
                other => {
                    return Err(ModelError::Config {
                        path,
                        reason: format!(
                            "eos_token_id {other:?} is not a token id of this vocabulary"
                        ),
                    })
                }
            }
        }
        Ok(())
    }

    /// Width of all query heads together.
    #[must_use]
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    #[must_use]
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// A short stable digest of everything that changes the math, so that a coordinator and a
    /// worker can refuse to talk about different models.
    #[must_use]
    pub fn shape_fingerprint(&self) -> String {
        format!(
            "mixtral-v{}-h{}-i{}-l{}-q{}-kv{}-d{}-e{}-k{}",
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
            self.num_local_experts,
            self.num_experts_per_tok
        )
    }
}

/// The checks of one config file's fields, each error naming the file.
struct Fields<'a> {
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, reason: String) -> ModelError {
        ModelError::Config {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn positive(&self, name: &str, v: Option<i64>) -> Result<usize> {
        match v {
            None => Err(self.err(format!("missing field {name}"))),
            Some(v) if v <= 0 => Err(self.err(format!("{name} must be positive, got {v}"))),
            Some(v) => usize::try_from(v).map_err(|_| self.err(format!("{name} too large: {v}"))),
        }
    }

    /// A Mixtral with SiLU experts and plain RoPE.
    fn supported(&self, raw: &RawConfig) -> Result<()> {
        let is_mixtral = raw
            .architectures
            .as_ref()
            .is_some_and(|a| a.iter().any(|s| s == "MixtralForCausalLM"))
            || (raw.architectures.is_none() && raw.model_type.as_deref() == Some("mixtral"));
        if !is_mixtral {
            let found = raw
                .architectures
                .as_ref()
                .map(|a| a.join(","))
                .or(raw.model_type.clone())
                .unwrap_or_else(|| "<none given>".into());
            return Err(ModelError::Architecture {
                path: self.path.to_path_buf(),
                found,
            });
        }
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(self.err(format!("hidden_act {act:?} is not supported (only silu)")));
            }
        }
        if raw.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(self.err("rope_scaling is not supported".into()));
        }
        if let Some(t) = raw
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.as_deref())
        {
            if t != "default" {
                return Err(self.err(format!("rope_type {t:?} is not supported (only default)")));
            }
        }
        Ok(())
    }

    /// (hidden_size, heads, kv heads, head_dim), consistent with each other.
    fn attention_shape(&self, raw: &RawConfig) -> Result<(usize, usize, usize, usize)> {
        let hidden_size = self.positive("hidden_size", raw.hidden_size)?;
        let heads = self.positive("num_attention_heads", raw.num_attention_heads)?;
        let kv_heads = match raw.num_key_value_heads {
            None => heads,
            v => self.positive("num_key_value_heads", v)?,
        };
        let head_dim = match raw.head_dim {
            None => {
                if !hidden_size.is_multiple_of(heads) {
                    return Err(self.err(format!(
                        "hidden_size {hidden_size} is not divisible by num_attention_heads {heads} and head_dim is not given"
                    )));
                }
                hidden_size / heads
            }
            v => self.positive("head_dim", v)?,
        };
        if !head_dim.is_multiple_of(2) {
            return Err(self.err(format!("head_dim {head_dim} must be even for RoPE")));
        }
        if !heads.is_multiple_of(kv_heads) {
            return Err(self.err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        Ok((hidden_size, heads, kv_heads, head_dim))
    }

    /// (experts, experts per token, layers, vocabulary), within what the wire can name.
    fn sizes(&self, raw: &RawConfig) -> Result<(usize, usize, usize, usize)> {
        let experts = self.positive("num_local_experts", raw.num_local_experts)?;
        let per_tok = self.positive("num_experts_per_tok", raw.num_experts_per_tok)?;
        if per_tok > experts {
            return Err(self.err(format!(
                "num_experts_per_tok {per_tok} exceeds num_local_experts {experts}"
            )));
        }
        if experts > 256 {
            return Err(self.err(format!(
                "num_local_experts {experts} exceeds the supported 256"
            )));
        }
        let layers = self.positive("num_hidden_layers", raw.num_hidden_layers)?;
        if layers > u16::MAX as usize {
            return Err(self.err(format!("num_hidden_layers {layers} is too large")));
        }
        let vocab = self.positive("vocab_size", raw.vocab_size)?;
        if vocab > u32::MAX as usize {
            return Err(self.err(format!("vocab_size {vocab} is too large")));
        }
        Ok((experts, per_tok, layers, vocab))
    }

    /// (rope_theta, rms_norm_eps, sliding_window): both transformers rope_theta layouts.
    fn numerics(&self, raw: &RawConfig) -> Result<(f64, f64, Option<usize>)> {
        let rope_theta = raw
            .rope_theta
            .or(raw.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(1e6);
        if !(rope_theta.is_finite() && rope_theta > 1.0) {
            return Err(self.err(format!("rope_theta must be > 1, got {rope_theta}")));
        }
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-5);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(self.err(format!("rms_norm_eps must be positive, got {rms_norm_eps}")));
        }
        let sliding_window = match raw.sliding_window {
            None => None,
            v => Some(self.positive("sliding_window", v)?),
        };
        Ok((rope_theta, rms_norm_eps, sliding_window))
    }

    /// The bos id and the eos ids, each inside the vocabulary.
    fn special_tokens(&self, raw: &RawConfig, vocab: usize) -> Result<(Option<u32>, Vec<u32>)> {
        let token = |name: &str, v: i64| -> Result<u32> {
            if (0..vocab as i64).contains(&v) {
                Ok(v as u32)
            } else {
                Err(self.err(format!(
                    "{name} {v} is outside the vocabulary (size {vocab})"
                )))
            }
        };
        let bos = match raw.bos_token_id.clone().map(TokenIds::into_vec) {
            Some(v) if !v.is_empty() => Some(token("bos_token_id", v[0])?),
            _ => None,
        };
        let eos = raw
            .eos_token_id
            .clone()
            .map(TokenIds::into_vec)
            .unwrap_or_default()
            .into_iter()
            .map(|v| token("eos_token_id", v))
            .collect::<Result<Vec<_>>>()?;
        Ok((bos, eos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"architectures":["MixtralForCausalLM"],"vocab_size":512,"hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "head_dim":null,"num_local_experts":8,"num_experts_per_tok":2,"max_position_embeddings":512,
        "rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"},"rms_norm_eps":1e-5,
        "sliding_window":null,"tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2}"#;

    fn parse(text: &str) -> Result<MixtralConfig> {
        MixtralConfig::from_json(text, Path::new("config.json"))
    }

    fn with(key: &str, value: serde_json::Value) -> String {
        let mut v: serde_json::Value = serde_json::from_str(BASE).unwrap();
        if value.is_null() && key != "head_dim" && key != "sliding_window" {
            v.as_object_mut().unwrap().remove(key);
        } else {
            v[key] = value;
        }
        v.to_string()
    }

    #[test]
    fn reads_transformers5_layout() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.sliding_window, None);
    }

    #[test]
    fn reads_top_level_rope_theta_head_dim_and_eos_list() {
        let mut v: serde_json::Value = serde_json::from_str(BASE).unwrap();
        v["rope_theta"] = 10000.0.into();
        v["head_dim"] = 24.into();
        v["eos_token_id"] = serde_json::json!([2, 3]);
        v["sliding_window"] = 7.into();
        let c = parse(&v.to_string()).unwrap();
        assert_eq!(c.rope_theta, 1e4);
        assert_eq!(c.head_dim, 24);
        assert_eq!(c.q_dim(), 96);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.sliding_window, Some(7));
    }

    #[test]
    fn rejects_bad_configs_with_the_field_named() {
        let cases = [
            (
                with("hidden_size", serde_json::Value::Null),
                "missing field hidden_size",
            ),
            (
                with("num_local_experts", (-1).into()),
                "num_local_experts must be positive",
            ),
            (
                with("num_experts_per_tok", 9.into()),
                "exceeds num_local_experts",
            ),
            (with("num_key_value_heads", 3.into()), "not a multiple"),
            (with("eos_token_id", 9999.into()), "outside the vocabulary"),
            (with("hidden_size", "big".into()), "not valid JSON"),
            (with("hidden_act", "gelu".into()), "hidden_act"),
            ("{".to_string(), "not valid JSON"),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "expected {want:?} in {e:?}");
            assert!(e.contains("config.json"), "{e}");
        }
    }

    #[test]
    fn rejects_other_architectures() {
        let text = with("architectures", serde_json::json!(["LlamaForCausalLM"]));
        let e = parse(&text).unwrap_err();
        assert!(
            matches!(e, ModelError::Architecture { ref found, .. } if found == "LlamaForCausalLM")
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use serde_json::{json, Value};

        fn field() -> impl Strategy<Value = Value> {
            prop_oneof![
                (-2i64..70_000).prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(|f| json!(f)),
                Just(json!(["MixtralForCausalLM"])),
                Just(json!("mixtral")),
                Just(json!("silu")),
                Just(json!(null)),
                Just(json!([2, 7])),
                Just(json!({"rope_theta": 10000.0, "rope_type": "default"})),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            /// Any config.json is refused with a named error or gives a config whose sizes
            /// agree; it never panics.
            #[test]
            fn any_config_never_panics_and_a_parsed_one_is_consistent(
                pairs in prop::collection::vec((prop::sample::select(&[
                    "architectures", "model_type", "hidden_size", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                    "num_hidden_layers", "vocab_size", "intermediate_size", "max_position_embeddings",
                    "rope_theta", "rms_norm_eps", "sliding_window", "hidden_act", "bos_token_id",
                    "eos_token_id", "rope_parameters", "tie_word_embeddings",
                ][..]), field()), 0..24)
            ) {
                let v = Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
                if let Ok(c) = MixtralConfig::from_json(&v.to_string(), Path::new("config.json")) {
                    prop_assert!(c.num_attention_heads.is_multiple_of(c.num_key_value_heads));
                    prop_assert!(c.head_dim.is_multiple_of(2));
                    prop_assert!(c.num_experts_per_tok <= c.num_local_experts);
                    prop_assert!(c.eos_token_ids.iter().all(|&t| (t as usize) < c.vocab_size));
                }
            }
        }
    }
}
