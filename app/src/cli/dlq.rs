//! `cmdflow dlq …`: dead letters for people (tables) and scripts (`--json`).
//!
//! `dlq show` prints a letter's fields, then its body fetched from `/body`: pretty JSON when it
//! is JSON and at most [`PRETTY_MAX`] bytes, else the bytes as they are, written as they
//! arrive (a body can be megabytes).

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};

use super::client::Client;
use super::progress::Progress;
use super::{DlqCmd, DlqFilter};

fn query(filter: &DlqFilter) -> String {
    let mut parts = Vec::new();
    let mut add = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            parts.push(format!("{k}={}", super::client::urlencode(v)));
        }
    };
    add("type", &filter.event_type);
    add("kind", &filter.kind);
    add("owner", &filter.owner);
    add("funnel", &filter.funnel);
    add("signature", &filter.signature);
    add("since", &filter.since);
    add("until", &filter.until);
    parts.join("&")
}

fn body(filter: &DlqFilter) -> serde_json::Map<String, Value> {
    let mut b = serde_json::Map::new();
    for (k, v) in [
        ("type", &filter.event_type),
        ("kind", &filter.kind),
        ("owner", &filter.owner),
        ("funnel", &filter.funnel),
        ("signature", &filter.signature),
        ("since", &filter.since),
        ("until", &filter.until),
    ] {
        if let Some(v) = v {
            b.insert(k.into(), json!(v));
        }
    }
    if !filter.ids.is_empty() {
        b.insert("ids".into(), json!(filter.ids));
    }
    b
}

/// The largest body `dlq show` reads whole to print as pretty JSON; a larger one is streamed
/// to standard output as it is.
const PRETTY_MAX: u64 = 4 * 1024 * 1024;

/// Writes bytes to standard output, ending quietly when the reader has gone (as [`outln!`]).
fn write_raw(bytes: &[u8]) {
    use std::io::Write as _;
    if let Err(e) = std::io::stdout().lock().write_all(bytes) {
        super::output_failed(e);
    }
}

/// Prints the stored body of dead letter `id`.
async fn print_body(client: &Client, id: i64) -> anyhow::Result<()> {
    let mut resp = client
        .get_raw(&format!("/v1/dead-letters/{id}/body"))
        .await?;
    if resp.content_length().is_some_and(|n| n <= PRETTY_MAX) {
        let bytes = resp.bytes().await?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(event) => outln!("{}", serde_json::to_string_pretty(&event)?),
            Err(_) => {
                write_raw(&bytes);
                if !bytes.ends_with(b"\n") {
                    outln!();
                }
            }
        }
        return Ok(());
    }
    let mut last = b'\n';
    while let Some(chunk) = resp.chunk().await? {
        write_raw(&chunk);
        last = chunk.last().copied().unwrap_or(last);
    }
    if last != b'\n' {
        outln!();
    }
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn progress(job: &Value) -> String {
    let total = job["total"].as_i64().unwrap_or(0).max(1);
    let replayed = job["replayed"].as_i64().unwrap_or(0);
    let skipped = job["skipped"].as_i64().unwrap_or(0);
    let done = replayed + skipped;
    let width = 30;
    let filled = (done * width / total).clamp(0, width) as usize;
    let skipped = if skipped > 0 {
        format!(" ({skipped} skipped: kept truncated)")
    } else {
        String::new()
    };
    format!(
        "[{}{}] {replayed}/{}{skipped} {}",
        "#".repeat(filled),
        " ".repeat(width as usize - filled),
        job["total"],
        s(&job["state"])
    )
}

