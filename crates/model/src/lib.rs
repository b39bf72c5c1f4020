//! switchyard's model crate: the Mixtral math and weight loading that the coordinator and the
//! workers share.
//!
//! **Architecture invariant:** no tokio, no networking, no protobuf here. The layer loop
//! ([`Mixtral::step`]) calls experts only through [`ExpertExecutor`] and never knows where they
//! run; [`LocalExperts`] is the in-process implementation a worker and embedded mode both use.

pub mod backend;
pub mod config;
mod error;
pub mod eval;
pub mod executor;
pub mod ids;
pub mod kv_cache;
pub mod model;
pub mod moe;
pub mod profile;
pub mod sampling;
pub mod structured;
pub mod tokenizer;
pub mod weights;

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

pub use backend::{any::AnyBackend, cpu::Cpu, Backend, Device, KvDtype};
pub use config::MixtralConfig;
pub use error::{ModelError, Result};
pub use executor::{
    combine, combine_entries, ExpertExecutor, ExpertJob, Finished, LocalExperts, PendingExperts,
};
pub use ids::{ExpertId, ExpertSet, LayerId};
pub use kv_cache::{KvCache, SeqKv, DEFAULT_BLOCK_SIZE, FREED};
pub use model::{Logits, Mixtral, SeqStep, StepOutput, StepScratch};
pub use moe::RoutePlan;
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{ChatMessage, Tokenizer};
pub use weights::{
    Checkpoint, DType, HostTensor, LoadProgress, NoProgress, QuantFormat, QuantPlan, WeightRole,
};
