//! The etcd registry: leases that keep a record alive while its owner runs, prefix watches that
//! survive etcd restarts, and the planner election.
//!
//! Every long-running loop here outlives etcd outages: it reconnects with back-off and, after a
//! reconnect, re-reads the whole prefix (a watch resumed across an outage may have missed
//! compacted events) or re-grants its lease and re-puts its record. Owners keep working from
//! their last known state meanwhile; nothing here is on a request's path.

use crate::{
    record::{Keys, LoadRecord, PlanRecord, WorkerRecord},
    ClusterError,
};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use std::{collections::BTreeMap, time::Duration};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where the registry is.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// etcd client URLs (`http://host:2379`).
    pub endpoints: Vec<String>,
    pub cluster: String,
    /// Records vanish this long after their owner stops renewing them (crash, partition).
    pub lease_ttl: Duration,
    keys: Keys,
    /// TLS to etcd ([`RegistryConfig::with_tls`]).
    tls: Option<EtcdTls>,
}

/// TLS to etcd: the CA that signed etcd's certificate and, where etcd asks for client
/// certificates (`--client-cert-auth`), this member's (PEM).
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl RegistryConfig {
    /// `--etcd a,b` and `--cluster NAME`.
    pub fn new(etcd: &str, cluster: &str, lease_ttl: Duration) -> Result<Self, ClusterError> {
        let keys = Keys::new(cluster)?;
        let endpoints: Vec<String> = etcd
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.contains("://") {
                    s.to_string()
                } else {
                    format!("http://{s}")
                }
            })
            .collect();
        if endpoints.is_empty() {
            return Err(ClusterError::Spec("--etcd names no endpoint".into()));
        }
        if lease_ttl < Duration::from_secs(2) {
            return Err(ClusterError::Spec(format!(
                "lease TTL {lease_ttl:?} is below etcd's minimum of 2 s"
            )));
        }
        Ok(Self {
            endpoints,
            cluster: cluster.to_string(),
            lease_ttl,
            keys,
            tls: None,
        })
    }

    /// Dials etcd over TLS (every endpoint as `https://`).
    #[must_use]
    pub fn with_tls(mut self, tls: EtcdTls) -> Self {
        for e in &mut self.endpoints {
            if let Some(rest) = e.strip_prefix("http://") {
                *e = format!("https://{rest}");
            }
        }
        self.tls = Some(tls);
        self
    }

    /// Whether etcd is dialled over TLS.
    #[must_use]
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    #[must_use]
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub(crate) fn err(&self, e: impl std::fmt::Display) -> ClusterError {
        ClusterError::Etcd {
            endpoints: self.endpoints.join(","),
            message: e.to_string(),
        }
    }
}

/// A connected registry client (cheap to clone; one HTTP/2 connection underneath).
#[derive(Clone)]
pub struct Registry {
    pub(crate) client: Client,
    pub(crate) cfg: RegistryConfig,
    pub(crate) keys: Keys,
}

/// Back-off between reconnect attempts: 200 ms doubling to 3 s while etcd stays unreachable,
/// back to 200 ms once a session got somewhere (connected and did its first piece of work).
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(200))
    }
    /// Waits before the next attempt; false if `stop` came first.
    async fn wait(&mut self, progressed: bool, stop: &CancellationToken) -> bool {
        if progressed {
            self.0 = Duration::from_millis(200);
        }
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(3));
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            () = stop.cancelled() => false,
        }
    }
}

