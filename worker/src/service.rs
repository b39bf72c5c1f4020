//! The tonic `ExpertService`: decode and validate → run the experts off the async runtime →
//! encode one partial sum per row.

use crate::{
    coalesce::{Answer, Coalescer, Job},
    WorkerConfig, WorkerError,
};
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, PoisonError, RwLock,
    },
    time::Instant,
};
use switchyard_model::{
    AnyBackend, Checkpoint, ExpertExecutor, LayerId, LocalExperts, MixtralConfig,
};
use switchyard_wire::{encode_rows, pb, Expect, ExpertRequest, PROTOCOL_VERSION};
use tokio::sync::Semaphore;
use tracing::Instrument;

/// Counters behind the Load RPC and the registry record.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) batches: AtomicU64,
    pub(crate) rows: AtomicU64,
    pub(crate) busy_micros: AtomicU64,
    /// Expert calls made (coalesced groups, however many parts each ran in): fewer than
    /// batches where batches were coalesced.
    pub(crate) calls: AtomicU64,
    /// Batches that ran in one call with others.
    pub(crate) coalesced: AtomicU64,
    /// Of those, batches that joined a call already under way.
    pub(crate) joined: AtomicU64,
    /// `[layer * experts + expert]` token-expert entries computed.
    expert_tokens: Vec<AtomicU64>,
}

/// The expert service of one worker. Shared (`Arc`) between the gRPC service and, with a
/// registry, the membership agent that swaps the hosted experts when the planner says so.
pub struct ExpertServer {
    /// Replaced whole on a placement change; a batch keeps the set it started with.
    experts: RwLock<Arc<LocalExperts<AnyBackend>>>,
    /// The device experts are loaded onto (also when the planner assigns new ones).
    backend: AnyBackend,
    cfg: MixtralConfig,
    fingerprint: String,
    /// What the experts are quantized to at load, for loads the planner asks for later.
    quantize: switchyard_model::QuantPlan,
    info: RwLock<pb::WorkerInfo>,
    max_rows: usize,
    queue: Arc<Semaphore>,
    max_queue: usize,
    draining: Arc<AtomicBool>,
    stats: Arc<Stats>,
    started: Instant,
    coalescer: Coalescer,
}

impl ExpertServer {
    pub(crate) fn new(
        ck: &Checkpoint,
        backend: AnyBackend,
        experts: Arc<LocalExperts<AnyBackend>>,
        wc: &WorkerConfig,
    ) -> Self {
        let cfg = ck.config().clone();
        let fingerprint = ck.fingerprint();
        let info = pb::WorkerInfo {
            protocol_version: PROTOCOL_VERSION,
            model_fingerprint: fingerprint.clone(),
            hidden_size: cfg.hidden_size as u32,
            num_layers: cfg.num_hidden_layers as u32,
            num_experts: cfg.num_local_experts as u32,
            hosted: hosted_per_layer(&experts, cfg.num_hidden_layers),
            weight_dtype: match ck.expert_format() {
                Some(q) => q.to_string(),
                None => ck
                    .dominant_dtype()
                    .map(|d| d.to_string())
                    .unwrap_or_default(),
            },
            device: wc.device.to_string(),
            max_batch_rows: wc.max_batch_rows as u32,
            weight_bytes: experts.weight_bytes() as u64,
            worker_version: env!("CARGO_PKG_VERSION").to_string(),
            kernels: match wc.device {
                switchyard_model::Device::Cpu => {
                    switchyard_model::backend::cpu::linear::signature()
                }
                _ => wc.device.to_string(),
            },
        };
        let stats = Stats {
            expert_tokens: (0..cfg.num_hidden_layers * cfg.num_local_experts)
                .map(|_| AtomicU64::new(0))
                .collect(),
            ..Stats::default()
        };
        Self {
            experts: RwLock::new(experts),
            backend,
            cfg,
            fingerprint,
            quantize: wc.quantize,
            info: RwLock::new(info),
            max_rows: wc.max_batch_rows,
            queue: Arc::new(Semaphore::new(wc.max_queued_batches)),
            max_queue: wc.max_queued_batches,
            draining: Arc::new(AtomicBool::new(false)),
            stats: Arc::new(stats),
            started: Instant::now(),
            coalescer: Coalescer::new(wc.coalesce),
        }
    }

    pub(crate) fn quantize(&self) -> switchyard_model::QuantPlan {
        self.quantize
    }

    pub(crate) fn drain_flag(&self) -> Arc<AtomicBool> {
        self.draining.clone()
    }

