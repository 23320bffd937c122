//! The load generator: runs workloads against a fresh namespace and database on the real
//! services, with worker processes it starts itself, and prints one JSON line per result.
//!
//! - W1: N single-step `demo.increment` events spread over 1,000 counters.
//! - W1flow, W1remote: W1 on the counter defined as a flow file (`bench.flow_counter`), and on
//!   the counter decided by a remote decider this process serves over HTTP
//!   (`bench.remote_counter`, signed requests): the cost of a data-defined kind, and of the
//!   decider's round trip, next to the Rust `demo.counter`.
//! - W2: 1,000 `demo.fanout` parents × 10 `demo.noop` children (one persisted step each); each
//!   child's end is an event to its parent. W2s: the same with the group's reports `settled`
//!   (the children count themselves into the group; the parent hears once).
//! - W3: 10,000 timers due uniformly over 30 s: firing lateness, missed and doubled firings.
//! - W4: 2,000 increments on one counter; the count must be exact.
//! - feed: the owner feed with 1,000,000 commands of 100,000 owners in the table (`--feed-commands`,
//!   one owner per 10 commands), under 50 concurrent requests (run with `--workers 0 --schedulers 0`).
//! - feedw1: the same seed, then W1 with the run's workers while `--feed-clients` (10) clients
//!   read the feed of random owners through a gateway, unpaced (each sends its next request when
//!   the last one answers): the feed's p50/p99 and W1's events/s in one line. With
//!   `--event-rate`, W1 is published at that pace instead of all at once: the feed's latency
//!   while the fleet carries a given load. Each client's first answered request (its connection
//!   set-up) is not timed; the clients run on their own runtime thread.
//! - b1–b4: the hand-written baseline (`baseline.rs`) in the shapes of W1–W4: no cmdflow
//!   engine, just consume, a Redis `SET NX PX` lock, one PostgreSQL transaction, commit, ack.
//!   When a run has a W workload and its baseline, it prints `{"ratio": "w1/b1", "value": …}`
//!   (throughput ratio; for W3/B3 the ratio of p99 lateness). Run them with
//!   `--workers 0 --schedulers 0` so no idle fleet shares the machine.
//! - replay: replay 100,000 dead letters at full speed, then 10,000 with a rate of 1,000/s
//!   (run with `--workers 0 --schedulers 0`; the replayed events wait in the work queue).
//! - archive: archive 1,000,000 ended commands with 2 history rows each, while 20 clients read
//!   the feed (run with `--workers 0 --schedulers 0`).
//! - timers1m: 1,000,000 pending timers: the claim's plan, and the scheduler's memory while it
//!   fires 20,000 due ones among them (run with `--workers 0`; nothing consumes the firings).
//!
//! Events are published straight to RabbitMQ with confirms, as an upstream service would, each
//! carrying its send time; latency is from publish to the history row written in the event's
//! transaction. Build in release mode: `cargo build --release -p cmdflow -p cmdflow-bench`.
//!
//! `scripts/bench.sh` runs the matrix (the baseline, W1–W4 with 1, 2 and 4 worker processes,
//! feedw1), each in a fresh run, and prints a Markdown table with `--table`.

#![allow(clippy::unwrap_used)]

mod baseline;
mod remote;
mod report;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use cmdflow_shared::bus::Bus;
use cmdflow_shared::decision::Reports;
use cmdflow_shared::{Config, store};
use cmdflow_workers::Worker;
use cmdflow_workers::scheduler::Scheduler;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Parser)]
// A later `--events` (say) overrides an earlier one: `bench.sh` passes the sizes first.
#[command(
    about = "cmdflow load generator: prints one JSON line per workload",
    args_override_self = true
)]
struct Args {
    /// Workloads to run, comma-separated: w1, w1flow, w1remote, w2, w2s, w3, w4, b1, b2, b3,
    /// b4, feed, feedw1, replay, archive, timers1m.
    #[arg(long, default_value = "w1,w2,w3,w4")]
    workloads: String,
    /// W1: number of increments.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// W1: number of counters the increments are spread over.
    #[arg(long, default_value_t = 1_000)]
    counters: usize,
    /// W2: parents.
    #[arg(long, default_value_t = 1_000)]
    parents: usize,
    /// W2: children per parent.
    #[arg(long, default_value_t = 10)]
    children: usize,
    /// W3: timers.
    #[arg(long, default_value_t = 10_000)]
    timers: usize,
    /// W3: the span over which the timers are due, in seconds.
    #[arg(long, default_value_t = 30)]
    timer_span_s: u64,
    /// W3: scheduler replicas.
    #[arg(long, default_value_t = 1)]
    schedulers: usize,
    /// W4: increments on the one counter.
    #[arg(long, default_value_t = 2_000)]
    hot_events: usize,
    /// feed, feedw1: commands seeded (one owner per 10 of them).
    #[arg(long, default_value_t = 1_000_000)]
    feed_commands: usize,
    /// feedw1: concurrent feed clients while W1 runs.
    #[arg(long, default_value_t = 10)]
    feed_clients: u64,
    /// feedw1: feed requests per second across all clients (0: each client sends its next
    /// request as soon as the last one is answered).
    #[arg(long, default_value_t = 0)]
    feed_rate: u64,
    /// W1, feedw1: increments published per second (0: all at once, as fast as the broker
    /// takes them). Paced, W1 measures latency at a given load instead of throughput.
    #[arg(long, default_value_t = 0)]
    event_rate: u64,
    /// Print a Markdown table of the JSON lines in this file (as `scripts/bench.sh` saves them),
    /// with each W workload's ratio to its baseline, and exit without running anything.
    #[arg(long, value_name = "FILE")]
    table: Option<PathBuf>,
    /// Worker processes to start.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Run the workers inside this process instead of starting `cmdflow worker` processes.
    #[arg(long)]
    in_process: bool,
    /// Concurrency of each worker (batches at once); in b1–b4, the consumer tasks.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Prefetch of each worker; in b1–b4, of the baseline's channel.
    #[arg(long, default_value_t = 1024)]
    prefetch: u16,
    /// Most deliveries a worker applies in one transaction (`CMDFLOW_BATCH`; 1 turns group
    /// commit off).
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Turn Redlock off (the guarded update still fences); in b1–b4, the Redis lock.
    #[arg(long)]
    no_lock: bool,
    /// Partition queues of the run's namespace (`CMDFLOW_PARTITIONS`).
    #[arg(long, default_value_t = 16)]
    partitions: u32,
    /// Publish without the partition header, as a service that publishes plain CloudEvents
    /// straight to the exchange does: a worker forwards each to its partition (one more hop).
    #[arg(long)]
    unkeyed: bool,
    /// Server for the per-run database.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pg_server: String,
    /// Keep the database and queues afterwards.
    #[arg(long)]
    keep: bool,
}

