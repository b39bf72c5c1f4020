use super::*;

fn accepts_with(schema: &Schema, text: &str) -> (bool, bool) {
    let mut m = JsonMachine::default();
    let ok = m.feed_all(schema, text.as_bytes());
    (ok, ok && m.is_complete())
}

fn accepts(text: &str) -> (bool, bool) {
    accepts_with(&Schema::any_object(), text)
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
        let mut m = JsonMachine::default();
        assert!(
            !m.feed_all(&Schema::any_object(), text.as_bytes()),
            "{text} should fail part-way"
        );
    }
}

#[test]
fn whitespace_runs_are_bounded() {
    let any = Schema::any_object();
    let mut m = JsonMachine::default();
    assert!(m.feed_all(&any, b"{"));
    assert!(m.feed_all(&any, &[b' '; MAX_WHITESPACE_RUN as usize]));
    assert!(!m.feed(&any, b'\n'));
    let mut m = JsonMachine::default();
    assert!(m.feed_all(&any, b"{\"k\": \"a      long      string\"}"));
    assert!(m.is_complete());
}

fn schema(v: serde_json::Value) -> Schema {
    Schema::compile(&v).unwrap()
}

#[test]
fn a_schema_holds_keys_types_and_required_properties() {
    let s = schema(serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "kind": {"enum": ["cat", "caterpillar", 1, 12, null]},
            "ok": {"type": "boolean"},
            "meta": {"type": "object"},
            "child": {"type": "object", "properties": {"id": {"const": 7}}, "required": ["id"]}
        },
        "required": ["name", "age"]
    }));
    for text in [
        r#"{"name": "Ann", "age": 31}"#,
        r#"{"age": -4, "name": "", "score": 2.5e-3, "tags": ["a", "b"], "ok": false}"#,
        r#"{"name":"x","age":0,"kind":"caterpillar","meta":{"any":[1,{"deep":null}]}}"#,
        r#"{"name":"x","age":0,"kind":"cat","child":{"id":7}}"#,
        r#"{"name":"x","age":0,"kind":1,"tags":[]}"#,
        r#"{"name":"x","age":0,"kind":12}"#,
        r#"{"name":"x","age":0,"kind":null}"#,
    ] {
        assert_eq!(accepts_with(&s, text), (true, true), "{text}");
        assert!(serde_json::from_str::<serde_json::Value>(text).is_ok());
    }
    for text in [
        r#"{"name": "Ann"}"#,                         // age is required
        r#"{"name": "Ann", "age": 3.5}"#,             // an integer
        r#"{"name": "Ann", "age": 3, "other": 1}"#,   // no such property
        r#"{"name": "Ann", "name": "Bo", "age": 3}"#, // twice
        r#"{"name": 5, "age": 3}"#,
        r#"{"name":"x","age":0,"tags":[1]}"#,
        r#"{"name":"x","age":0,"kind":"dog"}"#,
        r#"{"name":"x","age":0,"kind":123}"#,
        r#"{"name":"x","age":0,"ok":null}"#,
        r#"{"name":"x","age":0,"child":{}}"#,
        r#"{"name":"x","age":0,"child":{"id":8}}"#,
        r#"["name"]"#,
    ] {
        assert!(!accepts_with(&s, text).1, "{text}");
    }
    // A comma only where a property can still come.
    let one =
        schema(serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}}));
    assert_eq!(accepts_with(&one, r#"{"a": 1"#), (true, false));
    assert!(!accepts_with(&one, r#"{"a": 1,"#).0);
    assert_eq!(accepts_with(&one, "{}"), (true, true), "nothing required");
}

#[test]
fn unsupported_schemas_are_refused_by_name() {
    for (v, says) in [
        (serde_json::json!({"type": "string"}), "root"),
        (
            serde_json::json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}),
            "pattern",
        ),
        (serde_json::json!({"anyOf": []}), "anyOf"),
        (
            serde_json::json!({"type": ["string", "null"]}),
            "one string",
        ),
        (
            serde_json::json!({"type": "object", "properties": {"a": {}}, "required": ["b"]}),
            "not in properties",
        ),
        (
            serde_json::json!({"type": "object", "properties": {"a\"": {}}}),
            "escaping",
        ),
        (
            serde_json::json!({"type": "object", "properties": {"a": {"enum": []}}}),
            "enum",
        ),
        (
            serde_json::json!({"type": "object", "required": ["a"]}),
            "required needs",
        ),
        (
            serde_json::json!({"type": "object", "properties": {"k".repeat(300): {}}}),
            "at most 255",
        ),
        (
            serde_json::json!({"type": "object", "properties": {"a": {"const": "x".repeat(5000)}}}),
            "at most 4096",
        ),
    ] {
        let e = Schema::compile(&v).unwrap_err();
        assert!(e.contains(says), "{v}: {e}");
    }
    let mut deep = serde_json::json!({"type": "string"});
    for _ in 0..40 {
        deep = serde_json::json!({"type": "object", "properties": {"a": deep}});
    }
    assert!(Schema::compile(&deep).unwrap_err().contains("deeper"));
}

mod props {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// JSON Schema-like values: the keywords the compiler knows, mixed with anything.
    fn schema_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(json!({"type": "string"})),
            Just(json!({"type": "integer"})),
            Just(json!({"type": "number"})),
            Just(json!({"type": "boolean"})),
            Just(json!({"type": "null"})),
            Just(json!({"enum": ["a", 1, null, "ab"]})),
            Just(json!({"const": {"k": [1, 2]}})),
            Just(json!({"type": "object"})),
            Just(json!(true)),
            Just(json!({"type": ["string", "null"]})),
            Just(json!({"pattern": "x"})),
            any::<i64>().prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                inner
                    .clone()
                    .prop_map(|i| json!({"type": "array", "items": i})),
                prop::collection::btree_map("[a-c\"]{1,3}", inner, 0..4).prop_map(|props| {
                    let required: Vec<&String> = props.keys().take(1).collect();
                    json!({"type": "object", "properties": props, "required": required})
                }),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Compiling any schema answers with a schema or an error, and feeding any bytes to a
        /// compiled schema's machine never panics; a machine that accepted every byte and
        /// completed holds text that parses as JSON.
        #[test]
        fn any_schema_and_any_bytes_never_panic(
            v in schema_value(),
            bytes in prop::collection::vec(prop::sample::select(b"{}[]\":,0123456789.-+eEtruefalsn abc\\\n".to_vec()), 0..64),
        ) {
            let schema = Schema::compile(&json!({"type": "object", "properties": {"x": v}}))
                .unwrap_or_else(|_| Schema::any_object());
            let mut m = JsonMachine::default();
            let mut fed = Vec::new();
            for &b in &bytes {
                if !m.feed(&schema, b) {
                    break;
                }
                fed.push(b);
            }
            if m.is_complete() {
                prop_assert!(serde_json::from_slice::<Value>(&fed).is_ok(), "{}", String::from_utf8_lossy(&fed));
            }
        }
    }
}
