//! Group commit: a worker applies deliveries for distinct commands in one transaction. Counts
//! stay exact, redeliveries are applied once, and an event that fails inside a batch goes its
//! own way (dead letter with its reason) without costing the others theirs.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_shared::CommandState;
use cmdflow_tests::fleet::metric;
use cmdflow_tests::{TestEnv, event, eventually, start_event};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const COUNTERS: usize = 20;
const INCREMENTS: usize = 25;

#[tokio::test]
async fn batches_keep_counts_exact_and_isolate_a_failing_event() {
    let mut env = TestEnv::new().await;

    // The counters exist before the load: one by one, with batching off.
    let (counters, setup) = started_counters(&mut env, COUNTERS).await;
    let frozen = counters[0].clone();
    env.publish_raw(
        "demo.freeze",
        &serde_json::to_vec(&event("demo.freeze", Some(&frozen), json!({}))).unwrap(),
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the first counter frozen",
        || async {
            let c = env.command(&frozen).await?;
            (c.data["frozen"] == json!(true)).then_some(())
        },
    )
    .await;
    stop_setup(setup).await;

    // The whole load waits in the queue, so the worker finds full batches: every increment
    // twice (a redelivery, same id), interleaved across counters, and one unreadable body.
    let batches_before = batches_committed();
    let mut bodies = Vec::new();
    for _ in 0..INCREMENTS {
        for id in &counters {
            let body = serde_json::to_vec(&event("demo.increment", Some(id), json!({}))).unwrap();
            bodies.push(body.clone());
            bodies.push(body);
        }
    }
    bodies.insert(bodies.len() / 2, b"{not json".to_vec());
    for body in &bodies {
        env.publish_raw("demo.increment", body).await;
    }
    env.start_worker_with(|c| {
        c.batch = 16;
        c.concurrency = 2;
        c.prefetch = 200;
    })
    .await;

    for id in &counters[1..] {
        eventually(
            Duration::from_secs(60),
            "every increment applied",
            || async {
                let c = env.command(id).await?;
                (c.data["count"] == json!(INCREMENTS)).then_some(())
            },
        )
        .await;
    }
    // Each counter: its start plus one version per increment, never one lost or doubled.
    for id in &counters[1..] {
        let c = env.command(id).await.unwrap();
        assert_eq!(c.data["count"], json!(INCREMENTS), "{id}");
        assert_eq!(env.received(id, "demo.increment").await, INCREMENTS as i64);
    }
    // The frozen counter refused each delivery of its increments (both copies of each), and
    // the unreadable body was dead-lettered with its reason.
    let dead: Vec<(String, String, String)> =
        eventually(Duration::from_secs(30), "the dead letters", || async {
            let rows: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT coalesce(command_id::text, ''), coalesce(event_id, ''), reason
                 FROM dead_letters ORDER BY id",
            )
            .fetch_all(&env.pool)
            .await
            .ok()?;
            (rows.len() > 2 * INCREMENTS).then_some(rows)
        })
        .await;
    let refused: Vec<&str> = dead
        .iter()
        .filter(|(c, _, r)| *c == frozen && r.contains("frozen"))
        .map(|(_, e, _)| e.as_str())
        .collect();
    assert_eq!(refused.len(), 2 * INCREMENTS, "{dead:?}");
    let distinct: std::collections::BTreeSet<&str> = refused.into_iter().collect();
    assert_eq!(distinct.len(), INCREMENTS);
    assert!(
        dead.iter()
            .any(|(c, _, r)| c.is_empty() && r.contains("invalid event")),
        "{dead:?}"
    );
    assert_eq!(dead.len(), 2 * INCREMENTS + 1, "{dead:?}");
    let frozen_now = env.command(&frozen).await.unwrap();
    assert_eq!(frozen_now.data["count"], json!(0));
    assert!(
        batches_committed() > batches_before,
        "no batch of two or more was committed"
    );
    env.cleanup().await;
}

