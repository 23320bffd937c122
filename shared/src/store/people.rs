//! Statements about people: identities joined by `owner.linked`, messages, and the owner feed
//! (history, pending conditions, messages), each read by index.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Result, Tx};
use crate::domain::{CommandId, CommandState};

/// Where a message stands (`messages.delivery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Shown in the app only.
    InApp,
    /// An e-mail to send: due, or waiting for its next attempt (`next_attempt_at`).
    Pending,
    /// The SMTP server took it.
    Sent,
    /// No SMTP server configured: shown in the app instead.
    Kept,
    /// Given up, with its reason (`last_error`): a template that did not render, an address
    /// the SMTP server refused for good, or the last attempt spent. Not counted as unread.
    Failed,
}

// The words are the values in `messages.delivery`.
text_enum!(Delivery, "delivery state", {
    InApp => "in_app",
    Pending => "pending",
    Sent => "sent",
    Kept => "kept",
    Failed => "failed",
});

/// A rendered message to store.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub owner: String,
    pub template: String,
    pub channel: &'static str,
    pub subject: String,
    pub body: String,
    pub email_to: Option<String>,
    pub delivery: Delivery,
    /// Why the message failed before it was stored (its template did not render), with
    /// `delivery` [`Delivery::Failed`].
    pub failed_reason: Option<String>,
}

/// Stores a message once per trigger key; a redelivered trigger stores nothing.
pub async fn insert_message(
    tx: &mut Tx<'_>,
    m: &NewMessage,
    command: CommandId,
    trigger: &str,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO messages (id, owner, command_id, trigger_key, template, channel, subject, body, email_to, delivery,
                               last_error, failed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, CASE WHEN $11::text IS NULL THEN NULL ELSE now() END)
         ON CONFLICT (trigger_key) DO NOTHING",
    )
    .bind(Uuid::now_v7())
    .bind(&m.owner)
    .bind(command)
    .bind(trigger)
    .bind(&m.template)
    .bind(m.channel)
    .bind(&m.subject)
    .bind(&m.body)
    .bind(&m.email_to)
    .bind(m.delivery.as_str())
    .bind(&m.failed_reason)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The open commands of one of `kinds` owned by any of `owners`: their kind and `data.stage`.
pub async fn open_in(
    tx: &mut Tx<'_>,
    owners: &[String],
    kinds: &[String],
) -> Result<Vec<(String, Option<String>)>> {
    Ok(sqlx::query_as(
        "SELECT kind, data->>'stage' FROM commands
          WHERE owner = ANY($1) AND kind = ANY($2) AND state IN ('pending', 'running', 'waiting')
          ORDER BY created_at",
    )
    .bind(owners)
    .bind(kinds)
    .fetch_all(&mut **tx)
    .await?)
}

/// Joins two identities of one person: `from` (say, a cookie) now belongs to whoever `to` is.
/// Every id already linked to `from`'s person follows.
pub async fn link(
    tx: &mut Tx<'_>,
    from: &str,
    to: &str,
    by: &str,
    event_id: &str,
) -> Result<String> {
    let person: String =
        sqlx::query_scalar("SELECT coalesce((SELECT person FROM identities WHERE owner = $1), $1)")
            .bind(to)
            .fetch_one(&mut **tx)
            .await?;
    let old: String =
        sqlx::query_scalar("SELECT coalesce((SELECT person FROM identities WHERE owner = $1), $1)")
            .bind(from)
            .fetch_one(&mut **tx)
            .await?;
    sqlx::query("UPDATE identities SET person = $2, linked_at = now() WHERE person = $1")
        .bind(&old)
        .bind(&person)
        .execute(&mut **tx)
        .await?;
    let mut owners = vec![from, to, old.as_str()];
    owners.sort_unstable();
    owners.dedup();
    for owner in owners {
        sqlx::query(
            "INSERT INTO identities (owner, person, linked_by) VALUES ($1, $2, $3)
             ON CONFLICT (owner) DO UPDATE SET person = EXCLUDED.person, linked_at = now(),
                                               linked_by = EXCLUDED.linked_by",
        )
        .bind(owner)
        .bind(&person)
        .bind(by)
        .execute(&mut **tx)
        .await?;
    }
    // Joining two people's data is audited, under who did it.
    sqlx::query(
        "INSERT INTO ops_audit (actor, action, filter, count, detail)
         VALUES ($1, 'owner.linked', jsonb_build_object('from', $2::text, 'to', $3::text, 'event_id', $4::text), 1, $5)",
    )
    .bind(by)
    .bind(from)
    .bind(to)
    .bind(event_id)
    .bind(format!("{from} joined {person}"))
    .execute(&mut **tx)
    .await?;
    Ok(person)
}

