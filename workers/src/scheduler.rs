//! The scheduler: turns due timers into events. Timers live in PostgreSQL; the scheduler claims
//! the due ones with `FOR UPDATE SKIP LOCKED` (so replicas never fire one twice) and deletes the
//! one-shot ones in the same statement, publishes each event with a publisher confirm, re-arms
//! the cron timers, and only then commits. It sleeps until the earliest due time, and
//! `LISTEN/NOTIFY` wakes it when a timer is added or moved: no busy polling. Claims do not wait
//! for the previous batch's confirms and commit, so a timer due during a slow cycle is not late
//! by that cycle.
//!
//! Each firing has a deterministic event id (`timer:{command}:{name}:{due_at µs}`), so a firing
//! published twice (a crash between publish and commit) is applied once by its command.
//!
//! Catch-up after downtime: every overdue one-shot timer fires once. An overdue cron timer fires
//! once, not once per missed slot, and is re-armed at its next occurrence after now.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cmdflow_shared::bus::Bus;
use cmdflow_shared::contract::types::{CHILDREN_DEADLINE, TIMER_FIRED, WAIT_TIMED_OUT};
use cmdflow_shared::store::time::{self as timestore, TimerKind, TimerRow};
use cmdflow_shared::store::{StoreError, Tx};
use cmdflow_shared::time::{Clock, SystemClock, next_cron};
use cmdflow_shared::{Config, Event};
use lapin::types::FieldTable;
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

