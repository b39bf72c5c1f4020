//! One test per rule: each builds the smallest body that breaks it and checks the error
//! names the right field.

use super::*;
use crate::request::openai::{ChatMessageIn, StreamOptions};

fn tok() -> Tokenizer {
    Tokenizer::from_dir(&crate::fixture("tiny-mixtral-trained")).unwrap()
}

fn limits() -> RequestLimits {
    RequestLimits {
        model_name: "m".into(),
        max_n: 4,
        max_prompts: 8,
        max_seq_len: 64,
        vocab_size: 32000,
    }
}

fn common(f: impl FnOnce(&mut CommonFields)) -> CommonFields {
    let mut c = CommonFields {
        model: Some("m".into()),
        ..CommonFields::default()
    };
    f(&mut c);
    c
}

fn completion_with(c: CommonFields, prompt: Prompt) -> Result<(ValidatedRequest, ResponseShape)> {
    let body = CompletionRequest {
        common: c,
        prompt: Some(prompt),
        ..CompletionRequest::default()
    };
    completion(body, &tok(), &limits())
}

fn ok_prompt() -> Prompt {
    Prompt::Ids(vec![1, 2, 3])
}

/// The field a refused body names.
fn param_of(r: Result<(ValidatedRequest, ResponseShape)>) -> Option<&'static str> {
    match r {
        Err(RequestError::Invalid { param, .. }) => param,
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("accepted"),
    }
}

fn refused(f: impl FnOnce(&mut CommonFields)) -> Option<&'static str> {
    param_of(completion_with(common(f), ok_prompt()))
}

#[test]
fn a_plain_completion_passes_with_its_defaults() {
    let (r, shape) = completion_with(common(|_| {}), ok_prompt()).unwrap();
    assert_eq!(r.prompts(), &[vec![1, 2, 3]]);
    assert_eq!((r.n(), r.max_tokens(0), r.choices()), (1, 16, 1));
    assert_eq!(r.sampling().temperature, 1.0);
    assert!(!shape.stream && shape.echo.is_none());
}

#[test]
fn the_model_is_required_and_must_be_the_served_one() {
    assert_eq!(refused(|c| c.model = None), Some("model"));
    let r = completion_with(common(|c| c.model = Some("other".into())), ok_prompt());
    assert!(matches!(r, Err(RequestError::UnknownModel { .. })));
}

#[test]
fn n_is_in_one_to_max_n() {
    assert_eq!(refused(|c| c.n = Some(0)), Some("n"));
    assert_eq!(refused(|c| c.n = Some(5)), Some("n"));
    let (r, _) = completion_with(common(|c| c.n = Some(4)), ok_prompt()).unwrap();
    assert_eq!(r.choices(), 4);
}

#[test]
fn max_tokens_is_at_least_one_and_fits_the_context() {
    assert_eq!(refused(|c| c.max_tokens = Some(0)), Some("max_tokens"));
    assert_eq!(refused(|c| c.max_tokens = Some(65)), Some("max_tokens"));
    // 3 prompt tokens + 62 > 64.
    assert_eq!(refused(|c| c.max_tokens = Some(62)), Some("max_tokens"));
    let (r, _) = completion_with(common(|c| c.max_tokens = Some(61)), ok_prompt()).unwrap();
    assert_eq!(r.max_tokens(0), 61);
}

#[test]
fn sampling_values_are_in_range() {
    assert_eq!(refused(|c| c.temperature = Some(-0.1)), Some("temperature"));
    assert_eq!(refused(|c| c.temperature = Some(2.5)), Some("temperature"));
    assert_eq!(
        refused(|c| c.temperature = Some(f32::NAN)),
        Some("temperature")
    );
    assert_eq!(refused(|c| c.top_p = Some(0.0)), Some("top_p"));
    assert_eq!(refused(|c| c.top_p = Some(1.5)), Some("top_p"));
    assert_eq!(refused(|c| c.top_k = Some(-2)), Some("top_k"));
    assert_eq!(refused(|c| c.top_k = Some(32001)), Some("top_k"));
    assert_eq!(refused(|c| c.min_p = Some(1.5)), Some("min_p"));
    assert_eq!(
        refused(|c| c.presence_penalty = Some(2.5)),
        Some("presence_penalty")
    );
    assert_eq!(
        refused(|c| c.frequency_penalty = Some(-3.0)),
        Some("frequency_penalty")
    );
    assert_eq!(
        refused(|c| c.repetition_penalty = Some(0.0)),
        Some("repetition_penalty")
    );
    assert_eq!(refused(|c| c.seed = Some(-1)), Some("seed"));
    let (r, _) = completion_with(common(|c| c.top_k = Some(-1)), ok_prompt()).unwrap();
    assert_eq!(r.sampling().top_k, 0, "-1 is vLLM's off");
}

