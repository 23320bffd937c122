//! Dead letters for people: list and filter (type, kind, owner, funnel, signature, time), group
//! by failure signature, show one, replay one, a filter or a group (dry-run count, throttled,
//! resumable), discard with a reason. Replays and discards are audited (who, when, filter, count).
//!
//! A body can be megabytes, so a listed or shown letter carries only its first KiB
//! (`body_prefix`), its size, SHA-256 and whether it was kept truncated, and a `body_url`. That
//! route streams one body, read from PostgreSQL a slice at a time: the gateway holds at most
//! one slice of it. A list answer stops adding letters at [`LIST_BUDGET`] bytes and gives the
//! cursor to go on from.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use cmdflow_shared::store::dead::{
    self, DeadLetter, DeadState, Filter, Group, ReplayJob, ReplayState,
};
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::routes::json_body;

/// The query of the list and group endpoints.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
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
        let state = dead_state(self.state.as_deref())?;
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
            state,
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

fn dead_state(state: Option<&str>) -> ApiResult<Option<DeadState>> {
    state
        .map(|s| {
            DeadState::parse(s).ok_or_else(|| {
                ApiError::invalid(
                    "state",
                    format!("`{s}` is not one of dead, replayed, discarded"),
                )
            })
        })
        .transpose()
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

/// The most bytes of dead letters (as JSON) one list answer carries: it stops before the letter
/// that would pass it (always giving one) and says where to go on.
pub const LIST_BUDGET: usize = 1024 * 1024;

/// Bytes of a body read per query when it is streamed: the gateway holds one slice at a time.
pub const BODY_SLICE: i64 = 256 * 1024;

/// A dead letter as the API shows it: every field of the row, the first KiB of its body and
/// where to fetch the rest.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetterView {
    #[serde(flatten)]
    pub letter: DeadLetter,
    /// Where the stored body is streamed whole: `/v1/dead-letters/{id}/body`.
    pub body_url: String,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(letter: DeadLetter) -> Self {
        let body_url = format!("/v1/dead-letters/{}/body", letter.id);
        Self { letter, body_url }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetterView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<i64>,
    /// The page holds fewer than `limit` letters because they filled the answer's budget
    /// (1 MiB of JSON); `next_after` goes on.
    pub truncated: bool,
}

/// Counts the bytes written to it: how long a value is as JSON, without keeping the JSON.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn json_len(value: &impl Serialize) -> usize {
    let mut counted = ByteCount(0);
    // Writing to a counter cannot fail; a value that cannot be serialised counts as empty.
    drop(serde_json::to_writer(&mut counted, value));
    counted.0
}

/// Takes letters, in order, while their JSON fits `budget` bytes (always the first); says
/// whether it left any out.
fn within_budget(letters: Vec<DeadLetter>, budget: usize) -> (Vec<DeadLetterView>, bool) {
    let mut views = Vec::with_capacity(letters.len());
    let mut used = 0_usize;
    for letter in letters {
        let view = DeadLetterView::from(letter);
        let size = json_len(&view) + 1;
        if !views.is_empty() && used + size > budget {
            return (views, true);
        }
        used += size;
        views.push(view);
    }
    (views, false)
}

