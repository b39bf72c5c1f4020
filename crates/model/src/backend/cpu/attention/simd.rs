//! [`Heads`](super::Heads) on AVX-512 or AVX2 with fused multiply-adds, for head sizes of 1 to
//! 16 registers that a const generic fixes at compile time, so that a head's query chunks and
//! output stay in registers.
//!
//! Scores come one register's width of keys at a time (16 or 8): each key's products with one
//! head's query sum in a register of their own, and a transposing reduction turns those
//! registers into one register of scores. The portable kernel instead reduced each dot product
//! on its own, 8 lanes in a fixed order, and took one scalar `exp` per score: on a 2-core Xeon
//! it spent 12-18 ns a head and key (bench_attention, 32 sequences), where reading an f32
//! cache from memory costs about 8.
//!
//! A head's result depends only on its query, its keys and values: never on the other heads
//! of its task or the other tokens of the step, as with the portable kernel.
//!
//! The kernel is written once, as a macro over the [`Simd`](crate::backend::cpu::simd::Simd)
//! operations, and stamped out per instruction set: a `#[target_feature]` function must not
//! be generic over the set it runs on, or the AVX2 copy could be compiled with AVX-512
//! instructions.

/// A task's scratch, grown to the largest task seen: scores (head after head, each padded to
/// whole chunks of keys), the offsets of the keys' cache rows in position order, each head's
/// reciprocal softmax sum, and one chunk's rows of a bf16 cache widened to f32.
#[derive(Default)]
pub(super) struct Scratch {
    scores: Vec<f32>,
    rows: Vec<usize>,
    inv: Vec<f32>,
    chunk: Vec<f32>,
}

/// Pointers to the cache rows of a chunk's keys (`offsets` into `cache`); a chunk of fewer
/// keys than the array repeats its first row, whose scores are masked out.
#[inline(always)]
fn key_ptrs<E>(cache: &[E], offsets: &[usize]) -> [*const E; 16] {
    let first = cache[offsets[0]..].as_ptr();
    let mut p = [first; 16];
    for (p, &off) in p.iter_mut().zip(offsets) {
        *p = cache[off..].as_ptr();
    }
    p
}

