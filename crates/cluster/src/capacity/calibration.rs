//! What `switchyard bench --calibrate` measured on one machine, per core: the costs the planner
//! builds its predictions from. Saved as JSON; the planner ships one such file (see
//! `docs/bench/calibration.json`) for when none is given.

use super::CapacityError;
use serde::{Deserialize, Serialize};

/// One machine's measured costs. Times are of one thread on one core.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Calibration {
    /// The CPU's model name, where known.
    pub cpu: String,
    /// The kernel signature it was measured with (`linear::signature`).
    pub kernels: String,
    /// The checkpoint it was measured on.
    pub model: String,
    /// One thread streaming a large buffer, bytes/s.
    pub read_bytes_per_s_core: f64,
    /// One SwiGLU expert, per weight format: ns per weight byte at each row count.
    pub expert: Vec<LinearCost>,
    /// The coordinator's per-layer work beyond its linears and KV reads (norms, RoPE, softmax,
    /// top-k, residuals): `fixed + per_token_hidden · tokens · hidden` ns.
    pub layer_fixed_ns: f64,
    pub layer_ns_per_token_hidden: f64,
    /// A step's work beyond its layers and LM head (embedding, sampling, bookkeeping):
    /// `fixed + per_token · tokens` ns.
    pub step_fixed_ns: f64,
    pub step_ns_per_token: f64,
    pub rpc: RpcCost,
}

/// One weight format's cost curve.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinearCost {
    /// `BF16`, `F32`, `F16`, `Q8_0`, `Q4_0`.
    pub dtype: String,
    /// Ascending row counts measured.
    pub rows: Vec<usize>,
    /// ns per weight byte at each of `rows`.
    pub ns_per_byte: Vec<f64>,
}

impl LinearCost {
    /// ns per weight byte at `rows`: interpolated between measured counts, extended along the
    /// last two points past the largest (compute grows with rows once weights stream no more).
    #[must_use]
    pub fn at(&self, rows: usize) -> f64 {
        let (r, t) = (&self.rows, &self.ns_per_byte);
        if r.is_empty() {
            return 0.0;
        }
        let x = rows.max(1) as f64;
        let i = r.partition_point(|&m| (m as f64) < x);
        let (a, b) = match i {
            0 => return t[0],
            i if i >= r.len() => {
                if r.len() < 2 {
                    return t[0];
                }
                (r.len() - 2, r.len() - 1)
            }
            i => (i - 1, i),
        };
        let (xa, xb) = (r[a] as f64, r[b] as f64);
        let v = t[a] + (t[b] - t[a]) * (x - xa) / (xb - xa);
        v.max(t[a].min(t[b]))
    }
}

/// What one expert call costs beyond its compute: CPU on each side and the latency left over.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RpcCost {
    /// The coordinator's CPU per call: `fixed + per_byte · bytes` (both ways) ns.
    pub coordinator_fixed_ns: f64,
    pub coordinator_ns_per_byte: f64,
    /// The worker's CPU per call beyond its experts.
    pub worker_fixed_ns: f64,
    pub worker_ns_per_byte: f64,
    /// Round-trip time not spent on either side's CPU (wake-ups, loopback), ns.
    pub latency_ns: f64,
}

impl Calibration {
    /// The cost curve of `dtype` (its `DType::as_str` spelling).
    #[must_use]
    pub fn curve(&self, dtype: &str) -> Option<&LinearCost> {
        self.expert
            .iter()
            .find(|c| c.dtype.eq_ignore_ascii_case(dtype))
    }

    /// Refuses a calibration the planner cannot read costs from (a file edited by hand, or
    /// from another version): every curve needs ascending row counts, one positive time each.
    pub fn check(&self) -> Result<(), CapacityError> {
        let bad = |why: String| Err(CapacityError::Spec(why));
        if !(self.read_bytes_per_s_core > 0.0 && self.read_bytes_per_s_core.is_finite()) {
            return bad("read_bytes_per_s_core must be a positive rate".into());
        }
        for c in &self.expert {
            if c.rows.is_empty()
                || c.rows.len() != c.ns_per_byte.len()
                || c.rows.windows(2).any(|w| w[0] >= w[1])
                || c.ns_per_byte.iter().any(|t| !(*t > 0.0 && t.is_finite()))
            {
                return bad(format!(
                    "the {} curve needs ascending row counts and one positive time per count",
                    c.dtype
                ));
            }
        }
        let rest = [
            self.layer_fixed_ns,
            self.layer_ns_per_token_hidden,
            self.step_fixed_ns,
            self.step_ns_per_token,
            self.rpc.coordinator_fixed_ns,
            self.rpc.coordinator_ns_per_byte,
            self.rpc.worker_fixed_ns,
            self.rpc.worker_ns_per_byte,
            self.rpc.latency_ns,
        ];
        if rest.iter().any(|t| !(*t >= 0.0 && t.is_finite())) {
            return bad("every overhead must be a time of zero or more".into());
        }
        Ok(())
    }

    /// The calibration shipped with switchyard: a 2-core AMD EPYC Zen 3 VM (2.45 GHz, AVX2, no
    /// AVX-512), on the performance checkpoint (`gen-model --dtype bf16`), 2026-12-07.
    #[must_use]
    pub fn builtin() -> Self {
        serde_json::from_str(include_str!("../../../../docs/bench/calibration.json"))
            .expect("the shipped calibration parses (checked by a test)")
    }
}

#[cfg(test)]
mod tests {
    use super::{Calibration, LinearCost};

    #[test]
    fn a_curve_interpolates_and_extends() {
        let c = LinearCost {
            dtype: "BF16".into(),
            rows: vec![1, 4, 16],
            ns_per_byte: vec![0.1, 0.1, 0.4],
        };
        assert_eq!(c.at(0), 0.1);
        assert_eq!(c.at(1), 0.1);
        assert!((c.at(10) - 0.25).abs() < 1e-12);
        assert!((c.at(28) - 0.7).abs() < 1e-12);
    }

    #[test]
    fn the_shipped_calibration_parses_and_covers_the_formats() {
        let c = Calibration::builtin();
        for d in ["BF16", "Q8_0", "Q4_0"] {
            let curve = c.curve(d).unwrap_or_else(|| panic!("{d}"));
            assert_eq!(curve.rows.len(), curve.ns_per_byte.len());
            assert!(curve.ns_per_byte.iter().all(|&t| t > 0.0));
        }
        assert!(c.read_bytes_per_s_core > 1e9);
        c.check().unwrap();
    }

    #[test]
    fn a_broken_calibration_is_refused_not_read_past_its_end() {
        let mut c = Calibration::builtin();
        c.expert[0].ns_per_byte.pop();
        assert!(c.check().unwrap_err().to_string().contains("ascending"));
        let mut c = Calibration::builtin();
        c.expert[0].rows.reverse();
        assert!(c.check().is_err());
        let mut c = Calibration::builtin();
        c.rpc.latency_ns = f64::NAN;
        assert!(c.check().is_err());
    }
}
