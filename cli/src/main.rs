//! `switchyard`: one binary, roles by subcommand. `main` parses, sets up logging and threads,
//! and hands over to the subcommand's `run`; no logic lives here.

mod bench;
mod bench_dispatch;
mod cluster;
mod cluster_rbac;
mod cluster_status;
mod forward;
mod gen_model;
mod generate;
mod perplexity;
mod plan;
mod plot;
mod progress;
mod quantize;
mod serve;
mod signals;
mod telemetry;
mod worker;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Mixture-of-experts inference: a coordinator scattering routed tokens to expert workers"
)]
struct Cli {
    /// Compute threads (default: all cores).
    #[arg(long, global = true, env = "SWITCHYARD_THREADS")]
    threads: Option<usize>,
    /// Activations the CPU kernels meet bf16 weights with: f32 (exact widening, within the
    /// reference's tolerances), bf16 (rounded once per linear: `vdpbf16ps` tiles, twice the
    /// multiply-adds an instruction, or on CPUs with AMX one AMX part instead of f32's three; at
    /// every batch size; needs AVX-512 BF16), or auto: bf16 where the CPU has AVX-512 BF16, f32
    /// elsewhere. f32 weights always meet f32.
    #[arg(long, global = true, env = "SWITCHYARD_CPU_ACTIVATIONS", default_value = "auto", value_parser = ["auto", "f32", "bf16"])]
    cpu_activations: String,
    /// on: a token's logits and logprobs do not depend on what else runs beside it (every
    /// batch size, prefill chunk, cached prefix and placement gives the same bits; the CPU
    /// kernels sum each row in one fixed order). off: each batch size takes its fastest
    /// kernel, and results may move in the last bits with load (docs/determinism.md).
    #[arg(long, global = true, env = "SWITCHYARD_DETERMINISTIC", default_value = "on", value_parser = ["on", "off"])]
    deterministic: String,
    /// Log filter for stderr, e.g. info or warn,switchyard_coordinator=debug.
    #[arg(long, global = true, env = "SWITCHYARD_LOG", default_value = "warn")]
    log: String,
    #[command(flatten)]
    otlp: telemetry::OtlpArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the OpenAI-compatible API (embedded, or with --workers over expert workers).
    Serve(serve::Args),
    /// Generate text from a prompt, streamed to stdout.
    Generate(generate::Args),
    /// Run token ids through the model and print logits, expert choices and router weights as JSON.
    Forward(forward::Args),
    /// Write a random Mixtral checkpoint of any shape as a Hugging Face folder.
    GenModel(gen_model::Args),
    /// Write a checkpoint with its linears quantized (q8_0, q4_0) that every command loads.
    Quantize(quantize::Args),
    /// Perplexity of a text file; with --quantize and --kl-divergence, the quantization's cost.
    Perplexity(perplexity::Args),
    /// Measure prefill and decode throughput (embedded, one sequence, median of runs).
    Bench(bench::Args),
    /// Where a model's experts go on given hosts and the decode throughput to expect, from
    /// costs `bench --calibrate` measured.
    Plan(plan::Args),
    /// Measure one layer's scatter + gather over loopback workers it starts itself.
    BenchDispatch(bench_dispatch::Args),
    /// Host a subset of every layer's experts and serve expert batches over gRPC.
    Worker(worker::Args),
    /// Inspect a cluster registered in etcd.
    #[command(subcommand)]
    Cluster(cluster_status::Cmd),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let command = match &cli.cmd {
        Cmd::Serve(_) => "coordinator",
        Cmd::Worker(_) => "worker",
        _ => "cli",
    };
    let _telemetry = match telemetry::init(&cli.log, &cli.otlp, command) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: setting up telemetry: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("error: cannot set up {n} threads: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    let bf16 = match cli.cpu_activations.as_str() {
        "auto" => switchyard_model::backend::cpu::linear::auto_bf16_activations(),
        mode => mode == "bf16",
    };
    if let Err(e) = switchyard_model::backend::cpu::linear::set_bf16_activations(bf16) {
        eprintln!("error: --cpu-activations {}: {e}", cli.cpu_activations);
        return std::process::ExitCode::FAILURE;
    }
    let deterministic = cli.deterministic == "on";
    if let Err(e) = switchyard_model::backend::cpu::linear::set_deterministic(deterministic) {
        eprintln!("error: --deterministic {}: {e}", cli.deterministic);
        return std::process::ExitCode::FAILURE;
    }
    tracing::info!(
        kernels = switchyard_model::backend::cpu::linear::isa().as_str(),
        activations = if bf16 { "bf16" } else { "f32" },
        deterministic,
        "CPU kernels chosen"
    );
    let result = match cli.cmd {
        Cmd::Serve(a) => serve::run(a),
        Cmd::Generate(a) => generate::run(a),
        Cmd::Forward(a) => forward::run(a),
        Cmd::GenModel(a) => gen_model::run(a),
        Cmd::Quantize(a) => quantize::run(a),
        Cmd::Perplexity(a) => perplexity::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Plan(a) => plan::run(a),
        Cmd::Worker(a) => worker::run(a),
        Cmd::BenchDispatch(a) => bench_dispatch::run(a),
        Cmd::Cluster(c) => cluster_status::run(c),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
