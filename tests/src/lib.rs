//! Test harness: each test gets its own PostgreSQL database, RabbitMQ namespace and lock-key
//! prefix ([`TestEnv`]), on the real local services, and runs the gateway and workers
//! in-process on port 0, or as `cmdflow` processes ([`fleet`]) on the shared servers or
//! private ones a fault test stops. A world is cleaned up when dropped, even by a failed test.

pub mod fleet;
pub mod proxy;
pub mod python;
pub mod smtp;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cmdflow_gateway::Application;
use cmdflow_shared::bus::Bus;
use cmdflow_shared::{CommandState, Config, store};
use cmdflow_workers::scheduler::Scheduler;
use cmdflow_workers::{Registry, Worker};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The server that hosts the per-test databases.
pub fn admin_url() -> String {
    std::env::var("CMDFLOW_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The shared local services, as every test reaches them: the PostgreSQL server of
/// [`admin_url`] (`postgres://user@host:port`), `CMDFLOW_TEST_AMQP_URL` and
/// `CMDFLOW_TEST_REDIS_URLS` (default: cmdflow's defaults).
pub struct Servers {
    pub postgres: String,
    pub amqp: String,
    pub redis: String,
}

pub fn shared_servers() -> Servers {
    let admin = admin_url();
    let defaults = Config::default();
    Servers {
        postgres: admin
            .rsplit_once('/')
            .map_or_else(|| admin.clone(), |(s, _)| s.to_owned()),
        amqp: std::env::var("CMDFLOW_TEST_AMQP_URL").unwrap_or(defaults.amqp_url),
        redis: std::env::var("CMDFLOW_TEST_REDIS_URLS").unwrap_or(defaults.redis_urls),
    }
}

/// Creates database `name` on the server of `admin` (a URL to an existing database).
pub async fn create_database(admin: &str, name: &str) -> Result<(), sqlx::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(admin)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(())
}

/// Drops, once per test process, the databases of test runs that ended more than an hour ago
/// without cleaning up (a failed test stops before its clean-up). Their names carry their
/// creation time.
async fn sweep_stale_databases() {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let Ok(pool) = PgPoolOptions::new()
                .max_connections(1)
                .connect(&admin_url())
                .await
            else {
                return;
            };
            let names: Vec<String> = sqlx::query_scalar(
                "SELECT datname FROM pg_database WHERE datname LIKE 'cmdflow\\_t\\_%'",
            )
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
            pool.close().await;
            let cutoff = chrono::Utc::now().timestamp() - 3600;
            let mut stale = Vec::new();
            for name in names {
                let created = name.split('_').nth(2).and_then(|t| t.parse::<i64>().ok());
                // Names without a time are from before this scheme: stale too.
                if created.is_none_or(|t| t < cutoff) {
                    drop_database(&admin_url(), &name).await;
                    stale.extend(name.split('_').nth(3).map(str::to_owned));
                }
            }
            sweep_stale_namespaces(&stale).await;
        })
        .await;
}

impl Drop for TestEnv {
    /// A test that failed before its `cleanup` still leaves no queues and no database behind:
    /// a broker full of idle quorum queues slows every later test, and once stopped answering.
    /// The test's runtime is unwinding, so this works on its own thread, connections and
    /// runtime, for at most 30 s.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        for (token, handle) in &self.tasks {
            token.cancel();
            handle.abort();
        }
        let (amqp, namespace, admin, database) = (
            self.config.amqp_url.clone(),
            self.config.namespace.clone(),
            self.admin.clone(),
            self.database.clone(),
        );
        let (done, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(async {
                    if let Ok(bus) = Bus::connect(&amqp, &namespace, "cmdflow-test-drop").await {
                        drop(bus.delete_topology().await);
                        bus.close().await;
                    }
                    drop_database(&admin, &database).await;
                });
            }
            done.send(()).ok();
        });
        wait.recv_timeout(Duration::from_secs(30)).ok();
    }
}

/// Deletes the queues and exchanges of the namespaces of stale test databases (`t{suffix}`
/// and `tf{suffix}`): a test that died left them, and a broker full of idle quorum queues slows
/// every later test. Best effort.
async fn sweep_stale_namespaces(suffixes: &[String]) {
    if suffixes.is_empty() {
        return;
    }
    let amqp = base_config().amqp_url;
    for suffix in suffixes {
        for namespace in [format!("t{suffix}"), format!("tf{suffix}")] {
            if let Ok(bus) = Bus::connect(&amqp, &namespace, "cmdflow-test-sweep").await {
                drop(bus.delete_topology().await);
                bus.close().await;
            }
        }
    }
}

