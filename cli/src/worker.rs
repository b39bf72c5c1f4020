//! `switchyard worker`: host a subset of every layer's experts and serve expert batches.

use anyhow::Context;
use std::{net::SocketAddr, path::PathBuf, time::Duration};
use switchyard_model::Device;
use switchyard_worker::WorkerConfig;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face checkpoint folder (only the hosted experts' bytes are read).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    /// Experts to host in every layer, e.g. 0-3 or 0,2,5-7 (default: all).
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
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = WorkerConfig {
        model: a.model,
        experts: a.experts,
        listen: a.listen,
        device: a.device,
        max_batch_rows: a.max_batch_rows,
        max_queued_batches: a.max_queued_batches.max(1),
        ready_file: a.ready_file,
        shutdown_grace: a.shutdown_grace,
    };
    tracing::info!(?cfg, "worker starting");
    let server = switchyard_worker::load(&cfg, &crate::progress::Bar::new("loading experts"))
        .with_context(|| format!("loading {}", cfg.model.display()))?;
    let stop = CancellationToken::new();
    switchyard_worker::serve_on_pool(server, &cfg, stop.clone(), |rt| {
        rt.spawn(crate::signals::cancel_on_signal(stop));
    })?;
    Ok(())
}
