//! Membership and placement: which workers exist and which experts of which layer each hosts.
//!
//! Today placement is static (`--workers` or a placement file); the table is built from what
//! each worker itself reports (its `WorkerInfo`), so a placement that claims an expert the
//! worker does not hold is caught at startup, not mid-request.

mod placement;

pub use placement::{PlacementTable, StaticPlacement, WorkerId, WorkerSpec};

/// Errors about cluster membership and placement.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid placement: {0}")]
    Spec(String),
    #[error("{path}: {reason}")]
    File {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("worker {worker}: {reason}")]
    Worker { worker: WorkerId, reason: String },
    #[error("no worker hosts {missing} (every expert of every layer needs at least one)")]
    Uncovered { missing: String },
}
