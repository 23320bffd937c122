//! The owner feed: what a UI shows one person. History, pending conditions and messages follow
//! the person across linked identities (cookie → lead → member → client).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use cmdflow_shared::CommandId;
use cmdflow_shared::domain::Owner;
use cmdflow_shared::store::people::{self, Delivery, FeedCommand, MessageRow};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FeedQuery {
    /// History page size, 1 to 100 (default 20).
    pub limit: Option<i64>,
    /// The cursor from the previous page (`next_cursor`).
    pub cursor: Option<String>,
    /// Only history of this kind, e.g. `query` for "the last 10 queries you ran".
    pub kind: Option<String>,
    /// Include archived commands in the history.
    pub include_archived: Option<bool>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Pending {
    /// A stable code, e.g. `quote.unfinished`, `membership.pending`, `message.unread`.
    pub code: String,
    /// What to tell the person.
    pub text: String,
    pub command_id: CommandId,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Feed {
    pub owner: String,
    /// Every owner id of the same person.
    pub identities: Vec<String>,
    /// The person's name when one of their commands carries it (`data.name`), the latest.
    pub name: Option<String>,
    pub history: Vec<FeedCommand>,
    /// Pass as `cursor` for the next page of history; absent on the last page.
    pub next_cursor: Option<String>,
    pub pending: Vec<Pending>,
    pub messages: Vec<MessageRow>,
}

fn parse_owner(raw: &str) -> ApiResult<Owner> {
    Owner::parse(raw).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn parse_cursor(raw: &str) -> ApiResult<(DateTime<Utc>, CommandId)> {
    let bad = || ApiError::invalid("cursor", "is not a cursor from this feed");
    let (at, id) = raw.split_once('_').ok_or_else(bad)?;
    let micros: i64 = at.parse().map_err(|_| bad())?;
    let at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    Ok((at, id.parse().map_err(|_| bad())?))
}

/// What one person should see now: history, pending conditions and messages.
#[utoipa::path(get, path = "/v1/owners/{owner}/feed", tag = "owners",
    params(("owner" = String, Path, description = "Owner, `kind:id`"), FeedQuery),
    responses(
        (status = 200, description = "The owner's feed", body = Feed),
        (status = 400, description = "Not an owner", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "Not this caller's owner, and no `commands:read`", body = ErrorBody),
        (status = 422, description = "Invalid query", body = ErrorBody)))]
pub async fn get_feed(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(raw): Path<String>,
    query: Result<Query<FeedQuery>, QueryRejection>,
) -> ApiResult<Json<Feed>> {
    let owner = parse_owner(&raw)?;
    principal.may_read_owner(&owner)?;
    let Query(query) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be between 1 and 100"));
    }
    let before = query.cursor.as_deref().map(parse_cursor).transpose()?;
    let people::FeedRows {
        owners,
        name,
        history,
        hinted,
        messages,
    } = people::feed(
        &state.pool,
        &owner.to_string(),
        query.kind.as_deref(),
        before,
        limit,
        query.include_archived.unwrap_or(false),
    )
    .await?;
    let next_cursor = (history.len() as i64 == limit)
        .then(|| {
            history
                .last()
                .map(|c| format!("{}_{}", c.created_at.timestamp_micros(), c.command_id))
        })
        .flatten();
    let mut pending: Vec<Pending> = hinted
        .into_iter()
        .filter_map(|(command_id, ui)| {
            let code = ui.get("code").and_then(Value::as_str)?.to_owned();
            let text = ui
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or(&code)
                .to_owned();
            Some(Pending {
                code,
                text,
                command_id,
            })
        })
        .collect();
    // A failed message never reached the person: nothing for them to read.
    pending.extend(
        messages
            .iter()
            .filter(|m| !m.read && m.delivery != Delivery::Failed)
            .map(|m| Pending {
                code: "message.unread".to_owned(),
                text: if m.channel == "email" {
                    format!("Here is an email: {}", m.subject)
                } else {
                    format!("Here is a message: {}", m.subject)
                },
                command_id: m.command_id,
            }),
    );
    Ok(Json(Feed {
        owner: owner.to_string(),
        identities: owners,
        name,
        history,
        next_cursor,
        pending,
        messages,
    }))
}

/// Marks one of the person's messages read.
#[utoipa::path(post, path = "/v1/owners/{owner}/messages/{id}/read", tag = "owners",
    params(("owner" = String, Path, description = "Owner, `kind:id`"), ("id" = String, Path, description = "Message id")),
    responses(
        (status = 204, description = "Read"),
        (status = 400, description = "Not an owner or a message id", body = ErrorBody),
        (status = 404, description = "The person has no such message", body = ErrorBody)))]
pub async fn read_message(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((raw, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let owner = parse_owner(&raw)?;
    principal.may_act_for_owner(&owner)?;
    let id = uuid::Uuid::try_parse(&id)
        .map_err(|_| ApiError::BadRequest("the message id must be a UUID".into()))?;
    let owners = people::owners_of(&state.pool, &owner.to_string()).await?;
    if people::mark_read(&state.pool, &owners, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no message {id} for {owner}")))
    }
}
