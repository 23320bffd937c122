//! Replay jobs: created over a filter, claimed on a lease, advanced a batch at a time, ended.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Filter, mark_replayed};
use crate::store::Result;

/// Where a replay job is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[sqlx(type_name = "replay_state", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum ReplayState {
    /// Waiting for a worker, or being run by one (see `claimed_by` and `lease_until`).
    Running,
    /// Every dead letter it matched was replayed.
    Finished,
    /// Stopped by someone; `resume` runs it on from its cursor.
    Interrupted,
    /// Stopped by an error it cannot get past (its `error` says which); not resumable.
    Failed,
}

impl ReplayState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Finished => "finished",
            Self::Interrupted => "interrupted",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for ReplayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub struct ReplayJob {
    pub id: Uuid,
    pub actor: String,
    #[schema(value_type = Object)]
    pub filter: Value,
    /// Dead letters per second, or unthrottled.
    pub rate: Option<i32>,
    pub total: i32,
    pub replayed: i32,
    /// Dead letters it left dead because they cannot be replayed: kept truncated
    /// (`body_truncated`), their original event is not whole.
    pub skipped: i32,
    pub last_id: i64,
    /// The newest dead letter when the job started: it never replays one kept after that
    /// (such as its own events failing again).
    pub max_id: Option<i64>,
    pub state: ReplayState,
    /// The worker running it, while its lease lasts.
    pub claimed_by: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    /// Why it failed.
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const JOB_COLUMNS: &str = "id, actor, filter, rate, total, replayed, skipped, last_id, max_id, state, claimed_by, lease_until, error, created_at, updated_at";

/// Creates a running job over what `filter` matches now: bounded by the newest dead letter
/// there is, so what fails again while it runs is not replayed by it. A worker picks it up.
pub async fn create_job(
    pool: &PgPool,
    actor: &str,
    filter: &Filter,
    rate: Option<i32>,
    total: i64,
) -> Result<ReplayJob> {
    const SQL: &str = "INSERT INTO replay_jobs (id, actor, filter, rate, total, state, max_id)
         VALUES ($1, $2, $3, $4, $5, 'running', (SELECT coalesce(max(id), 0) FROM dead_letters))
         RETURNING id, actor, filter, rate, total, replayed, skipped, last_id, max_id, state, claimed_by, lease_until, error, created_at, updated_at";
    Ok(sqlx::query_as::<_, ReplayJob>(SQL)
        .bind(Uuid::now_v7())
        .bind(actor)
        .bind(serde_json::to_value(filter).unwrap_or(Value::Null))
        .bind(rate)
        .bind(total as i32)
        .fetch_one(pool)
        .await?)
}

pub async fn get_job(pool: &PgPool, id: Uuid) -> Result<Option<ReplayJob>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM replay_jobs WHERE id = $1");
    Ok(sqlx::query_as::<_, ReplayJob>(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(pool)
        .await?)
}

/// Moves a job from `from` to `to`. Returns whether it was in `from`.
pub async fn move_job(pool: &PgPool, id: Uuid, from: ReplayState, to: ReplayState) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE replay_jobs SET state = $3, updated_at = now(),
                claimed_by = CASE WHEN $3 = 'running' THEN NULL ELSE claimed_by END,
                lease_until = CASE WHEN $3 = 'running' THEN NULL ELSE lease_until END
          WHERE id = $1 AND state = $2",
    )
    .bind(id)
    .bind(from)
    .bind(to)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Claims the oldest running job whose lease is free or expired, for `lease`: a job whose
/// worker died is taken over once its lease runs out.
pub async fn claim_job(
    pool: &PgPool,
    worker: &str,
    lease: std::time::Duration,
) -> Result<Option<ReplayJob>> {
    let sql = format!(
        "UPDATE replay_jobs SET claimed_by = $1, lease_until = now() + $2, updated_at = now()
          WHERE id = (SELECT id FROM replay_jobs
                       WHERE state = 'running' AND (lease_until IS NULL OR lease_until < now())
                       ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
          RETURNING {JOB_COLUMNS}"
    );
    Ok(sqlx::query_as::<_, ReplayJob>(sqlx::AssertSqlSafe(sql))
        .bind(worker)
        .bind(interval(lease))
        .fetch_optional(pool)
        .await?)
}

fn interval(d: std::time::Duration) -> sqlx::postgres::types::PgInterval {
    sqlx::postgres::types::PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
    }
}

/// Gives up `worker`'s claims on running jobs (a worker stopping), so another takes them at
/// once rather than after the lease.
pub async fn release_jobs(pool: &PgPool, worker: &str) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE replay_jobs SET claimed_by = NULL, lease_until = NULL, updated_at = now()
          WHERE claimed_by = $1 AND state = 'running'",
    )
    .bind(worker)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Ends a job `worker` runs: `finished`, or `failed` with the error.
pub async fn end_job(
    pool: &PgPool,
    id: Uuid,
    worker: &str,
    state: ReplayState,
    error: Option<&str>,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE replay_jobs SET state = $3, error = $4, lease_until = NULL, updated_at = now()
          WHERE id = $1 AND claimed_by = $2 AND state = 'running'",
    )
    .bind(id)
    .bind(worker)
    .bind(state)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records a replayed batch: its dead letters `replayed` are `replayed`, those `skipped` stay
/// dead and are counted, the job's cursor moves past both, and `worker`'s lease is renewed for
/// `lease`. Returns the job as it is now (interrupted, or claimed by another worker after an
/// expired lease, tells the runner to stop).
pub async fn advance_job(
    pool: &PgPool,
    job: Uuid,
    worker: &str,
    replayed: &[i64],
    skipped: &[i64],
    lease: std::time::Duration,
) -> Result<Option<ReplayJob>> {
    let mut tx = pool.begin().await?;
    mark_replayed(&mut tx, replayed).await?;
    let sql = format!(
        "UPDATE replay_jobs SET replayed = replayed + $2, skipped = skipped + $6,
                last_id = greatest(last_id, $3), updated_at = now(),
                lease_until = CASE WHEN claimed_by = $4 AND state = 'running' THEN now() + $5 ELSE lease_until END
          WHERE id = $1 RETURNING {JOB_COLUMNS}"
    );
    let row = sqlx::query_as::<_, ReplayJob>(sqlx::AssertSqlSafe(sql))
        .bind(job)
        .bind(replayed.len() as i32)
        .bind(replayed.iter().chain(skipped).copied().max().unwrap_or(0))
        .bind(worker)
        .bind(interval(lease))
        .bind(skipped.len() as i32)
        .fetch_optional(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(row)
}
