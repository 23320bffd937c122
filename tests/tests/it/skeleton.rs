//! The walking skeleton end to end: gateway → RabbitMQ → worker → PostgreSQL, with Redlock.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_tests::{TestEnv, event, eventually, get, post, start_command};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use serde_json::{Value, json};

const CE: &str = "application/cloudevents+json";

async fn count_of(env: &TestEnv, id: &str) -> Option<i64> {
    env.command(id).await.and_then(|c| c.data["count"].as_i64())
}

async fn wait_count(env: &TestEnv, id: &str, want: i64, within: Duration) {
    eventually(within, &format!("count {want}"), || async {
        (count_of(env, id).await == Some(want)).then_some(())
    })
    .await;
}

async fn post_event(gateway: &str, ev: &Value) -> (u16, Value) {
    post(
        &format!("{gateway}/v1/events"),
        CE,
        &serde_json::to_vec(ev).unwrap(),
    )
    .await
}

#[tokio::test]
async fn a_counter_goes_through_and_its_history_is_in_order() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;

    let id = start_command(&gw.url, "demo.counter", "member:42", json!({})).await;
    for _ in 0..5 {
        let (status, body) = post_event(
            &gw.url,
            &event("demo.increment", Some(&id), json!({"by": 2})),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["ids"].as_array().unwrap().len(), 1);
    }
    wait_count(&env, &id, 10, Duration::from_secs(20)).await;
    let (status, _) = post_event(&gw.url, &event("demo.finish", Some(&id), json!({}))).await;
    assert_eq!(status, 202);

    let command = eventually(Duration::from_secs(20), "completion", || async {
        let (status, body) = get(&format!("{}/v1/commands/{id}", gw.url)).await;
        (status == 200 && body["state"] == "completed").then_some(body)
    })
    .await;
    assert_eq!(command["data"]["count"], 10);
    assert_eq!(command["result"]["count"], 10);
    assert_eq!(command["owner"], "member:42");
    assert_eq!(command["kind"], "demo.counter");
    assert_eq!(command["version"], 7, "start + 5 increments + finish");
    assert!(command["ended_at"].is_string());

    let (status, history) = get(&format!("{}/v1/commands/{id}/history", gw.url)).await;
    assert_eq!(status, 200);
    let entries: Vec<(String, String)> = history["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let what = match e["entry"].as_str().unwrap() {
                "state_changed" => format!(
                    "{}→{}",
                    e["from_state"].as_str().unwrap(),
                    e["to_state"].as_str().unwrap()
                ),
                _ => e["event_type"].as_str().unwrap_or_default().to_owned(),
            };
            (e["entry"].as_str().unwrap().to_owned(), what)
        })
        .collect();
    let mut expected = vec![
        ("received".to_owned(), "command.start".to_owned()),
        ("state_changed".to_owned(), "pending→running".to_owned()),
    ];
    expected.extend((0..5).map(|_| ("received".to_owned(), "demo.increment".to_owned())));
    expected.push(("received".to_owned(), "demo.finish".to_owned()));
    expected.push(("state_changed".to_owned(), "running→completed".to_owned()));
    assert_eq!(entries, expected);

    // Paging walks the same entries.
    let (_, page) = get(&format!("{}/v1/commands/{id}/history?limit=4", gw.url)).await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 4);
    let next = page["next_after"].as_i64().unwrap();
    let (_, rest) = get(&format!(
        "{}/v1/commands/{id}/history?after={next}&limit=100",
        gw.url
    ))
    .await;
    assert_eq!(rest["entries"].as_array().unwrap().len(), entries.len() - 4);
    assert!(rest["next_after"].is_null());

    // A terminal command ignores what comes after, and says so in its history.
    post_event(&gw.url, &event("demo.increment", Some(&id), json!({}))).await;
    eventually(Duration::from_secs(10), "ignored entry", || async {
        let (_, h) = get(&format!("{}/v1/commands/{id}/history", gw.url)).await;
        h["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["entry"] == "ignored")
            .then_some(())
    })
    .await;
    assert_eq!(count_of(&env, &id).await, Some(10));
    env.cleanup().await;
}

