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
/// whole chunks of keys), the offsets of the keys' cache rows in position order, and each
/// head's reciprocal softmax sum.
#[derive(Default)]
pub(super) struct Scratch {
    scores: Vec<f32>,
    rows: Vec<usize>,
    inv: Vec<f32>,
}

/// Pointers to the cache rows of a chunk's keys (`offsets` into `cache`); a chunk of fewer
/// keys than the array repeats its first row, whose scores are masked out.
#[inline(always)]
fn key_ptrs(cache: &[f32], offsets: &[usize]) -> [*const f32; 16] {
    let first = cache[offsets[0]..].as_ptr();
    let mut p = [first; 16];
    for (p, &off) in p.iter_mut().zip(offsets) {
        *p = cache[off..].as_ptr();
    }
    p
}

/// Stamps out the kernel for one instruction set: `heads` picks the copy for the head size,
/// `heads_nc::<NC>` is the kernel for heads of `NC` registers.
macro_rules! kernel {
    ($module:ident, $S:ty, $features:literal) => {
        pub(super) mod $module {
            use super::{key_ptrs, Scratch};
            use crate::backend::cpu::attention::{rows, Heads};
            use crate::backend::cpu::simd::Simd;
            type S = $S;
            const L: usize = <S as Simd>::LANES;

            /// Whether this copy takes head size `hd`: whole registers, 1 to 16 of them.
            pub(in crate::backend::cpu::attention) fn supports(hd: usize) -> bool {
                hd.is_multiple_of(L) && (L..=16 * L).contains(&hd)
            }

            /// `o[n] = softmax(q[n] · Kᵀ · scale) · V` for every head of `h`.
            ///
            /// # Safety
            /// The CPU must have the instruction set, and `supports(hd)` must hold.
            #[target_feature(enable = $features)]
            pub(in crate::backend::cpu::attention) unsafe fn heads(
                h: &Heads<'_>,
                hd: usize,
                s: &mut Scratch,
                o: &mut [f32],
            ) {
                // SAFETY: the caller's guarantees are the kernel's.
                unsafe {
                    match hd / L {
                        1 => heads_nc::<1>(h, s, o),
                        2 => heads_nc::<2>(h, s, o),
                        3 => heads_nc::<3>(h, s, o),
                        4 => heads_nc::<4>(h, s, o),
                        5 => heads_nc::<5>(h, s, o),
                        6 => heads_nc::<6>(h, s, o),
                        7 => heads_nc::<7>(h, s, o),
                        8 => heads_nc::<8>(h, s, o),
                        9 => heads_nc::<9>(h, s, o),
                        10 => heads_nc::<10>(h, s, o),
                        11 => heads_nc::<11>(h, s, o),
                        12 => heads_nc::<12>(h, s, o),
                        13 => heads_nc::<13>(h, s, o),
                        14 => heads_nc::<14>(h, s, o),
                        15 => heads_nc::<15>(h, s, o),
                        _ => heads_nc::<16>(h, s, o),
                    }
                }
            }

            /// [`heads`] for head size `L · NC`.
            #[target_feature(enable = $features)]
            unsafe fn heads_nc<const NC: usize>(h: &Heads<'_>, s: &mut Scratch, o: &mut [f32]) {
                // SAFETY (whole body): every key row offset plus the heads' width lies inside
                // both caches (asserted below), queries and outputs hold `nh · hd` floats,
                // scores `nh · padded`.
                unsafe {
                    let hd = L * NC;
                    let nh = o.len() / hd;
                    if nh == 0 {
                        return;
                    }
                    s.rows.clear();
                    s.rows.extend(
                        rows(h.blocks, h.block_size, h.lo, h.pos).map(|r| r * h.kv_dim + h.col),
                    );
                    let len = s.rows.len();
                    // Every head reads `hd` floats at its group's column of each row: the
                    // bounds the raw loads below rely on, checked once per task.
                    let width = (nh - 1) / h.group * hd + hd;
                    assert!(
                        s.rows
                            .iter()
                            .all(|&r| r + width <= h.k_cache.len() && r + width <= h.v_cache.len()),
                        "attention reads past the KV cache"
                    );
                    let padded = len.next_multiple_of(L);
                    s.scores.clear();
                    s.scores.resize(nh * padded, 0.0);
                    let scale = S::splat(h.scale);
                    let neg_inf = S::splat(f32::NEG_INFINITY);

                    // Scores, chunk after chunk of keys: a chunk's rows (16 KiB for 16 keys
                    // of 4 kv heads of 64) stay in L1 while every head reads them.
                    for (c, chunk) in s.rows.chunks(L).enumerate() {
                        let k = key_ptrs(h.k_cache, chunk);
                        for n in 0..nh {
                            let off = n / h.group * hd;
                            let q = h.q.as_ptr().add(n * hd);
                            let mut acc = [S::zero(); 16];
                            for d in 0..NC {
                                let qd = S::load(q.add(L * d));
                                for (a, kp) in acc.iter_mut().zip(&k).take(L) {
                                    *a = S::fma(qd, S::load(kp.add(off + L * d)), *a);
                                }
                            }
                            let sc = S::mul(S::transpose_sum(&acc), scale);
                            let sc = S::first(chunk.len(), sc, neg_inf);
                            S::store(s.scores.as_mut_ptr().add(n * padded + L * c), sc);
                        }
                    }

                    // Softmax numerators in place, and each head's reciprocal sum.
                    s.inv.clear();
                    s.inv.resize(nh, 0.0);
                    for (n, inv) in s.inv.iter_mut().enumerate() {
                        let row = s.scores.as_mut_ptr().add(n * padded);
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
                    for (c, chunk) in s.rows.chunks(L).enumerate() {
                        let v = key_ptrs(h.v_cache, chunk);
                        for n in 0..nh {
                            let off = n / h.group * hd;
                            let out = o.as_mut_ptr().add(n * hd);
                            let mut acc = [S::zero(); NC];
                            for (d, a) in acc.iter_mut().enumerate() {
                                *a = S::load(out.add(L * d));
                            }
                            let p = s.scores.as_ptr().add(n * padded + L * c);
                            for (j, vp) in v.iter().enumerate().take(chunk.len()) {
                                let pj = S::splat(*p.add(j));
                                for (d, a) in acc.iter_mut().enumerate() {
                                    *a = S::fma(pj, S::load(vp.add(off + L * d)), *a);
                                }
                            }
                            for (d, a) in acc.iter().enumerate() {
                                S::store(out.add(L * d), *a);
                            }
                        }
                    }
                    for (n, &r) in s.inv.iter().enumerate() {
                        let r = S::splat(r);
                        let out = o.as_mut_ptr().add(n * hd);
                        for d in 0..NC {
                            S::store(out.add(L * d), S::mul(S::load(out.add(L * d)), r));
                        }
                    }
                }
            }
        }
    };
}

kernel!(avx512, crate::backend::cpu::simd::Avx512, "avx512f");
kernel!(avx2, crate::backend::cpu::simd::Avx2, "avx2,fma");
