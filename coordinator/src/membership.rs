//! The coordinator's side of the etcd registry: watch the live workers and hand every change
//! to the dispatcher; publish this coordinator's routed-token counters; and, when elected,
//! run the placement planner.
//!
//! All of it runs on a thread of its own with its own runtime, off the request path: an etcd
//! outage only freezes the membership at its last known state (the dispatcher keeps routing,
//! and still drops workers whose calls fail), and every loop reconnects by itself.

use crate::{counting::ExpertCounts, dispatch::RemoteExperts};
use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};
use switchyard_cluster::{
    planner::{self, PlanInput, PlanWorker},
    record::unix_ms,
    registry, LoadRecord, PlanRecord, Registry, RegistryConfig,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The planner's settings.
#[derive(Clone, Debug)]
pub struct PlannerConfig {
    /// Replicas of every expert.
    pub replication: usize,
    /// Extra replicas given to the hottest experts.
    pub hot_replicas: usize,
    /// How often the plan is reconsidered.
    pub interval: Duration,
    /// A new plan for the same workers is written only if it lowers the heaviest worker's load
    /// by at least this fraction (no churn on noise).
    pub min_gain: f64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            replication: 1,
            hot_replicas: 2,
            interval: Duration::from_secs(10),
            min_gain: 0.15,
        }
    }
}

/// How this coordinator takes part in the registry.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    pub registry: RegistryConfig,
    /// This coordinator's name (its load record's key and its election value).
    pub name: String,
    /// Campaign for the planner role (only coordinators that serve requests and so count load).
    pub planner: Option<PlannerConfig>,
}

/// The running membership thread; stops when dropped.
pub struct Membership {
    stop: CancellationToken,
    synced: watch::Receiver<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    view: Arc<RegistryView>,
}

/// What the registry says now, for the operator's view (`/v1/cluster`).
#[derive(Debug, Default)]
pub struct RegistryView {
    /// Registered workers by address.
    pub members: std::sync::RwLock<BTreeMap<String, switchyard_cluster::WorkerRecord>>,
    /// The planner's latest plan and what it changed.
    pub plan: std::sync::RwLock<Option<PlanChange>>,
}

/// A plan as this coordinator saw it arrive.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PlanChange {
    pub plan: PlanRecord,
    /// When this coordinator first saw this generation.
    pub seen_unix_ms: u64,
    /// What moved from the previous plan: `+3 10.0.0.1:7001` (expert 3 added there),
    /// `-5 10.0.0.2:7001` (dropped).
    pub moved: Vec<String>,
}

/// The experts added and dropped per worker from `old` to `new`.
fn moves(old: Option<&PlanRecord>, new: &PlanRecord) -> Vec<String> {
    let empty = BTreeMap::new();
    let before = old.map_or(&empty, |p| &p.assign);
    let mut out = Vec::new();
    let workers: std::collections::BTreeSet<&String> =
        before.keys().chain(new.assign.keys()).collect();
    for w in workers {
        let a = before.get(w).map(Vec::as_slice).unwrap_or_default();
        let b = new.assign.get(w).map(Vec::as_slice).unwrap_or_default();
        out.extend(
            b.iter()
                .filter(|e| !a.contains(e))
                .map(|e| format!("+{e} {w}")),
        );
        out.extend(
            a.iter()
                .filter(|e| !b.contains(e))
                .map(|e| format!("-{e} {w}")),
        );
    }
    out
}

