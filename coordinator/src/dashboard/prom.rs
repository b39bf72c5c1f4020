//! Reading this process's own Prometheus exposition back: the dashboard's latency quantiles and
//! rates come from the same counters and histograms `/metrics` exports (and Grafana queries),
//! so the two never disagree about what was measured.

use std::collections::BTreeMap;

/// Counters and gauges by `name{labels}`, histograms by `name{labels without le}`.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub values: BTreeMap<String, f64>,
    /// Cumulative bucket counts by upper bound, ascending, `+Inf` last.
    pub histograms: BTreeMap<String, Vec<(f64, f64)>>,
}

/// `name{a="x",b="y"}` from a name and sorted labels (no braces without labels).
fn key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// Splits `a="x",b="y"` (values without escaped quotes, as this exporter writes ours).
fn labels(s: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(eq) = rest.find("=\"") {
        let k = rest[..eq].trim_start_matches(',');
        let after = &rest[eq + 2..];
        let Some(end) = after.find('"') else { break };
        out.push((k, &after[..end]));
        rest = &after[end + 1..];
    }
    out.sort_unstable();
    out
}

impl Exposition {
    /// Parses the text format; lines it does not understand are skipped.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        let mut e = Self::default();
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, mut ls) = match series.split_once('{') {
                Some((n, rest)) => (n, labels(rest.trim_end_matches('}'))),
                None => (series, Vec::new()),
            };
            if let Some(base) = name.strip_suffix("_bucket") {
                let Some(i) = ls.iter().position(|(k, _)| *k == "le") else {
                    continue;
                };
                let le = ls.remove(i).1;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                };
                e.histograms
                    .entry(key(base, &ls))
                    .or_default()
                    .push((bound, value));
            } else {
                e.values.insert(key(name, &ls), value);
            }
        }
        for b in e.histograms.values_mut() {
            b.sort_by(|x, y| x.0.total_cmp(&y.0));
        }
        e
    }

    /// `value(key) - earlier.value(key)`, 0 where absent (a counter not yet incremented).
    #[must_use]
    pub fn delta(&self, earlier: &Self, key: &str) -> f64 {
        let now = self.values.get(key).copied().unwrap_or(0.0);
        let then = earlier.values.get(key).copied().unwrap_or(0.0);
        (now - then).max(0.0)
    }

    /// Quantile `q` of the observations of histogram `key` made since `earlier`, interpolated
    /// within its bucket as Prometheus' `histogram_quantile` does; None without observations.
    #[must_use]
    pub fn quantile(&self, earlier: &Self, key: &str, q: f64) -> Option<f64> {
        let now = self.histograms.get(key)?;
        let then = earlier.histograms.get(key);
        let counts: Vec<(f64, f64)> = now
            .iter()
            .map(|&(le, c)| {
                let before = then
                    .and_then(|t| t.iter().find(|(l, _)| *l == le))
                    .map_or(0.0, |&(_, c)| c);
                (le, (c - before).max(0.0))
            })
            .collect();
        let total = counts.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for &(le, c) in &counts {
            if c >= rank {
                if le.is_infinite() {
                    return Some(prev.0);
                }
                let within = if c > prev.1 {
                    (rank - prev.1) / (c - prev.1)
                } else {
                    1.0
                };
                return Some(prev.0 + (le - prev.0) * within);
            }
            prev = (le, c);
        }
        Some(prev.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE x counter\n\
        switchyard_generation_tokens_total 120\n\
        switchyard_worker_up{worker=\"127.0.0.1:7001\"} 1\n\
        lat_seconds_bucket{worker=\"a\",le=\"0.001\"} 0\n\
        lat_seconds_bucket{worker=\"a\",le=\"0.01\"} 50\n\
        lat_seconds_bucket{worker=\"a\",le=\"0.1\"} 90\n\
        lat_seconds_bucket{worker=\"a\",le=\"+Inf\"} 100\n\
        lat_seconds_sum{worker=\"a\"} 3.2\n";

    #[test]
    fn counters_labels_and_histograms_parse() {
        let e = Exposition::parse(TEXT);
        assert_eq!(e.values["switchyard_generation_tokens_total"], 120.0);
        assert_eq!(
            e.values["switchyard_worker_up{worker=\"127.0.0.1:7001\"}"],
            1.0
        );
        let h = &e.histograms["lat_seconds{worker=\"a\"}"];
        assert_eq!(h.len(), 4);
        assert!(h[3].0.is_infinite() && h[3].1 == 100.0);
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_prometheus() {
        let now = Exposition::parse(TEXT);
        let empty = Exposition::default();
        let k = "lat_seconds{worker=\"a\"}";
        // Rank 50 of 100 is the top of the (0.001, 0.01] bucket.
        assert!((now.quantile(&empty, k, 0.5).unwrap() - 0.01).abs() < 1e-12);
        // Rank 70: halfway through (0.01, 0.1].
        assert!((now.quantile(&empty, k, 0.7).unwrap() - 0.055).abs() < 1e-12);
        // Rank 99 lies in +Inf: the highest finite bound.
        assert_eq!(now.quantile(&empty, k, 0.99), Some(0.1));
        // Nothing observed since `now`.
        assert_eq!(now.quantile(&now, k, 0.5), None);
        assert_eq!(
            now.delta(&empty, "switchyard_generation_tokens_total"),
            120.0
        );
    }
}
