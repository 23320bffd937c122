//! The engine: consume → lock → one transaction → commit → publish outbox → release → ack.
//!
//! [`Engine::process`] does everything for one message except settling it with the broker, and
//! returns a [`Disposition`]; [`Engine::settle`] acks, delays or dead-letters accordingly. Inside,
//! [`Engine::apply`] is the part that runs in a transaction it is handed.
//!
//! Group commit: the consumer takes whatever deliveries have already arrived (up to
//! `CMDFLOW_BATCH`) and [`Engine::process_batch`] applies them in one transaction, after one
//! try at each command's lock (all sent at once), then acks each after the commit and publishes
//! their outbox events together under confirms. Two events of one command in a batch are
//! applied one after the other, in the order they came, under the one lock: never at once.
//! A command whose lock another worker holds gets a second round: once the batch has committed
//! and let go of its locks, the worker waits for that one lock (holding no other) and applies
//! the command's events of the batch together. A broadcast, or an event whose transaction
//! failed, goes through [`Engine::process`] alone. Within a worker, events for one command wait in line ([`local`])
//! before Redlock is asked, so only one of them contends with other workers.

mod apply;
mod local;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cmdflow_shared::bus::{
    self, Bus, BusError, HEADER_ATTEMPT, HEADER_BUSY, HEADER_ERROR_CLASS, HEADER_LAST_ERROR,
    HEADER_REASON,
};
use cmdflow_shared::lock::{Held, Locks};
use cmdflow_shared::metrics as cm;
use cmdflow_shared::store::{self, OutboxRow, StoreError};
use cmdflow_shared::time::{Clock, SystemClock};
use cmdflow_shared::{CommandId, Event};
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::registry::Registry;

/// What to do with a message once the engine is done with it.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Applied, or recognised as already applied, or deliberately ignored: ack it.
    Ack(Applied),
    /// The lock was busy: try again after a short delay. Not a failure.
    Busy,
    /// Trouble that may pass (database, broker, a command not created yet): retry with backoff.
    Retry(String),
    /// It can never succeed as it is: dead letters at once, with the reason.
    Dead { class: &'static str, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    Duplicate,
    Ignored,
    Unmatched,
}

/// Errors inside the transaction, sorted where they happen.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("command {0} does not exist (yet)")]
    NotFound(CommandId),
    #[error("{0}")]
    Permanent(String),
}

/// The worker's settings, from [`cmdflow_shared::Config`].
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// How long a stopping worker lets its in-flight events finish.
    pub shutdown_grace: Duration,
    pub prefetch: u16,
    pub concurrency: usize,
    /// The most deliveries (for distinct commands) applied in one transaction.
    pub batch: usize,
    pub retry_delays: Vec<Duration>,
    pub busy_delay: Duration,
    pub outbox_sweep_after: Duration,
    pub max_depth: i32,
    pub max_children: usize,
    pub early_event_window: Duration,
    /// Whether e-mails are sent (an SMTP server is configured) or kept in the app.
    pub smtp_enabled: bool,
}

impl EngineSettings {
    pub fn from_config(
        config: &cmdflow_shared::Config,
    ) -> Result<Self, cmdflow_shared::config::ConfigError> {
        Ok(Self {
            shutdown_grace: config.shutdown_grace,
            prefetch: config.prefetch,
            concurrency: config.concurrency,
            batch: config.batch,
            retry_delays: config.retry_delay_list()?,
            busy_delay: config.busy_delay,
            outbox_sweep_after: config.outbox_sweep_after,
            max_depth: config.max_depth,
            max_children: config.max_children,
            early_event_window: config.early_event_window,
            smtp_enabled: config.smtp_url.is_some(),
        })
    }

    /// Every delay queue the topology needs.
    pub fn delay_queues(&self) -> Vec<Duration> {
        let mut delays = self.retry_delays.clone();
        delays.push(self.busy_delay);
        delays.sort();
        delays.dedup();
        delays
    }
}

/// What an event is applied to.
enum Target<'a> {
    Command(CommandId),
    /// A broadcast event that starts commands of these kinds.
    Broadcast(&'a [String]),
}

pub struct Engine {
    pool: PgPool,
    bus: Arc<Bus>,
    locks: Option<Locks>,
    registry: Arc<Registry>,
    settings: EngineSettings,
    clock: Arc<dyn Clock>,
    /// One event per command at a time in this worker, before Redlock is asked.
    local: local::LocalLocks,
    /// Outbox rows the broker confirmed, deleted by the worker's next commit (or within
    /// [`OUTBOX_FLUSH`] when it is idle) rather than by a commit of their own.
    confirmed: std::sync::Mutex<Vec<i64>>,
}

