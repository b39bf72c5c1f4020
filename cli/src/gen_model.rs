//! `switchyard gen-model`: random Mixtral checkpoints of any shape for tests and benchmarks.

use anyhow::Context;
use std::path::PathBuf;
use switchyard_model::{weights::gen, DType, LoadProgress};

/// A real model's shape.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Preset {
    /// Mistral's Mixtral-8x7B: hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab
    /// 32000, rope θ 1e6, 32 layers (unless --layers), 8 experts, top-2.
    #[value(name = "mixtral-8x7b")]
    Mixtral8x7b,
}

const SHAPE_FLAGS: [&str; 10] = [
    "hidden",
    "heads",
    "kv_heads",
    "head_dim",
    "experts",
    "experts_per_tok",
    "intermediate",
    "vocab",
    "max_position_embeddings",
    "rope_theta",
];

#[derive(clap::Args)]
pub struct Args {
    /// Output folder (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Take the whole shape (all but --layers) from a real model.
    #[arg(long, conflicts_with_all = SHAPE_FLAGS)]
    preset: Option<Preset>,
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    /// Decoder layers (default 8; a preset's own count with --preset).
    #[arg(long)]
    layers: Option<usize>,
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

/// The checkpoint `a` asks for.
fn spec(a: Args) -> gen::GenSpec {
    let mut spec = gen::GenSpec {
        hidden: a.hidden,
        layers: a.layers.unwrap_or(8),
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
    match a.preset {
        None => {}
        Some(Preset::Mixtral8x7b) => {
            spec.hidden = 4096;
            spec.intermediate = 14336;
            spec.heads = 32;
            spec.kv_heads = 8;
            spec.head_dim = None;
            spec.vocab = 32000;
            spec.rope_theta = 1e6;
            spec.max_position_embeddings = 32768;
            spec.experts = 8;
            spec.experts_per_tok = 2;
            spec.layers = a.layers.unwrap_or(32);
        }
    }
    spec
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let out = a.out.clone();
    let spec = spec(a);
    let bar = crate::progress::Bar::new("writing");
    bar.start(spec.weight_bytes());
    let total = gen::generate(&spec, &out, &|n| bar.advance(n))
        .with_context(|| format!("writing {}", out.display()))?;
    bar.finish();
    tracing::info!(out = %out.display(), bytes = total, "checkpoint written");
    eprintln!(
        "wrote {} ({:.1} MB of weights)",
        out.display(),
        total as f64 / 1e6
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: Args,
    }

    fn parse(args: &[&str]) -> Result<gen::GenSpec, clap::Error> {
        let mut v = vec!["gen-model", "--out", "x"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| spec(c.a))
    }

    #[test]
    fn the_mixtral_preset_has_mixtral_8x7b_shape_at_any_depth() {
        let s = parse(&["--preset", "mixtral-8x7b", "--layers", "2"]).unwrap();
        assert_eq!(
            (
                s.hidden,
                s.intermediate,
                s.heads,
                s.kv_heads,
                s.vocab,
                s.layers
            ),
            (4096, 14336, 32, 8, 32000, 2)
        );
        assert_eq!((s.experts, s.experts_per_tok, s.rope_theta), (8, 2, 1e6));
        // Two layers in bf16: 2 × (8 experts × 3 × 4096 × 14336 + attention 4096 × 12288 +
        // norms and router) + 2 × 32000 × 4096 embeddings and head: about 6.3 GB.
        let gb = s.weight_bytes() as f64 / 1e9;
        assert!((6.0..6.6).contains(&gb), "{gb} GB");
        assert_eq!(parse(&["--preset", "mixtral-8x7b"]).unwrap().layers, 32);
        assert_eq!(parse(&[]).unwrap().layers, 8);
    }

    #[test]
    fn a_preset_refuses_shape_flags_beside_it() {
        let e = parse(&["--preset", "mixtral-8x7b", "--hidden", "1024"]).unwrap_err();
        assert!(e.to_string().contains("--hidden"), "{e}");
    }
}
