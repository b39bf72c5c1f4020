//! AVX-512 dot kernels: 16 f32 lanes, tails as masked loads, weights widened to f32 in
//! registers (exact) and f32 accumulation.
//!
//! bf16 tiles skip the usual widening (a zero-extend and a shift per 16 weights): one 64-byte
//! load of 32 weights gives the even ones by a shift and the odd ones by a mask, against
//! activations whose 32-element blocks were laid out evens first ([`pair_rows`]). That cuts the
//! non-FMA work per weight in half. `vdpbf16ps` (AVX-512 BF16) is not used: on the Xeon this was
//! measured on it retired 1.7 G instructions/s (32 multiply-adds each) against 7.0 G for
//! 512-bit FMAs (16 each), and it would round activations to bf16.
//!
//! Every function here requires avx512f, avx512bw and avx512vl; `kernels::plan_for` hands
//! them out only on such CPUs.

use super::kernels::Lhs;
use crate::weights::Elems;
use std::arch::x86_64::*;

/// How far ahead of its loads the single-row kernel prefetches weights, and into which cache,
/// differs by CPU; `kernels::plan_for` picks one of these per CPU.
///
/// Intel: 4 KiB into L2 (`_MM_HINT_T1`), where the prefetch waits in L2's larger miss queue
/// instead of holding one of L1's few fill buffers; batch-1 decode on a Xeon (hidden 1024, bf16,
/// 2 threads, interleaved runs): 34.8-37.4 tok/s against 31.1-35.6 with 8 KiB into L1, 8-16 KiB
/// into L2 in between, L3 (T2) no better, non-temporal 22 tok/s.
pub const INTEL_AHEAD: usize = 4096;
/// Zen 5: 8 KiB into L1 (`_MM_HINT_T0`), as for the AVX2 kernel; bench_linear at one row on a
/// Zen 5 VM, five interleaved runs each, median GB/s on w1/w2 shapes: 34.0/31.5 against
/// 27.5/30.4 for Intel's choice, 24.7/23.4 at 2 KiB and 29.1/27.9 at 16 KiB into L2.
pub const ZEN5_AHEAD: usize = 8192;
/// Zen 4 and older AMD: 16 KiB into L2. On a Zen 4 VM Zen 5's choice is the slowest there is;
/// bench_linear at one row, 700 MB of weights, GB/s on w1/w2, 2 threads: 31.4-39.4/29.9-34.2 at
/// 8 KiB into L2 against 17.7-19.3/17.8-20.3 into L1 and 31.0-33.8/23.0-33.8 for Intel's 4 KiB;
/// one thread: 20.5-21.5/21.9-23.1 at 8 KiB into L2, 19.0-21.3/21.4-22.5 at 16 KiB, 13.5-15.7/
/// 13.6-14.5 into L1, 18.1-21.6/15.3-18.9 with no prefetch. Whole-model batch-1 decode (2
/// threads, six interleaved rounds) settled between the L2 distances: expert time per layer,
/// median, 1.31 ms at 16 KiB against 1.41 at 8 and 1.49 at 4 (16 KiB ahead in four rounds, one
/// tie), 63.7 against 61.6 and 59.6 tok/s.
pub const ZEN4_AHEAD: usize = 16384;

/// Few tokens, one weight row: dispatches on dtype and token count. Weights are prefetched
/// `AHEAD` bytes ahead into L1 when `L1`, into L2 otherwise (see [`INTEL_AHEAD`]), chosen once
/// per CPU by `kernels::plan_for`.
pub fn dots<const L1: bool, const AHEAD: usize>(
    row: Elems<'_>,
    x: Lhs<'_>,
    n: usize,
    inp: usize,
    acc: &mut [[f32; 4]; 1],
    _ahead: &[u8],
) {
    debug_assert!(x.f32.len() >= n * inp && row.len() == inp);
    debug_assert!((1..=4).contains(&n));
    let acc = &mut acc[0];
    let x = x.f32.as_ptr();
    macro_rules! go {
        ($f:ident, $w:expr) => {{
            let w = $w;
            // SAFETY: `plan_for` hands this kernel out only on CPUs with avx512f/bw/vl; the row
            // holds `inp` elements and x `n * inp`, as asserted above.
            unsafe {
                match n {
                    1 => $f::<1, 4, L1, AHEAD>(w, x, inp, acc),
                    2 => $f::<2, 2, L1, AHEAD>(w, x, inp, acc),
                    3 => $f::<3, 2, L1, AHEAD>(w, x, inp, acc),
                    _ => $f::<4, 2, L1, AHEAD>(w, x, inp, acc),
                }
            }
        }};
    }
    match row {
        Elems::BF16(w) => go!(dots_bf16, w.as_ptr().cast::<u16>()),
        Elems::F16(w) => go!(dots_f16, w.as_ptr().cast::<u16>()),
        Elems::F32(w) => go!(dots_f32, w.as_ptr()),
        Elems::Q8_0(_) | Elems::Q4_0(_) => unreachable!("quantized weights take quant.rs"),
    }
}

