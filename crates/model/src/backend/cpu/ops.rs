//! Element-wise and row-wise CPU ops: RMSNorm, RoPE, SwiGLU, residual add, embedding lookup.

use crate::weights::Elems;
use rayon::prelude::*;

/// Rows per parallel task for cheap row-wise ops; below this the work is not worth splitting.
const ROWS_PER_TASK: usize = 8;

/// `out[r] = w ⊙ x[r] / sqrt(mean(x[r]²) + eps)`, as transformers' `MixtralRMSNorm` in f32.
pub fn rms_norm(x: &[f32], w: Elems<'_>, eps: f32, width: usize, out: &mut [f32]) {
    let rows = x.len() / width;
    out[..rows * width]
        .par_chunks_mut(width * ROWS_PER_TASK)
        .zip(x.par_chunks(width * ROWS_PER_TASK))
        .for_each(|(o, xi)| {
            for (orow, xrow) in o.chunks_mut(width).zip(xi.chunks(width)) {
                let ms = xrow.iter().map(|v| v * v).sum::<f32>() / width as f32;
                let inv = 1.0 / (ms + eps).sqrt();
                for (k, (ov, xv)) in orow.iter_mut().zip(xrow).enumerate() {
                    *ov = w.get_f32(k) * (xv * inv);
                }
            }
        });
}

/// Rotates every head of every row in place, HF "rotate_half" layout: the pairs are
/// `(i, i + d/2)`, not adjacent elements. `cos`/`sin` are `[positions, d/2]` tables.
pub fn rope(
    x: &mut [f32],
    width: usize,
    head_dim: usize,
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
) {
    let half = head_dim / 2;
    x.par_chunks_mut(width)
        .zip(positions.par_iter())
        .for_each(|(row, &p)| {
            let c = &cos[p as usize * half..(p as usize + 1) * half];
            let s = &sin[p as usize * half..(p as usize + 1) * half];
            for head in row.chunks_mut(head_dim) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * c[i] - x2 * s[i];
                    b[i] = x2 * c[i] + x1 * s[i];
                }
            }
        });
}

/// The RoPE tables for positions `0..max_pos`, computed as transformers does in f32:
/// `inv_freq[i] = 1 / theta^(2i/d)`, `angle = pos · inv_freq[i]`.
#[must_use]
pub fn rope_tables(theta: f64, head_dim: usize, max_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = vec![0.0; max_pos * half];
    let mut sin = vec![0.0; max_pos * half];
    for p in 0..max_pos {
        for i in 0..half {
            let ang = p as f32 * inv[i];
            cos[p * half + i] = ang.cos();
            sin[p * half + i] = ang.sin();
        }
    }
    (cos, sin)
}

/// `gate = silu(gate) ⊙ up`, in registers where the CPU has AVX-512F or AVX2+FMA (and
/// `SWITCHYARD_CPU_KERNELS` does not ask for less): one scalar `exp` per element cost a
/// 1,024-token prompt's prefill about 8 % of its time on a 2-core Xeon.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    gate.par_chunks_mut(4096)
        .zip(up.par_chunks(4096))
        .for_each(|(g, u)| {
            #[cfg(target_arch = "x86_64")]
            {
                use super::linear::{isa, Isa};
                let isa = isa();
                if isa >= Isa::Avx512 {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { silu_mul_avx512(g, u) };
                }
                if isa >= Isa::Avx2 {
                    // SAFETY: the CPU has AVX2 and FMA (Isa::Avx2 includes FMA).
                    return unsafe { silu_mul_avx2(g, u) };
                }
            }
            silu_mul_scalar(g, u);
        });
}

fn silu_mul_scalar(g: &mut [f32], u: &[f32]) {
    for (gv, uv) in g.iter_mut().zip(u) {
        *gv = *gv / (1.0 + (-*gv).exp()) * uv;
    }
}

