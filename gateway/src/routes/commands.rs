//! Commands: start one, read one, read its history.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use cmdflow_shared::contract::types::{COMMAND_ABORT, COMMAND_START};
use cmdflow_shared::domain::{Kind, Owner};
use cmdflow_shared::store::{self, HistoryRow};
use cmdflow_shared::{Command, CommandId, CommandState, Event};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::app::AppState;
use crate::auth::Principal;
use crate::catalogue::Lookup;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::routes::events::{Speaker, publish_all};
use crate::routes::json_body;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct StartCommand {
    /// The new command's id (a UUID), when the caller chooses it: sending the same start again
    /// (after a timeout or a 503) then starts one command, not two. Without it, cmdflow picks one.
    #[schema(value_type = Option<String>)]
    pub id: Option<String>,
    /// A registered command kind, e.g. `demo.counter`.
    pub kind: String,
    /// `kind:id`, e.g. `member:42`.
    pub owner: String,
    /// The command's initial data (a JSON object).
    #[schema(value_type = Object)]
    pub data: Option<Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Started {
    pub command_id: CommandId,
    /// The id of the `command.start` event that creates it.
    pub event_id: String,
}

/// Starts a command: publishes its `command.start` event and answers once the broker confirms.
#[utoipa::path(post, path = "/v1/commands", tag = "commands",
    request_body(content = StartCommand, content_type = "application/json"),
    responses(
        (status = 202, description = "The start event was confirmed by the broker", body = Started),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 413, description = "Too large", body = ErrorBody),
        (status = 415, description = "Wrong content type", body = ErrorBody),
        (status = 422, description = "Invalid field or unknown kind", body = ErrorBody),
        (status = 503, description = "The broker did not confirm; resend", body = ErrorBody)))]
pub async fn start_command(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, HeaderMap, Json<Started>)> {
    let body = json_body(&headers, body, &["application/json"])?;
    let mut event = start_event(&state, &body).await?;
    let kind = event.data.get("kind").and_then(Value::as_str).unwrap_or("");
    principal.may_publish(kind)?;
    let command_id = event.commandid.unwrap_or_default();
    let events = std::slice::from_mut(&mut event);
    publish_all(&state, &headers, events, Speaker::Engine).await?;
    Ok((
        StatusCode::ACCEPTED,
        crate::http_trace::accepted_trace(events),
        Json(Started {
            command_id,
            event_id: event.id,
        }),
    ))
}

