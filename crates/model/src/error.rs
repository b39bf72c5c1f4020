//! The one error type of the model crate.
//!
//! Every variant names what a user can act on: the file, the tensor, the field, the offending value.
//! Nothing in this crate panics on a checkpoint or a request; it returns one of these.

use std::path::PathBuf;

/// Errors from loading checkpoints, tokenizing and running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: architecture {found:?} is not supported (switchyard serves MixtralForCausalLM checkpoints)")]
    Architecture { path: PathBuf, found: String },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: invalid index: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error("tensor {tensor:?} is missing from the checkpoint (looked in {where_})")]
    MissingTensor { tensor: String, where_: String },
    #[error("{path}: tensor {tensor:?} has shape {found:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor {tensor:?} has dtype {dtype}; supported are F32, F16, BF16, and Q8_0 and Q4_0 (switchyard quantize, GGUF)")]
    Dtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// A packed quantized tensor that does not fit the checkpoint's `quantization_config`.
    #[error("{path}: quantized tensor {tensor:?} {reason}")]
    Quantized {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// A GGUF file that cannot be read as a Mixtral checkpoint.
    #[error("{path}: GGUF: {reason}")]
    Gguf { path: PathBuf, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("out of KV-cache blocks: need {needed}, {free} free")]
    KvCacheFull { needed: usize, free: usize },
    #[error("expert ({layer}, {expert}) is not hosted here")]
    ExpertNotHosted { layer: usize, expert: usize },
    /// The expert stage failed outside this process (a worker, the network). The source is the
    /// executor's own error type; callers downcast it for codes and retry decisions.
    #[error("expert dispatch failed: {0}")]
    Dispatch(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("device {0:?} is not available: {1}")]
    Device(String, String),
    /// A setting this device has no kernels for.
    #[error("{device} does not support {what}")]
    Unsupported { device: String, what: String },
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias for the model crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
