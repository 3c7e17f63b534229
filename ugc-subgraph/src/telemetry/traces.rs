//! OpenTelemetry traces (SPEC §7): `tracing` spans exported over OTLP/HTTP.
//!
//! Off unless an OTLP endpoint is configured ([`TracesConfig`]). The spans
//! of this crate are at `DEBUG` level, so without the exporter they are
//! disabled at their call sites (the log filter stays at `info`) and cost
//! nothing on the request path; with it, only the OpenTelemetry layer sees
//! them. W3C `traceparent`/`tracestate` from the gateway are continued
//! ([`continue_trace`]) and every traced response carries `traceresponse`.
//!
//! Spans (names are the `otel.name`s): `POST /graphql` (server),
//! `graphql.operation` (name and type, never variables), `entity_cache`,
//! `dataloader.batch` (kind, size), `cache.l1`, `cache.l2` and
//! `cache.source` (hits and misses as attributes), one span per SQL
//! statement and per Redis call (client), `outbox.relay` and
//! `invalidation.fanout`.
//!
//! Never put review text, tokens or variables into a span.

use axum::http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{span_processor_with_async_runtime::BatchSpanProcessor, Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::{TraceSampler, TracesConfig};

/// The exporter's provider; dropping it without [`Traces::shutdown`] may
/// lose the last batch of spans.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Flushes what is queued and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "trace exporter did not shut down cleanly");
        }
    }
}

/// Builds the exporter and the tracer. Needs a Tokio runtime (the batch
/// processor and the HTTP client run on it).
///
/// # Errors
/// The exporter cannot be built from the configuration.
pub fn tracer(
    config: &TracesConfig,
) -> Result<(Traces, opentelemetry_sdk::trace::Tracer), opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(&config.endpoint)
        .build()?;
    let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(sampler(config.sampler))
        .with_resource(Resource::builder().with_service_name(config.service_name.clone()).build())
        .build();
    let tracer = provider.tracer("ugc-subgraph");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok((Traces { provider }, tracer))
}

fn sampler(s: TraceSampler) -> Sampler {
    let root = match s.ratio {
        r if r >= 1.0 => Sampler::AlwaysOn,
        r if r <= 0.0 => Sampler::AlwaysOff,
        r => Sampler::TraceIdRatioBased(r),
    };
    if s.parent_based {
        Sampler::ParentBased(Box::new(root))
    } else {
        root
    }
}

/// A client span for one call to a dependency (`postgresql`, `redis`),
/// named after the operation. Only inside a traced unit of work (a
/// request, a relay pass): background polls would otherwise start a root
/// trace each.
pub fn client_span(system: &'static str, operation: &'static str) -> tracing::Span {
    if tracing::Span::current().is_none() {
        return tracing::Span::none();
    }
    tracing::debug_span!(
        "client",
        otel.name = operation,
        otel.kind = "client",
        db.system.name = system,
        db.operation.name = operation,
        otel.status_code = tracing::field::Empty,
    )
}

/// Makes `span` a child of the caller's trace when the request carries a
/// valid W3C `traceparent` (a no-op when traces are off: the span is
/// disabled, and the propagator is the global no-op one).
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The `traceresponse` header (W3C Trace Context level 2) naming the
/// server span: a caller can find the trace it started, or the one this
/// service started for it.
pub fn trace_response(span: &tracing::Span) -> Option<HeaderValue> {
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    let span_ref = context.span();
    let sc = span_ref.span_context();
    if !sc.is_valid() {
        return None;
    }
    let flags = if sc.is_sampled() { "01" } else { "00" };
    HeaderValue::from_str(&format!("00-{}-{}-{flags}", sc.trace_id(), sc.span_id())).ok()
}
