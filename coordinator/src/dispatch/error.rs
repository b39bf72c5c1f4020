//! Dispatch errors, with stable codes and whether a replica may succeed where a worker failed.

use switchyard_cluster::{ClusterError, WorkerId};

/// Why an expert batch could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("worker {worker} is unavailable: {message}")]
    WorkerUnavailable { worker: WorkerId, message: String },
    #[error("worker {worker} did not answer within {millis} ms")]
    Deadline { worker: WorkerId, millis: u128 },
    #[error("worker {worker} refused the batch ({code}): {message}")]
    Refused {
        worker: WorkerId,
        code: String,
        message: String,
    },
    #[error("worker {worker} no longer hosts the expert: {message}")]
    NotHosted { worker: WorkerId, message: String },
    #[error("worker {worker} sent a malformed reply: {reason}")]
    BadReply { worker: WorkerId, reason: String },
    #[error("no live worker hosts expert {expert} of layer {layer}{}", cause.as_ref().map(|c| format!(" (last failure: {c})")).unwrap_or_default())]
    NoReplica {
        layer: usize,
        expert: usize,
        cause: Option<String>,
    },
    #[error("cannot connect to worker {worker}: {message}")]
    Connect { worker: WorkerId, message: String },
    #[error(transparent)]
    Placement(#[from] ClusterError),
    /// A batch sent off in the background ended without a result (its task panicked or the
    /// dispatch runtime shut down).
    #[error("expert batch for layer {layer} was lost: {message}")]
    Lost { layer: usize, message: String },
}

impl DispatchError {
    /// A stable identifier for logs, metrics and API error codes.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::WorkerUnavailable { .. } => "SY:DISPATCH:WorkerUnavailable",
            Self::Deadline { .. } => "SY:DISPATCH:Deadline",
            Self::Refused { .. } => "SY:DISPATCH:Refused",
            Self::NotHosted { .. } => "SY:DISPATCH:NotHosted",
            Self::BadReply { .. } => "SY:DISPATCH:BadReply",
            Self::NoReplica { .. } => "SY:DISPATCH:NoReplica",
            Self::Connect { .. } => "SY:DISPATCH:Connect",
            Self::Placement(_) => "SY:DISPATCH:Placement",
            Self::Lost { .. } => "SY:DISPATCH:Lost",
        }
    }

    /// Whether another worker hosting the same experts may succeed.
    #[must_use]
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::WorkerUnavailable { .. } | Self::Deadline { .. } | Self::NotHosted { .. }
        )
    }

    /// Whether the worker let the call run past its deadline.
    #[must_use]
    pub fn timed_out(&self) -> bool {
        matches!(self, Self::Deadline { .. })
    }

    /// Classifies a failed call to `worker`.
    pub(crate) fn from_status(
        worker: &WorkerId,
        s: &tonic::Status,
        timeout: std::time::Duration,
    ) -> Self {
        use tonic::Code;
        match s.code() {
            Code::DeadlineExceeded => Self::Deadline {
                worker: worker.clone(),
                millis: timeout.as_millis(),
            },
            // Overloaded or draining workers, broken connections: another replica may do.
            Code::Unavailable
            | Code::ResourceExhausted
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted => Self::WorkerUnavailable {
                worker: worker.clone(),
                message: s.message().to_string(),
            },
            // The worker's registry record changed (its planner assignment moved an expert)
            // after this coordinator chose it: another host has it.
            Code::NotFound => Self::NotHosted {
                worker: worker.clone(),
                message: s.message().to_string(),
            },
            _ => Self::Refused {
                worker: worker.clone(),
                code: switchyard_wire::status_code_of(s)
                    .unwrap_or(s.code().description())
                    .to_string(),
                message: s.message().to_string(),
            },
        }
    }
}