/// Validates a start request against the kind catalogue and builds its event.
async fn start_event(state: &AppState, body: &[u8]) -> ApiResult<Event> {
    let value = cmdflow_shared::contract::parse_json(body)
        .map_err(|e| ApiError::MalformedJson(format!("malformed JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(ApiError::invalid(
            "body",
            "must be a JSON object {kind, owner, data}",
        ));
    };
    let kind = match obj.remove("kind") {
        Some(Value::String(s)) => {
            Kind::parse(&s).map_err(|e| ApiError::invalid("kind", e.to_string()))?
        }
        Some(_) => return Err(ApiError::invalid("kind", "must be a string")),
        None => return Err(ApiError::invalid("kind", "is required")),
    };
    let known = match state.catalogue.lookup(kind.as_str()).await? {
        Lookup::Known(known) => known,
        Lookup::Unknown(names) => {
            let known = if names.is_empty() {
                "none: no worker has published its kinds yet".to_owned()
            } else {
                names.join(", ")
            };
            return Err(ApiError::UnknownKind(format!(
                "unknown command kind `{kind}`; known kinds: {known}"
            )));
        }
    };
    let owner = match obj.remove("owner") {
        Some(Value::String(s)) => {
            Owner::parse(&s).map_err(|e| ApiError::invalid("owner", e.to_string()))?
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "owner",
                "must be a string such as member:42",
            ));
        }
        None => return Err(ApiError::invalid("owner", "is required")),
    };
    let data = match obj.remove("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(ApiError::invalid("data", "must be a JSON object")),
    };
    match &known.check {
        Ok(check) => check
            .check(&data)
            .map_err(|v| ApiError::invalid(&v.field, v.reason))?,
        Err(reason) => {
            return Err(ApiError::UnknownKind(format!(
                "kind `{kind}` has a start-data schema that does not compile ({reason}); fix the kind's registration"
            )));
        }
    }
    // The owner's address, as the kind's e-mails will use it.
    cmdflow_shared::domain::check_email_in(&data, "data")
        .map_err(|(field, reason)| ApiError::invalid(&field, reason))?;
    // The start data is stored as jsonb, which cannot hold U+0000.
    if let Some(at) = cmdflow_shared::contract::nul_in_map(&data, "data") {
        return Err(ApiError::invalid(&at, cmdflow_shared::contract::NUL_REASON));
    }
    let chosen = match obj.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.parse::<CommandId>().map_err(|e| {
            ApiError::invalid("id", format!("must be a UUID, the new command's id: {e}"))
        })?),
        Some(_) => return Err(ApiError::invalid("id", "must be a string (a UUID)")),
    };
    if let Some(extra) = obj.keys().next() {
        return Err(ApiError::invalid(
            extra,
            "is not a field of a command start (id, kind, owner, data)",
        ));
    }
    let id = chosen.unwrap_or_default();
    let mut start = Map::new();
    start.insert("kind".into(), json!(kind));
    start.insert("owner".into(), json!(owner.to_string()));
    start.insert("data".into(), Value::Object(data));
    let mut event = Event::new("cmdflow/gateway", COMMAND_START, start);
    if chosen.is_some() {
        // The same start sent again is the same event: applied once.
        event.id = format!("start-{id}");
    }
    event.commandid = Some(id);
    event.subject = Some(owner.to_string());
    event.correlationid = Some(id.to_string());
    let size = event.to_bytes().len();
    if size > cmdflow_shared::contract::MAX_EVENT_BYTES {
        return Err(ApiError::TooLarge(format!(
            "the command's start event would be {size} bytes; at most 262144 bytes are accepted"
        )));
    }
    Ok(event)
}

pub fn parse_id(raw: &str) -> ApiResult<CommandId> {
    raw.parse::<CommandId>()
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CommandView {
    pub id: CommandId,
    /// Its children: how many, how many still open, and its fan-in groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub children: Option<ChildrenView>,
    /// Its timers (one-shot and recurring), which end with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timers: Option<Vec<store::time::TimerRow>>,
    /// The events it waits for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waits: Option<Vec<store::time::WaitRow>>,
    pub kind: String,
    /// The version of its kind's definition it started on and runs on (`null`: started before
    /// versions were kept).
    pub kind_version: Option<String>,
    pub owner: String,
    pub state: CommandState,
    #[schema(value_type = Object)]
    pub data: Value,
    pub version: i64,
    pub parent_id: Option<CommandId>,
    pub root_id: CommandId,
    /// The fan-in group it reports to, if its parent waits for it.
    pub group: Option<String>,
    /// What happens to it when its parent ends first.
    pub parent_close: cmdflow_shared::decision::ParentClose,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub reason: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub ui: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChildrenView {
    pub total: i64,
    /// Children not yet completed, failed or aborted.
    pub open: i64,
    pub groups: Vec<store::GroupRow>,
}

impl From<Command> for CommandView {
    fn from(c: Command) -> Self {
        Self {
            id: c.id,
            children: None,
            timers: None,
            waits: None,
            kind: c.kind,
            kind_version: c.kind_version,
            owner: c.owner,
            state: c.state,
            data: c.data,
            version: c.version,
            parent_id: c.parent_id,
            root_id: c.root_id,
            group: c.group_name,
            parent_close: c.parent_close,
            result: c.result,
            reason: c.reason,
            ui: c.ui,
            created_at: c.created_at,
            updated_at: c.updated_at,
            ended_at: c.ended_at,
        }
    }
}

/// A command: state, data, version, owner, timestamps.
#[utoipa::path(get, path = "/v1/commands/{id}", tag = "commands",
    params(("id" = String, Path, description = "Command id (UUID)")),
    responses(
        (status = 200, description = "The command", body = CommandView),
        (status = 400, description = "Not a command id", body = ErrorBody),
        (status = 404, description = "No such command", body = ErrorBody)))]
