use super::*;
use crate::{
    loader::{ExpertSource, LoadOptions},
    request::{openai::CommonFields, validation},
};
use switchyard_model::{weights::gen, KvDtype, NoProgress};

/// An embedded engine over `dir`.
fn load(dir: &std::path::Path, kv_dtype: KvDtype) -> Arc<Engine> {
    let opts = LoadOptions {
        kv_dtype,
        ..LoadOptions::default()
    };
    Engine::load(dir, ExpertSource::Embedded, &opts, &NoProgress)
        .unwrap()
        .engine
}

/// An embedded engine over a random f32 checkpoint of hidden 64, 4 heads over 2 kv heads,
/// vocabulary 300 and `layers` layers, shaped further by `spec`; the folder lives as long
/// as the returned guard.
fn random_engine(layers: usize, spec: gen::GenSpec) -> (tempfile::TempDir, Arc<Engine>) {
    let tmp = tempfile::tempdir().unwrap();
    let spec = gen::GenSpec {
        hidden: 64,
        layers,
        heads: 4,
        kv_heads: 2,
        intermediate: 64,
        vocab: 300,
        dtype: switchyard_model::DType::F32,
        ..spec
    };
    gen::generate(&spec, tmp.path(), &|_| {}).unwrap();
    let engine = load(tmp.path(), KvDtype::F32);
    (tmp, engine)
}

/// A request of one choice per prompt, checked as the API checks it: greedy and ignoring eos
/// unless `common` says otherwise.
fn request(
    engine: &Engine,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    common: CommonFields,
) -> ValidatedRequest {
    let common = CommonFields {
        max_tokens: Some(max_tokens as i64),
        temperature: common.temperature.or(Some(0.0)),
        ignore_eos: common.ignore_eos.or(Some(true)),
        ..common
    };
    validation::token_ids(prompts.to_vec(), &common, None, &engine.limits("test")).unwrap()
}

fn greedy(engine: &Engine, prompt: Vec<u32>, max_tokens: usize) -> ValidatedRequest {
    request(engine, &[prompt], max_tokens, CommonFields::default())
}

/// Every choice's tokens, logprobs and cached prompt tokens, and why each finished.
struct Outcome {
    ids: Vec<Vec<u32>>,
    logprobs: Vec<Vec<f32>>,
    cached: Vec<usize>,
    finish: Vec<Option<(FinishReason, usize)>>,
}

/// Reads `stream` to its end.
fn drain(mut stream: RequestStream, choices: usize) -> Outcome {
    let mut o = Outcome {
        ids: vec![Vec::new(); choices],
        logprobs: vec![Vec::new(); choices],
        cached: vec![usize::MAX; choices],
        finish: vec![None; choices],
    };
    while let Some((i, ev)) = stream.blocking_recv() {
        match ev {
            SeqEvent::Started { cached_tokens } => o.cached[i] = cached_tokens,
            SeqEvent::Token { id, logprob, .. } => {
                o.ids[i].push(id);
                o.logprobs[i].extend(logprob);
            }
            SeqEvent::Finished {
                reason,
                completion_tokens,
                ..
            } => o.finish[i] = Some((reason, completion_tokens)),
            SeqEvent::Failed(f) => panic!("{f:?}"),
        }
    }
    o
}

fn submit(handle: &SchedulerHandle, req: &ValidatedRequest) -> Outcome {
    drain(handle.submit(req).unwrap(), req.choices())
}

/// What `req` generates run alone, on a scheduler of its own sized for it.
fn alone(engine: &Arc<Engine>, req: &ValidatedRequest) -> Outcome {
    let (_handle, stream) = run_alone(engine.clone(), req).unwrap();
    drain(stream, req.choices())
}

fn blocks(engine: &Engine, n: usize, dtype: KvDtype) -> usize {
    n * KvCache::<switchyard_model::AnyBackend>::block_bytes(engine.config(), 16, dtype)
}

/// Waits until every block is back in the pool (stats are published at the end of the
/// iteration that sent the last event).
fn assert_all_blocks_return(handle: &SchedulerHandle) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while handle.stats().kv_blocks_used != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(handle.stats().kv_blocks_used, 0, "every block returned");
}

