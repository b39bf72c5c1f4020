//! Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, seeded RNG,
//! the repetition / presence / frequency penalties of transformers and OpenAI, and OpenAI's
//! logit bias.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// Sampling parameters, in the ranges the coordinator's request validation allows (the one
/// place they are checked).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1.0 means no nucleus cut.
    pub top_p: f32,
    /// transformers' multiplicative penalty on tokens seen in prompt or output (1.0 = off).
    pub repetition_penalty: f32,
    /// OpenAI: subtracted once from tokens that appeared in the output (0 = off).
    pub presence_penalty: f32,
    /// OpenAI: subtracted per occurrence in the output (0 = off).
    pub frequency_penalty: f32,
    /// Drops tokens less likely than this fraction of the most likely one (0 = off), after
    /// the temperature, before top-p (as vLLM and llama.cpp).
    pub min_p: f32,
    /// OpenAI: added to these tokens' logits before anything else sees them.
    pub logit_bias: Vec<(u32, f32)>,
    /// RNG seed; `None` draws one.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            min_p: 0.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

/// Per-sequence sampler: owns the RNG and the output-token counts penalties need.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Occurrences of each token in the output so far.
    counts: HashMap<u32, u32>,
    /// Tokens of the prompt (for the repetition penalty).
    prompt: Vec<u32>,
    /// Reused candidate buffer.
    cand: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for one sequence with `prompt` already in context.
    #[must_use]
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let mut prompt = prompt.to_vec();
        prompt.sort_unstable();
        prompt.dedup();
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            counts: HashMap::new(),
            prompt,
            cand: Vec::new(),
        }
    }

    /// Applies the logit bias and the penalties to `logits` in place (what the choice and
    /// logprobs see).
    pub fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            let seen = self.prompt.iter().chain(self.counts.keys());
            for &t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
    }

    /// Picks the next token from (already penalised) logits and records it.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let id = if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        *self.counts.entry(id).or_default() += 1;
        id
    }

    /// Draws from softmax(logits / T) after the top-k and top-p cuts, sorting no more than a
    /// cut needs: with the whole vocabulary sorted every time, a token took 1.1-1.6 ms at
    /// 32,000 (a Zen 3 VM), 35-50 ms of a 32-sequence step whose forward pass takes ~190;
    /// `examples/bench_sampling` measures it (now 0.2 ms without a cut).
    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        self.cand.clear();
        self.cand.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        // Descending by logit; ids break ties so the order is reproducible.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < self.cand.len() {
            self.cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            self.cand.truncate(p.top_k);
            // Few enough to sort; the draw below then runs most likely first.
            self.cand.sort_unstable_by(by_logit);
        }
        let max = self.cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1));
        let mut sum = 0.0f64;
        for c in self.cand.iter_mut() {
            c.1 = (c.1 - max).exp();
            sum += c.1 as f64;
        }
        if p.min_p > 0.0 {
            // Probabilities relative to the most likely token's, which is exp(0) = 1.
            self.cand.retain(|c| c.1 >= p.min_p);
            sum = self.cand.iter().map(|c| c.1 as f64).sum();
        }
        if p.top_p < 1.0 {
            let keep = nucleus(&mut self.cand, sum, p.top_p as f64);
            self.cand.truncate(keep);
            sum = self.cand.iter().map(|c| c.1 as f64).sum();
        }
        let mut u = self.rng.random::<f64>() * sum;
        for c in &self.cand {
            u -= c.1 as f64;
            if u <= 0.0 {
                return c.0;
            }
        }
        self.cand.last().map_or(0, |c| c.0)
    }
}

/// Orders the most likely candidates of `cand` (id, unnormalised probability summing to
/// `sum`) first and returns how many of them it takes for their mass to reach `top_p`: the
/// prefix a full sort would give. One pass sums the mass per binary exponent, which says how
/// far down the nucleus reaches; only candidates from there up are sorted (a flat distribution
/// still sorts nearly all).
fn nucleus(cand: &mut [(u32, f32)], sum: f64, top_p: f64) -> usize {
    // Probabilities fall with logits, but underflow can tie distinct logits at 0; id order
    // breaks ties, as for the logits.
    let by_p = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    // The exponent orders non-negative floats as their values do, coarsely.
    let exponent = |p: f32| (p.to_bits() >> 23) as usize & 0xFF;
    let mut mass = [0f64; 256];
    for c in cand.iter() {
        mass[exponent(c.1)] += c.1 as f64;
    }
    let (mut acc, mut floor) = (0.0, 0);
    for e in (0..256).rev() {
        acc += mass[e];
        if acc >= top_p * sum {
            floor = e;
            break;
        }
    }
    let mut m = 0;
    for i in 0..cand.len() {
        if exponent(cand[i].1) >= floor {
            cand.swap(i, m);
            m += 1;
        }
    }
    // Every candidate left out is less likely than every one kept, so the sorted kept ones
    // are the full sort's first m.
    cand[..m].sort_unstable_by(by_p);
    let mut acc = 0.0f64;
    for (i, c) in cand[..m].iter().enumerate() {
        acc += c.1 as f64 / sum;
        if acc >= top_p {
            return i + 1;
        }
    }
    // The running sum fell an ulp short of the buckets' total: the rest, in order.
    cand[m..].sort_unstable_by(by_p);
    for (i, c) in cand.iter().enumerate().skip(m) {
        acc += c.1 as f64 / sum;
        if acc >= top_p {
            return i + 1;
        }
    }
    cand.len()
}

