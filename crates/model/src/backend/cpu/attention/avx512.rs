//! [`Heads`](super::Heads) on AVX-512 with fused multiply-adds, for head sizes of 16 to 256
//! in steps of 16 that a const generic fixes at compile time, so that a head's query and
//! output stay in registers.
//!
//! Scores come sixteen keys at a time: each key's products with one head's query sum in a
//! register of their own, and a transposing reduction turns the sixteen registers into one of
//! sixteen scores. The portable kernel instead reduced each dot product on its own, 8 lanes
//! in a fixed order, and took one scalar `exp` per score: on a 2-core Xeon that spent 12-18 ns
//! a head and key (bench_attention, 32 sequences), where reading an f32 cache from memory
//! costs about 8.
//!
//! A head's result depends only on its query, its keys and values: never on the other heads
//! of its task or the other tokens of the step, as the portable kernel's did not.

use super::Heads;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Head sizes this kernel takes.
pub(super) fn supports(hd: usize) -> bool {
    hd.is_multiple_of(16) && (16..=256).contains(&hd)
}

/// A task's scratch, grown to the largest task seen: scores (head after head, each padded to
/// whole chunks of 16), the offsets of the keys' cache rows in position order, and each
/// head's reciprocal softmax sum.
#[derive(Default)]
pub(super) struct Scratch {
    scores: Vec<f32>,
    rows: Vec<usize>,
    inv: Vec<f32>,
}

/// `o[n] = softmax(q[n] · Kᵀ · scale) · V` for every head of `h`.
///
/// # Safety
/// The CPU must have AVX-512F, and `supports(hd)` must hold.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn heads(h: &Heads<'_>, hd: usize, s: &mut Scratch, o: &mut [f32]) {
    // SAFETY: the caller guarantees AVX-512F and a supported head size.
    unsafe {
        match hd / 16 {
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

/// [`heads`] for head size `16 · NC`.
#[target_feature(enable = "avx512f")]
unsafe fn heads_nc<const NC: usize>(h: &Heads<'_>, s: &mut Scratch, o: &mut [f32]) {
    // SAFETY (whole body): every key row offset plus the heads' width lies inside both caches
    // (asserted below), queries and outputs hold `nh · hd` floats, scores `nh · padded`.
    unsafe {
        let hd = 16 * NC;
        let nh = o.len() / hd;
        if nh == 0 {
            return;
        }
        s.rows.clear();
        s.rows
            .extend(super::rows(h.blocks, h.block_size, h.lo, h.pos).map(|r| r * h.kv_dim + h.col));
        let len = s.rows.len();
        // Every head reads `hd` floats at its group's column of each row: the bounds the raw
        // loads below rely on, checked once per task.
        let width = (nh - 1) / h.group * hd + hd;
        assert!(
            s.rows
                .iter()
                .all(|&r| r + width <= h.k_cache.len() && r + width <= h.v_cache.len()),
            "attention reads past the KV cache"
        );
        let padded = len.next_multiple_of(16);
        s.scores.clear();
        s.scores.resize(nh * padded, 0.0);
        let scale = _mm512_set1_ps(h.scale);
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);

        // Scores, chunk after chunk of keys: a chunk's rows (16 KiB for 16 query heads over 4 kv
        // heads of 64) stay in L1 while every head reads them.
        for (c, chunk) in s.rows.chunks(16).enumerate() {
            let k = key_ptrs(h.k_cache, chunk);
            let valid: __mmask16 = if chunk.len() == 16 {
                0xffff
            } else {
                (1u16 << chunk.len()) - 1
            };
            for n in 0..nh {
                let off = n / h.group * hd;
                let q = h.q.as_ptr().add(n * hd);
                let mut acc = [_mm512_setzero_ps(); 16];
                for d in 0..NC {
                    let qd = _mm512_loadu_ps(q.add(16 * d));
                    for (a, kp) in acc.iter_mut().zip(&k) {
                        *a = _mm512_fmadd_ps(qd, _mm512_loadu_ps(kp.add(off + 16 * d)), *a);
                    }
                }
                let sc = _mm512_mul_ps(transpose_sum(&acc), scale);
                let sc = _mm512_mask_blend_ps(valid, neg_inf, sc);
                _mm512_storeu_ps(s.scores.as_mut_ptr().add(n * padded + 16 * c), sc);
            }
        }

        // Softmax numerators in place, then the values they weigh.
        s.inv.clear();
        s.inv.resize(nh, 0.0);
        softmax(&mut s.scores, padded, len, &mut s.inv);
        weighted_values::<NC>(h, s, o, padded);
    }
}

/// Each head's scores (`padded` apart, `len` valid) become `exp(score − max)`; `inv[n]` gets
/// the reciprocal of head `n`'s sum (one entry per head).
#[target_feature(enable = "avx512f")]
unsafe fn softmax(scores: &mut [f32], padded: usize, len: usize, inv: &mut [f32]) {
    // SAFETY (whole body): `scores` holds `inv.len()` rows of `padded` floats.
    unsafe {
        for (n, inv) in inv.iter_mut().enumerate() {
            let row = scores.as_mut_ptr().add(n * padded);
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for c in (0..padded).step_by(16) {
                m = _mm512_max_ps(m, _mm512_loadu_ps(row.add(c)));
            }
            let m = _mm512_set1_ps(_mm512_reduce_max_ps(m));
            let mut sum = _mm512_setzero_ps();
            for c in (0..padded).step_by(16) {
                let valid: __mmask16 = if c + 16 <= len {
                    0xffff
                } else {
                    (1u16 << (len - c)) - 1
                };
                let e =
                    _mm512_maskz_mov_ps(valid, exp(_mm512_sub_ps(_mm512_loadu_ps(row.add(c)), m)));
                _mm512_storeu_ps(row.add(c), e);
                sum = _mm512_add_ps(sum, e);
            }
            *inv = 1.0 / _mm512_reduce_add_ps(sum);
        }
    }
}

/// `o[n] = Σ p · V / Σ p` for every head, the values read chunk after chunk of keys as the
/// scores were.
#[target_feature(enable = "avx512f")]
unsafe fn weighted_values<const NC: usize>(
    h: &Heads<'_>,
    s: &Scratch,
    o: &mut [f32],
    padded: usize,
) {
    // SAFETY (whole body): rows, scores and outputs as in `heads_nc`, which checked them.
    unsafe {
        let hd = 16 * NC;
        let nh = s.inv.len();
        o.fill(0.0);
        for (c, chunk) in s.rows.chunks(16).enumerate() {
            let v = key_ptrs(h.v_cache, chunk);
            for n in 0..nh {
                let off = n / h.group * hd;
                let out = o.as_mut_ptr().add(n * hd);
                let mut acc = [_mm512_setzero_ps(); NC];
                for (d, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_loadu_ps(out.add(16 * d));
                }
                let p = s.scores.as_ptr().add(n * padded + 16 * c);
                for (j, vp) in v.iter().enumerate().take(chunk.len()) {
                    let pj = _mm512_set1_ps(*p.add(j));
                    for (d, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vp.add(off + 16 * d)), *a);
                    }
                }
                for (d, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(out.add(16 * d), *a);
                }
            }
        }
        for (n, &r) in s.inv.iter().enumerate() {
            let r = _mm512_set1_ps(r);
            let out = o.as_mut_ptr().add(n * hd);
            for d in 0..NC {
                _mm512_storeu_ps(
                    out.add(16 * d),
                    _mm512_mul_ps(_mm512_loadu_ps(out.add(16 * d)), r),
                );
            }
        }
    }
}

