//! `y = x · Wᵀ` for Q8_0 and Q4_0 weights (`weights::quant`): the activations are quantized to
//! 8 bits per 32-element block (a scale and 32 signed bytes, as llama.cpp's Q8_0 × Q8_0), and
//! each block's products are summed in integers.
//!
//! **Layout.** At load the weight blocks are copied into groups of [`GROUP`] output rows
//! ([`QTiles`]): for each input block, the 16 rows' quantized bytes interleaved four at a time,
//! so that one 512-bit register holds four inputs of each of the 16 rows and one `vpdpbusd`
//! against four broadcast activation bytes adds a four-term dot product into each row's lane;
//! then the 16 rows' f16 scales. The result for every row is one lane: no horizontal sums.
//!
//! **One order of arithmetic.** For row `j`, token `t` and input block `b`, every kernel computes
//! the block's integer dot product exactly and then
//! `acc = fma(f32(isum), f32(d_w[j][b]) · d_x[t][b], acc)` over `b` in order, from zero. The
//! integer sum is exact on every instruction set, so the AVX-512 VNNI, AVX2 and scalar kernels
//! give the same bits, whatever the number of token rows, their tile or the thread, and equal
//! the plain twin over the checkpoint's own blocks ([`linear_reference`]).
//!
//! Unsigned × signed: `vpdpbusd` and `vpmaddubsw` multiply unsigned bytes by signed ones. Q8_0
//! weights are kept offset by 128 (`w + 128`), Q4_0's are nibbles (`w + 8`), and the kernels
//! start each block's sum at `−128 · Σx` or `−8 · Σx`. AVX2's `vpmaddubsw` saturates 16-bit
//! pairs, so there Q8_0 takes the sign trick instead (`|w| · sign(w)·x`, at most 2·128·127).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

use super::{kernels::Isa, SendPtr};
use crate::weights::{quant::BLOCK, Elems, QuantFormat};
use rayon::prelude::*;
use std::cell::RefCell;

/// Output rows of a group: the i32 lanes of a 512-bit register.
pub const GROUP: usize = 16;

/// Token rows a kernel call takes at once (their accumulators are registers).
const TOKENS: usize = 8;

/// Weight bytes per parallel task, at least: enough streaming to amortise rayon's scheduling
/// at decode (a group of a 1024-wide Q4_0 weight is 9 KB).
const TASK_BYTES: usize = 64 << 10;

/// 64 bytes, cache-line aligned: the unit of the repacked weights.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

// SAFETY: 64 bytes with no padding; every bit pattern is valid.
unsafe impl bytemuck::Zeroable for Line {}
unsafe impl bytemuck::Pod for Line {}

/// A `[out, in]` Q8_0 or Q4_0 weight in the kernels' group order.
///
/// Group `g` (rows `16g ..`, zero rows past `out`) starts at byte `g · stride` and holds its
/// input blocks in pairs, each pair one sequential run of whole cache lines (decode streams a
/// weight once per token, and a second stream of scales elsewhere left the loads waiting on
/// memory): block `2p`'s quantized weights, block `2p + 1`'s, then their 16 f16 scales each
/// ([`quant_offset`], [`scale_offset`]). A block's quantized weights are, for Q8_0, eight
/// 64-byte lines, line `c` holding inputs `32b + 4c .. + 4` of each of the 16 rows as `w + 128`;
/// for Q4_0 four lines, line `c` holding bytes `4c .. 4c + 4` of each row's block: inputs
/// `4c ..` in the low nibbles and `16 + 4c ..` in the high ones.
pub struct QTiles {
    format: QuantFormat,
    out: usize,
    inp: usize,
    stride: usize,
    data: Vec<Line>,
}

impl std::fmt::Debug for QTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QTiles")
            .field("format", &self.format)
            .field("out", &self.out)
            .field("inp", &self.inp)
            .finish_non_exhaustive()
    }
}

impl QTiles {
    /// Quantized bytes per block of a group.
    fn quant_bytes(format: QuantFormat) -> usize {
        match format {
            QuantFormat::Q8_0 => GROUP * BLOCK,
            QuantFormat::Q4_0 => GROUP * BLOCK / 2,
        }
    }

