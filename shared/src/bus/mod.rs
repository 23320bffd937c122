//! RabbitMQ: the topology (every name under the namespace), one connection per process that
//! reconnects by itself, and publishing with publisher confirms.
//!
//! Topology for namespace `ns`, with `N` partitions:
//! - `ns.events`: topic exchange, routing key = event type. Upstream services publish here, and
//!   other services may bind their own queues to observe it.
//! - `ns.route`: headers exchange bound to `ns.events` with `#`. It sends an event carrying the
//!   header `cmdflow-partition: p` to the partition queue `ns.work.p`. Every publisher of
//!   cmdflow sets that header ([`Bus::add_partition`]): `p` is a hash of the command id (of the
//!   correlation id, or the event id, for a broadcast) modulo `N`, so one command's events all
//!   go to one queue, in the order they were accepted.
//! - `ns.work.0` … `ns.work.{N-1}`: quorum queues with a single active consumer, each consumed
//!   by one worker at a time (see the engine's partitions); dead-letter exchange `ns.dlx`, with
//!   a delivery limit against messages that crash workers.
//! - `ns.unkeyed` (fanout), the alternate exchange of `ns.route`: an event published without
//!   the header (straight to `ns.events` by an upstream service) goes to the queue
//!   `ns.unkeyed` (single active consumer), where one worker at a time forwards each, in
//!   order, to its partition.
//! - `ns.work`: the single work queue of the versions before partitions; unbound if found.
//! - `ns.dlx` (fanout) → `ns.dead`: dead letters, with the reason in headers.
//!
//! `N` is part of the namespace: `ns.route` is declared with it (argument
//! `x-cmdflow-partitions`), and a process configured with another `N` fails at start-up.
//!
//! Reconnection is ours rather than lapin's auto-recover: a broken connection is dropped and the
//! next caller builds a new one. A publish that fails is reported to its caller (the gateway
//! answers 503), and the worker's consume loop reconnects with backoff. Deliveries in flight are
//! redelivered by the broker, and consumers dedupe by event id.

use std::sync::Arc;
use std::time::Duration;

use lapin::Acker;
use lapin::options::{
    BasicAckOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;

use crate::config::redact_url;

mod topology;

pub use topology::Topology;
use topology::passive_queue;

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
/// Header carrying the partition an event goes to (a number, as text). Not `x-` prefixed: a
/// headers exchange does not match binding arguments that are.
pub const HEADER_PARTITION: &str = "cmdflow-partition";
/// The engine's mark: set, with the secret of the `engine_mark` table, on every event cmdflow's
/// own processes publish; a worker refuses an engine event type without it.
pub const HEADER_ENGINE: &str = "x-cmdflow-engine";
/// The argument of `ns.route` that records the namespace's number of partitions.
const PARTITIONS_ARG: &str = "x-cmdflow-partitions";
/// How many partitions a namespace has unless configured (`CMDFLOW_PARTITIONS`): what suits a
/// broker that shares its machine with PostgreSQL and the workers. Each partition is a quorum
/// queue, and on a 2-core all-in-one box 16 of them cost W1 a fifth of its throughput against one
/// work queue, where 4 cost none that could be measured (bench/2026-12-06-order-cost.md). A
/// broker on machines of its own takes more (the Kubernetes manifests set 16).
pub const DEFAULT_PARTITIONS: u32 = 4;

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
    #[error("RabbitMQ: the batch of messages could not be sent: {0}")]
    Batch(String),
    #[error(
        "the namespace {namespace} has another number of partitions than the {partitions} configured (CMDFLOW_PARTITIONS must be the same for every process of a namespace; a namespace declared before the default became 4 has 16: set CMDFLOW_PARTITIONS=16 for it): {source}"
    )]
    Partitions {
        namespace: String,
        partitions: u32,
        #[source]
        source: lapin::Error,
    },
}

pub type Result<T, E = BusError> = std::result::Result<T, E>;

/// One AMQP connection per process, rebuilt on demand after it breaks, plus a shared channel in
/// confirm mode for publishing.
pub struct Bus {
    url: String,
    name: String,
    topology: Topology,
    connection: Mutex<Option<Arc<Connection>>>,
    publisher: Mutex<Option<Channel>>,
    publish_timeout: Duration,
    /// The engine's mark, once the process has read it from the store.
    engine_mark: std::sync::OnceLock<String>,
}