/// A batch locks and marks the first event of each of its commands in one statement. Here every
/// such event is a redelivery of one applied before: a whole queue of them, one per counter and
/// each the only one of its counter, so the worker takes them in batches. None is applied again,
/// and each counter's history keeps exactly one line per increment.
#[tokio::test]
async fn redeliveries_first_in_their_batch_change_nothing() {
    let mut env = TestEnv::new().await;
    let (counters, setup) = started_counters(&mut env, COUNTERS).await;
    // One increment each, applied one by one.
    let bodies: Vec<Vec<u8>> = counters
        .iter()
        .map(|id| serde_json::to_vec(&event("demo.increment", Some(id), json!({}))).unwrap())
        .collect();
    for body in &bodies {
        env.publish_raw("demo.increment", body).await;
    }
    for id in &counters {
        eventually(Duration::from_secs(30), "the first increment", || async {
            let c = env.command(id).await?;
            (c.data["count"] == json!(1)).then_some(())
        })
        .await;
    }
    stop_setup(setup).await;

    // The same events again, queued before a batching worker starts, then one new increment
    // each behind them, so that the run has a visible end.
    for body in &bodies {
        env.publish_raw("demo.increment", body).await;
    }
    let mut fresh = Vec::new();
    for id in &counters {
        let increment = event("demo.increment", Some(id), json!({}));
        fresh.push(increment["id"].as_str().unwrap().to_owned());
        env.publish_raw("demo.increment", &serde_json::to_vec(&increment).unwrap())
            .await;
    }
    let batches_before = batches_committed();
    env.start_worker_with(|c| {
        c.batch = 64;
        c.concurrency = 1;
        c.prefetch = 200;
    })
    .await;
    eventually(Duration::from_secs(30), "every new increment", || async {
        let received: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM command_events WHERE entry = 'received' AND event_id = ANY($1)",
        )
        .bind(&fresh)
        .fetch_one(&env.pool)
        .await
        .ok()?;
        (received == COUNTERS as i64).then_some(())
    })
    .await;
    // Redeliveries still in flight behind them, if any, have their moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in &counters {
        let c = env.command(id).await.unwrap();
        assert_eq!(c.data["count"], json!(2), "{id}");
        assert_eq!(c.version, 3, "start and two increments: {id}");
        assert_eq!(env.received(id, "demo.increment").await, 2, "{id}");
    }
    assert!(
        batches_committed() > batches_before,
        "no batch of two or more was committed"
    );
    env.cleanup().await;
}

/// One hot command: a batch applies its events one after the other in one transaction, each
/// seeing the row as the one before it wrote it (it is not read again). 200 increments queued on
/// one counter before a batching worker starts: the count and the version are exact, and the
/// history has one step per version, in order, each with its increment.
#[tokio::test]
async fn a_hot_commands_events_in_one_batch_each_see_the_last_write() {
    let mut env = TestEnv::new().await;
    let (counters, setup) = started_counters(&mut env, 1).await;
    stop_setup(setup).await;
    let id = counters[0].clone();

    let n = 200;
    for _ in 0..n {
        let body = serde_json::to_vec(&event("demo.increment", Some(&id), json!({}))).unwrap();
        env.publish_raw("demo.increment", &body).await;
    }
    let batches_before = batches_committed();
    env.start_worker_with(|c| {
        c.batch = 64;
        c.concurrency = 1;
        c.prefetch = 256;
    })
    .await;
    eventually(Duration::from_secs(30), "every increment", || async {
        let c = env.command(&id).await?;
        (c.data["count"].as_i64()? >= n).then_some(())
    })
    .await;
    let c = env.command(&id).await.unwrap();
    assert_eq!(c.data["count"], json!(n));
    assert_eq!(c.version, n + 1, "start and one version per increment");
    assert_eq!(env.received(&id, "demo.increment").await, n);
    let versions: Vec<i64> = sqlx::query_scalar(
        "SELECT version FROM command_events
          WHERE command_id = $1::uuid AND entry = 'received' AND event_type = 'demo.increment'
          ORDER BY version",
    )
    .bind(&id)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(versions, (2..=n + 1).collect::<Vec<i64>>());
    assert!(
        batches_committed() > batches_before,
        "no batch of two or more was committed"
    );
    env.cleanup().await;
}

