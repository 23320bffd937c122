//! Client subcommands: they talk to the gateway at `CMDFLOW_URL`, sending `CMDFLOW_TOKEN` as a
//! bearer token when set.

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use uuid::Uuid;

use super::exit::{GatewayError, UsageError};

pub struct Client {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
    /// Print the gateway's JSON rather than tables.
    pub json: bool,
}

impl Client {
    pub fn from_env(json: bool) -> anyhow::Result<Client> {
        let base =
            std::env::var("CMDFLOW_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".to_owned());
        let mut client = Self::new(&base, std::env::var("CMDFLOW_TOKEN").ok())?;
        client.json = json;
        Ok(client)
    }

    pub fn new(base: &str, token: Option<String>) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Client {
            base: base.trim_end_matches('/').to_owned(),
            http,
            token,
            json: false,
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let req = match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        };
        // Who runs ops commands, for the audit.
        let actor = std::env::var("USER").unwrap_or_else(|_| "cli".to_owned());
        let req = req.header("x-cmdflow-actor", format!("cli:{actor}"));
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the gateway at {}", self.base))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(refused(status, &body).into());
        }
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// `GET path` for an answer that is not JSON (a dead letter's body): the response, to be
    /// read a chunk at a time. An error status fails as [`Client::get`]'s do.
    pub async fn get_raw(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let req = self.http.get(format!("{}{path}", self.base));
        let req = match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        };
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the gateway at {}", self.base))?;
        let status = resp.status();
        if !status.is_success() {
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            return Err(refused(status, &body).into());
        }
        Ok(resp)
    }

    pub async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<Value> {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body),
        )
        .await
    }
}

/// The error for a refusal from the gateway, with its status and `{code, detail}`.
fn refused(status: reqwest::StatusCode, body: &Value) -> GatewayError {
    let text = |field: &str, default: &str| {
        body.get(field)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_owned()
    };
    GatewayError {
        status: status.as_u16(),
        code: text("code", "error"),
        detail: text("detail", status.canonical_reason().unwrap_or("")),
    }
}

/// Prints `value` as JSON when the client is in JSON mode; says whether it did.
fn printed_json(client: &Client, value: &Value) -> bool {
    if client.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    }
    client.json
}

