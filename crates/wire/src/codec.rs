//! Tensor bytes and expert batches: encoding on the coordinator, checked decoding on the worker.

use crate::{pb, WireError, PROTOCOL_VERSION};
use bytes::Bytes;
use half::bf16;
use switchyard_model::RoutePlan;

/// Element type of activations on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireDType {
    /// Exact: a cluster reproduces embedded mode bit for bit.
    F32,
    /// Half the bytes; rounds activations (within the golden tolerances).
    BF16,
}

impl WireDType {
    /// Bytes per element.
    #[must_use]
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::BF16 => 2,
        }
    }

    /// The protobuf enum value.
    #[must_use]
    pub fn to_pb(self) -> i32 {
        match self {
            Self::F32 => pb::WireDType::F32 as i32,
            Self::BF16 => pb::WireDType::Bf16 as i32,
        }
    }

    /// From the protobuf enum value; `UNSPECIFIED` maps to `default`.
    pub fn from_pb(v: i32, default: Option<Self>) -> Result<Self, WireError> {
        match pb::WireDType::try_from(v) {
            Ok(pb::WireDType::F32) => Ok(Self::F32),
            Ok(pb::WireDType::Bf16) => Ok(Self::BF16),
            Ok(pb::WireDType::Unspecified) => default.ok_or(WireError::DType(v)),
            Err(_) => Err(WireError::DType(v)),
        }
    }
}

impl std::str::FromStr for WireDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::BF16),
            o => Err(format!("unknown wire dtype {o:?} (f32 or bf16)")),
        }
    }
}

/// Little-endian bytes of `x` in `dtype`.
#[must_use]
pub fn encode_rows(x: &[f32], dtype: WireDType) -> Bytes {
    match dtype {
        WireDType::F32 => Bytes::copy_from_slice(bytemuck::cast_slice(x)),
        WireDType::BF16 => {
            let mut out = Vec::with_capacity(x.len() * 2);
            for v in x {
                out.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
            }
            Bytes::from(out)
        }
    }
}

/// Widens `bytes` (exactly `out.len()` elements of `dtype`) into `out`. The one copy between the
/// received message and the GEMM input.
pub fn decode_rows(bytes: &[u8], dtype: WireDType, out: &mut [f32]) {
    match dtype {
        WireDType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        WireDType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
    }
}

/// Builds one worker's batch: `x` holds `plan.rows()` rows of `hidden`.
#[must_use]
pub fn encode_batch(
    fingerprint: &str,
    layer: u32,
    hidden: usize,
    x: &[f32],
    plan: &RoutePlan,
    dtype: WireDType,
) -> pb::ExpertBatch {
    pb::ExpertBatch {
        protocol_version: PROTOCOL_VERSION,
        model_fingerprint: fingerprint.to_string(),
        layer,
        rows: plan.rows() as u32,
        hidden_size: hidden as u32,
        dtype: dtype.to_pb(),
        hidden: encode_rows(x, dtype),
        offsets: plan.offsets().to_vec(),
        experts: plan.experts().iter().map(|&e| e as u32).collect(),
        weights: plan.weights().to_vec(),
        reply_dtype: dtype.to_pb(),
        traceparent: crate::trace::traceparent(&tracing::Span::current()),
    }
}

/// A worker's answer to a batch, validated: `rows × hidden` partial sums, decoded to f32.
#[derive(Debug)]
pub struct ExpertReply {
    pub output: Vec<f32>,
    /// Time the worker says it spent computing.
    pub compute_micros: u64,
}

