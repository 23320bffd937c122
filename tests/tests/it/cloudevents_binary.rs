//! CloudEvents binary content mode, sent by the CloudEvents SDK (Python `cloudevents`, in the
//! tests' venv) as Knative, Dapr and Argo Events sinks send it: over HTTP to the gateway
//! (`ce-*` headers, the body is the data) and over AMQP straight to RabbitMQ (`cloudEvents_*`
//! and `cloudEvents:*` application properties, and the `ce-*` headers of the RabbitMQ binding).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_tests::{TEST_KEY, TestEnv, eventually, python, start_command};
use serde_json::{Value, json};

async fn count_of(env: &TestEnv, id: &str) -> Option<i64> {
    env.command(id).await.and_then(|c| c.data["count"].as_i64())
}

async fn wait_count(env: &TestEnv, id: &str, want: i64) {
    eventually(
        Duration::from_secs(30),
        &format!("count {want}"),
        || async { (count_of(env, id).await == Some(want)).then_some(()) },
    )
    .await;
}

/// Sends `events` with the SDK in binary mode over HTTP; one answer per event.
async fn send_http(gateway: &str, events: &Value) -> Vec<Value> {
    let out = python::run(
        "ce_send.py",
        &[
            "http",
            &format!("{gateway}/v1/events"),
            TEST_KEY,
            &events.to_string(),
        ],
    )
    .await;
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Publishes `events` with the SDK's bindings and pika, in binary mode, to the events exchange.
async fn send_amqp(env: &TestEnv, prefix: &str, events: &Value) {
    python::run(
        "ce_send.py",
        &[
            "amqp",
            &env.config.amqp_url,
            &env.bus.topology().events_exchange(),
            prefix,
            &events.to_string(),
        ],
    )
    .await;
}

fn increment(id: &str, by: i64, extra: Value) -> Value {
    let mut attributes =
        json!({"type": "demo.increment", "source": "knative/sink", "commandid": id});
    if let (Some(a), Value::Object(extra)) = (attributes.as_object_mut(), extra) {
        a.extend(extra);
    }
    json!({"attributes": attributes, "data": {"by": by}})
}

#[tokio::test]
async fn binary_mode_events_from_the_sdk_are_applied_over_http_and_amqp() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let id = start_command(&gw.url, "demo.counter", "member:42", json!({})).await;

    // HTTP: the SDK percent-encodes what a header cannot carry as it is.
    let events = json!([
        increment(&id, 2, json!({})),
        increment(
            &id,
            3,
            json!({"subject": "member:42 \"café\" 100%", "correlationid": "c-1"})
        ),
    ]);
    let answers = send_http(&gw.url, &events).await;
    assert_eq!(answers.len(), 2);
    for answer in &answers {
        assert_eq!(answer["status"], 202, "{answer}");
        assert_eq!(answer["body"]["ids"], json!([answer["id"]]), "{answer}");
    }
    wait_count(&env, &id, 5).await;
    let (_, history) = cmdflow_tests::get(&format!("{}/v1/commands/{id}/history", gw.url)).await;
    let received: Vec<&Value> = history["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["entry"] == "received" && e["event_type"] == "demo.increment")
        .collect();
    assert_eq!(received.len(), 2, "{history}");
    assert_eq!(received[0]["event_id"], answers[0]["id"], "{history}");

    // What a header cannot carry as it is arrives as it was sent: a broadcast nobody waits for
    // is kept, with its attributes, among the unmatched events.
    let subject = "visitor:caf\u{e9} \"x\" 100%";
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let broadcast = json!([{
        "attributes": {"type": "binary.unheard", "source": "dapr/app", "subject": subject,
                       "correlationid": subject, "traceparent": traceparent},
        "data": {"n": 1}
    }]);
    let answers = send_http(&gw.url, &broadcast).await;
    assert_eq!(answers[0]["status"], 202, "{}", answers[0]);
    let unmatched = format!("{}/v1/events/unmatched?type=binary.unheard", gw.url);
    let kept = eventually(
        Duration::from_secs(30),
        "the unmatched broadcast",
        || async {
            let (_, list) = cmdflow_tests::get(&unmatched).await;
            list["events"].as_array().and_then(|e| e.first().cloned())
        },
    )
    .await;
    assert_eq!(kept["event_id"], answers[0]["id"], "{kept}");
    assert_eq!(kept["body"]["subject"], subject, "{kept}");
    assert_eq!(kept["body"]["data"], json!({"n": 1}), "{kept}");
    assert_eq!(kept["body"]["traceparent"], traceparent, "{kept}");

    // AMQP: the binding's two prefixes, and Knative's RabbitMQ binding.
    send_amqp(
        &env,
        "cloudEvents_",
        &json!([increment(&id, 10, json!({}))]),
    )
    .await;
    wait_count(&env, &id, 15).await;
    send_amqp(
        &env,
        "cloudEvents:",
        &json!([increment(&id, 20, json!({}))]),
    )
    .await;
    wait_count(&env, &id, 35).await;
    send_amqp(&env, "ce-", &json!([increment(&id, 40, json!({}))])).await;
    wait_count(&env, &id, 75).await;

    // A bad event in binary mode gets the same precise error as in structured mode: 422 at the
    // gateway, a dead letter with the reason from the broker.
    let bad = json!([{"attributes": {"type": "NotDotted", "source": "s", "commandid": id},
                      "data": {"by": 1}}]);
    let answers = send_http(&gw.url, &bad).await;
    assert_eq!(answers[0]["status"], 422, "{}", answers[0]);
    assert!(
        answers[0]["body"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("type:"),
        "{}",
        answers[0]
    );
    send_amqp(&env, "cloudEvents:", &bad).await;
    let dead = eventually(Duration::from_secs(30), "a dead letter", || {
        env.dead_letter_after(0)
    })
    .await;
    assert_eq!(dead.error_class, "invalid_event", "{}", dead.reason);
    assert!(dead.reason.contains("type:"), "{}", dead.reason);
    assert_eq!(count_of(&env, &id).await, Some(75));
    env.cleanup().await;
}