/// The AMQP heartbeat asked for when neither the URL nor the config names one. The broker
/// closes a connection that misses two heartbeats: a paused or frozen process (SIGSTOP, a
/// stalled VM) gives back its unacknowledged deliveries, and its partitions' single active
/// consumer, after about twice this, not at the end of its pause.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// `url` with `heartbeat` (whole seconds, at least 1) as its `heartbeat` query parameter,
/// unless it names one already.
pub fn with_heartbeat(url: &str, heartbeat: Duration) -> String {
    if url.contains("heartbeat=") {
        return url.to_owned();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}heartbeat={}", heartbeat.as_secs().max(1))
}

impl Bus {
    /// Connects once, so that a wrong URL fails at start-up with one clear line. The
    /// namespace has the default number of partitions.
    pub async fn connect(url: &str, namespace: &str, name: &str) -> Result<Arc<Bus>> {
        Self::connect_to(url, Topology::new(namespace), name).await
    }

    /// Connects with the URL, namespace and partitions of `config`.
    pub async fn for_config(config: &crate::Config, name: &str) -> Result<Arc<Bus>> {
        let topology = Topology::with_partitions(&config.namespace, config.partitions);
        let url = with_heartbeat(&config.amqp_url, config.amqp_heartbeat);
        Self::connect_to(&url, topology, name).await
    }

    /// Connects to `url` for `topology`. Without a `heartbeat` in the URL, it asks for
    /// [`DEFAULT_HEARTBEAT`].
    pub async fn connect_to(url: &str, topology: Topology, name: &str) -> Result<Arc<Bus>> {
        let bus = Arc::new(Bus {
            url: with_heartbeat(url, DEFAULT_HEARTBEAT),
            name: name.to_owned(),
            topology,
            connection: Mutex::new(None),
            publisher: Mutex::new(None),
            publish_timeout: Duration::from_secs(10),
            engine_mark: std::sync::OnceLock::new(),
        });
        bus.connection().await?;
        Ok(bus)
    }

    /// Makes this process one of cmdflow's own publishers: `mark` is the secret of the
    /// `engine_mark` table ([`crate::store::engine_mark`]). Set once; later calls change nothing.
    pub fn set_engine_mark(&self, mark: String) {
        drop(self.engine_mark.set(mark));
    }

    /// Whether this process has read the engine's mark.
    pub fn has_engine_mark(&self) -> bool {
        self.engine_mark.get().is_some()
    }

    /// Marks an event this process publishes for the engine. Without a mark (a process that
    /// never read it) the event goes unmarked, and a worker refuses it if it is an engine type.
    pub fn mark_engine(&self, headers: &mut FieldTable) {
        if let Some(mark) = self.engine_mark.get() {
            headers.insert(HEADER_ENGINE.into(), string(mark));
        }
    }

