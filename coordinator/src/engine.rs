//! The engine: a loaded model, its tokenizer and an expert executor, with the two things the
//! CLI and the API need from it: a full forward report (the verification interface) and
//! token-by-token generation.

use std::{path::Path, sync::Arc};
use switchyard_model::{
    sampling, AnyBackend, Backend, Checkpoint, Cpu, Device, ExpertExecutor, ExpertSet, KvCache,
    KvDtype, LoadProgress, LocalExperts, Logits, Mixtral, MixtralConfig, ModelError, Sampler,
    SamplingParams, SeqKv, SeqStep, StepOutput, StepScratch, Tokenizer,
};

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Dispatch(#[from] crate::dispatch::DispatchError),
}

/// What `switchyard forward` prints: HF-comparable logits of every position, each layer's
/// expert choices and renormalised router weights, and optionally a greedy continuation.
#[derive(Debug, serde::Serialize)]
pub struct ForwardReport {
    /// `[position][vocab]`
    pub logits: Vec<Vec<f32>>,
    /// `[layer][position][k]`, descending router weight.
    pub experts: Vec<Vec<Vec<u16>>>,
    /// `[layer][position][k]`
    pub router_weights: Vec<Vec<Vec<f32>>>,
    /// New ids only; stops right after an eos id, which is included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub greedy: Option<Vec<u32>>,
}

/// A generation request after validation.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Extra stop ids beyond the model's eos ids.
    pub stop_ids: Vec<u32>,
    /// Keep going past eos (benchmarks want fixed lengths).
    pub ignore_eos: bool,
    /// Report each token's logprob: a log-softmax over the vocabulary per token (~0.2 ms at
    /// 32,000 on a Zen 3 VM, ~1 % of a batch-1 decode step), so only when wanted.
    pub logprobs: bool,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

/// One generated token as it is produced.
#[derive(Clone, Debug)]
pub struct GenerateEvent {
    pub id: u32,
    /// Log-probability of the chosen token under the (penalised) distribution, where the
    /// request asked for it.
    pub logprob: Option<f32>,
    /// Set on the last token.
    pub finish: Option<FinishReason>,
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

impl Engine<AnyBackend> {
    /// Embedded mode on the CPU: dense weights and every expert in this process.
    pub fn load_embedded(dir: &Path, progress: &dyn LoadProgress) -> Result<Self, EngineError> {
        Self::load_embedded_on(dir, Device::Cpu, progress)
    }

