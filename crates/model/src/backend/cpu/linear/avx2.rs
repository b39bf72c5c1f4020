//! AVX2 + FMA dot kernels (8 f32 lanes), bf16/f16 widened in registers. Every function here
//! requires avx2, fma and f16c; `kernels::plan_for` hands them out only on such CPUs.

use super::kernels::Lhs;
use crate::weights::Elems;
use std::arch::x86_64::*;

/// Dispatches on dtype; the caller checked avx2+fma+f16c.
pub fn dots(
    row: Elems<'_>,
    x: Lhs<'_>,
    n: usize,
    inp: usize,
    acc: &mut [[f32; 4]; 1],
    _ahead: &[u8],
) {
    let (acc, x) = (&mut acc[0], x.f32);
    debug_assert!(x.len() >= n * inp && row.len() == inp);
    // SAFETY: `plan_for` only returns this kernel when the CPU has avx2, fma and f16c; the
    // pointers cover `inp` elements of the row and `n * inp` of x, as asserted above.
    unsafe {
        match row {
            Elems::BF16(w) => dots_bf16(w.as_ptr().cast(), x.as_ptr(), n, inp, acc),
            Elems::F16(w) => dots_f16(w.as_ptr().cast(), x.as_ptr(), n, inp, acc),
            Elems::F32(w) => dots_f32(w.as_ptr(), x.as_ptr(), n, inp, acc),
            Elems::Q8_0(_) | Elems::Q4_0(_) => unreachable!("quantized weights take quant.rs"),
        }
    }
}

/// One token against consecutive weight rows, `y[j] = row_j · x` for the `y.len()` rows of
/// `rows`: [`dots`]' arithmetic for one token, in one call per block of rows rather than one
/// per row (on a Zen 3 VM batch-1 decode spent ~5 % of its time between the per-row calls).
/// The caller checked avx2+fma+f16c.
pub fn span(rows: Elems<'_>, x: &[f32], inp: usize, y: &mut [f32]) {
    debug_assert!(x.len() >= inp && rows.len() == y.len() * inp);
    // SAFETY: as in `dots`; the weights hold `y.len()` rows of `inp` elements.
    unsafe {
        match rows {
            Elems::BF16(w) => span_bf16(w.as_ptr().cast(), x.as_ptr(), inp, y),
            Elems::F16(w) => span_f16(w.as_ptr().cast(), x.as_ptr(), inp, y),
            Elems::F32(w) => span_f32(w.as_ptr(), x.as_ptr(), inp, y),
            Elems::Q8_0(_) | Elems::Q4_0(_) => unreachable!("quantized weights take quant.rs"),
        }
    }
}

/// R adjacent weight rows (`R * inp` elements) against up to four tokens; the caller
/// checked avx2+fma+f16c. With `AHEAD` 0 the kernel fetches `ahead` (the next tile) paced over
/// its steps; otherwise it streams: each of its rows `AHEAD` bytes on, into L1 where `L1`, L2
/// elsewhere, as the single-row kernels do (see [`Fetch`]). The arithmetic is the same.
pub fn tile_dots<const R: usize, const AHEAD: usize, const L1: bool>(
    rows: Elems<'_>,
    x: Lhs<'_>,
    n: usize,
    inp: usize,
    acc: &mut [[f32; 4]; R],
    ahead: &[u8],
) {
    let x = x.f32;
    debug_assert!(x.len() >= n * inp && rows.len() == R * inp);
    debug_assert!((1..=4).contains(&n));
    macro_rules! go {
        ($f:ident, $w:expr) => {{
            let w = $w;
            // SAFETY: `plan_for` only returns this kernel when the CPU has avx2, fma
            // and f16c; `w` covers R rows of `inp` elements and x covers `n * inp`.
            unsafe { with_tokens!(n, $f::<R, AHEAD, L1>(w, x.as_ptr(), inp, acc, ahead)) }
        }};
    }
    match rows {
        Elems::BF16(w) => go!(tile_bf16, w.as_ptr().cast::<u16>()),
        Elems::F16(w) => go!(tile_f16, w.as_ptr().cast::<u16>()),
        Elems::F32(w) => go!(tile_f32, w.as_ptr()),
        Elems::Q8_0(_) | Elems::Q4_0(_) => unreachable!("quantized weights take quant.rs"),
    }
}

