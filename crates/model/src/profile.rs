//! Where a step's time goes, per phase of the layer loop, for `switchyard bench`'s time split.
//! Off by default: each phase boundary then costs one relaxed atomic load.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Instant,
};

/// The phases of one layer, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Input norm, q/k/v projections, RoPE, cache write, attention, o projection, residual.
    Attention = 0,
    /// Post-attention norm, router projection and top-k.
    Router = 1,
    /// The expert stage as the layer loop sees it: local compute, or scatter, remote compute
    /// and gather.
    Experts = 2,
    /// Moving the weighted expert sum back and adding the residual.
    Combine = 3,
}

pub const PHASES: [(Phase, &str); 4] = [
    (Phase::Attention, "attention"),
    (Phase::Router, "router"),
    (Phase::Experts, "experts"),
    (Phase::Combine, "combine"),
];

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Starts (or stops) accumulating phase times, process-wide.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Zeroes the accumulated times.
pub fn reset() {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
}

/// Accumulated seconds per phase, in [`PHASES`] order.
#[must_use]
pub fn seconds() -> [f64; 4] {
    std::array::from_fn(|i| NANOS[i].load(Ordering::Relaxed) as f64 / 1e9)
}

/// Marks phase boundaries within one step.
pub(crate) struct Clock(Option<Instant>);

impl Clock {
    pub(crate) fn start() -> Self {
        Self(ENABLED.load(Ordering::Relaxed).then(Instant::now))
    }

    /// Charges the time since the last mark to `phase`.
    pub(crate) fn mark(&mut self, phase: Phase) {
        if let Some(t) = self.0 {
            let now = Instant::now();
            NANOS[phase as usize].fetch_add((now - t).as_nanos() as u64, Ordering::Relaxed);
            self.0 = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_charge_their_phase_only_when_enabled() {
        reset();
        let mut c = Clock::start();
        c.mark(Phase::Router);
        assert_eq!(seconds(), [0.0; 4], "disabled: nothing recorded");
        enable(true);
        let mut c = Clock::start();
        std::thread::sleep(std::time::Duration::from_millis(2));
        c.mark(Phase::Experts);
        enable(false);
        // Other tests' steps may have been timed in that window too; this one's share is there.
        assert!(seconds()[Phase::Experts as usize] >= 0.002);
        reset();
    }
}
