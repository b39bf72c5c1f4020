//! A request body on /v1/completions and /v1/chat/completions: parsed and validated (with the
//! trained fixture's tokenizer and chat template) into a request that keeps every promise, or
//! refused with an error.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard_coordinator::request::{
    openai::{ChatRequest, CompletionRequest},
    validation, RequestLimits,
};

fuzz_target!(|data: &[u8]| {
    let limits = RequestLimits {
        model_name: "m".into(),
        max_n: 4,
        max_prompts: 8,
        max_seq_len: 256,
        vocab_size: 32000,
    };
    let tok = switchyard_fuzz::tokenizer();
    let mut done = Vec::new();
    if let Ok(b) = serde_json::from_slice::<CompletionRequest>(data) {
        done.push(validation::completion(b, tok, &limits));
    }
    if let Ok(b) = serde_json::from_slice::<ChatRequest>(data) {
        done.push(validation::chat(b, tok, &limits));
    }
    for (r, _) in done.into_iter().flatten() {
        assert!(r.n() >= 1 && r.n() <= limits.max_n);
        assert!(!r.prompts().is_empty() && r.prompts().len() <= limits.max_prompts);
        for (i, p) in r.prompts().iter().enumerate() {
            assert!(!p.is_empty() && r.max_tokens(i) >= 1);
            assert!(p.len() + r.max_tokens(i) <= limits.max_seq_len);
            assert!(r.min_tokens() <= r.max_tokens(i));
            assert!(p.iter().all(|&t| (t as usize) < limits.vocab_size));
        }
        assert!(r.stop_strings().len() <= 4);
    }
});