/// R adjacent bf16 weight rows against up to four tokens' paired activations ([`pair_rows`]);
/// other dtypes go to [`tile_dots`]. The caller checked avx2+fma+f16c. `AHEAD` and `L1` as
/// for [`tile_dots`].
pub fn pair_tile<const R: usize, const AHEAD: usize, const L1: bool>(
    rows: Elems<'_>,
    x: Lhs<'_>,
    n: usize,
    inp: usize,
    acc: &mut [[f32; 4]; R],
    ahead: &[u8],
) {
    let Elems::BF16(w) = rows else {
        return tile_dots::<R, AHEAD, L1>(rows, x, n, inp, acc, ahead);
    };
    debug_assert!(x.pairs.len() >= n * inp && w.len() == R * inp);
    debug_assert!((1..=4).contains(&n));
    let (w, xp) = (w.as_ptr().cast::<u16>(), x.pairs.as_ptr());
    // SAFETY: `plan_for` hands this kernel out only on CPUs with avx2, fma and f16c, with the
    // paired rows made; `w` covers R rows of `inp` and `xp` n rows of `inp`.
    unsafe { with_tokens!(n, pair_bf16::<R, AHEAD, L1>(w, xp, inp, acc, ahead)) }
}

/// Prefetches `ahead` one line every few of a loop's steps, so the fetching spreads over the
/// whole loop: a burst of prefetches at its start fills L1's few miss buffers and then leaves
/// the rest of the loop with no memory traffic (bench_linear, 8 rows, 2 threads: 78-85 against
/// 67-75 GFLOP/s).
struct Paced {
    next: *const u8,
    end: *const u8,
    every: usize,
    wait: usize,
}

/// How a tile kernel fetches weights ahead of its loads. Tiles of many token rows are
/// compute-bound and fetch the next tile, paced over their steps ([`Paced`]). With few rows
/// (the deterministic plans run tiles down to one row) a tile is a stream of weights, and the
/// single-row kernels' way pays: each row `AHEAD` bytes on, one line per 64 bytes read. A
/// whole-model batch-1 decode with f32 activations (performance checkpoint, Zen 4) ran at
/// 0.72× the single-row kernel with paced next-tile fetches.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn stream<const AHEAD: usize, const L1: bool, T>(w: *const T, rows: usize, inp: usize, k: usize) {
    let size = std::mem::size_of::<T>();
    // One prefetch per 64 bytes of each row (steps read 32 bytes or fewer).
    if (k * size) % 64 < 32 {
        for d in 0..rows {
            let p = w.cast::<u8>().wrapping_add((d * inp + k) * size + AHEAD);
            // A hint only: it cannot fault, even past the end of the weights.
            if L1 {
                _mm_prefetch::<_MM_HINT_T0>(p.cast());
            } else {
                _mm_prefetch::<_MM_HINT_T1>(p.cast());
            }
        }
    }
}

impl Paced {
    #[inline]
    fn new(ahead: &[u8], steps: usize) -> Paced {
        let range = ahead.as_ptr_range();
        Paced {
            next: range.start,
            end: range.end,
            every: (steps / ahead.len().div_ceil(64).max(1)).max(1),
            wait: 0,
        }
    }

    /// Called once a step.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn step(&mut self) {
        if self.next < self.end {
            if self.wait == 0 {
                // A hint only: it cannot fault, and `next` stays within `ahead`.
                _mm_prefetch::<_MM_HINT_T0>(self.next.cast());
                self.next = self.next.wrapping_add(64);
                self.wait = self.every;
            }
            self.wait -= 1;
        }
    }
}

