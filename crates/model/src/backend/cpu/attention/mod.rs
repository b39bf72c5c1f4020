//! Grouped-query attention over a paged KV cache, causal with an optional sliding window.
//!
//! The cache holds f32 or bf16 ([`KvElem`]); every kernel is generic over which, widens keys
//! and values as it reads them, and computes in f32.

use super::super::{AttnSeq, AttnShape, KvDtype};
use half::bf16;
use rayon::prelude::*;
use std::cell::RefCell;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// An element type of the KV cache: f32, or bf16 (rounded to nearest, ties to even, when
/// written). Sealed: the register kernels load by [`KvElem::DTYPE`].
pub trait KvElem: sealed::Sealed + Copy + Send + Sync + 'static {
    const DTYPE: KvDtype;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl KvElem for f32 {
    const DTYPE: KvDtype = KvDtype::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        x
    }
}

impl KvElem for bf16 {
    const DTYPE: KvDtype = KvDtype::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> bf16 {
        bf16::from_f32(x)
    }
}

#[cfg(target_arch = "x86_64")]
mod simd;

thread_local! {
    /// A task's attention scores, and its heads' running maxima and sums; each grows to the
    /// largest seen, once per thread.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
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

#[inline(always)]
fn dot<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
    // Eight lanes of partial sums let the compiler vectorise without reassociating.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y.to_f32();
    }
    s
}

/// Some query heads of `tokens` consecutive tokens of one sequence, whole kv groups of them or
/// part of one group, against the keys they may see: token `i` at position `pos + i` sees
/// positions `lo..=pos + i` (every token of a call shares `lo`).
struct Heads<'a, E> {
    /// The heads' queries, back to back (`n · head_dim`), token after token.
    q: &'a [f32],
    tokens: usize,
    /// Query heads per kv group among these heads (all of them when they are part of one
    /// group).
    group: usize,
    k_cache: &'a [E],
    v_cache: &'a [E],
    blocks: &'a [u32],
    block_size: usize,
    lo: usize,
    pos: usize,
    /// Offset of the first head's keys within a cache row, and the row stride.
    col: usize,
    kv_dim: usize,
    scale: f32,
}

/// `o[n] = softmax(q[n] · Kᵀ · scale) · V` for every head of `h`; the scratch holds the
/// scores, position after position, and the heads' maxima and sums.
///
/// The loops run over cache rows outside and heads inside: the heads' keys and values of one
/// position lie side by side in its row, so a call reads each row once, in order, and its dot
/// products are independent chains the core overlaps. Every head sums the same terms in the
/// same order as it would alone, so how heads are grouped into calls changes no bit.
#[inline(always)]
fn heads_into<E: KvElem>(h: &Heads<'_, E>, hd: usize, (sc, stats): Scratch<'_>, o: &mut [f32]) {
    let nh = o.len() / hd;
    let len = h.pos + 1 - h.lo;
    let width = nh / h.group * hd;
    // Scores position after position, a position's heads side by side, so that the stores of
    // one row are contiguous rather than a whole context apart.
    sc.clear();
    sc.resize(nh * len, 0.0);
    stats.clear();
    stats.resize(2 * nh, 0.0);
    let (max, sum) = stats.split_at_mut(nh);
    max.fill(f32::NEG_INFINITY);
    for (r, scores) in rows(h.blocks, h.block_size, h.lo, h.pos).zip(sc.chunks_exact_mut(nh)) {
        let at = r * h.kv_dim + h.col;
        let kr = &h.k_cache[at..at + width];
        let keys = kr
            .chunks_exact(hd)
            .flat_map(|k| std::iter::repeat_n(k, h.group));
        for (((k, q), s), m) in keys
            .zip(h.q.chunks_exact(hd))
            .zip(scores.iter_mut())
            .zip(max.iter_mut())
        {
            *s = dot(q, k) * h.scale;
            *m = m.max(*s);
        }
    }
    for scores in sc.chunks_exact_mut(nh) {
        for ((v, m), s) in scores.iter_mut().zip(max.iter()).zip(sum.iter_mut()) {
            *v = (*v - m).exp();
            *s += *v;
        }
    }
    let inv = sum;
    for s in inv.iter_mut() {
        *s = 1.0 / *s;
    }
    o.fill(0.0);
    for (r, scores) in rows(h.blocks, h.block_size, h.lo, h.pos).zip(sc.chunks_exact(nh)) {
        let at = r * h.kv_dim + h.col;
        let vr = &h.v_cache[at..at + width];
        let values = vr
            .chunks_exact(hd)
            .flat_map(|v| std::iter::repeat_n(v, h.group));
        for (((v, on), s), inv) in values
            .zip(o.chunks_exact_mut(hd))
            .zip(scores)
            .zip(inv.iter())
        {
            let p = s * inv;
            for (ov, x) in on.iter_mut().zip(v) {
                *ov += p * x.to_f32();
            }
        }
    }
}

