//! The engine: a loaded model, its tokenizer and an expert executor. Loading is
//! [`Engine::load`] (`crate::loader`); generating is the scheduler's (`crate::scheduler`); the
//! verification interface is `crate::report`.

use std::sync::Arc;
use switchyard_model::{
    AnyBackend, Backend, Checkpoint, ExpertExecutor, KvDtype, LoadProgress, Mixtral, MixtralConfig,
    ModelError, Tokenizer,
};

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("invalid request: {0}")]
    Request(crate::request::RequestError),
    #[error("generation failed: {0}")]
    Failed(String),
    #[error(transparent)]
    Submit(#[from] crate::scheduler::SubmitError),
    #[error(transparent)]
    Dispatch(#[from] crate::dispatch::DispatchError),
}

impl From<crate::request::RequestError> for EngineError {
    fn from(e: crate::request::RequestError) -> Self {
        Self::Request(e)
    }
}

/// Whether `backend` keeps a KV cache of `dtype`: asks it for a one-element pool, so that a
/// dtype the device lacks is refused at start-up, before the weights load.
pub fn check_kv_dtype<B: Backend>(backend: &B, dtype: KvDtype) -> Result<(), EngineError> {
    backend.alloc_kv(1, dtype)?;
    Ok(())
}

/// A model ready to run on backend `B` with its experts wherever `experts` puts them.
pub struct Engine<B: Backend = AnyBackend> {
    model: Mixtral<B>,
    experts: Arc<dyn ExpertExecutor>,
    tokenizer: Tokenizer,
    kv_dtype: KvDtype,
}

impl<B: Backend> Engine<B> {
    /// Loads the dense weights and tokenizer from `ck` and uses `experts` for the MoE blocks.
    pub(crate) fn load_with(
        backend: B,
        ck: &Checkpoint,
        experts: Arc<dyn ExpertExecutor>,
        progress: &dyn LoadProgress,
    ) -> Result<Self, EngineError> {
        let model = Mixtral::load(backend, ck, progress)?;
        let tokenizer = ck.tokenizer()?;
        tracing::info!(
            dir = %ck.dir().display(),
            backend = %model.backend().describe(),
            dense_bytes = model.weight_bytes(),
            "model loaded"
        );
        Ok(Self {
            model,
            experts,
            tokenizer,
            kv_dtype: KvDtype::F32,
        })
    }

    /// Keeps every KV cache this engine makes (the scheduler's included) in `dtype`; an error
    /// where the backend has no kernels for it.
    pub fn with_kv_dtype(mut self, dtype: KvDtype) -> Result<Self, EngineError> {
        check_kv_dtype(self.model.backend(), dtype)?;
        self.kv_dtype = dtype;
        Ok(self)
    }

    /// The element type of this engine's KV caches.
    #[must_use]
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// The model's config.
    #[must_use]
    pub fn config(&self) -> &MixtralConfig {
        self.model.config()
    }

    /// The tokenizer.
    #[must_use]
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The dense model (the scheduler's step loop and the forward report run it).
    pub(crate) fn model(&self) -> &Mixtral<B> {
        &self.model
    }

    /// Where the experts run.
    pub(crate) fn experts(&self) -> &dyn ExpertExecutor {
        self.experts.as_ref()
    }
}

impl Engine {
    /// What a request to this engine is checked against, where the context is the model's
    /// own (a CLI run, whose scheduler is sized for its one request).
    #[must_use]
    pub fn limits(&self, model_name: &str) -> crate::request::RequestLimits {
        crate::request::RequestLimits {
            model_name: model_name.to_string(),
            max_n: usize::MAX,
            max_prompts: usize::MAX,
            max_seq_len: self.config().max_position_embeddings,
            vocab_size: self.config().vocab_size,
        }
    }
}