    fn empty(format: QuantFormat, out: usize, inp: usize) -> Self {
        let blocks = inp / BLOCK;
        let stride = blocks.div_ceil(2) * pair_bytes(format);
        let groups = out.div_ceil(GROUP);
        Self {
            format,
            out,
            inp,
            stride,
            data: vec![Line([0; 64]); groups * stride / 64],
        }
    }

    /// A weight of no rows, to fill unused slots of a pass.
    #[must_use]
    pub fn empty_placeholder() -> Self {
        Self::empty(QuantFormat::Q8_0, 0, 0)
    }

    /// Packs `w`, a `[out, in]` weight stored as Q8_0 or Q4_0 blocks; None for other dtypes or
    /// an input width that is not a multiple of the block.
    #[must_use]
    pub fn from_blocks(w: Elems<'_>, out: usize) -> Option<Self> {
        let (format, bytes) = match w {
            Elems::Q8_0(b) => (QuantFormat::Q8_0, bytemuck::cast_slice::<_, u8>(b)),
            Elems::Q4_0(b) => (QuantFormat::Q4_0, bytemuck::cast_slice::<_, u8>(b)),
            _ => return None,
        };
        let inp = w.len() / out.max(1);
        if out == 0 || !inp.is_multiple_of(BLOCK) || w.len() != out * inp {
            return None;
        }
        let row_bytes = format.bytes_for(inp);
        let mut t = Self::empty(format, out, inp);
        t.fill(|r, dst| dst.copy_from_slice(&bytes[r * row_bytes..(r + 1) * row_bytes]));
        Some(t)
    }

    /// Quantizes `w`, a float `[out, in]` weight, into `format` and packs it: the same blocks,
    /// so the same bits, as [`QTiles::from_blocks`] on a checkpoint quantized ahead of time.
    #[must_use]
    pub fn quantize(w: Elems<'_>, out: usize, format: QuantFormat) -> Option<Self> {
        let inp = w.len() / out.max(1);
        if out == 0 || !inp.is_multiple_of(BLOCK) || w.len() != out * inp || w.is_quantized() {
            return None;
        }
        let mut t = Self::empty(format, out, inp);
        t.fill(|r, dst| {
            let mut row = vec![0f32; inp];
            w.to_f32_into(r * inp..(r + 1) * inp, &mut row);
            format.quantize_into(&row, dst);
        });
        Some(t)
    }

    /// Fills every group from its rows' blocks, `row(r, dst)` writing row r's blocks (in the
    /// checkpoint's layout) into `dst`; groups in parallel.
    fn fill(&mut self, row: impl Fn(usize, &mut [u8]) + Sync) {
        let (format, out, inp, stride) = (self.format, self.out, self.inp, self.stride);
        let (bb, blocks, qb) = (format.block_bytes(), inp / BLOCK, Self::quant_bytes(format));
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut self.data);
        bytes
            .par_chunks_mut(stride)
            .enumerate()
            .for_each(|(g, dst)| {
                let mut src = vec![0u8; format.bytes_for(inp)];
                for l in 0..GROUP.min(out - g * GROUP) {
                    row(g * GROUP + l, &mut src);
                    for b in 0..blocks {
                        let blk = &src[b * bb..(b + 1) * bb];
                        dst[scale_offset(format, b) + l * 2..][..2].copy_from_slice(&blk[..2]);
                        let q = &mut dst[quant_offset(format, b)..][..qb];
                        match format {
                            QuantFormat::Q8_0 => {
                                for c in 0..BLOCK / 4 {
                                    for i in 0..4 {
                                        q[c * 64 + l * 4 + i] = blk[2 + 4 * c + i] ^ 0x80;
                                    }
                                }
                            }
                            QuantFormat::Q4_0 => {
                                for c in 0..BLOCK / 8 {
                                    q[c * 64 + l * 4..][..4]
                                        .copy_from_slice(&blk[2 + 4 * c..][..4]);
                                }
                            }
                        }
                    }
                }
            });
    }

    /// The format of the blocks.
    #[must_use]
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Output rows.
    #[must_use]
    pub fn out(&self) -> usize {
        self.out
    }

    /// Input width.
    #[must_use]
    pub fn inp(&self) -> usize {
        self.inp
    }

    /// Bytes held (the quantized weights and their scales, with padding rows).
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.data.len() * 64
    }

    fn groups(&self) -> usize {
        self.out.div_ceil(GROUP)
    }

    /// Groups per parallel task.
    fn groups_per_task(&self) -> usize {
        TASK_BYTES
            .div_ceil(self.stride)
            .clamp(1, self.groups().max(1))
    }

    /// Group `g`'s bytes.
    fn group(&self, g: usize) -> &[u8] {
        let bytes: &[u8] = bytemuck::cast_slice(&self.data);
        &bytes[g * self.stride..(g + 1) * self.stride]
    }
}