#[tokio::test]
async fn the_same_event_published_twice_is_applied_once() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let id = start_command(&gw.url, "demo.counter", "lead:7", json!({})).await;

    let ev = event("demo.increment", Some(&id), json!({"by": 5}));
    for _ in 0..3 {
        assert_eq!(post_event(&gw.url, &ev).await.0, 202);
    }
    // A marker event after the duplicates: once it is applied, the duplicates were seen.
    assert_eq!(
        post_event(
            &gw.url,
            &event("demo.increment", Some(&id), json!({"by": 1}))
        )
        .await
        .0,
        202
    );
    wait_count(&env, &id, 6, Duration::from_secs(20)).await;
    // Give any stray duplicate time to land, then check nothing moved.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count_of(&env, &id).await, Some(6));
    let received: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM command_events WHERE command_id = $1::uuid AND event_id = $2 AND entry = 'received'",
    )
    .bind(&id)
    .bind(ev["id"].as_str().unwrap())
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(received, 1);
    env.cleanup().await;
}

#[tokio::test]
async fn an_event_redelivered_after_a_worker_died_before_its_ack_is_applied_once() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    // A worker that will "die": it takes the delivery, commits, and never acks.
    let doomed = env.build_worker(|_| {}).await;
    let id = start_command(&gw.url, "demo.counter", "member:1", json!({})).await;

    let channel = env.bus.channel().await.unwrap();
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    // The command's partition: its start and its events are all there.
    let partition = env.partition_queue_of(&id);
    let mut consumer = channel
        .basic_consume(
            partition.as_str().into(),
            "doomed".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    // The start event first.
    let start = consumer.next().await.unwrap().unwrap();
    let outcome = doomed.engine().process(&start.data).await;
    doomed.engine().settle(&start, &outcome).await;

    let ev = event("demo.increment", Some(&id), json!({"by": 3}));
    assert_eq!(post_event(&gw.url, &ev).await.0, 202);
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!delivery.redelivered);
    let outcome = doomed.engine().process(&delivery.data).await;
    assert!(matches!(
        outcome,
        cmdflow_workers::Disposition::Ack(cmdflow_workers::Applied::Applied)
    ));
    assert_eq!(
        count_of(&env, &id).await,
        Some(3),
        "committed before the crash"
    );
    // The worker dies: its channel goes away without an ack.
    channel.close(320, "worker died".into()).await.unwrap();
    drop(doomed);

    // A healthy worker gets the redelivery and must change nothing.
    env.start_worker().await;
    eventually(
        Duration::from_secs(20),
        "the redelivery to be settled",
        || async { (env.queue_depth(&partition).await == 0).then_some(()) },
    )
    .await;
    assert_eq!(
        post_event(
            &gw.url,
            &event("demo.increment", Some(&id), json!({"by": 1}))
        )
        .await
        .0,
        202
    );
    wait_count(&env, &id, 4, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count_of(&env, &id).await, Some(4));
    let received: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM command_events WHERE event_id = $1 AND entry = 'received'",
    )
    .bind(ev["id"].as_str().unwrap())
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(received, 1);
    env.cleanup().await;
}