/// One token against consecutive weight rows, `y[j] = row_j · x` for the `y.len()` rows of
/// `rows`: [`dots`]' arithmetic for one token, in one call per block of rows rather than one
/// per row.
pub fn span<const L1: bool, const AHEAD: usize>(
    rows: Elems<'_>,
    x: &[f32],
    inp: usize,
    y: &mut [f32],
) {
    debug_assert!(x.len() >= inp && rows.len() == y.len() * inp);
    let x = x.as_ptr();
    // SAFETY: as in `dots`; the weights hold `y.len()` rows of `inp` elements.
    unsafe {
        match rows {
            Elems::BF16(w) => span_bf16::<L1, AHEAD>(w.as_ptr().cast(), x, inp, y),
            Elems::F16(w) => span_f16::<L1, AHEAD>(w.as_ptr().cast(), x, inp, y),
            Elems::F32(w) => span_f32::<L1, AHEAD>(w.as_ptr(), x, inp, y),
            Elems::Q8_0(_) | Elems::Q4_0(_) => unreachable!("quantized weights take quant.rs"),
        }
    }
}

/// R adjacent weight rows against up to four tokens, weights widened to f32.
pub fn tile<const R: usize>(
    rows: Elems<'_>,
    x: Lhs<'_>,
    n: usize,
    inp: usize,
    acc: &mut [[f32; 4]; R],
    ahead: &[u8],
) {
    debug_assert!(x.f32.len() >= n * inp && rows.len() == R * inp);
    debug_assert!((1..=4).contains(&n));
    let x = x.f32.as_ptr();
    macro_rules! go {
        ($f:ident, $w:expr) => {{
            let w = $w;
            // SAFETY: as in `dots`; `w` covers R rows of `inp` elements.
            unsafe { with_tokens!(n, $f::<R>(w, x, inp, acc, ahead)) }
        }};
    }
    match rows {
        Elems::BF16(w) => go!(tile_bf16, w.as_ptr().cast::<u16>()),
        Elems::F16(w) => go!(tile_f16, w.as_ptr().cast::<u16>()),
        Elems::F32(w) => go!(tile_f32, w.as_ptr()),
        Elems::Q8_0(_) | Elems::Q4_0(_) => unreachable!("quantized weights take quant.rs"),
    }
}

/// R adjacent bf16 weight rows against up to four tokens' paired activations
/// ([`pair_rows`]). Other dtypes go to [`tile`].
pub fn pair_tile<const R: usize>(
    rows: Elems<'_>,
    x: Lhs<'_>,
    n: usize,
    inp: usize,
    acc: &mut [[f32; 4]; R],
    ahead: &[u8],
) {
    let Elems::BF16(w) = rows else {
        return tile::<R>(rows, x, n, inp, acc, ahead);
    };
    debug_assert!(x.pairs.len() >= n * inp && w.len() == R * inp);
    debug_assert!((1..=4).contains(&n));
    let (w, xp) = (w.as_ptr().cast::<u16>(), x.pairs.as_ptr());
    // SAFETY: `plan_for` hands this kernel out only on CPUs with avx512f/bw/vl, with the
    // paired rows made; `w` covers R rows of `inp` and `xp` n rows of `inp`.
    unsafe { with_tokens!(n, pair_bf16::<R>(w, xp, inp, acc, ahead)) }
}