impl Registry {
    /// Connects (a failure here is only about reaching etcd; callers that must survive outages
    /// use the loops below, which retry).
    pub async fn connect(cfg: &RegistryConfig) -> Result<Self, ClusterError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(t) = &cfg.tls {
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&t.ca_pem));
            if let Some((cert, key)) = &t.identity {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(tls);
        }
        let client = Client::connect(&cfg.endpoints, Some(opts))
            .await
            .map_err(|e| cfg.err(e))?;
        Ok(Self {
            client,
            keys: cfg.keys().clone(),
            cfg: cfg.clone(),
        })
    }

    #[must_use]
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Grants a lease of the configured TTL and opens its keep-alive stream.
    async fn lease(
        &mut self,
    ) -> Result<
        (
            i64,
            etcd_client::LeaseKeeper,
            etcd_client::LeaseKeepAliveStream,
        ),
        ClusterError,
    > {
        let ttl_secs = self.cfg.lease_ttl.as_secs().max(2) as i64;
        let lease = self
            .client
            .lease_grant(ttl_secs, None)
            .await
            .map_err(|e| self.cfg.err(e))?
            .id();
        let (keeper, acks) = self
            .client
            .lease_keep_alive(lease)
            .await
            .map_err(|e| self.cfg.err(e))?;
        Ok((lease, keeper, acks))
    }

    /// Every key under `prefix` (relative to it) and the store revision read at.
    pub async fn get_prefix(
        &mut self,
        prefix: &str,
    ) -> Result<(BTreeMap<String, Vec<u8>>, i64), ClusterError> {
        let resp = self
            .client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.cfg.err(e))?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let mut map = BTreeMap::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            if let Some(rel) = key.strip_prefix(prefix) {
                map.insert(rel.to_string(), kv.value().to_vec());
            }
        }
        Ok((map, rev))
    }

    /// The live workers, by address. Records that do not parse are skipped with a warning.
    pub async fn workers(&mut self) -> Result<BTreeMap<String, WorkerRecord>, ClusterError> {
        let (raw, _) = self.get_prefix(&self.keys.workers()).await?;
        Ok(parse_workers(&raw))
    }

    /// The current plan and its modification revision (for compare-and-swap).
    pub async fn plan(&mut self) -> Result<Option<(PlanRecord, i64)>, ClusterError> {
        let key = self.keys.plan();
        let resp = self
            .client
            .get(key.as_str(), None)
            .await
            .map_err(|e| self.cfg.err(e))?;
        Ok(resp.kvs().first().and_then(|kv| {
            serde_json::from_slice(kv.value())
                .map_err(|e| tracing::warn!(error = %e, "ignoring an unreadable plan"))
                .ok()
                .map(|p| (p, kv.mod_revision()))
        }))
    }

    /// Writes `plan` if the stored plan is still at `expected_rev` (0: absent). Returns whether
    /// it was written: a planner that lost its leadership meanwhile must not overwrite.
    pub async fn put_plan_if(
        &mut self,
        plan: &PlanRecord,
        expected_rev: i64,
    ) -> Result<bool, ClusterError> {
        let key = self.keys.plan();
        let value = serde_json::to_vec(plan).map_err(|e| self.cfg.err(e))?;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                expected_rev,
            )])
            .and_then([TxnOp::put(key.as_str(), value, None)]);
        let resp = self.client.txn(txn).await.map_err(|e| self.cfg.err(e))?;
        Ok(resp.succeeded())
    }

    /// Every coordinator's published load.
    pub async fn loads(&mut self) -> Result<Vec<LoadRecord>, ClusterError> {
        let (raw, _) = self.get_prefix(&self.keys.loads()).await?;
        Ok(raw
            .values()
            .filter_map(|v| serde_json::from_slice(v).ok())
            .collect())
    }

    /// The elected planner's name, if one is elected.
    pub async fn leader(&mut self) -> Result<Option<String>, ClusterError> {
        match self.client.leader(self.keys.election()).await {
            Ok(r) => Ok(r
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            // "election: no leader" is an error status in etcd's API.
            Err(e) if e.to_string().contains("no leader") => Ok(None),
            Err(e) => Err(self.cfg.err(e)),
        }
    }
}

