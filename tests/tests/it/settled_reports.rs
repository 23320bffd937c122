//! Fan-in groups whose reports are `settled`: each child counts itself into the group in the
//! transaction that ends it, and the parent hears once, with `children.settled`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_shared::CommandState;
use cmdflow_tests::{TestEnv, event, eventually, get, post, send, start_command};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

async fn received(env: &TestEnv, id: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT event_type FROM command_events WHERE command_id = $1::uuid AND entry = 'received' ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

async fn group(env: &TestEnv, parent: &str) -> (String, String, i32, i32, i32, Value) {
    sqlx::query_as(
        "SELECT reports, state, completed, failed, aborted, outcomes FROM child_groups WHERE parent_id = $1::uuid",
    )
    .bind(parent)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

async fn states(env: &TestEnv, parent: &str) -> Vec<CommandState> {
    env.children(parent)
        .await
        .into_iter()
        .map(|(_, s, _)| s)
        .collect()
}

async fn deadlocks(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// Parents whose children all end at once, queued before two batching workers start, so that
/// batches end children of many parents together. Every count lands once, each parent hears one
/// verdict, and PostgreSQL saw no deadlock on the group rows (batches count in (parent, group)
/// order; a deadlock would cost a batch its retry one by one, not an event).
#[tokio::test]
async fn children_count_themselves_and_the_parent_hears_once() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    let before = deadlocks(&env).await;
    let mut parents = Vec::new();
    for i in 0..60 {
        let data = json!({"children": 10, "reports": "settled"});
        parents.push(
            env.start_raw("demo.fanout", &format!("client:{i}"), data)
                .await,
        );
    }
    env.start_worker().await;
    env.start_worker().await;
    for parent in &parents {
        let done = env.wait_state(parent, CommandState::Completed).await;
        let result = done.result.unwrap();
        assert_eq!(result["completed"], 10, "{result}");
        assert_eq!(result["outcomes"].as_object().unwrap().len(), 10);
        assert!(
            result["outcomes"]
                .as_object()
                .unwrap()
                .values()
                .all(|o| o["state"] == "completed" && o["kind"] == "demo.noop"),
            "{result}"
        );
        assert_eq!(
            received(&env, parent).await,
            ["command.start", "children.settled"],
            "the parent hears the start and the verdict, no report per child"
        );
        let (reports, state, completed, failed, aborted, _) = group(&env, parent).await;
        assert_eq!(
            (reports.as_str(), state.as_str(), completed, failed, aborted),
            ("settled", "succeeded", 10, 0, 0)
        );
    }
    // A child's own history says where its end was counted.
    let child: String = sqlx::query_scalar(
        "SELECT id::text FROM commands WHERE parent_id = $1::uuid ORDER BY id LIMIT 1",
    )
    .bind(&parents[0])
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let notes: Value = sqlx::query_scalar(
        "SELECT detail->'notes' FROM command_events WHERE command_id = $1::uuid AND entry = 'received'",
    )
    .bind(&child)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(
        notes
            .to_string()
            .contains(&format!("counted into group children of {}", parents[0])),
        "{notes}"
    );
    let (status, view) = get(&format!("{}/v1/commands/{}", gw.url, parents[0])).await;
    assert_eq!(status, 200);
    assert_eq!(view["children"]["groups"][0]["reports"], "settled");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        deadlocks(&env).await,
        before,
        "no deadlock on the group rows"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn under_any_the_first_completion_settles_and_the_rest_are_aborted_and_counted() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let parent = start_command(
        &gw.url,
        "demo.fanout",
        "supplier:31",
        json!({"children": 4, "child_kind": "demo.counter", "policy": "any", "reports": "settled"}),
    )
    .await;
    let kids = env.children_running(&parent, 4).await;
    send(&gw.url, &event("demo.finish", Some(&kids[1]), json!({}))).await;
    let done = env.wait_state(&parent, CommandState::Completed).await;
    assert_eq!(done.result.unwrap()["completed"], 1);
    for (i, kid) in kids.iter().enumerate() {
        let want = if i == 1 {
            CommandState::Completed
        } else {
            CommandState::Aborted
        };
        let ended = env.wait_state(kid, want).await;
        if i != 1 {
            assert!(
                ended.reason.unwrap().contains("settled (succeeded)"),
                "aborted by the group's verdict"
            );
        }
    }
    // The aborted siblings are counted too, into the settled group, without a second verdict.
    eventually(WAIT, "every child counted", || async {
        let (_, state, completed, _, aborted, outcomes) = group(&env, &parent).await;
        (state == "succeeded"
            && completed == 1
            && aborted == 3
            && outcomes.as_object().unwrap().len() == 4)
            .then_some(())
    })
    .await;
    assert_eq!(
        received(&env, &parent).await,
        ["command.start", "children.settled"]
    );
    env.cleanup().await;
}

#[tokio::test]
async fn under_all_a_failing_child_fails_the_parent() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let parent = start_command(
        &gw.url,
        "demo.fanout",
        "member:32",
        json!({"children": 5, "fail_children": [2], "reports": "settled"}),
    )
    .await;
    let failed = env.wait_state(&parent, CommandState::Failed).await;
    assert!(failed.reason.unwrap().contains("1 failed"));
    let (_, state, _, failed, _, outcomes) = group(&env, &parent).await;
    assert_eq!((state.as_str(), failed), ("failed", 1));
    let reasons: Vec<_> = outcomes
        .as_object()
        .unwrap()
        .values()
        .filter(|o| o["state"] == "failed")
        .map(|o| o["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].contains("asked to fail"), "{reasons:?}");
    eventually(WAIT, "every child ended", || async {
        states(&env, &parent)
            .await
            .iter()
            .all(|s| s.is_terminal())
            .then_some(())
    })
    .await;
    env.cleanup().await;
}

/// A deadline settles the group first; the children it aborts are counted afterwards and send
/// the parent nothing more.
#[tokio::test]
async fn a_deadline_settles_first_and_late_counts_send_nothing() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    env.start_scheduler();
    let parent = start_command(
        &gw.url,
        "demo.fanout",
        "admin:33",
        json!({"children": 3, "child_kind": "demo.counter", "deadline_ms": 300, "reports": "settled"}),
    )
    .await;
    let failed = env.wait_state(&parent, CommandState::Failed).await;
    assert!(failed.reason.unwrap().contains("0 completed"));
    eventually(WAIT, "the three children aborted and counted", || async {
        let (_, state, _, _, aborted, _) = group(&env, &parent).await;
        (state == "failed" && aborted == 3).then_some(())
    })
    .await;
    assert_eq!(
        received(&env, &parent).await,
        ["command.start", "children.deadline", "children.settled"]
    );
    env.cleanup().await;
}

/// An aborted parent closes its open group; its children, aborted in the cascade, are counted
/// into the closed group and wake nobody.
#[tokio::test]
async fn an_aborted_parent_closes_the_group_and_its_children_wake_nobody() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let parent = start_command(
        &gw.url,
        "demo.fanout",
        "lead:34",
        json!({"children": 3, "child_kind": "demo.counter", "reports": "settled"}),
    )
    .await;
    env.children_running(&parent, 3).await;
    let (status, answer) = post(
        &format!("{}/v1/commands/{parent}/abort", gw.url),
        "application/json",
        br#"{"reason": "test"}"#,
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    env.wait_state(&parent, CommandState::Aborted).await;
    eventually(WAIT, "the children aborted and counted", || async {
        let (_, state, _, _, aborted, _) = group(&env, &parent).await;
        let states = states(&env, &parent).await;
        (state == "closed" && aborted == 3 && states.iter().all(|s| *s == CommandState::Aborted))
            .then_some(())
    })
    .await;
    assert_eq!(
        received(&env, &parent).await,
        ["command.start", "command.abort"],
        "no verdict reaches a parent that has ended"
    );
    env.cleanup().await;
}

/// A group opened without a reports mode reports `settled`: the parent hears its start and the
/// verdict, never a child's end.
#[tokio::test]
async fn a_group_reports_settled_unless_it_asks_for_each() {
    let mut env = TestEnv::new().await;
    env.start_worker().await;
    let parent = env
        .start_raw("demo.fanout", "client:default", json!({"children": 3}))
        .await;
    env.wait_state(&parent, CommandState::Completed).await;
    assert_eq!(group(&env, &parent).await.0, "settled");
    assert_eq!(
        received(&env, &parent).await,
        ["command.start", "children.settled"]
    );
}
