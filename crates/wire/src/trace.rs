//! Trace context across the wire: a traced batch carries its dispatch span's W3C
//! `traceparent` (`ExpertBatch.traceparent`), and the worker's compute span continues that
//! trace, so one request's spans on the coordinator and on every worker share a trace id.
//!
//! Without an OpenTelemetry layer installed (no `--otlp-endpoint`) spans have no trace context:
//! [`traceparent`] is empty and costs a check of the span's state.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const KEY: &str = "traceparent";

/// The `traceparent` of `span`'s trace context, or empty when it is not traced (disabled, no
/// OpenTelemetry layer, or not sampled).
#[must_use]
pub fn traceparent(span: &tracing::Span) -> String {
    if span.is_disabled() {
        return String::new();
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(KEY).unwrap_or_default()
}

/// Makes `span` a child of the remote span `traceparent` names (nothing when it is empty or
/// malformed: a malformed one starts no trace and fails nothing).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() || span.is_disabled() {
        return;
    }
    let carrier = HashMap::from([(KEY.to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    // Refused only when the span is already closed or has no OpenTelemetry layer: nothing to join.
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untraced_spans_carry_nothing_and_bad_headers_are_ignored() {
        assert_eq!(traceparent(&tracing::Span::none()), "");
        continue_trace(&tracing::Span::none(), "00-zz-not-a-traceparent");
        continue_trace(&tracing::Span::current(), "garbage");
    }
}
