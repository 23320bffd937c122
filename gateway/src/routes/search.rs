//! The command search: commands by owner, kind, state and creation time, newest first, a page
//! at a time with a keyset cursor on `(created_at, id)`, so page 1,000 costs what page 1 costs.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use chrono::{DateTime, Utc};
use cmdflow_shared::domain::{Kind, Owner};
use cmdflow_shared::store::console::{self, CommandFilter, CommandSummary};
use cmdflow_shared::{CommandId, CommandState};
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody};

/// The largest page.
pub const MAX_LIMIT: i64 = 200;
const DEFAULT_LIMIT: i64 = 50;

/// Every parameter is optional; an empty one is the same as an absent one.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    /// Exactly this owner, `kind:id` (an `owner:read` caller must give its own).
    pub owner: Option<String>,
    /// Command kind, e.g. `quote`.
    pub kind: Option<String>,
    /// A state, or several separated by commas (`pending,running,waiting`); `open` and `ended`
    /// stand for the non-terminal and terminal states.
    pub state: Option<String>,
    /// Created at or after (RFC 3339).
    pub since: Option<String>,
    /// Created before (RFC 3339).
    pub until: Option<String>,
    /// The cursor from the previous page (`next`).
    pub after: Option<String>,
    /// Page size, 1 to 200 (default 50).
    pub limit: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CommandPage {
    pub commands: Vec<CommandSummary>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<String>,
}

fn present(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn parse_time(field: &str, raw: &str) -> ApiResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            ApiError::invalid(
                field,
                format!("`{raw}` is not an RFC 3339 time such as 2026-11-26T10:00:00Z: {e}"),
            )
        })
}

fn parse_states(raw: &str) -> ApiResult<Vec<CommandState>> {
    let mut states = Vec::new();
    for word in raw.split(',').map(str::trim) {
        match word {
            "open" => states.extend(CommandState::ALL.into_iter().filter(|s| !s.is_terminal())),
            "ended" => states.extend(CommandState::ALL.into_iter().filter(|s| s.is_terminal())),
            _ => match CommandState::ALL.into_iter().find(|s| s.as_str() == word) {
                Some(state) => states.push(state),
                None => {
                    return Err(ApiError::invalid(
                        "state",
                        format!(
                            "`{word}` is not a state; use {}, open or ended (several separated by commas)",
                            CommandState::ALL.map(CommandState::as_str).join(", ")
                        ),
                    ));
                }
            },
        }
    }
    Ok(states)
}

/// The cursor of the page after `last`: its creation time in microseconds and its id.
fn cursor(last: &CommandSummary) -> String {
    format!("{}_{}", last.created_at.timestamp_micros(), last.id)
}

fn parse_cursor(raw: &str) -> ApiResult<(DateTime<Utc>, CommandId)> {
    let bad = || ApiError::invalid("after", "is not a cursor from this search (its `next`)");
    let (at, id) = raw.split_once('_').ok_or_else(bad)?;
    let micros: i64 = at.parse().map_err(|_| bad())?;
    let at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    Ok((at, id.parse().map_err(|_| bad())?))
}

impl SearchQuery {
    fn filter(&self) -> ApiResult<(CommandFilter, i64)> {
        let owner = present(&self.owner)
            .map(|raw| {
                Owner::parse(raw)
                    .map(|o| o.to_string())
                    .map_err(|e| ApiError::invalid("owner", e.to_string()))
            })
            .transpose()?;
        let kind = present(&self.kind)
            .map(|raw| {
                Kind::parse(raw)
                    .map(String::from)
                    .map_err(|e| ApiError::invalid("kind", e.to_string()))
            })
            .transpose()?;
        let states = present(&self.state)
            .map(parse_states)
            .transpose()?
            .unwrap_or_default();
        let since = present(&self.since)
            .map(|raw| parse_time("since", raw))
            .transpose()?;
        let until = present(&self.until)
            .map(|raw| parse_time("until", raw))
            .transpose()?;
        if let (Some(since), Some(until)) = (since, until)
            && since >= until
        {
            return Err(ApiError::invalid("until", "must be later than `since`"));
        }
        let before = present(&self.after).map(parse_cursor).transpose()?;
        let limit = match present(&self.limit) {
            None => DEFAULT_LIMIT,
            Some(raw) => raw
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid("limit", format!("must be a number from 1 to {MAX_LIMIT}"))
                })?,
        };
        Ok((
            CommandFilter {
                owner,
                kind,
                states,
                since,
                until,
                before,
            },
            limit,
        ))
    }
}

