//! `switchyard quantize`: write a checkpoint with its linears as Q8_0/Q4_0 blocks.

use anyhow::Context;
use std::{io::Write, path::PathBuf};
use switchyard_model::{weights, Checkpoint, QuantFormat, QuantPlan};

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face checkpoint folder (f32, f16 or bf16).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    /// Output folder (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// q8_0 or q4_0.
    #[arg(long)]
    format: QuantFormat,
    /// Also quantize the attention projections and an untied LM head (the experts always are).
    #[arg(long)]
    quantize_attention: bool,
    /// Largest shard to write, e.g. 4GiB.
    #[arg(long, default_value = "4GiB", value_parser = crate::worker::parse_bytes)]
    shard_size: u64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let ck =
        Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let plan = QuantPlan {
        format: Some(a.format),
        attention: a.quantize_attention,
    };
    let bar = crate::progress::Bar::new("quantizing");
    let r = weights::write_quantized(&ck, &a.out, plan, a.shard_size, &bar)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let mut out = std::io::stdout().lock();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    writeln!(
        out,
        "{}: {} of {} tensors in {}, {:.2} GiB -> {:.2} GiB in {} shard(s)",
        a.out.display(),
        r.quantized,
        r.tensors,
        a.format,
        gib(r.bytes_in),
        gib(r.bytes_out),
        r.shards
    )?;
    Ok(())
}
