//! Coalescing: batches for the same layer from different coordinators or streams share expert
//! calls, so each expert's weights are read once for all of them.
//!
//! On CPU workers an expert batch of a few rows is bound by reading the expert's weights, and
//! several coordinators sharing a worker (data-parallel attention) each send such batches. Run
//! one by one, each reads every weight again; run together, one read serves them all, which is
//! where attention–FFN disaggregation gets its gain, but only for batches of the same layer:
//! coordinators that drift to different layers share nothing.
//!
//! There is no timer. Batches queue in arrival order; one driver task at a time works the queue.
//! It yields once to the runtime, so batches already received get decoded, then takes the oldest
//! batch with every waiting batch of its layer as a group and runs the group's experts in parts,
//! as many experts at a time as run side by side, yielding to the runtime between parts. A batch
//! of that layer that arrives while the oldest batch's experts run joins the group: it shares
//! the parts still to come, and the experts it missed run after them. Each batch is answered as
//! soon as its own experts are done, so joining never delays a batch already in the group by
//! more than the extra rows in its parts. Batches of other layers wait at most for the group
//! that was running when they arrived.
//!
//! Results are unchanged: an entry's expert output has the same bits in any call, and each row
//! sums its entries in plan order once all are done.

use crate::WorkerError;
use std::{
    collections::VecDeque,
    future::Future,
    sync::{Arc, Mutex, PoisonError},
};
use switchyard_model::{combine_entries, AnyBackend, LayerId, LocalExperts, RoutePlan};
use tokio::sync::oneshot;

/// One decoded batch waiting for its experts.
pub(crate) struct Job {
    pub layer: LayerId,
    pub x: Vec<f32>,
    pub plan: RoutePlan,
    /// The expert set it was validated against (a placement change swaps it whole).
    pub experts: Arc<LocalExperts<AnyBackend>>,
}

/// What one expert call answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Each row's weighted sum, `rows × hidden` (as `ExpertExecutor::run`): a whole batch.
    Rows,
    /// Each entry's unweighted output, `entries × hidden` (as [`LocalExperts::run_entries`]):
    /// one part of a group, summed once the batch's every part is done.
    Entries,
}

/// What the expert stage computed for one batch.
pub(crate) struct Ran {
    /// This batch's rows × hidden partial sums.
    pub out: Vec<f32>,
    /// Compute time of the parts this batch waited through.
    pub micros: u64,
    /// The most batches that shared one of its parts, this one included (1: it ran alone).
    pub batches: usize,
    /// This batch counts as an expert call: it opened its group (one per group, however many
    /// batches that served), or shared none of its parts with another batch.
    pub own_call: bool,
    /// This batch joined a group whose experts had started running, and shared a part.
    pub joined: bool,
}

struct Waiting {
    job: Job,
    tell: oneshot::Sender<Result<Ran, WorkerError>>,
}

#[derive(Default)]
struct State {
    /// A driver task is working the queue.
    driving: bool,
    waiting: VecDeque<Waiting>,
}

/// The queue in front of one worker's expert stage.
pub(crate) struct Coalescer {
    state: Arc<Mutex<State>>,
    /// Off: every batch is one call of all its experts (`--coalesce off`, for comparisons).
    off: bool,
    /// Experts per part; by default as many as the backend runs side by side.
    width: Option<usize>,
}

impl Coalescer {
    pub(crate) fn new(on: bool) -> Self {
        Self {
            state: Arc::default(),
            off: !on,
            width: None,
        }
    }

