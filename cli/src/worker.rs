//! `switchyard worker`: host a subset of every layer's experts and serve expert batches.

use anyhow::Context;
use std::{net::SocketAddr, path::PathBuf, time::Duration};
use switchyard_model::Device;
use switchyard_worker::{Membership, WorkerConfig};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face checkpoint folder (only the hosted experts' bytes are read).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    /// Experts to host in every layer, e.g. 0-3 or 0,2,5-7 (default: all; with --etcd, what the
    /// planner assigns).
    #[arg(long, env = "SWITCHYARD_EXPERTS")]
    experts: Option<String>,
    /// Address to serve gRPC on (port 0 picks a free one; see --ready-file).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:7001")]
    listen: SocketAddr,
    /// cpu, or cuda:N on builds with CUDA.
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "cpu")]
    device: Device,
    /// Largest batch (rows) accepted in one call.
    #[arg(long, env = "SWITCHYARD_MAX_BATCH_ROWS", default_value_t = 8192)]
    max_batch_rows: usize,
    /// Batches computing or queued at once before refusing with RESOURCE_EXHAUSTED.
    #[arg(long, env = "SWITCHYARD_MAX_QUEUED_BATCHES", default_value_t = 64)]
    max_queued_batches: usize,
    /// Write the bound address to this file once serving.
    #[arg(long, env = "SWITCHYARD_READY_FILE")]
    ready_file: Option<PathBuf>,
    /// How long in-flight batches may take to finish on SIGTERM.
    #[arg(long, env = "SWITCHYARD_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    #[command(flatten)]
    registry: crate::cluster::RegistryArgs,
    /// Address coordinators dial, as registered in etcd (default: the bound address; required
    /// when listening on 0.0.0.0).
    #[arg(long, env = "SWITCHYARD_ADVERTISE", requires = "etcd")]
    advertise: Option<String>,
    /// Memory for expert weights the planner may fill, e.g. 8GiB (default: 90% of available).
    #[arg(long, env = "SWITCHYARD_MEMORY_BUDGET", value_parser = parse_bytes, requires = "etcd")]
    memory_budget: Option<u64>,
    /// Serve gRPC over TLS with this certificate (PEM; needs --tls-key).
    #[arg(long, env = "SWITCHYARD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, env = "SWITCHYARD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Accept only coordinators presenting a certificate signed by this CA (mutual TLS).
    #[arg(long, env = "SWITCHYARD_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Also serve grpc.health.v1 alone, in plaintext, on this address: for probes that cannot
    /// present a client certificate when --tls-client-ca requires one.
    #[arg(long, env = "SWITCHYARD_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
    /// Let batches of one layer (from several coordinators, or streams) share expert calls,
    /// reading each expert's weights once for all of them (on), or run every batch alone
    /// (off). No timer: batches queued together run together, and a batch that arrives while
    /// its layer's experts run joins the experts still to come. Results are bit-identical
    /// either way. Off by default: two coordinators on two CPU workers measured no throughput
    /// gain from it (docs/cluster.md).
    #[arg(long, env = "SWITCHYARD_COALESCE", default_value = "off", value_parser = ["on", "off"])]
    coalesce: String,
    #[command(flatten)]
    quant: crate::cluster::QuantArgs,
}

/// `123`, `512MiB`, `8GiB`, `2GB`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown size unit {u:?} (use B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    Ok((n * mult) as u64)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let membership = match a.registry.config()? {
        None => None,
        Some(registry) => {
            if a.advertise.is_none() && a.listen.ip().is_unspecified() {
                anyhow::bail!(
                    "--listen {} is not an address coordinators can dial: give --advertise HOST:PORT",
                    a.listen
                );
            }
            Some(Membership {
                registry,
                advertise: a.advertise.clone().unwrap_or_default(),
                memory_budget: a
                    .memory_budget
                    .unwrap_or_else(switchyard_worker::default_memory_budget),
                managed: a.experts.is_none(),
                load_interval: Duration::from_secs(2),
            })
        }
    };
    let cfg = WorkerConfig {
        model: a.model,
        experts: a.experts,
        listen: a.listen,
        device: a.device,
        max_batch_rows: a.max_batch_rows,
        max_queued_batches: a.max_queued_batches.max(1),
        ready_file: a.ready_file,
        shutdown_grace: a.shutdown_grace,
        membership,
        tls: match (a.tls_cert, a.tls_key) {
            (Some(cert), Some(key)) => Some(switchyard_worker::TlsFiles {
                cert,
                key,
                client_ca: a.tls_client_ca,
            }),
            _ => None,
        },
        quantize: a.quant.plan(),
        health_listen: a.health_listen,
        coalesce: a.coalesce == "on",
    };
    tracing::info!(?cfg, "worker starting");
    let server = switchyard_worker::load(&cfg, &crate::progress::Bar::new("loading experts"))
        .with_context(|| format!("loading {}", cfg.model.display()))?;
    let stop = CancellationToken::new();
    switchyard_worker::serve_on_pool(std::sync::Arc::new(server), &cfg, stop.clone(), |rt| {
        rt.spawn(crate::signals::cancel_on_signal(stop));
    })?;
    Ok(())
}