/// R bf16 rows × N tokens against paired activations: a 256-bit load holds 16 weights, the
/// evens in each 32-bit lane's low half (a shift widens them) and the odds in its high half (a
/// mask does). Half the widening instructions of [`tile_kernel`]'s, whose `vpmovzxwd` and
/// shift share the FMA ports. One chain per (row, token): lane i adds element 2i, then 2i + 1,
/// block after block; the tail goes in order.
// Indices, not iterators: (row, token) address the accumulators in register-tile order.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pair_bf16<const R: usize, const N: usize, const AHEAD: usize, const L1: bool>(
    w: *const u16,
    x: *const f32,
    inp: usize,
    acc: &mut [[f32; 4]; R],
    ahead: &[u8],
) {
    let main = inp / 16 * 16;
    let mut fetch = Paced::new(ahead, main / 16);
    // SAFETY (whole body): k + 16 <= main <= inp keeps every vector load inside each of the R
    // rows and inside each token's row of x; prefetches cannot fault.
    unsafe {
        let odd = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
        // The odds' loads repeat the evens' from a pointer the compiler cannot see is the same:
        // merged, the raw vectors would have to live through the evens' FMAs, and three more
        // registers than AVX2's sixteen spill the accumulators.
        let wo = std::hint::black_box(w);
        let mut a = [[_mm256_setzero_ps(); N]; R];
        let mut k = 0;
        while k < main {
            if AHEAD == 0 {
                fetch.step();
            } else {
                stream::<AHEAD, L1, u16>(w, R, inp, k);
            }
            let mut v = [_mm256_setzero_ps(); R];
            for d in 0..R {
                let raw = _mm256_loadu_si256(w.add(d * inp + k).cast());
                v[d] = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(raw));
            }
            for t in 0..N {
                let xv = _mm256_loadu_ps(x.add(t * inp + k));
                for d in 0..R {
                    a[d][t] = _mm256_fmadd_ps(v[d], xv, a[d][t]);
                }
            }
            for d in 0..R {
                let raw = _mm256_loadu_si256(wo.add(d * inp + k).cast());
                v[d] = _mm256_castsi256_ps(_mm256_and_si256(raw, odd));
            }
            for t in 0..N {
                let xv = _mm256_loadu_ps(x.add(t * inp + k + 8));
                for d in 0..R {
                    a[d][t] = _mm256_fmadd_ps(v[d], xv, a[d][t]);
                }
            }
            k += 16;
        }
        for d in 0..R {
            let wd = w.add(d * inp);
            for t in 0..N {
                let mut s = hsum(a[d][t]);
                for k in main..inp {
                    s += scalar_bf16(wd, k) * *x.add(t * inp + k);
                }
                acc[d][t] = s;
            }
        }
    }
}

/// Writes `x`'s rows of `inp` into `out` with each full 16-element block reordered as its 8
/// even elements then its 8 odd ones (the tail stays in order): the input of [`pair_tile`].
///
/// # Safety
/// The CPU must have avx2, fma and f16c.
pub unsafe fn pair_rows(x: &[f32], inp: usize, out: &mut [f32]) {
    debug_assert_eq!(out.len(), x.len());
    debug_assert_eq!(x.len() % inp.max(1), 0);
    for (xr, or) in x.chunks_exact(inp).zip(out.chunks_exact_mut(inp)) {
        // SAFETY: the caller vouches for the CPU; both rows hold `inp` elements.
        unsafe { pair_row(xr.as_ptr(), or.as_mut_ptr(), inp) };
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pair_row(x: *const f32, out: *mut f32, inp: usize) {
    let main = inp / 16 * 16;
    let mut k = 0;
    // SAFETY: full blocks end at `main <= inp`, the tail is copied element by element.
    unsafe {
        while k < main {
            let (lo, hi) = (_mm256_loadu_ps(x.add(k)), _mm256_loadu_ps(x.add(k + 8)));
            // Per 128-bit lane: [lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6]; then the 64-bit pairs
            // in the order 0, 2, 1, 3 give [lo0 lo2 lo4 lo6 hi0 hi2 hi4 hi6].
            let ev = _mm256_shuffle_ps::<0x88>(lo, hi);
            let od = _mm256_shuffle_ps::<0xDD>(lo, hi);
            let ev = _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(ev)));
            let od = _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(od)));
            _mm256_storeu_ps(out.add(k), ev);
            _mm256_storeu_ps(out.add(k + 8), od);
            k += 16;
        }
        while k < inp {
            *out.add(k) = *x.add(k);
            k += 1;
        }
    }
}

