//! AMX (Advanced Matrix Extensions) tiles for bf16 weights against many token rows.
//!
//! Once a step has more than a few token rows, the FMA kernels are bound by arithmetic: two
//! cores of 512-bit FMAs do at most ~330 GFLOP/s, where one AMX unit's `tdpbf16ps` does
//! ~2.5 TFLOP/s (measured on the Xeon this was written on: 6.4 ns per 16×16×32 tile product).
//! Weights are bf16 as stored, loaded as A tiles (16 output rows × 32 inputs), from a few token
//! rows: the matrices only linears read (experts, attention projections, an untied LM head)
//! from a copy made at load in tile order (`tiles.rs`, [`linear_tiles`]: a tile load that
//! misses the cache stalls the unit, and in place the prefetchers do not keep up), the others
//! straight from the checkpoint map ([`linear_many`]). Activations are f32 and must stay so to
//! meet the reference's tolerances, so each one is split into three bf16 parts, `x = h + m + l`
//! (8 significant bits each, together all 24 of an f32), and every product is exact in the f32
//! accumulators: the result is as accurate as the FMA kernels', in another summation order.
//! With `--cpu-activations bf16` an activation is its first part alone ([`BF16_PARTS`]), the
//! rounding the `vdpbf16ps` kernels make, at a third of the products: every row count goes
//! through the tiles then, so a token's result does not depend on its step.
//!
//! Tile registers: tmm5-7 hold one input block's activation tiles (its `h`, `m` and `l` parts;
//! tmm5 alone with one part) and serve up to four 16-row weight blocks, each loaded in turn into tmm4 and multiplied into
//! its own accumulator (tmm0-3). Every (output row, token) element runs the same sequence of
//! products whatever block, task or token group it falls in, so a row's result depends on its
//! inputs alone, as on the other paths.
//!
//! Linux hands out the tile state on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), once per
//! process; [`available`] asks, and AMX is used only if granted. Each task loads the tile
//! configuration and releases the tiles when done, so a thread idle between steps carries no
//! tile state through context switches.

use super::tiles::{Tiles, BAND};
use super::{with_scratch, Scratch, SendPtr};
use half::bf16;
use rayon::prelude::*;
use std::arch::asm;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Parts each f32 activation is split into (`h`, `m`, `l`): the exact path.
pub(super) const PARTS: usize = 3;
/// Parts of an activation rounded to bf16 (`--cpu-activations bf16`): `h` alone.
pub(super) const BF16_PARTS: usize = 1;
/// Tokens per tile (a B tile's 16 columns of bf16 pairs).
const GROUP: usize = 16;
/// Inputs per tile: 32 bf16, one 64-byte tile row. The AMX path needs `in` to be a multiple.
pub(super) const KB: usize = 32;
/// Output rows per weight tile.
const JB: usize = 16;
/// Output rows per task: four weight blocks of the kernel where weight rows are at most
/// [`WIDE_ROW_BYTES`] long, two beyond. bench_linear, 700 MB of weights, 2 threads, AMX GB/s
/// at 1/4/8/16 rows on in = 1024: 21/19/18/17 with four against 19/16/14/13 with two; but every
/// block adds 16 weight rows read side by side, and with 7 KiB rows (in = 3584) four blocks ran
/// at 23/15/12/12 against two's 24/21/19/14.
fn task_rows(inp: usize) -> usize {
    if inp * 2 <= WIDE_ROW_BYTES {
        4 * JB
    } else {
        2 * JB
    }
}

/// See [`task_rows`].
const WIDE_ROW_BYTES: usize = 2048;
/// Packed activations from this many elements are split in parallel.
const PAR_PACK_ELEMS: usize = 1 << 15;

/// Whether this CPU has AMX-BF16 and the OS granted this process the tile state.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect)
}

#[cfg(target_os = "linux")]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY: cpuid leaf 0 exists on every x86_64 CPU; leaf 7 is read only when listed there
    // (newer toolchains call both safe).
    #[allow(unused_unsafe)]
    let l7 = unsafe { (__cpuid(0).eax >= 7).then(|| __cpuid_count(7, 0)) };
    let Some(l7) = l7 else {
        return false;
    };
    // Leaf 7 EDX: bit 22 AMX-BF16, bit 24 AMX-TILE.
    if l7.edx & (1 << 22) == 0 || l7.edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only changes which extended states this
    // process may use; it fails (EINVAL/EPERM) on kernels without AMX support.
    let granted = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if granted != 0 {
        tracing::debug!("the kernel did not grant the AMX tile state; AMX kernels off");
    }
    granted == 0
}

#[cfg(not(target_os = "linux"))]
fn detect() -> bool {
    false
}