    /// Whether a message's headers carry the engine's mark.
    pub fn is_from_engine(&self, headers: Option<&FieldTable>) -> bool {
        match (self.engine_mark.get(), header_str(headers, HEADER_ENGINE)) {
            (Some(mark), Some(seen)) => {
                // In constant time: the comparison tells an attacker nothing of the mark.
                mark.len() == seen.len()
                    && mark
                        .bytes()
                        .zip(seen.bytes())
                        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                        == 0
            }
            _ => false,
        }
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
            close_connection(&old, 0).await;
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

    /// Closes the connection, and with it every channel on it and every consumer the broker
    /// knows there, so that the next caller connects anew. For a consumer this process no
    /// longer reads and the broker still delivers to: only its connection ending is sure to
    /// end it. Bounded as every close here.
    pub async fn reconnect(&self) {
        let old = self.connection.lock().await.take();
        if let Some(old) = old {
            close_connection(&old, 200).await;
        }
        self.publisher.lock().await.take();
    }

    /// Whether the connection is up right now (for readiness).
    pub async fn is_connected(&self) -> bool {
        match self.connection.lock().await.as_ref() {
            Some(conn) => conn.status().connected(),
            None => false,
        }
    }

    /// A fresh channel on the live connection. A connection that does not answer within
    /// [`CONNECT_TIMEOUT`] (one the broker is dropping) is a [`BusError::Timeout`].
    pub async fn channel(&self) -> Result<Channel> {
        let conn = self.connection().await?;
        match tokio::time::timeout(CONNECT_TIMEOUT, conn.create_channel()).await {
            Ok(channel) => Ok(channel?),
            Err(_) => Err(BusError::Timeout(CONNECT_TIMEOUT)),
        }
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

    /// Publishes an event to the events exchange, routed by its type, with its partition
    /// header: `key` is what the partition is a hash of ([`route_key`]).
    pub async fn publish_event(
        &self,
        event_type: &str,
        event_id: &str,
        key: &[u8],
        body: &[u8],
        mut headers: FieldTable,
    ) -> Result<()> {
        self.add_partition(&mut headers, key);
        let props = event_properties(event_id).with_headers(headers);
        self.publish(&self.topology.events_exchange(), event_type, body, props)
            .await
    }

    /// Sets the partition header of an event whose routing key is `key`.
    pub fn add_partition(&self, headers: &mut FieldTable, key: &[u8]) {
        let p = partition_of(key, self.topology.partitions());
        headers.insert(HEADER_PARTITION.into(), string(&p.to_string()));
    }

    /// Publishes messages in the order given, on one channel, and waits for all their confirms:
    /// messages for one queue are enqueued in that order. One result per message.
    pub async fn publish_many(&self, messages: Vec<Outgoing<'_>>) -> Vec<Result<()>> {
        let n = messages.len();
        if n == 0 {
            return Vec::new();
        }
        let attempt = async move {
            let ch = self.publisher().await?;
            let mut pending = Vec::with_capacity(messages.len());
            for m in messages {
                let confirm = ch
                    .basic_publish(
                        ShortString::from(m.exchange.as_str()),
                        ShortString::from(m.routing_key),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        m.body,
                        m.properties.with_delivery_mode(2),
                    )
                    .await;
                pending.push(confirm);
            }
            let mut results = Vec::with_capacity(pending.len());
            for confirm in pending {
                let result = match confirm {
                    Err(e) => Err(BusError::from(e)),
                    Ok(confirm) => match confirm.await {
                        Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(()),
                        Ok(Confirmation::Ack(Some(_))) => Err(BusError::Unroutable),
                        Ok(Confirmation::Nack(_)) => Err(BusError::Nacked),
                        Err(e) => Err(BusError::from(e)),
                    },
                };
                results.push(result);
            }
            Ok::<_, BusError>(results)
        };
        let results = match tokio::time::timeout(self.publish_timeout, attempt).await {
            Ok(Ok(results)) => results,
            Ok(Err(e)) => {
                self.publisher.lock().await.take();
                let reason = e.to_string();
                return (0..n)
                    .map(|_| Err(BusError::Batch(reason.clone())))
                    .collect();
            }
            Err(_) => {
                self.publisher.lock().await.take();
                return (0..n)
                    .map(|_| Err(BusError::Timeout(self.publish_timeout)))
                    .collect();
            }
        };
        if results
            .iter()
            .any(|r| matches!(r, Err(BusError::Amqp(_) | BusError::Timeout(_))))
        {
            self.publisher.lock().await.take();
        }
        results
    }

    pub async fn close(&self) {
        if let Some(conn) = self.connection.lock().await.take() {
            drop(conn.close(200, "shutting down".into()).await);
        }
    }

    /// Messages ready in the work queues together: every partition and the unkeyed queue.
    pub async fn work_backlog(&self) -> Result<u32> {
        let t = &self.topology;
        let ch = self.channel().await?;
        let mut total = 0u32;
        let queues = std::iter::once(t.work_queue())
            .chain((0..t.partitions()).map(|p| t.partition_queue(p)));
        for queue in queues {
            let declared = passive_queue(&ch, &queue).await;
            match declared {
                Ok(q) => total = total.saturating_add(q.message_count()),
                Err(e) => {
                    if ch.status().connected() {
                        drop(ch.close(200, "counted".into()).await);
                    }
                    return Err(e.into());
                }
            }
        }
        drop(ch.close(200, "counted".into()).await);
        Ok(total)
    }

    /// Messages ready in `queue` (not those delivered and unacknowledged), by a passive declare
    /// on a channel of its own: a missing queue closes that channel, not a shared one.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32> {
        Ok(self.passive_counts(queue).await?.message_count())
    }

    /// Messages ready in `queue` and its consumers, in one passive declare.
    pub async fn queue_counts(&self, queue: &str) -> Result<QueueCounts> {
        let q = self.passive_counts(queue).await?;
        Ok(QueueCounts {
            ready: q.message_count(),
            consumers: q.consumer_count(),
        })
    }

    async fn passive_counts(&self, queue: &str) -> Result<lapin::Queue> {
        let ch = self.channel().await?;
        let declared = passive_queue(&ch, queue).await;
        if ch.status().connected() {
            drop(ch.close(200, "counted".into()).await);
        }
        Ok(declared?)
    }
}

/// The AMQP reply code of a broker error (404 not found, 405 locked, 406 precondition failed).
pub fn amqp_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// Closes `conn` with reply `code`, waiting at most [`CONNECT_TIMEOUT`]: a close that never
/// hears back (a connection cut under it) would otherwise hold the connection's lock, and every
/// caller that wants a channel, for ever.
async fn close_connection(conn: &Connection, code: u16) {
    drop(tokio::time::timeout(CONNECT_TIMEOUT, conn.close(code, "reconnecting".into())).await);
}

/// What the broker says of a queue: messages ready (not those delivered and unacknowledged),
/// and consumers (active or standing by).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    pub ready: u32,
    pub consumers: u32,
}

