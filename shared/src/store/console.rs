//! Statements for the web console: the overview's numbers (throughput, failures, backlogs,
//! timers, people per funnel stage) and the command search, newest first with a keyset cursor.
//!
//! The search builds its statement from the filters that are present, so each combination gets
//! a plan of its own that can use its index (`owner`, `kind`, the terminal-failure partial index,
//! or plain recency; see `migrations/0007_console.sql`), instead of one statement with
//! `$n IS NULL OR …` arms that a generic plan cannot index.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;

use super::Result;
use crate::domain::{CommandId, CommandState};

/// The width of one bucket of the overview's throughput series.
pub const BUCKET_SECONDS: i64 = 5;
/// How far back the overview's throughput looks.
pub const WINDOW_SECONDS: i64 = 60;

/// Events processed and failed in one bucket of the recent window.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ThroughputBucket {
    /// Start of the bucket.
    pub at: DateTime<Utc>,
    pub processed: i64,
    pub failed: i64,
}

/// People (open funnel commands) in one stage of one funnel.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FunnelStage {
    /// The funnel's name, e.g. `visitor_to_member` (its kind is `funnel.{name}`).
    pub funnel: String,
    pub stage: String,
    pub people: i64,
}

/// The overview's numbers that PostgreSQL knows.
#[derive(Debug, Clone)]
pub struct OverviewRows {
    pub at: DateTime<Utc>,
    /// Oldest bucket first; [`WINDOW_SECONDS`] / [`BUCKET_SECONDS`] of them.
    pub series: Vec<ThroughputBucket>,
    /// Failed attempts that were retried (`event_attempts`) in the window.
    pub retried: i64,
    /// Events that went to dead letters without retries (permanent errors) in the window.
    pub dead_lettered: i64,
    pub outbox_backlog: i64,
    pub dead_letters_open: i64,
    pub timers_overdue: i64,
    pub timers_due_next_hour: i64,
    /// Events parked until a worker with their command's definition version takes them.
    pub waiting_for_definition: i64,
    pub funnels: Vec<FunnelStage>,
}

/// Everything the overview reads from PostgreSQL, in one round trip. Each count reads an index:
/// the BRIN indexes on `processed_events(processed_at)` and `event_attempts(at)`,
/// `dead_letters_failed`, `dead_letters_open`, `timers_due` and `commands_one_open_funnel`.
///
/// It runs without JIT: its cost estimate is above PostgreSQL's JIT threshold on a large
/// database, and compiling it took 500 ms of a 600 ms answer on 1,000,000 commands.
pub async fn overview(pool: &PgPool) -> Result<OverviewRows> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;
    #[allow(clippy::type_complexity)]
    let row: (
        DateTime<Utc>,
        Value,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        Value,
    ) = sqlx::query_as(
        "WITH now AS (SELECT now() AS t),
              buckets AS (
                SELECT g AS n, now.t - make_interval(secs => ($1 * (g + 1))::float8) AS from_at
                  FROM now, generate_series(0, $2 / $1 - 1) g),
              done AS (
                SELECT floor(extract(epoch FROM now.t - p.processed_at) / $1)::int AS n, count(*) AS c
                  FROM processed_events p, now
                 WHERE p.processed_at > now.t - make_interval(secs => $2::float8)
                 GROUP BY 1),
              retried AS (
                SELECT floor(extract(epoch FROM now.t - a.at) / $1)::int AS n, count(*) AS c
                  FROM event_attempts a, now
                 WHERE a.at > now.t - make_interval(secs => $2::float8)
                 GROUP BY 1),
              dead AS (
                SELECT floor(extract(epoch FROM now.t - d.last_failed_at) / $1)::int AS n, count(*) AS c
                  FROM dead_letters d, now
                 WHERE d.last_failed_at > now.t - make_interval(secs => $2::float8)
                   AND d.error_class <> 'retries_exhausted'
                 GROUP BY 1)
         SELECT now.t,
                (SELECT coalesce(json_agg(json_build_object(
                            'at', b.from_at,
                            'processed', coalesce(done.c, 0),
                            'failed', coalesce(retried.c, 0) + coalesce(dead.c, 0)) ORDER BY b.n DESC), '[]'::json)
                   FROM buckets b
                   LEFT JOIN done ON done.n = b.n
                   LEFT JOIN retried ON retried.n = b.n
                   LEFT JOIN dead ON dead.n = b.n),
                (SELECT coalesce(sum(c), 0)::bigint FROM retried),
                (SELECT coalesce(sum(c), 0)::bigint FROM dead),
                (SELECT count(*) FROM outbox),
                (SELECT count(*) FROM dead_letters WHERE state = 'dead'),
                (SELECT count(*) FROM timers WHERE due_at <= now.t),
                (SELECT count(*) FROM timers WHERE due_at > now.t AND due_at <= now.t + interval '1 hour'),
                (SELECT count(*) FROM parked_events WHERE waiting_for IS NOT NULL),
                (SELECT coalesce(json_agg(f ORDER BY f.funnel, f.people DESC, f.stage), '[]'::json) FROM (
                    SELECT substr(kind, 8) AS funnel, coalesce(data->>'stage', '(starting)') AS stage,
                           count(*) AS people
                      FROM commands
                     WHERE kind LIKE 'funnel.%' AND state IN ('pending', 'running', 'waiting')
                     GROUP BY 1, 2) f)
           FROM now",
    )
    .bind(BUCKET_SECONDS)
    .bind(WINDOW_SECONDS)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    let decode = |what: &str, e: serde_json::Error| {
        super::StoreError::Database(sqlx::Error::Decode(format!("overview {what}: {e}").into()))
    };
    let (
        at,
        series,
        retried,
        dead_lettered,
        outbox_backlog,
        dead_letters_open,
        timers_overdue,
        timers_due_next_hour,
        waiting_for_definition,
        funnels,
    ) = row;
    Ok(OverviewRows {
        at,
        series: serde_json::from_value(series).map_err(|e| decode("series", e))?,
        retried,
        dead_lettered,
        outbox_backlog,
        dead_letters_open,
        timers_overdue,
        timers_due_next_hour,
        waiting_for_definition,
        funnels: serde_json::from_value(funnels).map_err(|e| decode("funnels", e))?,
    })
}

