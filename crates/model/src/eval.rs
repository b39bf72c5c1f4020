//! Perplexity over a text, as llama.cpp's `llama-perplexity` measures it, and the divergence of
//! one model's next-token distributions from another's (a quantized model from its original).
//!
//! The tokens are cut into chunks of `ctx`; each chunk starts with the BOS token and is run as
//! one prefill, and only its second half is scored (each scored token then sees at least
//! `ctx / 2` tokens of context).

use crate::{
    backend::Backend, Checkpoint, ExpertSet, KvCache, KvDtype, LocalExperts, Logits, Mixtral,
    ModelError, NoProgress, Result, SeqKv, SeqStep, StepOutput, StepScratch,
};

/// A model loaded whole in this process, for scoring.
pub struct Scorer<B: Backend> {
    backend: B,
    model: Mixtral<B>,
    experts: LocalExperts<B>,
}

impl<B: Backend + Clone> Scorer<B> {
    /// Loads every weight of `ck` (quantized as `ck` says) onto `backend`.
    pub fn load(backend: B, ck: &Checkpoint) -> Result<Self> {
        let all = ExpertSet::all(ck.config().num_local_experts);
        Ok(Self {
            model: Mixtral::load(backend.clone(), ck, &NoProgress)?,
            experts: LocalExperts::load(&backend, ck, &all, &NoProgress)?,
            backend,
        })
    }

    /// Logits `[ids.len(), vocab]` of every position, one prefill.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let block = 16;
        let mut kv = KvCache::new(
            &self.backend,
            self.model.config(),
            block,
            ids.len().div_ceil(block) + 1,
            KvDtype::F32,
        )?;
        let mut seq = SeqKv::default();
        let mut scratch = StepScratch::new(&self.backend)?;
        let mut out = StepOutput::new(Logits::All);
        let mut steps = [SeqStep {
            tokens: ids,
            kv: &mut seq,
        }];
        self.model
            .step(&mut steps, &mut kv, &self.experts, &mut scratch, &mut out)?;
        Ok(out.logits)
    }
}

/// Perplexity with its standard error, and optionally the divergence from a reference model.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PerplexityReport {
    pub ctx: usize,
    pub chunks: usize,
    pub tokens_scored: usize,
    /// Mean negative log-likelihood, nats per token.
    pub nll: f64,
    pub perplexity: f64,
    /// One standard error of the perplexity (delta method over the per-token NLLs).
    pub perplexity_stderr: f64,
    /// Against the reference: mean KL(reference ‖ model) per token, its standard error, and
    /// the share of positions whose most likely token is the same.
    pub kl_divergence: Option<f64>,
    pub kl_divergence_stderr: Option<f64>,
    pub top1_agreement: Option<f64>,
}

/// Scores `tokens` with `model` in chunks of `ctx` (at most `max_chunks` of them), and against
/// `reference` where given.
pub fn perplexity<B: Backend + Clone>(
    model: &Scorer<B>,
    reference: Option<&Scorer<B>>,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    max_chunks: Option<usize>,
    mut on_chunk: impl FnMut(usize, usize, f64),
) -> Result<PerplexityReport> {
    if ctx < 4 {
        return Err(ModelError::Input(format!(
            "perplexity: --ctx {ctx} is under 4"
        )));
    }
    let max_pos = model.model.config().max_position_embeddings;
    if ctx > max_pos {
        return Err(ModelError::Input(format!(
            "perplexity: --ctx {ctx} exceeds the model's {max_pos} positions"
        )));
    }
    let mut chunks = tokens.len() / ctx;
    if let Some(m) = max_chunks {
        chunks = chunks.min(m);
    }
    if chunks == 0 {
        return Err(ModelError::Input(format!(
            "perplexity: the text has {} tokens, fewer than one chunk of {ctx}",
            tokens.len()
        )));
    }
    let vocab = model.model.config().vocab_size;
    let first = ctx / 2;
    let (mut nll, mut nll2, mut n) = (0f64, 0f64, 0usize);
    let (mut kl, mut kl2, mut agree) = (0f64, 0f64, 0usize);
    for c in 0..chunks {
        let mut ids = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(b) = bos {
            ids[0] = b;
        }
        let logits = model.logits(&ids)?;
        let ref_logits = reference.map(|r| r.logits(&ids)).transpose()?;
        for j in first..ctx - 1 {
            let row = &logits[j * vocab..(j + 1) * vocab];
            let lp = log_softmax(row);
            let v = -lp[ids[j + 1] as usize];
            nll += v;
            nll2 += v * v;
            n += 1;
            if let Some(r) = &ref_logits {
                let rp = log_softmax(&r[j * vocab..(j + 1) * vocab]);
                let d: f64 = rp
                    .iter()
                    .zip(&lp)
                    .map(|(&a, &b)| if a > -700.0 { a.exp() * (a - b) } else { 0.0 })
                    .sum();
                kl += d;
                kl2 += d * d;
                agree += usize::from(argmax(&rp) == argmax(&lp));
            }
        }
        on_chunk(c + 1, chunks, (nll / n as f64).exp());
    }
    let nf = n as f64;
    let mean = nll / nf;
    let var = (nll2 / nf - mean * mean).max(0.0) * nf / (nf - 1.0).max(1.0);
    let ppl = mean.exp();
    let with_ref = reference.is_some();
    let kl_mean = kl / nf;
    let kl_var = (kl2 / nf - kl_mean * kl_mean).max(0.0) * nf / (nf - 1.0).max(1.0);
    Ok(PerplexityReport {
        ctx,
        chunks,
        tokens_scored: n,
        nll: mean,
        perplexity: ppl,
        perplexity_stderr: ppl * (var / nf).sqrt(),
        kl_divergence: with_ref.then_some(kl_mean),
        kl_divergence_stderr: with_ref.then(|| (kl_var / nf).sqrt()),
        top1_agreement: with_ref.then(|| agree as f64 / nf),
    })
}

