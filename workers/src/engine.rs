//! The engine: consume → lock → one transaction → commit → publish outbox → release → ack.
//!
//! [`Engine::process`] does everything for one message except settling it with the broker, and
//! returns a [`Disposition`]; [`Engine::settle`] acks, delays or dead-letters accordingly. Inside,
//! [`Engine::apply`] is the part that runs in a transaction it is handed, so several deliveries
//! for different commands can later share one transaction (group commit) without a rewrite.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cmdflow_shared::bus::{
    self, Bus, BusError, HEADER_ATTEMPT, HEADER_BUSY, HEADER_ERROR_CLASS, HEADER_LAST_ERROR,
    HEADER_REASON,
};
use cmdflow_shared::contract::types::COMMAND_START;
use cmdflow_shared::decision::{Outcome, apply_data};
use cmdflow_shared::domain::{Kind, Owner};
use cmdflow_shared::lock::Locks;
use cmdflow_shared::store::{self, EntryKind, HistoryEntry, NewCommand, OutboxRow, StoreError, Tx};
use cmdflow_shared::{CommandId, CommandState, Event};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::handlers::Registry;

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
    pub prefetch: u16,
    pub concurrency: usize,
    pub retry_delays: Vec<Duration>,
    pub busy_delay: Duration,
    pub outbox_sweep_after: Duration,
}

