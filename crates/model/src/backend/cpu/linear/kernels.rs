//! The dot kernels' shared shapes and their run-time choice by CPU features.

use crate::weights::Elems;
use std::sync::OnceLock;

/// Token rows as the kernels read them: f32 in order, and for the bf16 pair tiles the same
/// rows with each block laid out evens first ([`Pairing`]), or rounded to bf16 for the
/// `vdpbf16ps` tiles ([`bf16_activations`]). `pairs` and `bf16` are empty where the kernels do
/// not use them.
#[derive(Clone, Copy)]
pub struct Lhs<'a> {
    pub f32: &'a [f32],
    pub pairs: &'a [f32],
    pub bf16: &'a [u16],
}

impl<'a> Lhs<'a> {
    /// Token rows `r .. r + n`.
    #[inline]
    pub fn rows(self, r: usize, n: usize, inp: usize) -> Lhs<'a> {
        Lhs {
            f32: &self.f32[r * inp..(r + n) * inp],
            pairs: self.pairs.get(r * inp..(r + n) * inp).unwrap_or(&[]),
            bf16: self.bf16.get(r * inp..(r + n) * inp).unwrap_or(&[]),
        }
    }
}

/// `acc[d][t] = row_d · x[t]` for R adjacent weight rows (`R * inp` elements) and `t < n ≤ 4`.
/// `ahead` is memory to prefetch while computing, about one cache line per 8 elements of a
/// row; a kernel may ignore it.
pub type TileKernel<const R: usize> =
    fn(Elems<'_>, Lhs<'_>, usize, usize, &mut [[f32; 4]; R], &[u8]);

/// `acc[0][t] = row · x[t]`: shaped as a one-row tile so both go through the same loop; it
/// prefetches on its own and ignores `ahead`.
pub type Kernel = TileKernel<1>;

/// `y[j] = row_j · x` for one token and the `y.len()` consecutive weight rows given: the
/// [`Kernel`]'s arithmetic with one token, a block of rows per call.
pub type SpanKernel = fn(Elems<'_>, &[f32], usize, &mut [f32]);

/// The multi-row kernels of one CPU.
#[derive(Clone, Copy)]
pub struct Tiles {
    pub one: TileKernel<1>,
    pub two: TileKernel<2>,
    pub three: TileKernel<3>,
}

/// Which paired layout of the activations the bf16 tiles read ([`Lhs::pairs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pairing {
    /// None: the tiles read f32 rows in order.
    Off,
    /// 16-element blocks, evens first (`avx2::pair_rows`).
    Avx2,
    /// 32-element blocks, evens first (`avx512::pair_rows`).
    Avx512,
}

/// The kernels one linear runs with.
#[derive(Clone, Copy)]
pub struct Plan {
    /// Few token rows: one weight row at a time.
    pub single: Kernel,
    /// One token row: `single`'s results, a block of weight rows at a time.
    pub span: SpanKernel,
    /// Enough token rows to be compute-bound; `None` where the CPU has no tile kernels.
    pub tiles: Option<Tiles>,
    /// The layout `tiles` read [`Lhs::pairs`] in.
    pub pairs: Pairing,
    /// Whether `tiles` read [`Lhs::bf16`].
    pub bf16: bool,
    /// From this many token rows `tiles` replace `single` and `span`. The f32 plans start them
    /// at a few rows, where compute starts to matter; the bf16-activation plans at one, so that
    /// a token's activations are rounded, and its sums run the same chains, whatever the size
    /// of its step.
    pub tile_min_rows: usize,
}

/// Instruction sets the kernels come in, best last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
    /// AVX-512 plus AMX tiles for bf16 weights against many token rows (`amx.rs`).
    Amx,
}

impl Isa {
    pub fn as_str(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
        }
    }

    /// The instruction set named `name` (as [`Isa::as_str`] spells it).
    pub fn parse(name: &str) -> Option<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Amx]
            .into_iter()
            .find(|i| i.as_str() == name.trim())
    }

    /// The best this CPU has.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(Isa::detect)
    }

    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
            if avx512 && super::amx::available() {
                return Isa::Amx;
            }
            if avx512 {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }
}

