//! The loopback workers `--local-workers` starts.

use super::{activations, deterministic, Args};
use anyhow::Context;
use std::time::Instant;

/// Worker processes on loopback, each with an even share of the experts; stopped on drop.
pub(crate) struct LocalWorkers {
    pub(super) children: Vec<std::process::Child>,
    pub(crate) spec: String,
    pub(super) dir: tempfile::TempDir,
}

impl LocalWorkers {
    /// The workers `--local-workers`, `--worker-threads` and `--replicate-experts` ask for.
    pub(super) fn for_args(a: &Args) -> anyhow::Result<Self> {
        let ck = switchyard_model::Checkpoint::open(&a.model)?;
        Self::start(
            &a.model,
            a.local_workers,
            ck.config().num_local_experts,
            a.worker_threads.unwrap_or(rayon::current_num_threads()),
            a.replicate_experts,
            a.cluster.quant.quantize,
        )
    }

    /// `n` workers of `threads` compute threads, each hosting every expert where `replicate`,
    /// an even share otherwise, quantized to `quantize` at load.
    pub(crate) fn start(
        model: &std::path::Path,
        n: usize,
        experts: usize,
        threads: usize,
        replicate: bool,
        quantize: Option<switchyard_model::QuantFormat>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            replicate || n <= experts,
            "{n} workers for {experts} experts"
        );
        anyhow::ensure!(threads >= 1, "--worker-threads must be at least 1");
        let exe = std::env::current_exe().context("finding the switchyard binary")?;
        let dir = tempfile::tempdir()?;
        let mut me = Self {
            children: Vec::new(),
            spec: String::new(),
            dir,
        };
        let mut parts = Vec::new();
        for i in 0..n {
            let (lo, hi) = if replicate {
                (0, experts - 1)
            } else {
                (i * experts / n, (i + 1) * experts / n - 1)
            };
            let ready = me.dir.path().join(format!("worker-{i}.addr"));
            let child = std::process::Command::new(&exe)
                .arg("--threads")
                .arg(threads.to_string())
                .arg("--cpu-activations")
                .arg(activations())
                .arg("--deterministic")
                .arg(deterministic())
                .args(["worker", "--listen", "127.0.0.1:0", "--experts"])
                .arg(format!("{lo}-{hi}"))
                .arg("--model")
                .arg(model)
                .arg("--ready-file")
                .arg(&ready)
                .args(quantize.map(|q| format!("--quantize={q}")))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .context("starting a worker")?;
            me.children.push(child);
            let deadline = Instant::now() + std::time::Duration::from_secs(120);
            let addr = loop {
                if let Ok(s) = std::fs::read_to_string(&ready) {
                    if !s.is_empty() {
                        break s;
                    }
                }
                if let Some(st) = me.children[i].try_wait()? {
                    anyhow::bail!("worker {i} exited while loading: {st}");
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "worker {i} not ready after 120 s"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            };
            parts.push(format!("{}={lo}-{hi}", addr.trim()));
        }
        me.spec = parts.join(",");
        Ok(me)
    }
}

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
