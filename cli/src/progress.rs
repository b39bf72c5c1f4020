//! Load progress on stderr (indicatif hides it when stderr is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};
use switchyard_model::LoadProgress;

/// A byte progress bar for checkpoint loads and writes.
pub struct Bar(ProgressBar);

impl Bar {
    pub fn new(label: &'static str) -> Self {
        let pb = ProgressBar::hidden();
        pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(label);
        Self(pb)
    }
}

impl LoadProgress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}
