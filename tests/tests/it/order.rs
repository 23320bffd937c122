//! The order promise, with real `cmdflow gateway` and `cmdflow worker` processes: events for
//! one command that were accepted one after the other are applied in that order, at any number
//! of workers, right after the command's start, and while a worker is killed.
//!
//! Each round: 40 `demo.counter` commands, each started through the gateway and at once sent 10
//! `demo.increment` and a `demo.finish`, each request after the 202 of the one before. Every
//! counter must end at 10, and its history must show the events in the order they were sent.
//! Each round prints `ORDER | workers=… | round=… | at_10=…/40 | out_of_order=… | ms=…`.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cmdflow_tests::TestEnv;
use cmdflow_tests::fleet::Fleet;
use serde_json::{Value, json};
use uuid::Uuid;

const COMMANDS: usize = 40;
const INCREMENTS: usize = 10;

async fn world() -> TestEnv {
    let shared = cmdflow_tests::shared_servers();
    TestEnv::on(&shared.postgres, &shared.amqp, &shared.redis).await
}

/// A gateway and `n` workers, once the workers share every partition.
async fn fleet(world: &TestEnv, n: usize) -> Fleet {
    let mut fleet = Fleet::new(&world.config);
    fleet.start_gateway().await;
    for i in 0..n {
        fleet.start_worker(i);
    }
    let want = n as u32;
    cmdflow_tests::eventually(
        Duration::from_secs(60),
        "the workers to share the partitions",
        || async { (world.workers_consuming().await == Some(want)).then_some(()) },
    )
    .await;
    fleet
}

/// Posts until a 202 (a 503 while the fleet is in trouble is sent again, same id).
async fn post_until_accepted(client: &reqwest::Client, url: &str, body: &Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = client
            .post(url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).unwrap())
            .send()
            .await;
        if let Ok(answer) = answer {
            let status = answer.status().as_u16();
            let value: Value = answer.json().await.unwrap_or(Value::Null);
            if status == 202 {
                return value;
            }
            assert!(status >= 500 || status == 429, "{url}: {status} {value}");
        }
        assert!(Instant::now() < deadline, "{url}: no 202 within a minute");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts one counter and sends it its increments and its finish, each after the last's 202,
/// `pause` apart. Returns its id.
async fn one_counter(gateway: String, pause: Duration) -> Uuid {
    let client = cmdflow_tests::http();
    let started = post_until_accepted(
        &client,
        &format!("{gateway}/v1/commands"),
        &json!({"kind": "demo.counter", "owner": "system:order", "data": {}}),
    )
    .await;
    let id = started["command_id"].as_str().unwrap().to_owned();
    let events = format!("{gateway}/v1/events");
    for seq in 0..=INCREMENTS {
        let ty = if seq < INCREMENTS {
            "demo.increment"
        } else {
            "demo.finish"
        };
        let event = json!({
            "specversion": "1.0", "id": Uuid::now_v7().to_string(), "source": "order",
            "type": ty, "commandid": id, "data": {"by": 1, "seq": seq},
        });
        post_until_accepted(&client, &events, &event).await;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    id.parse().unwrap()
}

/// How many counters completed at exactly 10, and how many received their events out of the
/// order they were sent, once all have ended (or a minute has passed).
async fn verdict(world: &TestEnv, ids: &[Uuid]) -> (i64, i64) {
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let ended: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM commands WHERE id = ANY($1) AND ended_at IS NOT NULL",
            )
            .bind(ids)
            .fetch_one(&world.pool)
            .await
            .unwrap();
            if ended as usize == ids.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let at_ten: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM commands
          WHERE id = ANY($1) AND state = 'completed' AND (result->>'count')::int = $2",
    )
    .bind(ids)
    .bind(INCREMENTS as i32)
    .fetch_one(&world.pool)
    .await
    .unwrap();
    let out_of_order: i64 = sqlx::query_scalar(
        // Out of order: a later event applied before an earlier one, or one ignored (it came
        // after the finish that should have followed it).
        "SELECT count(DISTINCT command_id) FROM (
            SELECT command_id, entry, (detail->'data'->>'seq')::int AS place,
                   lag((detail->'data'->>'seq')::int) OVER (PARTITION BY command_id, entry ORDER BY seq) AS before
              FROM command_events
             WHERE entry IN ('received', 'ignored') AND detail->>'source' = 'order'
               AND command_id = ANY($1)) x
         WHERE entry = 'ignored' OR (before IS NOT NULL AND place <= before)",
    )
    .bind(ids)
    .fetch_one(&world.pool)
    .await
    .unwrap_or(-1);
    (at_ten, out_of_order)
}

/// One round: 40 counters at once, each with its events sent right after its start.
async fn round(world: &TestEnv, fleet: &Fleet, workers: usize, round: usize, pause: Duration) {
    let began = Instant::now();
    let sends: Vec<_> = (0..COMMANDS)
        .map(|_| tokio::spawn(one_counter(fleet.gateway_url().to_owned(), pause)))
        .collect();
    let mut ids = Vec::new();
    for send in sends {
        ids.push(send.await.unwrap());
    }
    let (at_ten, out_of_order) = verdict(world, &ids).await;
    println!(
        "ORDER | workers={workers} | round={round} | at_10={at_ten}/{COMMANDS} | out_of_order={out_of_order} | ms={}",
        began.elapsed().as_millis()
    );
    assert_eq!(
        (at_ten, out_of_order),
        (COMMANDS as i64, 0),
        "{workers} workers, round {round}: counters at 10, and counters out of order\n{}",
        fleet.log_tails(20)
    );
}

#[tokio::test]
async fn events_sent_one_after_the_other_apply_in_order_at_one_two_and_four_workers() {
    for workers in [1, 2, 4] {
        let world = world().await;
        let mut fleet = fleet(&world, workers).await;
        for r in 1..=3 {
            round(&world, &fleet, workers, r, Duration::ZERO).await;
        }
        assert!(fleet.crashed().is_empty(), "{:?}", fleet.crashed());
        fleet.stop().await;
        world.cleanup().await;
    }
}

#[tokio::test]
async fn order_holds_while_a_worker_is_killed_mid_way() {
    let world = world().await;
    let mut fleet = fleet(&world, 2).await;
    let began = Instant::now();
    let load = tokio::spawn({
        let gateway = fleet.gateway_url().to_owned();
        async move {
            let sends: Vec<_> = (0..COMMANDS)
                .map(|_| tokio::spawn(one_counter(gateway.clone(), Duration::from_millis(150))))
                .collect();
            let mut ids = Vec::new();
            for send in sends {
                ids.push(send.await.unwrap());
            }
            ids
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    fleet.kill_worker(0).await;
    let ids = load.await.unwrap();
    let (at_ten, out_of_order) = verdict(&world, &ids).await;
    println!(
        "ORDER | workers=2, one killed with kill -9 | round=1 | at_10={at_ten}/{COMMANDS} | out_of_order={out_of_order} | ms={}",
        began.elapsed().as_millis()
    );
    assert_eq!(
        (at_ten, out_of_order),
        (COMMANDS as i64, 0),
        "counters at 10, and counters out of order\n{}",
        fleet.log_tails(20)
    );
    fleet.stop().await;
    world.cleanup().await;
}
