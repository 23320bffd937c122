//! Operations on dead letters: kept, grouped, dry-run, replayed once, resumed, discarded, audited.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_shared::metrics::{DEAD_LETTERS_OPEN, QUEUE_MESSAGES, TIMERS_OVERDUE_SECONDS};
use cmdflow_tests::fleet::metric;
use cmdflow_tests::{
    TestEnv, event, eventually, frozen_counter_with_dead_increments, get, post, send,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

async fn count(env: &TestEnv, id: &str) -> i64 {
    env.command(id).await.unwrap().data["count"]
        .as_i64()
        .unwrap()
}

async fn op(gateway: &str, path: &str, body: Value) -> (u16, Value) {
    post(
        &format!("{gateway}/v1/dead-letters/{path}"),
        "application/json",
        &serde_json::to_vec(&body).unwrap(),
    )
    .await
}

/// The gauges a worker refreshes from the stores, read once into a recorder of this test's own
/// (tests run in parallel in one process, so the global one mixes their worlds).
async fn gauges(env: &TestEnv) -> String {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    {
        // The test runs on one thread, so the local recorder sees every gauge refresh_once sets.
        let _local = metrics::set_default_local_recorder(&recorder);
        cmdflow_workers::gauges::refresh_once(&env.pool, &env.bus).await;
    }
    handle.render()
}

async fn wait_job(gateway: &str, job: &str, state: &str) -> Value {
    eventually(WAIT, &format!("replay {job} {state}"), || async {
        let (_, j) = get(&format!("{gateway}/v1/dead-letters/replays/{job}")).await;
        (j["state"] == state).then_some(j)
    })
    .await
}

#[tokio::test]
async fn dead_letters_are_grouped_dry_run_replayed_once_and_replaying_twice_changes_nothing() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let id = frozen_counter_with_dead_increments(&env, &gw.url, "member:60", 5).await;
    // Another kind of failure, in another group.
    env.publish_raw("demo.increment", b"{not an event").await;
    env.publish_raw("demo.increment", b"{not an event either")
        .await;
    let groups = eventually(WAIT, "two groups, complete", || async {
        let (_, g) = get(&format!("{}/v1/dead-letters/groups", gw.url)).await;
        let counts: Vec<i64> = g["groups"]
            .as_array()?
            .iter()
            .filter_map(|x| x["count"].as_i64())
            .collect();
        (counts == [5, 2]).then_some(g)
    })
    .await;
    assert_eq!(groups["groups"][0]["signature"], "permanent:demo.counter");
    assert_eq!(groups["groups"][0]["count"], 5);
    assert!(
        groups["groups"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("frozen")
    );
    assert_eq!(
        groups["groups"][1]["signature"],
        "invalid_event:demo.increment"
    );
    assert_eq!(groups["groups"][1]["count"], 2);
    let before = gauges(&env).await;
    assert_eq!(metric(&before, DEAD_LETTERS_OPEN, &[]), 7.0, "{before}");
    let dead_queue = env.bus.topology().dead_queue();
    assert!(
        before.contains(&format!("{QUEUE_MESSAGES}{{queue=\"{dead_queue}\"}}")),
        "no depth of {dead_queue} in:\n{before}"
    );
    assert_eq!(metric(&before, TIMERS_OVERDUE_SECONDS, &[]), 0.0);

    // Filters and one dead letter.
    let (_, page) = get(&format!(
        "{}/v1/dead-letters?owner=member:60&limit=2",
        gw.url
    ))
    .await;
    assert_eq!(page["dead_letters"].as_array().unwrap().len(), 2);
    let first = page["dead_letters"][0]["id"].as_i64().unwrap();
    let (status, one) = get(&format!("{}/v1/dead-letters/{first}", gw.url)).await;
    assert_eq!(status, 200);
    // The original event: the first KiB in the letter, all of it at its `body_url`.
    let prefix: Value = serde_json::from_str(one["body_prefix"].as_str().unwrap()).unwrap();
    assert_eq!(prefix["type"], "demo.increment", "the original event");
    let body = cmdflow_tests::http()
        .get(format!("{}{}", gw.url, one["body_url"].as_str().unwrap()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), prefix);
    assert_eq!(one["kind"], "demo.counter");

    // A dry run counts and changes nothing.
    let (status, dry) = op(
        &gw.url,
        "replay",
        json!({"signature": "permanent:demo.counter", "dry_run": true}),
    )
    .await;
    assert_eq!((status, dry["count"].as_i64()), (200, Some(5)), "{dry}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&env, &id).await, 0);

    // The handler is fixed (the counter unfrozen); replaying the group applies each once.
    send(&gw.url, &event("demo.unfreeze", Some(&id), json!({}))).await;
    eventually(WAIT, "unfrozen", || async {
        (env.command(&id).await?.data["frozen"] == false).then_some(())
    })
    .await;
    let (status, started) = op(
        &gw.url,
        "replay",
        json!({"signature": "permanent:demo.counter"}),
    )
    .await;
    assert_eq!(status, 202, "{started}");
    let job = started["job"]["id"].as_str().unwrap().to_owned();
    let done = wait_job(&gw.url, &job, "finished").await;
    assert_eq!(done["replayed"], 5);
    eventually(WAIT, "count 5", || async {
        (count(&env, &id).await == 5).then_some(())
    })
    .await;

    // Replaying the same dead letters again (now `replayed`) changes nothing.
    let (status, again) = op(
        &gw.url,
        "replay",
        json!({"signature": "permanent:demo.counter", "state": "replayed"}),
    )
    .await;
    assert_eq!(status, 202);
    wait_job(&gw.url, again["job"]["id"].as_str().unwrap(), "finished").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(&env, &id).await,
        5,
        "each replayed event is processed once"
    );
    let (_, left) = get(&format!("{}/v1/dead-letters/groups", gw.url)).await;
    assert_eq!(
        left["groups"].as_array().unwrap().len(),
        1,
        "only the invalid events are still dead"
    );
    // The gauge follows the table, whoever replayed: no worker kept a dead letter since.
    let after = gauges(&env).await;
    assert_eq!(metric(&after, DEAD_LETTERS_OPEN, &[]), 2.0, "{after}");

    // Discard the rest, with a reason; audited.
    let (status, b) = op(
        &gw.url,
        "discard",
        json!({"signature": "invalid_event:demo.increment"}),
    )
    .await;
    assert_eq!(
        (status, b["code"].as_str()),
        (422, Some("invalid_field")),
        "a reason is required: {b}"
    );
    let (status, discarded) = op(
        &gw.url,
        "discard",
        json!({"signature": "invalid_event:demo.increment", "reason": "garbage from a test"}),
    )
    .await;
    assert_eq!((status, discarded["count"].as_i64()), (200, Some(2)));
    let (_, none) = get(&format!("{}/v1/dead-letters/groups", gw.url)).await;
    assert!(none["groups"].as_array().unwrap().is_empty());
    let audit: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT action, actor, count FROM ops_audit ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        audit,
        vec![
            ("replay".to_owned(), "key:dev".to_owned(), 5),
            ("replay".to_owned(), "key:dev".to_owned(), 5),
            ("discard".to_owned(), "key:dev".to_owned(), 2)
        ]
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_interrupted_replay_resumes_and_replays_the_rest_once() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let id = frozen_counter_with_dead_increments(&env, &gw.url, "member:60", 30).await;
    send(&gw.url, &event("demo.unfreeze", Some(&id), json!({}))).await;
    eventually(WAIT, "unfrozen", || async {
        (env.command(&id).await?.data["frozen"] == false).then_some(())
    })
    .await;

    let (status, started) = op(
        &gw.url,
        "replay",
        json!({"kind": "demo.counter", "rate": 10}),
    )
    .await;
    assert_eq!(status, 202);
    let job = started["job"]["id"].as_str().unwrap().to_owned();
    // A worker has taken it up and replayed its first batch (of 10, a second's worth).
    eventually(WAIT, "the first batch replayed", || async {
        let (_, j) = get(&format!("{}/v1/dead-letters/replays/{job}", gw.url)).await;
        (j["replayed"].as_i64()? >= 10).then_some(())
    })
    .await;
    let (status, _) = post(
        &format!("{}/v1/dead-letters/replays/{job}/interrupt", gw.url),
        "application/json",
        b"",
    )
    .await;
    assert_eq!(status, 200);
    let stopped = wait_job(&gw.url, &job, "interrupted").await;
    tokio::time::sleep(Duration::from_millis(1200)).await; // the batch in flight ends
    let (_, stopped_after) = get(&format!("{}/v1/dead-letters/replays/{job}", gw.url)).await;
    let halfway = stopped_after["replayed"].as_i64().unwrap();
    assert!(
        halfway > 0 && halfway < 30,
        "throttled to 10/s, interrupted part way: {stopped} {stopped_after}"
    );

    let (status, _) = post(
        &format!("{}/v1/dead-letters/replays/{job}/resume", gw.url),
        "application/json",
        b"",
    )
    .await;
    assert_eq!(status, 202);
    let done = wait_job(&gw.url, &job, "finished").await;
    assert_eq!(done["replayed"], 30);
    eventually(WAIT, "count 30", || async {
        (count(&env, &id).await == 30).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&env, &id).await, 30, "nothing replayed twice");
    env.cleanup().await;
}

/// Dead letters in `state`.
async fn dead_count(env: &TestEnv, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE state = $1")
        .bind(state)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_replay_outlives_the_gateway_that_started_it_and_the_worker_that_ran_it() {
    let mut env = TestEnv::with(|c| c.replay_lease = Duration::from_secs(1)).await;
    let gateway = env.start_gateway().await;
    let first_worker = env.start_worker().await;
    let id = frozen_counter_with_dead_increments(&env, &gateway.url, "member:61", 20).await;
    send(&gateway.url, &event("demo.unfreeze", Some(&id), json!({}))).await;
    eventually(WAIT, "unfrozen", || async {
        (env.command(&id).await?.data["frozen"] == false).then_some(())
    })
    .await;
    // No worker runs while the job is started: it waits in its table, not in a gateway task.
    first_worker.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, started) = op(
        &gateway.url,
        "replay",
        json!({"kind": "demo.counter", "rate": 10}),
    )
    .await;
    assert_eq!(status, 202, "{started}");
    let job = started["job"]["id"].as_str().unwrap().to_owned();
    let job_id: uuid::Uuid = job.parse().unwrap();

    // The gateway that started it goes away, and another takes its place.
    gateway.shutdown.cancel();
    let gateway = env.start_gateway().await;
    // A worker claims the job and dies without letting go (kill -9): its lease stands.
    let crashed =
        cmdflow_shared::store::dead::claim_job(&env.pool, "crashed-worker", Duration::from_secs(1))
            .await
            .unwrap()
            .expect("the job waits to be claimed");
    assert_eq!(crashed.id, job_id);
    // Resuming a running job is refused: it would start a second runner.
    let (status, refused) = post(
        &format!("{}/v1/dead-letters/replays/{job}/resume", gateway.url),
        "application/json",
        b"",
    )
    .await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (409, Some("conflict")),
        "{refused}"
    );

    // Another worker takes it over once the lease runs out, and finishes it.
    env.start_worker().await;
    let done = wait_job(&gateway.url, &job, "finished").await;
    assert_eq!(done["replayed"], 20, "{done}");
    assert_ne!(done["claimed_by"], "crashed-worker", "{done}");
    eventually(WAIT, "count 20", || async {
        (count(&env, &id).await == 20).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&env, &id).await, 20, "nothing replayed twice");
    env.cleanup().await;
}

