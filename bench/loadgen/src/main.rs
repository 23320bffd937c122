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

mod archive;
mod baseline;
mod counters;
mod fanout;
mod feed;
mod remote;
mod replay;
mod report;
mod timers;

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
    /// W3: timers already pending (due in a day) before the measured ones are set: the cost of
    /// a large timers table.
    #[arg(long, default_value_t = 0)]
    pending_timers: usize,
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
    #[arg(long, default_value_t = cmdflow_shared::bus::DEFAULT_PARTITIONS)]
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
