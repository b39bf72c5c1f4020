//! The CUDA backend's host side that needs no GPU: the NVRTC source, the names the backend looks
//! up in it, launch geometry, cuBLAS GEMM dimensions and the attention row tables. Built on every
//! machine so that its tests (including the source check and the host-run kernel test below) run
//! in CI, which has no GPU.

use crate::{
    backend::{AttnSeq, AttnShape},
    ModelError, Result,
};

/// The kernels, compiled at run time with NVRTC.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Every `extern "C"` kernel the backend loads from [`SOURCE`].
pub const KERNELS: &[&str] = &[
    "cast_f32_bf16",
    "cast_f32_f16",
    "embedding_f32",
    "embedding_bf16",
    "embedding_f16",
    "rms_norm_f32",
    "rms_norm_bf16",
    "rms_norm_f16",
    "rope",
    "kv_write",
    "attention",
    "silu_mul",
    "add_assign",
    "router_topk",
];

/// Threads per block of the grid-stride elementwise kernels.
pub const ELEMENTWISE_BLOCK: u32 = 256;
/// Enough blocks to fill any current GPU; grid-stride loops cover the rest.
pub const MAX_ELEMENTWISE_BLOCKS: u32 = 8192;
/// Warps per attention block (`ATTN_WARPS` in the source).
pub const ATTN_WARPS: u32 = 4;
/// Largest head dimension the attention kernel holds in registers (`ATTN_MAX_HEAD_DIM`).
pub const ATTN_MAX_HEAD_DIM: usize = 256;
/// Largest expert count the router kernel handles (`ROUTER_MAX_EXPERTS`).
pub const ROUTER_MAX_EXPERTS: usize = 256;

/// Grid and block of one launch (the driver's `LaunchConfig` without the dependency).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

/// A grid-stride kernel over `n` elements.
#[must_use]
pub fn elementwise(n: usize) -> Launch {
    let blocks = n
        .div_ceil(ELEMENTWISE_BLOCK as usize)
        .clamp(1, MAX_ELEMENTWISE_BLOCKS as usize);
    Launch {
        grid: (blocks as u32, 1, 1),
        block: (ELEMENTWISE_BLOCK, 1, 1),
    }
}

/// One block per row of `width` (RMSNorm): a whole number of warps, at most 1024 threads.
#[must_use]
pub fn per_row(rows: usize, width: usize) -> Launch {
    let threads = width.div_ceil(32).clamp(1, 32) * 32;
    Launch {
        grid: (rows as u32, 1, 1),
        block: (threads as u32, 1, 1),
    }
}

/// One block per (query row, head).
pub fn attention(rows: usize, shape: &AttnShape) -> Result<Launch> {
    if shape.head_dim > ATTN_MAX_HEAD_DIM {
        return Err(ModelError::Device(
            "cuda".into(),
            format!(
                "head_dim {} exceeds the attention kernel's {ATTN_MAX_HEAD_DIM}",
                shape.head_dim
            ),
        ));
    }
    if shape.kv_heads == 0 || !shape.heads.is_multiple_of(shape.kv_heads) {
        return Err(ModelError::Input(format!(
            "{} heads do not split over {} kv heads",
            shape.heads, shape.kv_heads
        )));
    }
    Ok(Launch {
        grid: (rows as u32, shape.heads as u32, 1),
        block: (ATTN_WARPS * 32, 1, 1),
    })
}

/// One thread per token row.
pub fn router(rows: usize, n_experts: usize, k: usize) -> Result<Launch> {
    if n_experts > ROUTER_MAX_EXPERTS || k == 0 || k > n_experts {
        return Err(ModelError::Input(format!(
            "top-{k} of {n_experts} experts is outside the router kernel's range (1..={ROUTER_MAX_EXPERTS})"
        )));
    }
    Ok(Launch {
        grid: (rows.div_ceil(128).max(1) as u32, 1, 1),
        block: (128, 1, 1),
    })
}

/// Column-major cuBLAS arguments for `out[rows, n_out] = x[rows, n_in] · w[n_out, n_in]ᵀ` with
/// row-major operands: `C = op(A) · B` where `A` is `w` read transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmDims {
    /// `n_out`.
    pub m: i32,
    /// `rows`.
    pub n: i32,
    /// `n_in`.
    pub k: i32,
    pub lda: i32,
    pub ldb: i32,
    pub ldc: i32,
}

