//! `switchyard generate`: prompt in, text streamed to stdout.

use std::{io::Write, path::PathBuf};
use switchyard_coordinator::GenerateRequest;
use switchyard_model::{ChatMessage, SamplingParams};

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
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let loaded = a.cluster.load(&a.model)?;
    let engine = &loaded.engine;
    let tok = engine.tokenizer();
    let prompt = if a.chat {
        let text = tok.apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: a.prompt.clone(),
            }],
            true,
        )?;
        // The template already starts with the BOS token.
        tok.encode(&text, false)?
    } else {
        tok.encode(&a.prompt, true)?
    };
    let req = GenerateRequest {
        prompt,
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
            presence_penalty: a.presence_penalty,
            frequency_penalty: a.frequency_penalty,
            min_p: a.min_p,
            logit_bias: Vec::new(),
            seed: a.seed,
        },
        stop_ids: vec![],
        ignore_eos: a.ignore_eos,
        logprobs: false,
    };
    let mut out = std::io::stdout().lock();
    if a.echo {
        write!(out, "{}", a.prompt)?;
    }
    let mut stream = tok.stream(true);
    let mut failed = None;
    let started = std::time::Instant::now();
    let mut n = 0usize;
    engine.generate(&req, |ev| {
        n += 1;
        let piece = match stream.step(ev.id) {
            Ok(p) => p,
            Err(e) => {
                failed = Some(anyhow::Error::from(e));
                return false;
            }
        };
        if let Some(text) = piece {
            // A closed stdout (e.g. `| head`) ends generation quietly.
            if write!(out, "{text}").and_then(|()| out.flush()).is_err() {
                return false;
            }
        }
        true
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    writeln!(out).ok();
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(tokens = n, tok_per_s = n as f64 / secs, "generation done");
    loaded.log_dispatch_stats();
    Ok(())
}