/// R adjacent bf16 weight rows against up to four tokens' activations rounded to bf16
/// ([`Lhs::bf16`], see `kernels::bf16_activations`) through `vdpbf16ps`, f32 accumulation.
/// Other dtypes go to [`tile`].
pub fn dp_tile<const R: usize>(
    rows: Elems<'_>,
    x: Lhs<'_>,
    n: usize,
    inp: usize,
    acc: &mut [[f32; 4]; R],
    ahead: &[u8],
) {
    // Without rounded rows (a caller that did not make them) the f32 tile computes instead.
    let Elems::BF16(w) = rows else {
        return tile::<R>(rows, x, n, inp, acc, ahead);
    };
    if x.bf16.len() < n * inp {
        return tile::<R>(rows, x, n, inp, acc, ahead);
    }
    debug_assert!(w.len() == R * inp && (1..=4).contains(&n));
    let (w, xb) = (w.as_ptr().cast::<u16>(), x.bf16.as_ptr());
    // SAFETY: `plan_with` hands this kernel out only on CPUs with avx512f/bw/vl and
    // avx512bf16; `w` covers R rows of `inp` and `xb` n rows, checked above.
    unsafe { with_tokens!(n, dp_bf16::<R>(w, xb, inp, acc)) }
}

/// R rows × N tokens, one chain per (row, token), 32 elements a step (the tail under a mask);
/// it prefetches its own rows rather than the next tile.
// Indices, not iterators: (row, token) address the accumulators in register-tile order.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn dp_bf16<const R: usize, const N: usize>(
    w: *const u16,
    x: *const u16,
    inp: usize,
    acc: &mut [[f32; 4]; R],
) {
    // SAFETY (whole body): lanes outside each step's mask are neither read nor fault, the rest
    // lie inside each of the R rows and each token's row of x. Prefetches cannot fault.
    unsafe {
        let mut a = [[_mm512_setzero_ps(); N]; R];
        let mut k = 0;
        while k < inp {
            let rem = inp - k;
            let m: __mmask32 = if rem >= 32 { !0 } else { (1u32 << rem) - 1 };
            let mut wv = [_mm512_setzero_si512(); R];
            for d in 0..R {
                wv[d] = _mm512_maskz_loadu_epi16(m, w.add(d * inp + k).cast());
            }
            // Each row 16 KiB ahead into L2, as the single-row kernel on Zen 4: on a Zen 4
            // VM this kept 8-row tiles at 19-30 GB/s where the next tile's lines into L1 (the
            // f32 tiles' `ahead`) gave 13-17.
            for d in 0..R {
                let p = w.add(d * inp + k).cast::<u8>().wrapping_add(16384);
                _mm_prefetch::<_MM_HINT_T1>(p.cast());
            }
            for t in 0..N {
                let xv: __m512bh =
                    std::mem::transmute(_mm512_maskz_loadu_epi16(m, x.add(t * inp + k).cast()));
                for d in 0..R {
                    let wd: __m512bh = std::mem::transmute(wv[d]);
                    a[d][t] = _mm512_dpbf16_ps(a[d][t], wd, xv);
                }
            }
            k += 32;
        }
        for d in 0..R {
            for t in 0..N {
                acc[d][t] = _mm512_reduce_add_ps(a[d][t]);
            }
        }
    }
}

/// `out[i] = bf16(x[i])`, rounding to nearest even (as `half::bf16::from_f32`).
///
/// # Safety
/// The CPU must have avx512f, avx512bw, avx512vl and avx512bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn round_bf16(x: &[f32], out: &mut [u16]) {
    debug_assert_eq!(x.len(), out.len());
    let mut k = 0;
    // SAFETY: every load and store lies within x and out (the tail under a mask).
    unsafe {
        while k < x.len() {
            let m = mask16(x.len() - k);
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(k));
            let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_mask_storeu_epi16(out.as_mut_ptr().add(k).cast(), m, b);
            k += 16;
        }
    }
}

