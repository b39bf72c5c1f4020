#![allow(clippy::print_stdout)] // a benchmark whose output is its table
//! Throughput of the Q8_0/Q4_0 linear kernels on expert-sized weights, by token rows, in GB/s
//! of weights read and GOP/s. Weights rotate through `--mats` matrices (default 16: more than
//! most last-level caches hold, as a decode step's experts do).
//!
//!   cargo run --release -p switchyard-model --example bench_quant -- [ROWS,..] [--threads N] [--mats N]
//!
//! `SWITCHYARD_CPU_KERNELS=avx2` (or scalar) measures a lower instruction set.

use std::time::Instant;
use switchyard_model::backend::cpu::{in_pool, linear};
use switchyard_model::weights::{Elems, QuantFormat};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rows_list = vec![1usize, 2, 4, 8, 16, 32, 64, 128];
    let mut mats = 16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--mats" {
            mats = args.next().ok_or("--mats needs a count")?.parse()?;
        } else if a == "--threads" {
            let n: usize = args.next().ok_or("--threads needs a count")?.parse()?;
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()?;
        } else {
            rows_list = a.split(',').map(str::parse).collect::<Result<_, _>>()?;
        }
    }
    let shapes = [
        ("w1 3584x1024", 3584usize, 1024usize),
        ("w2 1024x3584", 1024, 3584),
    ];
    println!(
        "kernels {:?}, {} threads",
        linear::quant::QIsa::for_isa(linear::isa()),
        rayon::current_num_threads()
    );
    println!(
        "{:>14} {:>6} {:>5} {:>9} {:>9}",
        "shape", "format", "rows", "GB/s", "GOP/s"
    );
    for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
        for &(name, out, inp) in &shapes {
            let ws: Vec<linear::QTiles> = (0..mats)
                .map(|m| {
                    let w: Vec<f32> = (0..out * inp)
                        .map(|i| (((i * 31 + m * 7) % 1999) as f32 / 999.5 - 1.0) * 0.05)
                        .collect();
                    linear::QTiles::quantize(Elems::F32(&w), out, format).expect("packs")
                })
                .collect();
            for &rows in &rows_list {
                let x: Vec<f32> = (0..rows * inp)
                    .map(|i| ((i % 97) as f32 - 48.0) / 48.0)
                    .collect();
                let mut y = vec![0f32; rows * out];
                let iters = (400 / rows).clamp(8, 200) * mats / 4;
                let run = |y: &mut Vec<f32>| {
                    in_pool(|| {
                        for i in 0..iters {
                            linear::quant::linear_many(
                                &x,
                                rows,
                                &mut [(&ws[i % mats], y.as_mut_slice())],
                            );
                        }
                    })
                };
                run(&mut y);
                let t = Instant::now();
                run(&mut y);
                let s = t.elapsed().as_secs_f64();
                let gb = ws[0].bytes() as f64 * iters as f64 / s / 1e9;
                let gop = 2.0 * (out * inp * rows) as f64 * iters as f64 / s / 1e9;
                println!("{name:>14} {format:>6} {rows:>5} {gb:>9.1} {gop:>9.1}");
            }
        }
    }
    Ok(())
}
