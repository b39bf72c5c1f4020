//! `switchyard generate`: prompt in, text streamed to stdout.

use anyhow::Context;
use std::{io::Write, path::PathBuf};
use switchyard_coordinator::{
    request::{
        openai::{
            ChatMessageIn, ChatRequest, CommonFields, CompletionRequest, Content, Prompt, Stop,
        },
        validation,
    },
    scheduler,
    text::{RequestText, Update},
};

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    /// Hugging Face checkpoint folder.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    #[command(flatten)]
    cluster: crate::cluster::ClusterArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0 disables the top-k cut.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one (0: off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Print the prompt before the generated text.
    #[arg(long)]
    echo: bool,
    /// Keep generating past end-of-sequence tokens (for benchmarks and tests).
    #[arg(long)]
    ignore_eos: bool,
    /// Tokens to generate before eos may end the text.
    #[arg(long, default_value_t = 0)]
    min_tokens: usize,
    /// Stop before this text (up to 4; repeat the flag).
    #[arg(long)]
    stop: Vec<String>,
    /// Constrain the output to a JSON object.
    #[arg(long)]
    json_object: bool,
    /// Constrain the output to JSON this schema (a file) allows (the API's json_schema subset).
    #[arg(long, conflicts_with = "json_object")]
    json_schema: Option<PathBuf>,
}

/// The OpenAI body these arguments mean: `generate` goes through the API's own validation.
fn body(a: &Args, model_name: &str) -> anyhow::Result<CommonFields> {
    let response_format = match (&a.json_schema, a.json_object) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --json-schema {}", path.display()))?;
            let schema: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("--json-schema {} is not JSON", path.display()))?;
            Some(serde_json::json!({"type": "json_schema", "json_schema": {"schema": schema}}))
        }
        (None, true) => Some(serde_json::json!({"type": "json_object"})),
        (None, false) => None,
    };
    Ok(CommonFields {
        model: Some(model_name.to_string()),
        max_tokens: Some(i64::try_from(a.max_tokens).unwrap_or(i64::MAX)),
        temperature: Some(a.temperature),
        top_p: Some(a.top_p),
        top_k: Some(i64::try_from(a.top_k).unwrap_or(i64::MAX)),
        min_p: Some(a.min_p),
        seed: a.seed.map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
        repetition_penalty: Some(a.repetition_penalty),
        presence_penalty: Some(a.presence_penalty),
        frequency_penalty: Some(a.frequency_penalty),
        ignore_eos: Some(a.ignore_eos),
        min_tokens: Some(i64::try_from(a.min_tokens).unwrap_or(i64::MAX)),
        stop: (!a.stop.is_empty()).then(|| Stop::Many(a.stop.clone())),
        response_format,
        ..CommonFields::default()
    })
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let loaded = a.cluster.load(&a.model)?;
    let engine = &loaded.engine;
    let tok = engine.tokenizer();
    const NAME: &str = "generate";
    let limits = engine.limits(NAME);
    let common = body(&a, NAME)?;
    let (req, _) = if a.chat {
        let chat = ChatRequest {
            common,
            messages: Some(vec![ChatMessageIn {
                role: "user".into(),
                content: Some(Content::Text(a.prompt.clone())),
            }]),
            ..ChatRequest::default()
        };
        validation::chat(chat, tok, &limits)?
    } else {
        let completion = CompletionRequest {
            common,
            prompt: Some(Prompt::Text(a.prompt.clone())),
            ..CompletionRequest::default()
        };
        validation::completion(completion, tok, &limits)?
    };
    let mut out = std::io::stdout().lock();
    if a.echo {
        write!(out, "{}", a.prompt)?;
    }
    let started = std::time::Instant::now();
    let (_scheduler, mut stream) = scheduler::run_alone(engine.clone(), &req)?;
    let mut text = RequestText::new(tok, &req);
    while text.is_open() {
        let Some((i, ev)) = stream.blocking_recv() else {
            break;
        };
        match text.apply(i, ev, &stream) {
            Update::Nothing => {}
            Update::Failed(f) => anyhow::bail!("generation failed: {f:?}"),
            Update::Choice { index, done } => {
                let piece = text.choices[index].ready(done);
                // A closed stdout (e.g. `| head`) ends generation quietly.
                if write!(out, "{piece}").and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        }
    }
    writeln!(out).ok();
    let n = text.completion_tokens();
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(tokens = n, tok_per_s = n as f64 / secs, "generation done");
    loaded.log_dispatch_stats();
    Ok(())
}
