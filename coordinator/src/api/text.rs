//! Turning a choice's token ids into text: incremental detokenization, stop strings (the text is
//! cut before the match, and never streamed past a possible match), and logprob entries.

use crate::engine::FinishReason;
use switchyard_model::{tokenizer::TextStream, Tokenizer};

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
        let dir = std::env::var_os("SWITCHYARD_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
            });
        Tokenizer::from_dir(&dir.join("tiny-mixtral-trained")).unwrap()
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