#[tokio::test]
async fn a_replay_does_not_replay_its_own_new_dead_letters() {
    let mut env = TestEnv::new().await;
    let gateway = env.start_gateway().await;
    env.start_worker().await;
    // The counter stays frozen: every replayed increment fails again, into a new dead letter.
    frozen_counter_with_dead_increments(&env, &gateway.url, "member:62", 10).await;
    let (status, started) = op(&gateway.url, "replay", json!({"kind": "demo.counter"})).await;
    assert_eq!(status, 202, "{started}");
    let job = started["job"]["id"].as_str().unwrap().to_owned();
    let done = wait_job(&gateway.url, &job, "finished").await;
    assert_eq!(done["replayed"], 10, "{done}");
    eventually(WAIT, "the replayed increments dead again", || async {
        (dead_count(&env, "dead").await == 10).then_some(())
    })
    .await;
    // Nothing more comes: the job was bounded by what it matched when it started.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(dead_count(&env, "replayed").await, 10);
    assert_eq!(dead_count(&env, "dead").await, 10);
    let (_, after) = get(&format!("{}/v1/dead-letters/replays/{job}", gateway.url)).await;
    assert_eq!(after["replayed"], 10, "{after}");
    env.cleanup().await;
}

/// Keeps `n` dead letters of `demo.increment` (each with its own event id), as a keeper would.
async fn keep_dead_letters(env: &TestEnv, n: i32) {
    sqlx::query(
        "INSERT INTO dead_letters (routing_key, body, reason, error_class, signature, attempts,
                                   first_failed_at, last_failed_at, event_id)
         SELECT 'demo.increment', convert_to('{}', 'UTF8'), 'test', 'permanent', 'permanent:x', 1,
                now(), now(), gen_random_uuid()::text
           FROM generate_series(1, $1)",
    )
    .bind(n)
    .execute(&env.pool)
    .await
    .unwrap();
}

