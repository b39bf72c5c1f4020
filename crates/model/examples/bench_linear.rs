#![allow(clippy::print_stdout)] // a benchmark whose output is its table
//! Throughput of the CPU linear kernels on expert-sized bf16 weights, by token rows: the dot
//! path against the gemm path (and the AMX path where the CPU has it), in GFLOP/s and GB/s of weights read. Weights rotate through 16
//! matrices (117 MB), more than most last-level caches hold, as a decode step's experts do; a
//! CPU with a larger L3 measures compute rates, not memory ones.
//!
//!   cargo run --release -p switchyard-model --example bench_linear -- [ROWS,..] [--threads N] [--hot | --mats N]
//!
//! `SWITCHYARD_CPU_KERNELS=avx2` (or scalar, avx512) measures a lower instruction set.
//!
//! On CPUs with AVX-512 BF16 a last column measures a kernel the model does not use:
//! activations rounded to bf16 and `vdpbf16ps` (32 multiply-adds an instruction, against a
//! 512-bit FMA's 16), to size what a bf16-activation mode would gain on batched expert steps.

use half::bf16;
use std::time::Instant;
use switchyard_model::backend::cpu::{in_pool, linear};
use switchyard_model::weights::Elems;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rows_list = vec![1usize, 2, 4, 8, 12, 16, 24, 32, 48, 64];
    let mut mats = 16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--hot" {
            // One matrix per shape, read from cache after the first pass: the kernels' compute
            // rate without memory stalls.
            mats = 1;
        } else if a == "--mats" {
            // More matrices than the last-level cache holds (some server CPUs have hundreds of
            // MB of L3): the memory rates a decode step over a whole model sees.
            mats = args.next().ok_or("--mats needs a count")?.parse()?;
        } else if a == "--threads" {
            let n: usize = args.next().ok_or("--threads needs a count")?.parse()?;
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()?;
        } else {
            rows_list = a
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("rows {a:?}: {e}"))?;
        }
    }
    // w1/w3 shape [3584, 1024] and w2 shape [1024, 3584] of a hidden-1024 Mixtral.
    let shapes = [
        ("w1 3584x1024", 3584usize, 1024usize),
        ("w2 1024x3584", 1024, 3584),
    ];
    println!("kernels: {}", linear::isa().as_str());
    println!(
        "{:>14} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "weight",
        "rows",
        "dot GF/s",
        "dot GB/s",
        "gemm GF/s",
        "gemm GB/s",
        "amx GF/s",
        "amx GB/s",
        "bf16x GF/s",
        "bf16x GB/s"
    );
    let mut xb = Vec::new();
    for (name, out, inp) in shapes {
        let ws: Vec<Vec<bf16>> = (0..mats)
            .map(|m| {
                (0..out * inp)
                    .map(|i| bf16::from_f32(((i * 7 + m * 13) % 97) as f32 / 97.0 - 0.5))
                    .collect()
            })
            .collect();
        for &rows in &rows_list {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i % 31) as f32 - 15.0) / 31.0)
                .collect();
            let mut y = vec![0f32; rows * out];
            let amx = linear::linear_amx(&x, rows, Elems::BF16(&ws[0]), inp, out, &mut y);
            #[derive(Clone, Copy, PartialEq)]
            enum Path {
                Dot,
                Gemm,
                Amx,
                Bf16Act,
            }
            let mut yt = vec![0f32; rows * out];
            let mut time = |path: Path| {
                let reps = (mats * 4).max(64 / rows.max(1) * mats);
                let mut best = f64::MAX;
                for _ in 0..3 {
                    let t = Instant::now();
                    in_pool(|| {
                        for r in 0..reps {
                            let w = Elems::BF16(&ws[r % mats]);
                            match path {
                                Path::Gemm => linear::linear_gemm(&x, rows, w, inp, out, &mut y),
                                Path::Dot => linear::linear_dot(&x, rows, w, inp, out, &mut y),
                                Path::Amx => {
                                    linear::linear_amx(&x, rows, w, inp, out, &mut y);
                                }
                                Path::Bf16Act => {
                                    bf16_act::linear(&x, rows, &ws[r % mats], inp, &mut yt, &mut xb)
                                }
                            }
                        }
                    });
                    best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                }
                let flops = 2.0 * (rows * out * inp) as f64;
                let bytes = (out * inp * 2) as f64;
                (flops / best / 1e9, bytes / best / 1e9)
            };
            let (dg, db) = time(Path::Dot);
            let (gg, gb) = time(Path::Gemm);
            let (ag, ab) = if amx {
                time(Path::Amx)
            } else {
                (f64::NAN, f64::NAN)
            };
            let (xg, xbw) = if bf16_act::available() && inp.is_multiple_of(32) {
                let timed = time(Path::Bf16Act);
                bf16_act::check(&x, rows, &ws[0], inp, out, &mut xb);
                timed
            } else {
                (f64::NAN, f64::NAN)
            };
            println!(
                "{name:>14} {rows:>5} {dg:>10.1} {db:>10.1} {gg:>10.1} {gb:>10.1} {ag:>10.1} {ab:>10.1} {xg:>10.1} {xbw:>10.1}"
            );
        }
    }
    Ok(())
}

