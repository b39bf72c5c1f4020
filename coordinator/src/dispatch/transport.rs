//! How one batch travels to a worker: a unary `Forward` call, or a message on the worker's
//! long-lived `ForwardStream` whose replies a reader task hands back by batch id.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use switchyard_wire::pb::{self, expert_service_client::ExpertServiceClient};
use tonic::transport::Channel;

/// The way a batch goes out to one worker.
pub(super) trait Transport: Send + Sync {
    /// Sends `batch` and waits up to `timeout` for its reply; the deadline is enforced here,
    /// so a worker that never answers cannot hold the layer past it.
    fn call(&self, batch: pb::ExpertBatch, timeout: Duration) -> BoxFuture<'_, Reply>;

    /// Whether a timed-out call leaves this transport unusable (a stream stuck behind the lost
    /// reply), so the next batch must open a new one.
    fn broken_by_timeout(&self) -> bool;
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// One unary `Forward` call per batch: an HTTP/2 stream with headers and a deadline each.
pub(super) struct Unary(pub ExpertServiceClient<Channel>);

impl Transport for Unary {
    fn call(&self, batch: pb::ExpertBatch, timeout: Duration) -> BoxFuture<'_, Reply> {
        Box::pin(async move {
            let mut req = tonic::Request::new(batch);
            req.set_timeout(timeout);
            match tokio::time::timeout(timeout, self.0.clone().forward(req)).await {
                Ok(r) => r.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded("no reply to the batch")),
            }
        })
    }

    fn broken_by_timeout(&self) -> bool {
        false
    }
}

impl Transport for BatchStream {
    fn call(&self, batch: pb::ExpertBatch, timeout: Duration) -> BoxFuture<'_, Reply> {
        Box::pin(self.send(batch, timeout))
    }

    fn broken_by_timeout(&self) -> bool {
        true
    }
}

pub(super) type Reply = Result<pb::ExpertResult, tonic::Status>;

/// Replies awaited on a stream, by batch id; once the stream has ended, why.
#[derive(Default)]
struct Waiting {
    replies: std::collections::HashMap<u64, tokio::sync::oneshot::Sender<Reply>>,
    ended: Option<tonic::Status>,
}

/// One worker's ForwardStream: batches go out on `tx`, and a reader task hands each reply to
/// the call waiting for its id.
pub(super) struct BatchStream {
    tx: futures::channel::mpsc::UnboundedSender<pb::StreamBatch>,
    next_id: AtomicU64,
    waiting: Arc<Mutex<Waiting>>,
}

impl BatchStream {
    /// Opens the stream; must run inside the dispatch runtime (the reader task is spawned there).
    pub(super) async fn open(client: &ExpertServiceClient<Channel>) -> Result<Self, tonic::Status> {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut replies = client.clone().forward_stream(rx).await?.into_inner();
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let w = waiting.clone();
        tokio::spawn(async move {
            let ended = loop {
                match replies.message().await {
                    Ok(Some(r)) => {
                        let mut g = w.lock().unwrap_or_else(|p| p.into_inner());
                        // A reply nobody waits for belongs to a call that timed out.
                        if let Some(tx) = g.replies.remove(&r.id) {
                            let _ = tx.send(reply_result(r));
                        }
                    }
                    Ok(None) => {
                        break tonic::Status::unavailable("the worker closed the batch stream")
                    }
                    Err(s) => break s,
                }
            };
            let mut g = w.lock().unwrap_or_else(|p| p.into_inner());
            for (_, tx) in g.replies.drain() {
                let _ = tx.send(Err(ended.clone()));
            }
            g.ended = Some(ended);
        });
        Ok(Self {
            tx,
            next_id: AtomicU64::new(0),
            waiting,
        })
    }

    pub(super) fn is_open(&self) -> bool {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ended
            .is_none()
    }

    /// Sends `batch` and waits up to `timeout` for its reply.
    async fn send(&self, batch: pb::ExpertBatch, timeout: Duration) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let rx = {
            let mut g = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = &g.ended {
                return Err(s.clone());
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            g.replies.insert(id, tx);
            let msg = pb::StreamBatch {
                id,
                batch: Some(batch),
            };
            if self.tx.unbounded_send(msg).is_err() {
                g.replies.remove(&id);
                return Err(tonic::Status::unavailable("the batch stream is closed"));
            }
            rx
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(tonic::Status::unavailable("the batch stream ended")),
            Err(_) => {
                self.waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replies
                    .remove(&id);
                Err(tonic::Status::deadline_exceeded(
                    "no reply on the batch stream",
                ))
            }
        }
    }
}

/// A stream reply as the unary call would have answered it.
fn reply_result(r: pb::StreamReply) -> Reply {
    if r.status == 0 {
        return r
            .result
            .ok_or_else(|| tonic::Status::internal("stream reply without a result"));
    }
    let mut s = tonic::Status::new(tonic::Code::from_i32(r.status), r.message);
    if let Ok(v) = r.error_code.parse() {
        s.metadata_mut().insert(switchyard_wire::ERROR_CODE_KEY, v);
    }
    Err(s)
}
