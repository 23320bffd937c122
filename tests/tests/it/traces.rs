//! Traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, a `cmdflow gateway` and a `cmdflow worker`
//! process export the spans of one accepted event as one trace — the gateway's request, its
//! publish, the worker's handling, its commit and its outbox publish, and the handling of the
//! event the decision emitted — to an OTLP/HTTP receiver, and send them when they stop. The
//! gateway's answer names that trace in its `traceparent` header.
//!
//! The receiver is this test's own: an HTTP server taking `POST /v1/traces` in OTLP/JSON.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use cmdflow_shared::CommandState;
use cmdflow_tests::fleet::Fleet;
use cmdflow_tests::{TestEnv, eventually, http};
use serde_json::{Map, Value, json};

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    trace: String,
    id: String,
    parent: String,
    name: String,
    /// OTLP's `SpanKind`: 2 server, 4 producer, 5 consumer.
    kind: i64,
    attributes: Map<String, Value>,
}

impl Span {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).and_then(Value::as_str)
    }
}

/// An attribute's value as OTLP/JSON writes it (`{"stringValue": …}`, `{"intValue": "202"}`),
/// as text.
fn value_text(value: &Value) -> Value {
    match value.as_object().and_then(|o| o.values().next()) {
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(other) => Value::String(other.to_string()),
        None => Value::Null,
    }
}

fn attributes(list: &Value) -> Map<String, Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|kv| {
            (
                kv["key"].as_str().unwrap_or_default().to_owned(),
                value_text(&kv["value"]),
            )
        })
        .collect()
}

/// The spans of one `ExportTraceServiceRequest` in OTLP/JSON.
fn spans_of(request: &Value) -> Vec<Span> {
    let mut out = Vec::new();
    for resource in request["resourceSpans"].as_array().into_iter().flatten() {
        let service = attributes(&resource["resource"]["attributes"])
            .get("service.name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                let text = |k: &str| span[k].as_str().unwrap_or_default().to_owned();
                out.push(Span {
                    service: service.clone(),
                    trace: text("traceId"),
                    id: text("spanId"),
                    parent: text("parentSpanId"),
                    name: text("name"),
                    kind: span["kind"].as_i64().unwrap_or_default(),
                    attributes: attributes(&span["attributes"]),
                });
            }
        }
    }
    out
}

/// Starts the receiver on a free port: its base URL, and the spans it has received.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let received: Arc<Mutex<Vec<Span>>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                sink.lock().unwrap().extend(spans_of(&request));
                ([("content-type", "application/json")], "{}")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

/// The single span of `spans` named `name` whose attribute `key` is `value`.
fn one<'a>(spans: &'a [Span], name: &str, key: &str, value: &str) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == name && s.attr(key) == Some(value))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {name} span with {key}={value}: {spans:#?}"
    );
    found[0]
}

fn children_of<'a>(spans: &'a [Span], parent: &Span, name: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.parent == parent.id && s.name == name)
        .collect()
}