/// The channel the `timers` trigger notifies.
pub const TIMER_CHANNEL: &str = "cmdflow_timers";
/// The longest the scheduler sleeps without a notification (a safety net, not polling).
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// How many claimed batches may be publishing and committing at once.
pub const IN_FLIGHT: usize = 4;
/// How soon to look again at a due timer that another scheduler holds.
const HELD_RETRY: Duration = Duration::from_millis(10);
/// The pause after a failed claim or cycle.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Timers claimed by an open transaction, not yet published.
struct Claimed {
    tx: Tx<'static>,
    timers: Vec<TimerRow>,
    now: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Bus(#[from] cmdflow_shared::bus::BusError),
}

pub struct Scheduler {
    pool: PgPool,
    bus: Arc<Bus>,
    clock: Arc<dyn Clock>,
    batch: i64,
    early_event_window: Duration,
    unmatched_retention: Duration,
}

impl Scheduler {
    pub fn new(pool: PgPool, bus: Arc<Bus>, config: &Config) -> Self {
        Self {
            pool,
            bus,
            clock: Arc::new(SystemClock),
            batch: config.scheduler_batch.max(1),
            early_event_window: config.early_event_window,
            unmatched_retention: config.unmatched_retention,
        }
    }

    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Deletes unmatched events past their retention, a batch at a time (the table is a
    /// diagnostic list, and every caller may add to it). How many it deleted.
    pub async fn prune_unmatched(&self) -> Result<u64, SchedulerError> {
        let mut total = 0;
        loop {
            let n = timestore::prune_unmatched(&self.pool, self.unmatched_retention, 5000).await?;
            total += n;
            if n < 5000 {
                return Ok(total);
            }
        }
    }

    /// Fires the timers due now (one batch). Returns how many fired.
    pub async fn fire_due(&self) -> Result<usize, SchedulerError> {
        let (claimed, _) = self.claim().await?;
        match claimed {
            Some(claimed) => self.fire(claimed).await,
            None => Ok(0),
        }
    }

    /// Claims the timers due now, in an open transaction that holds their row locks, and says
    /// when the next timer is due. One round trip besides `BEGIN` (see `timestore::claim_due`).
    /// When nothing was claimed, the next due time is that of any timer, including one due now
    /// that another scheduler holds.
    async fn claim(&self) -> Result<(Option<Claimed>, Option<DateTime<Utc>>), SchedulerError> {
        let now = self.clock.now();
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let claim = timestore::claim_due(&mut tx, now, self.batch).await?;
        if claim.timers.is_empty() {
            drop(tx);
            return Ok((None, timestore::next_due(&self.pool).await?));
        }
        let claimed = Claimed {
            tx,
            timers: claim.timers,
            now,
        };
        Ok((Some(claimed), claim.next))
    }

    /// Publishes the claimed timers' events, each with a publisher confirm, re-arms the cron ones
    /// and commits. Returns how many events went out.
    async fn fire(&self, claimed: Claimed) -> Result<usize, SchedulerError> {
        let Claimed {
            mut tx,
            timers,
            now,
        } = claimed;
        if !self.bus.has_engine_mark() {
            // Unmarked, a timer's event would be refused as a forgery.
            self.bus
                .set_engine_mark(cmdflow_shared::store::engine_mark(&self.pool).await?);
        }
        let mut events = Vec::with_capacity(timers.len());
        for timer in &timers {
            if let Some(event) = self.firing(&mut tx, timer, now).await? {
                events.push(event);
            }
        }
        // Publish before commit: if a publish fails, the claim rolls back and the timers fire
        // later under the same ids; if the commit fails after publishing, the ids dedupe.
        let published = futures::future::join_all(events.iter().map(|e| {
            let body = e.to_bytes();
            let mut headers = FieldTable::default();
            self.bus.mark_engine(&mut headers);
            async move {
                self.bus
                    .publish_event(
                        &e.ty,
                        &e.id,
                        &cmdflow_shared::bus::route_key(e),
                        &body,
                        headers,
                    )
                    .await
            }
        }))
        .await;
        for result in published {
            result?;
        }
        for timer in &timers {
            let late = (now - timer.due_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            metrics::histogram!(cmdflow_shared::metrics::TIMER_LATENESS_SECONDS)
                .record(late.max(0.0));
            metrics::counter!(cmdflow_shared::metrics::TIMERS_FIRED, "kind" => timer.kind.as_str())
                .increment(1);
        }
        // One-shot timers were deleted by the claim; a cron timer moves to its next slot.
        for timer in &timers {
            if let (Some(expr), Some(tz)) = (&timer.cron, &timer.tz) {
                // Fires once after downtime, then moves to the next slot after now.
                let after = now.max(timer.due_at);
                match next_cron(expr, tz, after) {
                    Ok(next) => timestore::rearm(&mut tx, timer, next, now).await?,
                    Err(e) => {
                        tracing::error!(command.id = %timer.command_id, timer = %timer.name, error = %e, "A cron timer has no next occurrence; removing it.");
                        timestore::delete_timer(&mut tx, timer).await?;
                    }
                }
            }
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(events.len())
    }

    /// The event a due timer becomes. A wait's timeout fires only if the wait is still open: the
    /// wait row is the arbiter between the event and its timeout.
    async fn firing(
        &self,
        tx: &mut Tx<'_>,
        timer: &TimerRow,
        now: DateTime<Utc>,
    ) -> Result<Option<Event>, SchedulerError> {
        let payload = timer.payload.clone().unwrap_or(Value::Null);
        let times = |mut data: Map<String, Value>| {
            data.insert("due_at".into(), json!(timer.due_at));
            data.insert("fired_at".into(), json!(now));
            data
        };
        let (ty, data) = match timer.kind {
            TimerKind::WaitTimeout => {
                let ty = payload
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let key = payload
                    .get("key")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if !timestore::take_wait(tx, timer.command_id, ty, key).await? {
                    return Ok(None);
                }
                let mut data = Map::new();
                data.insert("type".into(), json!(ty));
                data.insert("key".into(), json!(key));
                (WAIT_TIMED_OUT, times(data))
            }
            TimerKind::GroupDeadline => {
                let mut data = Map::new();
                data.insert(
                    "group".into(),
                    payload.get("group").cloned().unwrap_or(Value::Null),
                );
                (CHILDREN_DEADLINE, times(data))
            }
            TimerKind::After | TimerKind::At | TimerKind::Cron => {
                let mut data = Map::new();
                data.insert("name".into(), json!(timer.name));
                if let Some(cron) = &timer.cron {
                    data.insert("cron".into(), json!(cron));
                }
                (TIMER_FIRED, times(data))
            }
        };
        let mut event = Event::new("cmdflow/scheduler", ty, data);
        event.id = format!(
            "timer:{}:{}:{}",
            timer.command_id,
            timer.name,
            timer.due_at.timestamp_micros()
        );
        event.commandid = Some(timer.command_id);
        event.time = Some(now);
        Ok(Some(event))
    }

    /// Runs until `shutdown` fires: claim what is due, hand it to a cycle that publishes and
    /// commits, sleep until the next due time or a notification, repeat. Up to [`IN_FLIGHT`]
    /// cycles overlap: the next claim does not wait for the previous cycle's confirms and commit,
    /// and `SKIP LOCKED` keeps the cycles' timers apart. A failed cycle rolls back (its timers
    /// are due again, under the same event ids) and wakes the loop after a pause. On shutdown the
    /// loop stops claiming and waits for the cycles in flight.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        let retry = Arc::new(Notify::new());
        // Set by a failed cycle: no new claim before this instant (no retry storm while the
        // broker or the database is away).
        let backoff = Arc::new(std::sync::Mutex::new(None::<tokio::time::Instant>));
        let mut listener = match this.listen().await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot LISTEN for timer changes; waking every second instead.");
                None
            }
        };
        let mut last_prune = std::time::Instant::now();
        loop {
            let until = backoff.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(until) = until {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep_until(until) => {}
                }
            }
            let slot = tokio::select! {
                () = shutdown.cancelled() => break,
                slot = Arc::clone(&slots).acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let sleep_for = match this.claim().await {
                Ok((Some(claimed), next)) => {
                    // As many as a batch holds: more may be due.
                    let full = claimed.timers.len() as i64 >= this.batch;
                    let cycle = Arc::clone(&this);
                    let (retry, backoff) = (Arc::clone(&retry), Arc::clone(&backoff));
                    tokio::spawn(async move {
                        if let Err(e) = cycle.fire(claimed).await {
                            tracing::warn!(error = %e, "Firing timers failed; they are due again shortly.");
                            let until = tokio::time::Instant::now() + RETRY_PAUSE;
                            *backoff.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
                            drop(slot);
                            retry.notify_one();
                        }
                    });
                    if full {
                        Duration::ZERO
                    } else {
                        this.until(next)
                    }
                }
                Ok((None, next)) => {
                    drop(slot);
                    match next {
                        // Due, yet not claimable: another scheduler (or a cycle of this one)
                        // holds it. Look again soon, in case that holder dies and rolls back.
                        Some(at) if at <= this.clock.now() => HELD_RETRY,
                        next => this.until(next),
                    }
                }
                Err(e) => {
                    drop(slot);
                    tracing::warn!(error = %e, "Claiming timers failed; trying again shortly.");
                    RETRY_PAUSE
                }
            };
            if last_prune.elapsed() > Duration::from_secs(30) {
                last_prune = std::time::Instant::now();
                match timestore::prune_recent(&this.pool, this.early_event_window).await {
                    Ok(n) if n > 0 => tracing::debug!(pruned = n, "Forgot old broadcast events."),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "Could not prune recent events."),
                }
                match this.prune_unmatched().await {
                    Ok(n) if n > 0 => tracing::debug!(pruned = n, "Forgot old unmatched events."),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "Could not prune unmatched events."),
                }
            }
            if sleep_for.is_zero() {
                continue;
            }
            let wake = async {
                match listener.as_mut() {
                    Some(l) => {
                        if l.recv().await.is_err() {
                            // The connection dropped; recv reconnects on the next call.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        // Drain the notifications already queued: one recomputation covers them.
                        while l.next_buffered().is_some() {}
                    }
                    None => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(sleep_for) => {}
                () = wake => {}
                () = retry.notified() => {}
            }
        }
        // Let the cycles in flight publish and commit (or roll back) before returning.
        drop(slots.acquire_many(IN_FLIGHT as u32).await);
    }

    /// How long to sleep until `next` (at most [`MAX_SLEEP`]).
    fn until(&self, next: Option<DateTime<Utc>>) -> Duration {
        next.map_or(MAX_SLEEP, |at| {
            (at - self.clock.now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .min(MAX_SLEEP)
        })
    }

    async fn listen(&self) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(TIMER_CHANNEL).await?;
        Ok(listener)
    }
}