/// The GEMM of a linear layer, checked against cuBLAS's 32-bit sizes.
pub fn gemm_dims(rows: usize, n_out: usize, n_in: usize) -> Result<GemmDims> {
    let fit = |v: usize, what: &str| {
        i32::try_from(v)
            .map_err(|_| ModelError::Input(format!("{what} {v} exceeds cuBLAS's 32-bit dimension")))
    };
    Ok(GemmDims {
        m: fit(n_out, "output width")?,
        n: fit(rows, "row count")?,
        k: fit(n_in, "input width")?,
        lda: fit(n_in, "input width")?,
        ldb: fit(n_in, "input width")?,
        ldc: fit(n_out, "output width")?,
    })
}

/// Per-query-row tables of an attention call: the row's absolute position and where its
/// sequence's block table starts in the flattened `blocks`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AttnRows {
    pub row_pos: Vec<u32>,
    pub row_blocks: Vec<u32>,
    pub blocks: Vec<u32>,
}

impl AttnRows {
    /// Refills the tables for `seqs` (laid out back to back in row order), reusing capacity.
    pub fn fill(&mut self, seqs: &[AttnSeq<'_>]) -> Result<()> {
        self.row_pos.clear();
        self.row_blocks.clear();
        self.blocks.clear();
        for s in seqs {
            if s.q_row0 != self.row_pos.len() {
                return Err(ModelError::Input(format!(
                    "attention rows out of order: a sequence starts at row {} after {} rows",
                    s.q_row0,
                    self.row_pos.len()
                )));
            }
            let start = self.blocks.len() as u32;
            self.blocks.extend_from_slice(s.blocks);
            for i in 0..s.n_q {
                self.row_pos.push((s.pos0 + i) as u32);
                self.row_blocks.push(start);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use std::{io::Write, process::Command};

    #[test]
    fn every_kernel_is_defined_once_in_the_source() {
        for k in KERNELS {
            let decl = format!("extern \"C\" __global__ void {k}(");
            assert_eq!(SOURCE.matches(&decl).count(), 1, "kernel {k}");
        }
        assert_eq!(
            SOURCE.matches("extern \"C\" __global__").count(),
            KERNELS.len(),
            "every kernel in the source is listed"
        );
        for (name, v) in [
            ("ATTN_WARPS", ATTN_WARPS as usize),
            ("ATTN_MAX_HEAD_DIM", ATTN_MAX_HEAD_DIM),
            ("ROUTER_MAX_EXPERTS", ROUTER_MAX_EXPERTS),
        ] {
            assert!(SOURCE.contains(&format!("#define {name} {v}\n")), "{name}");
        }
    }

    #[test]
    fn launch_geometry() {
        assert_eq!(elementwise(0).grid.0, 1);
        assert_eq!(elementwise(257).grid.0, 2);
        assert_eq!(elementwise(usize::MAX / 2).grid.0, MAX_ELEMENTWISE_BLOCKS);
        assert_eq!(per_row(3, 4096).block.0, 1024);
        assert_eq!(per_row(3, 40).block.0, 64);
        assert_eq!(per_row(3, 40).grid.0, 3);
        let shape = |heads, kv_heads, head_dim| AttnShape {
            heads,
            kv_heads,
            head_dim,
            block_size: 16,
            window: None,
        };
        let a = attention(5, &shape(32, 8, 128)).unwrap();
        assert_eq!((a.grid, a.block.0), ((5, 32, 1), 128));
        assert!(attention(5, &shape(32, 8, 512)).is_err());
        assert!(attention(5, &shape(32, 5, 64)).is_err());
        assert_eq!(router(300, 8, 2).unwrap().grid.0, 3);
        assert!(router(1, 8, 9).is_err());
        assert!(router(1, 512, 2).is_err());
    }

    #[test]
    fn gemm_dims_of_a_linear_layer() {
        let d = gemm_dims(7, 3584, 1024).unwrap();
        assert_eq!(
            (d.m, d.n, d.k, d.lda, d.ldb, d.ldc),
            (3584, 7, 1024, 1024, 1024, 3584)
        );
        assert!(gemm_dims(1 << 31, 8, 8).is_err());
    }

    #[test]
    fn attention_rows_flatten_block_tables() {
        let (a, b) = ([4u32, 9], [2u32]);
        let seqs = [
            AttnSeq {
                q_row0: 0,
                n_q: 3,
                pos0: 0,
                blocks: &a,
            },
            AttnSeq {
                q_row0: 3,
                n_q: 1,
                pos0: 17,
                blocks: &b,
            },
        ];
        let mut t = AttnRows::default();
        t.fill(&seqs).unwrap();
        assert_eq!(t.row_pos, [0, 1, 2, 17]);
        assert_eq!(t.row_blocks, [0, 0, 0, 2]);
        assert_eq!(t.blocks, [4, 9, 2]);
        let gap = [AttnSeq {
            q_row0: 1,
            n_q: 1,
            pos0: 0,
            blocks: &a,
        }];
        assert!(t.fill(&gap).is_err());
    }

    /// Declarations that let the CUDA source compile as host C++: the single-threaded
    /// "device" runs grid-stride and one-thread-per-row kernels exactly; warp-cooperative
    /// kernels (RMSNorm, attention) are only type-checked.
    const HOST_SHIM: &str = r#"
#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <vector>
#include <string>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
struct Dim3 { unsigned x, y, z; };
static Dim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(unsigned u) { return __uint_as_float(u); }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __shfl_xor_sync(unsigned, float, int) { std::abort(); }
inline void __syncthreads() {}
"#;

    /// Reads whitespace-separated numbers from stdin, runs one kernel single-threaded, prints
    /// its output.
    const HOST_MAIN: &str = r#"
static std::vector<double> in;
static size_t at = 0;
static double next() { return in[at++]; }
int main(int argc, char** argv) {
    double v; while (std::scanf("%lf", &v) == 1) in.push_back(v);
    std::string k = argv[1];
    if (k == "convert") {
        for (double x : in) {
            float f = (float)x;
            std::printf("%u %u %.9g\n", (unsigned)f32_to_bf16(f), (unsigned)f32_to_f16(f), (double)f16_to_f32(f32_to_f16(f)));
        }
    } else if (k == "rope") {
        int rows = next(), width = next(), hd = next(), max_pos = next();
        std::vector<unsigned> pos(rows); for (auto& p : pos) p = next();
        std::vector<float> c(max_pos * hd / 2), s(max_pos * hd / 2), x(rows * width);
        for (auto& e : c) e = next(); for (auto& e : s) e = next(); for (auto& e : x) e = next();
        rope(x.data(), c.data(), s.data(), pos.data(), rows, width, hd);
        for (float e : x) std::printf("%.9g\n", e);
    } else if (k == "router") {
        int rows = next(), ne = next(), topk = next();
        std::vector<float> l(rows * ne); for (auto& e : l) e = next();
        std::vector<unsigned> ids(rows * topk); std::vector<float> w(rows * topk);
        for (blockIdx.x = 0; blockIdx.x < (unsigned)rows; blockIdx.x++) router_topk(l.data(), ids.data(), w.data(), rows, ne, topk);
        for (int i = 0; i < rows * topk; i++) std::printf("%u %.9g\n", ids[i], w[i]);
    } else if (k == "ffn_tail") {
        long n = next();
        std::vector<float> g(n), u(n), x(n);
        for (auto& e : g) e = next(); for (auto& e : u) e = next(); for (auto& e : x) e = next();
        silu_mul(g.data(), u.data(), n);
        add_assign(x.data(), g.data(), n);
        for (float e : x) std::printf("%.9g\n", e);
    } else if (k == "kv_embed") {
        int rows = next(), kv_dim = next(), pos0 = next(), bs = next(), nb = next();
        std::vector<unsigned> blocks(nb); for (auto& b : blocks) b = next();
        std::vector<float> src(rows * kv_dim); for (auto& e : src) e = next();
        std::vector<float> cache(16 * bs * kv_dim, 0.0f);
        kv_write(cache.data(), src.data(), blocks.data(), rows, kv_dim, pos0, bs);
        std::vector<unsigned short> table(cache.size()); std::vector<unsigned> ids(rows);
        for (size_t i = 0; i < cache.size(); i++) table[i] = f32_to_bf16(cache[i]);
        for (int r = 0; r < rows; r++) { long p = pos0 + r; ids[r] = blocks[p / bs] * bs + p % bs; }
        std::vector<float> out(rows * kv_dim);
        embedding_bf16(table.data(), ids.data(), out.data(), rows, kv_dim);
        for (float e : out) std::printf("%.9g\n", e);
    }
    return 0;
}
"#;

    /// Builds the kernels as a host program once per test process.
    fn host_program() -> std::path::PathBuf {
        static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
        BUILT
            .get_or_init(|| {
                let dir =
                    std::env::temp_dir().join(format!("switchyard-kernels-{}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                let src = dir.join("kernels_host.cpp");
                std::fs::write(&src, format!("{HOST_SHIM}\n{SOURCE}\n{HOST_MAIN}")).unwrap();
                let exe = dir.join("kernels_host");
                let out = Command::new("g++")
                    .args(["-std=c++17", "-O1", "-Wall", "-Wno-unused-function", "-o"])
                    .arg(&exe)
                    .arg(&src)
                    .output()
                    .expect("g++ runs (scripts/setup.sh installs it)");
                assert!(
                    out.status.success(),
                    "the CUDA source does not compile as C++:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                exe
            })
            .clone()
    }

    fn run_host(kernel: &str, input: &[f64]) -> Vec<Vec<f64>> {
        let mut child = Command::new(host_program())
            .arg(kernel)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let text: String = input.iter().map(|v| format!("{v:e} ")).collect();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{kernel} failed");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.split_whitespace().map(|w| w.parse().unwrap()).collect())
            .collect()
    }

    fn lcg(n: usize, seed: u64, scale: f64) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            })
            .map(|v| f64::from(v as f32))
            .collect()
    }

    #[test]
    fn device_conversions_round_like_the_half_crate() {
        let mut xs = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            65504.0,
            65519.0,
            65520.0,
            1e6,
            -1e6,
            6.0e-8,
            3.0e-8,
            1.0e-5,
            -2.5e-6,
            0.1,
            1.0 / 3.0,
            1.00048828125,
            1.0009765625,
            2.7182817,
        ];
        xs.extend(lcg(200, 7, 100.0));
        xs.extend(lcg(100, 8, 1e-4));
        let out = run_host("convert", &xs);
        for (x, row) in xs.iter().zip(&out) {
            let f = *x as f32;
            assert_eq!(row[0] as u16, bf16::from_f32(f).to_bits(), "bf16 of {f}");
            assert_eq!(row[1] as u16, f16::from_f32(f).to_bits(), "f16 of {f}");
            assert_eq!(
                row[2] as f32,
                f16::from_f32(f).to_f32(),
                "f16 round trip of {f}"
            );
        }
    }

    #[test]
    fn rope_kernel_matches_the_cpu() {
        let (rows, width, hd, max_pos) = (3usize, 16usize, 8usize, 32usize);
        let (cos, sin) = crate::backend::cpu::ops::rope_tables(10000.0, hd, max_pos);
        let positions = [0u32, 5, 31];
        let x: Vec<f64> = lcg(rows * width, 3, 2.0);
        let mut input = vec![rows as f64, width as f64, hd as f64, max_pos as f64];
        input.extend(positions.iter().map(|&p| f64::from(p)));
        input.extend(cos.iter().chain(&sin).map(|&v| f64::from(v)));
        input.extend(&x);
        let got: Vec<f32> = run_host("rope", &input)
            .iter()
            .map(|r| r[0] as f32)
            .collect();
        let mut want: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        crate::backend::cpu::ops::rope(&mut want, width, hd, &positions, &cos, &sin);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{g} vs {w}");
        }
    }

    #[test]
    fn router_kernel_matches_the_cpu_route() {
        let (rows, ne, k) = (6usize, 8usize, 2usize);
        let mut logits: Vec<f64> = lcg(rows * ne, 11, 3.0);
        // A tie: the lower expert id wins, as on the CPU.
        logits[ne + 2] = 5.0;
        logits[ne + 6] = 5.0;
        let mut input = vec![rows as f64, ne as f64, k as f64];
        input.extend(&logits);
        let got = run_host("router", &input);
        let l32: Vec<f32> = logits.iter().map(|&v| v as f32).collect();
        let mut plan = crate::moe::RoutePlan::default();
        plan.route_into(&l32, rows, ne, k);
        for r in 0..rows {
            for i in 0..k {
                let g = &got[r * k + i];
                assert_eq!(g[0] as u16, plan.row_experts(r)[i], "row {r} slot {i}");
                assert!((g[1] as f32 - plan.row_weights(r)[i]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn silu_mul_and_add_kernels_match_the_cpu() {
        let n = 300;
        let (g, u, x) = (lcg(n, 1, 6.0), lcg(n, 2, 2.0), lcg(n, 3, 1.0));
        let mut input = vec![n as f64];
        input.extend(g.iter().chain(&u).chain(&x));
        let got = run_host("ffn_tail", &input);
        let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let (mut g32, u32_, mut x32) = (f(&g), f(&u), f(&x));
        crate::backend::cpu::ops::silu_mul(&mut g32, &u32_);
        crate::backend::cpu::ops::add_assign(&mut x32, &g32);
        for (r, w) in got.iter().zip(&x32) {
            assert!(
                (r[0] as f32 - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{} vs {w}",
                r[0]
            );
        }
    }

    #[test]
    fn kv_write_then_embedding_reads_back_the_rows() {
        let (rows, kv_dim, pos0, bs) = (5usize, 4usize, 6usize, 4usize);
        let blocks = [7.0, 2.0, 11.0];
        let src = lcg(rows * kv_dim, 5, 3.0);
        let mut input = vec![rows as f64, kv_dim as f64, pos0 as f64, bs as f64, 3.0];
        input.extend(blocks);
        input.extend(&src);
        let got = run_host("kv_embed", &input);
        for (g, s) in got.iter().zip(&src) {
            assert_eq!(g[0] as f32, bf16::from_f32(*s as f32).to_f32());
        }
    }
}
