//! Logging to stderr, and with `--otlp-endpoint` OpenTelemetry traces exported over OTLP/gRPC.
//!
//! Without an endpoint only the log layer is installed: spans below its level are disabled at
//! their call sites and cost a branch. With one, a second layer (its own filter: switchyard's
//! request, queue, step, dispatch and worker compute spans) hands spans to a batch processor
//! that exports them from its own thread.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData},
    Resource,
};
use std::{sync::Arc, time::Duration};
use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt, Layer};

/// The OpenTelemetry flags every command takes.
#[derive(clap::Args, Clone, Debug)]
pub struct OtlpArgs {
    /// Export traces over OTLP/gRPC to this collector, e.g. http://otel-collector:4317 (off
    /// without it).
    #[arg(long, global = true, env = "SWITCHYARD_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of requests traced (a worker follows the coordinator's decision).
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_OTLP_SAMPLE_RATIO",
        default_value_t = 1.0
    )]
    pub otlp_sample_ratio: f64,
    /// service.name of the exported spans (default: switchyard-<command>).
    #[arg(long, global = true, env = "SWITCHYARD_OTLP_SERVICE_NAME")]
    pub otlp_service_name: Option<String>,
}

/// Keeps the exporter running; flushes what is buffered when dropped.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                tracing::warn!(error = %e, "flushing traces failed");
            }
        }
    }
}

/// The OTLP exporter on a runtime of its own: the SDK's batch processor calls exporters from a
/// plain thread, and tonic's channel needs a Tokio reactor.
#[derive(Debug)]
struct OnRuntime {
    inner: opentelemetry_otlp::SpanExporter,
    rt: Arc<tokio::runtime::Runtime>,
}

impl opentelemetry_sdk::trace::SpanExporter for OnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        std::future::ready(self.rt.block_on(self.inner.export(batch)))
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Installs the global subscriber: logs filtered by `log` (an `EnvFilter` spec), and traces
/// when `otlp.otlp_endpoint` is set.
pub fn init(log: &str, otlp: &OtlpArgs, command: &str) -> anyhow::Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_new(log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colours only for a terminal: a log redirected to a file (or collected from a container)
    // would otherwise carry escape codes around every level and field.
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    let Some(endpoint) = &otlp.otlp_endpoint else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Telemetry { provider: None });
    };
    anyhow::ensure!(
        (0.0..=1.0).contains(&otlp.otlp_sample_ratio),
        "--otlp-sample-ratio {} is not in [0, 1]",
        otlp.otlp_sample_ratio
    );
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp")
            .enable_all()
            .build()?,
    );
    let exporter = {
        let _in = rt.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .build()?
    };
    let processor = BatchSpanProcessor::builder(OnRuntime {
        inner: exporter,
        rt,
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            .with_scheduled_delay(Duration::from_secs(1))
            .with_max_queue_size(65_536)
            .build(),
    )
    .build();
    let service = otlp
        .otlp_service_name
        .clone()
        .unwrap_or_else(|| format!("switchyard-{command}"));
    // Coordinators start traces at the ratio; a worker only continues the traces batches bring
    // (its own roots would be one trace per batch, from untraced coordinators too).
    let root = if command == "worker" {
        Sampler::AlwaysOff
    } else {
        Sampler::TraceIdRatioBased(otlp.otlp_sample_ratio)
    };
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(root)))
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let spans = Targets::new()
        .with_target("switchyard_coordinator", tracing::Level::DEBUG)
        .with_target("switchyard_worker", tracing::Level::DEBUG);
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("switchyard"))
        .with_filter(spans);
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .init();
    tracing::info!(%endpoint, ratio = otlp.otlp_sample_ratio, "exporting traces over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}