impl Drop for Membership {
    /// Stops the loops and gives them a moment to revoke this coordinator's leases, so another
    /// coordinator takes the planner role at once instead of after the lease TTL.
    fn drop(&mut self) {
        self.stop.cancel();
        let deadline = Instant::now() + Duration::from_secs(2);
        if let Some(t) = self.thread.take() {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Membership {
    /// Starts watching (and, with `counts`, publishing load and planning). Returns at once.
    pub fn start(
        cfg: MembershipConfig,
        remote: Arc<RemoteExperts>,
        counts: Option<Arc<ExpertCounts>>,
    ) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let (synced_tx, synced) = watch::channel(false);
        let view = Arc::new(RegistryView::default());
        let shared = view.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let token = stop.clone();
        let thread = std::thread::Builder::new()
            .name("membership".into())
            .spawn(move || {
                rt.block_on(run(cfg, remote, counts, synced_tx, shared, token));
                // Let the spawned loops see the cancellation and revoke their leases.
                rt.block_on(tokio::time::sleep(Duration::from_millis(300)));
            })?;
        Ok(Self {
            stop,
            synced,
            thread: Some(thread),
            view,
        })
    }

    /// What the registry says now (members, the plan), kept up to date by the watch.
    #[must_use]
    pub fn view(&self) -> Arc<RegistryView> {
        self.view.clone()
    }

    /// Waits until the first membership snapshot has been applied, or `timeout`.
    pub fn wait_synced(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if *self.synced.borrow() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

async fn run(
    cfg: MembershipConfig,
    remote: Arc<RemoteExperts>,
    counts: Option<Arc<ExpertCounts>>,
    synced: watch::Sender<bool>,
    view: Arc<RegistryView>,
    stop: CancellationToken,
) {
    let keys = cfg.registry.keys().clone();
    let (members_tx, mut members_rx) = watch::channel(None);
    tokio::spawn(registry::watch_prefix(
        cfg.registry.clone(),
        keys.workers(),
        members_tx,
        stop.clone(),
    ));
    tokio::spawn(follow_plan(
        cfg.registry.clone(),
        view.clone(),
        stop.clone(),
    ));
    if let Some(counts) = counts {
        publish_load(&cfg, counts, remote.num_experts(), &stop);
    }
    // Records are re-put every few seconds with fresh load figures; only changes of who hosts
    // what rebuild the routing table.
    let mut applied: Option<Vec<switchyard_cluster::WorkerRecord>> = None;
    let mut last_missing = usize::MAX;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            r = members_rx.changed() => if r.is_err() { return },
        }
        let members = members_rx
            .borrow_and_update()
            .as_ref()
            .map(registry::parse_workers);
        let Some(members) = members else { continue };
        *view.members.write().unwrap_or_else(|e| e.into_inner()) = members.clone();
        let shape: Vec<_> = members
            .values()
            .map(|r| switchyard_cluster::WorkerRecord {
                load: switchyard_cluster::WorkerLoad::default(),
                ..r.clone()
            })
            .collect();
        if applied.as_ref() == Some(&shape) {
            continue;
        }
        let missing = remote.apply_members(&members);
        if missing.len() != last_missing && !missing.is_empty() {
            tracing::warn!(
                workers = members.len(),
                uncovered = missing.len(),
                "some (layer, expert) pairs have no registered host"
            );
        }
        last_missing = missing.len();
        applied = Some(shape);
        synced.send_replace(true);
    }
}

/// Keeps `view.plan` at the registry's plan, noting when each generation arrived and what it
/// moved.
async fn follow_plan(registry: RegistryConfig, view: Arc<RegistryView>, stop: CancellationToken) {
    let (tx, mut rx) = watch::channel(None);
    tokio::spawn(registry::watch_prefix(
        registry.clone(),
        registry.keys().plan(),
        tx,
        stop.clone(),
    ));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
        let plan: Option<PlanRecord> = rx
            .borrow_and_update()
            .as_ref()
            .and_then(|m| m.get(""))
            .and_then(|v| serde_json::from_slice(v).ok());
        let Some(plan) = plan else { continue };
        let mut slot = view.plan.write().unwrap_or_else(|e| e.into_inner());
        if slot
            .as_ref()
            .is_some_and(|c| c.plan.generation == plan.generation)
        {
            continue;
        }
        let moved = moves(slot.as_ref().map(|c| &c.plan), &plan);
        *slot = Some(PlanChange {
            plan,
            seen_unix_ms: unix_ms(),
            moved,
        });
    }
}

/// Publishes this coordinator's routed-token counts every second under a lease and, where it
/// may plan, campaigns for the planner role.
fn publish_load(
    cfg: &MembershipConfig,
    counts: Arc<ExpertCounts>,
    experts: usize,
    stop: &CancellationToken,
) {
    let keys = cfg.registry.keys().clone();
    let (load_tx, load_rx) = watch::channel(Vec::new());
    let publish = {
        let name = cfg.name.clone();
        let stop = stop.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let rec = LoadRecord {
                    coordinator: name.clone(),
                    experts: counts.experts,
                    expert_tokens: counts
                        .counts
                        .iter()
                        .map(|c| c.load(Ordering::Relaxed))
                        .collect(),
                    unix_ms: unix_ms(),
                };
                if let Ok(v) = serde_json::to_vec(&rec) {
                    load_tx.send_replace(v);
                }
            }
        }
    };
    tokio::spawn(publish);
    tokio::spawn(registry::keep_alive(
        cfg.registry.clone(),
        keys.load(&cfg.name),
        load_rx,
        stop.clone(),
    ));
    if let Some(pc) = cfg.planner.clone() {
        let name = cfg.name.clone();
        tokio::spawn(registry::lead(
            cfg.registry.clone(),
            cfg.name.clone(),
            stop.clone(),
            move |reg, lost| plan_loop(reg, pc.clone(), experts, name.clone(), lost),
        ));
    }
}