struct Run {
    args: Args,
    config: Config,
    pool: PgPool,
    bus: std::sync::Arc<Bus>,
    database: String,
    /// The flow and the remote decider of `w1flow` and `w1remote`, in a directory of the run.
    counters: remote::Files,
    dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cmdflow_shared::telemetry::init_with_default("pretty", "warn,lapin=error", "cmdflow-loadgen")?;
    cmdflow_shared::tls::install_provider();
    let args = Args::parse();
    if let Some(file) = &args.table {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
        print!("{}", report::markdown(&text));
        return Ok(());
    }
    let run = Run::prepare(args).await?;
    let shutdown = CancellationToken::new();
    let mut children = run.start_workers(&shutdown).await?;
    run.partitions_shared().await?;

    let mut failed = None;
    let mut results = Vec::new();
    for workload in run.args.workloads.split(',').map(str::trim) {
        let result = match workload {
            "w1" => run.w1("W1", "demo.counter").await,
            "w1flow" => run.w1("W1flow", remote::FLOW_KIND).await,
            "w1remote" => run.w1("W1remote", remote::REMOTE_KIND).await,
            "w2" => run.w2(Reports::Each).await,
            "w2s" => run.w2(Reports::Settled).await,
            "w3" => run.w3().await,
            "w4" => run.w4().await,
            "b1" => run.b1().await,
            "b2" => run.b2().await,
            "b3" => run.b3().await,
            "b4" => run.b4().await,
            "feedw1" => run.feed_w1().await,
            "timers1m" => run.timers_1m().await,
            "feed" => run.feed().await,
            "replay" => run.replay().await,
            "archive" => run.archive().await,
            other => Err(anyhow::anyhow!("unknown workload {other}")),
        };
        match result {
            Ok(line) => {
                println!("{line}");
                results.push(line);
            }
            Err(e) => {
                eprintln!("loadgen: {workload}: {e:#}");
                failed = Some(e);
                break;
            }
        }
    }
    for line in report::ratios(&results) {
        println!("{line}");
    }
    shutdown.cancel();
    for child in &mut children {
        drop(child.start_kill());
        drop(child.wait().await);
    }
    run.cleanup().await;
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl Run {
    async fn prepare(args: Args) -> anyhow::Result<Run> {
        let suffix = Uuid::new_v4().simple().to_string()[..10].to_owned();
        let database = format!("cmdflow_load_{suffix}");
        let admin = format!("{}/postgres", args.pg_server);
        cmdflow_tests::create_database(&admin, &database)
            .await
            .context("connect to PostgreSQL")?;

        let config = Config {
            database_url: format!("{}/{database}", args.pg_server),
            namespace: format!("load{suffix}"),
            concurrency: args.concurrency,
            prefetch: args.prefetch,
            batch: args.batch,
            lock_enabled: !args.no_lock,
            partitions: args.partitions,
            database_pool_size: (args.concurrency as u32).clamp(4, 32),
            lock_wait: Duration::from_millis(50),
            ..Config::default()
        };
        config.validate()?;
        let pool = store::connect(&config.database_url, 8).await?;
        store::migrate(&pool).await?;
        let bus = Bus::for_config(&config, "cmdflow-loadgen").await?;
        bus.declare_topology().await?;
        // It publishes starts and timers' events straight to the broker, as the engine does.
        bus.set_engine_mark(store::engine_mark(&pool).await?);
        let dir = std::env::temp_dir().join(format!("cmdflow-loadgen-{suffix}"));
        let counters = remote::prepare(&dir).await?;
        Ok(Run {
            args,
            config,
            pool,
            bus,
            database,
            counters,
            dir,
        })
    }

    async fn start_workers(&self, shutdown: &CancellationToken) -> anyhow::Result<Vec<Child>> {
        if self.args.in_process {
            for _ in 0..self.args.workers {
                let worker = Worker::build(&self.config, cmdflow_tests::registry()).await?;
                tokio::spawn(worker.run_until_stopped(shutdown.clone()));
            }
            for _ in 0..self.args.schedulers {
                let scheduler = Scheduler::new(self.pool.clone(), self.bus.clone(), &self.config);
                tokio::spawn(scheduler.run_until_stopped(shutdown.clone()));
            }
            return Ok(Vec::new());
        }
        let bin = cmdflow_binary()?;
        let mut children = Vec::new();
        let roles = std::iter::repeat_n("worker", self.args.workers)
            .chain(std::iter::repeat_n("scheduler", self.args.schedulers));
        for role in roles {
            let child = Command::new(&bin)
                .arg(role)
                .env("CMDFLOW_EXAMPLES", "true")
                .env("CMDFLOW_DATABASE_URL", &self.config.database_url)
                .env("CMDFLOW_AMQP_URL", &self.config.amqp_url)
                .env("CMDFLOW_REDIS_URLS", &self.config.redis_urls)
                .env("CMDFLOW_NAMESPACE", &self.config.namespace)
                .env("CMDFLOW_CONCURRENCY", self.config.concurrency.to_string())
                .env("CMDFLOW_PREFETCH", self.config.prefetch.to_string())
                .env("CMDFLOW_BATCH", self.config.batch.to_string())
                .env("CMDFLOW_LOCK_ENABLED", self.config.lock_enabled.to_string())
                .env(
                    "CMDFLOW_DATABASE_POOL_SIZE",
                    self.config.database_pool_size.to_string(),
                )
                .env("CMDFLOW_METRICS_ADDR", "127.0.0.1:0")
                .env("CMDFLOW_LOCK_WAIT", "50ms")
                .env("CMDFLOW_PARTITIONS", self.config.partitions.to_string())
                .env("CMDFLOW_FLOWS_DIR", &self.counters.flows_dir)
                .env("CMDFLOW_DECIDERS_FILE", &self.counters.deciders_file)
                .env(remote::SECRET_ENV, &self.counters.secret)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("start {}", bin.display()))?;
            children.push(child);
        }
        Ok(children)
    }

