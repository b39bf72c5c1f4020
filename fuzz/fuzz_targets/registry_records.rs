//! Records read from etcd, where anything that can write may put anything: worker records (as
//! coordinators and the planner read them) and coordinators' load records. Parsing, capacity,
//! per-expert load and the planner's placement stay in range.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use switchyard_cluster::{
    planner::{self, PlanInput, PlanWorker},
    registry::parse_workers,
    LoadRecord, WorkerRecord,
};

const EXPERTS: usize = 8;

fuzz_target!(|data: &[u8]| {
    // NUL-separated records: workers first, a load record last.
    let parts: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    let Some((&load, workers)) = parts.split_last() else {
        return;
    };
    let raw: BTreeMap<String, Vec<u8>> = workers
        .iter()
        .enumerate()
        .map(|(i, w)| (format!("10.0.0.{i}:7001"), w.to_vec()))
        .collect();
    let members = parse_workers(&raw);
    let managed: Vec<PlanWorker> = members
        .iter()
        .filter(|(_, r)| r.managed)
        .map(|(k, r)| PlanWorker {
            addr: k.clone(),
            capacity: r.capacity(EXPERTS),
            current: r.experts_everywhere(),
        })
        .collect();
    let fixed: Vec<Vec<u32>> = members
        .values()
        .filter(|r| !r.managed)
        .map(WorkerRecord::experts_everywhere)
        .collect();
    let per_expert = serde_json::from_slice::<LoadRecord>(load)
        .ok()
        .and_then(|l| l.per_expert(EXPERTS));
    if let Some(p) = &per_expert {
        assert_eq!(p.len(), EXPERTS);
    }
    let load: Option<Vec<f64>> = per_expert.map(|v| v.iter().map(|&x| x as f64).collect());
    let plan = planner::plan(&PlanInput {
        experts: EXPERTS,
        replication: 2,
        hot_replicas: 2,
        workers: &managed,
        fixed: &fixed,
        load: load.as_deref(),
    });
    for w in &managed {
        assert!(plan.assign.get(&w.addr).map_or(0, Vec::len) <= w.capacity);
    }
    assert!(plan
        .assign
        .values()
        .flatten()
        .chain(&plan.uncovered)
        .all(|&e| (e as usize) < EXPERTS));
});
