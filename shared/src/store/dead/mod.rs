//! Statements for operations: failed attempts, dead letters (filtered, grouped by failure
//! signature, replayed, discarded), replay jobs and the audit of what ops did.
//!
//! A dead letter's body can be as large as the broker lets a message be, so no statement that
//! returns many letters reads it: they carry its first [`BODY_PREFIX_BYTES`] (a
//! [`BodyPrefix`]), its size and hash. One body is read whole only by [`body_slice`] (a slice at
//! a time, for a download) and by [`replayable_bodies`] (a replay's batch, bounded by the caller).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;

use super::{Result, Tx};
use crate::domain::CommandId;

mod replays;

pub use replays::*;

pub async fn record_attempt(
    pool: &PgPool,
    source: Option<&str>,
    event_id: Option<&str>,
    event_type: Option<&str>,
    command: Option<CommandId>,
    attempt: i32,
    error: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO event_attempts (event_source, event_id, event_type, command_id, attempt, error)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(source)
    .bind(event_id)
    .bind(event_type)
    .bind(command)
    .bind(attempt)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// How much of a body a listed dead letter carries: enough to recognise the event. (`COLUMNS`
/// spells it in its SQL; a test keeps the two equal.)
pub const BODY_PREFIX_BYTES: i64 = 1024;

/// A dead letter to keep.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub dead_id: Option<String>,
    pub event_source: Option<String>,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub routing_key: String,
    pub command_id: Option<CommandId>,
    /// The message as received, whole: [`keep`] stores at most its cap of it, and its size and
    /// SHA-256 in any case.
    pub body: Vec<u8>,
    pub reason: String,
    pub error_class: String,
    pub error_chain: Value,
    pub attempts: i32,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
    /// It carried the engine's mark (an engine event that cmdflow itself published).
    pub from_engine: bool,
}

/// Keeps a dead letter (once per dead-lettering), with the kind and owner of its command and its
/// failure signature. Of its body, at most `max_body` bytes are stored: a longer one is kept
/// truncated (`body_truncated`), which a replay refuses. Size and SHA-256 are of the message
/// as received, computed by PostgreSQL as the migration that added them computed them for older
/// rows, so one function defines a letter's hash. Returns whether it was new.
pub async fn keep(pool: &PgPool, d: &NewDeadLetter, max_body: usize) -> Result<bool> {
    // Bodies are at most 1 GiB in PostgreSQL; the config keeps the cap below that.
    let cap = i32::try_from(max_body).unwrap_or(i32::MAX);
    let done = sqlx::query(
        "INSERT INTO dead_letters (dead_id, event_source, event_id, event_type, routing_key, command_id, kind, owner,
                                   body, body_size, body_sha256, body_truncated,
                                   reason, error_class, error_chain, signature, attempts, first_failed_at, last_failed_at,
                                   from_engine)
         SELECT $1, $2, $3, $4, $5, $6, c.kind, c.owner,
                substring($7 FROM 1 FOR $15), length($7), encode(sha256($7), 'hex'), length($7) > $15,
                $8, $9, $10, $9 || ':' || coalesce(c.kind, $4, $5), $11, $12, $13, $14
           FROM (SELECT 1) one LEFT JOIN commands c ON c.id = $6
         ON CONFLICT (dead_id) DO NOTHING",
    )
    .bind(&d.dead_id)
    .bind(&d.event_source)
    .bind(&d.event_id)
    .bind(&d.event_type)
    .bind(&d.routing_key)
    .bind(d.command_id)
    .bind(&d.body)
    .bind(&d.reason)
    .bind(&d.error_class)
    .bind(&d.error_chain)
    .bind(d.attempts)
    .bind(d.first_failed_at)
    .bind(d.last_failed_at)
    .bind(d.from_engine)
    .bind(cap)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Which dead letters an operation applies to. Every field narrows; none means all open ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Filter {
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// Command kind.
    pub kind: Option<String>,
    /// Owner, `kind:id`.
    pub owner: Option<String>,
    /// Funnel name: dead letters of the `funnel.{name}` commands.
    pub funnel: Option<String>,
    /// Failure signature (`error_class:kind`).
    pub signature: Option<String>,
    /// Failed at or after (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Failed before (RFC 3339).
    pub until: Option<DateTime<Utc>>,
    /// `dead` (default), `replayed` or `discarded`.
    #[param(value_type = Option<String>)]
    pub state: Option<DeadState>,
    /// Exactly these dead letters.
    #[param(value_type = Option<Vec<i64>>)]
    pub ids: Option<Vec<i64>>,
}

/// Where a dead letter stands (`dead_letters.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeadState {
    /// Waiting for an operator: replayable.
    Dead,
    /// Sent back to the workers.
    Replayed,
    /// Given up on, with a reason.
    Discarded,
}

text_enum!(DeadState, "dead letter state", {
    Dead => "dead",
    Replayed => "replayed",
    Discarded => "discarded",
});

