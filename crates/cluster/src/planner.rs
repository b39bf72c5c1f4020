//! The placement planner: which managed worker should host which experts, for a replication
//! factor, the workers' memory, and the measured per-expert load.
//!
//! Like EPLB (DeepSeek's expert-parallel load balancer, used by vLLM and SGLang): every expert
//! gets its base replicas, then spare replica slots go one at a time to the expert with the most
//! load per replica, and replicas are packed onto workers heaviest first, each onto the worker
//! with the least load so far. A worker that already hosts an expert is preferred for it, so a
//! new plan moves as little as it can. Placement is per expert index, the same in every layer
//! (a worker's memory holds whole experts across layers), and load is summed over layers.

use std::collections::BTreeMap;

/// A worker the planner may assign experts to.
#[derive(Clone, Debug)]
pub struct PlanWorker {
    pub addr: String,
    /// How many experts (each in every layer) fit in its memory budget.
    pub capacity: usize,
    /// What it hosts now (kept where possible).
    pub current: Vec<u32>,
}

/// What the planner is asked.
#[derive(Clone, Debug)]
pub struct PlanInput<'a> {
    pub experts: usize,
    /// Replicas of every expert, counting fixed hosts.
    pub replication: usize,
    /// Extra replicas handed to the hottest experts (when load is known).
    pub hot_replicas: usize,
    pub workers: &'a [PlanWorker],
    /// Experts of workers started with `--experts`: replicas the planner cannot move.
    pub fixed: &'a [Vec<u32>],
    /// Measured load per expert (routed tokens per second, all layers); `None` before any.
    pub load: Option<&'a [f64]>,
}

/// The planner's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub assign: BTreeMap<String, Vec<u32>>,
    /// Total replicas per expert, fixed hosts included.
    pub replicas: Vec<usize>,
    /// Experts no worker hosts (capacity too small).
    pub uncovered: Vec<u32>,
}

/// Computes the desired assignment. Deterministic for a given input.
#[must_use]
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let d = Demand::of(input);
    let mut want = d.base_replicas(input);
    if d.measured {
        d.add_hot_replicas(input, &mut want);
    }
    let held = d.pack(input, &want);
    let mut total = d.fixed.clone();
    for h in &held {
        for &e in h {
            total[e as usize] += 1;
        }
    }
    let assign = input
        .workers
        .iter()
        .zip(held)
        .map(|(w, mut h)| {
            h.sort_unstable();
            (w.addr.clone(), h)
        })
        .collect();
    Plan {
        assign,
        uncovered: (0..d.experts)
            .filter(|&e| total[e] == 0)
            .map(|e| e as u32)
            .collect(),
        replicas: total,
    }
}

/// What the plan must serve: fixed replicas and load per expert, and each worker's room.
struct Demand {
    experts: usize,
    workers: usize,
    /// Replicas on workers the planner cannot move, per expert.
    fixed: Vec<usize>,
    /// Load per expert (1 each before any is measured).
    load: Vec<f64>,
    measured: bool,
    capacity: Vec<usize>,
}

impl Demand {
    fn of(input: &PlanInput<'_>) -> Self {
        let e_n = input.experts;
        let mut fixed = vec![0usize; e_n];
        for f in input.fixed {
            for &e in f {
                if let Some(c) = fixed.get_mut(e as usize) {
                    *c += 1;
                }
            }
        }
        let load: Vec<f64> = match input.load {
            Some(l) if l.len() == e_n && l.iter().any(|&x| x > 0.0) => l.to_vec(),
            _ => vec![1.0; e_n],
        };
        Self {
            experts: e_n,
            workers: input.workers.len(),
            fixed,
            load,
            measured: input.load.is_some_and(|l| l.iter().any(|&x| x > 0.0)),
            capacity: input.workers.iter().map(|w| w.capacity.min(e_n)).collect(),
        }
    }

