//! Dead letters for people: list and filter (type, kind, owner, funnel, signature, time), group
//! by failure signature, show one, replay one, a filter or a group (dry-run count, throttled,
//! resumable), discard with a reason. Replays and discards are audited (who, when, filter, count).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use cmdflow_shared::store::dead::{self, DeadLetter, Filter, Group, ReplayJob, ReplayState};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::routes::json_body;

/// The query of the list and group endpoints.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct DeadLetterQuery {
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub kind: Option<String>,
    pub owner: Option<String>,
    /// Funnel name (dead letters of `funnel.{name}` commands).
    pub funnel: Option<String>,
    pub signature: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// `dead` (default), `replayed` or `discarded`.
    pub state: Option<String>,
    /// Page after this id.
    pub after: Option<i64>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<i64>,
}

impl DeadLetterQuery {
    fn filter(&self) -> ApiResult<Filter> {
        check_state(self.state.as_deref())?;
        check_texts(&[
            ("type", &self.event_type),
            ("kind", &self.kind),
            ("owner", &self.owner),
            ("funnel", &self.funnel),
            ("signature", &self.signature),
        ])?;
        Ok(Filter {
            event_type: self.event_type.clone(),
            kind: self.kind.clone(),
            owner: self.owner.clone(),
            funnel: self.funnel.clone(),
            signature: self.signature.clone(),
            since: self.since,
            until: self.until,
            state: self.state.clone(),
            ids: None,
        })
    }
}

/// Each text of a filter or an operation is text PostgreSQL can compare and store.
fn check_texts(fields: &[(&str, &Option<String>)]) -> ApiResult<()> {
    for (field, value) in fields {
        if let Some(value) = value {
            ApiError::check_text(field, value)?;
        }
    }
    Ok(())
}

fn check_state(state: Option<&str>) -> ApiResult<()> {
    match state {
        None | Some("dead" | "replayed" | "discarded") => Ok(()),
        Some(other) => Err(ApiError::invalid(
            "state",
            format!("`{other}` is not one of dead, replayed, discarded"),
        )),
    }
}

/// Who acts, for the audit: the authenticated caller, with the person it names in
/// `x-cmdflow-actor` (the CLI sends its user) when given.
fn actor(principal: &Principal, headers: &HeaderMap) -> String {
    match headers
        .get("x-cmdflow-actor")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 200)
    {
        Some(named) => format!("{} ({named})", principal.id),
        None => principal.id.clone(),
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetterView {
    #[serde(flatten)]
    pub letter: DeadLetter,
    /// The original event: parsed JSON when it is JSON, else its text (lossy).
    #[schema(value_type = Object)]
    pub body: Value,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(letter: DeadLetter) -> Self {
        let body = serde_json::from_slice(&letter.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&letter.body).into_owned()));
        Self { letter, body }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetterView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<i64>,
}

