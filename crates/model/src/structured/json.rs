//! A byte-at-a-time JSON recogniser (RFC 8259): it accepts exactly the prefixes of valid JSON
//! texts whose top-level value is an object, and says when the text so far is complete. The
//! constraint in the parent module runs every vocabulary token's bytes through a copy of it to
//! find the tokens that keep the output valid.

/// Consecutive whitespace bytes allowed between tokens of the grammar: enough for
/// pretty-printing a few levels deep, while a model that would loop on whitespace is made to
/// write structure instead.
pub const MAX_WHITESPACE_RUN: u8 = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    Object,
    Array,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    /// Whether a number may end here.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before the top-level object.
    Start,
    /// A value is expected.
    Value,
    /// Right after `[`: a value or `]`.
    ArrayFirst,
    /// Right after `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value inside a container: `,` or the container's end.
    AfterValue,
    /// Inside a string; `key` says whether it is an object key; `escape` is 0 outside an
    /// escape, 1 right after `\`, and 5..2 while `\u`'s four hex digits come.
    Str {
        key: bool,
        escape: u8,
    },
    Num(Num),
    /// Inside `true`, `false` or `null`: the bytes still to come.
    Literal {
        rest: &'static [u8],
    },
    /// The top-level object is closed: nothing may follow.
    Done,
}

/// The recogniser's state: the open containers and where in the grammar it stands.
#[derive(Debug)]
pub struct JsonMachine {
    stack: Vec<Frame>,
    state: State,
    whitespace: u8,
}

impl Clone for JsonMachine {
    fn clone(&self) -> Self {
        Self {
            stack: self.stack.clone(),
            state: self.state,
            whitespace: self.whitespace,
        }
    }

    /// Reuses the stack's allocation: masking copies the machine once per vocabulary token.
    fn clone_from(&mut self, other: &Self) {
        self.stack.clone_from(&other.stack);
        self.state = other.state;
        self.whitespace = other.whitespace;
    }
}

impl Default for JsonMachine {
    fn default() -> Self {
        Self::object()
    }
}

impl JsonMachine {
    /// Accepts a JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    #[must_use]
    pub fn object() -> Self {
        Self {
            stack: Vec::new(),
            state: State::Start,
            whitespace: 0,
        }
    }

    /// Whether the machine is inside a string and not in an escape: any bytes but `"`, `\`
    /// and control characters leave it exactly as it is.
    #[must_use]
    pub fn in_plain_string(&self) -> bool {
        matches!(self.state, State::Str { escape: 0, .. })
    }

