//! Gauges read from the stores on a timer, not from the events a worker happens to handle: the
//! open dead letters (so the gauge falls after a replay or a discard, whoever did it), the age of
//! the oldest due timer (so a stopped scheduler shows, though it records nothing), and the ready
//! messages of each cmdflow queue (a passive declare per queue).
//!
//! Every worker refreshes them, so each series comes from every worker with the same value:
//! alerts and dashboards take `max` over the instances, not `sum`.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cmdflow_shared::bus::Bus;
use cmdflow_shared::metrics::{DEAD_LETTERS_OPEN, QUEUE_MESSAGES, TIMERS_OVERDUE_SECONDS};
use cmdflow_shared::store::dead::{self, Filter};
use cmdflow_shared::store::time;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How often the gauges are read: well under a scrape interval of 30 s, and three small queries
/// plus one passive declare per queue each time.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);

/// The queues whose ready messages are reported: the unkeyed queue, every partition queue, and
/// the dead-letter queue (what the keeper has not stored yet).
pub fn queues(bus: &Bus) -> Vec<String> {
    let t = bus.topology();
    std::iter::once(t.work_queue())
        .chain((0..t.partitions()).map(|p| t.partition_queue(p)))
        .chain(std::iter::once(t.dead_queue()))
        .collect()
}

/// Reads every gauge once. A store or broker that does not answer leaves its gauges as they were
/// and is logged at debug level: the worker's own loops report those outages.
pub async fn refresh_once(pool: &PgPool, bus: &Bus) {
    match dead::count(pool, &Filter::default()).await {
        Ok(open) => metrics::gauge!(DEAD_LETTERS_OPEN).set(open as f64),
        Err(e) => tracing::debug!(error = %e, "Could not count the open dead letters."),
    }
    match time::next_due(pool).await {
        Ok(next) => {
            let overdue = next.map_or(0.0, |due| {
                (Utc::now() - due).num_milliseconds().max(0) as f64 / 1000.0
            });
            metrics::gauge!(TIMERS_OVERDUE_SECONDS).set(overdue);
        }
        Err(e) => tracing::debug!(error = %e, "Could not read the earliest due timer."),
    }
    for queue in queues(bus) {
        match bus.queue_depth(&queue).await {
            Ok(ready) => metrics::gauge!(QUEUE_MESSAGES, "queue" => queue).set(f64::from(ready)),
            Err(e) => tracing::debug!(error = %e, queue.name = %queue, "Could not count a queue."),
        }
    }
}

/// Refreshes the gauges every [`REFRESH_EVERY`] until `shutdown` fires.
pub async fn refresh_until_stopped(pool: PgPool, bus: Arc<Bus>, shutdown: CancellationToken) {
    loop {
        refresh_once(&pool, &bus).await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(REFRESH_EVERY) => {}
        }
    }
}
