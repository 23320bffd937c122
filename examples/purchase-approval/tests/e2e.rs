//! The purchase-approval binary against the real services, as its team would run it:
//! `purchase-approval up` in its own process, driven through the gateway only.

use std::process::Stdio;
use std::time::Duration;

use cmdflow_tests::fleet::{Scratch, free_port, tail_of};
use cmdflow_tests::{TEST_KEY, TestEnv, eventually, get, post, send};
use serde_json::{Value, json};

/// `purchase-approval up` on the test world's database and namespace.
struct Up {
    child: tokio::process::Child,
    url: String,
    log: std::path::PathBuf,
    _dir: Scratch,
}

impl Up {
    async fn start(env: &TestEnv) -> Up {
        let dir = Scratch::new("cffleet");
        let log = dir.join("up.log");
        let port = free_port();
        let c = &env.config;
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_purchase-approval"))
            .arg("up")
            .env("CMDFLOW_DATABASE_URL", &c.database_url)
            .env("CMDFLOW_AMQP_URL", &c.amqp_url)
            .env("CMDFLOW_REDIS_URLS", &c.redis_urls)
            .env("CMDFLOW_NAMESPACE", &c.namespace)
            .env("CMDFLOW_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("CMDFLOW_DEV_KEY", TEST_KEY)
            .env("CMDFLOW_RATE_LIMIT_PER_SECOND", "0")
            .env("CMDFLOW_RETRY_DELAYS", "100ms,200ms")
            .env("BUDGET_LEFT_CENTS", "100000")
            .env("RUST_LOG", "warn,lapin=error")
            .env_remove("CMDFLOW_CONFIG")
            .env_remove("CMDFLOW_EXAMPLES")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log file"))
            .stderr(std::fs::File::create(dir.join("up.err")).expect("log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("start purchase-approval up");
        let url = format!("http://127.0.0.1:{port}");
        let up = Up {
            child,
            url,
            log,
            _dir: dir,
        };
        let ready = format!("{}/readyz", up.url);
        eventually(
            Duration::from_secs(90),
            "purchase-approval up to be ready",
            || async {
                let answered = reqwest::get(&ready).await.ok()?;
                answered.status().is_success().then_some(())
            },
        )
        .await;
        up
    }

    fn logs(&self) -> String {
        let err = self.log.with_file_name("up.err");
        format!("{}\n{}", tail_of(&self.log, 20), tail_of(&err, 40))
    }
}

async fn start(url: &str, data: Value) -> (u16, Value) {
    let body = json!({"kind": "purchase.approval", "owner": "member:ada", "data": data});
    post(
        &format!("{url}/v1/commands"),
        "application/json",
        &serde_json::to_vec(&body).unwrap_or_default(),
    )
    .await
}

async fn command(url: &str, id: &str) -> Value {
    get(&format!("{url}/v1/commands/{id}")).await.1
}

/// Waits until command `id` is in `state`, and returns it.
async fn state_of(up: &Up, id: &str, state: &str) -> Value {
    let url = up.url.clone();
    let found = tokio::time::timeout(
        Duration::from_secs(60),
        eventually(Duration::from_secs(60), state, || async {
            let c = command(&url, id).await;
            (c["state"] == state).then_some(c)
        }),
    )
    .await;
    found.unwrap_or_else(|_| panic!("{id} never became {state}:\n{}", up.logs()))
}

/// The ids of `parent`'s children by check (`budget`, `compliance`), once both exist.
async fn checks(url: &str, parent: &str) -> (String, String) {
    eventually(Duration::from_secs(60), "both checks", || async {
        let tree = get(&format!("{url}/v1/commands/{parent}/tree")).await.1;
        let mut budget = None;
        let mut compliance = None;
        for kid in tree["root"]["children"].as_array()? {
            let id = kid["id"].as_str()?.to_owned();
            match command(url, &id).await["data"]["check"].as_str()? {
                "budget" => budget = Some(id),
                "compliance" => compliance = Some(id),
                _ => {}
            }
        }
        Some((budget?, compliance?))
    })
    .await
}

fn history_types(history: &Value) -> Vec<String> {
    history["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["event_type"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn a_purchase_approval_runs_in_its_own_binary() {
    let env = TestEnv::bare(|_| {}).await;
    let mut up = Up::start(&env).await;
    let url = up.url.clone();

    // The catalogue holds this binary's kinds and nothing of cmdflow's examples.
    let (status, kinds) = get(&format!("{url}/v1/kinds")).await;
    assert_eq!(status, 200, "{kinds}");
    let names: Vec<&str> = kinds["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["name"].as_str())
        .collect();
    assert_eq!(names, ["purchase.approval", "purchase.check"], "{kinds}");

    // A kind the catalogue lacks is refused with the kinds it has.
    let body = json!({"kind": "demo.counter", "owner": "member:ada", "data": {}});
    let (status, answer) = post(
        &format!("{url}/v1/commands"),
        "application/json",
        &serde_json::to_vec(&body).unwrap(),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (422, Some("unknown_kind")),
        "{answer}"
    );
    let detail = answer["detail"].as_str().unwrap();
    assert!(
        detail.contains("known kinds: purchase.approval, purchase.check"),
        "{detail}"
    );

    // Start data that breaks the schema derived from `Purchase` is refused, naming the field.
    let (status, answer) = start(&url, json!({"item": "a desk"})).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (422, Some("invalid_field")),
        "{answer}"
    );
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .starts_with("data.amount"),
        "{answer}"
    );
    let (status, answer) = start(&url, json!({"item": "a desk", "amount": "lots"})).await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .starts_with("data.amount"),
        "{answer}"
    );
    let (status, answer) = start(
        &url,
        json!({"item": "a desk", "amount": 5, "colour": "red"}),
    )
    .await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().contains("colour"),
        "{answer}"
    );

    // 1. Approved: the budget activity answers its check, a person passes compliance; the
    //    owner was reminded while it waited, and is told it is approved.
    let (status, started) = start(
        &url,
        json!({"item": "a standing desk", "amount": 45_000, "remind_after_secs": 1}),
    )
    .await;
    assert_eq!(status, 202, "{started}");
    let approved = started["command_id"].as_str().unwrap().to_owned();
    let (budget, compliance) = checks(&url, &approved).await;
    state_of(&up, &budget, "completed").await;
    // The reminder fires while compliance still has it.
    eventually(Duration::from_secs(30), "the reminder", || async {
        let h = get(&format!("{url}/v1/commands/{approved}/history?limit=1000"))
            .await
            .1;
        history_types(&h)
            .contains(&"timer.fired".to_owned())
            .then_some(())
    })
    .await;
    send(
        &url,
        &json!({"specversion": "1.0", "id": uuid::Uuid::now_v7().to_string(), "source": "compliance-desk",
                "type": "purchase.check_passed", "commandid": compliance, "data": {"by": "admin:grace"}}),
    )
    .await;
    let done = state_of(&up, &approved, "completed").await;
    assert_eq!(
        done["result"],
        json!({"approved": true, "item": "a standing desk"})
    );
    let history = get(&format!("{url}/v1/commands/{approved}/history?limit=1000"))
        .await
        .1;
    let types = history_types(&history);
    for ty in ["command.start", "timer.fired", "children.settled"] {
        assert!(types.contains(&ty.to_owned()), "{ty} in {types:?}");
    }
    let feed = get(&format!("{url}/v1/owners/member:ada/feed")).await.1;
    let subjects: Vec<&str> = feed["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["subject"].as_str())
        .collect();
    assert!(
        subjects.contains(&"Your purchase of a standing desk still waits for approval")
            && subjects.contains(&"Your purchase of a standing desk is approved"),
        "{subjects:?}"
    );

    // 2. Over budget: the activity says no, the group fails fast, compliance is aborted.
    let (_, started) = start(&url, json!({"item": "a car", "amount": 2_500_000})).await;
    let too_dear = started["command_id"].as_str().unwrap().to_owned();
    let failed = state_of(&up, &too_dear, "failed").await;
    assert!(
        failed["reason"].as_str().unwrap().contains("over budget"),
        "{failed}"
    );
    let (_, compliance) = checks(&url, &too_dear).await;
    state_of(&up, &compliance, "aborted").await;

    // 3. Aborted by a person: the open checks are aborted with it.
    let (_, started) = start(&url, json!({"item": "a lamp", "amount": 3_000})).await;
    let aborted = started["command_id"].as_str().unwrap().to_owned();
    let (_, compliance) = checks(&url, &aborted).await;
    let (status, answer) = post(
        &format!("{url}/v1/commands/{aborted}/abort"),
        "application/json",
        br#"{"reason": "bought elsewhere"}"#,
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let gone = state_of(&up, &aborted, "aborted").await;
    assert_eq!(gone["reason"], "bought elsewhere");
    state_of(&up, &compliance, "aborted").await;

    // 4. Nobody answers compliance before the deadline: the approval fails.
    let (_, started) = start(
        &url,
        json!({"item": "a chair", "amount": 9_000, "deadline_secs": 2}),
    )
    .await;
    let late = started["command_id"].as_str().unwrap().to_owned();
    let failed = state_of(&up, &late, "failed").await;
    assert!(
        failed["reason"].as_str().unwrap().contains("in time"),
        "{failed}"
    );

    drop(up.child.start_kill());
    drop(up.child.wait().await);
    // The activity's queue is the application's, not the namespace's core topology.
    env.delete_queue(&env.bus.topology().activity_queue("budget"))
        .await;
    env.cleanup().await;
}
