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
//! The kernel is written once, as a macro over the [`Simd`] operations, and stamped out per
//! instruction set: a `#[target_feature]` function must not be generic over the set it runs
//! on, or the AVX2 copy could be compiled with AVX-512 instructions.

use std::arch::x86_64::*;

/// A task's scratch, grown to the largest task seen: scores (head after head, each padded to
/// whole chunks of keys), the offsets of the keys' cache rows in position order, and each
/// head's reciprocal softmax sum.
#[derive(Default)]
pub(super) struct Scratch {
    scores: Vec<f32>,
    rows: Vec<usize>,
    inv: Vec<f32>,
}

/// The register operations the kernel is written in. Every method is `unsafe`: it must run on
/// a CPU with the instruction set, and the loads and stores read and write `LANES` floats.
trait Simd {
    /// f32 lanes in a register: also the keys in a chunk.
    const LANES: usize;
    type V: Copy;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a · b + c`, rounded once.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `v` in the first `n` lanes, `fill` in the rest.
    unsafe fn first(n: usize, v: Self::V, fill: Self::V) -> Self::V;
    unsafe fn reduce_max(v: Self::V) -> f32;
    unsafe fn reduce_add(v: Self::V) -> f32;
    /// Lane `j` of the result is the sum of `a[j]`'s lanes (the first `LANES` of `a`).
    unsafe fn transpose_sum(a: &[Self::V; 16]) -> Self::V;
    /// `eˣ` for `x ≤ 0`, to about 1 ulp down to −87.3, 0 or subnormal below.
    unsafe fn exp(x: Self::V) -> Self::V;
}

/// Cephes' `expf` polynomial on `r ∈ [−ln2/2, ln2/2]`, after `1 + r`: the coefficients of
/// `r², r³, …` from the highest, and `ln 2` in two parts.
const EXP_POLY: [f32; 6] = [
    1.987_569_2e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_FLOOR: f32 = -87.336_55;

struct Avx512;

impl Simd for Avx512 {
    const LANES: usize = 16;
    type V = __m512;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        // SAFETY (this impl): callers run with AVX-512F; loads and stores take 16 floats.
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn first(n: usize, v: __m512, fill: __m512) -> __m512 {
        let m: __mmask16 = if n >= 16 { !0 } else { (1u16 << n) - 1 };
        unsafe { _mm512_mask_blend_ps(m, fill, v) }
    }
    #[inline(always)]
    unsafe fn reduce_max(v: __m512) -> f32 {
        unsafe { _mm512_reduce_max_ps(v) }
    }
    #[inline(always)]
    unsafe fn reduce_add(v: __m512) -> f32 {
        unsafe { _mm512_reduce_add_ps(v) }
    }
    #[inline(always)]
    unsafe fn transpose_sum(a: &[__m512; 16]) -> __m512 {
        unsafe {
            // Round 1: pairs of keys; within each 128-bit lane [k0, k1, k0, k1].
            let mut b = [_mm512_setzero_ps(); 8];
            for (i, b) in b.iter_mut().enumerate() {
                let (x, y) = (a[2 * i], a[2 * i + 1]);
                *b = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
            }
            // Round 2: fours of keys; within each 128-bit lane [k0, k1, k2, k3].
            let mut c = [_mm512_setzero_ps(); 4];
            for (i, c) in c.iter_mut().enumerate() {
                let (x, y) = (_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
                *c = _mm512_add_ps(
                    _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                    _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
                );
            }
            // Round 3: across the four 128-bit lanes, keys 4i..4i+3 into lanes 4i..4i+3.
            let e01 = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(c[0], c[1]),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(c[0], c[1]),
            );
            let e23 = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(c[2], c[3]),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(c[2], c[3]),
            );
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(e01, e23),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(e01, e23),
            )
        }
    }
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        unsafe {
            let x = _mm512_max_ps(x, _mm512_set1_ps(EXP_FLOOR));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
            let mut p = _mm512_set1_ps(EXP_POLY[0]);
            for c in &EXP_POLY[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
            }
            let p = _mm512_fmadd_ps(
                p,
                _mm512_mul_ps(r, r),
                _mm512_add_ps(r, _mm512_set1_ps(1.0)),
            );
            _mm512_scalef_ps(p, n)
        }
    }
}

struct Avx2;

impl Simd for Avx2 {
    const LANES: usize = 8;
    type V = __m256;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        // SAFETY (this impl): callers run with AVX2 and FMA; loads and stores take 8 floats.
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn first(n: usize, v: __m256, fill: __m256) -> __m256 {
        unsafe {
            let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), lane);
            _mm256_blendv_ps(fill, v, _mm256_castsi256_ps(keep))
        }
    }
    #[inline(always)]
    unsafe fn reduce_max(v: __m256) -> f32 {
        unsafe {
            let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
        }
    }
    #[inline(always)]
    unsafe fn reduce_add(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
        }
    }
    #[inline(always)]
    unsafe fn transpose_sum(a: &[__m256; 16]) -> __m256 {
        unsafe {
            // Round 1: pairs of keys; within each 128-bit lane [k0, k1, k0, k1].
            let mut b = [_mm256_setzero_ps(); 4];
            for (i, b) in b.iter_mut().enumerate() {
                let (x, y) = (a[2 * i], a[2 * i + 1]);
                *b = _mm256_add_ps(_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y));
            }
            // Round 2: fours of keys; within each 128-bit lane [k0, k1, k2, k3].
            let mut c = [_mm256_setzero_ps(); 2];
            for (i, c) in c.iter_mut().enumerate() {
                let (x, y) = (_mm256_castps_pd(b[2 * i]), _mm256_castps_pd(b[2 * i + 1]));
                *c = _mm256_add_ps(
                    _mm256_castpd_ps(_mm256_unpacklo_pd(x, y)),
                    _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)),
                );
            }
            // Round 3: the two 128-bit lanes, keys 0-3 low and 4-7 high.
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(c[0], c[1]),
                _mm256_permute2f128_ps::<0x31>(c[0], c[1]),
            )
        }
    }
    #[inline(always)]
    unsafe fn exp(x: __m256) -> __m256 {
        unsafe {
            let x = _mm256_max_ps(x, _mm256_set1_ps(EXP_FLOOR));
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
            let mut p = _mm256_set1_ps(EXP_POLY[0]);
            for c in &EXP_POLY[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
            }
            let p = _mm256_fmadd_ps(
                p,
                _mm256_mul_ps(r, r),
                _mm256_add_ps(r, _mm256_set1_ps(1.0)),
            );
            // 2ⁿ from its exponent bits: n ≥ −126 above the floor, so 2ⁿ is normal.
            let pow = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            ));
            _mm256_mul_ps(p, _mm256_castsi256_ps(pow))
        }
    }
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
            use super::{key_ptrs, Scratch, Simd};
            use crate::backend::cpu::attention::{rows, Heads};
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

kernel!(avx512, super::Avx512, "avx512f");
kernel!(avx2, super::Avx2, "avx2,fma");

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp` of each ISA against f64's, from 0 down to the floor, and far below it.
    fn check_exp<S: Simd>(exp: unsafe fn(*const f32, *mut f32)) {
        let xs: Vec<f32> = (0..=87_000).map(|i| -(i as f32) / 1000.0).collect();
        for c in xs.chunks_exact(S::LANES) {
            let mut got = [0f32; 16];
            // SAFETY: the caller checked the CPU; both pointers hold 16 floats.
            unsafe { exp(c.as_ptr(), got.as_mut_ptr()) };
            for (x, g) in c.iter().zip(got) {
                let want = f64::from(*x).exp();
                let ulp = f64::from(f32::EPSILON) * want;
                assert!(
                    (f64::from(g) - want).abs() <= 2.0 * ulp,
                    "exp({x}) = {g}, want {want}"
                );
            }
        }
        let mut low = [0f32; 16];
        let x = [-1e4f32; 16];
        // SAFETY: as above.
        unsafe { exp(x.as_ptr(), low.as_mut_ptr()) };
        assert!(
            low[..S::LANES].iter().all(|v| (0.0..1e-37).contains(v)),
            "{low:?}"
        );
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn exp_avx512(x: *const f32, out: *mut f32) {
        // SAFETY: both pointers hold 16 floats (the test's arrays).
        unsafe { Avx512::store(out, Avx512::exp(Avx512::load(x))) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_avx2(x: *const f32, out: *mut f32) {
        // SAFETY: both pointers hold 16 floats (the test's arrays).
        unsafe { Avx2::store(out, Avx2::exp(Avx2::load(x))) }
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_true_one_down_to_the_floor() {
        if std::arch::is_x86_feature_detected!("avx512f") {
            check_exp::<Avx512>(exp_avx512);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            check_exp::<Avx2>(exp_avx2);
        }
    }
}
