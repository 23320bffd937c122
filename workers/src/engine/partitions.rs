//! The partitions this worker holds: each claimed in PostgreSQL under a lease it renews
//! ([`cmdflow_shared::store::partitions`]), its share kept as workers come and go, each
//! consumed on a channel of its own, and let go only once what was taken from it is settled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cmdflow_shared::CommandId;
use cmdflow_shared::bus::BusError;
use cmdflow_shared::store::partitions;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::Engine;
use super::consume::{Incoming, admit};

/// How many deliveries of one partition are taken and not settled yet.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
    /// Deliveries taken from the partition so far, and those settled (acked, dead-lettered or
    /// handed back): what the holder's checks read as progress.
    received: AtomicU64,
    settled: AtomicU64,
}

pub(super) struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.received.fetch_add(1, Ordering::Relaxed);
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
        self.0.settled.fetch_add(1, Ordering::Relaxed);
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The partitions this worker holds, and their consumers.
pub(super) struct Holder {
    engine: Arc<Engine>,
    /// Who holds a claim: this process.
    me: String,
    tx: mpsc::Sender<Incoming>,
    consuming: BTreeMap<u32, Consuming>,
    /// Partitions being let go: no longer consumed, their events in flight finishing.
    draining: Arc<std::sync::Mutex<BTreeSet<u32>>>,
    /// Checks of the partitions done so far: every [`ASK_BROKER_EVERY`]th also asks the broker.
    ticks: u64,
    /// Partitions held but not consumed: since when, and when a failed try is next a warning.
    unconsumed: BTreeMap<u32, (Instant, Instant)>,
    /// Partitions whose consumer was found idle while events waited, and consumed again, and
    /// whose new consumer has taken nothing yet: how many times in a row.
    idle_again: BTreeMap<u32, u32>,
}

/// How long a held partition may go without a consumer before each try that fails is a warning
/// (once per this long), not a debug line: a partition nobody reads is events nobody applies.
const UNCONSUMED_WARN: Duration = Duration::from_secs(10);

/// How often (in holder ticks) the holder asks the broker whether each partition it consumes
/// has a consumer there: a connection broken under a consumer can leave the worker's side
/// looking alive while the broker has none, and the partition would wait for ever.
const ASK_BROKER_EVERY: u64 = 4;

struct Consuming {
    channel: Channel,
    in_flight: Arc<InFlight>,
    /// Stops taking deliveries, but keeps the consumer: see [`Consuming::pause`].
    pause: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// What the last check of the broker saw of this consumer's progress.
    watch: Watch,
}

/// How many checks of the broker in a row may find a partition's events ready while its
/// consumer here takes none and has none in flight, before the consumer is taken for dead and
/// consumed again. The broker hands ready events to an active consumer with room at once: one
/// that gets none for a whole check interval is not the one the broker delivers to (a consumer
/// left behind by a broken connection can stand in front of it), or lapin no longer passes
/// them on.
const IDLE_CHECKS: u32 = 2;

/// How many times in a row a partition may be found idle and consumed again before this
/// worker's connection to the broker is closed and opened anew.
const IDLE_AGAIN: u32 = 2;

/// How many checks in a row may find a partition's events in flight here with none taken or
/// settled since the last, before each further such check is a warning: an event stuck in its
/// apply holds its command's turn, and every later event of that command waits behind it.
const STUCK_CHECKS: u32 = 3;

/// Checks between two warnings of the same events in flight without progress.
const STUCK_REPEAT: u32 = 30;

/// A consumer's progress as the broker checks see it.
#[derive(Default)]
struct Watch {
    /// Deliveries taken and settled at the last check.
    received: u64,
    settled: u64,
    /// Checks in a row that found events ready and this consumer idle.
    idle: u32,
    /// Checks in a row that found events in flight and none taken or settled.
    stuck: u32,
}

/// What a check of the broker makes of one consumed partition.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Fine,
    /// Events wait in the queue and this consumer takes none: consume it again.
    Idle,
    /// Events taken here make no progress: say so (they cannot be taken back safely).
    Stuck,
}

