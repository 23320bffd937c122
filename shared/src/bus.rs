//! RabbitMQ: the topology (every name under the namespace), one connection per process that
//! reconnects by itself, and publishing with publisher confirms.
//!
//! Topology for namespace `ns`:
//! - `ns.events`: topic exchange, routing key = event type. Upstream services publish here.
//! - `ns.work`: quorum queue bound with `#`; its dead-letter exchange is `ns.dlx`, and a
//!   delivery limit guards against messages that crash workers.
//! - `ns.retry.{ms}ms`: quorum queues whose messages expire after `ms` and flow back into
//!   `ns.work` through the default exchange: the delayed retries. One queue per delay, so no
//!   message waits behind a longer one.
//! - `ns.dlx` (fanout) → `ns.dead`: dead letters, with the reason in headers.
//!
//! Reconnection is ours rather than lapin's auto-recover: a broken connection is dropped and the
//! next caller builds a new one. A publish that fails is reported to its caller (the gateway
//! answers 503), and the worker's consume loop reconnects with backoff. Deliveries in flight are
//! redelivered by the broker, and consumers dedupe by event id.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;

use crate::config::redact_url;

/// Header carrying how many attempts an event has had.
pub const HEADER_ATTEMPT: &str = "x-cmdflow-attempt";
/// Header carrying how many times an event found its lock busy.
pub const HEADER_BUSY: &str = "x-cmdflow-busy";
/// Header carrying why an event became a dead letter.
pub const HEADER_REASON: &str = "x-cmdflow-reason";
/// Header carrying the class of error (`permanent`, `retries_exhausted`, …).
pub const HEADER_ERROR_CLASS: &str = "x-cmdflow-error-class";
/// Header carrying the last retryable error of an event being retried.
pub const HEADER_LAST_ERROR: &str = "x-cmdflow-last-error";

/// Header carrying the routing key the event was first published with.
pub const HEADER_ROUTING_KEY: &str = "x-cmdflow-routing-key";
/// Header carrying when the event first failed (RFC 3339).
pub const HEADER_FIRST_FAILURE: &str = "x-cmdflow-first-failure";
/// Header carrying the errors of every attempt, a JSON array of strings.
pub const HEADER_ERRORS: &str = "x-cmdflow-errors";
/// Header carrying the id of a dead-lettering, so a redelivered dead letter is kept once.
pub const HEADER_DEAD_ID: &str = "x-cmdflow-dead-id";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DELIVERY_LIMIT: i64 = 20;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not confirm the message (nack)")]
    Nacked,
    #[error("RabbitMQ could not route the message to any queue (is the topology declared?)")]
    Unroutable,
    #[error("RabbitMQ did not answer within {0:?}")]
    Timeout(Duration),
}

pub type Result<T, E = BusError> = std::result::Result<T, E>;

/// Every exchange and queue name, derived from the namespace.
#[derive(Debug, Clone)]
pub struct Topology {
    namespace: String,
}

impl Topology {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
        }
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }
    pub fn work_queue(&self) -> String {
        format!("{}.work", self.namespace)
    }
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.namespace)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.namespace)
    }
    pub fn retry_queue(&self, delay: Duration) -> String {
        format!("{}.retry.{}ms", self.namespace, delay.as_millis())
    }
    /// The queue of the activity `name` (see the `cmdflow` crate's activities).
    pub fn activity_queue(&self, name: &str) -> String {
        format!("{}.activity.{name}", self.namespace)
    }
}

/// One AMQP connection per process, rebuilt on demand after it breaks, plus a shared channel in
/// confirm mode for publishing.
pub struct Bus {
    url: String,
    name: String,
    topology: Topology,
    connection: Mutex<Option<Arc<Connection>>>,
    publisher: Mutex<Option<Channel>>,
    publish_timeout: Duration,
}