/// A task's scratch: scores, then per-head maxima and sums.
type Scratch<'a> = (&'a mut Vec<f32>, &'a mut Vec<f32>);

/// [`heads_into`] compiled for AVX2: the same operations in the same order on 256-bit vectors
/// (no FMA contraction), so results equal the baseline build's bit for bit. The baseline
/// x86_64 target has only SSE2, where one decode step's attention took as long as its q/k/v
/// projections.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn heads_into_avx2<E: KvElem>(
    h: &Heads<'_, E>,
    hd: usize,
    scratch: Scratch<'_>,
    o: &mut [f32],
) {
    heads_into(h, hd, scratch, o);
}

/// The kernels [`attention`] may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `heads_into`, compiled for the baseline target.
    Portable,
    /// `heads_into` compiled for AVX2 (no FMA), bit-identical to the portable one.
    PortableAvx2,
    /// The register kernel of `simd.rs` on AVX2 and FMA.
    Avx2,
    /// The register kernel of `simd.rs` on AVX-512F.
    Avx512,
}

impl Kernel {
    /// The kernel for head size `hd` on this CPU: the register kernels where the CPU has them,
    /// `SWITCHYARD_CPU_KERNELS` does not ask for less and the head is whole registers.
    #[must_use]
    pub fn for_head_size(hd: usize) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            use super::linear::{isa, Isa};
            let isa = isa();
            if isa >= Isa::Avx512 && simd::avx512::supports(hd) {
                return Kernel::Avx512;
            }
            // Isa::Avx2 includes FMA.
            if isa >= Isa::Avx2 && simd::avx2::supports(hd) {
                return Kernel::Avx2;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Kernel::PortableAvx2;
            }
        }
        Kernel::Portable
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::PortableAvx2 => "portable (avx2)",
            Kernel::Avx2 => "avx2+fma",
            Kernel::Avx512 => "avx512",
        }
    }
}

