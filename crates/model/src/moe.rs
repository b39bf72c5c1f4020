//! Routing: router logits → top-k experts per token with renormalised weights, exactly as
//! transformers' `MixtralTopKRouter`; and `RoutePlan`, the unit the expert stage consumes.

use crate::{ModelError, Result};

/// For each token row, the experts it is routed to and their weights, in slot order (descending
/// router probability). Compressed rows, so a worker's share (some slots of some rows) is a
/// `RoutePlan` too.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoutePlan {
    /// `offsets[r]..offsets[r+1]` are row r's entries; `offsets.len() == rows + 1`.
    offsets: Vec<u32>,
    experts: Vec<u16>,
    weights: Vec<f32>,
}

impl RoutePlan {
    /// An empty plan with no rows.
    #[must_use]
    pub fn new() -> Self {
        Self {
            offsets: vec![0],
            experts: Vec::new(),
            weights: Vec::new(),
        }
    }

    /// Routes `rows` tokens from router logits `[rows, n_experts]` into `self`, reusing its
    /// buffers: `p = softmax(logits)` in f32, top-k of `p` (descending; on an exact tie the lower
    /// expert id first, as torch.topk on CPU), weights `p_i / Σ_topk p`.
    pub fn route_into(&mut self, logits: &[f32], rows: usize, n_experts: usize, k: usize) {
        self.clear();
        let mut p = [0f32; 256];
        let mut idx = [0u16; 256];
        for r in 0..rows {
            let l = &logits[r * n_experts..(r + 1) * n_experts];
            let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for (pi, li) in p.iter_mut().zip(l) {
                *pi = (li - max).exp();
                sum += *pi;
            }
            for pi in p.iter_mut().take(n_experts) {
                *pi /= sum;
            }
            for (i, v) in idx.iter_mut().enumerate().take(n_experts) {
                *v = i as u16;
            }
            // Stable sort by descending probability keeps lower ids first on ties.
            idx[..n_experts].sort_by(|a, b| p[*b as usize].total_cmp(&p[*a as usize]));
            let top_sum: f32 = idx[..k].iter().map(|&e| p[e as usize]).sum();
            for &e in &idx[..k] {
                self.experts.push(e);
                self.weights.push(p[e as usize] / top_sum);
            }
            self.offsets.push(self.experts.len() as u32);
        }
    }

    /// Refills the plan from `k` (expert, weight) pairs per row, already in slot order (a
    /// device router's output).
    pub fn fill_topk(&mut self, experts: &[u32], weights: &[f32], rows: usize, k: usize) {
        self.clear();
        for r in 0..rows {
            for i in r * k..(r + 1) * k {
                self.experts.push(experts[i] as u16);
                self.weights.push(weights[i]);
            }
            self.offsets.push(self.experts.len() as u32);
        }
    }

    /// Builds a plan from parts received from outside, validating every index.
    pub fn from_parts(
        offsets: Vec<u32>,
        experts: Vec<u16>,
        weights: Vec<f32>,
        n_experts: usize,
    ) -> Result<Self> {
        let bad = |m: String| Err(ModelError::Input(format!("route plan: {m}")));
        if offsets.first() != Some(&0) {
            return bad("offsets must start at 0".into());
        }
        if offsets.windows(2).any(|w| w[0] > w[1]) {
            return bad("offsets must not decrease".into());
        }
        if offsets.last().map(|&o| o as usize) != Some(experts.len())
            || experts.len() != weights.len()
        {
            return bad(format!(
                "{} experts and {} weights do not match the last offset {:?}",
                experts.len(),
                weights.len(),
                offsets.last()
            ));
        }
        if let Some(e) = experts.iter().find(|&&e| e as usize >= n_experts) {
            return bad(format!("expert {e} out of range (model has {n_experts})"));
        }
        if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
            return bad(format!("weight {w} is not finite"));
        }
        Ok(Self {
            offsets,
            experts,
            weights,
        })
    }

    /// Removes all rows, keeping the buffers.
    pub fn clear(&mut self) {
        self.offsets.clear();
        self.offsets.push(0);
        self.experts.clear();
        self.weights.clear();
    }

    /// Appends a row with the given (expert, weight) entries in slot order.
    pub fn push_row(&mut self, entries: impl IntoIterator<Item = (u16, f32)>) {
        for (e, w) in entries {
            self.experts.push(e);
            self.weights.push(w);
        }
        self.offsets.push(self.experts.len() as u32);
    }

    /// Number of token rows.
    #[must_use]
    pub fn rows(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Number of (row, expert) entries.
    #[must_use]
    pub fn entries(&self) -> usize {
        self.experts.len()
    }

    /// Entry range of row `r`.
    #[must_use]
    pub fn row_range(&self, r: usize) -> std::ops::Range<usize> {
        self.offsets[r] as usize..self.offsets[r + 1] as usize
    }

    /// Row `r`'s experts in slot order.
    #[must_use]
    pub fn row_experts(&self, r: usize) -> &[u16] {
        &self.experts[self.row_range(r)]
    }

    /// Row `r`'s weights in slot order.
    #[must_use]
    pub fn row_weights(&self, r: usize) -> &[f32] {
        &self.weights[self.row_range(r)]
    }

    /// All entry experts, row-major.
    #[must_use]
    pub fn experts(&self) -> &[u16] {
        &self.experts
    }

    /// All entry weights, row-major.
    #[must_use]
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// Row offsets (`rows + 1` values).
    #[must_use]
    pub fn offsets(&self) -> &[u32] {
        &self.offsets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_top2_renormalised_descending() {
        let logits = [0.1f32, 2.0, -1.0, 1.5, 0.0, 0.0, 0.0, 0.0];
        let mut plan = RoutePlan::new();
        plan.route_into(&logits, 1, 8, 2);
        assert_eq!(plan.row_experts(0), &[1, 3]);
        let w = plan.row_weights(0);
        // Renormalised top-2 equals a softmax over the two selected logits.
        let want = 1.0 / (1.0 + (1.5f32 - 2.0).exp());
        assert!((w[0] - want).abs() < 1e-6 && (w[0] + w[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn ties_prefer_lower_ids_and_k1_has_weight_one() {
        let mut plan = RoutePlan::new();
        plan.route_into(&[1.0, 3.0, 3.0, 0.0], 1, 4, 1);
        assert_eq!(plan.row_experts(0), &[1]);
        assert_eq!(plan.row_weights(0), &[1.0]);
    }

    #[test]
    fn from_parts_rejects_inconsistent_plans() {
        assert!(RoutePlan::from_parts(vec![0, 2], vec![1, 2], vec![0.5, 0.5], 8).is_ok());
        for (o, e, w) in [
            (vec![1, 2], vec![1, 2], vec![0.5, 0.5]),
            (vec![0, 3], vec![1, 2], vec![0.5, 0.5]),
            (vec![0, 2, 1], vec![1, 2], vec![0.5, 0.5]),
            (vec![0, 2], vec![1, 9], vec![0.5, 0.5]),
            (vec![0, 2], vec![1, 2], vec![0.5, f32::NAN]),
        ] {
            assert!(RoutePlan::from_parts(o, e, w, 8).is_err());
        }
    }
}
