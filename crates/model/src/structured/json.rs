//! A byte-at-a-time JSON recogniser (RFC 8259) guided by a [`Schema`]: it accepts exactly
//! the prefixes of JSON texts that the schema allows, and says when the text so far is
//! complete. The constraint in the parent module runs every vocabulary token's bytes through a
//! copy of it to find the tokens that keep the output valid.

use super::schema::{Node, NodeId, Schema, ANY, ANY_ARRAY, ANY_LITERAL, ANY_OBJECT};

/// Consecutive whitespace bytes allowed between tokens of the grammar: enough for
/// pretty-printing a few levels deep, while a model that would loop on whitespace is made to
/// write structure instead.
pub const MAX_WHITESPACE_RUN: u8 = 12;

/// An open object or array, and the schema node it follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Frame {
    node: NodeId,
    /// Objects: the properties written so far (closed objects), and the one whose value is
    /// being written.
    seen: u64,
    key: u8,
    is_object: bool,
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
    /// Before the root object.
    Start,
    /// A value of this node is expected.
    Value(NodeId),
    /// Right after `[`: a value or `]`.
    ArrayFirst,
    /// Right after `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key.
    Key,
    /// Inside a key of a closed object: the properties still matching, `pos` bytes in.
    KeyName {
        candidates: u64,
        pos: u8,
    },
    /// After a key: `:`.
    Colon,
    /// After a value inside a container: `,` or the container's end.
    AfterValue,
    /// Inside a string; `key` says whether it is a key of an open object; `escape` is 0
    /// outside an escape, 1 right after `\`, and 5..2 while `\u`'s four hex digits come.
    Str {
        key: bool,
        escape: u8,
    },
    Num {
        num: Num,
        integer: bool,
    },
    /// Inside one of a node's exact texts: those still matching, `pos` bytes in.
    Choice {
        node: NodeId,
        candidates: u64,
        pos: u16,
    },
    /// The root object is closed: nothing may follow.
    Done,
}

/// The recogniser's state: the open containers and where in the grammar it stands. The
/// schema is passed to every call rather than held, so that copies (one per vocabulary token
/// when masking) cost no reference count.
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
        Self {
            stack: Vec::new(),
            state: State::Start,
            whitespace: 0,
        }
    }
}

/// Bits `0..n`.
fn all(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1 << n) - 1
    }
}

