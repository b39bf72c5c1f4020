//! `y = x · Wᵀ` for weights in their stored dtype (`W` is `[out, in]`, as in every HF Linear).
//!
//! Two paths, each the reference for the other in tests:
//! - **rows ≤ [`DOT_MAX_ROWS`]** (decode, expert batches, short prefill chunks): every weight
//!   row is streamed from memory once and dotted with all token rows while it is in L1.
//!   bf16/f16 are widened in registers (exact), accumulation is f32. From `TILE_MIN_ROWS`
//!   tokens, weight rows go in register tiles of three, so each x vector loaded feeds three
//!   rows' FMAs; bf16 tiles read the activations with each block laid out evens first
//!   (`kernels::Pairing`), so one weight load widens with a shift and a mask.
//! - **larger batches** (long prefill): weight rows are widened to f32 in blocks of
//!   `GEMM_BLOCK` into a per-thread buffer and multiplied with the `gemm` crate, whose
//!   cache blocking keeps x in cache once x outgrows L2.
//! - **bf16 activations** ([`bf16_activations`], AVX-512 BF16): bf16 weights meet activations
//!   rounded to bf16 in `vdpbf16ps` tiles at every row count, one row included, so a token's
//!   result does not depend on how many rows its step had.
//!
//! - **CPUs with AMX** (`amx.rs`): bf16 weights of inputs a multiple of 32 against
//!   [`AMX_MIN_ROWS`] token rows or more go through AMX tiles instead of either path, with the
//!   activations split into three bf16 parts so nothing is rounded. With bf16 activations they
//!   go there at every row count, one part each (a third of the products).
//!
//! The dot kernels come per instruction set ([`Isa`]: AMX, AVX-512, AVX2, scalar), chosen once
//! at run time; `SWITCHYARD_CPU_KERNELS` picks a lower one for comparisons.
//!
//! Both paths are deterministic: a given row's result depends only on its inputs, never on thread
//! scheduling, which is what lets a cluster reproduce embedded mode bit for bit.

/// `$f::<R, N>(args)` with the token count `$n` (1..=4) as the constant N, so a kernel's
/// accumulators for each count are registers.
macro_rules! with_tokens {
    ($n:expr, $f:ident::<$r:tt $(, $g:tt)*>($($a:expr),* $(,)?)) => {
        match $n {
            1 => $f::<$r, 1 $(, $g)*>($($a),*),
            2 => $f::<$r, 2 $(, $g)*>($($a),*),
            3 => $f::<$r, 3 $(, $g)*>($($a),*),
            _ => $f::<$r, 4 $(, $g)*>($($a),*),
        }
    };
}

mod kernels;
pub mod quant;
mod stream;
mod tiles;

use tiles::Line;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

pub use kernels::{
    auto_bf16_activations, bf16_activations, deterministic, has_avx512_bf16, isa,
    set_bf16_activations, set_deterministic, signature, Isa,
};

pub use quant::QTiles;
pub use stream::stream_sum;
pub use tiles::Tiles;

use crate::weights::Elems;
use kernels::{Lhs, Pairing, Plan};
use rayon::prelude::*;
use std::cell::RefCell;

/// Up to this many token rows the dot path wins, with f32 activations. Measured with
/// `cargo run --release -p switchyard-model --example bench_linear` on expert shapes (bf16,
/// 3584×1024 and 1024×3584, 2 threads, AVX2): with three-row tiles the dot path ran at
/// 85-105 GFLOP/s at 32 rows against the gemm path's 41-62, and 93-119 against 67-107 at 64
/// and 128 rows; from 256 rows the two tie, and x no longer fits in L2. With the AVX-512 tiles
/// (Xeon): 120-150 against 133-145 at 128 rows, 75-158 against 155-167 at 256, 71-110 against
/// 166-180 at 512. The bf16-activation tiles beat the gemm path at every row count measured and
/// serve them all: bf16x against gemm on a Zen 4 VM, GFLOP/s on w1/w2, 311/291 against 134/181
/// at 128 rows, 318/245 against 180/187 at 256, 281/249 against 202/195 at 1024, 260/201
/// against 204/175 at 2048.
pub const DOT_MAX_ROWS: usize = 128;

/// From this many token rows the dot path takes weight rows in tiles. Below it a step is bound
/// by reading the weights and tiling did not help (A/B at 8 sequences, hidden 1024, 2 threads:
/// ITL 75-83 ms single rows, 95-97 ms paired); at 32 sequences pairing took ITL p50 from
/// 216-268 ms to 200-226 ms, and three-row tiles took the 8-32-row expert GEMMs from 36-78
/// to 42-105 GFLOP/s.
const TILE_MIN_ROWS: usize = 4;

/// Weight rows widened per gemm call: 64 rows × in ≤ 14336 f32 stays within L2.
const GEMM_BLOCK: usize = 64;

/// From this many token rows bf16 weights go through AMX tiles where the CPU has them. AMX
/// tile loads stream weights from memory slower than the dot kernel's single-row loads, so
/// below a few rows the dot path wins. bench_linear on expert shapes with a 700 MB weight set
/// (`--mats 100`, more than the Xeon's L3), 2 threads, GB/s of weights dot against AMX on
/// w1/w2 (in 1024 / 3584), two runs: 22-23/21 against 18/21 at 2 rows, 21/18 against 17/20 at
/// 3, 16-17/16 against 17/20 at 4, 14-15/12 against 17/19-20 at 5, 14/12 against 17/19 at 6,
/// 14/12 against 16-17/18-19 at 7. Whole-model bench, hidden 1024, 32 sequences, five
/// interleaved rounds: 238.9 tok/s median from 4 rows against 235.8 from 8 (ahead in 4 of 5).
pub const AMX_MIN_ROWS: usize = 4;

/// Weights [`linear_many`] takes in one pass (q/k/v is the most the model asks for).
pub const MAX_PARTS: usize = 4;

/// Output rows per parallel task on the dot path: enough to amortise rayon's scheduling, and a
/// multiple of the three-row tile.
const DOT_BLOCK: usize = 24;

/// A raw pointer that may cross threads: each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to let rayon tasks write disjoint elements of one output slice; every use
// states why the elements are disjoint.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Taking the pointer through a method makes closures capture the whole `SendPtr` (which
    /// is Send), not its raw-pointer field.
    #[inline]
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `y[r][j] = Σ_k x[r][k] · w[j][k]` for `r < rows`, `j < out`.
///
/// `x` is `[rows, in]`, `w` is `[out, in]` row-major in any supported dtype, `y` is `[rows, out]`.
pub fn linear(x: &[f32], rows: usize, w: Elems<'_>, out: usize, y: &mut [f32]) {
    let inp = w.len() / out.max(1);
    debug_assert_eq!(w.len(), out * inp);
    debug_assert!(x.len() >= rows * inp);
    debug_assert!(y.len() >= rows * out);
    if rows == 0 || out == 0 {
        return;
    }
    if amx_for(isa(), rows) && try_amx(x, rows, &mut [(w, out, y)], bf16_activations()) {
        return;
    }
    let plan = kernels::plan_for(isa(), w, rows);
    if rows <= DOT_MAX_ROWS || plan.bf16 || deterministic() {
        dot_plan(plan, x, rows, w, inp, out, y);
    } else {
        linear_gemm(x, rows, w, inp, out, y);
    }
}

