//! Time events and waits end to end: timers, the scheduler, waits for external events.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use cmdflow_shared::bus::Bus;
use cmdflow_shared::contract::types::COMMAND_START;
use cmdflow_shared::time::{Clock, ManualClock, SystemClock};
use cmdflow_shared::{Command, CommandState, Decision, Event, HandlerError};
use cmdflow_tests::proxy::Proxy;
use cmdflow_tests::{
    TestEnv, event, eventually, get, listed_unmatched, post, send, start_command, start_event,
};
use cmdflow_workers::Registry;
use cmdflow_workers::scheduler::Scheduler;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

async fn timers(env: &TestEnv, id: &str) -> Vec<(String, DateTime<Utc>, i32)> {
    sqlx::query_as(
        "SELECT name, due_at, fired FROM timers WHERE command_id = $1::uuid ORDER BY name",
    )
    .bind(id)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

fn broadcast(ty: &str, key: &str, data: Value) -> Value {
    let mut e = event(ty, None, data);
    e["correlationid"] = json!(key);
    e
}

/// `test.timers`: sets timer `t` in 60 s on start; `test.move` moves it to 100 ms; `test.cancel`
/// cancels it; completes with the firing.
fn timers_kind(_: &Command, event: &Event) -> Result<Decision, HandlerError> {
    match event.ty.as_str() {
        COMMAND_START => Ok(Decision::nothing()
            .with_state(CommandState::Waiting)
            .after("t", Duration::from_secs(60))),
        "test.move" => Ok(Decision::nothing().after("t", Duration::from_millis(100))),
        "test.cancel" => Ok(Decision::nothing().cancel_timer("t")),
        "timer.fired" => Ok(Decision::complete(Value::Object(event.data.clone()))),
        _ => Err(HandlerError::unexpected("test.timers", event)),
    }
}

fn registry_with_timers() -> Registry {
    let mut registry = cmdflow_tests::registry();
    registry.register("test.timers", timers_kind);
    registry
}

#[tokio::test]
async fn a_one_shot_timer_fires_once() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    env.start_scheduler();
    let id = start_command(&gw.url, "demo.timer", "member:1", json!({"after_ms": 200})).await;
    let done = env.wait_state(&id, CommandState::Completed).await;
    let result = done.result.unwrap();
    let due: DateTime<Utc> = serde_json::from_value(result["due_at"].clone()).unwrap();
    let fired: DateTime<Utc> = serde_json::from_value(result["fired_at"].clone()).unwrap();
    assert!(fired >= due, "never early");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.received(&id, "timer.fired").await, 1);
    assert!(timers(&env, &id).await.is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn replacing_a_timer_by_name_moves_it_and_cancel_means_never() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker_custom(registry_with_timers(), Arc::new(SystemClock))
        .await;
    env.start_scheduler();

    let moved = env
        .start_raw("test.timers", "system:tests", json!({}))
        .await;
    env.wait_state(&moved, CommandState::Waiting).await;
    let before = timers(&env, &moved).await;
    assert_eq!(before.len(), 1);
    send(&gw.url, &event("test.move", Some(&moved), json!({}))).await;
    env.wait_state(&moved, CommandState::Completed).await;
    assert_eq!(env.received(&moved, "timer.fired").await, 1);

    let cancelled = env
        .start_raw("test.timers", "system:tests", json!({}))
        .await;
    env.wait_state(&cancelled, CommandState::Waiting).await;
    send(&gw.url, &event("test.cancel", Some(&cancelled), json!({}))).await;
    eventually(WAIT, "the timer gone", || async {
        timers(&env, &cancelled).await.is_empty().then_some(())
    })
    .await;
    // Even a scheduler an hour ahead finds nothing to fire for it.
    let ahead = env.scheduler(Arc::new(ManualClock::new(
        Utc::now() + chrono::Duration::hours(1),
    )));
    ahead.fire_due().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.received(&cancelled, "timer.fired").await, 0);
    assert_eq!(
        env.command(&cancelled).await.unwrap().state,
        CommandState::Waiting
    );
    env.cleanup().await;
}

