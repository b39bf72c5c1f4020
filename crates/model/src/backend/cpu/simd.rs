//! The register operations the CPU's vector kernels are written in (`Simd`), on AVX-512F and
//! AVX2+FMA: a kernel written once over them and stamped out per instruction set
//! (`attention/simd.rs`, `ops::silu_mul`).

use std::arch::x86_64::*;

/// The register operations the vector kernels are written in. Every method is `unsafe`: it
/// must run on a CPU with the instruction set (inlined into a `#[target_feature]` function
/// that enables it), and the loads and stores read and write `LANES` floats.
pub(crate) trait Simd {
    /// f32 lanes in a register: also the keys in a chunk.
    const LANES: usize;
    type V: Copy;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    /// `LANES` bf16 (as their bit patterns) widened to f32, exactly.
    unsafe fn load_bf16(p: *const u16) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a · b + c`, rounded once.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `v` in the first `n` lanes, `fill` in the rest.
    unsafe fn first(n: usize, v: Self::V, fill: Self::V) -> Self::V;
    unsafe fn reduce_max(v: Self::V) -> f32;
    unsafe fn reduce_add(v: Self::V) -> f32;
    /// Lane `j` of the result is the sum of `a[j]`'s lanes (the first `LANES` of `a`).
    unsafe fn transpose_sum(a: &[Self::V; 16]) -> Self::V;
    /// `eˣ` to about 1 ulp for `x` in [−87.3, 88.3]: 0 or subnormal below, `e^88.3` above.
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
/// The largest `x` whose `eˣ` the exponent field holds (`n` ≤ 127).
const EXP_CEIL: f32 = 88.376_26;

pub(crate) struct Avx512;

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
    unsafe fn load_bf16(p: *const u16) -> __m512 {
        unsafe {
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
        }
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
    unsafe fn div(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_div_ps(a, b) }
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
            let x = _mm512_min_ps(
                _mm512_max_ps(x, _mm512_set1_ps(EXP_FLOOR)),
                _mm512_set1_ps(EXP_CEIL),
            );
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

pub(crate) struct Avx2;

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
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        unsafe {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
        }
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
    unsafe fn div(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_div_ps(a, b) }
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
            let x = _mm256_min_ps(
                _mm256_max_ps(x, _mm256_set1_ps(EXP_FLOOR)),
                _mm256_set1_ps(EXP_CEIL),
            );
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
            // 2ⁿ from its exponent bits: −126 ≤ n ≤ 127 between the floor and the ceiling, so
            // 2ⁿ is normal.
            let pow = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            ));
            _mm256_mul_ps(p, _mm256_castsi256_ps(pow))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp` of each ISA against f64's between the floor and the ceiling, and far below.
    fn check_exp<S: Simd>(exp: unsafe fn(*const f32, *mut f32)) {
        let xs: Vec<f32> = (-87_000..=88_000).map(|i| i as f32 / 1000.0).collect();
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
    fn exp_is_within_two_ulp_of_the_true_one_between_the_floor_and_the_ceiling() {
        if std::arch::is_x86_feature_detected!("avx512f") {
            check_exp::<Avx512>(exp_avx512);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            check_exp::<Avx2>(exp_avx2);
        }
    }
}
