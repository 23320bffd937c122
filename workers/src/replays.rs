//! Dead-letter replays, run by workers: the gateway only records a job. A worker claims a
//! running job under a lease (`FOR UPDATE SKIP LOCKED`), publishes its dead letters' original
//! events again in batches, moving the job's cursor and renewing the lease after each, so a job
//! outlives whoever started it and whichever worker ran it: a stopping worker lets go of its
//! job, and a dead worker's lease runs out, and another worker goes on from the cursor.
//!
//! A job replays only the dead letters that existed when it started (`max_id`): what fails
//! again while it runs is a new dead letter, for a new decision.
//!
//! A dead letter kept truncated (its body passed `CMDFLOW_DEAD_LETTER_MAX_BODY`) is never
//! published: its first bytes are not the event that failed. The job leaves it dead, counts it
//! in `skipped` and goes on; the letter's `body_truncated` says why.
//!
//! Bodies are read per batch, whole, only for the letters published in it, and a batch stops
//! taking letters once their bodies pass [`BATCH_BYTES`]: a worker never holds a hundred
//! large bodies at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cmdflow_shared::bus::{self, Bus, BusError};
use cmdflow_shared::store::StoreError;
use cmdflow_shared::store::dead::{self, DeadLetter, Filter, ReplayJob, ReplayState};
use lapin::types::{AMQPValue, FieldTable};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How often an idle worker looks for a job to run (an indexed look at the running jobs).
const POLL: Duration = Duration::from_millis(250);

/// The most body bytes a batch holds; a batch holds at least one letter, however large (each
/// is at most `CMDFLOW_DEAD_LETTER_MAX_BODY`).
pub const BATCH_BYTES: i64 = 32 * 1024 * 1024;

/// How many times in a row a runner takes up a job that stops on an error before it fails the
/// job (a publish that can never succeed, say, to an exchange someone deleted).
pub const GIVE_UP_AFTER: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("no replay job {0}")]
    NoJob(uuid::Uuid),
}

/// Headers for a replayed event: none of the original's failure history, so it gets a fresh
/// retry budget; marked with the dead letter it came from, and with the engine's mark only if
/// the original carried it (a refused forgery stays refused, however often it is replayed).
pub fn replay_headers(bus: &Bus, letter: &dead::DeadLetter) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(
        "x-cmdflow-replayed-from".into(),
        AMQPValue::LongLongInt(letter.id),
    );
    if letter.from_engine {
        bus.mark_engine(&mut h);
    }
    h
}

/// Splits a page of dead letters, in id order, into the batch to publish (letters kept whole,
/// while their bodies fit [`BATCH_BYTES`]) and those to skip (kept truncated). It stops at the
/// first letter that does not fit, so the job's cursor never passes a letter left for the next
/// batch.
fn take_batch(listed: Vec<DeadLetter>) -> (Vec<DeadLetter>, Vec<DeadLetter>) {
    let (mut batch, mut skipped) = (Vec::new(), Vec::new());
    let mut bytes = 0_i64;
    for letter in listed {
        if letter.body_truncated {
            skipped.push(letter);
            continue;
        }
        if !batch.is_empty() && bytes.saturating_add(letter.body_size) > BATCH_BYTES {
            break;
        }
        bytes = bytes.saturating_add(letter.body_size);
        batch.push(letter);
    }
    (batch, skipped)
}

/// The runner of one worker process.
pub struct Runner {
    pool: PgPool,
    bus: Arc<Bus>,
    /// Who holds a claim: this process.
    name: String,
    lease: Duration,
}

/// How a claimed job ended for this runner.
enum Stop {
    /// Finished, failed, interrupted, or claimed by another worker: nothing more to do.
    Done,
    /// The worker is stopping: let go of the job for another.
    Shutdown,
}