#[tokio::test]
async fn one_event_is_one_trace_from_the_gateway_through_the_worker_and_its_outbox() {
    let env = TestEnv::new().await;
    let (receiver, received) = otlp_receiver().await;
    let mut fleet = Fleet::new(&env.config);
    fleet.set_env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver);
    fleet.set_env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json");
    // Spans leave in batches every minute, so those this test sees were sent at shutdown.
    fleet.set_env("OTEL_BSP_SCHEDULE_DELAY", "60000");
    // Logs say little; the spans exported do not depend on it.
    fleet.set_env("RUST_LOG", "warn,lapin=error");
    fleet.start_gateway().await;
    fleet.start_worker(0);
    let gateway = fleet.gateway_url().to_owned();
    let person = "member:trace-1";

    // A membership, started through the API: the answer names the trace its start carries.
    let started = http()
        .post(format!("{gateway}/v1/commands"))
        .json(&json!({"kind": "membership", "owner": person, "data": {"name": "Bo"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let start_trace = started.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let id = started.json::<Value>().await.unwrap()["command_id"]
        .as_str()
        .unwrap()
        .to_owned();
    env.wait_state(&id, CommandState::Waiting).await;
    let recorded: String = sqlx::query_scalar(
        "SELECT detail->>'traceparent' FROM command_events
          WHERE command_id = $1::uuid AND entry = 'received' AND event_type = 'command.start'",
    )
    .bind(&id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(recorded, start_trace, "the answer names the start's trace");

    // The caller's own trace: the approval continues it, and the decision's broadcast
    // (`member.approved`, which starts the member_to_client funnel) continues it further.
    let caller_trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let approval = cmdflow_tests::event("membership.approved", Some(&id), json!({"by": "admin:1"}));
    let accepted = http()
        .post(format!("{gateway}/v1/events"))
        .header("content-type", "application/cloudevents+json")
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .body(serde_json::to_vec(&approval).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let answered = accepted.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let (answered_trace, answered_parent) = cmdflow_shared::trace::parse(&answered).unwrap();
    assert_eq!(
        answered_trace, caller_trace,
        "the answer names the caller's trace"
    );
    env.wait_state(&id, CommandState::Completed).await;
    eventually(Duration::from_secs(60), "the broadcast handled", || async {
        sqlx::query_scalar::<_, uuid::Uuid>(
            "SELECT id FROM commands WHERE owner = $1 AND kind = 'funnel.member_to_client'",
        )
        .bind(person)
        .fetch_optional(&env.pool)
        .await
        .unwrap()
    })
    .await;
    // A read: its answer names its own request's span.
    let read = http()
        .get(format!("{gateway}/v1/commands/{id}"))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let read_trace = read.headers()["traceparent"].to_str().unwrap().to_owned();

    // Stopping sends the spans still buffered.
    for (role, status) in fleet.terminate(Duration::from_secs(40)).await {
        assert!(status.success(), "{role} exited with {status}");
    }
    let spans = received.lock().unwrap().clone();
    let trace: Vec<Span> = spans
        .iter()
        .filter(|s| s.trace == caller_trace)
        .cloned()
        .collect();

    // gateway request → publish
    let request = one(&trace, "POST /v1/events", "http.route", "/v1/events");
    assert_eq!(request.service, "cmdflow-gateway");
    assert_eq!(request.kind, 2, "a server span");
    assert_eq!(request.parent, caller_span, "a child of the caller's span");
    assert_eq!(request.attr("http.response.status_code"), Some("202"));
    let publish = children_of(&trace, request, "publish");
    assert_eq!(publish.len(), 1, "{trace:#?}");
    let publish = publish[0];
    assert_eq!(publish.kind, 4, "a producer span");
    assert_eq!(
        answered_parent, publish.id,
        "the accepted event's traceparent names the publish span"
    );

    // → worker handle → commit and outbox publish
    let handle = one(&trace, "handle", "event.type", "membership.approved");
    assert_eq!(handle.service, "cmdflow-worker");
    assert_eq!(handle.kind, 5, "a consumer span");
    assert_eq!(
        handle.parent, publish.id,
        "the worker continues the gateway's span"
    );
    assert_eq!(handle.attr("event.id"), approval["id"].as_str());
    assert_eq!(handle.attr("command.id"), Some(id.as_str()));
    let commit = children_of(&trace, handle, "commit");
    assert_eq!(commit.len(), 1, "{trace:#?}");
    let outbox = children_of(&trace, handle, "outbox publish");
    assert_eq!(outbox.len(), 1, "{trace:#?}");
    assert_eq!(outbox[0].kind, 4, "a producer span");

    // → the emitted event's handling, in the same trace, a child of the handling that decided it.
    let next = one(&trace, "handle", "event.type", "member.approved");
    assert_eq!(next.parent, handle.id, "{trace:#?}");
    assert_eq!(children_of(&trace, next, "commit").len(), 1);

    // Every span of the trace hangs from the caller's span, through spans of the trace.
    let ids: BTreeSet<&str> = trace.iter().map(|s| s.id.as_str()).collect();
    for span in &trace {
        assert!(
            ids.contains(span.parent.as_str()) || span.parent == caller_span,
            "{} has a parent outside the trace: {trace:#?}",
            span.name
        );
    }

    // The start went its own way, as one trace: request → publish → handle.
    let (start_trace_id, start_parent) = cmdflow_shared::trace::parse(&start_trace).unwrap();
    let start_publish = spans
        .iter()
        .find(|s| s.id == start_parent)
        .expect("the start's publish span");
    assert_eq!(
        (start_publish.trace.as_str(), start_publish.name.as_str()),
        (start_trace_id, "publish")
    );
    let start_request = spans.iter().find(|s| s.id == start_publish.parent).unwrap();
    assert_eq!(start_request.name, "POST /v1/commands");
    assert_eq!(start_request.attr("http.response.status_code"), Some("202"));
    let start: Vec<Span> = spans
        .iter()
        .filter(|s| s.trace == start_trace_id)
        .cloned()
        .collect();
    let start_handle = one(&start, "handle", "event.type", "command.start");
    assert_eq!(start_handle.attr("command.id"), Some(id.as_str()));
    assert_eq!(start_handle.parent, start_publish.id);

    // The read's answer names its request span.
    let (read_trace_id, read_span) = cmdflow_shared::trace::parse(&read_trace).unwrap();
    assert_eq!(read_trace_id, caller_trace);
    let read_request = spans.iter().find(|s| s.id == read_span).unwrap();
    assert_eq!(read_request.name, "GET /v1/commands/{id}");
    assert_eq!(read_request.parent, caller_span);
    env.cleanup().await;
}