/// Parses the `workers/` prefix, skipping records that do not parse.
#[must_use]
pub fn parse_workers(raw: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, WorkerRecord> {
    raw.iter()
        .filter_map(|(k, v)| match serde_json::from_slice::<WorkerRecord>(v) {
            Ok(r) => Some((k.clone(), r)),
            Err(e) => {
                tracing::warn!(key = %k, error = %e, "ignoring an unreadable worker record");
                None
            }
        })
        .collect()
}

/// Keeps `key` = the latest value of `value` alive under a lease until `stop`, then revokes it
/// (so the record disappears at once on a clean stop, and within the TTL on a crash). Survives
/// etcd outages: re-grants the lease and re-puts the value once etcd is back.
pub async fn keep_alive(
    cfg: RegistryConfig,
    key: String,
    mut value: watch::Receiver<Vec<u8>>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new();
    let renew = cfg.lease_ttl / 3;
    loop {
        let mut registered = false;
        let session = async {
            let mut reg = Registry::connect(&cfg).await?;
            let (lease, mut keeper, mut acks) = reg.lease().await?;
            let put = |reg: &mut Registry, v: Vec<u8>| {
                let key = key.clone();
                let mut client = reg.client.clone();
                async move {
                    client
                        .put(key, v, Some(PutOptions::new().with_lease(lease)))
                        .await
                }
            };
            let v = value.borrow_and_update().clone();
            put(&mut reg, v).await.map_err(|e| cfg.err(e))?;
            registered = true;
            tracing::info!(%key, lease, "registered");
            let mut tick = tokio::time::interval(renew);
            loop {
                tokio::select! {
                    () = stop.cancelled() => {
                        let _ = reg.client.lease_revoke(lease).await;
                        return Ok::<bool, ClusterError>(true);
                    }
                    _ = tick.tick() => keeper.keep_alive().await.map_err(|e| cfg.err(e))?,
                    ack = acks.message() => match ack {
                        Ok(Some(a)) if a.ttl() > 0 => {}
                        Ok(Some(_)) => return Err(cfg.err("the lease expired")),
                        Ok(None) => return Err(cfg.err("the keep-alive stream ended")),
                        Err(e) => return Err(cfg.err(e)),
                    },
                    changed = value.changed() => {
                        if changed.is_err() {
                            let _ = reg.client.lease_revoke(lease).await;
                            return Ok(true);
                        }
                        let v = value.borrow_and_update().clone();
                        put(&mut reg, v).await.map_err(|e| cfg.err(e))?;
                    }
                }
            }
        };
        match session.await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(%key, error = %e, "registration lost; retrying");
            }
        }
        if !backoff.wait(registered, &stop).await {
            return;
        }
    }
}

/// Publishes the full contents of `prefix` (keys relative to it) to `out` on every change until
/// `stop`. While etcd is unreachable the last published map stands; after reconnecting the
/// prefix is read afresh, so nothing that happened during the outage is missed.
pub async fn watch_prefix(
    cfg: RegistryConfig,
    prefix: String,
    out: watch::Sender<Option<BTreeMap<String, Vec<u8>>>>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new();
    loop {
        let mut synced = false;
        let session = async {
            let mut reg = Registry::connect(&cfg).await?;
            let (mut map, rev) = reg.get_prefix(&prefix).await?;
            out.send_replace(Some(map.clone()));
            synced = true;
            let mut stream = reg
                .client
                .watch(
                    prefix.as_str(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(rev + 1),
                    ),
                )
                .await
                .map_err(|e| cfg.err(e))?;
            loop {
                let msg = tokio::select! {
                    () = stop.cancelled() => return Ok::<(), ClusterError>(()),
                    m = stream.message() => m.map_err(|e| cfg.err(e))?,
                };
                let Some(resp) = msg else {
                    return Err(cfg.err("the watch ended"));
                };
                if resp.canceled() {
                    return Err(cfg.err(format!(
                        "the watch was cancelled: {} (compacted at {})",
                        resp.cancel_reason(),
                        resp.compact_revision()
                    )));
                }
                if resp.events().is_empty() {
                    continue;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key());
                    let Some(rel) = key.strip_prefix(&prefix) else {
                        continue;
                    };
                    match ev.event_type() {
                        EventType::Put => {
                            map.insert(rel.to_string(), kv.value().to_vec());
                        }
                        EventType::Delete => {
                            map.remove(rel);
                        }
                    }
                }
                out.send_replace(Some(map.clone()));
            }
        };
        match session.await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(%prefix, error = %e, "registry watch lost; keeping the last known state and retrying")
            }
        }
        if !backoff.wait(synced, &stop).await {
            return;
        }
    }
}

