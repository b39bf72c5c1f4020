#![allow(clippy::print_stdout)] // a benchmark whose output is its table
//! Time of the CPU attention kernel for one decode step of many sequences (one query row each)
//! over a paged KV cache, by context length and cache dtype (f32 and bf16 in turn, each
//! context's two rows side by side): the GQA shape of a hidden-1024 Mixtral (16 query heads, 4
//! kv heads, head_dim 64), sequences' blocks interleaved in the cache as a running server's
//! are. With `--prompt`, each sequence is instead a whole prompt of CTX tokens at once (the
//! attention of a prefill step).
//!
//!   cargo run --release -p switchyard-model --example bench_attention -- [CTX,..] [--seqs N] [--threads N] [--kv f32|bf16] [--prompt]

use half::bf16;
use std::time::Instant;
use switchyard_model::backend::cpu::{
    attention::{attention, KvElem},
    in_pool,
};
use switchyard_model::backend::{AttnSeq, AttnShape, KvDtype};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut ctxs = vec![64usize, 256, 1024, 4096];
    let mut seqs = 32usize;
    let mut dtypes = vec![KvDtype::F32, KvDtype::Bf16];
    let mut prompt = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seqs" => seqs = args.next().ok_or("--seqs needs a count")?.parse()?,
            "--prompt" => prompt = true,
            "--kv" => dtypes = vec![args.next().ok_or("--kv needs a dtype")?.parse()?],
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
        "{:>6} {:>6} {:>5} {:>10} {:>12} {:>10}",
        "seqs", "ctx", "kv", "ms/call", "ns/head-key", "KV GB/s"
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
        let (k, v) = (
            fill(n_blocks * bs * kv_dim, 1),
            fill(n_blocks * bs * kv_dim, 2),
        );
        // A decode step's one query row a sequence at position ctx - 1, or a prompt's ctx rows
        // from position 0.
        let n_q = if prompt { ctx } else { 1 };
        let q = fill(seqs * n_q * q_dim, 3);
        let attn: Vec<AttnSeq<'_>> = tables
            .iter()
            .enumerate()
            .map(|(s, t)| AttnSeq {
                q_row0: s * n_q,
                n_q,
                pos0: ctx - n_q,
                blocks: t,
            })
            .collect();
        let keys_per_seq = if prompt { ctx * (ctx + 1) / 2 } else { ctx };
        for &dtype in &dtypes {
            let t = match dtype {
                KvDtype::F32 => time::<f32>(&q, &k, &v, &attn, &shape, keys_per_seq),
                KvDtype::Bf16 => time::<bf16>(&q, &k, &v, &attn, &shape, keys_per_seq),
            };
            let head_keys = (seqs * keys_per_seq * shape.heads) as f64;
            let kv_bytes = (2 * seqs * ctx * kv_dim * dtype.size()) as f64;
            println!(
                "{:>6} {:>6} {:>5} {:>10.3} {:>12.2} {:>10.1}",
                seqs,
                ctx,
                dtype.as_str(),
                t * 1e3,
                t * 1e9 / head_keys,
                kv_bytes / t / 1e9
            );
        }
    }
    Ok(())
}

/// Seconds per attention call over a cache of `E` holding `k` and `v` (rounded): the best of
/// nine runs, the one a shared machine disturbed least.
fn time<E: KvElem>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    attn: &[AttnSeq<'_>],
    shape: &AttnShape,
    keys_per_seq: usize,
) -> f64 {
    let k: Vec<E> = k.iter().map(|&x| E::from_f32(x)).collect();
    let v: Vec<E> = v.iter().map(|&x| E::from_f32(x)).collect();
    let mut out = vec![0f32; q.len()];
    let work = attn.len() * keys_per_seq * shape.heads * shape.head_dim;
    let iters = (100_000_000 / work.max(1)).clamp(3, 1000);
    let mut best = f64::INFINITY;
    for _ in 0..9 {
        let t0 = Instant::now();
        in_pool(|| {
            for _ in 0..iters {
                attention(q, &k, &v, attn, shape, &mut out);
            }
        });
        best = best.min(t0.elapsed().as_secs_f64() / iters as f64);
    }
    std::hint::black_box(&out);
    best
}