/// A batch keeps each event's step (row, history, outbox) back and writes them together; a
/// statement that reads other commands' rows first writes what was kept back. In one batch, two
/// of a parent's three group children finish and then the parent does (its id sorts after
/// theirs, so its event goes last): ending, the parent aborts only the child still open. (A
/// fire-and-forget child would not be aborted at all: its parent's end leaves it running.)
#[tokio::test]
async fn a_batch_reads_the_steps_it_kept_back() {
    let mut env = TestEnv::new().await;
    let (parent, kids) = fanout_last_in_batch(&mut env, json!({})).await;

    one_batch_applied(&env, &[finish(&kids[0]), finish(&kids[1]), finish(&parent)]).await;
    for id in [&kids[0], &kids[1], &parent] {
        assert_eq!(
            env.command(id).await.unwrap().state,
            CommandState::Completed
        );
    }
    assert_eq!(
        aborted_by(&env, &parent).await,
        vec![kids[2].clone()],
        "the parent aborts only the open child"
    );
    env.cleanup().await;
}

/// A batch counts its children's reports into their group in memory, read once, and saves it
/// with its steps. In one batch: three children's reports to their parent, one of them twice
/// under another event id. The group counts each child once, settles once, and the parent hears
/// `children.settled` once, in the same batch.
#[tokio::test]
async fn a_batch_counts_reports_into_a_group_once_each() {
    let mut env = TestEnv::new().await;
    let (parent, kids) = fanout_last_in_batch(&mut env, json!({})).await;

    let bodies = [
        report(&parent, &kids[0]),
        report(&parent, &kids[1]),
        report(&parent, &kids[1]),
        report(&parent, &kids[2]),
    ];
    one_batch_acked(&env, &bodies).await;
    let (completed, state, outcomes): (i32, String, serde_json::Value) = sqlx::query_as(
        "SELECT completed, state, outcomes FROM child_groups WHERE parent_id = $1::uuid",
    )
    .bind(&parent)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(completed, 3, "each child counted once");
    assert_eq!(state, "succeeded");
    assert_eq!(outcomes.as_object().map(|o| o.len()), Some(3));
    let settled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM command_events
          WHERE command_id = $1::uuid AND entry = 'emitted' AND event_type = 'children.settled'",
    )
    .bind(&parent)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(settled, 1, "the group settles once");
    let noted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM command_events
          WHERE command_id = $1::uuid AND entry = 'received' AND detail::text LIKE '%has already reported%'",
    )
    .bind(&parent)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        noted, 1,
        "the second report of one child is noted, not counted"
    );
    env.cleanup().await;
}

/// A batch checks its reports' membership in one statement, and counts only true members. In
/// one batch: a real child's report, a report naming another real child under a group it is not
/// in, one naming a command that is no child of the parent, and the remaining children's
/// reports. The group counts the three children once each; the two strangers are ignored, and
/// the parent's history says why.
#[tokio::test]
async fn a_batch_counts_only_members_of_the_group_a_report_names() {
    let mut env = TestEnv::new().await;
    let (parent, kids) = fanout_last_in_batch(&mut env, json!({})).await;
    let (counters, setup) = started_counters(&mut env, 1).await;
    stop_setup(setup).await;
    let outsider = &counters[0];

    let wrong_group = {
        let data =
            json!({"child_id": kids[1], "group": "others", "kind": "demo.counter", "result": {}});
        serde_json::to_vec(&event("command.completed", Some(&parent), data)).unwrap()
    };
    let bodies = [
        report(&parent, &kids[0]),
        wrong_group,
        report(&parent, outsider),
        report(&parent, &kids[1]),
        report(&parent, &kids[2]),
    ];
    one_batch_acked(&env, &bodies).await;
    assert_eq!(group_of(&env, &parent).await, (3, "succeeded".to_owned()));
    let ignored: Vec<String> = sqlx::query_scalar(
        "SELECT detail->>'reason' FROM command_events
          WHERE command_id = $1::uuid AND entry = 'ignored' ORDER BY seq",
    )
    .bind(&parent)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(ignored.len(), 2, "{ignored:?}");
    assert!(
        ignored[0].contains(&kids[1]) && ignored[0].contains("group others"),
        "{ignored:?}"
    );
    assert!(ignored[1].contains(outsider.as_str()), "{ignored:?}");
    env.cleanup().await;
}