/// Dead letters matching the filter, oldest first, each with the first KiB of its body: a page
/// of at most `limit`, and at most 1 MiB.
#[utoipa::path(get, path = "/v1/dead-letters", tag = "dead-letters", operation_id = "list_dead_letters", params(DeadLetterQuery),
    responses((status = 200, description = "A page of dead letters, oldest first", body = DeadLetterPage), (status = 422, description = "Invalid query", body = ErrorBody)))]
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
    let full = letters.len() as i64 == limit;
    let (dead_letters, truncated) = within_budget(letters, LIST_BUDGET);
    let next_after = (full || truncated)
        .then(|| dead_letters.last().map(|l| l.letter.id))
        .flatten();
    Ok(Json(DeadLetterPage {
        dead_letters,
        next_after,
        truncated,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Groups {
    pub groups: Vec<Group>,
}

/// Dead letters grouped by failure signature (error class and failing handler), with counts.
#[utoipa::path(get, path = "/v1/dead-letters/groups", tag = "dead-letters", params(DeadLetterQuery),
    responses((status = 200, description = "Dead letters grouped by failure signature", body = Groups), (status = 422, description = "Invalid query", body = ErrorBody)))]
pub async fn groups(
    State(state): State<AppState>,
    query: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> ApiResult<Json<Groups>> {
    let Query(query) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    Ok(Json(Groups {
        groups: dead::groups(&state.pool, &query.filter()?).await?,
    }))
}

fn letter_id(raw: &str) -> ApiResult<i64> {
    raw.parse()
        .map_err(|_| ApiError::BadRequest("a dead letter id is a number".into()))
}

/// One dead letter, with the first KiB of its original event (`body_url` has all of it).
#[utoipa::path(get, path = "/v1/dead-letters/{id}", tag = "dead-letters",
    params(("id" = i64, Path, description = "Dead letter id")),
    responses((status = 200, description = "The dead letter", body = DeadLetterView), (status = 400, description = "Not a dead-letter id", body = ErrorBody), (status = 404, description = "No such dead letter", body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> ApiResult<Json<DeadLetterView>> {
    let id = letter_id(&raw)?;
    let letter = dead::get(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no dead letter {id}")))?;
    Ok(Json(letter.into()))
}

/// Bytes as they are, for the OpenAPI document (`string`, `binary`).
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct RawBody(pub Vec<u8>);

/// The stored body of one dead letter, byte for byte, streamed: the original event, or its
/// first `CMDFLOW_DEAD_LETTER_MAX_BODY` bytes when it was kept truncated.
#[utoipa::path(get, path = "/v1/dead-letters/{id}/body", tag = "dead-letters",
    params(("id" = i64, Path, description = "Dead letter id")),
    responses(
        (status = 200, description = "The stored body; `content-length` is its stored length",
            content_type = "application/octet-stream", body = inline(RawBody),
            headers(
                ("x-cmdflow-body-sha256" = String, description = "Hex SHA-256 of the message as received"),
                ("x-cmdflow-body-size" = i64, description = "Size of the message as received, in bytes"),
                ("x-cmdflow-body-truncated" = bool, description = "`true` when only the first bytes were kept"))),
        (status = 400, description = "Not a dead-letter id", body = ErrorBody),
        (status = 404, description = "No such dead letter", body = ErrorBody)))]
pub async fn body(State(state): State<AppState>, Path(raw): Path<String>) -> ApiResult<Response> {
    let id = letter_id(&raw)?;
    let stored = dead::stored_body(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no dead letter {id}")))?;
    let pool = state.pool.clone();
    let length = stored.stored;
    // One query per slice, each on a pooled connection only while it runs. A body never
    // changes once kept; a row gone mid-way ends the stream short, and the client sees fewer
    // bytes than `content-length`.
    let slices = futures::stream::try_unfold(0_i64, move |offset| {
        let pool = pool.clone();
        async move {
            if offset >= length {
                return Ok(None);
            }
            let slice = dead::body_slice(&pool, id, offset, BODY_SLICE)
                .await
                .map_err(std::io::Error::other)?
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    std::io::Error::other(format!("dead letter {id} is gone mid-download"))
                })?;
            let next = offset + slice.len() as i64;
            Ok::<_, std::io::Error>(Some((Bytes::from(slice), next)))
        }
    });
    let slices = futures::TryStreamExt::inspect_err(slices, move |e| {
        tracing::warn!(error = %e, dead_letter.id = id, "A dead letter's body could not be streamed whole.");
    });
    let mut response = Body::from_stream(slices).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&format!("attachment; filename=\"dead-letter-{id}.bin\""))
            .unwrap_or_else(|_| HeaderValue::from_static("attachment")),
    );
    if let Ok(sha) = HeaderValue::from_str(&stored.sha256) {
        headers.insert("x-cmdflow-body-sha256", sha);
    }
    headers.insert("x-cmdflow-body-size", HeaderValue::from(stored.size));
    headers.insert(
        "x-cmdflow-body-truncated",
        HeaderValue::from_static(if stored.truncated { "true" } else { "false" }),
    );
    Ok(response)
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
        let state = dead_state(op.state.as_deref())?;
        check_texts(&[
            ("type", &op.event_type),
            ("kind", &op.kind),
            ("owner", &op.owner),
            ("funnel", &op.funnel),
            ("signature", &op.signature),
            ("reason", &op.reason),
        ])?;
        if state == Some(DeadState::Discarded) {
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
            // Checked by `parse`.
            state: self.state.as_deref().and_then(DeadState::parse),
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
    /// Of `count`, the dead letters kept truncated: the job leaves them dead (their original
    /// event is not whole), and counts them in its `skipped`.
    pub skipped: i64,
    pub dry_run: bool,
    /// The replay job, absent on a dry run.
    pub job: Option<ReplayJob>,
}

/// Replays the dead letters of a filter, a group (`signature`) or a list (`ids`): a job that
/// publishes their original events again, throttled by `rate`. With `dry_run`, only the count.
/// Dead letters kept truncated are never published: the job skips them, and a replay that
/// would take nothing else is refused (409).
#[utoipa::path(post, path = "/v1/dead-letters/replay", tag = "dead-letters",
    request_body(content = Operation, content_type = "application/json"),
    responses(
        (status = 200, description = "Dry run: the count", body = ReplayAccepted),
        (status = 202, description = "The replay job started", body = ReplayAccepted),
        (status = 409, description = "Every dead letter it would take was kept truncated", body = ErrorBody),
        (status = 422, description = "An invalid filter or option, named in `detail`", body = ErrorBody)))]
