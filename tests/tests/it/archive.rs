//! Archival: only eligible trees move, whole; a batch killed half-way moves nothing; archived
//! commands stay readable, trees included; a person's feed is the same before and after.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_shared::CommandState;
use cmdflow_shared::store::archive;
use cmdflow_tests::{TestEnv, event, eventually, get, pending_codes, post, send, start_command};
use cmdflow_workers::archiver;
use serde_json::{Value, json};

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
    env.wait_state(&open_tree, CommandState::Waiting).await;
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
    assert_eq!(
        (&command["children"]["total"], &command["children"]["open"]),
        (&json!(2), &json!(0)),
        "its children, counted in the archive"
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

async fn feed(gateway: &str, owner: &str, query: &str) -> Value {
    let (status, feed) = get(&format!("{gateway}/v1/owners/{owner}/feed?{query}")).await;
    assert_eq!(status, 200, "{feed}");
    feed
}

#[tokio::test]
async fn archiving_changes_nothing_a_person_sees_and_archived_trees_are_served() {
    let mut env = TestEnv::with(|c| c.archive_retention = Duration::from_millis(300)).await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let owner = "member:91";
    // A pending condition (an unfinished quote, live), an approved membership whose messages
    // are unread, and an ended quote whose e-mail the sender has not sent yet.
    let quote = start_command(&gw.url, "quote", owner, json!({"items": ["lamp"]})).await;
    let membership = start_command(&gw.url, "membership", owner, json!({"name": "Ada"})).await;
    env.wait_state(&membership, CommandState::Waiting).await;
    send(
        &gw.url,
        &event(
            "membership.approved",
            Some(&membership),
            json!({"by": "admin:1"}),
        ),
    )
    .await;
    env.wait_state(&membership, CommandState::Completed).await;
    let unsent = start_command(&gw.url, "quote", owner, json!({"items": ["desk"]})).await;
    env.wait_state(&unsent, CommandState::Running).await;
    send(&gw.url, &event("quote.submitted", Some(&unsent), json!({}))).await;
    env.wait_state(&unsent, CommandState::Completed).await;
    sqlx::query("UPDATE messages SET delivery = 'pending' WHERE command_id = $1::uuid")
        .bind(&unsent)
        .execute(&env.pool)
        .await
        .unwrap();
    let before = eventually(Duration::from_secs(30), "the feed settles", || async {
        let f = feed(&gw.url, owner, "include_archived=true").await;
        (pending_codes(&f)
            == [
                "client.offer", // the member_to_client funnel, started by the approval
                "membership.approved",
                "message.unread",
                "message.unread",
                "message.unread",
                "message.unread",
                "quote.unfinished",
            ])
        .then_some(f)
    })
    .await;
    let live_before = feed(&gw.url, owner, "").await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let retention = env.config.retention().unwrap();
    let moved = archiver::run_all(&env.pool, &retention, 10, |_| {})
        .await
        .unwrap();
    assert_eq!(
        moved.trees, 1,
        "the membership; the unsent e-mail keeps its quote live"
    );
    let archived: Vec<String> =
        sqlx::query_scalar("SELECT id::text FROM archive.commands ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(archived, std::slice::from_ref(&membership));

    // The person's view is the same; `include_archived` only widens the history.
    let after = feed(&gw.url, owner, "include_archived=true").await;
    assert_eq!(after, before);
    let live_after = feed(&gw.url, owner, "").await;
    for part in ["identities", "pending", "messages"] {
        assert_eq!(live_after[part], live_before[part], "{part}");
    }
    let history = |f: &Value| -> Vec<Value> {
        f["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["command_id"].clone())
            .collect()
    };
    assert!(!history(&live_after).contains(&json!(membership)));
    assert!(history(&after).contains(&json!(membership)));

    // An archived message can still be read, and then shows read.
    let welcome = after["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["command_id"] == json!(membership) && m["read"] == false)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = post(
        &format!("{}/v1/owners/{owner}/messages/{welcome}/read", gw.url),
        "application/json",
        b"",
    )
    .await;
    assert_eq!(status, 204);
    let read = feed(&gw.url, owner, "").await;
    assert!(
        read["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == json!(welcome) && m["read"] == true)
    );

    // The tree of the archived root is served.
    let (status, tree) = get(&format!("{}/v1/commands/{membership}/tree", gw.url)).await;
    assert_eq!(status, 200, "{tree}");
    assert_eq!(tree["root"]["id"], json!(membership));
    assert_eq!(tree["root"]["state"], "completed");
    assert_eq!(tree["nodes"], 1);
    let _ = quote;
    env.cleanup().await;
}