/// Writes `x`'s rows of `inp` into `out` with each full 32-element block reordered as its 16
/// even elements then its 16 odd ones (the tail stays in order): the input of [`pair_tile`].
///
/// # Safety
/// The CPU must have avx512f, avx512bw and avx512vl.
pub unsafe fn pair_rows(x: &[f32], inp: usize, out: &mut [f32]) {
    debug_assert_eq!(out.len(), x.len());
    debug_assert_eq!(x.len() % inp.max(1), 0);
    for (xr, or) in x.chunks_exact(inp).zip(out.chunks_exact_mut(inp)) {
        // SAFETY: the caller vouches for the CPU; both rows hold `inp` elements.
        unsafe { pair_row(xr.as_ptr(), or.as_mut_ptr(), inp) };
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pair_row(x: *const f32, out: *mut f32, inp: usize) {
    let main = inp / 32 * 32;
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
    let mut k = 0;
    // SAFETY: full blocks end at `main <= inp`; the tail's masked lanes are not touched.
    unsafe {
        while k < main {
            let (lo, hi) = (_mm512_loadu_ps(x.add(k)), _mm512_loadu_ps(x.add(k + 16)));
            _mm512_storeu_ps(out.add(k), _mm512_permutex2var_ps(lo, evens, hi));
            _mm512_storeu_ps(out.add(k + 16), _mm512_permutex2var_ps(lo, odds, hi));
            k += 32;
        }
        while k < inp {
            let m = mask16(inp - k);
            _mm512_mask_storeu_ps(out.add(k), m, _mm512_maskz_loadu_ps(m, x.add(k)));
            k += 16;
        }
    }
}

/// The first `rem` of 16 lanes (all from 16 on).
#[inline]
fn mask16(rem: usize) -> __mmask16 {
    if rem >= 16 {
        0xFFFF
    } else {
        ((1u32 << rem) - 1) as __mmask16
    }
}

// Loaders: the 16 weights at element k widened to f32, lanes off in `m` zero (and not read).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn load_bf16(w: *const u16, k: usize, m: __mmask16) -> __m512 {
    // bf16 → f32 is a 16-bit left shift of the bit pattern: exact.
    // SAFETY: the caller keeps the lanes in `m` within the row.
    unsafe {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_maskz_loadu_epi16(m, w.add(k).cast()),
        )))
    }
}
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn load_f16(w: *const u16, k: usize, m: __mmask16) -> __m512 {
    // SAFETY: the caller keeps the lanes in `m` within the row.
    unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w.add(k).cast())) }
}
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn load_f32(w: *const f32, k: usize, m: __mmask16) -> __m512 {
    // SAFETY: the caller keeps the lanes in `m` within the row.
    unsafe { _mm512_maskz_loadu_ps(m, w.add(k)) }
}