/// Per-expert token rates from successive load records, smoothed.
struct LoadTracker {
    last: BTreeMap<String, (u64, Vec<u64>)>,
    smoothed: Option<Vec<f64>>,
}

impl LoadTracker {
    fn update(&mut self, records: &[LoadRecord], experts: usize) -> Option<Vec<f64>> {
        let mut rate = vec![0.0f64; experts];
        let mut measured = false;
        for r in records {
            let Some(now) = r.per_expert(experts) else {
                continue;
            };
            if let Some((t0, before)) = self.last.get(&r.coordinator) {
                let dt = r.unix_ms.saturating_sub(*t0) as f64 / 1e3;
                if dt > 0.0 {
                    for (i, (&a, &b)) in now.iter().zip(before).enumerate() {
                        // A restarted coordinator's counters start again from zero.
                        rate[i] += a.saturating_sub(b) as f64 / dt;
                    }
                    measured = true;
                }
            }
            self.last.insert(r.coordinator.clone(), (r.unix_ms, now));
        }
        if !measured {
            return self.smoothed.clone();
        }
        let s = match self.smoothed.take() {
            Some(prev) => prev
                .iter()
                .zip(&rate)
                .map(|(p, r)| 0.5 * p + 0.5 * r)
                .collect(),
            None => rate,
        };
        self.smoothed = Some(s.clone());
        Some(s)
    }
}

