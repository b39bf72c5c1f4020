//! `otlp-sink`: an OTLP/gRPC trace receiver that only counts, for measuring what exporting
//! traces costs (scripts/bench-tracing.sh). Prints the spans received so far every second.
//!
//!   otlp-sink 127.0.0.1:4317

use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = req
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .ok_or("usage: otlp-sink HOST:PORT")?
        .parse()?;
    let count = Arc::new(AtomicU64::new(0));
    let shown = count.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        eprintln!("spans {}", shown.load(Ordering::Relaxed));
    });
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Sink(count)))
                .serve(addr),
        )?;
    Ok(())
}
