//! `response_format: json_schema`: compiling any schema answers with a schema or an error, and
//! the constrained decoder fed any bytes never panics; text it completes parses as JSON.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard_model::structured::{JsonMachine, Schema};

fuzz_target!(|data: &[u8]| {
    let (schema, text) = switchyard_fuzz::split(data);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(schema) else {
        return;
    };
    let Ok(schema) = Schema::compile(&v) else {
        return;
    };
    let mut m = JsonMachine::default();
    let mut fed = Vec::new();
    for &b in text {
        if !m.feed(&schema, b) {
            break;
        }
        fed.push(b);
    }
    if m.is_complete() {
        assert!(
            serde_json::from_slice::<serde_json::Value>(&fed).is_ok(),
            "{}",
            String::from_utf8_lossy(&fed)
        );
    }
});