/// Bytes of a pair of blocks in a group: both blocks' quantized weights, then both's scales.
fn pair_bytes(format: QuantFormat) -> usize {
    2 * QTiles::quant_bytes(format) + 2 * GROUP * 2
}

/// Where block `b`'s quantized weights start in a group.
#[inline]
fn quant_offset(format: QuantFormat, b: usize) -> usize {
    (b / 2) * pair_bytes(format) + (b % 2) * QTiles::quant_bytes(format)
}

/// Where block `b`'s 16 f16 scales start in a group.
#[inline]
fn scale_offset(format: QuantFormat, b: usize) -> usize {
    (b / 2) * pair_bytes(format) + 2 * QTiles::quant_bytes(format) + (b % 2) * GROUP * 2
}

/// Token rows quantized to 8 bits per block: `q[t][k] ≈ x[t][k] / d[t][b]`, and each block's
/// `Σ q` for the kernels' offsets.
#[derive(Clone, Copy)]
pub struct QActs<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub sum: &'a [i32],
    pub inp: usize,
}

impl QActs<'_> {
    fn blocks(&self) -> usize {
        self.inp / BLOCK
    }
}

/// Quantizes `rows` rows of `x` (`[rows, inp]`) per 32-element block: `d = max|x| / 127`,
/// `q = x / d` rounded to nearest even, so a row's bytes depend only on that row.
pub fn quantize_acts(
    x: &[f32],
    rows: usize,
    inp: usize,
    q: &mut [i8],
    d: &mut [f32],
    sum: &mut [i32],
) {
    let blocks = inp / BLOCK;
    for (i, xb) in x[..rows * inp].chunks_exact(BLOCK).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        let qb = &mut q[i * BLOCK..(i + 1) * BLOCK];
        let mut s = 0i32;
        for (o, v) in qb.iter_mut().zip(xb) {
            *o = round_even(v * id).clamp(-127.0, 127.0) as i8;
            s += i32::from(*o);
        }
        d[i] = scale;
        sum[i] = s;
    }
    debug_assert_eq!(d.len().min(rows * blocks), rows * blocks);
}

/// `v` rounded to the nearest integer, ties to even, for |v| ≤ 2²²: adding and taking away
/// 1.5 · 2²³ leaves no fraction bits, and the add rounds as the FPU does. The same bits as
/// `round_ties_even`, which compiles to a libm call on baseline x86-64 and took a few percent
/// of decode; NaN stays NaN (and casts to 0).
#[inline]
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// The kernels' instruction sets, best last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum QIsa {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl QIsa {
    /// The quant kernels for the float kernels' choice `isa`: AVX-512 with VNNI where the CPU
    /// has it, else AVX2's.
    #[must_use]
    pub fn for_isa(isa: Isa) -> QIsa {
        #[cfg(target_arch = "x86_64")]
        {
            if isa >= Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512vnni") {
                return QIsa::Avx512Vnni;
            }
            if isa >= Isa::Avx2 {
                return QIsa::Avx2;
            }
        }
        let _ = isa;
        QIsa::Scalar
    }

    /// Every instruction set this CPU runs, for tests.
    #[must_use]
    pub fn available() -> Vec<QIsa> {
        let best = QIsa::for_isa(Isa::best());
        [QIsa::Scalar, QIsa::Avx2, QIsa::Avx512Vnni]
            .into_iter()
            .filter(|&i| i <= best)
            .collect()
    }
}

