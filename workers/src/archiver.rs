//! The archiver: moves command trees that ended longer ago than their kind's retention to the
//! `archive` schema, in batches, one transaction per batch, so a tree is never split and a
//! process that dies mid-batch loses and duplicates nothing (the batch rolls back whole).

use std::time::Duration;

use cmdflow_shared::store::StoreError;
use cmdflow_shared::store::archive::{self, Moved, Retention};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const ROWS_MOVED: &str = "cmdflow_archive_rows_moved_total";

/// Moves one batch. Returns what moved (nothing when no tree is eligible).
pub async fn run_batch(
    pool: &PgPool,
    retention: &Retention,
    batch: i64,
) -> Result<Moved, StoreError> {
    let mut tx = pool.begin().await?;
    let moved = archive::move_batch(&mut tx, retention, batch).await?;
    tx.commit().await?;
    metrics::counter!(ROWS_MOVED).increment(moved.rows().max(0) as u64);
    Ok(moved)
}

/// Moves batches until nothing is eligible; `progress` hears after each batch.
pub async fn run_all(
    pool: &PgPool,
    retention: &Retention,
    batch: i64,
    mut progress: impl FnMut(&Moved),
) -> Result<Moved, StoreError> {
    let mut total = Moved::default();
    loop {
        let moved = run_batch(pool, retention, batch).await?;
        if moved.trees == 0 {
            return Ok(total);
        }
        total.trees += moved.trees;
        total.commands += moved.commands;
        total.events += moved.events;
        total.messages += moved.messages;
        progress(&total);
    }
}

/// Runs every `interval` until `shutdown` fires; on shutdown it stops after the batch in flight.
pub async fn run_until_stopped(
    pool: PgPool,
    retention: Retention,
    batch: i64,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let mut total = Moved::default();
        while !shutdown.is_cancelled() {
            match run_batch(&pool, &retention, batch).await {
                Ok(m) if m.trees > 0 => {
                    total.trees += m.trees;
                    total.commands += m.commands;
                    total.events += m.events;
                    total.messages += m.messages;
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "Archival failed; trying again at the next interval.");
                    break;
                }
            }
        }
        if total.trees > 0 {
            tracing::info!(
                trees = total.trees,
                rows = total.rows(),
                "Archived ended command trees."
            );
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