/// The instruction set the kernels use: the best this CPU has, or a lower one named by
/// `SWITCHYARD_CPU_KERNELS` (scalar, avx2, avx512, amx) for comparing them. A name
/// above what the CPU has falls back to the CPU's best.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = Isa::best();
        let Ok(v) = std::env::var("SWITCHYARD_CPU_KERNELS") else {
            return best;
        };
        match Isa::parse(&v) {
            Some(w) if w <= best => w,
            Some(w) => {
                tracing::warn!(
                    wanted = w.as_str(),
                    best = best.as_str(),
                    "SWITCHYARD_CPU_KERNELS asks for kernels this CPU lacks"
                );
                best
            }
            None => {
                tracing::warn!(
                    value = v.as_str(),
                    best = best.as_str(),
                    "SWITCHYARD_CPU_KERNELS is not one of scalar, avx2, avx512, amx"
                );
                best
            }
        }
    })
}

/// Whether bf16 weights meet activations rounded to bf16 (`vdpbf16ps`, 32
/// multiply-adds an instruction against a 512-bit FMA's 16; on CPUs with AMX, AMX tiles with
/// one bf16 part where f32 needs three): `SWITCHYARD_CPU_ACTIVATIONS=bf16`, or `auto` where
/// [`auto_bf16_activations`] says so, on CPUs with AVX-512 BF16. Off for a library user who
/// sets nothing: rounding moves a product by up to 2⁻⁹ of itself, past the reference's f32
/// tolerances (the `switchyard` binary defaults to `auto`). Its plans tile from one row,
/// `linear` never sends them to the gemm path, and with AMX every row count takes the AMX
/// tiles, so a token's result does not depend on its step's size. On a Zen 4 VM
/// (`bench_linear`, 2 threads) the tiles ran 2-3× the f32 ones at 4-8 rows, as fast as the
/// single-row kernel at one, 1.3-2.3× the gemm path at 128-2048; whole-model, 32 sequences
/// went from 220 to 355-364 tok/s. On an AMX Xeon the one-part tiles ran 2-3× the three-part
/// ones at 256 rows and as fast as the dot kernel at one; whole-model, prefill 1.2-1.6× and 32
/// sequences 1.2× f32's.
pub fn bf16_activations() -> bool {
    *ACTIVATIONS.get_or_init(|| {
        let Ok(v) = std::env::var("SWITCHYARD_CPU_ACTIVATIONS") else {
            return false;
        };
        match v.trim() {
            "f32" => false,
            "auto" => auto_bf16_activations(),
            "bf16" if has_avx512_bf16() => true,
            "bf16" => {
                tracing::warn!(
                    "SWITCHYARD_CPU_ACTIVATIONS=bf16 needs AVX-512 BF16 kernels; keeping f32"
                );
                false
            }
            other => {
                tracing::warn!(
                    value = other,
                    "SWITCHYARD_CPU_ACTIVATIONS is not one of auto, f32, bf16"
                );
                false
            }
        }
    })
}

/// What `auto` picks: bf16 activations where the CPU has AVX-512 BF16 and the kernels in use
/// are the AVX-512 ones (Zen 4 and 5, Cooper Lake) or AMX (Sapphire Rapids and later, where
/// the rounded activation is one AMX part against f32's three), f32 elsewhere: not where
/// `SWITCHYARD_CPU_KERNELS` asks for lower kernels, which have no bf16 plans.
pub fn auto_bf16_activations() -> bool {
    has_avx512_bf16()
}

/// The activation mode, fixed on first use: by [`set_bf16_activations`], or else from the
/// environment.
static ACTIVATIONS: OnceLock<bool> = OnceLock::new();

/// Fixes the activation mode for this process (a command-line flag's choice, before anything
/// computes). Fails, changing nothing, where bf16 is asked of a CPU without AVX-512 BF16 or the
/// mode was already fixed to the other value (kernels already ran in it).
pub fn set_bf16_activations(on: bool) -> crate::Result<()> {
    if on && !has_avx512_bf16() {
        return Err(crate::ModelError::Input(
            "bf16 CPU activations need AVX-512 BF16 kernels: this CPU lacks them, or \
             SWITCHYARD_CPU_KERNELS asks for lower ones"
                .into(),
        ));
    }
    let now = *ACTIVATIONS.get_or_init(|| on);
    if now != on {
        return Err(crate::ModelError::Input(format!(
            "CPU activations are already {}",
            if now { "bf16" } else { "f32" }
        )));
    }
    Ok(())
}

