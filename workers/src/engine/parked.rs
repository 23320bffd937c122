//! Parked events: an event that came before its command's start, or for a version of a flow
//! this worker does not have, waits in PostgreSQL, in order, until it can be applied.

use super::*;

impl Engine {
    pub(super) fn parked_snapshot(&self) -> std::collections::HashSet<CommandId> {
        self.parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn has_parked(&self, id: CommandId) -> bool {
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
    pub(super) async fn park(&self, id: CommandId, event: &Event) -> Disposition {
        self.park_for(id, event, None).await
    }

    /// Parks `event` until its command's start is applied (`waiting_for` `None`), or until a
    /// worker that has the definition its command runs on takes it (`waiting_for` names it;
    /// such an event does not expire).
    pub(super) async fn park_for(
        &self,
        id: CommandId,
        event: &Event,
        waiting_for: Option<&str>,
    ) -> Disposition {
        let partition = bus::command_partition(id, self.bus.topology().partitions());
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
            Err(e) => Disposition::Retry(e.into()),
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
    pub(super) async fn apply_parked(&self, id: CommandId) -> Result<(), Disposition> {
        let rows = store::partitions::parked_for(&self.pool, id.as_uuid())
            .await
            .map_err(|e| Disposition::Retry(e.into()))?;
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
                    .map_err(|e| Disposition::Retry(e.into()))?;
                }
                retry @ (Disposition::Retry(_) | Disposition::Held) => return Err(retry),
            }
            store::partitions::unpark(&self.pool, row.id)
                .await
                .map_err(|e| Disposition::Retry(e.into()))?;
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
}