/// How long confirmed outbox rows may wait for a commit to delete them, when none comes.
const OUTBOX_FLUSH: Duration = Duration::from_millis(100);

impl Engine {
    /// `locks: None` runs without Redlock (tests and benchmarks); the guarded update still fences.
    pub fn new(
        pool: PgPool,
        bus: Arc<Bus>,
        locks: Option<Locks>,
        registry: Arc<Registry>,
        settings: EngineSettings,
    ) -> Self {
        Self {
            pool,
            bus,
            locks,
            registry,
            settings,
            clock: Arc::new(SystemClock),
            local: local::LocalLocks::default(),
            confirmed: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Uses `clock` for "now" (when timers are due).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Processes one message body: lock, transaction, commit, publish the outbox, release.
    /// Does not ack: [`Engine::settle`] does, according to the returned disposition.
    pub async fn process(&self, body: &[u8]) -> Disposition {
        self.process_inner(body, true).await.0
    }

    /// Like [`Engine::process`], but stops right after the commit and leaves the outbox rows
    /// unpublished: what a worker that dies between commit and publish leaves behind. The
    /// sweeper publishes them.
    pub async fn process_without_publishing(&self, body: &[u8]) -> (Disposition, Vec<OutboxRow>) {
        self.process_inner(body, false).await
    }

    async fn process_inner(&self, body: &[u8], publish: bool) -> (Disposition, Vec<OutboxRow>) {
        let started = Instant::now();
        let (disposition, outbox, ty, time) = self.process_unmeasured(body, publish).await;
        record_outcome(&disposition, ty, time, started);
        (disposition, outbox)
    }

    /// Processes several message bodies, returning one disposition each, in order. Events for
    /// commands whose locks are free at once are applied in one transaction and one commit,
    /// their outbox events published together under confirms: each command's events one after
    /// the other, in the order they came, under its one lock, so a command still handles one
    /// event at a time. A command that another batch of this worker holds goes in a second
    /// round, when its turn comes; one whose Redis lock another worker holds is waited for
    /// afterwards, one at a time, and its events applied together. Broadcasts and events whose
    /// transaction failed go one by one through [`Engine::process`].
    pub async fn process_batch(&self, bodies: &[&[u8]]) -> Vec<Disposition> {
        let started = Instant::now();
        let mut dispositions: Vec<Option<Disposition>> = vec![None; bodies.len()];
        let mut alone: Vec<usize> = Vec::new();
        let mut together: Vec<(usize, CommandId, Event)> = Vec::new();
        for (i, body) in bodies.iter().enumerate() {
            match Event::parse(body) {
                Ok(event) => match event.commandid {
                    Some(id) => together.push((i, id, event)),
                    None => alone.push(i),
                },
                // The one-by-one path dead-letters it with the reason.
                Err(_) => alone.push(i),
            }
        }
        if together.len() >= 2 {
            // By command, each command's events in the order they came, in ascending id order.
            together.sort_by_key(|(i, id, _)| (*id, *i));
            let mut ids: Vec<CommandId> = together.iter().map(|(_, id, _)| *id).collect();
            ids.dedup();
            // The commands no other batch of this worker holds go first. Those that one holds
            // are queued for in the same step and go second, when their turns come: a command
            // shared with an earlier batch holds back only its own events, not the batch.
            let (now, queued) = self.local.take_all(&ids);
            let busy: Vec<CommandId> = queued.iter().map(local::Queued::id).collect();
            let (later, first): (Vec<_>, Vec<_>) = together
                .into_iter()
                .partition(|(_, id, _)| busy.binary_search(id).is_ok());
            self.apply_round(first, started, &mut dispositions, &mut alone)
                .await;
            drop(now);
            if !later.is_empty() {
                let mut turns = Vec::with_capacity(queued.len());
                for turn in queued {
                    turns.push(turn.come().await);
                }
                self.apply_round(later, started, &mut dispositions, &mut alone)
                    .await;
                drop(turns);
            }
        } else {
            alone.extend(together.into_iter().map(|(i, _, _)| i));
        }
        alone.sort_unstable();
        let singles = alone.iter().map(|&i| self.process(bodies[i]));
        for (i, outcome) in alone.iter().zip(futures::future::join_all(singles).await) {
            dispositions[*i] = Some(outcome);
        }
        dispositions
            .into_iter()
            .map(|d| d.unwrap_or_else(|| Disposition::Retry("not processed".to_owned())))
            .collect()
    }

    /// Applies events (sorted by command, each command's in the order they came) whose local
    /// turns this batch holds: those whose Redis locks are free at once in one transaction, then
    /// each command whose lock another worker holds, one at a time, once its lock comes. An
    /// event whose transaction failed goes to `alone`, to be tried by itself.
    async fn apply_round(
        &self,
        together: Vec<(usize, CommandId, Event)>,
        started: Instant,
        dispositions: &mut [Option<Disposition>],
        alone: &mut Vec<usize>,
    ) {
        if together.is_empty() {
            return;
        }
        let mut ids: Vec<CommandId> = together.iter().map(|(_, id, _)| *id).collect();
        ids.dedup();
        // One try per lock, all at once (their Redis calls share the connections): a batch
        // never holds some locks while it waits for another.
        let held: Vec<Option<Held>> = match &self.locks {
            None => ids.iter().map(|_| None).collect(),
            Some(locks) => {
                let tries = ids.iter().map(|id| locks.try_acquire(*id));
                futures::future::join_all(tries)
                    .await
                    .into_iter()
                    .map(|r| r.ok().flatten())
                    .collect()
            }
        };
        let mut ready = Vec::new();
        // Events whose command's lock another worker holds: theirs is the second round.
        let mut waiting: Vec<(usize, CommandId, Event)> = Vec::new();
        for (i, id, event) in together {
            let locked = ids
                .binary_search(&id)
                .is_ok_and(|k| self.locks.is_none() || held[k].is_some());
            if locked {
                ready.push((i, id, event));
            } else {
                waiting.push((i, id, event));
            }
        }
        // Outcomes go to their deliveries; a failed transaction sends its events alone.
        let mut settle =
            |group: &[(usize, CommandId, Event)], outcomes: Option<Vec<_>>| match outcomes {
                Some(outcomes) => {
                    for ((i, _, event), outcome) in group.iter().zip(outcomes) {
                        record_outcome(&outcome, event.ty.clone(), event.time, started);
                        dispositions[*i] = Some(outcome);
                    }
                }
                None => alone.extend(group.iter().map(|(i, _, _)| *i)),
            };
        let held: Vec<Held> = held.into_iter().flatten().collect();
        if !ready.is_empty() {
            settle(&ready, self.transact_many(&ready, &held).await);
        }
        if let Some(locks) = &self.locks {
            futures::future::join_all(held.into_iter().map(|h| locks.release(h))).await;
            // Second round, one command at a time, holding no other lock while it waits:
            // each busy command's events of this batch in one transaction under its lock.
            for chunk in waiting.chunk_by(|a, b| a.1 == b.1) {
                let outcomes = match locks.acquire(chunk[0].1).await {
                    Ok(Some(held)) => {
                        let done = self.transact_many(chunk, std::slice::from_ref(&held)).await;
                        locks.release(held).await;
                        done
                    }
                    Ok(None) => {
                        metrics::counter!(cm::LOCK_BUSY).increment(chunk.len() as u64);
                        Some(vec![Disposition::Busy; chunk.len()])
                    }
                    Err(e) => Some(vec![Disposition::Retry(e.to_string()); chunk.len()]),
                };
                settle(chunk, outcomes);
            }
        }
    }

    /// Applies events, in order, to commands whose locks are held, in one transaction. `None`
    /// when anything failed (an error, a lock that ran out): nothing is written, and each event
    /// is then tried alone, where its own failure is sorted out.
    async fn transact_many(
        &self,
        events: &[(usize, CommandId, Event)],
        held: &[Held],
    ) -> Option<Vec<Disposition>> {
        let mut tx = self.pool.begin().await.ok()?;
        if lock_lost(held) {
            // Paused (or starved) since the locks were taken: do not wait on a row another
            // worker may now hold under the lock we lost.
            drop(tx.rollback().await);
            return None;
        }
        let written = async {
            let mut applied = Vec::with_capacity(events.len());
            let mut outbox = Vec::new();
            let mut reports = Vec::new();
            // Every event marked and every row locked in one statement; then each command's row
            // is carried from one of its events to the next, as the last one wrote it.
            let ids: Vec<CommandId> = events.iter().map(|(_, id, _)| *id).collect();
            let sources: Vec<&str> = events.iter().map(|(_, _, e)| e.source.as_str()).collect();
            let event_ids: Vec<&str> = events.iter().map(|(_, _, e)| e.id.as_str()).collect();
            let mut rows: std::collections::HashMap<CommandId, store::LockedBatch> =
                store::lock_and_mark_batch(&mut tx, &ids, &sources, &event_ids)
                    .await?
                    .into_iter()
                    .map(|r| (r.command.id, r))
                    .collect();
            // Each event's step (row, history, outbox) is kept back and all are written in one
            // statement before the commit, or earlier when a statement reads other rows.
            let now = rows
                .values()
                .next()
                .map_or_else(chrono::Utc::now, |r| r.now);
            let mut steps = store::Steps::new(now);
            for (_, id, event) in events {
                let span = event_span(event);
                span.record("command.id", tracing::field::display(id));
                // A command without a row when the batch began (a root that its start creates)
                // locks and marks each of its events itself.
                let locked = rows.get_mut(id).map(|row| {
                    let key = store::event_key(&event.source, &event.id);
                    let fresh = match row.fresh.iter().position(|k| *k == key) {
                        // Its first delivery in the batch; a second one is a duplicate.
                        Some(i) => {
                            row.fresh.swap_remove(i);
                            true
                        }
                        None => false,
                    };
                    store::Locked {
                        command: row.command.clone(),
                        fresh,
                        counts_itself: row.counts_itself,
                    }
                });
                let (done, written, command) = self
                    .apply_locked(&mut tx, *id, event, locked, &mut reports, Some(&mut steps))
                    .instrument(span)
                    .await?;
                if let Some(row) = rows.get_mut(id) {
                    row.command = command;
                }
                applied.push(done);
                outbox.extend(written);
            }
            store::flush_steps(&mut tx, &mut steps).await?;
            outbox.extend(steps.written);
            outbox.extend(self.count_reports(&mut tx, reports).await?);
            Ok::<_, ApplyError>((applied, outbox))
        }
        .await;
        let (applied, outbox) = match written {
            Ok(written) => written,
            Err(e) => {
                tracing::debug!(error = %e, "A batch's transaction failed; its events are retried one by one.");
                drop(tx.rollback().await);
                return None;
            }
        };
        if lock_lost(held) {
            drop(tx.rollback().await);
            return None;
        }
        if let Err(e) = self.commit_with_confirmed(tx).await {
            let reason = format!("PostgreSQL commit: {e}");
            return Some(vec![Disposition::Retry(reason); events.len()]);
        }
        metrics::histogram!(cm::BATCH_SIZE).record(events.len() as f64);
        self.publish_outbox(&outbox).await;
        Some(applied.into_iter().map(Disposition::Ack).collect())
    }
}

/// Whether a lock of `held` ran out since it was taken (a pause, a stall): then the transaction
/// must write nothing. Counted in `LOCK_LOST` when so.
fn lock_lost<'a>(held: impl IntoIterator<Item = &'a Held>) -> bool {
    let lost = held.into_iter().any(|h| !h.is_valid());
    if lost {
        metrics::counter!(cm::LOCK_LOST).increment(1);
    }
    lost
}

/// The span an event is handled in: its id, type and trace id (from `traceparent`); the
/// command id is recorded once known.
fn event_span(event: &Event) -> tracing::Span {
    let trace_id = event
        .extensions
        .get(cmdflow_shared::trace::TRACEPARENT)
        .and_then(Value::as_str)
        .and_then(cmdflow_shared::trace::parse)
        .map(|(trace, _)| trace.to_owned())
        .unwrap_or_default();
    tracing::info_span!("event", command.id = tracing::field::Empty, event.id = %event.id, event.type = %event.ty, trace.id = %trace_id)
}

/// Counts an event's outcome, and for an applied one its handling time and its latency from
/// the event's `time`.
fn record_outcome(
    disposition: &Disposition,
    ty: String,
    time: Option<chrono::DateTime<chrono::Utc>>,
    started: Instant,
) {
    let outcome = match disposition {
        Disposition::Ack(Applied::Applied) => "applied",
        Disposition::Ack(Applied::Duplicate) => "duplicate",
        Disposition::Ack(Applied::Ignored) => "ignored",
        Disposition::Ack(Applied::Unmatched) => "unmatched",
        Disposition::Busy => "busy",
        Disposition::Retry(_) => "retry",
        Disposition::Dead { .. } => "dead",
    };
    metrics::counter!(cm::EVENTS_PROCESSED, "type" => ty.clone(), "outcome" => outcome)
        .increment(1);
    if outcome == "applied" {
        metrics::histogram!(cm::HANDLER_SECONDS, "type" => ty.clone())
            .record(started.elapsed().as_secs_f64());
        if let Some(time) = time {
            let latency = (chrono::Utc::now() - time).num_microseconds().unwrap_or(0) as f64 / 1e6;
            metrics::histogram!(cm::EVENT_LATENCY_SECONDS, "type" => ty).record(latency.max(0.0));
        }
    }
}

impl Engine {
    async fn process_unmeasured(
        &self,
        body: &[u8],
        publish: bool,
    ) -> (
        Disposition,
        Vec<OutboxRow>,
        String,
        Option<chrono::DateTime<chrono::Utc>>,
    ) {
        let event = match Event::parse(body) {
            Ok(event) => event,
            Err(e) => {
                let dead = Disposition::Dead {
                    class: "invalid_event",
                    reason: format!("invalid event: {e}"),
                };
                return (dead, Vec::new(), "invalid".to_owned(), None);
            }
        };
        let (ty, time) = (event.ty.clone(), event.time);
        let span = event_span(&event);
        let (disposition, outbox) = async {
            let Some(command_id) = event.commandid else {
                // Starts new commands (fresh ids: nobody else can hold their lock) and wakes
                // waiters (their rows are claimed under a key lock, not the command lock).
                let kinds = self.registry.kinds_started_by(&event.ty);
                return self
                    .transact(&event, Target::Broadcast(kinds), publish, None)
                    .await;
            };
            tracing::Span::current().record("command.id", tracing::field::display(command_id));
            let _turn = self.local.lock(command_id).await;
            let held = match &self.locks {
                None => None,
                Some(locks) => {
                    let waited = Instant::now();
                    let taken = locks.acquire(command_id).await;
                    metrics::histogram!(cm::LOCK_WAIT_SECONDS)
                        .record(waited.elapsed().as_secs_f64());
                    match taken {
                        Ok(Some(held)) => Some(held),
                        Ok(None) => {
                            metrics::counter!(cm::LOCK_BUSY).increment(1);
                            return (Disposition::Busy, Vec::new());
                        }
                        Err(e) => return (Disposition::Retry(e.to_string()), Vec::new()),
                    }
                }
            };
            let done = self
                .transact(&event, Target::Command(command_id), publish, held.as_ref())
                .await;
            // A lock lost during processing is logged by its extender, and caught before
            // commit by `transact`.
            if let (Some(locks), Some(held)) = (&self.locks, held) {
                locks.release(held).await;
            }
            done
        }
        .instrument(span)
        .await;
        (disposition, outbox, ty, time)
    }

