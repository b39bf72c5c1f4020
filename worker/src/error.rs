//! Worker errors and how they reach coordinators as gRPC statuses.

use std::{net::SocketAddr, path::PathBuf};
use switchyard_model::ModelError;
use switchyard_wire::{status_with_code, WireError};
use tonic::Code;

/// Everything that can go wrong in a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("{0}")]
    Config(String),
    #[error("expert {expert} of layer {layer} is not hosted by this worker (it hosts {hosted})")]
    NotHosted {
        layer: usize,
        expert: usize,
        hosted: String,
    },
    #[error("worker is at capacity ({0} batches in flight)")]
    Overloaded(usize),
    #[error("worker is shutting down")]
    Draining,
    #[error("expert computation failed: {0}")]
    Compute(String),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("cannot write ready file {0}: {1}")]
    ReadyFile(PathBuf, #[source] std::io::Error),
    #[error("gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
}

impl WorkerError {
    /// A stable identifier for logs, metrics and the `sy-error-code` metadata.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::Model(_) => "SY:WORKER:Model",
            Self::Wire(w) => w.code(),
            Self::Config(_) => "SY:WORKER:Config",
            Self::NotHosted { .. } => "SY:WORKER:ExpertNotHosted",
            Self::Overloaded(_) => "SY:WORKER:Overloaded",
            Self::Draining => "SY:WORKER:Draining",
            Self::Compute(_) => "SY:WORKER:Compute",
            Self::Bind(..) => "SY:WORKER:Bind",
            Self::ReadyFile(..) => "SY:WORKER:ReadyFile",
            Self::Serve(_) => "SY:WORKER:Serve",
        }
    }
}

impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        let code = match &e {
            WorkerError::Wire(w) => return w.clone().into(),
            WorkerError::NotHosted { .. } => Code::NotFound,
            WorkerError::Overloaded(_) => Code::ResourceExhausted,
            WorkerError::Draining => Code::Unavailable,
            WorkerError::Model(ModelError::Input(_)) => Code::InvalidArgument,
            _ => Code::Internal,
        };
        status_with_code(code, e.to_string(), e.code())
    }
}
