//! A command's history: every event it received and what became of it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;

use crate::domain::{CommandId, CommandState};

use super::*;

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
pub(crate) async fn append_history(
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
           FROM (SELECT * FROM command_events WHERE command_id = $1 AND seq > $2
                 UNION ALL
                 SELECT * FROM archive.command_events WHERE command_id = $1 AND seq > $2) h
          ORDER BY seq LIMIT $3",
    )
    .bind(command)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