impl ExpertReply {
    /// Checks `r` against the batch it answers (`rows` × `hidden`) before anything reads it:
    /// its dtype, its shape and its byte length, so a reply of the wrong shape, or a huge one,
    /// is refused whole.
    pub fn decode(r: &pb::ExpertResult, rows: usize, hidden: usize) -> Result<Self, WireError> {
        let dtype = WireDType::from_pb(r.dtype, None)?;
        if r.rows as usize != rows || r.hidden_size as usize != hidden {
            return Err(WireError::ReplyShape {
                got_rows: r.rows,
                got_hidden: r.hidden_size,
                rows,
                hidden,
            });
        }
        let want = rows * hidden * dtype.size();
        if r.output.len() != want {
            return Err(WireError::Payload {
                got: r.output.len(),
                want,
                rows: r.rows,
                hidden: r.hidden_size,
                dtype,
            });
        }
        let mut output = vec![0.0f32; rows * hidden];
        decode_rows(&r.output, dtype, &mut output);
        Ok(Self {
            output,
            compute_micros: r.compute_micros,
        })
    }
}

/// What a worker checks every batch against.
#[derive(Clone, Debug)]
pub struct Expect<'a> {
    pub fingerprint: &'a str,
    pub hidden: usize,
    pub layers: usize,
    pub experts: usize,
    /// Experts a token is routed to: no row may list more, or one twice.
    pub top_k: usize,
    pub max_rows: usize,
}

/// A validated batch, ready for the expert stage.
#[derive(Debug)]
pub struct ExpertRequest {
    pub layer: usize,
    pub x: Vec<f32>,
    pub plan: RoutePlan,
    pub reply_dtype: WireDType,
}

