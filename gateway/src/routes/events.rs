//! `POST /v1/events`: one CloudEvent or a batch, validated, published with confirms, and
//! answered 202 only once the broker has confirmed every one. Events come in structured mode
//! (the body is the event) or in binary mode (`ce-*` headers, the body is the data).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use cmdflow_shared::Event;
use cmdflow_shared::bus;
use cmdflow_shared::contract::{binary, parse_batch};
use serde::Serialize;
use tracing::Instrument;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::routes::{json_body, read_body};

pub const EVENT_CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
];

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    /// The ids of the accepted events, in the order sent.
    pub ids: Vec<String>,
}

/// Publishes one CloudEvent, or a JSON array of them.
///
/// In binary content mode (CloudEvents HTTP binding), the attributes are `ce-*` headers
/// (`ce-specversion`, `ce-id`, `ce-source`, `ce-type`, `ce-commandid`, …; values
/// percent-encoded), `Content-Type` is the data's (JSON), and the body is the data.
#[utoipa::path(post, path = "/v1/events", tag = "events",
    request_body(content = Event, description = "A CloudEvent 1.0 (structured JSON), or an array of them; or, in binary mode, the event's data with its attributes as `ce-*` headers",
        content_type = "application/cloudevents+json"),
    responses(
        (status = 202, description = "Every event was confirmed by the broker", body = Accepted),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 403, description = "A missing scope, a type outside the key's allow-list, or an engine event type", body = ErrorBody),
        (status = 413, description = "An event or the body is too large", body = ErrorBody),
        (status = 415, description = "Wrong content type", body = ErrorBody),
        (status = 422, description = "An invalid field, named in `detail`", body = ErrorBody),
        (status = 503, description = "The broker did not confirm; resend", body = ErrorBody)))]
pub async fn post_events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, HeaderMap, Json<Accepted>)> {
    let mut events = if is_binary_mode(&headers) {
        vec![binary_event(&headers, &read_body(body)?)?]
    } else {
        parse_batch(&json_body(&headers, body, EVENT_CONTENT_TYPES)?)?
    };
    for event in &events {
        refuse_engine_type(&event.ty)?;
        principal.may_publish(&event.ty)?;
    }
    for event in &mut events {
        if event.ty == cmdflow_shared::contract::types::OWNER_LINKED {
            // Who linked, for the audit: the caller, whatever the event said.
            event.extensions.insert(
                cmdflow_shared::contract::LINKED_BY.to_owned(),
                serde_json::Value::String(principal.id.clone()),
            );
        }
    }
    publish_all(&state, &headers, &mut events, Speaker::Caller).await?;
    Ok((
        StatusCode::ACCEPTED,
        crate::http_trace::accepted_trace(&events),
        Json(Accepted {
            ids: events.into_iter().map(|e| e.id).collect(),
        }),
    ))
}

/// Whether a request is in CloudEvents binary mode: it carries `ce-*` headers, and its content
/// type is not a structured-mode one (the HTTP binding's rule).
fn is_binary_mode(headers: &HeaderMap) -> bool {
    let structured = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|ct| {
            ct.trim()
                .to_ascii_lowercase()
                .starts_with("application/cloudevents")
        });
    !structured
        && headers
            .keys()
            .any(|name| name.as_str().starts_with(binary::HTTP_PREFIX))
}

/// The event of a binary-mode request: its `ce-*` headers (percent-decoded) are the
/// attributes, `Content-Type` the data's content type, and the body the data.
fn binary_event(headers: &HeaderMap, body: &[u8]) -> ApiResult<Event> {
    let mut attributes = Vec::new();
    for (name, value) in headers {
        let Some(attribute) = name.as_str().strip_prefix(binary::HTTP_PREFIX) else {
            continue;
        };
        let value = binary::percent_decode(value.as_bytes()).ok_or_else(|| {
            ApiError::invalid(
                name.as_str(),
                "must be percent-encoded UTF-8 (CloudEvents HTTP binding)",
            )
        })?;
        attributes.push((attribute.to_owned(), serde_json::Value::String(value)));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    Ok(Event::from_binary(attributes, content_type, body)?)
}

/// 403 for an engine event type: only cmdflow speaks for the engine, whatever the key.
/// Commands start through `POST /v1/commands`, and ops abort through
/// `POST /v1/commands/{id}/abort`.
pub fn refuse_engine_type(ty: &str) -> ApiResult<()> {
    if !cmdflow_shared::contract::types::is_reserved(ty) {
        return Ok(());
    }
    let instead = match ty {
        cmdflow_shared::contract::types::COMMAND_START => {
            "; start a command with POST /v1/commands"
        }
        cmdflow_shared::contract::types::COMMAND_ABORT => {
            "; abort one with POST /v1/commands/{id}/abort (scope `ops`)"
        }
        _ => "",
    };
    Err(ApiError::Forbidden(format!(
        "`{ty}` is an engine event type: command.*, children.*, timer.* and wait.* events come \
         only from cmdflow itself{instead}"
    )))
}

/// Who an event is published for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    /// A caller's own events: published as they came, unmarked.
    Caller,
    /// The gateway speaking for the engine (a start, an abort): marked as the engine's.
    Engine,
}