impl Runner {
    pub fn new(pool: PgPool, bus: Arc<Bus>, lease: Duration) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
        let name = format!(
            "{host}/{}/{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Self {
            pool,
            bus,
            name,
            lease,
        }
    }

    /// Claims and runs jobs until `shutdown` fires; then lets go of its job. A job that stops
    /// on an error [`GIVE_UP_AFTER`] times in a row here, its cursor not moving in between,
    /// fails, with the last error, rather than staying `running` for ever.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) {
        // Per job: how many times in a row it stopped on an error without moving its cursor,
        // and where the cursor was when it was last taken up.
        let mut stopped: HashMap<uuid::Uuid, (u32, i64)> = HashMap::new();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            match dead::claim_job(&self.pool, &self.name, self.lease).await {
                Ok(Some(job)) => {
                    tracing::info!(job = %job.id, replayed = job.replayed, total = job.total, "Running a replay.");
                    let (id, cursor) = (job.id, job.last_id);
                    match self.run(job, &shutdown).await {
                        Ok(Stop::Done) => {
                            stopped.remove(&id);
                            continue;
                        }
                        Ok(Stop::Shutdown) => break,
                        Err(e) => {
                            let (times, at) = stopped.entry(id).or_insert((0, cursor));
                            if cursor > *at {
                                // It got further since it last stopped: a new count.
                                (*times, *at) = (0, cursor);
                            }
                            *times += 1;
                            let times = *times;
                            if times >= GIVE_UP_AFTER {
                                let reason = format!(
                                    "stopped on an error {times} times in a row without getting further; the last: {e}"
                                );
                                stopped.remove(&id);
                                self.fail(id, &reason).await;
                            } else {
                                // The cursor stayed where the last batch left it: this or
                                // another worker goes on from there.
                                tracing::warn!(job = %id, error = %e, "A replay stopped on an error; it will be taken up again.");
                                self.release().await;
                            }
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "Could not look for replay jobs."),
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(POLL) => {}
            }
        }
        self.release().await;
    }

    /// Ends a job this runner holds as failed, with `reason`.
    async fn fail(&self, id: uuid::Uuid, reason: &str) {
        tracing::error!(job = %id, reason, "A replay job failed.");
        if let Err(e) = dead::end_job(
            &self.pool,
            id,
            &self.name,
            ReplayState::Failed,
            Some(reason),
        )
        .await
        {
            tracing::warn!(job = %id, error = %e, "Could not mark a replay job failed; it will be taken up again.");
            self.release().await;
        }
    }

    async fn release(&self) {
        if let Err(e) = dead::release_jobs(&self.pool, &self.name).await {
            tracing::warn!(error = %e, "Could not let go of a replay job; another worker takes it when its lease runs out.");
        }
    }

    /// Runs one claimed job until it ends, someone interrupts it, another worker holds it, or
    /// `shutdown` fires.
    async fn run(
        &self,
        mut job: ReplayJob,
        shutdown: &CancellationToken,
    ) -> Result<Stop, ReplayError> {
        let filter: Filter = match serde_json::from_value(job.filter.clone()) {
            Ok(filter) => filter,
            Err(e) => {
                // Replaying "everything" instead would be the worst reading of a bad filter.
                let reason = format!("the stored filter cannot be read: {e}");
                tracing::error!(job = %job.id, reason, "A replay job failed.");
                dead::end_job(
                    &self.pool,
                    job.id,
                    &self.name,
                    ReplayState::Failed,
                    Some(&reason),
                )
                .await?;
                return Ok(Stop::Done);
            }
        };
        let through = job.max_id.unwrap_or(i64::MAX);
        let size = job.rate.map_or(100, |r| i64::from(r).clamp(1, 100));
        loop {
            if shutdown.is_cancelled() {
                return Ok(Stop::Shutdown);
            }
            let listed =
                dead::list_through(&self.pool, &filter, job.last_id, through, size).await?;
            if listed.is_empty() {
                dead::end_job(&self.pool, job.id, &self.name, ReplayState::Finished, None).await?;
                tracing::info!(job = %job.id, replayed = job.replayed, skipped = job.skipped, "A replay finished.");
                return Ok(Stop::Done);
            }
            let started = Instant::now();
            let (batch, mut skipped) = take_batch(listed);
            let ids: Vec<i64> = batch.iter().map(|l| l.id).collect();
            let bodies: HashMap<i64, Vec<u8>> = dead::replayable_bodies(&self.pool, &ids)
                .await?
                .into_iter()
                .collect();
            // Only what was read whole is published (a letter is never cut after it is kept;
            // one missing here is skipped, not marked replayed).
            let (batch, missing): (Vec<DeadLetter>, Vec<DeadLetter>) =
                batch.into_iter().partition(|l| bodies.contains_key(&l.id));
            skipped.extend(missing);
            for letter in &skipped {
                tracing::warn!(job = %job.id, dead_letter.id = letter.id, size = letter.body_size,
                    "A replay left a dead letter dead: its body was kept truncated, so its event cannot be published again.");
            }
            // One batch in flight at once: the confirms are pipelined, not awaited one by one.
            let exchange = self.bus.topology().events_exchange();
            let published = futures::future::join_all(batch.iter().map(|letter| {
                let body = bodies.get(&letter.id).map_or(&[][..], Vec::as_slice);
                let props = bus::event_properties(letter.event_id.as_deref().unwrap_or_default())
                    .with_headers(replay_headers(&self.bus, letter));
                self.bus
                    .publish(&exchange, &letter.routing_key, body, props)
            }))
            .await;
            for result in published {
                result?;
            }
            let replayed: Vec<i64> = batch.iter().map(|l| l.id).collect();
            let skipped: Vec<i64> = skipped.iter().map(|l| l.id).collect();
            job = dead::advance_job(
                &self.pool, job.id, &self.name, &replayed, &skipped, self.lease,
            )
            .await?
            .ok_or(ReplayError::NoJob(job.id))?;
            if job.state != ReplayState::Running || job.claimed_by.as_deref() != Some(&self.name) {
                tracing::info!(job = %job.id, state = %job.state, "A replay stopped: interrupted, or taken over.");
                return Ok(Stop::Done);
            }
            if let Some(rate) = job.rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(batch.len() as f64 / f64::from(rate));
                if let Some(rest) = due.checked_sub(started.elapsed()) {
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(Stop::Shutdown),
                        () = tokio::time::sleep(rest) => {}
                    }
                }
            }
        }
    }
}