/// A root started in a batch takes its next event in the same batch: the start's step, kept
/// back, is written before the row is read again for the second event.
#[tokio::test]
async fn a_root_started_in_a_batch_takes_its_next_event_in_the_same_batch() {
    let env = TestEnv::new().await;
    let id = uuid::Uuid::now_v7().to_string();
    let start = start_event(&id, "demo.counter", "member:1", json!({}));
    let bodies = [
        serde_json::to_vec(&start).unwrap(),
        serde_json::to_vec(&event("demo.increment", Some(&id), json!({}))).unwrap(),
        serde_json::to_vec(&event("demo.increment", Some(&id), json!({}))).unwrap(),
    ];
    one_batch_applied(&env, &bodies).await;
    let c = env.command(&id).await.unwrap();
    assert_eq!(c.state, CommandState::Running);
    assert_eq!(c.data["count"], json!(2));
    assert_eq!(c.version, 3, "start and one version per increment");
    let versions: Vec<i64> = sqlx::query_scalar(
        "SELECT version FROM command_events WHERE command_id = $1::uuid AND entry = 'received' ORDER BY seq",
    )
    .bind(&id)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(versions, vec![1, 2, 3]);
    env.cleanup().await;
}

/// A group that settles in a batch aborts the members still open, and reads for that the rows
/// the batch kept back: two of three `any` children finish and one's report reaches the parent
/// (its id sorts after theirs, so its event goes last). Only the third child is aborted.
#[tokio::test]
async fn a_group_settling_in_a_batch_aborts_only_its_open_members() {
    let mut env = TestEnv::new().await;
    let (parent, kids) = fanout_last_in_batch(&mut env, json!({"policy": "any"})).await;

    let bodies = [
        finish(&kids[0]),
        finish(&kids[1]),
        report(&parent, &kids[0]),
    ];
    one_batch_applied(&env, &bodies).await;
    let (completed, state) = group_of(&env, &parent).await;
    assert_eq!((completed, state.as_str()), (1, "succeeded"));
    assert_eq!(
        aborted_by(&env, &parent).await,
        vec![kids[2].clone()],
        "the group aborts only the member still open"
    );
    env.cleanup().await;
}

/// A parent that ends in the batch that counted a report into its group closes that group: the
/// group kept back is written before the parent's end closes the open groups.
#[tokio::test]
async fn a_parent_ending_in_a_batch_closes_the_group_it_counted_into() {
    let mut env = TestEnv::new().await;
    let (parent, kids) = fanout_last_in_batch(&mut env, json!({})).await;

    one_batch_applied(&env, &[report(&parent, &kids[0]), finish(&parent)]).await;
    assert_eq!(
        env.command(&parent).await.unwrap().state,
        CommandState::Completed
    );
    let (completed, state) = group_of(&env, &parent).await;
    assert_eq!(
        (completed, state.as_str()),
        (1, "closed"),
        "the report counted, then the group closed with its parent"
    );
    env.cleanup().await;
}

/// A `demo.fanout` of three `demo.counter` children (`data` adds to its data), all started,
/// whose id sorts after every other id, so that its events go last in a batch; the set-up
/// worker is stopped.
async fn fanout_last_in_batch(env: &mut TestEnv, data: serde_json::Value) -> (String, Vec<String>) {
    let setup = env.start_worker_with(|c| c.batch = 1).await;
    let parent = format!(
        "ffffffff-ffff-7fff-bfff-{:012x}",
        uuid::Uuid::now_v7().as_u128() & 0xffff_ffff_ffff
    );
    // A parent of a fan-in group waits for it; one of detached children runs on.
    let settled = if data["detached"] == true {
        CommandState::Running
    } else {
        CommandState::Waiting
    };
    // Reports by event (`each`): the tests send the children's reports themselves.
    let mut fanout = json!({"children": 3, "child_kind": "demo.counter", "reports": "each"});
    if let (Some(fanout), serde_json::Value::Object(data)) = (fanout.as_object_mut(), data) {
        fanout.extend(data);
    }
    let start = start_event(&parent, "demo.fanout", "member:1", fanout);
    env.publish_raw_as_engine("command.start", &serde_json::to_vec(&start).unwrap())
        .await;
    let kids = env.children_running(&parent, 3).await;
    env.wait_state(&parent, settled).await;
    stop_setup(setup).await;
    (parent, kids)
}