async fn two_thousand_increments_on_one_counter(lock_enabled: bool) {
    let mut env = TestEnv::with(|c| {
        c.lock_enabled = lock_enabled;
        // Contention on one command is the point: keep retrying busy locks quickly.
        c.retry_delays = "50ms,100ms,200ms,400ms,800ms".to_owned();
    })
    .await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    env.start_worker().await;
    let id = start_command(&gw.url, "demo.counter", "system:bench", json!({})).await;

    let batch: Vec<Value> = (0..2000)
        .map(|_| event("demo.increment", Some(&id), json!({})))
        .collect();
    for chunk in batch.chunks(200) {
        let (status, body) = post(
            &format!("{}/v1/events", gw.url),
            "application/cloudevents-batch+json",
            &serde_json::to_vec(chunk).unwrap(),
        )
        .await;
        assert_eq!(status, 202, "{body}");
    }
    wait_count(&env, &id, 2000, Duration::from_secs(120)).await;
    let command = env.command(&id).await.unwrap();
    assert_eq!(command.version, 2001);
    assert!(
        env.dead_letter_after(0).await.is_none(),
        "no increment may be dead-lettered"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn two_thousand_increments_from_two_workers_end_exact() {
    two_thousand_increments_on_one_counter(true).await;
}

#[tokio::test]
async fn without_the_lock_the_guarded_update_still_keeps_the_count_exact() {
    two_thousand_increments_on_one_counter(false).await;
}

#[tokio::test]
async fn bad_input_gets_its_status_and_code() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    let events = format!("{}/v1/events", gw.url);
    let commands = format!("{}/v1/commands", gw.url);

    let (s, b) = post(&events, CE, b"{not json").await;
    assert_eq!(
        (s, b["code"].as_str()),
        (400, Some("malformed_json")),
        "{b}"
    );

    let (s, b) = post(
        &events,
        "text/plain",
        &serde_json::to_vec(&event("a.b", None, json!({}))).unwrap(),
    )
    .await;
    assert_eq!(
        (s, b["code"].as_str()),
        (415, Some("unsupported_media_type")),
        "{b}"
    );

    let big = event("demo.big", None, json!({"blob": "x".repeat(300 * 1024)}));
    let (s, b) = post(&events, CE, &serde_json::to_vec(&big).unwrap()).await;
    assert_eq!((s, b["code"].as_str()), (413, Some("too_large")), "{b}");

    let huge = vec![b' '; 5 * 1024 * 1024];
    let (s, b) = post(&events, CE, &huge).await;
    assert_eq!((s, b["code"].as_str()), (413, Some("too_large")), "{b}");

    for (field, value) in [
        ("type", json!("NotDotted")),
        ("id", json!("")),
        ("specversion", json!("0.3")),
        ("data", json!([1])),
        ("commandid", json!("../../etc/passwd")),
    ] {
        let mut ev = event("demo.increment", None, json!({}));
        ev[field] = value;
        let (s, b) = post(&events, CE, &serde_json::to_vec(&ev).unwrap()).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (422, Some("invalid_field")),
            "{field}: {b}"
        );
        assert!(
            b["detail"].as_str().unwrap().starts_with(field),
            "{field}: {b}"
        );
    }

    let (s, b) = post(
        &commands,
        "application/json",
        br#"{"kind":"no.such","owner":"member:1"}"#,
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (422, Some("unknown_kind")), "{b}");
    let (s, b) = post(
        &commands,
        "application/json",
        br#"{"kind":"demo.counter","owner":"Pirate:1"}"#,
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (422, Some("invalid_field")), "{b}");
    assert!(b["detail"].as_str().unwrap().starts_with("owner"));
    let (s, b) = post(
        &commands,
        "application/json",
        br#"{"kind":"demo.counter","owner":"member:1","data":7}"#,
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (422, Some("invalid_field")), "{b}");
    assert!(b["detail"].as_str().unwrap().starts_with("data"));

    let unknown = uuid::Uuid::now_v7();
    let (s, b) = get(&format!("{}/v1/commands/{unknown}", gw.url)).await;
    assert_eq!((s, b["code"].as_str()), (404, Some("not_found")), "{b}");
    let (s, b) = get(&format!("{}/v1/commands/{unknown}/history", gw.url)).await;
    assert_eq!((s, b["code"].as_str()), (404, Some("not_found")), "{b}");
    let (s, b) = get(&format!("{}/v1/commands/not-a-uuid", gw.url)).await;
    assert_eq!((s, b["code"].as_str()), (400, Some("bad_request")), "{b}");

    // Nothing reached the store.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM commands")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
    env.cleanup().await;
}

