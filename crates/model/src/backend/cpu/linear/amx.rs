//! AMX (Advanced Matrix Extensions) tiles for bf16 weights against many token rows.
//!
//! Once a step has more than a few token rows, the FMA kernels are bound by arithmetic: two
//! cores of 512-bit FMAs do at most ~330 GFLOP/s, where one AMX unit's `tdpbf16ps` does
//! ~2.5 TFLOP/s (measured on the Xeon this was written on: 6.4 ns per 16×16×32 tile product).
//! Weights are bf16 as stored, read straight from the checkpoint map as A tiles (16 output rows
//! × 32 inputs). Activations are f32 and must stay so to meet the reference's tolerances, so
//! each one is split into three bf16 parts, `x = h + m + l` (8 significant bits each, together
//! all 24 of an f32), and every product is exact in the f32 accumulators: the result is as
//! accurate as the FMA kernels', in another summation order.
//!
//! Tile registers: tmm5-7 hold one input block's activation tiles (its `h`, `m` and `l` parts)
//! and serve up to four 16-row weight blocks, each loaded in turn into tmm4 and multiplied into
//! its own accumulator (tmm0-3). Every (output row, token) element runs the same sequence of
//! products whatever block, task or token group it falls in, so a row's result depends on its
//! inputs alone, as on the other paths.
//!
//! Linux hands out the tile state on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), once per
//! process; [`available`] asks, and AMX is used only if granted. Each task loads the tile
//! configuration and releases the tiles when done, so a thread idle between steps carries no
//! tile state through context switches.

use super::{with_scratch, SendPtr};
use half::bf16;
use rayon::prelude::*;
use std::arch::asm;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Parts each activation is split into (`h`, `m`, `l`).
const PARTS: usize = 3;
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

/// Splits 32 activations into their three bf16 parts.
#[inline(always)]
fn split(x: &[f32], parts: &mut [[u16; KB]; PARTS]) {
    for (k, &v) in x.iter().enumerate().take(KB) {
        let h = round_bf16(v);
        let r = v - widen(h);
        let m = round_bf16(r);
        let l = round_bf16(r - widen(m));
        parts[0][k] = h;
        parts[1][k] = m;
        parts[2][k] = l;
    }
}

/// u16 elements of one activation tile of a group of `n` tokens: 16 rows of n bf16 pairs.
#[inline]
fn tile_len(n: usize) -> usize {
    JB * 2 * n
}

