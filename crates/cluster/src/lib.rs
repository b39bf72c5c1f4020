//! Membership and placement: which workers exist and which experts of which layer each hosts.
//!
//! Two sources of membership: a static placement (`--workers` or a placement file), checked
//! against what each worker itself reports (its `WorkerInfo`), so a placement that claims an
//! expert the worker does not hold is caught at startup; or the etcd [`registry`], where workers
//! register under a lease and coordinators watch. The [`planner`] decides which managed worker
//! should host what.

pub mod capacity;
mod placement;
pub mod planner;
pub mod rbac;
pub mod record;
pub mod registry;

pub use placement::{PlacementTable, StaticPlacement, WorkerId, WorkerSpec};
pub use record::{Keys, LoadRecord, PlanRecord, WorkerLoad, WorkerRecord};
pub use registry::{EtcdTls, Registry, RegistryConfig};

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
    #[error("etcd ({endpoints}): {message}")]
    Etcd { endpoints: String, message: String },
    #[error("no worker hosts {missing} (every expert of every layer needs at least one)")]
    Uncovered { missing: String },
}