    pub(crate) fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// What the Info RPC answers.
    #[must_use]
    pub fn info(&self) -> pb::WorkerInfo {
        self.info
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The experts served now.
    #[must_use]
    pub fn experts(&self) -> Arc<LocalExperts<AnyBackend>> {
        self.experts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Serves `experts` from the next batch on (batches in flight finish with the old set).
    pub fn set_experts(&self, experts: Arc<LocalExperts<AnyBackend>>) {
        {
            let mut info = self.info.write().unwrap_or_else(PoisonError::into_inner);
            info.hosted = hosted_per_layer(&experts, self.cfg.num_hidden_layers);
            info.weight_bytes = experts.weight_bytes() as u64;
        }
        *self.experts.write().unwrap_or_else(PoisonError::into_inner) = experts;
    }

    pub(crate) fn backend(&self) -> &AnyBackend {
        &self.backend
    }

    pub(crate) fn config(&self) -> &MixtralConfig {
        &self.cfg
    }

    pub(crate) fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }

    async fn forward_inner(
        &self,
        mut batch: pb::ExpertBatch,
    ) -> Result<pb::ExpertResult, WorkerError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(WorkerError::Draining);
        }
        let _permit = self
            .queue
            .clone()
            .try_acquire_owned()
            .map_err(|_| WorkerError::Overloaded(self.max_queue))?;
        let want = Expect {
            fingerprint: &self.fingerprint,
            hidden: self.cfg.hidden_size,
            layers: self.cfg.num_hidden_layers,
            experts: self.cfg.num_local_experts,
            top_k: self.cfg.num_experts_per_tok,
            max_rows: self.max_rows,
        };
        let req = ExpertRequest::decode(&batch, &want)?;
        let traceparent = std::mem::take(&mut batch.traceparent);
        drop(batch);
        let experts = self.experts();
        if let Some(&e) = req
            .plan
            .experts()
            .iter()
            .find(|&&e| !experts.hosted().contains(e as usize))
        {
            return Err(WorkerError::NotHosted {
                layer: req.layer,
                expert: e as usize,
                hosted: experts.hosted().to_string(),
            });
        }
        let layer = LayerId::new(req.layer, &self.cfg)?;
        let h = self.cfg.hidden_size;
        let span = tracing::debug_span!(
            "worker.forward",
            layer = req.layer,
            rows = req.plan.rows(),
            experts = tracing::field::Empty,
            coalesced = tracing::field::Empty,
        );
        if !span.is_disabled() {
            // Joins the coordinator's trace when the batch is traced.
            switchyard_wire::trace::continue_trace(&span, &traceparent);
            let mut distinct: Vec<u16> = req.plan.experts().to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            span.record("experts", format!("{distinct:?}"));
        }
        let (rows, dtype) = (req.plan.rows(), req.reply_dtype);
        let job = Job {
            layer,
            x: req.x,
            plan: req.plan,
            experts,
        };
        let (stats, n_experts) = (self.stats.clone(), self.cfg.num_local_experts);
        let ran = self
            .coalescer
            .run(job, h, move |job, answer| {
                compute(job, answer, h, n_experts, stats.clone())
            })
            .instrument(span.clone())
            .await?;
        span.record("coalesced", ran.batches);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
        if ran.own_call {
            self.stats.calls.fetch_add(1, Ordering::Relaxed);
        }
        if ran.batches > 1 {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
        }
        if ran.joined {
            self.stats.joined.fetch_add(1, Ordering::Relaxed);
        }
        Ok(pb::ExpertResult {
            rows: rows as u32,
            hidden_size: h as u32,
            dtype: dtype.to_pb(),
            output: encode_rows(&ran.out, dtype),
            compute_micros: ran.micros,
        })
    }
}

/// One expert call over `job`'s rows (one batch's, or a part of several coalesced), answered
/// as `answer` asks, and its compute time. Counts the call's token-expert entries once it
/// succeeds.
async fn compute(
    job: Job,
    answer: Answer,
    h: usize,
    n_experts: usize,
    stats: Arc<Stats>,
) -> Result<(Vec<f32>, u64), WorkerError> {
    let run = move || {
        let start = Instant::now();
        let mut out;
        match answer {
            Answer::Rows => {
                out = vec![0.0f32; job.plan.rows() * h];
                job.experts.run(job.layer, &job.x, &job.plan, &mut out)?;
            }
            Answer::Entries => {
                out = vec![0.0f32; job.plan.entries() * h];
                job.experts
                    .run_entries(job.layer, &job.x, &job.plan, &mut out)?;
            }
        }
        let micros = start.elapsed().as_micros() as u64;
        let first = job.layer.index() * n_experts;
        for &e in job.plan.experts() {
            stats.expert_tokens[first + e as usize].fetch_add(1, Ordering::Relaxed);
        }
        stats.busy_micros.fetch_add(micros, Ordering::Relaxed);
        Ok::<_, WorkerError>((out, micros))
    };
    if rayon::current_thread_index().is_some() {
        // `switchyard worker` drives its I/O from a rayon thread (see `serve_on_pool`): the
        // batch is computed where it was decoded, with no hand-off, and parallel ops fan out to
        // the other pool threads. Batches are serialised by the experts' scratch anyway.
        return run();
    }
    // Otherwise the math goes to rayon's pool, never onto the async thread.
    let (tx, rx) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        // The receiver is gone only if the call was cancelled; nobody needs the result.
        let _ = tx.send(run());
    });
    rx.await
        .map_err(|_| WorkerError::Compute("the expert task ended without a result".into()))?
}

