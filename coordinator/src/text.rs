//! The reading side of a request, shared by the API and the CLI: turning each choice's token
//! ids into text (incremental detokenization, stop strings (the text is cut before the match,
//! and never streamed past a possible match), logprob entries) and following its events.

use crate::{
    request::ValidatedRequest,
    scheduler::{FinishReason, RequestStream, SeqEvent, SeqFailure},
};
use switchyard_model::{tokenizer::TextStream, Tokenizer};

/// Every choice of one request as its events arrive.
pub struct RequestText<'a> {
    pub choices: Vec<ChoiceText<'a>>,
    /// Per choice, prompt tokens it found in the prefix cache.
    cached: Vec<usize>,
    /// Choices per prompt.
    n: usize,
    open: usize,
}

/// What one event changed.
pub enum Update {
    /// Choice `index` has new text (or logprobs); `done` when it ended.
    Choice { index: usize, done: bool },
    /// The request failed; nothing more will come.
    Failed(SeqFailure),
    /// Nothing a reader shows.
    Nothing,
}

impl<'a> RequestText<'a> {
    pub fn new(tok: &'a Tokenizer, req: &'a ValidatedRequest) -> Self {
        Self {
            choices: (0..req.choices())
                .map(|_| ChoiceText::new(tok, req.stop_strings()))
                .collect(),
            cached: vec![0; req.choices()],
            n: req.n(),
            open: req.choices(),
        }
    }

    /// Whether some choice has not ended.
    pub fn is_open(&self) -> bool {
        self.open > 0
    }

    /// Applies one event of `stream`; a choice whose text matched a stop string is cancelled.
    pub fn apply(&mut self, index: usize, ev: SeqEvent, stream: &RequestStream) -> Update {
        let c = &mut self.choices[index];
        if c.finish.is_some() {
            return Update::Nothing;
        }
        let done = match ev {
            SeqEvent::Started { cached_tokens } => {
                self.cached[index] = cached_tokens;
                return Update::Nothing;
            }
            SeqEvent::Token { id, logprob, top } => {
                let stop = c.push(id, logprob.map(|lp| (lp, top.as_slice())));
                if stop {
                    stream.cancel(index);
                }
                stop
            }
            SeqEvent::Finished { reason, .. } => {
                c.finish = Some(reason);
                true
            }
            SeqEvent::Failed(f) => {
                self.open = 0;
                return Update::Failed(f);
            }
        };
        if done {
            self.open -= 1;
        }
        Update::Choice { index, done }
    }

    /// Generated tokens of every choice.
    pub fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.completion_tokens).sum()
    }

    /// Prompt tokens found in the prefix cache: each prompt counts once however many choices
    /// it has, with the most any of its choices found.
    pub fn cached_tokens(&self) -> usize {
        self.cached
            .chunks(self.n.max(1))
            .map(|c| c.iter().copied().max().unwrap_or(0))
            .sum()
    }
}

/// One generated token as logprobs report it.
pub struct TokenLogprob {
    pub text: String,
    pub logprob: f32,
    /// Most likely alternatives, descending.
    pub top: Vec<(String, f32)>,
}

/// One choice's text as it grows.
pub struct ChoiceText<'a> {
    tok: &'a Tokenizer,
    stream: TextStream<'a>,
    stops: &'a [String],
    /// Longest stop string in bytes: text this close to the end may still become a match.
    hold: usize,
    pub text: String,
    emitted: usize,
    pub finish: Option<FinishReason>,
    pub completion_tokens: usize,
    /// Per token, when logprobs were asked for.
    pub logprobs: Vec<TokenLogprob>,
}

impl<'a> ChoiceText<'a> {
    pub fn new(tok: &'a Tokenizer, stops: &'a [String]) -> Self {
        Self {
            tok,
            stream: tok.stream(true),
            stops,
            hold: stops.iter().map(String::len).max().unwrap_or(0),
            text: String::new(),
            emitted: 0,
            finish: None,
            completion_tokens: 0,
            logprobs: Vec::new(),
        }
    }

    /// The text of one token on its own (for logprobs).
    pub fn token_text(&self, id: u32) -> String {
        self.tok.decode(&[id], false).unwrap_or_default()
    }

    /// Adds a token. Returns true when a stop string ended the choice.
    pub fn push(&mut self, id: u32, want_logprobs: Option<(f32, &[(u32, f32)])>) -> bool {
        self.completion_tokens += 1;
        if let Some((lp, top)) = want_logprobs {
            let top = top.iter().map(|&(t, l)| (self.token_text(t), l)).collect();
            self.logprobs.push(TokenLogprob {
                text: self.token_text(id),
                logprob: lp,
                top,
            });
        }
        if let Ok(Some(piece)) = self.stream.step(id) {
            self.text.push_str(&piece);
        }
        if self.stops.is_empty() {
            return false;
        }
        let from = self.emitted.saturating_sub(self.hold);
        let from = (0..=from)
            .rev()
            .find(|&i| self.text.is_char_boundary(i))
            .unwrap_or(0);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| p + from))
            .min();
        if let Some(pos) = hit {
            self.text.truncate(pos);
            self.finish = Some(FinishReason::Stop);
            return true;
        }
        false
    }

    /// Text that can be sent now: everything when `done`, else all but what a stop string
    /// might still claim.
    pub fn ready(&mut self, done: bool) -> String {
        let mut end = if done || self.hold == 0 {
            self.text.len()
        } else {
            self.text.len().saturating_sub(self.hold - 1)
        };
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        if end <= self.emitted {
            return String::new();
        }
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        Tokenizer::from_dir(&crate::fixture("tiny-mixtral-trained")).unwrap()
    }

    #[test]
    fn stop_strings_cut_text_and_are_never_streamed() {
        let t = tok();
        let ids = t.encode("the list is empty. Return it", false).unwrap();
        let stops = vec!["empty.".to_string()];
        let mut c = ChoiceText::new(&t, &stops);
        let mut streamed = String::new();
        for &id in &ids {
            let stop = c.push(id, None);
            streamed.push_str(&c.ready(stop));
            if stop {
                break;
            }
        }
        assert_eq!(c.finish, Some(FinishReason::Stop));
        assert_eq!(c.text, "the list is ");
        assert_eq!(streamed, "the list is ");
    }

    #[test]
    fn without_stops_everything_streams() {
        let t = tok();
        let ids = t.encode("plain text", false).unwrap();
        let mut c = ChoiceText::new(&t, &[]);
        let mut s = String::new();
        for &id in &ids {
            c.push(id, None);
            s.push_str(&c.ready(false));
        }
        assert_eq!(s, "plain text");
    }
}
