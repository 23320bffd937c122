//! The client subcommands, run as the real `cmdflow` binary against a real gateway and worker
//! (the test harness's, on PostgreSQL, RabbitMQ and Redis): what a person types, and what the
//! gateway then holds.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_shared::CommandState;
use cmdflow_tests::{TEST_KEY, TestEnv, eventually, start_command};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// Runs `cmdflow args…` against `gateway`; its standard output, or a panic with its error.
async fn cmdflow(gateway: &str, args: &[&str]) -> String {
    let gateway = gateway.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cmdflow"))
            .args(&args)
            .env("CMDFLOW_URL", &gateway)
            .env("CMDFLOW_TOKEN", TEST_KEY)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cmdflow failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn emit_with_a_subject_starts_the_funnel_for_that_person() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let out = cmdflow(
        &gw.url,
        &["emit", "visitor.arrived", "--subject", "visitor:cli-1"],
    )
    .await;
    assert!(out.starts_with("accepted "), "{out}");
    eventually(WAIT, "the funnel of visitor:cli-1", || async {
        let kinds: Vec<String> =
            sqlx::query_scalar("SELECT kind FROM commands WHERE owner = 'visitor:cli-1'")
                .fetch_all(&env.pool)
                .await
                .unwrap();
        kinds
            .iter()
            .any(|k| k == "funnel.visitor_to_member")
            .then_some(())
    })
    .await;
    env.cleanup().await;
}

#[tokio::test]
async fn commands_lists_by_owner_kind_and_state() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let counter = start_command(&gw.url, "demo.counter", "member:cli-2", json!({})).await;
    let query = start_command(&gw.url, "query", "member:cli-2", json!({"q": "lamps"})).await;
    let other = start_command(&gw.url, "demo.counter", "member:cli-3", json!({})).await;
    env.wait_state(&counter, CommandState::Running).await;
    env.wait_state(&query, CommandState::Completed).await;
    env.wait_state(&other, CommandState::Running).await;

    let mine = cmdflow(&gw.url, &["commands", "--owner", "member:cli-2"]).await;
    assert!(mine.contains(&counter) && mine.contains(&query), "{mine}");
    assert!(!mine.contains(&other), "{mine}");
    let open = cmdflow(
        &gw.url,
        &["commands", "--owner", "member:cli-2", "--state", "open"],
    )
    .await;
    assert!(open.contains(&counter) && !open.contains(&query), "{open}");
    let counters = cmdflow(&gw.url, &["commands", "--kind", "demo.counter"]).await;
    assert!(
        counters.contains(&counter) && counters.contains(&other) && !counters.contains(&query),
        "{counters}"
    );
    let one = cmdflow(
        &gw.url,
        &["commands", "--kind", "demo.counter", "--limit", "1"],
    )
    .await;
    assert_eq!(
        one.lines().filter(|l| l.contains("member:cli-")).count(),
        1,
        "{one}"
    );
    let page: serde_json::Value = serde_json::from_str(
        &cmdflow(&gw.url, &["commands", "--owner", "member:cli-3", "--json"]).await,
    )
    .unwrap();
    assert_eq!(page["commands"][0]["id"], json!(other));
    env.cleanup().await;
}

#[tokio::test]
async fn show_prints_timers_and_waits() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let id = start_command(
        &gw.url,
        "demo.wait",
        "member:cli-4",
        json!({"type": "special.clicked", "key": "member:cli-4", "timeout_ms": 3_600_000}),
    )
    .await;
    env.wait_state(&id, CommandState::Waiting).await;
    let out = cmdflow(&gw.url, &["show", &id]).await;
    let wait = out
        .lines()
        .find(|l| l.starts_with("wait "))
        .unwrap_or_else(|| panic!("no wait in:\n{out}"));
    assert!(
        wait.contains("special.clicked")
            && wait.contains("member:cli-4")
            && wait.contains("times out"),
        "{out}"
    );
    let timer = out
        .lines()
        .find(|l| l.starts_with("timer "))
        .unwrap_or_else(|| panic!("no timer in:\n{out}"));
    assert!(timer.contains("wait_timeout"), "{out}");
    env.cleanup().await;
}