fn berlin(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    chrono_tz::Europe::Berlin
        .with_ymd_and_hms(y, m, d, h, min, 0)
        .unwrap()
        .with_timezone(&Utc)
}

#[tokio::test]
async fn cron_crosses_the_weekend_and_a_dst_change_in_berlin() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    // Friday 2026-11-27, 22:30 in Berlin.
    let clock = Arc::new(ManualClock::new(berlin(2026, 11, 27, 22, 30)));
    env.start_worker_custom(cmdflow_tests::registry(), clock.clone())
        .await;
    let scheduler = env.scheduler(clock.clone());

    let id = start_command(
        &gw.url,
        "demo.timer",
        "admin:1",
        json!({"cron": "0 * * * 1-5", "tz": "Europe/Berlin", "times": 3}),
    )
    .await;
    let first = eventually(WAIT, "the cron timer", || async {
        timers(&env, &id).await.pop()
    })
    .await;
    assert_eq!(
        first.1,
        berlin(2026, 11, 27, 23, 0),
        "the next weekday hour"
    );

    clock.set(berlin(2026, 11, 27, 23, 0));
    assert_eq!(scheduler.fire_due().await.unwrap(), 1);
    let rearmed = timers(&env, &id).await.pop().unwrap();
    assert_eq!(
        rearmed.1,
        berlin(2026, 11, 30, 0, 0),
        "Friday 23:00 is followed by Monday 00:00"
    );
    assert_eq!(rearmed.2, 1);

    // Across the spring-forward change (2026-03-29, 02:00 CET → 03:00 CEST): hourly slots skip
    // the nonexistent 02:00.
    clock.set(Utc.with_ymd_and_hms(2026, 3, 28, 23, 30, 0).unwrap()); // 00:30 CET
    let dst = start_command(
        &gw.url,
        "demo.timer",
        "admin:1",
        json!({"name": "hourly", "cron": "0 * * * *", "tz": "Europe/Berlin", "times": 5}),
    )
    .await;
    let first = eventually(WAIT, "the hourly timer", || async {
        timers(&env, &dst).await.pop()
    })
    .await;
    assert_eq!(
        first.1,
        Utc.with_ymd_and_hms(2026, 3, 29, 0, 0, 0).unwrap(),
        "01:00 CET"
    );
    clock.set(first.1);
    assert_eq!(scheduler.fire_due().await.unwrap(), 1);
    let next = timers(&env, &dst).await.pop().unwrap();
    assert_eq!(
        next.1,
        Utc.with_ymd_and_hms(2026, 3, 29, 1, 0, 0).unwrap(),
        "03:00 CEST, one real hour after 01:00 CET"
    );
    clock.set(next.1);
    assert_eq!(scheduler.fire_due().await.unwrap(), 1);
    let after = timers(&env, &dst).await.pop().unwrap();
    assert_eq!(
        after.1,
        Utc.with_ymd_and_hms(2026, 3, 29, 2, 0, 0).unwrap(),
        "04:00 CEST: one real hour later"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn two_schedulers_never_fire_a_timer_twice() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let n = 200;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            start_command(
                &gw.url,
                "demo.timer",
                &format!("lead:{i}"),
                json!({"after_ms": 0}),
            )
            .await,
        );
    }
    every_timer_set(&env, n).await;
    let a = env.scheduler(Arc::new(SystemClock));
    let b = env.scheduler(Arc::new(SystemClock));
    let (mut fired_a, mut fired_b) = (0, 0);
    loop {
        let (x, y) = tokio::join!(a.fire_due(), b.fire_due());
        let (x, y) = (x.unwrap(), y.unwrap());
        fired_a += x;
        fired_b += y;
        if x == 0 && y == 0 {
            break;
        }
    }
    assert_eq!(
        fired_a + fired_b,
        n as usize,
        "each timer fired by exactly one scheduler"
    );
    for id in &ids {
        env.wait_state(id, CommandState::Completed).await;
        assert_eq!(env.received(id, "timer.fired").await, 1);
    }
    env.cleanup().await;
}