/// Whether bf16 weights read in place go through AMX at `rows` token rows: on CPUs with AMX, from
/// [`AMX_MIN_ROWS`]; with activations rounded to bf16 ([`bf16_activations`]), at every row
/// count, one row included, so that a token's result does not depend on its step (the rounded
/// activation is one bf16 part, where f32 needs three).
fn amx_for(isa: Isa, rows: usize) -> bool {
    isa >= Isa::Amx && (rows >= AMX_MIN_ROWS || bf16_activations() || deterministic())
}

/// The AMX path, public for parity tests and benches. Returns false, computing nothing, where
/// it does not apply: no AMX on this CPU, weights other than bf16, or `inp` not a multiple of
/// 32. Any number of rows is accepted.
pub fn linear_amx(
    x: &[f32],
    rows: usize,
    w: Elems<'_>,
    inp: usize,
    out: usize,
    y: &mut [f32],
) -> bool {
    assert!(x.len() >= rows * inp && y.len() >= rows * out);
    Isa::best() >= Isa::Amx && w.len() == out * inp && try_amx(x, rows, &mut [(w, out, y)], false)
}

/// `w` (`[out, in]`) copied into AMX tile order, where the linears of a weight read often
/// should use it: the selected kernels are AMX ([`isa`]), `w` is bf16 and `in` a multiple of 32.
/// None elsewhere.
#[must_use]
pub fn tiles_for(w: Elems<'_>, out: usize) -> Option<Tiles> {
    #[cfg(target_arch = "x86_64")]
    if let Elems::BF16(w) = w {
        if isa() >= Isa::Amx && out > 0 {
            return Tiles::pack(w, out, w.len() / out);
        }
    }
    let _ = (w, out);
    None
}

/// `ys[i] = x · ws[i]ᵀ` for weights in AMX tile order: from [`AMX_MIN_ROWS`] rows through the
/// AMX tiles, the same bits as [`linear_many`] gives for the same weights; fewer rows through
/// an AVX-512 dot kernel over the same layout (`avx512::band_dot`), which streams a band as
/// fast as the single-row kernel streams rows in place, where the AMX tiles read one row's
/// weights ~10 % slower (whole-model batch-1 decode, interleaved runs). With activations
/// rounded to bf16 ([`bf16_activations`]) every row count goes through the AMX tiles, so that
/// a token's result does not depend on its step. All weights must have one input width; any
/// number of parts.
pub fn linear_tiles(x: &[f32], rows: usize, parts: &mut [(&Tiles, &mut [f32])]) {
    #[cfg(target_arch = "x86_64")]
    for chunk in parts.chunks_mut(MAX_PARTS) {
        let first: &Tiles = chunk[0].0;
        let mut jobs = [(first, SendPtr(std::ptr::null_mut())); MAX_PARTS];
        for (job, (w, y)) in jobs.iter_mut().zip(chunk.iter_mut()) {
            assert!(
                w.inp() == first.inp(),
                "tiled parts of different input widths"
            );
            assert!(y.len() >= rows * w.out() && x.len() >= rows * w.inp());
            *job = (*w, SendPtr(y.as_mut_ptr()));
        }
        let jobs = &jobs[..chunk.len()];
        // SAFETY (both AMX calls): Tiles exist only where `tiles_for` saw Isa::Amx (AMX
        // granted); every output is borrowed mutably for the call and holds rows·out elements
        // (asserted above).
        if bf16_activations() {
            unsafe { amx::linear_tiles::<{ amx::BF16_PARTS }>(x, rows, jobs) };
        } else if rows < AMX_MIN_ROWS && !deterministic() {
            tiles_dot(x, rows, jobs);
        } else {
            unsafe { amx::linear_tiles::<{ amx::PARTS }>(x, rows, jobs) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, rows, parts);
}

/// Each job's first task when jobs of `counts` tasks share one pass (at most [`MAX_PARTS`]),
/// and the number of jobs and of tasks.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn task_firsts(counts: impl Iterator<Item = usize>) -> ([usize; MAX_PARTS], usize, usize) {
    let (mut firsts, mut jobs, mut total) = ([0; MAX_PARTS], 0, 0);
    for (first, n) in firsts.iter_mut().zip(counts) {
        *first = total;
        total += n;
        jobs += 1;
    }
    (firsts, jobs, total)
}

/// [`linear_tiles`] for fewer than [`AMX_MIN_ROWS`] rows: every band of every job is a task of
/// one pass, which runs each token row in turn (the band stays in L2 between them).
#[cfg(target_arch = "x86_64")]
fn tiles_dot(x: &[f32], rows: usize, jobs: &[(&Tiles, SendPtr)]) {
    let Some(inp) = jobs.first().map(|(w, _)| w.inp()) else {
        return;
    };
    let (firsts, n, tasks) = task_firsts(jobs.iter().map(|(w, _)| w.out().div_ceil(tiles::BAND)));
    let firsts = &firsts[..n];
    with_scratch(&PAIRS, rows * inp, |paired| {
        // SAFETY: Tiles exist only where the kernels are AMX, whose CPUs have AVX-512.
        unsafe { avx512::pair_rows(&x[..rows * inp], inp, paired) };
        let paired = &*paired;
        (0..tasks).into_par_iter().for_each(|task| {
            let i = firsts.iter().rposition(|&f| f <= task).unwrap_or(0);
            let (w, yp) = jobs[i];
            let (t, out) = (task - firsts[i], w.out());
            let j = t * tiles::BAND;
            for r in 0..rows {
                // SAFETY: as above for the CPU; the band holds inp / 32 · 4 tiles, the paired
                // row inp elements, and rows j .. of token r's output are this task's alone
                // (the caller checked that y holds rows · out).
                unsafe {
                    avx512::band_dot(
                        w.band(t).as_ptr(),
                        inp / tiles::TILE_INPUTS,
                        paired[r * inp..].as_ptr(),
                        yp.get().add(r * out + j),
                        (out - j).min(tiles::BAND),
                    );
                }
            }
        });
    });
}

/// Runs `parts` (at most [`MAX_PARTS`]) through the AMX tiles if they all can go there: bf16
/// weights of one input width, a multiple of 32; the activations rounded to bf16 where `bf16`,
/// exact otherwise. Returns false, computing nothing, otherwise. The caller has checked that
/// the CPU has AMX (an [`Isa::Amx`] choice).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn try_amx(
    x: &[f32],
    rows: usize,
    parts: &mut [(Elems<'_>, usize, &mut [f32])],
    bf16: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let inp = parts
            .first()
            .map_or(0, |(w, out, _)| w.len() / (*out).max(1));
        if inp == 0 || !inp.is_multiple_of(amx::KB) || parts.len() > MAX_PARTS {
            return false;
        }
        let none = amx::Job {
            w: &[],
            out: 0,
            y: SendPtr(std::ptr::null_mut()),
        };
        let mut jobs = [none; MAX_PARTS];
        for (job, (w, out, y)) in jobs.iter_mut().zip(parts.iter_mut()) {
            let Elems::BF16(w) = *w else { return false };
            if w.len() != *out * inp {
                return false;
            }
            debug_assert!(x.len() >= rows * inp && y.len() >= rows * *out);
            *job = amx::Job {
                w,
                out: *out,
                y: SendPtr(y.as_mut_ptr()),
            };
        }
        // SAFETY: the caller saw Isa::Amx (AMX granted); every output is borrowed mutably for
        // the call and holds rows·out elements; weights hold out·inp, checked above.
        unsafe {
            if bf16 {
                amx::linear_many::<{ amx::BF16_PARTS }>(x, rows, inp, &jobs[..parts.len()]);
            } else {
                amx::linear_many::<{ amx::PARTS }>(x, rows, inp, &jobs[..parts.len()]);
            }
        }
        return true;
    }
    #[allow(unreachable_code)]
    false
}

/// The dot path, public so tests and benches can compare it against the gemm path.
pub fn linear_dot(x: &[f32], rows: usize, w: Elems<'_>, inp: usize, out: usize, y: &mut [f32]) {
    dot_with(isa(), x, rows, w, inp, out, y);
}

/// The dot path on a given instruction set (at most [`Isa::best`]).
fn dot_with(isa: Isa, x: &[f32], rows: usize, w: Elems<'_>, inp: usize, out: usize, y: &mut [f32]) {
    dot_plan(kernels::plan_for(isa, w, rows), x, rows, w, inp, out, y);
}

/// The dot path with activations rounded to bf16 for the tiles, public so tests and benches
/// can measure it without `SWITCHYARD_CPU_ACTIVATIONS`. Returns false, computing nothing,
/// where the CPU lacks AVX-512 BF16.
pub fn linear_dot_bf16_activations(
    x: &[f32],
    rows: usize,
    w: Elems<'_>,
    inp: usize,
    out: usize,
    y: &mut [f32],
) -> bool {
    if !kernels::has_avx512_bf16() {
        return false;
    }
    let plan = kernels::plan_with(Isa::best().min(Isa::Avx512), w, rows, true);
    dot_plan(plan, x, rows, w, inp, out, y);
    true
}

fn dot_plan(
    plan: Plan,
    x: &[f32],
    rows: usize,
    w: Elems<'_>,
    inp: usize,
    out: usize,
    y: &mut [f32],
) {
    let yp = SendPtr(y.as_mut_ptr());
    with_lhs(
        x,
        rows,
        inp,
        plan.pairs,
        plan.tile_min_rows,
        plan.bf16,
        |lhs| {
            (0..out.div_ceil(DOT_BLOCK))
                .into_par_iter()
                .for_each(|b| dot_block(lhs, rows, w, inp, out, yp, b, plan));
        },
    );
}

thread_local! {
    /// Paired activations for the AVX-512 bf16 tiles (see [`with_scratch`]); each grows to the
    /// largest `rows · in` f32s once.
    static PAIRS: Scratch = const { RefCell::new(Vec::new()) };
    /// Activations rounded to bf16 for the `vdpbf16ps` tiles, likewise.
    static BF16_ROWS: Scratch = const { RefCell::new(Vec::new()) };
}

/// A thread's free scratch buffers of one kind, in whole cache lines.
type Scratch = RefCell<Vec<Vec<Line>>>;

/// Runs `f` with one of this thread's scratch buffers of kind `key`, grown to `n` elements
/// (buffers keep their largest size). A linear that starts on this thread while another waits
/// on it (a rayon worker taking a task during its own fork-join, which is common when a layer's
/// experts run side by side) takes a second buffer from the same list, so after the first
/// steps nothing allocates.
///
/// Buffers start on a cache line, which the allocator does not promise for a `Vec<f32>` (glibc
/// gives 16 bytes): an AMX tile row or a 512-bit load that straddles two lines reads both, and
/// a tile load from L1 took several times as long 16 bytes off a line (docs/performance-log.md).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn with_scratch<E: bytemuck::Pod, T>(
    key: &'static std::thread::LocalKey<Scratch>,
    n: usize,
    f: impl FnOnce(&mut [E]) -> T,
) -> T {
    let mut buf = key.with(|free| free.borrow_mut().pop()).unwrap_or_default();
    let lines = (n * std::mem::size_of::<E>()).div_ceil(std::mem::size_of::<Line>());
    if buf.len() < lines {
        buf.resize(lines, Line::default());
    }
    let elems: &mut [E] = bytemuck::cast_slice_mut(&mut buf[..]);
    let out = f(&mut elems[..n]);
    key.with(|free| free.borrow_mut().push(buf));
    out
}

