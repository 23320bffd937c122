//! Archival statements: which trees are eligible (every node ended, the root ended longer ago
//! than its kind's retention, and no message of the tree still waits for delivery: the sender
//! reads only live rows), and moving a batch of whole trees to the `archive` schema in the
//! caller's transaction, so a batch moves completely or not at all.

use std::time::Duration;

use sqlx::PgPool;

use super::{Result, Tx};
use crate::domain::CommandId;

/// How long ended trees stay live, by the root's kind.
#[derive(Debug, Clone)]
pub struct Retention {
    pub default: Duration,
    pub by_kind: Vec<(String, Duration)>,
}

impl Retention {
    fn arrays(&self) -> (Vec<String>, Vec<f64>) {
        self.by_kind
            .iter()
            .map(|(k, d)| (k.clone(), d.as_secs_f64()))
            .unzip()
    }
}

const ELIGIBLE: &str = "
    FROM commands c
   WHERE c.parent_id IS NULL AND c.ended_at IS NOT NULL
     AND c.ended_at < now() - make_interval(secs => coalesce(
           (SELECT k.secs FROM unnest($1::text[], $2::float8[]) AS k(kind, secs) WHERE k.kind = c.kind), $3))
     AND NOT EXISTS (SELECT 1 FROM commands d
                      WHERE d.root_id = c.id AND d.state IN ('pending', 'running', 'waiting'))
     AND NOT EXISTS (SELECT 1 FROM commands d JOIN messages m ON m.command_id = d.id
                      WHERE d.root_id = c.id AND m.delivery = 'pending')";

/// How many trees are eligible now.
pub async fn eligible(pool: &PgPool, retention: &Retention) -> Result<i64> {
    let (kinds, secs) = retention.arrays();
    let sql = format!("SELECT count(*) {ELIGIBLE}");
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(kinds)
        .bind(secs)
        .bind(retention.default.as_secs_f64())
        .fetch_one(pool)
        .await?)
}

/// What one batch moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    pub trees: i64,
    pub commands: i64,
    pub events: i64,
    pub messages: i64,
}

impl Moved {
    pub fn rows(&self) -> i64 {
        self.commands + self.events + self.messages
    }
}

/// Moves up to `batch` eligible trees, whole, inside `tx`. Trees other archivers hold are
/// skipped; the tree's rows are locked, so a worker cannot write to one while it moves.
pub async fn move_batch(tx: &mut Tx<'_>, retention: &Retention, batch: i64) -> Result<Moved> {
    let (kinds, secs) = retention.arrays();
    let sql =
        format!("SELECT c.id {ELIGIBLE} ORDER BY c.ended_at LIMIT $4 FOR UPDATE OF c SKIP LOCKED");
    let roots: Vec<CommandId> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(kinds)
        .bind(secs)
        .bind(retention.default.as_secs_f64())
        .bind(batch)
        .fetch_all(&mut **tx)
        .await?;
    if roots.is_empty() {
        return Ok(Moved::default());
    }
    let ids: Vec<CommandId> = sqlx::query_scalar(
        "SELECT id FROM commands WHERE root_id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(&roots)
    .fetch_all(&mut **tx)
    .await?;
    let commands = sqlx::query(
        "INSERT INTO archive.commands SELECT c.*, now() FROM commands c WHERE c.id = ANY($1)",
    )
    .bind(&ids)
    .execute(&mut **tx)
    .await?
    .rows_affected() as i64;
    let events = sqlx::query("INSERT INTO archive.command_events SELECT * FROM command_events WHERE command_id = ANY($1)")
        .bind(&ids)
        .execute(&mut **tx)
        .await?
        .rows_affected() as i64;
    let messages = sqlx::query(
        "INSERT INTO archive.messages SELECT * FROM messages WHERE command_id = ANY($1)",
    )
    .bind(&ids)
    .execute(&mut **tx)
    .await?
    .rows_affected() as i64;
    for sql in [
        "DELETE FROM command_events WHERE command_id = ANY($1)",
        "DELETE FROM messages WHERE command_id = ANY($1)",
        "DELETE FROM processed_events WHERE command_id = ANY($1)",
        "DELETE FROM child_groups WHERE parent_id = ANY($1)",
        "DELETE FROM timers WHERE command_id = ANY($1)",
        "DELETE FROM waits WHERE command_id = ANY($1)",
        "DELETE FROM commands WHERE id = ANY($1)",
    ] {
        sqlx::query(sql).bind(&ids).execute(&mut **tx).await?;
    }
    Ok(Moved {
        trees: roots.len() as i64,
        commands,
        events,
        messages,
    })
}
