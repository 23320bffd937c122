//! Logs and traces. Logs: `tracing` with fixed dotted field names (`command.id`, `event.id`,
//! `event.type`, `owner`, `queue.name`, `lock.key`, `attempt`), as JSON lines in production or
//! pretty for people. Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, the same `tracing` spans
//! are exported over OTLP/HTTP, each hop a child of the W3C `traceparent` its event carries
//! ([`crate::trace`]); unset, nothing of OpenTelemetry runs.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt;
use tracing_subscriber::prelude::*;

/// The exporter of this process, once traces are on: [`shutdown`] flushes it.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// What is exported as spans (and, inside them, span events): cmdflow's and handlers' spans,
/// never the exporter's own HTTP client or the drivers' chatter.
const TRACES_FILTER: &str = "info,lapin=warn,sqlx=warn,hyper=off,hyper_util=off,reqwest=off,h2=off,\
     opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off,opentelemetry_http=off";

/// The longest a stopping process waits to send its last spans.
const FLUSH_WITHIN: Duration = Duration::from_secs(5);

/// Traces that cannot be set up as the `OTEL_…` variables ask.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{variable}: {reason}")]
    Setting {
        variable: &'static str,
        reason: String,
    },
    #[error("cannot set up the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The log format when `CMDFLOW_LOG_FORMAT` is unset: pretty for a person at a terminal, JSON
/// lines for a log collector (standard error redirected: a container, a service manager).
pub fn default_log_format(stderr_is_terminal: bool) -> &'static str {
    if stderr_is_terminal { "pretty" } else { "json" }
}

/// Installs the global subscriber once, for a server role named `service` (the default
/// `service.name` of its spans). `RUST_LOG` filters (default `info`).
pub fn init(format: &str, service: &str) -> Result<(), TelemetryError> {
    init_with_default(format, "info,lapin=warn,sqlx=warn", service)
}

/// For tests: logs go through the test harness's capture, so a failing test shows its logs
/// and a passing one stays quiet. `RUST_LOG` filters (default `warn`).
pub fn init_for_tests() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,lapin=error"));
    drop(
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt::layer().compact().with_test_writer())
            .try_init(),
    );
}

/// Like [`init`], with another filter when `RUST_LOG` is unset.
pub fn init_with_default(
    format: &str,
    default_filter: &str,
    service: &str,
) -> Result<(), TelemetryError> {
    let logs = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let provider = tracer_provider(service)?;
    // `None` is a layer that does nothing: without an endpoint, spans cost what they did. The
    // spans exported do not depend on `RUST_LOG`: quieter logs keep the traces whole.
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("cmdflow"))
            .with_location(false)
            .with_threads(false)
            .with_filter(EnvFilter::new(TRACES_FILTER))
    });
    let registry = tracing_subscriber::registry().with(traces);
    let result = if format == "json" {
        registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr)
                    .with_filter(logs),
            )
            .try_init()
    } else {
        registry
            .with(
                fmt::layer()
                    .compact()
                    .with_writer(std::io::stderr)
                    .with_filter(logs),
            )
            .try_init()
    };
    match (result, provider) {
        (Ok(()), Some(provider)) => {
            drop(PROVIDER.set(provider));
            tracing::info!(service, "Exporting traces over OTLP.");
        }
        // A second init (tests, embedded use) keeps the first subscriber, and its exporter.
        (Err(_), Some(provider)) => drop(provider.shutdown()),
        (_, None) => {}
    }
    Ok(())
}

/// Whether this process exports spans (its subscriber was installed with an OTLP endpoint).
pub fn traces_enabled() -> bool {
    PROVIDER.get().is_some()
}

/// Sends the spans still buffered and stops the exporter; waits at most a few seconds. A role
/// calls it when it stops. Does nothing when traces are off.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.shutdown_with_timeout(FLUSH_WITHIN)
    {
        tracing::warn!(error = %e, "Could not send the last spans.");
    }
}