pub async fn run(client: &Client, cmd: DlqCmd) -> anyhow::Result<()> {
    let json = client.json;
    match cmd {
        DlqCmd::List { filter, limit } => {
            let page = client
                .get(&format!(
                    "/v1/dead-letters?{}&limit={limit}",
                    query(&filter)
                ))
                .await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&page)?);
                return Ok(());
            }
            outln!(
                "{:>8}  {:<25}  {:<22}  {:<18}  {:>3}  reason",
                "id",
                "last failed",
                "type",
                "owner",
                "try"
            );
            for d in page["dead_letters"].as_array().into_iter().flatten() {
                outln!(
                    "{:>8}  {:<25}  {:<22}  {:<18}  {:>3}  {}",
                    s(&d["id"]),
                    s(&d["last_failed_at"]),
                    s(&d["event_type"]),
                    s(&d["owner"]),
                    s(&d["attempts"]),
                    s(&d["reason"])
                );
            }
        }
        DlqCmd::Groups { filter } => {
            let groups = client
                .get(&format!("/v1/dead-letters/groups?{}", query(&filter)))
                .await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&groups)?);
                return Ok(());
            }
            outln!(
                "{:>7}  {:<40}  {:<25}  latest reason",
                "count",
                "signature",
                "last failed"
            );
            for g in groups["groups"].as_array().into_iter().flatten() {
                outln!(
                    "{:>7}  {:<40}  {:<25}  {}",
                    s(&g["count"]),
                    s(&g["signature"]),
                    s(&g["last_failed_at"]),
                    s(&g["reason"])
                );
            }
        }
        DlqCmd::Show { id } => {
            let d = client.get(&format!("/v1/dead-letters/{id}")).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&d)?);
                return Ok(());
            }
            for k in [
                "id",
                "state",
                "signature",
                "reason",
                "attempts",
                "first_failed_at",
                "last_failed_at",
                "event_type",
                "event_id",
                "command_id",
                "kind",
                "owner",
            ] {
                outln!("{k:<16} {}", s(&d[k]));
            }
            let truncated = d["body_truncated"] == true;
            outln!(
                "{:<16} {} bytes{}",
                "body_size",
                s(&d["body_size"]),
                if truncated {
                    " (truncated: only the first bytes were kept; it cannot be replayed)"
                } else {
                    ""
                }
            );
            outln!("{:<16} {}", "body_sha256", s(&d["body_sha256"]));
            outln!("errors");
            for e in d["error_chain"].as_array().into_iter().flatten() {
                outln!("  - {}", s(e));
            }
            outln!("event{}", if truncated { " (as kept)" } else { "" });
            print_body(client, id).await?;
        }
        DlqCmd::Replay {
            filter,
            dry_run,
            rate,
            resume,
            detach,
        } => {
            let job = match resume {
                Some(job) => {
                    client
                        .post(
                            &format!(
                                "/v1/dead-letters/replays/{}/resume",
                                super::client::urlencode(&job)
                            ),
                            "application/json",
                            Vec::new(),
                        )
                        .await?
                }
                None => {
                    let mut b = body(&filter);
                    b.insert("dry_run".into(), json!(dry_run));
                    if let Some(rate) = rate {
                        b.insert("rate".into(), json!(rate));
                    }
                    let answer = client
                        .post(
                            "/v1/dead-letters/replay",
                            "application/json",
                            serde_json::to_vec(&b)?,
                        )
                        .await?;
                    if dry_run {
                        if json {
                            outln!("{}", serde_json::to_string_pretty(&answer)?);
                        } else {
                            let skipped = answer["skipped"].as_i64().unwrap_or(0);
                            let count = answer["count"].as_i64().unwrap_or(0);
                            if skipped > 0 {
                                outln!(
                                    "{} dead letters would be replayed, {skipped} kept truncated would be skipped (dry run: nothing changed)",
                                    count - skipped
                                );
                            } else {
                                outln!(
                                    "{count} dead letters would be replayed (dry run: nothing changed)"
                                );
                            }
                        }
                        return Ok(());
                    }
                    answer["job"].clone()
                }
            };
            let id = s(&job["id"]);
            if detach {
                if json {
                    outln!("{}", serde_json::to_string_pretty(&job)?);
                } else {
                    outln!("replay {id} started: {} dead letters", job["total"]);
                }
                return Ok(());
            }
            if !json {
                outln!("replay {id}");
            }
            let mut shown = Progress::new();
            loop {
                let now = client
                    .get(&format!("/v1/dead-letters/replays/{id}"))
                    .await?;
                if !json {
                    shown.update(progress(&now));
                }
                match now["state"].as_str() {
                    Some("finished") => {
                        if json {
                            outln!("{}", serde_json::to_string_pretty(&now)?);
                        } else {
                            shown.finish();
                        }
                        return Ok(());
                    }
                    Some("interrupted") => {
                        if !json {
                            shown.finish();
                        }
                        bail!(
                            "replay {id} was interrupted after {} of {}; resume it with --resume {id}",
                            now["replayed"],
                            now["total"]
                        );
                    }
                    Some("failed") => {
                        if !json {
                            shown.finish();
                        }
                        bail!(
                            "replay {id} failed after {} of {}: {}",
                            now["replayed"],
                            now["total"],
                            s(&now["error"])
                        );
                    }
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
        DlqCmd::Discard {
            filter,
            reason,
            dry_run,
        } => {
            let mut b = body(&filter);
            b.insert("reason".into(), json!(reason));
            b.insert("dry_run".into(), json!(dry_run));
            let answer = client
                .post(
                    "/v1/dead-letters/discard",
                    "application/json",
                    serde_json::to_vec(&b)?,
                )
                .await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&answer)?);
            } else if dry_run {
                outln!(
                    "{} dead letters would be discarded (dry run: nothing changed)",
                    answer["count"]
                );
            } else {
                outln!("discarded {} dead letters", answer["count"]);
            }
        }
    }
    Ok(())
}
