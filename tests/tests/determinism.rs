//! Determinism through the real server, default flags: 32 requests at once (greedy and seeded
//! sampling, with logprobs) give each the tokens and logprob bits it gets alone, embedded and
//! over every placement of real workers (one worker, 4+4, every expert on two workers, and
//! three workers with a replicated expert); a prompt served cold and then from the prefix cache
//! gives the same logprobs.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use serde_json::{json, Value};
use switchyard_tests::{
    completion_bodies as bodies, fixtures, one_by_one, together, Server, Worker,
};

#[test]
fn concurrent_requests_give_the_bits_of_requests_alone_on_every_placement() {
    let model = fixtures().join("tiny-mixtral-trained");
    let bodies = bodies();
    let want = {
        let embedded = Server::start(&model, &[]);
        let alone = one_by_one(&embedded, &bodies);
        let at_once = together(&embedded, &bodies);
        for (i, (a, b)) in alone.iter().zip(&at_once).enumerate() {
            assert_eq!(a, b, "embedded, request {i}: together against alone");
        }
        alone
    };
    assert!(
        want.iter().any(|w| w != &want[0]),
        "the requests differ from each other"
    );
    let placements: [&[&str]; 4] = [
        &["0-7"],
        &["0-3", "4-7"],
        &["0-7", "0-7"],
        &["0-3", "3-5", "6-7"], // expert 3 on two workers
    ];
    for sets in placements {
        let workers: Vec<Worker> = sets.iter().map(|s| Worker::start(&model, s)).collect();
        let spec = workers
            .iter()
            .zip(sets)
            .map(|(w, s)| format!("{}={s}", w.addr))
            .collect::<Vec<_>>()
            .join(",");
        let server = Server::start(&model, &["--workers", &spec]);
        let got = together(&server, &bodies);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g, w,
                "workers {sets:?}, request {i}: together against embedded alone"
            );
        }
        if sets.len() == 2 && sets[0] != sets[1] {
            let alone = one_by_one(&server, &bodies);
            assert_eq!(
                alone, want,
                "workers {sets:?}: alone against embedded alone"
            );
        }
    }
}

#[test]
fn a_prompt_from_the_prefix_cache_gives_the_logprobs_of_a_cold_one() {
    let model = fixtures().join("tiny-mixtral-trained");
    let server = Server::start(&model, &[]);
    let long = "the cat sat on a warm mat while rain fell over the town and the dog slept by the \
                door until the morning came with light over the hills";
    let body = |prompt: String| {
        json!({"model": "tiny-mixtral-trained", "prompt": prompt, "max_tokens": 16, "logprobs": 2,
               "temperature": 0.0, "ignore_eos": true})
    };
    let cached = |v: &Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    let send = |prompt: &str| {
        let (status, text) = server.post("/v1/completions", &body(prompt.to_string()));
        assert_eq!(status, 200, "{text}");
        serde_json::from_str::<Value>(&text).unwrap()
    };
    let cold = send(long);
    assert_eq!(cached(&cold), Some(0), "{cold}");
    let warm = send(long);
    assert!(cached(&warm).unwrap_or(0) >= 16, "{warm}");
    assert_eq!(warm["choices"][0], cold["choices"][0]);
    // A longer prompt that begins the same: computed cold on a fresh server, and on this one
    // from the cached blocks plus its own tail.
    let longer = format!("{long} and the birds sang");
    let fresh = Server::start(&model, &[]);
    let (status, text) = fresh.post("/v1/completions", &body(longer.clone()));
    assert_eq!(status, 200, "{text}");
    let want: Value = serde_json::from_str(&text).unwrap();
    let got = send(&longer);
    assert!(cached(&got).unwrap_or(0) >= 16, "{got}");
    assert_eq!(got["choices"][0], want["choices"][0]);
}