/// Dead letters matching the filter, oldest first.
#[utoipa::path(get, path = "/v1/dead-letters", tag = "dead-letters", params(DeadLetterQuery),
    responses((status = 200, body = DeadLetterPage), (status = 422, description = "Invalid query", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> ApiResult<Json<DeadLetterPage>> {
    let Query(query) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be between 1 and 1000"));
    }
    let letters = dead::list(
        &state.pool,
        &query.filter()?,
        query.after.unwrap_or(0),
        limit,
    )
    .await?;
    let next_after = (letters.len() as i64 == limit)
        .then(|| letters.last().map(|l| l.id))
        .flatten();
    Ok(Json(DeadLetterPage {
        dead_letters: letters.into_iter().map(DeadLetterView::from).collect(),
        next_after,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Groups {
    pub groups: Vec<Group>,
}

/// Dead letters grouped by failure signature (error class and failing handler), with counts.
#[utoipa::path(get, path = "/v1/dead-letters/groups", tag = "dead-letters", params(DeadLetterQuery),
    responses((status = 200, body = Groups), (status = 422, description = "Invalid query", body = ErrorBody)))]
pub async fn groups(
    State(state): State<AppState>,
    query: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> ApiResult<Json<Groups>> {
    let Query(query) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    Ok(Json(Groups {
        groups: dead::groups(&state.pool, &query.filter()?).await?,
    }))
}

/// One dead letter, with its original event.
#[utoipa::path(get, path = "/v1/dead-letters/{id}", tag = "dead-letters",
    params(("id" = i64, Path, description = "Dead letter id")),
    responses((status = 200, body = DeadLetterView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> ApiResult<Json<DeadLetterView>> {
    let id: i64 = raw
        .parse()
        .map_err(|_| ApiError::BadRequest("a dead letter id is a number".into()))?;
    let letter = dead::get(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no dead letter {id}")))?;
    Ok(Json(letter.into()))
}

/// Which dead letters an operation takes, and how.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub kind: Option<String>,
    pub owner: Option<String>,
    pub funnel: Option<String>,
    pub signature: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// `dead` (default); `replayed` to replay again (commands dedupe, so nothing is applied twice).
    pub state: Option<String>,
    /// Exactly these dead letters.
    pub ids: Option<Vec<i64>>,
    /// Count what would be taken, and change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Replays per second (replay only).
    pub rate: Option<i32>,
    /// Why (discard only; required there).
    pub reason: Option<String>,
}

impl Operation {
    fn parse(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> ApiResult<Operation> {
        let body = json_body(headers, body, &["application/json"])?;
        let op: Operation =
            serde_json::from_slice(&body).map_err(|e| ApiError::invalid("body", e.to_string()))?;
        check_state(op.state.as_deref())?;
        check_texts(&[
            ("type", &op.event_type),
            ("kind", &op.kind),
            ("owner", &op.owner),
            ("funnel", &op.funnel),
            ("signature", &op.signature),
            ("reason", &op.reason),
        ])?;
        if op.state.as_deref() == Some("discarded") {
            return Err(ApiError::invalid(
                "state",
                "discarded dead letters stay discarded",
            ));
        }
        if let Some(rate) = op.rate
            && !(1..=100_000).contains(&rate)
        {
            return Err(ApiError::invalid(
                "rate",
                "must be between 1 and 100000 per second",
            ));
        }
        Ok(op)
    }

    fn filter(&self) -> Filter {
        Filter {
            event_type: self.event_type.clone(),
            kind: self.kind.clone(),
            owner: self.owner.clone(),
            funnel: self.funnel.clone(),
            signature: self.signature.clone(),
            since: self.since,
            until: self.until,
            state: self.state.clone(),
            ids: self.ids.clone(),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Counted {
    /// How many dead letters the operation takes (or took).
    pub count: i64,
    pub dry_run: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReplayAccepted {
    pub count: i64,
    pub dry_run: bool,
    /// The replay job, absent on a dry run.
    pub job: Option<ReplayJob>,
}

/// Replays the dead letters of a filter, a group (`signature`) or a list (`ids`): a job that
/// publishes their original events again, throttled by `rate`. With `dry_run`, only the count.
#[utoipa::path(post, path = "/v1/dead-letters/replay", tag = "dead-letters",
    request_body(content = Operation, content_type = "application/json"),
    responses(
        (status = 200, description = "Dry run: the count", body = ReplayAccepted),
        (status = 202, description = "The replay job started", body = ReplayAccepted),
        (status = 422, body = ErrorBody)))]
pub async fn replay(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<ReplayAccepted>)> {
    let op = Operation::parse(&headers, body)?;
    let filter = op.filter();
    let count = dead::count(&state.pool, &filter).await?;
    if op.dry_run {
        return Ok((
            StatusCode::OK,
            Json(ReplayAccepted {
                count,
                dry_run: true,
                job: None,
            }),
        ));
    }
    let who = actor(&principal, &headers);
    let job = dead::create_job(&state.pool, &who, &filter, op.rate, count).await?;
    dead::audit(
        &state.pool,
        &who,
        "replay",
        &filter,
        count,
        Some(&job.id.to_string()),
    )
    .await?;
    // A worker claims it (the gateway runs no replays, so restarting it stops none).
    Ok((
        StatusCode::ACCEPTED,
        Json(ReplayAccepted {
            count,
            dry_run: false,
            job: Some(job),
        }),
    ))
}

fn job_id(raw: &str) -> ApiResult<uuid::Uuid> {
    uuid::Uuid::try_parse(raw).map_err(|_| ApiError::BadRequest("a replay id is a UUID".into()))
}

/// A replay job's progress.
#[utoipa::path(get, path = "/v1/dead-letters/replays/{id}", tag = "dead-letters",
    params(("id" = String, Path, description = "Replay job id")),
    responses((status = 200, body = ReplayJob), (status = 404, body = ErrorBody)))]
pub async fn replay_status(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> ApiResult<Json<ReplayJob>> {
    let id = job_id(&raw)?;
    let job = dead::get_job(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no replay {id}")))?;
    Ok(Json(job))
}

/// Interrupts a running replay after its current batch.
#[utoipa::path(post, path = "/v1/dead-letters/replays/{id}/interrupt", tag = "dead-letters",
    params(("id" = String, Path, description = "Replay job id")),
    responses((status = 200, body = ReplayJob), (status = 404, body = ErrorBody)))]
pub async fn interrupt(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> ApiResult<Json<ReplayJob>> {
    let id = job_id(&raw)?;
    dead::move_job(
        &state.pool,
        id,
        ReplayState::Running,
        ReplayState::Interrupted,
    )
    .await?;
    replay_status(State(state), Path(raw)).await
}

/// Resumes an interrupted replay where it stopped; a worker takes it up. A replay that is
/// running, finished or failed cannot be resumed (409).
#[utoipa::path(post, path = "/v1/dead-letters/replays/{id}/resume", tag = "dead-letters",
    params(("id" = String, Path, description = "Replay job id")),
    responses((status = 202, body = ReplayJob), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn resume(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> ApiResult<(StatusCode, Json<ReplayJob>)> {
    let id = job_id(&raw)?;
    let job = dead::get_job(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no replay {id}")))?;
    let resumed = job.state == ReplayState::Interrupted
        && dead::move_job(
            &state.pool,
            id,
            ReplayState::Interrupted,
            ReplayState::Running,
        )
        .await?;
    if !resumed {
        let state = dead::get_job(&state.pool, id)
            .await?
            .map_or(job.state, |j| j.state);
        return Err(ApiError::Conflict(format!(
            "replay {id} is {state}; only an interrupted replay can be resumed"
        )));
    }
    let Json(job) = replay_status(State(state), Path(raw)).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

/// Discards the dead letters of a filter, a group or a list, with a reason.
#[utoipa::path(post, path = "/v1/dead-letters/discard", tag = "dead-letters",
    request_body(content = Operation, content_type = "application/json"),
    responses((status = 200, body = Counted), (status = 422, body = ErrorBody)))]
pub async fn discard(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Counted>> {
    let op = Operation::parse(&headers, body)?;
    let reason = op
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| ApiError::invalid("reason", "is required: say why these are discarded"))?;
    let filter = op.filter();
    if op.dry_run {
        let count = dead::count(&state.pool, &filter).await?;
        return Ok(Json(Counted {
            count,
            dry_run: true,
        }));
    }
    let count = dead::discard(&state.pool, &filter, reason).await?;
    dead::audit(
        &state.pool,
        &actor(&principal, &headers),
        "discard",
        &filter,
        count,
        Some(reason),
    )
    .await?;
    Ok(Json(Counted {
        count,
        dry_run: false,
    }))
}