/// R rows × N tokens, one 8-wide chain per (row, token): R and N are constants so the
/// R·N accumulators stay in registers (3 × 4 plus three weight vectors and one x vector
/// fill AVX2's sixteen).
macro_rules! tile_kernel {
    ($name:ident, $wty:ty, $load:ident, $scalar:ident) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name<const R: usize, const N: usize, const AHEAD: usize, const L1: bool>(
            w: *const $wty,
            x: *const f32,
            inp: usize,
            acc: &mut [[f32; 4]; R],
            ahead: &[u8],
        ) {
            let main = inp / 8 * 8;
            let mut fetch = Paced::new(ahead, main / 8);
            // SAFETY (whole body): k + 8 <= main <= inp keeps every vector load inside
            // each of the R rows and inside each token's slice of x.
            unsafe {
                let mut a = [[_mm256_setzero_ps(); N]; R];
                let mut k = 0;
                while k < main {
                    let mut v = [_mm256_setzero_ps(); R];
                    for (d, vd) in v.iter_mut().enumerate() {
                        *vd = $load(w.add(d * inp), k);
                    }
                    if AHEAD == 0 {
                        fetch.step();
                    } else {
                        stream::<AHEAD, L1, $wty>(w, R, inp, k);
                    }
                    for t in 0..N {
                        let xv = _mm256_loadu_ps(x.add(t * inp + k));
                        for d in 0..R {
                            a[d][t] = _mm256_fmadd_ps(v[d], xv, a[d][t]);
                        }
                    }
                    k += 8;
                }
                for d in 0..R {
                    let wd = w.add(d * inp);
                    for t in 0..N {
                        let mut s = hsum(a[d][t]);
                        for k in main..inp {
                            s += $scalar(wd, k) * *x.add(t * inp + k);
                        }
                        acc[d][t] = s;
                    }
                }
            }
        }
    };
}

/// How far ahead of its loads the single-row kernel prefetches weights, in bytes. The
/// hardware prefetcher alone left batch-1 GEMVs at ~70 % of the bandwidth; 4-16 KiB
/// ahead measured alike and ~15 % faster than none (bench_linear, rows 1).
pub(super) const PREFETCH_BYTES: usize = 8192;

