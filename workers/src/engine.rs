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
//!
//! By file: [`consume`] (the loop, batches and retry lanes), `partitions` (the partitions this
//! worker holds and their consumers), `forward` (events without a partition header), `batch`
//! (group commit), `process` (one event on its own), `apply` (a decision applied in a transaction,
//! with `apply/children` for spawning and fan-in, `apply/timers` for timers and waits, and
//! `apply/decision` for the checks before it), `broadcast` (events addressed to no command),
//! `parked` (events waiting for their start or their flow version), `outbox` (publishing after
//! the commit, and the sweeper), `settle` (ack or dead letter), `local` (this worker's turns of
//! its commands). The lock is [`cmdflow_shared::lock`], the fan-in [`crate::fanin`], the batch
//! writer [`cmdflow_shared::store::steps`].

mod apply;
mod batch;
mod broadcast;
pub mod consume;
mod forward;
mod local;
mod outbox;
mod parked;
mod partitions;
mod process;
mod settle;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cmdflow_shared::bus::{self, Bus, BusError, HEADER_ATTEMPT, HEADER_ERROR_CLASS, HEADER_REASON};
use cmdflow_shared::contract::EnvelopeError;
use cmdflow_shared::contract::types::COMMAND_START;
use cmdflow_shared::lock::{Held, Locks};
use cmdflow_shared::metrics as cm;
use cmdflow_shared::store::{self, OutboxRow, StoreError, Writer};
use cmdflow_shared::time::{Clock, SystemClock};
use cmdflow_shared::{CommandId, Event};
use lapin::message::Delivery;
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
    Retry(RetryCause),
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

/// Why an event is tried again, with the error that caused it (its source chain kept for the
/// attempt's record and the dead letter: see [`RetryCause::chain`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RetryCause {
    #[error(transparent)]
    Store(Arc<StoreError>),
    #[error("PostgreSQL commit: {0}")]
    Commit(#[source] Arc<StoreError>),
    #[error(transparent)]
    Bus(Arc<BusError>),
    #[error("command {0} does not exist (yet): no start of it has been applied")]
    NotFound(CommandId),
    /// A remote decider did not answer now (its reason).
    #[error("{0}")]
    Unavailable(String),
    #[error("the command's lock ran out before the commit (a pause or a stall)")]
    LockRanOut,
    /// The batch ended without an outcome for it: never applied, so tried again.
    #[error("not processed")]
    NotProcessed,
}

impl RetryCause {
    /// The error and each of its sources, as one line: `a: b: c`. A source whose words the
    /// line already holds (an error that prints its source) is not said twice.
    pub fn chain(&self) -> String {
        let mut line = self.to_string();
        let mut next = std::error::Error::source(self);
        while let Some(e) = next {
            let said = e.to_string();
            if !line.contains(&said) {
                line.push_str(": ");
                line.push_str(&said);
            }
            next = e.source();
        }
        line
    }
}

/// Two causes are equal when they are the same kind of trouble and say the same (errors from
/// the crates below have no equality of their own).
impl PartialEq for RetryCause {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

impl From<StoreError> for RetryCause {
    fn from(e: StoreError) -> Self {
        Self::Store(Arc::new(e))
    }
}

impl From<sqlx::Error> for RetryCause {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(Arc::new(StoreError::Database(e)))
    }
}

impl From<BusError> for RetryCause {
    fn from(e: BusError) -> Self {
        Self::Bus(Arc::new(e))
    }
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
    /// The most children started in the transaction that spawns them (see
    /// `apply::children`'s eager starts).
    pub eager_starts: usize,
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
            eager_starts: config.eager_starts,
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
}

/// An event whose lock ran out before its commit: tried again, not a failure of its own.
fn lock_ran_out() -> Disposition {
    Disposition::Retry(RetryCause::LockRanOut)
}

/// A commit that failed: nothing of it was written, so the event is tried again.
fn commit_failed(e: StoreError) -> Disposition {
    Disposition::Retry(RetryCause::Commit(Arc::new(e)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_cause_keeps_its_source_chain_and_says_each_error_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let cause = RetryCause::Commit(Arc::new(StoreError::Database(sqlx::Error::Io(io))));
        let chain = cause.chain();
        assert!(
            chain.starts_with("PostgreSQL commit: PostgreSQL: "),
            "{chain}"
        );
        assert_eq!(chain.matches("reset by peer").count(), 1, "{chain}");
        let source = std::error::Error::source(&cause).map(ToString::to_string);
        assert_eq!(
            source.as_deref(),
            Some(&chain["PostgreSQL commit: ".len()..])
        );

        let lock = RetryCause::LockRanOut;
        assert_eq!(lock.chain(), lock.to_string());
        let id = CommandId::new();
        let missing = Disposition::Retry(RetryCause::NotFound(id));
        assert_eq!(missing.clone(), missing);
        assert_ne!(
            missing,
            Disposition::Retry(RetryCause::NotFound(CommandId::new())),
            "causes are equal only when they say the same"
        );
    }
}