    /// Whether the bytes fed so far form a whole JSON text.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds every byte of `bytes`; false (with the machine left part-way) at the first byte
    /// that no valid JSON text could have there.
    pub fn feed_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed(b))
    }

    /// Feeds one byte; false if no valid JSON text continues with it.
    pub fn feed(&mut self, b: u8) -> bool {
        if let State::Str { key, escape } = self.state {
            return self.string_byte(key, escape, b);
        }
        if let State::Literal { rest } = self.state {
            return match rest.split_first() {
                Some((&want, rest)) if want == b => {
                    if rest.is_empty() {
                        self.value_done();
                    } else {
                        self.state = State::Literal { rest };
                    }
                    true
                }
                _ => false,
            };
        }
        if let State::Num(n) = self.state {
            if let Some(next) = number_byte(n, b) {
                self.state = State::Num(next);
                return true;
            }
            if !n.complete() {
                return false;
            }
            // The number ends here; the byte belongs to what follows it.
            self.value_done();
        }
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            // Whitespace may sit between any two tokens of the grammar and before the object
            // (SentencePiece vocabularies spell a word's leading space into its token), but once
            // the object is closed only the end may come.
            if self.whitespace >= MAX_WHITESPACE_RUN || self.state == State::Done {
                return false;
            }
            self.whitespace += 1;
            return true;
        }
        self.whitespace = 0;
        match self.state {
            State::Start => self.open_object(b),
            State::Value => self.value_start(b),
            State::ArrayFirst if b == b']' => self.close(Frame::Array),
            State::ArrayFirst => self.value_start(b),
            State::ObjectFirst if b == b'}' => self.close(Frame::Object),
            State::ObjectFirst | State::Key if b == b'"' => {
                self.state = State::Str {
                    key: true,
                    escape: 0,
                };
                true
            }
            State::Colon if b == b':' => {
                self.state = State::Value;
                true
            }
            State::AfterValue => match (b, self.stack.last()) {
                (b',', Some(Frame::Object)) => {
                    self.state = State::Key;
                    true
                }
                (b',', Some(Frame::Array)) => {
                    self.state = State::Value;
                    true
                }
                (b'}', _) => self.close(Frame::Object),
                (b']', _) => self.close(Frame::Array),
                _ => false,
            },
            _ => false,
        }
    }

    fn open_object(&mut self, b: u8) -> bool {
        if b != b'{' {
            return false;
        }
        self.stack.push(Frame::Object);
        self.state = State::ObjectFirst;
        true
    }

    fn value_start(&mut self, b: u8) -> bool {
        self.state = match b {
            b'{' => return self.open_object(b),
            b'[' => {
                self.stack.push(Frame::Array);
                State::ArrayFirst
            }
            b'"' => State::Str {
                key: false,
                escape: 0,
            },
            b'-' => State::Num(Num::Minus),
            b'0' => State::Num(Num::Zero),
            b'1'..=b'9' => State::Num(Num::Int),
            b't' => State::Literal { rest: b"rue" },
            b'f' => State::Literal { rest: b"alse" },
            b'n' => State::Literal { rest: b"ull" },
            _ => return false,
        };
        true
    }

    fn string_byte(&mut self, key: bool, escape: u8, b: u8) -> bool {
        let escape = match (escape, b) {
            (0, b'"') => {
                if key {
                    self.state = State::Colon;
                } else {
                    self.value_done();
                }
                return true;
            }
            (0, b'\\') => 1,
            // Control characters must be escaped; other bytes (UTF-8 included) stand as they are.
            (0, 0x00..=0x1f) => return false,
            (0, _) => 0,
            (1, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => 0,
            // `\u`: four hex digits follow, counted down 5 → 2.
            (1, b'u') => 5,
            (2, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => 0,
            (3..=5, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => escape - 1,
            _ => return false,
        };
        self.state = State::Str { key, escape };
        true
    }

    fn close(&mut self, frame: Frame) -> bool {
        if self.stack.last() != Some(&frame) {
            return false;
        }
        self.stack.pop();
        self.value_done();
        true
    }

    fn value_done(&mut self) {
        self.state = if self.stack.is_empty() {
            State::Done
        } else {
            State::AfterValue
        };
    }
}

fn number_byte(n: Num, b: u8) -> Option<Num> {
    Some(match (n, b) {
        (Num::Minus, b'0') => Num::Zero,
        (Num::Minus, b'1'..=b'9') => Num::Int,
        (Num::Int, b'0'..=b'9') => Num::Int,
        (Num::Zero | Num::Int, b'.') => Num::Dot,
        (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::Exp,
        (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
        (Num::Exp, b'+' | b'-') => Num::ExpSign,
        (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Num::ExpDigits,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(text: &str) -> (bool, bool) {
        let mut m = JsonMachine::object();
        let ok = m.feed_all(text.as_bytes());
        (ok, ok && m.is_complete())
    }

    #[test]
    fn whole_objects_are_complete_and_their_prefixes_are_not() {
        for text in [
            "{}",
            " {\"a\": 1}",
            "{\"a\":[1,-2.5e+3,0,true,false,null,\"x\\n\\u00e9\\\"\"],\"b\":{\"c\":{}}}",
            "{\"é\": \"ünïcode ✓\", \"n\": -0.0E-1, \"e\": []}",
        ] {
            assert_eq!(accepts(text), (true, true), "{text}");
            assert!(serde_json::from_str::<serde_json::Value>(text).is_ok());
            for cut in 0..text.len() - 1 {
                if text.is_char_boundary(cut) && !text[cut..].trim().is_empty() {
                    assert_eq!(accepts(&text[..cut]), (true, false), "{:?}", &text[..cut]);
                }
            }
        }
    }

    #[test]
    fn invalid_bytes_are_refused_where_they_occur() {
        for text in [
            "[]",
            "1",
            "{,}",
            "{\"a\" 1}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":1,}",
            "{\"a\":[1,]}",
            "{\"a\":tru}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12G4\"}",
            "{\"a\":\"line\nbreak\"}",
            "{\"a\":1]",
            "{} {}",
            "{}\n",
            "{\"a\":-}",
        ] {
            assert!(!accepts(text).1, "{text}");
            let mut m = JsonMachine::object();
            assert!(!m.feed_all(text.as_bytes()), "{text} should fail part-way");
        }
    }

    #[test]
    fn whitespace_runs_are_bounded() {
        let mut m = JsonMachine::object();
        assert!(m.feed_all(b"{"));
        assert!(m.feed_all(&[b' '; MAX_WHITESPACE_RUN as usize]));
        assert!(!m.feed(b'\n'));
        let mut m = JsonMachine::object();
        assert!(m.feed_all(b"{\"k\": \"a      long      string\"}"));
        assert!(m.is_complete());
    }
}