    /// Embedded mode: dense weights and every expert in this process, on `device`.
    pub fn load_embedded_on(
        dir: &Path,
        device: Device,
        progress: &dyn LoadProgress,
    ) -> Result<Self, EngineError> {
        let backend = AnyBackend::new(device)?;
        let ck = Checkpoint::open(dir)?;
        let all = ExpertSet::all(ck.config().num_local_experts);
        progress.start(
            Mixtral::<Cpu>::bytes_to_load(&ck) + LocalExperts::<Cpu>::bytes_to_load(&ck, &all),
        );
        let experts = Arc::new(LocalExperts::load(&backend, &ck, &all, progress)?);
        let engine = Self::load_with(backend, &ck, experts, progress)?;
        progress.finish();
        Ok(engine)
    }
}

impl Engine<AnyBackend> {
    /// Cluster mode: dense weights here, experts on the workers of `placement`. Blocks; call it
    /// (and run the engine) outside any async runtime.
    pub fn load_cluster(
        dir: &Path,
        placement: &switchyard_cluster::StaticPlacement,
        dispatch: crate::dispatch::DispatchConfig,
        device: Device,
        progress: &dyn LoadProgress,
    ) -> Result<(Self, Arc<crate::dispatch::RemoteExperts>), EngineError> {
        let backend = AnyBackend::new(device)?;
        let ck = Checkpoint::open(dir)?;
        let fingerprint = ck.fingerprint();
        let remote = Arc::new(crate::dispatch::RemoteExperts::connect(
            placement,
            ck.config(),
            &fingerprint,
            dispatch,
        )?);
        progress.start(Mixtral::<Cpu>::bytes_to_load(&ck));
        let engine = Self::load_with(backend, &ck, remote.clone(), progress)?;
        progress.finish();
        Ok((engine, remote))
    }
}

impl Engine<AnyBackend> {
    /// Cluster mode with live membership: dense weights here, experts on whichever workers are
    /// registered in etcd. Waits up to `wait` for every expert to have a host (requests that
    /// need a missing one wait for it anyway, up to the dispatcher's `expert_wait`).
    pub fn load_registry(
        dir: &Path,
        membership: crate::membership::MembershipConfig,
        dispatch: crate::dispatch::DispatchConfig,
        wait: std::time::Duration,
        device: Device,
        progress: &dyn LoadProgress,
    ) -> Result<
        (
            Self,
            Arc<crate::dispatch::RemoteExperts>,
            crate::membership::Membership,
        ),
        EngineError,
    > {
        let backend = AnyBackend::new(device)?;
        let ck = Checkpoint::open(dir)?;
        let remote = Arc::new(crate::dispatch::RemoteExperts::empty(
            ck.config(),
            &ck.fingerprint(),
            dispatch,
        )?);
        let m = crate::membership::Membership::start(membership, remote.clone(), None).map_err(
            |e| EngineError::Invalid(format!("cannot start the membership thread: {e}")),
        )?;
        progress.start(Mixtral::<Cpu>::bytes_to_load(&ck));
        let engine = Self::load_with(backend, &ck, remote.clone(), progress)?;
        progress.finish();
        if !remote.wait_for_coverage(wait) {
            let (l, e) = remote.first_unreachable_expert().unwrap_or((0, 0));
            tracing::warn!(layer = l, expert = e, waited = ?wait, "not every expert has a registered host yet");
        }
        Ok((engine, remote, m))
    }
}

impl<B: Backend> Engine<B> {
    /// Loads the dense weights and tokenizer from `ck` and uses `experts` for the MoE blocks.
    pub fn load_with(
        backend: B,
        ck: &Checkpoint,
        experts: Arc<dyn ExpertExecutor>,
        progress: &dyn LoadProgress,
    ) -> Result<Self, EngineError> {
        let model = Mixtral::load(backend, ck, progress)?;
        let tokenizer = Tokenizer::from_dir(ck.dir())?;
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

    /// The dense model and the expert executor, for the scheduler's own step loop.
    pub(crate) fn parts(&self) -> (&Mixtral<B>, &dyn ExpertExecutor) {
        (&self.model, self.experts.as_ref())
    }

    /// A cache big enough for one sequence of `positions`.
    fn cache_for(&self, positions: usize) -> Result<KvCache<B>, EngineError> {
        let bs = switchyard_model::DEFAULT_BLOCK_SIZE;
        Ok(KvCache::new(
            self.model.backend(),
            self.config(),
            bs,
            positions.div_ceil(bs).max(1),
            self.kv_dtype,
        )?)
    }

    fn check_ids(&self, ids: &[u32], extra: usize) -> Result<(), EngineError> {
        let cfg = self.config();
        if ids.is_empty() {
            return Err(EngineError::Invalid("the prompt has no tokens".into()));
        }
        if let Some(t) = ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(EngineError::Invalid(format!(
                "token id {t} is outside the vocabulary (size {})",
                cfg.vocab_size
            )));
        }
        if ids.len() + extra > cfg.max_position_embeddings {
            return Err(EngineError::Invalid(format!(
                "{} prompt tokens + {extra} new tokens exceed the context length {}",
                ids.len(),
                cfg.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// Runs the whole prompt in one step and reports logits, experts and router weights of every
    /// position; with `greedy = Some(n)`, continues greedily for up to `n` tokens.
    pub fn forward_report(
        &self,
        ids: &[u32],
        greedy: Option<usize>,
    ) -> Result<ForwardReport, EngineError> {
        let n_new = greedy.unwrap_or(0);
        self.check_ids(ids, n_new)?;
        let cfg = self.config();
        let vocab = cfg.vocab_size;
        let mut kv = self.cache_for(ids.len() + n_new)?;
        let mut seq = SeqKv::default();
        let mut scratch = StepScratch::new(self.model.backend())?;
        let mut out = StepOutput::traced(Logits::All);
        let mut steps = [SeqStep {
            tokens: ids,
            kv: &mut seq,
        }];
        self.model.step(
            &mut steps,
            &mut kv,
            self.experts.as_ref(),
            &mut scratch,
            &mut out,
        )?;
        let report_logits: Vec<Vec<f32>> = out.logits.chunks(vocab).map(<[f32]>::to_vec).collect();
        let trace = out.trace.take().unwrap_or_default();
        let experts = trace
            .iter()
            .map(|p| (0..p.rows()).map(|r| p.row_experts(r).to_vec()).collect())
            .collect();
        let router_weights = trace
            .iter()
            .map(|p| (0..p.rows()).map(|r| p.row_weights(r).to_vec()).collect())
            .collect();
        let greedy = match greedy {
            None => None,
            Some(n) => {
                let mut ids_out = Vec::new();
                let mut next = sampling::argmax(&out.logits[(ids.len() - 1) * vocab..]);
                out.which = Logits::Last;
                while ids_out.len() < n {
                    ids_out.push(next);
                    if cfg.eos_token_ids.contains(&next) || ids_out.len() == n {
                        break;
                    }
                    let tok = [next];
                    let mut steps = [SeqStep {
                        tokens: &tok,
                        kv: &mut seq,
                    }];
                    self.model.step(
                        &mut steps,
                        &mut kv,
                        self.experts.as_ref(),
                        &mut scratch,
                        &mut out,
                    )?;
                    next = sampling::argmax(&out.logits);
                }
                Some(ids_out)
            }
        };
        Ok(ForwardReport {
            logits: report_logits,
            experts,
            router_weights,
            greedy,
        })
    }

    /// Generates up to `req.max_tokens` tokens, calling `on_token` for each as it is chosen.
    /// `on_token` returns `false` to stop early (the caller went away).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        mut on_token: impl FnMut(&GenerateEvent) -> bool,
    ) -> Result<FinishReason, EngineError> {
        if req.max_tokens == 0 {
            return Err(EngineError::Invalid("max_tokens must be at least 1".into()));
        }
        req.sampling.validate().map_err(EngineError::Invalid)?;
        self.check_ids(&req.prompt, req.max_tokens)?;
        let cfg = self.config();
        let mut kv = self.cache_for(req.prompt.len() + req.max_tokens)?;
        let mut seq = SeqKv::default();
        let mut scratch = StepScratch::new(self.model.backend())?;
        let mut sampler = Sampler::new(req.sampling.clone(), &req.prompt);
        let mut out = StepOutput::new(Logits::Last);
        let mut logprobs = Vec::new();
        let mut input: Vec<u32> = req.prompt.clone();
        for i in 0..req.max_tokens {
            let mut steps = [SeqStep {
                tokens: &input,
                kv: &mut seq,
            }];
            self.model.step(
                &mut steps,
                &mut kv,
                self.experts.as_ref(),
                &mut scratch,
                &mut out,
            )?;
            sampler.apply_penalties(&mut out.logits);
            let id = sampler.sample(&out.logits);
            let logprob = req.logprobs.then(|| {
                sampling::log_softmax(&out.logits, &mut logprobs);
                logprobs[id as usize]
            });
            let stop =
                (!req.ignore_eos && cfg.eos_token_ids.contains(&id)) || req.stop_ids.contains(&id);
            let finish = if stop {
                Some(FinishReason::Stop)
            } else if i + 1 == req.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            let ev = GenerateEvent {
                id,
                logprob,
                finish,
            };
            if !on_token(&ev) {
                return Ok(FinishReason::Stop);
            }
            if let Some(f) = finish {
                return Ok(f);
            }
            input.clear();
            input.push(id);
        }
        Ok(FinishReason::Length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_model::NoProgress;

    fn fixture(name: &str) -> std::path::PathBuf {
        let dir = std::env::var_os("SWITCHYARD_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
        dir.join(name)
    }

    #[test]
    fn generate_greedy_equals_forward_greedy_and_reports_finish() {
        let e = Engine::load_embedded(&fixture("tiny-mixtral-trained"), &NoProgress).unwrap();
        let prompt = e
            .tokenizer()
            .encode("Return the number of items in the", true)
            .unwrap();
        let report = e.forward_report(&prompt, Some(12)).unwrap();
        let mut got = Vec::new();
        let req = GenerateRequest {
            prompt: prompt.clone(),
            max_tokens: 12,
            sampling: SamplingParams::default(),
            stop_ids: vec![],
            ignore_eos: false,
            logprobs: true,
        };
        let finish = e
            .generate(&req, |ev| {
                assert!(ev.logprob.is_some_and(|lp| lp <= 0.0));
                got.push(ev.id);
                true
            })
            .unwrap();
        assert_eq!(Some(got.clone()), report.greedy);
        let text = e.tokenizer().decode(&got, true).unwrap();
        assert!(
            text.contains("list"),
            "trained fixture writes English: {text:?}"
        );
        assert_eq!(finish, FinishReason::Length);
    }

    #[test]
    fn seeded_sampling_reproduces_and_stop_ids_stop() {
        let e = Engine::load_embedded(&fixture("tiny-mixtral-trained"), &NoProgress).unwrap();
        let prompt = e.tokenizer().encode("If the file", true).unwrap();
        let run = |seed, stop_ids: Vec<u32>| {
            let req = GenerateRequest {
                prompt: prompt.clone(),
                max_tokens: 10,
                sampling: SamplingParams {
                    temperature: 0.9,
                    top_p: 0.95,
                    seed: Some(seed),
                    ..Default::default()
                },
                stop_ids,
                ignore_eos: false,
                logprobs: false,
            };
            let mut ids = Vec::new();
            let f = e.generate(&req, |ev| {
                ids.push(ev.id);
                true
            });
            (ids, f.unwrap())
        };
        let (a, _) = run(3, vec![]);
        assert_eq!(a, run(3, vec![]).0);
        let (b, f) = run(3, vec![a[2]]);
        assert_eq!(b, a[..3].to_vec());
        assert_eq!(f, FinishReason::Stop);
    }

    #[test]
    fn bad_requests_are_errors() {
        let e = Engine::load_embedded(&fixture("tiny-mixtral"), &NoProgress).unwrap();
        assert!(matches!(
            e.forward_report(&[], None),
            Err(EngineError::Invalid(_))
        ));
        assert!(matches!(
            e.forward_report(&[1, 9999], None),
            Err(EngineError::Invalid(_))
        ));
        assert!(matches!(
            e.forward_report(&[1; 500], Some(20)),
            Err(EngineError::Invalid(_))
        ));
        let req = GenerateRequest {
            prompt: vec![1],
            max_tokens: 0,
            sampling: SamplingParams::default(),
            stop_ids: vec![],
            ignore_eos: false,
            logprobs: false,
        };
        assert!(e.generate(&req, |_| true).is_err());
    }
}