pub async fn get_command(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(raw): Path<String>,
) -> ApiResult<Json<CommandView>> {
    let id = parse_id(&raw)?;
    let command = store::get_command(&state.pool, id).await?;
    principal.may_read_command(command.as_ref().map(|c| c.owner.as_str()))?;
    let command = command.ok_or_else(|| ApiError::NotFound(format!("no command {id}")))?;
    let (total, open) = store::children_counts(&state.pool, id).await?;
    let groups = store::groups_of(&state.pool, id).await?;
    let timers = store::time::timers_of(&state.pool, id).await?;
    let waits = store::time::waits_of(&state.pool, id).await?;
    let mut view = CommandView::from(command);
    view.timers = Some(timers);
    view.waits = Some(waits);
    view.children = Some(ChildrenView {
        total,
        open,
        groups,
    });
    Ok(Json(view))
}

/// The largest tree `GET /v1/commands/{id}/tree` returns.
const MAX_TREE_NODES: i64 = 10_000;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TreeNode {
    pub id: CommandId,
    pub kind: String,
    pub owner: String,
    pub state: CommandState,
    pub group: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub reason: Option<String>,
    pub ended_at: Option<DateTime<Utc>>,
    #[schema(no_recursion)]
    pub children: Vec<TreeNode>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Tree {
    pub root: TreeNode,
    /// Nodes returned; the tree is cut at 10,000.
    pub nodes: usize,
    pub truncated: bool,
}

/// A command and all its descendants, with states and outcomes, live or archived (a tree moves
/// to the archive whole).
#[utoipa::path(get, path = "/v1/commands/{id}/tree", tag = "commands",
    params(("id" = String, Path, description = "Command id (UUID)")),
    responses(
        (status = 200, description = "The command and its descendants", body = Tree),
        (status = 400, description = "Not a command id", body = ErrorBody),
        (status = 403, description = "Not this caller's owner, and no `commands:read`", body = ErrorBody),
        (status = 404, description = "No such command", body = ErrorBody)))]
pub async fn get_tree(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(raw): Path<String>,
) -> ApiResult<Json<Tree>> {
    let id = parse_id(&raw)?;
    let rows = store::subtree(&state.pool, id, MAX_TREE_NODES + 1).await?;
    // The rule of `GET /v1/commands/{id}`: the owner of the command asked for.
    principal.may_read_command(rows.first().map(|c| c.owner.as_str()))?;
    if rows.is_empty() {
        return Err(ApiError::NotFound(format!("no command {id}")));
    }
    let truncated = rows.len() as i64 > MAX_TREE_NODES;
    let rows: Vec<Command> = rows.into_iter().take(MAX_TREE_NODES as usize).collect();
    let nodes = rows.len();
    let mut by_parent: std::collections::HashMap<CommandId, Vec<Command>> =
        std::collections::HashMap::new();
    let mut root = None;
    for row in rows {
        match row.parent_id {
            Some(parent) if row.id != id => by_parent.entry(parent).or_default().push(row),
            _ => root = Some(row),
        }
    }
    fn build(
        c: Command,
        by_parent: &mut std::collections::HashMap<CommandId, Vec<Command>>,
    ) -> TreeNode {
        let kids = by_parent.remove(&c.id).unwrap_or_default();
        TreeNode {
            id: c.id,
            kind: c.kind,
            owner: c.owner,
            state: c.state,
            group: c.group_name,
            result: c.result,
            reason: c.reason,
            ended_at: c.ended_at,
            children: kids.into_iter().map(|k| build(k, by_parent)).collect(),
        }
    }
    let root = root.ok_or_else(|| ApiError::NotFound(format!("no command {id}")))?;
    Ok(Json(Tree {
        root: build(root, &mut by_parent),
        nodes,
        truncated,
    }))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct AbortRequest {
    /// Why; recorded in the history of every aborted command.
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AbortAccepted {
    pub command_id: CommandId,
    /// The id of the `command.abort` event.
    pub event_id: String,
}

/// Aborts a command and, through it, every open descendant. A command that has already ended
/// ignores the abort, and its history says so.
#[utoipa::path(post, path = "/v1/commands/{id}/abort", tag = "commands",
    params(("id" = String, Path, description = "Command id (UUID)")),
    request_body(content = Option<AbortRequest>, content_type = "application/json"),
    responses(
        (status = 202, description = "The abort event was confirmed by the broker", body = AbortAccepted),
        (status = 400, description = "Not a command id, or malformed JSON", body = ErrorBody),
        (status = 404, description = "No such command", body = ErrorBody),
        (status = 422, description = "Invalid field", body = ErrorBody),
        (status = 503, description = "The broker did not confirm; resend", body = ErrorBody)))]
