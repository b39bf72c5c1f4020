//! Expert dispatch over gRPC: `RemoteExperts` is the `ExpertExecutor` of a cluster.
//!
//! Per layer: choose one worker for every routed expert (heaviest expert first, each to the
//! least-loaded host, counting work in flight, where an expert weighs its tokens plus the read
//! of its weights), group the rows by worker (a row goes to a worker once, with only that worker's
//! entries), send every worker its batch concurrently with a deadline, and add the partial sums
//! in worker order. A worker whose call fails in a retryable way has its batch resent to
//! replicas of its experts and is kept out of routing for a back-off period.
//!
//! Read one module at a time: `config` (settings, TLS, channels), `assign` (pure: experts to
//! workers, rows to shares), `topology` (workers and who hosts what), `transport` (unary or
//! stream), `executor` (the layer's scatter/gather, retries and membership changes).

mod assign;
mod config;
mod error;
mod executor;
mod topology;
mod transport;

pub use config::{ClientTls, DispatchConfig, RpcMode};
pub use error::DispatchError;
pub use executor::RemoteExperts;
pub use topology::WorkerSnapshot;
