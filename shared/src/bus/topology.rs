//! The namespace's exchanges and queues: their names ([`Topology`]), and declaring, checking
//! and deleting them.

use super::*;

/// Every exchange and queue name, derived from the namespace, and its number of partitions.
#[derive(Debug, Clone)]
pub struct Topology {
    namespace: String,
    partitions: u32,
}

impl Topology {
    pub fn new(namespace: &str) -> Self {
        Self::with_partitions(namespace, DEFAULT_PARTITIONS)
    }
    pub fn with_partitions(namespace: &str, partitions: u32) -> Self {
        Self {
            namespace: namespace.to_owned(),
            partitions: partitions.max(1),
        }
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// How many partition queues the namespace has.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }
    /// The headers exchange that sends each event to its partition queue.
    pub fn route_exchange(&self) -> String {
        format!("{}.route", self.namespace)
    }
    /// Where events without a partition header go (the alternate exchange of the route).
    pub fn unkeyed_exchange(&self) -> String {
        format!("{}.unkeyed", self.namespace)
    }
    /// The queue of events published without a partition header, forwarded in order to their
    /// partitions by one worker at a time.
    pub fn work_queue(&self) -> String {
        format!("{}.unkeyed", self.namespace)
    }
    /// The one work queue of the versions before partitions: no longer bound, and deleted with
    /// the namespace.
    pub fn legacy_work_queue(&self) -> String {
        format!("{}.work", self.namespace)
    }
    /// The queue of partition `p`.
    pub fn partition_queue(&self, p: u32) -> String {
        format!("{}.work.{p}", self.namespace)
    }
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.namespace)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.namespace)
    }
    /// The queue of the activity `name` (see the `cmdflow` crate's activities).
    pub fn activity_queue(&self, name: &str) -> String {
        format!("{}.activity.{name}", self.namespace)
    }
}

