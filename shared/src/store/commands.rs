//! Command rows: created by starts (and children, in their parent's transaction), read, and
//! locked with their events' dedupe rows at the start of a step or a batch.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use crate::domain::{Command, CommandId};

use super::*;

text_enum!(crate::decision::ParentClose, "parent_close");

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
    /// The fan-in group the child reports to; `None` for a root or a fire-and-forget child.
    pub group_name: Option<String>,
    pub parent_close: crate::decision::ParentClose,
    /// When the command counts as started: when the event that created it was accepted
    /// (`None`: now). An early event accepted before it never matches its waits.
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The version of the kind's definition it starts on.
    pub kind_version: Option<String>,
}

impl NewCommand {
    /// The row as it is inserted: `pending`, at version 0, created at `now` unless it says
    /// when.
    pub fn row(&self, now: chrono::DateTime<chrono::Utc>) -> Command {
        Command {
            id: self.id,
            kind: self.kind.clone(),
            owner: self.owner.clone(),
            parent_id: self.parent_id,
            root_id: self.root_id,
            depth: self.depth,
            state: crate::domain::CommandState::Pending,
            data: self.data.clone(),
            result: None,
            reason: None,
            ui: None,
            version: 0,
            group_name: self.group_name.clone(),
            parent_close: self.parent_close,
            created_at: self.created_at.unwrap_or(now),
            updated_at: now,
            ended_at: None,
            kind_version: self.kind_version.clone(),
        }
    }
}

/// Inserts a command in `pending` unless its id exists. Returns whether it was created.
pub async fn insert_command(tx: &mut Tx<'_>, new: &NewCommand) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO commands (id, kind, owner, parent_id, root_id, depth, state, data, group_name, parent_close, created_at, kind_version)
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8, $9, coalesce($10, now()), $11)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(new.id)
    .bind(&new.kind)
    .bind(&new.owner)
    .bind(new.parent_id)
    .bind(new.root_id)
    .bind(new.depth)
    .bind(&new.data)
    .bind(&new.group_name)
    .bind(new.parent_close)
    .bind(new.created_at)
    .bind(&new.kind_version)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Inserts children in `pending`, in one statement.
pub async fn insert_children(tx: &mut Tx<'_>, children: &[NewCommand]) -> Result<()> {
    if children.is_empty() {
        return Ok(());
    }
    let rows: Vec<Value> = children
        .iter()
        .map(|c| {
            serde_json::json!({
                "id": c.id, "kind": c.kind, "owner": c.owner, "parent_id": c.parent_id,
                "root_id": c.root_id, "depth": c.depth, "data": c.data,
                "group_name": c.group_name, "parent_close": c.parent_close,
                "created_at": c.created_at, "kind_version": c.kind_version,
            })
        })
        .collect();
    sqlx::query(
        "INSERT INTO commands (id, kind, owner, parent_id, root_id, depth, state, data, group_name, parent_close, created_at, kind_version)
         SELECT (e->>'id')::uuid, e->>'kind', e->>'owner', (e->>'parent_id')::uuid, (e->>'root_id')::uuid,
                (e->>'depth')::int, 'pending', e->'data', e->>'group_name', e->>'parent_close',
                coalesce((e->>'created_at')::timestamptz, now()), e->>'kind_version'
           FROM jsonb_array_elements($1) AS e",
    )
    .bind(Value::Array(rows))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The columns of a [`Command`], in one place for every statement that returns one.
macro_rules! command_columns {
    () => {
        "id, kind, owner, parent_id, root_id, depth, state, data, result, reason, ui, version, group_name, parent_close, created_at, updated_at, ended_at, kind_version"
    };
}

/// Whether the command `c` is a child whose group's reports are `settled` (see
/// [`Locked::counts_itself`]), for every statement that locks a command for an event.
macro_rules! counts_itself {
    () => {
        // A scalar subquery, one primary-key probe per row: an EXISTS may be planned as a
        // hashed subplan, which reads every settled group of every command for each statement.
        "coalesce((SELECT g.reports = 'settled' FROM child_groups g WHERE g.parent_id = c.parent_id AND g.name = c.group_name), false) AS counts_itself"
    };
}

/// A command and all its descendants (at most `limit` rows), parents before children. Trees
/// move to the archive whole, so a command not in the live table is read, with its tree, from
/// the archive.
pub async fn subtree(pool: &PgPool, id: CommandId, limit: i64) -> Result<Vec<Command>> {
    const LIVE: &str = concat!(
        "WITH RECURSIVE tree AS (
             SELECT c.*, 0 AS level FROM commands c WHERE c.id = $1
             UNION ALL
             SELECT c.*, t.level + 1 FROM commands c JOIN tree t ON c.parent_id = t.id
         ) SELECT ",
        command_columns!(),
        " FROM tree ORDER BY level, id LIMIT $2"
    );
    const ARCHIVED: &str = concat!(
        "WITH RECURSIVE tree AS (
             SELECT c.*, 0 AS level FROM archive.commands c WHERE c.id = $1
             UNION ALL
             SELECT c.*, t.level + 1 FROM archive.commands c JOIN tree t ON c.parent_id = t.id
         ) SELECT ",
        command_columns!(),
        " FROM tree ORDER BY level, id LIMIT $2"
    );
    for sql in [LIVE, ARCHIVED] {
        let rows = sqlx::query_as::<_, Command>(sql)
            .bind(id)
            .bind(limit)
            .fetch_all(pool)
            .await?;
        if !rows.is_empty() {
            return Ok(rows);
        }
    }
    Ok(Vec::new())
}

