//! Group commit: a batch of deliveries applied in one transaction after one try at each
//! command's lock, and a second round, after the commit, for the commands whose lock another
//! worker held.

use super::*;

impl Engine {
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
            .map(|d| d.unwrap_or_else(|| Disposition::Retry(RetryCause::NotProcessed)))
            .collect();
        (dispositions, held)
    }

    /// Applies events (sorted by command, each command's in the order they came) whose local
    /// turns this batch holds: those whose Redis locks are free at once in one transaction, then
    /// each command whose lock another worker holds, one at a time, once its lock comes. An
    /// event whose transaction failed goes to `alone`, to be tried by itself.
    pub(super) async fn apply_round(
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
    pub(super) async fn transact_many(
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
            let mut carry = self.carry();
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
            let mut w = Writer::batched(&mut tx, now);
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
                let (done, command) = self
                    .apply(&mut w, *id, event, locked, &mut carry)
                    .instrument(span)
                    .await?;
                if let Some(row) = rows.get_mut(id) {
                    row.command = command;
                }
                applied.push(done);
            }
            self.count_reports(&mut w, carry.reports).await?;
            Ok::<_, ApplyError>((applied, w.finish().await?))
        }
        .await;
        let (applied, outbox) = match written {
            Ok(written) => written,
            Err(e) => {
                // An event the batch cannot take (a refusal, a command not there yet, a version
                // this worker lacks) is routine: it is tried alone, where [`Engine::failed`]
                // sorts its failure as for any single event. A PostgreSQL error is not routine,
                // and an operator sees it.
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
            return Some(vec![commit_failed(e); events.len()]);
        }
        metrics::histogram!(cm::BATCH_SIZE).record(events.len() as f64);
        let first = handles.first().cloned().unwrap_or_else(tracing::Span::none);
        self.publish_outbox(&outbox).instrument(first).await;
        Some(applied.into_iter().map(Disposition::Ack).collect())
    }
}
