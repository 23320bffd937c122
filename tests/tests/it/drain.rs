//! Graceful shutdown: SIGTERM makes a worker process stop consuming, finish, commit and ack what it
//! holds, and exit within its grace period, so a rolling update loses nothing and redoes nothing.
//! Readiness turns false while a role drains.
//!
//! This file holds one test on purpose: it reads this process's metrics, which other tests in the
//! same binary would move.

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use cmdflow_shared::CommandState;
use cmdflow_tests::fleet::{cmdflow_binary, free_port, metric};
use cmdflow_tests::{TestEnv, eventually, http};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const COUNTERS: usize = 40;
const INCREMENTS: usize = 3_000;

#[tokio::test]
async fn sigterm_drains_a_worker_under_load_losing_and_redoing_nothing() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;

    // Readiness of the roles without the gateway: 200, then 503 as soon as draining starts,
    // while the listener stays up for the drain.
    let (draining, stop) = (CancellationToken::new(), CancellationToken::new());
    let addr = format!("127.0.0.1:{}", free_port());
    let server = tokio::spawn({
        let (addr, draining, stop) = (addr.clone(), draining.clone(), stop.clone());
        async move {
            cmdflow_gateway::app::serve_metrics(&addr, draining, stop, Default::default()).await
        }
    });
    let readyz = format!("http://{addr}/readyz");
    let status = eventually(Duration::from_secs(5), "the metrics listener", || async {
        Some(http().get(&readyz).send().await.ok()?.status().as_u16())
    })
    .await;
    assert_eq!(status, 200);
    draining.cancel();
    let resp = http().get(&readyz).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    let health: Value = resp.json().await.unwrap();
    assert_eq!(health["status"], "draining", "{health}");
    let live = http()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status().as_u16(), 200, "alive while draining");
    stop.cancel();
    server.await.unwrap().unwrap();

    // Load: counters, then a backlog of increments far larger than one worker's prefetch.
    let mut counters = Vec::new();
    for i in 0..COUNTERS {
        counters.push(
            env.start_raw("demo.counter", &format!("member:{i}"), json!({}))
                .await,
        );
    }
    let mut batch = Vec::new();
    for n in 0..INCREMENTS {
        batch.push(cmdflow_tests::event(
            "demo.increment",
            Some(&counters[n % COUNTERS]),
            json!({}),
        ));
        if batch.len() == 200 {
            let body = serde_json::to_vec(&Value::Array(std::mem::take(&mut batch))).unwrap();
            let (status, answer) = cmdflow_tests::post(
                &format!("{}/v1/events", gw.url),
                "application/cloudevents-batch+json",
                &body,
            )
            .await;
            assert_eq!(status, 202, "{answer}");
        }
    }

    // A worker process takes part of the backlog, then gets SIGTERM mid-load.
    let metrics_port = free_port();
    // Its log goes to a file: a pipe nobody reads would fill and stall the worker's logging.
    let logs = cmdflow_tests::fleet::Scratch::new("cffleet");
    let log = logs.join("worker.log");
    let mut worker = tokio::process::Command::new(cmdflow_binary())
        .arg("worker")
        .env("CMDFLOW_EXAMPLES", "true")
        .env("CMDFLOW_DATABASE_URL", &env.config.database_url)
        .env("CMDFLOW_AMQP_URL", &env.config.amqp_url)
        .env("CMDFLOW_REDIS_URLS", &env.config.redis_urls)
        .env("CMDFLOW_NAMESPACE", &env.config.namespace)
        .env("CMDFLOW_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("CMDFLOW_CONCURRENCY", "16")
        .env("CMDFLOW_PREFETCH", "64")
        .env("CMDFLOW_SHUTDOWN_GRACE", "20s")
        .env("CMDFLOW_LOG_FORMAT", "json")
        .env("RUST_LOG", "warn,lapin=error")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pool = env.pool.clone();
    let applied = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM processed_events")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let before = eventually(
        Duration::from_secs(60),
        "the worker process under way",
        || async {
            let n = applied().await;
            (n >= (COUNTERS + 300) as i64).then_some(n)
        },
    )
    .await;
    let pid = worker.id().unwrap();
    assert!(cmdflow_tests::fleet::signal(pid, "TERM", false));
    let signalled = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("the worker exits within its grace period")
        .unwrap();
    let drained_in = signalled.elapsed();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit {status:?}: {stderr}");
    assert!(
        !stderr.contains("still in flight"),
        "everything finished within the grace: {stderr}"
    );
    let at_exit = applied().await;
    assert!(
        at_exit >= before && at_exit < (COUNTERS + INCREMENTS) as i64,
        "stopped mid-load: {at_exit}"
    );

    // A new worker (this process) takes the rest: every increment is applied exactly once, and
    // it finds nothing that the stopped one had applied without acknowledging.
    let duplicates_before = metric(
        &cmdflow_shared::metrics::install().render(),
        cmdflow_shared::metrics::EVENTS_PROCESSED,
        &[("outcome", "duplicate")],
    );
    env.start_worker().await;
    for id in &counters {
        let c = eventually(Duration::from_secs(120), "every increment", || async {
            let c = env.command(id).await?;
            (c.data["count"].as_u64()? == (INCREMENTS / COUNTERS) as u64).then_some(c)
        })
        .await;
        assert_eq!(c.state, CommandState::Running);
        assert_eq!(c.version as usize, INCREMENTS / COUNTERS + 1);
    }
    assert_eq!(applied().await, (COUNTERS + INCREMENTS) as i64);
    let duplicates = metric(
        &cmdflow_shared::metrics::install().render(),
        cmdflow_shared::metrics::EVENTS_PROCESSED,
        &[("outcome", "duplicate")],
    ) - duplicates_before;
    assert_eq!(duplicates, 0.0, "nothing was redone after the drain");
    println!(
        "DRAIN | applied before SIGTERM={before} | at exit={at_exit} | drained in {} ms | duplicates after={duplicates}",
        drained_in.as_millis()
    );
    env.cleanup().await;
}
