//! The outbox: events a step decided, published under confirms after the commit; what was
//! confirmed is deleted (in the next transaction, or by the flush), and the sweeper publishes
//! what was not.

use super::*;

impl Engine {
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
    pub(super) async fn publish_rows(&self, rows: &[OutboxRow]) -> Vec<Result<i64, BusError>> {
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

    pub(super) fn lock_confirmed(&self) -> std::sync::MutexGuard<'_, Vec<i64>> {
        self.confirmed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits `tx`, deleting in it the outbox rows confirmed since the last such commit: the
    /// deletes ride on work that commits anyway. If the commit fails they wait for the next.
    pub(super) async fn commit_with_confirmed(
        &self,
        mut tx: store::Tx<'_>,
    ) -> Result<(), StoreError> {
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
pub(super) fn route_key_of_json(body: &Value) -> Vec<u8> {
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
pub(super) fn trace_headers(body: &Value) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(tp) = body
        .get(cmdflow_shared::trace::TRACEPARENT)
        .and_then(Value::as_str)
    {
        headers.insert(cmdflow_shared::trace::TRACEPARENT.into(), bus::string(tp));
    }
    headers
}