/// A running scheduler claims the next due timers while its last batch still waits for its
/// confirms and commit. Two of them, over timers falling due every 3 ms: every timer is published
/// exactly once (a probe queue counts them on the broker) and applied once. (That the claim
/// leaves a cron timer to be re-armed is shown by the cron test above.)
#[tokio::test]
async fn running_schedulers_with_overlapping_cycles_publish_each_firing_once() {
    let mut env = TestEnv::new().await;
    env.start_worker().await;
    let mut probe = Probe::bind(&env, "timer.fired").await;

    let n: i64 = 300;
    let t0 = Utc::now() + chrono::Duration::seconds(4);
    let ids = timers_due_from(&env, t0, n, chrono::Duration::milliseconds(3)).await;
    env.start_scheduler();
    env.start_scheduler();
    for id in &ids {
        env.wait_state(id, CommandState::Completed).await;
        assert_eq!(env.received(id, "timer.fired").await, 1);
    }
    probe.assert_each_fired_once(&ids).await;
    env.cleanup().await;
}

/// A cycle whose publishes fail rolls back: while the scheduler's link to the broker is cut,
/// the due timers stay in the table and nothing fires; once the link is back, each fires once.
#[tokio::test]
async fn timers_due_while_the_broker_link_is_cut_fire_once_when_it_returns() {
    let mut env = TestEnv::new().await;
    env.start_worker().await;
    let mut probe = Probe::bind(&env, "timer.fired").await;
    let (proxy, url) = Proxy::for_amqp(&env.config.amqp_url).await.unwrap();
    let bus = Bus::connect(&url, &env.config.namespace, "cut-scheduler")
        .await
        .unwrap();
    let scheduler = Scheduler::new(env.pool.clone(), bus, &env.config);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(scheduler.run_until_stopped(shutdown.clone()));

    let n: i64 = 40;
    let t0 = Utc::now() + chrono::Duration::seconds(4);
    let ids = timers_due_from(&env, t0, n, chrono::Duration::milliseconds(10)).await;
    assert!(
        Utc::now() < t0,
        "the timers were set too slowly for this test"
    );
    proxy.cut().await;
    // All due, and a few failed cycles later: every timer still waits, none was applied.
    let after_all_due = (t0 + chrono::Duration::milliseconds(10 * n) - Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(after_all_due + Duration::from_millis(1500)).await;
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM timers WHERE due_at <= now()")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        waiting, n,
        "a timer left the table while its event could not be published"
    );
    for id in &ids {
        assert_eq!(env.received(id, "timer.fired").await, 0);
    }

    proxy.restore();
    for id in &ids {
        env.wait_state(id, CommandState::Completed).await;
        assert_eq!(env.received(id, "timer.fired").await, 1);
    }
    // At least once on the broker: a batch whose publishes went out in part when the link came
    // back is rolled back and published again, under the same ids, and applied once (above).
    let seen = probe.firings().await;
    for id in &ids {
        let prefix = format!("timer:{id}:");
        assert!(
            seen.keys().any(|k| k.starts_with(&prefix)),
            "the timer of {id} was never published"
        );
    }
    shutdown.cancel();
    running.await.unwrap();
    env.cleanup().await;
}

/// `n` `demo.timer` commands whose timers fall due `step` apart from `t0`; returns their ids once
/// every timer is set.
async fn timers_due_from(
    env: &TestEnv,
    t0: DateTime<Utc>,
    n: i64,
    step: chrono::Duration,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let at = (t0 + step * i as i32).to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let owner = format!("lead:{i}");
        ids.push(env.start_raw("demo.timer", &owner, json!({"at": at})).await);
    }
    every_timer_set(env, n).await;
    ids
}

/// Waits until the timers table holds `n` timers.
async fn every_timer_set(env: &TestEnv, n: i64) {
    eventually(WAIT, "every timer set", || async {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM timers")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        (count == n).then_some(())
    })
    .await;
}

/// A queue bound to the events exchange that counts what the schedulers publish.
struct Probe {
    _channel: lapin::Channel,
    consumer: lapin::Consumer,
}