/// Drops database `name`, disconnecting whoever is still on it. Best effort (clean-up).
pub async fn drop_database(admin: &str, name: &str) {
    if let Ok(pool) = PgPoolOptions::new().max_connections(1).connect(admin).await {
        drop(
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&pool)
            .await,
        );
        pool.close().await;
    }
}

/// The kinds every test world runs: cmdflow's examples (the demo and business kinds, the
/// funnels and their templates).
pub fn registry() -> Registry {
    cmdflow_demo::registry().expect("the example kinds install")
}

/// The API key every test gateway accepts with every scope; [`http`] sends it.
pub const TEST_KEY: &str = "cfk_test_4b8f2c1e9d7a6053";

fn base_config() -> Config {
    let mut config = Config::default();
    config.dev_key = Some(cmdflow_shared::config::Secret::new(TEST_KEY));
    // Tests send bursts far above what one caller may send in production.
    config.rate_limit_per_second = 0;
    let servers = shared_servers();
    config.amqp_url = servers.amqp;
    config.redis_urls = servers.redis;
    // Short delays, so retry schedules run in a test's time.
    config.retry_delays = "100ms,200ms,300ms".to_owned();
    // An event parked for a start that never comes is a dead letter after this.
    config.start_wait = Duration::from_secs(2);
    config.lock_wait = Duration::from_millis(50);
    config.outbox_sweep_after = Duration::from_secs(1);
    config.database_pool_size = 8;
    config.concurrency = 16;
    config.prefetch = 32;
    config.http_addr = "127.0.0.1:0".to_owned();
    config
}

/// One test's isolated world.
pub struct TestEnv {
    pub config: Config,
    pub pool: PgPool,
    pub bus: Arc<Bus>,
    /// A URL to the `postgres` database of the server that holds this world's database.
    admin: String,
    database: String,
    tasks: Vec<(CancellationToken, JoinHandle<()>)>,
    /// Set by [`TestEnv::cleanup`]; a world dropped without it (a failed assertion) is cleaned
    /// up by its `Drop`.
    cleaned: bool,
}