/// Palette 1 for a token group of `n` tokens: C tiles 0-3 are 16 rows × n f32, weight tile 4
/// is 16 rows × 32 bf16, activation tiles 5-7 are 16 rows of n bf16 pairs. Tiles only as
/// wide as the group's tokens spare a step of few tokens loading and multiplying zero columns
/// (bench_linear, 700 MB of weights, AMX GB/s on w1/w2: 15/20 → 19/22 at one row, 14/16 → 14/19
/// at eight).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(n: usize) -> TileConfig {
        debug_assert!((1..=GROUP).contains(&n));
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            let colsb = if t == 4 { 64 } else { 4 * n as u16 };
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
            c[48 + t] = JB as u8;
        }
        TileConfig(c)
    }
}

// The instructions, one asm block each; tile registers are named by const operands. The tile
// state is invisible to the compiler, which never emits AMX code itself, and asm blocks keep
// their order.

#[inline(always)]
unsafe fn configure(cfg: &TileConfig) {
    // SAFETY: a valid palette-1 configuration; the caller checked `available`.
    unsafe {
        asm!("ldtilecfg [{c}]", c = in(reg) cfg.0.as_ptr(), options(nostack, readonly, preserves_flags))
    }
}

#[inline(always)]
unsafe fn release() {
    // SAFETY: returns the tiles to their initial state; no tile is live after it.
    unsafe { asm!("tilerelease", options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
unsafe fn zero<const T: u8>() {
    // SAFETY: a configured tile.
    unsafe { asm!("tilezero tmm{t}", t = const T, options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
unsafe fn load<const T: u8>(base: *const u16, stride: usize) {
    // SAFETY: the caller keeps 16 rows of 64 bytes at `stride` apart readable.
    unsafe {
        asm!("tileloadd tmm{t}, [{b} + {s}*1]", t = const T, b = in(reg) base, s = in(reg) stride,
             options(nostack, readonly, preserves_flags))
    }
}

#[inline(always)]
unsafe fn store<const T: u8>(base: *mut f32) {
    // SAFETY: the caller keeps 16 rows of 64 bytes writable, packed.
    unsafe {
        asm!("tilestored [{b} + {s}*1], tmm{t}", t = const T, b = in(reg) base, s = in(reg) 64usize,
             options(nostack, preserves_flags))
    }
}

#[inline(always)]
unsafe fn dot<const C: u8, const A: u8, const B: u8>() {
    // SAFETY: configured tiles.
    unsafe {
        asm!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A, b = const B,
             options(nomem, nostack, preserves_flags))
    }
}

/// Rounds to the nearest bf16, ties to even (the conversion `half` does, inlined so the
/// splitting loop vectorises). NaN stays NaN through the remainder parts.
#[inline(always)]
fn round_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
fn widen(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Splits 32 activations into their first `P` bf16 parts: each part the rounded remainder
/// of the ones before (with one part, the activation rounded to bf16).
#[inline(always)]
fn split<const P: usize>(x: &[f32], parts: &mut [[u16; KB]; P]) {
    for (k, &v) in x.iter().enumerate().take(KB) {
        let mut r = v;
        for part in parts.iter_mut() {
            let h = round_bf16(r);
            part[k] = h;
            r -= widen(h);
        }
    }
}

/// u16 elements of one activation tile of a group of `n` tokens: 16 rows of n bf16 pairs.
#[inline]
fn tile_len(n: usize) -> usize {
    JB * 2 * n
}

/// Lays out one token group's rows (n ≤ 16 of `x`'s rows of `inp`) as B tiles: for input block
/// b and part p (of `P`), the tile at `(b·P + p)·tile_len(n)` whose row q holds, for each token
/// t, the pair (x_p[t][32b + 2q], x_p[t][32b + 2q + 1]).
fn pack_group<const P: usize>(x: &[f32], inp: usize, out: &mut [u16]) {
    let n = x.len() / inp;
    let tl = tile_len(n);
    let mut parts = [[0u16; KB]; P];
    for (t, xr) in x.chunks_exact(inp).enumerate() {
        for (b, xb) in xr.chunks_exact(KB).enumerate() {
            split(xb, &mut parts);
            let base = b * P * tl + t * 2;
            for (p, part) in parts.iter().enumerate() {
                let tile = &mut out[base + p * tl..];
                for q in 0..KB / 2 {
                    tile[q * 2 * n] = part[2 * q];
                    tile[q * 2 * n + 1] = part[2 * q + 1];
                }
            }
        }
    }
}

/// [`pack_group`] in registers, on CPUs with AVX-512F and BW (every CPU with AMX has both): a
/// token's 32 inputs of an input block are split in two registers, each part's bf16 pairs
/// gathered into one register (`vpermt2w`), and the group's sixteen such registers transposed
/// into the part's sixteen tile rows. The scalar loop splits one value at a time and stores
/// each pair on its own, a tile row apart: 8.6 % of a 2,048-token prefill's samples. The
/// same bits to the same places.
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512BW; as [`pack_group`] otherwise.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_group_avx512<const P: usize>(x: &[f32], inp: usize, out: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = x.len() / inp;
    debug_assert!((1..=GROUP).contains(&n) && inp.is_multiple_of(KB));
    let tl = tile_len(n);
    assert!(out.len() >= inp / KB * P * tl, "packed tiles too short");
    // The high halves of the 32 lanes of two registers, in order: each lane's bf16 bits.
    const HIGH: [u16; 32] = {
        let mut h = [0u16; 32];
        let mut j = 0;
        while j < 32 {
            h[j] = 2 * j as u16 + 1;
            j += 1;
        }
        h
    };
    let tokens: __mmask16 = if n == GROUP { !0 } else { (1u16 << n) - 1 };
    // SAFETY (whole body): the loads read rows t < n of `x`, inputs b·32 .. b·32 + 32 < inp;
    // the stores write row q (< 16) of tile (b, p), n lanes of 4 bytes from q·2n u16s, inside
    // `out` (asserted above).
    unsafe {
        let high = _mm512_loadu_si512(HIGH.as_ptr().cast());
        // `v` rounded to bf16 as `round_bf16` does, the result's bits in each lane's high half
        // (the low half zero): the part, and its value as f32.
        let round = |v: __m512| -> __m512i {
            let b = _mm512_castps_si512(v);
            let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
            let r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), odd);
            _mm512_and_si512(r, _mm512_set1_epi32(0xFFFF_0000u32 as i32))
        };
        let split = |v: __m512| -> [__m512i; P] {
            let mut r = v;
            std::array::from_fn(|_| {
                let h = round(r);
                r = _mm512_sub_ps(r, _mm512_castsi512_ps(h));
                h
            })
        };
        for b in 0..inp / KB {
            let mut rows = [[_mm512_setzero_ps(); GROUP]; P];
            for t in 0..n {
                let xp = x.as_ptr().add(t * inp + b * KB);
                let lo = split(_mm512_loadu_ps(xp));
                let hi = split(_mm512_loadu_ps(xp.add(16)));
                for ((part, lo), hi) in rows.iter_mut().zip(lo).zip(hi) {
                    part[t] = _mm512_castsi512_ps(_mm512_permutex2var_epi16(lo, high, hi));
                }
            }
            for (p, part) in rows.iter().enumerate() {
                let tile = out.as_mut_ptr().add((b * P + p) * tl);
                for (q, row) in transpose16(part).into_iter().enumerate() {
                    _mm512_mask_storeu_ps(tile.add(q * 2 * n).cast(), tokens, row);
                }
            }
        }
    }
}

/// Packs one token group with [`pack_group_avx512`] where the CPU has it, [`pack_group`]
/// otherwise.
fn pack<const P: usize>(x: &[f32], inp: usize, out: &mut [u16]) {
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        // SAFETY: the CPU has both, checked above.
        unsafe { pack_group_avx512::<P>(x, inp, out) }
    } else {
        pack_group::<P>(x, inp, out);
    }
}

thread_local! {
    /// Packed activations (see [`super::with_scratch`]); each grows to the largest
    /// `groups · in · parts` once.
    static PACKED: Scratch = const { RefCell::new(Vec::new()) };
    /// The last weight rows of a task, padded with zero rows to a whole tile.
    static TAIL: Scratch = const { RefCell::new(Vec::new()) };
}

/// One weight of an AMX pass: its bf16 `[out, in]` elements, output count and output pointer.
#[derive(Clone, Copy)]
pub(super) struct Job<'a> {
    pub(super) w: &'a [bf16],
    pub(super) out: usize,
    pub(super) y: SendPtr,
}

/// `ys[i] = x · ws[i]ᵀ` for every job, all of input width `inp` (a multiple of [`KB`]), as one
/// parallel pass over blocks of [`task_rows`] output rows, the activations split into `P`
/// bf16 parts ([`PARTS`] or [`BF16_PARTS`]). At most [`super::MAX_PARTS`] jobs.
///
/// # Safety
/// [`available`] must be true; each job's `y` must point to `rows · out` writable f32s that no
/// one else touches during the call, and its `w` must hold `out · inp` elements.
pub(super) unsafe fn linear_many<const P: usize>(
    x: &[f32],
    rows: usize,
    inp: usize,
    jobs: &[Job<'_>],
) {
    debug_assert!(inp.is_multiple_of(KB) && x.len() >= rows * inp);
    debug_assert!(jobs.len() <= super::MAX_PARTS);
    let tasks = jobs.iter().map(|job| job.out.div_ceil(task_rows(inp)));
    packed_pass::<P>(x, rows, inp, tasks, |block, i, t| {
        // SAFETY: the caller's contract; tasks own disjoint (rows, columns) ranges.
        unsafe { task::<P>(block, inp, jobs[i], t) };
    });
}

/// Token groups whose packed activations may share one task's L2 with a band of weights.
const ROW_BLOCK_BYTES: usize = 512 << 10;

/// Token groups per row block for activations of `inp` inputs: as many as [`ROW_BLOCK_BYTES`]
/// hold, or every group (one block) where fewer than two fit.
///
/// Every task of a pass used to read every token group's activation tiles: with a prompt's
/// hundreds of rows they outgrow L2, so each band of weights read them again from L3. A task
/// now takes one band against one block of rows, and a pass lists a job's tasks block after
/// block, so the tasks a thread runs in turn share a block in L2. The weights are read once
/// per block instead of once in all: that pays where a block holds at least two groups (the
/// activations' three parts are 96 bytes an input, a weight row's two bytes an input each
/// of a band's 64 rows), hence one block below two. `parts`: the activations' bf16 parts.
fn groups_per_block(inp: usize, parts: usize, groups: usize) -> usize {
    let fit = ROW_BLOCK_BYTES / (inp * parts * JB * 2);
    if fit < 2 {
        groups
    } else {
        fit.min(groups)
    }
}

/// Token rows of one task: the packed groups it runs and where their rows start.
#[derive(Clone, Copy)]
struct RowBlock<'a> {
    packed: &'a [u16],
    /// Rows in the block.
    rows: usize,
    /// Index of the block's first row among all rows.
    row0: usize,
}

/// Packs `x`'s rows into activation tiles of `P` parts, then runs every job's tasks (`tasks`
/// yields each job's count, at most [`super::MAX_PARTS`] jobs) against every row block as one
/// parallel pass, `run(rows, job, task of that job)`, a job's tasks listed block after block.
fn packed_pass<const P: usize>(
    x: &[f32],
    rows: usize,
    inp: usize,
    tasks: impl Iterator<Item = usize>,
    run: impl Fn(RowBlock<'_>, usize, usize) + Sync,
) {
    // A full group's tiles (inp / 32 blocks × P × 16 rows × 16 pairs); a last, partial group
    // uses the start of its share.
    let group_len = inp * P * JB;
    let groups = rows.div_ceil(GROUP);
    if groups == 0 {
        return;
    }
    let per_block = groups_per_block(inp, P, groups);
    let blocks = groups.div_ceil(per_block);
    let mut counts = [0usize; super::MAX_PARTS];
    let mut jobs = 0;
    for (c, n) in counts.iter_mut().zip(tasks) {
        *c = n;
        jobs += 1;
    }
    let (firsts, jobs, total) = super::task_firsts(counts[..jobs].iter().map(|&n| n * blocks));
    let firsts = &firsts[..jobs];
    with_scratch::<u16, _>(&PACKED, groups * group_len, |packed| {
        let x = &x[..rows * inp];
        if rows * inp >= PAR_PACK_ELEMS {
            packed
                .par_chunks_mut(group_len)
                .zip(x.par_chunks(GROUP * inp))
                .for_each(|(out, xg)| pack::<P>(xg, inp, out));
        } else {
            for (out, xg) in packed.chunks_mut(group_len).zip(x.chunks(GROUP * inp)) {
                pack::<P>(xg, inp, out);
            }
        }
        let packed = &*packed;
        (0..total).into_par_iter().for_each(|t| {
            let i = firsts.iter().rposition(|&f| f <= t).unwrap_or(0);
            let (b, k) = ((t - firsts[i]) / counts[i], (t - firsts[i]) % counts[i]);
            let g0 = b * per_block;
            let g1 = (g0 + per_block).min(groups);
            let block = RowBlock {
                packed: &packed[g0 * group_len..g1 * group_len],
                rows: (g1 * GROUP).min(rows) - g0 * GROUP,
                row0: g0 * GROUP,
            };
            run(block, i, k);
        });
    });
}

/// Output rows `task_rows(inp)·blk ..` of one job for the tokens of `rows`.
///
/// # Safety
/// As for [`linear_many`], with `rows` holding its token groups' activation tiles.
unsafe fn task<const P: usize>(rows: RowBlock<'_>, inp: usize, job: Job<'_>, blk: usize) {
    let j0 = blk * task_rows(inp);
    let j1 = (j0 + task_rows(inp)).min(job.out);
    let full = (j1 - j0) / JB;
    let tail = (j1 - j0) % JB;
    let stride = inp * 2;
    // Runs `w`'s `nb` 16-row blocks (rows `stride` apart) against every token group.
    let groups = |w: *const u16, nb: usize, n_rows: usize, j: usize| {
        // SAFETY: the caller's contract; `w` covers nb whole 16-row blocks of inp elements (of
        // the weight or its padded copy), and rows j .. j + n_rows are this task's alone.
        unsafe {
            run_groups::<P>(
                rows,
                inp,
                Walk::in_place(w, stride),
                nb,
                (job.y, job.out),
                j..j + n_rows,
            );
        }
    };
    if full > 0 {
        groups(job.w[j0 * inp..].as_ptr().cast(), full, full * JB, j0);
    }
    if tail > 0 {
        // The last rows of a weight whose output count is not a multiple of 16, padded with
        // zero rows to a whole tile.
        let jt = j0 + full * JB;
        with_scratch::<u16, _>(&TAIL, JB * inp, |pad| {
            pad[..tail * inp].copy_from_slice(bytemuck::cast_slice(&job.w[jt * inp..j1 * inp]));
            pad[tail * inp..].fill(0);
            groups(pad.as_ptr(), 1, tail, jt);
        });
    }
    // SAFETY: no tile is live past this point.
    unsafe { release() };
}

/// `nb` (1 to 4) 16-row weight blocks laid out as `w` says, for output rows `js` of `(y, out)`,
/// against every token group of `rows` (of `inp` inputs). Leaves the tiles configured; the
/// caller releases them.
///
/// # Safety
/// [`available`] must be true; `w` must cover nb whole blocks of inp elements, `y` hold every
/// token's `out` outputs, and rows `js` of the block's tokens be the caller's alone.
unsafe fn run_groups<const P: usize>(
    rows: RowBlock<'_>,
    inp: usize,
    w: Walk,
    nb: usize,
    (y, out): (SendPtr, usize),
    js: std::ops::Range<usize>,
) {
    let kbs = inp / KB;
    let mut acc = [0f32; ACC_LEN];
    let mut configured = 0;
    for (g, xg) in rows.packed.chunks_exact(inp * P * JB).enumerate() {
        let n = (rows.rows - g * GROUP).min(GROUP);
        // SAFETY: the caller's contract; `xg` holds kbs·P tiles of n tokens.
        unsafe {
            if n != configured {
                configure(&TileConfig::new(n));
                configured = n;
            }
            match nb {
                4 => block::<4, P>(w, xg.as_ptr(), n, kbs, &mut acc),
                3 => block::<3, P>(w, xg.as_ptr(), n, kbs, &mut acc),
                2 => block::<2, P>(w, xg.as_ptr(), n, kbs, &mut acc),
                _ => block::<1, P>(w, xg.as_ptr(), n, kbs, &mut acc),
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                scatter_avx512(&acc, js.len(), n, rows.row0 + g * GROUP, (y, out), js.start);
            } else {
                scatter(&acc, js.len(), n, rows.row0 + g * GROUP, (y, out), js.start);
            }
        }
    }
}

/// f32s of one token group's four C tiles: C0, C1, C2, C3, each 16 rows × 16 tokens.
const ACC_LEN: usize = 4 * JB * GROUP;

/// Writes `n_rows` output rows (from `j`, block b's in C tile b) of `n_tok` tokens from token
/// `t0`.
///
/// # Safety
/// `y` must hold every token's `out` outputs, and rows `j .. j + n_rows` of those tokens must
/// be this task's alone.
unsafe fn scatter(
    c: &[f32; ACC_LEN],
    n_rows: usize,
    n_tok: usize,
    t0: usize,
    (y, out): (SendPtr, usize),
    j: usize,
) {
    const T: usize = JB * GROUP;
    for m in 0..n_rows {
        let (b, r) = (m / JB, m % JB);
        for n in 0..n_tok {
            let v = c[b * T + r * GROUP + n];
            // SAFETY: (token t0 + n, row j + m) is inside this job's output and in the
            // range of this task alone.
            unsafe { *y.get().add((t0 + n) * out + j + m) = v };
        }
    }
}

/// [`scatter`] sixteen rows at a time: each C tile (16 rows × 16 tokens) transposed in
/// registers, then one masked 16-row store per token, where the scalar loop stores each value
/// on its own, a token's row apart (perf: 13 % of `run_groups`' samples on a 32-prompt
/// prefill). The same values to the same places.
///
/// # Safety
/// As [`scatter`], and the CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn scatter_avx512(
    c: &[f32; ACC_LEN],
    n_rows: usize,
    n_tok: usize,
    t0: usize,
    (y, out): (SendPtr, usize),
    j: usize,
) {
    use std::arch::x86_64::*;
    const T: usize = JB * GROUP;
    for b in 0..n_rows.div_ceil(JB) {
        let rows = (n_rows - b * JB).min(JB);
        let mask: __mmask16 = if rows == JB { !0 } else { (1u16 << rows) - 1 };
        // SAFETY (block): c holds 4 tiles of 16 × 16 floats; each store writes only the
        // `rows` lanes of (token t0 + n, rows j + b·16 ..) that scatter would, this task's.
        unsafe {
            let r: [__m512; 16] =
                std::array::from_fn(|i| _mm512_loadu_ps(c.as_ptr().add(b * T + i * GROUP)));
            for (tok, w) in transpose16(&r).into_iter().enumerate().take(n_tok) {
                let dst = y.get().add((t0 + tok) * out + j + b * JB);
                _mm512_mask_storeu_ps(dst, mask, w);
            }
        }
    }
}

/// The 16 × 16 transpose of 32-bit lanes: lane `i` of result `t` is lane `t` of `r[i]`.
///
/// # Safety
/// The CPU must have AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &[std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // Pairs of rows, then fours: u[4q + k] holds rows 4q..4q+3 of columns k, k+4, k+8, k+12
    // (one per 128-bit lane).
    let mut u = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        let t0 = _mm512_unpacklo_ps(r[4 * q], r[4 * q + 1]);
        let t1 = _mm512_unpackhi_ps(r[4 * q], r[4 * q + 1]);
        let t2 = _mm512_unpacklo_ps(r[4 * q + 2], r[4 * q + 3]);
        let t3 = _mm512_unpackhi_ps(r[4 * q + 2], r[4 * q + 3]);
        let pd = |v| _mm512_castps_pd(v);
        let ps = |v| _mm512_castpd_ps(v);
        u[4 * q] = ps(_mm512_unpacklo_pd(pd(t0), pd(t2)));
        u[4 * q + 1] = ps(_mm512_unpackhi_pd(pd(t0), pd(t2)));
        u[4 * q + 2] = ps(_mm512_unpacklo_pd(pd(t1), pd(t3)));
        u[4 * q + 3] = ps(_mm512_unpackhi_pd(pd(t1), pd(t3)));
    }
    // Eights of rows: for rows 8h..8h+7, v[8h + k] holds columns k and k+8 and v[8h + 4 + k]
    // columns k+4 and k+12 (k < 4).
    let mut v = [_mm512_setzero_ps(); 16];
    for h in 0..2 {
        for k in 0..4 {
            let (a, bb) = (u[8 * h + k], u[8 * h + 4 + k]);
            v[8 * h + k] = _mm512_shuffle_f32x4::<0x88>(a, bb);
            v[8 * h + 4 + k] = _mm512_shuffle_f32x4::<0xdd>(a, bb);
        }
    }
    // All sixteen rows: column k from the even 128-bit lanes of v[k] and v[8 + k], column
    // k + 8 from their odd ones.
    let mut out = [_mm512_setzero_ps(); 16];
    for k in 0..8 {
        out[k] = _mm512_shuffle_f32x4::<0x88>(v[k], v[8 + k]);
        out[k + 8] = _mm512_shuffle_f32x4::<0xdd>(v[k], v[8 + k]);
    }
    out
}

