//! JSON Schemas compiled for the recogniser: a flat list of nodes that the machine's frames
//! point into. The subset is what structured-output users write most: objects with properties
//! and `required`, arrays with `items`, strings, integers, numbers, booleans, null, `enum` and
//! `const`. Anything that would constrain more than the recogniser can check (patterns,
//! lengths, bounds, unions, references) is refused rather than ignored, so a response never
//! claims to follow a schema it was not held to; only `format` is accepted unenforced.

use serde_json::Value;

/// Index of a node in [`Schema`].
pub type NodeId = u16;

/// Any JSON value.
pub const ANY: NodeId = 0;
/// An object with any keys and any values.
pub const ANY_OBJECT: NodeId = 1;
/// An array of any values.
pub const ANY_ARRAY: NodeId = 2;
/// `true`, `false` or `null`, where any value may stand.
pub const ANY_LITERAL: NodeId = 3;

/// Most properties an object schema may list, and most alternatives of an `enum`: the
/// machine tracks them in 64-bit masks.
pub const MAX_ALTERNATIVES: usize = 64;
const MAX_DEPTH: usize = 32;
/// Longest property name, in bytes (the machine counts a key's bytes in a `u8`).
const MAX_NAME: usize = 255;
/// Longest `enum` or `const` text, in bytes.
const MAX_TEXT: usize = 4096;

#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    Any,
    /// `props` empty: any keys with any values; otherwise exactly these keys (each at most
    /// once, `required` ones all present), each value by its schema.
    Object {
        props: Vec<(Box<[u8]>, NodeId)>,
        required: u64,
    },
    Array {
        items: NodeId,
    },
    String,
    Number {
        integer: bool,
    },
    /// One of these exact JSON texts (`enum`, `const`, booleans, null).
    Choice(Vec<Box<[u8]>>),
}

/// A compiled schema whose root is an object.
#[derive(Clone, Debug)]
pub struct Schema {
    nodes: Vec<Node>,
    root: NodeId,
}

impl Schema {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    #[must_use]
    pub fn any_object() -> Self {
        Self {
            nodes: vec![
                Node::Any,
                Node::Object {
                    props: Vec::new(),
                    required: 0,
                },
                Node::Array { items: ANY },
                Node::Choice(vec![
                    b"true"[..].into(),
                    b"false"[..].into(),
                    b"null"[..].into(),
                ]),
            ],
            root: ANY_OBJECT,
        }
    }

    /// Compiles a JSON Schema whose root is an object; the error names what is not supported.
    pub fn compile(schema: &Value) -> Result<Self, String> {
        let mut s = Self::any_object();
        s.root = s.node(schema, 0)?;
        match s.nodes[s.root as usize] {
            Node::Object { .. } => Ok(s),
            _ => Err("the schema's root must be an object (\"type\": \"object\")".into()),
        }
    }

    pub(super) fn root(&self) -> NodeId {
        self.root
    }

    pub(super) fn get(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    fn push(&mut self, n: Node) -> Result<NodeId, String> {
        let id = NodeId::try_from(self.nodes.len()).map_err(|_| "the schema is too large")?;
        self.nodes.push(n);
        Ok(id)
    }

    fn node(&mut self, v: &Value, depth: usize) -> Result<NodeId, String> {
        if depth > MAX_DEPTH {
            return Err(format!("the schema nests deeper than {MAX_DEPTH} levels"));
        }
        let o = match v {
            Value::Bool(true) => return Ok(ANY),
            Value::Object(o) => o,
            other => return Err(format!("a schema must be an object, got {other}")),
        };
        const IGNORED: &[&str] = &[
            "title",
            "description",
            "default",
            "examples",
            "$schema",
            "$id",
            "$comment",
            "format",
            "additionalProperties",
            "strict",
        ];
        const KNOWN: &[&str] = &["type", "properties", "required", "items", "enum", "const"];
        if let Some(k) = o
            .keys()
            .find(|k| !IGNORED.contains(&k.as_str()) && !KNOWN.contains(&k.as_str()))
        {
            return Err(format!("the schema keyword {k:?} is not supported"));
        }
        if let Some(c) = o.get("const") {
            return self.push(Node::Choice(vec![text(c)?]));
        }
        if let Some(e) = o.get("enum") {
            let list = e
                .as_array()
                .filter(|l| !l.is_empty() && l.len() <= MAX_ALTERNATIVES);
            let list =
                list.ok_or_else(|| format!("enum must list 1 to {MAX_ALTERNATIVES} values"))?;
            let mut texts = list.iter().map(text).collect::<Result<Vec<_>, _>>()?;
            texts.dedup();
            return self.push(Node::Choice(texts));
        }
        let ty = match o.get("type") {
            None => return Ok(ANY),
            Some(Value::String(t)) => t.as_str(),
            Some(other) => return Err(format!("type must be one string, got {other}")),
        };
        match ty {
            "object" => self.object(o, depth),
            "array" => {
                let items = match o.get("items") {
                    None => ANY,
                    Some(sub) => self.node(sub, depth + 1)?,
                };
                self.push(Node::Array { items })
            }
            "string" => self.push(Node::String),
            "integer" => self.push(Node::Number { integer: true }),
            "number" => self.push(Node::Number { integer: false }),
            "boolean" => self.push(Node::Choice(vec![b"true"[..].into(), b"false"[..].into()])),
            "null" => self.push(Node::Choice(vec![b"null"[..].into()])),
            other => Err(format!("type {other:?} is not supported")),
        }
    }

    /// An object schema: its properties (each compiled), which are required, no others.
    fn object(
        &mut self,
        o: &serde_json::Map<String, Value>,
        depth: usize,
    ) -> Result<NodeId, String> {
        let props = match o.get("properties") {
            None if o.contains_key("required") => {
                return Err("required needs the properties it names".into())
            }
            None => return Ok(ANY_OBJECT),
            Some(Value::Object(p)) => p,
            Some(other) => return Err(format!("properties must be an object, got {other}")),
        };
        if props.len() > MAX_ALTERNATIVES {
            return Err(format!(
                "an object may list at most {MAX_ALTERNATIVES} properties"
            ));
        }
        let mut list = Vec::with_capacity(props.len());
        for (name, sub) in props {
            if name.len() > MAX_NAME {
                return Err(format!("property names may be at most {MAX_NAME} bytes"));
            }
            if name.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
                return Err(format!(
                    "the property name {name:?} needs escaping, which is not supported"
                ));
            }
            list.push((name.as_bytes().into(), self.node(sub, depth + 1)?));
        }
        let mut required = 0u64;
        for r in o
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = r.as_str().ok_or("required must list property names")?;
            let i = props
                .keys()
                .position(|k| k == name)
                .ok_or_else(|| format!("required property {name:?} is not in properties"))?;
            required |= 1 << i;
        }
        if props.is_empty() {
            return Ok(ANY_OBJECT);
        }
        self.push(Node::Object {
            props: list,
            required,
        })
    }
}

/// A value's compact JSON text: what an `enum` or `const` member must be written as.
fn text(v: &Value) -> Result<Box<[u8]>, String> {
    let t = v.to_string();
    if t.len() > MAX_TEXT {
        return Err(format!(
            "enum and const values may be at most {MAX_TEXT} bytes of JSON"
        ));
    }
    Ok(t.into_bytes().into_boxed_slice())
}
