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

/// The physical cache rows of logical positions `lo..=hi`, in order: one block-table lookup
/// (and one division) per block rather than per position.
#[inline]
fn rows(
    blocks: &[u32],
    block_size: usize,
    lo: usize,
    hi: usize,
) -> impl Iterator<Item = usize> + '_ {
    (lo / block_size..=hi / block_size).flat_map(move |b| {
        let first = b * block_size;
        let base = blocks[b] as usize * block_size;
        (lo.max(first)..=hi.min(first + block_size - 1)).map(move |p| base + p - first)
    })
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

/// One query head against the keys it may see, positions `lo..=pos`.
struct Head<'a> {
    q: &'a [f32],
    k_cache: &'a [f32],
    v_cache: &'a [f32],
    blocks: &'a [u32],
    block_size: usize,
    lo: usize,
    pos: usize,
    /// Offset of the head's kv group within a cache row, and the row stride.
    col: usize,
    kv_dim: usize,
    scale: f32,
}

/// `o = softmax(q · Kᵀ · scale) · V` for one head; `sc` holds the scores.
#[inline(always)]
fn head_into(h: &Head<'_>, sc: &mut Vec<f32>, o: &mut [f32]) {
    let hd = o.len();
    sc.clear();
    let mut max = f32::NEG_INFINITY;
    for r in rows(h.blocks, h.block_size, h.lo, h.pos) {
        let at = r * h.kv_dim + h.col;
        let v = dot(h.q, &h.k_cache[at..at + hd]) * h.scale;
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
    for (r, p) in rows(h.blocks, h.block_size, h.lo, h.pos).zip(sc.iter()) {
        let at = r * h.kv_dim + h.col;
        let p = p * inv;
        for (ov, x) in o.iter_mut().zip(&h.v_cache[at..at + hd]) {
            *ov += p * x;
        }
    }
}

/// [`head_into`] compiled for AVX2: the same operations in the same order on 256-bit vectors
/// (no FMA contraction), so results equal the baseline build's bit for bit. The baseline
/// x86_64 target has only SSE2, where one decode step's attention took as long as its q/k/v
/// projections.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn head_into_avx2(h: &Head<'_>, sc: &mut Vec<f32>, o: &mut [f32]) {
    head_into(h, sc, o);
}

fn run_head(h: &Head<'_>, sc: &mut Vec<f32>, o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked above.
        return unsafe { head_into_avx2(h, sc, o) };
    }
    head_into(h, sc, o);
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
            let head = Head {
                q: &q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd],
                k_cache,
                v_cache,
                blocks: sq.blocks,
                block_size: s.block_size,
                lo: s.window.map_or(0, |w| (pos + 1).saturating_sub(w)),
                pos,
                col: (h / group) * hd,
                kv_dim,
                scale,
            };
            SCORES.with(|cell| run_head(&head, &mut cell.borrow_mut(), o));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 500.0
                    - 1.0
            })
            .collect()
    }

    /// Softmax attention in f64, one position at a time through the block table.
    fn naive(q: &[f32], k: &[f32], v: &[f32], seqs: &[AttnSeq<'_>], s: &AttnShape) -> Vec<f64> {
        let (hd, kv_dim) = (s.head_dim, s.kv_heads * s.head_dim);
        let mut out = Vec::new();
        for sq in seqs {
            for t in 0..sq.n_q {
                let pos = sq.pos0 + t;
                let lo = s.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                for h in 0..s.heads {
                    let g = h / (s.heads / s.kv_heads);
                    let qv = &q[(sq.q_row0 + t) * s.heads * hd + h * hd..][..hd];
                    let sc: Vec<f64> = (lo..=pos)
                        .map(|j| {
                            let r = phys(sq.blocks, s.block_size, j);
                            let kv = &k[r * kv_dim + g * hd..][..hd];
                            qv.iter()
                                .zip(kv)
                                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..hd {
                        out.push(
                            (lo..=pos)
                                .zip(&e)
                                .map(|(j, p)| {
                                    let r = phys(sq.blocks, s.block_size, j);
                                    p / sum * f64::from(v[r * kv_dim + g * hd + d])
                                })
                                .sum(),
                        );
                    }
                }
            }
        }
        out
    }

    #[test]
    fn paged_windowed_attention_matches_a_naive_one() {
        // Two sequences over shuffled blocks of 4 rows: one decoding at position 10, one
        // prefilling positions 3..9, whose keys start mid-block and cross block boundaries.
        let (heads, kv_heads, hd, bs) = (4, 2, 16, 4);
        let kv_dim = kv_heads * hd;
        let blocks_a = [5u32, 0, 3];
        let blocks_b = [1u32, 4, 2];
        let k = data(6 * bs * kv_dim, 1);
        let v = data(6 * bs * kv_dim, 2);
        let q = data(7 * heads * hd, 3);
        for window in [None, Some(3), Some(6)] {
            let s = AttnShape {
                heads,
                kv_heads,
                head_dim: hd,
                block_size: bs,
                window,
            };
            let seqs = [
                AttnSeq {
                    q_row0: 0,
                    n_q: 1,
                    pos0: 10,
                    blocks: &blocks_a,
                },
                AttnSeq {
                    q_row0: 1,
                    n_q: 6,
                    pos0: 3,
                    blocks: &blocks_b,
                },
            ];
            let mut out = vec![0.0; 7 * heads * hd];
            attention(&q, &k, &v, &seqs, &s, &mut out);
            for (i, (a, b)) in out.iter().zip(naive(&q, &k, &v, &seqs, &s)).enumerate() {
                assert!(
                    (f64::from(*a) - b).abs() < 1e-5,
                    "window {window:?}, element {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn the_avx2_build_equals_the_baseline_bit_for_bit() {
        let (hd, kv_dim, bs) = (64, 128, 16);
        let blocks = [2u32, 0, 1];
        let (k, v, q) = (
            data(3 * bs * kv_dim, 4),
            data(3 * bs * kv_dim, 5),
            data(hd, 6),
        );
        let h = Head {
            q: &q,
            k_cache: &k,
            v_cache: &v,
            blocks: &blocks,
            block_size: bs,
            lo: 5,
            pos: 40,
            col: hd,
            kv_dim,
            scale: 0.125,
        };
        let (mut base, mut best) = (vec![0.0; hd], vec![0.0; hd]);
        head_into(&h, &mut Vec::new(), &mut base);
        run_head(&h, &mut Vec::new(), &mut best);
        assert_eq!(base, best);
    }
}