    /// Waits until the workers share every partition (one owner per worker), so that a run
    /// measures the fleet at work, not its start-up hand-over; says how long that took.
    async fn partitions_shared(&self) -> anyhow::Result<()> {
        if self.args.workers == 0 || self.args.in_process {
            return Ok(());
        }
        let began = Instant::now();
        let n = self.config.partitions as usize;
        loop {
            let holders = store::partitions::holders(&self.pool, &self.config.namespace).await?;
            let owners: std::collections::BTreeSet<&str> =
                holders.iter().filter_map(|(_, o)| o.as_deref()).collect();
            if holders.len() == n
                && holders.iter().all(|(_, o)| o.is_some())
                && owners.len() == self.args.workers
            {
                // Their consumers start on the claims' next tick.
                tokio::time::sleep(Duration::from_secs(1)).await;
                eprintln!(
                    "loadgen: {} workers share {n} partitions after {} ms",
                    self.args.workers,
                    began.elapsed().as_millis()
                );
                return Ok(());
            }
            if began.elapsed() > Duration::from_secs(60) {
                bail!("the workers did not share the partitions within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn cleanup(self) {
        drop(std::fs::remove_dir_all(&self.dir));
        if self.args.keep {
            eprintln!(
                "kept database {} and namespace {}",
                self.database, self.config.namespace
            );
            return;
        }
        drop(self.bus.delete_topology().await);
        baseline::delete_queues(&self.bus, &self.config.namespace).await;
        self.pool.close().await;
        cmdflow_tests::drop_database(&format!("{}/postgres", self.args.pg_server), &self.database)
            .await;
    }

    /// Starts `n` counters of `kind` and waits until all are running.
    async fn start_counters(&self, kind: &str, n: usize) -> anyhow::Result<Vec<Uuid>> {
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
        let events: Vec<Value> = ids
            .iter()
            .map(|id| {
                json!({
                    "specversion": "1.0", "id": Uuid::now_v7().to_string(), "source": "loadgen",
                    "type": "command.start", "commandid": id.to_string(),
                    "data": {"kind": kind, "owner": "system:loadgen", "data": {}},
                })
            })
            .collect();
        self.publish_all(&events).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let running: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM commands WHERE id = ANY($1) AND state = 'running'",
            )
            .bind(&ids)
            .fetch_one(&self.pool)
            .await?;
            if running as usize == n {
                return Ok(ids);
            }
            if Instant::now() > deadline {
                bail!("only {running} of {n} counters started within 120s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn publish_all(&self, events: &[Value]) -> anyhow::Result<()> {
        for chunk in events.chunks(500) {
            let results = futures::future::join_all(chunk.iter().map(|event| {
                let body = serde_json::to_vec(event).unwrap();
                let ty = event["type"].as_str().unwrap().to_owned();
                let id = event["id"].as_str().unwrap().to_owned();
                // Starts go out as the gateway sends them: with the engine's mark.
                let mut headers = lapin::types::FieldTable::default();
                if cmdflow_shared::contract::types::is_reserved(&ty) {
                    self.bus.mark_engine(&mut headers);
                }
                async move {
                    if self.args.unkeyed {
                        let props =
                            cmdflow_shared::bus::event_properties(&id).with_headers(headers);
                        let exchange = self.bus.topology().events_exchange();
                        self.bus.publish(&exchange, &ty, &body, props).await
                    } else {
                        let key = cmdflow_shared::bus::route_key_of(&body);
                        self.bus.publish_event(&ty, &id, &key, &body, headers).await
                    }
                }
            }))
            .await;
            for r in results {
                r?;
            }
        }
        Ok(())
    }

    fn increments(&self, targets: &[Uuid], n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| {
                json!({
                    "specversion": "1.0", "id": Uuid::now_v7().to_string(), "source": "loadgen",
                    "type": "demo.increment", "commandid": targets[i % targets.len()].to_string(),
                    "data": {"by": 1},
                })
            })
            .collect()
    }

    /// Publishes `events` (stamping each with its send time), waits until the counters of
    /// `targets` add up to `expected`, and reports throughput and latency.
    async fn measure(
        &self,
        name: &str,
        targets: &[Uuid],
        mut events: Vec<Value>,
    ) -> anyhow::Result<Value> {
        let expected = events.len() as i64;
        let rate = self.args.event_rate;
        // Paced: a tick every 10 ms (or every event, below 100/s), each publishing its share.
        let chunk = if rate == 0 {
            500
        } else {
            (rate / 100).max(1) as usize
        };
        let started = Instant::now();
        let publisher = async {
            let mut pace = (rate > 0).then(|| {
                tokio::time::interval(Duration::from_secs_f64(chunk as f64 / rate as f64))
            });
            for chunk in events.chunks_mut(chunk) {
                if let Some(pace) = &mut pace {
                    pace.tick().await;
                }
                let now_us = chrono::Utc::now().timestamp_micros();
                for e in chunk.iter_mut() {
                    e["data"]["sent_us"] = json!(now_us);
                }
                self.publish_all(chunk).await?;
            }
            anyhow::Ok(started.elapsed())
        };
        let drain = self.sum_reaches(
            name,
            "SELECT sum((data->>'count')::bigint)::bigint FROM commands WHERE id = ANY($1)",
            targets,
            expected,
        );
        let (published_in, total) = tokio::try_join!(publisher, drain)?;
        let elapsed = started.elapsed();
        if total != expected {
            bail!(
                "{name}: counters add up to {total}, expected {expected} (lost or doubled events)"
            );
        }
        let mut latencies: Vec<f64> = sqlx::query_scalar(
            "SELECT (extract(epoch FROM at) * 1e6 - (detail->'data'->>'sent_us')::float8) / 1000.0
               FROM command_events
              WHERE command_id = ANY($1) AND entry = 'received' AND event_type = 'demo.increment'",
        )
        .bind(targets)
        .fetch_all(&self.pool)
        .await?;
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| percentile(&latencies, p);
        Ok(json!({
            "workload": name,
            "events": expected,
            "commands": targets.len(),
            "workers": self.args.workers,
            "in_process": self.args.in_process,
            "concurrency": self.args.concurrency,
            "prefetch": self.args.prefetch,
            "batch": self.args.batch,
            "lock": !self.args.no_lock,
            "event_rate": (rate > 0).then_some(rate),
            "published_s": (published_in.as_secs_f64() * 1000.0).round() / 1000.0,
            "elapsed_s": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "events_per_s": (expected as f64 / elapsed.as_secs_f64()).round(),
            "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
            "exact": true,
        }))
    }

    /// W1 on counters of `kind`, reported as `name`.
    async fn w1(&self, name: &str, kind: &str) -> anyhow::Result<Value> {
        if self.args.in_process && kind != "demo.counter" {
            bail!("{name} needs worker processes (drop --in-process)");
        }
        let counters = self.start_counters(kind, self.args.counters).await?;
        let events = self.increments(&counters, self.args.events);
        let mut line = self.measure(name, &counters, events).await?;
        line["kind"] = json!(kind);
        Ok(line)
    }

    async fn w2(&self, reports: Reports) -> anyhow::Result<Value> {
        let name = match reports {
            Reports::Each => "W2",
            Reports::Settled => "W2s",
        };
        let parents: Vec<Uuid> = (0..self.args.parents).map(|_| Uuid::now_v7()).collect();
        let started = Instant::now();
        let mut events: Vec<Value> = parents
            .iter()
            .map(|id| {
                json!({
                    "specversion": "1.0", "id": Uuid::now_v7().to_string(), "source": "loadgen",
                    "type": "command.start", "commandid": id.to_string(),
                    "data": {"kind": "demo.fanout", "owner": "system:loadgen",
                             "data": {"children": self.args.children, "reports": reports.name()}},
                })
            })
            .collect();
        for chunk in events.chunks_mut(500) {
            let now_us = chrono::Utc::now().timestamp_micros();
            for e in chunk.iter_mut() {
                e["data"]["data"]["sent_us"] = json!(now_us);
            }
            self.publish_all(chunk).await?;
        }
        poll_until(name, || async {
            let (done, failed): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE state = 'completed'), count(*) FILTER (WHERE state IN ('failed', 'aborted'))
                   FROM commands WHERE id = ANY($1)",
            )
            .bind(&parents)
            .fetch_one(&self.pool)
            .await?;
            if failed > 0 {
                bail!("{name}: {failed} parents failed or were aborted");
            }
            Ok(if done as usize == parents.len() {
                Polled::Done(())
            } else {
                Polled::Waiting(format!("only {done} of {} parents completed", parents.len()))
            })
        })
        .await?;
        let elapsed = started.elapsed();
        let (children, steps): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM commands WHERE root_id = ANY($1) AND parent_id IS NOT NULL AND state = 'completed'),
                    (SELECT count(*) FROM command_events e JOIN commands c ON c.id = e.command_id
                      WHERE c.root_id = ANY($1) AND e.entry = 'received')",
        )
        .bind(&parents)
        .fetch_one(&self.pool)
        .await?;
        let expected_children = (self.args.parents * self.args.children) as i64;
        if children != expected_children {
            bail!("{name}: {children} children completed, expected {expected_children}");
        }
        let mut latencies: Vec<f64> = sqlx::query_scalar(
            "SELECT (extract(epoch FROM ended_at) * 1e6 - (data->>'sent_us')::float8) / 1000.0
               FROM commands WHERE id = ANY($1)",
        )
        .bind(&parents)
        .fetch_all(&self.pool)
        .await?;
        latencies.sort_by(f64::total_cmp);
        let secs = elapsed.as_secs_f64();
        Ok(json!({
            "workload": name,
            "reports": reports.name(),
            "parents": self.args.parents,
            "children_per_parent": self.args.children,
            "workers": self.args.workers,
            "in_process": self.args.in_process,
            "concurrency": self.args.concurrency,
            "prefetch": self.args.prefetch,
            "batch": self.args.batch,
            "lock": !self.args.no_lock,
            "elapsed_s": (secs * 1000.0).round() / 1000.0,
            "parents_per_s": (self.args.parents as f64 / secs * 10.0).round() / 10.0,
            "steps": steps,
            "steps_per_s": (steps as f64 / secs).round(),
            "parent_latency_ms": {"p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99), "max": percentile(&latencies, 1.0)},
            "exact": true,
        }))
    }