#[test]
fn a_request_reports_its_tokens_and_finish_and_the_engine_serves_on() {
    let (_dir, engine) = random_engine(1, gen::GenSpec::default());
    let cfg = SchedulerConfig {
        kv_cache_bytes: blocks(&engine, 4, KvDtype::F32),
        ..SchedulerConfig::default()
    };
    let handle = start(engine.clone(), cfg).unwrap();
    for _ in 0..2 {
        let o = submit(&handle, &greedy(&engine, vec![1, 2], 2));
        assert_eq!(o.ids[0].len(), 2);
        assert_eq!(o.finish[0], Some((FinishReason::Length, 2)));
    }
}

#[test]
fn sliding_window_sequences_outgrow_the_cache_and_match_full_cache_generation() {
    let (_dir, engine) = random_engine(
        2,
        gen::GenSpec {
            sliding_window: Some(8),
            max_position_embeddings: 256,
            ..gen::GenSpec::default()
        },
    );
    let prompt: Vec<u32> = vec![1, 40, 41, 42, 43];
    let req = greedy(&engine, prompt, 150);
    let want = alone(&engine, &req).ids;

    // Room for 6 blocks of 16 positions: far less than the 155 positions generated.
    let cfg = SchedulerConfig {
        kv_cache_bytes: blocks(&engine, 6, KvDtype::F32),
        ..SchedulerConfig::default()
    };
    let handle = start(engine, cfg).unwrap();
    assert_eq!(handle.max_seq_len, 256);
    let got = submit(&handle, &req);
    assert_eq!(got.finish[0], Some((FinishReason::Length, 150)));
    assert_eq!(got.ids, want);
}

#[test]
fn a_bf16_cache_holds_twice_the_positions_and_generates_as_the_engine_alone() {
    let (dir, _) = random_engine(2, gen::GenSpec::default());
    let engine = load(dir.path(), KvDtype::Bf16);
    let req = greedy(&engine, vec![1, 40, 41, 42, 43], 40);
    let want = alone(&engine, &req).ids;
    // The bytes of 4 f32 blocks hold 8 bf16 ones.
    let cfg = SchedulerConfig {
        kv_cache_bytes: blocks(&engine, 4, KvDtype::F32),
        ..SchedulerConfig::default()
    };
    let handle = start(engine, cfg).unwrap();
    assert_eq!(handle.stats().kv_blocks_total, 8);
    assert_eq!(handle.max_seq_len, 8 * 16);
    let got = submit(&handle, &req);
    assert_eq!(got.finish[0].map(|f| f.0), Some(FinishReason::Length));
    assert_eq!(got.ids, want);
}

#[test]
fn preempted_sequences_are_recomputed_and_finish_with_the_same_output() {
    let engine = load(&crate::fixture("tiny-mixtral"), KvDtype::F32);
    let prompts: Vec<Vec<u32>> = vec![vec![1, 10, 11], vec![1, 20, 21, 22], vec![1, 30]];
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            alone(&engine, &greedy(&engine, p.clone(), 60))
                .ids
                .remove(0)
        })
        .collect();
    // 6 blocks of 16 positions for three sequences of ~63 positions each.
    let cfg = SchedulerConfig {
        kv_cache_bytes: blocks(&engine, 6, KvDtype::F32),
        ..SchedulerConfig::default()
    };
    let handle = start(engine.clone(), cfg).unwrap();
    let got = submit(
        &handle,
        &request(&engine, &prompts, 60, CommonFields::default()),
    );
    assert_eq!(got.ids, want);
    assert!(
        handle.stats().preemptions > 0,
        "the cache was too small not to preempt"
    );
    assert_all_blocks_return(&handle);
}

fn assert_same_bits(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(want) {
        assert_eq!(a.to_bits(), b.to_bits(), "{a} against {b}");
    }
}

/// Each choice's tokens, and its logprobs' bits.
fn bits(o: &Outcome) -> Vec<(Vec<u32>, Vec<u32>)> {
    o.ids
        .iter()
        .zip(&o.logprobs)
        .map(|(ids, lps)| (ids.clone(), lps.iter().map(|v| v.to_bits()).collect()))
        .collect()
}

