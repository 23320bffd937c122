//! The engine: consume → lock → one transaction → commit → publish outbox → release → ack.
//!
//! [`Engine::process`] does everything for one message except settling it with the broker, and
//! returns a [`Disposition`]; [`Engine::settle`] acks or dead-letters accordingly. Inside,
//! [`Engine::apply`] is the part that runs in a transaction it is handed. [`consume`] is the
//! loop that feeds it: the work partitions this worker holds, in order.
//!
//! Order: a command's events arrive at one worker (its partition's), in the order they were
//! accepted. The consume loop takes each batch's turns of its commands ([`local`]) before it
//! starts the batch, so batches apply a command's events in that order too. An event that must
//! be tried again is tried in place, after each retry delay, its command's later events held
//! behind it; a busy lock is waited for. Nothing goes round a delay queue, so nothing overtakes.
//!
//! Group commit: the consumer takes whatever deliveries have already arrived (up to
//! `CMDFLOW_BATCH`) and [`Engine::process_batch`] applies them in one transaction, after one
//! try at each command's lock (all sent at once), then acks each after the commit and publishes
//! their outbox events together under confirms. Two events of one command in a batch are
//! applied one after the other, in the order they came, under the one lock: never at once.
//! A command whose lock another worker holds gets a second round: once the batch has committed
//! and let go of its locks, the worker waits for that one lock (holding no other) and applies
//! the command's events of the batch together. A broadcast, or an event whose transaction
//! failed, goes alone.

mod apply;
mod broadcast;
pub mod consume;
mod local;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cmdflow_shared::bus::{self, Bus, BusError, HEADER_ATTEMPT, HEADER_ERROR_CLASS, HEADER_REASON};
use cmdflow_shared::contract::EnvelopeError;
use cmdflow_shared::contract::types::COMMAND_START;
use cmdflow_shared::lock::{Held, Locks};
use cmdflow_shared::metrics as cm;
use cmdflow_shared::store::{self, OutboxRow, StoreError};
use cmdflow_shared::time::{Clock, SystemClock};
use cmdflow_shared::{CommandId, Event};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::registry::Registry;

