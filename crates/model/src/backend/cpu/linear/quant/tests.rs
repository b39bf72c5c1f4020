use super::*;
use crate::weights::quant::{quantize_q4_0, quantize_q8_0, BlockQ4_0, BlockQ8_0};

/// A deterministic spread of values in about [-1, 1], with a few larger outliers.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            if i % 97 == 0 {
                u * 6.0
            } else {
                u
            }
        })
        .collect()
}

enum Stored {
    Q8(Vec<BlockQ8_0>),
    Q4(Vec<BlockQ4_0>),
}

impl Stored {
    fn new(format: QuantFormat, w: &[f32]) -> Self {
        let blocks = w.chunks_exact(BLOCK).map(|c| c.try_into().unwrap());
        match format {
            QuantFormat::Q8_0 => Stored::Q8(blocks.map(quantize_q8_0).collect()),
            QuantFormat::Q4_0 => Stored::Q4(blocks.map(quantize_q4_0).collect()),
        }
    }
    fn elems(&self) -> Elems<'_> {
        match self {
            Stored::Q8(b) => Elems::Q8_0(b),
            Stored::Q4(b) => Elems::Q4_0(b),
        }
    }
}

const FORMATS: [QuantFormat; 2] = [QuantFormat::Q8_0, QuantFormat::Q4_0];

#[test]
fn every_kernel_equals_the_reference_bit_for_bit() {
    for format in FORMATS {
        for (out, inp) in [(16, 32), (40, 64), (33, 160), (64, 1024)] {
            let w = values(out * inp, out as u64 * 7 + inp as u64);
            let stored = Stored::new(format, &w);
            let tiles = QTiles::from_blocks(stored.elems(), out).unwrap();
            for rows in [1, 2, 3, 5, 8, 9, 17, 40] {
                let x = values(rows * inp, rows as u64 + 99);
                let mut want = vec![0f32; rows * out];
                linear_reference(&x, rows, stored.elems(), out, &mut want);
                for isa in QIsa::available() {
                    let mut y = vec![f32::NAN; rows * out];
                    linear_many_with(isa, &x, rows, &mut [(&tiles, &mut y)]);
                    let same = y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{format} {isa:?} out {out} in {inp} rows {rows}");
                }
            }
        }
    }
}

#[test]
fn a_rows_result_does_not_depend_on_its_batch() {
    let (out, inp, rows) = (48, 256, 64);
    for format in FORMATS {
        let w = values(out * inp, 5);
        let tiles = QTiles::quantize(Elems::F32(&w), out, format).unwrap();
        let x = values(rows * inp, 6);
        for isa in QIsa::available() {
            let mut batch = vec![0f32; rows * out];
            linear_many_with(isa, &x, rows, &mut [(&tiles, &mut batch)]);
            for r in [0, 1, 7, 8, 31, 63] {
                let mut alone = vec![0f32; out];
                linear_many_with(
                    isa,
                    &x[r * inp..(r + 1) * inp],
                    1,
                    &mut [(&tiles, &mut alone)],
                );
                assert_eq!(
                    alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    batch[r * out..(r + 1) * out]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    "{format} {isa:?} row {r}"
                );
            }
        }
    }
}

#[test]
fn quantizing_at_load_packs_the_same_blocks_as_a_saved_checkpoint() {
    let (out, inp) = (20, 96);
    let w = values(out * inp, 11);
    let bf: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let widened: Vec<f32> = bf.iter().map(|v| v.to_f32()).collect();
    for format in FORMATS {
        let saved = Stored::new(format, &widened);
        let a = QTiles::quantize(Elems::BF16(&bf), out, format).unwrap();
        let b = QTiles::from_blocks(saved.elems(), out).unwrap();
        let bytes = |t: &QTiles| bytemuck::cast_slice::<_, u8>(&t.data).to_vec();
        assert_eq!(bytes(&a), bytes(&b), "{format}");
    }
}

/// The kernels against a plain f64 product of the dequantized weights and the dequantized
/// activations: the only differences are the f32 rounding of each block's scale product and of
/// the running sum, a few ulps of the sum of magnitudes.
#[test]
fn kernels_match_an_f64_product_of_the_dequantized_operands() {
    let (out, inp, rows) = (24, 512, 3);
    for format in FORMATS {
        let w = values(out * inp, 21);
        let stored = Stored::new(format, &w);
        let tiles = QTiles::from_blocks(stored.elems(), out).unwrap();
        let x = values(rows * inp, 22);
        let mut y = vec![0f32; rows * out];
        linear_many(&x, rows, &mut [(&tiles, &mut y)]);
        let blocks = inp / BLOCK;
        let (mut q, mut d, mut s) = (
            vec![0i8; rows * inp],
            vec![0f32; rows * blocks],
            vec![0i32; rows * blocks],
        );
        quantize_acts(&x, rows, inp, &mut q, &mut d, &mut s);
        let e = stored.elems();
        for t in 0..rows {
            for j in 0..out {
                let (mut exact, mut mag) = (0f64, 0f64);
                for k in 0..inp {
                    let xv = f64::from(q[t * inp + k]) * f64::from(d[t * blocks + k / BLOCK]);
                    let wv = f64::from(e.get_f32(j * inp + k));
                    exact += xv * wv;
                    mag += (xv * wv).abs();
                }
                let err = (f64::from(y[t * out + j]) - exact).abs();
                assert!(err <= mag * 1e-6, "{format} ({t},{j}): {err} against {mag}");
            }
        }
    }
}

#[test]
fn activation_quantization_is_within_half_a_step() {
    let x = values(4 * 64, 3);
    let (mut q, mut d, mut s) = (vec![0i8; 256], vec![0f32; 8], vec![0i32; 8]);
    quantize_acts(&x, 4, 64, &mut q, &mut d, &mut s);
    for (i, v) in x.iter().enumerate() {
        let b = i / BLOCK;
        assert!((f32::from(q[i]) * d[b] - v).abs() <= d[b] * 0.5 + 1e-6);
    }
    for b in 0..8 {
        assert_eq!(
            s[b],
            q[b * BLOCK..(b + 1) * BLOCK]
                .iter()
                .map(|&v| i32::from(v))
                .sum::<i32>()
        );
    }
}

#[test]
fn packing_refuses_what_it_cannot_hold() {
    let w = values(2 * 40, 1);
    assert!(QTiles::quantize(Elems::F32(&w), 2, QuantFormat::Q8_0).is_none());
    assert!(QTiles::from_blocks(Elems::F32(&w), 2).is_none());
}

#[test]
fn magic_rounding_is_round_ties_even() {
    for i in -300_000..300_000 {
        let v = i as f32 / 2048.0;
        // Equal as values (a negative zero may come out positive; both cast to 0).
        assert_eq!(round_even(v), v.round_ties_even(), "{v}");
    }
    for v in [0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, -127.49999, 127.0] {
        assert_eq!(round_even(v), v.round_ties_even(), "{v}");
    }
    assert!(round_even(f32::NAN).is_nan());
}
