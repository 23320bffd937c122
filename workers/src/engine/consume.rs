//! The consume loop: the work partitions this worker holds, in order, into batches.
//!
//! - **Partitions.** A namespace's events are split into `N` partition queues by command
//!   ([`cmdflow_shared::bus`]); one command's events all go to one, in the order they were
//!   accepted. Workers share the partitions evenly: each claims its share in PostgreSQL under a
//!   lease it renews ([`cmdflow_shared::store::partitions`]), and consumes each claimed queue.
//!   The queues have a single active consumer: should two workers ever consume one (a lease
//!   that ran out during a pause), the broker delivers to one, and to the next only once the
//!   first is gone, its unacknowledged deliveries first. A worker that has
//!   more than its share (one joined) stops consuming the extra ones, finishes what it took from
//!   them, and lets them go; a dead worker's partitions are taken over when its lease runs out,
//!   and what it had not acked comes back, in its place, to the next consumer (`partitions.rs`).
//! - **Unkeyed events.** One worker at a time (the single active consumer, the others standing by)
//!   forwards the events published without a partition header, in order, to their partitions
//!   (`forward.rs`).
//! - **Batches.** Deliveries of all held partitions are taken as they come (up to
//!   `CMDFLOW_BATCH` at once); before a batch starts, it takes this worker's turns of its
//!   commands, so a later batch never applies a command's event before an earlier one.
//! - **Retry lanes.** An event that must be tried again is tried in place, after each retry
//!   delay, holding its command's turn: the command's later events wait behind it (unacked,
//!   within the prefetch), and other commands go on. After the last delay it is a dead letter,
//!   and its successors go on.

use std::collections::BTreeMap;
use std::sync::Arc;

use cmdflow_shared::bus::Bus;
use cmdflow_shared::contract::{EnvelopeError, types};
use cmdflow_shared::{CommandId, Event};
use lapin::message::Delivery;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::forward::forward_unkeyed;
use super::partitions::{Holder, InFlightGuard};
use super::{Disposition, Engine, Failures, commands_of, local};

/// One delivery of a held partition, parsed, counted in its partition's in-flight events until
/// dropped (after it is settled).
pub struct Incoming {
    pub(super) delivery: Delivery,
    pub(super) event: Result<Event, EnvelopeError>,
    pub(super) _in_flight: InFlightGuard,
}

/// A command's stalled deliveries, in order, with what became of each.
type Line = Vec<(Incoming, Disposition)>;

impl Engine {
    /// Consumes the partitions this worker holds until `shutdown` fires, forwards unkeyed
    /// events when it is this worker's turn, and reconnects to the broker as needed. On
    /// shutdown it stops consuming, lets in-flight events finish and ack, lets go of its
    /// partitions, then returns.
    pub async fn run_until_stopped(self: Arc<Self>, shutdown: CancellationToken) {
        let (tx, rx) = mpsc::channel(usize::from(self.settings.prefetch).max(16));
        let drained = CancellationToken::new();
        let router = tokio::spawn(forward_unkeyed(Arc::clone(&self.bus), shutdown.clone()));
        let holder = Holder::new(Arc::clone(&self), tx);
        let holding = tokio::spawn(holder.run(shutdown.clone(), drained.clone()));
        let tracker = TaskTracker::new();
        Arc::clone(&self).batches(rx, &tracker, &shutdown).await;
        tracker.close();
        if tokio::time::timeout(self.settings.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            // Their deliveries are unacknowledged: closing the channels hands them back to the
            // broker, and whatever they committed is deduplicated when they come again.
            tracing::warn!(
                in_flight = tracker.len(),
                grace = ?self.settings.shutdown_grace,
                "Events still in flight after the shutdown grace; the broker will redeliver them."
            );
        }
        // What was published in the end is deleted now, not left for another worker's sweep.
        self.flush_confirmed().await;
        drained.cancel();
        drop(holding.await);
        drop(router.await);
    }