impl EngineSettings {
    pub fn from_config(
        config: &cmdflow_shared::Config,
    ) -> Result<Self, cmdflow_shared::config::ConfigError> {
        Ok(Self {
            prefetch: config.prefetch,
            concurrency: config.concurrency,
            retry_delays: config.retry_delay_list()?,
            busy_delay: config.busy_delay,
            outbox_sweep_after: config.outbox_sweep_after,
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

pub struct Engine {
    pool: PgPool,
    bus: Arc<Bus>,
    locks: Option<Locks>,
    registry: Arc<Registry>,
    settings: EngineSettings,
}

/// The data of a `command.start` event.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartData {
    kind: String,
    owner: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    parent_id: Option<CommandId>,
}

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
        }
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Processes one message body: lock, transaction, commit, outbox, release. Does not ack.
    pub async fn process(&self, body: &[u8]) -> Disposition {
        let event = match Event::parse(body) {
            Ok(event) => event,
            Err(e) => {
                return Disposition::Dead {
                    class: "invalid_event",
                    reason: format!("invalid event: {e}"),
                };
            }
        };
        let Some(command_id) = event.commandid else {
            // Broadcast events start or wake commands once the registry maps types to kinds;
            // until then nothing is waiting for them.
            tracing::debug!(event.id = %event.id, event.type = %event.ty, "No command is addressed by this broadcast event.");
            return Disposition::Ack(Applied::Unmatched);
        };
        let span = tracing::info_span!("event", command.id = %command_id, event.id = %event.id, event.type = %event.ty);
        self.process_addressed(command_id, &event)
            .instrument(span)
            .await
    }

    async fn process_addressed(&self, command_id: CommandId, event: &Event) -> Disposition {
        let held = match &self.locks {
            None => None,
            Some(locks) => match locks.acquire(command_id).await {
                Ok(Some(held)) => Some(held),
                Ok(None) => return Disposition::Busy,
                Err(e) => return Disposition::Retry(e.to_string()),
            },
        };
        let disposition = self.process_locked(command_id, event).await;
        if let (Some(locks), Some(held)) = (&self.locks, held) {
            if held.is_lost() {
                tracing::warn!(
                    lock.key = held.key(),
                    "The lock was lost while the event was processed."
                );
            }
            locks.release(held).await;
        }
        disposition
    }

    async fn process_locked(&self, command_id: CommandId, event: &Event) -> Disposition {
        let mut tx = match self.pool.begin().await {
            Ok(tx) => tx,
            Err(e) => return Disposition::Retry(format!("PostgreSQL: {e}")),
        };
        let (applied, outbox) = match self.apply(&mut tx, command_id, event).await {
            Ok(done) => done,
            Err(e) => {
                drop(tx.rollback().await);
                return match e {
                    ApplyError::Store(e) => Disposition::Retry(e.to_string()),
                    ApplyError::NotFound(_) => Disposition::Retry(e.to_string()),
                    ApplyError::Permanent(reason) => Disposition::Dead {
                        class: "permanent",
                        reason,
                    },
                };
            }
        };
        if applied == Applied::Duplicate {
            drop(tx.rollback().await);
            return Disposition::Ack(applied);
        }
        if let Err(e) = tx.commit().await {
            return Disposition::Retry(format!("PostgreSQL commit: {e}"));
        }
        self.publish_outbox(&outbox).await;
        Disposition::Ack(applied)
    }

    /// Applies one event to one command inside `tx`: create on start, lock the row, dedupe,
    /// decide, guarded update, history, outbox. Returns the outbox rows to publish after commit.
    pub async fn apply(
        &self,
        tx: &mut Tx<'_>,
        command_id: CommandId,
        event: &Event,
    ) -> Result<(Applied, Vec<OutboxRow>), ApplyError> {
        let mut created = false;
        if event.ty == COMMAND_START {
            let new = self.new_command(command_id, event)?;
            created = store::insert_command(tx, &new).await?;
        }
        let Some(command) = store::lock_command(tx, command_id).await? else {
            return Err(ApplyError::NotFound(command_id));
        };
        if !store::mark_processed(tx, command_id, &event.source, &event.id).await? {
            tracing::debug!("Already applied; ignoring the redelivery.");
            return Ok((Applied::Duplicate, Vec::new()));
        }

        let ignore = if command.state.is_terminal() {
            Some(format!(
                "the command is {}; a terminal command accepts no more events",
                command.state
            ))
        } else if event.ty == COMMAND_START && !created {
            Some("the command already exists; a second start changes nothing".to_owned())
        } else {
            None
        };
        if let Some(reason) = ignore {
            store::append_history(
                tx,
                command_id,
                command.version,
                &[HistoryEntry {
                    entry: EntryKind::Ignored,
                    event_id: Some(event.id.clone()),
                    event_type: Some(event.ty.clone()),
                    from_state: None,
                    to_state: None,
                    detail: Some(json!({ "reason": reason, "source": event.source })),
                }],
            )
            .await?;
            return Ok((Applied::Ignored, Vec::new()));
        }

        let handler = self.registry.get(&command.kind).ok_or_else(|| {
            ApplyError::Permanent(format!("unknown command kind `{}`", command.kind))
        })?;
        let decision = handler.decide(&command, event).map_err(|e| {
            ApplyError::Permanent(format!(
                "handler {} refused {}: {e}",
                command.kind, event.ty
            ))
        })?;

        let mut next = command.clone();
        let default_state = if command.state == CommandState::Pending {
            CommandState::Running
        } else {
            command.state
        };
        let target = match &decision.outcome {
            Some(Outcome::Complete(result)) => {
                next.result = Some(result.clone());
                CommandState::Completed
            }
            Some(Outcome::Fail(reason)) => {
                next.reason = Some(reason.clone());
                CommandState::Failed
            }
            None => decision.state.unwrap_or(default_state),
        };
        next.state = command.state.transition(target).map_err(|e| {
            ApplyError::Permanent(format!(
                "handler {} decided an illegal move: {e}",
                command.kind
            ))
        })?;
        if let Some(change) = &decision.data {
            next.data = apply_data(&command.data, change);
        }
        if let Some(ui) = &decision.ui {
            next.ui = if ui.is_null() { None } else { Some(ui.clone()) };
        }
        if next.state.is_terminal() {
            next.ui = None;
        }
        store::update_command(tx, &next, command.version).await?;

        let emitted: Vec<Event> = decision
            .emit
            .iter()
            .map(|emit| {
                let mut out = Event::new(
                    &format!("cmdflow/{}", command.kind),
                    &emit.ty,
                    emit.data.clone(),
                );
                out.commandid = emit.to;
                out.subject = Some(command.owner.clone());
                out.causationid = Some(event.id.clone());
                out.correlationid = event
                    .correlationid
                    .clone()
                    .or_else(|| Some(command.root_id.to_string()));
                out
            })
            .collect();

        let mut history = vec![HistoryEntry {
            entry: EntryKind::Received,
            event_id: Some(event.id.clone()),
            event_type: Some(event.ty.clone()),
            from_state: None,
            to_state: None,
            detail: Some(json!({ "source": event.source, "data": event.data })),
        }];
        if next.state != command.state {
            history.push(HistoryEntry {
                entry: EntryKind::StateChanged,
                event_id: Some(event.id.clone()),
                event_type: None,
                from_state: Some(command.state),
                to_state: Some(next.state),
                detail: match (&next.result, &next.reason, next.state) {
                    (Some(result), _, CommandState::Completed) => Some(json!({ "result": result })),
                    (_, Some(reason), CommandState::Failed) => Some(json!({ "reason": reason })),
                    _ => None,
                },
            });
        }
        history.extend(emitted.iter().map(|out| HistoryEntry {
            entry: EntryKind::Emitted,
            event_id: Some(out.id.clone()),
            event_type: Some(out.ty.clone()),
            from_state: None,
            to_state: None,
            detail: Some(json!({ "commandid": out.commandid, "data": out.data })),
        }));
        store::append_history(tx, command_id, command.version + 1, &history).await?;
        let outbox = store::insert_outbox(tx, command_id, &emitted).await?;
        Ok((Applied::Applied, outbox))
    }

    fn new_command(&self, id: CommandId, event: &Event) -> Result<NewCommand, ApplyError> {
        let start: StartData = serde_json::from_value(Value::Object(event.data.clone()))
            .map_err(|e| ApplyError::Permanent(format!("invalid command.start data: {e}")))?;
        let kind = Kind::parse(&start.kind)
            .map_err(|e| ApplyError::Permanent(format!("invalid command.start data: kind: {e}")))?;
        if !self.registry.contains(kind.as_str()) {
            return Err(ApplyError::Permanent(format!(
                "unknown command kind `{kind}`"
            )));
        }
        let owner = Owner::parse(&start.owner).map_err(|e| {
            ApplyError::Permanent(format!("invalid command.start data: owner: {e}"))
        })?;
        let data = match start.data {
            None | Some(Value::Null) => json!({}),
            Some(Value::Object(map)) => Value::Object(map),
            Some(_) => {
                return Err(ApplyError::Permanent(
                    "invalid command.start data: data must be a JSON object".into(),
                ));
            }
        };
        Ok(NewCommand {
            id,
            kind: kind.to_string(),
            owner: owner.to_string(),
            parent_id: start.parent_id,
            root_id: id,
            depth: 0,
            data,
        })
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
                .publish_event(&row.event_type, id, &body, FieldTable::default())
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
        if let Err(e) = store::delete_outbox(&self.pool, &confirmed).await {
            tracing::warn!(error = %e, "Could not delete published outbox rows; the sweeper may publish them again (consumers dedupe).");
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
                    let mut h = headers.cloned().unwrap_or_default();
                    h.insert(
                        HEADER_ATTEMPT.into(),
                        AMQPValue::LongLongInt((attempt + 1).into()),
                    );
                    h.insert(HEADER_LAST_ERROR.into(), bus::string(&clip(error)));
                    self.forward_delay(delivery, *delay, h).await
                }
                None => {
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
        headers: FieldTable,
    ) -> Result<(), BusError> {
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
        let mut h = delivery.properties.headers().clone().unwrap_or_default();
        h.insert(HEADER_REASON.into(), bus::string(&clip(reason)));
        h.insert(HEADER_ERROR_CLASS.into(), bus::string(class));
        h.insert(
            "x-cmdflow-routing-key".into(),
            AMQPValue::LongString(delivery.routing_key.as_str().into()),
        );
        let props = delivery.properties.clone().with_headers(h);
        let dlx = self.bus.topology().dead_letter_exchange();
        self.bus
            .publish(&dlx, delivery.routing_key.as_str(), &delivery.data, props)
            .await
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
            match next {
                Some(Ok(delivery)) => {
                    let engine = Arc::clone(self);
                    tracker.spawn(async move {
                        let disposition = engine.process(&delivery.data).await;
                        engine.settle(&delivery, &disposition).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => break Err(BusError::from(e)),
                None => {
                    break Err(BusError::Connect {
                        url: self.bus.url(),
                        reason: "the consumer was cancelled by the broker".into(),
                    });
                }
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
        tracker.wait().await;
        drop(channel.close(200, "worker stopping".into()).await);
        result
    }

    /// Publishes outbox rows that a crashed worker left behind, until `shutdown` fires.
    pub async fn sweep_outbox_until_stopped(self: Arc<Self>, shutdown: CancellationToken) {
        let every = (self.settings.outbox_sweep_after / 2).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.sweep_outbox_once(500).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(published = n, "Swept outbox rows left behind."),
                Err(e) => tracing::warn!(error = %e, "Outbox sweep failed; trying again later."),
            }
        }
    }

    /// One sweep: claims stale rows (skipping rows another sweeper holds), publishes them with
    /// confirms, deletes the confirmed ones. Returns how many were published.
    pub async fn sweep_outbox_once(&self, limit: i64) -> Result<usize, StoreError> {
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
                .publish_event(&row.event_type, id, &body, FieldTable::default())
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

fn clip(s: &str) -> String {
    match s.char_indices().nth(1000) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}