/// The failed tries of an event being tried again in place: how many, their errors, when the
/// first was.
#[derive(Debug, Clone, Default)]
pub struct Failures {
    pub attempts: u32,
    pub errors: Vec<String>,
    pub first_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// What to do with a message once the engine is done with it.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Applied, or recognised as already applied, or deliberately ignored: ack it.
    Ack(Applied),
    /// Trouble that may pass (database, broker, a command not created yet, a lock that stays
    /// busy): tried again after each of the retry delays, in place, its command's later events
    /// waiting behind it; after the last, a dead letter.
    Retry(String),
    /// Not tried: an earlier event of its command waits to be tried again, and this one waits
    /// behind it (the order of a command's events is kept).
    Held,
    /// It can never succeed as it is: dead letters at once, with the reason.
    Dead { class: &'static str, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    Duplicate,
    Ignored,
    Unmatched,
    /// Its command does not exist yet: kept, to be applied right after the command's start.
    Parked,
}

/// Errors inside the transaction, sorted where they happen.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("command {0} does not exist (yet): no start of it has been applied")]
    NotFound(CommandId),
    #[error("{0}")]
    Permanent(String),
    /// A remote decider could not answer now: tried again later.
    #[error("{0}")]
    Unavailable(String),
    /// The command runs on a version of its kind this worker does not have: its events wait
    /// (parked, in order) for a worker that has it.
    #[error("command {id} runs on version {version} of {kind}, which this worker does not have")]
    VersionMissing {
        id: CommandId,
        kind: String,
        version: String,
    },
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
    /// The Redlock TTL: a worker that waits for a lock says so once per TTL.
    pub lock_ttl: Duration,
    /// One try at a busy lock waits this long; after a Redis error, the next try waits it too.
    pub lock_wait: Duration,
    /// How long a partition claim lasts without renewal.
    pub partition_lease: Duration,
    /// How long an event parked for its command's start waits before it is a dead letter.
    pub start_wait: Duration,
    pub outbox_sweep_after: Duration,
    pub max_depth: i32,
    pub max_children: usize,
    pub early_event_window: Duration,
    /// Whether e-mails are sent (an SMTP server is configured) or kept in the app.
    pub smtp_enabled: bool,
    /// Sources allowed to send `owner.linked` straight to the broker.
    pub link_sources: Vec<String>,
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
            lock_ttl: config.lock_ttl,
            lock_wait: config.lock_wait,
            partition_lease: config.partition_lease,
            start_wait: config.start_wait,
            outbox_sweep_after: config.outbox_sweep_after,
            max_depth: config.max_depth,
            max_children: config.max_children,
            early_event_window: config.early_event_window,
            smtp_enabled: config.smtp_url.is_some(),
            link_sources: config.link_source_list(),
        })
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
    local: Arc<local::LocalLocks>,
    /// Outbox rows the broker confirmed, deleted by the worker's next commit (or within
    /// [`OUTBOX_FLUSH`] when it is idle) rather than by a commit of their own.
    confirmed: std::sync::Mutex<Vec<i64>>,
    /// Commands with events parked until their start (in the partitions this worker holds).
    parked: std::sync::Mutex<std::collections::HashSet<CommandId>>,
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
            local: Arc::new(local::LocalLocks::default()),
            confirmed: std::sync::Mutex::new(Vec::new()),
            parked: std::sync::Mutex::default(),
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

    /// The Redlock quorum, unless locking is off.
    pub fn locks(&self) -> Option<&Locks> {
        self.locks.as_ref()
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
        let event = match Event::parse(body) {
            Ok(event) => event,
            Err(e) => {
                let dead = invalid(&e);
                record_outcome(&dead, "invalid".to_owned(), None, Instant::now());
                return (dead, Vec::new());
            }
        };
        // This worker's turn for the command first, as the consume loop takes it.
        let _turn = match event.commandid {
            Some(id) => Some(self.local.lock(id).await),
            None => None,
        };
        self.process_in_turn(&event, publish).await
    }

    /// Processes one parsed event whose command's turn in this worker the caller holds (or a
    /// broadcast): Redlock, transaction, commit, publish the outbox (when asked), release.
    pub(crate) async fn process_in_turn(
        &self,
        event: &Event,
        publish: bool,
    ) -> (Disposition, Vec<OutboxRow>) {
        let started = Instant::now();
        let (disposition, outbox) = self.process_unmeasured(event, publish).await;
        record_outcome(&disposition, event.ty.clone(), event.time, started);
        (disposition, outbox)
    }

    /// Processes several message bodies, returning one disposition each, in order: takes this
    /// worker's turns of their commands (as the consume loop does before it starts a batch),
    /// then [`Engine::process_reserved`]. An event left [`Disposition::Retry`] or
    /// [`Disposition::Held`] is the caller's to try again, in order.
    pub async fn process_batch(&self, bodies: &[&[u8]]) -> Vec<Disposition> {
        let events: Vec<Result<Event, EnvelopeError>> =
            bodies.iter().map(|b| Event::parse(b)).collect();
        let turns = self.local.turns(&commands_of(&events));
        self.process_reserved(&events, turns).await.0
    }

    /// Processes a batch of parsed events whose commands' turns in this worker were taken in
    /// `turns` (held now, or queued for behind earlier batches). Returns one disposition per
    /// event, in order, and the turns, now held, for the caller to let go or keep.
    ///
    /// Events for commands whose turns are held at once and whose Redis locks are free are
    /// applied in one transaction and one commit, their outbox events published together under
    /// confirms: each command's events one after the other, in the order they came, under its
    /// one lock. A command that another batch of this worker holds goes in a second round, when
    /// its turn comes; one whose Redis lock another worker holds is waited for, one at a time.
    /// Broadcasts, invalid events and events whose transaction failed go one by one, each
    /// command's in order; after an event left to retry, its command's later events are
    /// [`Disposition::Held`], never applied ahead of it.
    pub(crate) async fn process_reserved(
        &self,
        events: &[Result<Event, EnvelopeError>],
        turns: std::collections::BTreeMap<CommandId, local::Turn>,
    ) -> (
        Vec<Disposition>,
        std::collections::BTreeMap<CommandId, local::LocalGuard>,
    ) {
        let started = Instant::now();
        let mut dispositions: Vec<Option<Disposition>> = vec![None; events.len()];
        let mut alone: Vec<usize> = Vec::new();
        let mut together: Vec<(usize, CommandId, Event)> = Vec::new();
        for (i, event) in events.iter().enumerate() {
            match event {
                Ok(event) => match event.commandid {
                    Some(id) => together.push((i, id, event.clone())),
                    None => alone.push(i),
                },
                // The one-by-one path dead-letters it with the reason.
                Err(_) => alone.push(i),
            }
        }
        // A command with parked events goes one event at a time: its parked ones are applied
        // right after its start, before its next event.
        let parked = self.parked_snapshot();
        if !parked.is_empty() {
            let (waiting, rest): (Vec<_>, Vec<_>) = together
                .into_iter()
                .partition(|(_, id, _)| parked.contains(id));
            alone.extend(waiting.into_iter().map(|(i, _, _)| i));
            together = rest;
        }
        // By command, each command's events in the order they came, in ascending id order.
        together.sort_by_key(|(i, id, _)| (*id, *i));
        // The commands no other batch of this worker holds go first. Those that one holds go
        // second, when their turns come: a command shared with an earlier batch holds back only
        // its own events, not the batch.
        let mut held = std::collections::BTreeMap::new();
        let mut queued = Vec::new();
        for (id, turn) in turns {
            match turn {
                local::Turn::Held(guard) => {
                    held.insert(id, guard);
                }
                local::Turn::Queued(q) => queued.push(q),
            }
        }
        let (first, later): (Vec<_>, Vec<_>) = together
            .into_iter()
            .partition(|(_, id, _)| held.contains_key(id));
        if first.len() >= 2 {
            self.apply_round(first, started, &mut dispositions, &mut alone)
                .await;
        } else {
            alone.extend(first.into_iter().map(|(i, _, _)| i));
        }
        if !queued.is_empty() {
            for turn in queued {
                let guard = turn.come().await;
                held.insert(guard.id(), guard);
            }
            // Whoever held these turns may have parked events of their commands meanwhile.
            let parked = self.parked_snapshot();
            let (waiting, later): (Vec<_>, Vec<_>) = later
                .into_iter()
                .partition(|(_, id, _)| parked.contains(id));
            alone.extend(waiting.into_iter().map(|(i, _, _)| i));
            if later.len() >= 2 {
                self.apply_round(later, started, &mut dispositions, &mut alone)
                    .await;
            } else {
                alone.extend(later.into_iter().map(|(i, _, _)| i));
            }
        }
        // One by one: each command's events in order, commands side by side.
        alone.sort_unstable();
        let mut lines: Vec<(Option<CommandId>, Vec<usize>)> = Vec::new();
        for i in alone {
            let id = events[i].as_ref().ok().and_then(|e| e.commandid);
            match lines.iter_mut().find(|(c, _)| c.is_some() && *c == id) {
                Some((_, line)) => line.push(i),
                None => lines.push((id, vec![i])),
            }
        }
        let runs = lines.iter().map(|(_, line)| async move {
            let mut outcomes = Vec::with_capacity(line.len());
            let mut stalled = false;
            for &i in line {
                let outcome = match &events[i] {
                    _ if stalled => Disposition::Held,
                    Err(e) => invalid(e),
                    Ok(event) => self.process_in_turn(event, true).await.0,
                };
                stalled |= matches!(outcome, Disposition::Retry(_));
                let id = events[i].as_ref().ok().and_then(|e| e.commandid);
                if let (false, Some(id)) = (stalled, id)
                    && self.has_parked(id)
                    && let Err(retry) = self.apply_parked(id).await
                {
                    // The parked events wait for the next try; so does what comes after.
                    tracing::warn!(command.id = %id, error = ?retry, "Could not apply a command's parked events yet.");
                    stalled = true;
                }
                outcomes.push((i, outcome));
            }
            outcomes
        });
        for (i, outcome) in futures::future::join_all(runs).await.into_iter().flatten() {
            dispositions[i] = Some(outcome);
        }
        let dispositions = dispositions
            .into_iter()
            .map(|d| d.unwrap_or_else(|| Disposition::Retry("not processed".to_owned())))
            .collect();
        (dispositions, held)
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
                let outcomes = match self.lock_patiently(locks, chunk[0].1).await {
                    Ok(held) => {
                        let done = self.transact_many(chunk, std::slice::from_ref(&held)).await;
                        locks.release(held).await;
                        done
                    }
                    // The first waits to be tried again, its successors behind it.
                    Err(retry) => Some(
                        std::iter::once(retry)
                            .chain(std::iter::repeat_n(Disposition::Held, chunk.len() - 1))
                            .collect(),
                    ),
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
        // Each event's handling span, open until its batch has committed and published.
        let mut handles = Vec::with_capacity(events.len());
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
                handles.push(span.clone());
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
                // An event the batch cannot take (a refusal, a command not there yet, a version
                // this worker lacks) is routine: it is dealt with on its own. A PostgreSQL error
                // is not, and an operator sees it.
                let cause = if matches!(e, ApplyError::Store(_)) {
                    tracing::warn!(error = %e, events = events.len(), "A batch's transaction failed in PostgreSQL; its events are tried one by one.");
                    "store"
                } else {
                    tracing::debug!(error = %e, "A batch could not take one of its events; its events are tried one by one.");
                    "event"
                };
                metrics::counter!(cm::BATCH_FAILURES, "cause" => cause).increment(1);
                drop(tx.rollback().await);
                return None;
            }
        };
        if lock_lost(held) {
            drop(tx.rollback().await);
            return None;
        }
        let committing = commit_span(&handles);
        if let Err(e) = self.commit_with_confirmed(tx).instrument(committing).await {
            let reason = format!("PostgreSQL commit: {e}");
            return Some(vec![Disposition::Retry(reason); events.len()]);
        }
        metrics::histogram!(cm::BATCH_SIZE).record(events.len() as f64);
        let first = handles.first().cloned().unwrap_or_else(tracing::Span::none);
        self.publish_outbox(&outbox).instrument(first).await;
        Some(applied.into_iter().map(Disposition::Ack).collect())
    }
}