#[test]
fn stop_strings_are_at_most_four_and_not_empty() {
    let many = || Stop::Many((0..5).map(|i| i.to_string()).collect());
    assert_eq!(refused(|c| c.stop = Some(many())), Some("stop"));
    assert_eq!(
        refused(|c| c.stop = Some(Stop::One(String::new()))),
        Some("stop")
    );
    let (r, _) = completion_with(
        common(|c| c.stop = Some(Stop::One("x".into()))),
        ok_prompt(),
    )
    .unwrap();
    assert_eq!(r.stop_strings(), ["x"]);
}

#[test]
fn stop_token_ids_are_token_ids() {
    assert_eq!(
        refused(|c| c.stop_token_ids = Some(vec![-1])),
        Some("stop_token_ids")
    );
    assert_eq!(
        refused(|c| c.stop_token_ids = Some(vec![32000])),
        Some("stop_token_ids")
    );
}

#[test]
fn logit_bias_keys_are_ids_and_values_in_range() {
    let bias = |k: &str, v: serde_json::Value| {
        let mut m = serde_json::Map::new();
        m.insert(k.into(), v);
        Some(m)
    };
    assert_eq!(
        refused(|c| c.logit_bias = bias("x", 1.into())),
        Some("logit_bias")
    );
    assert_eq!(
        refused(|c| c.logit_bias = bias("32000", 1.into())),
        Some("logit_bias")
    );
    assert_eq!(
        refused(|c| c.logit_bias = bias("5", 101.into())),
        Some("logit_bias")
    );
    assert_eq!(
        refused(|c| c.logit_bias = bias("5", "a".into())),
        Some("logit_bias")
    );
    let (r, _) = completion_with(
        common(|c| c.logit_bias = bias("5", (-100).into())),
        ok_prompt(),
    )
    .unwrap();
    assert_eq!(r.sampling().logit_bias, vec![(5, -100.0)]);
}

#[test]
fn min_tokens_does_not_exceed_max_tokens() {
    assert_eq!(
        refused(|c| {
            c.min_tokens = Some(10);
            c.max_tokens = Some(5);
        }),
        Some("min_tokens")
    );
    assert_eq!(refused(|c| c.min_tokens = Some(-1)), Some("min_tokens"));
    // Without max_tokens, what the context leaves after the prompt bounds it.
    let chat_min = |m| {
        param_of(chat_with(|b| {
            b.common.min_tokens = Some(m);
            b.common.max_tokens = None;
        }))
    };
    assert_eq!(chat_min(63), Some("min_tokens"));
}

#[test]
fn stream_options_need_stream() {
    assert_eq!(
        refused(|c| c.stream_options = Some(StreamOptions {
            include_usage: true
        })),
        Some("stream_options")
    );
    let (_, shape) = completion_with(
        common(|c| {
            c.stream = Some(true);
            c.stream_options = Some(StreamOptions {
                include_usage: true,
            });
        }),
        ok_prompt(),
    )
    .unwrap();
    assert!(shape.stream && shape.include_usage);
}

#[test]
fn response_formats_are_text_json_object_or_a_supported_schema() {
    let fmt = |v: serde_json::Value| refused(move |c| c.response_format = Some(v));
    assert_eq!(
        fmt(serde_json::json!({"type": "yaml"})),
        Some("response_format")
    );
    assert_eq!(
        fmt(serde_json::json!({"type": "json_schema"})),
        Some("response_format")
    );
    assert_eq!(
        fmt(
            serde_json::json!({"type": "json_schema", "json_schema": {"schema": {"type": "object", "pattern": "x"}}})
        ),
        Some("response_format")
    );
    let (r, _) = completion_with(
        common(|c| c.response_format = Some(serde_json::json!({"type": "json_object"}))),
        ok_prompt(),
    )
    .unwrap();
    assert!(r.json().is_some());
    let (r, _) = completion_with(
        common(|c| c.response_format = Some(serde_json::json!({"type": "text"}))),
        ok_prompt(),
    )
    .unwrap();
    assert!(r.json().is_none());
}

