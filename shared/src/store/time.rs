//! Statements for time events and waits: timers (claimed by the scheduler with
//! `FOR UPDATE SKIP LOCKED`), waits, recent broadcast events and unmatched events.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use super::{Result, Tx};
use crate::domain::CommandId;

/// What a timer is (`timers.kind`): one a command set (`after`, `at`, `cron`), or one the engine
/// keeps for a wait's timeout or a group's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    After,
    At,
    Cron,
    WaitTimeout,
    GroupDeadline,
}

text_enum!(TimerKind, "timer kind", {
    After => "after",
    At => "at",
    Cron => "cron",
    WaitTimeout => "wait_timeout",
    GroupDeadline => "group_deadline",
});

#[derive(Debug, Clone, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub struct TimerRow {
    #[serde(skip)]
    pub command_id: CommandId,
    pub name: String,
    pub kind: TimerKind,
    pub due_at: DateTime<Utc>,
    pub cron: Option<String>,
    pub tz: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub payload: Option<Value>,
    /// How often it has fired (a cron timer fires again and again).
    pub fired: i32,
    pub last_fired_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// A timer to set; a name that exists on the command is replaced.
pub struct NewTimer<'a> {
    pub command: CommandId,
    pub name: &'a str,
    pub kind: TimerKind,
    pub due_at: DateTime<Utc>,
    pub cron: Option<&'a str>,
    pub tz: Option<&'a str>,
    pub payload: Option<Value>,
}