/// Lays out one token group's rows (n ≤ 16 of `x`'s rows of `inp`) as B tiles: for input block
/// b and part p, the tile at `(b·PARTS + p)·tile_len(n)` whose row q holds, for each token t,
/// the pair (x_p[t][32b + 2q], x_p[t][32b + 2q + 1]).
fn pack_group(x: &[f32], inp: usize, out: &mut [u16]) {
    let n = x.len() / inp;
    let tl = tile_len(n);
    let mut parts = [[0u16; KB]; PARTS];
    for (t, xr) in x.chunks_exact(inp).enumerate() {
        for (b, xb) in xr.chunks_exact(KB).enumerate() {
            split(xb, &mut parts);
            let base = b * PARTS * tl + t * 2;
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

thread_local! {
    /// Packed activations (see [`super::with_scratch`]); each grows to the largest
    /// `groups · in · PARTS` once.
    static PACKED: RefCell<Vec<Vec<u16>>> = const { RefCell::new(Vec::new()) };
    /// The last weight rows of a task, padded with zero rows to a whole tile.
    static TAIL: RefCell<Vec<Vec<u16>>> = const { RefCell::new(Vec::new()) };
}

/// One weight of an AMX pass: its bf16 `[out, in]` elements, output count and output pointer.
#[derive(Clone, Copy)]
pub(super) struct Job<'a> {
    pub(super) w: &'a [bf16],
    pub(super) out: usize,
    pub(super) y: SendPtr,
}

/// `ys[i] = x · ws[i]ᵀ` for every job, all of input width `inp` (a multiple of [`KB`]), as one
/// parallel pass over blocks of [`task_rows`] output rows. At most [`super::MAX_PARTS`] jobs.
///
/// # Safety
/// [`available`] must be true; each job's `y` must point to `rows · out` writable f32s that no
/// one else touches during the call, and its `w` must hold `out · inp` elements.
pub(super) unsafe fn linear_many(x: &[f32], rows: usize, inp: usize, jobs: &[Job<'_>]) {
    debug_assert!(inp.is_multiple_of(KB) && x.len() >= rows * inp);
    debug_assert!(jobs.len() <= super::MAX_PARTS);
    let groups = rows.div_ceil(GROUP);
    // A full group's tiles (inp / 32 blocks × PARTS × 16 rows × 16 pairs); a last, partial
    // group uses the start of its share.
    let group_len = inp * PARTS * JB;
    with_scratch(&PACKED, groups * group_len, |packed| {
        let x = &x[..rows * inp];
        if rows * inp >= PAR_PACK_ELEMS {
            packed
                .par_chunks_mut(group_len)
                .zip(x.par_chunks(GROUP * inp))
                .for_each(|(out, xg)| pack_group(xg, inp, out));
        } else {
            for (out, xg) in packed.chunks_mut(group_len).zip(x.chunks(GROUP * inp)) {
                pack_group(xg, inp, out);
            }
        }
        let packed = &*packed;
        // Each job's first task.
        let mut firsts = [0; super::MAX_PARTS];
        let mut tasks = 0;
        for (first, job) in firsts.iter_mut().zip(jobs) {
            *first = tasks;
            tasks += job.out.div_ceil(task_rows(inp));
        }
        let firsts = &firsts[..jobs.len()];
        (0..tasks).into_par_iter().for_each(|t| {
            let i = firsts.iter().rposition(|&f| f <= t).unwrap_or(0);
            // SAFETY: the caller's contract; tasks own disjoint column ranges.
            unsafe { task(packed, rows, inp, jobs[i], t - firsts[i]) };
        });
    });
}

/// Output rows `task_rows(inp)·blk ..` of one job for every token.
///
/// # Safety
/// As for [`linear_many`], with `packed` holding every token group's activation tiles.
unsafe fn task(packed: &[u16], rows: usize, inp: usize, job: Job<'_>, blk: usize) {
    let j0 = blk * task_rows(inp);
    let j1 = (j0 + task_rows(inp)).min(job.out);
    let full = (j1 - j0) / JB;
    let tail = (j1 - j0) % JB;
    let kbs = inp / KB;
    let stride = inp * 2;
    let group_len = inp * PARTS * JB;
    let mut acc = [0f32; ACC_LEN];
    // Runs `w`'s `nb` 16-row blocks (rows `stride` apart) against every token group.
    let mut groups = |w: *const u16, nb: usize, n_rows: usize, j: usize| {
        let mut configured = 0;
        for (g, xg) in packed.chunks_exact(group_len).enumerate() {
            let n = (rows - g * GROUP).min(GROUP);
            // SAFETY: `available` was checked by the caller; `w` covers nb whole 16-row blocks
            // of kbs·32 elements (of the weight or its padded copy) and `xg` kbs·PARTS tiles of
            // n tokens.
            unsafe {
                if n != configured {
                    configure(&TileConfig::new(n));
                    configured = n;
                }
                match nb {
                    4 => block::<4>(w, stride, xg.as_ptr(), n, kbs, &mut acc),
                    3 => block::<3>(w, stride, xg.as_ptr(), n, kbs, &mut acc),
                    2 => block::<2>(w, stride, xg.as_ptr(), n, kbs, &mut acc),
                    _ => block::<1>(w, stride, xg.as_ptr(), n, kbs, &mut acc),
                }
                scatter(&acc, n_rows, n, g, job, j);
            }
        }
    };
    if full > 0 {
        groups(job.w[j0 * inp..].as_ptr().cast(), full, full * JB, j0);
    }
    if tail > 0 {
        // The last rows of a weight whose output count is not a multiple of 16, padded with
        // zero rows to a whole tile.
        let jt = j0 + full * JB;
        with_scratch(&TAIL, JB * inp, |pad| {
            pad[..tail * inp].copy_from_slice(bytemuck::cast_slice(&job.w[jt * inp..j1 * inp]));
            pad[tail * inp..].fill(0);
            groups(pad.as_ptr(), 1, tail, jt);
        });
    }
    // SAFETY: no tile is live past this point.
    unsafe { release() };
}

/// f32s of one token group's four C tiles: C0, C1, C2, C3, each 16 rows × 16 tokens.
const ACC_LEN: usize = 4 * JB * GROUP;

/// Writes `n_rows` output rows (from `j`, block b's in C tile b) of token group `g`'s first
/// `n_tok` tokens.
///
/// # Safety
/// `job.y` must hold every token's `job.out` outputs, and rows `j .. j + n_rows` must be this
/// task's alone.
unsafe fn scatter(
    c: &[f32; ACC_LEN],
    n_rows: usize,
    n_tok: usize,
    g: usize,
    job: Job<'_>,
    j: usize,
) {
    const T: usize = JB * GROUP;
    for m in 0..n_rows {
        let (b, r) = (m / JB, m % JB);
        for n in 0..n_tok {
            let v = c[b * T + r * GROUP + n];
            // SAFETY: (token g·16 + n, row j + m) is inside this job's output and in the
            // column range of this task alone.
            unsafe { *job.y.get().add((g * GROUP + n) * job.out + j + m) = v };
        }
    }
}

/// NB (1 to 4) 16-row weight blocks from `w` (rows `stride` bytes apart) against one group of
/// `n` tokens' packed activations `x`, over `kbs` input blocks; the C tiles are stored into
/// `c` (tile i at `i·256`, 16 rows × n at a 16-token stride). The tiles must be configured
/// for `n`.
///
/// Per input block the three activation tiles are loaded once (tmm5-7) and serve every weight
/// block, each loaded in turn into tmm4 and multiplied into its own C tile (tmm0-3) with the
/// `h`, `m` and `l` parts in that order, so every element sums the same products in the same
/// order whatever NB.
///
/// Weight tiles are loaded straight from the checkpoint's rows. Prefetching the rows ahead into
/// L1 or L2, or the next block into L2, and copying rows into tile order first were each tried
/// and gained nothing outside noise.
#[inline(always)]
unsafe fn block<const NB: usize>(
    w: *const u16,
    stride: usize,
    x: *const u16,
    n: usize,
    kbs: usize,
    c: &mut [f32; ACC_LEN],
) {
    const T: usize = JB * GROUP;
    let (tl, xs) = (tile_len(n), 4 * n);
    // SAFETY (whole body): tiles configured by the caller; `w` has NB·16 rows of kbs·32
    // elements and `x` kbs·PARTS tiles of n tokens.
    unsafe {
        let wb = |i: usize| w.cast::<u8>().add(i * JB * stride).cast::<u16>();
        let (w0, w1, w2, w3) = (
            wb(0),
            wb(1.min(NB - 1)),
            wb(2.min(NB - 1)),
            wb(3.min(NB - 1)),
        );
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
            let xt = x.add(b * PARTS * tl);
            load::<5>(xt, xs);
            load::<6>(xt.add(tl), xs);
            load::<7>(xt.add(2 * tl), xs);
            let k = b * KB;
            // One weight block's tile into tmm4, times the h, m and l parts into C tile $c.
            macro_rules! weights_into {
                ($c:literal, $w:expr) => {{
                    load::<4>($w.add(k), stride);
                    dot::<$c, 4, 5>();
                    dot::<$c, 4, 6>();
                    dot::<$c, 4, 7>();
                }};
            }
            weights_into!(0, w0);
            if NB > 1 {
                weights_into!(1, w1);
            }
            if NB > 2 {
                weights_into!(2, w2);
            }
            if NB > 3 {
                weights_into!(3, w3);
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
}