/// Whether a token's result must not depend on the other tokens of its call
/// (`--deterministic`, `SWITCHYARD_DETERMINISTIC`; on unless set to `off`). On, every plan
/// runs its tiles from one token row to any number (never the single-row kernels or the gemm
/// path, which sum in other orders), one tile family per CPU whatever the row count, and on
/// CPUs with AMX every row count of bf16 weights goes through the AMX tiles; so a row's sums
/// run the same chains in the same order alone, among 31 others, in a prefill chunk or in a
/// decode step. Off, each row count takes the fastest kernel measured for it
/// (docs/determinism.md has the cost).
pub fn deterministic() -> bool {
    *DETERMINISTIC.get_or_init(|| match std::env::var("SWITCHYARD_DETERMINISTIC") {
        Ok(v) if v.trim() == "off" => false,
        Ok(v) if v.trim() != "on" => {
            tracing::warn!(
                value = v.as_str(),
                "SWITCHYARD_DETERMINISTIC is not one of on, off; keeping on"
            );
            true
        }
        _ => true,
    })
}

/// The kernel choice's mode, fixed on first use: by [`set_deterministic`], or else from the
/// environment.
static DETERMINISTIC: OnceLock<bool> = OnceLock::new();

/// Fixes [`deterministic`] for this process (a command-line flag's choice, before anything
/// computes). Fails, changing nothing, where the mode was already fixed to the other value.
pub fn set_deterministic(on: bool) -> crate::Result<()> {
    let now = *DETERMINISTIC.get_or_init(|| on);
    if now != on {
        return Err(crate::ModelError::Input(format!(
            "deterministic kernels are already {}",
            if now { "on" } else { "off" }
        )));
    }
    Ok(())
}

/// The kernel choice that decides a row's bits, e.g. `avx512 bf16 deterministic`: two
/// processes with the same signature compute an expert's rows alike, bit for bit.
#[must_use]
pub fn signature() -> String {
    format!(
        "{} {} {}",
        isa().as_str(),
        if bf16_activations() { "bf16" } else { "f32" },
        if deterministic() {
            "deterministic"
        } else {
            "per-size"
        }
    )
}

/// Whether the `vdpbf16ps` tiles run here: the CPU has AVX-512 BF16, and the kernels in use
/// are the AVX-512 ones or AMX (not lowered by `SWITCHYARD_CPU_KERNELS`, whose lower kernels
/// have no bf16 plans: the mode would be on in name only).
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa() >= Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The CPU families whose AVX-512 kernels differ: the single-row kernel's prefetch (measurements
/// at `avx512::INTEL_AHEAD`) and whether the AVX-512 tiles pay ([`avx512_tile_min_rows`]).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Prefetcher {
    /// Intel and anything not AMD.
    Intel,
    /// AMD family 0x19 (Zen 3 and 4) and older.
    Zen4,
    /// AMD family 0x1A and newer: Zen 5 on.
    Zen5,
}

#[cfg(target_arch = "x86_64")]
pub(super) fn prefetcher() -> Prefetcher {
    static KIND: OnceLock<Prefetcher> = OnceLock::new();
    *KIND.get_or_init(|| {
        // SAFETY: cpuid leaves 0 and 1 exist on every x86_64 CPU (newer toolchains call it safe).
        #[allow(unused_unsafe)]
        let (id, sig) = unsafe { (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1)) };
        // The vendor string, "AuthenticAMD", in ebx, edx, ecx.
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&id.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&id.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&id.ecx.to_le_bytes());
        let kind = classify(&vendor, sig.eax);
        tracing::debug!(?kind, "single-row kernel prefetch");
        kind
    })
}

/// The prefetcher for a cpuid vendor string and leaf-1 eax (the family is the base family plus
/// the extended family when the base reads 0xF).
#[cfg(target_arch = "x86_64")]
fn classify(vendor: &[u8; 12], eax: u32) -> Prefetcher {
    if vendor != b"AuthenticAMD" {
        return Prefetcher::Intel;
    }
    let base = (eax >> 8) & 0xF;
    let family = if base == 0xF {
        base + ((eax >> 20) & 0xFF)
    } else {
        base
    };
    if family >= 0x1A {
        Prefetcher::Zen5
    } else {
        Prefetcher::Zen4
    }
}

/// From this many token rows the AVX-512 tiles replace the AVX2 ones, on Intel and Zen 5. Below
/// it a tile's work is bound by reading its weights, and the 256-bit tiles read them faster:
/// bench_linear on expert shapes (bf16, 2 threads) gave AVX2 80-126 GFLOP/s at 4 rows against
/// 60-98, a tie at 16 rows, and 115-130 against 130-164 at 32 (before the AVX2 pair tiles).
#[cfg(target_arch = "x86_64")]
const AVX512_TILE_MIN_ROWS: usize = 16;