/// PostgreSQL's errors are sorted by SQLSTATE: one that says the data can never be stored (here
/// a CHECK constraint, 23514) makes a dead letter at once, naming it; one that may pass (here a
/// row lock not available within the lock timeout, 55P03) is tried again, and then applies.
#[tokio::test]
async fn a_store_error_is_retried_only_when_trying_again_can_help() {
    let mut env = TestEnv::with(|c| {
        // 1.5 s of lock_timeout for the worker's statements; retries after 500 ms, then 1 h, so
        // that a permanent error retried through the ladder could not reach dead letters in time.
        c.lock_ttl = Duration::from_secs(2);
        c.retry_delays = "500ms,1h".to_owned();
    })
    .await;
    sqlx::query(
        "ALTER TABLE commands ADD CONSTRAINT test_refuses_poison CHECK (NOT (data ? 'poison'))",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let gw = env.start_gateway().await;
    env.start_worker().await;

    let poisoned = start_command(&gw.url, "demo.counter", "member:6", json!({"poison": 1})).await;
    let letter = eventually(Duration::from_secs(20), "a dead letter", || {
        env.dead_letter_after(0)
    })
    .await;
    assert_eq!(letter.error_class, "store", "{}", letter.reason);
    assert!(
        letter.reason.contains("SQLSTATE 23514") && letter.reason.contains("test_refuses_poison"),
        "{}",
        letter.reason
    );
    assert_eq!(letter.attempts, 1, "no retry for data PostgreSQL refuses");
    assert_eq!(
        letter.command_id.map(|c| c.to_string()),
        Some(poisoned.clone())
    );

    // A row held by another transaction past the worker's lock timeout: retried, then applied.
    let id = start_command(&gw.url, "demo.counter", "member:6", json!({})).await;
    wait_count(&env, &id, 0, Duration::from_secs(20)).await;
    let mut holder = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM commands WHERE id = $1::uuid FOR UPDATE")
        .bind(&id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let bump = event("demo.increment", Some(&id), json!({"by": 2}));
    assert_eq!(post_event(&gw.url, &bump).await.0, 202);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count_of(&env, &id).await,
        Some(0),
        "held back by the row lock"
    );
    holder.rollback().await.unwrap();
    wait_count(&env, &id, 2, Duration::from_secs(20)).await;
    assert!(
        env.dead_letter_after(letter.id).await.is_none(),
        "a lock timeout is not a dead letter"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn permanently_bad_events_go_to_dead_letters_at_once_with_their_reason() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let id = start_command(&gw.url, "demo.counter", "member:5", json!({})).await;
    wait_count(&env, &id, 0, Duration::from_secs(20)).await;

    // Published straight to the broker, bypassing the gateway's validation.
    env.publish_raw("demo.increment", b"{\"specversion\":\"1.0\",\"id\":7}")
        .await;
    let first = eventually(Duration::from_secs(20), "a dead letter", || {
        env.dead_letter_after(0)
    })
    .await;
    assert_eq!(
        first.body, b"{\"specversion\":\"1.0\",\"id\":7}",
        "kept byte for byte"
    );
    assert_eq!(first.error_class, "invalid_event");
    assert!(
        first.reason.contains("id: must be a string"),
        "{}",
        first.reason
    );
    assert_eq!(first.attempts, 1, "no retry for a permanent error");
    assert_eq!(first.signature, "invalid_event:demo.increment");

    // A handler refusal is permanent too.
    let bad = event("demo.increment", Some(&id), json!({"by": "two"}));
    assert_eq!(post_event(&gw.url, &bad).await.0, 202);
    let second = eventually(Duration::from_secs(20), "a second dead letter", || {
        env.dead_letter_after(first.id)
    })
    .await;
    let dead: Value = serde_json::from_slice(&second.body).unwrap();
    assert_eq!(dead["id"], bad["id"]);
    assert!(
        second.reason.contains("`by` must be an integer"),
        "{}",
        second.reason
    );
    assert_eq!(second.error_class, "permanent");
    assert_eq!(
        second.kind.as_deref(),
        Some("demo.counter"),
        "the command's kind is kept"
    );
    assert_eq!(second.owner.as_deref(), Some("member:5"), "and its owner");
    assert_eq!(second.signature, "permanent:demo.counter");
    assert_eq!(count_of(&env, &id).await, Some(0));
    env.cleanup().await;
}

#[tokio::test]
async fn an_event_for_a_command_that_never_starts_waits_for_it_then_is_a_dead_letter() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    // Addressed to a command whose start never comes: parked (its start could be on its way),
    // then, past CMDFLOW_START_WAIT (2 s here), a dead letter that says so.
    let ghost = uuid::Uuid::now_v7().to_string();
    let ev = event("demo.increment", Some(&ghost), json!({}));
    let sent = std::time::Instant::now();
    assert_eq!(post_event(&gw.url, &ev).await.0, 202);
    let dead = eventually(Duration::from_secs(30), "a dead letter", || {
        env.dead_letter_after(0)
    })
    .await;
    assert!(
        sent.elapsed() >= Duration::from_secs(2),
        "it waited for its start first"
    );
    assert_eq!(dead.error_class, "start_never_came");
    assert!(
        dead.reason.contains(&ghost) && dead.reason.contains("CMDFLOW_START_WAIT"),
        "{}",
        dead.reason
    );
    assert_eq!(
        dead.routing_key, "demo.increment",
        "the original routing key, for replays"
    );
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_events")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(parked, 0, "nothing left parked");
    env.cleanup().await;
}

#[tokio::test]
async fn events_that_come_before_their_commands_start_are_applied_after_it_in_order() {
    let mut env = TestEnv::with(|c| c.start_wait = Duration::from_secs(60)).await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    // The increments go through the gateway; the start, sent straight to the broker without a
    // partition header, takes the longer way (forwarded to its partition) and comes last.
    let id = uuid::Uuid::now_v7().to_string();
    for seq in 0..5 {
        let ev = event("demo.increment", Some(&id), json!({"by": 1, "seq": seq}));
        assert_eq!(post_event(&gw.url, &ev).await.0, 202);
    }
    eventually(Duration::from_secs(20), "the increments parked", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM parked_events WHERE command_id = $1::uuid")
                .bind(&id)
                .fetch_one(&env.pool)
                .await
                .ok()?;
        (n == 5).then_some(())
    })
    .await;
    let start = cmdflow_tests::start_event(&id, "demo.counter", "member:7", json!({}));
    env.publish_raw_as_engine("command.start", &serde_json::to_vec(&start).unwrap())
        .await;
    wait_count(&env, &id, 5, Duration::from_secs(20)).await;
    let order: Vec<Option<i64>> = sqlx::query_scalar(
        "SELECT (detail->'data'->>'seq')::bigint FROM command_events
          WHERE command_id = $1::uuid AND entry = 'received' ORDER BY seq",
    )
    .bind(&id)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        order,
        vec![None, Some(0), Some(1), Some(2), Some(3), Some(4)],
        "the start, then the increments in the order they were accepted"
    );
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_events")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(parked, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn with_the_broker_unreachable_the_gateway_answers_503_and_recovers() {
    let proxy = cmdflow_tests::proxy::Proxy::start("127.0.0.1:5672")
        .await
        .unwrap();
    let amqp = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port());
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway_with(|c| c.amqp_url = amqp.clone()).await;
    env.start_worker_with(|c| c.amqp_url = amqp.clone()).await;
    let id = start_command(&gw.url, "demo.counter", "member:9", json!({})).await;
    wait_count(&env, &id, 0, Duration::from_secs(20)).await;

    proxy.cut().await;
    for _ in 0..3 {
        let (s, b) = post_event(&gw.url, &event("demo.increment", Some(&id), json!({}))).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (503, Some("broker_unavailable")),
            "{b}"
        );
    }
    let (s, b) = get(&format!("{}/readyz", gw.url)).await;
    assert_eq!(s, 503, "{b}");
    assert_ne!(b["checks"]["rabbitmq"], "ok");

    // The broker comes back: both the gateway and the worker recover without a restart.
    proxy.restore();
    let accepted = eventually(Duration::from_secs(30), "a 202 after recovery", || async {
        let (s, _) = post_event(
            &gw.url,
            &event("demo.increment", Some(&id), json!({"by": 7})),
        )
        .await;
        (s == 202).then_some(())
    })
    .await;
    let () = accepted;
    wait_count(&env, &id, 7, Duration::from_secs(30)).await;
    env.cleanup().await;
}