impl Probe {
    async fn bind(env: &TestEnv, routing_key: &str) -> Probe {
        use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
        let queue = format!("{}.probe", env.config.namespace);
        let channel = env.bus.channel().await.unwrap();
        let declare = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.as_str().into(), declare, Default::default())
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.as_str().into(),
                env.bus.topology().events_exchange().as_str().into(),
                routing_key.into(),
                QueueBindOptions::default(),
                Default::default(),
            )
            .await
            .unwrap();
        let consume = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "probe".into(),
                consume,
                Default::default(),
            )
            .await
            .unwrap();
        Probe {
            _channel: channel,
            consumer,
        }
    }

    /// Reads until the queue stays quiet: how often each event id was published.
    async fn firings(&mut self) -> std::collections::HashMap<String, u32> {
        use futures::StreamExt;
        let mut seen = std::collections::HashMap::<String, u32>::new();
        let quiet = Duration::from_millis(500);
        while let Ok(Some(delivery)) = tokio::time::timeout(quiet, self.consumer.next()).await {
            let event: Value = serde_json::from_slice(&delivery.unwrap().data).unwrap();
            *seen
                .entry(event["id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        seen
    }

    /// Checks that no firing was published twice and that each command's one-shot timer was
    /// published exactly once.
    async fn assert_each_fired_once(&mut self, commands: &[String]) {
        let seen = self.firings().await;
        let doubled: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
        assert!(
            doubled.is_empty(),
            "{} firings published more than once, such as {:?}",
            doubled.len(),
            doubled.iter().take(3).collect::<Vec<_>>()
        );
        for id in commands {
            let prefix = format!("timer:{id}:");
            let firings = seen.keys().filter(|k| k.starts_with(&prefix)).count();
            assert_eq!(
                firings, 1,
                "the timer of {id} was published {firings} times"
            );
        }
    }
}

#[tokio::test]
async fn after_downtime_overdue_timers_fire_once_and_cron_is_rearmed() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    let start = Utc::now();
    let clock = Arc::new(ManualClock::new(start));
    env.start_worker_custom(cmdflow_tests::registry(), clock.clone())
        .await;
    let scheduler = env.scheduler(clock.clone());
    let once = start_command(
        &gw.url,
        "demo.timer",
        "member:2",
        json!({"after_ms": 60_000}),
    )
    .await;
    let every_minute = start_command(
        &gw.url,
        "demo.timer",
        "member:2",
        json!({"cron": "* * * * *", "times": 100}),
    )
    .await;
    env.wait_state(&once, CommandState::Waiting).await;
    env.wait_state(&every_minute, CommandState::Waiting).await;

    // The scheduler was down for ten minutes.
    clock.advance(Duration::from_secs(600));
    assert_eq!(
        scheduler.fire_due().await.unwrap(),
        2,
        "one firing each, not one per missed minute"
    );
    assert_eq!(scheduler.fire_due().await.unwrap(), 0);
    env.wait_state(&once, CommandState::Completed).await;
    let cron = timers(&env, &every_minute).await.pop().unwrap();
    assert!(cron.1 > clock.now(), "re-armed after now");
    assert!(cron.1 <= clock.now() + chrono::Duration::minutes(1));
    assert_eq!(cron.2, 1);
    eventually(WAIT, "the cron firing applied", || async {
        (env.received(&every_minute, "timer.fired").await == 1).then_some(())
    })
    .await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_command_that_ends_takes_its_timers_with_it() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let id = start_command(
        &gw.url,
        "demo.timer",
        "member:3",
        json!({"cron": "*/5 * * * *", "times": 10}),
    )
    .await;
    eventually(WAIT, "the timer", || async {
        (!timers(&env, &id).await.is_empty()).then_some(())
    })
    .await;
    let (_, view) = get(&format!("{}/v1/commands/{id}", gw.url)).await;
    assert_eq!(
        view["timers"][0]["cron"], "*/5 * * * *",
        "visible on the command"
    );
    send(&gw.url, &event("demo.finish", Some(&id), json!({}))).await;
    env.wait_state(&id, CommandState::Completed).await;
    assert!(timers(&env, &id).await.is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn a_timer_in_the_past_fires_at_once() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    env.start_scheduler();
    let id = start_command(
        &gw.url,
        "demo.timer",
        "member:4",
        json!({"at": "2000-01-01T00:00:00Z"}),
    )
    .await;
    let done = env.wait_state(&id, CommandState::Completed).await;
    assert_eq!(done.result.unwrap()["due_at"], "2000-01-01T00:00:00Z");
    env.cleanup().await;
}

#[tokio::test]
async fn bad_time_input_gets_a_422_or_fails_the_command_with_its_reason() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    for (data, needle) in [
        (json!({"cron": "61 * * * *"}), "cron"),
        (json!({"cron": "0 * * * *", "tz": "Mars/Olympus"}), "tz"),
        (json!({"after_ms": -1}), "after_ms"),
        (json!({"after_ms": 999_999_999_999_999i64}), "after_ms"),
        (json!({"name": "x".repeat(300)}), "name"),
    ] {
        let body =
            serde_json::to_vec(&json!({"kind": "demo.timer", "owner": "member:5", "data": data}))
                .unwrap();
        let (status, b) = post(
            &format!("{}/v1/commands", gw.url),
            "application/json",
            &body,
        )
        .await;
        assert_eq!(
            (status, b["code"].as_str()),
            (422, Some("invalid_field")),
            "{b}"
        );
        assert!(
            b["detail"].as_str().unwrap().contains(needle),
            "{needle}: {b}"
        );
    }
    // Past the gateway (straight to the broker), the worker checks the same schema: the start
    // is a dead letter whose reason names the field, and no command is created.
    let id = env
        .start_raw("demo.timer", "system:tests", json!({"cron": "61 * * * *"}))
        .await;
    let dead = eventually(Duration::from_secs(60), "the refused start", || async {
        env.dead_letter_after(0).await
    })
    .await;
    assert_eq!(dead.error_class, "permanent");
    assert!(
        dead.reason.contains("data.cron") && dead.reason.contains("invalid cron expression"),
        "{}",
        dead.reason
    );
    assert!(
        env.command(&id).await.is_none(),
        "no command for a refused start"
    );
    // A decision that breaks a limit the schema cannot say still fails its command, with why:
    // a fan-out of more children than CMDFLOW_MAX_CHILDREN.
    let id = start_command(
        &gw.url,
        "demo.fanout",
        "member:5",
        json!({"children": 5000}),
    )
    .await;
    let failed = env.wait_state(&id, CommandState::Failed).await;
    assert!(
        failed.reason.as_deref().unwrap().contains("children"),
        "{failed:?}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_wait_completes_on_its_event_before_the_timeout() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    env.start_scheduler();
    let id = start_command(
        &gw.url,
        "demo.wait",
        "member:42",
        json!({"type": "special.clicked", "key": "member:42", "timeout_ms": 30_000}),
    )
    .await;
    env.wait_state(&id, CommandState::Waiting).await;
    let (_, view) = get(&format!("{}/v1/commands/{id}", gw.url)).await;
    assert_eq!(
        view["waits"][0]["event_type"], "special.clicked",
        "visible on the command"
    );
    let click = broadcast("special.clicked", "member:42", json!({"offer": "spring"}));
    send(&gw.url, &click).await;
    let done = env.wait_state(&id, CommandState::Completed).await;
    let result = done.result.unwrap();
    assert_eq!(result["data"]["offer"], "spring");
    assert_eq!(result["id"], click["id"]);
    assert!(
        timers(&env, &id).await.is_empty(),
        "the timeout went with the wait"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_wait_times_out_when_nothing_comes() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    env.start_scheduler();
    let id = start_command(
        &gw.url,
        "demo.wait",
        "member:43",
        json!({"type": "special.clicked", "key": "member:43", "timeout_ms": 300}),
    )
    .await;
    let done = env.wait_state(&id, CommandState::Completed).await;
    assert_eq!(done.result.unwrap()["timed_out"], true);
    // The event that comes too late wakes nobody: it is kept as unmatched.
    let late = broadcast("special.clicked", "member:43", json!({}));
    send(&gw.url, &late).await;
    eventually(WAIT, "the late event listed as unmatched", || async {
        listed_unmatched(&gw.url, Some("special.clicked"), &late)
            .await
            .then_some(())
    })
    .await;
    env.cleanup().await;
}

/// Sends `ev` through the gateway and waits until a worker has kept it for the early window.
async fn sent_and_kept(env: &TestEnv, gateway: &str, ev: &Value) -> DateTime<Utc> {
    send(gateway, ev).await;
    eventually(WAIT, "the early event kept", || async {
        sqlx::query_scalar("SELECT accepted_at FROM recent_events WHERE event_id = $1")
            .bind(ev["id"].as_str().unwrap())
            .fetch_optional(&env.pool)
            .await
            .unwrap()
    })
    .await
}

#[tokio::test]
async fn an_event_accepted_after_the_start_matches_a_wait_registered_later() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    env.start_scheduler();
    // The race the early window is for: a start is accepted, then its event; the event is
    // handled first, and the start reaches a worker only afterwards.
    let early = broadcast("special.clicked", "member:44", json!({"early": true}));
    let accepted = sent_and_kept(&env, &gw.url, &early).await;
    let unmatched = || listed_unmatched(&gw.url, Some("special.clicked"), &early);
    assert!(
        unmatched().await,
        "kept as unmatched while nothing waits for it"
    );
    let id = uuid::Uuid::now_v7().to_string();
    let mut start = start_event(
        &id,
        "demo.wait",
        "member:44",
        json!({"type": "special.clicked", "key": "member:44", "timeout_ms": 30_000}),
    );
    let before = accepted - chrono::Duration::milliseconds(5);
    start["acceptedat"] = json!(before.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    env.publish_raw_as_engine("command.start", &serde_json::to_vec(&start).unwrap())
        .await;
    let done = env.wait_state(&id, CommandState::Completed).await;
    assert_eq!(done.result.unwrap()["id"], early["id"]);
    assert_eq!(
        done.created_at, before,
        "a root counts from when its start was accepted"
    );
    assert!(
        !unmatched().await,
        "an event that matched a wait is not unmatched"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_event_accepted_before_the_command_started_does_not_match_it() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    env.start_scheduler();
    // An old answer, well inside the early window, and a command started after it.
    let old = broadcast("special.clicked", "member:45", json!({"old": true}));
    sent_and_kept(&env, &gw.url, &old).await;
    let id = start_command(
        &gw.url,
        "demo.wait",
        "member:45",
        json!({"type": "special.clicked", "key": "member:45", "timeout_ms": 1_500}),
    )
    .await;
    let done = env.wait_state(&id, CommandState::Completed).await;
    assert_eq!(
        done.result.unwrap()["timed_out"],
        true,
        "an event older than the command decided it"
    );
    assert_eq!(env.received(&id, "special.clicked").await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn two_waiters_on_one_key_both_get_the_event_once() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let spec = json!({"type": "quote.accepted", "key": "client:9"});
    let a = start_command(&gw.url, "demo.wait", "client:9", spec.clone()).await;
    let b = start_command(&gw.url, "demo.wait", "client:9", spec).await;
    env.wait_state(&a, CommandState::Waiting).await;
    env.wait_state(&b, CommandState::Waiting).await;
    let accepted = broadcast("quote.accepted", "client:9", json!({"total": 120}));
    send(&gw.url, &accepted).await;
    send(&gw.url, &accepted).await; // a redelivery wakes nobody twice
    for id in [&a, &b] {
        let done = env.wait_state(id, CommandState::Completed).await;
        assert_eq!(done.result.unwrap()["id"], accepted["id"]);
        assert_eq!(env.received(id, "quote.accepted").await, 1);
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_group_deadline_fails_the_group_and_aborts_what_still_runs() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    env.start_scheduler();
    let parent = start_command(
        &gw.url,
        "demo.fanout",
        "admin:2",
        json!({"children": 3, "child_kind": "demo.counter", "deadline_ms": 300}),
    )
    .await;
    let failed = env.wait_state(&parent, CommandState::Failed).await;
    assert!(failed.reason.unwrap().contains("0 completed"));
    eventually(WAIT, "the three children aborted for the deadline", || async {
        let aborted: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM commands WHERE parent_id = $1::uuid AND state = 'aborted' AND reason LIKE '%deadline%'",
        )
        .bind(&parent)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        (aborted == 3).then_some(())
    })
    .await;
    env.cleanup().await;
}