/// Records that a broadcast event started `kind`. `false` when it already did.
pub async fn record_event_start(
    tx: &mut Tx<'_>,
    source: &str,
    event_id: &str,
    kind: &str,
    command: CommandId,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO event_starts (source, event_id, kind, command_id) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(source)
    .bind(event_id)
    .bind(kind)
    .bind(command)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A command's row, locked by [`lock_and_mark`].
#[derive(sqlx::FromRow)]
pub struct Locked {
    #[sqlx(flatten)]
    pub command: Command,
    /// `false` when the event already was applied (a redelivery or a replay, which must change
    /// nothing).
    pub fresh: bool,
    /// The command is a child whose group's reports are `settled`: when it ends, it counts
    /// itself into the group instead of sending its parent an event.
    pub counts_itself: bool,
}

/// Locks a command's row until the transaction ends and, in the same round trip, records that
/// `(source, event_id)` is applied to it, and reads how it reports to its group. `None` when the
/// command does not exist.
pub(crate) async fn lock_and_mark(
    tx: &mut Tx<'_>,
    id: CommandId,
    source: &str,
    event_id: &str,
) -> Result<Option<Locked>> {
    const SQL: &str = concat!(
        "WITH p AS (INSERT INTO processed_events (command_id, source, event_id) VALUES ($1, $2, $3)",
        " ON CONFLICT DO NOTHING RETURNING 1)",
        " SELECT ",
        command_columns!(),
        ", EXISTS (SELECT 1 FROM p) AS fresh, ",
        counts_itself!(),
        " FROM commands c WHERE c.id = $1 FOR UPDATE OF c"
    );
    Ok(sqlx::query_as::<_, Locked>(SQL)
        .bind(id)
        .bind(source)
        .bind(event_id)
        .fetch_optional(&mut **tx)
        .await?)
}

/// A command's row locked by [`lock_and_mark_batch`], with its events of the batch that were
/// new when they were marked.
#[derive(sqlx::FromRow)]
pub struct LockedBatch {
    #[sqlx(flatten)]
    pub command: Command,
    /// `source` + U+001F + `event_id` of each of the batch's events for this command that had
    /// not been applied before (each listed once, however often it came).
    pub fresh: Vec<String>,
    /// As in [`Locked`].
    pub counts_itself: bool,
    /// The transaction's `now()`.
    pub now: DateTime<Utc>,
}

/// The key of an event in [`LockedBatch::fresh`].
pub fn event_key(source: &str, event_id: &str) -> String {
    format!("{source}\u{1f}{event_id}")
}

/// [`lock_and_mark`] for a whole batch, in one round trip: records every event as applied to its
/// command (`commands`, `sources` and `event_ids` side by side, in the batch's order), and locks
/// the commands' rows in ascending id order. A command that does not exist is missing from the
/// result (which is in ascending id order) and its events are not marked, so that
/// [`lock_and_mark`] can handle them afterwards (a root's start inserts its row first).
pub async fn lock_and_mark_batch(
    tx: &mut Tx<'_>,
    commands: &[CommandId],
    sources: &[&str],
    event_ids: &[&str],
) -> Result<Vec<LockedBatch>> {
    const SQL: &str = concat!(
        "WITH p AS (INSERT INTO processed_events (command_id, source, event_id)",
        " SELECT e.* FROM unnest($1::uuid[], $2::text[], $3::text[]) AS e(command_id, source, event_id)",
        " WHERE EXISTS (SELECT 1 FROM commands x WHERE x.id = e.command_id)",
        " ON CONFLICT DO NOTHING RETURNING command_id, source, event_id)",
        " SELECT ",
        command_columns!(),
        ", ARRAY(SELECT p.source || chr(31) || p.event_id FROM p WHERE p.command_id = c.id) AS fresh, ",
        counts_itself!(),
        ", now() AS now FROM commands c WHERE c.id = ANY($1) ORDER BY c.id FOR UPDATE OF c"
    );
    let ids: Vec<uuid::Uuid> = commands.iter().map(CommandId::as_uuid).collect();
    Ok(sqlx::query_as::<_, LockedBatch>(SQL)
        .bind(&ids)
        .bind(sources)
        .bind(event_ids)
        .fetch_all(&mut **tx)
        .await?)
}

/// A live command as this transaction sees it, without locking it.
pub(crate) async fn command_in(tx: &mut Tx<'_>, id: CommandId) -> Result<Option<Command>> {
    const SQL: &str = concat!(
        "SELECT ",
        command_columns!(),
        " FROM commands WHERE id = $1"
    );
    Ok(sqlx::query_as::<_, Command>(SQL)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?)
}

/// A command, live or archived.
pub async fn get_command(pool: &PgPool, id: CommandId) -> Result<Option<Command>> {
    const SQL: &str = concat!(
        "SELECT ",
        command_columns!(),
        " FROM commands WHERE id = $1",
        " UNION ALL SELECT ",
        command_columns!(),
        " FROM archive.commands WHERE id = $1 LIMIT 1"
    );
    Ok(sqlx::query_as::<_, Command>(SQL)
        .bind(id)
        .fetch_optional(pool)
        .await?)
}