    /// Runs `job`'s experts, alone or in a group with batches of its layer. `compute` runs the
    /// given rows' experts as one call, answering as [`Answer`] asks, with its time in µs.
    pub(crate) async fn run<F, Fut>(
        &self,
        job: Job,
        hidden: usize,
        compute: F,
    ) -> Result<Ran, WorkerError>
    where
        F: Fn(Job, Answer) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(Vec<f32>, u64), WorkerError>> + Send + 'static,
    {
        if self.off || job.plan.entries() == 0 {
            // One call of all its experts (a batch of no entries sums to zero rows there).
            let (out, micros) = compute(job, Answer::Rows).await?;
            return Ok(Ran {
                out,
                micros,
                batches: 1,
                own_call: true,
                joined: false,
            });
        }
        let (tell, told) = oneshot::channel();
        let start = {
            let mut s = lock(&self.state);
            s.waiting.push_back(Waiting { job, tell });
            !std::mem::replace(&mut s.driving, true)
        };
        if start {
            let driver = Driver {
                state: self.state.clone(),
                hidden,
                width: self.width,
                finished: false,
            };
            tokio::spawn(driver.drive(compute));
        }
        told.await.unwrap_or_else(|_| {
            Err(WorkerError::Compute(
                "the expert stage stopped before answering the batch".into(),
            ))
        })
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The one task working the queue; while it lives, `driving` is set.
struct Driver {
    state: Arc<Mutex<State>>,
    hidden: usize,
    width: Option<usize>,
    /// Set when the queue ran empty and the stage was marked idle.
    finished: bool,
}

impl Driver {
    async fn drive<F, Fut>(mut self, compute: F)
    where
        F: Fn(Job, Answer) -> Fut,
        Fut: Future<Output = Result<(Vec<f32>, u64), WorkerError>>,
    {
        loop {
            // Let batches received with the last ones be decoded and queue.
            tokio::task::yield_now().await;
            let Some(mut group) = self.next_group() else {
                self.finished = true;
                return;
            };
            while let Some(Part { job, at }) = group.next_part() {
                let leader_running = group.leader_pending();
                match compute(job, Answer::Entries).await {
                    Ok((ys, micros)) => {
                        for (tell, ran) in group.scatter(&at, &ys, micros) {
                            // The receiver is gone only if that call was cancelled.
                            let _ = tell.send(Ok(ran));
                        }
                    }
                    Err(e) => {
                        group.fail(e);
                        break;
                    }
                }
                if leader_running {
                    // Batches of this layer that arrived during the leader's experts join.
                    tokio::task::yield_now().await;
                    let joiners = self.take_matching(group.layer, &group.experts);
                    group.absorb(joiners, true);
                }
            }
        }
    }

    /// The oldest waiting batch and every waiting batch of its layer, or `None` (and the stage
    /// marked idle) when none waits.
    fn next_group(&self) -> Option<Group> {
        let mut s = lock(&self.state);
        // A batch whose caller has gone (cancelled, or past its deadline) is not computed.
        s.waiting.retain(|w| !w.tell.is_closed());
        let Some(first) = s.waiting.pop_front() else {
            s.driving = false;
            return None;
        };
        drop(s);
        let width = self
            .width
            .unwrap_or_else(|| first.job.experts.side_by_side());
        let mut group = Group::open(first, self.hidden, width);
        let others = self.take_matching(group.layer, &group.experts);
        group.absorb(others, false);
        Some(group)
    }

    /// Every waiting batch of `layer` and `experts`, in arrival order.
    fn take_matching(
        &self,
        layer: LayerId,
        experts: &Arc<LocalExperts<AnyBackend>>,
    ) -> Vec<Waiting> {
        let mut s = lock(&self.state);
        s.waiting.retain(|w| !w.tell.is_closed());
        let same = |w: &Waiting| {
            w.job.layer.index() == layer.index() && Arc::ptr_eq(&w.job.experts, experts)
        };
        let (group, rest): (VecDeque<_>, _) =
            std::mem::take(&mut s.waiting).into_iter().partition(same);
        s.waiting = rest;
        group.into()
    }
}

impl Drop for Driver {
    /// A driver that ends before its queue ran empty (a panic in a kernel, or the runtime
    /// shutting down) marks the stage idle and refuses the batches still waiting, rather than
    /// leave them, and every later batch, hanging.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut s = lock(&self.state);
        s.driving = false;
        for w in s.waiting.drain(..) {
            let _ = w.tell.send(Err(WorkerError::Compute(
                "the expert stage stopped before answering the batch".into(),
            )));
        }
    }
}

/// One batch of a group and how far its entries are.
struct Member {
    job: Job,
    /// `entries × hidden` expert outputs, filled part by part.
    ys: Vec<f32>,
    /// Entries whose expert has not run for this batch yet.
    pending: Vec<bool>,
    left: usize,
    /// Where to answer; taken when answered.
    tell: Option<oneshot::Sender<Result<Ran, WorkerError>>>,
    joined: bool,
    /// The most batches one of its parts served.
    with: usize,
    micros: u64,
}

/// One part to run: a batch of rows gathered from the members, and for each of its entries the
/// (member, entry) it answers.
struct Part {
    job: Job,
    at: Vec<(usize, usize)>,
}

/// The batches of one layer being answered together; `members[0]` leads.
struct Group {
    layer: LayerId,
    experts: Arc<LocalExperts<AnyBackend>>,
    members: Vec<Member>,
    hidden: usize,
    width: usize,
    /// The next part starts at the first pending expert from here, wrapping, so a batch that
    /// joins shares the experts still to run before its missed ones run.
    cursor: u16,
}

impl Group {
    /// A group led by `first`.
    fn open(first: Waiting, hidden: usize, width: usize) -> Self {
        let mut g = Self {
            layer: first.job.layer,
            experts: first.job.experts.clone(),
            members: Vec::new(),
            hidden,
            width: width.max(1),
            cursor: 0,
        };
        g.absorb(vec![first], false);
        g
    }