pub async fn replay(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<ReplayAccepted>)> {
    let op = Operation::parse(&headers, body)?;
    let filter = op.filter();
    let count = dead::count(&state.pool, &filter).await?;
    let skipped = dead::count_truncated(&state.pool, &filter).await?;
    if op.dry_run {
        return Ok((
            StatusCode::OK,
            Json(ReplayAccepted {
                count,
                skipped,
                dry_run: true,
                job: None,
            }),
        ));
    }
    if count > 0 && skipped == count {
        let detail = if count == 1 {
            let id = match filter.ids.as_deref() {
                Some([id]) => id.to_string(),
                _ => "{id}".to_owned(),
            };
            format!(
                "the dead letter this would replay was kept truncated: its body passed \
                 CMDFLOW_DEAD_LETTER_MAX_BODY, so its original event is not whole and is never \
                 published again (what was kept is at /v1/dead-letters/{id}/body; discard it \
                 when done)"
            )
        } else {
            format!(
                "all {count} dead letters this would replay were kept truncated: their bodies \
                 passed CMDFLOW_DEAD_LETTER_MAX_BODY, so their original events are not whole and \
                 are never published again (what was kept is at /v1/dead-letters/{{id}}/body; \
                 discard them when done)"
            )
        };
        return Err(ApiError::Conflict(detail));
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
            skipped,
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
    responses((status = 200, description = "The replay job", body = ReplayJob), (status = 404, description = "No such replay job", body = ErrorBody)))]
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
    responses((status = 200, description = "The replay job, interrupted", body = ReplayJob), (status = 404, description = "No such replay job", body = ErrorBody)))]
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
    responses((status = 202, description = "The replay job, running again", body = ReplayJob), (status = 404, description = "No such replay job", body = ErrorBody), (status = 409, description = "The job is running, finished or failed: it cannot be resumed", body = ErrorBody)))]
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
    responses((status = 200, description = "How many dead letters were discarded", body = Counted), (status = 422, description = "An invalid filter, named in `detail`", body = ErrorBody)))]
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
