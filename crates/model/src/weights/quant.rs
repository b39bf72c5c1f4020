//! Block-quantized weights: llama.cpp's Q8_0 and Q4_0, the formats CPU users of MoE models run.
//!
//! Both cut a row of `in` weights into blocks of [`BLOCK`] and store each block as one f16 scale
//! and 32 small integers, in llama.cpp's byte layout (so a GGUF tensor of either type is the same
//! bytes):
//!
//! | format | block | bytes | value of element `i` |
//! |---|---|---|---|
//! | Q8_0 | `d: f16, qs: [i8; 32]` | 34 | `d · qs[i]` |
//! | Q4_0 | `d: f16, qs: [u8; 16]` | 18 | `d · (nib(i) − 8)`; `nib(i)` is the low nibble of `qs[i]` for `i < 16`, the high nibble of `qs[i − 16]` above |
//!
//! A checkpoint stores the blocks of a `[out, in]` weight row after row; the CPU backend copies
//! them once, at load, into the order its kernels read (`backend::cpu::linear::quant`).

use super::Elems;
use half::f16;

/// Weights per block, both formats.
pub const BLOCK: usize = 32;

/// A block-quantized format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    Q8_0,
    Q4_0,
}

impl QuantFormat {
    /// Bytes of one block of [`BLOCK`] weights.
    #[must_use]
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => std::mem::size_of::<BlockQ8_0>(),
            Self::Q4_0 => std::mem::size_of::<BlockQ4_0>(),
        }
    }

    /// Bytes of `elems` weights (a multiple of [`BLOCK`]).
    #[must_use]
    pub fn bytes_for(self, elems: usize) -> usize {
        elems / BLOCK * self.block_bytes()
    }

    /// The name users type and config.json records.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }

    /// Quantizes `src` (a multiple of [`BLOCK`] values) into this format's blocks, appended to
    /// `dst` as bytes.
    pub fn quantize_into(self, src: &[f32], dst: &mut [u8]) {
        debug_assert_eq!(dst.len(), self.bytes_for(src.len()));
        match self {
            Self::Q8_0 => {
                for (x, b) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(34)) {
                    let blk = quantize_q8_0(x.try_into().expect("block of 32"));
                    b.copy_from_slice(bytemuck::bytes_of(&blk));
                }
            }
            Self::Q4_0 => {
                for (x, b) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(18)) {
                    let blk = quantize_q4_0(x.try_into().expect("block of 32"));
                    b.copy_from_slice(bytemuck::bytes_of(&blk));
                }
            }
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QuantFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "q4_0" | "q4" => Ok(Self::Q4_0),
            other => Err(format!("unknown quantization {other:?} (q8_0 or q4_0)")),
        }
    }
}

/// One Q8_0 block: `d · qs[i]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// The scale, f16 bits.
    pub d: u16,
    pub qs: [i8; BLOCK],
}

/// One Q4_0 block: `d · (nibble − 8)`, elements `0..16` in the low nibbles, `16..32` in the
/// high ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct BlockQ4_0 {
    /// The scale, f16 bits.
    pub d: u16,
    pub qs: [u8; BLOCK / 2],
}

// SAFETY: both are repr(C) with a u16 followed by byte arrays: no padding (34 and 18 bytes at
// alignment 2, checked below), and every bit pattern is a valid value.
unsafe impl bytemuck::Zeroable for BlockQ8_0 {}
unsafe impl bytemuck::Pod for BlockQ8_0 {}
unsafe impl bytemuck::Zeroable for BlockQ4_0 {}
unsafe impl bytemuck::Pod for BlockQ4_0 {}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);

impl BlockQ8_0 {
    /// The scale as f32 (exact).
    #[must_use]
    #[inline]
    pub fn scale(&self) -> f32 {
        f16::from_bits(self.d).to_f32()
    }

    /// The signed integer of element `i`.
    #[must_use]
    #[inline]
    pub fn q(&self, i: usize) -> i32 {
        i32::from(self.qs[i])
    }
}

impl BlockQ4_0 {
    /// The scale as f32 (exact).
    #[must_use]
    #[inline]
    pub fn scale(&self) -> f32 {
        f16::from_bits(self.d).to_f32()
    }

    /// The signed integer of element `i` (`nibble − 8`, in −8..=7).
    #[must_use]
    #[inline]
    pub fn q(&self, i: usize) -> i32 {
        let byte = self.qs[i % 16];
        let nib = if i < 16 { byte & 0x0F } else { byte >> 4 };
        i32::from(nib) - 8
    }
}

/// Q8_0 of one block, as llama.cpp's reference quantizer: `d = max|x| / 127`, `q = round(x / d)`.
#[must_use]
pub fn quantize_q8_0(x: &[f32; BLOCK]) -> BlockQ8_0 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; BLOCK];
    for (q, v) in qs.iter_mut().zip(x) {
        // In range: |v · id| ≤ 127 up to rounding; NaN casts to 0.
        *q = (v * id).round().clamp(-127.0, 127.0) as i8;
    }
    BlockQ8_0 {
        d: f16::from_f32(d).to_bits(),
        qs,
    }
}