pub async fn abort_command(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, HeaderMap, Json<AbortAccepted>)> {
    let id = parse_id(&raw)?;
    let body = body
        .map_err(|e| ApiError::BadRequest(format!("could not read the body: {}", e.body_text())))?;
    let request = if body.is_empty() {
        AbortRequest::default()
    } else {
        let body = json_body(&headers, Ok(body), &["application/json"])?;
        serde_json::from_slice::<AbortRequest>(&body).map_err(|e| {
            ApiError::invalid("body", format!("expected {{\"reason\": string}}: {e}"))
        })?
    };
    if let Some(reason) = &request.reason {
        if reason.chars().count() > 1000 {
            return Err(ApiError::invalid(
                "reason",
                "must be at most 1000 characters",
            ));
        }
        ApiError::check_text("reason", reason)?;
    }
    let command = store::get_command(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no command {id}")))?;
    let mut data = Map::new();
    data.insert(
        "reason".into(),
        json!(
            request
                .reason
                .unwrap_or_else(|| "aborted through the API".to_owned())
        ),
    );
    let mut event = Event::new("cmdflow/gateway", COMMAND_ABORT, data);
    event.commandid = Some(id);
    event.subject = Some(command.owner);
    event.correlationid = Some(command.root_id.to_string());
    let events = std::slice::from_mut(&mut event);
    publish_all(&state, &headers, events, Speaker::Engine).await?;
    Ok((
        StatusCode::ACCEPTED,
        crate::http_trace::accepted_trace(events),
        Json(AbortAccepted {
            command_id: id,
            event_id: event.id,
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Return entries after this `seq` (the cursor from the previous page).
    pub after: Option<i64>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct History {
    pub command_id: CommandId,
    pub entries: Vec<HistoryRow>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<i64>,
}

/// A command's history in order: events received and emitted, state changes, ignored events.
#[utoipa::path(get, path = "/v1/commands/{id}/history", tag = "commands",
    params(("id" = String, Path, description = "Command id (UUID)"), HistoryQuery),
    responses(
        (status = 200, description = "A page of the history, oldest first", body = History),
        (status = 400, description = "Not a command id", body = ErrorBody),
        (status = 404, description = "No such command", body = ErrorBody),
        (status = 422, description = "Invalid query", body = ErrorBody)))]
pub async fn get_history(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(raw): Path<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> ApiResult<Json<History>> {
    let id = parse_id(&raw)?;
    let Query(query) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be between 1 and 1000"));
    }
    let command = store::get_command(&state.pool, id).await?;
    principal.may_read_command(command.as_ref().map(|c| c.owner.as_str()))?;
    if command.is_none() {
        return Err(ApiError::NotFound(format!("no command {id}")));
    }
    let entries = store::history(&state.pool, id, query.after.unwrap_or(0), limit).await?;
    let next_after = if entries.len() as i64 == limit {
        entries.last().map(|e| e.seq)
    } else {
        None
    };
    Ok(Json(History {
        command_id: id,
        entries,
        next_after,
    }))
}