/// Index of the largest logit; the lowest index on ties (as torch.argmax).
#[must_use]
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax(logits)[i]` for every i, into `out`.
pub fn log_softmax(logits: &[f32], out: &mut Vec<f32>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits
        .iter()
        .map(|&l| ((l - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max;
    out.clear();
    out.extend(logits.iter().map(|&l| l - lse));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: usize, p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            seed: Some(seed),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams::default(), &[]);
        assert_eq!(s.sample(&[0.1, 3.0, 2.9]), 1);
    }

    #[test]
    fn seed_reproduces_and_top_k_restricts() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 3, 1.0, seed), &[]);
            (0..40).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        let mut top3: Vec<u32> = (0..50).collect();
        top3.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        let allowed = &top3[..3];
        assert!(run(7).iter().all(|t| allowed.contains(t)));
        assert!(
            run(7)
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 1
        );
    }

    #[test]
    fn nucleus_takes_the_prefix_a_full_sort_gives() {
        // Logits with many ties (97 values) and vocabularies from under one selection (64)
        // to several growths of it.
        for (n, top_p, seed) in [
            (10, 0.5, 1u64),
            (1000, 0.9, 2),
            (5000, 0.99, 3),
            (3000, 0.3, 4),
        ] {
            let logits: Vec<f32> = (0..n as u64)
                .map(|i| ((i * 2_654_435_761 + seed) % 97) as f32 / 9.0)
                .collect();
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
            let cand: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, (l - max).exp()))
                .collect();
            let sum: f64 = cand.iter().map(|c| c.1 as f64).sum();
            let mut full = cand.clone();
            full.sort_by(|a, b| {
                logits[b.0 as usize]
                    .total_cmp(&logits[a.0 as usize])
                    .then(a.0.cmp(&b.0))
            });
            let mut acc = 0.0;
            let want = full
                .iter()
                .position(|c| {
                    acc += c.1 as f64 / sum;
                    acc >= top_p
                })
                .map_or(n, |i| i + 1);
            let mut got = cand.clone();
            let k = nucleus(&mut got, sum, top_p);
            assert_eq!(k, want, "n {n} top_p {top_p}");
            let ids = |v: &[(u32, f32)]| v.iter().map(|c| c.0).collect::<Vec<_>>();
            assert_eq!(ids(&got[..k]), ids(&full[..k]), "n {n} top_p {top_p}");
        }
    }

    #[test]
    fn unfiltered_sampling_follows_the_softmax() {
        // p = 1/6, 2/6, 3/6; 6,000 seeded draws land within 2.5 points of each.
        let logits = [0.0, 2f32.ln(), 3f32.ln()];
        let mut s = Sampler::new(params(1.0, 0, 1.0, 5), &[]);
        let mut counts = [0usize; 3];
        for _ in 0..6000 {
            counts[s.sample(&logits) as usize] += 1;
        }
        for (c, want) in counts.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            let got = *c as f64 / 6000.0;
            assert!((got - want).abs() < 0.025, "{counts:?}");
        }
    }

    #[test]
    fn min_p_drops_tokens_below_its_share_of_the_most_likely() {
        // p ∝ 1, 2, 4, 8: relative to the top 1/8, 1/4, 1/2, 1. min_p 0.3 keeps the last two,
        // in the proportion 1 : 2.
        let logits = [0.0, 2f32.ln(), 4f32.ln(), 8f32.ln()];
        let mut s = Sampler::new(
            SamplingParams {
                min_p: 0.3,
                ..params(1.0, 0, 1.0, 9)
            },
            &[],
        );
        let mut counts = [0usize; 4];
        for _ in 0..6000 {
            counts[s.sample(&logits) as usize] += 1;
        }
        assert_eq!(counts[..2], [0, 0], "{counts:?}");
        let share = counts[3] as f64 / 6000.0;
        assert!((share - 2.0 / 3.0).abs() < 0.025, "{counts:?}");
        // min_p 1 keeps only the most likely: greedy.
        let mut s = Sampler::new(
            SamplingParams {
                min_p: 1.0,
                ..params(1.5, 0, 1.0, 9)
            },
            &[],
        );
        assert!((0..50).all(|_| s.sample(&logits) == 3));
    }

    #[test]
    fn logit_bias_moves_the_choice() {
        let p = SamplingParams {
            logit_bias: vec![(0, 100.0), (2, -100.0), (7, 5.0)],
            ..Default::default()
        };
        let mut s = Sampler::new(p, &[]);
        let mut logits = [1.0, 2.0, 3.0];
        s.apply_penalties(&mut logits);
        assert_eq!(
            logits,
            [101.0, 2.0, -97.0],
            "ids past the vocabulary are ignored"
        );
        assert_eq!(s.sample(&logits), 0);
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let mut s = Sampler::new(params(1.0, 0, 1e-6, 1), &[]);
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 5.0, 4.0]), 1);
        }
    }

    #[test]
    fn penalties_change_logits_as_documented() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                presence_penalty: 0.5,
                frequency_penalty: 0.25,
                ..Default::default()
            },
            &[0],
        );
        s.sample(&[0.0, 1.0, 0.0]); // records token 1
        s.counts.insert(1, 2);
        let mut l = vec![2.0, 4.0, -1.0];
        s.apply_penalties(&mut l);
        assert_eq!(l[0], 1.0); // prompt token, positive logit divided
        assert_eq!(l[1], 4.0 / 2.0 - 0.5 - 0.25 * 2.0);
        assert_eq!(l[2], -1.0);
    }

    #[test]
    fn log_softmax_normalises() {
        let mut out = Vec::new();
        log_softmax(&[1.0, 2.0, 3.0], &mut out);
        let s: f32 = out.iter().map(|v| v.exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
    }
}