/// Which commands a search returns. Every field narrows.
#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    /// Exactly this owner (`kind:id`).
    pub owner: Option<String>,
    pub kind: Option<String>,
    /// Any of these states; empty is any state.
    pub states: Vec<CommandState>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
    /// Older than this `(created_at, id)`: the cursor of the previous page.
    pub before: Option<(DateTime<Utc>, CommandId)>,
}

/// One line of the command search.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct CommandSummary {
    pub id: CommandId,
    pub kind: String,
    pub owner: String,
    pub state: CommandState,
    pub parent_id: Option<CommandId>,
    pub root_id: CommandId,
    /// What a UI should say about it while it is open.
    #[schema(value_type = Option<Object>)]
    pub ui: Option<Value>,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

/// The search's statement for the filters present in `filter`, after `prefix` (an `EXPLAIN`,
/// or nothing), with their values and the limit bound as parameters in order. States are
/// written as literals (they come from a closed enum), so the planner can match them against
/// the partial index of failed and aborted commands.
fn search_query(
    prefix: &str,
    filter: &CommandFilter,
    limit: i64,
) -> sqlx::QueryBuilder<sqlx::Postgres> {
    let mut q = sqlx::QueryBuilder::new(prefix);
    q.push(
        "SELECT id, kind, owner, state, parent_id, root_id, ui, reason, created_at, updated_at, ended_at
           FROM commands WHERE true",
    );
    if let Some(owner) = &filter.owner {
        q.push(" AND owner = ").push_bind(owner);
    }
    if let Some(kind) = &filter.kind {
        q.push(" AND kind = ").push_bind(kind);
    }
    if !filter.states.is_empty() {
        let mut states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
        states.sort_unstable();
        states.dedup();
        let list: Vec<String> = states.iter().map(|s| format!("'{s}'")).collect();
        q.push(format!(" AND state IN ({})", list.join(", ")));
    }
    if let Some(since) = filter.since {
        q.push(" AND created_at >= ").push_bind(since);
    }
    if let Some(until) = filter.until {
        q.push(" AND created_at < ").push_bind(until);
    }
    if let Some((at, id)) = filter.before {
        q.push(" AND (created_at, id) < (")
            .push_bind(at)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(limit);
    q
}

/// A page of commands matching `filter`, newest first.
pub async fn search(
    pool: &PgPool,
    filter: &CommandFilter,
    limit: i64,
) -> Result<Vec<CommandSummary>> {
    Ok(search_query("", filter, limit)
        .build_query_as::<CommandSummary>()
        .fetch_all(pool)
        .await?)
}

/// The search's plan (`EXPLAIN (ANALYZE, BUFFERS)`), for checking that it stays an index scan.
pub async fn explain_search(
    pool: &PgPool,
    filter: &CommandFilter,
    limit: i64,
) -> Result<Vec<String>> {
    Ok(search_query("EXPLAIN (ANALYZE, BUFFERS) ", filter, limit)
        .build_query_scalar::<String>()
        .fetch_all(pool)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_has_only_the_filters_given_numbered_in_order() {
        let all = CommandFilter {
            owner: Some("member:1".into()),
            kind: Some("quote".into()),
            states: vec![
                CommandState::Failed,
                CommandState::Aborted,
                CommandState::Failed,
            ],
            since: Some(Utc::now()),
            until: Some(Utc::now()),
            before: Some((Utc::now(), CommandId::new())),
        };
        let sql = search_query("", &all, 20).into_string();
        assert!(sql.contains("owner = $1 AND kind = $2 AND state IN ('aborted', 'failed')"));
        assert!(sql.contains("created_at >= $3 AND created_at < $4"));
        assert!(sql.contains("(created_at, id) < ($5, $6)"));
        assert!(sql.ends_with("LIMIT $7"));
        let none = search_query("", &CommandFilter::default(), 20).into_string();
        assert!(!none.contains("AND"));
        assert!(none.ends_with("ORDER BY created_at DESC, id DESC LIMIT $1"));
    }
}