/// A gateway running in the test.
pub struct RunningGateway {
    pub url: String,
    pub shutdown: CancellationToken,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        Self::with(|_| {}).await
    }

    /// A fresh database (migrated), namespace and lock prefix, with cmdflow's example kinds in
    /// the kind catalogue; `adjust` can change the config.
    pub async fn with(adjust: impl FnOnce(&mut Config)) -> TestEnv {
        let env = Self::bare(adjust).await;
        // The catalogue as this world's workers publish it, so a gateway started before any
        // worker knows the kinds.
        store::kinds::publish(&env.pool, &registry().catalogue())
            .await
            .expect("publish the kind catalogue");
        env
    }

    /// [`TestEnv::with`], with an empty kind catalogue: for a binary that brings its own kinds.
    pub async fn bare(adjust: impl FnOnce(&mut Config)) -> TestEnv {
        cmdflow_shared::tls::install_provider();
        cmdflow_shared::metrics::install();
        Self::create(&shared_servers().postgres, "t", base_config(), adjust).await
    }

    /// A world on the given servers (`postgres://user@host:port`, an AMQP URL, Redis URLs) with
    /// [`fleet::fault_config`]'s settings and the example kinds in the catalogue: for a fleet of
    /// `cmdflow` processes, and for fault tests that stop their own private servers.
    pub async fn on(pg_server: &str, amqp_url: &str, redis_urls: &str) -> TestEnv {
        let config = fleet::fault_config(amqp_url, redis_urls);
        let env = Self::create(pg_server, "tf", config, |_| {}).await;
        store::kinds::publish(&env.pool, &registry().catalogue())
            .await
            .expect("publish the kind catalogue");
        env
    }

    /// A fresh database on `pg_server` (migrated) and a fresh namespace (`{prefix}{suffix}`)
    /// with `config`'s settings, its topology declared. The names carry the creation time, so
    /// the sweep of a later run drops what a dead test left.
    async fn create(
        pg_server: &str,
        prefix: &str,
        mut config: Config,
        adjust: impl FnOnce(&mut Config),
    ) -> TestEnv {
        cmdflow_shared::telemetry::init_for_tests();
        let admin = if pg_server == shared_servers().postgres {
            sweep_stale_databases().await;
            admin_url()
        } else {
            format!("{pg_server}/postgres")
        };
        let suffix = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let database = format!("cmdflow_t_{}_{suffix}", chrono::Utc::now().timestamp());
        create_database(&admin, &database).await.expect(
            "PostgreSQL must be running for the integration tests (see scripts/services.sh)",
        );
        config.database_url = format!("{pg_server}/{database}");
        config.namespace = format!("{prefix}{suffix}");
        adjust(&mut config);
        config.validate().expect("valid test config");

        let pool = store::connect(&config.database_url, config.database_pool_size)
            .await
            .expect("connect to the test database");
        store::migrate(&pool).await.expect("migrate");
        let bus = Bus::for_config(&config, "cmdflow-test")
            .await
            .expect("RabbitMQ must be running for the integration tests");
        bus.declare_topology().await.expect("declare topology");
        // Its starts go straight to the broker, as the engine's would.
        bus.set_engine_mark(store::engine_mark(&pool).await.expect("the engine's mark"));
        TestEnv {
            config,
            pool,
            bus,
            admin,
            database,
            tasks: Vec::new(),
            cleaned: false,
        }
    }

    /// The name of this world's database.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Starts a gateway on port 0 and returns its base URL.
    pub async fn start_gateway(&mut self) -> RunningGateway {
        self.start_gateway_with(|_| {}).await
    }

    pub async fn start_gateway_with(&mut self, adjust: impl FnOnce(&mut Config)) -> RunningGateway {
        let mut config = self.config.clone();
        adjust(&mut config);
        let app = Application::build(&config)
            .await
            .expect("build the gateway");
        let url = format!("http://{}", app.local_addr());
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let handle = tokio::spawn(async move {
            app.run_until_stopped(token).await.expect("gateway ran");
        });
        self.tasks.push((shutdown.clone(), handle));
        RunningGateway { url, shutdown }
    }

    /// Builds a worker on its own connections (a separate instance, as in another process).
    pub async fn build_worker(&self, adjust: impl FnOnce(&mut Config)) -> Worker {
        let mut config = self.config.clone();
        adjust(&mut config);
        Worker::build(&config, registry())
            .await
            .expect("build a worker")
    }

    /// Starts a worker with its own registry and clock.
    pub async fn start_worker_custom(
        &mut self,
        registry: Registry,
        clock: Arc<dyn cmdflow_shared::time::Clock>,
    ) -> CancellationToken {
        let worker = Worker::build(&self.config, registry)
            .await
            .expect("build a worker")
            .with_clock(clock);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run_until_stopped(shutdown.clone()));
        self.tasks.push((shutdown.clone(), handle));
        shutdown
    }

    /// A scheduler on this world's database and broker, with the given clock (not running).
    pub fn scheduler(&self, clock: Arc<dyn cmdflow_shared::time::Clock>) -> Scheduler {
        Scheduler::new(self.pool.clone(), self.bus.clone(), &self.config).with_clock(clock)
    }

    /// Starts a scheduler on the wall clock.
    pub fn start_scheduler(&mut self) -> CancellationToken {
        let scheduler = Scheduler::new(self.pool.clone(), self.bus.clone(), &self.config);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(scheduler.run_until_stopped(shutdown.clone()));
        self.tasks.push((shutdown.clone(), handle));
        shutdown
    }

    /// Starts a worker instance; returns the token that stops it.
    pub async fn start_worker(&mut self) -> CancellationToken {
        self.start_worker_with(|_| {}).await
    }

    pub async fn start_worker_with(
        &mut self,
        adjust: impl FnOnce(&mut Config),
    ) -> CancellationToken {
        let worker = self.build_worker(adjust).await;
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run_until_stopped(shutdown.clone()));
        self.tasks.push((shutdown.clone(), handle));
        shutdown
    }

    /// Stops everything, deletes the namespace's exchanges and queues, drops the database.
    pub async fn cleanup(mut self) {
        for (token, _) in &self.tasks {
            token.cancel();
        }
        for (_, handle) in self.tasks.drain(..) {
            drop(tokio::time::timeout(Duration::from_secs(10), handle).await);
        }
        drop(self.bus.delete_topology().await);
        self.bus.close().await;
        self.pool.close().await;
        drop_database(&self.admin, &self.database).await;
        self.cleaned = true;
    }

    /// Publishes raw bytes to the events exchange, as an upstream service would: without a
    /// partition header (a worker forwards it to its partition).
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        self.bus
            .publish(
                &self.bus.topology().events_exchange(),
                routing_key,
                body,
                cmdflow_shared::bus::event_properties("raw"),
            )
            .await
            .expect("publish");
    }

    /// [`TestEnv::publish_raw`] with the engine's mark, as cmdflow's own processes publish.
    pub async fn publish_raw_as_engine(&self, routing_key: &str, body: &[u8]) {
        let mut headers = lapin::types::FieldTable::default();
        self.bus.mark_engine(&mut headers);
        self.bus
            .publish(
                &self.bus.topology().events_exchange(),
                routing_key,
                body,
                cmdflow_shared::bus::event_properties("raw").with_headers(headers),
            )
            .await
            .expect("publish");
    }

    /// The first dead letter kept (by a worker's keeper) after `after_id`, if any.
    pub async fn dead_letter_after(
        &self,
        after_id: i64,
    ) -> Option<cmdflow_shared::store::dead::DeadLetter> {
        let filter = cmdflow_shared::store::dead::Filter::default();
        cmdflow_shared::store::dead::list(&self.pool, &filter, after_id, 1)
            .await
            .expect("list dead letters")
            .pop()
    }

    /// Starts a command straight through the broker, past the gateway (which only knows the
    /// built-in kinds and checks their data); returns its id.
    pub async fn start_raw(&self, kind: &str, owner: &str, data: Value) -> String {
        let id = Uuid::now_v7().to_string();
        let start = start_event(&id, kind, owner, data);
        let body = serde_json::to_vec(&start).unwrap_or_default();
        // With its partition header and the engine's mark, as the gateway publishes it: the
        // events sent after it through the gateway queue up behind it.
        let mut headers = lapin::types::FieldTable::default();
        self.bus.mark_engine(&mut headers);
        self.bus
            .publish_event(
                "command.start",
                start["id"].as_str().unwrap_or_default(),
                &cmdflow_shared::bus::route_key_of(&body),
                &body,
                headers,
            )
            .await
            .expect("publish");
        id
    }

    /// The partition queue the events of command `id` go to.
    pub fn partition_queue_of(&self, id: &str) -> String {
        let id: Uuid = id.parse().expect("a command id");
        let t = self.bus.topology();
        t.partition_queue(cmdflow_shared::bus::command_partition(
            id.into(),
            t.partitions(),
        ))
    }

    /// Deletes a queue of this world's namespace that [`TestEnv::cleanup`] does not know of (an
    /// activity's, say), so that no test leaves one behind on the shared broker.
    pub async fn delete_queue(&self, queue: &str) {
        let channel = self.bus.channel().await.expect("channel");
        channel
            .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
            .await
            .expect("delete the queue");
        drop(channel.close(200, "done".into()).await);
    }

    /// Messages ready in a queue.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let channel = self.bus.channel().await.expect("channel");
        let q = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .expect("passive declare");
        drop(channel.close(200, "done".into()).await);
        q.message_count()
    }

    /// Waits (up to a minute) until command `id` is in state `want`, and returns it.
    pub async fn wait_state(&self, id: &str, want: CommandState) -> cmdflow_shared::Command {
        eventually(
            Duration::from_secs(60),
            &format!("{id} to be {want}"),
            || async { self.command(id).await.filter(|c| c.state == want) },
        )
        .await
    }

    /// The children of `parent`, oldest first: id, state and fan-in group.
    pub async fn children(&self, parent: &str) -> Vec<(String, CommandState, Option<String>)> {
        sqlx::query_as::<_, (Uuid, CommandState, Option<String>)>(
            "SELECT id, state, group_name FROM commands WHERE parent_id = $1::uuid ORDER BY id",
        )
        .bind(parent)
        .fetch_all(&self.pool)
        .await
        .expect("read children")
        .into_iter()
        .map(|(id, s, g)| (id.to_string(), s, g))
        .collect()
    }

    /// Waits (up to a minute) until `parent` has `n` children, all running, and returns their ids.
    pub async fn children_running(&self, parent: &str, n: usize) -> Vec<String> {
        eventually(Duration::from_secs(60), "children running", || async {
            let kids = self.children(parent).await;
            (kids.len() == n && kids.iter().all(|(_, s, _)| *s == CommandState::Running))
                .then(|| kids.into_iter().map(|(id, _, _)| id).collect())
        })
        .await
    }

    /// How many events of type `ty` command `id` has received (applied).
    pub async fn received(&self, id: &str, ty: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM command_events WHERE command_id = $1::uuid AND entry = 'received' AND event_type = $2",
        )
        .bind(id)
        .bind(ty)
        .fetch_one(&self.pool)
        .await
        .expect("count received events")
    }

    pub async fn command(&self, id: &str) -> Option<cmdflow_shared::Command> {
        store::get_command(&self.pool, id.parse().expect("command id"))
            .await
            .expect("read command")
    }
}