/// Runs the replay job `id` here and now, to its end (the load generator and tests, with no
/// worker running): claims running jobs until `id` is no longer running.
pub async fn run_replay(
    pool: &PgPool,
    bus: &Arc<Bus>,
    id: uuid::Uuid,
) -> Result<ReplayJob, ReplayError> {
    let runner = Runner::new(pool.clone(), Arc::clone(bus), Duration::from_secs(30));
    let never = CancellationToken::new();
    loop {
        let job = dead::get_job(pool, id)
            .await?
            .ok_or(ReplayError::NoJob(id))?;
        if job.state != ReplayState::Running {
            return Ok(job);
        }
        match dead::claim_job(pool, &runner.name, runner.lease).await? {
            Some(claimed) => {
                if let Err(e) = runner.run(claimed, &never).await {
                    runner.release().await;
                    return Err(e);
                }
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(id: i64, size: i64, truncated: bool) -> DeadLetter {
        DeadLetter {
            id,
            event_source: None,
            event_id: None,
            event_type: None,
            routing_key: "x".to_owned(),
            command_id: None,
            kind: None,
            owner: None,
            body: dead::BodyPrefix::default(),
            body_size: size,
            body_sha256: String::new(),
            body_truncated: truncated,
            reason: String::new(),
            error_class: String::new(),
            error_chain: serde_json::Value::Null,
            signature: String::new(),
            attempts: 1,
            first_failed_at: chrono::Utc::now(),
            last_failed_at: chrono::Utc::now(),
            state: cmdflow_shared::store::dead::DeadState::Dead,
            replayed_at: None,
            discarded_at: None,
            discard_reason: None,
            from_engine: false,
        }
    }

    fn ids(letters: &[DeadLetter]) -> Vec<i64> {
        letters.iter().map(|l| l.id).collect()
    }

    #[test]
    fn a_batch_skips_truncated_letters_and_stops_at_its_byte_budget() {
        let mb = 1024 * 1024;
        let (batch, skipped) = take_batch(vec![
            letter(1, 10 * mb, false),
            letter(2, 16 * mb, true),
            letter(3, 16 * mb, false),
            letter(4, 16 * mb, false),
            letter(5, 1, true),
        ]);
        // 10 + 16 fit 32 MiB; the third whole one does not, so nothing after it is taken.
        assert_eq!((ids(&batch), ids(&skipped)), (vec![1, 3], vec![2]));
        // One letter larger than the budget still goes, alone.
        let (batch, skipped) = take_batch(vec![letter(6, 40 * mb, false), letter(7, 1, false)]);
        assert_eq!((ids(&batch), ids(&skipped)), (vec![6], vec![]));
    }
}