/// [`silu_mul`] of one chunk, a register at a time, the tail scalar.
#[cfg(target_arch = "x86_64")]
macro_rules! silu_mul_simd {
    ($name:ident, $S:ty, $features:literal) => {
        /// # Safety
        /// The CPU must have the instruction set.
        #[target_feature(enable = $features)]
        unsafe fn $name(g: &mut [f32], u: &[f32]) {
            use super::simd::Simd;
            type S = $S;
            let n = g.len().min(u.len());
            let whole = n - n % S::LANES;
            // SAFETY: the loads and stores stay inside the first `whole` elements of both.
            unsafe {
                let one = S::splat(1.0);
                for i in (0..whole).step_by(S::LANES) {
                    let x = S::load(g.as_ptr().add(i));
                    // x / (1 + e^−x): e^−x saturates at e^88.3 for x below −88.3, where the
                    // scalar form's inf gives −0 and this a value under 1e−36 in size.
                    let e = S::exp(S::sub(S::zero(), x));
                    let s = S::div(x, S::add(one, e));
                    S::store(g.as_mut_ptr().add(i), S::mul(s, S::load(u.as_ptr().add(i))));
                }
            }
            // The tail in a register too, through a zero-padded copy: the scalar `exp` rounds
            // differently, and which elements form the tail depends on how many rows the call
            // had, so a row's bits would depend on its batch.
            if whole < n {
                let (mut gt, mut ut) = ([0f32; 16], [0f32; 16]);
                gt[..n - whole].copy_from_slice(&g[whole..n]);
                ut[..n - whole].copy_from_slice(&u[whole..n]);
                // SAFETY: one register's lanes (at most 16) inside the two local arrays.
                unsafe {
                    let x = S::load(gt.as_ptr());
                    let e = S::exp(S::sub(S::zero(), x));
                    let s = S::div(x, S::add(S::splat(1.0), e));
                    S::store(gt.as_mut_ptr(), S::mul(s, S::load(ut.as_ptr())));
                }
                g[whole..n].copy_from_slice(&gt[..n - whole]);
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
silu_mul_simd!(silu_mul_avx512, super::simd::Avx512, "avx512f");
#[cfg(target_arch = "x86_64")]
silu_mul_simd!(silu_mul_avx2, super::simd::Avx2, "avx2,fma");

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(4096)
        .zip(y.par_chunks(4096))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

/// Copies (widening) table rows `ids` into `out` (`[ids.len(), width]`).
pub fn embedding(table: Elems<'_>, width: usize, ids: &[u32], out: &mut [f32]) {
    for (row, &id) in out.chunks_mut(width).zip(ids) {
        let start = id as usize * width;
        table.to_f32_into(start..start + width, row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5, 0.0, 0.0, 0.0, 4.0];
        let w = [0.5f32, 1.0, 2.0, -1.0];
        let mut out = [0.0; 8];
        rms_norm(&x, Elems::F32(&w), 1e-5, 4, &mut out);
        let ms = (1.0 + 4.0 + 9.0 + 0.25) / 4.0;
        let inv = 1.0 / (ms + 1e-5f32).sqrt();
        assert!((out[2] - 2.0 * 3.0 * inv).abs() < 1e-6);
        assert!((out[7] - (-4.0 / (4.0f32 + 1e-5).sqrt())).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_half_pairs_and_keeps_norm() {
        let (cos, sin) = rope_tables(10000.0, 4, 8);
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0];
        rope(&mut x, 4, 4, &[0], &cos, &sin);
        assert_eq!(x, vec![1.0, 2.0, 3.0, 4.0], "position 0 is the identity");
        let mut y = vec![1.0f32, 2.0, 3.0, 4.0];
        rope(&mut y, 4, 4, &[3], &cos, &sin);
        // Pair (0, 2) rotates by angle 3 · theta^0 = 3 rad.
        assert!((y[0] - (1.0 * 3f32.cos() - 3.0 * 3f32.sin())).abs() < 1e-6);
        assert!((y[2] - (3.0 * 3f32.cos() + 1.0 * 3f32.sin())).abs() < 1e-6);
        let n0: f32 = [1.0f32, 2.0, 3.0, 4.0].iter().map(|v| v * v).sum();
        let n1: f32 = y.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }

    /// Every silu_mul this CPU runs against f64, from far below the exp floor to far above,
    /// with a scalar tail.
    #[test]
    fn silu_mul_matches_f64_over_the_range() {
        let n = 1003;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 - 501.0) * 0.2).collect();
        let u: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
        type Kernel = fn(&mut [f32], &[f32]);
        let mut kernels: Vec<(&str, Kernel)> =
            vec![("scalar", silu_mul_scalar), ("dispatched", silu_mul)];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                kernels.push(("avx512", |g, u| unsafe { silu_mul_avx512(g, u) }));
            }
            if has!("avx2") && has!("fma") {
                // SAFETY: the CPU has AVX2 and FMA.
                kernels.push(("avx2", |g, u| unsafe { silu_mul_avx2(g, u) }));
            }
        }
        for (name, kernel) in kernels {
            let mut got = g.clone();
            kernel(&mut got, &u);
            for (i, ((x, w), v)) in g.iter().zip(&u).zip(&got).enumerate() {
                let x = f64::from(*x);
                let want = x / (1.0 + (-x).exp()) * f64::from(*w);
                assert!(
                    (f64::from(*v) - want).abs() <= 1e-6 * want.abs() + 1e-30,
                    "{name}: element {i}, silu({x}) · {w} = {v}, want {want}"
                );
            }
        }
    }

    #[test]
    fn silu_mul_and_add() {
        let mut g = vec![0.0f32, 1.0, -1.0];
        silu_mul(&mut g, &[2.0, 2.0, 2.0]);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
        let mut a = vec![1.0f32, 2.0];
        add_assign(&mut a, &[0.5, -2.0]);
        assert_eq!(a, vec![1.5, 0.0]);
    }

    /// Every row-wise op gives a row the bits it gets alone, whatever the rows beside it (1 to
    /// 64; tasks split rows by 8 and SwiGLU by 4096 elements, so a row lands anywhere in a
    /// task and in a register); SwiGLU on every instruction set this CPU has, at a width whose
    /// rows end mid-register.
    #[test]
    fn a_rows_bits_do_not_depend_on_the_rows_beside_it() {
        let (width, hd) = (74, 74 / 2);
        let data = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2000)
                .map(|v| v as f32 / 250.0 - 4.0)
                .collect()
        };
        let x = data(64 * width, 1);
        let (up, w) = (data(64 * width, 2), data(width, 3));
        let (cos, sin) = rope_tables(1e6, hd, 128);
        let positions: Vec<u32> = (0..64).map(|i| (i * 7 % 128) as u32).collect();
        type Silu = fn(&mut [f32], &[f32]);
        let mut silus: Vec<(&str, Silu)> =
            vec![("scalar", silu_mul_scalar), ("selected", silu_mul)];
        #[cfg(target_arch = "x86_64")]
        {
            use super::super::linear::{isa, Isa};
            // SAFETY (both): the CPU has the instruction set, checked before each is listed.
            fn avx512(g: &mut [f32], u: &[f32]) {
                unsafe { silu_mul_avx512(g, u) }
            }
            fn avx2(g: &mut [f32], u: &[f32]) {
                unsafe { silu_mul_avx2(g, u) }
            }
            if isa() >= Isa::Avx512 {
                silus.push(("avx512", avx512));
            }
            if isa() >= Isa::Avx2 {
                silus.push(("avx2", avx2));
            }
        }
        // An op over rows `r` of the inputs, into `o`.
        type Op<'a> = Box<dyn Fn(&mut [f32], std::ops::Range<usize>) + 'a>;
        let el = |r: &std::ops::Range<usize>| r.start * width..r.end * width;
        let mut ops: Vec<(&str, Op<'_>)> = vec![
            (
                "rms_norm",
                Box::new(|o, r| rms_norm(&x[el(&r)], Elems::F32(&w), 1e-5, width, o)),
            ),
            (
                "rope",
                Box::new(|o, r| {
                    o.copy_from_slice(&x[el(&r)]);
                    rope(o, width, hd, &positions[r], &cos, &sin);
                }),
            ),
            (
                "add_assign",
                Box::new(|o, r| {
                    o.copy_from_slice(&x[el(&r)]);
                    add_assign(o, &up[el(&r)]);
                }),
            ),
        ];
        for (name, f) in silus {
            let up = &up;
            let x = &x;
            ops.push((
                name,
                Box::new(move |o, r| {
                    o.copy_from_slice(&x[el(&r)]);
                    f(o, &up[el(&r)]);
                }),
            ));
        }
        for (name, op) in &ops {
            let mut alone = vec![f32::NAN; 64 * width];
            for (r, o) in alone.chunks_mut(width).enumerate() {
                op(o, r..r + 1);
            }
            for rows in 1..=64 {
                let mut y = vec![f32::NAN; rows * width];
                op(&mut y, 0..rows);
                let same = y
                    .iter()
                    .zip(&alone)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{name}: {rows} rows");
            }
        }
    }
}