    /// One transaction for one event: apply, commit, then publish the outbox when asked.
    async fn transact(
        &self,
        event: &Event,
        target: Target<'_>,
        publish: bool,
        held: Option<&Held>,
    ) -> (Disposition, Vec<OutboxRow>) {
        let mut tx = match self.pool.begin().await {
            Ok(tx) => tx,
            Err(e) => return (Disposition::Retry(format!("PostgreSQL: {e}")), Vec::new()),
        };
        if lock_lost(held) {
            // Paused (or starved) since the lock was taken: do not wait on a row another worker
            // may now hold under the lock we lost; the event comes back through the busy delay.
            drop(tx.rollback().await);
            return (Disposition::Busy, Vec::new());
        }
        let applied = async {
            let mut reports = Vec::new();
            let (applied, mut outbox) = match target {
                Target::Command(id) => self.apply(&mut tx, id, event, &mut reports).await?,
                Target::Broadcast(kinds) => self.apply_broadcast(&mut tx, event, kinds).await?,
            };
            outbox.extend(self.count_reports(&mut tx, reports).await?);
            Ok::<_, ApplyError>((applied, outbox))
        }
        .await;
        let (applied, outbox) = match applied {
            Ok(done) => done,
            Err(e) => {
                drop(tx.rollback().await);
                let disposition = match e {
                    ApplyError::Store(e) => Disposition::Retry(e.to_string()),
                    ApplyError::NotFound(_) => Disposition::Retry(e.to_string()),
                    ApplyError::Permanent(reason) => Disposition::Dead {
                        class: "permanent",
                        reason,
                    },
                };
                return (disposition, Vec::new());
            }
        };
        if applied == Applied::Duplicate {
            drop(tx.rollback().await);
            return (Disposition::Ack(applied), Vec::new());
        }
        if let Some(held) = held
            && lock_lost([held])
        {
            // Paused or stalled past the lock's validity: another worker may hold it now. Write
            // nothing; the event comes back through the busy delay.
            drop(tx.rollback().await);
            tracing::warn!(
                lock.key = held.key(),
                "The lock ran out before commit; rolled back, the event will be tried again."
            );
            return (Disposition::Busy, Vec::new());
        }
        if let Err(e) = self.commit_with_confirmed(tx).await {
            return (
                Disposition::Retry(format!("PostgreSQL commit: {e}")),
                Vec::new(),
            );
        }
        if publish {
            self.publish_outbox(&outbox).await;
        }
        (Disposition::Ack(applied), outbox)
    }