/// Commands matching the filters, newest first (by creation time, then id).
#[utoipa::path(get, path = "/v1/commands", tag = "commands", params(SearchQuery),
    responses(
        (status = 200, description = "A page of the matching commands", body = CommandPage),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "Neither `commands:read` nor `owner:read` for this owner", body = ErrorBody),
        (status = 422, description = "An invalid parameter, named in the detail", body = ErrorBody)))]
pub async fn search_commands(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    query: Result<Query<SearchQuery>, QueryRejection>,
) -> ApiResult<Json<CommandPage>> {
    let Query(query) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let (filter, limit) = query.filter()?;
    match &filter.owner {
        Some(owner) => principal.may_read_owner(
            &Owner::parse(owner).map_err(|e| ApiError::invalid("owner", e.to_string()))?,
        )?,
        None if principal.has(crate::auth::Scope::CommandsRead) => {}
        None => return Err(principal.not_own()),
    }
    let commands = console::search(&state.pool, &filter, limit).await?;
    let next = (commands.len() as i64 == limit)
        .then(|| commands.last().map(cursor))
        .flatten();
    Ok(Json(CommandPage { commands, next }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> SearchQuery {
        let text = pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let uri: axum::http::Uri = format!("/v1/commands?{text}").parse().unwrap();
        Query::<SearchQuery>::try_from_uri(&uri).unwrap().0
    }

    fn field_of(err: ApiError) -> String {
        match err {
            ApiError::InvalidField { field, .. } => field,
            other => format!("not an invalid field: {other}"),
        }
    }

    #[test]
    fn each_bad_parameter_is_named() {
        for (pairs, field) in [
            (vec![("owner", "Pirate:1")], "owner"),
            (vec![("kind", "Not%20A%20Kind")], "kind"),
            (vec![("state", "running,sleeping")], "state"),
            (vec![("since", "yesterday")], "since"),
            (vec![("until", "2026-13-01T00:00:00Z")], "until"),
            (
                vec![
                    ("since", "2026-01-02T00:00:00Z"),
                    ("until", "2026-01-01T00:00:00Z"),
                ],
                "until",
            ),
            (vec![("after", "nonsense")], "after"),
            (vec![("limit", "0")], "limit"),
            (vec![("limit", "201")], "limit"),
            (vec![("limit", "ten")], "limit"),
        ] {
            let err = query(&pairs).filter().err();
            assert_eq!(
                err.map(field_of).as_deref(),
                Some(field),
                "{pairs:?} should be refused naming {field}"
            );
        }
    }

    #[test]
    fn states_expand_and_empty_parameters_are_absent() {
        let (filter, limit) = query(&[("state", "open,failed"), ("owner", ""), ("kind", "%20")])
            .filter()
            .unwrap();
        assert_eq!(filter.states.len(), 4);
        assert!(filter.owner.is_none() && filter.kind.is_none());
        assert_eq!(limit, DEFAULT_LIMIT);
    }

    #[test]
    fn a_cursor_round_trips() {
        let at = DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap();
        let row = CommandSummary {
            id: CommandId::new(),
            kind: "quote".into(),
            owner: "member:1".into(),
            state: CommandState::Running,
            parent_id: None,
            root_id: CommandId::new(),
            ui: None,
            reason: None,
            created_at: at,
            updated_at: at,
            ended_at: None,
        };
        assert_eq!(parse_cursor(&cursor(&row)).unwrap(), (at, row.id));
    }
}
