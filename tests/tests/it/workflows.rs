//! Workflows end to end: children, fan-in policies, cascading abort, the outbox sweeper, limits.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_shared::CommandState;
use cmdflow_tests::{TestEnv, event, eventually, get, post, send, start_command};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

async fn state_of(env: &TestEnv, id: &str) -> Option<CommandState> {
    env.command(id).await.map(|c| c.state)
}

async fn history(env: &TestEnv, id: &str) -> Vec<(String, Option<String>, Option<Value>)> {
    sqlx::query_as::<_, (String, Option<String>, Option<Value>)>(
        "SELECT entry, event_type, detail FROM command_events WHERE command_id = $1::uuid ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_hundred_parents_with_ten_children_each_all_complete() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    env.start_worker().await;
    let mut parents = Vec::new();
    for i in 0..100 {
        parents.push(
            start_command(
                &gw.url,
                "demo.fanout",
                &format!("client:{i}"),
                json!({"children": 10, "reports": "each"}),
            )
            .await,
        );
    }
    for parent in &parents {
        let done = env.wait_state(parent, CommandState::Completed).await;
        assert_eq!(done.result.as_ref().unwrap()["completed"], 10);
        let kids = env.children(parent).await;
        assert_eq!(kids.len(), 10);
        assert!(
            kids.iter()
                .all(|(_, s, g)| *s == CommandState::Completed && g.as_deref() == Some("children"))
        );
        let completions = history(&env, parent)
            .await
            .into_iter()
            .filter(|(entry, _, detail)| {
                entry == "state_changed"
                    && detail.as_ref().is_some_and(|d| d.get("result").is_some())
            })
            .count();
        assert_eq!(completions, 1, "exactly one completion of {parent}");
        // Each child reported exactly once.
        let acks = history(&env, parent)
            .await
            .into_iter()
            .filter(|(entry, ty, _)| {
                entry == "received" && ty.as_deref() == Some("command.completed")
            })
            .count();
        assert_eq!(acks, 10);
    }
    let (status, view) = get(&format!("{}/v1/commands/{}", gw.url, parents[0])).await;
    assert_eq!(status, 200);
    assert_eq!(view["children"]["total"], 10);
    assert_eq!(view["children"]["open"], 0);
    assert_eq!(view["children"]["groups"][0]["state"], "succeeded");
    assert_eq!(view["children"]["groups"][0]["completed"], 10);
    let (status, tree) = get(&format!("{}/v1/commands/{}/tree", gw.url, parents[0])).await;
    assert_eq!(status, 200);
    assert_eq!(tree["nodes"], 11);
    assert_eq!(tree["root"]["children"].as_array().unwrap().len(), 10);
    env.cleanup().await;
}

#[tokio::test]
async fn under_all_one_failing_child_fails_the_parent_and_aborts_its_siblings() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let parent = start_command(
        &gw.url,
        "demo.fanout",
        "member:1",
        json!({"children": 5, "child_kind": "demo.counter", "fail_children": [2]}),
    )
    .await;
    let failed = env.wait_state(&parent, CommandState::Failed).await;
    assert!(
        failed.reason.unwrap().contains("1 failed"),
        "the reason counts the failure"
    );
    let kids = eventually(WAIT, "every child ended", || async {
        let kids = env.children(&parent).await;
        kids.iter().all(|(_, s, _)| s.is_terminal()).then_some(kids)
    })
    .await;
    let failed: Vec<_> = kids
        .iter()
        .filter(|(_, s, _)| *s == CommandState::Failed)
        .collect();
    let aborted: Vec<_> = kids
        .iter()
        .filter(|(_, s, _)| *s == CommandState::Aborted)
        .collect();
    assert_eq!((failed.len(), aborted.len()), (1, 4), "{kids:?}");
    let abort_reason = env.command(&aborted[0].0).await.unwrap().reason.unwrap();
    assert!(abort_reason.contains("settled (failed)"), "{abort_reason}");
    env.cleanup().await;
}

#[tokio::test]
async fn under_any_the_first_completion_wins_and_the_rest_are_aborted() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let parent = start_command(
        &gw.url,
        "demo.fanout",
        "supplier:3",
        json!({"children": 4, "child_kind": "demo.counter", "policy": "any"}),
    )
    .await;
    let kids = env.children_running(&parent, 4).await;
    send(&gw.url, &event("demo.finish", Some(&kids[2]), json!({}))).await;
    let done = env.wait_state(&parent, CommandState::Completed).await;
    assert_eq!(done.result.unwrap()["completed"], 1);
    for (i, kid) in kids.iter().enumerate() {
        let want = if i == 2 {
            CommandState::Completed
        } else {
            CommandState::Aborted
        };
        env.wait_state(kid, want).await;
    }
    env.cleanup().await;
}

