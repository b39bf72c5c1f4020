//! What the registry stores, as JSON under `/switchyard/<cluster>/`:
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `workers/<addr>` | [`WorkerRecord`] | the worker's lease |
//! | `assignment` | [`PlanRecord`], the planner's desired assignment | permanent |
//! | `load/<coordinator>` | [`LoadRecord`], routed-token counters | the coordinator's lease |
//! | `election/…` | etcd election keys of the planner | the candidate's lease |
//!
//! JSON rather than protobuf so that `etcdctl get --prefix /switchyard/` is readable by an
//! operator; every field added later must have a default so older peers can read newer records.

use std::collections::BTreeMap;

/// Keys of one cluster.
#[derive(Clone, Debug)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// Keys of cluster `name` (letters, digits, `-`, `_`, `.`).
    pub fn new(name: &str) -> Result<Self, crate::ClusterError> {
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(crate::ClusterError::Spec(format!(
                "cluster name {name:?} must be non-empty letters, digits, '-', '_' or '.'"
            )));
        }
        Ok(Self {
            root: format!("/switchyard/{name}/"),
        })
    }
    #[must_use]
    pub fn workers(&self) -> String {
        format!("{}workers/", self.root)
    }
    #[must_use]
    pub fn worker(&self, id: &str) -> String {
        format!("{}workers/{id}", self.root)
    }
    #[must_use]
    pub fn plan(&self) -> String {
        format!("{}assignment", self.root)
    }
    #[must_use]
    pub fn loads(&self) -> String {
        format!("{}load/", self.root)
    }
    #[must_use]
    pub fn load(&self, coordinator: &str) -> String {
        format!("{}load/{coordinator}", self.root)
    }
    #[must_use]
    pub fn election(&self) -> String {
        format!("{}election", self.root)
    }
}

/// A live worker, as it registers itself.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkerRecord {
    /// The address coordinators dial; also the worker's key.
    pub addr: String,
    /// Differs between two processes that used the same address, so a restarted worker is a
    /// new member (fresh connection, no inherited failure back-off).
    pub instance: String,
    /// `hosted[layer]`: the experts served for that layer, ascending.
    pub hosted: Vec<Vec<u32>>,
    /// Takes its experts from the planner's [`PlanRecord`] (started without `--experts`).
    #[serde(default)]
    pub managed: bool,
    pub device: String,
    /// Bytes of expert weights this worker may hold (the planner's capacity).
    #[serde(default)]
    pub memory_budget_bytes: u64,
    /// Bytes of one expert in every layer (so capacity = budget / this).
    #[serde(default)]
    pub bytes_per_expert: u64,
    /// Bytes of expert weights held now.
    #[serde(default)]
    pub weight_bytes: u64,
    pub model_fingerprint: String,
    /// How the hosted experts are stored: bf16, f32, or a quantized format (q8_0, q4_0).
    #[serde(default)]
    pub weight_format: String,
    pub protocol_version: u32,
    #[serde(default)]
    pub worker_version: String,
    /// The CPU kernels it computes with (`WorkerInfo.kernels`); empty from older workers.
    #[serde(default)]
    pub kernels: String,
    #[serde(default)]
    pub load: WorkerLoad,
}

impl WorkerRecord {
    /// The experts hosted in every layer (the intersection over layers).
    #[must_use]
    pub fn experts_everywhere(&self) -> Vec<u32> {
        let mut it = self.hosted.iter();
        let Some(first) = it.next() else {
            return Vec::new();
        };
        let mut out = first.clone();
        for l in it {
            out.retain(|e| l.contains(e));
        }
        out
    }

    /// How many experts (all layers each) fit in the memory budget.
    #[must_use]
    pub fn capacity(&self, experts: usize) -> usize {
        if self.bytes_per_expert == 0 {
            return experts;
        }
        ((self.memory_budget_bytes / self.bytes_per_expert) as usize).min(experts)
    }
}

/// A worker's counters, refreshed every few seconds in its record.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkerLoad {
    pub batches_total: u64,
    pub rows_total: u64,
    pub busy_micros: u64,
    /// Rows per second over the last refresh interval.
    #[serde(default)]
    pub rows_per_sec: f64,
    /// Fraction of the last interval spent computing.
    #[serde(default)]
    pub busy_fraction: f64,
}

/// The planner's desired assignment: worker address → experts it should host in every layer.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlanRecord {
    /// Increases with every plan written.
    pub generation: u64,
    pub assign: BTreeMap<String, Vec<u32>>,
    /// The per-expert load (routed tokens per second, all layers) the plan was made for.
    #[serde(default)]
    pub expert_load: Vec<f64>,
    #[serde(default)]
    pub replication: usize,
    /// Who wrote it and why.
    #[serde(default)]
    pub written_by: String,
    #[serde(default)]
    pub reason: String,
}

/// A coordinator's routed-token counters, `[layer * experts + expert]`, since it started.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoadRecord {
    pub coordinator: String,
    pub experts: usize,
    pub expert_tokens: Vec<u64>,
    /// Milliseconds since the Unix epoch when the counters were read.
    pub unix_ms: u64,
}

