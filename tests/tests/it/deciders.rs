//! Remote deciders: a decider written in Python with the standard library only
//! (`examples/deciders/python/decider.py`) drives a command through its events and a child,
//! over signed HTTP, against the real services.

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use cmdflow_shared::CommandState;
use cmdflow_shared::time::SystemClock;
use cmdflow_tests::{TestEnv, event, eventually, get, post, send, start_command};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "py-decider-shared-secret-0123456789";

/// The Python decider, listening on a free port; killed when dropped.
struct Decider {
    _process: tokio::process::Child,
    url: String,
}

impl Decider {
    async fn start(secret: &str) -> Decider {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/deciders/python/decider.py"
        );
        let mut child = tokio::process::Command::new("python3")
            .arg(script)
            .args(["--port", "0"])
            .env("DECIDER_SECRET", secret)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs the decider");
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let port = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the decider says its port")
            .unwrap()
            .unwrap();
        Decider {
            _process: child,
            url: format!("http://127.0.0.1:{}/decide", port.trim()),
        }
    }
}

/// A world whose worker runs the examples and `py.order`, decided by `decider` with `secret`.
async fn world(decider: &Decider, secret: &str) -> (TestEnv, String) {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    let mut registry = cmdflow_tests::registry();
    // The secret as Kubernetes mounts one: a file, with a trailing newline.
    let secret_file =
        std::env::temp_dir().join(format!("cmdflow-decider-{}", uuid::Uuid::now_v7()));
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let file = format!(
        "[[decider]]\nkind = \"py.order\"\nurl = \"{}\"\nsecret_file = \"{}\"\ntimeout = \"2s\"\n",
        decider.url,
        secret_file.display()
    );
    registry
        .deciders("deciders.toml", &file, env.config.lock_ttl)
        .unwrap();
    env.start_worker_custom(registry, std::sync::Arc::new(SystemClock))
        .await;
    (env, gw.url)
}

/// Starts a `py.order` through the gateway, once the gateway knows the kind, and waits until
/// the decider has set it running.
async fn start_order(env: &TestEnv, gw: &str, owner: &str) -> String {
    let order = eventually(WAIT, "the gateway to know py.order", || async {
        let (status, body) = post(
            &format!("{gw}/v1/commands"),
            "application/json",
            json!({"kind": "py.order", "owner": owner})
                .to_string()
                .as_bytes(),
        )
        .await;
        (status == 202).then(|| body["command_id"].as_str().unwrap().to_owned())
    })
    .await;
    env.wait_state(&order, CommandState::Running).await;
    order
}

#[tokio::test]
async fn a_python_decider_drives_an_order_through_its_events_and_a_child() {
    let decider = Decider::start(SECRET).await;
    let (env, gw) = world(&decider, SECRET).await;
    let order = start_order(&env, &gw, "member:7").await;
    send(&gw, &event("order.item_added", Some(&order), json!({}))).await;
    // The decider answers 503 once for this one: it is tried again, not lost.
    send(
        &gw,
        &event("order.item_added", Some(&order), json!({"flaky": true})),
    )
    .await;
    send(&gw, &event("order.checked_out", Some(&order), json!({}))).await;
    let done = env.wait_state(&order, CommandState::Completed).await;
    assert_eq!(done.result.unwrap(), json!({"items": 2, "shipped": true}));
    let kids = env.children(&order).await;
    assert_eq!(kids.len(), 1);
    assert_eq!(kids[0].1, CommandState::Completed);
    // The feed showed what the decider said, and the end cleared it.
    let (_, feed) = get(&format!("{gw}/v1/owners/member:7/feed")).await;
    assert_eq!(feed["pending"], json!([]), "{feed}");
    // The calls are counted by outcome: the 503 as unavailable, the rest decided.
    let text = cmdflow_tests::http()
        .get(format!("{gw}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for outcome in ["decided", "unavailable"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("cmdflow_decider_calls_total{")
                    && l.contains("kind=\"py.order\"")
                    && l.contains(&format!("outcome=\"{outcome}\""))),
            "no {outcome} call counted"
        );
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_bad_answer_or_a_refusal_is_a_dead_letter_naming_why() {
    let decider = Decider::start(SECRET).await;
    let (env, gw) = world(&decider, SECRET).await;
    let order = start_order(&env, &gw, "member:8").await;

    // An invalid decision: the dead letter names the field.
    send(&gw, &event("order.scrambled", Some(&order), json!({}))).await;
    let letter = eventually(WAIT, "the dead letter", || async {
        env.dead_letter_after(0).await
    })
    .await;
    assert!(
        letter.reason.contains("invalid decision") && letter.reason.contains("state: `shipped`"),
        "{}",
        letter.reason
    );
    // A refusal (422) carries the decider's own words.
    send(&gw, &event("order.checked_out", Some(&order), json!({}))).await;
    let refused = eventually(WAIT, "the refusal", || async {
        env.dead_letter_after(letter.id).await
    })
    .await;
    assert!(
        refused
            .reason
            .contains("an empty order cannot be checked out"),
        "{}",
        refused.reason
    );
    // Neither changed the command.
    let c = env.command(&order).await.unwrap();
    assert_eq!(
        (c.state, c.data["items"].clone()),
        (CommandState::Running, json!(0))
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_decider_with_another_secret_never_decides() {
    // The decider holds another secret: it answers 401 to every request, which is refused.
    let decider = Decider::start("another-secret-entirely-0123456789").await;
    let (env, gw) = world(&decider, SECRET).await;
    let id = start_command(&gw, "demo.noop", "member:9", json!({})).await;
    env.wait_state(&id, CommandState::Completed).await;
    let order = env.start_raw("py.order", "member:9", json!({})).await;
    let letter = eventually(WAIT, "the dead letter", || async {
        env.dead_letter_after(0).await
    })
    .await;
    assert!(
        letter.reason.contains("401") && letter.reason.contains("bad signature"),
        "{}",
        letter.reason
    );
    assert!(
        env.command(&order)
            .await
            .is_none_or(|c| c.state == CommandState::Pending)
    );
    drop(decider);
    env.cleanup().await;
}
