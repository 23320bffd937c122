//! How the `cmdflow` client commands end when they fail, run as the real binary: a distinct exit
//! code for usage, auth, not found, unavailable and conflict (README, "CLI"); with `--json`, the
//! error as one JSON object on standard error; no `\r` progress when standard error is not a
//! terminal (here it is a pipe).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_tests::{TEST_KEY, TestEnv};
use serde_json::Value;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `cmdflow args…` against `gateway` with `token`; standard error is a pipe.
async fn cmdflow(gateway: &str, token: &str, args: &[&str]) -> Run {
    let (gateway, token) = (gateway.to_owned(), token.to_owned());
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_cmdflow"))
                .args(&args)
                .env("CMDFLOW_URL", &gateway)
                .env("CMDFLOW_TOKEN", &token)
                .env("RUST_LOG", "off")
                .output()
                .unwrap()
        }),
    )
    .await
    .expect("cmdflow ended within 60 s")
    .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The JSON error of a `--json` run: one object, on one line of standard error.
fn json_error(run: &Run) -> Value {
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "one line: {}", run.stderr);
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.stderr))
}

const UNKNOWN: &str = "0192f0c1-7a3b-7c2d-9e4f-5a6b7c8d9e0f";

#[tokio::test]
async fn usage_and_unavailable_have_their_own_codes_without_a_gateway() {
    let nowhere = "http://127.0.0.1:1";
    let run = cmdflow(nowhere, TEST_KEY, &["show"]).await;
    assert_eq!(run.code, 2, "a missing argument: {}", run.stderr);
    let run = cmdflow(nowhere, TEST_KEY, &["show", "--json"]).await;
    assert_eq!(run.code, 2);
    let error = json_error(&run);
    assert_eq!(
        (error["error"].as_str(), error["exit_code"].as_i64()),
        (Some("usage"), Some(2))
    );
    let run = cmdflow(
        nowhere,
        TEST_KEY,
        &["emit", "demo.increment", "--data", "[1]"],
    )
    .await;
    assert_eq!(run.code, 2, "--data that is not an object: {}", run.stderr);
    assert!(
        run.stderr.contains("--data must be a JSON object"),
        "{}",
        run.stderr
    );

    let run = cmdflow(nowhere, TEST_KEY, &["show", UNKNOWN]).await;
    assert_eq!(run.code, 5, "no gateway there: {}", run.stderr);
    assert!(
        run.stderr.contains("cannot reach the gateway"),
        "{}",
        run.stderr
    );
    let run = cmdflow(nowhere, TEST_KEY, &["--json", "show", UNKNOWN]).await;
    assert_eq!(run.code, 5);
    assert_eq!(json_error(&run)["error"], "unavailable");
    assert!(run.stdout.is_empty(), "{}", run.stdout);
}

#[tokio::test]
async fn auth_not_found_and_conflict_have_their_own_codes() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;

    let run = cmdflow(&gw.url, "cfk_not_a_key_of_this_gateway", &["show", UNKNOWN]).await;
    assert_eq!(run.code, 3, "{}", run.stderr);
    let run = cmdflow(
        &gw.url,
        "cfk_not_a_key_of_this_gateway",
        &["kinds", "--json"],
    )
    .await;
    assert_eq!(run.code, 3);
    let error = json_error(&run);
    assert_eq!(error["error"], "auth");
    assert_eq!(error["status"], 401);
    assert_eq!(error["code"], "unauthorized");

    let run = cmdflow(&gw.url, TEST_KEY, &["show", UNKNOWN]).await;
    assert_eq!(run.code, 4, "{}", run.stderr);
    let run = cmdflow(&gw.url, TEST_KEY, &["dlq", "show", "424242", "--json"]).await;
    assert_eq!(run.code, 4);
    assert_eq!(json_error(&run)["error"], "not_found");

    // No worker here: the replay job stays as it started, and a job that is not interrupted
    // cannot be resumed.
    let run = cmdflow(
        &gw.url,
        TEST_KEY,
        &["--json", "dlq", "replay", "--id", "424242", "--detach"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let job: Value = serde_json::from_str(&run.stdout).unwrap();
    let id = job["id"].as_str().unwrap();
    let run = cmdflow(&gw.url, TEST_KEY, &["dlq", "replay", "--resume", id]).await;
    assert_eq!(run.code, 6, "{}", run.stderr);
    let run = cmdflow(
        &gw.url,
        TEST_KEY,
        &["dlq", "replay", "--resume", id, "--json"],
    )
    .await;
    assert_eq!(run.code, 6);
    assert_eq!(json_error(&run)["status"], 409);
    env.cleanup().await;
}

#[tokio::test]
async fn replay_progress_has_no_carriage_return_when_stderr_is_not_a_terminal() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let run = cmdflow(&gw.url, TEST_KEY, &["dlq", "replay", "--id", "424242"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!run.stderr.is_empty(), "progress is shown");
    assert!(!run.stderr.contains('\r'), "{:?}", run.stderr);
    env.cleanup().await;
}
