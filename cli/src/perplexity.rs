//! `switchyard perplexity`: perplexity of a text file (as llama.cpp's `llama-perplexity`), and
//! with `--kl-divergence` how far a quantized model's distributions are from the original's.

use anyhow::Context;
use std::{io::Write, path::PathBuf};
use switchyard_model::{
    eval::{perplexity, Scorer},
    Checkpoint, Cpu,
};

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face checkpoint folder.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    /// The text to score (UTF-8), e.g. data/perplexity.txt.
    #[arg(long)]
    file: PathBuf,
    /// Tokens per chunk; the second half of each is scored (default: 512, or the model's
    /// positions if fewer).
    #[arg(long)]
    ctx: Option<usize>,
    /// Score at most this many chunks.
    #[arg(long)]
    chunks: Option<usize>,
    #[command(flatten)]
    quant: crate::cluster::QuantArgs,
    /// Also load the checkpoint unquantized and report the KL divergence of this model's
    /// next-token distributions from it, and how often their most likely tokens agree.
    #[arg(long)]
    kl_divergence: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let open =
        || Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()));
    let mut ck = open()?;
    ck.set_quantize(a.quant.plan())?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let tokens = ck.tokenizer()?.encode(&text, false)?;
    let ctx = a
        .ctx
        .unwrap_or(512)
        .min(ck.config().max_position_embeddings);
    let model = Scorer::load(Cpu, &ck).context("loading the model")?;
    let reference = if a.kl_divergence {
        anyhow::ensure!(
            ck.quantization().is_some(),
            "--kl-divergence compares a quantized model with its original: add --quantize"
        );
        Some(Scorer::load(Cpu, &open()?).context("loading the original")?)
    } else {
        None
    };
    let bos = ck.config().bos_token_id;
    let r = perplexity(
        &model,
        reference.as_ref(),
        &tokens,
        ctx,
        bos,
        a.chunks,
        |c, n, p| {
            if !a.json {
                eprintln!("[{c}/{n}] perplexity so far {p:.4}");
            }
        },
    )?;
    let mut out = std::io::stdout().lock();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["quantization"] = serde_json::json!(ck.quantization());
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(
        out,
        "perplexity: {:.4} ± {:.4} ({} tokens scored, {} chunks of {}, {})",
        r.perplexity,
        r.perplexity_stderr,
        r.tokens_scored,
        r.chunks,
        r.ctx,
        ck.quantization().unwrap_or_else(|| "as stored".into())
    )?;
    if let (Some(kl), Some(se), Some(top1)) =
        (r.kl_divergence, r.kl_divergence_stderr, r.top1_agreement)
    {
        writeln!(
            out,
            "KL divergence from the original: {kl:.6} ± {se:.6}; top-1 agreement {:.2} %",
            top1 * 100.0
        )?;
    }
    Ok(())
}