impl LoadRecord {
    /// Tokens per expert index, summed over layers, for a model of `experts` experts per
    /// layer; None for a record of another shape (another model, or a hostile writer), checked
    /// before anything is allocated from its counts.
    #[must_use]
    pub fn per_expert(&self, experts: usize) -> Option<Vec<u64>> {
        let n = self.expert_tokens.len();
        if experts == 0 || self.experts != experts || !n.is_multiple_of(experts) {
            return None;
        }
        let mut out = vec![0u64; experts];
        for (i, &c) in self.expert_tokens.iter().enumerate() {
            out[i % experts] = out[i % experts].saturating_add(c);
        }
        Some(out)
    }
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_records_of_another_shape_are_refused_before_allocating() {
        let rec = |experts, tokens: Vec<u64>| LoadRecord {
            coordinator: "c".into(),
            experts,
            expert_tokens: tokens,
            unix_ms: 0,
        };
        assert_eq!(rec(2, vec![1, 2, 3, 4]).per_expert(2), Some(vec![4, 6]));
        assert_eq!(
            rec(2, vec![u64::MAX, 0, 5, 0]).per_expert(2),
            Some(vec![u64::MAX, 0])
        );
        // Another model's expert count, one the record does not hold, or a count that would
        // size a huge buffer: all refused.
        assert_eq!(rec(3, vec![1, 2, 3]).per_expert(2), None);
        assert_eq!(rec(2, vec![1, 2, 3]).per_expert(2), None);
        assert_eq!(rec(usize::MAX, vec![1]).per_expert(8), None);
        assert_eq!(rec(0, vec![]).per_expert(0), None);
    }

    #[test]
    fn keys_are_scoped_and_names_checked() {
        let k = Keys::new("prod-1").unwrap();
        assert_eq!(
            k.worker("10.0.0.1:7001"),
            "/switchyard/prod-1/workers/10.0.0.1:7001"
        );
        assert!(k.worker("a").starts_with(&k.workers()));
        assert!(Keys::new("").is_err());
        assert!(Keys::new("a/b").is_err());
    }

    #[test]
    fn old_records_without_new_fields_still_parse() {
        let r: WorkerRecord = serde_json::from_str(
            r#"{"addr":"h:1","instance":"x","hosted":[[0,1],[0,1,2]],"device":"cpu",
                "model_fingerprint":"fp","protocol_version":1}"#,
        )
        .unwrap();
        assert_eq!(r.experts_everywhere(), vec![0, 1]);
        assert_eq!(r.capacity(8), 8);
    }

    #[test]
    fn load_sums_over_layers() {
        let l = LoadRecord {
            experts: 2,
            expert_tokens: vec![1, 2, 3, 4],
            ..LoadRecord::default()
        };
        assert_eq!(l.per_expert(2), Some(vec![4, 6]));
    }
}

#[cfg(test)]
mod hostile {
    //! Records come from etcd, where anything that can write may put anything: whatever is
    //! stored, parsing and everything computed from a record (capacity, per-expert load, the
    //! planner's placement) stays in range and never panics.
    use super::*;
    use crate::planner::{self, PlanInput, PlanWorker};
    use proptest::prelude::*;

    fn worker_json() -> impl Strategy<Value = serde_json::Value> {
        (
            prop::collection::vec(prop::collection::vec(any::<u32>(), 0..10), 0..4),
            prop::collection::vec(0u32..10, 0..10),
            any::<bool>(),
            any::<u64>(),
            prop_oneof![Just(0u64), any::<u64>(), 1u64..1000],
            any::<bool>(),
        )
            .prop_map(|(hosted, small, managed, budget, per, use_small)| {
                let hosted = if use_small { vec![small] } else { hosted };
                serde_json::json!({
                    "addr": "10.0.0.1:7001", "instance": "i", "hosted": hosted, "managed": managed,
                    "device": "cpu", "memory_budget_bytes": budget, "bytes_per_expert": per,
                    "model_fingerprint": "f", "protocol_version": 1,
                })
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn any_bytes_in_the_workers_prefix_parse_or_are_skipped(
            raw in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut m = BTreeMap::new();
            m.insert("k".to_string(), raw);
            let _ = crate::registry::parse_workers(&m);
        }

        #[test]
        fn load_records_of_any_shape_are_checked_before_use(
            experts in any::<usize>(),
            tokens in prop::collection::vec(any::<u64>(), 0..64),
            asked in 0usize..16,
        ) {
            let r = LoadRecord { coordinator: "c".into(), experts, expert_tokens: tokens, unix_ms: 0 };
            if let Some(v) = r.per_expert(asked) {
                prop_assert_eq!(v.len(), asked);
            }
        }

        /// The planner fed with hostile worker records and load, as its round builds its input
        /// from etcd: every assignment names a real expert and fits the worker's capacity.
        #[test]
        fn the_planner_stays_in_range_whatever_the_records_say(
            records in prop::collection::vec(worker_json(), 0..6),
            experts in 1usize..12,
            replication in 0usize..4,
            hot in 0usize..4,
            load in prop::option::of(prop::collection::vec(
                prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), 0.0..100.0], 0..14)),
        ) {
            let records: Vec<WorkerRecord> = records
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    let mut r: WorkerRecord = serde_json::from_value(v).unwrap();
                    r.addr = format!("10.0.0.{i}:7001");
                    r
                })
                .collect();
            let managed: Vec<PlanWorker> = records
                .iter()
                .filter(|r| r.managed)
                .map(|r| PlanWorker { addr: r.addr.clone(), capacity: r.capacity(experts), current: r.experts_everywhere() })
                .collect();
            let fixed: Vec<Vec<u32>> = records.iter().filter(|r| !r.managed).map(WorkerRecord::experts_everywhere).collect();
            let plan = planner::plan(&PlanInput {
                experts,
                replication,
                hot_replicas: hot,
                workers: &managed,
                fixed: &fixed,
                load: load.as_deref(),
            });
            for w in &managed {
                let got = plan.assign.get(&w.addr).map_or(0, Vec::len);
                prop_assert!(got <= w.capacity, "{} experts on a worker of capacity {}", got, w.capacity);
            }
            for e in plan.assign.values().flatten().chain(&plan.uncovered) {
                prop_assert!((*e as usize) < experts, "expert {} of {}", e, experts);
            }
            prop_assert_eq!(plan.replicas.len(), experts);
        }
    }
}