    fn leader_pending(&self) -> bool {
        self.members[0].left > 0
    }

    /// Takes `batches` in; every queued batch has entries ([`Coalescer::run`] answers the
    /// others at once), so every member has a part to wait for.
    fn absorb(&mut self, batches: Vec<Waiting>, joined: bool) {
        for w in batches {
            let n = w.job.plan.entries();
            self.members.push(Member {
                ys: vec![0.0; n * self.hidden],
                pending: vec![true; n],
                left: n,
                job: w.job,
                tell: Some(w.tell),
                joined,
                with: 1,
                micros: 0,
            });
        }
    }

    /// The next `width` pending experts from the cursor, over every row that still needs them.
    fn next_part(&mut self) -> Option<Part> {
        let mut todo: Vec<u16> = self
            .members
            .iter()
            .flat_map(|m| {
                m.pending
                    .iter()
                    .zip(m.job.plan.experts())
                    .filter_map(|(&p, &e)| p.then_some(e))
            })
            .collect();
        todo.sort_unstable();
        todo.dedup();
        let from = todo.partition_point(|&e| e < self.cursor);
        todo.rotate_left(from);
        todo.truncate(self.width);
        self.cursor = todo.last()?.saturating_add(1);
        let h = self.hidden;
        let (mut x, mut plan, mut at) = (Vec::new(), RoutePlan::new(), Vec::new());
        for (m, member) in self.members.iter().enumerate() {
            let p = &member.job.plan;
            let take = |i: &usize| member.pending[*i] && todo.contains(&p.experts()[*i]);
            for r in 0..p.rows() {
                if !p.row_range(r).any(|i| take(&i)) {
                    continue;
                }
                x.extend_from_slice(&member.job.x[r * h..(r + 1) * h]);
                plan.push_row(p.row_range(r).filter(take).map(|i| {
                    at.push((m, i));
                    // The weight is applied when the member's rows are combined.
                    (p.experts()[i], 1.0)
                }));
            }
        }
        let job = Job {
            layer: self.layer,
            x,
            plan,
            experts: self.experts.clone(),
        };
        Some(Part { job, at })
    }

    /// Files a part's outputs under the entries they answer; returns the answers of the batches
    /// it completed.
    fn scatter(
        &mut self,
        at: &[(usize, usize)],
        ys: &[f32],
        micros: u64,
    ) -> Vec<(oneshot::Sender<Result<Ran, WorkerError>>, Ran)> {
        let h = self.hidden;
        // `next_part` lists entries member by member, so each member's run is contiguous.
        let mut served: Vec<usize> = at.iter().map(|&(m, _)| m).collect();
        served.dedup();
        for &m in &served {
            let member = &mut self.members[m];
            member.with = member.with.max(served.len());
            member.micros += micros;
        }
        for (j, &(m, i)) in at.iter().enumerate() {
            let member = &mut self.members[m];
            member.ys[i * h..(i + 1) * h].copy_from_slice(&ys[j * h..(j + 1) * h]);
            member.pending[i] = false;
            member.left -= 1;
        }
        let mut done = Vec::new();
        for &m in &served {
            let member = &mut self.members[m];
            if member.left > 0 {
                continue;
            }
            let Some(tell) = member.tell.take() else {
                continue;
            };
            let mut out = vec![0.0; member.job.plan.rows() * h];
            combine_entries(&member.job.plan, &member.ys, h, &mut out);
            member.ys = Vec::new();
            done.push((
                tell,
                Ran {
                    out,
                    micros: member.micros,
                    batches: member.with,
                    own_call: m == 0 || member.with == 1,
                    joined: member.joined && member.with > 1,
                },
            ));
        }
        done
    }

    /// Fails every batch not yet answered with `e` (as it is, where it is the only one).
    fn fail(&mut self, e: WorkerError) {
        let mut unanswered: Vec<_> = self
            .members
            .iter_mut()
            .filter_map(|m| m.tell.take())
            .collect();
        if unanswered.len() == 1 {
            let _ = unanswered.remove(0).send(Err(e));
            return;
        }
        for tell in unanswered {
            let err = WorkerError::Compute(format!("in a coalesced expert call: {e}"));
            let _ = tell.send(Err(err));
        }
    }
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

    type PartFuture = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(Vec<f32>, u64), WorkerError>> + Send>,
    >;

