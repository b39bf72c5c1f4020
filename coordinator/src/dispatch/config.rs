//! How the coordinator talks to workers: settings, TLS, channels and the dispatch runtime.

use super::DispatchError;
use std::time::Duration;
use switchyard_cluster::WorkerId;
use switchyard_wire::{pb::expert_service_client::ExpertServiceClient, WireDType};
use tonic::transport::{Channel, Endpoint};

/// How the coordinator talks to workers.
#[derive(Clone, Debug)]
pub struct DispatchConfig {
    /// Activation dtype on the wire (f32: bit-exact with embedded mode).
    pub wire_dtype: WireDType,
    /// Deadline of one expert batch call.
    pub rpc_timeout: Duration,
    /// Deadline of connecting (and the startup Info call).
    pub connect_timeout: Duration,
    /// How long a worker whose call failed stays out of routing before it is tried again.
    pub failure_backoff: Duration,
    /// How long a layer whose expert has no live host waits for one (a replacement worker
    /// registering, a failed one coming back) before its sequences fail.
    pub expert_wait: Duration,
    /// Talk to workers over TLS (mutual, with `identity`).
    pub tls: Option<ClientTls>,
    /// Split steps of several sequences into two micro-batches and compute one's attention
    /// while the other's experts are away (dual-batch overlap). It pays where the network
    /// wait is long next to attention and the coordinator has cores of its own: each
    /// micro-batch reads the experts' weights again, and batches then run on a dispatch thread
    /// instead of the engine thread, a thread hand-off per layer even for steps of one
    /// sequence. Off by default: on a 2-core machine shared with the workers it cost 5–20 %.
    pub overlap: bool,
    /// How batches travel to a worker.
    pub rpc: RpcMode,
}

/// How expert batches travel to a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpcMode {
    /// One unary Forward call per batch: an HTTP/2 stream with headers and a deadline each.
    Unary,
    /// One long-lived ForwardStream per worker that every batch goes down; workers that do not
    /// know it get unary calls.
    Stream,
}

impl std::str::FromStr for RpcMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "unary" => Ok(Self::Unary),
            "stream" => Ok(Self::Stream),
            o => Err(format!("unknown RPC mode {o:?} (unary or stream)")),
        }
    }
}

/// TLS towards workers: the CA that signed their certificates, the name their certificates carry
/// (workers are dialled by IP, so one shared name is checked instead, or with
/// [`ADDRESS_DOMAIN`] each worker's own address), and this coordinator's own certificate for
/// workers that require one.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca_pem: Vec<u8>,
    pub domain: String,
    /// (certificate, key), PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            wire_dtype: WireDType::F32,
            rpc_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            failure_backoff: Duration::from_secs(2),
            expert_wait: Duration::from_secs(30),
            tls: None,
            overlap: false,
            rpc: RpcMode::Stream,
        }
    }
}

/// The `--worker-tls-domain` that checks each worker's certificate against the address it is
/// dialled at (registered under): a certificate issued for one worker's IP or name cannot serve
/// under another's address.
pub const ADDRESS_DOMAIN: &str = "@address";

/// The host part of `host:port` (`[v6]:port` too).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

pub(super) fn endpoint(
    addr: &str,
    cfg: &DispatchConfig,
) -> Result<Endpoint, tonic::transport::Error> {
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))?;
    if let Some(t) = &cfg.tls {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let domain = if t.domain == ADDRESS_DOMAIN {
            host_of(addr).to_string()
        } else {
            t.domain.clone()
        };
        let mut c = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&t.ca_pem))
            .domain_name(domain);
        if let Some((cert, key)) = &t.identity {
            c = c.identity(Identity::from_pem(cert, key));
        }
        ep = ep.tls_config(c)?;
    }
    Ok(ep
        .connect_timeout(cfg.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

/// Without overlap, a current-thread runtime that the engine thread drives itself; with it, one
/// I/O thread that keeps batches moving while the engine thread computes.
pub(super) fn dispatch_runtime(overlap: bool) -> Result<tokio::runtime::Runtime, DispatchError> {
    let mut b = if overlap {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(1).thread_name("dispatch");
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().map_err(|e| DispatchError::Connect {
        worker: WorkerId::new("-"),
        message: format!("cannot start the dispatch runtime: {e}"),
    })
}

/// Rows one message may carry: far more than any step has (at most `--max-batch-tokens`), so
/// that only a broken or rogue worker's reply meets the limit.
const MAX_MESSAGE_ROWS: usize = 1 << 16;

/// A client for a model of `hidden` size whose messages are bounded: a reply is refused by the
/// transport before it is buffered whole when it could not answer any batch.
pub(super) fn client(channel: Channel, hidden: usize) -> ExpertServiceClient<Channel> {
    let max = (1 << 20) + MAX_MESSAGE_ROWS * hidden * 4;
    ExpertServiceClient::new(channel)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
}

/// A status's message and the chain of its source (transport and TLS errors hide there).
pub(super) fn status_text(s: &tonic::Status) -> String {
    with_sources(s.message().to_string(), std::error::Error::source(s))
}

/// `outer: inner: innermost`, the way transport errors are worth reading.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    with_sources(e.to_string(), e.source())
}

fn with_sources(mut s: String, mut cur: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_of_takes_the_host_of_every_address_form() {
        assert_eq!(super::host_of("10.0.0.7:7001"), "10.0.0.7");
        assert_eq!(super::host_of("[fd00::1]:7001"), "fd00::1");
        assert_eq!(super::host_of("worker-3.pool:7001"), "worker-3.pool");
    }
}
