//! Options shared by every command that runs the model: embedded (default) or over workers.

use anyhow::Context;
use std::{path::Path, path::PathBuf, time::Duration};
use switchyard_cluster::{RegistryConfig, StaticPlacement};
use switchyard_coordinator::{
    dispatch::{DispatchConfig, RpcMode},
    membership::PlannerConfig,
    Engine, ExpertSource, LoadOptions, Loaded,
};
use switchyard_wire::WireDType;

#[derive(clap::Args, Clone, Debug)]
pub struct ClusterArgs {
    /// Expert workers as host:port=experts, comma-separated (e.g.
    /// 127.0.0.1:7001=0-3,127.0.0.1:7002=4-7). Without it or --placement, every expert runs in
    /// this process (embedded mode).
    #[arg(long, env = "SWITCHYARD_WORKERS", conflicts_with_all = ["placement", "etcd"])]
    pub workers: Option<String>,
    /// A placement file: {"workers": [{"addr": "host:port", "experts": "0-3"}, ...]}.
    #[arg(long, env = "SWITCHYARD_PLACEMENT", conflicts_with = "etcd")]
    pub placement: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Device for the dense layers (and, embedded, the experts): cpu or cuda:N (a build with
    /// `--features cuda`).
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "cpu")]
    pub device: switchyard_model::Device,
    /// KV-cache element type: f32 (attention within the reference's tolerances) or bf16 (half
    /// the memory, so twice the positions in --kv-cache-mib, and half the bytes decode
    /// attention reads; logits move by under 1 % of their range, greedy choices as f32's
    /// except near ties). CPU only for now.
    #[arg(long, env = "SWITCHYARD_KV_CACHE_DTYPE", default_value = "f32")]
    pub kv_cache_dtype: switchyard_model::KvDtype,
    /// Activation dtype on the wire: f32 (bit-exact with embedded mode, within the reference's
    /// tolerances) or bf16 (half the bytes, for slow links; logits move by up to ~2 on some
    /// shapes and greedy choices can flip near ties).
    #[arg(long, env = "SWITCHYARD_WIRE_DTYPE", default_value = "f32")]
    pub wire_dtype: WireDType,
    /// Dual-batch overlap: split steps of several sequences into two micro-batches and compute
    /// one's attention while the other's experts are on the workers (on, off). Worth it when
    /// workers are far away and the coordinator has cores to itself.
    #[arg(long, env = "SWITCHYARD_OVERLAP", default_value = "off", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub overlap: bool,
    /// How batches travel to each worker: stream (one long-lived gRPC stream per worker) or
    /// unary (one call per batch).
    #[arg(long, env = "SWITCHYARD_DISPATCH_RPC", default_value = "stream")]
    pub dispatch_rpc: RpcMode,
    /// Deadline of one expert batch call.
    #[arg(long, env = "SWITCHYARD_RPC_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub rpc_timeout: Duration,
    /// How long a request whose expert has no live worker waits for one to (re)appear before
    /// it fails (503 from the API).
    #[arg(long, env = "SWITCHYARD_EXPERT_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub expert_wait: Duration,
    /// Dial workers over TLS, trusting this CA (PEM).
    #[arg(long, env = "SWITCHYARD_WORKER_TLS_CA")]
    pub worker_tls_ca: Option<PathBuf>,
    /// Name every worker certificate carries (workers are dialled by address), or `@address`:
    /// each worker's certificate must name the address it registered (its IP or host name), so
    /// that one worker's certificate cannot serve under another's address.
    #[arg(
        long,
        env = "SWITCHYARD_WORKER_TLS_DOMAIN",
        default_value = "switchyard-worker"
    )]
    pub worker_tls_domain: String,
    /// This coordinator's certificate for workers that require one (mutual TLS; PEM).
    #[arg(long, env = "SWITCHYARD_WORKER_TLS_CERT", requires_all = ["worker_tls_key", "worker_tls_ca"])]
    pub worker_tls_cert: Option<PathBuf>,
    /// Private key of --worker-tls-cert (PEM).
    #[arg(long, env = "SWITCHYARD_WORKER_TLS_KEY", requires = "worker_tls_cert")]
    pub worker_tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub quant: QuantArgs,
}

/// Quantization at load, shared by every command that loads weights.
#[derive(clap::Args, Clone, Debug)]
pub struct QuantArgs {
    /// Quantize bf16/f16/f32 weights at load: q8_0 (half of bf16's bytes) or q4_0 (under a
    /// third): the experts, and with --quantize-attention the attention projections and an
    /// untied LM head. A checkpoint written by `switchyard quantize` needs no flag. Workers and
    /// their coordinators must agree (the model fingerprint includes it).
    #[arg(long, env = "SWITCHYARD_QUANTIZE")]
    pub quantize: Option<switchyard_model::QuantFormat>,
    /// With --quantize: also the attention projections and an untied LM head.
    #[arg(long, env = "SWITCHYARD_QUANTIZE_ATTENTION", requires = "quantize")]
    pub quantize_attention: bool,
}

impl QuantArgs {
    pub fn plan(&self) -> switchyard_model::QuantPlan {
        switchyard_model::QuantPlan {
            format: self.quantize,
            attention: self.quantize_attention,
        }
    }
}

