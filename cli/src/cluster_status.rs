//! `switchyard cluster status`: what the registry says about a cluster, as a table or JSON.

use anyhow::Context;
use std::fmt::Write as _;
use switchyard_cluster::{PlanRecord, Registry, WorkerRecord};

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Workers, the experts each hosts, replicas per expert, load, and the planner's plan.
    Status(StatusArgs),
    /// Set up etcd access control for the cluster: a role for workers (their records, reading
    /// the plan) and one for coordinators (reading workers, load, the election and the plan),
    /// given to the certificates' common names, then enable auth. Idempotent; needs a root
    /// certificate (CN=root) once auth is on.
    Rbac(crate::cluster_rbac::Args),
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    registry: crate::cluster::RegistryArgs,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Status {
    cluster: String,
    workers: Vec<WorkerRecord>,
    /// Hosts per expert index (hosting it in every layer).
    replicas: Vec<Vec<String>>,
    uncovered: Vec<usize>,
    planner: Option<String>,
    plan: Option<PlanRecord>,
}

pub fn run(cmd: Cmd) -> anyhow::Result<()> {
    let a = match cmd {
        Cmd::Status(a) => a,
        Cmd::Rbac(a) => return crate::cluster_rbac::run(a),
    };
    let cfg = a
        .registry
        .config()?
        .context("--etcd (or SWITCHYARD_ETCD) is required")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (workers, plan, planner) = rt.block_on(async {
        let mut reg = Registry::connect(&cfg).await?;
        let workers = reg.workers().await?;
        let plan = reg.plan().await?.map(|(p, _)| p);
        let planner = reg.leader().await?;
        Ok::<_, switchyard_cluster::ClusterError>((workers, plan, planner))
    })?;
    let experts = plan
        .as_ref()
        .map(|p| p.expert_load.len())
        .filter(|&n| n > 0)
        .or_else(|| {
            workers
                .values()
                .flat_map(|w| w.hosted.iter().flatten())
                .max()
                .map(|&m| m as usize + 1)
        })
        .unwrap_or(0);
    let mut replicas = vec![Vec::new(); experts];
    for w in workers.values() {
        for e in w.experts_everywhere() {
            if let Some(r) = replicas.get_mut(e as usize) {
                r.push(w.addr.clone());
            }
        }
    }
    let status = Status {
        cluster: cfg.cluster.clone(),
        uncovered: (0..experts).filter(|&e| replicas[e].is_empty()).collect(),
        workers: workers.into_values().collect(),
        replicas,
        planner,
        plan,
    };
    let text = if a.json {
        serde_json::to_string_pretty(&status)? + "\n"
    } else {
        render(&status)
    };
    std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())?;
    Ok(())
}

fn compact(ids: &[u32]) -> String {
    let set = switchyard_model::ExpertSet::from_indices(
        ids.iter().map(|&e| e as usize + 1).max().unwrap_or(0),
        ids.iter().map(|&e| e as usize),
    );
    let s = set.to_string();
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

fn gib(b: u64) -> String {
    if b == u64::MAX || b == 0 {
        "-".into()
    } else {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    }
}

fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cluster {}: {} worker(s); planner: {}",
        s.cluster,
        s.workers.len(),
        s.planner.as_deref().unwrap_or("none elected")
    );
    if let Some(p) = &s.plan {
        let _ = writeln!(
            out,
            "plan generation {} by {} ({})",
            p.generation, p.written_by, p.reason
        );
    }
    let _ = writeln!(
        out,
        "\n{:<22} {:<7} {:<6} {:<8} {:<14} {:>10} {:>10} {:>9} {:>6}",
        "WORKER", "DEVICE", "FORMAT", "MANAGED", "EXPERTS", "WEIGHTS", "BUDGET", "ROWS/S", "BUSY"
    );
    for w in &s.workers {
        let _ = writeln!(
            out,
            "{:<22} {:<7} {:<6} {:<8} {:<14} {:>10} {:>10} {:>9.1} {:>5.0}%",
            w.addr,
            w.device,
            if w.weight_format.is_empty() {
                "-"
            } else {
                w.weight_format.as_str()
            },
            if w.managed { "yes" } else { "no" },
            compact(&w.experts_everywhere()),
            gib(w.weight_bytes),
            gib(w.memory_budget_bytes),
            w.load.rows_per_sec,
            w.load.busy_fraction * 100.0
        );
    }
    let _ = writeln!(
        out,
        "\n{:<7} {:>8} {:>12}  HOSTS",
        "EXPERT", "REPLICAS", "LOAD TOK/S"
    );
    for (e, hosts) in s.replicas.iter().enumerate() {
        let load = s
            .plan
            .as_ref()
            .and_then(|p| p.expert_load.get(e))
            .map_or("-".to_string(), |l| format!("{l:.1}"));
        let _ = writeln!(
            out,
            "{e:<7} {:>8} {load:>12}  {}",
            hosts.len(),
            if hosts.is_empty() {
                "NONE".to_string()
            } else {
                hosts.join(", ")
            }
        );
    }
    if !s.uncovered.is_empty() {
        let _ = writeln!(out, "\nexperts without a host: {:?}", s.uncovered);
    }
    out
}