fn parse_object(flag: &str, raw: &str) -> anyhow::Result<Value> {
    let value: Value =
        serde_json::from_str(raw).map_err(|e| UsageError(format!("{flag} is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(UsageError(format!("{flag} must be a JSON object")).into());
    }
    Ok(value)
}

pub struct EmitArgs {
    pub event_type: Option<String>,
    pub command: Option<String>,
    pub data: String,
    pub source: String,
    pub id: Option<String>,
    pub correlation: Option<String>,
    pub subject: Option<String>,
    pub file: Option<String>,
}

pub async fn emit(client: &Client, args: EmitArgs) -> anyhow::Result<()> {
    let body = match &args.file {
        Some(path) => {
            let mut buf = Vec::new();
            if path == "-" {
                std::io::stdin()
                    .read_to_end(&mut buf)
                    .context("cannot read standard input")?;
            } else {
                buf = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
            }
            buf
        }
        None => {
            let event = json!({
                "specversion": "1.0",
                "id": args.id.unwrap_or_else(|| Uuid::now_v7().to_string()),
                "source": args.source,
                "type": args.event_type,
                "time": chrono::Utc::now().to_rfc3339(),
                "commandid": args.command,
                "correlationid": args.correlation,
                "subject": args.subject,
                "datacontenttype": "application/json",
                "data": parse_object("--data", &args.data)?,
            });
            serde_json::to_vec(&event)?
        }
    };
    let accepted = client
        .post("/v1/events", "application/cloudevents+json", body)
        .await?;
    if printed_json(client, &accepted) {
        return Ok(());
    }
    for id in accepted["ids"].as_array().into_iter().flatten() {
        outln!("accepted {}", id.as_str().unwrap_or_default());
    }
    Ok(())
}

pub async fn start(
    client: &Client,
    kind: &str,
    owner: &str,
    data: &str,
    wait: bool,
) -> anyhow::Result<()> {
    let body = json!({ "kind": kind, "owner": owner, "data": parse_object("--data", data)? });
    let started = client
        .post(
            "/v1/commands",
            "application/json",
            serde_json::to_vec(&body)?,
        )
        .await?;
    let id = started["command_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if !wait && printed_json(client, &started) {
        return Ok(());
    }
    if !client.json {
        outln!("started {id}");
    }
    if wait {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match client.get(&format!("/v1/commands/{id}")).await {
                Ok(command) if command["state"] != "pending" => {
                    if !printed_json(client, &command) {
                        print_command(&command);
                    }
                    return Ok(());
                }
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(_) | Err(_) => bail!("command {id} did not start within 30s"),
            }
        }
    }
    Ok(())
}

/// `kinds`: the kind catalogue, one kind a line: name, version, how it is defined, what starts
/// it, and its start data's required fields.
pub async fn kinds(client: &Client) -> anyhow::Result<()> {
    let answer = client.get("/v1/kinds").await?;
    if printed_json(client, &answer) {
        return Ok(());
    }
    let kinds = answer["kinds"].as_array().cloned().unwrap_or_default();
    if kinds.is_empty() {
        outln!("no kinds: no worker has published its kinds yet");
    }
    for kind in kinds {
        let required: Vec<&str> = kind["schema"]["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let starts: Vec<&str> = kind["starts_on"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let mut line = format!(
            "{}  v{}  {}",
            kind["name"].as_str().unwrap_or_default(),
            kind["version"].as_str().unwrap_or_default(),
            kind["source"].as_str().unwrap_or_default(),
        );
        if !required.is_empty() {
            line.push_str(&format!("  requires {}", required.join(", ")));
        }
        if !starts.is_empty() {
            line.push_str(&format!("  started by {}", starts.join(", ")));
        }
        if let Some(text) = kind["description"].as_str() {
            line.push_str(&format!("  · {text}"));
        }
        outln!("{line}");
    }
    Ok(())
}

/// Which commands `commands` lists.
pub struct CommandsFilter {
    pub owner: Option<String>,
    pub kind: Option<String>,
    pub state: Option<String>,
    pub limit: u32,
}

/// `commands`: one page of `GET /v1/commands`, newest first, one command a line.
pub async fn commands(client: &Client, filter: &CommandsFilter) -> anyhow::Result<()> {
    let mut query = vec![format!("limit={}", filter.limit)];
    for (name, value) in [
        ("owner", &filter.owner),
        ("kind", &filter.kind),
        ("state", &filter.state),
    ] {
        if let Some(value) = value {
            query.push(format!("{name}={}", urlencode(value)));
        }
    }
    let page = client
        .get(&format!("/v1/commands?{}", query.join("&")))
        .await?;
    if printed_json(client, &page) {
        return Ok(());
    }
    let commands = page["commands"].as_array().cloned().unwrap_or_default();
    if commands.is_empty() {
        outln!("no commands");
        return Ok(());
    }
    outln!(
        "{:<36}  {:<24}  {:<24}  {:<9}  created",
        "id",
        "kind",
        "owner",
        "state"
    );
    for c in &commands {
        outln!(
            "{:<36}  {:<24}  {:<24}  {:<9}  {}",
            c["id"].as_str().unwrap_or_default(),
            c["kind"].as_str().unwrap_or_default(),
            c["owner"].as_str().unwrap_or_default(),
            c["state"].as_str().unwrap_or_default(),
            c["created_at"].as_str().unwrap_or_default()
        );
    }
    if page["next"].is_string() {
        outln!("(more: raise --limit, or narrow with --owner, --kind or --state)");
    }
    Ok(())
}

pub async fn show(client: &Client, id: &str) -> anyhow::Result<()> {
    let command = client
        .get(&format!("/v1/commands/{}", urlencode(id)))
        .await?;
    if !printed_json(client, &command) {
        print_command(&command);
    }
    Ok(())
}

pub async fn history(client: &Client, id: &str) -> anyhow::Result<()> {
    let mut after = 0;
    let mut all = Vec::new();
    if !client.json {
        outln!(
            "{:>6}  {:<32}  {:<13}  {:<20}  detail",
            "seq",
            "at",
            "entry",
            "event"
        );
    }
    loop {
        let page = client
            .get(&format!(
                "/v1/commands/{}/history?after={after}&limit=1000",
                urlencode(id)
            ))
            .await?;
        for e in page["entries"].as_array().into_iter().flatten() {
            if client.json {
                all.push(e.clone());
                continue;
            }
            let what = match e["entry"].as_str() {
                Some("state_changed") => format!(
                    "{} → {}",
                    e["from_state"].as_str().unwrap_or("?"),
                    e["to_state"].as_str().unwrap_or("?")
                ),
                _ => e["event_type"].as_str().unwrap_or("").to_owned(),
            };
            outln!(
                "{:>6}  {:<32}  {:<13}  {:<20}  {}",
                e["seq"].to_string(),
                e["at"].as_str().unwrap_or(""),
                e["entry"].as_str().unwrap_or(""),
                what,
                if e["detail"].is_null() {
                    String::new()
                } else {
                    e["detail"].to_string()
                }
            );
        }
        match page["next_after"].as_i64() {
            Some(next) => after = next,
            None => {
                printed_json(client, &json!({ "command_id": id, "entries": all }));
                return Ok(());
            }
        }
    }
}

pub async fn feed(
    client: &Client,
    owner: &str,
    kind: Option<&str>,
    limit: u32,
) -> anyhow::Result<()> {
    let mut path = format!("/v1/owners/{}/feed?limit={limit}", urlencode(owner));
    if let Some(kind) = kind {
        path.push_str(&format!("&kind={}", urlencode(kind)));
    }
    let feed = client.get(&path).await?;
    if printed_json(client, &feed) {
        return Ok(());
    }
    outln!(
        "person   {}",
        feed["identities"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    );
    outln!("pending");
    for p in feed["pending"].as_array().into_iter().flatten() {
        outln!(
            "  {:<22} {}  ({})",
            p["code"].as_str().unwrap_or(""),
            p["text"].as_str().unwrap_or(""),
            p["command_id"].as_str().unwrap_or("")
        );
    }
    outln!("history");
    for c in feed["history"].as_array().into_iter().flatten() {
        outln!(
            "  {}  {:<14} {:<10} {}",
            c["created_at"].as_str().unwrap_or(""),
            c["kind"].as_str().unwrap_or(""),
            c["state"].as_str().unwrap_or(""),
            c["command_id"].as_str().unwrap_or("")
        );
    }
    outln!("messages");
    for m in feed["messages"].as_array().into_iter().flatten() {
        // A failed message never reached the person: not unread.
        let read = if m["delivery"] == "failed" {
            "failed"
        } else if m["read"] == true {
            "read  "
        } else {
            "unread"
        };
        outln!(
            "  {read} {:<6} {}",
            m["channel"].as_str().unwrap_or(""),
            m["subject"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

pub async fn tree(client: &Client, id: &str) -> anyhow::Result<()> {
    let tree = client
        .get(&format!("/v1/commands/{}/tree", urlencode(id)))
        .await?;
    if printed_json(client, &tree) {
        return Ok(());
    }
    fn walk(node: &Value, depth: usize) {
        let outcome = match node["state"].as_str() {
            Some("completed") if !node["result"].is_null() => format!(" → {}", node["result"]),
            Some("failed" | "aborted") => format!(" ({})", node["reason"].as_str().unwrap_or("")),
            _ => String::new(),
        };
        outln!(
            "{}{} {} [{}]{}",
            "  ".repeat(depth),
            node["id"].as_str().unwrap_or(""),
            node["kind"].as_str().unwrap_or(""),
            node["state"].as_str().unwrap_or(""),
            outcome
        );
        for child in node["children"].as_array().into_iter().flatten() {
            walk(child, depth + 1);
        }
    }
    walk(&tree["root"], 0);
    if tree["truncated"] == true {
        outln!("… cut at {} nodes", tree["nodes"]);
    }
    Ok(())
}

pub async fn abort(client: &Client, id: &str, reason: Option<String>) -> anyhow::Result<()> {
    let body = serde_json::to_vec(&json!({ "reason": reason }))?;
    let accepted = client
        .post(
            &format!("/v1/commands/{}/abort", urlencode(id)),
            "application/json",
            body,
        )
        .await?;
    if printed_json(client, &accepted) {
        return Ok(());
    }
    outln!(
        "abort accepted for {} (event {})",
        id,
        accepted["event_id"].as_str().unwrap_or("")
    );
    Ok(())
}

fn print_command(c: &Value) {
    let field = |k: &str| match &c[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    outln!("command  {}", field("id"));
    outln!("kind     {}", field("kind"));
    outln!("owner    {}", field("owner"));
    outln!("state    {} (version {})", field("state"), field("version"));
    if !c["parent_id"].is_null() {
        outln!("parent   {} (group {})", field("parent_id"), field("group"));
    }
    if let Some(children) = c["children"].as_object()
        && children["total"].as_i64().unwrap_or(0) > 0
    {
        outln!(
            "children {} open of {}",
            children["open"],
            children["total"]
        );
        for g in children["groups"].as_array().into_iter().flatten() {
            outln!(
                "  group {} ({}): {} · {} completed, {} failed, {} aborted of {}",
                g["name"].as_str().unwrap_or(""),
                g["policy"].as_str().unwrap_or(""),
                g["state"].as_str().unwrap_or(""),
                g["completed"],
                g["failed"],
                g["aborted"],
                g["total"]
            );
        }
    }
    for t in c["timers"].as_array().into_iter().flatten() {
        let text = |k: &str| t[k].as_str().unwrap_or("").to_owned();
        let mut line = format!(
            "timer    {} ({}) due {}",
            text("name"),
            text("kind"),
            text("due_at")
        );
        if let Some(cron) = t["cron"].as_str() {
            line.push_str(&format!(", cron {cron} {}", text("tz")));
        }
        if t["fired"].as_i64().unwrap_or(0) > 0 {
            line.push_str(&format!(", fired {}", t["fired"]));
        }
        outln!("{line}");
    }
    for w in c["waits"].as_array().into_iter().flatten() {
        let mut line = format!(
            "wait     {} on {}",
            w["event_type"].as_str().unwrap_or(""),
            w["correlation_key"].as_str().unwrap_or("")
        );
        if let Some(at) = w["timeout_at"].as_str() {
            line.push_str(&format!(", times out {at}"));
        }
        outln!("{line}");
    }
    outln!("data     {}", field("data"));
    if !c["result"].is_null() {
        outln!("result   {}", field("result"));
    }
    if !c["reason"].is_null() {
        outln!("reason   {}", field("reason"));
    }
    outln!("created  {}", field("created_at"));
    outln!("updated  {}", field("updated_at"));
    if !c["ended_at"].is_null() {
        outln!("ended    {}", field("ended_at"));
    }
}

/// Keeps an id from changing the path it is put in.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