impl Watch {
    /// Reads one check: `ready` events in the queue; `received`, `settled` and `in_flight`
    /// here.
    fn check(&mut self, ready: u32, received: u64, settled: u64, in_flight: usize) -> Verdict {
        let moved = received != self.received || settled != self.settled;
        self.received = received;
        self.settled = settled;
        self.idle = if ready > 0 && !moved && in_flight == 0 {
            self.idle + 1
        } else {
            0
        };
        self.stuck = if in_flight > 0 && !moved {
            self.stuck + 1
        } else {
            0
        };
        if self.idle >= IDLE_CHECKS {
            Verdict::Idle
        } else if self.stuck == STUCK_CHECKS
            || (self.stuck > 0 && self.stuck.is_multiple_of(STUCK_REPEAT))
        {
            // Once when it starts, then now and then: a retry lane waits its delay this way too.
            Verdict::Stuck
        } else {
            Verdict::Fine
        }
    }
}

/// Says so, once per `lease`, while the holder's last check of the partitions is older than
/// `lease`: its claims are not being renewed, and what it consumes is not being checked.
async fn watch_checks(checked: Arc<std::sync::Mutex<Instant>>, lease: Duration) {
    loop {
        tokio::time::sleep(lease).await;
        let last = *checked.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() > lease {
            tracing::warn!(
                since_s = last.elapsed().as_secs(),
                lease_s = lease.as_secs(),
                "This worker has not finished a check of its partitions for longer than their lease: their claims are not renewed, and another worker may take them."
            );
        }
    }
}

/// The longest a call to the broker may take in the holder's loop: one that does not answer (a
/// broker restarting, a connection not yet known dead) is given up for this tick, not waited on
/// for ever, so the loop goes on renewing claims and consuming again what lost its consumer.
const BROKER_CALL: Duration = Duration::from_secs(5);

/// Consumes `queue` on `channel` with `prefetch` deliveries at most unacknowledged, waiting at
/// most [`BROKER_CALL`]. On failure the channel is closed: a consumer the broker may have
/// registered must not outlive the try, as the queue's active consumer with nobody reading it.
pub(super) async fn subscribe(
    channel: &Channel,
    queue: &str,
    tag: &str,
    prefetch: u16,
) -> Result<Consumer, BusError> {
    let subscribing = async {
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        channel
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    };
    match tokio::time::timeout(BROKER_CALL, subscribing).await {
        Ok(Ok(consumer)) => Ok(consumer),
        failed => {
            close(channel, "could not consume").await;
            Err(match failed {
                Ok(Err(e)) => e.into(),
                _ => BusError::Timeout(BROKER_CALL),
            })
        }
    }
}

/// Closes `channel`, waiting at most [`BROKER_CALL`]: a channel of a dead connection dies with it.
pub(super) async fn close(channel: &Channel, why: &'static str) {
    drop(tokio::time::timeout(BROKER_CALL, channel.close(200, why.into())).await);
}