#[tokio::test]
async fn all_settled_reports_every_outcome() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let parent = start_command(
        &gw.url,
        "demo.fanout",
        "lead:4",
        json!({"children": 4, "policy": "all_settled", "fail_children": [1, 3]}),
    )
    .await;
    let done = env.wait_state(&parent, CommandState::Completed).await;
    let result = done.result.unwrap();
    assert_eq!(
        (result["completed"].as_i64(), result["failed"].as_i64()),
        (Some(2), Some(2))
    );
    let outcomes = result["outcomes"].as_object().unwrap();
    assert_eq!(outcomes.len(), 4);
    let failed: Vec<_> = outcomes
        .values()
        .filter(|o| o["state"] == "failed")
        .collect();
    assert_eq!(failed.len(), 2);
    assert!(
        failed
            .iter()
            .all(|o| o["reason"].as_str().unwrap().contains("asked to fail"))
    );
    env.cleanup().await;
}

#[tokio::test]
async fn quorum_completes_when_enough_children_complete() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let parent = start_command(
        &gw.url,
        "demo.fanout",
        "shipper:5",
        json!({"children": 3, "child_kind": "demo.counter", "policy": "quorum:2"}),
    )
    .await;
    let kids = env.children_running(&parent, 3).await;
    send(&gw.url, &event("demo.finish", Some(&kids[0]), json!({}))).await;
    env.wait_state(&kids[0], CommandState::Completed).await;
    assert_eq!(
        state_of(&env, &parent).await,
        Some(CommandState::Waiting),
        "one of two is not a quorum: the parent still waits for its children"
    );
    send(&gw.url, &event("demo.finish", Some(&kids[1]), json!({}))).await;
    env.wait_state(&parent, CommandState::Completed).await;
    env.wait_state(&kids[2], CommandState::Aborted).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_fire_and_forget_child_sends_no_ack() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let parent = start_command(
        &gw.url,
        "demo.fanout",
        "member:6",
        json!({"children": 3, "detached": true}),
    )
    .await;
    let kids = eventually(WAIT, "children done", || async {
        let kids = env.children(&parent).await;
        (kids.len() == 3 && kids.iter().all(|(_, s, _)| *s == CommandState::Completed))
            .then_some(kids)
    })
    .await;
    assert!(kids.iter().all(|(_, _, group)| group.is_none()));
    // Give any report time to arrive, then check none did.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received: Vec<_> = history(&env, &parent)
        .await
        .into_iter()
        .filter(|(entry, _, _)| entry == "received")
        .map(|(_, ty, _)| ty.unwrap())
        .collect();
    assert_eq!(
        received,
        vec!["command.start"],
        "only its own start: no ACK from a detached child"
    );
    assert_eq!(state_of(&env, &parent).await, Some(CommandState::Running));
    send(&gw.url, &event("demo.finish", Some(&parent), json!({}))).await;
    env.wait_state(&parent, CommandState::Completed).await;
    env.cleanup().await;
}

#[tokio::test]
async fn fire_and_forget_children_outlive_their_parent_but_not_its_abort() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    // `abandon` left unset: a fire-and-forget child has no concern for its parent anyway.
    let spec = json!({"children": 2, "detached": true, "child_kind": "demo.counter"});
    let finishing = start_command(&gw.url, "demo.fanout", "member:20", spec.clone()).await;
    let aborted = start_command(&gw.url, "demo.fanout", "member:21", spec).await;
    let outliving = env.children_running(&finishing, 2).await;
    let aborted_kids = env.children_running(&aborted, 2).await;

    send(&gw.url, &event("demo.finish", Some(&finishing), json!({}))).await;
    env.wait_state(&finishing, CommandState::Completed).await;
    let (status, body) = post(
        &format!("{}/v1/commands/{aborted}/abort", gw.url),
        "application/json",
        br#"{"reason": "the visitor left"}"#,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    env.wait_state(&aborted, CommandState::Aborted).await;

    // An explicit abort reaches every child, fire-and-forget ones too.
    for kid in &aborted_kids {
        let c = env.wait_state(kid, CommandState::Aborted).await;
        assert!(c.reason.unwrap().contains("was aborted"));
    }
    // The end of their parent does not.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for kid in &outliving {
        assert_eq!(
            state_of(&env, kid).await,
            Some(CommandState::Running),
            "a fire-and-forget child runs on after its parent completed"
        );
        send(&gw.url, &event("demo.increment", Some(kid), json!({}))).await;
    }
    for kid in &outliving {
        eventually(WAIT, "the child to keep counting", || async {
            (env.command(kid).await.unwrap().data["count"] == 1).then_some(())
        })
        .await;
    }
    env.cleanup().await;
}