/// Zen 4 and older AMD run 512-bit operations as two 256-bit halves, and there the AVX2 pair
/// tiles beat the AVX-512 ones at every row count the dot path serves. bench_linear on a Zen 4
/// VM (`--mats 40`, 2 threads, three interleaved rounds, GFLOP/s on w1/w2, AVX2 pair tiles
/// against AVX-512 pair tiles): 8 rows 122-129/109-122 against 102-110/98-106, 16 rows
/// 175-178/158-164 against 155-163/131-135, 32 rows 190-196/184-195 against 185-194/153-166;
/// 64-256 rows within each other's noise (155-192 both).
#[cfg(target_arch = "x86_64")]
fn avx512_tile_min_rows() -> usize {
    match prefetcher() {
        Prefetcher::Zen4 => usize::MAX,
        Prefetcher::Zen5 | Prefetcher::Intel => AVX512_TILE_MIN_ROWS,
    }
}

/// The kernels for `rows` token rows against weights like `w` on instruction set `isa` (at
/// most [`Isa::best`]).
pub fn plan_for(isa: Isa, w: Elems<'_>, rows: usize) -> Plan {
    plan_with(isa, w, rows, bf16_activations())
}

/// [`plan_for`], with the tiles rounding activations to bf16 when `bf16_act` (and the CPU
/// has AVX-512 BF16).
pub fn plan_with(isa: Isa, w: Elems<'_>, rows: usize, bf16_act: bool) -> Plan {
    #[cfg(target_arch = "x86_64")]
    {
        use super::{avx2, avx512};
        let (avx512_dots, avx512_span): (Kernel, SpanKernel) = match prefetcher() {
            Prefetcher::Zen5 => (
                avx512::dots::<true, { avx512::ZEN5_AHEAD }>,
                avx512::span::<true, { avx512::ZEN5_AHEAD }>,
            ),
            Prefetcher::Zen4 => (
                avx512::dots::<false, { avx512::ZEN4_AHEAD }>,
                avx512::span::<false, { avx512::ZEN4_AHEAD }>,
            ),
            Prefetcher::Intel => (
                avx512::dots::<false, { avx512::INTEL_AHEAD }>,
                avx512::span::<false, { avx512::INTEL_AHEAD }>,
            ),
        };
        if bf16_act && isa >= Isa::Avx512 && matches!(w, Elems::BF16(_)) && has_avx512_bf16() {
            return Plan {
                single: avx512_dots,
                span: avx512_span,
                tiles: Some(Tiles {
                    one: avx512::dp_tile::<1>,
                    two: avx512::dp_tile::<2>,
                    three: avx512::dp_tile::<3>,
                }),
                pairs: Pairing::Off,
                bf16: true,
                tile_min_rows: 1,
            };
        }
        // Deterministic plans take the AVX2 tiles at every row count (what Zen 4 runs at
        // every count anyway): one family, so no row count changes a row's chains.
        let det = deterministic();
        if !det && isa >= Isa::Avx512 && rows >= avx512_tile_min_rows() {
            let pairs = matches!(w, Elems::BF16(_));
            return Plan {
                single: avx512_dots,
                span: avx512_span,
                tiles: Some(if pairs {
                    Tiles {
                        one: avx512::pair_tile::<1>,
                        two: avx512::pair_tile::<2>,
                        three: avx512::pair_tile::<3>,
                    }
                } else {
                    Tiles {
                        one: avx512::tile::<1>,
                        two: avx512::tile::<2>,
                        three: avx512::tile::<3>,
                    }
                }),
                pairs: if pairs { Pairing::Avx512 } else { Pairing::Off },
                bf16: false,
                tile_min_rows: super::TILE_MIN_ROWS,
            };
        }
        if isa >= Isa::Avx2 {
            // The single-row kernel's 512-bit loads stream weights as fast as the 256-bit ones
            // or faster (batch 1: 36-42 against 34-39 GB/s).
            let (single, span) = if isa >= Isa::Avx512 {
                (avx512_dots, avx512_span)
            } else {
                (avx2::dots as Kernel, avx2::span as SpanKernel)
            };
            let pairs = matches!(w, Elems::BF16(_));
            macro_rules! avx2_tiles {
                ($ahead:expr, $l1:expr) => {
                    if pairs {
                        Tiles {
                            one: avx2::pair_tile::<1, { $ahead }, { $l1 }>,
                            two: avx2::pair_tile::<2, { $ahead }, { $l1 }>,
                            three: avx2::pair_tile::<3, { $ahead }, { $l1 }>,
                        }
                    } else {
                        Tiles {
                            one: avx2::tile_dots::<1, { $ahead }, { $l1 }>,
                            two: avx2::tile_dots::<2, { $ahead }, { $l1 }>,
                            three: avx2::tile_dots::<3, { $ahead }, { $l1 }>,
                        }
                    }
                };
            }
            // Deterministic plans tile the rows the single-row kernels would take (fewer than
            // TILE_MIN_ROWS), streaming weights ahead the way those kernels do on this CPU.
            let tiles = if !det || rows >= super::TILE_MIN_ROWS {
                avx2_tiles!(0, false)
            } else if isa < Isa::Avx512 {
                avx2_tiles!(avx2::PREFETCH_BYTES, true)
            } else {
                match prefetcher() {
                    Prefetcher::Zen5 => avx2_tiles!(avx512::ZEN5_AHEAD, true),
                    Prefetcher::Zen4 => avx2_tiles!(avx512::ZEN4_AHEAD, false),
                    Prefetcher::Intel => avx2_tiles!(avx512::INTEL_AHEAD, false),
                }
            };
            return Plan {
                single,
                span,
                tiles: Some(tiles),
                pairs: if pairs { Pairing::Avx2 } else { Pairing::Off },
                bf16: false,
                tile_min_rows: if det { 1 } else { super::TILE_MIN_ROWS },
            };
        }
    }
    let _ = (isa, w, rows, bf16_act);
    Plan {
        single: scalar,
        span: scalar_span,
        tiles: None,
        pairs: Pairing::Off,
        bf16: false,
        tile_min_rows: usize::MAX,
    }
}