pub(crate) fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        o => Err(format!("expected on or off, got {o:?}")),
    }
}

/// etcd membership, shared by workers, coordinators and `cluster status`.
#[derive(clap::Args, Clone, Debug)]
pub struct RegistryArgs {
    /// etcd endpoints, comma-separated (host:port or URL). Workers register there; coordinators
    /// watch it instead of taking --workers.
    #[arg(long, env = "SWITCHYARD_ETCD")]
    pub etcd: Option<String>,
    /// Cluster name: the key prefix /switchyard/NAME/ in etcd.
    #[arg(long, env = "SWITCHYARD_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// A member's record disappears this long after it stops renewing it (crash, partition).
    #[arg(long, env = "SWITCHYARD_LEASE_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// Dial etcd over TLS, trusting this CA (PEM); endpoints become https://.
    #[arg(long, env = "SWITCHYARD_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// This member's certificate for an etcd that requires client certificates
    /// (`--client-cert-auth`; PEM, needs --etcd-key and --etcd-ca).
    #[arg(long, env = "SWITCHYARD_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// Private key of --etcd-cert (PEM).
    #[arg(long, env = "SWITCHYARD_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl RegistryArgs {
    pub fn config(&self) -> anyhow::Result<Option<RegistryConfig>> {
        let Some(endpoints) = self.etcd.as_deref() else {
            return Ok(None);
        };
        let cfg = RegistryConfig::new(endpoints, &self.cluster, self.lease_ttl)?;
        let read = |p: &PathBuf| {
            std::fs::read(p).with_context(|| format!("reading etcd TLS file {}", p.display()))
        };
        let Some(ca) = &self.etcd_ca else {
            if !cfg.endpoints.iter().all(|e| is_loopback(e)) {
                tracing::warn!(
                    "etcd traffic is plaintext and unauthenticated: anyone who reaches etcd can \
                     register workers or rewrite the plan (--etcd-ca, --etcd-cert, --etcd-key)"
                );
            }
            return Ok(Some(cfg));
        };
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        Ok(Some(cfg.with_tls(switchyard_cluster::EtcdTls {
            ca_pem: read(ca)?,
            identity,
        })))
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

    /// Live membership settings, with `--etcd`.
    pub fn membership(
        &self,
        planner: Option<switchyard_coordinator::membership::PlannerConfig>,
    ) -> anyhow::Result<Option<switchyard_coordinator::membership::MembershipConfig>> {
        Ok(self.registry.config()?.map(|registry| {
            switchyard_coordinator::membership::MembershipConfig {
                registry,
                name: coordinator_name(),
                planner,
            }
        }))
    }

    pub fn dispatch_config(&self) -> anyhow::Result<DispatchConfig> {
        let read = |p: &PathBuf| {
            std::fs::read(p).with_context(|| format!("reading TLS file {}", p.display()))
        };
        let tls = match &self.worker_tls_ca {
            None => None,
            Some(ca) => Some(switchyard_coordinator::dispatch::ClientTls {
                ca_pem: read(ca)?,
                domain: self.worker_tls_domain.clone(),
                identity: match (&self.worker_tls_cert, &self.worker_tls_key) {
                    (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                    _ => None,
                },
            }),
        };
        Ok(DispatchConfig {
            tls,
            wire_dtype: self.wire_dtype,
            rpc_timeout: self.rpc_timeout,
            expert_wait: self.expert_wait,
            overlap: self.overlap,
            rpc: self.dispatch_rpc,
            ..DispatchConfig::default()
        })
    }

    /// Where the experts run: etcd with `--etcd`, else the static placement, else embedded.
    pub fn source(&self, planner: Option<PlannerConfig>) -> anyhow::Result<ExpertSource> {
        if let Some(m) = self.membership(planner)? {
            return Ok(ExpertSource::Registry(m));
        }
        Ok(match self.placement()? {
            Some(p) => ExpertSource::Static(p),
            None => ExpertSource::Embedded,
        })
    }

    /// Device, KV dtype and dispatch settings.
    pub fn load_options(&self) -> anyhow::Result<LoadOptions> {
        Ok(LoadOptions {
            device: self.device,
            kv_dtype: self.kv_cache_dtype,
            dispatch: self.dispatch_config()?,
            quantize: self.quant.plan(),
            ..LoadOptions::default()
        })
    }

    /// Loads `model` for a one-off command (no planner; waits up to a minute for an etcd
    /// cluster's workers).
    pub fn load(&self, model: &Path) -> anyhow::Result<Loaded> {
        let opts = LoadOptions {
            registry_wait: Duration::from_secs(60),
            ..self.load_options()?
        };
        let bar = crate::progress::Bar::new("loading");
        Engine::load(model, self.source(None)?, &opts, &bar)
            .with_context(|| format!("loading {}", model.display()))
    }
}

/// Whether an etcd endpoint URL names this machine.
fn is_loopback(endpoint: &str) -> bool {
    let host = endpoint.split("://").last().unwrap_or(endpoint);
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    matches!(host, "localhost" | "[::1]") || host.starts_with("127.")
}

/// This process's name in the registry: host name and process id.
fn coordinator_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "coordinator".into());
    format!("{host}-{}", std::process::id())
}
