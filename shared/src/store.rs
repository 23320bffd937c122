//! PostgreSQL: the pool, migrations, and every statement cmdflow runs.
//!
//! Writes under a lock are still fenced: [`update_command`] only succeeds at the version the
//! transaction read, so a worker that lost its lock to a pause cannot overwrite a newer state.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use crate::config::redact_url;
use crate::domain::{Command, CommandId, CommandState};

pub type Tx<'a> = Transaction<'a, Postgres>;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to PostgreSQL at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("command {id} changed under us (expected version {version})")]
    Conflict { id: CommandId, version: i64 },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Opens a pool and checks the server answers, so a wrong URL fails at start-up with one line.
pub async fn connect(url: &str, pool_size: u32) -> Result<PgPool> {
    let connect_err = |source| StoreError::Connect {
        url: redact_url(url),
        source,
    };
    let options: PgConnectOptions = url.parse().map_err(connect_err)?;
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(connect_err)?;
    Ok(pool)
}

pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

pub async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// A command to create, as decided by a start event.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub id: CommandId,
    pub kind: String,
    pub owner: String,
    pub parent_id: Option<CommandId>,
    pub root_id: CommandId,
    pub depth: i32,
    pub data: Value,
}

/// Inserts a command in `pending` unless its id exists. Returns whether it was created.
pub async fn insert_command(tx: &mut Tx<'_>, new: &NewCommand) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO commands (id, kind, owner, parent_id, root_id, depth, state, data)
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(new.id)
    .bind(&new.kind)
    .bind(&new.owner)
    .bind(new.parent_id)
    .bind(new.root_id)
    .bind(new.depth)
    .bind(&new.data)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Reads a command and locks its row until the transaction ends.
pub async fn lock_command(tx: &mut Tx<'_>, id: CommandId) -> Result<Option<Command>> {
    const SQL: &str = concat!(
        "SELECT id, kind, owner, parent_id, root_id, depth, state, data, result, reason, ui, version, created_at, updated_at, ended_at",
        " FROM commands WHERE id = $1 FOR UPDATE"
    );
    Ok(sqlx::query_as::<_, Command>(SQL)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?)
}

pub async fn get_command(pool: &PgPool, id: CommandId) -> Result<Option<Command>> {
    const SQL: &str = concat!(
        "SELECT id, kind, owner, parent_id, root_id, depth, state, data, result, reason, ui, version, created_at, updated_at, ended_at",
        " FROM commands WHERE id = $1"
    );
    Ok(sqlx::query_as::<_, Command>(SQL)
        .bind(id)
        .fetch_optional(pool)
        .await?)
}

/// Records that `(source, event_id)` was applied to `command`. Returns `false` when it already was:
/// the event is a redelivery or a replay and must change nothing.
pub async fn mark_processed(
    tx: &mut Tx<'_>,
    command: CommandId,
    source: &str,
    event_id: &str,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO processed_events (command_id, source, event_id) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(command)
    .bind(source)
    .bind(event_id)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Writes the new state of a command, fenced by the version the transaction read.
/// Zero rows affected is a conflict, never a success.
pub async fn update_command(tx: &mut Tx<'_>, next: &Command, seen_version: i64) -> Result<()> {
    let done = sqlx::query(
        "UPDATE commands
            SET state = $3, data = $4, result = $5, reason = $6, ui = $7,
                version = version + 1, updated_at = now(),
                ended_at = CASE WHEN $3 IN ('completed'::command_state, 'failed'::command_state, 'aborted'::command_state)
                                THEN coalesce(ended_at, now()) END
          WHERE id = $1 AND version = $2",
    )
    .bind(next.id)
    .bind(seen_version)
    .bind(next.state)
    .bind(&next.data)
    .bind(&next.result)
    .bind(&next.reason)
    .bind(&next.ui)
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::Conflict {
            id: next.id,
            version: seen_version,
        });
    }
    Ok(())
}

/// One line of a command's history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryEntry {
    pub entry: EntryKind,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub from_state: Option<CommandState>,
    pub to_state: Option<CommandState>,
    pub detail: Option<Value>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// An event came in and was applied.
    Received,
    /// An event went out (through the outbox).
    Emitted,
    /// The state moved.
    StateChanged,
    /// An event came in and changed nothing; `detail.reason` says why.
    Ignored,
}

/// Appends history lines for `command` at `version`, in order, in one statement.
pub async fn append_history(
    tx: &mut Tx<'_>,
    command: CommandId,
    version: i64,
    entries: &[HistoryEntry],
) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO command_events (command_id, version, entry, event_id, event_type, from_state, to_state, detail)
         SELECT $1, $2, e->>'entry', e->>'event_id', e->>'event_type',
                (e->>'from_state')::command_state, (e->>'to_state')::command_state,
                nullif(e->'detail', 'null'::jsonb)
           FROM jsonb_array_elements($3) WITH ORDINALITY AS r(e, ord)
          ORDER BY r.ord",
    )
    .bind(command)
    .bind(version)
    .bind(serde_json::to_value(entries).unwrap_or(Value::Null))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub struct HistoryRow {
    pub seq: i64,
    pub version: i64,
    #[schema(value_type = String)]
    pub entry: String,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub from_state: Option<CommandState>,
    pub to_state: Option<CommandState>,
    #[schema(value_type = Option<Object>)]
    pub detail: Option<Value>,
    pub at: DateTime<Utc>,
}

/// A page of a command's history, oldest first, after `after_seq`.
pub async fn history(
    pool: &PgPool,
    command: CommandId,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<HistoryRow>> {
    Ok(sqlx::query_as::<_, HistoryRow>(
        "SELECT seq, version, entry, event_id, event_type, from_state, to_state, detail, at
           FROM command_events WHERE command_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(command)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// An event waiting in the outbox.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub command_id: CommandId,
    pub event_type: String,
    pub body: Value,
}

/// Adds events to the outbox in the transaction that decided them. Returns the rows.
pub async fn insert_outbox(
    tx: &mut Tx<'_>,
    command: CommandId,
    events: &[crate::contract::Event],
) -> Result<Vec<OutboxRow>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let bodies = serde_json::to_value(events).unwrap_or(Value::Null);
    Ok(sqlx::query_as::<_, OutboxRow>(
        "INSERT INTO outbox (command_id, event_id, event_type, body)
         SELECT $1, r.body->>'id', r.body->>'type', r.body
           FROM jsonb_array_elements($2) WITH ORDINALITY AS r(body, ord)
          ORDER BY r.ord
         RETURNING id, command_id, event_type, body",
    )
    .bind(command)
    .bind(bodies)
    .fetch_all(&mut **tx)
    .await?)
}

pub async fn delete_outbox(pool: &PgPool, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Locks up to `limit` outbox rows older than `older_than` that no other sweeper holds.
pub async fn claim_stale_outbox(
    tx: &mut Tx<'_>,
    older_than: Duration,
    limit: i64,
) -> Result<Vec<OutboxRow>> {
    Ok(sqlx::query_as::<_, OutboxRow>(
        "SELECT id, command_id, event_type, body FROM outbox
          WHERE created_at < now() - make_interval(secs => $1)
          ORDER BY created_at, id
          LIMIT $2
          FOR UPDATE SKIP LOCKED",
    )
    .bind(older_than.as_secs_f64())
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?)
}

pub async fn delete_outbox_in(tx: &mut Tx<'_>, ids: &[i64]) -> Result<()> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn outbox_backlog(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?)
}