/// One weight row × N tokens with U chains per token (four for one token hide the FMA
/// latency; a step is 16·U elements, the tail goes 16 at a time into chain 0), prefetching
/// `AHEAD` bytes ahead into L1 or L2 by `L1`.
macro_rules! dots_kernel {
    ($name:ident, $span:ident, $wty:ty, $load:ident) => {
        /// Consecutive rows against one token.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn $span<const L1: bool, const AHEAD: usize>(
            w: *const $wty,
            x: *const f32,
            inp: usize,
            y: &mut [f32],
        ) {
            let mut acc = [0f32; 4];
            for (j, out) in y.iter_mut().enumerate() {
                // SAFETY: the caller's weights hold y.len() rows of `inp` elements.
                unsafe { $name::<1, 4, L1, AHEAD>(w.add(j * inp), x, inp, &mut acc) };
                *out = acc[0];
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        #[inline]
        unsafe fn $name<const N: usize, const U: usize, const L1: bool, const AHEAD: usize>(
            w: *const $wty,
            x: *const f32,
            inp: usize,
            acc: &mut [f32; 4],
        ) {
            const SIZE: usize = std::mem::size_of::<$wty>();
            let lines = (16 * U * SIZE).div_ceil(64);
            let step = 16 * U;
            let main = inp / step * step;
            // SAFETY (whole body): full steps end at `main <= inp`; the tail's masked lanes are
            // neither read nor fault. Prefetches are hints and cannot fault.
            unsafe {
                let mut a = [[_mm512_setzero_ps(); U]; N];
                let mut k = 0;
                while k < main {
                    let p = w.cast::<u8>().wrapping_add(k * SIZE + AHEAD);
                    for l in 0..lines {
                        let line = p.wrapping_add(l * 64).cast();
                        if L1 {
                            _mm_prefetch::<_MM_HINT_T0>(line);
                        } else {
                            _mm_prefetch::<_MM_HINT_T1>(line);
                        }
                    }
                    for u in 0..U {
                        let v = $load(w, k + 16 * u, 0xFFFF);
                        for t in 0..N {
                            let xv = _mm512_loadu_ps(x.add(t * inp + k + 16 * u));
                            a[t][u] = _mm512_fmadd_ps(v, xv, a[t][u]);
                        }
                    }
                    k += step;
                }
                while k < inp {
                    let m = mask16(inp - k);
                    let v = $load(w, k, m);
                    for t in 0..N {
                        let xv = _mm512_maskz_loadu_ps(m, x.add(t * inp + k));
                        a[t][0] = _mm512_fmadd_ps(v, xv, a[t][0]);
                    }
                    k += 16;
                }
                for t in 0..N {
                    let mut s = a[t][0];
                    for u in 1..U {
                        s = _mm512_add_ps(s, a[t][u]);
                    }
                    acc[t] = _mm512_reduce_add_ps(s);
                }
            }
        }
    };
}

/// R rows × N tokens, one 16-wide chain per (row, token), whatever R: a row's result does not
/// depend on its tile. `ahead` is prefetched two lines per 16-element step.
macro_rules! tile_kernel {
    ($name:ident, $wty:ty, $load:ident) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn $name<const R: usize, const N: usize>(
            w: *const $wty,
            x: *const f32,
            inp: usize,
            acc: &mut [[f32; 4]; R],
            ahead: &[u8],
        ) {
            let (mut pf, pf_end) = (ahead.as_ptr(), ahead.as_ptr().wrapping_add(ahead.len()));
            // SAFETY (whole body): lanes outside `m` are neither read nor fault, the rest lie
            // inside each of the R rows and each token's slice of x.
            unsafe {
                let mut a = [[_mm512_setzero_ps(); N]; R];
                let mut k = 0;
                while k < inp {
                    let m = mask16(inp - k);
                    let mut v = [_mm512_setzero_ps(); R];
                    for (d, vd) in v.iter_mut().enumerate() {
                        *vd = $load(w.add(d * inp), k, m);
                    }
                    if pf < pf_end {
                        // Hints only: they cannot fault, and pf stays within `ahead`.
                        _mm_prefetch::<_MM_HINT_T0>(pf.cast());
                        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64).cast());
                        pf = pf.wrapping_add(128);
                    }
                    for t in 0..N {
                        let xv = _mm512_maskz_loadu_ps(m, x.add(t * inp + k));
                        for d in 0..R {
                            a[d][t] = _mm512_fmadd_ps(v[d], xv, a[d][t]);
                        }
                    }
                    k += 16;
                }
                for d in 0..R {
                    for t in 0..N {
                        acc[d][t] = _mm512_reduce_add_ps(a[d][t]);
                    }
                }
            }
        }
    };
}

dots_kernel!(dots_bf16, span_bf16, u16, load_bf16);
dots_kernel!(dots_f16, span_f16, u16, load_f16);
dots_kernel!(dots_f32, span_f32, f32, load_f32);
tile_kernel!(tile_bf16, u16, load_bf16);
tile_kernel!(tile_f16, u16, load_f16);
tile_kernel!(tile_f32, f32, load_f32);

