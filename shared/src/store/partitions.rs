//! Who consumes which work partition: claims under a lease, renewed by their worker, shared
//! evenly among the live workers (a heartbeat each). The broker enforces one consumer per
//! partition queue (exclusive consume); these rows say who should be that consumer.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::types::PgInterval;

use super::Result;

fn interval(d: Duration) -> PgInterval {
    PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
    }
}

/// What a worker learns at each beat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// The partitions it holds now (its leases renewed).
    pub held: Vec<u32>,
    /// Live workers, itself included.
    pub workers: u32,
}

/// Records that `worker` is alive, makes sure the namespace's `partitions` rows exist, renews
/// its leases for `lease`, and counts the live workers (seen within `lease`).
pub async fn beat(
    pool: &PgPool,
    namespace: &str,
    worker: &str,
    partitions: u32,
    lease: Duration,
) -> Result<Beat> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO worker_heartbeats (namespace, worker, seen_at) VALUES ($1, $2, now())
         ON CONFLICT (namespace, worker) DO UPDATE SET seen_at = now()",
    )
    .bind(namespace)
    .bind(worker)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO work_partitions (namespace, partition)
         SELECT $1, p FROM generate_series(0, $2 - 1) p
         ON CONFLICT (namespace, partition) DO NOTHING",
    )
    .bind(namespace)
    .bind(partitions as i32)
    .execute(&mut *tx)
    .await?;
    let held: Vec<i32> = sqlx::query_scalar(
        "UPDATE work_partitions SET lease_until = now() + $3
          WHERE namespace = $1 AND owner = $2 AND partition < $4
          RETURNING partition",
    )
    .bind(namespace)
    .bind(worker)
    .bind(interval(lease))
    .bind(partitions as i32)
    .fetch_all(&mut *tx)
    .await?;
    let workers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM worker_heartbeats WHERE namespace = $1 AND seen_at > now() - $2",
    )
    .bind(namespace)
    .bind(interval(lease))
    .fetch_one(&mut *tx)
    .await?;
    // Heartbeats of workers long gone.
    sqlx::query("DELETE FROM worker_heartbeats WHERE namespace = $1 AND seen_at < now() - 10 * $2")
        .bind(namespace)
        .bind(interval(lease))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let mut held: Vec<u32> = held.into_iter().map(|p| p as u32).collect();
    held.sort_unstable();
    Ok(Beat {
        held,
        workers: u32::try_from(workers).unwrap_or(1).max(1),
    })
}

/// Claims up to `n` partitions nobody holds (or whose lease ran out), lowest first.
pub async fn claim(
    pool: &PgPool,
    namespace: &str,
    worker: &str,
    partitions: u32,
    n: u32,
    lease: Duration,
) -> Result<Vec<u32>> {
    let claimed: Vec<i32> = sqlx::query_scalar(
        "UPDATE work_partitions SET owner = $2, lease_until = now() + $3
          WHERE namespace = $1 AND partition IN (
                SELECT partition FROM work_partitions
                 WHERE namespace = $1 AND partition < $5
                   AND (owner IS NULL OR lease_until < now())
                 ORDER BY partition LIMIT $4 FOR UPDATE SKIP LOCKED)
          RETURNING partition",
    )
    .bind(namespace)
    .bind(worker)
    .bind(interval(lease))
    .bind(i64::from(n))
    .bind(partitions as i32)
    .fetch_all(pool)
    .await?;
    let mut claimed: Vec<u32> = claimed.into_iter().map(|p| p as u32).collect();
    claimed.sort_unstable();
    Ok(claimed)
}

/// Lets go of `partition` (after its events in flight are settled).
pub async fn release(pool: &PgPool, namespace: &str, worker: &str, partition: u32) -> Result<()> {
    sqlx::query(
        "UPDATE work_partitions SET owner = NULL, lease_until = NULL
          WHERE namespace = $1 AND owner = $2 AND partition = $3",
    )
    .bind(namespace)
    .bind(worker)
    .bind(partition as i32)
    .execute(pool)
    .await?;
    Ok(())
}

