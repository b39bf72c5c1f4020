//! `switchyard gen-model`: random Mixtral checkpoints of any shape for tests and benchmarks.

use anyhow::Context;
use std::path::PathBuf;
use switchyard_model::{weights::gen, DType, LoadProgress};

#[derive(clap::Args)]
pub struct Args {
    /// Output folder (created if missing).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    #[arg(long, default_value_t = 8)]
    layers: usize,
    #[arg(long, default_value_t = 16)]
    heads: usize,
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    /// Per-head width, written to config.json (default hidden / heads).
    #[arg(long)]
    head_dim: Option<usize>,
    #[arg(long, default_value_t = 8)]
    experts: usize,
    #[arg(long, default_value_t = 2)]
    experts_per_tok: usize,
    #[arg(long, default_value_t = 3584)]
    intermediate: usize,
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    #[arg(long)]
    sliding_window: Option<usize>,
    #[arg(long, default_value_t = 4096)]
    max_position_embeddings: usize,
    #[arg(long, default_value_t = 1e6)]
    rope_theta: f64,
    #[arg(long)]
    tie_word_embeddings: bool,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Number of safetensors shards (more than 1 writes model.safetensors.index.json).
    #[arg(long, default_value_t = 1)]
    shards: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Copy tokenizer.json and tokenizer_config.json from this folder (default: a built-in
    /// byte-level tokenizer).
    #[arg(long)]
    tokenizer_from: Option<PathBuf>,
    /// Experts every token prefers in every layer, e.g. 0,1: a skewed load for testing the
    /// planner's rebalancing.
    #[arg(long, value_delimiter = ',')]
    hot_experts: Vec<usize>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let spec = gen::GenSpec {
        hidden: a.hidden,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        experts: a.experts,
        experts_per_tok: a.experts_per_tok,
        intermediate: a.intermediate,
        vocab: a.vocab,
        sliding_window: a.sliding_window,
        max_position_embeddings: a.max_position_embeddings,
        rope_theta: a.rope_theta,
        tie_word_embeddings: a.tie_word_embeddings,
        dtype: a.dtype,
        shards: a.shards,
        seed: a.seed,
        tokenizer_from: a.tokenizer_from,
        hot_experts: a.hot_experts,
    };
    let bar = crate::progress::Bar::new("writing");
    bar.start(spec.weight_bytes());
    let total = gen::generate(&spec, &a.out, &|n| bar.advance(n))
        .with_context(|| format!("writing {}", a.out.display()))?;
    bar.finish();
    tracing::info!(out = %a.out.display(), bytes = total, "checkpoint written");
    eprintln!(
        "wrote {} ({:.1} MB of weights)",
        a.out.display(),
        total as f64 / 1e6
    );
    Ok(())
}