/// Q4_0 of one block, as llama.cpp's reference quantizer: the element of largest magnitude `m`
/// (with its sign) maps to −8, `d = m / −8`, `nib = min(15, trunc(x / d + 8.5))`.
#[must_use]
pub fn quantize_q4_0(x: &[f32; BLOCK]) -> BlockQ4_0 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let nib = |v: f32| ((v * id + 8.5) as u8).min(15);
    let mut qs = [0u8; BLOCK / 2];
    for (j, q) in qs.iter_mut().enumerate() {
        *q = nib(x[j]) | (nib(x[j + 16]) << 4);
    }
    BlockQ4_0 {
        d: f16::from_f32(d).to_bits(),
        qs,
    }
}

/// Element `i` of quantized elements, widened to f32 (what the weight stands for).
#[must_use]
pub(crate) fn dequantize_at(e: &Elems<'_>, i: usize) -> f32 {
    match e {
        Elems::Q8_0(b) => {
            let blk = &b[i / BLOCK];
            blk.scale() * blk.q(i % BLOCK) as f32
        }
        Elems::Q4_0(b) => {
            let blk = &b[i / BLOCK];
            blk.scale() * blk.q(i % BLOCK) as f32
        }
        _ => unreachable!("dequantize_at takes quantized elements"),
    }
}

/// What to quantize at load ([`crate::Checkpoint::set_quantize`]): the experts always, the
/// attention projections and an untied LM head when `attention`. Embeddings, norms and routers
/// stay as stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuantPlan {
    pub format: Option<QuantFormat>,
    pub attention: bool,
}

impl QuantPlan {
    /// Experts in `format`, the rest as stored.
    #[must_use]
    pub fn experts(format: QuantFormat) -> Self {
        Self {
            format: Some(format),
            attention: false,
        }
    }

    /// The format for a linear of `role`, if the plan quantizes it.
    #[must_use]
    pub fn for_role(&self, role: WeightRole) -> Option<QuantFormat> {
        match role {
            WeightRole::Expert => self.format,
            WeightRole::Attention | WeightRole::Head if self.attention => self.format,
            _ => None,
        }
    }
}

/// Which linears a weight belongs to, for [`QuantPlan::for_role`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightRole {
    /// w1, w2, w3 of an expert.
    Expert,
    /// q, k, v, o.
    Attention,
    /// An untied LM head.
    Head,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seed: u32) -> [f32; BLOCK] {
        std::array::from_fn(|i| {
            (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0
        })
    }

    #[test]
    fn q8_0_error_is_within_half_a_step() {
        for seed in 0..50 {
            let x = block(seed);
            let b = quantize_q8_0(&x);
            let e = Elems::Q8_0(std::slice::from_ref(&b));
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, v) in x.iter().enumerate() {
                // Half a step, plus the scale's f16 rounding over 127 steps.
                let tol = amax / 127.0 * 0.5 + amax * 2f32.powi(-11) + 1e-6;
                assert!((dequantize_at(&e, i) - v).abs() <= tol, "seed {seed} i {i}");
            }
        }
    }

    #[test]
    fn q4_0_maps_the_largest_magnitude_to_minus_eight() {
        for seed in 0..50 {
            let x = block(seed);
            let b = quantize_q4_0(&x);
            let e = Elems::Q4_0(std::slice::from_ref(&b));
            let (i_max, amax) =
                x.iter().enumerate().fold(
                    (0, 0f32),
                    |m, (i, v)| if v.abs() > m.1 { (i, v.abs()) } else { m },
                );
            assert_eq!(b.q(i_max), -8, "seed {seed}");
            let d = b.scale();
            for (i, v) in x.iter().enumerate() {
                let got = dequantize_at(&e, i);
                if v / d > 7.5 {
                    // The far side of the range ends at +7 steps: clipped.
                    assert_eq!(got, 7.0 * d, "seed {seed} i {i}");
                } else {
                    let tol = d.abs() * 0.5 + amax * 2f32.powi(-10) + 1e-6;
                    assert!((got - v).abs() <= tol, "seed {seed} i {i}");
                }
            }
        }
    }

    #[test]
    fn zero_and_nan_blocks_do_not_panic() {
        let z = [0f32; BLOCK];
        assert!(quantize_q8_0(&z).qs.iter().all(|&q| q == 0));
        assert!(quantize_q4_0(&z).qs.iter().all(|&q| q == 0x88));
        let mut n = z;
        n[3] = f32::NAN;
        let _ = (quantize_q8_0(&n), quantize_q4_0(&n));
    }

    #[test]
    fn formats_parse_and_size() {
        assert_eq!("Q4_0".parse::<QuantFormat>(), Ok(QuantFormat::Q4_0));
        assert!("q5_k".parse::<QuantFormat>().is_err());
        assert_eq!(QuantFormat::Q8_0.bytes_for(64), 68);
        assert_eq!(QuantFormat::Q4_0.bytes_for(64), 36);
    }

    #[test]
    fn plan_quantizes_attention_only_when_asked() {
        let p = QuantPlan::experts(QuantFormat::Q8_0);
        assert_eq!(p.for_role(WeightRole::Expert), Some(QuantFormat::Q8_0));
        assert_eq!(p.for_role(WeightRole::Attention), None);
        let p = QuantPlan {
            attention: true,
            ..p
        };
        assert_eq!(p.for_role(WeightRole::Head), Some(QuantFormat::Q8_0));
    }
}
