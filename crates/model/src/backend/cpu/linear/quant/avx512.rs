//! The AVX-512 VNNI kernel: `vpdpbusd` adds four byte products into each of 16 rows' lanes.

use super::{QActs, QTiles, GROUP, TOKENS};
use crate::weights::{quant::BLOCK, QuantFormat};
use std::arch::x86_64::*;

/// [`super::group_dots`] on AVX-512 VNNI; the caller checked the CPU has it.
pub fn group_dots(
    format: QuantFormat,
    quants: &[u8],
    scales: &[u16],
    a: QActs<'_>,
    n: usize,
    acc: &mut [[f32; GROUP]; TOKENS],
) {
    let blocks = a.blocks();
    assert!(quants.len() >= blocks * QTiles::quant_bytes(format) && scales.len() >= blocks * GROUP);
    assert!(n <= TOKENS && a.q.len() >= n * a.inp && a.d.len() >= n * blocks);
    macro_rules! go {
        ($q4:expr) => {
            // SAFETY: QIsa::Avx512Vnni is chosen only where the CPU has avx512f/bw/vl and
            // avx512vnni; the slices hold what the kernel reads (asserted above).
            unsafe {
                match n {
                    1 => dots::<1, $q4>(quants, scales, a, acc),
                    2 => dots::<2, $q4>(quants, scales, a, acc),
                    3 => dots::<3, $q4>(quants, scales, a, acc),
                    4 => dots::<4, $q4>(quants, scales, a, acc),
                    5 => dots::<5, $q4>(quants, scales, a, acc),
                    6 => dots::<6, $q4>(quants, scales, a, acc),
                    7 => dots::<7, $q4>(quants, scales, a, acc),
                    _ => dots::<8, $q4>(quants, scales, a, acc),
                }
            }
        };
    }
    match format {
        QuantFormat::Q8_0 => go!(false),
        QuantFormat::Q4_0 => go!(true),
    }
}

/// N token rows against one group. Each token's block sum runs in two integer chains (even
/// and odd lines of the block) so that one token does not wait on `vpdpbusd`'s latency; the
/// chains add exactly.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dots<const N: usize, const Q4: bool>(
    quants: &[u8],
    scales: &[u16],
    a: QActs<'_>,
    acc: &mut [[f32; GROUP]; TOKENS],
) {
    // SAFETY: the caller checked the CPU features and the slice lengths (group_dots).
    unsafe {
        let blocks = a.blocks();
        let qb = if Q4 { GROUP * BLOCK / 2 } else { GROUP * BLOCK };
        let off = if Q4 { -8 } else { -128 };
        let low = _mm512_set1_epi8(0x0F);
        let mut sums = [_mm512_setzero_ps(); N];
        let (qp, sp) = (quants.as_ptr(), scales.as_ptr());
        let (xq, xd, xs) = (a.q.as_ptr(), a.d.as_ptr(), a.sum.as_ptr());
        for b in 0..blocks {
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(b * GROUP).cast()));
            let p = qp.add(b * qb);
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