/// `h`'s heads on `kernel`, which must be [`Kernel::for_head_size`]`(hd)` (chosen once per
/// call of [`attention`], not per task).
fn run_heads<E: KvElem>(kernel: Kernel, h: &Heads<'_, E>, hd: usize, o: &mut [f32]) {
    if h.tokens > 1 && !matches!(kernel, Kernel::Avx512 | Kernel::Avx2) {
        // The portable kernel takes one token at a time; the register kernels a whole run.
        let per = o.len() / h.tokens;
        for (i, (q, o)) in
            h.q.chunks_exact(per)
                .zip(o.chunks_exact_mut(per))
                .enumerate()
        {
            let one = Heads {
                q,
                tokens: 1,
                pos: h.pos + i,
                ..*h
            };
            run_heads(kernel, &one, hd, o);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        thread_local! {
            static SIMD: RefCell<simd::Scratch> = RefCell::default();
        }
        match kernel {
            // SAFETY: `for_head_size` chose it: the CPU has AVX-512F and the kernel takes `hd`.
            Kernel::Avx512 => {
                return SIMD.with(|s| unsafe { simd::avx512::heads(h, hd, &mut s.borrow_mut(), o) })
            }
            // SAFETY: `for_head_size` chose it: the CPU has AVX2 and FMA, the kernel takes `hd`.
            Kernel::Avx2 => {
                return SIMD.with(|s| unsafe { simd::avx2::heads(h, hd, &mut s.borrow_mut(), o) })
            }
            Kernel::PortableAvx2 => {
                return SCRATCH.with(|cell| {
                    let (sc, stats) = &mut *cell.borrow_mut();
                    // SAFETY: `for_head_size` chose it: the CPU has AVX2.
                    unsafe { heads_into_avx2(h, hd, (sc, stats), o) }
                });
            }
            Kernel::Portable => {}
        }
    }
    SCRATCH.with(|cell| {
        let (sc, stats) = &mut *cell.borrow_mut();
        heads_into(h, hd, (sc, stats), o);
    });
}

/// Query heads per task: all of a token's where there are enough tokens to keep every thread
/// busy (2 tasks a thread), fewer for steps of few tokens, down to one. Always a divisor of
/// `heads` that is a whole number of kv groups or a whole fraction of one, so that a task's
/// heads read either whole groups' columns or one group's.
fn heads_per_task(tokens: usize, heads: usize, group: usize, threads: usize) -> usize {
    let aligned = |d: &usize| {
        heads.is_multiple_of(*d) && (d.is_multiple_of(group) || group.is_multiple_of(*d))
    };
    (1..=heads)
        .rev()
        .filter(aligned)
        .find(|d| tokens * heads / d >= 2 * threads)
        .unwrap_or(1)
}

/// `out[t, h] = softmax(q[t,h] · K[g]ᵀ / √d) · V[g]` with `g = h / (heads / kv_heads)`, over the
/// keys each query may see. Every key of every sequence must already be in the cache.
///
/// A task takes a token's heads, whole kv groups of them where the step has tokens enough, and
/// reads each of its cache rows once for all of them (bench_attention, 32 sequences, 2
/// threads: with one task per (token, head) the cache was read at 2-6 GB/s).
pub fn attention<E: KvElem>(
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    seqs: &[AttnSeq<'_>],
    s: &AttnShape,
    out: &mut [f32],
) {
    let hd = s.head_dim;
    let q_dim = s.heads * hd;
    let group = s.heads / s.kv_heads;
    let total: usize = seqs.iter().map(|q| q.n_q).sum();
    let threads = rayon::current_num_threads();
    let per_task = heads_per_task(total, s.heads, group, threads);
    let kernel = Kernel::for_head_size(hd);
    // What every task's heads share; each task fills in its queries, sequence and keys.
    let all = Heads {
        q: &[],
        tokens: 1,
        group,
        k_cache,
        v_cache,
        blocks: &[],
        block_size: s.block_size,
        lo: 0,
        pos: 0,
        col: 0,
        kv_dim: s.kv_heads * hd,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let out = &mut out[..total * q_dim];
    let block = rows_per_task(seqs, total, threads);
    if per_task == s.heads && block > 1 {
        return attention_blocks(kernel, (block, hd), &all, q, seqs, s.window, out);
    }
    let tasks_per_token = s.heads / per_task;
    out.par_chunks_mut(per_task * hd)
        .enumerate()
        .for_each(|(i, o)| {
            let (t, part) = (i / tasks_per_token, i % tasks_per_token);
            // Sequences are laid out back to back in row order.
            let si = seqs.partition_point(|sq| sq.q_row0 + sq.n_q <= t);
            let sq = &seqs[si];
            let pos = sq.pos0 + (t - sq.q_row0);
            let h0 = part * per_task;
            let q0 = t * q_dim + h0 * hd;
            let heads = Heads {
                q: &q[q0..q0 + o.len()],
                // Part of one group: every head of the task reads that group's columns.
                group: group.min(per_task),
                blocks: sq.blocks,
                lo: s.window.map_or(0, |w| (pos + 1).saturating_sub(w)),
                pos,
                col: h0 / group * hd,
                ..all
            };
            run_heads(kernel, &heads, hd, o);
        });
}

/// Token rows per task when a step holds prompt tokens: 8 (or 4, 2) consecutive tokens of a
/// sequence share each key and value row the task reads, where one token a task read a
/// prompt's whole cache once per token (a 2,048-token prompt's attention read ~4 GB a layer
/// from L2 and L3). bench_attention --prompt, 2 threads, one layer of a 2,048-token prompt:
/// 100-120 → 72-89 ms (f32 cache), 94-120 → 58-91 ms (bf16). As many rows as leave four tasks
/// a thread; one row a task for decode-only steps.
fn rows_per_task(seqs: &[AttnSeq<'_>], total: usize, threads: usize) -> usize {
    if seqs.iter().all(|sq| sq.n_q < 2) {
        return 1;
    }
    [8, 4, 2]
        .into_iter()
        .find(|&r| total / r >= 4 * threads)
        .unwrap_or(1)
}

/// [`attention`] with tasks of `block` token rows, every head (of size `hd`) of each, the
/// fields all tasks share in `all`. A task runs its rows as runs of consecutive tokens of one
/// sequence that see keys from the same first position (with a sliding window, a run ends
/// where the window moves), one kernel call a run. A token's heads get the bits they get
/// alone.
fn attention_blocks<E: KvElem>(
    kernel: Kernel,
    (block, hd): (usize, usize),
    all: &Heads<'_, E>,
    q: &[f32],
    seqs: &[AttnSeq<'_>],
    window: Option<usize>,
    out: &mut [f32],
) {
    // Every head of a token: its kv heads' width times the heads in each group.
    let q_dim = all.kv_dim * all.group;
    let first_key = |pos: usize| window.map_or(0, |w| (pos + 1).saturating_sub(w));
    out.par_chunks_mut(block * q_dim)
        .enumerate()
        .for_each(|(i, o)| {
            let (t0, rows) = (i * block, o.len() / q_dim);
            let mut t = t0;
            while t < t0 + rows {
                // Sequences are laid out back to back in row order.
                let si = seqs.partition_point(|sq| sq.q_row0 + sq.n_q <= t);
                let sq = &seqs[si];
                let pos = sq.pos0 + (t - sq.q_row0);
                let lo = first_key(pos);
                let end = (t0 + rows).min(sq.q_row0 + sq.n_q);
                let mut n = 1;
                while t + n < end && first_key(pos + n) == lo {
                    n += 1;
                }
                let heads = Heads {
                    q: &q[t * q_dim..(t + n) * q_dim],
                    tokens: n,
                    blocks: sq.blocks,
                    lo,
                    pos,
                    ..*all
                };
                let o = &mut o[(t - t0) * q_dim..(t - t0 + n) * q_dim];
                run_heads(kernel, &heads, hd, o);
                t += n;
            }
        });
}

/// Writes `rows` rows of `src` (`[rows, kv_dim]`) into the cache at positions `pos0..pos0+rows`,
/// rounded to the cache's element type.
pub fn kv_write<E: KvElem>(
    cache: &mut [E],
    src: &[f32],
    rows: usize,
    kv_dim: usize,
    pos0: usize,
    blocks: &[u32],
    block_size: usize,
) {
    for i in 0..rows {
        let r = phys(blocks, block_size, pos0 + i);
        let dst = &mut cache[r * kv_dim..(r + 1) * kv_dim];
        for (d, &x) in dst.iter_mut().zip(&src[i * kv_dim..(i + 1) * kv_dim]) {
            *d = E::from_f32(x);
        }
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

    /// Softmax attention in f64 of every token's heads, one position at a time through the
    /// block table.
    fn naive<E: KvElem>(
        q: &[f32],
        k: &[E],
        v: &[E],
        seqs: &[AttnSeq<'_>],
        s: &AttnShape,
    ) -> Vec<f64> {
        let (hd, q_dim) = (s.head_dim, s.heads * s.head_dim);
        let mut out = Vec::new();
        for sq in seqs {
            for t in 0..sq.n_q {
                let pos = sq.pos0 + t;
                let row = (sq.q_row0 + t) * q_dim;
                out.extend(naive_heads(
                    &Heads {
                        q: &q[row..row + q_dim],
                        tokens: 1,
                        group: s.heads / s.kv_heads,
                        k_cache: k,
                        v_cache: v,
                        blocks: sq.blocks,
                        block_size: s.block_size,
                        lo: s.window.map_or(0, |w| (pos + 1).saturating_sub(w)),
                        pos,
                        col: 0,
                        kv_dim: s.kv_heads * hd,
                        scale: 1.0 / (hd as f32).sqrt(),
                    },
                    hd,
                ));
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
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let (hd, kv_dim, bs) = (64, 128, 16);
            let blocks = [2u32, 0, 1];
            let (k, v, q) = (
                data(3 * bs * kv_dim, 4),
                data(3 * bs * kv_dim, 5),
                data(8 * hd, 6),
            );
            let h = Heads {
                q: &q,
                tokens: 1,
                group: 4,
                k_cache: &k,
                v_cache: &v,
                blocks: &blocks,
                block_size: bs,
                lo: 5,
                pos: 40,
                col: 0,
                kv_dim,
                scale: 0.125,
            };
            let (mut base, mut avx2) = (vec![0.0; 8 * hd], vec![0.0; 8 * hd]);
            heads_into(&h, hd, (&mut Vec::new(), &mut Vec::new()), &mut base);
            // SAFETY: the CPU has AVX2, checked above.
            unsafe { heads_into_avx2(&h, hd, (&mut Vec::new(), &mut Vec::new()), &mut avx2) };
            assert_eq!(base, avx2);
        }
    }

    /// `h`'s heads in f64, one position at a time.
    fn naive_heads<E: KvElem>(h: &Heads<'_, E>, hd: usize) -> Vec<f64> {
        let nh = h.q.len() / hd;
        let mut out = Vec::new();
        for n in 0..nh {
            let col = h.col + n / h.group * hd;
            let q = &h.q[n * hd..(n + 1) * hd];
            let at = |p: usize| phys(h.blocks, h.block_size, p) * h.kv_dim + col;
            let sc: Vec<f64> = (h.lo..=h.pos)
                .map(|p| {
                    let k = &h.k_cache[at(p)..at(p) + hd];
                    q.iter()
                        .zip(k)
                        .map(|(a, b)| f64::from(*a) * f64::from(b.to_f32()))
                        .sum::<f64>()
                        * f64::from(h.scale)
                })
                .collect();
            let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = sc.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                out.push(
                    (h.lo..=h.pos)
                        .zip(&e)
                        .map(|(p, w)| w / sum * f64::from(h.v_cache[at(p) + d].to_f32()))
                        .sum(),
                );
            }
        }
        out
    }

    /// Every kernel this CPU runs against the naive f64 attention, over head sizes, kv groups
    /// (whole ones, and part of one), windows and key counts on either side of the register
    /// kernels' chunks; on an f32 cache and a bf16 one (whose values the naive attention reads
    /// widened, as the kernels do, so the same bound holds).
    #[test]
    fn every_kernel_matches_a_naive_one() {
        every_kernel_matches_a_naive_one_on::<f32>();
        every_kernel_matches_a_naive_one_on::<bf16>();
    }

    fn every_kernel_matches_a_naive_one_on<E: KvElem>() {
        type Kernel<E> = Box<dyn Fn(&Heads<'_, E>, usize, &mut [f32])>;
        let mut kernels: Vec<(&str, Kernel<E>)> = vec![(
            "portable",
            Box::new(|h, hd, o| heads_into(h, hd, (&mut Vec::new(), &mut Vec::new()), o)),
        )];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") {
                kernels.push((
                    "avx512",
                    Box::new(|h, hd, o| {
                        if simd::avx512::supports(hd) {
                            // SAFETY: the CPU has AVX-512F and the kernel takes `hd`.
                            unsafe { simd::avx512::heads(h, hd, &mut Default::default(), o) }
                        }
                    }),
                ));
            }
            if has!("avx2") && has!("fma") {
                kernels.push((
                    "avx2",
                    Box::new(|h, hd, o| {
                        if simd::avx2::supports(hd) {
                            // SAFETY: the CPU has AVX2 and FMA and the kernel takes `hd`.
                            unsafe { simd::avx2::heads(h, hd, &mut Default::default(), o) }
                        }
                    }),
                ));
            }
        }
        let mut checked = vec![0usize; kernels.len()];
        let bs = 8;
        let blocks = [6u32, 2, 0, 5, 3, 1, 4, 7];
        // (head size, kv heads in a row, heads in the task, heads per kv group among them)
        for (hd, kv_heads, nh, group) in [
            (8, 2, 4, 2),
            (16, 2, 4, 2),
            (32, 3, 6, 2),
            (64, 4, 16, 4),
            (64, 4, 2, 2),
            (128, 1, 8, 8),
            (48, 2, 2, 1),
            (40, 2, 4, 2),
        ] {
            let kv_dim = kv_heads * hd;
            let (k, v) = (
                cache_of::<E>(&data(8 * bs * kv_dim, 21)),
                cache_of::<E>(&data(8 * bs * kv_dim, 22)),
            );
            let q = data(nh * hd, 23);
            for (lo, pos) in [(0, 0), (0, 6), (3, 18), (0, 16), (9, 40), (0, 63)] {
                let h = Heads {
                    q: &q,
                    tokens: 1,
                    group,
                    k_cache: &k,
                    v_cache: &v,
                    blocks: &blocks,
                    block_size: bs,
                    lo,
                    pos,
                    col: (kv_heads - nh.div_ceil(group)) * hd,
                    kv_dim,
                    scale: 0.3,
                };
                let want = naive_heads(&h, hd);
                for ((name, kernel), checked) in kernels.iter().zip(&mut checked) {
                    let mut out = vec![f32::NAN; nh * hd];
                    kernel(&h, hd, &mut out);
                    if out[0].is_nan() {
                        continue; // a head size this kernel does not take
                    }
                    *checked += 1;
                    for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (f64::from(*a) - b).abs() < 2e-6 * (1.0 + b.abs()),
                            "{name} on {}: hd {hd}, keys {lo}..={pos}, element {i}: {a} vs {b}",
                            E::DTYPE
                        );
                    }
                }
            }
        }
        // Seven of the eight head sizes are whole AVX2 registers, six whole AVX-512 ones.
        for ((name, _), n) in kernels.iter().zip(checked) {
            assert!(n >= 6 * 6, "{name} on {} ran {n} cases", E::DTYPE);
        }
    }

    /// `f` run into a zeroed output of `len` floats in a pool of each of `threads` sizes.
    fn in_pools(threads: &[usize], len: usize, f: impl Fn(&mut [f32]) + Sync) -> Vec<Vec<f32>> {
        threads
            .iter()
            .map(|&n| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .expect("a thread pool");
                let mut out = vec![0.0; len];
                pool.install(|| f(&mut out));
                out
            })
            .collect()
    }

    /// `x` rounded to a cache of `E`, as `kv_write` stores it.
    fn cache_of<E: KvElem>(x: &[f32]) -> Vec<E> {
        x.iter().map(|&v| E::from_f32(v)).collect()
    }

    #[test]
    fn kv_write_rounds_to_the_caches_dtype_through_the_block_table() {
        // Positions 2..6 of a sequence whose blocks (of 2 rows) are 3, 0 and 2.
        let (kv_dim, bs, blocks) = (3, 2, [3u32, 0, 2]);
        let src: Vec<f32> = (0..4 * kv_dim).map(|i| 1.0 + i as f32 / 3.0).collect();
        let mut f = vec![0.0f32; 4 * bs * kv_dim];
        let mut h = vec![bf16::ZERO; 4 * bs * kv_dim];
        kv_write(&mut f, &src, 4, kv_dim, 2, &blocks, bs);
        kv_write(&mut h, &src, 4, kv_dim, 2, &blocks, bs);
        for (i, row) in src.chunks(kv_dim).enumerate() {
            let r = phys(&blocks, bs, 2 + i);
            assert_eq!(&f[r * kv_dim..(r + 1) * kv_dim], row, "position {}", 2 + i);
            for (got, want) in h[r * kv_dim..(r + 1) * kv_dim].iter().zip(row) {
                assert_eq!(*got, bf16::from_f32(*want));
            }
        }
        // Block 1 (rows 2-3) belongs to nobody and stays zero.
        assert!(f[2 * kv_dim..4 * kv_dim].iter().all(|&x| x == 0.0));
        assert!(h[2 * kv_dim..4 * kv_dim].iter().all(|x| x.to_f32() == 0.0));
    }

    #[test]
    fn a_head_has_the_same_bits_alone_as_among_others() {
        // Two kv groups of three heads each: every head equals that head computed alone, for
        // a head size only the portable kernel takes (40) and two the AVX-512 one takes.
        for hd in [40, 32, 64] {
            let (kv_dim, bs, group) = (2 * hd, 8, 3);
            let blocks = [3u32, 1, 0, 2];
            let (k, v, q) = (
                data(4 * bs * kv_dim, 7),
                data(4 * bs * kv_dim, 8),
                data(2 * group * hd, 9),
            );
            let heads = |q, group, col| Heads {
                q,
                tokens: 1,
                group,
                k_cache: &k,
                v_cache: &v,
                blocks: &blocks,
                block_size: bs,
                lo: 2,
                pos: 29,
                col,
                kv_dim,
                scale: 0.2,
            };
            let mut all = vec![0.0; 2 * group * hd];
            let kernel = Kernel::for_head_size(hd);
            run_heads(kernel, &heads(&q, group, 0), hd, &mut all);
            for n in 0..2 * group {
                let mut one = vec![0.0; hd];
                let col = n / group * hd;
                run_heads(
                    kernel,
                    &heads(&q[n * hd..(n + 1) * hd], 1, col),
                    hd,
                    &mut one,
                );
                assert_eq!(one, all[n * hd..(n + 1) * hd], "hd {hd}, head {n}");
            }
        }
    }

    /// A prompt's tokens taken several to a task (one thread: 8 rows a task) get the bits they
    /// get one to a task (sixteen threads: too few rows for blocks), and match the naive f64
    /// attention: with and without a sliding window (whose runs end where it moves), after a
    /// decoding sequence, on f32 and bf16 caches.
    #[test]
    fn prompt_tokens_taken_several_to_a_task_match_one_to_a_task() {
        prompt_blocks_on::<f32>();
        prompt_blocks_on::<bf16>();
    }

    fn prompt_blocks_on<E: KvElem>() {
        let (heads, kv_heads, hd, bs) = (16, 4, 64, 16);
        let kv_dim = kv_heads * hd;
        let blocks_a = [3u32, 0, 5];
        let blocks_b = [1u32, 4, 2, 6];
        let (k, v) = (
            cache_of::<E>(&data(7 * bs * kv_dim, 31)),
            cache_of::<E>(&data(7 * bs * kv_dim, 32)),
        );
        // One decoding token at position 40, then a prompt chunk at positions 9..46.
        let rows = 1 + 37;
        let q = data(rows * heads * hd, 33);
        let seqs = [
            AttnSeq {
                q_row0: 0,
                n_q: 1,
                pos0: 40,
                blocks: &blocks_a,
            },
            AttnSeq {
                q_row0: 1,
                n_q: 37,
                pos0: 9,
                blocks: &blocks_b,
            },
        ];
        assert_eq!(rows_per_task(&seqs, rows, 1), 8);
        assert_eq!(rows_per_task(&seqs, rows, 16), 1);
        for window in [None, Some(12)] {
            let s = AttnShape {
                heads,
                kv_heads,
                head_dim: hd,
                block_size: bs,
                window,
            };
            let outs = in_pools(&[1, 16], rows * heads * hd, |out| {
                attention(&q, &k, &v, &seqs, &s, out)
            });
            assert_eq!(outs[0], outs[1], "window {window:?}");
            for (i, (a, b)) in outs[0].iter().zip(naive(&q, &k, &v, &seqs, &s)).enumerate() {
                assert!(
                    (f64::from(*a) - b).abs() < 2e-6 * (1.0 + b.abs()),
                    "{}, window {window:?}, element {i}: {a} vs {b}",
                    E::DTYPE
                );
            }
        }
    }

    #[test]
    fn tasks_take_whole_groups_and_keep_threads_busy() {
        // Many tokens: a token's every head in one task.
        assert_eq!(heads_per_task(32, 16, 4, 2), 16);
        // One token on two threads: 4 tasks wanted, one kv group each.
        assert_eq!(heads_per_task(1, 16, 4, 2), 4);
        // One token on sixteen threads: one head each, as many tasks as there are heads.
        assert_eq!(heads_per_task(1, 16, 4, 16), 1);
        // One token, four threads: two heads, half a group each.
        assert_eq!(heads_per_task(1, 16, 4, 4), 2);
        // Six heads in groups of three: one group per task, or one head, never two heads
        // (neither whole groups nor a whole fraction of one).
        assert_eq!(heads_per_task(1, 6, 3, 1), 3);
        assert_eq!(heads_per_task(1, 6, 3, 2), 1);
        assert_eq!(heads_per_task(8, 6, 3, 1), 6);
        // No tokens: still a valid divisor.
        assert_eq!(heads_per_task(0, 5, 1, 4), 1);
    }

    #[test]
    fn the_split_of_heads_into_tasks_changes_no_bit() {
        // The same call under pools of 1, 3 and 16 threads (tasks of 16, 2-4 and 1 heads).
        let (heads, kv_heads, hd, bs) = (16, 4, 32, 8);
        let kv_dim = kv_heads * hd;
        let blocks = [2u32, 0, 3, 1];
        let (k, v, q) = (
            data(4 * bs * kv_dim, 13),
            data(4 * bs * kv_dim, 14),
            data(heads * hd, 15),
        );
        let s = AttnShape {
            heads,
            kv_heads,
            head_dim: hd,
            block_size: bs,
            window: None,
        };
        let seqs = [AttnSeq {
            q_row0: 0,
            n_q: 1,
            pos0: 29,
            blocks: &blocks,
        }];
        let outs = in_pools(&[1, 3, 16], heads * hd, |out| {
            attention(&q, &k, &v, &seqs, &s, out)
        });
        assert_eq!(outs[0], outs[1]);
        assert_eq!(outs[0], outs[2]);
    }

    /// Every kernel this CPU runs: a run of tokens in one call gives each token the bits it
    /// gets alone (a prefill chunk of any size, or decode), at positions on either side of the
    /// register kernels' key chunks, on an f32 cache and a bf16 one.
    #[test]
    fn a_tokens_bits_do_not_depend_on_the_tokens_run_beside_it() {
        a_tokens_bits_do_not_depend_on_the_run::<f32>();
        a_tokens_bits_do_not_depend_on_the_run::<bf16>();
    }

    fn a_tokens_bits_do_not_depend_on_the_run<E: KvElem>() {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") {
                kernels.push(Kernel::PortableAvx2);
            }
            if has!("avx2") && has!("fma") {
                kernels.push(Kernel::Avx2);
            }
            if has!("avx512f") {
                kernels.push(Kernel::Avx512);
            }
        }
        let bs = 8;
        let blocks = [6u32, 2, 0, 5, 3, 1, 4, 7, 9, 8];
        for kernel in kernels {
            for (hd, group) in [(16, 2), (32, 4), (64, 1), (128, 2)] {
                #[cfg(target_arch = "x86_64")]
                if (kernel == Kernel::Avx512 && !simd::avx512::supports(hd))
                    || (kernel == Kernel::Avx2 && !simd::avx2::supports(hd))
                {
                    continue;
                }
                let kv_dim = hd;
                let (k, v) = (
                    cache_of::<E>(&data(10 * bs * kv_dim, 31)),
                    cache_of::<E>(&data(10 * bs * kv_dim, 32)),
                );
                for (pos, tokens) in [(0, 8), (5, 3), (13, 8), (40, 7), (64, 8), (71, 1)] {
                    let q = data(tokens * group * hd, 33 + pos as u32);
                    let h = |q, tokens, pos| Heads::<'_, E> {
                        q,
                        tokens,
                        group,
                        k_cache: &k,
                        v_cache: &v,
                        blocks: &blocks,
                        block_size: bs,
                        lo: 0,
                        pos,
                        col: 0,
                        kv_dim,
                        scale: 1.0 / (hd as f32).sqrt(),
                    };
                    let per = group * hd;
                    let mut run = vec![f32::NAN; tokens * per];
                    run_heads(kernel, &h(&q[..], tokens, pos), hd, &mut run);
                    for t in 0..tokens {
                        let mut one = vec![f32::NAN; per];
                        run_heads(
                            kernel,
                            &h(&q[t * per..(t + 1) * per], 1, pos + t),
                            hd,
                            &mut one,
                        );
                        let same = one
                            .iter()
                            .zip(&run[t * per..(t + 1) * per])
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{kernel:?}: head size {hd}, token {t} of {tokens} at {pos}"
                        );
                    }
                }
            }
        }
    }

    /// Through the public entry: a 64-token prompt's outputs in one call equal those of chunks
    /// of 1, 7 and 64 tokens, and of the same chunks beside another sequence's decode, with and
    /// without a sliding window.
    #[test]
    fn a_prompts_attention_is_the_same_in_any_chunking_and_company() {
        let (heads, kv_heads, hd, bs) = (8, 2, 32, 16);
        let kv_dim = kv_heads * hd;
        let (blocks_a, blocks_b) = ([3u32, 0, 5, 1], [2u32, 4]);
        let k = data(6 * bs * kv_dim, 41);
        let v = data(6 * bs * kv_dim, 42);
        let q_dim = heads * hd;
        let q = data(65 * q_dim, 43);
        for window in [None, Some(20)] {
            let s = AttnShape {
                heads,
                kv_heads,
                head_dim: hd,
                block_size: bs,
                window,
            };
            let mut whole = vec![f32::NAN; 64 * q_dim];
            let seq = |q_row0, n_q, pos0| AttnSeq {
                q_row0,
                n_q,
                pos0,
                blocks: &blocks_a,
            };
            attention(&q, &k, &v, &[seq(0, 64, 0)], &s, &mut whole);
            for chunk in [1, 7, 64] {
                for company in [false, true] {
                    let mut got = Vec::new();
                    for p0 in (0..64).step_by(chunk) {
                        let n = chunk.min(64 - p0);
                        // The chunk's queries, then (in company) another sequence's decode.
                        let mut qc = q[p0 * q_dim..(p0 + n) * q_dim].to_vec();
                        let mut seqs = vec![seq(0, n, p0)];
                        if company {
                            qc.extend_from_slice(&q[64 * q_dim..]);
                            seqs.push(AttnSeq {
                                q_row0: n,
                                n_q: 1,
                                pos0: 20,
                                blocks: &blocks_b,
                            });
                        }
                        let mut out = vec![f32::NAN; qc.len()];
                        attention(&qc, &k, &v, &seqs, &s, &mut out);
                        got.extend_from_slice(&out[..n * q_dim]);
                    }
                    let same = got
                        .iter()
                        .zip(&whole)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "window {window:?}, chunks of {chunk}, company {company}"
                    );
                }
            }
        }
    }
}
