//! Coalescing: batches for the same layer that arrive together, from different coordinators or
//! streams, run as one expert call, so each expert's weights are read once for all of them.
//!
//! On CPU workers an expert batch of a few rows is bound by reading the expert's weights, and
//! several coordinators sharing a worker (data-parallel attention) each send such batches. Run
//! one by one, each reads every weight again; run together, one read serves them all, which is
//! where attention–FFN disaggregation gets its gain, but only for batches of the same layer:
//! coordinators that drift to different layers share nothing (docs/cluster.md has the
//! measurement; off by default until coordinators keep in phase).
//!
//! There is no timer. A batch that finds the expert stage idle leads: it yields once to the
//! runtime, so batches already received get decoded and join, then runs the oldest layer's
//! batches as one call. Batches that arrive while a call runs wait for it and then go together.
//! A leader computes one group and hands the lead to the oldest batch still waiting, so no
//! caller waits behind a stream of later arrivals.
//!
//! Results are unchanged: the deterministic kernels give a row the same bits in any call, and
//! every row's partial sum is its own.

use crate::WorkerError;
use std::sync::{Arc, Mutex, PoisonError};
use switchyard_model::{AnyBackend, LayerId, LocalExperts, RoutePlan};
use tokio::sync::oneshot;

/// One decoded batch waiting for its experts.
pub(crate) struct Job {
    pub layer: LayerId,
    pub x: Vec<f32>,
    pub plan: RoutePlan,
    /// The expert set it was validated against (a placement change swaps it whole).
    pub experts: Arc<LocalExperts<AnyBackend>>,
}

/// What one expert call computed for the batches in it.
pub(crate) struct Ran {
    /// This batch's rows × hidden partial sums.
    pub out: Vec<f32>,
    /// The whole call's compute time.
    pub micros: u64,
    /// Batches in the call, this one included.
    pub batches: usize,
}

enum Outcome {
    Done(Result<Ran, WorkerError>),
    /// Lead with this (the waiter's own) batch: the previous leader finished its group.
    Lead(Job),
}

struct Waiting {
    job: Job,
    tell: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct State {
    /// A leader is computing or about to.
    busy: bool,
    waiting: std::collections::VecDeque<Waiting>,
}

/// The queue in front of one worker's expert stage.
pub(crate) struct Coalescer {
    state: Mutex<State>,
    /// Off: every batch is its own call (`--coalesce off`, for comparisons).
    off: bool,
}

/// The lead, held while a batch computes its group; dropping it (at the end, or when the
/// leading call is cancelled) passes the lead on, so the queue never stalls.
struct Leading<'a>(&'a Coalescer);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.0.hand_on();
    }
}

impl Coalescer {
    pub(crate) fn new(on: bool) -> Self {
        Self {
            state: Mutex::default(),
            off: !on,
        }
    }