/// Stamps out the kernel for one instruction set with `$regs` vector registers: `heads` picks
/// the copy for the head size, `heads_nc::<E, NC>` is the kernel for heads of `NC` registers
/// over a cache of `E`.
macro_rules! kernel {
    ($module:ident, $S:ty, $features:literal, $regs:literal) => {
        pub(super) mod $module {
            use super::{key_ptrs, Scratch};
            use crate::backend::cpu::attention::{rows, Heads, KvElem};
            use crate::backend::cpu::simd::Simd;
            use crate::backend::KvDtype;
            type S = $S;
            const L: usize = <S as Simd>::LANES;

            /// f32 rows of a chunk's keys (or values), `width` floats from each of `offsets`
            /// into `cache`: the cache's own rows where it holds f32; for bf16, the rows
            /// widened once into `buf` (`L · width` floats), so that the heads that share a
            /// row (a kv group's) read it as f32 from L1 rather than each widening it again.
            ///
            /// # Safety
            /// Every offset plus `width` must lie inside `cache`, `width` be whole registers.
            #[inline(always)]
            unsafe fn chunk_rows<E: KvElem>(
                cache: &[E],
                offsets: &[usize],
                width: usize,
                buf: &mut [f32],
            ) -> [*const f32; 16] {
                // SAFETY: the caller's bounds; `buf` holds `L` rows of `width`.
                unsafe {
                    match E::DTYPE {
                        KvDtype::F32 => key_ptrs(cache, offsets).map(<*const E>::cast),
                        KvDtype::Bf16 => {
                            let mut p = [buf.as_ptr(); 16];
                            for (j, &off) in offsets.iter().enumerate() {
                                let src = cache.as_ptr().add(off).cast::<u16>();
                                let dst = buf.as_mut_ptr().add(j * width);
                                for c in (0..width).step_by(L) {
                                    S::store(dst.add(c), S::load_bf16(src.add(c)));
                                }
                                p[j] = dst;
                            }
                            p
                        }
                    }
                }
            }

            /// Heads whose values [`values`] takes at once, for heads of `nc` registers, `group`
            /// heads per kv group and `nh` heads in the task: 4, 2 or 1, as many as share a
            /// group and keep their accumulators, score broadcasts and a value register
            /// within the register file.
            fn heads_at_once(nc: usize, group: usize, nh: usize) -> usize {
                [4, 2]
                    .into_iter()
                    .find(|&b| {
                        b * nc + b + 2 <= $regs && group.is_multiple_of(b) && nh.is_multiple_of(b)
                    })
                    .unwrap_or(1)
            }

            /// Where [`values`] reads and writes: `HB` heads from the first, whose value
            /// columns start at `off` in each row, whose scores for this chunk start at
            /// `scores` (a head's `stride` after the previous head's), and whose outputs
            /// start at `out` (`hd` apart).
            struct ValueHeads {
                off: usize,
                scores: *const f32,
                stride: usize,
                out: *mut f32,
                hd: usize,
            }

            /// Adds one chunk's `n` values, weighted by the heads' scores, to `HB` heads'
            /// outputs of `NC` registers each, held in registers for the chunk.
            ///
            /// # Safety
            /// `v[..n]` must hold `off + NC · L` floats each; the scores `n` each, the outputs
            /// `NC · L` each.
            #[inline(always)]
            unsafe fn values<const NC: usize, const HB: usize>(
                v: &[*const f32; 16],
                n: usize,
                at: &ValueHeads,
            ) {
                // SAFETY: the caller's bounds.
                unsafe {
                    let mut acc = [[S::zero(); NC]; HB];
                    for (b, acc) in acc.iter_mut().enumerate() {
                        for (d, a) in acc.iter_mut().enumerate() {
                            *a = S::load(at.out.add(b * at.hd + L * d));
                        }
                    }
                    for (j, vp) in v.iter().enumerate().take(n) {
                        let p: [_; HB] =
                            std::array::from_fn(|b| S::splat(*at.scores.add(b * at.stride + j)));
                        for d in 0..NC {
                            let x = S::load(vp.add(at.off + L * d));
                            for (acc, p) in acc.iter_mut().zip(&p) {
                                acc[d] = S::fma(*p, x, acc[d]);
                            }
                        }
                    }
                    for (b, acc) in acc.iter().enumerate() {
                        for (d, a) in acc.iter().enumerate() {
                            S::store(at.out.add(b * at.hd + L * d), *a);
                        }
                    }
                }
            }

            /// Whether this copy takes head size `hd`: whole registers, 1 to 16 of them.
            pub(in crate::backend::cpu::attention) fn supports(hd: usize) -> bool {
                hd.is_multiple_of(L) && (L..=16 * L).contains(&hd)
            }

            /// `o[n] = softmax(q[n] · Kᵀ · scale) · V` for every head of `h`.
            ///
            /// # Safety
            /// The CPU must have the instruction set, and `supports(hd)` must hold.
            #[target_feature(enable = $features)]
            pub(in crate::backend::cpu::attention) unsafe fn heads<E: KvElem>(
                h: &Heads<'_, E>,
                hd: usize,
                s: &mut Scratch,
                o: &mut [f32],
            ) {
                // SAFETY: the caller's guarantees are the kernel's.
                unsafe {
                    match hd / L {
                        1 => heads_nc::<E, 1>(h, s, o),
                        2 => heads_nc::<E, 2>(h, s, o),
                        3 => heads_nc::<E, 3>(h, s, o),
                        4 => heads_nc::<E, 4>(h, s, o),
                        5 => heads_nc::<E, 5>(h, s, o),
                        6 => heads_nc::<E, 6>(h, s, o),
                        7 => heads_nc::<E, 7>(h, s, o),
                        8 => heads_nc::<E, 8>(h, s, o),
                        9 => heads_nc::<E, 9>(h, s, o),
                        10 => heads_nc::<E, 10>(h, s, o),
                        11 => heads_nc::<E, 11>(h, s, o),
                        12 => heads_nc::<E, 12>(h, s, o),
                        13 => heads_nc::<E, 13>(h, s, o),
                        14 => heads_nc::<E, 14>(h, s, o),
                        15 => heads_nc::<E, 15>(h, s, o),
                        _ => heads_nc::<E, 16>(h, s, o),
                    }
                }
            }

            /// [`heads`] for head size `L · NC`.
            #[target_feature(enable = $features)]
            unsafe fn heads_nc<E: KvElem, const NC: usize>(
                h: &Heads<'_, E>,
                s: &mut Scratch,
                o: &mut [f32],
            ) {
                // SAFETY (whole body): every key row offset plus the heads' width lies inside
                // both caches (asserted below, in elements of `E`), queries and outputs hold
                // `tokens · nh · hd` floats, scores `tokens · nh · stride`.
                unsafe {
                    let hd = L * NC;
                    let nt = h.tokens.max(1);
                    let nh = o.len() / hd / nt;
                    if nh == 0 {
                        return;
                    }
                    // The keys of the last token, whose range holds every other token's.
                    s.rows.clear();
                    s.rows.extend(
                        rows(h.blocks, h.block_size, h.lo, h.pos + nt - 1)
                            .map(|r| r * h.kv_dim + h.col),
                    );
                    // Every head reads `hd` floats at its group's column of each row: the
                    // bounds the raw loads below rely on, checked once per task.
                    let width = (nh - 1) / h.group * hd + hd;
                    assert!(
                        s.rows
                            .iter()
                            .all(|&r| r + width <= h.k_cache.len() && r + width <= h.v_cache.len()),
                        "attention reads past the KV cache"
                    );
                    // Token i sees the first `len(i)` keys; its heads' scores are rows of
                    // `stride` floats, token after token.
                    let len = |i: usize| h.pos + i + 1 - h.lo;
                    let stride = s.rows.len().next_multiple_of(L);
                    s.scores.clear();
                    s.scores.resize(nt * nh * stride, 0.0);
                    if E::DTYPE != KvDtype::F32 {
                        s.chunk.resize(L * width, 0.0);
                    }
                    let scale = S::splat(h.scale);
                    let neg_inf = S::splat(f32::NEG_INFINITY);

                    // Scores, chunk after chunk of keys: a chunk's rows (16 KiB for 16 keys
                    // of 4 kv heads of 64) stay in L1 while every head of every token reads
                    // them. A token takes the keys of a chunk it sees, as it would alone.
                    for (c, chunk) in s.rows.chunks(L).enumerate() {
                        let k = chunk_rows(h.k_cache, chunk, width, &mut s.chunk);
                        for i in 0..nt {
                            let seen = len(i).saturating_sub(L * c).min(chunk.len());
                            if seen == 0 {
                                continue;
                            }
                            for n in 0..nh {
                                let off = n / h.group * hd;
                                let q = h.q.as_ptr().add((i * nh + n) * hd);
                                let mut acc = [S::zero(); 16];
                                for d in 0..NC {
                                    let qd = S::load(q.add(L * d));
                                    for (a, kp) in acc.iter_mut().zip(&k).take(L) {
                                        *a = S::fma(qd, S::load(kp.add(off + L * d)), *a);
                                    }
                                }
                                let sc = S::mul(S::transpose_sum(&acc), scale);
                                let sc = S::first(seen, sc, neg_inf);
                                let row = s.scores.as_mut_ptr().add((i * nh + n) * stride);
                                S::store(row.add(L * c), sc);
                            }
                        }
                    }

                    // Softmax numerators in place, and each head's reciprocal sum.
                    s.inv.clear();
                    s.inv.resize(nt * nh, 0.0);
                    for (r, inv) in s.inv.iter_mut().enumerate() {
                        let len = len(r / nh);
                        let padded = len.next_multiple_of(L);
                        let row = s.scores.as_mut_ptr().add(r * stride);
                        let mut m = neg_inf;
                        for c in (0..padded).step_by(L) {
                            m = S::max(m, S::load(row.add(c)));
                        }
                        let m = S::splat(S::reduce_max(m));
                        let mut sum = S::zero();
                        for c in (0..padded).step_by(L) {
                            let e = S::exp(S::sub(S::load(row.add(c)), m));
                            let e = S::first(len - c, e, S::zero());
                            S::store(row.add(c), e);
                            sum = S::add(sum, e);
                        }
                        *inv = 1.0 / S::reduce_add(sum);
                    }

                    // The values, chunk after chunk as the keys, into outputs held in
                    // registers for the chunk; divided by the sums at the end.
                    o.fill(0.0);
                    // Heads of one kv group read the same value rows: `hb` of them at once
                    // load each row once and keep `hb · NC` independent accumulator chains
                    // in flight, where one head alone waits on its NC chains (an FMA's
                    // latency per key). Each head still adds its keys in the same order.
                    let hb = heads_at_once(NC, h.group, nh);
                    for (c, chunk) in s.rows.chunks(L).enumerate() {
                        let v = chunk_rows(h.v_cache, chunk, width, &mut s.chunk);
                        for i in 0..nt {
                            let seen = len(i).saturating_sub(L * c).min(chunk.len());
                            if seen == 0 {
                                continue;
                            }
                            let p = s.scores.as_ptr().add(i * nh * stride + L * c);
                            let o = o.as_mut_ptr().add(i * nh * hd);
                            for n in (0..nh).step_by(hb) {
                                let at = ValueHeads {
                                    off: n / h.group * hd,
                                    scores: p.add(n * stride),
                                    stride,
                                    out: o.add(n * hd),
                                    hd,
                                };
                                match hb {
                                    4 => values::<NC, 4>(&v, seen, &at),
                                    2 => values::<NC, 2>(&v, seen, &at),
                                    _ => values::<NC, 1>(&v, seen, &at),
                                }
                            }
                        }
                    }
                    for (r, &inv) in s.inv.iter().enumerate() {
                        let inv = S::splat(inv);
                        let out = o.as_mut_ptr().add(r * hd);
                        for d in 0..NC {
                            S::store(out.add(L * d), S::mul(S::load(out.add(L * d)), inv));
                        }
                    }
                }
            }
        }
    };
}

kernel!(avx512, crate::backend::cpu::simd::Avx512, "avx512f", 32);
kernel!(avx2, crate::backend::cpu::simd::Avx2, "avx2,fma", 16);