#[tokio::test]
async fn health_readiness_and_openapi() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    let (s, _) = get(&format!("{}/healthz", gw.url)).await;
    assert_eq!(s, 200);
    let (s, b) = get(&format!("{}/readyz", gw.url)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["checks"]["postgres"], "ok");
    assert_eq!(b["checks"]["rabbitmq"], "ok");
    assert_eq!(b["checks"]["redis"], "ok");

    let (s, doc) = get(&format!("{}/openapi.json", gw.url)).await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for (path, method) in [
        ("/v1/events", "post"),
        ("/v1/commands", "post"),
        ("/v1/commands/{id}", "get"),
        ("/v1/commands/{id}/history", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from the OpenAPI document"
        );
    }
    let (s, b) = get(&format!("{}/v1/nothing-here", gw.url)).await;
    assert_eq!((s, b["code"].as_str()), (404, Some("not_found")));
    env.cleanup().await;
}

/// The value of one series in Prometheus text, 0 when absent.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_expose_the_fleet_and_move_as_events_flow() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let id = start_command(&gw.url, "demo.counter", "member:70", json!({})).await;
    wait_count(&env, &id, 0, Duration::from_secs(20)).await;
    let metrics = || async {
        let resp = cmdflow_tests::http()
            .get(format!("{}/metrics", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    };
    let before = metrics().await;
    let applied = [("type", "demo.increment"), ("outcome", "applied")];
    let received = [("type", "demo.increment")];
    let applied_before = series(&before, "cmdflow_events_processed_total", &applied);
    let received_before = series(&before, "cmdflow_events_received_total", &received);
    let posted = [
        ("route", "/v1/events"),
        ("method", "POST"),
        ("status", "2xx"),
    ];
    let posted_before = series(&before, "cmdflow_http_requests_total", &posted);
    for _ in 0..3 {
        assert_eq!(
            post_event(&gw.url, &event("demo.increment", Some(&id), json!({})))
                .await
                .0,
            202
        );
    }
    wait_count(&env, &id, 3, Duration::from_secs(20)).await;
    let after = eventually(Duration::from_secs(10), "the counters to move", || async {
        let text = metrics().await;
        (series(&text, "cmdflow_events_processed_total", &applied) >= applied_before + 3.0)
            .then_some(text)
    })
    .await;
    assert!(series(&after, "cmdflow_events_received_total", &received) >= received_before + 3.0);
    assert!(
        series(
            &after,
            "cmdflow_handler_seconds_count",
            &[("type", "demo.increment")]
        ) >= 3.0
    );
    // The gateway's own traffic, by route template and status class, with its latency.
    assert!(series(&after, "cmdflow_http_requests_total", &posted) >= posted_before + 3.0);
    assert!(
        series(
            &after,
            "cmdflow_http_request_duration_seconds_count",
            &[("route", "/v1/events"), ("method", "POST")]
        ) >= 3.0
    );
    // Which version runs, and the process itself.
    let version = [("version", cmdflow_shared::metrics::VERSION)];
    assert_eq!(series(&after, "cmdflow_build_info", &version), 1.0);
    for name in cmdflow_shared::metrics::PROCESS_METRICS {
        assert!(
            after.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} in the gateway's /metrics"
        );
    }
    for name in [
        "cmdflow_events_received_total",
        "cmdflow_events_processed_total",
        "cmdflow_handler_seconds",
        "cmdflow_event_latency_seconds",
        "cmdflow_lock_wait_seconds",
        "cmdflow_http_requests_total",
        "cmdflow_http_request_duration_seconds",
        "cmdflow_build_info",
    ] {
        assert!(
            after.contains(&format!("# HELP {name}")),
            "{name} is described"
        );
    }
    env.cleanup().await;
}

