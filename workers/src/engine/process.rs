//! One event on its own: lock (waiting patiently for a busy one), one transaction, commit,
//! publish the outbox. Broadcasts, and the events of a batch whose transaction failed, go this
//! way.

use super::*;

impl Engine {
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

    pub(super) async fn process_inner(
        &self,
        body: &[u8],
        publish: bool,
    ) -> (Disposition, Vec<OutboxRow>) {
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

    /// Waits for the command's Redlock lock, for as long as it takes. A partition's events come
    /// to one worker, so the lock is busy only while another worker finishes what it took
    /// before it let the partition go; no majority of the Redis masters is an outage of the
    /// fleet, not a fault of the event. Either way the event keeps its place, its successors
    /// behind it: it is never retried toward a dead letter for it. A warning every lock TTL
    /// says how long it has waited.
    pub(super) async fn lock_patiently(
        &self,
        locks: &Locks,
        id: CommandId,
    ) -> Result<Held, Disposition> {
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

    pub(super) async fn process_unmeasured(
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
    pub(super) async fn transact(
        &self,
        event: &Event,
        target: Target<'_>,
        publish: bool,
        held: Option<&Held>,
    ) -> (Disposition, Vec<OutboxRow>) {
        let mut tx = match self.pool.begin().await {
            Ok(tx) => tx,
            Err(e) => return (Disposition::Retry(e.into()), Vec::new()),
        };
        if lock_lost(held) {
            // Paused (or starved) since the lock was taken: do not wait on a row another worker
            // may now hold under the lock we lost; the event is tried again.
            drop(tx.rollback().await);
            return (lock_ran_out(), Vec::new());
        }
        let applied = async {
            let mut w = Writer::at_once(&mut tx);
            let mut carry = self.carry();
            let applied = match target {
                Target::Command(id) => self.apply(&mut w, id, event, None, &mut carry).await?.0,
                Target::Broadcast(kinds) => {
                    self.apply_broadcast(&mut w, event, kinds, &mut carry)
                        .await?
                }
            };
            self.count_reports(&mut w, carry.reports).await?;
            Ok::<_, ApplyError>((applied, w.finish().await?))
        }
        .await;
        let (applied, outbox) = match applied {
            Ok(done) => done,
            Err(e) => {
                drop(tx.rollback().await);
                return (self.failed(e, event).await, Vec::new());
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
            return (commit_failed(e), Vec::new());
        }
        if publish {
            self.publish_outbox(&outbox).await;
        }
        (Disposition::Ack(applied), outbox)
    }
}
