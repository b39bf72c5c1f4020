//! etcd role-based access for one cluster's keys: what a worker and a coordinator may read and
//! write, so that holding one kind of certificate does not give the other's powers.
//!
//! etcd names a client presenting a certificate after the certificate's common name (with
//! `--client-cert-auth`), so users here are certificate CNs and have no password. Workers may
//! write only their records under `workers/` and read the plan; coordinators may read the
//! workers, publish their load, run the planner election and write the plan, but never register
//! a worker. Applying the roles is idempotent: existing users and roles are kept and the
//! permissions granted again.

use crate::{ClusterError, Keys, Registry};
use etcd_client::{Permission, UserAddOptions};

/// Certificate common names of the two kinds of member (those `deploy/tls/make-dev-ca.sh`
/// issues by default).
#[derive(Clone, Debug)]
pub struct RbacUsers {
    pub worker: String,
    pub coordinator: String,
}

impl Default for RbacUsers {
    fn default() -> Self {
        Self {
            worker: "switchyard-worker".into(),
            coordinator: "switchyard-coordinator".into(),
        }
    }
}

/// One permission of a role: a key prefix and whether it may be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub prefix: String,
    pub write: bool,
}

/// A role and the user it is given to.
#[derive(Clone, Debug)]
pub struct RoleSpec {
    pub role: String,
    pub user: String,
    pub grants: Vec<Grant>,
}

/// The roles of cluster `cluster` (keys under `keys`).
#[must_use]
pub fn roles(cluster: &str, keys: &Keys, users: &RbacUsers) -> Vec<RoleSpec> {
    let g = |prefix: String, write| Grant { prefix, write };
    vec![
        RoleSpec {
            role: format!("switchyard-{cluster}-worker"),
            user: users.worker.clone(),
            grants: vec![g(keys.workers(), true), g(keys.plan(), false)],
        },
        RoleSpec {
            role: format!("switchyard-{cluster}-coordinator"),
            user: users.coordinator.clone(),
            grants: vec![
                g(keys.workers(), false),
                g(keys.loads(), true),
                g(keys.plan(), true),
                g(keys.election(), true),
            ],
        },
    ]
}

fn exists(e: &etcd_client::Error) -> bool {
    e.to_string().contains("already exists")
}

impl Registry {
    /// Creates `root` (required by etcd before auth can be enabled), the cluster's roles and
    /// users, grants the permissions and enables auth. Needs a root certificate once auth is on
    /// (before, any certificate the CA signed may run it).
    pub async fn apply_rbac(&mut self, users: &RbacUsers) -> Result<Vec<RoleSpec>, ClusterError> {
        let specs = roles(&self.cfg.cluster, &self.keys, users);
        let err = |e: etcd_client::Error| self.cfg.err(e);
        let mut auth = self.client.auth_client();
        let mut add_user = async |name: &str| match auth
            .user_add(name, "", Some(UserAddOptions::new().with_no_pwd()))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if exists(&e) => Ok(()),
            Err(e) => Err(e),
        };
        add_user("root").await.map_err(err)?;
        for s in &specs {
            add_user(&s.user).await.map_err(err)?;
        }
        let mut auth = self.client.auth_client();
        auth.user_grant_role("root", "root").await.map_err(err)?;
        for s in &specs {
            match auth.role_add(s.role.as_str()).await {
                Ok(_) => {}
                Err(e) if exists(&e) => {}
                Err(e) => return Err(err(e)),
            }
            for g in &s.grants {
                let p = if g.write {
                    Permission::read_write(g.prefix.as_str())
                } else {
                    Permission::read(g.prefix.as_str())
                };
                auth.role_grant_permission(s.role.as_str(), p.with_prefix())
                    .await
                    .map_err(err)?;
            }
            auth.user_grant_role(s.user.as_str(), s.role.as_str())
                .await
                .map_err(err)?;
        }
        auth.auth_enable().await.map_err(err)?;
        Ok(specs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_cannot_write_the_plan_and_coordinators_cannot_register_workers() {
        let keys = Keys::new("prod").unwrap();
        let specs = roles("prod", &keys, &RbacUsers::default());
        let writes = |role: &str, key: &str| {
            specs
                .iter()
                .find(|s| s.role == role)
                .unwrap()
                .grants
                .iter()
                .any(|g| g.write && key.starts_with(&g.prefix))
        };
        let (w, c) = ("switchyard-prod-worker", "switchyard-prod-coordinator");
        assert!(writes(w, &keys.worker("10.0.0.1:7001")));
        assert!(!writes(w, &keys.plan()));
        assert!(!writes(w, &keys.load("c1")));
        assert!(!writes(c, &keys.worker("10.0.0.1:7001")));
        assert!(writes(c, &keys.plan()));
        assert!(writes(c, &keys.load("c1")));
        // Every grant stays inside the cluster's own keys.
        for s in &specs {
            for g in &s.grants {
                assert!(g.prefix.starts_with("/switchyard/prod/"), "{g:?}");
            }
        }
    }
}
