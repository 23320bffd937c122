//! Children started in the transaction that spawns them: no message, no lock and no dedupe row
//! for their starts, up to `CMDFLOW_EAGER_STARTS` per transaction; any other start goes through
//! the broker, where a start that cannot be applied becomes a dead letter as before.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_shared::CommandState;
use cmdflow_tests::{TestEnv, eventually};
use serde_json::{Value, json};

/// The children of `parent` whose start left a dedupe row: those whose start came through the
/// broker.
async fn started_by_message(env: &TestEnv, parent: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM processed_events p JOIN commands c ON c.id = p.command_id
          WHERE c.parent_id = $1::uuid",
    )
    .bind(parent)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// Each child's received start and the start its parent's history says it emitted: the same
/// event, whichever way it went.
async fn starts_match(env: &TestEnv, parent: &str) {
    let emitted: Vec<(String, Value)> = sqlx::query_as(
        "SELECT event_id, detail->'commandid' FROM command_events
          WHERE command_id = $1::uuid AND entry = 'emitted' AND event_type = 'command.start'
          ORDER BY seq",
    )
    .bind(parent)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let received: Vec<(String, String)> = sqlx::query_as(
        "SELECT e.event_id, e.command_id::text FROM command_events e
           JOIN commands c ON c.id = e.command_id
          WHERE c.parent_id = $1::uuid AND e.entry = 'received' AND e.event_type = 'command.start'",
    )
    .bind(parent)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(emitted.len(), received.len(), "{emitted:?} {received:?}");
    for (event_id, child) in &received {
        assert!(
            emitted
                .iter()
                .any(|(e, c)| e == event_id && c.as_str() == Some(child)),
            "{child}'s start {event_id} is not among its parent's: {emitted:?}"
        );
    }
}

/// A fan-out whose children end at their start, both ways of reporting: every child starts in
/// its parent's transaction (no dedupe row, so no message), each once, its history the same as
/// on the broker's path; the parent completes with every child counted.
#[tokio::test]
async fn children_start_in_the_transaction_that_spawns_them() {
    let mut env = TestEnv::new().await;
    env.start_worker().await;
    for reports in ["settled", "each"] {
        let data = json!({"children": 10, "reports": reports});
        let parent = env.start_raw("demo.fanout", "client:eager", data).await;
        let done = env.wait_state(&parent, CommandState::Completed).await;
        assert_eq!(done.result.unwrap()["completed"], 10, "{reports}");
        assert_eq!(started_by_message(&env, &parent).await, 0, "{reports}");
        starts_match(&env, &parent).await;
        let kids = env.children(&parent).await;
        assert_eq!(kids.len(), 10);
        assert!(kids.iter().all(|(_, s, _)| *s == CommandState::Completed));
        // Each child: one start received, one step (created and ended by it).
        for (child, _, _) in &kids {
            let c = env.command(child).await.unwrap();
            assert_eq!(c.version, 1, "{child}");
            assert_eq!(env.received(child, "command.start").await, 1, "{child}");
        }
    }
}

/// `CMDFLOW_EAGER_STARTS` bounds the starts of one transaction: past it, children start through
/// the broker, and the group still settles once with all of them. At 0 every start is a message.
#[tokio::test]
async fn past_the_bound_children_start_through_the_broker() {
    for (bound, by_message) in [(3, 7), (0, 10)] {
        let mut env = TestEnv::with(|c| c.eager_starts = bound).await;
        env.start_worker().await;
        let data = json!({"children": 10, "reports": "settled"});
        let parent = env.start_raw("demo.fanout", "client:bound", data).await;
        let done = env.wait_state(&parent, CommandState::Completed).await;
        assert_eq!(done.result.unwrap()["completed"], 10, "bound {bound}");
        assert_eq!(
            started_by_message(&env, &parent).await,
            by_message,
            "bound {bound}"
        );
        starts_match(&env, &parent).await;
    }
}

/// A child whose handler refuses its start is not started in its parent's transaction: the
/// parent's step stands, and the start goes through the broker, where it is a dead letter naming
/// why, exactly as it would be without eager starts.
#[tokio::test]
async fn a_start_its_handler_refuses_goes_through_the_broker_to_dead_letters() {
    let mut env = TestEnv::new().await;
    env.start_worker().await;
    let data = json!({
        "children": 2, "child_kind": "demo.counter", "child_data": {"count": "many"},
    });
    let parent = env.start_raw("demo.fanout", "client:refused", data).await;
    let dead: Vec<(String, String)> =
        eventually(Duration::from_secs(60), "two dead starts", || async {
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT coalesce(event_type, ''), reason FROM dead_letters ORDER BY id",
            )
            .fetch_all(&env.pool)
            .await
            .ok()?;
            (rows.len() >= 2).then_some(rows)
        })
        .await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    for (ty, reason) in &dead {
        assert_eq!(ty, "command.start");
        assert!(reason.contains("data.count must be an integer"), "{reason}");
    }
    let p = env.command(&parent).await.unwrap();
    assert_eq!(p.version, 1, "the parent's step stands");
    assert!(!p.state.is_terminal(), "{}", p.state);
    let kids = env.children(&parent).await;
    assert_eq!(kids.len(), 2);
    assert!(kids.iter().all(|(_, s, _)| *s == CommandState::Pending));
}