    /// A fake part: each entry's output is its row doubled, after `hold(call number)` resolves.
    fn doubling<H, HF>(
        calls: Arc<AtomicUsize>,
        hold: H,
    ) -> impl Fn(Job, Answer) -> PartFuture + Clone
    where
        H: Fn(usize) -> HF + Clone + Send + Sync + 'static,
        HF: std::future::Future<Output = ()> + Send + 'static,
    {
        move |j: Job, answer| {
            assert_eq!(answer, Answer::Entries, "coalescing asks for parts");
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let hold = hold(n);
            Box::pin(async move {
                hold.await;
                let mut ys = Vec::new();
                for r in 0..j.plan.rows() {
                    for _ in j.plan.row_range(r) {
                        ys.extend(j.x[r * 4..(r + 1) * 4].iter().map(|v| v * 2.0));
                    }
                }
                Ok((ys, j.plan.rows() as u64))
            })
        }
    }

    /// [`doubling`] whose first part waits until the returned gate is opened, so that others
    /// arrive while it runs.
    fn first_waits(
        calls: &Arc<AtomicUsize>,
    ) -> (
        tokio::sync::watch::Sender<bool>,
        impl Fn(Job, Answer) -> PartFuture + Clone,
    ) {
        let (release, gate) = tokio::sync::watch::channel(false);
        let compute = doubling(calls.clone(), move |n| {
            let gate = gate.clone();
            async move {
                if n == 0 {
                    opened(gate).await;
                }
            }
        });
        (release, compute)
    }

    /// A future that resolves once `gate` says true.
    async fn opened(mut gate: tokio::sync::watch::Receiver<bool>) {
        while !*gate.borrow_and_update() {
            gate.changed().await.unwrap();
        }
    }

