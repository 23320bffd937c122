//! Settling a delivery with the broker: ack, or a dead letter with its reason, error chain and
//! attempts.

use super::*;

impl Engine {
    /// What becomes of an event whose transaction failed with `e` (rolled back): the one place
    /// that sorts failures. A batch whose transaction fails tries its events alone, so each
    /// one's failure is sorted here too.
    pub(super) async fn failed(&self, e: ApplyError, event: &Event) -> Disposition {
        match e {
            // PostgreSQL refused the data itself: another try would fail the same way.
            ApplyError::Store(e) if e.is_permanent() => Disposition::Dead {
                class: "store",
                reason: format!(
                    "PostgreSQL refused the event's changes (SQLSTATE {}): {e}",
                    e.sqlstate().unwrap_or_else(|| "-".to_owned())
                ),
            },
            ApplyError::Store(e) => Disposition::Retry(e.into()),
            ApplyError::Unavailable(reason) => {
                tracing::warn!(%reason, "A remote decider did not answer; the event is tried again later.");
                Disposition::Retry(RetryCause::Unavailable(reason))
            }
            // Its start may come the slower way (forwarded, or still in an outbox): kept until
            // then, in order.
            ApplyError::NotFound(id) if event.ty != COMMAND_START => self.park(id, event).await,
            ApplyError::NotFound(id) => Disposition::Retry(RetryCause::NotFound(id)),
            ApplyError::VersionMissing { id, kind, version } => {
                let waiting_for = format!("{kind} version {version}");
                self.park_for(id, event, Some(&waiting_for)).await
            }
            ApplyError::Permanent(reason) => Disposition::Dead {
                class: "permanent",
                reason,
            },
        }
    }

    /// Settles a delivery with the broker according to its disposition: acks an event applied
    /// (or recognised, or ignored), dead-letters a permanently bad one and acks it. A
    /// [`Disposition::Retry`] or [`Disposition::Held`] is the retry lane's to try again in
    /// place; one that reaches this (a caller without a lane) goes back to the broker.
    pub async fn settle(&self, delivery: &Delivery, disposition: &Disposition) {
        self.settle_after(delivery, disposition, &Failures::default())
            .await;
    }

    /// [`Engine::settle`] of an event that failed `failures` before (its retry lane).
    pub(crate) async fn settle_after(
        &self,
        delivery: &Delivery,
        disposition: &Disposition,
        failures: &Failures,
    ) {
        let forwarded = match disposition {
            Disposition::Ack(_) => Ok(()),
            Disposition::Dead { class, reason } => {
                self.dead_letter(delivery, class, reason, failures).await
            }
            Disposition::Retry(_) | Disposition::Held => {
                tracing::warn!(
                    "An event to be tried again reached no retry lane; handing it back to the broker."
                );
                if let Err(e) = bus::nack(&delivery.acker, true).await {
                    tracing::warn!(error = %e, "Could not hand an event back; the broker will redeliver it when its channel closes.");
                }
                return;
            }
        };
        match forwarded {
            Ok(()) => {
                if let Err(e) = bus::ack(&delivery.acker).await {
                    tracing::warn!(error = %e, "Could not ack; the broker will redeliver and the event will be deduplicated.");
                }
            }
            Err(e) => {
                // Not acked: the delivery stays with this worker until its channel closes, and
                // comes back, in its place, to whoever takes the partition next.
                tracing::warn!(error = %e, "Could not dead-letter an event; it stays unacknowledged and comes back.");
            }
        }
    }

    pub(super) async fn dead_letter(
        &self,
        delivery: &Delivery,
        class: &str,
        reason: &str,
        failures: &Failures,
    ) -> Result<(), BusError> {
        self.dead_letter_body(
            &delivery.data,
            delivery.properties.clone(),
            delivery.routing_key.as_str(),
            class,
            reason,
            failures,
        )
        .await
    }

    /// Publishes an event's bytes to the dead letters, with the reason and its failures.
    pub(super) async fn dead_letter_body(
        &self,
        data: &[u8],
        properties: lapin::BasicProperties,
        routing_key: &str,
        class: &str,
        reason: &str,
        failures: &Failures,
    ) -> Result<(), BusError> {
        tracing::error!(
            error.class = class,
            reason,
            "An event became a dead letter."
        );
        let mut h = properties.headers().clone().unwrap_or_default();
        let first = failures.first_at.unwrap_or_else(chrono::Utc::now);
        if bus::header_str(Some(&h), bus::HEADER_FIRST_FAILURE).is_none() {
            h.insert(
                bus::HEADER_FIRST_FAILURE.into(),
                bus::string(&first.to_rfc3339()),
            );
        }
        let mut chain: Vec<String> = bus::header_str(Some(&h), bus::HEADER_ERRORS)
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        chain.extend(failures.errors.iter().map(|e| clip(e)));
        chain.push(clip(reason));
        if chain.len() > 20 {
            chain.drain(..chain.len() - 20);
        }
        h.insert(
            bus::HEADER_ERRORS.into(),
            bus::string(&serde_json::to_string(&chain).unwrap_or_default()),
        );
        h.insert(
            HEADER_ATTEMPT.into(),
            AMQPValue::LongLongInt(i64::from(failures.attempts)),
        );
        h.insert(HEADER_REASON.into(), bus::string(&clip(reason)));
        h.insert(HEADER_ERROR_CLASS.into(), bus::string(class));
        h.insert(
            bus::HEADER_DEAD_ID.into(),
            bus::string(&uuid::Uuid::now_v7().to_string()),
        );
        let routing_key = bus::header_str(Some(&h), bus::HEADER_ROUTING_KEY)
            .unwrap_or_else(|| routing_key.to_owned());
        let props = properties.with_headers(h);
        let dlx = self.bus.topology().dead_letter_exchange();
        self.bus.publish(&dlx, &routing_key, data, props).await
    }

    /// Records a failed attempt (best effort: the headers carry the errors too).
    pub(super) async fn record_attempt(&self, delivery: &Delivery, attempt: u32, error: &str) {
        let event = Event::parse(&delivery.data).ok();
        let result = store::dead::record_attempt(
            &self.pool,
            event.as_ref().map(|e| e.source.as_str()),
            event.as_ref().map(|e| e.id.as_str()),
            event.as_ref().map(|e| e.ty.as_str()),
            event.as_ref().and_then(|e| e.commandid),
            attempt as i32,
            &clip(error),
        )
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "Could not record a failed attempt.");
        }
    }
}

/// An error as a header or dead-letter reason keeps, at most.
pub(super) fn clip(s: &str) -> String {
    cmdflow_shared::contract::clip_to(s, 1000)
}