/// The elected planner: every `interval`, recompute the assignment of the managed workers and
/// write it if the workers changed or it balances the measured load clearly better.
async fn plan_loop(
    mut reg: Registry,
    pc: PlannerConfig,
    experts: usize,
    name: String,
    lost: CancellationToken,
) {
    let mut planner = Planner {
        pc,
        experts,
        name,
        tracker: LoadTracker {
            last: BTreeMap::new(),
            smoothed: None,
        },
        last_round: Instant::now(),
    };
    planner.last_round -= planner.pc.interval;
    let mut tick = tokio::time::interval(planner.pc.interval.min(Duration::from_secs(1)));
    loop {
        tokio::select! {
            () = lost.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Membership changes are handled within a second; load changes every `interval`.
        if let Err(what) = planner.round(&mut reg).await {
            tracing::warn!(error = %what, "planner round failed");
        }
    }
}

/// The elected planner's state between rounds.
struct Planner {
    pc: PlannerConfig,
    experts: usize,
    name: String,
    tracker: LoadTracker,
    last_round: Instant,
}

impl Planner {
    /// One round: read the workers, the plan and (every `interval`) the load; write a new plan
    /// where [`Self::reason`] finds one.
    async fn round(&mut self, reg: &mut Registry) -> Result<(), String> {
        let experts = self.experts;
        let members = reg
            .workers()
            .await
            .map_err(|e| format!("cannot read the workers: {e}"))?;
        let current = reg
            .plan()
            .await
            .map_err(|e| format!("cannot read the plan: {e}"))?;
        let managed: Vec<PlanWorker> = members
            .values()
            .filter(|r| r.managed)
            .map(|r| PlanWorker {
                addr: r.addr.clone(),
                capacity: r.capacity(experts),
                current: r.experts_everywhere(),
            })
            .collect();
        let fixed: Vec<Vec<u32>> = members
            .values()
            .filter(|r| !r.managed)
            .map(switchyard_cluster::WorkerRecord::experts_everywhere)
            .collect();
        let load_round = self.last_round.elapsed() >= self.pc.interval;
        let load = self.load(reg, load_round).await;
        let plan = planner::plan(&PlanInput {
            experts,
            replication: self.pc.replication,
            hot_replicas: self.pc.hot_replicas,
            workers: &managed,
            fixed: &fixed,
            load: load.as_deref(),
        });
        let Some((generation, rev, reason)) = self.reason(
            current.as_ref(),
            &managed,
            &fixed,
            &plan,
            load.as_deref(),
            load_round,
        ) else {
            return Ok(());
        };
        let record = PlanRecord {
            generation,
            assign: plan.assign.clone(),
            expert_load: load.clone().unwrap_or_default(),
            replication: self.pc.replication,
            written_by: self.name.clone(),
            reason: reason.clone(),
        };
        match reg.put_plan_if(&record, rev).await {
            Ok(true) => {
                tracing::info!(generation, %reason, assign = ?record.assign, uncovered = ?plan.uncovered, "plan written");
            }
            Ok(false) => tracing::info!("the plan changed under the planner; recomputing"),
            Err(e) => return Err(format!("cannot write the plan: {e}")),
        }
        Ok(())
    }

    /// The smoothed load per expert, read afresh on a load round; None while idle (an idle
    /// cluster carries no signal worth moving weights for).
    async fn load(&mut self, reg: &mut Registry, load_round: bool) -> Option<Vec<f64>> {
        let load = if load_round {
            self.last_round = Instant::now();
            match reg.loads().await {
                Ok(l) => self.tracker.update(&l, self.experts),
                Err(e) => {
                    tracing::warn!(error = %e, "planner cannot read the load");
                    self.tracker.smoothed.clone()
                }
            }
        } else {
            self.tracker.smoothed.clone()
        };
        tracing::debug!(?load, load_round, "planning round");
        load.filter(|l| l.iter().sum::<f64>() >= 1.0)
    }

    /// Whether `plan` should replace `current`: (generation, revision to replace, why), or
    /// None to keep the current plan.
    fn reason(
        &self,
        current: Option<&(PlanRecord, i64)>,
        managed: &[PlanWorker],
        fixed: &[Vec<u32>],
        plan: &planner::Plan,
        load: Option<&[f64]>,
        load_round: bool,
    ) -> Option<(u64, i64, String)> {
        let experts = self.experts;
        let Some((p, rev)) = current else {
            return Some((1, 0, "first plan".to_string()));
        };
        let same_workers = p.assign.len() == managed.len()
            && managed.iter().all(|w| p.assign.contains_key(&w.addr));
        if !same_workers {
            return Some((p.generation + 1, *rev, "the managed workers changed".into()));
        }
        if uncovered(experts, &p.assign, fixed) > plan.uncovered.len() {
            return Some((
                p.generation + 1,
                *rev,
                "experts lost their fixed host".into(),
            ));
        }
        let l = load.filter(|_| load_round)?;
        if p.assign == plan.assign {
            return None;
        }
        let before = planner::max_worker_load(experts, &p.assign, fixed, l);
        let after = planner::max_worker_load(experts, &plan.assign, fixed, l);
        if after > (1.0 - self.pc.min_gain) * before {
            tracing::debug!(before, after, "the better plan does not gain enough");
            return None;
        }
        Some((
            p.generation + 1,
            *rev,
            format!("rebalance: heaviest worker {before:.0} → {after:.0} tokens/s"),
        ))
    }
}

/// Experts that neither `assign` nor `fixed` hosts.
fn uncovered(experts: usize, assign: &BTreeMap<String, Vec<u32>>, fixed: &[Vec<u32>]) -> usize {
    let mut hosted = vec![false; experts];
    for &e in assign.values().chain(fixed).flatten() {
        if let Some(h) = hosted.get_mut(e as usize) {
            *h = true;
        }
    }
    hosted.iter().filter(|h| !**h).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(coordinator: &str, unix_ms: u64, tokens: Vec<u64>) -> LoadRecord {
        LoadRecord {
            coordinator: coordinator.into(),
            experts: 2,
            expert_tokens: tokens,
            unix_ms,
        }
    }

    #[test]
    fn load_rates_sum_coordinators_smooth_and_survive_restarts() {
        let mut t = LoadTracker {
            last: BTreeMap::new(),
            smoothed: None,
        };
        // First sight of a coordinator: no rate yet.
        assert_eq!(t.update(&[rec("a", 1000, vec![0, 0, 0, 0])], 2), None);
        // One second later: layer counts summed per expert, 10 + 30 and 20 + 40 tokens/s.
        let r = t
            .update(&[rec("a", 2000, vec![10, 20, 30, 40])], 2)
            .unwrap();
        assert_eq!(r, vec![40.0, 60.0]);
        // A second coordinator joins (no rate from it yet); the first goes on; smoothing halves.
        let r = t
            .update(
                &[
                    rec("a", 3000, vec![10, 20, 30, 40]),
                    rec("b", 3000, vec![5, 5, 5, 5]),
                ],
                2,
            )
            .unwrap();
        assert_eq!(r, vec![20.0, 30.0]);
        // "a" restarted (counters back near zero): no negative rate.
        let r = t
            .update(
                &[
                    rec("a", 4000, vec![1, 1, 1, 1]),
                    rec("b", 4000, vec![5, 5, 5, 5]),
                ],
                2,
            )
            .unwrap();
        assert!(r.iter().all(|&x| x >= 0.0), "{r:?}");
        // Records of another model shape are ignored.
        assert_eq!(
            t.update(&[rec("c", 5000, vec![1; 6])], 3),
            t.smoothed.clone()
        );
    }

    #[test]
    fn uncovered_counts_experts_without_any_host() {
        let mut assign = BTreeMap::new();
        assign.insert("w".to_string(), vec![0, 1]);
        assert_eq!(uncovered(4, &assign, &[vec![3]]), 1);
        assert_eq!(uncovered(4, &BTreeMap::new(), &[]), 4);
    }
}
