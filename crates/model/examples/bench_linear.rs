#![allow(clippy::print_stdout)] // a benchmark whose output is its table
//! Throughput of the CPU linear kernels on expert-sized bf16 weights, by token rows: the dot
//! path against the gemm path (and the AMX path where the CPU has it), in GFLOP/s and GB/s of weights read. Weights rotate through 16
//! matrices (117 MB), more than most last-level caches hold, as a decode step's experts do; a
//! CPU with a larger L3 measures compute rates, not memory ones.
//!
//!   cargo run --release -p switchyard-model --example bench_linear -- [ROWS,..] [--threads N] [--hot | --mats N] [--shape OUTxIN,..]
//!
//! `--shape` measures other weights than the experts' (e.g. `1024x1024` for a q projection,
//! `32000x1024` for an LM head).
//!
//! `SWITCHYARD_CPU_KERNELS=avx2` (or scalar, avx512) measures a lower instruction set.
//!
//! On CPUs with AVX-512 BF16 the bf16x columns measure the dot path with activations rounded to
//! bf16 for its tiles (`vdpbf16ps`). The tiles columns (AMX CPUs: weights in tile order) follow
//! `SWITCHYARD_CPU_ACTIVATIONS`: f32 (the default here) runs three AMX parts from 4 rows and
//! a dot kernel below, bf16 one AMX part at every row count.

use half::bf16;
use std::time::Instant;
use switchyard_model::backend::cpu::{in_pool, linear};
use switchyard_model::weights::Elems;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rows_list = vec![1usize, 2, 4, 8, 12, 16, 24, 32, 48, 64];
    let mut mats = 16;
    // w1/w3 shape [3584, 1024] and w2 shape [1024, 3584] of a hidden-1024 Mixtral.
    let mut shapes = vec![
        ("w1 3584x1024".to_string(), 3584usize, 1024usize),
        ("w2 1024x3584".to_string(), 1024, 3584),
    ];
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
        } else if a == "--shape" {
            let list = args.next().ok_or("--shape needs OUTxIN[,OUTxIN..]")?;
            shapes = list
                .split(',')
                .map(|sh| {
                    let (o, i) = sh
                        .split_once('x')
                        .ok_or_else(|| format!("shape {sh:?}: expected OUTxIN"))?;
                    let (o, i): (usize, usize) = (
                        o.parse().map_err(|e| format!("shape {sh:?}: {e}"))?,
                        i.parse().map_err(|e| format!("shape {sh:?}: {e}"))?,
                    );
                    if o == 0 || i == 0 {
                        return Err(format!("shape {sh:?}: zero dimension"));
                    }
                    Ok((sh.to_string(), o, i))
                })
                .collect::<Result<_, String>>()?;
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
    println!("kernels: {}", linear::isa().as_str());
    println!(
        "{:>14} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "weight",
        "rows",
        "dot GF/s",
        "dot GB/s",
        "gemm GF/s",
        "gemm GB/s",
        "amx GF/s",
        "amx GB/s",
        "bf16x GF/s",
        "bf16x GB/s",
        "tiles GF/s",
        "tiles GB/s"
    );
    for (name, out, inp) in &shapes {
        let (out, inp) = (*out, *inp);
        let ws: Vec<Vec<bf16>> = (0..mats)
            .map(|m| {
                (0..out * inp)
                    .map(|i| bf16::from_f32(((i * 7 + m * 13) % 97) as f32 / 97.0 - 0.5))
                    .collect()
            })
            .collect();
        // The same weights in AMX tile order, where the CPU's kernels are AMX.
        let tiles: Vec<_> = ws
            .iter()
            .filter_map(|w| linear::tiles_for(Elems::BF16(w), out))
            .collect();
        for &rows in &rows_list {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i % 31) as f32 - 15.0) / 31.0)
                .collect();
            let mut y = vec![0f32; rows * out];
            let amx = linear::linear_amx(&x, rows, Elems::BF16(&ws[0]), inp, out, &mut y);
            let bf16x = linear::linear_dot_bf16_activations(
                &x,
                rows,
                Elems::BF16(&ws[0]),
                inp,
                out,
                &mut y,
            );
            #[derive(Clone, Copy, PartialEq)]
            enum Path {
                Dot,
                Gemm,
                Amx,
                Bf16Act,
                Tiles,
            }
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
                                    linear::linear_dot_bf16_activations(
                                        &x, rows, w, inp, out, &mut y,
                                    );
                                }
                                Path::Tiles => {
                                    linear::linear_tiles(
                                        &x,
                                        rows,
                                        &mut [(&tiles[r % mats], &mut y)],
                                    );
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
            let (xg, xbw) = if bf16x {
                time(Path::Bf16Act)
            } else {
                (f64::NAN, f64::NAN)
            };
            let (tg, tb) = if tiles.len() == mats {
                time(Path::Tiles)
            } else {
                (f64::NAN, f64::NAN)
            };
            println!(
                "{name:>14} {rows:>5} {dg:>10.1} {db:>10.1} {gg:>10.1} {gb:>10.1} {ag:>10.1} {ab:>10.1} {xg:>10.1} {xbw:>10.1} {tg:>10.1} {tb:>10.1}"
            );
        }
    }
    Ok(())
}