/// Where a weight's tiles lie: tile `i` (of a task's 16-row blocks) of input block `b` at
/// `base + i·block_step + b·k_step` bytes, its 16 rows `row_stride` bytes apart.
#[derive(Clone, Copy)]
struct Walk {
    base: *const u8,
    block_step: usize,
    k_step: usize,
    row_stride: usize,
    /// Fetch each tile's stream [`PREFETCH_AHEAD`] bytes ahead (tile order only: in place a
    /// task reads 32-64 rows side by side, and prefetching them gained nothing).
    prefetch: bool,
}

impl Walk {
    /// Blocks of 16 rows (`stride` bytes apart) read in place from `w`.
    fn in_place(w: *const u16, stride: usize) -> Walk {
        Walk {
            base: w.cast(),
            block_step: JB * stride,
            k_step: KB * 2,
            row_stride: stride,
            prefetch: false,
        }
    }

    /// A band of [`Tiles`]: four tiles per input block, one after another.
    fn band(w: *const u16) -> Walk {
        const TILE_BYTES: usize = JB * KB * 2;
        Walk {
            base: w.cast(),
            block_step: TILE_BYTES,
            k_step: 4 * TILE_BYTES,
            row_stride: KB * 2,
            prefetch: true,
        }
    }
}

/// NB (1 to 4) 16-row weight blocks laid out as `w` says against one group of `n` tokens'
/// packed activations `x` of `P` parts (3 or 1), over `kbs` input blocks; the C tiles are
/// stored into `c` (tile i at `i·256`, 16 rows × n at a 16-token stride). The tiles must be
/// configured for `n`.
///
/// Per input block the activation tiles are loaded once (tmm5-7: `h`, `m`, `l`; or tmm5
/// alone) and serve every weight block, each loaded in turn into tmm4 and multiplied into its
/// own C tile (tmm0-3) with the parts in that order, so every element sums the same products
/// in the same order whatever NB and wherever its weights lie.
///
/// In place, prefetching the rows ahead into L1 or L2, or the next block into L2, and copying
/// rows into tile order on every call were each tried and gained nothing outside noise; a copy
/// made once at load ([`Tiles`]) did. A tile load costs about three products (20 ns against
/// 6.3), so two token groups against two weight blocks at a time load fewer tiles per
/// product: faster with the weights in cache, but 15-30 % slower streaming them from memory,
/// as a prompt's experts do (docs/performance-log.md, eighth Xeon sitting).
#[inline(always)]
unsafe fn block<const NB: usize, const P: usize>(
    w: Walk,
    x: *const u16,
    n: usize,
    kbs: usize,
    c: &mut [f32; ACC_LEN],
) {
    const T: usize = JB * GROUP;
    let (tl, xs) = (tile_len(n), 4 * n);
    // SAFETY (whole body): tiles configured by the caller; `w` covers NB blocks of kbs tiles
    // (prefetches never fault) and `x` kbs·P tiles of n tokens.
    unsafe {
        zero::<0>();
        if NB > 1 {
            zero::<1>();
        }
        if NB > 2 {
            zero::<2>();
        }
        if NB > 3 {
            zero::<3>();
        }
        for b in 0..kbs {
            let xt = x.add(b * P * tl);
            load::<5>(xt, xs);
            if P > 1 {
                load::<6>(xt.add(tl), xs);
                load::<7>(xt.add(2 * tl), xs);
            }
            let k = w.base.add(b * w.k_step);
            // Weight block $c's tile into tmm4, times the h, m and l parts into C tile $c.
            macro_rules! weights_into {
                ($c:literal) => {{
                    let t = k.add($c * w.block_step);
                    if w.prefetch {
                        let ahead = t.wrapping_add(PREFETCH_AHEAD);
                        for l in 0..JB {
                            prefetch(ahead.wrapping_add(l * 64));
                        }
                    }
                    load::<4>(t.cast(), w.row_stride);
                    dot::<$c, 4, 5>();
                    if P > 1 {
                        dot::<$c, 4, 6>();
                        dot::<$c, 4, 7>();
                    }
                }};
            }
            weights_into!(0);
            if NB > 1 {
                weights_into!(1);
            }
            if NB > 2 {
                weights_into!(2);
            }
            if NB > 3 {
                weights_into!(3);
            }
        }
        let c = c.as_mut_ptr();
        store::<0>(c);
        if NB > 1 {
            store::<1>(c.add(T));
        }
        if NB > 2 {
            store::<2>(c.add(2 * T));
        }
        if NB > 3 {
            store::<3>(c.add(3 * T));
        }
    }
}

