//! The AVX2 kernel: `vpmaddubsw` pairs, `vpmaddwd` quads, eight rows' lanes per register, two
//! registers per group.

use super::{quant_offset, scale_offset, QActs, GROUP, TOKENS};
use crate::weights::{quant::BLOCK, QuantFormat};
use std::arch::x86_64::*;

/// [`super::group_dots`] on AVX2; the caller checked the CPU has avx2, fma and f16c.
pub fn group_dots(
    format: QuantFormat,
    grp: &[u8],
    a: QActs<'_>,
    n: usize,
    acc: &mut [[f32; GROUP]; TOKENS],
) {
    macro_rules! go {
        ($q4:expr) => {
            // SAFETY: QIsa::Avx2 is chosen only where the CPU has avx2, fma and f16c; the slices
            // hold what the kernel reads (asserted above).
            unsafe {
                for half in 0..2 {
                    match n {
                        1 => dots::<1, $q4>(grp, a, half, acc),
                        2 => dots::<2, $q4>(grp, a, half, acc),
                        3 => dots::<3, $q4>(grp, a, half, acc),
                        4 => dots::<4, $q4>(grp, a, half, acc),
                        5 => dots::<5, $q4>(grp, a, half, acc),
                        6 => dots::<6, $q4>(grp, a, half, acc),
                        7 => dots::<7, $q4>(grp, a, half, acc),
                        _ => dots::<8, $q4>(grp, a, half, acc),
                    }
                }
            }
        };
    }
    match format {
        QuantFormat::Q8_0 => go!(false),
        QuantFormat::Q4_0 => go!(true),
    }
}

/// N token rows against rows `8 · half ..` of one group.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots<const N: usize, const Q4: bool>(
    grp: &[u8],
    a: QActs<'_>,
    half: usize,
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
        let low = _mm256_set1_epi8(0x0F);
        let flip = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        let mut sums = [_mm256_setzero_ps(); N];
        let gp = grp.as_ptr();
        let (xq, xd, xs) = (a.q.as_ptr(), a.d.as_ptr(), a.sum.as_ptr());
        for b in 0..blocks {
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(
                gp.add(scale_offset(format, b) + 16 * half).cast(),
            ));
            let p = gp.add(quant_offset(format, b) + 32 * half);
            // Q4_0: the nibbles (w + 8), unsigned. Q8_0: |w| unsigned, and w for its sign.
            let mut wu = [_mm256_setzero_si256(); 8];
            let mut ws = [_mm256_setzero_si256(); 8];
            if Q4 {
                for c in 0..4 {
                    let v = _mm256_loadu_si256(p.add(c * 64).cast());
                    wu[c] = _mm256_and_si256(v, low);
                    wu[c + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                }
            } else {
                for c in 0..8 {
                    let v = _mm256_xor_si256(_mm256_loadu_si256(p.add(c * 64).cast()), flip);
                    ws[c] = v;
                    wu[c] = _mm256_abs_epi8(v);
                }
            }
            for (t, sum) in sums.iter_mut().enumerate() {
                let x = xq.add(t * a.inp + b * BLOCK).cast::<i32>();
                let mut isum = if Q4 {
                    _mm256_set1_epi32(-8 * *xs.add(t * blocks + b))
                } else {
                    _mm256_setzero_si256()
                };
                for g in 0..8 {
                    let xv = _mm256_set1_epi32(x.add(g).read_unaligned());
                    let xv = if Q4 { xv } else { _mm256_sign_epi8(xv, ws[g]) };
                    let pairs = _mm256_maddubs_epi16(wu[g], xv);
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(pairs, ones));
                }
                let s = _mm256_mul_ps(dw, _mm256_set1_ps(*xd.add(t * blocks + b)));
                *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), s, *sum);
            }
        }
        for (t, sum) in sums.iter().enumerate() {
            _mm256_storeu_ps(acc[t].as_mut_ptr().add(8 * half), *sum);
        }
    }
}
