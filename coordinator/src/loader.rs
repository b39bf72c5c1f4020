//! The one way to load an engine: dense weights here, experts wherever an [`ExpertSource`]
//! says, the executor wrapped in [`Counting`] so every mode reports per-expert load alike.
//! `serve` and every CLI command load through [`Engine::load`].

use crate::{
    counting::{Counting, ExpertCounts},
    dispatch::{DispatchConfig, RemoteExperts},
    engine::{check_kv_dtype, Engine, EngineError},
    membership::{Membership, MembershipConfig},
};
use std::{path::Path, sync::Arc, time::Duration};
use switchyard_cluster::StaticPlacement;
use switchyard_model::{
    AnyBackend, Checkpoint, Cpu, Device, ExpertExecutor, ExpertSet, KvDtype, LoadProgress,
    LocalExperts, Mixtral, QuantPlan,
};

/// Where the experts run.
#[derive(Clone, Debug)]
pub enum ExpertSource {
    /// Every expert in this process (embedded mode).
    Embedded,
    /// On the workers of a fixed placement, dialled at load.
    Static(StaticPlacement),
    /// On whichever workers are registered in etcd, followed live.
    Registry(MembershipConfig),
}

/// How to load, whatever the source.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Where the dense layers (and, embedded, the experts) run.
    pub device: Device,
    /// The element type of every KV cache the engine makes.
    pub kv_dtype: KvDtype,
    /// How the coordinator talks to workers (static and registry sources).
    pub dispatch: DispatchConfig,
    /// Registry source: how long loading waits for every expert to have a live host. Requests
    /// that need a missing one wait anyway, up to the dispatcher's `expert_wait`.
    pub registry_wait: Duration,
    /// Registry source: publish this coordinator's routed-token counts for the planner (a
    /// serving coordinator; one-off CLI runs leave the planner's view alone).
    pub publish_load: bool,
    /// What to quantize at load (`--quantize`, `--quantize-attention`). Workers must quantize
    /// their experts alike: the fingerprint differs otherwise.
    pub quantize: QuantPlan,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            kv_dtype: KvDtype::F32,
            dispatch: DispatchConfig::default(),
            registry_wait: Duration::from_secs(5),
            publish_load: false,
            quantize: QuantPlan::default(),
        }
    }
}

/// A loaded engine and what keeps its experts reachable.
pub struct Loaded {
    pub engine: Arc<Engine>,
    /// The dispatcher, in cluster modes (its per-worker counters, readiness).
    pub remote: Option<Arc<RemoteExperts>>,
    /// Routed tokens per (layer, expert), in every mode.
    pub counts: Arc<ExpertCounts>,
    /// The registry watcher (and planner), running while this lives.
    pub membership: Option<Membership>,
}

impl Loaded {
    /// Logs per-worker dispatch counters (cluster modes only).
    pub fn log_dispatch_stats(&self) {
        let Some(remote) = &self.remote else { return };
        for st in remote.snapshot() {
            let calls = st.calls.max(1);
            tracing::info!(
                worker = %st.id,
                calls = st.calls,
                failures = st.failures,
                rows = st.rows,
                mean_latency_us = st.latency_micros / calls,
                mean_compute_us = st.compute_micros / calls,
                "dispatch"
            );
        }
    }
}

impl Engine {
    /// Loads `model` with its experts from `source`. Blocks; call it (and run the engine)
    /// outside any async runtime. A KV dtype the device lacks is refused before the weights
    /// load.
    pub fn load(
        model: &Path,
        source: ExpertSource,
        opts: &LoadOptions,
        progress: &dyn LoadProgress,
    ) -> Result<Loaded, EngineError> {
        let backend = AnyBackend::new(opts.device)?;
        check_kv_dtype(&backend, opts.kv_dtype)?;
        let mut ck = Checkpoint::open(model)?;
        ck.set_quantize(opts.quantize)?;
        let mc = ck.config();
        let counts = Arc::new(ExpertCounts::new(
            mc.num_hidden_layers,
            mc.num_local_experts,
        ));
        let dense = Mixtral::<Cpu>::bytes_to_load(&ck);
        let mut membership = None;
        if !matches!(source, ExpertSource::Embedded) && opts.dispatch.tls.is_none() {
            tracing::warn!(
                "expert batches travel to workers in plaintext: anyone on the network can read \
                 or forge them (--worker-tls-ca and the workers' --tls-cert for TLS)"
            );
        }
        let (inner, remote): (Arc<dyn ExpertExecutor>, _) = match source {
            ExpertSource::Embedded => {
                let all = ExpertSet::all(mc.num_local_experts);
                progress.start(dense + LocalExperts::<Cpu>::bytes_to_load(&ck, &all));
                let local = LocalExperts::load(&backend, &ck, &all, progress)?;
                (Arc::new(local), None)
            }
            ExpertSource::Static(p) => {
                let r = Arc::new(RemoteExperts::connect(
                    &p,
                    mc,
                    &ck.fingerprint(),
                    opts.dispatch.clone(),
                )?);
                progress.start(dense);
                (r.clone(), Some(r))
            }
            ExpertSource::Registry(m) => {
                let r = Arc::new(RemoteExperts::empty(
                    mc,
                    &ck.fingerprint(),
                    opts.dispatch.clone(),
                )?);
                let published = opts.publish_load.then(|| counts.clone());
                let started = Membership::start(m, r.clone(), published).map_err(|e| {
                    EngineError::Invalid(format!("cannot start the membership thread: {e}"))
                })?;
                membership = Some(started);
                progress.start(dense);
                (r.clone(), Some(r))
            }
        };
        let experts = Arc::new(Counting {
            inner,
            counts: counts.clone(),
        });
        let engine =
            Engine::load_with(backend, &ck, experts, progress)?.with_kv_dtype(opts.kv_dtype)?;
        progress.finish();
        if let (Some(m), Some(r)) = (&membership, &remote) {
            // Loading goes on either way; /ready says when every expert has a host.
            if !m.wait_synced(opts.registry_wait) {
                tracing::warn!("etcd has not answered yet; waiting for workers");
            } else if !r.wait_for_coverage(opts.registry_wait) {
                let (l, e) = r.first_unreachable_expert().unwrap_or((0, 0));
                tracing::warn!(layer = l, expert = e, waited = ?opts.registry_wait, "not every expert has a registered host yet");
            }
        }
        Ok(Loaded {
            engine: Arc::new(engine),
            remote,
            counts,
            membership,
        })
    }
}
