//! Tensor names as written by transformers' `save_pretrained` (identical to released Mixtral
//! checkpoints). The one place that spells them.

/// `model.embed_tokens.weight`
pub const EMBED: &str = "model.embed_tokens.weight";
/// `model.norm.weight`
pub const FINAL_NORM: &str = "model.norm.weight";
/// `lm_head.weight`
pub const LM_HEAD: &str = "lm_head.weight";

/// `model.layers.{l}.{suffix}`
#[must_use]
pub fn layer(l: usize, suffix: &str) -> String {
    format!("model.layers.{l}.{suffix}")
}

/// `model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight`, `w` one of `w1`, `w2`, `w3`.
#[must_use]
pub fn expert(l: usize, e: usize, w: &str) -> String {
    format!("model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight")
}

/// `model.layers.{l}.block_sparse_moe.gate.weight` (the router).
#[must_use]
pub fn router(l: usize) -> String {
    layer(l, "block_sparse_moe.gate.weight")
}