/// A CloudEvent as JSON, addressed to `command` when given.
/// The `command.start` event of a command `id` of `kind`, owned by `owner`, with its `data`.
pub fn start_event(id: &str, kind: &str, owner: &str, data: Value) -> Value {
    json!({
        "specversion": "1.0", "id": Uuid::now_v7().to_string(), "source": "tests",
        "type": "command.start", "commandid": id,
        "data": {"kind": kind, "owner": owner, "data": data},
    })
}

pub fn event(ty: &str, command: Option<&str>, data: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": Uuid::now_v7().to_string(),
        "source": "tests",
        "type": ty,
        "commandid": command,
        "data": data,
    })
}

/// An HTTP client that authenticates with [`TEST_KEY`].
pub fn http() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_static("Bearer cfk_test_4b8f2c1e9d7a6053"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// Posts JSON with a content type; returns (status, body).
pub async fn post(url: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
    let resp = http()
        .post(url)
        .header("content-type", content_type)
        .body(body.to_vec())
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

pub async fn get(url: &str) -> (u16, Value) {
    let resp = http().get(url).send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The codes of a feed's pending conditions, sorted.
pub fn pending_codes(feed: &Value) -> Vec<String> {
    let mut codes: Vec<String> = feed["pending"]
        .as_array()
        .expect("a feed has pending conditions")
        .iter()
        .map(|p| p["code"].as_str().unwrap_or_default().to_owned())
        .collect();
    codes.sort();
    codes
}

/// Whether `GET /v1/events/unmatched` (of type `ty`, when given) lists the event `ev`.
pub async fn listed_unmatched(gateway: &str, ty: Option<&str>, ev: &Value) -> bool {
    let query = ty.map(|t| format!("?type={t}")).unwrap_or_default();
    let (_, list) = get(&format!("{gateway}/v1/events/unmatched{query}")).await;
    list["events"]
        .as_array()
        .is_some_and(|events| events.iter().any(|e| e["event_id"] == ev["id"]))
}

/// Posts one event to the gateway and expects a 202.
pub async fn send(gateway: &str, ev: &Value) {
    let body = serde_json::to_vec(ev).unwrap_or_default();
    let (status, answer) = post(
        &format!("{gateway}/v1/events"),
        "application/cloudevents+json",
        &body,
    )
    .await;
    assert_eq!(status, 202, "{answer}");
}

/// Starts a command through the gateway; returns its id.
pub async fn start_command(gateway: &str, kind: &str, owner: &str, data: Value) -> String {
    let body = serde_json::to_vec(&json!({"kind": kind, "owner": owner, "data": data}))
        .unwrap_or_default();
    let (status, body) = post(&format!("{gateway}/v1/commands"), "application/json", &body).await;
    assert_eq!(status, 202, "start {kind}: {body}");
    body["command_id"].as_str().expect("command_id").to_owned()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A `demo.counter` of `owner`, frozen, with `n` increments sent to it: each refused, and kept
/// as a dead letter (the one group of kind `demo.counter` counts `n`). Returns its id.
pub async fn frozen_counter_with_dead_increments(
    env: &TestEnv,
    gateway: &str,
    owner: &str,
    n: usize,
) -> String {
    let id = start_command(gateway, "demo.counter", owner, json!({})).await;
    send(gateway, &event("demo.freeze", Some(&id), json!({}))).await;
    eventually(Duration::from_secs(60), "frozen", || async {
        (env.command(&id).await?.data["frozen"] == true).then_some(())
    })
    .await;
    for _ in 0..n {
        send(gateway, &event("demo.increment", Some(&id), json!({}))).await;
    }
    eventually(Duration::from_secs(60), "the dead letters kept", || async {
        let (_, groups) = get(&format!(
            "{gateway}/v1/dead-letters/groups?kind=demo.counter"
        ))
        .await;
        (groups["groups"][0]["count"] == n).then_some(())
    })
    .await;
    id
}
