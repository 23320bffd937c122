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
//!   and what it had not acked comes back, in its place, to the next consumer.
//! - **Unkeyed events.** One worker at a time (the single active consumer, the others standing by)
//!   forwards the events published without a partition header, in order, to their partitions.
//! - **Batches.** Deliveries of all held partitions are taken as they come (up to
//!   `CMDFLOW_BATCH` at once); before a batch starts, it takes this worker's turns of its
//!   commands, so a later batch never applies a command's event before an earlier one.
//! - **Retry lanes.** An event that must be tried again is tried in place, after each retry
//!   delay, holding its command's turn: the command's later events wait behind it (unacked,
//!   within the prefetch), and other commands go on. After the last delay it is a dead letter,
//!   and its successors go on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cmdflow_shared::bus::{self, Bus, BusError};
use cmdflow_shared::contract::{EnvelopeError, binary, types};
use cmdflow_shared::store::partitions;
use cmdflow_shared::{CommandId, Event};
use futures::{FutureExt, StreamExt};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Disposition, Engine, Failures, commands_of, local};

/// One delivery of a held partition, parsed, counted in its partition's in-flight events until
/// dropped (after it is settled).
pub struct Incoming {
    delivery: Delivery,
    event: Result<Event, EnvelopeError>,
    _in_flight: InFlightGuard,
}

/// A command's stalled deliveries, in order, with what became of each.
type Line = Vec<(Incoming, Disposition)>;

