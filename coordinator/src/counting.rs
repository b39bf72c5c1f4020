//! Per-(layer, expert) routed-token counts, whichever executor runs the experts: a thin
//! `ExpertExecutor` wrapper, so embedded and cluster modes report the same metric.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};
use switchyard_model::{ExpertExecutor, ExpertJob, LayerId, PendingExperts, RoutePlan};

/// Routed token-expert entries, `[layer * experts + expert]`.
#[derive(Debug)]
pub struct ExpertCounts {
    pub experts: usize,
    pub counts: Vec<AtomicU64>,
}

impl ExpertCounts {
    #[must_use]
    pub fn new(layers: usize, experts: usize) -> Self {
        Self {
            experts,
            counts: (0..layers * experts).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// Counts every plan's entries, then hands the batch to `inner`.
pub struct Counting {
    pub inner: Arc<dyn ExpertExecutor>,
    pub counts: Arc<ExpertCounts>,
}

impl ExpertExecutor for Counting {
    fn run(
        &self,
        layer: LayerId,
        x: &[f32],
        plan: &RoutePlan,
        out: &mut [f32],
    ) -> switchyard_model::Result<()> {
        self.count(layer, plan);
        self.inner.run(layer, x, plan, out)
    }

    fn overlaps(&self) -> bool {
        self.inner.overlaps()
    }

    fn submit(
        &self,
        layer: LayerId,
        job: ExpertJob,
    ) -> switchyard_model::Result<Box<dyn PendingExperts>> {
        self.count(layer, &job.plan);
        self.inner.submit(layer, job)
    }
}

impl Counting {
    fn count(&self, layer: LayerId, plan: &RoutePlan) {
        let base = layer.index() * self.counts.experts;
        for &e in plan.experts() {
            if let Some(c) = self.counts.counts.get(base + e as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
