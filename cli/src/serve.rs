//! `switchyard serve MODEL`: the OpenAI-compatible server.

use anyhow::Context;
use std::{net::SocketAddr, path::PathBuf, time::Duration};
use switchyard_coordinator::{
    membership::PlannerConfig,
    scheduler::SchedulerConfig,
    serve::{self, ServeConfig},
};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face checkpoint folder.
    #[arg(env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    #[arg(long, env = "SWITCHYARD_HOST", default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    #[arg(long, env = "SWITCHYARD_PORT", default_value_t = 8000)]
    port: u16,
    #[command(flatten)]
    cluster: crate::cluster::ClusterArgs,
    /// Name clients pass as `model` (default: the checkpoint folder's name).
    #[arg(long, env = "SWITCHYARD_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1 routes; several keys comma-separated or
    /// repeated.
    #[arg(
        long,
        env = "SWITCHYARD_API_KEY",
        hide_env_values = true,
        value_delimiter = ','
    )]
    api_key: Vec<String>,
    /// A file of API keys, one per line (e.g. a mounted Kubernetes Secret), beside --api-key.
    #[arg(long, env = "SWITCHYARD_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Tokens per engine step (decodes plus prompt chunks).
    #[arg(long, env = "SWITCHYARD_MAX_BATCH_TOKENS", default_value_t = 512)]
    max_batch_tokens: usize,
    /// Sequences decoding at once.
    #[arg(long, env = "SWITCHYARD_MAX_RUNNING", default_value_t = 64)]
    max_running: usize,
    /// Queued requests before answering 429.
    #[arg(long, env = "SWITCHYARD_MAX_WAITING", default_value_t = 256)]
    max_waiting: usize,
    /// KV-cache memory in MiB.
    #[arg(long, env = "SWITCHYARD_KV_CACHE_MIB", default_value_t = 1024)]
    kv_cache_mib: usize,
    /// Do not reuse the KV-cache blocks of earlier requests' identical prompt beginnings.
    #[arg(long, env = "SWITCHYARD_NO_PREFIX_CACHING")]
    no_prefix_caching: bool,
    /// How long a sequence may wait in the queue for its first step before it fails (503).
    #[arg(long, env = "SWITCHYARD_QUEUE_TIMEOUT", default_value = "2m", value_parser = humantime::parse_duration)]
    queue_timeout: Duration,
    /// How long a generation may take, queueing included, before it is answered with a 504
    /// (streaming: an error event) and cancelled.
    #[arg(long, env = "SWITCHYARD_REQUEST_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Largest request body in bytes.
    #[arg(long, env = "SWITCHYARD_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// How long a request's body may take to arrive before it is answered with a 408 and the
    /// connection closed (slow senders).
    #[arg(long, env = "SWITCHYARD_BODY_READ_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    body_read_timeout: Duration,
    /// Largest `n` (choices per request).
    #[arg(long, env = "SWITCHYARD_MAX_N", default_value_t = 8)]
    max_n: usize,
    /// How long in-flight requests may finish after SIGTERM.
    #[arg(long, env = "SWITCHYARD_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// How long a client may take to send a request's headers before the connection is
    /// dropped (slowloris).
    #[arg(long, env = "SWITCHYARD_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// API connections open at once; more wait to be accepted.
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Serve the API over TLS with this certificate chain (PEM, leaf first); it is re-read
    /// when the file changes.
    #[arg(long, env = "SWITCHYARD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, env = "SWITCHYARD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve /metrics on this port (same host, no key) instead of the API's port, where it
    /// needs an API key when keys are set.
    #[arg(long, env = "SWITCHYARD_METRICS_PORT")]
    metrics_port: Option<u16>,
    /// Write the bound address to this file once serving.
    #[arg(long, env = "SWITCHYARD_READY_FILE")]
    ready_file: Option<PathBuf>,
    /// With --etcd: do not campaign to run the placement planner.
    #[arg(long, env = "SWITCHYARD_NO_PLANNER")]
    no_planner: bool,
    /// Planner: replicas of every expert across managed workers.
    #[arg(long, env = "SWITCHYARD_REPLICATION", default_value_t = 1)]
    replication: usize,
    /// Planner: extra replicas handed to the most loaded experts.
    #[arg(long, env = "SWITCHYARD_HOT_REPLICAS", default_value_t = 2)]
    hot_replicas: usize,
    /// Planner: how often the measured load is reconsidered.
    #[arg(long, env = "SWITCHYARD_REBALANCE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    rebalance_interval: Duration,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = ServeConfig {
        model: a.model.clone(),
        served_model_name: a.served_model_name,
        listen: SocketAddr::new(a.host, a.port),
        experts: a.cluster.source((!a.no_planner).then(|| PlannerConfig {
            replication: a.replication.max(1),
            hot_replicas: a.hot_replicas,
            interval: a.rebalance_interval.max(Duration::from_secs(1)),
            ..PlannerConfig::default()
        }))?,
        load: a.cluster.load_options()?,
        scheduler: SchedulerConfig {
            max_batch_tokens: a.max_batch_tokens.max(1),
            max_running: a.max_running.max(1),
            max_waiting: a.max_waiting.max(1),
            queue_timeout: a.queue_timeout,
            kv_cache_bytes: a.kv_cache_mib << 20,
            prefix_caching: !a.no_prefix_caching,
            ..SchedulerConfig::default()
        },
        api_keys: api_keys(&a.api_key, a.api_key_file.as_deref())?,
        request_timeout: a.request_timeout,
        max_body_bytes: a.max_body_bytes,
        body_read_timeout: a.body_read_timeout,
        max_n: a.max_n.max(1),
        shutdown_grace: a.shutdown_grace,
        ready_file: a.ready_file,
        metrics_port: a.metrics_port,
        connections: switchyard_coordinator::http::ConnectionLimits {
            header_read_timeout: a.header_read_timeout,
            max_connections: a.max_connections.max(1),
        },
        tls: a.tls_cert.zip(a.tls_key),
    };
    tracing::info!(model = %cfg.model.display(), listen = %cfg.listen, api_key = !cfg.api_keys.is_open(), "starting");
    let loaded = serve::load(&cfg, &crate::progress::Bar::new("loading"))
        .with_context(|| format!("loading {}", a.model.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let stop = CancellationToken::new();
        tokio::spawn(crate::signals::cancel_on_signal(stop.clone()));
        serve::run(cfg, loaded, stop).await
    })?;
    Ok(())
}

/// The keys of `--api-key` and of `--api-key-file`'s lines.
fn api_keys(
    flags: &[String],
    file: Option<&std::path::Path>,
) -> anyhow::Result<switchyard_coordinator::api::ApiKeys> {
    let mut keys: Vec<String> = flags.to_vec();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --api-key-file {}", path.display()))?;
        keys.extend(text.lines().map(str::to_string));
    }
    let keys = switchyard_coordinator::api::ApiKeys::new(keys);
    anyhow::ensure!(
        file.is_none() || !keys.is_open(),
        "--api-key-file holds no key"
    );
    Ok(keys)
}