    /// Base replicas from managed workers. With too little room, replicas of experts that keep
    /// another host are shed coldest first; then the coldest experts lose their managed host.
    fn base_replicas(&self, input: &PlanInput<'_>) -> Vec<usize> {
        let (e_n, w_n, load) = (self.experts, self.workers, &self.load);
        let total_cap: usize = self.capacity.iter().sum();
        let base = input.replication.max(1);
        let mut want: Vec<usize> = (0..e_n)
            .map(|e| base.saturating_sub(self.fixed[e]).min(w_n))
            .collect();
        while want.iter().sum::<usize>() > total_cap {
            let shed = (0..e_n)
                .filter(|&e| want[e] > 0 && self.fixed[e] + want[e] > 1)
                .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(b.cmp(&a)))
                .or_else(|| {
                    (0..e_n)
                        .filter(|&e| want[e] > 0)
                        .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(b.cmp(&a)))
                });
            match shed {
                Some(e) => want[e] -= 1,
                None => break,
            }
        }
        want
    }

    /// Spare slots go one at a time to the expert with the most load per replica.
    fn add_hot_replicas(&self, input: &PlanInput<'_>, want: &mut [usize]) {
        let total_cap: usize = self.capacity.iter().sum();
        let mut spare = total_cap.saturating_sub(want.iter().sum());
        for _ in 0..input.hot_replicas {
            if spare == 0 {
                break;
            }
            let hot = (0..self.experts)
                .filter(|&e| want[e] < self.workers)
                .max_by(|&a, &b| {
                    let ra = (self.fixed[a] + want[a]) as f64;
                    let rb = (self.fixed[b] + want[b]) as f64;
                    (self.load[a] / ra.max(1.0))
                        .total_cmp(&(self.load[b] / rb.max(1.0)))
                        .then(b.cmp(&a))
                });
            let Some(e) = hot else { break };
            want[e] += 1;
            spare -= 1;
        }
    }

    /// Packs the wanted replicas onto workers, heaviest first, each onto the worker with the
    /// least load so far (preferring one that hosts it already); before any load is measured,
    /// onto the block a static placement would give. Returns each worker's experts.
    fn pack(&self, input: &PlanInput<'_>, want: &[usize]) -> Vec<Vec<u32>> {
        let (e_n, w_n) = (self.experts, self.workers);
        let per_replica = |e: usize| self.load[e] / ((self.fixed[e] + want[e]).max(1) as f64);
        let mut replicas: Vec<(usize, usize)> = (0..e_n)
            .flat_map(|e| (0..want[e]).map(move |r| (r, e)))
            .collect();
        if self.measured {
            replicas.sort_by(|&(ra, a), &(rb, b)| {
                per_replica(b)
                    .total_cmp(&per_replica(a))
                    .then(a.cmp(&b))
                    .then(ra.cmp(&rb))
            });
        } else {
            replicas.sort();
        }
        let mean_load = self.load.iter().sum::<f64>() / (w_n.max(1) as f64);
        let mut left = self.capacity.clone();
        let mut w_load = vec![0.0f64; w_n];
        let mut held: Vec<Vec<u32>> = vec![Vec::new(); w_n];
        for (r, e) in replicas {
            let cur = |w: usize| input.workers[w].current.contains(&(e as u32));
            // Without measurements, the block a static placement would give (expert e on
            // worker e·W/E, replica r one further along), unless someone already hosts it.
            let home = (e * w_n / e_n.max(1) + r) % w_n.max(1);
            let best = (0..w_n)
                .filter(|&w| left[w] > 0 && !held[w].contains(&(e as u32)))
                .min_by(|&a, &b| {
                    let key = |w: usize| {
                        let sticky = if cur(w) { 0.25 * mean_load } else { 0.0 };
                        if self.measured {
                            (w_load[w] - sticky, 0usize)
                        } else {
                            (if cur(w) { 0.0 } else { 1.0 }, usize::from(w != home))
                        }
                    };
                    let (ka, kb) = (key(a), key(b));
                    ka.0.total_cmp(&kb.0).then(ka.1.cmp(&kb.1)).then(a.cmp(&b))
                });
            if let Some(w) = best {
                left[w] -= 1;
                w_load[w] += per_replica(e);
                held[w].push(e as u32);
            }
        }
        held
    }
}

