//! The server span of each request: named after the route template the router matched
//! (`POST /v1/commands/{id}`, never the path), a child of the caller's `traceparent` when it sent
//! one, with the response's status. Every answer carries a `traceparent` header: the one a
//! handler set (the trace of the events it accepted), else this span's. Probes and scrapes
//! (`/healthz`, `/readyz`, `/metrics`) get no span: they would fill traces with noise. With traces off
//! ([`cmdflow_shared::telemetry`]) there is no such span, and only the handlers' header is set.

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use cmdflow_shared::telemetry;
use cmdflow_shared::trace::TRACEPARENT;
use tracing::Instrument;

/// Middleware (`axum::middleware::from_fn`) that runs each request in its server span.
pub async fn record(request: Request, next: Next) -> Response {
    if !telemetry::traces_enabled() {
        return next.run(request).await;
    }
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    if route
        .as_deref()
        .is_some_and(|r| matches!(r, "/healthz" | "/readyz" | "/metrics"))
    {
        return next.run(request).await;
    }
    let name = match &route {
        Some(route) => format!("{method} {route}"),
        None => method.clone(),
    };
    let span = tracing::info_span!(
        "request",
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = route.as_deref().unwrap_or_default(),
        http.response.status_code = tracing::field::Empty,
    );
    telemetry::set_parent(
        &span,
        request
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok()),
    );
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    if !response.headers().contains_key(TRACEPARENT)
        && let Some(value) = telemetry::traceparent(&span).and_then(|tp| tp.parse().ok())
    {
        response.headers_mut().insert(TRACEPARENT, value);
    }
    response
}

/// The `traceparent` header of an answer that accepted `events`: the trace the first one carries
/// (a batch without traceparents of its own shares the request's trace).
pub fn accepted_trace(events: &[cmdflow_shared::Event]) -> axum::http::HeaderMap {
    let mut headers = axum::http::HeaderMap::new();
    if let Some(value) = events
        .first()
        .and_then(|e| e.extensions.get(TRACEPARENT))
        .and_then(|v| v.as_str())
        .and_then(|tp| HeaderValue::from_str(tp).ok())
    {
        headers.insert(TRACEPARENT, value);
    }
    headers
}
