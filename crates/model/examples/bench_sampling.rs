#![allow(clippy::print_stdout)] // a benchmark whose output is its table
//! Time the sampler takes per token on a 32,000-token vocabulary, by sampling settings, on a
//! flat distribution (the worst case for a nucleus cut) and on normal logits (std 3, closer to
//! a trained model's). Best of ten rounds of 32 draws, one 32-sequence step's worth.
//!
//!   cargo run --release -p switchyard-model --example bench_sampling

use switchyard_model::{Sampler, SamplingParams};

fn main() {
    let vocab = 32_000;
    let flat: Vec<f32> = (0..vocab)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
        .collect();
    // xorshift uniforms; a sum of twelve is close to normal with variance 1.
    let mut state = 12_345u64;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32
    };
    let normal: Vec<f32> = (0..vocab)
        .map(|_| ((0..12).map(|_| uniform()).sum::<f32>() - 6.0) * 3.0)
        .collect();
    println!(
        "{:>8} {:>6} {:>6} {:>6} {:>14}",
        "logits", "temp", "top_k", "top_p", "ms per token"
    );
    for (name, logits) in [("flat", &flat), ("normal", &normal)] {
        for (temperature, top_k, top_p) in [
            (1.0f32, 0usize, 1.0f32),
            (0.7, 0, 0.9),
            (1.0, 0, 0.95),
            (0.7, 50, 1.0),
        ] {
            let params = SamplingParams {
                temperature,
                top_k,
                top_p,
                seed: Some(1),
                ..Default::default()
            };
            let mut sampler = Sampler::new(params, &[]);
            let mut best = f64::MAX;
            for _ in 0..10 {
                let t = std::time::Instant::now();
                for _ in 0..32 {
                    std::hint::black_box(sampler.sample(logits));
                }
                best = best.min(t.elapsed().as_secs_f64() / 32.0);
            }
            println!(
                "{name:>8} {temperature:>6} {top_k:>6} {top_p:>6} {:>14.3}",
                best * 1e3
            );
        }
    }
}
