//! The coordinator ↔ worker protocol (`proto/switchyard/v1/expert.proto`): the generated code and
//! checked conversions between its messages and model types.
//!
//! **Architecture invariant:** this is the only crate with prost-generated code. Everything that
//! comes off the wire is validated here (shapes, byte lengths, ids, offsets) before any other
//! crate sees it, and every failure is a `WireError` with a stable code.

pub mod codec;
pub mod trace;

/// Generated protobuf and gRPC code.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("switchyard.v1");
}

pub use codec::{
    decode_rows, encode_batch, encode_rows, Expect, ExpertReply, ExpertRequest, WireDType,
};

/// Bumped on any incompatible protocol change; peers of other versions are refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// gRPC metadata key carrying a [`WireError`]'s or a worker error's stable code.
pub const ERROR_CODE_KEY: &str = "sy-error-code";

/// Protocol-level errors: a message that does not describe a well-formed batch for this model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error("protocol version {got} is not supported (this side speaks {want})")]
    Version { got: u32, want: u32 },
    #[error("model fingerprint {got:?} does not match this worker's {want:?}")]
    Fingerprint { got: String, want: String },
    #[error("hidden size {got} does not match the model's {want}")]
    HiddenSize { got: u32, want: u32 },
    #[error("layer {got} out of range (model has {layers})")]
    Layer { got: u32, layers: u32 },
    #[error("unknown wire dtype {0}")]
    DType(i32),
    #[error("payload of {got} bytes does not hold {rows} rows × {hidden} {dtype:?} values ({want} bytes)")]
    Payload {
        got: usize,
        want: usize,
        rows: u32,
        hidden: u32,
        dtype: WireDType,
    },
    #[error("route: {0}")]
    Route(String),
    #[error("batch of {rows} rows exceeds the limit of {max}")]
    TooLarge { rows: u32, max: u32 },
    #[error("message has no {0}")]
    Missing(&'static str),
    #[error("reply of {got_rows} rows × {got_hidden} for a batch of {rows} × {hidden}")]
    ReplyShape {
        got_rows: u32,
        got_hidden: u32,
        rows: usize,
        hidden: usize,
    },
}

impl WireError {
    /// A stable identifier for logs, metrics and the `sy-error-code` metadata.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::Version { .. } => "SY:WIRE:Version",
            Self::Fingerprint { .. } => "SY:WIRE:Fingerprint",
            Self::HiddenSize { .. } => "SY:WIRE:HiddenSize",
            Self::Layer { .. } => "SY:WIRE:Layer",
            Self::DType(_) => "SY:WIRE:DType",
            Self::Payload { .. } => "SY:WIRE:Payload",
            Self::Route(_) => "SY:WIRE:Route",
            Self::TooLarge { .. } => "SY:WIRE:TooLarge",
            Self::Missing(_) => "SY:WIRE:Missing",
            Self::ReplyShape { .. } => "SY:WIRE:ReplyShape",
        }
    }
}

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        let code = match e {
            WireError::Version { .. } | WireError::Fingerprint { .. } => {
                tonic::Code::FailedPrecondition
            }
            WireError::TooLarge { .. } => tonic::Code::ResourceExhausted,
            _ => tonic::Code::InvalidArgument,
        };
        status_with_code(code, e.to_string(), e.code())
    }
}

/// A `Status` whose metadata carries `sy-error-code: <code>`.
#[must_use]
pub fn status_with_code(
    code: tonic::Code,
    message: String,
    sy_code: &'static str,
) -> tonic::Status {
    let mut s = tonic::Status::new(code, message);
    s.metadata_mut().insert(
        ERROR_CODE_KEY,
        tonic::metadata::MetadataValue::from_static(sy_code),
    );
    s
}

/// The `sy-error-code` of a status, if the peer set one.
#[must_use]
pub fn status_code_of(s: &tonic::Status) -> Option<&str> {
    s.metadata()
        .get(ERROR_CODE_KEY)
        .and_then(|v| v.to_str().ok())
}