/// `ys[i] = x · ws[i]ᵀ` for `(ws[i], ys[i])` in `jobs`, all of one input width, as one parallel
/// pass over bands; at most [`super::MAX_PARTS`] jobs. Any number of rows.
///
/// # Safety
/// [`available`] must be true; each `ys[i]` must point to `rows · ws[i].out` writable f32s that
/// no one else touches during the call; `x` must hold `rows · inp` elements.
pub(super) unsafe fn linear_tiles<const P: usize>(
    x: &[f32],
    rows: usize,
    jobs: &[(&Tiles, SendPtr)],
) {
    debug_assert!(jobs.len() <= super::MAX_PARTS);
    let Some(inp) = jobs.first().map(|(w, _)| w.inp()) else {
        return;
    };
    debug_assert!(jobs.iter().all(|(w, _)| w.inp() == inp) && x.len() >= rows * inp);
    if rows == 0 {
        return;
    }
    let tasks = jobs.iter().map(|(w, _)| w.out().div_ceil(BAND));
    packed_pass::<P>(x, rows, inp, tasks, |block, i, t| {
        let (w, y) = jobs[i];
        // SAFETY: the caller's contract; tasks own disjoint (rows, band) ranges.
        unsafe { band::<P>(block, w, y, t) };
    });
}

