//! Flows as data, against the real services: the example quote flow (a waited fan-out of three
//! children with a deadline, a cron timer, a correlated wait with a timeout, a message) runs end
//! to end; an edited flow applies to new commands while the commands in flight finish on their
//! own version; a command whose version no worker has waits, and goes on when one comes.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use cmdflow_shared::time::SystemClock;
use cmdflow_shared::{CommandState, Decision};
use cmdflow_tests::{TestEnv, event, eventually, get, post, send};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn example(name: &str) -> String {
    let path = format!("{}/../examples/flows/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap()
}

/// Starts a command through the gateway, once the gateway knows its kind (the worker publishes
/// the flows it runs to the catalogue as it starts).
async fn start(gw: &str, kind: &str, owner: &str, data: Value) -> String {
    eventually(WAIT, &format!("the gateway to start {kind}"), || async {
        let body = json!({"kind": kind, "owner": owner, "data": data}).to_string();
        let (status, answer) = post(
            &format!("{gw}/v1/commands"),
            "application/json",
            body.as_bytes(),
        )
        .await;
        (status == 202).then(|| answer["command_id"].as_str().unwrap().to_owned())
    })
    .await
}

async fn stage_of(env: &TestEnv, id: &str) -> Option<String> {
    let command = env.command(id).await?;
    command.data["stage"].as_str().map(str::to_owned)
}

async fn wait_stage(env: &TestEnv, id: &str, stage: &str) {
    for _ in 0..300 {
        if stage_of(env, id).await.as_deref() == Some(stage) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let history: Vec<(String, Option<String>, Option<Value>)> = sqlx::query_as(
        "SELECT entry::text, event_type, detail FROM command_events
          WHERE command_id = $1::uuid ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let dead: Vec<(String,)> = sqlx::query_as("SELECT error FROM dead_letters")
        .fetch_all(&env.pool)
        .await
        .unwrap_or_default();
    panic!(
        "{id} did not reach {stage}: {:?}\nhistory: {history:#?}\ndead letters: {dead:?}",
        env.command(id).await
    );
}

async fn history_count(env: &TestEnv, id: &str, entry: &str, ty: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM command_events
          WHERE command_id = $1::uuid AND entry = $2 AND event_type = $3",
    )
    .bind(id)
    .bind(entry)
    .bind(ty)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_quote_flow_fans_out_reminds_waits_and_times_out() {
    let mut env = TestEnv::new().await;
    // The example, with times a test can wait for: a reminder every second, a two-second wait
    // for the buyer, a three-second deadline for the suppliers.
    let quote = example("quote.toml")
        .replace("0 0 9-17 * * Mon-Fri", "* * * * * *")
        .replace("timeout = \"2d\"", "timeout = \"2s\"")
        .replace("deadline = \"1h\"", "deadline = \"3s\"");
    assert!(quote.contains("* * * * * *") && quote.contains("\"3s\""));
    let mut registry = cmdflow_tests::registry();
    registry
        .flows(&[
            ("flows/quote.toml".into(), quote),
            (
                "flows/supplier_quote.toml".into(),
                example("supplier_quote.toml"),
            ),
        ])
        .unwrap();
    env.start_worker_custom(registry, Arc::new(SystemClock))
        .await;
    env.start_scheduler();
    let gw = env.start_gateway().await.url;

    let data = |reference: &str| json!({"item": "chair", "reference": reference, "name": "Ada"});
    let accepted = start(&gw, "shop.quote", "member:1", data("q-accepted")).await;
    let expired = start(&gw, "shop.quote", "member:2", data("q-expired")).await;
    let unpriced = start(&gw, "shop.quote", "member:3", data("q-unpriced")).await;
    for (quote, answering) in [(&accepted, 3), (&expired, 3), (&unpriced, 2)] {
        let suppliers = env.children_running(quote, 3).await;
        for (i, supplier) in suppliers.iter().take(answering).enumerate() {
            let price = json!({"price": 100 + i});
            send(&gw, &event("supplier.priced", Some(supplier), price)).await;
        }
    }

    // All three priced: the offers are kept, the buyer gets the message and the reminders.
    wait_stage(&env, &accepted, "offered").await;
    let offered = env.command(&accepted).await.unwrap();
    assert_eq!(offered.data["offers"].as_object().map(|o| o.len()), Some(3));
    assert_eq!(offered.kind_version.as_deref().map(str::len), Some(12));
    let templates: Vec<String> =
        sqlx::query_scalar("SELECT template FROM messages WHERE command_id = $1::uuid")
            .bind(&accepted)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(templates, ["quote_submitted"]);
    eventually(WAIT, "a reminder from the cron timer", || async {
        (history_count(&env, &accepted, "emitted", "quote.reminded").await >= 1).then_some(())
    })
    .await;
    // The answer is correlated by the quote's reference, not addressed to the command.
    let mut answer = event(
        "quote.answered",
        None,
        json!({"accepted": true, "comment": "deal"}),
    );
    answer["correlationid"] = json!("q-accepted");
    send(&gw, &answer).await;
    let done = env.wait_state(&accepted, CommandState::Completed).await;
    assert_eq!(done.data["answer"], "deal");
    assert_eq!(done.result, Some(json!({"stage": "accepted"})));

    // No answer within the wait's timeout.
    let failed = env.wait_state(&expired, CommandState::Failed).await;
    assert_eq!(
        failed.reason.as_deref(),
        Some("the buyer did not answer in time")
    );
    assert_eq!(
        failed.data["stages"],
        json!(["collecting", "offered", "expired"])
    );

    // A supplier that never answers: the deadline settles the group, the quote fails, and the
    // silent supplier's command is aborted.
    let failed = env.wait_state(&unpriced, CommandState::Failed).await;
    assert_eq!(
        failed.reason.as_deref(),
        Some("not every supplier gave a price in time")
    );
    // The abort is an event the parent's step sent: applied after it, not with it.
    let children = eventually(WAIT, "the silent supplier's command aborted", || async {
        let children = env.children(&unpriced).await;
        children
            .iter()
            .any(|c| c.1 == CommandState::Aborted)
            .then_some(children)
    })
    .await;
    let states: Vec<CommandState> = children.iter().map(|c| c.1).collect();
    assert_eq!(
        states
            .iter()
            .filter(|s| **s == CommandState::Completed)
            .count(),
        2,
        "{children:?}"
    );
    assert_eq!(states.len(), 3, "{children:?}");
    env.cleanup().await;
}

/// A ticket flow whose closing answer names its revision.
fn ticket(revision: u32) -> (String, String) {
    let text = format!(
        r#"
version = 1
kind = "help.ticket"
revision = {revision}
title = "Ticket"
initial = "open"

[[states]]
name = "open"
transitions = [
  {{ on = "ticket.noted", inc = {{ notes = 1 }} }},
  {{ on = "ticket.closed", actions = [{{ complete = {{ result = {{ revision = {revision}, notes = "$.data.notes" }} }} }}] }},
]
"#
    );
    ("flows/ticket.toml".to_owned(), text)
}

fn ticket_registry(revision: u32) -> cmdflow_workers::Registry {
    let mut registry = cmdflow_tests::registry();
    registry.flows(&[ticket(revision)]).unwrap();
    registry
}

#[tokio::test]
async fn an_edited_flow_applies_to_new_commands_and_old_ones_finish_on_theirs() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await.url;
    let first = env
        .start_worker_custom(ticket_registry(1), Arc::new(SystemClock))
        .await;
    let mut old = Vec::new();
    for i in 0..10 {
        old.push(start(&gw, "help.ticket", &format!("member:{i}"), json!({})).await);
    }
    for id in &old {
        send(&gw, &event("ticket.noted", Some(id), json!({}))).await;
    }
    for id in &old {
        env.wait_state(id, CommandState::Running).await;
    }
    // The flow's file is edited (revision 2) and the worker restarted with it, while the ten
    // are in flight.
    first.cancel();
    env.start_worker_custom(ticket_registry(2), Arc::new(SystemClock))
        .await;
    let mut new = Vec::new();
    for i in 0..5 {
        new.push(start(&gw, "help.ticket", &format!("member:{}", 20 + i), json!({})).await);
    }
    for id in &new {
        env.wait_state(id, CommandState::Running).await;
    }
    // The console's API shows both versions, the new one current, with what runs on each.
    let (status, listed) = get(&format!("{gw}/v1/flows")).await;
    assert_eq!(status, 200, "{listed}");
    let ticket = listed["flows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "help.ticket")
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(ticket["current"], "2", "{listed}");
    assert_eq!(ticket["versions"], json!(["2", "1"]), "{listed}");
    let (status, detail) = get(&format!("{gw}/v1/flows/help.ticket")).await;
    assert_eq!(status, 200, "{detail}");
    let open: Vec<(String, i64)> = detail["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            assert!(
                v["mermaid"]
                    .as_str()
                    .unwrap()
                    .starts_with("stateDiagram-v2")
            );
            assert!(v["svg"].as_str().unwrap().contains("<svg"), "{v}");
            (
                v["version"].as_str().unwrap().to_owned(),
                v["open_commands"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        open,
        [("2".to_owned(), 5), ("1".to_owned(), 10)],
        "{detail}"
    );
    let (status, missing) = get(&format!("{gw}/v1/flows/help.nothing")).await;
    assert_eq!(status, 404, "{missing}");
    for id in old.iter().chain(&new) {
        send(&gw, &event("ticket.noted", Some(id), json!({}))).await;
        send(&gw, &event("ticket.closed", Some(id), json!({}))).await;
    }
    for (ids, revision, notes) in [(&old, 1, 2), (&new, 2, 1)] {
        for id in ids {
            let done = env.wait_state(id, CommandState::Completed).await;
            assert_eq!(
                done.result,
                Some(json!({"revision": revision, "notes": notes})),
                "{id}"
            );
            assert_eq!(done.kind_version, Some(revision.to_string()));
            // Each step's history names the version that decided it.
            let versions: Vec<Option<String>> = sqlx::query_scalar(
                "SELECT detail->>'kind_version' FROM command_events
                  WHERE command_id = $1::uuid AND entry = 'received'",
            )
            .bind(id)
            .fetch_all(&env.pool)
            .await
            .unwrap();
            assert!(!versions.is_empty());
            assert!(
                versions
                    .iter()
                    .all(|v| v.as_deref() == Some(&revision.to_string())),
                "{id}: {versions:?}"
            );
        }
    }
    // Both versions are kept, with their text and diagram, for any worker and the console.
    let kept = cmdflow_shared::store::flows::versions_of(&env.pool, "help.ticket")
        .await
        .unwrap();
    let mut versions: Vec<&str> = kept.iter().map(|v| v.version.as_str()).collect();
    versions.sort();
    assert_eq!(versions, ["1", "2"]);
    assert!(
        kept.iter()
            .all(|v| v.mermaid.starts_with("stateDiagram-v2"))
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_changed_flow_that_keeps_its_revision_stops_the_worker() {
    let env = TestEnv::new().await;
    let worker = cmdflow_workers::Worker::build(&env.config, ticket_registry(1)).await;
    assert!(worker.is_ok());
    let mut registry = cmdflow_tests::registry();
    let (file, text) = ticket(1);
    registry
        .flows(&[(
            file,
            text.replace("inc = { notes = 1 }", "inc = { notes = 2 }"),
        )])
        .unwrap();
    let refused = cmdflow_workers::Worker::build(&env.config, registry).await;
    let why = refused.err().expect("refused").to_string();
    assert!(
        why.contains("flows/ticket.toml")
            && why.contains("version 1 of help.ticket was run with another text"),
        "{why}"
    );
    env.cleanup().await;
}

/// A Rust kind at `version`, whose answer says which version decided.
fn counter_registry(versions: &[&str]) -> cmdflow_workers::Registry {
    let decide = |version: String| {
        move |_: &cmdflow_shared::Command, e: &cmdflow_shared::Event| {
            Ok(match e.ty.as_str() {
                "vt.done" => Decision::complete(json!({ "decided_by": version })),
                _ => Decision::nothing().with_state(CommandState::Running),
            })
        }
    };
    let mut registry = cmdflow_tests::registry();
    registry
        .register("vt.counter", decide(versions[0].to_owned()))
        .version("vt.counter", versions[0]);
    for v in &versions[1..] {
        registry
            .keep_version("vt.counter", v, decide((*v).to_owned()))
            .unwrap();
    }
    registry
}

#[tokio::test]
async fn events_of_a_version_no_worker_has_wait_until_one_has_it() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await.url;
    let first = env
        .start_worker_custom(counter_registry(&["1"]), Arc::new(SystemClock))
        .await;
    let id = start(&gw, "vt.counter", "member:1", json!({})).await;
    env.wait_state(&id, CommandState::Running).await;
    first.cancel();
    // A worker with version 2 only: the event waits, parked, past the start wait after which
    // an event for a command that never started is a dead letter.
    let second = env
        .start_worker_custom(counter_registry(&["2"]), Arc::new(SystemClock))
        .await;
    send(&gw, &event("vt.done", Some(&id), json!({}))).await;
    let waiting: String = eventually(WAIT, "the event to wait for its version", || async {
        sqlx::query_scalar("SELECT waiting_for FROM parked_events WHERE command_id = $1::uuid")
            .bind(&id)
            .fetch_optional(&env.pool)
            .await
            .unwrap()
    })
    .await;
    assert_eq!(waiting, "vt.counter version 1");
    tokio::time::sleep(env.config.start_wait * 2).await;
    let command = env.command(&id).await.unwrap();
    assert_eq!(command.state, CommandState::Running);
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);
    // The console's overview counts it.
    let (_, overview) = cmdflow_tests::get(&format!("{gw}/v1/overview")).await;
    assert_eq!(overview["waiting_for_definition"], 1, "{overview}");
    // A worker that keeps version 1 takes over and applies it with version 1.
    second.cancel();
    env.start_worker_custom(counter_registry(&["2", "1"]), Arc::new(SystemClock))
        .await;
    let done = env.wait_state(&id, CommandState::Completed).await;
    assert_eq!(done.result, Some(json!({"decided_by": "1"})));
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_events")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    env.cleanup().await;
}