/// 32 requests on the trained fixture, prompts of 5 to 44 tokens: even ones greedy, odd ones
/// sampled at temperature 0.9 with a seed of their own; 12 tokens each, with logprobs.
fn mixed_requests(engine: &Engine) -> Vec<ValidatedRequest> {
    (0..32u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..5 + i * 3 % 40)
                .map(|k| 1 + (k * 37 + i * 11) % 4000)
                .collect();
            let sampled = i % 2 == 1;
            let common = CommonFields {
                max_tokens: Some(12),
                temperature: Some(if sampled { 0.9 } else { 0.0 }),
                seed: sampled.then_some(i64::from(i) * 1000 + 7),
                ignore_eos: Some(true),
                ..CommonFields::default()
            };
            validation::token_ids(vec![prompt], &common, Some(2), &engine.limits("test")).unwrap()
        })
        .collect()
}

#[test]
fn thirty_two_requests_together_give_each_the_bits_it_gets_alone() {
    // Greedy and seeded sampling alike: the logits of a token do not depend on the other
    // sequences of its steps, nor on its prompt's being prefilled beside others' decodes.
    for kv_dtype in [KvDtype::F32, KvDtype::Bf16] {
        let engine = load(&crate::fixture("tiny-mixtral-trained"), kv_dtype);
        let reqs = mixed_requests(&engine);
        let handle = start(engine.clone(), SchedulerConfig::default()).unwrap();
        let streams: Vec<_> = reqs.iter().map(|r| handle.submit(r).unwrap()).collect();
        let together: Vec<Outcome> = std::thread::scope(|s| {
            let readers: Vec<_> = streams
                .into_iter()
                .map(|st| s.spawn(move || drain(st, 1)))
                .collect();
            readers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        for (i, (req, got)) in reqs.iter().zip(&together).enumerate() {
            let want = alone(&engine, req);
            assert_eq!(got.ids[0].len(), 12);
            assert_eq!(bits(got), bits(&want), "{kv_dtype:?}: request {i}");
        }
    }
}

#[test]
fn a_prompt_prefilled_in_chunks_of_any_size_gives_the_bits_of_one_step() {
    let engine = load(&crate::fixture("tiny-mixtral-trained"), KvDtype::Bf16);
    let prompt: Vec<u32> = (0..150u32).map(|k| 1 + (k * 53) % 4000).collect();
    let common = CommonFields {
        max_tokens: Some(8),
        temperature: Some(0.0),
        ignore_eos: Some(true),
        ..CommonFields::default()
    };
    let req =
        validation::token_ids(vec![prompt], &common, Some(2), &engine.limits("test")).unwrap();
    let whole = alone(&engine, &req);
    for chunk in [1, 7, 64] {
        let cfg = SchedulerConfig {
            max_batch_tokens: chunk,
            ..SchedulerConfig::default()
        };
        let handle = start(engine.clone(), cfg).unwrap();
        assert_eq!(
            bits(&submit(&handle, &req)),
            bits(&whole),
            "chunks of {chunk}"
        );
    }
}

#[test]
fn prompts_that_share_a_beginning_reuse_its_blocks_and_generate_the_same() {
    let (dir, engine) = random_engine(2, gen::GenSpec::default());
    let cfg = |prefix_caching| SchedulerConfig {
        kv_cache_bytes: blocks(&engine, 32, KvDtype::F32),
        prefix_caching,
        ..SchedulerConfig::default()
    };
    let cached = start(engine.clone(), cfg(true)).unwrap();
    let plain = start(load(dir.path(), KvDtype::F32), cfg(false)).unwrap();
    let with_logprobs = |prompt: Vec<u32>, n| {
        let common = CommonFields {
            max_tokens: Some(n as i64),
            temperature: Some(0.0),
            ignore_eos: Some(true),
            ..CommonFields::default()
        };
        validation::token_ids(vec![prompt], &common, Some(0), &engine.limits("test")).unwrap()
    };
    let run = |h: &SchedulerHandle, prompt: Vec<u32>, n| {
        let o = submit(h, &with_logprobs(prompt, n));
        (o.ids[0].clone(), o.logprobs[0].clone(), o.cached[0])
    };
    let prompt: Vec<u32> = (0..40).map(|i| 1 + (i * 37) % 299).collect();

    let (ids, lps, hit) = run(&cached, prompt.clone(), 20);
    assert_eq!(hit, 0, "nothing cached yet");
    assert_eq!(
        run(&plain, prompt.clone(), 20),
        (ids.clone(), lps.clone(), 0)
    );

    // The same prompt again: its two full blocks come from the cache and only the last 8
    // tokens are computed, in a step of another shape, which changes no bit.
    let (ids1, lps1, hit1) = run(&cached, prompt.clone(), 20);
    assert_eq!((&ids1, hit1), (&ids, 32));
    assert_same_bits(&lps1, &lps);

    // The next turn of a conversation: the prompt and its answer, then a new question. The
    // blocks filled while decoding are found too.
    let mut turn: Vec<u32> = prompt.iter().chain(&ids).copied().collect();
    turn.extend([7, 8, 9]);
    let (ids2, lps2, hit2) = run(&cached, turn.clone(), 12);
    assert_eq!(hit2, 48, "(63 - 1) / 16 whole blocks");
    let (want_ids, want_lps, _) = run(&plain, turn.clone(), 12);
    assert_eq!(ids2, want_ids);
    assert_same_bits(&lps2, &want_lps);

    // A prompt that differs in its first token shares nothing.
    let mut other = prompt.clone();
    other[0] = 2;
    assert_eq!(run(&cached, other, 4).2, 0);
    // Blocks are held only while their sequences run.
    assert_all_blocks_return(&cached);
}

#[test]
fn sequences_arriving_together_with_one_prompt_compute_it_once() {
    let (_dir, engine) = random_engine(2, gen::GenSpec::default());
    let cfg = SchedulerConfig {
        kv_cache_bytes: blocks(&engine, 32, KvDtype::F32),
        ..SchedulerConfig::default()
    };
    let handle = start(engine.clone(), cfg).unwrap();
    let prompt: Vec<u32> = (0..40).map(|i| 1 + (i * 37) % 299).collect();
    let req = request(
        &engine,
        &[prompt.clone(), prompt.clone(), prompt],
        6,
        CommonFields::default(),
    );
    let got = submit(&handle, &req);
    let mut hits = got.cached.clone();
    hits.sort_unstable();
    assert_eq!(
        hits,
        [0, 32, 32],
        "one computes the prompt, the others wait for its blocks"
    );
    assert!(
        got.ids.iter().all(|g| g.len() == 6 && *g == got.ids[0]),
        "{:?}",
        got.ids
    );
}

#[test]
fn a_cancelled_choice_ends_and_its_siblings_finish() {
    let (_dir, engine) = random_engine(1, gen::GenSpec::default());
    let handle = start(engine.clone(), SchedulerConfig::default()).unwrap();
    let req = request(
        &engine,
        &[vec![1, 2, 3], vec![1, 4, 5]],
        50,
        CommonFields::default(),
    );
    let mut stream = handle.submit(&req).unwrap();
    let mut tokens = [0usize; 2];
    let mut finished = [false; 2];
    while let Some((i, ev)) = stream.blocking_recv() {
        match ev {
            SeqEvent::Token { .. } => {
                tokens[i] += 1;
                if i == 0 && tokens[0] == 1 {
                    stream.cancel(0);
                }
            }
            SeqEvent::Finished { .. } => finished[i] = true,
            SeqEvent::Started { .. } => {}
            SeqEvent::Failed(f) => panic!("{f:?}"),
        }
        if finished[1] {
            break;
        }
    }
    assert!(!finished[0] && tokens[0] < 50, "{tokens:?}");
    assert_eq!(tokens[1], 50);
    assert_all_blocks_return(&handle);
}

#[test]
fn a_json_constraint_keeps_every_choice_a_valid_json_object() {
    use switchyard_model::structured::{JsonMachine, Schema, TokenBytes};
    let any = Schema::any_object();
    let (_dir, engine) = random_engine(2, gen::GenSpec::default());
    let vocab = TokenBytes::new(engine.tokenizer(), engine.config().vocab_size);
    let handle = start(engine.clone(), SchedulerConfig::default()).unwrap();
    let mut stopped = 0;
    for seed in 0..6i64 {
        let req = request(
            &engine,
            &[vec![1, 40, 41, 42]],
            60,
            CommonFields {
                temperature: Some(1.0),
                seed: Some(seed),
                ignore_eos: Some(false),
                response_format: Some(serde_json::json!({"type": "json_object"})),
                ..CommonFields::default()
            },
        );
        let mut stream = handle.submit(&req).unwrap();
        let mut machine = JsonMachine::default();
        loop {
            match stream.blocking_recv().unwrap().1 {
                SeqEvent::Token { id, .. } => {
                    if let Some(b) = vocab.get(id) {
                        assert!(machine.feed_all(&any, b), "token {id} breaks the JSON");
                    } else {
                        assert!(machine.is_complete(), "a special token mid-object");
                    }
                }
                SeqEvent::Finished { reason, .. } => {
                    if reason == FinishReason::Stop {
                        assert!(machine.is_complete());
                        stopped += 1;
                    }
                    break;
                }
                SeqEvent::Started { .. } => {}
                SeqEvent::Failed(f) => panic!("{f:?}"),
            }
        }
    }
    // Random weights ramble, but some choices close their object and stop.
    assert!(stopped > 0);
}

#[test]
fn an_engine_panic_ends_its_requests_streams_and_stops_the_handle() {
    let (_dir, engine) = random_engine(1, gen::GenSpec::default());
    let handle = start(engine.clone(), SchedulerConfig::default()).unwrap();
    let req = greedy(&engine, vec![1, 2, 3], 200);
    let mut stream = handle.submit(&req).unwrap();
    // Let it start, then take the engine down mid-request.
    while !matches!(stream.blocking_recv(), Some((_, SeqEvent::Token { .. }))) {}
    handle.panic_engine();
    let mut finished = false;
    while let Some((_, ev)) = stream.blocking_recv() {
        finished |= matches!(ev, SeqEvent::Finished { .. });
    }
    assert!(
        !finished,
        "the stream ends without a finish: its reader answers with an error"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(10), handle.stopped())
            .await
            .expect("the handle sees the engine stop");
    });
    assert!(!handle.is_alive());
    assert!(matches!(handle.submit(&req), Err(SubmitError::Stopped)));
}