/// The error reply of a stream batch: what Forward would have answered, as fields.
fn refused(id: u64, e: WorkerError) -> pb::StreamReply {
    tracing::warn!(code = e.code(), error = %e, "batch refused");
    let s = tonic::Status::from(e);
    pb::StreamReply {
        id,
        result: None,
        status: s.code() as i32,
        message: s.message().to_string(),
        error_code: switchyard_wire::status_code_of(&s)
            .unwrap_or_default()
            .to_string(),
    }
}

fn hosted_per_layer(experts: &LocalExperts<AnyBackend>, layers: usize) -> Vec<pb::LayerExperts> {
    let hosted: Vec<u32> = experts.hosted().iter().map(|e| e as u32).collect();
    (0..layers as u32)
        .map(|layer| pb::LayerExperts {
            layer,
            experts: hosted.clone(),
        })
        .collect()
}

/// The gRPC face of an [`ExpertServer`]. It holds the server by `Arc` because a ForwardStream
/// outlives the call that opens it, and the stop token so that streams end when the worker
/// drains (a stream left open would hold the graceful shutdown to its grace period).
pub struct ExpertService {
    pub server: Arc<ExpertServer>,
    pub stop: tokio_util::sync::CancellationToken,
}

type ReplyStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::StreamReply, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl pb::expert_service_server::ExpertService for ExpertService {
    async fn forward(
        &self,
        request: tonic::Request<pb::ExpertBatch>,
    ) -> Result<tonic::Response<pb::ExpertResult>, tonic::Status> {
        match self.server.forward_inner(request.into_inner()).await {
            Ok(r) => Ok(tonic::Response::new(r)),
            Err(e) => {
                tracing::warn!(code = e.code(), error = %e, "batch refused");
                Err(e.into())
            }
        }
    }

    type ForwardStreamStream = ReplyStream;

    async fn forward_stream(
        &self,
        request: tonic::Request<tonic::Streaming<pb::StreamBatch>>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        use futures::StreamExt;
        let server = self.server.clone();
        let stop = self.stop.clone();
        // One batch at a time, in arrival order; a batch that is refused gets an error reply
        // and the stream goes on. A broken request stream ends the replies with its status.
        let replies = request
            .into_inner()
            .then(move |m| {
                let server = server.clone();
                async move {
                    let m = m?;
                    let Some(batch) = m.batch else {
                        return Ok(refused(
                            m.id,
                            WorkerError::Wire(switchyard_wire::WireError::Missing("batch")),
                        ));
                    };
                    Ok(match server.forward_inner(batch).await {
                        Ok(r) => pb::StreamReply {
                            id: m.id,
                            result: Some(r),
                            ..Default::default()
                        },
                        Err(e) => refused(m.id, e),
                    })
                }
            })
            .take_until(async move { stop.cancelled().await });
        Ok(tonic::Response::new(Box::pin(replies)))
    }

    async fn info(
        &self,
        _: tonic::Request<pb::InfoRequest>,
    ) -> Result<tonic::Response<pb::WorkerInfo>, tonic::Status> {
        Ok(tonic::Response::new(self.server.info()))
    }

    async fn load(
        &self,
        _: tonic::Request<pb::LoadRequest>,
    ) -> Result<tonic::Response<pb::LoadReport>, tonic::Status> {
        let server = &self.server;
        let s = &server.stats;
        Ok(tonic::Response::new(pb::LoadReport {
            in_flight_batches: (server.max_queue - server.queue.available_permits()) as u32,
            batches_total: s.batches.load(Ordering::Relaxed),
            rows_total: s.rows.load(Ordering::Relaxed),
            expert_tokens: s
                .expert_tokens
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .collect(),
            busy_micros: s.busy_micros.load(Ordering::Relaxed),
            uptime_micros: server.started.elapsed().as_micros() as u64,
            expert_calls: s.calls.load(Ordering::Relaxed),
            coalesced_batches: s.coalesced.load(Ordering::Relaxed),
            joined_batches: s.joined.load(Ordering::Relaxed),
        }))
    }
}
