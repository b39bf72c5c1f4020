//! `switchyard forward`, the verification interface: one step over the whole prompt reporting
//! HF-comparable logits, expert choices and router weights of every position, and optionally a
//! greedy continuation from the scheduler, like any other generation.

use crate::{
    engine::{Engine, EngineError},
    request::validation,
    scheduler::{self, SeqEvent, SeqFailure},
};
use std::sync::Arc;
use switchyard_model::{KvCache, Logits, SeqKv, SeqStep, StepOutput, StepScratch};

/// What `switchyard forward` prints.
#[derive(Debug, serde::Serialize)]
pub struct ForwardReport {
    /// `[position][vocab]`
    pub logits: Vec<Vec<f32>>,
    /// `[layer][position][k]`, descending router weight.
    pub experts: Vec<Vec<Vec<u16>>>,
    /// `[layer][position][k]`
    pub router_weights: Vec<Vec<Vec<f32>>>,
    /// New ids only; stops right after an eos id, which is included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub greedy: Option<Vec<u32>>,
}

/// Runs `ids` in one step and reports every position; with `greedy = Some(n)`, continues
/// greedily for up to `n` tokens.
pub fn forward_report(
    engine: &Arc<Engine>,
    ids: &[u32],
    greedy: Option<usize>,
) -> Result<ForwardReport, EngineError> {
    let req = validation::greedy(ids, greedy.unwrap_or(1), &engine.limits("forward"))?;
    let vocab = engine.config().vocab_size;
    let bs = switchyard_model::DEFAULT_BLOCK_SIZE;
    let model = engine.model();
    let mut kv = KvCache::new(
        model.backend(),
        engine.config(),
        bs,
        ids.len().div_ceil(bs),
        engine.kv_dtype(),
    )?;
    let mut seq = SeqKv::default();
    let mut scratch = StepScratch::new(model.backend())?;
    let mut out = StepOutput::traced(Logits::All);
    let mut steps = [SeqStep {
        tokens: ids,
        kv: &mut seq,
    }];
    model.step(
        &mut steps,
        &mut kv,
        engine.experts(),
        &mut scratch,
        &mut out,
    )?;
    let trace = out.trace.take().unwrap_or_default();
    Ok(ForwardReport {
        logits: out.logits.chunks(vocab).map(<[f32]>::to_vec).collect(),
        experts: trace
            .iter()
            .map(|p| (0..p.rows()).map(|r| p.row_experts(r).to_vec()).collect())
            .collect(),
        router_weights: trace
            .iter()
            .map(|p| (0..p.rows()).map(|r| p.row_weights(r).to_vec()).collect())
            .collect(),
        greedy: match greedy {
            None => None,
            Some(_) => Some(continuation(engine, &req)?),
        },
    })
}

/// The tokens of a one-choice request, run alone.
fn continuation(
    engine: &Arc<Engine>,
    req: &crate::request::ValidatedRequest,
) -> Result<Vec<u32>, EngineError> {
    let (_handle, mut stream) = scheduler::run_alone(engine.clone(), req)?;
    let mut ids = Vec::new();
    while let Some((_, ev)) = stream.blocking_recv() {
        match ev {
            SeqEvent::Token { id, .. } => ids.push(id),
            SeqEvent::Started { .. } => {}
            SeqEvent::Finished { .. } => break,
            SeqEvent::Failed(SeqFailure::Unavailable(m) | SeqFailure::Internal(m)) => {
                return Err(EngineError::Failed(m))
            }
            SeqEvent::Failed(f) => return Err(EngineError::Failed(format!("{f:?}"))),
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        loader::{ExpertSource, LoadOptions},
        request::{openai::CommonFields, validation},
        scheduler::{run_alone, FinishReason},
    };
    use switchyard_model::NoProgress;

    fn engine(name: &str) -> Arc<Engine> {
        let opts = LoadOptions::default();
        Engine::load(
            &crate::fixture(name),
            ExpertSource::Embedded,
            &opts,
            &NoProgress,
        )
        .unwrap()
        .engine
    }

    /// A one-prompt completion with `common`'s fields.
    fn run(
        e: &Arc<Engine>,
        prompt: &[u32],
        common: CommonFields,
    ) -> (Vec<u32>, Vec<f32>, FinishReason) {
        let req =
            validation::token_ids(vec![prompt.to_vec()], &common, Some(0), &e.limits("t")).unwrap();
        let (_h, mut stream) = run_alone(e.clone(), &req).unwrap();
        let (mut ids, mut lps) = (Vec::new(), Vec::new());
        while let Some((_, ev)) = stream.blocking_recv() {
            match ev {
                SeqEvent::Token { id, logprob, .. } => {
                    ids.push(id);
                    lps.extend(logprob);
                }
                SeqEvent::Finished { reason, .. } => return (ids, lps, reason),
                SeqEvent::Started { .. } => {}
                SeqEvent::Failed(f) => panic!("{f:?}"),
            }
        }
        panic!("the stream ended without a finish");
    }

    #[test]
    fn generation_greedy_equals_forward_greedy_and_reports_finish() {
        let e = engine("tiny-mixtral-trained");
        let prompt = e
            .tokenizer()
            .encode("Return the number of items in the", true)
            .unwrap();
        let report = forward_report(&e, &prompt, Some(12)).unwrap();
        let common = CommonFields {
            max_tokens: Some(12),
            temperature: Some(0.0),
            ..CommonFields::default()
        };
        let (got, lps, finish) = run(&e, &prompt, common);
        assert!(lps.iter().all(|&lp| lp <= 0.0) && lps.len() == got.len());
        assert_eq!(Some(got.clone()), report.greedy);
        let text = e.tokenizer().decode(&got, true).unwrap();
        assert!(
            text.contains("list"),
            "trained fixture writes English: {text:?}"
        );
        assert_eq!(finish, FinishReason::Length);
    }

    #[test]
    fn seeded_sampling_reproduces_and_stop_ids_stop() {
        let e = engine("tiny-mixtral-trained");
        let prompt = e.tokenizer().encode("If the file", true).unwrap();
        let sampled = |stop: Option<u32>| {
            run(
                &e,
                &prompt,
                CommonFields {
                    max_tokens: Some(10),
                    temperature: Some(0.9),
                    top_p: Some(0.95),
                    seed: Some(3),
                    stop_token_ids: stop.map(|t| vec![i64::from(t)]),
                    ..CommonFields::default()
                },
            )
        };
        let (a, _, _) = sampled(None);
        assert_eq!(a, sampled(None).0);
        let (b, _, f) = sampled(Some(a[2]));
        assert_eq!(b, a[..3].to_vec());
        assert_eq!(f, FinishReason::Stop);
    }

    #[test]
    fn bad_forwards_are_errors() {
        let e = engine("tiny-mixtral");
        for (ids, greedy) in [
            (vec![], None),
            (vec![1, 9999], None),
            (vec![1; 500], Some(20)),
        ] {
            assert!(
                matches!(
                    forward_report(&e, &ids, greedy),
                    Err(EngineError::Request(_))
                ),
                "{ids:?}"
            );
        }
    }
}