/// The longest an ack or a nack may take to be handed to the broker. On a connection that broke
/// under it, lapin may never answer one: whoever waits on it (a batch holding its commands'
/// turns, a partition's in-flight count) would wait for ever, and so would every later event
/// of those commands. Given up, the delivery is not lost: its channel is gone or going, and the
/// broker hands it back to the next consumer, where it is deduplicated.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Acks a delivery, waiting at most [`SETTLE_TIMEOUT`]. `Ok` also when lapin no longer can (its
/// channel closed): the broker redelivers it then.
pub async fn ack(acker: &Acker) -> Result<()> {
    settle(acker.ack(BasicAckOptions::default())).await
}

/// Hands a delivery back to the broker (`requeue`) or drops it, waiting at most
/// [`SETTLE_TIMEOUT`].
pub async fn nack(acker: &Acker, requeue: bool) -> Result<()> {
    settle(acker.nack(BasicNackOptions {
        requeue,
        ..BasicNackOptions::default()
    }))
    .await
}

async fn settle(settling: impl std::future::Future<Output = lapin::Result<bool>>) -> Result<()> {
    match tokio::time::timeout(SETTLE_TIMEOUT, settling).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(BusError::Timeout(SETTLE_TIMEOUT)),
    }
}

/// A message for [`Bus::publish_many`].
pub struct Outgoing<'a> {
    pub exchange: String,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub properties: BasicProperties,
}

/// A new command id in the same partition as `like`'s, out of `partitions`: the ids of a
/// parent's children, so a family's events share a queue and a worker. A child's start, its
/// own events and its report to the parent then come in the order they were published, close
/// together, and a batch applies a parent's reports under one lock. Draws fresh (random) v7 ids
/// until one falls in the partition: `partitions` draws on average.
pub fn id_in_partition_of(like: crate::CommandId, partitions: u32) -> crate::CommandId {
    let want = command_partition(like, partitions);
    // A bound that is never reached in practice (the chance is (1 - 1/N)^(64 N) < e^-64).
    for _ in 0..64 * partitions.max(1) {
        let id = crate::CommandId::new();
        if command_partition(id, partitions) == want {
            return id;
        }
    }
    crate::CommandId::new()
}

/// The partition of command `id`'s events: [`partition_of`] its [`route_key`].
pub fn command_partition(id: crate::CommandId, partitions: u32) -> u32 {
    partition_of(id.as_uuid().as_bytes(), partitions)
}

/// The partition of a routing key: FNV-1a (64 bits) of its bytes, modulo `partitions`. Stable
/// across processes, platforms and releases: every publisher of a namespace agrees.
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    use std::hash::Hasher;
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(key);
    (hasher.finish() % u64::from(partitions.max(1))) as u32
}

/// What an event's partition is a hash of: the command it is addressed to; for a broadcast, its
/// correlation id (so one person's broadcasts keep their order), else its id.
pub fn route_key(event: &crate::contract::Event) -> Vec<u8> {
    match (&event.commandid, &event.correlationid) {
        (Some(id), _) => id.as_uuid().as_bytes().to_vec(),
        (None, Some(key)) => key.as_bytes().to_vec(),
        (None, None) => event.id.as_bytes().to_vec(),
    }
}

/// [`route_key`] of an event's JSON, as much as can be read from it: a body that is not an
/// event goes by its bytes (the worker that gets it dead-letters it with the reason).
pub fn route_key_of(body: &[u8]) -> Vec<u8> {
    match crate::contract::Event::parse(body) {
        Ok(event) => route_key(&event),
        Err(_) => body.to_vec(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_childs_id_falls_in_its_parents_partition() {
        for partitions in [1, 4, 16, 1024] {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..100 {
                let parent = crate::CommandId::new();
                let child = id_in_partition_of(parent, partitions);
                assert_eq!(
                    command_partition(child, partitions),
                    command_partition(parent, partitions),
                    "{partitions} partitions"
                );
                assert!(seen.insert(child), "ids stay unique");
                assert_ne!(child, parent);
            }
        }
    }
}