#[tokio::test]
async fn aborting_the_root_of_a_three_level_tree_leaves_no_orphans() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let root = start_command(
        &gw.url,
        "demo.fanout",
        "admin:1",
        json!({"children": 2, "child_kind": "demo.fanout",
               "child_data": {"children": 3, "child_kind": "demo.counter"}}),
    )
    .await;
    // Wait for the six leaves to run.
    eventually(WAIT, "9 nodes with running leaves", || async {
        let (_, tree) = get(&format!("{}/v1/commands/{root}/tree", gw.url)).await;
        let mut leaves = Vec::new();
        for middle in tree["root"]["children"].as_array()? {
            leaves.extend(
                middle["children"]
                    .as_array()?
                    .iter()
                    .map(|l| l["state"].clone()),
            );
        }
        (tree["nodes"] == 9 && leaves.len() == 6 && leaves.iter().all(|s| s == "running"))
            .then_some(())
    })
    .await;

    let (status, body) = post(
        &format!("{}/v1/commands/{root}/abort", gw.url),
        "application/json",
        br#"{"reason": "customer cancelled"}"#,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let ids: Vec<String> = eventually(WAIT, "every node terminal", || async {
        let rows: Vec<(uuid::Uuid, CommandState)> =
            sqlx::query_as("SELECT id, state FROM commands WHERE root_id = $1::uuid")
                .bind(&root)
                .fetch_all(&env.pool)
                .await
                .unwrap();
        (rows.len() == 9 && rows.iter().all(|(_, s)| *s == CommandState::Aborted))
            .then(|| rows.into_iter().map(|(id, _)| id.to_string()).collect())
    })
    .await;
    assert_eq!(
        env.command(&root).await.unwrap().reason.as_deref(),
        Some("customer cancelled")
    );
    // The groups of the aborted parents do not wait on for ever: they were closed, and the
    // children's late reports leave them closed.
    let groups: Vec<(String, String)> = sqlx::query_as(
        "SELECT g.parent_id::text, g.state FROM child_groups g
           JOIN commands c ON c.id = g.parent_id WHERE c.root_id = $1::uuid",
    )
    .bind(&root)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        groups.len(),
        3,
        "the root's group and one per middle node: {groups:?}"
    );
    assert!(
        groups.iter().all(|(_, state)| state == "closed"),
        "{groups:?}"
    );
    for id in &ids {
        let h = history(&env, id).await;
        assert!(
            h.iter().any(|(entry, ty, _)| entry == "received" && ty.as_deref() == Some("command.abort")),
            "the abort is in the history of {id}"
        );
    }
    // A second abort reaches a terminal command: ignored, and the history says so.
    let (status, _) = post(
        &format!("{}/v1/commands/{root}/abort", gw.url),
        "application/json",
        b"",
    )
    .await;
    assert_eq!(status, 202);
    eventually(WAIT, "the ignored abort recorded", || async {
        history(&env, &root)
            .await
            .iter()
            .any(|(entry, ty, detail)| {
                entry == "ignored"
                    && ty.as_deref() == Some("command.abort")
                    && detail.as_ref().is_some_and(|d| {
                        d["reason"].as_str().unwrap_or("").contains("abort reached")
                    })
            })
            .then_some(())
    })
    .await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_duplicated_ack_is_counted_once() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let parent = start_command(
        &gw.url,
        "demo.fanout",
        "member:8",
        json!({"children": 2, "child_kind": "demo.counter"}),
    )
    .await;
    let kids = env.children_running(&parent, 2).await;
    send(&gw.url, &event("demo.finish", Some(&kids[0]), json!({}))).await;
    let group_completed = || async {
        sqlx::query_scalar::<_, i32>(
            "SELECT completed FROM child_groups WHERE parent_id = $1::uuid",
        )
        .bind(&parent)
        .fetch_one(&env.pool)
        .await
        .unwrap()
    };
    eventually(WAIT, "the first ACK counted", || async {
        (group_completed().await == 1).then_some(())
    })
    .await;

    // The same report again, under a new event id (a replay), twice.
    let ack = json!({"child_id": kids[0], "group": "children", "kind": "demo.counter", "result": {"count": 0}});
    let replay = {
        let mut e = event("command.completed", Some(&parent), ack);
        e["source"] = json!("replayer");
        e
    };
    // The engine's own event, replayed: it carries the engine's mark.
    let replay = serde_json::to_vec(&replay).unwrap();
    env.publish_raw_as_engine("command.completed", &replay)
        .await;
    env.publish_raw_as_engine("command.completed", &replay)
        .await;
    eventually(WAIT, "the replayed ACK noted", || async {
        history(&env, &parent)
            .await
            .iter()
            .any(|(_, _, detail)| {
                detail
                    .as_ref()
                    .is_some_and(|d| d.to_string().contains("counted once"))
            })
            .then_some(())
    })
    .await;
    assert_eq!(group_completed().await, 1, "a child counts once");
    assert_eq!(state_of(&env, &parent).await, Some(CommandState::Waiting));

    send(&gw.url, &event("demo.finish", Some(&kids[1]), json!({}))).await;
    let done = env.wait_state(&parent, CommandState::Completed).await;
    assert_eq!(done.result.unwrap()["completed"], 2);
    env.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_between_commit_and_publish_is_covered_by_the_sweeper() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    // Its children start through the broker, so that their starts wait in the outbox.
    let doomed = env.build_worker(|c| c.eager_starts = 0).await;
    let parent = start_command(&gw.url, "demo.fanout", "client:9", json!({"children": 5})).await;

    // The doomed worker takes the start, commits, and dies before publishing its outbox.
    let channel = env.bus.channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            env.partition_queue_of(&parent).as_str().into(),
            "doomed".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let delivery = consumer.next().await.unwrap().unwrap();
    let (outcome, unpublished) = doomed
        .engine()
        .process_without_publishing(&delivery.data)
        .await;
    assert!(matches!(outcome, cmdflow_workers::Disposition::Ack(_)));
    assert_eq!(
        unpublished.len(),
        5,
        "five child starts were left in the outbox"
    );
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    channel.close(200, "died".into()).await.unwrap();
    drop(doomed);
    let backlog = cmdflow_shared::store::outbox_backlog(&env.pool)
        .await
        .unwrap();
    assert_eq!(backlog, 5);

    // A live worker's sweeper publishes what was left, and the tree completes.
    env.start_worker().await;
    env.wait_state(&parent, CommandState::Completed).await;
    eventually(WAIT, "an empty outbox", || async {
        (cmdflow_shared::store::outbox_backlog(&env.pool)
            .await
            .unwrap()
            == 0)
            .then_some(())
    })
    .await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_width_and_depth_limits_fail_the_command_with_their_reason() {
    let mut env = TestEnv::with(|c| {
        c.max_children = 5;
        c.max_depth = 1;
    })
    .await;
    let gw = env.start_gateway().await;
    env.start_worker().await;

    let wide = start_command(&gw.url, "demo.fanout", "member:10", json!({"children": 6})).await;
    let failed = env.wait_state(&wide, CommandState::Failed).await;
    assert!(
        failed
            .reason
            .as_deref()
            .unwrap()
            .contains("at most 5 children"),
        "{failed:?}"
    );
    assert!(env.children(&wide).await.is_empty(), "nothing was spawned");

    let deep = start_command(
        &gw.url,
        "demo.fanout",
        "member:11",
        json!({"children": 1, "child_kind": "demo.fanout", "child_data": {"children": 1}}),
    )
    .await;
    env.wait_state(&deep, CommandState::Failed).await;
    let kids = env.children(&deep).await;
    assert_eq!(kids.len(), 1);
    let child = env.command(&kids[0].0).await.unwrap();
    assert_eq!(child.state, CommandState::Failed);
    assert!(
        child.reason.as_deref().unwrap().contains("levels deep"),
        "{child:?}"
    );
    assert!(env.children(&kids[0].0).await.is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn a_broadcast_event_starts_its_registered_kind_once() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let mut requested = event("demo.requested", None, json!({"count": 5}));
    requested["subject"] = json!("member:77");
    send(&gw.url, &requested).await;
    send(&gw.url, &requested).await;
    let started = eventually(WAIT, "a counter for member:77", || async {
        let rows: Vec<(uuid::Uuid, CommandState)> = sqlx::query_as(
            "SELECT id, state FROM commands WHERE owner = 'member:77' AND kind = 'demo.counter'",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        (rows.len() == 1 && rows[0].1 == CommandState::Running).then_some(rows)
    })
    .await;
    let counter = env.command(&started[0].0.to_string()).await.unwrap();
    assert_eq!(counter.data["count"], 5);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM commands WHERE owner = 'member:77'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(n, 1, "the same event starts one command");

    // Without a subject there is no owner: a dead letter that says why.
    send(&gw.url, &event("demo.requested", None, json!({}))).await;
    let dead = eventually(WAIT, "a dead letter", || env.dead_letter_after(0)).await;
    let reason = dead.reason;
    assert!(reason.contains("subject"), "{reason}");
    env.cleanup().await;
}

/// `test.cleanup`: runs until aborted; on abort it records its cleanup in its data and emits
/// `test.cleaned_up`.
fn cleanup_kind(
    _: &cmdflow_shared::Command,
    event: &cmdflow_shared::Event,
) -> Result<cmdflow_shared::Decision, cmdflow_shared::HandlerError> {
    use cmdflow_shared::Decision;
    match event.ty.as_str() {
        "command.start" => Ok(Decision::nothing().with_state(CommandState::Running)),
        "command.abort" => Ok(Decision::nothing()
            .with_patch(json!({"cleaned_up": true}).as_object().unwrap().clone())
            .emit("test.cleaned_up", serde_json::Map::new())),
        _ => Err(cmdflow_shared::HandlerError::unexpected(
            "test.cleanup",
            event,
        )),
    }
}

#[tokio::test]
async fn an_aborted_command_gets_to_clean_up() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    let mut registry = cmdflow_tests::registry();
    registry.register("test.cleanup", cleanup_kind);
    env.start_worker_custom(
        registry,
        std::sync::Arc::new(cmdflow_shared::time::SystemClock),
    )
    .await;
    let id = env.start_raw("test.cleanup", "member:30", json!({})).await;
    env.wait_state(&id, CommandState::Running).await;
    let (status, accepted) = post(
        &format!("{}/v1/commands/{id}/abort", gw.url),
        "application/json",
        br#"{"reason": "stop"}"#,
    )
    .await;
    assert_eq!(status, 202);
    let aborted = env.wait_state(&id, CommandState::Aborted).await;
    assert_eq!(
        aborted.data["cleaned_up"], true,
        "the cleanup decision was applied"
    );
    assert_eq!(aborted.reason.as_deref(), Some("stop"));
    // The cleanup's event went out, chained to the abort that caused it.
    let (event_id, body): (String, Value) = eventually(WAIT, "the emitted event", || async {
        sqlx::query_as("SELECT event_id, detail FROM command_events WHERE command_id = $1::uuid AND entry = 'emitted' AND event_type = 'test.cleaned_up'")
            .bind(&id)
            .fetch_optional(&env.pool)
            .await
            .unwrap()
    })
    .await;
    assert!(!event_id.is_empty());
    assert_eq!(body["commandid"], Value::Null, "a broadcast");
    let abort_id = accepted["event_id"].as_str().unwrap();
    let unmatched = eventually(WAIT, "the broadcast kept as unmatched", || async {
        let (_, list) = get(&format!(
            "{}/v1/events/unmatched?type=test.cleaned_up",
            gw.url
        ))
        .await;
        list["events"].as_array().and_then(|a| a.first().cloned())
    })
    .await;
    assert_eq!(
        unmatched["body"]["causationid"], abort_id,
        "causationid names the abort"
    );
    assert_eq!(
        unmatched["body"]["correlationid"],
        aborted.root_id.to_string(),
        "correlationid follows the tree"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn the_trace_context_goes_from_the_gateway_through_the_worker_to_the_children() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = cmdflow_tests::http()
        .post(format!("{}/v1/commands", gw.url))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .body(
            serde_json::to_vec(
                &json!({"kind": "demo.fanout", "owner": "member:80", "data": {"children": 2}}),
            )
            .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let parent = resp.json::<Value>().await.unwrap()["command_id"]
        .as_str()
        .unwrap()
        .to_owned();
    env.wait_state(&parent, CommandState::Completed).await;
    let traced: Vec<String> = sqlx::query_scalar(
        "SELECT e.detail->>'traceparent' FROM command_events e JOIN commands c ON c.id = e.command_id
          WHERE c.root_id = $1::uuid AND e.entry = 'received' AND e.event_type = 'command.start'",
    )
    .bind(&parent)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(traced.len(), 3, "the parent's start and both children's");
    let spans: std::collections::BTreeSet<&str> = traced
        .iter()
        .map(|tp| {
            let (t, span) = cmdflow_shared::trace::parse(tp).unwrap();
            assert_eq!(t, trace, "one trace from the gateway to the children");
            span
        })
        .collect();
    assert_eq!(spans.len(), 3, "each hop is its own span");
    env.cleanup().await;
}