impl ExpertRequest {
    /// Checks every field of `b` against `want` and decodes it.
    pub fn decode(b: &pb::ExpertBatch, want: &Expect<'_>) -> Result<Self, WireError> {
        if b.protocol_version != PROTOCOL_VERSION {
            return Err(WireError::Version {
                got: b.protocol_version,
                want: PROTOCOL_VERSION,
            });
        }
        if b.model_fingerprint != want.fingerprint {
            return Err(WireError::Fingerprint {
                got: b.model_fingerprint.clone(),
                want: want.fingerprint.to_string(),
            });
        }
        if b.hidden_size as usize != want.hidden {
            return Err(WireError::HiddenSize {
                got: b.hidden_size,
                want: want.hidden as u32,
            });
        }
        if b.layer as usize >= want.layers {
            return Err(WireError::Layer {
                got: b.layer,
                layers: want.layers as u32,
            });
        }
        if b.rows as usize > want.max_rows {
            return Err(WireError::TooLarge {
                rows: b.rows,
                max: want.max_rows as u32,
            });
        }
        let dtype = WireDType::from_pb(b.dtype, None)?;
        let reply_dtype = WireDType::from_pb(b.reply_dtype, Some(dtype))?;
        let n = b.rows as usize * want.hidden;
        let need = n * dtype.size();
        if b.hidden.len() != need {
            return Err(WireError::Payload {
                got: b.hidden.len(),
                want: need,
                rows: b.rows,
                hidden: b.hidden_size,
                dtype,
            });
        }
        if b.offsets.len() != b.rows as usize + 1 {
            return Err(WireError::Route(format!(
                "{} offsets for {} rows (need rows + 1)",
                b.offsets.len(),
                b.rows
            )));
        }
        // Bounded before anything is allocated from the counts.
        let max_entries = b.rows as usize * want.top_k;
        if b.experts.len() > max_entries || b.weights.len() > max_entries {
            return Err(WireError::Route(format!(
                "{} entries for {} rows of at most {} experts each",
                b.experts.len().max(b.weights.len()),
                b.rows,
                want.top_k
            )));
        }
        let experts = b
            .experts
            .iter()
            .map(|&e| {
                u16::try_from(e).map_err(|_| WireError::Route(format!("expert {e} out of range")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let plan =
            RoutePlan::from_parts(b.offsets.clone(), experts, b.weights.clone(), want.experts)
                .map_err(|e| WireError::Route(e.to_string()))?;
        for r in 0..plan.rows() {
            let row = plan.row_experts(r);
            if row.is_empty() {
                return Err(WireError::Route("a row has no experts".into()));
            }
            if row.len() > want.top_k {
                return Err(WireError::Route(format!(
                    "row {r} lists {} experts (at most {})",
                    row.len(),
                    want.top_k
                )));
            }
            if row.iter().enumerate().any(|(i, e)| row[..i].contains(e)) {
                return Err(WireError::Route(format!("row {r} lists an expert twice")));
            }
        }
        let mut x = vec![0.0; n];
        decode_rows(&b.hidden, dtype, &mut x);
        Ok(Self {
            layer: b.layer as usize,
            x,
            plan,
            reply_dtype,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RoutePlan {
        let mut p = RoutePlan::new();
        p.push_row([(1u16, 0.75f32), (3, 0.25)]);
        p.push_row([(3u16, 1.0f32)]);
        p
    }

    fn expect() -> Expect<'static> {
        Expect {
            fingerprint: "fp",
            hidden: 4,
            layers: 2,
            experts: 8,
            top_k: 2,
            max_rows: 16,
        }
    }

    #[test]
    fn round_trip_f32_exact_and_bf16_rounded() {
        let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.1 - 0.3).collect();
        let b = encode_batch("fp", 1, 4, &x, &plan(), WireDType::F32);
        let r = ExpertRequest::decode(&b, &expect()).unwrap();
        assert_eq!(r.x, x);
        assert_eq!(r.plan, plan());
        assert_eq!(r.layer, 1);
        let b = encode_batch("fp", 1, 4, &x, &plan(), WireDType::BF16);
        assert_eq!(b.hidden.len(), 16);
        let r = ExpertRequest::decode(&b, &expect()).unwrap();
        for (a, b) in r.x.iter().zip(&x) {
            assert!((a - b).abs() <= b.abs() / 128.0);
        }
    }

    #[test]
    fn every_malformed_field_is_a_coded_error() {
        let x = vec![0.5f32; 8];
        let good = encode_batch("fp", 1, 4, &x, &plan(), WireDType::F32);
        type Edit = Box<dyn Fn(&mut pb::ExpertBatch)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|b| b.protocol_version = 9), "SY:WIRE:Version"),
            (
                Box::new(|b| b.model_fingerprint = "other".into()),
                "SY:WIRE:Fingerprint",
            ),
            (Box::new(|b| b.hidden_size = 5), "SY:WIRE:HiddenSize"),
            (Box::new(|b| b.layer = 2), "SY:WIRE:Layer"),
            (Box::new(|b| b.dtype = 7), "SY:WIRE:DType"),
            (
                Box::new(|b| b.hidden = b.hidden.slice(..30)),
                "SY:WIRE:Payload",
            ),
            (Box::new(|b| b.offsets = vec![0, 2]), "SY:WIRE:Route"),
            (Box::new(|b| b.experts[0] = 8), "SY:WIRE:Route"),
            (Box::new(|b| b.experts[0] = 70000), "SY:WIRE:Route"),
            (
                Box::new(|b| b.weights.pop().map(drop).unwrap_or(())),
                "SY:WIRE:Route",
            ),
            (Box::new(|b| b.offsets = vec![0, 3, 3]), "SY:WIRE:Route"),
            (Box::new(|b| b.rows = 100), "SY:WIRE:TooLarge"),
            // A row listing one expert twice, or more than top-k.
            (Box::new(|b| b.experts = vec![3, 3, 1]), "SY:WIRE:Route"),
            (
                Box::new(|b| {
                    b.experts = vec![1, 3, 5, 3];
                    b.weights = vec![0.5, 0.25, 0.25, 1.0];
                    b.offsets = vec![0, 3, 4];
                }),
                "SY:WIRE:Route",
            ),
            // Entries far beyond rows × top-k are refused before anything is sized by them.
            (
                Box::new(|b| {
                    b.experts = vec![1; 100_000];
                    b.weights = vec![0.1; 100_000];
                    b.offsets = vec![0, 50_000, 100_000];
                }),
                "SY:WIRE:Route",
            ),
        ];
        for (edit, code) in cases {
            let mut b = good.clone();
            edit(&mut b);
            let e = ExpertRequest::decode(&b, &expect()).unwrap_err();
            assert_eq!(e.code(), code, "{e}");
            let status = tonic::Status::from(e);
            assert_eq!(crate::status_code_of(&status), Some(code));
        }
    }

    #[test]
    fn replies_of_the_wrong_shape_or_length_are_refused() {
        let out: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let good = pb::ExpertResult {
            rows: 2,
            hidden_size: 4,
            dtype: WireDType::F32.to_pb(),
            output: encode_rows(&out, WireDType::F32),
            compute_micros: 7,
        };
        let r = ExpertReply::decode(&good, 2, 4).unwrap();
        assert_eq!((r.output, r.compute_micros), (out, 7));
        let e = ExpertReply::decode(&good, 3, 4).unwrap_err();
        assert_eq!(e.code(), "SY:WIRE:ReplyShape");
        let long = pb::ExpertResult {
            output: encode_rows(&[0.0; 9], WireDType::F32),
            ..good.clone()
        };
        assert_eq!(
            ExpertReply::decode(&long, 2, 4).unwrap_err().code(),
            "SY:WIRE:Payload"
        );
        let odd = pb::ExpertResult { dtype: 99, ..good };
        assert_eq!(
            ExpertReply::decode(&odd, 2, 4).unwrap_err().code(),
            "SY:WIRE:DType"
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Batches with every field drawn anywhere near the valid ones: small counts, expert
        /// ids around the model's 8, any weights, any byte lengths.
        fn batch() -> impl Strategy<Value = pb::ExpertBatch> {
            (
                (0u32..3, prop::bool::ANY, 0u32..6, 0u32..4, 0u32..20),
                (0i32..4, 0i32..4, prop::collection::vec(any::<u8>(), 0..200)),
                prop::collection::vec(0u32..24, 0..24),
                prop::collection::vec(0u32..12, 0..48),
                prop::collection::vec(any::<f32>(), 0..48),
            )
                .prop_map(
                    |(
                        (version, same_fp, hidden, layer, rows),
                        (dtype, reply, bytes),
                        offsets,
                        experts,
                        weights,
                    )| {
                        pb::ExpertBatch {
                            protocol_version: version,
                            model_fingerprint: if same_fp { "fp".into() } else { "x".into() },
                            hidden_size: hidden,
                            layer,
                            rows,
                            dtype,
                            reply_dtype: reply,
                            hidden: bytes.into(),
                            offsets,
                            experts,
                            weights,
                            traceparent: String::new(),
                        }
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Whatever arrives, decoding answers with a batch that keeps every promise or
            /// with a coded error; it never panics.
            #[test]
            fn decoding_any_batch_never_panics_and_keeps_its_promises(b in batch()) {
                let want = expect();
                if let Ok(r) = ExpertRequest::decode(&b, &want) {
                    prop_assert!(r.layer < want.layers);
                    prop_assert_eq!(r.x.len(), r.plan.rows() * want.hidden);
                    for row in 0..r.plan.rows() {
                        let e = r.plan.row_experts(row);
                        prop_assert!(!e.is_empty() && e.len() <= want.top_k);
                        prop_assert!(e.iter().all(|&x| (x as usize) < want.experts));
                        prop_assert!(e.iter().enumerate().all(|(i, x)| !e[..i].contains(x)));
                    }
                }
            }

            #[test]
            fn decoding_any_reply_never_panics(
                rows in 0u32..8, hidden in 0u32..8, dtype in 0i32..4,
                bytes in prop::collection::vec(any::<u8>(), 0..300),
                want_rows in 0usize..8, want_hidden in 0usize..8,
            ) {
                let r = pb::ExpertResult { rows, hidden_size: hidden, dtype, output: bytes.into(), compute_micros: 0 };
                if let Ok(d) = ExpertReply::decode(&r, want_rows, want_hidden) {
                    prop_assert_eq!(d.output.len(), want_rows * want_hidden);
                }
            }
        }
    }
}
