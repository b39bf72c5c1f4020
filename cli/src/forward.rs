//! `switchyard forward`: the verification interface. Prints exactly one JSON object.

use anyhow::Context;
use std::{io::Write, path::PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face checkpoint folder.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    #[command(flatten)]
    cluster: crate::cluster::ClusterArgs,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Also continue greedily for up to N tokens (stops after eos, which is included).
    #[arg(long)]
    greedy: Option<usize>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let loaded = a.cluster.load(&a.model)?;
    let report = switchyard_coordinator::forward_report(&loaded.engine, &a.ids, a.greedy)?;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &report).context("writing JSON")?;
    writeln!(out).context("writing JSON")?;
    Ok(())
}