/// Gives every event a `traceparent`: its own, else a child of `publish` (the span it is
/// published in) when traces are on, else a child of the request's `traceparent` header, else a
/// new trace.
fn trace(headers: &HeaderMap, events: &mut [Event], publish: &tracing::Span) {
    let parent = headers
        .get(cmdflow_shared::trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok());
    let span = cmdflow_shared::telemetry::traceparent(publish);
    for event in events {
        let own = event
            .extensions
            .get(cmdflow_shared::trace::TRACEPARENT)
            .and_then(|v| v.as_str())
            .and_then(cmdflow_shared::trace::parse)
            .is_some();
        if !own {
            let traceparent = span
                .clone()
                .unwrap_or_else(|| cmdflow_shared::trace::child_of(parent));
            event.extensions.insert(
                cmdflow_shared::trace::TRACEPARENT.to_owned(),
                serde_json::Value::String(traceparent),
            );
        }
    }
}

/// Publishes events in their order, each to its partition, under confirms; fails with 503
/// unless the broker confirmed every one. Events of a batch for one command keep their order.
/// Each is stamped with the time it was accepted (`acceptedat`), replacing any the caller sent,
/// and given a `traceparent` ([`trace`]) from the request's `headers`. With traces on, they are
/// published in a `publish` span, the parent of the workers' spans for them.
pub async fn publish_all(
    state: &AppState,
    headers: &HeaderMap,
    events: &mut [Event],
    speaker: Speaker,
) -> ApiResult<()> {
    let exchange = state.bus.topology().events_exchange();
    let span = if cmdflow_shared::telemetry::traces_enabled() {
        tracing::info_span!(
            "publish",
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.destination.name = %exchange,
            messaging.batch.message_count = events.len(),
            otel.status_code = tracing::field::Empty,
        )
    } else {
        tracing::Span::none()
    };
    trace(headers, events, &span);
    let now = chrono::Utc::now();
    for event in events.iter_mut() {
        event.stamp_accepted(now);
    }
    let bodies: Vec<Vec<u8>> = events.iter().map(Event::to_bytes).collect();
    let messages = events
        .iter()
        .zip(&bodies)
        .map(|(event, body)| {
            let mut headers = bus::event_headers(event);
            // A caller's `owner.linked` is vouched for: its `owners:link` scope was checked.
            if speaker == Speaker::Engine
                || event.ty == cmdflow_shared::contract::types::OWNER_LINKED
            {
                state.bus.mark_engine(&mut headers);
            }
            state
                .bus
                .add_partition(&mut headers, &bus::route_key(event));
            bus::Outgoing {
                exchange: exchange.clone(),
                routing_key: &event.ty,
                body,
                properties: bus::event_properties(&event.id).with_headers(headers),
            }
        })
        .collect();
    let results = state
        .bus
        .publish_many(messages)
        .instrument(span.clone())
        .await;
    for (event, result) in events.iter().zip(results) {
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        result.map_err(ApiError::BrokerUnavailable)?;
        metrics::counter!(
            cmdflow_shared::metrics::EVENTS_RECEIVED,
            "type" => cmdflow_shared::metrics::type_label(&event.ty)
        )
        .increment(1);
    }
    Ok(())
}

/// The most bytes of event bodies (as JSON text) one `GET /v1/events/unmatched` answer
/// carries; the newest event is always given (an event is at most 256 KiB).
pub const UNMATCHED_BUDGET: i64 = 1024 * 1024;

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UnmatchedQuery {
    /// Only events of this type.
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// At most this many, newest first (1 to 1000, default 100).
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Unmatched {
    pub events: Vec<cmdflow_shared::store::time::UnmatchedRow>,
    /// More events matched within `limit` but were left out, older than these: their bodies
    /// passed the answer's budget (1 MiB of JSON).
    pub truncated: bool,
}

/// Broadcast events that started no command and woke no waiter, newest first, as many as fit
/// 1 MiB of bodies.
#[utoipa::path(get, path = "/v1/events/unmatched", tag = "events",
    params(UnmatchedQuery),
    responses(
        (status = 200, description = "Unmatched events, newest first", body = Unmatched),
        (status = 422, description = "Invalid query", body = ErrorBody)))]
pub async fn get_unmatched(
    State(state): State<AppState>,
    query: Result<axum::extract::Query<UnmatchedQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Unmatched>> {
    let axum::extract::Query(query) =
        query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be between 1 and 1000"));
    }
    let page = cmdflow_shared::store::time::unmatched(
        &state.pool,
        query.event_type.as_deref(),
        limit,
        UNMATCHED_BUDGET,
    )
    .await?;
    Ok(Json(Unmatched {
        events: page.events,
        truncated: page.truncated,
    }))
}