/// `log softmax(x)` in f64.
fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(x: &[f64]) -> usize {
    x.iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |m, (i, &v)| if v > m.1 { (i, v) } else { m },
        )
        .0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cpu, QuantFormat, QuantPlan, Tokenizer};

    fn text_tokens(dir: &std::path::Path) -> Vec<u32> {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/perplexity.txt"),
        )
        .unwrap();
        Tokenizer::from_dir(dir)
            .unwrap()
            .encode(&text, false)
            .unwrap()
    }

    /// The trained fixture on the shipped text: a perplexity near its held-out figure, q8_0 at
    /// most 1 % above the original and q4_0 at most 10 % (the bounds), measured on two
    /// chunks to keep the test short (`switchyard perplexity` measures the whole text).
    #[test]
    fn quantized_perplexity_stays_near_the_original() {
        let dir = crate::tests::fixtures().join("tiny-mixtral-trained");
        let tokens = text_tokens(&dir);
        let ck = Checkpoint::open(&dir).unwrap();
        let bos = ck.config().bos_token_id;
        let float = Scorer::load(Cpu, &ck).unwrap();
        let base = perplexity(&float, None, &tokens, 128, bos, Some(16), |_, _, _| {}).unwrap();
        // Far below the vocabulary (4096), as a trained model on text like its corpus.
        assert!(base.perplexity > 2.0 && base.perplexity < 200.0, "{base:?}");
        for (format, bound) in [(QuantFormat::Q8_0, 1.01), (QuantFormat::Q4_0, 1.10)] {
            let mut q = Checkpoint::open(&dir).unwrap();
            q.set_quantize(QuantPlan::experts(format)).unwrap();
            let qs = Scorer::load(Cpu, &q).unwrap();
            let r =
                perplexity(&qs, Some(&float), &tokens, 128, bos, Some(16), |_, _, _| {}).unwrap();
            eprintln!(
                "{format}: {:.3} against {:.3}, {r:?}",
                r.perplexity, base.perplexity
            );
            assert!(
                r.perplexity <= base.perplexity * bound,
                "{format}: {r:?} against {base:?}"
            );
            assert!(r.kl_divergence.unwrap() >= 0.0);
            assert!(r.top1_agreement.unwrap() > 0.8, "{format}: {r:?}");
        }
    }

    #[test]
    fn too_short_a_text_is_an_error() {
        let dir = crate::tests::fixtures().join("tiny-mixtral");
        let ck = Checkpoint::open(&dir).unwrap();
        let s = Scorer::load(Cpu, &ck).unwrap();
        assert!(perplexity(&s, None, &[1, 2, 3], 64, None, None, |_, _, _| {}).is_err());
        assert!(perplexity(&s, None, &[1; 100], 2, None, None, |_, _, _| {}).is_err());
    }
}
