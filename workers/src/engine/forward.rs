//! Events published without a partition header (in `{ns}.unkeyed`): one worker at a time
//! forwards them, in order, to their partitions.

use std::sync::Arc;
use std::time::Duration;

use cmdflow_shared::bus::{self, Bus, BusError};
use cmdflow_shared::contract::binary;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::partitions::{close, subscribe};

/// Forwards the events published without a partition header (in `{ns}.unkeyed`) to their
/// partitions, in order, when this worker is the one consumer of that queue; stands by
/// otherwise. Until `shutdown`.
pub(super) async fn forward_unkeyed(bus: Arc<Bus>, shutdown: CancellationToken) {
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
    // Bounded, as the partitions' consumers are: a broker that never answers would leave the
    // unkeyed events with no forwarder and no line said.
    let mut consumer =
        subscribe(&channel, &t.work_queue(), "cmdflow-router", FORWARD_BATCH).await?;
    tracing::info!(queue.name = %t.work_queue(), "Forwarding unkeyed events to their partitions.");
    let route = t.route_exchange();
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => {
                close(&channel, "worker stopping").await;
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
                Ok(()) => bus::ack(&delivery.acker).await,
                Err(e) => Err(e),
            };
            if let Err(e) = acked {
                close(&channel, "forwarding failed").await;
                return Err(e);
            }
        }
    }
}