    async fn w3(&self) -> anyhow::Result<Value> {
        use futures::StreamExt;
        use lapin::options::{
            BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions,
        };
        // A probe queue sees every `timer.fired` the schedulers publish, to count doubles.
        let probe = format!("{}.w3probe", self.config.namespace);
        let channel = self.bus.channel().await?;
        channel
            .queue_declare(
                probe.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await?;
        channel
            .queue_bind(
                probe.as_str().into(),
                self.bus.topology().events_exchange().as_str().into(),
                "timer.fired".into(),
                QueueBindOptions::default(),
                Default::default(),
            )
            .await?;
        let mut consumer = channel
            .basic_consume(
                probe.as_str().into(),
                "w3probe".into(),
                BasicConsumeOptions::default(),
                Default::default(),
            )
            .await?;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
            String,
            u32,
        >::new()));
        let counter = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Some(Ok(delivery)) = consumer.next().await {
                    if let Ok(e) = serde_json::from_slice::<Value>(&delivery.data) {
                        let id = e["id"].as_str().unwrap_or_default().to_owned();
                        *seen.lock().unwrap().entry(id).or_default() += 1;
                    }
                    drop(delivery.acker.ack(BasicAckOptions::default()).await);
                }
            })
        };

        let n = self.args.timers;
        let span_us = (self.args.timer_span_s * 1_000_000) as i64;
        // Leave time to create the commands (about 1,000 starts/s) before the first timer is due,
        // so the measurement is of firing, not of a start backlog.
        let lead = chrono::Duration::milliseconds(5_000 + n as i64 * 1_000 / 800);
        let t0 = chrono::Utc::now() + lead;
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
        let starts: Vec<Value> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let at = t0 + chrono::Duration::microseconds(span_us * i as i64 / n as i64);
                json!({
                    "specversion": "1.0", "id": Uuid::now_v7().to_string(), "source": "loadgen",
                    "type": "command.start", "commandid": id.to_string(),
                    "data": {"kind": "demo.timer", "owner": "system:loadgen",
                             "data": {"at": at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)}},
                })
            })
            .collect();
        self.publish_all(&starts).await?;
        let all_waiting = async {
            loop {
                let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM timers")
                    .fetch_one(&self.pool)
                    .await?;
                if waiting as usize >= n || chrono::Utc::now() >= t0 {
                    return anyhow::Ok(chrono::Utc::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let ready_at = all_waiting.await?;
        let created_in = (ready_at - (t0 - lead)).num_milliseconds();
        let ready_before_first_due = ready_at < t0;
        let deadline = Instant::now() + Duration::from_secs(self.args.timer_span_s + 120);
        loop {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM commands WHERE id = ANY($1) AND state = 'completed'",
            )
            .bind(&ids)
            .fetch_one(&self.pool)
            .await?;
            if done as usize == n {
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Let stray doubles, if any, reach the probe.
        tokio::time::sleep(Duration::from_secs(2)).await;
        counter.abort();
        drop(channel.close(200, "done".into()).await);
        let rows: Vec<(f64, f64)> = sqlx::query_as(
            "SELECT ((extract(epoch FROM (result->>'fired_at')::timestamptz) - extract(epoch FROM (result->>'due_at')::timestamptz)) * 1000.0)::float8,
                    ((extract(epoch FROM e.at) - extract(epoch FROM (result->>'due_at')::timestamptz)) * 1000.0)::float8
               FROM commands c JOIN command_events e ON e.command_id = c.id AND e.entry = 'received' AND e.event_type = 'timer.fired'
              WHERE c.id = ANY($1) AND c.state = 'completed'",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let applied_twice: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT command_id FROM command_events
               WHERE command_id = ANY($1) AND entry = 'received' AND event_type = 'timer.fired'
               GROUP BY command_id HAVING count(*) > 1) d",
        )
        .bind(&ids)
        .fetch_one(&self.pool)
        .await?;
        let published: Vec<u32> = seen.lock().unwrap().values().copied().collect();
        let doubled_publishes = published.iter().filter(|c| **c > 1).count();
        let fired = rows.len();
        let mut lateness: Vec<f64> = rows.iter().map(|r| r.0).collect();
        let mut applied: Vec<f64> = rows.iter().map(|r| r.1).collect();
        lateness.sort_by(f64::total_cmp);
        applied.sort_by(f64::total_cmp);
        Ok(json!({
            "workload": "W3",
            "timers": n,
            "span_s": self.args.timer_span_s,
            "schedulers": self.args.schedulers,
            "workers": self.args.workers,
            "created_in_ms": created_in,
            "ready_before_first_due": ready_before_first_due,
            "fired": fired,
            "missed": n - fired,
            "doubled_publishes": doubled_publishes,
            "applied_twice": applied_twice,
            "lateness_ms": {"p50": percentile(&lateness, 0.5), "p99": percentile(&lateness, 0.99), "max": percentile(&lateness, 1.0)},
            "due_to_commit_ms": {"p50": percentile(&applied, 0.5), "p99": percentile(&applied, 0.99), "max": percentile(&applied, 1.0)},
        }))
    }

    /// Seeds `--feed-commands` commands of one owner per 10 commands (`member:0..owners`) with
    /// their messages and identities, and analyzes. Returns the owners and how long it took.
    async fn seed_feed(&self) -> anyhow::Result<(u64, Duration)> {
        let commands = self.args.feed_commands.max(1) as i64;
        let owners = (commands / 10).max(1);
        let seeded = Instant::now();
        // 10 commands per owner over the last 30 days: queries, quotes (every third unfinished,
        // with its hint), memberships; a message for every tenth owner; 10% of owners linked.
        sqlx::query(
            "INSERT INTO commands (id, kind, owner, root_id, state, data, result, ui, created_at, updated_at, ended_at)
             SELECT id, kind, owner, id, state::command_state, data, NULL, ui, at, at, CASE WHEN state = 'completed' THEN at END
               FROM (
                 SELECT gen_random_uuid() AS id,
                        (ARRAY['query', 'query', 'query', 'query', 'query', 'quote', 'quote', 'membership', 'query', 'query'])[1 + g % 10] AS kind,
                        'member:' || (g % $1) AS owner,
                        CASE WHEN g % 10 = 5 AND g % 3 = 0 THEN 'running' ELSE 'completed' END AS state,
                        jsonb_build_object('q', 'search ' || g) AS data,
                        CASE WHEN g % 10 = 5 AND g % 3 = 0
                             THEN '{\"code\": \"quote.unfinished\", \"text\": \"Here is that quote you started but never finished\"}'::jsonb END AS ui,
                        now() - (g % 2592000) * interval '1 second' AS at
                   FROM generate_series(1, $2) g
               ) s",
        )
        .bind(owners)
        .bind(commands)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "INSERT INTO messages (id, owner, command_id, trigger_key, template, channel, subject, body, delivery)
             SELECT gen_random_uuid(), 'member:' || g, gen_random_uuid(), 'seed/' || g, 'quote_submitted', 'in_app',
                    'Your quote is on its way', 'Hello', 'in_app'
               FROM generate_series(0, $1 - 1, 10) g",
        )
        .bind(owners)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "INSERT INTO identities (owner, person)
             SELECT 'visitor:c' || g, 'member:' || g FROM generate_series(0, $1 - 1, 10) g
             UNION ALL SELECT 'member:' || g, 'member:' || g FROM generate_series(0, $1 - 1, 10) g",
        )
        .bind(owners)
        .execute(&self.pool)
        .await?;
        sqlx::query("ANALYZE").execute(&self.pool).await?;
        Ok((owners as u64, seeded.elapsed()))
    }

    async fn feed(&self) -> anyhow::Result<Value> {
        let (owners, seeded_in) = self.seed_feed().await?;
        let commands: i64 = sqlx::query_scalar("SELECT count(*) FROM commands")
            .fetch_one(&self.pool)
            .await?;
        let plan: Vec<String> = sqlx::query_scalar(
            "EXPLAIN SELECT id, kind, owner, state, data, result, created_at, ended_at FROM commands
              WHERE owner = ANY('{member:42,visitor:c42}') AND parent_id IS NULL
              ORDER BY created_at DESC, id DESC LIMIT 20",
        )
        .fetch_all(&self.pool)
        .await?;

        let (base, gateway) = self.serve_gateway(&self.config).await?;
        let started = Instant::now();
        let readers = read_feeds(&base, 50, owners, 0)?;
        tokio::time::sleep(Duration::from_secs(20)).await;
        let (all, failed) = readers.finish().await?;
        // The gateway stops after its readers, so no request is cut off.
        gateway.stop().await;
        let secs = started.elapsed().as_secs_f64();
        Ok(json!({
            "workload": "feed",
            "commands": commands,
            "owners": owners,
            "concurrency": 50,
            "seeded_in_s": (seeded_in.as_secs_f64() * 10.0).round() / 10.0,
            "requests": all.len(),
            "failed": failed,
            "requests_per_s": (all.len() as f64 / secs).round(),
            "latency_ms": {"p50": percentile(&all, 0.5), "p99": percentile(&all, 0.99), "max": percentile(&all, 1.0)},
            "history_plan": plan,
        }))
    }

    /// W1 with the run's workers while `--feed-clients` clients read the owner feed, unpaced,
    /// over the seeded commands.
    async fn feed_w1(&self) -> anyhow::Result<Value> {
        if self.args.workers == 0 {
            bail!("feedw1 runs W1: start workers with --workers 1 or more");
        }
        let (owners, seeded_in) = self.seed_feed().await?;
        let commands: i64 = sqlx::query_scalar("SELECT count(*) FROM commands")
            .fetch_one(&self.pool)
            .await?;
        let counters = self
            .start_counters("demo.counter", self.args.counters)
            .await?;
        let events = self.increments(&counters, self.args.events);
        let (base, gateway) = self.serve_gateway(&self.config).await?;
        let clients = self.args.feed_clients;
        let started = Instant::now();
        let readers = read_feeds(&base, clients, owners, self.args.feed_rate)?;
        let w1 = self.measure("W1", &counters, events).await;
        let secs = started.elapsed().as_secs_f64();
        let (lat, failed) = readers.finish().await?;
        // The gateway stops after its readers, so no request is cut off.
        gateway.stop().await;
        let w1 = w1?;
        Ok(json!({
            "workload": "feedw1",
            "workers": self.args.workers,
            "events": w1["events"],
            "concurrency": self.args.concurrency,
            "prefetch": self.args.prefetch,
            "batch": self.args.batch,
            "lock": !self.args.no_lock,
            "feed_commands": commands,
            "owners": owners,
            "feed_clients": clients,
            "feed_paced": self.args.feed_rate > 0,
            "feed_rate": self.args.feed_rate,
            "seeded_in_s": (seeded_in.as_secs_f64() * 10.0).round() / 10.0,
            "requests": lat.len(),
            "failed": failed,
            "requests_per_s": (lat.len() as f64 / secs).round(),
            "feed_latency_ms": {"p50": percentile(&lat, 0.5), "p99": percentile(&lat, 0.99), "max": percentile(&lat, 1.0)},
            "w1": w1,
        }))
    }

    async fn replay(&self) -> anyhow::Result<Value> {
        use cmdflow_shared::store::dead::{self, Filter};
        let seed = |n: i64, signature: &'static str| {
            let pool = self.pool.clone();
            async move {
                sqlx::query(
                    "INSERT INTO dead_letters (dead_id, event_source, event_id, event_type, routing_key, body, reason,
                                               error_class, signature, attempts, first_failed_at, last_failed_at)
                     SELECT gen_random_uuid()::text, 'loadgen', e.id, 'demo.increment', 'demo.increment',
                            convert_to(json_build_object('specversion', '1.0', 'id', e.id, 'source', 'loadgen',
                                       'type', 'demo.increment', 'commandid', gen_random_uuid(), 'data', json_build_object())::text, 'UTF8'),
                            'seeded', 'permanent', $2, 1, now(), now()
                       FROM (SELECT gen_random_uuid()::text AS id FROM generate_series(1, $1)) e",
                )
                .bind(n)
                .bind(signature)
                .execute(&pool)
                .await
            }
        };
        seed(100_000, "permanent:full").await?;
        seed(10_000, "permanent:throttled").await?;
        let mut lines = Vec::new();
        for (signature, rate) in [
            ("permanent:full", None),
            ("permanent:throttled", Some(1000)),
        ] {
            let filter = Filter {
                signature: Some(signature.to_owned()),
                ..Filter::default()
            };
            let total = dead::count(&self.pool, &filter).await?;
            let job = dead::create_job(&self.pool, "loadgen", &filter, rate, total).await?;
            let started = Instant::now();
            let done = cmdflow_workers::replays::run_replay(&self.pool, &self.bus, job.id).await?;
            let secs = started.elapsed().as_secs_f64();
            lines.push(json!({
                "replayed": done.replayed,
                "rate_limit": rate,
                "elapsed_s": (secs * 100.0).round() / 100.0,
                "replayed_per_s": (f64::from(done.replayed) / secs).round(),
            }));
        }
        Ok(json!({ "workload": "replay", "runs": lines }))
    }

    async fn archive(&self) -> anyhow::Result<Value> {
        let n: i64 = 1_000_000;
        let owners: i64 = 100_000;
        sqlx::query(
            "INSERT INTO commands (id, kind, owner, root_id, state, data, result, created_at, updated_at, ended_at)
             SELECT id, 'query', 'member:' || (g % $2), id, 'completed', jsonb_build_object('q', 'search ' || g),
                    '{}'::jsonb, now() - interval '40 days', now() - interval '40 days', now() - interval '40 days'
               FROM (SELECT gen_random_uuid() AS id, g FROM generate_series(1, $1) g) s",
        )
        .bind(n)
        .bind(owners)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "INSERT INTO command_events (command_id, version, entry, event_type, from_state, to_state, at)
             SELECT id, 1, 'received', 'command.start', NULL::command_state, NULL::command_state, created_at FROM commands
             UNION ALL
             SELECT id, 1, 'state_changed', NULL, 'pending'::command_state, 'completed'::command_state, created_at FROM commands",
        )
        .execute(&self.pool)
        .await?;
        // Live commands the feed reads while archival runs.
        sqlx::query(
            "INSERT INTO commands (id, kind, owner, root_id, state, data, created_at, updated_at)
             SELECT id, 'quote', 'member:' || (g % $1), id, 'running', '{}'::jsonb, now(), now()
               FROM (SELECT gen_random_uuid() AS id, g FROM generate_series(1, $1) g) s",
        )
        .bind(owners)
        .execute(&self.pool)
        .await?;
        sqlx::query("ANALYZE").execute(&self.pool).await?;

        let config = Config {
            http_addr: "127.0.0.1:0".to_owned(),
            archive_retention: Duration::from_secs(30 * 24 * 3600),
            ..self.config.clone()
        };
        let (base, gateway) = self.serve_gateway(&config).await?;
        let readers = read_feeds(&base, 20, owners as u64, 0)?;
        let retention = config.retention()?;
        let started = Instant::now();
        let moved =
            cmdflow_workers::archiver::run_all(&self.pool, &retention, 1000, |_| {}).await?;
        let secs = started.elapsed().as_secs_f64();
        let (lat, failed) = readers.finish().await?;
        // The gateway stops after its readers, so no request is cut off.
        gateway.stop().await;
        Ok(json!({
            "workload": "archive",
            "trees": moved.trees,
            "rows_moved": moved.rows(),
            "elapsed_s": (secs * 10.0).round() / 10.0,
            "rows_per_s": (moved.rows() as f64 / secs).round(),
            "feed_during_archival": {
                "clients": 20,
                "requests": lat.len(),
                "failed": failed,
                "p50_ms": percentile(&lat, 0.5),
                "p99_ms": percentile(&lat, 0.99),
                "max_ms": percentile(&lat, 1.0),
            },
        }))
    }

    /// The gateway the feed readers use: a `cmdflow gateway` process, as in production, so that
    /// its latency is not the load generator's (which publishes the load on its own runtime).
    /// With `--in-process`, one inside this process. Its pool holds 16 connections.
    async fn serve_gateway(&self, config: &Config) -> anyhow::Result<(String, Gateway)> {
        if !self.args.in_process {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let base = format!("http://127.0.0.1:{port}");
            let child = Command::new(cmdflow_binary()?)
                .arg("gateway")
                .env("CMDFLOW_DATABASE_URL", &config.database_url)
                .env("CMDFLOW_AMQP_URL", &config.amqp_url)
                .env("CMDFLOW_REDIS_URLS", &config.redis_urls)
                .env("CMDFLOW_NAMESPACE", &config.namespace)
                .env("CMDFLOW_HTTP_ADDR", format!("127.0.0.1:{port}"))
                .env("CMDFLOW_DATABASE_POOL_SIZE", "16")
                // The feed clients read with the test key; they are not to be rate limited.
                .env("CMDFLOW_DEV_KEY", cmdflow_tests::TEST_KEY)
                .env("CMDFLOW_RATE_LIMIT_PER_SECOND", "0")
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("start the gateway")?;
            let client = cmdflow_tests::http();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let ready = client.get(format!("{base}/readyz")).send().await;
                if ready.is_ok_and(|r| r.status().is_success()) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the gateway at {base} was not ready within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            return Ok((base, Gateway::Process(child)));
        }
        let config = Config {
            http_addr: "127.0.0.1:0".to_owned(),
            dev_key: Some(cmdflow_shared::config::Secret::new(cmdflow_tests::TEST_KEY)),
            rate_limit_per_second: 0,
            ..config.clone()
        };
        let pool = store::connect(&config.database_url, 16).await?;
        let app = cmdflow_gateway::Application::build_with(&config, pool, self.bus.clone()).await?;
        let base = format!("http://{}", app.local_addr());
        let stop = CancellationToken::new();
        tokio::spawn(app.run_until_stopped(stop.clone()));
        Ok((base, Gateway::InProcess(stop)))
    }

    async fn timers_1m(&self) -> anyhow::Result<Value> {
        sqlx::query(
            "INSERT INTO timers (command_id, name, kind, due_at)
             SELECT gen_random_uuid(), 'pending', 'at', now() + interval '1 day' + g * interval '1 ms'
               FROM generate_series(1, 1000000) g",
        )
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "INSERT INTO timers (command_id, name, kind, due_at)
             SELECT gen_random_uuid(), 'due', 'at', now() + interval '2 seconds' + g * interval '1 ms'
               FROM generate_series(1, 20000) g",
        )
        .execute(&self.pool)
        .await?;
        sqlx::query("ANALYZE timers").execute(&self.pool).await?;
        let plan = cmdflow_shared::store::time::explain_claim(&self.pool).await?;
        let rss = || -> u64 {
            std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
                })
                .unwrap_or(0)
        };
        let before = rss();
        let shutdown = CancellationToken::new();
        let scheduler = Scheduler::new(self.pool.clone(), self.bus.clone(), &self.config);
        let task = tokio::spawn(scheduler.run_until_stopped(shutdown.clone()));
        let mut samples = Vec::new();
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            samples.push(rss());
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM timers WHERE name = 'due'")
                .fetch_one(&self.pool)
                .await?;
            if left == 0 || started.elapsed() > Duration::from_secs(120) {
                break;
            }
        }
        let fired_in = started.elapsed();
        shutdown.cancel();
        drop(task.await);
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM timers")
            .fetch_one(&self.pool)
            .await?;
        Ok(json!({
            "workload": "timers1m",
            "pending_timers": pending,
            "due_fired": 20000,
            "fired_in_s": (fired_in.as_secs_f64() * 10.0).round() / 10.0,
            "claim_plan": plan,
            "scheduler_rss_kb": {"before": before, "min": samples.iter().min(), "max": samples.iter().max(), "samples": samples},
        }))
    }

    async fn w4(&self) -> anyhow::Result<Value> {
        let counter = self.start_counters("demo.counter", 1).await?;
        let events = self.increments(&counter, self.args.hot_events);
        self.measure("W4", &counter, events).await
    }
}