#[test]
fn prompts_are_present_non_empty_and_in_the_vocabulary() {
    let p = |prompt| param_of(completion_with(common(|_| {}), prompt));
    assert_eq!(p(Prompt::Ids(vec![])), Some("prompt"));
    assert_eq!(p(Prompt::Ids(vec![1, 32000])), Some("prompt"));
    assert_eq!(p(Prompt::Ids(vec![-1])), Some("prompt"));
    assert_eq!(p(Prompt::IdLists(vec![vec![1], vec![]])), Some("prompt"));
    assert_eq!(p(Prompt::Texts(vec![])), Some("prompt"));
    let body = CompletionRequest {
        common: common(|_| {}),
        ..CompletionRequest::default()
    };
    assert_eq!(
        param_of(completion(body, &tok(), &limits())),
        Some("prompt")
    );
    let (r, _) = completion_with(
        common(|c| c.n = Some(2)),
        Prompt::Texts(vec!["a b".into(), "c".into()]),
    )
    .unwrap();
    assert_eq!((r.prompts().len(), r.choices()), (2, 4));
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let long = Prompt::Ids(vec![1; 64]);
    assert_eq!(
        param_of(completion_with(common(|c| c.max_tokens = Some(1)), long)),
        Some("max_tokens")
    );
}

#[test]
fn completion_only_fields_are_checked() {
    let body = |f: fn(&mut CompletionRequest)| {
        let mut b = CompletionRequest {
            common: common(|_| {}),
            prompt: Some(ok_prompt()),
            ..CompletionRequest::default()
        };
        f(&mut b);
        param_of(completion(b, &tok(), &limits()))
    };
    assert_eq!(body(|b| b.best_of = Some(2)), Some("best_of"));
    assert_eq!(body(|b| b.suffix = Some("x".into())), Some("suffix"));
    assert_eq!(body(|b| b.logprobs = Some(21)), Some("logprobs"));
    let b = CompletionRequest {
        common: common(|_| {}),
        prompt: Some(Prompt::Text("hello".into())),
        echo: Some(true),
        logprobs: Some(2),
        ..CompletionRequest::default()
    };
    let (r, shape) = completion(b, &tok(), &limits()).unwrap();
    assert_eq!(r.logprobs(), Some(2));
    assert_eq!(shape.echo, Some(vec!["hello".to_string()]));
}

fn chat_with(f: impl FnOnce(&mut ChatRequest)) -> Result<(ValidatedRequest, ResponseShape)> {
    let mut b = ChatRequest {
        common: common(|_| {}),
        messages: Some(vec![ChatMessageIn {
            role: "user".into(),
            content: Some(Content::Text("hi".into())),
        }]),
        ..ChatRequest::default()
    };
    f(&mut b);
    chat(b, &tok(), &limits())
}

#[test]
fn chat_messages_are_present_with_known_roles_and_text_parts() {
    assert_eq!(param_of(chat_with(|b| b.messages = None)), Some("messages"));
    assert_eq!(
        param_of(chat_with(|b| b.messages = Some(vec![]))),
        Some("messages")
    );
    assert_eq!(
        param_of(chat_with(
            |b| b.messages.as_mut().unwrap()[0].role = "tool".into()
        )),
        Some("messages")
    );
    let image = crate::request::openai::ContentPart {
        kind: "image_url".into(),
        text: None,
    };
    assert_eq!(
        param_of(chat_with(
            |b| b.messages.as_mut().unwrap()[0].content = Some(Content::Parts(vec![image]))
        )),
        Some("messages")
    );
    let (r, _) = chat_with(|_| {}).unwrap();
    assert!(r.prompts()[0].len() > 1, "the template wraps the message");
}

#[test]
fn chat_refuses_tools_and_checks_logprobs() {
    assert_eq!(
        param_of(chat_with(|b| b.tools = Some(serde_json::json!([])))),
        Some("tools")
    );
    assert_eq!(
        param_of(chat_with(|b| b.top_logprobs = Some(2))),
        Some("top_logprobs")
    );
    assert_eq!(
        param_of(chat_with(|b| {
            b.logprobs = Some(true);
            b.top_logprobs = Some(21);
        })),
        Some("top_logprobs")
    );
    let (r, _) = chat_with(|b| {
        b.logprobs = Some(true);
        b.top_logprobs = Some(3);
        b.max_completion_tokens = Some(7);
    })
    .unwrap();
    assert_eq!((r.logprobs(), r.max_tokens(0)), (Some(3), 7));
}

