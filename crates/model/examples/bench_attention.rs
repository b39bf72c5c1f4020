#![allow(clippy::print_stdout)] // a benchmark whose output is its table
//! Time of the CPU attention kernel for one decode step of many sequences (one query row each)
//! over a paged f32 KV cache, by context length: the GQA shape of a hidden-1024 Mixtral (16
//! query heads, 4 kv heads, head_dim 64), sequences' blocks interleaved in the cache as a
//! running server's are.
//!
//!   cargo run --release -p switchyard-model --example bench_attention -- [CTX,..] [--seqs N] [--threads N]

use std::time::Instant;
use switchyard_model::backend::cpu::{attention::attention, in_pool};
use switchyard_model::backend::{AttnSeq, AttnShape};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut ctxs = vec![64usize, 256, 1024, 4096];
    let mut seqs = 32usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seqs" => seqs = args.next().ok_or("--seqs needs a count")?.parse()?,
            "--threads" => {
                let n: usize = args.next().ok_or("--threads needs a count")?.parse()?;
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build_global()?;
            }
            _ => {
                ctxs = a
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("contexts {a:?}: {e}"))?;
            }
        }
    }
    let shape = AttnShape {
        heads: 16,
        kv_heads: 4,
        head_dim: 64,
        block_size: switchyard_model::DEFAULT_BLOCK_SIZE,
        window: None,
    };
    let (q_dim, kv_dim) = (
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
    );
    println!(
        "kernel: {}",
        switchyard_model::backend::cpu::attention::Kernel::for_head_size(shape.head_dim).as_str()
    );
    println!(
        "{:>6} {:>6} {:>10} {:>12} {:>10}",
        "seqs", "ctx", "ms/call", "ns/head-key", "KV GB/s"
    );
    for &ctx in &ctxs {
        let bs = shape.block_size;
        let per_seq = ctx.div_ceil(bs);
        let n_blocks = per_seq * seqs;
        // Block b of sequence s at physical block b·seqs + s: neighbours in the cache belong to
        // different sequences.
        let tables: Vec<Vec<u32>> = (0..seqs)
            .map(|s| (0..per_seq).map(|b| (b * seqs + s) as u32).collect())
            .collect();
        let fill = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32
                        / 500.0
                        - 1.0
                })
                .collect()
        };
        let k = fill(n_blocks * bs * kv_dim, 1);
        let v = fill(n_blocks * bs * kv_dim, 2);
        let q = fill(seqs * q_dim, 3);
        let attn: Vec<AttnSeq<'_>> = tables
            .iter()
            .enumerate()
            .map(|(s, t)| AttnSeq {
                q_row0: s,
                n_q: 1,
                pos0: ctx - 1,
                blocks: t,
            })
            .collect();
        let mut out = vec![0f32; seqs * q_dim];
        let iters = (200_000_000 / (seqs * ctx * q_dim)).clamp(3, 2000);
        let mut times = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            in_pool(|| {
                for _ in 0..iters {
                    attention(&q, &k, &v, &attn, &shape, &mut out);
                }
            });
            times.push(t0.elapsed().as_secs_f64() / iters as f64);
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        let head_keys = (seqs * ctx * shape.heads) as f64;
        let kv_bytes = (2 * seqs * ctx * kv_dim * 4) as f64;
        println!(
            "{:>6} {:>6} {:>10.3} {:>12.2} {:>10.1}",
            seqs,
            ctx,
            t * 1e3,
            t * 1e9 / head_keys,
            kv_bytes / t / 1e9
        );
        std::hint::black_box(&out);
    }
    Ok(())
}