/// A gateway serving the feed readers.
enum Gateway {
    Process(Child),
    InProcess(CancellationToken),
}

impl Gateway {
    async fn stop(self) {
        match self {
            Gateway::Process(mut child) => drop(child.kill().await),
            Gateway::InProcess(stop) => stop.cancel(),
        }
    }
}

/// Feed clients at work; [`FeedReaders::finish`] stops them.
struct FeedReaders {
    /// Each client's latencies of its successful requests (ms), and how many failed.
    clients: Vec<tokio::task::JoinHandle<(Vec<f64>, u64)>>,
    stop: CancellationToken,
    /// The clients' own runtime (one thread): a UI does not share its threads with the process
    /// that publishes the load, so neither do the clients that stand in for it.
    runtime: tokio::runtime::Runtime,
}

impl FeedReaders {
    /// Stops the clients: every latency, sorted, and how many requests failed.
    async fn finish(self) -> anyhow::Result<(Vec<f64>, u64)> {
        self.stop.cancel();
        let mut all = Vec::new();
        let mut failed = 0;
        for client in self.clients {
            let (lat, errors) = client.await?;
            all.extend(lat);
            failed += errors;
        }
        self.runtime.shutdown_background();
        all.sort_by(f64::total_cmp);
        Ok((all, failed))
    }
}

