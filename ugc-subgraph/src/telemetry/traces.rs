//! OpenTelemetry traces (SPEC §7): `tracing` spans exported over OTLP/HTTP.
//!
//! Off unless an OTLP endpoint is configured ([`TracesConfig`]). The spans
//! of this crate are at `DEBUG` level, so without the exporter they are
//! disabled at their call sites (the log filter stays at `info`) and cost
//! nothing on the request path; with it, only the OpenTelemetry layer sees
//! them. W3C `traceparent`/`tracestate` from the gateway are continued
//! ([`request_span`]) and every traced response carries `traceresponse`.
//!
//! Sampling is decided here, once per unit of work, before any span exists
//! ([`sampled`]): an unsampled request creates no span at all, and every
//! other span is a [`child_span!`], created only under a traced one. Why
//! not the SDK's sampler alone: `tracing-opentelemetry` builds its span
//! data for every span, sampled or not, and at this service's request
//! rates that cost (~10 µs per cached request, measured) was most of what
//! tracing cost. The SDK then samples everything it is given.
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

/// The configured sampler; unset while traces are off.
static SAMPLER: std::sync::OnceLock<TraceSampler> = std::sync::OnceLock::new();

/// A span for a unit of work under the current span; none (free) when
/// nothing is traced.
#[macro_export]
macro_rules! child_span {
    ($($arg:tt)*) => {
        if tracing::Span::current().is_none() {
            tracing::Span::none()
        } else {
            tracing::debug_span!($($arg)*)
        }
    };
}

/// A span for a background unit of work (a relay pass, an applied
/// invalidation): a child under a traced request, else a root sampled at
/// the configured ratio.
#[macro_export]
macro_rules! work_span {
    ($($arg:tt)*) => {
        if tracing::Span::current().is_none() && !$crate::telemetry::traces::sampled(None) {
            tracing::Span::none()
        } else {
            tracing::debug_span!($($arg)*)
        }
    };
}

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
        // What reaches the SDK was sampled already (see the module doc).
        .with_sampler(Sampler::AlwaysOn)
        .with_resource(Resource::builder().with_service_name(config.service_name.clone()).build())
        .build();
    let tracer = provider.tracer("ugc-subgraph");
    let _ = SAMPLER.set(config.sampler);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok((Traces { provider }, tracer))
}

/// Whether a unit of work is traced: by the caller's decision when it sent
/// a `traceparent` (parent-based samplers), else by the ratio. Always
/// false while traces are off.
pub fn sampled(parent: Option<&opentelemetry::trace::SpanContext>) -> bool {
    let Some(sampler) = SAMPLER.get() else { return false };
    match parent {
        Some(parent) if sampler.parent_based && parent.is_valid() => parent.is_sampled(),
        _ => sampler.ratio >= 1.0 || (sampler.ratio > 0.0 && rand::random::<f64>() < sampler.ratio),
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

/// The server span of a request: continuing the caller's W3C trace when it
/// sent a valid `traceparent`, and only when the request is [`sampled`]
/// (else a disabled span, which makes every span under it free).
pub fn request_span(headers: &HeaderMap, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if SAMPLER.get().is_none() {
        return tracing::Span::none();
    }
    let parent = headers
        .contains_key("traceparent")
        .then(|| TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers)));
    let remote = parent.as_ref().map(|cx| cx.span().span_context().clone()).filter(|sc| sc.is_valid());
    if !sampled(remote.as_ref()) {
        return tracing::Span::none();
    }
    let span = make();
    if let (Some(parent), Some(_)) = (parent, remote) {
        let _ = span.set_parent(parent);
    }
    span
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