/// How many deliveries of one partition are taken and not settled yet.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(Arc::clone(self))
    }

    /// Waits until nothing taken from the partition is left unsettled, at most `within`.
    async fn settled(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let idle = self.idle.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, idle).await.is_err() {
                return self.count.load(Ordering::SeqCst) == 0;
            }
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

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
                    Disposition::Retry(error) => {
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

/// The partitions this worker holds, and their consumers.
struct Holder {
    engine: Arc<Engine>,
    /// Who holds a claim: this process.
    me: String,
    tx: mpsc::Sender<Incoming>,
    consuming: BTreeMap<u32, Consuming>,
    /// Partitions being let go: no longer consumed, their events in flight finishing.
    draining: Arc<std::sync::Mutex<BTreeSet<u32>>>,
}

struct Consuming {
    channel: Channel,
    in_flight: Arc<InFlight>,
    /// Stops taking deliveries, but keeps the consumer: see [`Consuming::pause`].
    pause: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Consuming {
    /// Stops taking deliveries from the partition, and keeps its (active) consumer until the
    /// channel closes. Cancelling the consumer instead would let another worker consume the
    /// partition while this one still applies what it took: the events behind those would
    /// overtake them. What the broker sends meanwhile waits, unacked, and goes back to the
    /// queue, in its place, when the channel closes.
    fn pause(&self) {
        self.pause.cancel();
    }
}

impl Holder {
    fn new(engine: Arc<Engine>, tx: mpsc::Sender<Incoming>) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
        let me = format!(
            "{host}/{}/{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Self {
            engine,
            me,
            tx,
            consuming: BTreeMap::new(),
            draining: Arc::default(),
        }
    }

    fn namespace(&self) -> &str {
        self.engine.bus.topology().namespace()
    }

    /// Keeps this worker's share of the partitions until `shutdown`; then stops consuming,
    /// waits for `drained`, closes the channels and lets every partition go.
    async fn run(mut self, shutdown: CancellationToken, drained: CancellationToken) {
        let tick = (self.engine.settings.partition_lease / 4).max(Duration::from_millis(500));
        loop {
            if let Err(e) = self.rebalance().await {
                tracing::warn!(error = %e, "Could not check this worker's partitions; trying again.");
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(tick) => {}
            }
        }
        for c in self.consuming.values() {
            c.pause();
        }
        // The batch loop ends when every sender is gone: this one, and the consumers' below.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        drained.cancelled().await;
        for (_, c) in std::mem::take(&mut self.consuming) {
            c.task.abort();
            drop(c.channel.close(200, "worker stopping".into()).await);
        }
        if let Err(e) = partitions::leave(&self.engine.pool, self.namespace(), &self.me).await {
            tracing::warn!(error = %e, "Could not let go of the partitions; others take them when the lease runs out.");
        }
    }

    /// Renews this worker's claims, takes or gives partitions to hold its share, and consumes
    /// every partition it holds.
    async fn rebalance(&mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let engine = Arc::clone(&self.engine);
        let (pool, settings) = (&engine.pool, &engine.settings);
        let n = engine.bus.topology().partitions();
        let lease = settings.partition_lease;
        let beat = partitions::beat(pool, self.namespace(), &self.me, n, lease).await?;
        let held: BTreeSet<u32> = beat.held.iter().copied().collect();
        // Claims lost (the lease ran out during a pause) and consumers that ended (the broker
        // went away): stop those, consume again what is still held.
        let gone: Vec<u32> = self
            .consuming
            .iter()
            .filter(|(p, c)| !held.contains(p) || c.task.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in gone {
            if let Some(c) = self.consuming.remove(&p) {
                c.task.abort();
                drop(c.channel.close(200, "partition let go".into()).await);
            }
        }
        let draining = self
            .draining
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut active: Vec<u32> = held.difference(&draining).copied().collect();
        let share = n.div_ceil(beat.workers) as usize;
        if active.len() > share {
            for p in active.split_off(share) {
                self.let_go(p);
            }
        } else if active.len() < share {
            let wanted = (share - active.len()) as u32;
            active.extend(
                partitions::claim(pool, self.namespace(), &self.me, n, wanted, lease).await?,
            );
        }
        let prefetch =
            (usize::from(settings.prefetch) / share.max(1)).clamp(16, usize::from(u16::MAX)) as u16;
        for p in active {
            if self.consuming.contains_key(&p) {
                continue;
            }
            // Before its first event: the commands whose events wait there for their start.
            let parked = partitions::parked_commands(pool, &[p]).await?;
            engine.note_parked(parked.into_iter().map(CommandId::from));
            match self.consume(p, prefetch).await {
                Ok(consuming) => {
                    tracing::info!(partition = p, "Consuming a partition.");
                    self.consuming.insert(p, consuming);
                    // Events that wait for a definition: this worker may have it.
                    let waiting = partitions::waiting_commands(pool, &[p]).await?;
                    if !waiting.is_empty() {
                        let ids = waiting.into_iter().map(CommandId::from).collect();
                        tokio::spawn(engine.clone().resume_waiting(ids));
                    }
                }
                // Still consumed by the worker that held it (finishing, or paused): next time.
                Err(e) => {
                    tracing::debug!(partition = p, error = %e, "Cannot consume a partition yet.")
                }
            }
        }
        Ok(())
    }

    /// Starts consuming partition `p` (active once no other consumer is).
    async fn consume(&self, p: u32, prefetch: u16) -> Result<Consuming, BusError> {
        let bus = &self.engine.bus;
        let queue = bus.topology().partition_queue(p);
        let channel = bus.channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("cmdflow-worker-{}-{p}", uuid::Uuid::new_v4().simple());
        let pause = CancellationToken::new();
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let in_flight = Arc::new(InFlight::default());
        let (tx, counter, paused) = (self.tx.clone(), Arc::clone(&in_flight), pause.clone());
        let bus = Arc::clone(bus);
        let link_sources = self.engine.settings().link_sources.clone();
        let task = tokio::spawn(async move {
            let mut consumer = consumer;
            loop {
                let next = tokio::select! {
                    biased;
                    () = paused.cancelled() => break,
                    next = consumer.next() => next,
                };
                let Some(Ok(delivery)) = next else { return };
                let guard = counter.enter();
                let event = admit(&bus, &link_sources, &delivery);
                let incoming = Incoming {
                    delivery,
                    event,
                    _in_flight: guard,
                };
                if tx.send(incoming).await.is_err() {
                    return;
                }
            }
            // Paused: the batch loop may end without this sender; the consumer stays, and
            // with it the partition, until the channel is closed and this task aborted.
            drop(tx);
            std::future::pending::<()>().await;
            drop(consumer);
        });
        Ok(Consuming {
            channel,
            in_flight,
            pause,
            task,
        })
    }

    /// Stops consuming `p`; once what was taken from it is settled, lets it go for another
    /// worker.
    fn let_go(&mut self, p: u32) {
        let Some(c) = self.consuming.remove(&p) else {
            return;
        };
        self.draining
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p);
        let (engine, me, draining) = (
            Arc::clone(&self.engine),
            self.me.clone(),
            Arc::clone(&self.draining),
        );
        tracing::info!(partition = p, "Letting a partition go to another worker.");
        tokio::spawn(async move {
            c.pause();
            let grace = engine.settings.shutdown_grace;
            if !c.in_flight.settled(grace).await {
                tracing::warn!(
                    partition = p,
                    "A partition's events were not all settled in time; closing it anyway (the broker hands them on)."
                );
            }
            c.task.abort();
            drop(c.channel.close(200, "partition let go".into()).await);
            let namespace = engine.bus.topology().namespace();
            if let Err(e) = partitions::release(&engine.pool, namespace, &me, p).await {
                tracing::warn!(partition = p, error = %e, "Could not let a partition go; another worker takes it when the lease runs out.");
            }
            draining
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&p);
        });
    }
}