/// Runs `f` on x's rows, paired for the bf16 pair tiles, or rounded to bf16 for the
/// `vdpbf16ps` ones, where the plan wants it ([`kernels::plan_for`] asks for each pairing only
/// on CPUs with its instruction set, for rounded rows only on CPUs with AVX-512 BF16; both
/// only serve tiles: fewer rows than the plan tiles from (`min_rows`) get no pairing, and rounded rows are
/// made at any count because the bf16 plans tile from one row).
fn with_lhs<T>(
    x: &[f32],
    rows: usize,
    inp: usize,
    pairs: Pairing,
    min_rows: usize,
    bf16: bool,
    f: impl FnOnce(Lhs<'_>) -> T,
) -> T {
    #[cfg(target_arch = "x86_64")]
    if bf16 {
        debug_assert!(kernels::has_avx512_bf16());
        return with_scratch(&BF16_ROWS, rows * inp, |buf| {
            // SAFETY: plans want rounded rows only where the CPU has AVX-512 BF16.
            unsafe { avx512::round_bf16(&x[..rows * inp], buf) };
            f(Lhs {
                f32: x,
                pairs: &[],
                bf16: buf,
            })
        });
    }
    #[cfg(target_arch = "x86_64")]
    if pairs != Pairing::Off && rows >= min_rows {
        return with_scratch(&PAIRS, rows * inp, |buf| {
            let x = &x[..rows * inp];
            // SAFETY: plans want each pairing only where the CPU has its instruction set
            // (AVX-512 f, bw and vl; AVX2, FMA and F16C).
            unsafe {
                if pairs == Pairing::Avx512 {
                    debug_assert!(Isa::best() >= Isa::Avx512);
                    avx512::pair_rows(x, inp, buf);
                } else {
                    debug_assert!(Isa::best() >= Isa::Avx2);
                    avx2::pair_rows(x, inp, buf);
                }
            }
            f(Lhs {
                f32: x,
                pairs: buf,
                bf16: &[],
            })
        });
    }
    let _ = (rows, inp, pairs, min_rows, bf16);
    f(Lhs {
        f32: x,
        pairs: &[],
        bf16: &[],
    })
}

/// Several linears of the same input in one parallel pass: `ys[i] = x · ws[i]ᵀ`, each weight
/// `[outs[i], in]`. Small projections (k and v of a GQA layer are a quarter of q) each paid a
/// fork-join of their own; here every output block of every weight is one task of one pass.
/// Results equal [`linear`]'s bit for bit. Beyond [`DOT_MAX_ROWS`] the weights go one by one,
/// unless every one has a bf16-activation plan (the dot path at any row count).
pub fn linear_many(x: &[f32], rows: usize, parts: &mut [(Elems<'_>, usize, &mut [f32])]) {
    if parts.is_empty() {
        return;
    }
    let isa = isa();
    if rows > DOT_MAX_ROWS
        && !deterministic()
        && !parts
            .iter()
            .all(|(w, _, _)| kernels::plan_for(isa, *w, rows).bf16)
    {
        for (w, out, y) in parts.iter_mut() {
            linear(x, rows, *w, *out, y);
        }
        return;
    }
    if parts.len() > MAX_PARTS {
        for chunk in parts.chunks_mut(MAX_PARTS) {
            linear_many(x, rows, chunk);
        }
        return;
    }
    if amx_for(isa, rows) && try_amx(x, rows, parts, bf16_activations()) {
        return;
    }
    // Per weight: (weight, input width, output width, output, its first task).
    let mut jobs = [(Elems::F32(&[]), 0, 0, SendPtr(std::ptr::null_mut()), 0); MAX_PARTS];
    let mut tasks = 0;
    for (job, (w, out, y)) in jobs.iter_mut().zip(parts.iter_mut()) {
        let out = *out;
        let inp = w.len() / out.max(1);
        debug_assert_eq!(w.len(), out * inp);
        debug_assert!(x.len() >= rows * inp);
        debug_assert!(y.len() >= rows * out);
        *job = (*w, inp, out, SendPtr(y.as_mut_ptr()), tasks);
        tasks += out.div_ceil(DOT_BLOCK);
    }
    let jobs = &jobs[..parts.len()];
    if rows == 0 {
        return;
    }
    let mut plans = [kernels::plan_for(isa, Elems::F32(&[]), rows); MAX_PARTS];
    for (plan, job) in plans.iter_mut().zip(jobs) {
        *plan = kernels::plan_for(isa, job.0, rows);
    }
    let plans = &plans[..jobs.len()];
    let inp = jobs[0].1;
    // Rounded rows only when every weight wants them (a checkpoint's dtypes agree); a bf16
    // tile without them computes in f32.
    // Every plan has one instruction set and row count, so the paired ones agree.
    let pairs = plans
        .iter()
        .map(|p| p.pairs)
        .find(|p| *p != Pairing::Off)
        .unwrap_or(Pairing::Off);
    let bf16 = plans.iter().all(|p| p.bf16);
    let min_rows = plans
        .iter()
        .map(|p| p.tile_min_rows)
        .min()
        .unwrap_or(usize::MAX);
    with_lhs(x, rows, inp, pairs, min_rows, bf16, |lhs| {
        (0..tasks).into_par_iter().for_each(|t| {
            // A task belongs to the last weight whose first task is at or before it.
            let Some(i) = jobs.iter().rposition(|j| j.4 <= t) else {
                return;
            };
            let (w, inp, out, yp, first) = jobs[i];
            dot_block(lhs, rows, w, inp, out, yp, t - first, plans[i]);
        });
    });
}

/// Output rows `b·DOT_BLOCK ..` of `y = x · wᵀ` on the dot path.
#[allow(clippy::too_many_arguments)]
#[inline]
fn dot_block(
    x: Lhs<'_>,
    rows: usize,
    w: Elems<'_>,
    inp: usize,
    out: usize,
    yp: SendPtr,
    b: usize,
    plan: Plan,
) {
    let j0 = b * DOT_BLOCK;
    let j1 = (j0 + DOT_BLOCK).min(out);
    let tiled = rows >= plan.tile_min_rows;
    if rows == 1 && !tiled {
        // SAFETY: columns j0..j1 of the one output row belong to this task alone (tasks own
        // disjoint column ranges) and lie inside the output (out <= its length).
        let y = unsafe { std::slice::from_raw_parts_mut(yp.get().add(j0), j1 - j0) };
        (plan.span)(w.slice(j0 * inp..j1 * inp), &x.f32[..inp], inp, y);
        return;
    }
    let mut j = j0;
    // Enough tokens to be compute-bound: weight rows in tiles of three (the block's last one
    // or two rows in a smaller tile), so every x vector loaded serves several rows (x is
    // re-read once per tile of output rows, not once per row). Every (row, token) sum runs
    // the same chain in the same order in any tile size, so a row's result does not depend on
    // where it falls in the output.
    if let Some(tiles) = plan.tiles.filter(|_| tiled) {
        while j + 3 <= j1 {
            tile_rows(x, rows, w, inp, out, yp, j, tiles.three);
            j += 3;
        }
        if j + 2 <= j1 {
            tile_rows(x, rows, w, inp, out, yp, j, tiles.two);
            j += 2;
        }
        if j < j1 {
            tile_rows(x, rows, w, inp, out, yp, j, tiles.one);
            j += 1;
        }
    }
    for j in j..j1 {
        tile_rows(x, rows, w, inp, out, yp, j, plan.single);
    }
}

/// Output rows `j .. j + R` of `y = x · wᵀ` for every token, through an R-row tile kernel.
#[allow(clippy::too_many_arguments)]
#[inline]
fn tile_rows<const R: usize>(
    x: Lhs<'_>,
    rows: usize,
    w: Elems<'_>,
    inp: usize,
    out: usize,
    yp: SendPtr,
    j: usize,
    kern: kernels::TileKernel<R>,
) {
    let tile = w.slice(j * inp..(j + R) * inp);
    // The next tile's weights (three rows on, or the next block's first), fetched into cache
    // while this one computes: with few tokens a tile's compute and its weights' trip from
    // memory take about as long, and without this they would not overlap.
    let next = (j + R < out).then(|| w.slice((j + R) * inp..(j + 2 * R).min(out) * inp));
    let ahead = next.as_ref().map_or(&[][..], Elems::bytes);
    // Each group of four tokens fetches its share of the next tile, so the fetching goes on
    // through the whole tile rather than only while its first group computes.
    let share = ahead.len().div_ceil(rows.div_ceil(4)).next_multiple_of(64);
    let mut r = 0;
    while r < rows {
        let n = (rows - r).min(4);
        let mut acc = [[0f32; 4]; R];
        let from = (r / 4 * share).min(ahead.len());
        let part = &ahead[from..(from + share).min(ahead.len())];
        kern(tile, x.rows(r, n, inp), n, inp, &mut acc, part);
        for (d, row_acc) in acc.iter().enumerate() {
            for (t, a) in row_acc.iter().take(n).enumerate() {
                // SAFETY: element (r+t, j+d) belongs to this task alone (tasks own disjoint
                // column ranges of one output and the caller keeps j + R within its range)
                // and lies inside that output (rows*out <= its length, checked by the callers).
                unsafe { *yp.get().add((r + t) * out + j + d) = *a };
            }
        }
        r += n;
    }
}

thread_local! {
    /// Widened weight block for the gemm path; grows to GEMM_BLOCK × in once per thread.
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The gemm path, public for parity tests.
pub fn linear_gemm(x: &[f32], rows: usize, w: Elems<'_>, inp: usize, out: usize, y: &mut [f32]) {
    let yp = SendPtr(y.as_mut_ptr());
    (0..out.div_ceil(GEMM_BLOCK)).into_par_iter().for_each(|b| {
        let j0 = b * GEMM_BLOCK;
        let j1 = (j0 + GEMM_BLOCK).min(out);
        let nb = j1 - j0;
        let run = |wb: &[f32]| {
            // SAFETY: lhs is x ([rows, inp], row stride inp); rhs element (k, j) is wb[j*inp + k];
            // dst element (r, j) is y[r*out + j0 + j], columns j0..j1 owned by this task alone.
            // All indices stay in bounds by the debug-asserted sizes in `linear`.
            unsafe {
                gemm::gemm(
                    rows,
                    nb,
                    inp,
                    yp.get().add(j0),
                    1,
                    out as isize,
                    false,
                    x.as_ptr(),
                    1,
                    inp as isize,
                    wb.as_ptr(),
                    inp as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        };
        match w {
            Elems::F32(s) => run(&s[j0 * inp..j1 * inp]),
            _ => WIDE.with(|cell| {
                let mut buf = cell.borrow_mut();
                buf.resize(nb * inp, 0.0);
                w.to_f32_into(j0 * inp..j1 * inp, &mut buf[..nb * inp]);
                run(&buf[..nb * inp]);
            }),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn scratch_buffers_start_on_a_cache_line_and_are_reused() {
        thread_local! {
            static KIND: Scratch = const { RefCell::new(Vec::new()) };
        }
        let first = with_scratch(&KIND, 1000, |b: &mut [u16]| {
            assert_eq!(b.len(), 1000);
            b.fill(7);
            b.as_ptr() as usize
        });
        assert_eq!(first % 64, 0, "u16 scratch at {first:#x}");
        // A smaller request of another element type reuses the same lines, still aligned.
        with_scratch(&KIND, 33, |b: &mut [f32]| {
            assert_eq!(b.len(), 33);
            assert_eq!(
                b.as_ptr() as usize,
                first,
                "the freed buffer is taken again"
            );
        });
        // One nested inside another takes a second buffer, aligned too.
        with_scratch(&KIND, 10, |outer: &mut [f32]| {
            with_scratch(&KIND, 10, |inner: &mut [f32]| {
                assert_ne!(outer.as_ptr(), inner.as_ptr());
                assert_eq!(inner.as_ptr() as usize % 64, 0);
            });
        });
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        // Deterministic values in [-1, 1).
        (0..n)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(97));
                (h >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// [`data`] rounded to bf16, as a checkpoint's weights.
    fn bf16_data(n: usize, seed: u32) -> Vec<bf16> {
        data(n, seed).iter().map(|v| bf16::from_f32(*v)).collect()
    }

    fn naive(x: &[f32], rows: usize, w: &[f32], inp: usize, out: usize) -> Vec<f64> {
        let mut y = vec![0.0; rows * out];
        for r in 0..rows {
            for j in 0..out {
                y[r * out + j] = (0..inp)
                    .map(|k| x[r * inp + k] as f64 * w[j * inp + k] as f64)
                    .sum();
            }
        }
        y
    }

    /// Every instruction set this CPU runs, the selected one included.
    fn isas() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Amx]
            .into_iter()
            .filter(|i| *i <= Isa::best())
            .collect()
    }

    fn check(rows: usize, inp: usize, out: usize) {
        let x = data(rows * inp, 1);
        let wf = data(out * inp, 2);
        let wb: Vec<bf16> = wf.iter().map(|v| bf16::from_f32(*v)).collect();
        let wh: Vec<f16> = wf.iter().map(|v| f16::from_f32(*v)).collect();
        let cases: [(Elems<'_>, Vec<f32>); 3] = [
            (Elems::F32(&wf), wf.clone()),
            (Elems::BF16(&wb), wb.iter().map(|v| v.to_f32()).collect()),
            (Elems::F16(&wh), wh.iter().map(|v| v.to_f32()).collect()),
        ];
        for (w, wide) in cases {
            let want = naive(&x, rows, &wide, inp, out);
            let paths = [Path::Linear, Path::Gemm, Path::Amx]
                .into_iter()
                .chain(isas().into_iter().map(Path::Dot));
            for path in paths {
                let mut y = vec![f32::NAN; rows * out];
                match path {
                    Path::Linear => linear(&x, rows, w, out, &mut y),
                    Path::Gemm => linear_gemm(&x, rows, w, inp, out, &mut y),
                    Path::Dot(isa) => dot_with(isa, &x, rows, w, inp, out, &mut y),
                    Path::Amx => {
                        if !linear_amx(&x, rows, w, inp, out, &mut y) {
                            continue;
                        }
                    }
                }
                for (a, b) in y.iter().zip(&want) {
                    assert!(
                        (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "rows {rows} in {inp} out {out} {path:?}: {a} vs {b}"
                    );
                }
            }
            // The scalar kernel agrees too.
            let mut acc = [[0.0; 4]; 1];
            let lhs = Lhs {
                f32: &x[..inp],
                pairs: &[],
                bf16: &[],
            };
            kernels::scalar(w.slice(0..inp), lhs, 1, inp, &mut acc, &[]);
            assert!((acc[0][0] as f64 - want[0]).abs() <= 1e-4 * (1.0 + want[0].abs()));
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Path {
        Linear,
        Gemm,
        Amx,
        Dot(Isa),
    }

    #[test]
    fn all_paths_match_naive_on_even_and_odd_shapes() {
        for &(rows, inp, out) in &[
            (1, 64, 64),
            (1, 37, 5),
            (3, 100, 33),
            (4, 128, 70),
            (7, 48, 17),
            (9, 64, 130),
            (20, 72, 31),
            (32, 36, 9),
            (40, 96, 65),
            (2, 200, 9),
            (5, 1030, 7),
            (17, 1030, 7),
            (6, 33, 10),
            (DOT_MAX_ROWS, 40, 50),
            (DOT_MAX_ROWS + 3, 40, 50),
            // AMX shapes (in a multiple of 32): one and several token groups, partial groups,
            // output tails under 16 and between 16 and 32 rows, several tasks.
            (1, 64, 16),
            (AMX_MIN_ROWS, 64, 33),
            (8, 64, 33),
            (16, 96, 70),
            (17, 1024, 40),
            (35, 128, 100),
            (DOT_MAX_ROWS + 3, 64, 50),
        ] {
            check(rows, inp, out);
        }
    }

    #[test]
    fn instruction_set_names_round_trip_and_unknown_ones_are_refused() {
        for isa in isas() {
            assert_eq!(Isa::parse(isa.as_str()), Some(isa));
        }
        assert_eq!(Isa::parse(" avx2\n"), Some(Isa::Avx2));
        assert_eq!(Isa::parse("avx512bf16"), None);
        assert_eq!(Isa::parse(""), None);
        // The chosen set never exceeds what the CPU has.
        assert!(isa() <= Isa::best());
    }

    #[test]
    fn a_nested_linear_gets_its_own_paired_rows() {
        // A linear that starts while this thread's paired-rows buffer is in use (a rayon worker
        // taking a task inside its own fork-join) must get a buffer of its own, not a panic.
        let (rows, inp) = (TILE_MIN_ROWS + 1, 70);
        let (x, x2) = (data(rows * inp, 11), data(rows * inp, 12));
        // (layout, its block, the instruction set it needs)
        for (pairing, block, need) in [
            (Pairing::Avx2, 16, Isa::Avx2),
            (Pairing::Avx512, 32, Isa::Avx512),
        ] {
            if Isa::best() < need {
                continue;
            }
            with_lhs(&x, rows, inp, pairing, TILE_MIN_ROWS, false, |outer| {
                let outer_pairs = outer.pairs.to_vec();
                with_lhs(&x2, rows, inp, pairing, TILE_MIN_ROWS, false, |inner| {
                    assert_eq!(inner.pairs.len(), rows * inp);
                    // Every full block of every row is laid out evens first; the tail stays
                    // in order.
                    let full = inp / block * block;
                    for r in 0..rows {
                        let got = &inner.pairs[r * inp..(r + 1) * inp];
                        let src = &x2[r * inp..];
                        for (k, g) in got.iter().enumerate() {
                            let from = if k < full {
                                let (b, i) = (k / block * block, k % block);
                                let half = block / 2;
                                if i < half {
                                    b + 2 * i
                                } else {
                                    b + 2 * (i - half) + 1
                                }
                            } else {
                                k
                            };
                            assert_eq!(
                                g.to_bits(),
                                src[from].to_bits(),
                                "{pairing:?} row {r} at {k}"
                            );
                        }
                    }
                });
                assert_eq!(
                    outer.pairs,
                    &outer_pairs[..],
                    "the outer rows were not touched"
                );
            });
        }
    }

    #[test]
    fn bf16_activation_tiles_stay_within_the_rounding_bound() {
        // Rounding an activation to bf16 moves it by at most 2⁻⁹ of itself, so a sum moves by at
        // most 2⁻⁹ of Σ|w·x|; f32 accumulation adds far less. Shapes cover one to three-row
        // tiles, one to four tokens and a tail under the mask (inp 70).
        if !kernels::has_avx512_bf16() {
            return;
        }
        let mut rounded_somewhere = false;
        for (rows, inp, out) in [
            (1, 64, 7),
            (2, 70, 5),
            (3, 96, 4),
            (4, 64, 7),
            (5, 70, 8),
            (9, 96, 5),
            (16, 70, 11),
        ] {
            let x = data(rows * inp, 21);
            let wf: Vec<bf16> = data(out * inp, 22)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            let w32: Vec<f32> = wf.iter().map(|v| v.to_f32()).collect();
            let mut y = vec![0.0; rows * out];
            assert!(linear_dot_bf16_activations(
                &x,
                rows,
                Elems::BF16(&wf),
                inp,
                out,
                &mut y
            ));
            let mut exact = vec![0.0; rows * out];
            linear_dot(&x, rows, Elems::BF16(&wf), inp, out, &mut exact);
            let want = naive(&x, rows, &w32, inp, out);
            for r in 0..rows {
                for j in 0..out {
                    let mag: f64 = (0..inp)
                        .map(|k| (f64::from(x[r * inp + k]) * f64::from(w32[j * inp + k])).abs())
                        .sum();
                    let (got, want) = (f64::from(y[r * out + j]), want[r * out + j]);
                    assert!(
                        (got - want).abs() <= mag / 512.0 + 1e-5,
                        "rows {rows} inp {inp} ({r}, {j}): {got} against {want}"
                    );
                    rounded_somewhere |= y[r * out + j] != exact[r * out + j];
                }
            }
        }
        assert!(
            rounded_somewhere,
            "the bf16 tiles never ran: results equal the f32 path's"
        );
    }

    #[test]
    fn with_bf16_activations_a_tokens_result_does_not_depend_on_its_step() {
        // One token alone (the batch-1 decode case) and the same token among 2, 3, 5 or
        // 3 × DOT_MAX_ROWS others (a long prefill, past the f32 plans' gemm path) must give the
        // same bits: every row count runs the same chains on the same rounded activations.
        if !kernels::has_avx512_bf16() {
            return;
        }
        let (inp, out) = (70, 29);
        let wf: Vec<bf16> = data(out * inp, 32)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let w = Elems::BF16(&wf);
        let most = 3 * DOT_MAX_ROWS;
        let x = data(most * inp, 31);
        let mut alone = vec![0.0; most * out];
        for r in 0..most {
            assert!(linear_dot_bf16_activations(
                &x[r * inp..(r + 1) * inp],
                1,
                w,
                inp,
                out,
                &mut alone[r * out..(r + 1) * out]
            ));
        }
        for rows in [2, 3, 5, most] {
            let mut y = vec![0.0; rows * out];
            assert!(linear_dot_bf16_activations(&x, rows, w, inp, out, &mut y));
            assert_eq!(y[..], alone[..rows * out], "{rows} rows");
        }
    }

    /// What `--deterministic` promises of every kernel: each token row gets the same bits
    /// whatever the number of rows in its call (1 to 64, and past [`DOT_MAX_ROWS`] where the
    /// gemm path would take over), on every instruction set this CPU has, for f32, bf16 and
    /// f16 weights, with f32 activations and (where the CPU has AVX-512 BF16) bf16 ones, in
    /// place, through `linear_many` and (on AMX) in tile order.
    #[test]
    fn a_rows_bits_do_not_depend_on_the_rows_beside_it() {
        assert!(deterministic(), "the kernels default to deterministic");
        // An odd width (tails everywhere) and an AMX-able one, outputs across tiles and blocks.
        for (inp, out) in [(101, 29), (128, DOT_BLOCK + 13)] {
            let most = 64;
            let x = data((DOT_MAX_ROWS + 7) * inp, 51);
            let wf = data(out * inp, 52);
            let wb: Vec<bf16> = wf.iter().map(|v| bf16::from_f32(*v)).collect();
            let wh: Vec<f16> = wf.iter().map(|v| f16::from_f32(*v)).collect();
            for (dtype, w) in [
                ("f32", Elems::F32(&wf)),
                ("bf16", Elems::BF16(&wb)),
                ("f16", Elems::F16(&wh)),
            ] {
                // (name, kernel over `rows` rows) for every path this CPU has.
                type Run<'a> = Box<dyn Fn(&[f32], usize, &mut [f32]) -> bool + 'a>;
                let mut paths: Vec<(String, Run<'_>)> = isas()
                    .into_iter()
                    .filter(|i| *i < Isa::Amx)
                    .map(|isa| {
                        let f: Run<'_> = Box::new(move |x, rows, y| {
                            dot_with(isa, x, rows, w, inp, out, y);
                            true
                        });
                        (format!("{isa:?}"), f)
                    })
                    .collect();
                paths.push((
                    "linear".into(),
                    Box::new(move |x, rows, y| {
                        linear(x, rows, w, out, y);
                        true
                    }),
                ));
                paths.push((
                    "linear_many".into(),
                    Box::new(move |x, rows, y| {
                        let mut spare = vec![0.0; rows * out];
                        linear_many(x, rows, &mut [(w, out, y), (w, out, &mut spare)]);
                        true
                    }),
                ));
                paths.push((
                    "bf16 activations".into(),
                    Box::new(move |x, rows, y| {
                        linear_dot_bf16_activations(x, rows, w, inp, out, y)
                    }),
                ));
                if Isa::best() >= Isa::Amx {
                    paths.push((
                        "amx".into(),
                        Box::new(move |x, rows, y| try_amx(x, rows, &mut [(w, out, y)], false)),
                    ));
                    if let Some(t) = tiles_for(w, out) {
                        paths.push((
                            "amx tile order".into(),
                            Box::new(move |x, rows, y| {
                                linear_tiles(x, rows, &mut [(&t, y)]);
                                true
                            }),
                        ));
                    }
                }
                for (name, run) in &paths {
                    let mut alone = vec![f32::NAN; (DOT_MAX_ROWS + 7) * out];
                    let mut ran = true;
                    for (xr, yr) in x.chunks(inp).zip(alone.chunks_mut(out)) {
                        ran &= run(xr, 1, yr);
                    }
                    if !ran {
                        continue; // not on this CPU or for these weights
                    }
                    let counts = (1..=most).chain([DOT_MAX_ROWS + 7]);
                    let counts: Vec<usize> = if name.starts_with("linear") {
                        counts.collect()
                    } else {
                        counts.filter(|n| *n <= most).collect()
                    };
                    for rows in counts {
                        let mut y = vec![f32::NAN; rows * out];
                        assert!(run(&x[..rows * inp], rows, &mut y));
                        let same = y
                            .iter()
                            .zip(&alone)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{name}, {dtype} weights: {rows} rows, in {inp}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_its_tile() {
        // Blocks of 24 output rows go in tiles of three, the remainder in a pair or one row;
        // on AMX (in a multiple of 32, enough rows) 32-row blocks go as two 16-row tiles or
        // one, and the last rows in a zero-padded tile. Every output row computed alone
        // (out = 1) must give the same bits.
        let dot = (72, DOT_BLOCK + 5, TILE_MIN_ROWS + 3);
        let amx = (64, 2 * 32 + 16 + 3, AMX_MIN_ROWS + 9);
        for (inp, out, rows) in [dot, amx] {
            let x = data(rows * inp, 3);
            let wf = data(out * inp, 4);
            let wb: Vec<bf16> = wf.iter().map(|v| bf16::from_f32(*v)).collect();
            let mut all = vec![0.0; rows * out];
            linear(&x, rows, Elems::BF16(&wb), out, &mut all);
            for j in 0..out {
                let mut one = vec![0.0; rows];
                let w = Elems::BF16(&wb[j * inp..(j + 1) * inp]);
                linear(&x, rows, w, 1, &mut one);
                for r in 0..rows {
                    assert_eq!(
                        all[r * out + j].to_bits(),
                        one[r].to_bits(),
                        "in {inp}: row {j} token {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn weights_in_tile_order_give_the_bits_of_amx_in_place_and_few_rows_the_right_sums() {
        // Output counts on and off a 64-row band, both input widths of an expert, one to 37
        // tokens (three token groups); two weights in one pass as w1/w3 go.
        for (inp, out) in [(96, 40), (64, 128), (128, 200)] {
            let wa = bf16_data(out * inp, 21);
            let wb = bf16_data(out * inp, 22);
            let (Some(ta), Some(tb)) = (
                tiles_for(Elems::BF16(&wa), out),
                tiles_for(Elems::BF16(&wb), out),
            ) else {
                return; // no AMX here
            };
            for rows in [1, 2, 3, 4, 7, 16, 17, 37] {
                let x = data(rows * inp, 23 + rows as u32);
                let (mut ya, mut yb) = (vec![f32::NAN; rows * out], vec![f32::NAN; rows * out]);
                linear_tiles(&x, rows, &mut [(&ta, &mut ya), (&tb, &mut yb)]);
                for (w, y) in [(&wa, &ya), (&wb, &yb)] {
                    if rows < AMX_MIN_ROWS {
                        // The AVX-512 dot kernel over the tiles, in its own summation order.
                        let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
                        let want = naive(&x, rows, &wide, inp, out);
                        assert!(
                            y.iter()
                                .zip(&want)
                                .all(|(a, b)| (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs())),
                            "in {inp} out {out} rows {rows}"
                        );
                        continue;
                    }
                    let mut want = vec![0.0; rows * out];
                    assert!(linear_amx(&x, rows, Elems::BF16(w), inp, out, &mut want));
                    assert!(
                        y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "in {inp} out {out} rows {rows}"
                    );
                }
            }
        }
    }

    #[test]
    fn amx_with_bf16_activations_rounds_once_and_gives_a_token_its_bits_at_any_step() {
        // One bf16 part: the sums of the rounded activations' products, in place and in tile
        // order alike, and each token's bits the same alone as among 37 (three token groups)
        // or 86 (six: the second to fifth run in pairs), as `--cpu-activations bf16` promises
        // on every path.
        for ((inp, out), rows) in [(96, 40), (64, 128), (128, 200), (1088, 72)]
            .into_iter()
            .flat_map(|shape| [(shape, 37), (shape, 86)])
        {
            let w = bf16_data(out * inp, 31);
            let Some(tiles) = tiles_for(Elems::BF16(&w), out) else {
                return; // no AMX here
            };
            let x = data(rows * inp, 32);
            let mut all = vec![f32::NAN; rows * out];
            // The tiles exist, so the CPU has AMX: `try_amx` may run.
            assert!(try_amx(
                &x,
                rows,
                &mut [(Elems::BF16(&w), out, &mut all)],
                true
            ));
            let rounded: Vec<f32> = x.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
            let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let want = naive(&rounded, rows, &wide, inp, out);
            let exact = naive(&x, rows, &wide, inp, out);
            let near = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs());
            assert!(all.iter().zip(&want).all(|(a, b)| near(*a, *b)), "in {inp}");
            assert!(
                all.iter().zip(&exact).any(|(a, b)| !near(*a, *b)),
                "in {inp}: the activations were not rounded"
            );
            let mut tiled = vec![f32::NAN; rows * out];
            // SAFETY: the tiles exist, so AMX was granted; `tiled` holds rows · out.
            unsafe {
                amx::linear_tiles::<{ amx::BF16_PARTS }>(
                    &x,
                    rows,
                    &[(&tiles, SendPtr(tiled.as_mut_ptr()))],
                );
            }
            assert!(
                tiled
                    .iter()
                    .zip(&all)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "in {inp}: tile order against in place"
            );
            for r in [0, 15, 16, 36, rows - 1] {
                let mut one = vec![f32::NAN; out];
                let xr = &x[r * inp..(r + 1) * inp];
                assert!(try_amx(
                    xr,
                    1,
                    &mut [(Elems::BF16(&w), out, &mut one)],
                    true
                ));
                let row = &all[r * out..(r + 1) * out];
                assert!(
                    one.iter().zip(row).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "in {inp}: token {r} alone"
                );
            }
        }
    }

    #[test]
    fn a_tokens_result_does_not_depend_on_the_other_tokens_on_amx() {
        // A token's sums run the same products in the same order in every token group and at
        // any group position: the first 20 of 37 tokens give the bits they give alone.
        let (inp, out, rows) = (96, 40, 37);
        let x = data(rows * inp, 13);
        let wb = bf16_data(out * inp, 14);
        let mut all = vec![0.0; rows * out];
        if !linear_amx(&x, rows, Elems::BF16(&wb), inp, out, &mut all) {
            return;
        }
        let mut some = vec![0.0; 20 * out];
        assert!(linear_amx(
            &x[..20 * inp],
            20,
            Elems::BF16(&wb),
            inp,
            out,
            &mut some
        ));
        let mut last = vec![0.0; out];
        let x_last = &x[(rows - 1) * inp..];
        assert!(linear_amx(x_last, 1, Elems::BF16(&wb), inp, out, &mut last));
        assert!(some
            .iter()
            .zip(&all)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let all_last = &all[(rows - 1) * out..];
        assert!(last
            .iter()
            .zip(all_last)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn rows_in_blocks_give_the_bits_of_rows_one_group_at_a_time() {
        // At in = 1024 a row block holds five token groups: 100 rows run as blocks of 80 and
        // 20 (the last group partial), against the same rows sixteen at a time (one block
        // each, in place); in tile order and in place, on and off a 64-row band.
        let (inp, out, rows) = (1024, 80, 100);
        let x = data(rows * inp, 31);
        let w = bf16_data(out * inp, 32);
        let Some(t) = tiles_for(Elems::BF16(&w), out) else {
            return; // no AMX here
        };
        let mut tiled = vec![f32::NAN; rows * out];
        linear_tiles(&x, rows, &mut [(&t, &mut tiled)]);
        let mut in_place = vec![f32::NAN; rows * out];
        assert!(linear_amx(
            &x,
            rows,
            Elems::BF16(&w),
            inp,
            out,
            &mut in_place
        ));
        let mut by_group = vec![f32::NAN; rows * out];
        for (xg, yg) in x.chunks(16 * inp).zip(by_group.chunks_mut(16 * out)) {
            assert!(linear_amx(
                xg,
                xg.len() / inp,
                Elems::BF16(&w),
                inp,
                out,
                yg
            ));
        }
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same(&tiled, &by_group), "tile order");
        assert!(same(&in_place, &by_group), "in place");
        let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let want = naive(&x, rows, &wide, inp, out);
        assert!(tiled
            .iter()
            .zip(&want)
            .all(|(a, b)| (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs())));
    }

    #[test]
    fn span_kernels_equal_the_one_row_kernel_bit_for_bit() {
        // in = 100 leaves a tail after every kernel's vector steps.
        let (inp, out) = (100, 29);
        let x = data(inp, 3);
        let wf = data(out * inp, 4);
        let wb: Vec<bf16> = wf.iter().map(|v| bf16::from_f32(*v)).collect();
        let wh: Vec<f16> = wf.iter().map(|v| f16::from_f32(*v)).collect();
        let lhs = Lhs {
            f32: &x,
            pairs: &[],
            bf16: &[],
        };
        for isa in isas() {
            for w in [Elems::F32(&wf), Elems::BF16(&wb), Elems::F16(&wh)] {
                let plan = kernels::plan_for(isa, w, 1);
                let mut spanned = vec![f32::NAN; out];
                (plan.span)(w, &x, inp, &mut spanned);
                for (j, got) in spanned.iter().enumerate() {
                    let mut acc = [[0f32; 4]; 1];
                    (plan.single)(w.slice(j * inp..(j + 1) * inp), lhs, 1, inp, &mut acc, &[]);
                    assert_eq!(got.to_bits(), acc[0][0].to_bits(), "{isa:?}, row {j}");
                }
            }
        }
    }

    #[test]
    fn single_and_multi_token_kernels_agree() {
        let (inp, out) = (96, 40);
        let x = data(3 * inp, 5);
        let w = data(out * inp, 6);
        let mut all = vec![0.0; 3 * out];
        linear_dot(&x, 3, Elems::F32(&w), inp, out, &mut all);
        let mut one = vec![0.0; out];
        linear_dot(&x[inp..2 * inp], 1, Elems::F32(&w), inp, out, &mut one);
        // Single-token and multi-token kernels sum in different orders; both are f32-accurate.
        for (a, b) in one.iter().zip(&all[out..2 * out]) {
            assert!((a - b).abs() < 1e-4);
        }
    }

    #[test]
    fn linear_many_equals_one_linear_per_weight_bit_for_bit() {
        // Output widths like q/k/v and w1/w3, odd ones included; more weights than one pass.
        // in = 96 lets bf16 weights take the AMX path where the CPU has it.
        let (inp, outs) = (96, [48usize, 12, 12, 33, 7, 64]);
        let wf: Vec<Vec<f32>> = outs
            .iter()
            .enumerate()
            .map(|(i, &o)| data(o * inp, 20 + i as u32))
            .collect();
        let wb: Vec<Vec<bf16>> = wf
            .iter()
            .map(|w| w.iter().map(|v| bf16::from_f32(*v)).collect())
            .collect();
        let f32s: Vec<Elems<'_>> = wf.iter().map(|w| Elems::F32(w)).collect();
        let bf16s: Vec<Elems<'_>> = wb.iter().map(|w| Elems::BF16(w)).collect();
        for ws in [f32s, bf16s] {
            for rows in [1, 5, AMX_MIN_ROWS, 20, DOT_MAX_ROWS, DOT_MAX_ROWS + 3] {
                let x = data(rows * inp, 9);
                let mut ys: Vec<Vec<f32>> =
                    outs.iter().map(|&o| vec![f32::NAN; rows * o]).collect();
                let mut parts: Vec<(Elems<'_>, usize, &mut [f32])> = ws
                    .iter()
                    .zip(&outs)
                    .zip(ys.iter_mut())
                    .map(|((w, &o), y)| (*w, o, y.as_mut_slice()))
                    .collect();
                linear_many(&x, rows, &mut parts);
                for ((w, &o), y) in ws.iter().zip(&outs).zip(&ys) {
                    let mut want = vec![0.0; rows * o];
                    linear(&x, rows, *w, o, &mut want);
                    assert!(
                        want.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "rows {rows}, out {o}"
                    );
                }
            }
        }
    }
}