/// Clients that read the feed of random owners `member:0..owners`: `rate` requests per second
/// across them, or as fast as answers come when 0.
fn read_feeds(base: &str, clients: u64, owners: u64, rate: u64) -> anyhow::Result<FeedReaders> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("feed-readers")
        .enable_all()
        .build()
        .context("start the feed readers' runtime")?;
    let client = cmdflow_tests::http();
    let stop = CancellationToken::new();
    let every = (rate > 0).then(|| Duration::from_secs_f64(clients as f64 / rate as f64));
    let readers = (0..clients)
        .map(|w| {
            let (client, base, stop) = (client.clone(), base.to_owned(), stop.clone());
            runtime.spawn(async move {
                let mut lat = Vec::new();
                let mut failed = 0;
                let mut i = w;
                let mut pace = every.map(|every| {
                    let mut t = tokio::time::interval(every);
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    t
                });
                // The first answered request sets up this client's connection, and the
                // gateway's pool connection behind it: a UI talks to a warm gateway, so it is
                // not timed.
                let mut warming = true;
                while !stop.is_cancelled() {
                    if let Some(pace) = &mut pace {
                        tokio::select! {
                            () = stop.cancelled() => break,
                            _ = pace.tick() => {}
                        }
                    }
                    i = i
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let url = format!("{base}/v1/owners/member:{}/feed", (i >> 33) % owners);
                    let t = Instant::now();
                    let why = match client.get(&url).send().await {
                        Ok(r) if r.status().is_success() => {
                            if !std::mem::take(&mut warming) {
                                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                            }
                            continue;
                        }
                        Ok(r) => format!(
                            "HTTP {}: {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        ),
                        Err(e) => e.to_string(),
                    };
                    failed += 1;
                    // A failure is a finding: say what it was (the first few per client).
                    if failed <= 3 {
                        eprintln!("loadgen: a feed request failed: {url}: {why}");
                    }
                }
                (lat, failed)
            })
        })
        .collect();
    Ok(FeedReaders {
        clients: readers,
        stop,
        runtime,
    })
}

