//! `cmdflow dlq …`: dead letters for people (tables) and scripts (`--json`).

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};

use super::client::Client;
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

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn progress(job: &Value) -> String {
    let total = job["total"].as_i64().unwrap_or(0).max(1);
    let done = job["replayed"].as_i64().unwrap_or(0);
    let width = 30;
    let filled = (done * width / total).clamp(0, width) as usize;
    format!(
        "[{}{}] {done}/{} {}",
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
            outln!("errors");
            for e in d["error_chain"].as_array().into_iter().flatten() {
                outln!("  - {}", s(e));
            }
            outln!("event\n{}", serde_json::to_string_pretty(&d["body"])?);
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
                            outln!(
                                "{} dead letters would be replayed (dry run: nothing changed)",
                                answer["count"]
                            );
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
            loop {
                let now = client
                    .get(&format!("/v1/dead-letters/replays/{id}"))
                    .await?;
                if !json {
                    eprint!("\r{}", progress(&now));
                }
                match now["state"].as_str() {
                    Some("finished") => {
                        if json {
                            outln!("{}", serde_json::to_string_pretty(&now)?);
                        } else {
                            eprintln!();
                        }
                        return Ok(());
                    }
                    Some("interrupted") => {
                        if !json {
                            eprintln!();
                        }
                        bail!(
                            "replay {id} was interrupted after {} of {}; resume it with --resume {id}",
                            now["replayed"],
                            now["total"]
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