    #[test]
    fn batches_of_a_layer_that_queue_together_run_together_and_get_their_own_rows() {
        let (_dir, ck, experts) = tiny(2);
        let rt = runtime(4);
        let mut co = Coalescer::new(true);
        co.width = Some(8);
        let co = Arc::new(co);
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, compute) = first_waits(&calls);
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
            // c (layer 0) joins the first group once the first batch is done, so it shares
            // nothing and is a call of its own; then b, the oldest left, runs with d and e.
            for (h, from, rows, batches, own_call) in [
                (first, 0.0, 1, 1, true),
                (c, 200.0, 3, 1, true),
                (b, 100.0, 2, 3, true),
                (d, 300.0, 1, 3, false),
                (e, 400.0, 2, 3, false),
            ] {
                let ran = h.await.unwrap().unwrap();
                let want: Vec<f32> = (0..rows * 4).map(|i| (from + i as f32) * 2.0).collect();
                assert_eq!(ran.out, want);
                assert_eq!(
                    (ran.batches, ran.own_call, ran.joined),
                    (batches, own_call, false),
                    "batch from {from}"
                );
            }
        });
        assert_eq!(calls.load(Ordering::SeqCst), 3, "a, then c, then b+d+e");
        // Idle again: the next batch runs at once.
        let ran = rt
            .block_on(co.run(job(&experts, &ck, 0, 1, 7.0), 4, compute))
            .unwrap();
        assert_eq!((ran.batches, ran.own_call), (1, true));
    }

    /// A layer-`l` job of 8 rows, row r routed to experts r and r + 1 (mod 8).
    fn two_each(
        experts: &Arc<LocalExperts<AnyBackend>>,
        ck: &Checkpoint,
        l: usize,
        seed: usize,
    ) -> Job {
        let mut plan = RoutePlan::new();
        for r in 0..8u16 {
            plan.push_row([(r, 0.625), ((r + 1) % 8, 0.375)]);
        }
        Job {
            layer: LayerId::new(l, ck.config()).unwrap(),
            x: (0..32)
                .map(|i| (((i + seed) * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect(),
            plan,
            experts: experts.clone(),
        }
    }

    /// The real expert part, as the service runs it, counting calls; the first waits for `gate`.
    fn real(
        calls: Arc<AtomicUsize>,
        gate: tokio::sync::watch::Receiver<bool>,
    ) -> impl Fn(Job, Answer) -> PartFuture + Clone {
        move |j: Job, answer| {
            assert_eq!(answer, Answer::Entries, "coalescing asks for parts");
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let gate = gate.clone();
            Box::pin(async move {
                if n == 0 {
                    opened(gate).await;
                }
                let mut ys = vec![0.0; j.plan.entries() * 4];
                j.experts.run_entries(j.layer, &j.x, &j.plan, &mut ys)?;
                Ok((ys, 1))
            })
        }
    }

    #[test]
    fn a_batch_joining_mid_call_shares_the_experts_still_to_run_with_unchanged_bits() {
        use switchyard_model::ExpertExecutor;
        let (_dir, ck, experts) = tiny(2);
        let rt = runtime(4);
        let mut co = Coalescer::new(true);
        co.width = Some(1);
        let co = Arc::new(co);
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let compute = real(calls.clone(), gate);
        let alone = |j: &Job| {
            let mut out = vec![0.0; 32];
            experts.run(j.layer, &j.x, &j.plan, &mut out).unwrap();
            out
        };
        let (a, b, other) = (
            two_each(&experts, &ck, 1, 0),
            two_each(&experts, &ck, 1, 5),
            two_each(&experts, &ck, 0, 9),
        );
        let want = [alone(&a), alone(&b), alone(&other)];
        let got = rt.block_on(async {
            let run = |j: Job| {
                let (co, compute) = (co.clone(), compute.clone());
                tokio::spawn(async move { co.run(j, 4, compute).await })
            };
            let a = run(a);
            while calls.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            // During a's first expert (0), a batch of its layer and one of another arrive.
            let b = run(b);
            let other = run(other);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            release.send(true).unwrap();
            [a.await, b.await, other.await].map(|h| h.unwrap().unwrap())
        });
        for (ran, want) in got.iter().zip(&want) {
            assert!(ran
                .out
                .iter()
                .zip(want)
                .all(|(p, q)| p.to_bits() == q.to_bits()));
        }
        let flags: Vec<_> = got
            .iter()
            .map(|r| (r.batches, r.own_call, r.joined))
            .collect();
        assert_eq!(
            flags,
            [(2, true, false), (2, false, true), (1, true, false)]
        );
        // a's 8 experts (b sharing 1-7), b's missed expert 0, then the other layer's 8.
        assert_eq!(calls.load(Ordering::SeqCst), 8 + 1 + 8);
    }

    #[test]
    fn a_cancelled_caller_leaves_its_group_running_and_a_failed_stage_refuses_and_recovers() {
        let (_dir, ck, experts) = tiny(2);
        let rt = runtime(4);
        let co = Arc::new(Coalescer::new(true));
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let compute = doubling(calls.clone(), move |n| {
            let gate = gate.clone();
            async move {
                match n {
                    0 => opened(gate).await,
                    1 => panic!("a kernel fault"),
                    _ => {}
                }
            }
        });
        rt.block_on(async {
            let run = |j: Job| {
                let (co, compute) = (co.clone(), compute.clone());
                tokio::spawn(async move { co.run(j, 4, compute).await })
            };
            // The first caller goes away while its batch runs; the group runs on.
            let gone = run(job(&experts, &ck, 0, 1, 0.0));
            while calls.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            let same = run(job(&experts, &ck, 0, 2, 10.0));
            let other = run(job(&experts, &ck, 1, 1, 30.0));
            gone.abort();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            release.send(true).unwrap();
            // The batch of the first one's layer joined after that one's only part, so its
            // call is the second, which faults: it is refused, not left hanging, and so is the
            // batch of the other layer queued behind it...
            assert!(same.await.unwrap().is_err());
            assert!(other.await.unwrap().is_err());
            // ...and then the stage runs again.
            let after = run(job(&experts, &ck, 1, 1, 20.0)).await.unwrap().unwrap();
            assert_eq!(after.out, vec![40.0, 42.0, 44.0, 46.0]);
        });
    }

    #[test]
    fn a_batch_whose_caller_went_away_while_queued_is_not_computed() {
        let (_dir, ck, experts) = tiny(2);
        let rt = runtime(4);
        let co = Arc::new(Coalescer::new(true));
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, compute) = first_waits(&calls);
        rt.block_on(async {
            let run = |j: Job| {
                let (co, compute) = (co.clone(), compute.clone());
                tokio::spawn(async move { co.run(j, 4, compute).await })
            };
            let first = run(job(&experts, &ck, 0, 1, 0.0));
            while calls.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            // Queued behind the first: one caller goes away, one of another layer stays.
            let gone = run(job(&experts, &ck, 1, 1, 10.0));
            let kept = run(job(&experts, &ck, 0, 2, 20.0));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            gone.abort();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            release.send(true).unwrap();
            first.await.unwrap().unwrap();
            let kept = kept.await.unwrap().unwrap();
            assert_eq!(kept.out[..4], [40.0, 42.0, 44.0, 46.0]);
            // One more batch, queued after everything else: once it is answered, the queue
            // before it has been worked through.
            run(job(&experts, &ck, 0, 1, 30.0)).await.unwrap().unwrap();
        });
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "the first, the kept batch, the last"
        );
    }
}
