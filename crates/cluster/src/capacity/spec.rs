//! The hosts and the network a plan is for, as users type them: `4x24GiB:8c:40GBps`,
//! `10gbit,200us`.

use super::CapacityError;

/// The most hosts of one kind a plan takes.
const MAX_HOSTS: usize = 4096;

/// Hosts of one kind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostSpec {
    pub count: usize,
    pub memory_bytes: u64,
    /// Cores, or a CPU quota (`0.25c`: a quarter of one core's time).
    pub cores: f64,
    /// Memory read bandwidth in bytes/s; `None`: the calibrated machine's per-core rate times
    /// the cores.
    pub read_bytes_per_s: Option<f64>,
}

impl HostSpec {
    /// Threads a role runs on it: its cores, rounded up (a quota below one core runs one
    /// thread, throttled).
    #[must_use]
    pub fn threads(&self) -> usize {
        (self.cores.ceil() as usize).max(1)
    }
}

impl std::str::FromStr for HostSpec {
    type Err = CapacityError;

    /// `[N x]MEMORY[:CORESc][:BANDWIDTH]`, e.g. `4x24GiB:8c:40GBps`, `16GiB:4c`, `1433MiB:0.25c`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            CapacityError::Spec(format!(
                "host {s:?}: {why} (expected e.g. 4x24GiB:8c:40GBps)"
            ))
        };
        let mut parts = s.split(':');
        let first = parts.next().unwrap_or_default();
        let (count, mem) = match first.split_once(['x', 'X']) {
            Some((n, m)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                (n.parse::<usize>().map_err(|_| bad("host count"))?, m)
            }
            _ => (1, first),
        };
        if count == 0 || count > MAX_HOSTS {
            return Err(bad(&format!("a count of 1 to {MAX_HOSTS} hosts")));
        }
        let memory_bytes = parse_bytes(mem).ok_or_else(|| bad("memory size"))?;
        let mut cores = None;
        let mut read = None;
        for p in parts {
            let lower = p.to_ascii_lowercase();
            if let Some(c) = lower.strip_suffix('c') {
                let c: f64 = c.parse().map_err(|_| bad("cores"))?;
                if !(c > 0.0 && c <= 4096.0) {
                    return Err(bad("cores must be above 0"));
                }
                cores = Some(c);
            } else if let Some(bw) = lower.strip_suffix("gbps") {
                let bw: f64 = bw.parse().map_err(|_| bad("bandwidth"))?;
                if !(bw > 0.0 && bw.is_finite()) {
                    return Err(bad("bandwidth must be above 0"));
                }
                read = Some(bw * 1e9);
            } else {
                return Err(bad(&format!("unknown part {p:?}")));
            }
        }
        Ok(Self {
            count,
            memory_bytes,
            cores: cores.ok_or_else(|| bad("no cores (e.g. :8c)"))?,
            read_bytes_per_s: read,
        })
    }
}

/// `24GiB`, `1433MiB`, `16GB`, `512MB`, `1TiB`, or plain bytes.
fn parse_bytes(s: &str) -> Option<u64> {
    let units: [(&str, f64); 8] = [
        ("TiB", 1024f64.powi(4)),
        ("GiB", 1024f64.powi(3)),
        ("MiB", 1024f64.powi(2)),
        ("KiB", 1024.0),
        ("TB", 1e12),
        ("GB", 1e9),
        ("MB", 1e6),
        ("KB", 1e3),
    ];
    let (num, scale) = units
        .iter()
        .find_map(|(u, k)| s.strip_suffix(u).map(|n| (n, *k)))
        .unwrap_or((s, 1.0));
    let v: f64 = num.trim().parse().ok()?;
    (v > 0.0 && v.is_finite()).then_some((v * scale) as u64)
}

/// The links between roles: every host's rate and one-way latency.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NetSpec {
    pub bits_per_s: f64,
    pub latency_s: f64,
}

impl std::str::FromStr for NetSpec {
    type Err = CapacityError;

    /// `RATE[,LATENCY]`: `10gbit,200us`, `25gbit`, `1gbit,1ms`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            CapacityError::Spec(format!("network {s:?}: {why} (expected e.g. 10gbit,200us)"))
        };
        let (rate, lat) = s.split_once(',').unwrap_or((s, "0us"));
        let rate = rate.trim().to_ascii_lowercase();
        let bits = [("gbit", 1e9), ("mbit", 1e6)]
            .iter()
            .find_map(|(u, k)| rate.strip_suffix(u).map(|n| (n, *k)))
            .and_then(|(n, k)| n.parse::<f64>().ok().map(|v| v * k))
            .filter(|b| *b > 0.0 && b.is_finite())
            .ok_or_else(|| bad("rate"))?;
        let lat = lat.trim().to_ascii_lowercase();
        let latency_s = [("us", 1e-6), ("ms", 1e-3)]
            .iter()
            .find_map(|(u, k)| lat.strip_suffix(u).map(|n| (n, *k)))
            .and_then(|(n, k)| n.parse::<f64>().ok().map(|v| v * k))
            .filter(|l| *l >= 0.0 && l.is_finite())
            .ok_or_else(|| bad("latency"))?;
        Ok(Self {
            bits_per_s: bits,
            latency_s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{HostSpec, NetSpec};

    #[test]
    fn hosts_parse_as_users_write_them() {
        let h: HostSpec = "4x24GiB:8c:40GBps".parse().unwrap();
        assert_eq!(h.count, 4);
        assert_eq!(h.memory_bytes, 24 << 30);
        assert_eq!(h.cores, 8.0);
        assert_eq!(h.read_bytes_per_s, Some(40e9));
        let q: HostSpec = "1433MiB:0.25c".parse().unwrap();
        assert_eq!((q.count, q.memory_bytes, q.threads()), (1, 1433 << 20, 1));
        assert_eq!(q.read_bytes_per_s, None);
        assert_eq!(
            "2x16GB:4c".parse::<HostSpec>().unwrap().memory_bytes,
            16_000_000_000
        );
    }

    #[test]
    fn bad_hosts_say_what_is_wrong() {
        for (s, why) in [
            ("4x24GiB", "no cores"),
            ("0x24GiB:8c", "1 to 4096 hosts"),
            ("5000x24GiB:8c", "1 to 4096 hosts"),
            ("4xlots:8c", "memory"),
            ("24GiB:-1c", "cores"),
            ("24GiB:8c:fastGBps", "bandwidth"),
            ("24GiB:8c:9parsecs", "unknown part"),
        ] {
            let e = s.parse::<HostSpec>().unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn networks_parse_with_and_without_latency() {
        let n: NetSpec = "10gbit,200us".parse().unwrap();
        assert_eq!(n.bits_per_s, 10e9);
        assert!((n.latency_s - 200e-6).abs() < 1e-12);
        assert_eq!("1gbit".parse::<NetSpec>().unwrap().latency_s, 0.0);
        assert!("10gbit,1ms".parse::<NetSpec>().unwrap().latency_s > 9e-4);
        for bad in ["fast", "10gbit,soon", "-1gbit", "10gbps"] {
            assert!(bad.parse::<NetSpec>().is_err(), "{bad}");
        }
    }
}
