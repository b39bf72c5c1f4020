//! Weights copied once, at load, into the order the AMX kernel (`amx.rs`) reads them.
//!
//! Read in place from the checkpoint, a weight tile is 16 cache lines in 16 different rows, a
//! task streams 32-64 rows side by side, and tiles are loaded one at a time (the tile registers
//! are not renamed, so the next load waits for the products of the last); the hardware
//! prefetchers do not keep up, and batches of 4-16 tokens read weights at about half the rate
//! of the one-token dot kernel. In tile order a band's tiles follow each other in memory, one
//! sequential stream per task, cache-line aligned.

use half::bf16;
use rayon::prelude::*;

/// Output rows per weight tile.
pub(super) const TILE_ROWS: usize = 16;
/// Inputs per weight tile: 32 bf16, one 64-byte tile row.
pub(super) const TILE_INPUTS: usize = 32;
/// Weight rows of a band: four tiles' rows, one task's share of a linear.
pub(super) const BAND: usize = 4 * TILE_ROWS;

/// One 64-byte tile row, 32 bf16 inputs of one output row, cache-line aligned (also the unit
/// of the kernels' scratch buffers, `super::with_scratch`).
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
pub(super) struct Line([u16; TILE_INPUTS]);

/// A bf16 `[out, in]` weight in AMX tile order.
///
/// Layout: for band `t` (output rows `64t ..`, zero rows past `out`), input block `b` and tile
/// `i` of the band, the 16 lines of rows `64t + 16i ..`, inputs `32b ..`, at line
/// `((t · kbs + b) · 4 + i) · 16` (`kbs = in / 32`). The kernel runs every element's products
/// in the same order as on the weight in place, so results are the same bits.
pub struct Tiles {
    lines: Vec<Line>,
    out: usize,
    inp: usize,
}

impl std::fmt::Debug for Tiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tiles")
            .field("out", &self.out)
            .field("inp", &self.inp)
            .finish_non_exhaustive()
    }
}

impl Tiles {
    /// No weight: fills unused slots of a fixed-size pass.
    pub(crate) const EMPTY: Tiles = Tiles {
        lines: Vec::new(),
        out: 0,
        inp: 0,
    };

    /// Copies `w` (`out · inp` bf16) into tile order. None unless `inp` is a multiple of 32
    /// and `w` holds `out · inp` elements. Only `linear::tiles_for` calls it, on CPUs with
    /// AMX: the kernels that read tiles use AMX and AVX-512 without checking again.
    #[must_use]
    pub(super) fn pack(w: &[bf16], out: usize, inp: usize) -> Option<Tiles> {
        if out == 0 || inp == 0 || !inp.is_multiple_of(TILE_INPUTS) || w.len() != out * inp {
            return None;
        }
        let kbs = inp / TILE_INPUTS;
        let mut lines = vec![Line([0; TILE_INPUTS]); out.div_ceil(BAND) * kbs * BAND];
        let w: &[u16] = bytemuck::cast_slice(w);
        lines
            .par_chunks_mut(kbs * BAND)
            .enumerate()
            .for_each(|(t, band)| {
                for (b, block) in band.chunks_exact_mut(BAND).enumerate() {
                    for (r, line) in block.iter_mut().enumerate() {
                        let j = t * BAND + r;
                        if j < out {
                            line.0
                                .copy_from_slice(&w[j * inp + b * TILE_INPUTS..][..TILE_INPUTS]);
                        }
                    }
                }
            });
        Some(Tiles { lines, out, inp })
    }

    /// Output rows.
    #[must_use]
    pub fn out(&self) -> usize {
        self.out
    }

    /// Inputs per row.
    #[must_use]
    pub fn inp(&self) -> usize {
        self.inp
    }

    /// Bytes held, padding included.
    pub fn bytes(&self) -> usize {
        self.lines.len() * std::mem::size_of::<Line>()
    }

    /// Band `t`'s tiles, in order, as bf16 bits.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) fn band(&self, t: usize) -> &[u16] {
        let len = self.inp / TILE_INPUTS * BAND;
        bytemuck::cast_slice(&self.lines[t * len..(t + 1) * len])
    }

    /// Element `(j, k)` of the weight, read back from the tiles.
    #[cfg(test)]
    fn get(&self, j: usize, k: usize) -> u16 {
        let (t, r) = (j / BAND, j % BAND);
        let (b, c) = (k / TILE_INPUTS, k % TILE_INPUTS);
        self.band(t)[(b * BAND + r) * TILE_INPUTS + c]
    }
}

// SAFETY: Line is 32 u16 with no padding (64 bytes, align 64).
unsafe impl bytemuck::Zeroable for Line {}
// SAFETY: as above; any bit pattern is valid.
unsafe impl bytemuck::Pod for Line {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_element_lands_where_the_kernel_reads_it_and_padding_is_zero() {
        let (out, inp) = (80, 96);
        let w: Vec<bf16> = (0..out * inp)
            .map(|i| bf16::from_bits(i as u16 + 1))
            .collect();
        let t = Tiles::pack(&w, out, inp).expect("packable shape");
        for j in 0..out {
            for k in 0..inp {
                assert_eq!(t.get(j, k), w[j * inp + k].to_bits(), "({j}, {k})");
            }
        }
        for j in out..2 * BAND {
            for k in 0..inp {
                assert_eq!(t.get(j, k), 0, "padding ({j}, {k})");
            }
        }
        assert_eq!(t.bytes(), 2 * BAND * inp * 2);
        assert!(
            Tiles::pack(&w[..out * 40], out, 40).is_none(),
            "in not a multiple of 32"
        );
        assert!(Tiles::pack(&w, out, inp - 32).is_none(), "wrong length");
    }
}