pub async fn upsert_timer(tx: &mut Tx<'_>, t: &NewTimer<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO timers (command_id, name, kind, due_at, cron, tz, payload)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (command_id, name) DO UPDATE
            SET kind = EXCLUDED.kind, due_at = EXCLUDED.due_at, cron = EXCLUDED.cron,
                tz = EXCLUDED.tz, payload = EXCLUDED.payload, fired = 0, last_fired_at = NULL,
                created_at = now()",
    )
    .bind(t.command)
    .bind(t.name)
    .bind(t.kind)
    .bind(t.due_at)
    .bind(t.cron)
    .bind(t.tz)
    .bind(&t.payload)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn cancel_timer(tx: &mut Tx<'_>, command: CommandId, name: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM timers WHERE command_id = $1 AND name = $2")
        .bind(command)
        .bind(name)
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// For a command that has ended, in one round trip: removes its timers and waits (they end
/// with it), closes its fan-in groups that had not settled (nothing waits for them now), and
/// returns its open children whose parent-close policy is `abort`.
pub(crate) async fn clear_time_of_ended(
    tx: &mut Tx<'_>,
    command: CommandId,
) -> Result<Vec<CommandId>> {
    Ok(sqlx::query_scalar(
        "WITH t AS (DELETE FROM timers WHERE command_id = $1),
              w AS (DELETE FROM waits WHERE command_id = $1),
              g AS (UPDATE child_groups SET state = 'closed', settled_at = now()
                     WHERE parent_id = $1 AND state = 'open')
         SELECT id FROM commands
          WHERE parent_id = $1 AND state IN ('pending', 'running', 'waiting')
            AND parent_close = 'abort'
          ORDER BY id",
    )
    .bind(command)
    .fetch_all(&mut **tx)
    .await?)
}

/// Ends every wait of a command, with the timers of their timeouts.
pub async fn clear_waits(tx: &mut Tx<'_>, command: CommandId) -> Result<()> {
    sqlx::query(
        "WITH t AS (DELETE FROM timers WHERE command_id = $1 AND kind = 'wait_timeout')
         DELETE FROM waits WHERE command_id = $1",
    )
    .bind(command)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn timers_of(pool: &PgPool, command: CommandId) -> Result<Vec<TimerRow>> {
    const SQL: &str = concat!(
        "SELECT command_id, name, kind, due_at, cron, tz, payload, fired, last_fired_at, created_at FROM timers",
        " WHERE command_id = $1 ORDER BY due_at, name"
    );
    Ok(sqlx::query_as::<_, TimerRow>(SQL)
        .bind(command)
        .fetch_all(pool)
        .await?)
}

/// What one claim took: the due timers, oldest first, and the earliest due time after `now`
/// (`None` when nothing is pending after now, or when nothing was claimed).
pub struct Claim {
    pub timers: Vec<TimerRow>,
    pub next: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    #[sqlx(flatten)]
    timer: TimerRow,
    next: Option<DateTime<Utc>>,
}

/// Locks up to `$2` timers due at `$1`, oldest first, skipping those another scheduler holds, and
/// deletes the one-shot ones among them in the same statement: a cron timer stays, to be re-armed.
/// Each row also carries the earliest due time after `$1`, so that the scheduler knows how long to
/// sleep without asking again. All of it is undone if the claiming transaction rolls back.
const CLAIM_SQL: &str = "WITH due AS (
        SELECT command_id, name, kind, due_at, cron, tz, payload, fired, last_fired_at, created_at
          FROM timers WHERE due_at <= $1 ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED),
     gone AS (
        DELETE FROM timers t USING due
         WHERE t.command_id = due.command_id AND t.name = due.name
           AND (due.cron IS NULL OR due.tz IS NULL))
     SELECT due.*, (SELECT min(due_at) FROM timers WHERE due_at > $1) AS next
       FROM due ORDER BY due_at";

/// Claims the timers due at `now` (see [`CLAIM_SQL`]); one round trip.
pub async fn claim_due(tx: &mut Tx<'_>, now: DateTime<Utc>, limit: i64) -> Result<Claim> {
    let rows = sqlx::query_as::<_, ClaimedRow>(CLAIM_SQL)
        .bind(now)
        .bind(limit)
        .fetch_all(&mut **tx)
        .await?;
    let next = rows.first().and_then(|r| r.next);
    Ok(Claim {
        timers: rows.into_iter().map(|r| r.timer).collect(),
        next,
    })
}

/// The claim statement's plan, for showing that it stays an index scan.
pub async fn explain_claim(pool: &PgPool) -> Result<Vec<String>> {
    // Only constants go into this text.
    let sql = format!(
        "EXPLAIN {}",
        CLAIM_SQL.replace("$1", "now()").replace("$2", "500")
    );
    Ok(sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await?)
}

pub async fn rearm(
    tx: &mut Tx<'_>,
    t: &TimerRow,
    next: DateTime<Utc>,
    fired_at: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(
        "UPDATE timers SET due_at = $3, fired = fired + 1, last_fired_at = $4
          WHERE command_id = $1 AND name = $2",
    )
    .bind(t.command_id)
    .bind(&t.name)
    .bind(next)
    .bind(fired_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn delete_timer(tx: &mut Tx<'_>, t: &TimerRow) -> Result<()> {
    sqlx::query("DELETE FROM timers WHERE command_id = $1 AND name = $2")
        .bind(t.command_id)
        .bind(&t.name)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The earliest due time of any timer.
pub async fn next_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar("SELECT min(due_at) FROM timers")
        .fetch_one(pool)
        .await?)
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub struct WaitRow {
    pub event_type: String,
    pub correlation_key: String,
    pub timeout_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// Serializes everything that matches or registers waits on one (type, key), so an event and a
/// wait racing each other always meet: whichever commits second sees the first.
pub async fn lock_key(tx: &mut Tx<'_>, event_type: &str, key: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 0))")
        .bind(event_type)
        .bind(key)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn insert_wait(
    tx: &mut Tx<'_>,
    command: CommandId,
    event_type: &str,
    key: &str,
    timeout_at: Option<DateTime<Utc>>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO waits (command_id, event_type, correlation_key, timeout_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (command_id, event_type, correlation_key) DO UPDATE SET timeout_at = EXCLUDED.timeout_at",
    )
    .bind(command)
    .bind(event_type)
    .bind(key)
    .bind(timeout_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Ends one command's wait; `false` when it had already ended (the other side won).
pub async fn take_wait(
    tx: &mut Tx<'_>,
    command: CommandId,
    event_type: &str,
    key: &str,
) -> Result<bool> {
    let done = sqlx::query(
        "DELETE FROM waits WHERE command_id = $1 AND event_type = $2 AND correlation_key = $3",
    )
    .bind(command)
    .bind(event_type)
    .bind(key)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Ends every wait on (type, key) and returns the waiting commands.
pub async fn take_waiters(tx: &mut Tx<'_>, event_type: &str, key: &str) -> Result<Vec<CommandId>> {
    Ok(sqlx::query_scalar(
        "DELETE FROM waits WHERE event_type = $1 AND correlation_key = $2 RETURNING command_id",
    )
    .bind(event_type)
    .bind(key)
    .fetch_all(&mut **tx)
    .await?)
}

pub async fn waits_of(pool: &PgPool, command: CommandId) -> Result<Vec<WaitRow>> {
    Ok(sqlx::query_as::<_, WaitRow>(
        "SELECT event_type, correlation_key, timeout_at, created_at FROM waits WHERE command_id = $1 ORDER BY created_at",
    )
    .bind(command)
    .fetch_all(pool)
    .await?)
}

/// Keeps a broadcast event for the early-event window, with when it was accepted (now, when
/// it was not stamped). `false` when it was already kept: the event is a redelivery and has
/// been matched before.
pub async fn record_recent(
    tx: &mut Tx<'_>,
    event: &crate::Event,
    key: &str,
    body: &Value,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO recent_events (source, event_id, event_type, correlation_key, body, accepted_at)
         VALUES ($1, $2, $3, $4, $5, coalesce($6, clock_timestamp())) ON CONFLICT DO NOTHING",
    )
    .bind(&event.source)
    .bind(&event.id)
    .bind(&event.ty)
    .bind(key)
    .bind(body)
    .bind(event.accepted_at())
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The earliest event on (type, any of `keys`) within the window that `command` has not yet
/// received and that was accepted no earlier than the command started (`started`): an event
/// older than the command never decides it. It is no longer unmatched: its row in
/// `unmatched_events` goes in the same statement.
pub async fn early_match(
    tx: &mut Tx<'_>,
    command: CommandId,
    started: DateTime<Utc>,
    event_type: &str,
    keys: &[String],
    window: Duration,
) -> Result<Option<Value>> {
    Ok(sqlx::query_scalar(
        "WITH m AS (
             SELECT r.source, r.event_id, r.body FROM recent_events r
              WHERE r.event_type = $2 AND r.correlation_key = ANY($3)
                AND r.received_at >= clock_timestamp() - make_interval(secs => $4)
                AND coalesce(r.accepted_at, r.received_at) >= $5
                AND NOT EXISTS (SELECT 1 FROM processed_events p
                                 WHERE p.command_id = $1 AND p.source = r.source AND p.event_id = r.event_id)
              ORDER BY coalesce(r.accepted_at, r.received_at), r.received_at LIMIT 1),
              matched AS (DELETE FROM unmatched_events u USING m
                           WHERE u.source = m.source AND u.event_id = m.event_id)
         SELECT m.body FROM m",
    )
    .bind(command)
    .bind(event_type)
    .bind(keys)
    .bind(window.as_secs_f64())
    .bind(started)
    .fetch_optional(&mut **tx)
    .await?)
}

/// Waits on any of `owners` (one person's identities) that an event kept within the window,
/// correlated by another of them, would have woken had the identities been linked then: the
/// earliest such event per wait, accepted no earlier than the waiting command started, and not
/// yet received by it. Each is taken: the wait ends, and the event is no longer unmatched.
/// Returns (waiting command, event type, wait key, event body).
pub async fn take_across_link(
    tx: &mut Tx<'_>,
    owners: &[String],
    window: Duration,
) -> Result<Vec<(CommandId, String, String, Value)>> {
    Ok(sqlx::query_as(
        "WITH m AS (
             SELECT DISTINCT ON (w.command_id, w.event_type, w.correlation_key)
                    w.command_id, w.event_type, w.correlation_key, r.source, r.event_id, r.body
               FROM waits w
               JOIN commands c ON c.id = w.command_id
               JOIN recent_events r ON r.event_type = w.event_type
                                   AND r.correlation_key = ANY($1)
                                   AND r.correlation_key <> w.correlation_key
              WHERE w.correlation_key = ANY($1)
                AND r.received_at >= clock_timestamp() - make_interval(secs => $2)
                AND coalesce(r.accepted_at, r.received_at) >= c.created_at
                AND NOT EXISTS (SELECT 1 FROM processed_events p
                                 WHERE p.command_id = w.command_id AND p.source = r.source
                                   AND p.event_id = r.event_id)
              ORDER BY w.command_id, w.event_type, w.correlation_key,
                       coalesce(r.accepted_at, r.received_at)),
              taken AS (DELETE FROM waits w USING m
                         WHERE w.command_id = m.command_id AND w.event_type = m.event_type
                           AND w.correlation_key = m.correlation_key
                     RETURNING w.command_id),
              matched AS (DELETE FROM unmatched_events u USING m
                           WHERE u.source = m.source AND u.event_id = m.event_id)
         SELECT m.command_id, m.event_type, m.correlation_key, m.body FROM m
          ORDER BY m.command_id, m.event_type",
    )
    .bind(owners)
    .bind(window.as_secs_f64())
    .fetch_all(&mut **tx)
    .await?)
}

/// Forgets broadcast events older than the window.
pub async fn prune_recent(pool: &PgPool, window: Duration) -> Result<u64> {
    let done = sqlx::query(
        "DELETE FROM recent_events WHERE received_at < clock_timestamp() - make_interval(secs => $1)",
    )
    .bind(window.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Forgets unmatched events older than `retention`, at most `batch` at a time (the oldest); how
/// many it deleted.
pub async fn prune_unmatched(pool: &PgPool, retention: Duration, batch: i64) -> Result<u64> {
    let done = sqlx::query(
        "DELETE FROM unmatched_events WHERE (source, event_id) IN (
             SELECT source, event_id FROM unmatched_events
              WHERE received_at < clock_timestamp() - make_interval(secs => $1)
              ORDER BY received_at LIMIT $2)",
    )
    .bind(retention.as_secs_f64())
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

pub async fn record_unmatched(
    tx: &mut Tx<'_>,
    source: &str,
    event_id: &str,
    event_type: &str,
    key: Option<&str>,
    body: &Value,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO unmatched_events (source, event_id, event_type, correlation_key, body)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(source)
    .bind(event_id)
    .bind(event_type)
    .bind(key)
    .bind(body)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub struct UnmatchedRow {
    pub source: String,
    pub event_id: String,
    pub event_type: String,
    pub correlation_key: Option<String>,
    #[schema(value_type = Object)]
    pub body: Value,
    pub received_at: DateTime<Utc>,
}

/// A page of unmatched events: as many as fit the byte budget it was asked for.
#[derive(Debug, Clone, Default)]
pub struct UnmatchedPage {
    pub events: Vec<UnmatchedRow>,
    /// More events matched within `limit`, left out because their bodies passed the budget.
    pub truncated: bool,
}

/// Unmatched events, newest first, optionally of one type: at most `limit`, and only while
/// their bodies (as JSON text, `length(body::text)`) add up to at most `budget` bytes. The
/// first is always given, whatever its size (an event is at most 256 KiB).
///
/// The running sum is a window over the `limit` newest rows, so PostgreSQL measures at most
/// `limit` bodies. The rows it returns are those that fit, and the first one left out (the
/// second, or the one whose body passes the budget), without its body: it says `truncated`.
pub async fn unmatched(
    pool: &PgPool,
    event_type: Option<&str>,
    limit: i64,
    budget: i64,
) -> Result<UnmatchedPage> {
    #[derive(sqlx::FromRow)]
    struct Row {
        source: String,
        event_id: String,
        event_type: String,
        correlation_key: Option<String>,
        /// `None` for the first row past the budget.
        body: Option<Value>,
        received_at: DateTime<Utc>,
    }
    let rows = sqlx::query_as::<_, Row>(
        "SELECT source, event_id, event_type, correlation_key, received_at,
                CASE WHEN n = 1 OR running <= $3 THEN body END AS body
           FROM (SELECT source, event_id, event_type, correlation_key, body, received_at,
                        row_number() OVER newest AS n,
                        sum(length(body::text)) OVER newest AS running,
                        length(body::text) AS size
                   FROM unmatched_events
                  WHERE ($1::text IS NULL OR event_type = $1)
                 WINDOW newest AS (ORDER BY received_at DESC, source, event_id
                                   ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
                  ORDER BY received_at DESC, source, event_id LIMIT $2) newest
          WHERE n <= 2 OR running - size <= $3
          ORDER BY n",
    )
    .bind(event_type)
    .bind(limit)
    .bind(budget)
    .fetch_all(pool)
    .await?;
    let mut page = UnmatchedPage::default();
    for row in rows {
        match row.body {
            Some(body) => page.events.push(UnmatchedRow {
                source: row.source,
                event_id: row.event_id,
                event_type: row.event_type,
                correlation_key: row.correlation_key,
                body,
                received_at: row.received_at,
            }),
            None => page.truncated = true,
        }
    }
    Ok(page)
}