/// The bf16-activation candidate: `yt[o][t] = Σ_k w[o][k] · bf16(x[t][k])` (output transposed,
/// so that tasks own whole chunks of it), tiles of four weight rows by up to four tokens, each
/// row's weights prefetched 16 KiB ahead into L2.
mod bf16_act {
    use half::bf16;
    use rayon::prelude::*;

    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    pub fn linear(
        x: &[f32],
        rows: usize,
        w: &[bf16],
        inp: usize,
        yt: &mut [f32],
        xb: &mut Vec<bf16>,
    ) {
        assert!(available() && inp.is_multiple_of(32) && w.len().is_multiple_of(4 * inp));
        xb.clear();
        xb.extend(x[..rows * inp].iter().map(|&v| bf16::from_f32(v)));
        let xb = &xb[..];
        // 16 weight rows (four tiles) per task.
        yt.par_chunks_mut(16 * rows)
            .zip(w.par_chunks(16 * inp))
            .for_each(|(yc, wc)| {
                for (yt4, w4) in yc.chunks_mut(4 * rows).zip(wc.chunks(4 * inp)) {
                    for t0 in (0..rows).step_by(4) {
                        let n = (rows - t0).min(4);
                        let mut acc = [[0f32; 4]; 4];
                        // SAFETY: `available()` was asserted; the tile covers four rows of
                        // `inp` weights and `n` rows of `inp` activations from `t0`.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            x86::tile4(w4.as_ptr(), xb[t0 * inp..].as_ptr(), inp, n, &mut acc)
                        };
                        for (d, a) in acc.iter().enumerate() {
                            yt4[d * rows + t0..d * rows + t0 + n].copy_from_slice(&a[..n]);
                        }
                    }
                }
            });
    }

    /// Checks the candidate against f32 sums: rounding each activation to bf16 moves it by at
    /// most 2⁻⁹ of itself, so a sum moves by at most 2⁻⁹ of the sum of |w·x|.
    pub fn check(x: &[f32], rows: usize, w: &[bf16], inp: usize, out: usize, xb: &mut Vec<bf16>) {
        let mut yt = vec![0f32; rows * out];
        linear(x, rows, w, inp, &mut yt, xb);
        for o in 0..out {
            let wr = &w[o * inp..(o + 1) * inp];
            for t in 0..rows {
                let xr = &x[t * inp..(t + 1) * inp];
                let (exact, mag) = wr.iter().zip(xr).fold((0f64, 0f64), |(e, m), (w, x)| {
                    let p = f64::from(w.to_f32()) * f64::from(*x);
                    (e + p, m + p.abs())
                });
                let got = f64::from(yt[o * rows + t]);
                assert!(
                    (got - exact).abs() <= mag / 512.0 + 1e-4,
                    "bf16 candidate, row {o} token {t}: {got} against {exact}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use half::bf16;
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx512f,avx512bf16")]
        pub unsafe fn tile4(
            w: *const bf16,
            x: *const bf16,
            inp: usize,
            n: usize,
            out: &mut [[f32; 4]; 4],
        ) {
            // SAFETY: the caller's bounds.
            unsafe {
                match n {
                    1 => tile::<1>(w, x, inp, out),
                    2 => tile::<2>(w, x, inp, out),
                    3 => tile::<3>(w, x, inp, out),
                    _ => tile::<4>(w, x, inp, out),
                }
            }
        }

        // Indexing keeps the accumulators' layout plain to the register allocator.
        #[allow(clippy::needless_range_loop)]
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn tile<const N: usize>(
            w: *const bf16,
            x: *const bf16,
            inp: usize,
            out: &mut [[f32; 4]; 4],
        ) {
            // SAFETY: four rows of `inp` weights and N of activations, `inp` a multiple of 32.
            unsafe {
                let mut a = [[_mm512_setzero_ps(); N]; 4];
                let mut k = 0;
                while k < inp {
                    for d in 0..4 {
                        // 16 KiB ahead into L2, the single-row kernel's choice on Zen 4.
                        let p = w.add(d * inp + k).cast::<u8>().wrapping_add(16384);
                        _mm_prefetch::<_MM_HINT_T1>(p.cast());
                    }
                    let wv: [__m512bh; 4] = std::array::from_fn(|d| {
                        std::mem::transmute(_mm512_loadu_si512(w.add(d * inp + k).cast()))
                    });
                    for t in 0..N {
                        let xv: __m512bh =
                            std::mem::transmute(_mm512_loadu_si512(x.add(t * inp + k).cast()));
                        for d in 0..4 {
                            a[d][t] = _mm512_dpbf16_ps(a[d][t], wv[d], xv);
                        }
                    }
                    k += 32;
                }
                for d in 0..4 {
                    for t in 0..N {
                        out[d][t] = _mm512_reduce_add_ps(a[d][t]);
                    }
                }
            }
        }
    }
}