    /// Publishes committed outbox rows with confirms and deletes the confirmed ones. A row that
    /// fails stays for the sweeper: the event is committed, so this is never the event's failure.
    pub async fn publish_outbox(&self, rows: &[OutboxRow]) {
        if rows.is_empty() {
            return;
        }
        let results = futures::future::join_all(rows.iter().map(|row| async move {
            let body = serde_json::to_vec(&row.body).unwrap_or_default();
            let id = row
                .body
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default();
            self.bus
                .publish_event(&row.event_type, id, &body, trace_headers(&row.body))
                .await
                .map(|()| row.id)
        }))
        .await;
        let confirmed: Vec<i64> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        if confirmed.len() < rows.len() {
            tracing::warn!(
                failed = rows.len() - confirmed.len(),
                "Some outbox events were not confirmed; the sweeper will publish them."
            );
        }
        self.lock_confirmed().extend(confirmed);
    }

    fn lock_confirmed(&self) -> std::sync::MutexGuard<'_, Vec<i64>> {
        self.confirmed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits `tx`, deleting in it the outbox rows confirmed since the last such commit: the
    /// deletes ride on work that commits anyway. If the commit fails they wait for the next.
    async fn commit_with_confirmed(&self, mut tx: store::Tx<'_>) -> Result<(), StoreError> {
        let ids = std::mem::take(&mut *self.lock_confirmed());
        let done = async {
            if !ids.is_empty() {
                store::delete_outbox_in(&mut tx, &ids).await?;
            }
            tx.commit().await?;
            Ok(())
        }
        .await;
        if done.is_err() {
            self.lock_confirmed().extend(ids);
        }
        done
    }