/// Band `t` of `w` for the token groups of `rows`.
///
/// # Safety
/// As for [`linear_tiles`], with `rows` holding its token groups' activation tiles.
unsafe fn band<const P: usize>(rows: RowBlock<'_>, w: &Tiles, y: SendPtr, t: usize) {
    let j = t * BAND;
    // SAFETY: the caller's contract; the band holds kbs · 4 whole tiles, and its rows of these
    // tokens are this task's alone.
    unsafe {
        run_groups::<P>(
            rows,
            w.inp(),
            Walk::band(w.band(t).as_ptr()),
            4,
            (y, w.out()),
            j..w.out().min(j + BAND),
        );
    }
    // SAFETY: no tile is live past this point.
    unsafe { release() };
}

/// How far ahead of each weight tile its stream is fetched into L1: the next two tiles. Tile
/// loads wait for the products of the last (tile registers are not renamed), so a tile load
/// that misses the cache stalls the unit for a memory round trip; the L2 streamer does not
/// cross 4 KiB pages. bench_linear, 700 MB of weights, 2 threads, GB/s on w1/w2, without
/// against 2 KiB ahead into L1: 16/16 → 22/19 at 1 token, 12/11 → 17/15 at 8; 4 KiB was no
/// better, 8-16 KiB into L2 mixed.
const PREFETCH_AHEAD: usize = 2048;