#[tokio::test]
async fn the_gateway_starts_and_accepts_events_while_redis_is_down() {
    let mut env = TestEnv::new().await;
    let gw = env
        .start_gateway_with(|c| c.redis_urls = "redis://127.0.0.1:1/".to_owned())
        .await;
    let (status, body) = get(&format!("{}/readyz", gw.url)).await;
    assert_eq!(status, 200, "Redis does not gate the gateway: {body}");
    assert_ne!(body["checks"]["redis"], "ok", "{body}");
    let id = start_command(&gw.url, "demo.counter", "member:1", json!({})).await;
    // The workers, which do need Redis, apply it.
    env.start_worker().await;
    env.wait_state(&id, cmdflow_shared::CommandState::Running)
        .await;
    env.cleanup().await;
}

/// A team's own kind, typed: a greeting for `name`, at most `times` times.
#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Greeting {
    name: String,
    #[serde(default)]
    #[schemars(range(min = 1, max = 3))]
    times: Option<u8>,
}

struct Greeter;

impl cmdflow_workers::Workflow for Greeter {
    const KIND: &'static str = "greeting";
    const VERSION: &'static str = "7";
    const STARTS_ON: &'static [&'static str] = &["visitor.greeted"];
    type Data = Greeting;

    fn decide(
        &self,
        command: &cmdflow_shared::Command<Greeting>,
        event: &cmdflow_shared::Event,
    ) -> Result<cmdflow_shared::Decision, cmdflow_shared::HandlerError> {
        let times = command.data.times.unwrap_or(1);
        Ok(cmdflow_shared::Decision::complete(json!({
            "text": format!("Hello, {}", command.data.name).repeat(times.into()),
            "on": event.ty,
        })))
    }
}