/// Forwards the events published without a partition header (in `{ns}.unkeyed`) to their
/// partitions, in order, when this worker is the one consumer of that queue; stands by
/// otherwise. Until `shutdown`.
async fn forward_unkeyed(bus: Arc<Bus>, shutdown: CancellationToken) {
    loop {
        match forward_while_first(&bus, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(error = %e, "Not forwarding unkeyed events (another worker does, or the broker is away).")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// How many unkeyed events are forwarded at once.
const FORWARD_BATCH: u16 = 256;

async fn forward_while_first(bus: &Bus, shutdown: &CancellationToken) -> Result<(), BusError> {
    let t = bus.topology();
    let channel = bus.channel().await?;
    channel
        .basic_qos(FORWARD_BATCH, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            t.work_queue().as_str().into(),
            "cmdflow-router".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue.name = %t.work_queue(), "Forwarding unkeyed events to their partitions.");
    let route = t.route_exchange();
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => {
                drop(channel.close(200, "worker stopping".into()).await);
                return Ok(());
            }
            next = consumer.next() => next,
        };
        let mut batch = match next {
            Some(Ok(delivery)) => vec![delivery],
            Some(Err(e)) => return Err(e.into()),
            None => {
                return Err(BusError::Connect {
                    url: bus.url(),
                    reason: "the forwarding consumer was cancelled".into(),
                });
            }
        };
        while batch.len() < usize::from(FORWARD_BATCH) {
            match consumer.next().now_or_never() {
                Some(Some(Ok(delivery))) => batch.push(delivery),
                _ => break,
            }
        }
        // An event in CloudEvents binary mode (attributes as `cloudEvents:*` properties) enters
        // as the structured event it stands for, so every hop after this one reads one form.
        let structured: Vec<_> = batch
            .iter()
            .map(|d| binary::structured_message(&d.properties, &d.data))
            .collect();
        let messages = batch
            .iter()
            .zip(&structured)
            .map(|(d, structured)| {
                let (body, properties) = match structured {
                    Some((body, properties)) => (body.as_slice(), properties),
                    None => (d.data.as_slice(), &d.properties),
                };
                let mut headers = properties.headers().clone().unwrap_or_default();
                bus.add_partition(&mut headers, &bus::route_key_of(body));
                if bus::header_str(Some(&headers), bus::HEADER_ROUTING_KEY).is_none() {
                    headers.insert(
                        bus::HEADER_ROUTING_KEY.into(),
                        bus::string(d.routing_key.as_str()),
                    );
                }
                bus::Outgoing {
                    exchange: route.clone(),
                    routing_key: d.routing_key.as_str(),
                    body,
                    properties: properties.clone().with_headers(headers),
                }
            })
            .collect();
        for (delivery, published) in batch.iter().zip(bus.publish_many(messages).await) {
            // The first that fails stops the forwarding: closing the channel hands it, and
            // those after it, back in their order.
            let acked = match published {
                Ok(()) => delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(BusError::from),
                Err(e) => Err(e),
            };
            if let Err(e) = acked {
                drop(channel.close(200, "forwarding failed".into()).await);
                return Err(e);
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