/// R bf16 rows × N tokens, one 16-wide chain per (row, token) whatever R. Per 32 weights of
/// a row: one load, evens by a shift, odds by a mask, each against its half of the paired
/// block; the tail goes 16 at a time, widened, against the (unpaired) tail of x. `ahead` is
/// prefetched four lines per 32-element step.
// Indices, not iterators: (row, token) address three arrays at once, in register-tile order.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pair_bf16<const R: usize, const N: usize>(
    w: *const u16,
    xp: *const f32,
    inp: usize,
    acc: &mut [[f32; 4]; R],
    ahead: &[u8],
) {
    let (mut pf, pf_end) = (ahead.as_ptr(), ahead.as_ptr().wrapping_add(ahead.len()));
    let main = inp / 32 * 32;
    let odd_mask = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
    // SAFETY (whole body): full steps end at `main <= inp` in each of the R rows and each
    // token's row of xp; lanes outside the tail's mask are neither read nor fault.
    unsafe {
        let mut a = [[_mm512_setzero_ps(); N]; R];
        let mut k = 0;
        while k < main {
            let mut ev = [_mm512_setzero_ps(); R];
            let mut od = [_mm512_setzero_ps(); R];
            for d in 0..R {
                let v = _mm512_loadu_si512(w.add(d * inp + k).cast());
                ev[d] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                od[d] = _mm512_castsi512_ps(_mm512_and_si512(v, odd_mask));
            }
            if pf < pf_end {
                // Hints only: they cannot fault, and pf stays within `ahead`.
                for l in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(l * 64).cast());
                }
                pf = pf.wrapping_add(256);
            }
            for t in 0..N {
                let xe = _mm512_loadu_ps(xp.add(t * inp + k));
                let xo = _mm512_loadu_ps(xp.add(t * inp + k + 16));
                for d in 0..R {
                    a[d][t] = _mm512_fmadd_ps(ev[d], xe, a[d][t]);
                    a[d][t] = _mm512_fmadd_ps(od[d], xo, a[d][t]);
                }
            }
            k += 32;
        }
        while k < inp {
            let m = mask16(inp - k);
            let mut v = [_mm512_setzero_ps(); R];
            for (d, vd) in v.iter_mut().enumerate() {
                *vd = load_bf16(w.add(d * inp), k, m);
            }
            for t in 0..N {
                let xv = _mm512_maskz_loadu_ps(m, xp.add(t * inp + k));
                for d in 0..R {
                    a[d][t] = _mm512_fmadd_ps(v[d], xv, a[d][t]);
                }
            }
            k += 16;
        }
        for d in 0..R {
            for t in 0..N {
                acc[d][t] = _mm512_reduce_add_ps(a[d][t]);
            }
        }
    }
}

/// One token row against one band of a weight in AMX tile order (`tiles.rs`): `y[m] = Σ_k
/// x[k] · w[j + m][k]` for the band's first `n_rows` rows, `x` paired as [`pair_rows`] lays it
/// out. For steps of fewer rows than the AMX kernel serves well: a 32-bf16 tile row is one
/// 512-bit load, widened with a shift (evens) and a mask (odds) against the paired activations.
/// The band is read one tile column at a time (16 accumulators, one per weight row), each
/// column's tiles 4 KiB apart, the tile two input blocks ahead prefetched.
///
/// # Safety
/// The CPU must have AVX-512 F and BW; `band` must hold `kbs` · 4 tiles of 16 × 32 bf16,
/// `x` `kbs` · 32 elements and `y` `n_rows` ≤ 64.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn band_dot(
    band: *const u16,
    kbs: usize,
    x: *const f32,
    y: *mut f32,
    n_rows: usize,
) {
    const TILE: usize = 16 * 32;
    let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    // SAFETY (whole body): every load lies inside the band and x (the caller's contract); a
    // prefetch past the band never faults.
    unsafe {
        for i in 0..n_rows.div_ceil(16) {
            let mut acc = [_mm512_setzero_ps(); 16];
            for b in 0..kbs {
                let t = band.add((b * 4 + i) * TILE);
                let ahead = t.wrapping_add(2 * 4 * TILE).cast::<i8>();
                let (xe, xo) = (
                    _mm512_loadu_ps(x.add(b * 32)),
                    _mm512_loadu_ps(x.add(b * 32 + 16)),
                );
                for (r, a) in acc.iter_mut().enumerate() {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(r * 64));
                    let w = _mm512_loadu_si512(t.add(r * 32).cast());
                    let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w));
                    let odd = _mm512_castsi512_ps(_mm512_and_si512(w, hi));
                    *a = _mm512_fmadd_ps(odd, xo, _mm512_fmadd_ps(even, xe, *a));
                }
            }
            for (r, a) in acc.iter().enumerate().take(n_rows - i * 16) {
                *y.add(i * 16 + r) = _mm512_reduce_add_ps(*a);
            }
        }
    }
}