#[derive(Debug, Clone, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    pub id: i64,
    pub event_source: Option<String>,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub routing_key: String,
    pub command_id: Option<CommandId>,
    pub kind: Option<String>,
    pub owner: Option<String>,
    /// The first [`BODY_PREFIX_BYTES`] of the stored body, as text (lossy). It is the whole body
    /// only when `body_size` is at most that; never publish it as the event. (The field keeps
    /// the name it had when it held the whole body, so code that compares a short body still
    /// reads; JSON calls it `body_prefix`.)
    #[sqlx(rename = "body_prefix")]
    #[serde(rename = "body_prefix")]
    #[schema(value_type = String)]
    pub body: BodyPrefix,
    /// The size of the message as received, in bytes.
    pub body_size: i64,
    /// The hex SHA-256 of the message as received.
    pub body_sha256: String,
    /// Only the first `CMDFLOW_DEAD_LETTER_MAX_BODY` bytes were kept: size and hash are still
    /// the whole message's, and it cannot be replayed.
    pub body_truncated: bool,
    pub reason: String,
    pub error_class: String,
    #[schema(value_type = Vec<String>)]
    pub error_chain: Value,
    pub signature: String,
    pub attempts: i32,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
    pub state: DeadState,
    pub replayed_at: Option<DateTime<Utc>>,
    pub discarded_at: Option<DateTime<Utc>>,
    pub discard_reason: Option<String>,
    /// Replayed with the engine's mark (see [`NewDeadLetter::from_engine`]).
    #[serde(skip)]
    pub from_engine: bool,
}

/// The first bytes of a dead letter's body. Serialised as text: UTF-8, lossy, without a last
/// character the cut split.
#[derive(Clone, Default, PartialEq, Eq, sqlx::Type)]
#[sqlx(transparent)]
pub struct BodyPrefix(Vec<u8>);

impl BodyPrefix {
    /// The prefix as text: invalid UTF-8 becomes U+FFFD, and a character cut at the end of
    /// the prefix is left out rather than shown as one.
    pub fn text(&self) -> String {
        let bytes = self.0.as_slice();
        let whole = match bytes.len().checked_sub(1) {
            None => bytes,
            Some(_) if bytes.len() < BODY_PREFIX_BYTES as usize => bytes,
            Some(last) => {
                // The start of the last character, at most 3 continuation bytes back.
                let start = (last.saturating_sub(3)..=last)
                    .rev()
                    .find(|&i| bytes[i] & 0xC0 != 0x80)
                    .unwrap_or(last);
                let needs = match bytes[start] {
                    0xC0..=0xDF => 2,
                    0xE0..=0xEF => 3,
                    0xF0..=0xF7 => 4,
                    _ => 1,
                };
                if start + needs > bytes.len() {
                    &bytes[..start]
                } else {
                    bytes
                }
            }
        };
        String::from_utf8_lossy(whole).into_owned()
    }
}

impl std::ops::Deref for BodyPrefix {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for BodyPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BodyPrefix({:?})", self.text())
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for BodyPrefix {
    fn eq(&self, other: &&[u8; N]) -> bool {
        self.0 == other.as_slice()
    }
}

impl PartialEq<&[u8]> for BodyPrefix {
    fn eq(&self, other: &&[u8]) -> bool {
        self.0 == *other
    }
}

impl Serialize for BodyPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
    }
}

const WHERE: &str = "
   WHERE state = coalesce($1, 'dead')
     AND ($2::text IS NULL OR event_type = $2)
     AND ($3::text IS NULL OR kind = $3)
     AND ($4::text IS NULL OR owner = $4)
     AND ($5::text IS NULL OR kind = 'funnel.' || $5)
     AND ($6::text IS NULL OR signature = $6)
     AND ($7::timestamptz IS NULL OR last_failed_at >= $7)
     AND ($8::timestamptz IS NULL OR last_failed_at < $8)
     AND ($9::bigint[] IS NULL OR id = ANY($9))";

macro_rules! bind_filter {
    ($q:expr, $f:expr) => {
        $q.bind(&$f.state)
            .bind(&$f.event_type)
            .bind(&$f.kind)
            .bind(&$f.owner)
            .bind(&$f.funnel)
            .bind(&$f.signature)
            .bind($f.since)
            .bind($f.until)
            .bind(&$f.ids)
    };
}

/// Every column but the body, of which only the first KiB ([`BODY_PREFIX_BYTES`]): a slice of a
/// value stored out of line reads only the chunks it covers.
const COLUMNS: &str = "SELECT id, event_source, event_id, event_type, routing_key, command_id, kind, owner,
        substring(body FROM 1 FOR 1024) AS body_prefix, body_size, body_sha256, body_truncated, reason,
        error_class, error_chain, signature, attempts, first_failed_at, last_failed_at, state, replayed_at,
        discarded_at, discard_reason, from_engine FROM dead_letters";

/// A page of dead letters matching `filter`, oldest first, after `after_id`.
pub async fn list(
    pool: &PgPool,
    filter: &Filter,
    after_id: i64,
    limit: i64,
) -> Result<Vec<DeadLetter>> {
    list_through(pool, filter, after_id, i64::MAX, limit).await
}

