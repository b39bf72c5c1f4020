//! Static placement specs and the resolved expert → workers table.

use crate::ClusterError;
use std::{fmt, path::Path, sync::Arc};
use switchyard_model::{ExpertSet, MixtralConfig};
use switchyard_wire::pb;

/// A worker's identity: its address as the coordinator dials it. Cheap to clone into spans.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(Arc<str>);

impl WorkerId {
    #[must_use]
    pub fn new(s: &str) -> Self {
        Self(Arc::from(s))
    }
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One worker of a static placement: where it listens and the experts it is meant to host
/// (`None`: whatever it reports).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct WorkerSpec {
    pub addr: String,
    #[serde(default)]
    pub experts: Option<String>,
}

/// A placement given on the command line or in a file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct StaticPlacement {
    pub workers: Vec<WorkerSpec>,
}

impl StaticPlacement {
    /// Parses `127.0.0.1:7001=0-3,127.0.0.1:7002=4-7` (an item without `=` continues the previous
    /// worker's expert list, so `a=0-2,5,b=3-4` works). A bare address hosts what it reports.
    pub fn parse(spec: &str) -> Result<Self, ClusterError> {
        let mut workers: Vec<WorkerSpec> = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some((addr, experts)) => {
                    let addr = addr.trim();
                    if addr.is_empty() {
                        return Err(ClusterError::Spec(format!("{item:?} has no address")));
                    }
                    workers.push(WorkerSpec {
                        addr: addr.to_string(),
                        experts: Some(experts.trim().to_string()),
                    });
                }
                None if item.contains(':') => workers.push(WorkerSpec {
                    addr: item.to_string(),
                    experts: None,
                }),
                None => match workers.last_mut() {
                    Some(WorkerSpec {
                        experts: Some(e), ..
                    }) => {
                        e.push(',');
                        e.push_str(item);
                    }
                    _ => {
                        return Err(ClusterError::Spec(format!(
                            "{item:?} is neither host:port[=experts] nor part of an expert list"
                        )))
                    }
                },
            }
        }
        if workers.is_empty() {
            return Err(ClusterError::Spec("no workers given".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for w in &workers {
            if !seen.insert(&w.addr) {
                return Err(ClusterError::Spec(format!(
                    "worker {} is listed twice",
                    w.addr
                )));
            }
        }
        Ok(Self { workers })
    }

    /// Reads `{"workers": [{"addr": "host:port", "experts": "0-3"}, ...]}`.
    pub fn from_file(path: &Path) -> Result<Self, ClusterError> {
        let file_err = |reason: String| ClusterError::File {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let p: Self =
            serde_json::from_str(&text).map_err(|e| file_err(format!("not a placement: {e}")))?;
        if p.workers.is_empty() {
            return Err(file_err("no workers given".into()));
        }
        Ok(p)
    }
}

/// The resolved placement: for every (layer, expert), the workers hosting it.
#[derive(Clone, Debug)]
pub struct PlacementTable {
    workers: Vec<WorkerId>,
    experts: usize,
    /// `[layer * experts + expert]` → indices into `workers`, ascending.
    hosts: Vec<Vec<usize>>,
}

impl PlacementTable {
    /// Builds the table from each worker's own report, checking it against the model and, where
    /// the spec names experts, against the spec; then checks every expert has a host.
    pub fn build(
        cfg: &MixtralConfig,
        fingerprint: &str,
        workers: &[(WorkerSpec, pb::WorkerInfo)],
    ) -> Result<Self, ClusterError> {
        let t = Self::partial(cfg, fingerprint, workers)?;
        let missing = t.uncovered();
        if missing.is_empty() {
            return Ok(t);
        }
        let mut shown: Vec<String> = missing
            .iter()
            .take(6)
            .map(|(l, e)| format!("layer {l} expert {e}"))
            .collect();
        if missing.len() > 6 {
            shown.push(format!("and {} more", missing.len() - 6));
        }
        Err(ClusterError::Uncovered {
            missing: shown.join(", "),
        })
    }

    /// Like [`build`](Self::build) but allows experts without a host (live membership: a table
    /// is used while workers come and go; requests needing a missing expert wait for one).
    pub fn partial(
        cfg: &MixtralConfig,
        fingerprint: &str,
        workers: &[(WorkerSpec, pb::WorkerInfo)],
    ) -> Result<Self, ClusterError> {
        let (layers, experts) = (cfg.num_hidden_layers, cfg.num_local_experts);
        let mut hosts = vec![Vec::new(); layers * experts];
        let mut ids = Vec::new();
        for (i, (spec, info)) in workers.iter().enumerate() {
            let id = WorkerId::new(&spec.addr);
            let bad = |reason: String| ClusterError::Worker {
                worker: id.clone(),
                reason,
            };
            if info.protocol_version != switchyard_wire::PROTOCOL_VERSION {
                return Err(bad(format!(
                    "speaks protocol {} (this coordinator speaks {})",
                    info.protocol_version,
                    switchyard_wire::PROTOCOL_VERSION
                )));
            }
            if info.model_fingerprint != fingerprint {
                return Err(bad(format!(
                    "serves model {:?}, this coordinator serves {fingerprint:?}",
                    info.model_fingerprint
                )));
            }
            let want = match &spec.experts {
                Some(s) => Some(ExpertSet::parse(s, experts).map_err(|e| bad(e.to_string()))?),
                None => None,
            };
            for le in &info.hosted {
                let l = le.layer as usize;
                if l >= layers {
                    return Err(bad(format!("reports layer {l} of a {layers}-layer model")));
                }
                let mut reported = vec![false; experts];
                for &e in &le.experts {
                    let e = e as usize;
                    if e >= experts {
                        return Err(bad(format!("reports expert {e} of {experts}")));
                    }
                    reported[e] = true;
                    hosts[l * experts + e].push(i);
                }
                if let Some(want) = &want {
                    if let Some(e) = want.iter().find(|&e| !reported[e]) {
                        return Err(bad(format!(
                            "the placement says it hosts expert {e}, but it does not have it for layer {l}"
                        )));
                    }
                }
            }
            ids.push(id);
        }
        Ok(Self {
            workers: ids,
            experts,
            hosts,
        })
    }

    /// The (layer, expert) pairs no worker hosts.
    #[must_use]
    pub fn uncovered(&self) -> Vec<(usize, usize)> {
        self.hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_empty())
            .map(|(k, _)| (k / self.experts, k % self.experts))
            .collect()
    }

    /// Workers hosting `(layer, expert)`, ascending index.
    #[must_use]
    pub fn hosts(&self, layer: usize, expert: usize) -> &[usize] {
        &self.hosts[layer * self.experts + expert]
    }

    /// The experts worker `w` (an index into [`Self::workers`]) hosts in every layer.
    #[must_use]
    pub fn everywhere(&self, w: usize) -> Vec<u32> {
        let layers = self.hosts.len() / self.experts.max(1);
        (0..self.experts)
            .filter(|&e| (0..layers).all(|l| self.hosts(l, e).contains(&w)))
            .map(|e| e as u32)
            .collect()
    }

    /// All workers, in placement order (the order partial sums are added in).
    #[must_use]
    pub fn workers(&self) -> &[WorkerId] {
        &self.workers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MixtralConfig {
        let text = r#"{"architectures":["MixtralForCausalLM"],"vocab_size":32,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,
            "num_local_experts":4,"num_experts_per_tok":2,"max_position_embeddings":64}"#;
        MixtralConfig::from_json(text, Path::new("c")).unwrap()
    }

    fn info(experts: &[u32]) -> pb::WorkerInfo {
        pb::WorkerInfo {
            protocol_version: switchyard_wire::PROTOCOL_VERSION,
            model_fingerprint: "fp".into(),
            hosted: (0..2)
                .map(|layer| pb::LayerExperts {
                    layer,
                    experts: experts.to_vec(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn parses_specs_with_lists_and_bare_addresses() {
        let p =
            StaticPlacement::parse("127.0.0.1:7001=0-2,5,127.0.0.1:7002=3-4, 10.0.0.1:9").unwrap();
        assert_eq!(p.workers.len(), 3);
        assert_eq!(p.workers[0].experts.as_deref(), Some("0-2,5"));
        assert_eq!(p.workers[2].experts, None);
        for bad in ["", "=0-3", "0-3", "a:1=0,a:1=1"] {
            assert!(StaticPlacement::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_placement_files() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("p.json");
        std::fs::write(
            &f,
            r#"{"workers":[{"addr":"h:1","experts":"0-3"},{"addr":"h:2"}]}"#,
        )
        .unwrap();
        assert_eq!(StaticPlacement::from_file(&f).unwrap().workers.len(), 2);
        std::fs::write(&f, r#"{"workers":"nope"}"#).unwrap();
        assert!(StaticPlacement::from_file(&f)
            .unwrap_err()
            .to_string()
            .contains("p.json"));
    }

    #[test]
    fn builds_table_with_replicas_and_checks_coverage_and_claims() {
        let spec = |a: &str, e: Option<&str>| WorkerSpec {
            addr: a.into(),
            experts: e.map(Into::into),
        };
        let t = PlacementTable::build(
            &cfg(),
            "fp",
            &[
                (spec("a:1", Some("0-1")), info(&[0, 1])),
                (spec("b:1", None), info(&[1, 2, 3])),
            ],
        )
        .unwrap();
        assert_eq!(t.hosts(1, 1), &[0, 1]);
        assert_eq!(t.hosts(0, 3), &[1]);
        let e =
            PlacementTable::build(&cfg(), "fp", &[(spec("a:1", None), info(&[0, 1]))]).unwrap_err();
        assert!(e.to_string().contains("layer 0 expert 2"), "{e}");
        let e = PlacementTable::build(&cfg(), "fp", &[(spec("a:1", Some("0-3")), info(&[0, 1]))])
            .unwrap_err();
        assert!(e.to_string().contains("does not have it"), "{e}");
        let e = PlacementTable::build(&cfg(), "other", &[(spec("a:1", None), info(&[0, 1, 2, 3]))])
            .unwrap_err();
        assert!(e.to_string().contains("serves model"), "{e}");
    }
}