#[tokio::test]
async fn the_gateway_knows_the_kinds_a_worker_publishes_and_checks_their_schema() {
    let mut env = TestEnv::bare(|_| {}).await;
    let gw = env.start_gateway().await;
    let commands = format!("{}/v1/commands", gw.url);
    let start = |data: Value| {
        serde_json::to_vec(&json!({"kind": "greeting", "owner": "tenant:acme", "data": data}))
            .unwrap()
    };

    // No worker has published yet: the gateway knows no kind, and says so.
    let (s, b) = post(
        &commands,
        "application/json",
        &start(json!({"name": "Ada"})),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (422, Some("unknown_kind")), "{b}");
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("no worker has published"),
        "{b}"
    );

    // A worker with the kind starts; the gateway that was already running takes it up.
    let mut registry = cmdflow_workers::Registry::new();
    registry.workflow(Greeter).unwrap();
    env.start_worker_custom(
        registry,
        std::sync::Arc::new(cmdflow_shared::time::SystemClock),
    )
    .await;
    let (_, kinds) = get(&format!("{}/v1/kinds", gw.url)).await;
    assert_eq!(kinds["kinds"][0]["name"], "greeting", "{kinds}");
    assert_eq!(kinds["kinds"][0]["version"], "7");
    assert_eq!(kinds["kinds"][0]["starts_on"], json!(["visitor.greeted"]));
    assert_eq!(kinds["kinds"][0]["schema"]["required"], json!(["name"]));
    let id = eventually(Duration::from_secs(10), "greeting accepted", || async {
        let (s, b) = post(
            &commands,
            "application/json",
            &start(json!({"name": "Ada"})),
        )
        .await;
        (s == 202).then(|| b["command_id"].as_str().unwrap().to_owned())
    })
    .await;
    let done = env
        .wait_state(&id, cmdflow_shared::CommandState::Completed)
        .await;
    assert_eq!(done.result.unwrap()["text"], "Hello, Ada");
    assert_eq!(done.owner, "tenant:acme", "owner kinds are open");

    // Start data that breaks the derived schema: 422, naming the field.
    for (data, field) in [
        (json!({}), "data.name"),
        (json!({"name": 7}), "data.name"),
        (json!({"name": "Ada", "times": 9}), "data.times"),
    ] {
        let (s, b) = post(&commands, "application/json", &start(data.clone())).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (422, Some("invalid_field")),
            "{data}: {b}"
        );
        assert!(
            b["detail"].as_str().unwrap().starts_with(field),
            "{data}: {b}"
        );
    }
    // An unknown kind lists the kinds there are.
    let (s, b) = post(
        &commands,
        "application/json",
        br#"{"kind": "greetings", "owner": "member:1"}"#,
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (422, Some("unknown_kind")), "{b}");
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .ends_with("known kinds: greeting"),
        "{b}"
    );

    // The broadcast type it starts on starts it, owned by the subject.
    let mut greeted = event(
        "visitor.greeted",
        None,
        json!({"name": "Grace", "times": 2}),
    );
    greeted["subject"] = json!("visitor:c-1");
    env.publish_raw("visitor.greeted", &serde_json::to_vec(&greeted).unwrap())
        .await;
    let greeting = eventually(Duration::from_secs(30), "the broadcast start", || async {
        let id: uuid::Uuid = sqlx::query_scalar(
            "SELECT id FROM commands WHERE owner = 'visitor:c-1' AND state = 'completed'",
        )
        .fetch_optional(&env.pool)
        .await
        .unwrap()?;
        env.command(&id.to_string()).await
    })
    .await;
    assert_eq!(greeting.result.unwrap()["text"], "Hello, GraceHello, Grace");
    env.cleanup().await;
}

