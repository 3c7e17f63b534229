//! Logs (`tracing` to stdout), traces ([`traces`], OpenTelemetry) and
//! metrics ([`metrics`]). Never log or trace tokens, review text or
//! variables.

pub mod metrics;
pub mod traces;

use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{LogFormat, TracesConfig};

/// Installs the global subscriber: logs filtered by `RUST_LOG` (default
/// `info`), and, when traces are configured, the OpenTelemetry layer with
/// its own filter (this crate's spans at `DEBUG` and above). Returns the
/// exporter to shut down on exit. Must run inside the Tokio runtime.
///
/// # Errors
/// The trace exporter cannot be built.
pub fn init(
    format: LogFormat,
    traces: Option<&TracesConfig>,
) -> Result<Option<traces::Traces>, opentelemetry_otlp::ExporterBuildError> {
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_target(true).with_filter(filter()).boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_target(true).with_filter(filter()).boxed(),
    };
    let (exporter, otel) = match traces {
        Some(config) => {
            let (exporter, tracer) = traces::tracer(config)?;
            let spans = Targets::new().with_target(env!("CARGO_CRATE_NAME"), tracing::Level::DEBUG);
            (Some(exporter), Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(spans)))
        }
        None => (None, None),
    };
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = tracing_subscriber::registry().with(logs).with(otel).try_init();
    Ok(exporter)
}