/// Waits for the first token of `stream`'s choice 0: it is running.
fn wait_running(stream: &mut RequestStream) {
    while !matches!(stream.blocking_recv(), Some((_, SeqEvent::Token { .. }))) {}
}

/// The failure a stream ends with, if any.
fn failure(mut stream: RequestStream) -> Option<SeqFailure> {
    while let Some((_, ev)) = stream.blocking_recv() {
        if let SeqEvent::Failed(f) = ev {
            return Some(f);
        }
    }
    None
}

#[test]
fn a_full_queue_refuses_new_requests_and_the_running_one_finishes() {
    let (_dir, engine) = random_engine(1, gen::GenSpec::default());
    let cfg = SchedulerConfig {
        max_running: 1,
        max_waiting: 1,
        ..SchedulerConfig::default()
    };
    let handle = start(engine.clone(), cfg).unwrap();
    let long = greedy(&engine, vec![1, 2, 3], 3000);
    let mut running = handle.submit(&long).unwrap();
    wait_running(&mut running);
    let waiting = handle.submit(&greedy(&engine, vec![1, 4], 2)).unwrap();
    // Once the engine has taken it into its queue, the channel is empty again...
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while handle.stats().waiting != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // ...and the queue holds one sequence: a request of two does not fit beside it.
    let two = request(
        &engine,
        &[vec![1, 5], vec![1, 6]],
        2,
        CommonFields::default(),
    );
    let refused = handle.submit(&two).unwrap();
    assert!(matches!(failure(refused), Some(SeqFailure::QueueFull)));
    drop(running);
    assert!(
        failure(waiting).is_none(),
        "the queued request runs once room frees"
    );
}

#[test]
fn a_sequence_that_waits_past_the_queue_deadline_fails() {
    let (_dir, engine) = random_engine(1, gen::GenSpec::default());
    let cfg = SchedulerConfig {
        max_running: 1,
        queue_timeout: std::time::Duration::from_millis(20),
        ..SchedulerConfig::default()
    };
    let handle = start(engine.clone(), cfg).unwrap();
    let mut running = handle
        .submit(&greedy(&engine, vec![1, 2, 3], 3000))
        .unwrap();
    wait_running(&mut running);
    let late = handle.submit(&greedy(&engine, vec![1, 4], 2)).unwrap();
    assert!(matches!(failure(late), Some(SeqFailure::QueueTimeout(_))));
    drop(running);
    assert_all_blocks_return(&handle);
}