impl Bus {
    /// Connects once, so that a wrong URL fails at start-up with one clear line.
    pub async fn connect(url: &str, namespace: &str, name: &str) -> Result<Arc<Bus>> {
        let bus = Arc::new(Bus {
            url: url.to_owned(),
            name: name.to_owned(),
            topology: Topology::new(namespace),
            connection: Mutex::new(None),
            publisher: Mutex::new(None),
            publish_timeout: Duration::from_secs(10),
        });
        bus.connection().await?;
        Ok(bus)
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn url(&self) -> String {
        redact_url(&self.url)
    }

    /// The live connection, reconnecting if the last one broke.
    pub async fn connection(&self) -> Result<Arc<Connection>> {
        let mut guard = self.connection.lock().await;
        if let Some(conn) = guard.as_ref()
            && conn.status().connected()
        {
            return Ok(Arc::clone(conn));
        }
        if let Some(old) = guard.take() {
            // Best effort: the old connection is already broken or closing.
            drop(old.close(0, "reconnecting".into()).await);
        }
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.name.as_str()));
        let tls = lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: crate::tls::trust().map(|t| t.pem.clone()),
        };
        let runtime = lapin::runtime::default_runtime().map_err(|e| BusError::Connect {
            url: redact_url(&self.url),
            reason: e.to_string(),
        })?;
        let connect = Connection::connect_with_config(&self.url, props, tls, runtime);
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| BusError::Connect {
                url: redact_url(&self.url),
                reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
            })?
            .map_err(|e| BusError::Connect {
                url: redact_url(&self.url),
                reason: e.to_string(),
            })?;
        let conn = Arc::new(conn);
        *guard = Some(Arc::clone(&conn));
        Ok(conn)
    }

    /// Whether the connection is up right now (for readiness).
    pub async fn is_connected(&self) -> bool {
        match self.connection.lock().await.as_ref() {
            Some(conn) => conn.status().connected(),
            None => false,
        }
    }

    /// A fresh channel on the live connection.
    pub async fn channel(&self) -> Result<Channel> {
        let conn = self.connection().await?;
        Ok(conn.create_channel().await?)
    }

    async fn publisher(&self) -> Result<Channel> {
        let mut guard = self.publisher.lock().await;
        if let Some(ch) = guard.as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let ch = self.channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        *guard = Some(ch.clone());
        Ok(ch)
    }

    /// Publishes one persistent message and waits for the broker's confirm. `Ok` means the
    /// broker has taken responsibility for it; anything else means it may not have.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<()> {
        let attempt = async {
            let ch = self.publisher().await?;
            let confirm = ch
                .basic_publish(
                    ShortString::from(exchange),
                    ShortString::from(routing_key),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body,
                    properties.with_delivery_mode(2),
                )
                .await?
                .await?;
            match confirm {
                Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
                Confirmation::Ack(Some(_)) => Err(BusError::Unroutable),
                Confirmation::Nack(_) => Err(BusError::Nacked),
            }
        };
        let result = match tokio::time::timeout(self.publish_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(BusError::Timeout(self.publish_timeout)),
        };
        if matches!(result, Err(BusError::Amqp(_) | BusError::Timeout(_))) {
            // The channel may be dead; the next publish opens a new one.
            self.publisher.lock().await.take();
        }
        result
    }

    /// Publishes an event to the events exchange, routed by its type.
    pub async fn publish_event(
        &self,
        event_type: &str,
        event_id: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<()> {
        let props = event_properties(event_id).with_headers(headers);
        self.publish(&self.topology.events_exchange(), event_type, body, props)
            .await
    }

    /// Declares the whole topology. Idempotent.
    pub async fn declare_topology(&self, delays: &[Duration]) -> Result<()> {
        let t = &self.topology;
        let ch = self.channel().await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        ch.exchange_declare(
            t.events_exchange().as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.exchange_declare(
            t.dead_letter_exchange().as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;

        let mut work_args = quorum_args();
        work_args.insert(
            "x-dead-letter-exchange".into(),
            string(&t.dead_letter_exchange()),
        );
        work_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        declare_queue(&ch, &t.work_queue(), work_args).await?;
        ch.queue_bind(
            t.work_queue().as_str().into(),
            t.events_exchange().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

        declare_queue(&ch, &t.dead_queue(), quorum_args()).await?;
        ch.queue_bind(
            t.dead_queue().as_str().into(),
            t.dead_letter_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

        for delay in delays {
            let mut args = quorum_args();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(delay.as_millis().min(i64::MAX as u128) as i64),
            );
            args.insert("x-dead-letter-exchange".into(), string(""));
            args.insert("x-dead-letter-routing-key".into(), string(&t.work_queue()));
            declare_queue(&ch, &t.retry_queue(*delay), args).await?;
        }
        drop(ch.close(200, "declared".into()).await);
        Ok(())
    }

    /// Declares `queue` (quorum, durable, dead-lettering to `{ns}.dlx`) bound to the events
    /// exchange with each of `routing_keys`: a subscriber of its own beside the work queue, such
    /// as an activity. Idempotent.
    pub async fn declare_subscriber(&self, queue: &str, routing_keys: &[String]) -> Result<()> {
        let t = &self.topology;
        let ch = self.channel().await?;
        let mut args = quorum_args();
        args.insert(
            "x-dead-letter-exchange".into(),
            string(&t.dead_letter_exchange()),
        );
        declare_queue(&ch, queue, args).await?;
        for key in routing_keys {
            ch.queue_bind(
                queue.into(),
                t.events_exchange().as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        drop(ch.close(200, "declared".into()).await);
        Ok(())
    }

    /// Deletes every exchange and queue of the namespace (test clean-up).
    pub async fn delete_topology(&self, delays: &[Duration]) -> Result<()> {
        let t = &self.topology;
        let ch = self.channel().await?;
        let mut queues = vec![t.work_queue(), t.dead_queue()];
        queues.extend(delays.iter().map(|d| t.retry_queue(*d)));
        for q in queues {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for x in [t.events_exchange(), t.dead_letter_exchange()] {
            ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        drop(ch.close(200, "deleted".into()).await);
        Ok(())
    }

    pub async fn close(&self) {
        if let Some(conn) = self.connection.lock().await.take() {
            drop(conn.close(200, "shutting down".into()).await);
        }
    }

    /// Messages ready in `queue` (not those delivered and unacknowledged), by a passive declare
    /// on a channel of its own: a missing queue closes that channel, not a shared one.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32> {
        let ch = self.channel().await?;
        let declared = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        if ch.status().connected() {
            drop(ch.close(200, "counted".into()).await);
        }
        Ok(declared?.message_count())
    }
}

/// AMQP headers of an event: its `traceparent`, so a trace spans every hop.
pub fn event_headers(event: &crate::contract::Event) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(serde_json::Value::String(tp)) = event.extensions.get(crate::trace::TRACEPARENT) {
        headers.insert(crate::trace::TRACEPARENT.into(), string(tp));
    }
    headers
}

/// Properties of an event message: persistent, JSON, with the event id as message id.
pub fn event_properties(event_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/cloudevents+json".into())
        .with_message_id(event_id.into())
        .with_delivery_mode(2)
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string("quorum"));
    // Dead-letter at least once (RabbitMQ ≥ 3.10), which requires reject-publish on overflow.
    args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
    args.insert("x-overflow".into(), string("reject-publish"));
    args
}

async fn declare_queue(ch: &Channel, name: &str, args: FieldTable) -> Result<()> {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await?;
    Ok(())
}

pub fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Reads an integer header, whatever integer width the publisher used.
pub fn header_u32(headers: Option<&FieldTable>, name: &str) -> u32 {
    let Some(value) = headers.and_then(|h| h.inner().get(name)) else {
        return 0;
    };
    let n: i64 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => *v,
        _ => 0,
    };
    u32::try_from(n).unwrap_or(0)
}

/// Reads a string header.
pub fn header_str(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers.and_then(|h| h.inner().get(name))? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}