/// Every owner id of the person `owner` belongs to (at least `owner` itself), sorted.
pub async fn owners_of<'e>(db: impl sqlx::PgExecutor<'e>, owner: &str) -> Result<Vec<String>> {
    let mut owners: Vec<String> = sqlx::query_scalar(
        "SELECT i.owner FROM identities i
          WHERE i.person = coalesce((SELECT person FROM identities WHERE owner = $1), $1)",
    )
    .bind(owner)
    .fetch_all(db)
    .await?;
    if !owners.iter().any(|o| o == owner) {
        owners.push(owner.to_owned());
    }
    owners.sort();
    Ok(owners)
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeedCommand {
    pub command_id: CommandId,
    pub kind: String,
    pub owner: String,
    pub state: CommandState,
    #[schema(value_type = Object)]
    pub data: Value,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MessageRow {
    pub id: Uuid,
    pub owner: String,
    pub command_id: CommandId,
    pub template: String,
    /// `in_app` or `email`.
    pub channel: String,
    pub subject: String,
    pub body: String,
    pub delivery: Delivery,
    pub read: bool,
    pub created_at: DateTime<Utc>,
}

/// Everything the feed shows, read in one round trip: the person's owner ids, a page of history,
/// the commands carrying UI hints, and the latest messages. Hints and messages are read from the
/// archive too, whatever `include_archived` says: what a person still needs does not vanish
/// because ops ran the archiver; `include_archived` only widens the history.
pub struct FeedRows {
    pub owners: Vec<String>,
    /// The person's name, from the latest of their commands whose data holds one.
    pub name: Option<String>,
    pub history: Vec<FeedCommand>,
    pub hinted: Vec<(CommandId, Value)>,
    pub messages: Vec<MessageRow>,
}

pub async fn feed(
    pool: &PgPool,
    owner: &str,
    kind: Option<&str>,
    before: Option<(DateTime<Utc>, CommandId)>,
    limit: i64,
    include_archived: bool,
) -> Result<FeedRows> {
    let (before_at, before_id) = before.unzip();
    let (owners, name, history, hinted, messages): (Vec<String>, Option<String>, Value, Value, Value) = sqlx::query_as(
        "WITH p AS (SELECT coalesce((SELECT person FROM identities WHERE owner = $1), $1) AS person),
              o AS (SELECT array_agg(DISTINCT x ORDER BY x) AS owners
                      FROM (SELECT i.owner AS x FROM identities i, p WHERE i.person = p.person
                            UNION ALL SELECT $1) s)
         SELECT o.owners,
                (SELECT n.data->>'name' FROM (SELECT owner, data, created_at FROM commands
                                              UNION ALL
                                              SELECT owner, data, created_at FROM archive.commands) n
                  WHERE n.owner = ANY(o.owners) AND jsonb_typeof(n.data->'name') = 'string'
                    AND btrim(n.data->>'name') <> ''
                  ORDER BY n.created_at DESC LIMIT 1),
                (SELECT coalesce(json_agg(h), '[]'::json) FROM (
                    SELECT c.id AS command_id, c.kind, c.owner, c.state, c.data, c.result, c.created_at, c.ended_at
                      FROM (SELECT id, kind, owner, state, data, result, created_at, ended_at, parent_id FROM commands
                            UNION ALL
                            SELECT id, kind, owner, state, data, result, created_at, ended_at, parent_id
                              FROM archive.commands WHERE $6) c
                     WHERE c.owner = ANY(o.owners) AND c.parent_id IS NULL
                       AND ($2::text IS NULL OR c.kind = $2)
                       AND ($3::timestamptz IS NULL OR (c.created_at, c.id) < ($3, $4))
                     ORDER BY c.created_at DESC, c.id DESC LIMIT $5) h),
                (SELECT coalesce(json_agg(json_build_array(u.id, u.ui)), '[]'::json) FROM (
                    SELECT c.id, c.ui FROM (SELECT id, owner, ui, updated_at FROM commands
                                            UNION ALL
                                            SELECT id, owner, ui, updated_at FROM archive.commands) c
                     WHERE c.owner = ANY(o.owners) AND c.ui IS NOT NULL
                     ORDER BY c.updated_at DESC, c.id DESC LIMIT 100) u),
                (SELECT coalesce(json_agg(m), '[]'::json) FROM (
                    SELECT g.id, g.owner, g.command_id, g.template, g.channel, g.subject, g.body, g.delivery,
                           g.read_at IS NOT NULL AS read, g.created_at
                      FROM (SELECT id, owner, command_id, template, channel, subject, body, delivery,
                                   read_at, created_at FROM messages
                            UNION ALL
                            SELECT id, owner, command_id, template, channel, subject, body, delivery,
                                   read_at, created_at FROM archive.messages) g
                     WHERE g.owner = ANY(o.owners)
                     ORDER BY g.created_at DESC, g.id DESC LIMIT 50) m)
           FROM o",
    )
    .bind(owner)
    .bind(kind)
    .bind(before_at)
    .bind(before_id)
    .bind(limit)
    .bind(include_archived)
    .fetch_one(pool)
    .await?;
    let decode = |what: &str, e: serde_json::Error| {
        super::StoreError::Database(sqlx::Error::Decode(format!("feed {what}: {e}").into()))
    };
    Ok(FeedRows {
        owners,
        name,
        history: serde_json::from_value(history).map_err(|e| decode("history", e))?,
        hinted: serde_json::from_value(hinted).map_err(|e| decode("hints", e))?,
        messages: serde_json::from_value(messages).map_err(|e| decode("messages", e))?,
    })
}

/// Marks a message read, live or archived (the feed shows both); `false` when the person has no
/// such message.
pub async fn mark_read(pool: &PgPool, owners: &[String], id: Uuid) -> Result<bool> {
    let done: i64 = sqlx::query_scalar(
        "WITH live AS (UPDATE messages SET read_at = coalesce(read_at, now())
                        WHERE id = $1 AND owner = ANY($2) RETURNING 1),
              archived AS (UPDATE archive.messages SET read_at = coalesce(read_at, now())
                            WHERE id = $1 AND owner = ANY($2) RETURNING 1)
         SELECT (SELECT count(*) FROM live) + (SELECT count(*) FROM archived)",
    )
    .bind(id)
    .bind(owners)
    .fetch_one(pool)
    .await?;
    Ok(done == 1)
}

/// A message as ops see it: where its delivery stands, and why it failed.
#[derive(Debug, Clone, sqlx::FromRow, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MailRow {
    pub id: Uuid,
    pub owner: String,
    pub command_id: CommandId,
    pub template: String,
    /// `in_app` or `email`.
    pub channel: String,
    pub subject: String,
    pub email_to: Option<String>,
    pub delivery: Delivery,
    /// Attempts at sending it begun so far.
    pub attempts: i32,
    /// When it is tried again (a pending e-mail that failed an attempt).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed; for a failed message, why it was given up.
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
}

/// Messages in `delivery`, newest first: the failed ones by when they failed, the others by
/// when they were made. At most `limit`.
pub async fn messages_in(pool: &PgPool, delivery: Delivery, limit: i64) -> Result<Vec<MailRow>> {
    Ok(sqlx::query_as(
        "SELECT id, owner, command_id, template, channel, subject, email_to, delivery, attempts,
                next_attempt_at, last_error AS reason, created_at, sent_at, failed_at
           FROM messages WHERE delivery = $1
          ORDER BY CASE WHEN $1 = 'failed' THEN failed_at END DESC NULLS LAST, created_at DESC
          LIMIT $2",
    )
    .bind(delivery.as_str())
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// How many messages are failed and how many e-mails pending, for the gauges.
pub async fn count_failed_and_pending(pool: &PgPool) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT count(*) FROM messages WHERE delivery = 'failed'),
                (SELECT count(*) FROM messages WHERE delivery = 'pending')",
    )
    .fetch_one(pool)
    .await?)
}
