//! Identifiers of layers and experts, checked where they enter.

use crate::{config::MixtralConfig, ModelError, Result};
use std::fmt;

/// A decoder layer index, `< num_hidden_layers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId(u16);

/// An expert index within a layer, `< num_local_experts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertId(u8);

impl LayerId {
    /// Checks `i` against the config; the only way to build one from outside input.
    pub fn new(i: usize, cfg: &MixtralConfig) -> Result<Self> {
        if i < cfg.num_hidden_layers {
            Ok(Self(i as u16))
        } else {
            Err(ModelError::Input(format!(
                "layer {i} out of range (model has {} layers)",
                cfg.num_hidden_layers
            )))
        }
    }
    /// The index as usize.
    #[must_use]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl ExpertId {
    /// Checks `i` against the config; the only way to build one from outside input.
    pub fn new(i: usize, cfg: &MixtralConfig) -> Result<Self> {
        if i < cfg.num_local_experts {
            Ok(Self(i as u8))
        } else {
            Err(ModelError::Input(format!(
                "expert {i} out of range (model has {} experts per layer)",
                cfg.num_local_experts
            )))
        }
    }
    /// The index as usize.
    #[must_use]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl fmt::Display for ExpertId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A set of expert indices, the same for every layer (a worker's `--experts 0-3,6`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertSet {
    /// `hosted[e]` is true when expert `e` is in the set.
    hosted: Vec<bool>,
}

impl ExpertSet {
    /// Every expert of a model with `n` experts per layer.
    #[must_use]
    pub fn all(n: usize) -> Self {
        Self {
            hosted: vec![true; n],
        }
    }

    /// The set of `experts` (indices `>= n` are ignored) for a model with `n` experts per layer.
    #[must_use]
    pub fn from_indices(n: usize, experts: impl IntoIterator<Item = usize>) -> Self {
        let mut hosted = vec![false; n];
        for e in experts {
            if let Some(h) = hosted.get_mut(e) {
                *h = true;
            }
        }
        Self { hosted }
    }

    /// Parses `"0-3,6"` for a model with `n` experts per layer.
    pub fn parse(spec: &str, n: usize) -> Result<Self> {
        let mut hosted = vec![false; n];
        let bad = |why: String| ModelError::Input(format!("expert set {spec:?}: {why}"));
        for part in spec.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(bad("empty item".into()));
            }
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let lo: usize = lo
                .parse()
                .map_err(|_| bad(format!("{lo:?} is not a number")))?;
            let hi: usize = hi
                .parse()
                .map_err(|_| bad(format!("{hi:?} is not a number")))?;
            if lo > hi {
                return Err(bad(format!("range {lo}-{hi} is reversed")));
            }
            if hi >= n {
                return Err(bad(format!("expert {hi} out of range (model has {n})")));
            }
            hosted[lo..=hi].iter_mut().for_each(|h| *h = true);
        }
        Ok(Self { hosted })
    }

    /// Whether expert `e` is in the set.
    #[must_use]
    pub fn contains(&self, e: usize) -> bool {
        self.hosted.get(e).copied().unwrap_or(false)
    }

    /// The experts in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.hosted
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.then_some(i))
    }

    /// Number of experts in the set.
    #[must_use]
    pub fn len(&self) -> usize {
        self.hosted.iter().filter(|h| **h).count()
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for ExpertSet {
    /// Compact form, `0-3,6`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<usize> = self.iter().collect();
        let mut first = true;
        let mut i = 0;
        while i < ids.len() {
            let mut j = i;
            while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
                j += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if i == j {
                write!(f, "{}", ids[i])?;
            } else {
                write!(f, "{}-{}", ids[i], ids[j])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_set_parses_ranges_and_lists() {
        let s = ExpertSet::parse("0-2, 5,7", 8).unwrap();
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 1, 2, 5, 7]);
        assert_eq!(s.to_string(), "0-2,5,7");
        assert_eq!(s.len(), 5);
        assert!(!s.contains(3));
    }

    #[test]
    fn expert_set_rejects_bad_specs() {
        for bad in ["", "8", "3-1", "a", "1,,2", "0-x"] {
            let err = ExpertSet::parse(bad, 8).unwrap_err();
            assert!(err.to_string().contains("expert set"), "{bad}: {err}");
        }
    }
}
