//! Options shared by every command that runs the model: embedded (default) or over workers.

use anyhow::Context;
use std::{path::Path, path::PathBuf, time::Duration};
use switchyard_cluster::StaticPlacement;
use switchyard_coordinator::{dispatch::DispatchConfig, Engine};
use switchyard_wire::WireDType;

#[derive(clap::Args, Clone, Debug)]
pub struct ClusterArgs {
    /// Expert workers as host:port=experts, comma-separated (e.g.
    /// 127.0.0.1:7001=0-3,127.0.0.1:7002=4-7). Without it or --placement, every expert runs in
    /// this process (embedded mode).
    #[arg(long, env = "SWITCHYARD_WORKERS", conflicts_with = "placement")]
    pub workers: Option<String>,
    /// A placement file: {"workers": [{"addr": "host:port", "experts": "0-3"}, ...]}.
    #[arg(long, env = "SWITCHYARD_PLACEMENT")]
    pub placement: Option<PathBuf>,
    /// Activation dtype on the wire: f32 (bit-exact with embedded mode) or bf16 (half the bytes).
    #[arg(long, env = "SWITCHYARD_WIRE_DTYPE", default_value = "f32")]
    pub wire_dtype: WireDType,
    /// Deadline of one expert batch call.
    #[arg(long, env = "SWITCHYARD_RPC_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub rpc_timeout: Duration,
}

/// An engine and, in cluster mode, its dispatcher (for statistics).
pub struct Loaded {
    pub engine: Engine,
    pub remote: Option<std::sync::Arc<switchyard_coordinator::dispatch::RemoteExperts>>,
}

impl Loaded {
    /// Logs per-worker dispatch counters (cluster mode only).
    pub fn log_dispatch_stats(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(remote) = &self.remote else { return };
        for (id, st) in remote.workers().iter().zip(&remote.stats().workers) {
            let calls = st.calls.load(Relaxed).max(1);
            tracing::info!(
                worker = %id,
                calls = st.calls.load(Relaxed),
                failures = st.failures.load(Relaxed),
                rows = st.rows.load(Relaxed),
                mean_latency_us = st.latency_micros.load(Relaxed) / calls,
                mean_compute_us = st.compute_micros.load(Relaxed) / calls,
                "dispatch"
            );
        }
    }
}

impl ClusterArgs {
    /// The static placement, if any was given.
    pub fn placement(&self) -> anyhow::Result<Option<StaticPlacement>> {
        Ok(match (&self.workers, &self.placement) {
            (Some(spec), _) => Some(StaticPlacement::parse(spec)?),
            (None, Some(path)) => Some(StaticPlacement::from_file(path)?),
            (None, None) => None,
        })
    }

    pub fn dispatch_config(&self) -> DispatchConfig {
        DispatchConfig {
            wire_dtype: self.wire_dtype,
            rpc_timeout: self.rpc_timeout,
            ..DispatchConfig::default()
        }
    }

    /// Loads `model` embedded or against the placement's workers.
    pub fn load(&self, model: &Path) -> anyhow::Result<Loaded> {
        let bar = crate::progress::Bar::new("loading");
        match self.placement()? {
            None => Ok(Loaded {
                engine: Engine::load_embedded(model, &bar)
                    .with_context(|| format!("loading {}", model.display()))?,
                remote: None,
            }),
            Some(p) => {
                let (engine, remote) =
                    Engine::load_cluster(model, &p, self.dispatch_config(), &bar).with_context(
                        || {
                            format!(
                                "loading {} over {} workers",
                                model.display(),
                                p.workers.len()
                            )
                        },
                    )?;
                Ok(Loaded {
                    engine,
                    remote: Some(remote),
                })
            }
        }
    }
}