/// Pointers to the cache rows of a chunk's keys (`offsets` into `cache`); a chunk of fewer
/// than 16 repeats its first row, whose scores are masked out.
#[inline(always)]
fn key_ptrs(cache: &[f32], offsets: &[usize]) -> [*const f32; 16] {
    let first = cache[offsets[0]..].as_ptr();
    let mut p = [first; 16];
    for (p, &off) in p.iter_mut().zip(offsets) {
        *p = cache[off..].as_ptr();
    }
    p
}

/// Lane `j` of the result is the sum of `a[j]`'s sixteen lanes: three rounds of shuffles and
/// adds, against sixteen separate reductions.
#[inline(always)]
unsafe fn transpose_sum(a: &[__m512; 16]) -> __m512 {
    // SAFETY: register arithmetic only; callers run with AVX-512F.
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

/// `eˣ` for `x ≤ 0` (softmax's shifted scores) to about 1 ulp: `2ⁿ · p(r)` with `n` the
/// nearest integer to `x / ln 2`, `r = x − n · ln 2` in two parts, and Cephes' `expf`
/// polynomial. Below −87.3 the result is 0 or a subnormal, far under a softmax's resolution.
#[inline(always)]
unsafe fn exp(x: __m512) -> __m512 {
    // SAFETY: register arithmetic only; callers run with AVX-512F.
    unsafe {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.336_55));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_2e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let p = _mm512_fmadd_ps(
            p,
            _mm512_mul_ps(r, r),
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        _mm512_scalef_ps(p, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_true_one_down_to_the_floor() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let xs: Vec<f32> = (0..=87_000).map(|i| -(i as f32) / 1000.0).collect();
        for c in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: the CPU has AVX-512F, checked above; both pointers hold 16 floats.
            unsafe { got_exp(c.as_ptr(), got.as_mut_ptr()) };
            for (x, g) in c.iter().zip(got) {
                let want = f64::from(*x).exp();
                let ulp = f64::from(f32::EPSILON) * want;
                assert!(
                    (f64::from(g) - want).abs() <= 2.0 * ulp,
                    "exp({x}) = {g}, want {want}"
                );
            }
        }
        // Far below the floor: zero or a subnormal, never NaN or a large value.
        let mut low = [0f32; 16];
        let x = [-1e4f32; 16];
        // SAFETY: as above.
        unsafe { got_exp(x.as_ptr(), low.as_mut_ptr()) };
        assert!(low.iter().all(|v| (0.0..1e-37).contains(v)), "{low:?}");
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn got_exp(x: *const f32, out: *mut f32) {
        // SAFETY: both pointers hold 16 floats (the caller's arrays).
        unsafe { _mm512_storeu_ps(out, exp(_mm512_loadu_ps(x))) }
    }
}
