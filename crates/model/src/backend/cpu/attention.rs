//! Grouped-query attention over a paged KV cache, causal with an optional sliding window.

use super::super::{AttnSeq, AttnShape};
use rayon::prelude::*;
use std::cell::RefCell;

thread_local! {
    /// Attention scores of one (token, head); grows to the longest context seen, once per thread.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Physical cache row of logical position `pos` in a sequence with block table `blocks`.
#[inline]
fn phys(blocks: &[u32], block_size: usize, pos: usize) -> usize {
    blocks[pos / block_size] as usize * block_size + pos % block_size
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight lanes of partial sums let the compiler vectorise without reassociating.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `out[t, h] = softmax(q[t,h] · K[g]ᵀ / √d) · V[g]` with `g = h / (heads / kv_heads)`, over the
/// keys each query may see. Every key of every sequence must already be in the cache.
pub fn attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    seqs: &[AttnSeq<'_>],
    s: &AttnShape,
    out: &mut [f32],
) {
    let hd = s.head_dim;
    let q_dim = s.heads * hd;
    let kv_dim = s.kv_heads * hd;
    let group = s.heads / s.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let total: usize = seqs.iter().map(|q| q.n_q).sum();
    out[..total * q_dim]
        .par_chunks_mut(hd)
        .enumerate()
        .for_each(|(i, o)| {
            let (t, h) = (i / s.heads, i % s.heads);
            // Sequences are laid out back to back in row order.
            let si = seqs.partition_point(|sq| sq.q_row0 + sq.n_q <= t);
            let sq = &seqs[si];
            let pos = sq.pos0 + (t - sq.q_row0);
            let lo = s.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let g = h / group;
            let qv = &q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd];
            SCORES.with(|cell| {
                let mut sc = cell.borrow_mut();
                sc.clear();
                let mut max = f32::NEG_INFINITY;
                for j in lo..=pos {
                    let r = phys(sq.blocks, s.block_size, j);
                    let kv = &k_cache[r * kv_dim + g * hd..r * kv_dim + (g + 1) * hd];
                    let v = dot(qv, kv) * scale;
                    max = max.max(v);
                    sc.push(v);
                }
                let mut sum = 0.0;
                for v in sc.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                o.fill(0.0);
                for (j, p) in (lo..=pos).zip(sc.iter()) {
                    let r = phys(sq.blocks, s.block_size, j);
                    let vv = &v_cache[r * kv_dim + g * hd..r * kv_dim + (g + 1) * hd];
                    let p = p * inv;
                    for (ov, x) in o.iter_mut().zip(vv) {
                        *ov += p * x;
                    }
                }
            });
        });
}

/// Writes `rows` rows of `src` (`[rows, kv_dim]`) into the cache at positions `pos0..pos0+rows`.
pub fn kv_write(
    cache: &mut [f32],
    src: &[f32],
    rows: usize,
    kv_dim: usize,
    pos0: usize,
    blocks: &[u32],
    block_size: usize,
) {
    for i in 0..rows {
        let r = phys(blocks, block_size, pos0 + i);
        cache[r * kv_dim..(r + 1) * kv_dim].copy_from_slice(&src[i * kv_dim..(i + 1) * kv_dim]);
    }
}
