//! Archival: only eligible trees move, whole; a batch killed half-way moves nothing; archived
//! commands stay readable.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_shared::CommandState;
use cmdflow_shared::store::archive;
use cmdflow_tests::{TestEnv, event, get, send, start_command};
use cmdflow_workers::archiver;
use serde_json::json;

async fn count(env: &TestEnv, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&env.pool).await.unwrap()
}

#[tokio::test]
async fn archival_moves_whole_eligible_trees_once_and_they_stay_readable() {
    let mut env = TestEnv::with(|c| {
        c.archive_retention = Duration::from_millis(500);
        c.archive_retention_by_kind = "demo.counter=1h".to_owned();
    })
    .await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let done_tree =
        start_command(&gw.url, "demo.fanout", "member:90", json!({"children": 2})).await;
    let open_tree = start_command(
        &gw.url,
        "demo.fanout",
        "member:90",
        json!({"children": 2, "child_kind": "demo.counter"}),
    )
    .await;
    let query = start_command(&gw.url, "query", "member:90", json!({"q": "lamps"})).await;
    let kept = start_command(&gw.url, "demo.counter", "member:90", json!({})).await;
    env.wait_state(&done_tree, CommandState::Completed).await;
    env.wait_state(&query, CommandState::Completed).await;
    env.wait_state(&open_tree, CommandState::Running).await;
    env.wait_state(&kept, CommandState::Running).await;
    send(&gw.url, &event("demo.finish", Some(&kept), json!({}))).await;
    env.wait_state(&kept, CommandState::Completed).await;
    tokio::time::sleep(Duration::from_millis(700)).await;

    let retention = env.config.retention().unwrap();
    assert_eq!(
        archive::eligible(&env.pool, &retention).await.unwrap(),
        2,
        "the ended fan-out and the query"
    );
    let live_before = count(&env, "SELECT count(*) FROM commands").await;
    let history_before = count(&env, "SELECT count(*) FROM command_events").await;

    // Killed half-way: the batch's transaction never commits, and nothing moved.
    {
        let mut tx = env.pool.begin().await.unwrap();
        let moved = archive::move_batch(&mut tx, &retention, 10).await.unwrap();
        assert_eq!(moved.trees, 2);
        drop(tx);
    }
    assert_eq!(
        count(&env, "SELECT count(*) FROM commands").await,
        live_before
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM archive.commands").await,
        0
    );

    let moved = archiver::run_all(&env.pool, &retention, 1, |_| {})
        .await
        .unwrap();
    assert_eq!(
        (moved.trees, moved.commands),
        (2, 4),
        "3 nodes of the fan-out and the query"
    );
    assert_eq!(
        archiver::run_all(&env.pool, &retention, 10, |_| {})
            .await
            .unwrap()
            .trees,
        0,
        "nothing twice"
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM commands").await,
        live_before - 4
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM archive.commands").await,
        4
    );
    let history_after = count(&env, "SELECT count(*) FROM command_events").await
        + count(&env, "SELECT count(*) FROM archive.command_events").await;
    assert_eq!(
        history_after, history_before,
        "no history row lost or doubled"
    );
    // Never split: the open tree is whole in the live table, the ended one whole in the archive.
    let open_live: i64 =
        sqlx::query_scalar("SELECT count(*) FROM commands WHERE root_id = $1::uuid")
            .bind(&open_tree)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(open_live, 3);
    let done_archived: i64 =
        sqlx::query_scalar("SELECT count(*) FROM archive.commands WHERE root_id = $1::uuid")
            .bind(&done_tree)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(done_archived, 3);

    // Archived commands stay readable, history included.
    let (status, command) = get(&format!("{}/v1/commands/{done_tree}", gw.url)).await;
    assert_eq!(
        (status, command["state"].as_str()),
        (200, Some("completed"))
    );
    let (status, history) = get(&format!("{}/v1/commands/{done_tree}/history", gw.url)).await;
    assert_eq!(status, 200);
    assert!(history["entries"].as_array().unwrap().len() >= 4);
    let (_, live_feed) = get(&format!("{}/v1/owners/member:90/feed?kind=query", gw.url)).await;
    assert!(live_feed["history"].as_array().unwrap().is_empty());
    let (_, full_feed) = get(&format!(
        "{}/v1/owners/member:90/feed?kind=query&include_archived=true",
        gw.url
    ))
    .await;
    assert_eq!(full_feed["history"][0]["command_id"], query);
    env.cleanup().await;
}
