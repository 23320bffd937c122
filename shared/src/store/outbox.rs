//! The outbox: events a step decided, written in its transaction and published after the
//! commit; what the broker did not confirm is swept and published again.

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;

use crate::domain::CommandId;

use super::*;

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