    /// Runs `job`, alone or together with batches of its layer that arrived with it.
    /// `compute` runs one call over the rows and plan of all batches in it, writing
    /// `rows × hidden` outputs, and returns them with the compute time in microseconds.
    pub(crate) async fn run<F, Fut>(
        &self,
        job: Job,
        hidden: usize,
        compute: F,
    ) -> Result<Ran, WorkerError>
    where
        F: Fn(Job) -> Fut,
        Fut: std::future::Future<Output = Result<(Vec<f32>, u64), WorkerError>>,
    {
        if self.off {
            return compute_group(job, Vec::new(), hidden, &compute).await;
        }
        let (tell, told) = oneshot::channel();
        let mine = {
            let mut s = self.lock();
            if s.busy {
                s.waiting.push_back(Waiting { job, tell });
                None
            } else {
                s.busy = true;
                Some(job)
            }
        };
        let job = match mine {
            Some(job) => job,
            None => match told.await {
                Ok(Outcome::Done(r)) => return r,
                Ok(Outcome::Lead(job)) => job,
                Err(_) => {
                    return Err(WorkerError::Compute(
                        "the batch's expert call ended without a result".into(),
                    ))
                }
            },
        };
        let _lead = Leading(self);
        // Let batches received with this one be decoded and join it.
        tokio::task::yield_now().await;
        let others = self.take_matching(&job);
        compute_group(job, others, hidden, &compute).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every waiting batch of `job`'s layer and expert set, in arrival order.
    fn take_matching(&self, job: &Job) -> Vec<Waiting> {
        let mut s = self.lock();
        let same = |w: &Waiting| {
            w.job.layer.index() == job.layer.index() && Arc::ptr_eq(&w.job.experts, &job.experts)
        };
        let (group, rest): (std::collections::VecDeque<_>, _) =
            std::mem::take(&mut s.waiting).into_iter().partition(same);
        s.waiting = rest;
        group.into()
    }

    /// Gives the lead to the oldest waiting batch, or marks the stage idle.
    fn hand_on(&self) {
        let mut s = self.lock();
        while let Some(next) = s.waiting.pop_front() {
            // A waiter whose call was cancelled cannot lead; its batch is dropped with it.
            if next.tell.send(Outcome::Lead(next.job)).is_ok() {
                return;
            }
        }
        s.busy = false;
    }
}

/// Runs `mine` and `others` as one call; sends the others their rows and returns `mine`'s.
async fn compute_group<F, Fut>(
    mine: Job,
    others: Vec<Waiting>,
    hidden: usize,
    compute: &F,
) -> Result<Ran, WorkerError>
where
    F: Fn(Job) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<f32>, u64), WorkerError>>,
{
    if others.is_empty() {
        let (out, micros) = compute(mine).await?;
        return Ok(Ran {
            out,
            micros,
            batches: 1,
        });
    }
    let batches = others.len() + 1;
    let mut rows = Vec::with_capacity(batches);
    let mut plan = RoutePlan::new();
    let jobs = std::iter::once(&mine).chain(others.iter().map(|w| &w.job));
    let mut x = Vec::with_capacity(jobs.clone().map(|j| j.x.len()).sum());
    for j in jobs {
        x.extend_from_slice(&j.x);
        for r in 0..j.plan.rows() {
            let (e, w) = (j.plan.row_experts(r), j.plan.row_weights(r));
            plan.push_row(e.iter().copied().zip(w.iter().copied()));
        }
        rows.push(j.plan.rows());
    }
    let merged = Job {
        layer: mine.layer,
        x,
        plan,
        experts: mine.experts.clone(),
    };
    let (mut out, micros) = match compute(merged).await {
        Ok(r) => r,
        Err(e) => {
            for w in others {
                let err = WorkerError::Compute(format!("in a coalesced expert call: {e}"));
                let _ = w.tell.send(Outcome::Done(Err(err)));
            }
            return Err(e);
        }
    };
    let mut at = rows[0];
    for (w, &n) in others.into_iter().zip(&rows[1..]) {
        let _ = w.tell.send(Outcome::Done(Ok(Ran {
            out: out[at * hidden..(at + n) * hidden].to_vec(),
            micros,
            batches,
        })));
        at += n;
    }
    // This batch's rows come first: the call's buffer, cut to them.
    out.truncate(rows[0] * hidden);
    Ok(Ran {
        out,
        micros,
        batches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use switchyard_model::{weights::gen, Checkpoint, Device, ExpertSet, NoProgress};

    fn runtime(threads: usize) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A random checkpoint of hidden 4 and `layers` layers, and all its experts.
    fn tiny(layers: usize) -> (tempfile::TempDir, Checkpoint, Arc<LocalExperts<AnyBackend>>) {
        let dir = tempfile::tempdir().unwrap();
        let spec = gen::GenSpec {
            hidden: 4,
            intermediate: 8,
            layers,
            heads: 2,
            kv_heads: 1,
            vocab: 300,
            ..gen::GenSpec::default()
        };
        gen::generate(&spec, dir.path(), &|_| {}).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        let backend = AnyBackend::new(Device::Cpu).unwrap();
        let experts = LocalExperts::load(&backend, &ck, &ExpertSet::all(8), &NoProgress).unwrap();
        (dir, ck, Arc::new(experts))
    }

    /// A layer-`l` job of `rows` rows whose values are `first`, `first + 1`, ...
    fn job(
        experts: &Arc<LocalExperts<AnyBackend>>,
        ck: &Checkpoint,
        l: usize,
        rows: usize,
        first: f32,
    ) -> Job {
        let mut plan = RoutePlan::new();
        for r in 0..rows {
            plan.push_row([(r as u16 % 8, 1.0)]);
        }
        Job {
            layer: LayerId::new(l, ck.config()).unwrap(),
            x: (0..rows * 4).map(|i| first + i as f32).collect(),
            plan,
            experts: experts.clone(),
        }
    }

    #[test]
    fn batches_arriving_during_a_call_run_together_and_get_their_own_rows() {
        let (_dir, ck, experts) = tiny(2);
        let rt = runtime(4);
        let co = Arc::new(Coalescer::new(true));
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        // A fake expert call: waits for the gate on the first call (so others queue behind
        // it), records its row count, and answers each row with its input doubled.
        let compute = {
            let calls = calls.clone();
            move |j: Job| {
                let calls = calls.clone();
                let mut gate = gate.clone();
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        while !*gate.borrow_and_update() {
                            gate.changed().await.unwrap();
                        }
                    }
                    Ok((j.x.iter().map(|v| v * 2.0).collect(), j.plan.rows() as u64))
                }
            }
        };
        rt.block_on(async {
            let run = |j: Job| {
                let (co, compute) = (co.clone(), compute.clone());
                tokio::spawn(async move { co.run(j, 4, compute).await })
            };
            let first = run(job(&experts, &ck, 0, 1, 0.0));
            while calls.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            // Three batches of layer 1 and one of layer 0 arrive while the first call runs.
            let b = run(job(&experts, &ck, 1, 2, 100.0));
            let c = run(job(&experts, &ck, 0, 3, 200.0));
            let d = run(job(&experts, &ck, 1, 1, 300.0));
            let e = run(job(&experts, &ck, 1, 2, 400.0));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            release.send(true).unwrap();
            let first = first.await.unwrap().unwrap();
            assert_eq!((first.batches, first.out), (1, vec![0.0, 2.0, 4.0, 6.0]));
            // The oldest waiting batch (b, layer 1) leads with d and e; then c alone.
            for (h, from, rows, batches) in [
                (b, 100.0, 2, 3),
                (d, 300.0, 1, 3),
                (e, 400.0, 2, 3),
                (c, 200.0, 3, 1),
            ] {
                let ran = h.await.unwrap().unwrap();
                let want: Vec<f32> = (0..rows * 4).map(|i| (from + i as f32) * 2.0).collect();
                assert_eq!(ran.out, want);
                assert_eq!(ran.batches, batches, "batch from {from}");
            }
        });
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "one call, then b+d+e, then c"
        );
        // Idle again: the next batch leads at once.
        let ran = rt
            .block_on(co.run(job(&experts, &ck, 0, 1, 7.0), 4, compute))
            .unwrap();
        assert_eq!(ran.batches, 1);
    }

    #[test]
    fn a_cancelled_leader_passes_the_lead_on() {
        let (_dir, ck, experts) = tiny(1);
        let rt = runtime(2);
        let co = Arc::new(Coalescer::new(true));
        rt.block_on(async {
            // A leader whose call never finishes, cancelled while a second batch waits.
            let hang = |_j: Job| async {
                std::future::pending::<Result<(Vec<f32>, u64), WorkerError>>().await
            };
            let co2 = co.clone();
            let j = job(&experts, &ck, 0, 1, 0.0);
            let leader = tokio::spawn(async move { co2.run(j, 4, hang).await });
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let co3 = co.clone();
            let j = job(&experts, &ck, 0, 1, 5.0);
            let waiter =
                tokio::spawn(
                    async move { co3.run(j, 4, |j: Job| async move { Ok((j.x, 1)) }).await },
                );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            leader.abort();
            let ran = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .expect("the waiter leads once the leader is gone")
                .unwrap()
                .unwrap();
            assert_eq!(ran.out, vec![5.0, 6.0, 7.0, 8.0]);
        });
    }
}