/// [`list`], of dead letters up to `through_id` only (a replay's bound).
pub async fn list_through(
    pool: &PgPool,
    filter: &Filter,
    after_id: i64,
    through_id: i64,
    limit: i64,
) -> Result<Vec<DeadLetter>> {
    let sql = format!("{COLUMNS} {WHERE} AND id > $10 AND id <= $11 ORDER BY id LIMIT $12");
    Ok(bind_filter!(
        sqlx::query_as::<_, DeadLetter>(sqlx::AssertSqlSafe(sql)),
        filter
    )
    .bind(after_id)
    .bind(through_id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

pub async fn count(pool: &PgPool, filter: &Filter) -> Result<i64> {
    let sql = format!("SELECT count(*) FROM dead_letters {WHERE}");
    Ok(
        bind_filter!(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)), filter)
            .fetch_one(pool)
            .await?,
    )
}

/// How many of the dead letters matching `filter` were kept truncated (a replay skips them).
pub async fn count_truncated(pool: &PgPool, filter: &Filter) -> Result<i64> {
    let sql = format!("SELECT count(*) FROM dead_letters {WHERE} AND body_truncated");
    Ok(
        bind_filter!(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)), filter)
            .fetch_one(pool)
            .await?,
    )
}

/// One dead letter, with the prefix of its body (see [`body_slice`] for the rest).
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<DeadLetter>> {
    let sql = format!("{COLUMNS} WHERE id = $1");
    Ok(sqlx::query_as::<_, DeadLetter>(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(pool)
        .await?)
}

/// What a download of one dead letter's body needs to know before its first byte.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredBody {
    /// Bytes stored: `size`, or the cap when `truncated`.
    pub stored: i64,
    /// The size of the message as received.
    pub size: i64,
    /// The hex SHA-256 of the message as received.
    pub sha256: String,
    pub truncated: bool,
}

/// The stored body's length, size, hash and whether it was cut, without reading it.
pub async fn stored_body(pool: &PgPool, id: i64) -> Result<Option<StoredBody>> {
    Ok(sqlx::query_as::<_, StoredBody>(
        "SELECT length(body)::bigint AS stored, body_size AS size, body_sha256 AS sha256,
                body_truncated AS truncated
           FROM dead_letters WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// `len` bytes of dead letter `id`'s stored body from byte `offset` (0-based): fewer at its
/// end, none past it; `None` when there is no such dead letter.
pub async fn body_slice(pool: &PgPool, id: i64, offset: i64, len: i64) -> Result<Option<Vec<u8>>> {
    Ok(sqlx::query_scalar(
        "SELECT substring(body FROM ($2 + 1)::int FOR $3::int) FROM dead_letters WHERE id = $1",
    )
    .bind(id)
    .bind(offset)
    .bind(len)
    .fetch_optional(pool)
    .await?)
}

/// The whole bodies of the dead letters `ids` that were kept whole, by id: the events a replay
/// publishes again. The caller bounds how many bytes it asks for (see `body_size`).
pub async fn replayable_bodies(pool: &PgPool, ids: &[i64]) -> Result<Vec<(i64, Vec<u8>)>> {
    Ok(sqlx::query_as(
        "SELECT id, body FROM dead_letters WHERE id = ANY($1) AND NOT body_truncated",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?)
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub struct Group {
    pub signature: String,
    pub count: i64,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
    /// The reason of the latest one.
    pub reason: String,
}

/// Dead letters matching `filter`, grouped by failure signature, largest group first.
pub async fn groups(pool: &PgPool, filter: &Filter) -> Result<Vec<Group>> {
    let sql = format!(
        "SELECT signature, count(*) AS count, min(first_failed_at) AS first_failed_at,
                max(last_failed_at) AS last_failed_at,
                (array_agg(reason ORDER BY id DESC))[1] AS reason
           FROM dead_letters {WHERE} GROUP BY signature ORDER BY count(*) DESC, signature"
    );
    Ok(
        bind_filter!(sqlx::query_as::<_, Group>(sqlx::AssertSqlSafe(sql)), filter)
            .fetch_all(pool)
            .await?,
    )
}

/// Discards the dead letters matching `filter`; returns how many.
pub async fn discard(pool: &PgPool, filter: &Filter, reason: &str) -> Result<i64> {
    let sql = format!(
        "UPDATE dead_letters SET state = 'discarded', discarded_at = now(), discard_reason = $10 {WHERE}"
    );
    let done = bind_filter!(sqlx::query(sqlx::AssertSqlSafe(sql)), filter)
        .bind(reason)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() as i64)
}

pub async fn mark_replayed(tx: &mut Tx<'_>, ids: &[i64]) -> Result<()> {
    sqlx::query("UPDATE dead_letters SET state = 'replayed', replayed_at = now() WHERE id = ANY($1) AND state = 'dead'")
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn audit(
    pool: &PgPool,
    actor: &str,
    action: &str,
    filter: &Filter,
    count: i64,
    detail: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO ops_audit (actor, action, filter, count, detail) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(actor)
    .bind(action)
    .bind(serde_json::to_value(filter).unwrap_or(Value::Null))
    .bind(count as i32)
    .bind(detail)
    .execute(pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests;
