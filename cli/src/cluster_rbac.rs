//! `switchyard cluster rbac`: etcd roles for a cluster's workers and coordinators.

use anyhow::Context;
use switchyard_cluster::{rbac::RbacUsers, Registry};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    registry: crate::cluster::RegistryArgs,
    /// Common name of the workers' etcd certificate.
    #[arg(long, default_value = "switchyard-worker")]
    worker_user: String,
    /// Common name of the coordinators' etcd certificate.
    #[arg(long, default_value = "switchyard-coordinator")]
    coordinator_user: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = a
        .registry
        .config()?
        .context("--etcd (or SWITCHYARD_ETCD) is required")?;
    let users = RbacUsers {
        worker: a.worker_user,
        coordinator: a.coordinator_user,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let specs = rt
        .block_on(async {
            let mut reg = Registry::connect(&cfg).await?;
            reg.apply_rbac(&users).await
        })
        .context("setting up etcd access control")?;
    let mut text = String::new();
    for s in specs {
        let grants: Vec<String> = s
            .grants
            .iter()
            .map(|g| {
                format!(
                    "{} {}*",
                    if g.write { "readwrite" } else { "read" },
                    g.prefix
                )
            })
            .collect();
        text += &format!("{} → user {}: {}\n", s.role, s.user, grants.join(", "));
    }
    text += "auth enabled\n";
    std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())?;
    Ok(())
}