impl Bus {
    /// Declares the exchanges every publisher needs (`ns.events`, `ns.route` with the number
    /// of partitions, `ns.unkeyed`) and binds `ns.events` to `ns.route`. Idempotent. A
    /// namespace declared with another number of partitions is refused, naming both.
    pub async fn declare_exchanges(&self) -> Result<()> {
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
            t.unkeyed_exchange().as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
        let mut route_args = FieldTable::default();
        route_args.insert("alternate-exchange".into(), string(&t.unkeyed_exchange()));
        route_args.insert(
            PARTITIONS_ARG.into(),
            AMQPValue::LongLongInt(i64::from(t.partitions)),
        );
        ch.exchange_declare(
            t.route_exchange().as_str().into(),
            ExchangeKind::Headers,
            durable,
            route_args,
        )
        .await
        .map_err(|source| match amqp_code(&source) {
            // PRECONDITION_FAILED: declared before with other arguments.
            Some(406) => BusError::Partitions {
                namespace: t.namespace.clone(),
                partitions: t.partitions,
                source,
            },
            _ => BusError::Amqp(source),
        })?;
        ch.exchange_bind(
            t.route_exchange().as_str().into(),
            t.events_exchange().as_str().into(),
            "#".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        drop(ch.close(200, "declared".into()).await);
        Ok(())
    }

    /// What a publisher needs that is missing, if anything: `ns.events`, or the partition
    /// queues behind it (declared by the workers). For readiness: without them every publish
    /// fails.
    pub async fn topology_in_place(&self) -> Result<Option<String>> {
        let t = &self.topology;
        let ch = self.channel().await?;
        let exchange = ch
            .exchange_declare(
                t.events_exchange().as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let missing = match exchange {
            Err(e) if amqp_code(&e) == Some(404) => Some(format!(
                "the exchange {} does not exist",
                t.events_exchange()
            )),
            Err(e) => return Err(e.into()),
            // A missing queue closes the channel: it is the last check on it.
            Ok(()) => match passive_queue(&ch, &t.partition_queue(0)).await {
                Err(e) if amqp_code(&e) == Some(404) => Some(format!(
                    "the queue {} does not exist: no worker has declared the topology",
                    t.partition_queue(0)
                )),
                Err(e) => return Err(e.into()),
                Ok(_) => None,
            },
        };
        if ch.status().connected() {
            drop(ch.close(200, "checked".into()).await);
        }
        Ok(missing)
    }

    /// Declares the whole topology: the exchanges, the partition queues, the queue `ns.unkeyed`
    /// for events without a partition header, and the dead letters; unbinds the `ns.work` of
    /// earlier versions. Idempotent.
    pub async fn declare_topology(&self) -> Result<()> {
        self.declare_exchanges().await?;
        let t = &self.topology;
        let ch = self.channel().await?;
        ch.exchange_declare(
            t.dead_letter_exchange().as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
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
        // One consumer at a time, enforced by the broker: quorum queues ignore the `exclusive`
        // flag of a consumer, and a second consumer of a partition would reorder its events.
        // The next consumer becomes active once the one before it is gone, and gets first what
        // that one had not acknowledged.
        work_args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        declare_queue(&ch, &t.work_queue(), work_args.clone()).await?;
        self.unbind_legacy_work_queue().await?;
        ch.queue_bind(
            t.work_queue().as_str().into(),
            t.unkeyed_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        for p in 0..t.partitions {
            let queue = t.partition_queue(p);
            declare_queue(&ch, &queue, work_args.clone()).await?;
            let mut args = FieldTable::default();
            args.insert("x-match".into(), string("all"));
            args.insert(HEADER_PARTITION.into(), string(&p.to_string()));
            ch.queue_bind(
                queue.as_str().into(),
                t.route_exchange().as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                args,
            )
            .await?;
        }
        declare_queue(&ch, &t.dead_queue(), quorum_args()).await?;
        ch.queue_bind(
            t.dead_queue().as_str().into(),
            t.dead_letter_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
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

    /// Before partitions, `{ns}.work` took every event straight from `{ns}.events`. If it is
    /// there and empty, it is deleted (deleting a missing queue is no error); if events still
    /// wait in it, or an older worker consumes it, it is only unbound, so nothing new goes
    /// there, and a warning says so.
    pub(super) async fn unbind_legacy_work_queue(&self) -> Result<()> {
        let t = &self.topology;
        let legacy = t.legacy_work_queue();
        let ch = self.channel().await?;
        let deleted = ch
            .queue_delete(
                legacy.as_str().into(),
                QueueDeleteOptions {
                    if_unused: true,
                    if_empty: true,
                    ..QueueDeleteOptions::default()
                },
            )
            .await;
        match deleted {
            Ok(_) => {
                drop(ch.close(200, "checked".into()).await);
                Ok(())
            }
            // PRECONDITION_FAILED: not empty, or consumed (it closed the channel).
            Err(e) if amqp_code(&e) == Some(406) => {
                let ch = self.channel().await?;
                ch.queue_unbind(
                    legacy.as_str().into(),
                    t.events_exchange().as_str().into(),
                    "#".into(),
                    FieldTable::default(),
                )
                .await?;
                drop(ch.close(200, "unbound".into()).await);
                tracing::warn!(queue.name = %legacy, "The work queue of an earlier cmdflow version still holds events or a consumer: it is unbound now; let the earlier workers empty it.");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every exchange and queue of the namespace (test clean-up).
    pub async fn delete_topology(&self) -> Result<()> {
        let t = &self.topology;
        let ch = self.channel().await?;
        let mut queues = vec![t.work_queue(), t.legacy_work_queue(), t.dead_queue()];
        queues.extend((0..t.partitions).map(|p| t.partition_queue(p)));
        for q in queues {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for x in [
            t.events_exchange(),
            t.route_exchange(),
            t.unkeyed_exchange(),
            t.dead_letter_exchange(),
        ] {
            ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        drop(ch.close(200, "deleted".into()).await);
        Ok(())
    }
}

pub(super) fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string("quorum"));
    // Dead-letter at least once (RabbitMQ ≥ 3.10), which requires reject-publish on overflow.
    args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
    args.insert("x-overflow".into(), string("reject-publish"));
    args
}

/// A passive declare of `queue`: its counts, or 404 (which closes the channel) if it is missing.
pub(super) async fn passive_queue(
    ch: &Channel,
    queue: &str,
) -> std::result::Result<lapin::Queue, lapin::Error> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
}

pub(super) async fn declare_queue(ch: &Channel, name: &str, args: FieldTable) -> Result<()> {
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