/// Portable reference: f32 accumulation, same math as the SIMD kernels up to summation order.
pub fn scalar(
    row: Elems<'_>,
    x: Lhs<'_>,
    n: usize,
    inp: usize,
    acc: &mut [[f32; 4]; 1],
    _ahead: &[u8],
) {
    for (t, a) in acc[0].iter_mut().take(n).enumerate() {
        let xr = &x.f32[t * inp..(t + 1) * inp];
        *a = xr.iter().enumerate().map(|(k, v)| row.get_f32(k) * v).sum();
    }
}

/// [`scalar`] over a block of rows.
pub fn scalar_span(rows: Elems<'_>, x: &[f32], inp: usize, y: &mut [f32]) {
    let x = Lhs {
        f32: x,
        pairs: &[],
        bf16: &[],
    };
    for (j, out) in y.iter_mut().enumerate() {
        let mut acc = [[0f32; 4]; 1];
        scalar(rows.slice(j * inp..(j + 1) * inp), x, 1, inp, &mut acc, &[]);
        *out = acc[0][0];
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::{classify, Prefetcher};

    #[test]
    fn prefetcher_follows_the_cpuid_family() {
        // Leaf-1 eax of a Zen 4 EPYC (family 0x19), a Zen 5 EPYC (0x1A) and a Sapphire Rapids
        // Xeon (family 6).
        assert_eq!(classify(b"AuthenticAMD", 0x00A1_0F11), Prefetcher::Zen4);
        assert_eq!(classify(b"AuthenticAMD", 0x00B0_0F21), Prefetcher::Zen5);
        assert_eq!(classify(b"GenuineIntel", 0x0008_06F8), Prefetcher::Intel);
        // A family below 0xF needs no extended family.
        assert_eq!(classify(b"AuthenticAMD", 0x0000_0610), Prefetcher::Zen4);
    }
}

#[cfg(test)]
mod activation_tests {
    use super::{bf16_activations, set_bf16_activations};

    #[test]
    fn the_activation_mode_is_fixed_once_and_a_conflicting_choice_fails() {
        // Whatever fixed it first (the environment, another test's linear), asking for the same
        // mode again succeeds and the other one fails, leaving the mode as it was.
        let now = bf16_activations();
        set_bf16_activations(now).unwrap();
        assert!(set_bf16_activations(!now).is_err());
        assert_eq!(bf16_activations(), now);
    }
}
