//! The dead-letter keeper: consumes `{ns}.dead` into the `dead_letters` table, with the original
//! event byte for byte, the reason and error chain, the attempts and failure times, the command's
//! kind and owner, and a failure signature for grouping. Ops replay or discard them from there.
//!
//! A body is kept up to `CMDFLOW_DEAD_LETTER_MAX_BODY` bytes: past that, its first bytes are
//! kept, marked truncated, with the size and SHA-256 of the whole message, so one huge message
//! cannot fill the table, and an operator still sees what it was (and that it cannot be
//! replayed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cmdflow_shared::Event;
use cmdflow_shared::bus::{self, Bus, BusError};
use cmdflow_shared::store::dead::{self, Filter, NewDeadLetter};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// What a dead-letter message says about its failure.
pub fn describe(bus: &Bus, delivery: &Delivery) -> NewDeadLetter {
    let headers = delivery.properties.headers().as_ref();
    let event = Event::parse(&delivery.data).ok();
    let now = Utc::now();
    let first = bus::header_str(headers, bus::HEADER_FIRST_FAILURE)
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(now);
    // RabbitMQ's own dead-lettering (the delivery limit) carries `x-death` instead of our reason.
    let by_broker = headers.and_then(|h| h.inner().get("x-death")).is_some();
    let reason = bus::header_str(headers, bus::HEADER_REASON).unwrap_or_else(|| {
        if by_broker {
            "the broker's delivery limit was reached (a worker kept failing on it)".to_owned()
        } else {
            "no reason given".to_owned()
        }
    });
    let error_class = bus::header_str(headers, bus::HEADER_ERROR_CLASS).unwrap_or_else(|| {
        if by_broker {
            "delivery_limit"
        } else {
            "unknown"
        }
        .to_owned()
    });
    let chain: Value = bus::header_str(headers, bus::HEADER_ERRORS)
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| Value::Array(vec![Value::String(reason.clone())]));
    // The header counts the retries before this delivery; this delivery was one more attempt.
    let attempts = bus::header_u32(headers, bus::HEADER_ATTEMPT) + 1;
    NewDeadLetter {
        dead_id: bus::header_str(headers, bus::HEADER_DEAD_ID).or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
        }),
        event_source: event.as_ref().map(|e| e.source.clone()),
        event_id: event.as_ref().map(|e| e.id.clone()),
        event_type: event.as_ref().map(|e| e.ty.clone()),
        routing_key: bus::header_str(headers, bus::HEADER_ROUTING_KEY)
            .unwrap_or_else(|| delivery.routing_key.as_str().to_owned()),
        command_id: event.as_ref().and_then(|e| e.commandid),
        body: delivery.data.clone(),
        reason,
        error_class,
        error_chain: chain,
        attempts: attempts as i32,
        first_failed_at: first,
        last_failed_at: now,
        from_engine: bus.is_from_engine(headers),
    }
}

/// Keeps dead letters, each body up to `max_body` bytes, until `shutdown` fires, reconnecting to
/// the broker as needed.
pub async fn keep_until_stopped(
    pool: PgPool,
    bus: Arc<Bus>,
    max_body: usize,
    shutdown: CancellationToken,
) {
    loop {
        match keep(&pool, &bus, max_body, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, queue.name = %bus.topology().dead_queue(), "The dead-letter keeper lost the broker; reconnecting.");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

async fn keep(
    pool: &PgPool,
    bus: &Bus,
    max_body: usize,
    shutdown: &CancellationToken,
) -> Result<(), BusError> {
    let channel = bus.channel().await?;
    channel.basic_qos(50, BasicQosOptions::default()).await?;
    let queue = bus.topology().dead_queue();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "cmdflow-dead-letter-keeper".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Counting open dead letters costs a scan: refresh the gauge at most once a second.
    let mut counted: Option<Instant> = None;
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            next = consumer.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => return Err(e.into()),
            None => {
                return Err(BusError::Connect {
                    url: bus.url(),
                    reason: "the dead-letter consumer was cancelled".into(),
                });
            }
        };
        let letter = describe(bus, &delivery);
        match dead::keep(pool, &letter, max_body).await {
            Ok(new) => {
                if new && letter.body.len() > max_body {
                    tracing::warn!(
                        event.id = letter.event_id.as_deref().unwrap_or_default(),
                        event.type = letter.event_type.as_deref().unwrap_or(&letter.routing_key),
                        size = letter.body.len(),
                        max_body,
                        "A dead letter's body passed CMDFLOW_DEAD_LETTER_MAX_BODY; its first bytes are kept, and it cannot be replayed."
                    );
                }
                if let Err(e) = bus::ack(&delivery.acker).await {
                    tracing::warn!(error = %e, "Could not ack a dead letter kept; it comes again and is kept once.");
                }
                metrics::counter!(cmdflow_shared::metrics::DEAD_LETTERS_KEPT, "class" => letter.error_class.clone())
                    .increment(1);
                if counted.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
                    counted = Some(Instant::now());
                    if let Ok(open) = dead::count(pool, &Filter::default()).await {
                        metrics::gauge!(cmdflow_shared::metrics::DEAD_LETTERS_OPEN)
                            .set(open as f64);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Could not keep a dead letter; it stays in the queue.");
                if let Err(e) = bus::nack(&delivery.acker, true).await {
                    tracing::warn!(error = %e, "Could not hand a dead letter back; the broker does when its channel closes.");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
