//! switchyard's coordinator: embeddings, attention, router and LM head, the KV cache and the
//! request path. Per layer it routes tokens and hands them to an [`ExpertExecutor`]: in-process
//! experts in embedded mode, remote workers in a cluster, through the same layer loop.
//!
//! **API boundary:** the coordinator uses only what `switchyard_model` re-exports, and never
//! depends on the worker crate.

pub mod api;
pub mod counting;
pub mod dispatch;
pub mod engine;
pub mod membership;
pub mod metrics;
pub mod scheduler;
pub mod serve;

pub use engine::{
    Engine, EngineError, FinishReason, ForwardReport, GenerateEvent, GenerateRequest,
};