    /// Deletes the confirmed outbox rows no commit has taken along (an idle worker).
    pub async fn flush_confirmed(&self) {
        let ids = std::mem::take(&mut *self.lock_confirmed());
        if ids.is_empty() {
            return;
        }
        if let Err(e) = store::delete_outbox(&self.pool, &ids).await {
            tracing::warn!(error = %e, "Could not delete published outbox rows; trying again soon (the sweeper would publish them again, and consumers dedupe).");
            self.lock_confirmed().extend(ids);
        }
    }

    /// Settles a delivery with the broker according to its disposition.
    pub async fn settle(&self, delivery: &Delivery, disposition: &Disposition) {
        let headers = delivery.properties.headers().as_ref();
        let attempt = bus::header_u32(headers, HEADER_ATTEMPT);
        let forwarded = match disposition {
            Disposition::Ack(_) => Ok(()),
            Disposition::Busy => {
                let busy = bus::header_u32(headers, HEADER_BUSY) + 1;
                if busy.is_multiple_of(100) {
                    tracing::warn!(
                        busy,
                        "An event keeps finding its lock busy (or Redis without a majority)."
                    );
                }
                let mut h = headers.cloned().unwrap_or_default();
                h.insert(HEADER_BUSY.into(), AMQPValue::LongLongInt(busy.into()));
                self.forward_delay(delivery, self.settings.busy_delay, h)
                    .await
            }
            Disposition::Retry(error) => match self.settings.retry_delays.get(attempt as usize) {
                Some(delay) => {
                    tracing::warn!(attempt = attempt + 1, error = %error, delay = ?delay, "Retrying an event after a retryable error.");
                    self.record_attempt(delivery, attempt + 1, error).await;
                    let mut h = failure_headers(delivery, error);
                    h.insert(
                        HEADER_ATTEMPT.into(),
                        AMQPValue::LongLongInt((attempt + 1).into()),
                    );
                    h.insert(HEADER_LAST_ERROR.into(), bus::string(&clip(error)));
                    self.forward_delay(delivery, *delay, h).await
                }
                None => {
                    self.record_attempt(delivery, attempt + 1, error).await;
                    self.dead_letter(
                        delivery,
                        "retries_exhausted",
                        &format!("gave up after {} attempts: {error}", attempt + 1),
                    )
                    .await
                }
            },
            Disposition::Dead { class, reason } => self.dead_letter(delivery, class, reason).await,
        };
        match forwarded {
            Ok(()) => {
                if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                    tracing::warn!(error = %e, "Could not ack; the broker will redeliver and the event will be deduplicated.");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Could not forward the event; asking the broker to redeliver it.");
                drop(
                    delivery
                        .acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        })
                        .await,
                );
            }
        }
    }

    async fn forward_delay(
        &self,
        delivery: &Delivery,
        delay: Duration,
        mut headers: FieldTable,
    ) -> Result<(), BusError> {
        // The delay queue sends it back through the work queue under another routing key:
        // keep the original, for dead letters and replays.
        if bus::header_str(Some(&headers), bus::HEADER_ROUTING_KEY).is_none() {
            headers.insert(
                bus::HEADER_ROUTING_KEY.into(),
                bus::string(delivery.routing_key.as_str()),
            );
        }
        let props = delivery.properties.clone().with_headers(headers);
        let queue = self.bus.topology().retry_queue(delay);
        // The default exchange routes by queue name.
        self.bus.publish("", &queue, &delivery.data, props).await
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        class: &str,
        reason: &str,
    ) -> Result<(), BusError> {
        tracing::error!(
            error.class = class,
            reason,
            "An event became a dead letter."
        );
        let mut h = failure_headers(delivery, reason);
        h.insert(HEADER_REASON.into(), bus::string(&clip(reason)));
        h.insert(HEADER_ERROR_CLASS.into(), bus::string(class));
        h.insert(
            bus::HEADER_DEAD_ID.into(),
            bus::string(&uuid::Uuid::now_v7().to_string()),
        );
        let routing_key = bus::header_str(Some(&h), bus::HEADER_ROUTING_KEY)
            .unwrap_or_else(|| delivery.routing_key.as_str().to_owned());
        let props = delivery.properties.clone().with_headers(h);
        let dlx = self.bus.topology().dead_letter_exchange();
        self.bus
            .publish(&dlx, &routing_key, &delivery.data, props)
            .await
    }

    /// Records a failed attempt (best effort: the headers carry the errors too).
    async fn record_attempt(&self, delivery: &Delivery, attempt: u32, error: &str) {
        let event = Event::parse(&delivery.data).ok();
        let result = store::dead::record_attempt(
            &self.pool,
            event.as_ref().map(|e| e.source.as_str()),
            event.as_ref().map(|e| e.id.as_str()),
            event.as_ref().map(|e| e.ty.as_str()),
            event.as_ref().and_then(|e| e.commandid),
            attempt as i32,
            &clip(error),
        )
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "Could not record a failed attempt.");
        }
    }

    /// Consumes the work queue until `shutdown` fires, reconnecting to the broker as needed.
    /// On shutdown it stops consuming, lets in-flight events finish and ack, then returns.
    pub async fn run_until_stopped(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            match self.consume(&shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    if shutdown.is_cancelled() {
                        return;
                    }
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff = Duration::from_millis(100);
                    }
                    tracing::warn!(error = %e, queue.name = %self.bus.topology().work_queue(), retry_in = ?backoff, "Lost the broker; reconnecting.");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn consume(self: &Arc<Self>, shutdown: &CancellationToken) -> Result<(), BusError> {
        let channel = self.bus.channel().await?;
        channel
            .basic_qos(self.settings.prefetch, BasicQosOptions::default())
            .await?;
        let queue = self.bus.topology().work_queue();
        let tag = format!("cmdflow-worker-{}", uuid::Uuid::new_v4());
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue.name = %queue, "Consuming.");
        let tracker = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(self.settings.concurrency));
        let result = loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break Ok(()),
                },
            };
            let next = tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                next = consumer.next() => next,
            };
            let cancelled = || BusError::Connect {
                url: self.bus.url(),
                reason: "the consumer was cancelled by the broker".into(),
            };
            let mut batch = match next {
                Some(Ok(delivery)) => vec![delivery],
                Some(Err(e)) => break Err(BusError::from(e)),
                None => break Err(cancelled()),
            };
            // Whatever has arrived already joins the batch (group commit); nothing waits for
            // more, so a lone event is not delayed.
            let mut failure = None;
            while failure.is_none() && batch.len() < self.settings.batch {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(delivery))) => batch.push(delivery),
                    Some(Some(Err(e))) => failure = Some(BusError::from(e)),
                    Some(None) => failure = Some(cancelled()),
                    None => break,
                }
            }
            let engine = Arc::clone(self);
            tracker.spawn(async move {
                let dispositions = match batch.as_slice() {
                    [one] => vec![engine.process(&one.data).await],
                    many => {
                        let bodies: Vec<&[u8]> = many.iter().map(|d| d.data.as_slice()).collect();
                        engine.process_batch(&bodies).await
                    }
                };
                let settles = batch
                    .iter()
                    .zip(&dispositions)
                    .map(|(delivery, disposition)| engine.settle(delivery, disposition));
                futures::future::join_all(settles).await;
                drop(permit);
            });
            if let Some(e) = failure {
                break Err(e);
            }
        };
        if result.is_ok() {
            drop(
                channel
                    .basic_cancel(
                        ShortString::from(tag.as_str()),
                        BasicCancelOptions::default(),
                    )
                    .await,
            );
        }
        tracker.close();
        if tokio::time::timeout(self.settings.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            // Their deliveries are unacknowledged: closing the channel hands them back to the
            // broker, and whatever they committed is deduplicated when they come again.
            tracing::warn!(
                in_flight = tracker.len(),
                grace = ?self.settings.shutdown_grace,
                "Events still in flight after the shutdown grace; the broker will redeliver them."
            );
        }
        // What was published in the end is deleted now, not left for another worker's sweep.
        self.flush_confirmed().await;
        drop(channel.close(200, "worker stopping".into()).await);
        result
    }

    /// Publishes outbox rows that a crashed worker left behind, until `shutdown` fires.
    pub async fn sweep_outbox_until_stopped(self: Arc<Self>, shutdown: CancellationToken) {
        let every = (self.settings.outbox_sweep_after / 2).max(Duration::from_millis(100));
        let mut last_sweep = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    self.flush_confirmed().await;
                    return;
                }
                () = tokio::time::sleep(OUTBOX_FLUSH) => {}
            }
            self.flush_confirmed().await;
            if last_sweep.elapsed() < every {
                continue;
            }
            last_sweep = Instant::now();
            match self.sweep_outbox_once(500).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(published = n, "Swept outbox rows left behind."),
                Err(e) => tracing::warn!(error = %e, "Outbox sweep failed; trying again later."),
            }
            if let Ok(backlog) = store::outbox_backlog(&self.pool).await {
                metrics::gauge!(cm::OUTBOX_BACKLOG).set(backlog as f64);
            }
        }
    }

    /// One sweep: claims stale rows (skipping rows another sweeper holds), publishes them with
    /// confirms, deletes the confirmed ones. Returns how many were published.
    pub async fn sweep_outbox_once(&self, limit: i64) -> Result<usize, StoreError> {
        // Rows this worker published are not left behind: delete them before looking.
        self.flush_confirmed().await;
        let mut tx = self.pool.begin().await?;
        let rows =
            store::claim_stale_outbox(&mut tx, self.settings.outbox_sweep_after, limit).await?;
        let mut confirmed = Vec::with_capacity(rows.len());
        for row in &rows {
            let body = serde_json::to_vec(&row.body).unwrap_or_default();
            let id = row
                .body
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default();
            match self
                .bus
                .publish_event(&row.event_type, id, &body, trace_headers(&row.body))
                .await
            {
                Ok(()) => confirmed.push(row.id),
                Err(e) => {
                    tracing::warn!(error = %e, "The broker did not confirm a swept outbox event.");
                    break;
                }
            }
        }
        store::delete_outbox_in(&mut tx, &confirmed).await?;
        tx.commit().await?;
        Ok(confirmed.len())
    }
}

