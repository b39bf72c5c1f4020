//! The bound decode is measured against: the bytes a token reads and the machine's read
//! bandwidth, sampled the way the decode kernels read weights.

use std::time::Instant;

/// Weight bytes one decoded token reads: every dense tensor once (the LM head included), one
/// embedding row instead of the table (unless tied: then the LM head reads it all), and
/// `experts_per_tok` experts in every layer; quantized bytes where `quantize` says.
pub(super) fn decode_bytes_per_token(
    model: &std::path::Path,
    quantize: switchyard_model::QuantPlan,
) -> anyhow::Result<u64> {
    use switchyard_model::{weights::names, Checkpoint, Cpu, ExpertSet, LocalExperts, Mixtral};
    let mut ck = Checkpoint::open(model)?;
    ck.set_quantize(quantize)?;
    let cfg = ck.config();
    let mut dense = Mixtral::<Cpu>::bytes_loaded(&ck);
    if !cfg.tie_word_embeddings {
        let table = ck.tensor_bytes(names::EMBED).unwrap_or(0);
        dense = dense - table + table / cfg.vocab_size.max(1) as u64;
    }
    // Every expert of a layer has the same size; expert 0 in every layer stands for any.
    let per_expert = LocalExperts::<Cpu>::bytes_loaded(
        &ck,
        &ExpertSet::from_indices(cfg.num_local_experts, [0]),
    );
    Ok(dense + cfg.num_experts_per_tok as u64 * per_expert)
}

/// Reads `mib` MiB (1 GiB by default) with every compute thread, summing it as the decode kernels read weights
/// (`linear::stream_sum`: their loads and prefetch): the bytes per second this machine's
/// threads stream from memory now. Allocated once, so a sample costs one pass (tens of ms).
pub(super) struct BandwidthProbe {
    buf: Vec<u64>,
}

impl BandwidthProbe {
    pub(super) fn new(mib: usize) -> Self {
        use rayon::prelude::*;
        let words = (mib << 20) / 8;
        Self {
            buf: (0..words as u64).into_par_iter().collect(),
        }
    }

    /// Bytes per second of the faster of two passes (the first may still be faulting in
    /// pages or competing with a run's last writes).
    pub(super) fn sample(&self) -> f64 {
        use rayon::prelude::*;
        let mut best = 0.0f64;
        for _ in 0..2 {
            let start = Instant::now();
            let sum = self
                .buf
                .par_chunks(1 << 16)
                .map(switchyard_model::backend::cpu::linear::stream_sum)
                .reduce(|| 0, u64::wrapping_add);
            let secs = start.elapsed().as_secs_f64();
            std::hint::black_box(sum);
            best = best.max((self.buf.len() * 8) as f64 / secs);
        }
        best
    }
}