#[test]
fn a_forward_continuation_is_checked_like_a_completion() {
    assert!(greedy(&[], 1, &limits()).is_err());
    assert!(greedy(&[1, 32000], 1, &limits()).is_err());
    assert!(greedy(&[1; 60], 20, &limits()).is_err());
    let r = greedy(&[1, 2], 5, &limits()).unwrap();
    assert_eq!((r.max_tokens(0), r.sampling().temperature), (5, 0.0));
    // Token-id prompts from the CLI and tests meet the same rules.
    let c = common(|_| {});
    let r = token_ids(vec![vec![1, 2], vec![3]], &c, Some(2), &limits()).unwrap();
    assert_eq!(
        (r.choices(), r.max_tokens(1), r.logprobs()),
        (2, 16, Some(2))
    );
    assert!(token_ids(vec![vec![1]], &c, Some(21), &limits()).is_err());
    assert!(token_ids(vec![vec![1]; 9], &c, None, &limits()).is_err());
    assert!(token_ids(vec![], &c, None, &limits()).is_err());
}

#[test]
fn every_list_a_request_brings_is_bounded() {
    let p = |prompt| param_of(completion_with(common(|_| {}), prompt));
    assert_eq!(p(Prompt::IdLists(vec![vec![1]; 9])), Some("prompt"));
    assert_eq!(p(Prompt::Texts(vec!["a".into(); 9])), Some("prompt"));
    assert!(completion_with(common(|_| {}), Prompt::IdLists(vec![vec![1]; 8])).is_ok());
    let long = "x".repeat(MAX_STOP_BYTES + 1);
    assert_eq!(refused(|c| c.stop = Some(Stop::One(long))), Some("stop"));
    assert_eq!(
        refused(|c| c.stop_token_ids = Some(vec![5; MAX_STOP_IDS + 1])),
        Some("stop_token_ids")
    );
    let bias: serde_json::Map<String, serde_json::Value> = (0..=MAX_LOGIT_BIAS)
        .map(|i| (i.to_string(), 1.into()))
        .collect();
    assert_eq!(refused(|c| c.logit_bias = Some(bias)), Some("logit_bias"));
}

mod props {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// Any JSON value, a few levels deep.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-z\"\\\\{}]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A value for one of a request's fields: near its valid range or anything at all.
    fn field_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            (-3i64..70).prop_map(Value::from),
            (-3.0f64..3.0).prop_map(Value::from),
            prop::collection::vec(0i64..40_000, 0..6).prop_map(Value::from),
            Just(json!("m")),
            Just(json!("hello there")),
            Just(json!({"type": "json_object"})),
            Just(
                json!({"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}})
            ),
            Just(json!([{"role": "user", "content": "hi"}])),
            Just(json!({"5": 3, "x": 1})),
            any_json(),
        ]
    }

    /// Request bodies: a random subset of the API's fields with random values.
    fn body() -> impl Strategy<Value = Value> {
        const FIELDS: &[&str] = &[
            "model",
            "prompt",
            "messages",
            "max_tokens",
            "max_completion_tokens",
            "n",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "stop",
            "stop_token_ids",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "logit_bias",
            "min_tokens",
            "ignore_eos",
            "logprobs",
            "top_logprobs",
            "echo",
            "stream",
            "stream_options",
            "response_format",
            "best_of",
            "suffix",
            "tools",
        ];
        prop::collection::vec((prop::sample::select(FIELDS), field_value()), 0..10).prop_map(
            |pairs| Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Any body the JSON parser accepts is refused with an error or validated into a
        /// request that keeps every promise; nothing panics.
        #[test]
        fn validation_never_panics_and_keeps_its_promises(b in body()) {
            let tok = tok();
            let l = limits();
            let results = [
                serde_json::from_value::<CompletionRequest>(b.clone())
                    .ok()
                    .map(|r| completion(r, &tok, &l)),
                serde_json::from_value::<ChatRequest>(b)
                    .ok()
                    .map(|r| chat(r, &tok, &l)),
            ];
            for (r, _) in results.into_iter().flatten().flatten() {
                prop_assert!(r.n() >= 1 && r.n() <= l.max_n);
                prop_assert!(!r.prompts().is_empty() && r.prompts().len() <= l.max_prompts);
                for (i, p) in r.prompts().iter().enumerate() {
                    prop_assert!(!p.is_empty());
                    prop_assert!(p.iter().all(|&t| (t as usize) < l.vocab_size));
                    prop_assert!(r.max_tokens(i) >= 1);
                    prop_assert!(p.len() + r.max_tokens(i) <= l.max_seq_len);
                    prop_assert!(r.min_tokens() <= r.max_tokens(i));
                }
                prop_assert!(r.stop_strings().len() <= 4);
            }
        }
    }
}