/// The `p` quantile of sorted values, rounded to 0.01.
/// What a poll found: the result, or how far the work has come (for the error if it never ends).
enum Polled<T> {
    Done(T),
    Waiting(String),
}

/// Checks every 100 ms until `check` says done; after 900 s the error is `{what}: {progress}
/// within 900s`, with the progress it last reported.
impl Run {
    /// Polls `sql` (a sum over the counters `$1`) until it reaches `expected`; returns the sum.
    async fn sum_reaches(
        &self,
        name: &str,
        sql: &'static str,
        ids: &[Uuid],
        expected: i64,
    ) -> anyhow::Result<i64> {
        poll_until(name, || async {
            let total: Option<i64> = sqlx::query_scalar(sql)
                .bind(ids)
                .fetch_one(&self.pool)
                .await?;
            let total = total.unwrap_or(0);
            Ok(if total >= expected {
                Polled::Done(total)
            } else {
                Polled::Waiting(format!("only {total} of {expected} applied"))
            })
        })
        .await
    }
}

async fn poll_until<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Polled<T>>>,
{
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        match check().await? {
            Polled::Done(done) => return Ok(done),
            Polled::Waiting(progress) if Instant::now() > deadline => {
                bail!("{what}: {progress} within 900s")
            }
            Polled::Waiting(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    (sorted[i] * 100.0).round() / 100.0
}

/// `cmdflow` from the same target directory as this binary.
fn cmdflow_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("cmdflow");
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p cmdflow`, or pass --in-process",
            bin.display()
        );
    }
    Ok(bin)
}
