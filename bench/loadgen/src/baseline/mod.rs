//! The hand-written baseline, B1–B4: the smallest pipeline a user would write by hand for the
//! shapes of W1–W4, with no cmdflow engine code, so that a W result can be read as a ratio to
//! what the same machine and services do without cmdflow.
//!
//! It runs inside the load generator against the run's services: its own tables in the run's
//! database (`baseline_*`), its own quorum queue per workload in the run's namespace
//! (`<namespace>.baseline.bN`, reached through the default exchange), its own AMQP connection,
//! `--concurrency` consumer tasks sharing one channel with `--prefetch`, and one PostgreSQL pool
//! the size of one worker's. An event is: consume, take a lock on the single Redis
//! (`SET key token NX PX ttl`, tried again every 2 ms while busy, released by a compare-and-delete
//! script; `--no-lock` skips it), one transaction, commit, release, ack. Messages are published
//! by the load generator as the W workloads publish theirs (confirms, send time in the message),
//! and latency is from publish to the history row, as in W1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use cmdflow_shared::bus::{Bus, event_properties};
use cmdflow_shared::store;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Polled, Run, percentile, poll_until};

mod workloads;

/// The baseline's workloads, each with a queue of its own.
pub const WORKLOADS: [&str; 4] = ["b1", "b2", "b3", "b4"];

/// How long a consumer sleeps before it tries a busy lock again.
const LOCK_RETRY: Duration = Duration::from_millis(2);

/// How often the timer poller looks for due rows when the last claim was not a full batch.
const POLL_EVERY: Duration = Duration::from_millis(2);

