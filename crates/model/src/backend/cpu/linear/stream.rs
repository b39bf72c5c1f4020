//! A read of memory the way the single-row (decode) kernels read weights, without their
//! arithmetic: the bench's bandwidth probe.
//!
//! A plain `fold` over a buffer, compiled for the baseline x86_64 target, reads it with
//! 16-byte loads and only the hardware prefetcher; on a 2-core Xeon VM that streamed 16-21
//! GB/s where the decode kernels, with 64-byte loads and software prefetch, streamed 26-30
//! (bench_linear, one row, 2 threads, 294 MB and 1.5 GB of weights alike), so decode showed
//! 139 % of a bound it does not have. Each CPU's loads and prefetch (distance and cache) here
//! are the ones its kernels use.

/// The wrapping sum of `words`, read with the widest loads the CPU has and prefetched as the
/// single-row kernel prefetches weights on it. Returns the same value on every CPU.
#[must_use]
pub fn stream_sum(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        use super::kernels::{isa, prefetcher, Isa, Prefetcher};
        use super::{avx2, avx512};
        let isa = isa();
        if isa >= Isa::Avx512 {
            // SAFETY: the CPU has AVX-512F (`isa` checked it).
            return unsafe {
                match prefetcher() {
                    Prefetcher::Intel => avx512_sum::<false, { avx512::INTEL_AHEAD }>(words),
                    Prefetcher::Zen4 => avx512_sum::<false, { avx512::ZEN4_AHEAD }>(words),
                    Prefetcher::Zen5 => avx512_sum::<true, { avx512::ZEN5_AHEAD }>(words),
                }
            };
        }
        if isa >= Isa::Avx2 {
            // SAFETY: the CPU has AVX2 (`isa` checked it).
            return unsafe { avx2_sum::<{ avx2::PREFETCH_BYTES }>(words) };
        }
    }
    plain_sum(words)
}

/// The wrapping sum one word at a time: the reference, the fallback and the SIMD paths' tails.
fn plain_sum(words: &[u64]) -> u64 {
    words.iter().fold(0, |a, &w| a.wrapping_add(w))
}

/// 64-byte lines, four at a time, each prefetched `AHEAD` bytes on (into L1 where `L1`, else
/// L2). The tail goes one word at a time.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_sum<const L1: bool, const AHEAD: usize>(words: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let steps = words.len() / 32;
    let p = words.as_ptr();
    let mut acc = [_mm512_setzero_si512(); 4];
    // SAFETY: step `s` reads words `32s .. 32s + 32`, inside `words`; prefetches are hints and
    // never fault, even past the end.
    unsafe {
        for s in 0..steps {
            let at = p.add(32 * s);
            for (l, acc) in acc.iter_mut().enumerate() {
                let line = at.add(8 * l);
                let ahead = line.cast::<i8>().wrapping_add(AHEAD);
                if L1 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
                } else {
                    _mm_prefetch::<_MM_HINT_T1>(ahead);
                }
                *acc = _mm512_add_epi64(*acc, _mm512_loadu_si512(line.cast()));
            }
        }
        let sum = _mm512_add_epi64(
            _mm512_add_epi64(acc[0], acc[1]),
            _mm512_add_epi64(acc[2], acc[3]),
        );
        (_mm512_reduce_add_epi64(sum) as u64).wrapping_add(plain_sum(&words[32 * steps..]))
    }
}

/// [`avx512_sum`] with 32-byte loads, two to a line, and the AVX2 kernel's prefetch into L1.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_sum<const AHEAD: usize>(words: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let steps = words.len() / 16;
    let p = words.as_ptr();
    let mut acc = [_mm256_setzero_si256(); 4];
    // SAFETY: step `s` reads words `16s .. 16s + 16`, inside `words`; prefetches never fault.
    unsafe {
        for s in 0..steps {
            let at = p.add(16 * s);
            _mm_prefetch::<_MM_HINT_T0>(at.cast::<i8>().wrapping_add(AHEAD));
            _mm_prefetch::<_MM_HINT_T0>(at.cast::<i8>().wrapping_add(AHEAD + 64));
            for (l, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_add_epi64(*acc, _mm256_loadu_si256(at.add(4 * l).cast()));
            }
        }
        let mut lanes = [0u64; 4];
        let sum = _mm256_add_epi64(
            _mm256_add_epi64(acc[0], acc[1]),
            _mm256_add_epi64(acc[2], acc[3]),
        );
        _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sum);
        plain_sum(&lanes).wrapping_add(plain_sum(&words[16 * steps..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_sums_every_word_the_tail_included() {
        // Lengths around both step sizes, with words that overflow when added.
        for n in [0usize, 1, 15, 16, 17, 31, 32, 33, 100, 1000] {
            let words: Vec<u64> = (0..n as u64)
                .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .collect();
            let want = plain_sum(&words);
            assert_eq!(stream_sum(&words), want, "{n} words");
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2.
                    assert_eq!(unsafe { avx2_sum::<8192>(&words) }, want, "avx2, {n}");
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    assert_eq!(unsafe { avx512_sum::<false, 4096>(&words) }, want, "{n}");
                    assert_eq!(unsafe { avx512_sum::<true, 8192>(&words) }, want, "{n}");
                }
            }
        }
    }
}
