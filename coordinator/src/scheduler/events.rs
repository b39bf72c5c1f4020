//! What the engine thread tells a request's reader, and the reader's side of it.

use super::Command;
use tokio::sync::mpsc;

/// Why a choice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

/// What a choice reports, in order: `Started` once, tokens, then exactly one `Finished` or
/// `Failed` (a choice that fails before it starts sends `Failed` alone).
#[derive(Clone, Debug)]
pub enum SeqEvent {
    /// The choice began computing; this many of its prompt tokens came from the prefix cache
    /// (the API's `usage.prompt_tokens_details.cached_tokens`).
    Started {
        cached_tokens: usize,
    },
    Token {
        id: u32,
        /// Where the request asked for logprobs.
        logprob: Option<f32>,
        /// (id, logprob), most likely first.
        top: Vec<(u32, f32)>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(SeqFailure),
}

/// Why a choice could not finish.
#[derive(Clone, Debug)]
pub enum SeqFailure {
    /// Workers needed for its experts are unreachable.
    Unavailable(String),
    /// The queue was full when it arrived (the caller's 429).
    QueueFull,
    /// It waited longer than the queue deadline to start (the caller's 503).
    QueueTimeout(std::time::Duration),
    /// Anything else (a bug or a broken model); details are in the log.
    Internal(String),
}

/// The reading side of one submitted request: every choice's events, tagged with the choice's
/// index. Dropping it cancels every choice that has not finished.
pub struct RequestStream {
    id: u64,
    events: mpsc::UnboundedReceiver<(usize, SeqEvent)>,
    commands: mpsc::UnboundedSender<Command>,
}

impl RequestStream {
    pub(crate) fn new(
        id: u64,
        events: mpsc::UnboundedReceiver<(usize, SeqEvent)>,
        commands: mpsc::UnboundedSender<Command>,
    ) -> Self {
        Self {
            id,
            events,
            commands,
        }
    }

    /// The next event of any choice; `None` once every choice has ended.
    pub async fn recv(&mut self) -> Option<(usize, SeqEvent)> {
        self.events.recv().await
    }

    /// [`recv`](Self::recv) for threads outside an async runtime (the CLI).
    pub fn blocking_recv(&mut self) -> Option<(usize, SeqEvent)> {
        self.events.blocking_recv()
    }

    /// Ends choice `index` early (its text matched a stop string); its blocks are freed at the
    /// next iteration and it sends nothing more that matters.
    pub fn cancel(&self, index: usize) {
        // A stopped engine has nothing left to cancel.
        let _ = self.commands.send(Command::Cancel {
            request: self.id,
            index,
        });
    }
}