thread_local! {
    /// Quantized activations (bytes, block scales, block sums), one free list each: a linear
    /// that starts on this thread while another waits on it takes a second buffer, so after
    /// the first steps nothing allocates (`super::with_scratch`).
    static ACT_Q: super::Scratch = const { RefCell::new(Vec::new()) };
    static ACT_D: super::Scratch = const { RefCell::new(Vec::new()) };
    static ACT_S: super::Scratch = const { RefCell::new(Vec::new()) };
}

/// `ys[i] = x · ws[i]ᵀ` for quantized weights of one input width, the activations quantized
/// once for all of them, on the best kernels of this CPU.
pub fn linear_many(x: &[f32], rows: usize, parts: &mut [(&QTiles, &mut [f32])]) {
    linear_many_with(QIsa::for_isa(super::isa()), x, rows, parts);
}

/// [`linear_many`] on a given instruction set (at most what the CPU has).
pub fn linear_many_with(isa: QIsa, x: &[f32], rows: usize, parts: &mut [(&QTiles, &mut [f32])]) {
    let Some(inp) = parts.first().map(|(w, _)| w.inp()) else {
        return;
    };
    if rows == 0 {
        return;
    }
    let blocks = inp / BLOCK;
    for (w, y) in parts.iter() {
        assert!(w.inp() == inp, "quantized parts of different input widths");
        assert!(y.len() >= rows * w.out() && x.len() >= rows * inp);
    }
    super::with_scratch(&ACT_Q, rows * inp, |q: &mut [i8]| {
        super::with_scratch(&ACT_D, rows * blocks, |d: &mut [f32]| {
            super::with_scratch(&ACT_S, rows * blocks, |s: &mut [i32]| {
                quantize_acts(x, rows, inp, q, d, s);
                let acts = QActs { q, d, sum: s, inp };
                for chunk in parts.chunks_mut(super::MAX_PARTS) {
                    run_parts(isa, acts, rows, chunk);
                }
            });
        });
    });
}

/// Every group of up to [`super::MAX_PARTS`] parts in one parallel pass, runs of groups a task.
fn run_parts(isa: QIsa, acts: QActs<'_>, rows: usize, parts: &mut [(&QTiles, &mut [f32])]) {
    let first: &QTiles = parts[0].0;
    let mut jobs = [(first, SendPtr(std::ptr::null_mut())); super::MAX_PARTS];
    for (job, (w, y)) in jobs.iter_mut().zip(parts.iter_mut()) {
        *job = (*w, SendPtr(y.as_mut_ptr()));
    }
    let jobs = &jobs[..parts.len()];
    let (firsts, n, tasks) = super::task_firsts(
        jobs.iter()
            .map(|(w, _)| w.groups().div_ceil(w.groups_per_task())),
    );
    let firsts = &firsts[..n];
    (0..tasks).into_par_iter().for_each(|task| {
        let i = firsts.iter().rposition(|&f| f <= task).unwrap_or(0);
        let (w, yp) = jobs[i];
        let per = w.groups_per_task();
        let g0 = (task - firsts[i]) * per;
        for g in g0..(g0 + per).min(w.groups()) {
            run_group(isa, w, g, acts, rows, yp);
        }
    });
}

/// `y[t][16g + l]` for every token row `t < rows` and row `l` of group `g`.
fn run_group(isa: QIsa, w: &QTiles, g: usize, acts: QActs<'_>, rows: usize, yp: SendPtr) {
    let grp = w.group(g);
    let valid = GROUP.min(w.out - g * GROUP);
    let mut t0 = 0;
    while t0 < rows {
        let n = TOKENS.min(rows - t0);
        let mut acc = [[0f32; GROUP]; TOKENS];
        let a = QActs {
            q: &acts.q[t0 * acts.inp..(t0 + n) * acts.inp],
            d: &acts.d[t0 * acts.blocks()..(t0 + n) * acts.blocks()],
            sum: &acts.sum[t0 * acts.blocks()..(t0 + n) * acts.blocks()],
            inp: acts.inp,
        };
        group_dots(isa, w.format, grp, a, n, &mut acc);
        for (t, row) in acc.iter().enumerate().take(n) {
            // SAFETY: rows 16g .. 16g + valid of token t0 + t are this group's alone, and
            // the caller checked that y holds rows · out elements.
            unsafe {
                let dst = yp.get().add((t0 + t) * w.out + g * GROUP);
                std::ptr::copy_nonoverlapping(row.as_ptr(), dst, valid);
            }
        }
        t0 += n;
    }
}