fn finish(id: &str) -> Vec<u8> {
    serde_json::to_vec(&event("demo.finish", Some(id), json!({}))).unwrap()
}

/// `kid`'s report to `parent` that it completed, into the group `children`.
fn report(parent: &str, kid: &str) -> Vec<u8> {
    let data = json!({"child_id": kid, "group": "children", "kind": "demo.counter", "result": {"count": 0}});
    serde_json::to_vec(&event("command.completed", Some(parent), data)).unwrap()
}

/// How many members of `parent`'s group completed, and its state.
async fn group_of(env: &TestEnv, parent: &str) -> (i32, String) {
    sqlx::query_as("SELECT completed, state FROM child_groups WHERE parent_id = $1::uuid")
        .bind(parent)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// The children `parent` sent `command.abort`, in the order it sent them.
async fn aborted_by(env: &TestEnv, parent: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT detail->>'commandid' FROM command_events
          WHERE command_id = $1::uuid AND entry = 'emitted' AND event_type = 'command.abort'
          ORDER BY seq",
    )
    .bind(parent)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

/// `n` counters, started one by one by a worker with batching off, all running; returns them
/// and the token that stops that worker.
async fn started_counters(env: &mut TestEnv, n: usize) -> (Vec<String>, CancellationToken) {
    let setup = env.start_worker_with(|c| c.batch = 1).await;
    let mut counters = Vec::new();
    for _ in 0..n {
        counters.push(env.start_raw("demo.counter", "member:1", json!({})).await);
    }
    for id in &counters {
        env.wait_state(id, CommandState::Running).await;
    }
    (counters, setup)
}

/// Stops the set-up worker and gives it time to hand back what it had not taken, so that the
/// load queued next waits for the batching worker.
async fn stop_setup(setup: CancellationToken) {
    setup.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Hands `bodies` to a new worker's engine as one batch, checks that it committed as one
/// transaction (not event by event), and returns each body's disposition.
async fn one_batch(env: &TestEnv, bodies: &[Vec<u8>]) -> Vec<cmdflow_workers::Disposition> {
    let bodies: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
    let worker = env.build_worker(|_| {}).await;
    let batches_before = batches_committed();
    let outcomes = worker.engine().process_batch(&bodies).await;
    assert!(
        batches_committed() > batches_before,
        "the batch committed as one transaction (not event by event)"
    );
    outcomes
}

/// [`one_batch`], where every event must be acknowledged (applied, noted or ignored; none left
/// to retry or dead-lettered).
async fn one_batch_acked(env: &TestEnv, bodies: &[Vec<u8>]) {
    let outcomes = one_batch(env, bodies).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, cmdflow_workers::Disposition::Ack(_))),
        "{outcomes:?}"
    );
}

/// [`one_batch`], where every event must be applied (none a duplicate, none refused).
async fn one_batch_applied(env: &TestEnv, bodies: &[Vec<u8>]) {
    let outcomes = one_batch(env, bodies).await;
    assert!(
        outcomes.iter().all(|o| matches!(
            o,
            cmdflow_workers::Disposition::Ack(cmdflow_workers::Applied::Applied)
        )),
        "every event applied: {outcomes:?}"
    );
}

/// Batches of two or more committed by the workers of this test process.
fn batches_committed() -> f64 {
    let text = cmdflow_shared::metrics::install().render();
    metric(&text, "cmdflow_batch_size_count", &[])
}