/// How many dead letters are still dead (neither replayed nor discarded).
async fn still_dead(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE state = 'dead'")
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// A replay job whose stored filter cannot be read fails, with the reason, and replays nothing:
/// read as "no filter", it would replay every dead letter there is.
#[tokio::test]
async fn a_replay_whose_stored_filter_cannot_be_read_fails_and_replays_nothing() {
    let env = TestEnv::new().await;
    keep_dead_letters(&env, 3).await;
    let filter = cmdflow_shared::store::dead::Filter {
        kind: Some("quote".to_owned()),
        ..Default::default()
    };
    let job = cmdflow_shared::store::dead::create_job(&env.pool, "test", &filter, None, 0)
        .await
        .unwrap();
    // Stored by an older or a broken gateway: not a filter at all.
    sqlx::query("UPDATE replay_jobs SET filter = '\"everything\"'::jsonb WHERE id = $1")
        .bind(job.id)
        .execute(&env.pool)
        .await
        .unwrap();
    let ended = cmdflow_workers::replays::run_replay(&env.pool, &env.bus, job.id)
        .await
        .unwrap();
    assert_eq!(
        ended.state,
        cmdflow_shared::store::dead::ReplayState::Failed
    );
    let error = ended.error.unwrap_or_default();
    assert!(
        error.contains("the stored filter cannot be read"),
        "{error}"
    );
    assert_eq!(ended.replayed, 0);
    let dead = still_dead(&env).await;
    assert_eq!(dead, 3, "every letter stays dead");
    env.cleanup().await;
}

/// A replay that stops on the same error every time it is taken up (here every publish fails:
/// someone deleted the events exchange) fails after a few tries, with the error, instead of
/// staying `running` for ever; its dead letters stay dead.
#[tokio::test]
async fn a_replay_that_keeps_failing_is_given_up_with_its_error() {
    let env = TestEnv::new().await;
    keep_dead_letters(&env, 2).await;
    let filter = cmdflow_shared::store::dead::Filter::default();
    let job = cmdflow_shared::store::dead::create_job(&env.pool, "test", &filter, None, 2)
        .await
        .unwrap();
    let exchange = env.bus.topology().events_exchange();
    let channel = env.bus.channel().await.unwrap();
    channel
        .exchange_delete(
            exchange.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();

    let runner = cmdflow_workers::replays::Runner::new(
        env.pool.clone(),
        env.bus.clone(),
        Duration::from_secs(30),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(runner.run_until_stopped(stop.clone()));
    let failed = eventually(Duration::from_secs(60), "the job failed", || async {
        let job = cmdflow_shared::store::dead::get_job(&env.pool, job.id)
            .await
            .unwrap()
            .unwrap();
        (job.state == cmdflow_shared::store::dead::ReplayState::Failed).then_some(job)
    })
    .await;
    stop.cancel();
    running.await.unwrap();
    let error = failed.error.unwrap_or_default();
    assert!(
        error.contains(&format!(
            "stopped on an error {} times in a row",
            cmdflow_workers::replays::GIVE_UP_AFTER
        )),
        "{error}"
    );
    assert_eq!(failed.replayed, 0);
    let dead = still_dead(&env).await;
    assert_eq!(dead, 2, "every letter stays dead");
    env.cleanup().await;
}