/// Deletes the key only while it still holds our token, so a lock that expired and was taken
/// by another consumer is not released by us.
const RELEASE: &str = r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS baseline_counters (
    id uuid PRIMARY KEY,
    n  bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS baseline_history (
    event_id   uuid PRIMARY KEY,
    counter_id uuid NOT NULL,
    sent_us    bigint NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS baseline_history_by_counter ON baseline_history (counter_id);
CREATE TABLE IF NOT EXISTS baseline_parents (
    id        uuid PRIMARY KEY,
    remaining int NOT NULL,
    sent_us   bigint NOT NULL,
    done_at   timestamptz
);
CREATE TABLE IF NOT EXISTS baseline_children (
    id        uuid PRIMARY KEY,
    parent_id uuid NOT NULL,
    steps     int NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS baseline_timers (
    id     uuid PRIMARY KEY,
    due_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS baseline_timers_due ON baseline_timers (due_at);
CREATE TABLE IF NOT EXISTS baseline_firings (
    timer_id uuid NOT NULL,
    due_at   timestamptz NOT NULL,
    fired_at timestamptz NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS baseline_firings_by_timer ON baseline_firings (timer_id);
";

/// The queue of a baseline workload in `namespace`.
pub fn queue_name(namespace: &str, workload: &str) -> String {
    format!("{namespace}.baseline.{workload}")
}

/// Deletes the baseline's queues of `namespace` (those never declared are no error).
pub async fn delete_queues(bus: &Bus, namespace: &str) {
    for workload in WORKLOADS {
        let Ok(ch) = bus.channel().await else { return };
        drop(
            ch.queue_delete(
                queue_name(namespace, workload).as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await,
        );
        drop(ch.close(200, "deleted".into()).await);
    }
}

/// One running consumer side: its connection, pool, Redis and consumer tasks.
struct Pipeline {
    pool: PgPool,
    bus: Arc<Bus>,
    redis: redis::aio::MultiplexedConnection,
    release: redis::Script,
    lock_prefix: String,
    lock_ttl_ms: u64,
    use_lock: bool,
    queue: String,
}

/// The consumers of one workload; `stop` ends them and deletes the queue.
struct Consumers {
    pipeline: Arc<Pipeline>,
    channel: lapin::Channel,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Consumers {
    async fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        drop(self.channel.close(200, "done".into()).await);
        if let Ok(ch) = self.pipeline.bus.channel().await {
            drop(
                ch.queue_delete(
                    self.pipeline.queue.as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await,
            );
            drop(ch.close(200, "deleted".into()).await);
        }
        self.pipeline.bus.close().await;
        self.pipeline.pool.close().await;
    }
}

impl Pipeline {
    async fn start(run: &Run, workload: &str) -> anyhow::Result<Arc<Pipeline>> {
        let config = &run.config;
        let pool = store::connect(&config.database_url, config.database_pool_size).await?;
        let bus = Bus::connect(&config.amqp_url, &config.namespace, "cmdflow-baseline").await?;
        let redis_url = config
            .redis_url_list()
            .into_iter()
            .next()
            .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
        let redis = redis::Client::open(redis_url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        Ok(Arc::new(Pipeline {
            pool,
            bus,
            redis,
            release: redis::Script::new(RELEASE),
            lock_prefix: format!("{}:baseline:lock:", config.namespace),
            lock_ttl_ms: config.lock_ttl.as_millis() as u64,
            use_lock: !run.args.no_lock,
            queue: queue_name(&config.namespace, workload),
        }))
    }

    /// Declares the queue and starts `concurrency` consumer tasks on one channel.
    async fn consume(
        self: &Arc<Self>,
        concurrency: usize,
        prefetch: u16,
    ) -> anyhow::Result<Consumers> {
        let channel = self.bus.channel().await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "baseline".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let tasks = (0..concurrency.max(1))
            .map(|_| {
                let (pipeline, mut consumer) = (Arc::clone(self), consumer.clone());
                tokio::spawn(async move {
                    while let Some(Ok(delivery)) = consumer.next().await {
                        let handled = match serde_json::from_slice::<Value>(&delivery.data) {
                            Ok(message) => pipeline.handle(&message).await,
                            Err(e) => Err(e.into()),
                        };
                        match handled {
                            Ok(()) => {
                                drop(delivery.acker.ack(BasicAckOptions::default()).await);
                            }
                            Err(e) => {
                                eprintln!("baseline: {e:#}; requeued");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                let requeue = BasicNackOptions {
                                    requeue: true,
                                    ..BasicNackOptions::default()
                                };
                                drop(delivery.acker.nack(requeue).await);
                            }
                        }
                    }
                })
            })
            .collect();
        Ok(Consumers {
            pipeline: Arc::clone(self),
            channel,
            tasks,
        })
    }

    async fn handle(&self, message: &Value) -> anyhow::Result<()> {
        let uuid = |field: &str| -> anyhow::Result<Uuid> {
            Ok(message[field]
                .as_str()
                .unwrap_or_default()
                .parse::<Uuid>()?)
        };
        let sent_us = message["sent_us"].as_i64().unwrap_or(0);
        match message["type"].as_str() {
            Some("increment") => {
                let counter = uuid("counter")?;
                let lock = self.lock(counter).await?;
                let done = self.increment(counter, uuid("id")?, sent_us).await;
                self.unlock(lock).await;
                done
            }
            Some("parent") => {
                let parent = uuid("parent")?;
                let children = message["children"].as_u64().unwrap_or(0) as usize;
                let lock = self.lock(parent).await?;
                let done = self.spawn_children(parent, children, sent_us).await;
                self.unlock(lock).await;
                done
            }
            Some("child") => {
                let child = uuid("child")?;
                let lock = self.lock(child).await?;
                let done = self
                    .child_step(child, uuid("parent")?, uuid("id")?, sent_us)
                    .await;
                self.unlock(lock).await;
                done
            }
            Some("fired") => {
                sqlx::query(
                    "INSERT INTO baseline_firings (timer_id, due_at, fired_at)
                     VALUES ($1, to_timestamp($2::float8 / 1e6), to_timestamp($3::float8 / 1e6))",
                )
                .bind(uuid("timer")?)
                .bind(message["due_us"].as_i64().unwrap_or(0))
                .bind(message["fired_us"].as_i64().unwrap_or(0))
                .execute(&self.pool)
                .await?;
                Ok(())
            }
            other => bail!("unknown message type {other:?}"),
        }
    }

    /// Takes the lock of `id`, trying again every [`LOCK_RETRY`] while another consumer holds it.
    async fn lock(&self, id: Uuid) -> anyhow::Result<Option<(String, String)>> {
        if !self.use_lock {
            return Ok(None);
        }
        let key = format!("{}{id}", self.lock_prefix);
        let token = Uuid::new_v4().to_string();
        let mut redis = self.redis.clone();
        loop {
            let taken: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(self.lock_ttl_ms)
                .query_async(&mut redis)
                .await?;
            if taken.is_some() {
                return Ok(Some((key, token)));
            }
            tokio::time::sleep(LOCK_RETRY).await;
        }
    }

    async fn unlock(&self, lock: Option<(String, String)>) {
        if let Some((key, token)) = lock {
            let mut redis = self.redis.clone();
            let released: redis::RedisResult<i64> = self
                .release
                .key(&key)
                .arg(&token)
                .invoke_async(&mut redis)
                .await;
            if let Err(e) = released {
                eprintln!("baseline: release {key}: {e}");
            }
        }
    }

    /// One step on a counter. A redelivered event hits the history's primary key and rolls back.
    async fn increment(&self, counter: Uuid, event: Uuid, sent_us: i64) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        let n: Option<i64> =
            sqlx::query_scalar("SELECT n FROM baseline_counters WHERE id = $1 FOR UPDATE")
                .bind(counter)
                .fetch_optional(&mut *tx)
                .await?;
        if n.is_none() {
            bail!("counter {counter} does not exist");
        }
        sqlx::query("UPDATE baseline_counters SET n = n + 1 WHERE id = $1")
            .bind(counter)
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO baseline_history (event_id, counter_id, sent_us) VALUES ($1, $2, $3)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event)
        .bind(counter)
        .bind(sent_us)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(());
        }
        tx.commit().await?;
        Ok(())
    }

    /// A parent: its row and its children's rows in one transaction, then one message per child.
    /// A plain pipeline publishes after the commit: a crash in between loses the children.
    async fn spawn_children(
        &self,
        parent: Uuid,
        children: usize,
        sent_us: i64,
    ) -> anyhow::Result<()> {
        let ids: Vec<Uuid> = (0..children).map(|_| Uuid::now_v7()).collect();
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO baseline_parents (id, remaining, sent_us) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(parent)
        .bind(children as i32)
        .bind(sent_us)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(());
        }
        sqlx::query("INSERT INTO baseline_children (id, parent_id) SELECT unnest($1::uuid[]), $2")
            .bind(&ids)
            .bind(parent)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let published = futures::future::join_all(ids.iter().map(|child| {
            let id = Uuid::now_v7().to_string();
            let body = serde_json::to_vec(&json!({
                "type": "child", "id": id, "child": child.to_string(),
                "parent": parent.to_string(), "sent_us": chrono::Utc::now().timestamp_micros(),
            }))
            .unwrap_or_default();
            async move {
                self.bus
                    .publish("", &self.queue, &body, event_properties(&id))
                    .await
            }
        }))
        .await;
        for p in published {
            p?;
        }
        Ok(())
    }

    /// A child's one step, and the count-down on its parent in the same transaction.
    async fn child_step(
        &self,
        child: Uuid,
        parent: Uuid,
        event: Uuid,
        sent_us: i64,
    ) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        let steps: Option<i32> =
            sqlx::query_scalar("SELECT steps FROM baseline_children WHERE id = $1 FOR UPDATE")
                .bind(child)
                .fetch_optional(&mut *tx)
                .await?;
        match steps {
            None => bail!("child {child} does not exist"),
            Some(0) => {}
            Some(_) => {
                tx.rollback().await?;
                return Ok(());
            }
        }
        sqlx::query("UPDATE baseline_children SET steps = steps + 1 WHERE id = $1")
            .bind(child)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO baseline_history (event_id, counter_id, sent_us) VALUES ($1, $2, $3)",
        )
        .bind(event)
        .bind(child)
        .bind(sent_us)
        .execute(&mut *tx)
        .await?;
        let remaining: i32 = sqlx::query_scalar(
            "UPDATE baseline_parents SET remaining = remaining - 1 WHERE id = $1 RETURNING remaining",
        )
        .bind(parent)
        .fetch_one(&mut *tx)
        .await?;
        if remaining == 0 {
            sqlx::query("UPDATE baseline_parents SET done_at = clock_timestamp() WHERE id = $1")
                .bind(parent)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Claims up to `batch` due timers, publishes one message each, deletes them. Returns how
    /// many fired.
    async fn fire_due(&self, batch: i64) -> anyhow::Result<usize> {
        let now = chrono::Utc::now();
        let mut tx = self.pool.begin().await?;
        let due: Vec<(Uuid, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
            "SELECT id, due_at FROM baseline_timers WHERE due_at <= $1
              ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        if due.is_empty() {
            return Ok(0);
        }
        let published = futures::future::join_all(due.iter().map(|(timer, due_at)| {
            let id = Uuid::now_v7().to_string();
            let body = serde_json::to_vec(&json!({
                "type": "fired", "id": id, "timer": timer.to_string(),
                "due_us": due_at.timestamp_micros(), "fired_us": now.timestamp_micros(),
            }))
            .unwrap_or_default();
            async move {
                self.bus
                    .publish("", &self.queue, &body, event_properties(&id))
                    .await
            }
        }))
        .await;
        for p in published {
            p?;
        }
        let ids: Vec<Uuid> = due.iter().map(|(id, _)| *id).collect();
        sqlx::query("DELETE FROM baseline_timers WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(due.len())
    }
}
