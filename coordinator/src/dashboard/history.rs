//! Samples of the coordinator's counters every [`EVERY`], kept for [`KEEP`]: every figure the
//! dashboard shows is a difference between two samples (routed tokens over the last minute,
//! rows per second, latency quantiles from histogram buckets), so nothing on the hot path
//! keeps windows of its own.

use super::prom::Exposition;
use crate::{api::AppState, dispatch::WorkerSnapshot, scheduler::SchedulerStats};
use std::{
    collections::VecDeque,
    sync::{atomic::Ordering::Relaxed, Arc, Mutex},
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;

/// Sampling period.
pub const EVERY: Duration = Duration::from_secs(2);
/// History kept (the sparklines' span).
pub const KEEP: Duration = Duration::from_secs(300);
/// The window of the heatmap and the workers' figures.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Trailing window of each sparkline point (smooths sparse latencies).
pub const POINT: Duration = Duration::from_secs(10);

/// One reading of every counter.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub unix_ms: u64,
    /// Routed tokens per (layer, expert) since start, `[layer * experts + expert]`.
    pub routed: Vec<u64>,
    pub workers: Vec<WorkerSnapshot>,
    pub sched: SchedulerStats,
    pub prom: Exposition,
}

/// The samples, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Arc<Sample>>>,
}

impl History {
    /// Takes a sample of `s` now and drops those older than [`KEEP`].
    pub fn sample(&self, s: &AppState) {
        crate::metrics::record_cluster(s);
        let sample = Arc::new(Sample {
            at: Instant::now(),
            unix_ms: switchyard_cluster::record::unix_ms(),
            routed: s
                .expert_counts
                .counts
                .iter()
                .map(|c| c.load(Relaxed))
                .collect(),
            workers: s.remote.as_ref().map(|r| r.snapshot()).unwrap_or_default(),
            sched: s.scheduler.stats(),
            prom: Exposition::parse(&s.metrics.render()),
        });
        let mut q = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        q.push_back(sample);
        while q.front().is_some_and(|f| f.at.elapsed() > KEEP + EVERY) {
            q.pop_front();
        }
    }

    /// The samples now, oldest first.
    #[must_use]
    pub fn samples(&self) -> Vec<Arc<Sample>> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// The newest sample at least `span` older than `of` (or the oldest there is).
#[must_use]
pub fn before<'a>(samples: &'a [Arc<Sample>], of: &Sample, span: Duration) -> Option<&'a Sample> {
    samples
        .iter()
        .rev()
        .find(|s| of.at.duration_since(s.at) >= span)
        .or_else(|| samples.first())
        .map(Arc::as_ref)
}

/// Samples `state` every [`EVERY`] until `stop`.
pub async fn run(state: Arc<AppState>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Rendering the exposition formats every series: keep it off the serving threads.
        let s = state.clone();
        if tokio::task::spawn_blocking(move || s.history.sample(&s))
            .await
            .is_err()
        {
            tracing::warn!("dashboard sampling failed");
        }
    }
}
