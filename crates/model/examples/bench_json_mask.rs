#![allow(clippy::print_stdout)] // a benchmark whose output is its table
//! Time the JSON constraint takes to mask one token's logits over a checkpoint's vocabulary,
//! at a few points of an object (every vocabulary token's bytes go through the grammar each
//! time). Best of twenty rounds.
//!
//!   cargo run --release -p switchyard-model --example bench_json_mask -- MODEL_DIR

use std::time::Instant;
use switchyard_model::structured::{JsonConstraint, TokenBytes};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: bench_json_mask MODEL_DIR")?;
    let dir = std::path::Path::new(&dir);
    let tok = switchyard_model::Tokenizer::from_dir(dir)?;
    let cfg = switchyard_model::MixtralConfig::from_file(&dir.join("config.json"))?;
    let vocab = TokenBytes::new(&tok, cfg.vocab_size);
    println!("vocabulary {}", cfg.vocab_size);
    println!("{:>34} {:>12} {:>8}", "after", "ms per mask", "allowed");
    for prefix in [
        "",
        "{",
        "{\"name\": \"a long str",
        "{\"a\": [1, 2.5, {\"b\": tru",
    ] {
        let mut c = JsonConstraint::default();
        for id in tok.encode(prefix, false)? {
            c.advance(&vocab, id);
        }
        let mut logits = vec![0.0f32; cfg.vocab_size];
        let mut best = f64::INFINITY;
        for _ in 0..20 {
            logits.fill(0.0);
            let t = Instant::now();
            c.mask(&vocab, &cfg.eos_token_ids, &mut logits);
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        let allowed = logits.iter().filter(|l| l.is_finite()).count();
        println!("{:>34} {best:>12.3} {allowed:>8}", format!("{prefix:?}"));
    }
    Ok(())
}
