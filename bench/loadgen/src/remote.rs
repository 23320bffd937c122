//! The counter in the two shapes that need no Rust in the worker, for `w1flow` and `w1remote`:
//! a flow file, and a remote decider served by this process over HTTP (checking each request's
//! Standard Webhooks signature, as a decider in production does), with the files that declare
//! them to the workers.

use std::path::{Path, PathBuf};

use anyhow::Context;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use cmdflow_shared::remote::{ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign};
use serde_json::{Value, json};

/// The flow counter's kind.
pub const FLOW_KIND: &str = "bench.flow_counter";
/// The remote counter's kind.
pub const REMOTE_KIND: &str = "bench.remote_counter";
/// The variable that carries the decider's secret to the workers.
pub const SECRET_ENV: &str = "LOADGEN_DECIDER_SECRET";

/// `demo.counter` as a flow: `demo.increment` adds `by` (1 without it), `demo.finish` ends it.
const FLOW: &str = r#"
version = 1
kind = "bench.flow_counter"
title = "Counter"
initial = "counting"
final = ["done"]

[[states]]
name = "counting"
transitions = [
  { on = "demo.increment", guard = { path = "$.event.by", exists = true }, inc = { count = "$.event.by" } },
  { on = "demo.increment", inc = { count = 1 } },
  { on = "demo.finish", to = "done" },
]

[[states]]
name = "done"
"#;

/// Where the run's flow and deciders files are, for the workers' environment.
pub struct Files {
    pub flows_dir: PathBuf,
    pub deciders_file: PathBuf,
    pub secret: String,
}

/// Writes the flow and deciders files under `dir` and serves the remote counter on a free
/// port of this host, for as long as the process runs.
pub async fn prepare(dir: &Path) -> anyhow::Result<Files> {
    let flows_dir = dir.join("flows");
    std::fs::create_dir_all(&flows_dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::write(flows_dir.join("counter.toml"), FLOW)?;

    let secret = uuid::Uuid::new_v4().simple().to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let key = secret.clone().into_bytes();
    let app = axum::Router::new().route(
        "/decide",
        post(move |headers: HeaderMap, body: Bytes| {
            let key = key.clone();
            async move { decide(&key, &headers, &body) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let deciders_file = dir.join("deciders.toml");
    std::fs::write(
        &deciders_file,
        format!(
            "[[decider]]\nkind = \"{REMOTE_KIND}\"\nurl = \"http://127.0.0.1:{port}/decide\"\n\
             secret_env = \"{SECRET_ENV}\"\ntimeout = \"5s\"\n"
        ),
    )?;
    Ok(Files {
        flows_dir,
        deciders_file,
        secret,
    })
}

/// Answers one request: checks its signature, then decides as `demo.counter` does.
fn decide(secret: &[u8], headers: &HeaderMap, body: &[u8]) -> (StatusCode, String) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(timestamp), Some(signature)) = (
        header(ID_HEADER),
        header(TIMESTAMP_HEADER).and_then(|t| t.parse::<i64>().ok()),
        header(SIGNATURE_HEADER),
    ) else {
        return (StatusCode::UNAUTHORIZED, "unsigned request".into());
    };
    let expected = sign(secret, id, timestamp, body);
    if !signature.split(' ').any(|s| s == expected) {
        return (StatusCode::UNAUTHORIZED, "bad signature".into());
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return (StatusCode::BAD_REQUEST, "not JSON".into());
    };
    let count = request["command"]["data"]["count"].as_i64().unwrap_or(0);
    let event = &request["event"];
    let decision = match event["type"].as_str() {
        Some("command.start") => json!({ "state": "running", "patch": { "count": 0 } }),
        Some("demo.increment") => {
            let by = event["data"]["by"].as_i64().unwrap_or(1);
            json!({ "patch": { "count": count + by } })
        }
        Some("demo.finish") => json!({ "complete": { "count": count } }),
        _ => json!({}),
    };
    (StatusCode::OK, decision.to_string())
}