/// Prefetches the weights `PREFETCH_BYTES` past element k of `w` (rows are contiguous,
/// so near a row's end that is the next row). A hint: it cannot fault, even past the end.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn prefetch_ahead<T>(w: *const T, k: usize) {
    let p = w
        .cast::<u8>()
        .wrapping_add(k * std::mem::size_of::<T>() + PREFETCH_BYTES);
    _mm_prefetch::<_MM_HINT_T0>(p.cast());
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// One kernel body per dtype: `$load(w, k)` yields 8 widened weights at element k, `$scalar`
/// widens one element for the tail.
macro_rules! dot_kernel {
    ($name:ident, $span:ident, $one:ident, $wty:ty, $load:ident, $scalar:ident) => {
        /// One row against one token.
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn $one(w: *const $wty, x: *const f32, inp: usize) -> f32 {
            let load = $load;
            let main = inp / 16 * 16;
            // SAFETY (whole body): k + 16 <= main <= inp keeps every vector load inside the
            // row and inside x.
            unsafe {
                // Four independent chains hide the FMA latency for a single token.
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let (mut a2, mut a3) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let main32 = inp / 32 * 32;
                let mut k = 0;
                while k < main32 {
                    prefetch_ahead(w, k);
                    a0 = _mm256_fmadd_ps(load(w, k), _mm256_loadu_ps(x.add(k)), a0);
                    a1 = _mm256_fmadd_ps(load(w, k + 8), _mm256_loadu_ps(x.add(k + 8)), a1);
                    a2 = _mm256_fmadd_ps(load(w, k + 16), _mm256_loadu_ps(x.add(k + 16)), a2);
                    a3 = _mm256_fmadd_ps(load(w, k + 24), _mm256_loadu_ps(x.add(k + 24)), a3);
                    k += 32;
                }
                while k < main {
                    a0 = _mm256_fmadd_ps(load(w, k), _mm256_loadu_ps(x.add(k)), a0);
                    a1 = _mm256_fmadd_ps(load(w, k + 8), _mm256_loadu_ps(x.add(k + 8)), a1);
                    k += 16;
                }
                let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
                for k in main..inp {
                    s += $scalar(w, k) * *x.add(k);
                }
                s
            }
        }

        /// Consecutive rows against one token.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $span(w: *const $wty, x: *const f32, inp: usize, y: &mut [f32]) {
            for (j, out) in y.iter_mut().enumerate() {
                // SAFETY: the caller's weights hold y.len() rows of `inp` elements.
                *out = unsafe { $one(w.add(j * inp), x, inp) };
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name(w: *const $wty, x: *const f32, n: usize, inp: usize, acc: &mut [f32; 4]) {
            let load = $load;
            let scalar = $scalar;
            let main = inp / 16 * 16;
            // SAFETY (whole body): k + 16 <= main <= inp keeps every vector load inside the
            // row and inside each token's slice of x.
            unsafe {
                if n == 1 {
                    acc[0] = $one(w, x, inp);
                    return;
                }
                // Up to four tokens, two chains each: the weight vector is loaded once and
                // used n times.
                let mut lo = [_mm256_setzero_ps(); 4];
                let mut hi = [_mm256_setzero_ps(); 4];
                let mut k = 0;
                while k < main {
                    prefetch_ahead(w, k);
                    let w0 = load(w, k);
                    let w1 = load(w, k + 8);
                    for t in 0..n {
                        let xt = x.add(t * inp + k);
                        lo[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt), lo[t]);
                        hi[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt.add(8)), hi[t]);
                    }
                    k += 16;
                }
                for t in 0..n {
                    let mut s = hsum(_mm256_add_ps(lo[t], hi[t]));
                    for k in main..inp {
                        s += scalar(w, k) * *x.add(t * inp + k);
                    }
                    acc[t] = s;
                }
            }
        }
    };
}

// Loaders: 8 weights widened to f32 at element k. Callers guarantee k + 8 <= row length.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_bf16(w: *const u16, k: usize) -> __m256 {
    // bf16 → f32 is a 16-bit left shift of the bit pattern: exact.
    // SAFETY: the caller keeps k + 8 within the row.
    unsafe {
        _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(w.add(k).cast())),
            16,
        ))
    }
}
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_f16(w: *const u16, k: usize) -> __m256 {
    // SAFETY: the caller keeps k + 8 within the row.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(w.add(k).cast())) }
}
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_f32(w: *const f32, k: usize) -> __m256 {
    // SAFETY: the caller keeps k + 8 within the row.
    unsafe { _mm256_loadu_ps(w.add(k)) }
}
#[inline]
unsafe fn scalar_bf16(w: *const u16, k: usize) -> f32 {
    // SAFETY: the caller keeps k within the row.
    f32::from_bits((unsafe { *w.add(k) } as u32) << 16)
}
#[inline]
unsafe fn scalar_f16(w: *const u16, k: usize) -> f32 {
    // SAFETY: the caller keeps k within the row.
    half::f16::from_bits(unsafe { *w.add(k) }).to_f32()
}
#[inline]
unsafe fn scalar_f32(w: *const f32, k: usize) -> f32 {
    // SAFETY: the caller keeps k within the row.
    unsafe { *w.add(k) }
}

tile_kernel!(tile_bf16, u16, load_bf16, scalar_bf16);
tile_kernel!(tile_f16, u16, load_f16, scalar_f16);
tile_kernel!(tile_f32, f32, load_f32, scalar_f32);
dot_kernel!(dots_bf16, span_bf16, one_bf16, u16, load_bf16, scalar_bf16);
dot_kernel!(dots_f16, span_f16, one_f16, u16, load_f16, scalar_f16);
dot_kernel!(dots_f32, span_f32, one_f32, f32, load_f32, scalar_f32);
