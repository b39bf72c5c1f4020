//! OpenTelemetry: `serve` and a worker export to a small OTLP receiver (the collector's trace
//! service from `opentelemetry-proto`); one request yields the coordinator's spans (request,
//! validation, queueing, steps, each layer's dispatch) and the worker's compute spans in one
//! trace, with layer and expert attributes.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value, AnyValue},
};
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use switchyard_tests::{fixtures, free_port, Server, Worker};

/// (service, span name, trace id, attributes) of every span received.
type Spans = Arc<Mutex<Vec<(String, String, Vec<u8>, BTreeMap<String, String>)>>>;

struct Receiver(Spans);

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let attrs = s
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), text(&a.value)))
                        .collect();
                    out.push((service.clone(), s.name, s.trace_id, attrs));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn start_receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let port = free_port();
    let svc = TraceServiceServer::new(Receiver(spans.clone()));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve(format!("127.0.0.1:{port}").parse().unwrap()),
        )
        .unwrap();
    });
    (format!("http://127.0.0.1:{port}"), spans)
}

#[test]
fn one_request_is_one_trace_across_the_coordinator_and_its_worker() {
    let model = fixtures().join("tiny-mixtral-trained");
    let (endpoint, spans) = start_receiver();
    let w = Worker::start_env(
        &model,
        &["--experts", "0-7"],
        &[("SWITCHYARD_OTLP_ENDPOINT", endpoint.as_str())],
    );
    let s = Server::start(
        &model,
        &[
            "--workers",
            &format!("{}=0-7", w.addr),
            "--otlp-endpoint",
            &endpoint,
        ],
    );
    let (status, body) = s.post(
        "/v1/completions",
        &serde_json::json!({"model": "tiny-mixtral-trained", "prompt": "Once upon a time", "max_tokens": 3}),
    );
    assert_eq!(status, 200, "{body}");
    // Batches are exported every second.
    let deadline = Instant::now() + Duration::from_secs(30);
    let trace = loop {
        let got = spans.lock().unwrap().clone();
        let request = got
            .iter()
            .find(|(svc, name, _, _)| svc == "switchyard-coordinator" && name == "request");
        if let Some((_, _, id, _)) = request {
            if got.iter().any(|(svc, name, t, _)| {
                svc == "switchyard-worker" && name == "worker.forward" && t == id
            }) {
                break id.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no trace with spans from both: {:?}",
            got.iter().map(|(s, n, _, _)| (s, n)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Everything of the trace arrived: wait for one more export round.
    std::thread::sleep(Duration::from_millis(1500));
    let got = spans.lock().unwrap().clone();
    let in_trace: Vec<_> = got.iter().filter(|(_, _, t, _)| *t == trace).collect();
    let names: BTreeSet<(&str, &str)> = in_trace
        .iter()
        .map(|(svc, n, _, _)| (svc.as_str(), n.as_str()))
        .collect();
    for want in ["request", "validate", "queue", "engine.step", "dispatch"] {
        assert!(
            names.contains(&("switchyard-coordinator", want)),
            "no {want} span: {names:?}"
        );
    }
    for (svc, name, _, attrs) in &in_trace {
        if *name == "dispatch" || *name == "worker.forward" {
            assert!(attrs.contains_key("layer"), "{svc} {name}: {attrs:?}");
            assert!(
                attrs.get("experts").is_some_and(|e| e.starts_with('[')),
                "{svc} {name}: {attrs:?}"
            );
        }
    }
    // One dispatch per layer per step (4 layers; a prefill step and two decode steps).
    let dispatches = in_trace
        .iter()
        .filter(|(_, n, _, _)| n == "dispatch")
        .count();
    let forwards = in_trace
        .iter()
        .filter(|(_, n, _, _)| n == "worker.forward")
        .count();
    assert!(
        dispatches >= 4 && forwards == dispatches,
        "{dispatches} dispatches, {forwards} worker spans"
    );
    // The worker exported nothing outside the coordinator's traces.
    let traces: BTreeSet<&Vec<u8>> = got
        .iter()
        .filter(|(svc, _, _, _)| svc == "switchyard-worker")
        .map(|(_, _, t, _)| t)
        .collect();
    assert_eq!(traces.len(), 1);
}