/// The heaviest worker's share of `load` under `assign` (with `fixed` hosts), each expert's load
/// split evenly over its replicas: what rebalancing minimises.
#[must_use]
pub fn max_worker_load(
    experts: usize,
    assign: &BTreeMap<String, Vec<u32>>,
    fixed: &[Vec<u32>],
    load: &[f64],
) -> f64 {
    let mut count = vec![0usize; experts];
    for h in assign.values().chain(fixed) {
        for &e in h {
            if let Some(c) = count.get_mut(e as usize) {
                *c += 1;
            }
        }
    }
    let share = |e: u32| {
        let e = e as usize;
        load.get(e).copied().unwrap_or(0.0) / (count.get(e).copied().unwrap_or(1).max(1) as f64)
    };
    assign
        .values()
        .chain(fixed)
        .map(|h| h.iter().map(|&e| share(e)).sum::<f64>())
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(n: usize, cap: usize) -> Vec<PlanWorker> {
        (0..n)
            .map(|i| PlanWorker {
                addr: format!("w{i}"),
                capacity: cap,
                current: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn without_load_gives_blocks_and_covers_everything() {
        let ws = workers(2, 8);
        let p = plan(&PlanInput {
            experts: 8,
            replication: 1,
            hot_replicas: 2,
            workers: &ws,
            fixed: &[],
            load: None,
        });
        assert_eq!(p.assign["w0"], vec![0, 1, 2, 3]);
        assert_eq!(p.assign["w1"], vec![4, 5, 6, 7]);
        assert!(p.uncovered.is_empty());
        assert_eq!(p.replicas, vec![1; 8]);
    }

    #[test]
    fn hot_experts_get_replicas_and_are_spread() {
        let mut ws = workers(2, 5);
        ws[0].current = vec![0, 1, 2, 3];
        ws[1].current = vec![4, 5, 6, 7];
        let load = [100.0, 90.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let p = plan(&PlanInput {
            experts: 8,
            replication: 1,
            hot_replicas: 2,
            workers: &ws,
            fixed: &[],
            load: Some(&load),
        });
        assert_eq!(p.replicas[0], 2);
        assert_eq!(p.replicas[1], 2);
        for w in ["w0", "w1"] {
            assert!(
                p.assign[w].contains(&0) && p.assign[w].contains(&1),
                "{p:?}"
            );
            assert!(p.assign[w].len() <= 5);
        }
        let before: BTreeMap<String, Vec<u32>> = ws
            .iter()
            .map(|w| (w.addr.clone(), w.current.clone()))
            .collect();
        let (b, a) = (
            max_worker_load(8, &before, &[], &load),
            max_worker_load(8, &p.assign, &[], &load),
        );
        assert!(a < 0.6 * b, "before {b}, after {a}");
    }

    #[test]
    fn replication_and_capacity_limits() {
        // Replication 2 over 3 workers of capacity 6: 16 replicas in 18 slots.
        let ws = workers(3, 6);
        let p = plan(&PlanInput {
            experts: 8,
            replication: 2,
            hot_replicas: 0,
            workers: &ws,
            fixed: &[],
            load: None,
        });
        assert_eq!(p.replicas, vec![2; 8]);
        for h in p.assign.values() {
            assert!(h.len() <= 6);
            let mut d = h.clone();
            d.dedup();
            assert_eq!(&d, h, "a worker never holds two copies");
        }
        // Not enough room for everything: report what is left without a host.
        let ws = workers(1, 5);
        let p = plan(&PlanInput {
            experts: 8,
            replication: 1,
            hot_replicas: 0,
            workers: &ws,
            fixed: &[],
            load: None,
        });
        assert_eq!(p.uncovered.len(), 3);
        // Fixed hosts count towards replication.
        let ws = workers(1, 8);
        let p = plan(&PlanInput {
            experts: 8,
            replication: 1,
            hot_replicas: 0,
            workers: &ws,
            fixed: &[vec![0, 1, 2, 3]],
            load: None,
        });
        assert_eq!(p.assign["w0"], vec![4, 5, 6, 7]);
    }

    #[test]
    fn no_workers_no_panic() {
        let p = plan(&PlanInput {
            experts: 8,
            replication: 1,
            hot_replicas: 2,
            workers: &[],
            fixed: &[],
            load: Some(&[1.0; 8]),
        });
        assert_eq!(p.uncovered.len(), 8);
    }
}