/// Lets go of every partition and the heartbeat of `worker` (a worker stopping).
pub async fn leave(pool: &PgPool, namespace: &str, worker: &str) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE work_partitions SET owner = NULL, lease_until = NULL
          WHERE namespace = $1 AND owner = $2",
    )
    .bind(namespace)
    .bind(worker)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM worker_heartbeats WHERE namespace = $1 AND worker = $2")
        .bind(namespace)
        .bind(worker)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Every partition's holder (for readiness, the console and tests): `(partition, owner)`.
pub async fn holders(pool: &PgPool, namespace: &str) -> Result<Vec<(u32, Option<String>)>> {
    let rows: Vec<(i32, Option<String>)> = sqlx::query_as(
        "SELECT partition, CASE WHEN lease_until > now() THEN owner END
           FROM work_partitions WHERE namespace = $1 ORDER BY partition",
    )
    .bind(namespace)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(p, o)| (p as u32, o)).collect())
}

/// An event parked until its command's start is applied.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Parked {
    pub id: i64,
    pub command_id: uuid::Uuid,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub parked_at: chrono::DateTime<chrono::Utc>,
}

/// Parks an event for `command` (once per source and id). Returns whether it was new.
#[allow(clippy::too_many_arguments)]
pub async fn park(
    pool: &PgPool,
    command: uuid::Uuid,
    partition: u32,
    source: &str,
    event_id: &str,
    routing_key: &str,
    body: &[u8],
    waiting_for: Option<&str>,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO parked_events (command_id, partition, source, event_id, routing_key, body, waiting_for)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (command_id, source, event_id) DO NOTHING",
    )
    .bind(command)
    .bind(partition as i32)
    .bind(source)
    .bind(event_id)
    .bind(routing_key)
    .bind(body)
    .bind(waiting_for)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The events parked for `command`, in the order they came.
pub async fn parked_for(pool: &PgPool, command: uuid::Uuid) -> Result<Vec<Parked>> {
    Ok(sqlx::query_as::<_, Parked>(
        "SELECT id, command_id, routing_key, body, parked_at FROM parked_events
          WHERE command_id = $1 ORDER BY id",
    )
    .bind(command)
    .fetch_all(pool)
    .await?)
}

/// The commands in `partitions` with events parked for a definition (not for their start).
pub async fn waiting_commands(pool: &PgPool, partitions: &[u32]) -> Result<Vec<uuid::Uuid>> {
    let partitions: Vec<i32> = partitions.iter().map(|p| *p as i32).collect();
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT command_id FROM parked_events
          WHERE partition = ANY($1) AND waiting_for IS NOT NULL",
    )
    .bind(&partitions)
    .fetch_all(pool)
    .await?)
}

/// Removes a parked event (applied, or dead-lettered).
pub async fn unpark(pool: &PgPool, id: i64) -> Result<()> {
    sqlx::query("DELETE FROM parked_events WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// The commands with parked events in `partition`s (what a worker that takes them over must
/// know before it applies anything to them).
pub async fn parked_commands(pool: &PgPool, partitions: &[u32]) -> Result<Vec<uuid::Uuid>> {
    let partitions: Vec<i32> = partitions.iter().map(|p| *p as i32).collect();
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT command_id FROM parked_events WHERE partition = ANY($1)",
    )
    .bind(&partitions)
    .fetch_all(pool)
    .await?)
}

/// Parked events older than `wait`, oldest first, at most `limit`, claimed in `tx` (rows other
/// workers hold are skipped); the caller dead-letters them and deletes them with [`unpark`].
pub async fn overdue(tx: &mut super::Tx<'_>, wait: Duration, limit: i64) -> Result<Vec<Parked>> {
    Ok(sqlx::query_as::<_, Parked>(
        "SELECT id, command_id, routing_key, body, parked_at FROM parked_events
          WHERE parked_at < now() - $1 AND waiting_for IS NULL
          ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(interval(wait))
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?)
}

/// Deletes parked events in `tx`.
pub async fn unpark_in(tx: &mut super::Tx<'_>, ids: &[i64]) -> Result<()> {
    sqlx::query("DELETE FROM parked_events WHERE id = ANY($1)")
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
