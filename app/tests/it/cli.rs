//! The `cmdflow` binary: an unreachable service stops it with one clear line, no panic.
//! The worker roles run with cmdflow's example kinds (`CMDFLOW_EXAMPLES=true`), as an operator
//! of this binary would run them.

use std::process::Command;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cmdflow"))
        .args(args)
        .env("CMDFLOW_EXAMPLES", "true")
        .envs(env.iter().copied())
        .env("RUST_LOG", "off")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run cmdflow");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

fn assert_one_clear_line(stderr: &str, service: &str, url: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, got: {stderr}");
    assert!(lines[0].contains(service), "names {service}: {stderr}");
    assert!(lines[0].contains(url), "names {url}: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_database_stops_the_worker_with_one_line() {
    let (code, stderr) = run(
        &["worker"],
        &[(
            "CMDFLOW_DATABASE_URL",
            "postgres://postgres:hunter2@127.0.0.1:1/cmdflow",
        )],
    );
    assert_ne!(code, 0);
    assert_one_clear_line(
        &stderr,
        "PostgreSQL",
        "postgres://postgres:***@127.0.0.1:1/cmdflow",
    );
    assert!(
        !stderr.contains("hunter2"),
        "the password stays out of the message"
    );
}

#[test]
fn an_unreachable_broker_stops_the_gateway_with_one_line() {
    let (code, stderr) = run(
        &["gateway", "--http", "127.0.0.1:0"],
        &[
            ("CMDFLOW_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
            (
                "CMDFLOW_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
        ],
    );
    assert_ne!(code, 0);
    assert_one_clear_line(&stderr, "RabbitMQ", "amqp://guest:***@127.0.0.1:1/%2f");
}

#[test]
fn unreachable_redis_stops_the_worker_with_one_line() {
    let (code, stderr) = run(
        &["worker"],
        &[
            ("CMDFLOW_REDIS_URLS", "redis://127.0.0.1:1/"),
            (
                "CMDFLOW_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            ("CMDFLOW_NAMESPACE", "cli-test"),
        ],
    );
    assert_ne!(code, 0);
    assert_one_clear_line(&stderr, "Redis", "redis://127.0.0.1:1/");
}

#[test]
fn a_worker_with_no_kinds_refuses_to_start_and_says_why() {
    let (code, stderr) = run(&["worker"], &[("CMDFLOW_EXAMPLES", "false")]);
    assert_ne!(code, 0);
    assert_eq!(
        stderr.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("runs no kinds"), "{stderr}");
    assert!(stderr.contains("CMDFLOW_EXAMPLES=true"), "{stderr}");
}

#[test]
fn a_bad_setting_names_its_field() {
    let (code, stderr) = run(&["worker"], &[("CMDFLOW_RETRY_DELAYS", "1s,soon")]);
    assert_ne!(code, 0);
    assert!(stderr.contains("retry_delays"), "{stderr}");
}

#[test]
fn an_unknown_setting_is_a_warning_naming_the_closest_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_cmdflow"))
        .arg("worker")
        .env("CMDFLOW_EXAMPLES", "true")
        .env("CMDFLOW_CONCURENCY", "4")
        .env(
            "CMDFLOW_DATABASE_URL",
            "postgres://postgres@127.0.0.1:1/cmdflow",
        )
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run cmdflow");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "CMDFLOW_CONCURENCY is not a cmdflow setting and is ignored; did you mean CMDFLOW_CONCURRENCY?"
        ),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("is not a cmdflow setting").count(),
        1,
        "only the unknown one: {stderr}"
    );
}

#[test]
fn a_string_setting_may_look_like_a_number() {
    let (code, stderr) = run(
        &["worker"],
        &[
            ("CMDFLOW_NAMESPACE", "2024"),
            (
                "CMDFLOW_DATABASE_URL",
                "postgres://postgres@127.0.0.1:1/cmdflow",
            ),
        ],
    );
    assert_ne!(code, 0);
    // The namespace is taken; start-up gets as far as the (unreachable) database.
    assert_one_clear_line(
        &stderr,
        "PostgreSQL",
        "postgres://postgres@127.0.0.1:1/cmdflow",
    );
}

#[test]
fn a_bad_funnel_file_stops_start_up_with_its_precise_error() {
    let dir = std::env::temp_dir().join(format!("cmdflow-funnels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("broken.toml"),
        r#"
version = 1
name = "broken"
title = "Broken"
start_on = "lead.created"
initial = "lead"
final = ["done"]
[[stages]]
name = "lead"
transitions = [{ on = "visitor.arrived", to = "visiter" }]
[[stages]]
name = "done"
"#,
    )
    .unwrap();
    let (code, stderr) = run(
        &["worker"],
        &[("CMDFLOW_FUNNELS_DIR", dir.to_str().unwrap())],
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert_ne!(code, 0);
    assert!(
        stderr.contains(
            "broken.toml: flow broken: stages[0] (lead).transitions[0].to: unknown stage `visiter`"
        ),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{stderr}"
    );
}

#[test]
fn key_new_prints_the_key_once_and_an_entry_with_only_its_hash() {
    let out = Command::new(env!("CARGO_BIN_EXE_cmdflow"))
        .args(["key", "new", "--name", "shop", "--scope", "events:publish"])
        .args(["--event-type", "quote.*"])
        .output()
        .expect("run cmdflow");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("# cfk_").map(|k| format!("cfk_{k}")))
        .expect("the key");
    assert_eq!(text.matches(&key).count(), 1, "the key shows once: {text}");
    let entry: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        entry.contains(&format!(
            "sha256 = \"{}\"",
            cmdflow_gateway::auth::hash_key(&key)
        )),
        "{entry}"
    );
    assert!(entry.contains("event_types = [\"quote.*\"]"), "{entry}");

    let (code, stderr) = run(&["key", "new", "--name", "x", "--scope", "admin"], &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("unknown scope `admin`"), "{stderr}");
}

/// Runs cmdflow (with the examples) and returns its exit code, standard output and error.
fn run_out(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cmdflow"))
        .args(args)
        .env("CMDFLOW_EXAMPLES", "true")
        .env_remove("CMDFLOW_FLOWS_DIR")
        .env("RUST_LOG", "off")
        .output()
        .expect("run cmdflow");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const EXAMPLE_FLOWS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/flows");

#[test]
fn flows_check_names_every_bad_file_and_exits_with_2() {
    let dir = std::env::temp_dir().join(format!("cmdflow-flows-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = r#"
version = 1
kind = "ops.ticket"
title = "Ticket"
initial = "open"
final = ["closed"]
[[states]]
name = "open"
transitions = [{ on = "ticket.closed", to = "closed" }]
[[states]]
name = "closed"
"#;
    std::fs::write(dir.join("a_good.toml"), good).unwrap();
    std::fs::write(
        dir.join("b_bad.toml"),
        good.replace("ops.ticket", "ops.bad")
            .replace("to = \"closed\" }", "to = \"closd\" }"),
    )
    .unwrap();
    std::fs::write(
        dir.join("c_twin.toml"),
        good.replace("title = \"Ticket\"", "title = \"Twin\""),
    )
    .unwrap();
    let (code, stdout, stderr) = run_out(&["flows", "check", dir.to_str().unwrap()]);
    let (json_code, json_out, _) = run_out(&["flows", "check", "--json", dir.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();

    assert_eq!(code, 2, "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("ok "), "{stdout}");
    assert!(lines[0].contains("a_good.toml") && lines[0].contains("ops.ticket"));
    assert!(lines[0].contains("2 states"), "{stdout}");
    assert!(
        lines[1].contains(
            "b_bad.toml: flow ops.bad: states[0] (open).transitions[0].to: unknown stage `closd`"
        ),
        "{stdout}"
    );
    assert!(
        lines[2].contains("c_twin.toml: flow ops.ticket: kind:")
            && lines[2].contains("a_good.toml defines a flow of the same kind"),
        "{stdout}"
    );
    assert!(stderr.contains("2 of 3 flow files cannot run"), "{stderr}");

    assert_eq!(json_code, 2);
    let rows: serde_json::Value = serde_json::from_str(&json_out).expect("JSON rows");
    let oks: Vec<bool> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ok"].as_bool().unwrap())
        .collect();
    assert_eq!(oks, [true, false, false]);
    assert_eq!(
        rows[1]["error"]["field"],
        "states[0] (open).transitions[0].to"
    );
}

#[test]
fn flows_check_passes_the_shipped_flows_and_refuses_a_name_taken_in_code() {
    let (code, stdout, stderr) = run_out(&["flows", "check", EXAMPLE_FLOWS]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("shop.quote version ") && stdout.contains(", 6 states"),
        "{stdout}"
    );

    // `demo.counter` is a Rust kind of this binary: a flow may not take its name.
    let dir = std::env::temp_dir().join(format!("cmdflow-flows-taken-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("counter.toml"),
        "version = 1\nkind = \"demo.counter\"\ntitle = \"C\"\ninitial = \"a\"\nfinal = [\"a\"]\n[[states]]\nname = \"a\"\n",
    )
    .unwrap();
    let (code, stdout, _) = run_out(&["flows", "check", dir.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 2, "{stdout}");
    assert!(
        stdout.contains("flow demo.counter: kind: a kind of that name is registered already"),
        "{stdout}"
    );
}

#[test]
fn flows_show_prints_states_transitions_and_the_diagram() {
    let (code, text, stderr) = run_out(&["flows", "show", "shop.quote", "--from", EXAMPLE_FLOWS]);
    assert_eq!(code, 0, "{stderr}");
    assert!(text.starts_with("shop.quote — Quote\nversion "), "{text}");
    assert!(text.contains("[collecting] (initial)"), "{text}");
    assert!(
        text.contains("on children.settled [outcome = \"succeeded\"] → offered"),
        "{text}"
    );

    let (code, mermaid, _) = run_out(&[
        "flows",
        "show",
        "shop.quote",
        "--from",
        EXAMPLE_FLOWS,
        "--mermaid",
    ]);
    assert_eq!(code, 0);
    assert!(mermaid.starts_with("stateDiagram-v2"), "{mermaid}");
    assert!(mermaid.contains("collecting --> offered"), "{mermaid}");

    // The binary's own funnels need no --from.
    let (code, text, _) = run_out(&["flows", "show", "funnel.lead_to_visitor"]);
    assert_eq!(code, 0);
    assert!(text.contains("on visitor.arrived → visitor"), "{text}");

    let (code, _, stderr) = run_out(&["flows", "show", "shop.nothing"]);
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("no flow runs as shop.nothing; flows: ")
            && stderr.contains("funnel.lead_to_visitor"),
        "{stderr}"
    );
}

#[test]
fn a_flow_may_spawn_a_remote_kind_and_a_decider_may_not_take_a_kind_in_code() {
    let dir = std::env::temp_dir().join(format!("cmdflow-flows-remote-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    let deciders = |kind: &str| {
        format!(
            "[[decider]]\nkind = \"{kind}\"\nurl = \"http://127.0.0.1:9/decide\"\nsecret_env = \"CLI_TEST_DECIDER_SECRET\"\n"
        )
    };
    std::fs::write(dir.join("billing.toml"), deciders("billing.invoice")).unwrap();
    std::fs::write(dir.join("taken.toml"), deciders("demo.counter")).unwrap();
    std::fs::write(
        dir.join("flows/order.toml"),
        r#"
version = 1
kind = "shop.order"
title = "Order"
initial = "billing"
final = ["billed"]
[[states]]
name = "billing"
on_enter = [{ group = { name = "invoice", children = [{ kind = "billing.invoice" }] } }]
transitions = [{ on = "children.settled", to = "billed" }]
[[states]]
name = "billed"
"#,
    )
    .unwrap();
    let with = |deciders: &str, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cmdflow"))
            .args(args)
            .env("CMDFLOW_EXAMPLES", "true")
            .env("CMDFLOW_DECIDERS_FILE", dir.join(deciders))
            .env("CLI_TEST_DECIDER_SECRET", "a-secret-of-enough-bytes")
            .env("RUST_LOG", "off")
            .output()
            .expect("run cmdflow");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let flows = dir.join("flows");
    let (code, out) = with("billing.toml", &["flows", "check", flows.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    // A worker loads the deciders before the flows, so it starts as the check said.
    let (code, out) = with(
        "billing.toml",
        &[
            "flows",
            "show",
            "shop.order",
            "--from",
            flows.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = with("taken.toml", &["worker"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_ne!(code, 0);
    assert!(
        out.contains(
            "kind demo.counter: cannot be decided remotely: a handler in code defines it already"
        ),
        "{out}"
    );
}