/// An event whose lock ran out before its commit: tried again, not a failure of its own.
fn lock_ran_out() -> Disposition {
    Disposition::Retry(
        "the command's lock ran out before the commit (a pause or a stall)".to_owned(),
    )
}

/// A body that is not a valid event: a dead letter at once, with the reason.
fn invalid(e: &EnvelopeError) -> Disposition {
    Disposition::Dead {
        class: "invalid_event",
        reason: format!("invalid event: {e}"),
    }
}

/// The commands the events are addressed to, ascending, each once.
fn commands_of(events: &[Result<Event, EnvelopeError>]) -> Vec<CommandId> {
    let mut ids: Vec<CommandId> = events
        .iter()
        .filter_map(|e| e.as_ref().ok().and_then(|e| e.commandid))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
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
/// command id is recorded once known. With traces on, it is a child of the span its
/// `traceparent` names (the gateway's publish, or the handling that emitted it).
fn event_span(event: &Event) -> tracing::Span {
    let traceparent = event
        .extensions
        .get(cmdflow_shared::trace::TRACEPARENT)
        .and_then(Value::as_str);
    let trace_id = traceparent
        .and_then(cmdflow_shared::trace::parse)
        .map(|(trace, _)| trace.to_owned())
        .unwrap_or_default();
    let span = tracing::info_span!("handle", otel.kind = tracing::field::Empty, command.id = tracing::field::Empty, event.id = %event.id, event.type = %event.ty, trace.id = %trace_id);
    cmdflow_shared::telemetry::set_parent(&span, traceparent);
    cmdflow_shared::telemetry::set_kind(&span, "consumer");
    span
}

/// The span of a transaction's commit, for traces (none when they are off): a child of the
/// first event's handling span, and for a batch, linked to the others'.
fn commit_span(handles: &[tracing::Span]) -> tracing::Span {
    let Some(first) = handles.first() else {
        return tracing::Span::none();
    };
    if !cmdflow_shared::telemetry::traces_enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(parent: first, "commit", db.system.name = "postgresql", events = handles.len());
    for other in &handles[1..] {
        span.follows_from(other);
    }
    span
}

/// The span of publishing committed outbox rows, for traces (none when they are off).
fn outbox_span(rows: usize) -> tracing::Span {
    if !cmdflow_shared::telemetry::traces_enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "outbox publish",
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.batch.message_count = rows
    )
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
        Disposition::Ack(Applied::Parked) => "parked",
        Disposition::Held => "held",
        Disposition::Retry(_) => "retry",
        Disposition::Dead { .. } => "dead",
    };
    let ty = cm::type_label(&ty);
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
    fn parked_snapshot(&self) -> std::collections::HashSet<CommandId> {
        self.parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn has_parked(&self, id: CommandId) -> bool {
        self.parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
    }

    /// Notes commands with parked events (those of a partition this worker takes over).
    pub(crate) fn note_parked(&self, ids: impl IntoIterator<Item = CommandId>) {
        self.parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ids);
    }

    /// Parks `event` until its command's start is applied.
    async fn park(&self, id: CommandId, event: &Event) -> Disposition {
        self.park_for(id, event, None).await
    }

    /// Parks `event` until its command's start is applied (`waiting_for` `None`), or until a
    /// worker that has the definition its command runs on takes it (`waiting_for` names it;
    /// such an event does not expire).
    async fn park_for(
        &self,
        id: CommandId,
        event: &Event,
        waiting_for: Option<&str>,
    ) -> Disposition {
        let partition =
            bus::partition_of(id.as_uuid().as_bytes(), self.bus.topology().partitions());
        let parked = store::partitions::park(
            &self.pool,
            id.as_uuid(),
            partition,
            &event.source,
            &event.id,
            &event.ty,
            &event.to_bytes(),
            waiting_for,
        )
        .await;
        match parked {
            Ok(new) => {
                self.note_parked([id]);
                match waiting_for {
                    Some(what) if new => {
                        tracing::warn!(command.id = %id, event.r#type = %event.ty, waiting_for = what, "An event waits for a worker with its command's definition; parked.")
                    }
                    Some(_) => {}
                    None => {
                        tracing::debug!(command.id = %id, "An event came before its command's start; parked until the start.")
                    }
                }
                Disposition::Ack(Applied::Parked)
            }
            Err(e) => Disposition::Retry(e.to_string()),
        }
    }

    /// Applies the events parked for a definition of commands in a partition this worker just
    /// took, each in its command's turn. Those whose version this worker does not have either
    /// stay parked, in order, for the next worker.
    pub(crate) async fn resume_waiting(self: Arc<Self>, ids: Vec<CommandId>) {
        for id in ids {
            let _turn = self.local.lock(id).await;
            if let Err(retry) = self.apply_parked(id).await {
                tracing::warn!(command.id = %id, error = ?retry, "Could not apply a command's parked events yet.");
            }
        }
    }

    /// Applies `id`'s parked events in order, once its start has been applied (this worker
    /// holds its turn). Stops at one that must wait (the command still does not exist, or a
    /// retryable error): `Err` for the latter.
    async fn apply_parked(&self, id: CommandId) -> Result<(), Disposition> {
        let rows = store::partitions::parked_for(&self.pool, id.as_uuid())
            .await
            .map_err(|e| Disposition::Retry(e.to_string()))?;
        for row in &rows {
            let outcome = match Event::parse(&row.body) {
                Ok(event) => self.process_in_turn(&event, true).await.0,
                Err(e) => invalid(&e),
            };
            match outcome {
                // Still no command: it waits on, with the rest.
                Disposition::Ack(Applied::Parked) => return Ok(()),
                Disposition::Ack(_) => {}
                Disposition::Dead { class, reason } => {
                    let properties = bus::event_properties("parked");
                    self.dead_letter_body(
                        &row.body,
                        properties,
                        &row.routing_key,
                        class,
                        &reason,
                        &Failures::default(),
                    )
                    .await
                    .map_err(|e| Disposition::Retry(e.to_string()))?;
                }
                retry @ (Disposition::Retry(_) | Disposition::Held) => return Err(retry),
            }
            store::partitions::unpark(&self.pool, row.id)
                .await
                .map_err(|e| Disposition::Retry(e.to_string()))?;
        }
        self.parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        Ok(())
    }

    /// Dead-letters the events parked longer than `CMDFLOW_START_WAIT`: their command never
    /// started. Returns how many.
    pub async fn expire_parked(&self) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = store::partitions::overdue(&mut tx, self.settings.start_wait, 100).await?;
        let mut done = Vec::with_capacity(rows.len());
        for row in &rows {
            let reason = format!(
                "command {} does not exist: its start was not applied within {} (CMDFLOW_START_WAIT)",
                row.command_id,
                humantime::format_duration(self.settings.start_wait)
            );
            let published = self
                .dead_letter_body(
                    &row.body,
                    bus::event_properties("parked"),
                    &row.routing_key,
                    "start_never_came",
                    &reason,
                    &Failures::default(),
                )
                .await;
            match published {
                Ok(()) => done.push(row.id),
                Err(e) => {
                    tracing::warn!(error = %e, "Could not dead-letter an expired parked event; trying again later.");
                    break;
                }
            }
        }
        store::partitions::unpark_in(&mut tx, &done).await?;
        tx.commit().await?;
        Ok(done.len())
    }

    /// Waits for the command's Redlock lock, for as long as it takes. A partition's events come
    /// to one worker, so the lock is busy only while another worker finishes what it took
    /// before it let the partition go; no majority of the Redis masters is an outage of the
    /// fleet, not a fault of the event. Either way the event keeps its place, its successors
    /// behind it: it is never retried toward a dead letter for it. A warning every lock TTL
    /// says how long it has waited.
    async fn lock_patiently(&self, locks: &Locks, id: CommandId) -> Result<Held, Disposition> {
        let waited = Instant::now();
        let mut warned = Instant::now();
        loop {
            match locks.acquire(id).await {
                Ok(Some(held)) => {
                    metrics::histogram!(cm::LOCK_WAIT_SECONDS)
                        .record(waited.elapsed().as_secs_f64());
                    return Ok(held);
                }
                Ok(None) => metrics::counter!(cm::LOCK_BUSY).increment(1),
                Err(e) => {
                    metrics::counter!(cm::LOCK_BUSY).increment(1);
                    tracing::debug!(command.id = %id, error = %e, "Could not take a lock.");
                    tokio::time::sleep(self.settings.lock_wait).await;
                }
            }
            if warned.elapsed() >= self.settings.lock_ttl {
                warned = Instant::now();
                tracing::warn!(command.id = %id, waited = ?waited.elapsed(), "Still waiting for a command's lock (busy, or no majority of the Redis masters); its events wait in order.");
            }
        }
    }

    async fn process_unmeasured(
        &self,
        event: &Event,
        publish: bool,
    ) -> (Disposition, Vec<OutboxRow>) {
        let event = event.clone();
        let span = event_span(&event);
        async {
            let Some(command_id) = event.commandid else {
                // Starts new commands (fresh ids: nobody else can hold their lock) and wakes
                // waiters (their rows are claimed under a key lock, not the command lock).
                let kinds = self.registry.kinds_started_by(&event.ty);
                return self
                    .transact(&event, Target::Broadcast(kinds), publish, None)
                    .await;
            };
            tracing::Span::current().record("command.id", tracing::field::display(command_id));
            let held = match &self.locks {
                None => None,
                Some(locks) => match self.lock_patiently(locks, command_id).await {
                    Ok(held) => Some(held),
                    Err(retry) => return (retry, Vec::new()),
                },
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
        .await
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
            // may now hold under the lock we lost; the event is tried again.
            drop(tx.rollback().await);
            return (lock_ran_out(), Vec::new());
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
                    // PostgreSQL refused the data itself: another try would fail the same way.
                    ApplyError::Store(e) if e.is_permanent() => Disposition::Dead {
                        class: "store",
                        reason: format!(
                            "PostgreSQL refused the event's changes (SQLSTATE {}): {e}",
                            e.sqlstate().unwrap_or_else(|| "-".to_owned())
                        ),
                    },
                    ApplyError::Store(e) => Disposition::Retry(e.to_string()),
                    ApplyError::Unavailable(reason) => {
                        tracing::warn!(%reason, "A remote decider did not answer; the event is tried again later.");
                        Disposition::Retry(reason)
                    }
                    // Its start may come the slower way (forwarded, or still in an outbox):
                    // kept until then, in order.
                    ApplyError::NotFound(id) if event.ty != COMMAND_START => {
                        return (self.park(id, event).await, Vec::new());
                    }
                    ApplyError::NotFound(_) => Disposition::Retry(e.to_string()),
                    ApplyError::VersionMissing { id, kind, version } => {
                        let waiting_for = format!("{kind} version {version}");
                        return (
                            self.park_for(id, event, Some(&waiting_for)).await,
                            Vec::new(),
                        );
                    }
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
            // nothing; the event is tried again.
            drop(tx.rollback().await);
            tracing::warn!(
                lock.key = held.key(),
                "The lock ran out before commit; rolled back, the event will be tried again."
            );
            return (lock_ran_out(), Vec::new());
        }
        let committing = commit_span(&[tracing::Span::current()]);
        if let Err(e) = self.commit_with_confirmed(tx).instrument(committing).await {
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
        let confirmed: Vec<i64> = self
            .publish_rows(rows)
            .instrument(outbox_span(rows.len()))
            .await
            .into_iter()
            .filter_map(Result::ok)
            .collect();
        if confirmed.len() < rows.len() {
            tracing::warn!(
                failed = rows.len() - confirmed.len(),
                "Some outbox events were not confirmed; the sweeper will publish them."
            );
        }
        self.lock_confirmed().extend(confirmed);
    }

    /// Publishes outbox rows in their order (the order their events were decided), each to its
    /// partition, under confirms: the ids of the confirmed rows, or why not.
    async fn publish_rows(&self, rows: &[OutboxRow]) -> Vec<Result<i64, BusError>> {
        let exchange = self.bus.topology().events_exchange();
        let bodies: Vec<Vec<u8>> = rows
            .iter()
            .map(|row| serde_json::to_vec(&row.body).unwrap_or_default())
            .collect();
        let messages = rows
            .iter()
            .zip(&bodies)
            .map(|(row, body)| {
                let id = row
                    .body
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let mut headers = trace_headers(&row.body);
                self.bus.mark_engine(&mut headers);
                self.bus
                    .add_partition(&mut headers, &route_key_of_json(&row.body));
                bus::Outgoing {
                    exchange: exchange.clone(),
                    routing_key: &row.event_type,
                    body,
                    properties: bus::event_properties(id).with_headers(headers),
                }
            })
            .collect();
        self.bus
            .publish_many(messages)
            .await
            .into_iter()
            .zip(rows)
            .map(|(r, row)| r.map(|()| row.id))
            .collect()
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

    /// Settles a delivery with the broker according to its disposition: acks an event applied
    /// (or recognised, or ignored), dead-letters a permanently bad one and acks it. A
    /// [`Disposition::Retry`] or [`Disposition::Held`] is the retry lane's to try again in
    /// place; one that reaches this (a caller without a lane) goes back to the broker.
    pub async fn settle(&self, delivery: &Delivery, disposition: &Disposition) {
        self.settle_after(delivery, disposition, &Failures::default())
            .await;
    }

    /// [`Engine::settle`] of an event that failed `failures` before (its retry lane).
    pub(crate) async fn settle_after(
        &self,
        delivery: &Delivery,
        disposition: &Disposition,
        failures: &Failures,
    ) {
        let forwarded = match disposition {
            Disposition::Ack(_) => Ok(()),
            Disposition::Dead { class, reason } => {
                self.dead_letter(delivery, class, reason, failures).await
            }
            Disposition::Retry(_) | Disposition::Held => {
                tracing::warn!(
                    "An event to be tried again reached no retry lane; handing it back to the broker."
                );
                drop(
                    delivery
                        .acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        })
                        .await,
                );
                return;
            }
        };
        match forwarded {
            Ok(()) => {
                if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                    tracing::warn!(error = %e, "Could not ack; the broker will redeliver and the event will be deduplicated.");
                }
            }
            Err(e) => {
                // Not acked: the delivery stays with this worker until its channel closes, and
                // comes back, in its place, to whoever takes the partition next.
                tracing::warn!(error = %e, "Could not dead-letter an event; it stays unacknowledged and comes back.");
            }
        }
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        class: &str,
        reason: &str,
        failures: &Failures,
    ) -> Result<(), BusError> {
        self.dead_letter_body(
            &delivery.data,
            delivery.properties.clone(),
            delivery.routing_key.as_str(),
            class,
            reason,
            failures,
        )
        .await
    }

    /// Publishes an event's bytes to the dead letters, with the reason and its failures.
    async fn dead_letter_body(
        &self,
        data: &[u8],
        properties: lapin::BasicProperties,
        routing_key: &str,
        class: &str,
        reason: &str,
        failures: &Failures,
    ) -> Result<(), BusError> {
        tracing::error!(
            error.class = class,
            reason,
            "An event became a dead letter."
        );
        let mut h = properties.headers().clone().unwrap_or_default();
        let first = failures.first_at.unwrap_or_else(chrono::Utc::now);
        if bus::header_str(Some(&h), bus::HEADER_FIRST_FAILURE).is_none() {
            h.insert(
                bus::HEADER_FIRST_FAILURE.into(),
                bus::string(&first.to_rfc3339()),
            );
        }
        let mut chain: Vec<String> = bus::header_str(Some(&h), bus::HEADER_ERRORS)
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        chain.extend(failures.errors.iter().map(|e| clip(e)));
        chain.push(clip(reason));
        if chain.len() > 20 {
            chain.drain(..chain.len() - 20);
        }
        h.insert(
            bus::HEADER_ERRORS.into(),
            bus::string(&serde_json::to_string(&chain).unwrap_or_default()),
        );
        h.insert(
            HEADER_ATTEMPT.into(),
            AMQPValue::LongLongInt(i64::from(failures.attempts)),
        );
        h.insert(HEADER_REASON.into(), bus::string(&clip(reason)));
        h.insert(HEADER_ERROR_CLASS.into(), bus::string(class));
        h.insert(
            bus::HEADER_DEAD_ID.into(),
            bus::string(&uuid::Uuid::now_v7().to_string()),
        );
        let routing_key = bus::header_str(Some(&h), bus::HEADER_ROUTING_KEY)
            .unwrap_or_else(|| routing_key.to_owned());
        let props = properties.with_headers(h);
        let dlx = self.bus.topology().dead_letter_exchange();
        self.bus.publish(&dlx, &routing_key, data, props).await
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
            match self.expire_parked().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    dead_letters = n,
                    "Events waited longer than CMDFLOW_START_WAIT for their command's start; they are dead letters."
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "Could not look for expired parked events; trying again later.")
                }
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
        for published in self.publish_rows(&rows).await {
            match published {
                Ok(id) => confirmed.push(id),
                Err(e) => {
                    tracing::warn!(error = %e, "The broker did not confirm a swept outbox event.");
                }
            }
        }
        store::delete_outbox_in(&mut tx, &confirmed).await?;
        tx.commit().await?;
        Ok(confirmed.len())
    }
}

/// What an outbox event's partition is a hash of, from its JSON (as [`bus::route_key`]).
fn route_key_of_json(body: &Value) -> Vec<u8> {
    let text = |k: &str| body.get(k).and_then(Value::as_str);
    match (text("commandid"), text("correlationid")) {
        (Some(id), _) => match id.parse::<CommandId>() {
            Ok(id) => id.as_uuid().as_bytes().to_vec(),
            Err(_) => id.as_bytes().to_vec(),
        },
        (None, Some(key)) => key.as_bytes().to_vec(),
        (None, None) => text("id").unwrap_or_default().as_bytes().to_vec(),
    }
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
