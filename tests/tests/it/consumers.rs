//! A partition whose events wait in the broker while the worker's consumer of it gets none is
//! found by the worker's checks and consumed again; when the consumer the broker delivers to is
//! one of the worker's own connection that nothing reads any more, the worker ends that
//! connection, and with it that consumer.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_shared::CommandState;
use cmdflow_shared::bus::Bus;
use cmdflow_tests::{TestEnv, registry};
use cmdflow_workers::Worker;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_consumer_left_unread_on_the_workers_connection_does_not_hold_a_partition() {
    let env = TestEnv::with(|c| c.partition_lease = Duration::from_secs(2)).await;
    // The worker's own connection, and on it, first, a consumer of partition 0 that nothing
    // reads: the single active consumer, as one whose channel was lost on this side and not on
    // the broker's would be. It takes one event and keeps it.
    let bus = Bus::for_config(&env.config, "cmdflow-worker")
        .await
        .unwrap();
    let queue = bus.topology().partition_queue(0);
    let left = bus.channel().await.unwrap();
    left.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut unread = left
        .basic_consume(
            queue.as_str().into(),
            "left-unread".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let worker = Worker::build_with(&env.config, registry(), env.pool.clone(), bus)
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run_until_stopped(shutdown.clone()));

    // Commands until three of them are on partition 0, and some on the others.
    let mut on_zero = Vec::new();
    let mut elsewhere = Vec::new();
    while on_zero.len() < 3 || elsewhere.len() < 3 {
        let id = env
            .start_raw("demo.counter", "member:consumers", json!({}))
            .await;
        if env.partition_queue_of(&id) == queue {
            on_zero.push(id);
        } else {
            elsewhere.push(id);
        }
    }
    // The consumer nobody reads has taken the first event of partition 0.
    let taken = tokio::time::timeout(Duration::from_secs(10), unread.next())
        .await
        .expect("the broker delivers to the first consumer of the partition")
        .expect("a delivery")
        .expect("a delivery, not an error");
    drop(taken);
    for id in &elsewhere {
        env.wait_state(id, CommandState::Running).await;
    }
    // Every command of partition 0 starts too, the one held by the unread consumer as well:
    // its connection ended, the broker handed the event back.
    for id in &on_zero {
        env.wait_state(id, CommandState::Running).await;
    }
    assert!(
        !left.status().connected(),
        "the connection of the unread consumer was closed"
    );
    shutdown.cancel();
    running.await.unwrap();
    env.cleanup().await;
}