impl Consuming {
    /// Whether the broker still delivers to this consumer: its task runs and its channel is
    /// open. A connection lost under it ends both, but the channel says so first.
    fn alive(&self) -> bool {
        !self.task.is_finished() && self.channel.status().connected()
    }

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
    pub(super) fn new(engine: Arc<Engine>, tx: mpsc::Sender<Incoming>) -> Self {
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
            ticks: 0,
            unconsumed: BTreeMap::new(),
            idle_again: BTreeMap::new(),
        }
    }

    fn namespace(&self) -> &str {
        self.engine.bus.topology().namespace()
    }

    /// Keeps this worker's share of the partitions until `shutdown`; then stops consuming,
    /// waits for `drained`, closes the channels and lets every partition go.
    pub(super) async fn run(mut self, shutdown: CancellationToken, drained: CancellationToken) {
        let lease = self.engine.settings.partition_lease;
        let tick = (lease / 4).max(Duration::from_millis(500));
        let checked = Arc::new(std::sync::Mutex::new(Instant::now()));
        let watchdog = tokio::spawn(watch_checks(Arc::clone(&checked), lease));
        loop {
            if let Err(e) = self.rebalance().await {
                tracing::warn!(error = %e, "Could not check this worker's partitions; trying again.");
            }
            *checked.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(tick) => {}
            }
        }
        watchdog.abort();
        for c in self.consuming.values() {
            c.pause();
        }
        // The batch loop ends when every sender is gone: this one, and the consumers' below.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        drained.cancelled().await;
        for (_, c) in std::mem::take(&mut self.consuming) {
            c.task.abort();
            close(&c.channel, "worker stopping").await;
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
        self.unconsumed.retain(|p, _| held.contains(p));
        // Claims lost (the lease ran out during a pause) and consumers that ended (the broker
        // went away): stop those, consume again what is still held.
        let mut gone: Vec<u32> = self
            .consuming
            .iter()
            .filter(|(p, c)| !held.contains(p) || !c.alive())
            .map(|(p, _)| *p)
            .collect();
        self.ticks += 1;
        if self.ticks.is_multiple_of(ASK_BROKER_EVERY) {
            let bus = &engine.bus;
            let live: Vec<u32> = self
                .consuming
                .keys()
                .filter(|p| !gone.contains(p))
                .copied()
                .collect();
            for p in live {
                let queue = bus.topology().partition_queue(p);
                let asked = tokio::time::timeout(BROKER_CALL, bus.queue_counts(&queue)).await;
                match asked {
                    Ok(Ok(counts)) if counts.consumers == 0 => {
                        tracing::warn!(
                            partition = p,
                            "The broker has no consumer of a partition this worker consumes; consuming it again."
                        );
                        gone.push(p);
                    }
                    Ok(Ok(counts)) => {
                        let Some(c) = self.consuming.get_mut(&p) else {
                            continue;
                        };
                        let f = &c.in_flight;
                        let (received, settled, in_flight) = (
                            f.received.load(Ordering::Relaxed),
                            f.settled.load(Ordering::Relaxed),
                            f.count.load(Ordering::SeqCst),
                        );
                        if received > 0 {
                            self.idle_again.remove(&p);
                        }
                        match c.watch.check(counts.ready, received, settled, in_flight) {
                            Verdict::Fine => {}
                            Verdict::Idle => {
                                let times = self.idle_again.entry(p).or_default();
                                *times += 1;
                                if *times < IDLE_AGAIN {
                                    tracing::warn!(
                                        partition = p,
                                        ready = counts.ready,
                                        consumers = counts.consumers,
                                        "A partition's events wait in the broker and its consumer here takes none; consuming it again."
                                    );
                                    gone.push(p);
                                } else {
                                    // Consumed again, and still nothing: the consumer the
                                    // broker delivers to may be one of this connection's that
                                    // nothing reads any more (its channel lost here, open
                                    // there). Ending the connection ends it.
                                    tracing::warn!(
                                        partition = p,
                                        ready = counts.ready,
                                        consumers = counts.consumers,
                                        "A partition consumed again still gets none of its waiting events; closing this worker's connection to the broker, and every consumer on it."
                                    );
                                    self.idle_again.clear();
                                    bus.reconnect().await;
                                    gone = self.consuming.keys().copied().collect();
                                    break;
                                }
                            }
                            Verdict::Stuck => {
                                tracing::warn!(
                                    partition = p,
                                    in_flight,
                                    ready = counts.ready,
                                    "A partition's events taken by this worker have made no progress since the last checks; their commands' later events wait behind them."
                                );
                            }
                        }
                    }
                    // The rest wait for the next check: one unanswered call per partition in a
                    // row would keep the claims from being renewed within their lease.
                    Ok(Err(e)) => {
                        tracing::warn!(partition = p, error = %e, "Could not ask the broker whether it has a consumer of a partition this worker consumes.");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!(
                            partition = p,
                            "The broker did not say within {BROKER_CALL:?} whether it has a consumer of a partition this worker consumes."
                        );
                        break;
                    }
                }
            }
        }
        for p in gone {
            if let Some(c) = self.consuming.remove(&p) {
                if held.contains(&p) {
                    let now = Instant::now();
                    self.unconsumed.insert(p, (now, now + UNCONSUMED_WARN));
                    if !c.alive() {
                        tracing::warn!(
                            partition = p,
                            "Lost the consumer of a partition (the broker went away); consuming it again."
                        );
                    }
                }
                c.task.abort();
                close(&c.channel, "partition let go").await;
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
                    match self.unconsumed.remove(&p) {
                        Some((since, _)) => tracing::info!(
                            partition = p,
                            unconsumed_s = since.elapsed().as_secs_f64(),
                            "Consuming a partition again."
                        ),
                        None => tracing::info!(partition = p, "Consuming a partition."),
                    }
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
                    let now = Instant::now();
                    let (since, warn_at) = self
                        .unconsumed
                        .entry(p)
                        .or_insert((now, now + UNCONSUMED_WARN));
                    if now >= *warn_at {
                        *warn_at = now + UNCONSUMED_WARN;
                        tracing::warn!(
                            partition = p,
                            unconsumed_s = now.duration_since(*since).as_secs(),
                            error = %e,
                            "A partition this worker holds has had no consumer for a while; its events wait."
                        );
                    } else {
                        tracing::debug!(partition = p, error = %e, "Cannot consume a partition yet.");
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts consuming partition `p` (active once no other consumer is).
    async fn consume(&self, p: u32, prefetch: u16) -> Result<Consuming, BusError> {
        let bus = &self.engine.bus;
        let queue = bus.topology().partition_queue(p);
        // Bounded, as every broker call of the holder's loop: a loop stuck here would consume
        // nothing again, and say nothing.
        let channel = tokio::time::timeout(BROKER_CALL, bus.channel())
            .await
            .map_err(|_| BusError::Timeout(BROKER_CALL))??;
        let tag = format!("cmdflow-worker-{}-{p}", uuid::Uuid::new_v4().simple());
        let pause = CancellationToken::new();
        let consumer = subscribe(&channel, &queue, &tag, prefetch).await?;
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
            watch: Watch::default(),
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
            close(&c.channel, "partition let go").await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_that_takes_nothing_while_events_wait_is_idle_after_two_checks() {
        let mut w = Watch::default();
        assert_eq!(w.check(42, 0, 0, 0), Verdict::Fine);
        assert_eq!(w.check(42, 0, 0, 0), Verdict::Idle);
        // Consumed again: a new watch, and this time the broker delivers.
        let mut w = Watch::default();
        assert_eq!(w.check(42, 0, 0, 0), Verdict::Fine);
        assert_eq!(w.check(40, 7, 7, 0), Verdict::Fine);
        assert_eq!(w.check(30, 9, 9, 0), Verdict::Fine);
    }

    #[test]
    fn an_empty_queue_or_a_busy_consumer_is_not_idle() {
        let mut w = Watch::default();
        for _ in 0..5 {
            assert_eq!(w.check(0, 3, 3, 0), Verdict::Fine, "nothing waits");
        }
        let mut w = Watch::default();
        let mut n = 0;
        for _ in 0..5 {
            n += 10;
            assert_eq!(w.check(500, n, n - 4, 4), Verdict::Fine, "taking events");
        }
    }

    #[test]
    fn events_in_flight_with_no_progress_are_stuck_from_the_third_check() {
        let mut w = Watch::default();
        assert_eq!(w.check(5, 10, 8, 2), Verdict::Fine);
        assert_eq!(w.check(5, 10, 8, 2), Verdict::Fine);
        assert_eq!(w.check(5, 10, 8, 2), Verdict::Fine);
        assert_eq!(w.check(5, 10, 8, 2), Verdict::Stuck);
        assert_eq!(w.check(5, 10, 9, 1), Verdict::Fine, "one settled");
        // Not idle either while something is in flight: taking it back is not safe.
        assert_eq!(w.check(5, 10, 9, 1), Verdict::Fine);
    }
}