/// Campaigns for the planner role as `name`; once elected, runs `lead` with a registry client
/// until it returns, the lease is lost or `stop`. Loops: a lost leadership is campaigned for
/// again.
pub async fn lead<F, Fut>(cfg: RegistryConfig, name: String, stop: CancellationToken, mut lead: F)
where
    F: FnMut(Registry, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut backoff = Backoff::new();
    loop {
        let mut granted = false;
        let session = async {
            let mut reg = Registry::connect(&cfg).await?;
            let (lease, mut keeper, mut acks) = reg.lease().await?;
            granted = true;
            let lost = CancellationToken::new();
            let keep = async {
                let mut tick = tokio::time::interval(cfg.lease_ttl / 3);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            if keeper.keep_alive().await.is_err() { break; }
                        }
                        ack = acks.message() => match ack {
                            Ok(Some(a)) if a.ttl() > 0 => {}
                            _ => break,
                        },
                    }
                }
                lost.cancel();
            };
            let run = async {
                let mut client = reg.client.clone();
                let elected = tokio::select! {
                    r = client.campaign(reg.keys.election(), name.as_bytes(), lease) => r.map_err(|e| cfg.err(e))?,
                    () = lost.cancelled() => return Err(cfg.err("lease lost while campaigning")),
                };
                let leader_key = elected.leader().cloned();
                tracing::info!(%name, "elected planner");
                lead(reg.clone(), lost.clone()).await;
                if let Some(k) = leader_key {
                    let _ = client
                        .resign(Some(etcd_client::ResignOptions::new().with_leader(k)))
                        .await;
                }
                Ok::<(), ClusterError>(())
            };
            tokio::select! {
                () = keep => Err(cfg.err("planner lease lost")),
                r = run => r,
                () = stop.cancelled() => {
                    let _ = reg.client.lease_revoke(lease).await;
                    Ok(())
                }
            }
        };
        let r = session.await;
        if stop.is_cancelled() {
            return;
        }
        if let Err(e) = r {
            tracing::warn!(error = %e, "planner election interrupted; campaigning again");
        }
        if !backoff.wait(granted, &stop).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_normalises_endpoints_and_checks_names_and_ttl() {
        let c = RegistryConfig::new(
            "10.0.0.1:2379, http://e2:2379",
            "prod",
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(c.endpoints, vec!["http://10.0.0.1:2379", "http://e2:2379"]);
        assert_eq!(c.keys().plan(), "/switchyard/prod/assignment");
        assert!(RegistryConfig::new("", "prod", Duration::from_secs(5)).is_err());
        assert!(RegistryConfig::new("e:1", "a/b", Duration::from_secs(5)).is_err());
        assert!(RegistryConfig::new("e:1", "prod", Duration::from_millis(500)).is_err());
    }

    #[test]
    fn unreadable_worker_records_are_skipped() {
        let good = WorkerRecord {
            addr: "h:1".into(),
            instance: "i".into(),
            hosted: vec![vec![0, 1]],
            managed: false,
            device: "cpu".into(),
            memory_budget_bytes: 0,
            bytes_per_expert: 0,
            weight_bytes: 0,
            model_fingerprint: "fp".into(),
            weight_format: "bf16".into(),
            protocol_version: 1,
            worker_version: String::new(),
            kernels: "avx2 f32 deterministic".into(),
            load: crate::WorkerLoad::default(),
        };
        let mut raw = BTreeMap::new();
        raw.insert("h:1".to_string(), serde_json::to_vec(&good).unwrap());
        raw.insert("h:2".to_string(), b"{not json".to_vec());
        let parsed = parse_workers(&raw);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed["h:1"], good);
    }
}
