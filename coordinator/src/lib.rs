//! switchyard's coordinator: embeddings, attention, router and LM head, the KV cache and the
//! request path. Per layer it routes tokens and hands them to an [`ExpertExecutor`]: in-process
//! experts in embedded mode, remote workers in a cluster, through the same layer loop.
//!
//! A request's path: `api` (HTTP) → `request::validation` (the one check) → `scheduler` (the
//! one generation loop) → `text` (detokenizing, stop strings) → `api` (OpenAI's answer).
//! Engines load through `loader` alone.
//!
//! **API boundary:** the coordinator uses only what `switchyard_model` re-exports, and never
//! depends on the worker crate.
//!
//! [`ExpertExecutor`]: switchyard_model::ExpertExecutor

pub mod api;
pub mod counting;
pub mod dashboard;
pub mod dispatch;
pub mod engine;
pub mod http;
pub mod loader;
pub mod membership;
pub mod metrics;
pub mod report;
pub mod request;
pub mod scheduler;
pub mod serve;
pub mod text;

pub use engine::{Engine, EngineError};
pub use loader::{ExpertSource, LoadOptions, Loaded};
pub use report::{forward_report, ForwardReport};
pub use scheduler::FinishReason;

/// A reference fixture's folder (`SWITCHYARD_FIXTURES`, else `../shared/fixtures`).
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> std::path::PathBuf {
    std::env::var_os("SWITCHYARD_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
        })
        .join(name)
}