/// The exporter the `OTEL_EXPORTER_OTLP_*` variables ask for, or `None` without an endpoint.
fn tracer_provider(service: &str) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let endpoint = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .find_map(|v| Some((v, std::env::var(v).ok().filter(|s| !s.trim().is_empty())?)));
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    let Some((variable, endpoint)) = endpoint.filter(|_| !disabled) else {
        return Ok(None);
    };
    if !endpoint.trim().starts_with("http://") {
        // This build's HTTP client has no TLS, as for remote deciders: a collector runs beside
        // the process (an agent on the node, a sidecar) and forwards.
        return Err(TelemetryError::Setting {
            variable,
            reason: format!(
                "`{endpoint}`: only http:// is supported; send to a collector beside the process"
            ),
        });
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol()?)
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| a.contains("service.name="));
    if !named {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}

/// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf`
/// (the default) or `http/json`.
fn protocol() -> Result<Protocol, TelemetryError> {
    let set = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .into_iter()
    .find_map(|v| Some((v, std::env::var(v).ok().filter(|s| !s.trim().is_empty())?)));
    let Some((variable, value)) = set else {
        return Ok(Protocol::HttpBinary);
    };
    parse_protocol(&value).map_err(|reason| TelemetryError::Setting { variable, reason })
}

fn parse_protocol(value: &str) -> Result<Protocol, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "http/protobuf" => Ok(Protocol::HttpBinary),
        "http/json" => Ok(Protocol::HttpJson),
        "grpc" => Err(
            "grpc is not built in; use http/protobuf (the default) or http/json, on the \
             collector's HTTP port (4318)"
                .to_owned(),
        ),
        other => Err(format!(
            "`{other}` is not a protocol; use http/protobuf or http/json"
        )),
    }
}

/// Makes `span` a child of the span a W3C `traceparent` names (the one an event carries, or an
/// HTTP request's). Call it right after creating the span, before it is entered. Does nothing
/// when traces are off or `traceparent` is absent or invalid: the span then starts a trace.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent.filter(|_| traces_enabled()) else {
        return;
    };
    let carrier = std::collections::HashMap::from([(
        crate::trace::TRACEPARENT.to_owned(),
        traceparent.to_owned(),
    )]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        drop(span.set_parent(parent));
    }
}

/// Records the OpenTelemetry kind of `span` (`server`, `producer`, `consumer`, …), which the
/// span declares as `otel.kind = tracing::field::Empty` so that logs do not show it. Call it
/// before the span is entered. Does nothing when traces are off.
pub fn set_kind(span: &tracing::Span, kind: &'static str) {
    if traces_enabled() {
        span.record("otel.kind", kind);
    }
}

/// The W3C `traceparent` naming `span`, for what it sends on (an event it publishes, an HTTP
/// answer). `None` when traces are off or the span is not recorded.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !traces_enabled() {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(crate::trace::TRACEPARENT)
}

/// [`traceparent`] of the current span.
pub fn current_traceparent() -> Option<String> {
    traceparent(&tracing::Span::current())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_json_unless_a_person_reads_them() {
        assert_eq!(default_log_format(false), "json");
        assert_eq!(default_log_format(true), "pretty");
    }

    #[test]
    fn only_the_http_protocols_are_accepted() {
        assert_eq!(
            parse_protocol("http/protobuf").unwrap(),
            Protocol::HttpBinary
        );
        assert_eq!(parse_protocol(" HTTP/JSON ").unwrap(), Protocol::HttpJson);
        assert!(
            parse_protocol("grpc")
                .unwrap_err()
                .contains("http/protobuf")
        );
        assert!(parse_protocol("carrier-pigeon").is_err());
    }

    #[test]
    fn without_an_exporter_spans_carry_no_trace_context() {
        let span = tracing::info_span!("handle");
        set_parent(
            &span,
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        assert_eq!(traceparent(&span), None);
    }
}