/// The delivery's headers with the failure history added: the first failure time and the chain
/// of errors.
fn failure_headers(delivery: &Delivery, error: &str) -> FieldTable {
    let mut h = delivery.properties.headers().clone().unwrap_or_default();
    if bus::header_str(Some(&h), bus::HEADER_FIRST_FAILURE).is_none() {
        h.insert(
            bus::HEADER_FIRST_FAILURE.into(),
            bus::string(&chrono::Utc::now().to_rfc3339()),
        );
    }
    let mut chain: Vec<String> = bus::header_str(Some(&h), bus::HEADER_ERRORS)
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    chain.push(clip(error));
    if chain.len() > 20 {
        chain.drain(..chain.len() - 20);
    }
    h.insert(
        bus::HEADER_ERRORS.into(),
        bus::string(&serde_json::to_string(&chain).unwrap_or_default()),
    );
    h
}

/// AMQP headers for an outbox row: the `traceparent` its event carries.
fn trace_headers(body: &Value) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(tp) = body
        .get(cmdflow_shared::trace::TRACEPARENT)
        .and_then(Value::as_str)
    {
        headers.insert(cmdflow_shared::trace::TRACEPARENT.into(), bus::string(tp));
    }
    headers
}

/// An error as a header or dead-letter reason keeps, at most.
fn clip(s: &str) -> String {
    cmdflow_shared::contract::clip_to(s, 1000)
}
