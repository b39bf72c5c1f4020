//! The AVX-512 VNNI kernel: `vpdpbusd` adds four byte products into each of 16 rows' lanes.

use super::{quant_offset, scale_offset, QActs, GROUP, TOKENS};
use crate::weights::{quant::BLOCK, QuantFormat};
use std::arch::x86_64::*;

/// [`super::group_dots`] on AVX-512 VNNI; the caller checked the CPU has it.
pub fn group_dots(
    format: QuantFormat,
    grp: &[u8],
    a: QActs<'_>,
    n: usize,
    acc: &mut [[f32; GROUP]; TOKENS],
) {
    macro_rules! go {
        ($q4:expr) => {
            // SAFETY: QIsa::Avx512Vnni is chosen only where the CPU has avx512f/bw/vl and
            // avx512vnni; the slices hold what the kernel reads (asserted by super::group_dots).
            unsafe {
                match n {
                    1 => dots::<1, $q4>(grp, a, acc),
                    2 => dots::<2, $q4>(grp, a, acc),
                    3 => dots::<3, $q4>(grp, a, acc),
                    4 => dots::<4, $q4>(grp, a, acc),
                    5 => dots::<5, $q4>(grp, a, acc),
                    6 => dots::<6, $q4>(grp, a, acc),
                    7 => dots::<7, $q4>(grp, a, acc),
                    _ => dots::<8, $q4>(grp, a, acc),
                }
            }
        };
    }
    match format {
        QuantFormat::Q8_0 => go!(false),
        QuantFormat::Q4_0 => go!(true),
    }
}

/// Bytes ahead of the block being read that the kernel prefetches.
const AHEAD: usize = 2048;

/// N token rows against one group. Each token's block sum runs in two integer chains (even
/// and odd lines of the block) so that one token does not wait on `vpdpbusd`'s latency; the
/// chains add exactly.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dots<const N: usize, const Q4: bool>(
    grp: &[u8],
    a: QActs<'_>,
    acc: &mut [[f32; GROUP]; TOKENS],
) {
    // SAFETY: the caller checked the CPU features and the slice lengths (group_dots).
    unsafe {
        let blocks = a.blocks();
        let format = if Q4 {
            QuantFormat::Q4_0
        } else {
            QuantFormat::Q8_0
        };
        let off = if Q4 { -8 } else { -128 };
        let low = _mm512_set1_epi8(0x0F);
        let mut sums = [_mm512_setzero_ps(); N];
        let gp = grp.as_ptr();
        let (xq, xd, xs) = (a.q.as_ptr(), a.d.as_ptr(), a.sum.as_ptr());
        for b in 0..blocks {
            let p = gp.add(quant_offset(format, b));
            // The lines a few blocks ahead, past this group into the next where the task goes
            // on (a prefetch of an address past the weights is dropped, not faulted).
            let lines = if Q4 { 5 } else { 9 };
            for i in 0..lines {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD + 64 * i).cast());
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(gp.add(scale_offset(format, b)).cast()));
            let mut w = [_mm512_setzero_si512(); 8];
            if Q4 {
                for c in 0..4 {
                    let v = _mm512_loadu_si512(p.add(c * 64).cast());
                    w[c] = _mm512_and_si512(v, low);
                    w[c + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                }
            } else {
                for (c, wc) in w.iter_mut().enumerate() {
                    *wc = _mm512_loadu_si512(p.add(c * 64).cast());
                }
            }
            for (t, sum) in sums.iter_mut().enumerate() {
                let x = xq.add(t * a.inp + b * BLOCK).cast::<i32>();
                let mut i0 = _mm512_set1_epi32(off * *xs.add(t * blocks + b));
                let mut i1 = _mm512_setzero_si512();
                for g in (0..8).step_by(2) {
                    i0 =
                        _mm512_dpbusd_epi32(i0, w[g], _mm512_set1_epi32(x.add(g).read_unaligned()));
                    i1 = _mm512_dpbusd_epi32(
                        i1,
                        w[g + 1],
                        _mm512_set1_epi32(x.add(g + 1).read_unaligned()),
                    );
                }
                let isum = _mm512_add_epi32(i0, i1);
                let s = _mm512_mul_ps(dw, _mm512_set1_ps(*xd.add(t * blocks + b)));
                *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, *sum);
            }
        }
        for (t, sum) in sums.iter().enumerate() {
            _mm512_storeu_ps(acc[t].as_mut_ptr(), *sum);
        }
    }
}