impl JsonMachine {
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
    /// that no text `schema` allows could have there.
    pub fn feed_all(&mut self, schema: &Schema, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed(schema, b))
    }

    /// Feeds one byte; false if no text `schema` allows continues with it.
    pub fn feed(&mut self, schema: &Schema, b: u8) -> bool {
        match self.state {
            State::Str { key, escape } => return self.string_byte(key, escape, b),
            State::KeyName { candidates, pos } => return self.key_byte(schema, candidates, pos, b),
            State::Choice {
                node,
                candidates,
                pos,
            } => {
                if let Some(r) = self.choice_byte(schema, node, candidates, pos, b) {
                    return r;
                }
            }
            State::Num { num, integer } => {
                if let Some(next) = number_byte(num, integer, b) {
                    self.state = State::Num { num: next, integer };
                    return true;
                }
                if !num.complete() {
                    return false;
                }
                // The number ends here; the byte belongs to what follows it.
                self.value_done();
            }
            _ => {}
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
        self.structural(schema, b)
    }

    /// A byte of an `enum`/`const` text: Some(whether it continues one), or None where a text
    /// ended just before it and the byte belongs to what follows.
    fn choice_byte(
        &mut self,
        schema: &Schema,
        node: NodeId,
        candidates: u64,
        pos: u16,
        b: u8,
    ) -> Option<bool> {
        let Node::Choice(texts) = schema.get(node) else {
            return Some(false);
        };
        let pos_ = pos as usize;
        let mut next = 0u64;
        let mut ended = false;
        for (i, t) in texts.iter().enumerate() {
            if candidates & (1 << i) != 0 {
                if t.get(pos_) == Some(&b) {
                    next |= 1 << i;
                }
                ended |= t.len() == pos_;
            }
        }
        if next != 0 {
            self.state = State::Choice {
                node,
                candidates: next,
                pos: pos + 1,
            };
            return Some(true);
        }
        if !ended {
            return Some(false);
        }
        // One text ended here (as `1` may where `12` goes on); the byte follows it.
        self.value_done();
        None
    }

    /// A byte outside strings, numbers and texts, whitespace aside: the grammar's punctuation
    /// and the start of values.
    fn structural(&mut self, schema: &Schema, b: u8) -> bool {
        match self.state {
            State::Start => self.value_start(schema, schema.root(), b),
            State::Value(node) => self.value_start(schema, node, b),
            State::ArrayFirst if b == b']' => self.close(false),
            State::ArrayFirst => {
                let items = self.items(schema);
                self.value_start(schema, items, b)
            }
            State::ObjectFirst if b == b'}' => self.close_object(schema),
            State::ObjectFirst | State::Key if b == b'"' => self.open_key(schema),
            State::Colon if b == b':' => {
                let node = self.property_node(schema);
                self.state = State::Value(node);
                true
            }
            State::AfterValue => self.after_value(schema, b),
            _ => false,
        }
    }

    /// A byte after a value: a comma (where another key or item may come) or the closing
    /// bracket of the container.
    fn after_value(&mut self, schema: &Schema, b: u8) -> bool {
        match (b, self.stack.last().copied()) {
            (b',', Some(f)) if f.is_object => {
                // Only where a key can still come: a closed object with properties left.
                let left = match schema.get(f.node) {
                    Node::Object { props, .. } if !props.is_empty() => {
                        all(props.len()) & !f.seen != 0
                    }
                    _ => true,
                };
                if left {
                    self.state = State::Key;
                }
                left
            }
            (b',', Some(_)) => {
                self.state = State::Value(self.items(schema));
                true
            }
            (b'}', Some(f)) if f.is_object => self.close_object(schema),
            (b']', Some(f)) if !f.is_object => self.close(false),
            _ => false,
        }
    }

    fn value_start(&mut self, schema: &Schema, node: NodeId, b: u8) -> bool {
        let open = |m: &mut Self, node: NodeId, is_object: bool| {
            m.stack.push(Frame {
                node,
                seen: 0,
                key: 0,
                is_object,
            });
            m.state = if is_object {
                State::ObjectFirst
            } else {
                State::ArrayFirst
            };
            true
        };
        match (schema.get(node), b) {
            (Node::Any, b'{') => open(self, ANY_OBJECT, true),
            (Node::Any, b'[') => open(self, ANY_ARRAY, false),
            (Node::Object { .. }, b'{') => open(self, node, true),
            (Node::Array { .. }, b'[') => open(self, node, false),
            (Node::Any | Node::String, b'"') => {
                self.state = State::Str {
                    key: false,
                    escape: 0,
                };
                true
            }
            (Node::Any | Node::Number { .. }, b'-' | b'0'..=b'9') => {
                let integer = matches!(schema.get(node), Node::Number { integer: true });
                self.state = State::Num {
                    num: match b {
                        b'-' => Num::Minus,
                        b'0' => Num::Zero,
                        _ => Num::Int,
                    },
                    integer,
                };
                true
            }
            (Node::Any, b't' | b'f' | b'n') => self.value_start(schema, ANY_LITERAL, b),
            (Node::Choice(texts), _) => {
                let mut candidates = 0u64;
                for (i, t) in texts.iter().enumerate() {
                    if t.first() == Some(&b) {
                        candidates |= 1 << i;
                    }
                }
                if candidates == 0 {
                    return false;
                }
                self.state = State::Choice {
                    node,
                    candidates,
                    pos: 1,
                };
                true
            }
            _ => false,
        }
    }

    fn open_key(&mut self, schema: &Schema) -> bool {
        let Some(f) = self.stack.last() else {
            return false;
        };
        self.state = match schema.get(f.node) {
            Node::Object { props, .. } if !props.is_empty() => State::KeyName {
                candidates: all(props.len()) & !f.seen,
                pos: 0,
            },
            _ => State::Str {
                key: true,
                escape: 0,
            },
        };
        true
    }

    fn key_byte(&mut self, schema: &Schema, candidates: u64, pos: u8, b: u8) -> bool {
        let Some(f) = self.stack.last_mut() else {
            return false;
        };
        let Node::Object { props, .. } = schema.get(f.node) else {
            return false;
        };
        let at = pos as usize;
        let mut next = 0u64;
        for (i, (name, _)) in props.iter().enumerate() {
            if candidates & (1 << i) == 0 {
                continue;
            }
            if b == b'"' && name.len() == at {
                f.key = i as u8;
                self.state = State::Colon;
                return true;
            }
            if name.get(at) == Some(&b) {
                next |= 1 << i;
            }
        }
        if next == 0 || at + 1 > u8::MAX as usize {
            return false;
        }
        self.state = State::KeyName {
            candidates: next,
            pos: pos + 1,
        };
        true
    }

    /// The node of the value after the current key.
    fn property_node(&self, schema: &Schema) -> NodeId {
        match self.stack.last().map(|f| (f, schema.get(f.node))) {
            Some((f, Node::Object { props, .. })) if !props.is_empty() => props[f.key as usize].1,
            _ => ANY,
        }
    }

    /// The node of the current array's items.
    fn items(&self, schema: &Schema) -> NodeId {
        match self.stack.last().map(|f| schema.get(f.node)) {
            Some(Node::Array { items }) => *items,
            _ => ANY,
        }
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

    /// Closes the current container, if it is an object (`object`) or an array (not).
    fn close(&mut self, object: bool) -> bool {
        match self.stack.last() {
            Some(f) if f.is_object == object => {
                self.stack.pop();
                self.value_done();
                true
            }
            _ => false,
        }
    }

    /// Closes the current object, if every required property is there.
    fn close_object(&mut self, schema: &Schema) -> bool {
        let complete = match self.stack.last() {
            Some(f) if f.is_object => match schema.get(f.node) {
                Node::Object { required, .. } => f.seen & required == *required,
                _ => true,
            },
            _ => false,
        };
        complete && self.close(true)
    }

    fn value_done(&mut self) {
        self.state = match self.stack.last_mut() {
            None => State::Done,
            Some(f) => {
                if f.is_object {
                    f.seen |= 1 << f.key;
                }
                State::AfterValue
            }
        };
    }
}

fn number_byte(n: Num, integer: bool, b: u8) -> Option<Num> {
    Some(match (n, b) {
        (Num::Minus, b'0') => Num::Zero,
        (Num::Minus, b'1'..=b'9') => Num::Int,
        (Num::Int, b'0'..=b'9') => Num::Int,
        (Num::Zero | Num::Int, b'.') if !integer => Num::Dot,
        (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') if !integer => Num::Exp,
        (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
        (Num::Exp, b'+' | b'-') => Num::ExpSign,
        (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Num::ExpDigits,
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