/// One group against `n ≤ TOKENS` token rows, on `isa`.
fn group_dots(
    isa: QIsa,
    format: QuantFormat,
    grp: &[u8],
    a: QActs<'_>,
    n: usize,
    acc: &mut [[f32; GROUP]; TOKENS],
) {
    assert!(grp.len() >= a.blocks().div_ceil(2) * pair_bytes(format));
    assert!(n <= TOKENS && a.q.len() >= n * a.inp && a.d.len() >= n * a.blocks());
    assert!(a.sum.len() >= n * a.blocks());
    match isa {
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx512Vnni => avx512::group_dots(format, grp, a, n, acc),
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx2 => avx2::group_dots(format, grp, a, n, acc),
        _ => scalar_group(format, grp, a, n, acc),
    }
}

/// The scalar kernel over the packed layout.
fn scalar_group(
    format: QuantFormat,
    grp: &[u8],
    a: QActs<'_>,
    n: usize,
    acc: &mut [[f32; GROUP]; TOKENS],
) {
    let (blocks, qb) = (a.blocks(), QTiles::quant_bytes(format));
    for (t, acc_t) in acc.iter_mut().enumerate().take(n) {
        for (l, acc_tl) in acc_t.iter_mut().enumerate() {
            let mut sum = 0f32;
            for b in 0..blocks {
                let q = &grp[quant_offset(format, b)..][..qb];
                let x = &a.q[t * a.inp + b * BLOCK..][..BLOCK];
                let mut isum = 0i32;
                for (k, &xk) in x.iter().enumerate() {
                    let w = match format {
                        QuantFormat::Q8_0 => {
                            i32::from((q[(k / 4) * 64 + l * 4 + k % 4] ^ 0x80) as i8)
                        }
                        QuantFormat::Q4_0 => {
                            let c = (k % 16) / 4;
                            let byte = q[c * 64 + l * 4 + k % 4];
                            i32::from(if k < 16 { byte & 0x0F } else { byte >> 4 }) - 8
                        }
                    };
                    isum += w * i32::from(xk);
                }
                let s = scale_offset(format, b) + 2 * l;
                let dw = half::f16::from_bits(u16::from_le_bytes([grp[s], grp[s + 1]])).to_f32();
                sum = (isum as f32).mul_add(dw * a.d[t * blocks + b], sum);
            }
            *acc_tl = sum;
        }
    }
}

/// The plain twin: `y[t][j]` from the checkpoint's own blocks (`w`, `[out, in]`) and the same
/// quantized activations, in the one order every kernel keeps. Tests compare every kernel with
/// it bit for bit.
pub fn linear_reference(x: &[f32], rows: usize, w: Elems<'_>, out: usize, y: &mut [f32]) {
    let inp = w.len() / out;
    let blocks = inp / BLOCK;
    let mut q = vec![0i8; rows * inp];
    let mut d = vec![0f32; rows * blocks];
    let mut s = vec![0i32; rows * blocks];
    quantize_acts(x, rows, inp, &mut q, &mut d, &mut s);
    for t in 0..rows {
        for j in 0..out {
            let mut sum = 0f32;
            for b in 0..blocks {
                let (dw, wq): (f32, Vec<i32>) = match w {
                    Elems::Q8_0(bl) => {
                        let blk = &bl[j * blocks + b];
                        (blk.scale(), (0..BLOCK).map(|i| blk.q(i)).collect())
                    }
                    Elems::Q4_0(bl) => {
                        let blk = &bl[j * blocks + b];
                        (blk.scale(), (0..BLOCK).map(|i| blk.q(i)).collect())
                    }
                    _ => panic!("linear_reference takes quantized weights"),
                };
                let x = &q[t * inp + b * BLOCK..][..BLOCK];
                let isum: i32 = wq.iter().zip(x).map(|(w, &x)| w * i32::from(x)).sum();
                sum = (isum as f32).mul_add(dw * d[t * blocks + b], sum);
            }
            y[t * out + j] = sum;
        }
    }
}

#[cfg(test)]
mod tests;