#[tokio::test]
async fn readiness_is_503_while_the_events_exchange_is_missing() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    let (s, b) = get(&format!("{}/readyz", gw.url)).await;
    assert_eq!(s, 200, "{b}");

    // A broker reset, or a namespace nobody declared: every publish would fail.
    env.bus
        .delete_topology()
        .await
        .expect("delete the topology");
    let exchange = format!("{}.events", env.config.namespace);
    let (s, b) = get(&format!("{}/readyz", gw.url)).await;
    assert_eq!(s, 503, "{b}");
    let check = b["checks"]["rabbitmq"].as_str().unwrap_or_default();
    assert!(
        check.contains(&exchange) && check.contains("does not exist"),
        "names the missing exchange: {b}"
    );
    let (s, b) = post_event(&gw.url, &event("demo.increment", None, json!({}))).await;
    assert!(
        s == 503,
        "a publish to a missing exchange is refused: {s} {b}"
    );

    // Declared again (a worker starting does it): ready, and accepting.
    env.bus
        .declare_topology()
        .await
        .expect("declare the topology");
    let (s, b) = get(&format!("{}/readyz", gw.url)).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = post_event(&gw.url, &event("demo.increment", None, json!({}))).await;
    assert_eq!(s, 202, "{b}");
    env.cleanup().await;
}

#[tokio::test]
async fn the_work_queue_of_an_earlier_version_is_unbound_or_deleted() {
    let env = TestEnv::new().await;
    let t = env.bus.topology().clone();
    let legacy = t.legacy_work_queue();
    let channel = env.bus.channel().await.unwrap();
    // As the versions before partitions left it: bound to every event, one still waiting.
    let bind = || async {
        channel
            .queue_declare(
                legacy.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                legacy.as_str().into(),
                t.events_exchange().as_str().into(),
                "#".into(),
                Default::default(),
                Default::default(),
            )
            .await
            .unwrap();
    };
    bind().await;
    env.publish_raw("demo.increment", b"{}").await;
    assert_eq!(env.queue_depth(&legacy).await, 1);

    // Declared again (a new worker starts): unbound, what waits in it kept for the old workers.
    env.bus.declare_topology().await.unwrap();
    env.publish_raw("demo.increment", b"{}").await;
    assert_eq!(env.queue_depth(&legacy).await, 1, "nothing new goes there");

    // Emptied: the next declare deletes it.
    channel
        .queue_purge(legacy.as_str().into(), Default::default())
        .await
        .unwrap();
    env.bus.declare_topology().await.unwrap();
    let gone = env.bus.queue_depth(&legacy).await;
    assert!(gone.is_err(), "deleted once empty: {gone:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_world_dropped_without_cleanup_leaves_nothing_behind() {
    let env = TestEnv::new().await;
    let database = env.database().to_owned();
    let queue = env.partition_queue_of(&uuid::Uuid::now_v7().to_string());
    let amqp = env.config.amqp_url.clone();
    // As when an assertion fails before `cleanup`.
    drop(env);
    let admin = sqlx::PgPool::connect(&cmdflow_tests::admin_url())
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&database)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "the database {database} is left behind");
    let conn = lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await;
    assert!(declared.is_err(), "the queue {queue} is left behind");
    drop(conn.close(200, "done".into()).await);
}