#[inline(always)]
unsafe fn prefetch(p: *const u8) {
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe { asm!("prefetcht0 [{p}]", p = in(reg) p, options(nostack, readonly, preserves_flags)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_bf16_parts_add_up_to_the_f32() {
        let xs: Vec<f32> = (0..KB)
            .map(|i| ((i as f32) * 0.7371 - 11.0) * 1.0e-3f32.powi((i % 3) as i32))
            .collect();
        let mut parts = [[0u16; KB]; PARTS];
        split(&xs, &mut parts);
        let mut one = [[0u16; KB]; BF16_PARTS];
        split(&xs, &mut one);
        assert_eq!(one[0], parts[0], "one part is the first of three");
        for (k, &v) in xs.iter().enumerate() {
            let sum =
                widen(parts[0][k]) as f64 + widen(parts[1][k]) as f64 + widen(parts[2][k]) as f64;
            assert_eq!(sum, v as f64, "element {k}");
            assert_eq!(
                parts[0][k],
                bf16::from_f32(v).to_bits(),
                "h is the rounded value"
            );
        }
    }

    #[test]
    fn the_register_pack_writes_what_the_scalar_one_does() {
        if !(std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw"))
        {
            eprintln!("skipped: no AVX-512BW");
            return;
        }
        // Values of every magnitude and sign, with ties, infinities, NaNs and subnormals.
        let special = [
            0.0,
            -0.0,
            1.0 + 2f32.powi(-8),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE / 3.0,
            f32::MAX,
        ];
        for inp in [32, 96] {
            for n in 1..=GROUP {
                let x: Vec<f32> = (0..n * inp)
                    .map(|i| {
                        if i % 37 == 5 {
                            special[i / 37 % special.len()]
                        } else {
                            ((i * 7919 % 2003) as f32 / 1001.5 - 1.0)
                                * 10f32.powi((i % 9) as i32 - 4)
                        }
                    })
                    .collect();
                let len = inp * PARTS * JB;
                let (mut want, mut got) = (vec![0xABCDu16; len], vec![0xABCDu16; len]);
                pack_group::<PARTS>(&x, inp, &mut want);
                // SAFETY: the CPU has AVX-512F and BW, checked above.
                unsafe { pack_group_avx512::<PARTS>(&x, inp, &mut got) };
                assert_eq!(got, want, "in {inp}, {n} tokens");
                let len = inp * BF16_PARTS * JB;
                let (mut want, mut got) = (vec![0xABCDu16; len], vec![0xABCDu16; len]);
                pack_group::<BF16_PARTS>(&x, inp, &mut want);
                // SAFETY: as above.
                unsafe { pack_group_avx512::<BF16_PARTS>(&x, inp, &mut got) };
                assert_eq!(got, want, "one part: in {inp}, {n} tokens");
            }
        }
    }

    #[test]
    fn the_transposing_scatter_writes_what_the_scalar_one_does() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let c: [f32; ACC_LEN] = std::array::from_fn(|i| i as f32 * 0.5 - 300.0);
        let (out, t0, j) = (150, 3, 21);
        for n_rows in [64, 50, 17, 16, 7, 1] {
            for n_tok in [16, 11, 1] {
                // Unwritten places keep their NaN: each scatter writes exactly its own.
                let mut a = vec![f32::NAN; (t0 + 16) * out];
                let mut b = a.clone();
                // SAFETY: both outputs hold t0 + 16 tokens of `out` values, rows j + 64 ≤ out;
                // the CPU has AVX-512F, checked above.
                unsafe {
                    scatter(&c, n_rows, n_tok, t0, (SendPtr(a.as_mut_ptr()), out), j);
                    scatter_avx512(&c, n_rows, n_tok, t0, (SendPtr(b.as_mut_ptr()), out), j);
                }
                let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{n_rows} rows, {n_tok} tokens");
                assert_eq!(
                    a.iter().filter(|v| !v.is_nan()).count(),
                    n_rows * n_tok,
                    "{n_rows} rows, {n_tok} tokens"
                );
            }
        }
    }
}