    /// Forms batches from the deliveries as they come, takes their commands' turns in that
    /// order, and runs each in a task, at most `CMDFLOW_CONCURRENCY` at once.
    async fn batches(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Incoming>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        let permits = Arc::new(Semaphore::new(self.settings.concurrency));
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => return,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let first = tokio::select! {
                () = shutdown.cancelled() => return,
                next = rx.recv() => match next {
                    Some(incoming) => incoming,
                    None => return,
                },
            };
            // Whatever has arrived already joins the batch (group commit); nothing waits for
            // more, so a lone event is not delayed.
            let mut batch = vec![first];
            while batch.len() < self.settings.batch {
                match rx.try_recv() {
                    Ok(incoming) => batch.push(incoming),
                    Err(_) => break,
                }
            }
            let events: Vec<Result<Event, EnvelopeError>> =
                batch.iter().map(|i| i.event.clone()).collect();
            // Taken here, before the batch runs, in the order the batches are formed.
            let turns = self.local.turns(&commands_of(&events));
            let engine = Arc::clone(&self);
            let (lanes, stop) = (tracker.clone(), shutdown.clone());
            tracker.spawn(async move {
                engine.run_batch(batch, events, turns, &lanes, stop).await;
                drop(permit);
            });
        }
    }

    /// Applies a batch, settles what is done, and hands each command whose event must be tried
    /// again, with its later events and its turn, to a retry lane.
    async fn run_batch(
        self: Arc<Self>,
        batch: Vec<Incoming>,
        events: Vec<Result<Event, EnvelopeError>>,
        turns: BTreeMap<CommandId, local::Turn>,
        lanes: &TaskTracker,
        shutdown: CancellationToken,
    ) {
        let (dispositions, mut guards) = self.process_reserved(&events, turns).await;
        let mut stalled: Vec<(Option<CommandId>, Line)> = Vec::new();
        let mut done = Vec::new();
        for (incoming, disposition) in batch.into_iter().zip(dispositions) {
            let id = incoming.event.as_ref().ok().and_then(|e| e.commandid);
            let waits = matches!(disposition, Disposition::Retry(_) | Disposition::Held);
            match stalled
                .iter_mut()
                .find(|(c, _)| c.is_some() && *c == id && waits)
            {
                Some((_, line)) => line.push((incoming, disposition)),
                None if waits => stalled.push((id, vec![(incoming, disposition)])),
                None => done.push((incoming, disposition)),
            }
        }
        let settles = done.iter().map(|(i, d)| self.settle(&i.delivery, d));
        futures::future::join_all(settles).await;
        for (id, line) in stalled {
            let turn = id.and_then(|id| guards.remove(&id));
            let engine = Arc::clone(&self);
            lanes.spawn(engine.retry_lane(line, turn, shutdown.clone()));
        }
        drop(guards);
    }

    /// Tries a command's stalled events again, in order, after each retry delay, holding its
    /// turn; the first that runs out of delays becomes a dead letter and the next goes on.
    async fn retry_lane(
        self: Arc<Self>,
        line: Line,
        _turn: Option<local::LocalGuard>,
        shutdown: CancellationToken,
    ) {
        for (incoming, first) in line {
            let Ok(event) = &incoming.event else {
                // Invalid events are dead letters at once; none waits here.
                continue;
            };
            let mut failures = Failures::default();
            let mut outcome = first;
            loop {
                outcome = match outcome {
                    Disposition::Held => self.process_in_turn(event, true).await.0,
                    Disposition::Retry(cause) => {
                        let error = cause.chain();
                        failures.attempts += 1;
                        failures.first_at.get_or_insert_with(chrono::Utc::now);
                        self.record_attempt(&incoming.delivery, failures.attempts, &error)
                            .await;
                        let delay = self
                            .settings
                            .retry_delays
                            .get(failures.attempts as usize - 1)
                            .copied();
                        failures.errors.push(error.clone());
                        match delay {
                            Some(delay) => {
                                tracing::warn!(attempt = failures.attempts, error = %error, delay = ?delay, "Trying an event again after a retryable error; its command's later events wait.");
                                tokio::select! {
                                    // Unacked: the broker hands it, and those behind it, back.
                                    () = shutdown.cancelled() => return,
                                    () = tokio::time::sleep(delay) => {}
                                }
                                self.process_in_turn(event, true).await.0
                            }
                            None => {
                                let reason = format!(
                                    "gave up after {} attempts: {error}",
                                    failures.attempts
                                );
                                // The dead letter counts the tries before this last one.
                                failures.errors.pop();
                                failures.attempts -= 1;
                                Disposition::Dead {
                                    class: "retries_exhausted",
                                    reason,
                                }
                            }
                        }
                    }
                    last => {
                        self.settle_after(&incoming.delivery, &last, &failures)
                            .await;
                        break;
                    }
                };
            }
        }
    }
}

/// Parses a delivery from the broker, and refuses an engine event type (`command.*`,
/// `children.*`, `timer.*`, `wait.*`) that does not carry the engine's mark: only cmdflow's own
/// processes speak for the engine. `owner.linked` needs the mark too (the gateway checked the
/// caller's `owners:link` scope), or a source in `link_sources`. A refused event becomes a dead
/// letter with the reason.
pub(crate) fn admit(
    bus: &Bus,
    link_sources: &[String],
    delivery: &Delivery,
) -> Result<Event, EnvelopeError> {
    // A message in binary mode that the forwarder left as it came (not a valid event) is read
    // as binary here, so that its dead letter says what is wrong with it.
    let mut event = Event::from_amqp(&delivery.properties, &delivery.data)?;
    let marked = || bus.is_from_engine(delivery.properties.headers().as_ref());
    if event.ty == types::OWNER_LINKED && !marked() {
        // Who linked is the gateway's word, never the sender's.
        event.extensions.remove(cmdflow_shared::contract::LINKED_BY);
    }
    if event.ty == types::OWNER_LINKED && !link_sources.contains(&event.source) && !marked() {
        return Err(EnvelopeError::Invalid {
            field: "source".to_owned(),
            reason: format!(
                "`{}` may not link identities: owner.linked comes through the gateway with the \
                 `owners:link` scope, or straight from a source in CMDFLOW_LINK_SOURCES",
                event.source
            ),
        });
    }
    if types::is_reserved(&event.ty) && !marked() {
        return Err(EnvelopeError::Invalid {
            field: "type".to_owned(),
            reason: format!(
                "`{}` is an engine event type and this one did not come from cmdflow \
                 (it lacks the engine's mark); only cmdflow's own processes send command.*, \
                 children.*, timer.* and wait.* events",
                event.ty
            ),
        });
    }
    Ok(event)
}
