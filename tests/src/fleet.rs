//! Real `cmdflow` processes and private service instances for the fault suite.
//!
//! - [`Fleet`] runs the `cmdflow gateway`, `cmdflow worker` and `cmdflow scheduler` roles as
//!   child processes of the test, configured through `CMDFLOW_*` variables as an operator
//!   would, so a fault can `kill -9` one of them.
//! - [`PrivateRedis`], [`PrivatePostgres`] and [`PrivateRabbit`] are throw-away servers on free
//!   loopback ports inside a scratch directory. Tests restart those, never the shared local
//!   services other people's tests use. Each is killed and its directory removed on drop, even
//!   when the test fails.
//! - A fleet's world is the one harness's [`crate::TestEnv`], made by [`crate::TestEnv::on`] on
//!   the servers (shared or private) and the fault-test settings ([`fault_config`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cmdflow_shared::{Config, store};
use tokio::process::{Child, Command};
use uuid::Uuid;

/// How long a private server or a role may take to come up on a busy 2-core machine.
const START_WITHIN: Duration = Duration::from_secs(90);

/// `cmdflow` from the target directory this test executable was built in: tests live in
/// `target/<profile>/deps/`, binaries in `target/<profile>/`. `CMDFLOW_BIN` names another.
pub fn cmdflow_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("CMDFLOW_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("cmdflow"))
        .collect();
    candidates
        .iter()
        .find(|bin| bin.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "the cmdflow binary is not in {candidates:?}: build it first with \
                 `cargo build -p cmdflow --bin cmdflow` (same CARGO_TARGET_DIR)"
            )
        })
}

/// A directory under the system's temporary directory, removed (with its contents) on drop.
pub struct Scratch {
    path: PathBuf,
    /// Left in place on drop (a failed test's logs).
    keep: bool,
}

/// The prefixes of every scratch directory this module makes, for [`sweep_stale_scratch`].
const SCRATCH_PREFIXES: [&str; 4] = ["cfredis-", "cfpg-", "cfrmq-", "cffleet-"];

impl Scratch {
    /// Short names: PostgreSQL puts its Unix socket in here, and socket paths are limited.
    pub fn new(prefix: &str) -> Scratch {
        sweep_stale_scratch();
        let name = format!("{prefix}-{}", &Uuid::new_v4().simple().to_string()[..10]);
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).expect("create a scratch directory");
        Scratch { path, keep: false }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        drop(std::fs::remove_dir_all(&self.path));
    }
}

/// Once per test process: kills what a test run that was itself killed (so its `Drop`s never
/// ran) left running in scratch directories older than an hour, and removes them. A process
/// belongs to a directory when its command line or working directory names it; every server
/// and role here runs in its own directory.
fn sweep_stale_scratch() {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = SCRATCH_PREFIXES.iter().any(|p| name.starts_with(p))
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(3600));
            if !stale {
                continue;
            }
            let dir = entry.path();
            for pid in processes_in(&dir) {
                signal(pid, "KILL", false);
            }
            drop(std::fs::remove_dir_all(&dir));
        }
    });
}

/// The processes whose command line or working directory is inside `dir`.
fn processes_in(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let in_dir = std::fs::read_link(p.path().join("cwd")).is_ok_and(|c| c.starts_with(dir));
            (in_dir || cmdline.contains(&needle)).then_some(pid)
        })
        .collect()
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Whether something accepts TCP connections on the loopback `port`.
pub async fn port_open(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await,
        Ok(Ok(_))
    )
}

/// Polls `check` every 50 ms until it holds; panics with `what` (and the log, if any) after
/// `within`.
async fn wait_until<F, Fut>(within: Duration, what: &str, log: Option<&Path>, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        if Instant::now() > deadline {
            let tail = log.map(|l| tail_of(l, 40)).unwrap_or_default();
            panic!("timed out after {within:?} waiting for {what}\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `lines` lines of a log file, for failure messages.
pub fn tail_of(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    format!("--- {} ---\n{}", path.display(), all[from..].join("\n"))
}

/// Sends `signal` (e.g. `KILL`, `TERM`, `STOP`) to process `pid`, or to process group `pid`
/// when `group`; returns whether it was delivered (the process may be gone already).
pub fn signal(pid: u32, signal: &str, group: bool) -> bool {
    let target = if group {
        format!("-{pid}")
    } else {
        pid.to_string()
    };
    std::process::Command::new("kill")
        .args(["-s", signal, "--", &target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The sum of the series of `name` in Prometheus text whose labels include every `k="v"` of
/// `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .fold(0.0, |a, b| a + b)
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open a log file")
}

// ---------------------------------------------------------------------------------------------
// Redis

/// A private `redis-server` without persistence (Redlock keys are ephemeral by design).
pub struct PrivateRedis {
    port: u16,
    dir: Scratch,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let mut redis = PrivateRedis {
            port: free_port(),
            dir: Scratch::new("cfredis"),
            child: None,
        };
        redis.start_again().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL: every lock it held is gone) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.kill());
            drop(child.wait());
        }
    }

    /// Starts the server (again) on the same port and waits until it accepts connections.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "redis is already running");
        let log = self.dir.join("redis.log");
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &self.dir.path().to_string_lossy()])
            .current_dir(self.dir.path())
            .stdout(log_file(&log))
            .stderr(log_file(&log))
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let port = self.port;
        wait_until(START_WITHIN, "the private redis", Some(&log), || {
            port_open(port)
        })
        .await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// A private PostgreSQL cluster (fsync off: it only has to survive a clean restart). As root,
/// `initdb` and the server run as the `postgres` user, since PostgreSQL refuses to run as root.
pub struct PrivatePostgres {
    port: u16,
    dir: Scratch,
    bin: PathBuf,
    as_postgres: bool,
}

impl PrivatePostgres {
    pub async fn start() -> PrivatePostgres {
        let bin = postgres_bin_dir();
        let dir = Scratch::new("cfpg");
        let as_postgres = is_root();
        if as_postgres {
            let status = std::process::Command::new("chown")
                .args(["postgres:postgres", &dir.path().to_string_lossy()])
                .status()
                .expect("run chown");
            assert!(status.success(), "chown the scratch directory to postgres");
        }
        let pg = PrivatePostgres {
            port: free_port(),
            dir,
            bin,
            as_postgres,
        };
        let data = pg.data_dir();
        let out = pg
            .run(
                "initdb",
                &[
                    "-D",
                    &data,
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
            )
            .await;
        assert!(out.status.success(), "initdb failed: {out:?}");
        pg.start_again().await;
        pg
    }

    fn data_dir(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    /// A URL to database `db` as the superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The server part of the URLs, for [`crate::TestEnv::on`].
    pub fn server(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Runs a PostgreSQL program from the cluster's version, as `postgres` when we are root.
    async fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        let exe = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("run {}: {e}", exe.display()))
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub async fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.join("postgres.log").to_string_lossy().into_owned();
        let data = self.data_dir();
        let out = self
            .run(
                "pg_ctl",
                &[
                    "start", "-D", &data, "-w", "-t", "60", "-l", &log, "-o", &options,
                ],
            )
            .await;
        assert!(
            out.status.success(),
            "pg_ctl start failed: {out:?}\n{}",
            tail_of(Path::new(&log), 30)
        );
    }

    /// Stops the server with `mode` (`fast`: disconnect everyone and shut down cleanly;
    /// `immediate`: like a crash) and waits until it is down.
    pub async fn stop(&self, mode: &str) {
        let data = self.data_dir();
        let out = self
            .run(
                "pg_ctl",
                &["stop", "-D", &data, "-m", mode, "-w", "-t", "60"],
            )
            .await;
        assert!(out.status.success(), "pg_ctl stop failed: {out:?}");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // Synchronous on purpose: Drop cannot await. An immediate stop is enough for a cluster
        // about to be deleted; if pg_ctl cannot, kill the postmaster from its pid file.
        let data = self.data_dir();
        let exe = self.bin.join("pg_ctl");
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let stopped = cmd
            .args(["stop", "-D", &data, "-m", "immediate", "-w", "-t", "20"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped
            && let Ok(text) = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            && let Some(pid) = text
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<u32>().ok())
        {
            signal(pid, "KILL", false);
        }
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` (or `CMDFLOW_TEST_PG_BIN`).
fn postgres_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CMDFLOW_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).expect(
        "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin \
         (apt-get install postgresql, or set CMDFLOW_TEST_PG_BIN)",
    )
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ

/// A private RabbitMQ node (`cfault<random>@localhost`) with its own data directory, AMQP and
/// distribution ports, Erlang cookie (`HOME`) and an empty plugin list; it registers with the
/// machine's epmd like any node. Its data directory survives [`PrivateRabbit::stop`], so durable
/// quorum queues and their messages come back after [`PrivateRabbit::start_again`].
pub struct PrivateRabbit {
    node: String,
    port: u16,
    dir: Scratch,
    child: Option<std::process::Child>,
}

impl PrivateRabbit {
    pub async fn start() -> PrivateRabbit {
        let dir = Scratch::new("cfrmq");
        let port = free_port();
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create rabbitmq directories");
        }
        // Our own files, so the system's /etc/rabbitmq (listeners on 5672) does not apply.
        std::fs::write(dir.join("env.conf"), "").expect("write rabbitmq-env.conf");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.1 = 127.0.0.1:{port}\n"),
        )
        .expect("write rabbitmq.conf");
        let mut rabbit = PrivateRabbit {
            node: format!(
                "cfault{}@localhost",
                &Uuid::new_v4().simple().to_string()[..8]
            ),
            port,
            dir,
            child: None,
        };
        rabbit.start_again().await;
        rabbit
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the node (again) and waits until it accepts AMQP connections.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the node is already running");
        let d = |sub: &str| self.dir.join(sub).to_string_lossy().into_owned();
        let server = std::env::var("CMDFLOW_TEST_RABBITMQ_SERVER")
            .unwrap_or_else(|_| "/usr/lib/rabbitmq/bin/rabbitmq-server".to_owned());
        let log = self.dir.join("server.log");
        let dist_port = free_port();
        let mut cmd = std::process::Command::new(&server);
        cmd.env("HOME", d("home"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_CONF_ENV_FILE", d("env.conf"))
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log));
        // Its own process group: the script, the Erlang VM and its helpers go down together.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("start {server}: {e} (apt-get install rabbitmq-server, or set CMDFLOW_TEST_RABBITMQ_SERVER)")
        });
        self.child = Some(child);
        let url = self.amqp_url();
        let port = self.port;
        let node_log = self.dir.join(&format!("log/{}.log", self.node));
        wait_until(
            START_WITHIN,
            "the private RabbitMQ node",
            Some(&node_log),
            || {
                let url = url.clone();
                async move {
                    if !port_open(port).await {
                        return false;
                    }
                    let props = lapin::ConnectionProperties::default();
                    match tokio::time::timeout(
                        Duration::from_secs(5),
                        lapin::Connection::connect(&url, props),
                    )
                    .await
                    {
                        Ok(Ok(conn)) => {
                            drop(conn.close(200, "ready".into()).await);
                            true
                        }
                        _ => false,
                    }
                }
            },
        )
        .await;
    }

    /// Stops the node as an operator would (SIGTERM: a clean shutdown that keeps its data),
    /// and waits until every process of it has exited.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        signal(pid, "TERM", true);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // The port is the node's: once it is closed and the script exited, it is down.
            if matches!(child.try_wait(), Ok(Some(_))) && !port_open(self.port).await {
                break;
            }
            if Instant::now() > deadline {
                signal(pid, "KILL", true);
                drop(child.wait());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Helpers the VM left in its group (inet_gethost, erl_child_setup).
        signal(pid, "KILL", true);
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "KILL", true);
            drop(child.wait());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Settings and checks of a world whose workers are processes

/// The fleet's settings for fault tests: short delays so a test's faults heal in its time.
/// Retries cover about a minute of outage before an event would become a dead letter. The
/// database URL and namespace are the world's ([`crate::TestEnv::on`]).
pub fn fault_config(amqp_url: &str, redis_urls: &str) -> Config {
    Config {
        amqp_url: amqp_url.to_owned(),
        redis_urls: redis_urls.to_owned(),
        http_addr: "127.0.0.1:0".to_owned(),
        metrics_addr: "127.0.0.1:0".to_owned(),
        database_pool_size: 8,
        concurrency: 16,
        prefetch: 32,
        lock_wait: Duration::from_millis(50),
        // A killed worker's locks expire after this; the lock is extended while a handler
        // runs, so a short TTL is safe for handlers that take milliseconds.
        lock_ttl: Duration::from_secs(5),
        retry_delays: "200ms,500ms,1s,2s,4s,8s,15s,30s".to_owned(),
        outbox_sweep_after: Duration::from_secs(1),
        rate_limit_per_second: 0,
        dev_key: Some(cmdflow_shared::config::Secret::new(crate::TEST_KEY)),
        // A killed worker's partitions are taken over after this.
        partition_lease: Duration::from_secs(3),
        ..Config::default()
    }
}

/// What a test asks of a world whose workers are processes.
impl crate::TestEnv {
    /// Messages ready in every queue of the namespace (the partitions, unkeyed work, dead), and
    /// consumers of the partition queues; `None` while the broker cannot say.
    pub async fn queues(&self) -> Option<(u32, u32)> {
        let t = self.bus.topology();
        let mut names = vec![t.work_queue(), t.dead_queue()];
        names.extend((0..t.partitions()).map(|p| t.partition_queue(p)));
        let channel = tokio::time::timeout(Duration::from_secs(5), self.bus.channel())
            .await
            .ok()?
            .ok()?;
        let mut messages = 0;
        let mut consumers = 0;
        for name in names {
            let q = channel
                .queue_declare(
                    name.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await
                .ok()?;
            messages += q.message_count();
            if name != t.work_queue() && name != t.dead_queue() {
                consumers += q.consumer_count();
            }
        }
        drop(channel.close(200, "done".into()).await);
        Some((messages, consumers))
    }

    /// How many workers hold the namespace's partitions, once every partition is held and
    /// consumed (one consumer each); `None` before.
    pub async fn workers_consuming(&self) -> Option<u32> {
        let holders = store::partitions::holders(&self.pool, &self.config.namespace)
            .await
            .ok()?;
        let partitions = self.bus.topology().partitions();
        if holders.len() != partitions as usize || holders.iter().any(|(_, o)| o.is_none()) {
            return None;
        }
        let (_, consumers) = self.queues().await?;
        if consumers != partitions {
            return None;
        }
        let owners: std::collections::BTreeSet<&str> =
            holders.iter().filter_map(|(_, o)| o.as_deref()).collect();
        Some(owners.len() as u32)
    }
}

// ---------------------------------------------------------------------------------------------
// The fleet

struct Role {
    name: String,
    child: Child,
    log: PathBuf,
}

/// `cmdflow` processes of one namespace: a gateway, workers and optionally a scheduler.
/// Every process is killed on drop; when the test panics, the tail of each log is printed.
pub struct Fleet {
    bin: PathBuf,
    env: Vec<(String, String)>,
    logs: Scratch,
    gateway: Option<Role>,
    gateway_url: String,
    workers: Vec<Option<Role>>,
    scheduler: Option<Role>,
    old_logs: Vec<PathBuf>,
}

impl Fleet {
    /// A fleet configured from `config` (its URLs, namespace and tuning), not yet started.
    pub fn new(config: &Config) -> Fleet {
        let d = |d: Duration| format!("{}ms", d.as_millis());
        let env = [
            ("CMDFLOW_DATABASE_URL", config.database_url.clone()),
            ("CMDFLOW_AMQP_URL", config.amqp_url.clone()),
            ("CMDFLOW_REDIS_URLS", config.redis_urls.clone()),
            ("CMDFLOW_NAMESPACE", config.namespace.clone()),
            ("CMDFLOW_METRICS_ADDR", "127.0.0.1:0".to_owned()),
            (
                "CMDFLOW_DATABASE_POOL_SIZE",
                config.database_pool_size.to_string(),
            ),
            ("CMDFLOW_CONCURRENCY", config.concurrency.to_string()),
            ("CMDFLOW_PREFETCH", config.prefetch.to_string()),
            ("CMDFLOW_LOCK_WAIT", d(config.lock_wait)),
            ("CMDFLOW_LOCK_TTL", d(config.lock_ttl)),
            ("CMDFLOW_RETRY_DELAYS", config.retry_delays.clone()),
            ("CMDFLOW_OUTBOX_SWEEP_AFTER", d(config.outbox_sweep_after)),
            ("CMDFLOW_PARTITIONS", config.partitions.to_string()),
            ("CMDFLOW_PARTITION_LEASE", d(config.partition_lease)),
            ("CMDFLOW_DEV_KEY", crate::TEST_KEY.to_owned()),
            ("CMDFLOW_RATE_LIMIT_PER_SECOND", "0".to_owned()),
            ("CMDFLOW_LOG_FORMAT", "json".to_owned()),
            // The test kinds are cmdflow's examples.
            ("CMDFLOW_EXAMPLES", "true".to_owned()),
            (
                "RUST_LOG",
                // The partitions' comings and goings too: when a fault test fails, they say which
                // worker consumed what, and when.
                std::env::var("CMDFLOW_TEST_LOG").unwrap_or_else(|_| {
                    "warn,lapin=error,cmdflow_workers::engine::partitions=info".to_owned()
                }),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Fleet {
            bin: cmdflow_binary(),
            env,
            logs: Scratch::new("cffleet"),
            gateway: None,
            gateway_url: String::new(),
            workers: Vec::new(),
            scheduler: None,
            old_logs: Vec::new(),
        }
    }

    /// Sets a variable in the environment of every role started from now on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// The gateway's base URL (`http://127.0.0.1:port`).
    pub fn gateway_url(&self) -> &str {
        &self.gateway_url
    }

    fn spawn(&self, name: &str, args: &[&str], extra: &[(&str, String)]) -> Role {
        let log = self.logs.join(&format!("{name}.log"));
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env_remove("CMDFLOW_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(self.logs.path())
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log))
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {} {name}: {e}", self.bin.display()));
        Role {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// Starts `cmdflow gateway` on a free port and waits until it answers `/healthz`.
    pub async fn start_gateway(&mut self) {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let role = self.spawn(
            "gateway",
            &["gateway"],
            &[("CMDFLOW_HTTP_ADDR", addr.clone())],
        );
        self.gateway_url = format!("http://{addr}");
        let url = format!("{}/healthz", self.gateway_url);
        let log = role.log.clone();
        self.gateway = Some(role);
        let client = crate::http();
        wait_until(START_WITHIN, "the gateway", Some(&log), || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                client
                    .get(&url)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
    }

    /// Starts `cmdflow worker` number `i` (again, after [`Fleet::kill_worker`]). It is up
    /// when the work queue counts its consumer: see [`crate::TestEnv::queues`].
    pub fn start_worker(&mut self, i: usize) {
        if self.workers.len() <= i {
            self.workers.resize_with(i + 1, || None);
        }
        assert!(self.workers[i].is_none(), "worker {i} is running");
        let role = self.spawn(&format!("worker{i}"), &["worker"], &[]);
        self.workers[i] = Some(role);
    }

    /// `kill -9` of worker `i`; returns once the process is gone.
    pub async fn kill_worker(&mut self, i: usize) {
        let role = self
            .workers
            .get_mut(i)
            .and_then(Option::take)
            .expect("worker running");
        self.reap(role).await;
    }

    /// Starts `cmdflow scheduler`.
    pub fn start_scheduler(&mut self) {
        assert!(self.scheduler.is_none(), "the scheduler is running");
        self.scheduler = Some(self.spawn("scheduler", &["scheduler"], &[]));
    }

    /// `kill -9` of the scheduler; returns once the process is gone.
    pub async fn kill_scheduler(&mut self) {
        let role = self.scheduler.take().expect("scheduler running");
        self.reap(role).await;
    }

    async fn reap(&mut self, mut role: Role) {
        // SIGKILL, as `kill -9`: no shutdown hook runs.
        role.child.start_kill().expect("kill -9");
        drop(role.child.wait().await);
        // Keep its log for failure reports; the next start of the role appends to it.
        self.old_logs.push(role.log);
    }

    /// Processes that exited on their own (crashed), with their exit status.
    pub fn crashed(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let roles = self
            .gateway
            .iter_mut()
            .chain(self.workers.iter_mut().flatten())
            .chain(self.scheduler.iter_mut());
        for role in roles {
            if let Ok(Some(status)) = role.child.try_wait() {
                out.push(format!("{} exited: {status}", role.name));
            }
        }
        out
    }

    /// The tails of every process log.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut logs: Vec<PathBuf> = self
            .gateway
            .iter()
            .chain(self.workers.iter().flatten())
            .chain(self.scheduler.iter())
            .map(|r| r.log.clone())
            .chain(self.old_logs.iter().cloned())
            .collect();
        logs.sort();
        logs.dedup();
        logs.iter()
            .map(|l| tail_of(l, lines))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops every process as a rolling update does (SIGTERM), and waits until each has exited
    /// within `within`: the names and exit statuses, in start order (gateway, workers,
    /// scheduler).
    pub async fn terminate(mut self, within: Duration) -> Vec<(String, std::process::ExitStatus)> {
        let mut roles: Vec<Role> = self
            .gateway
            .take()
            .into_iter()
            .chain(self.workers.iter_mut().filter_map(Option::take))
            .chain(self.scheduler.take())
            .collect();
        for role in &roles {
            if let Some(pid) = role.child.id() {
                signal(pid, "TERM", false);
            }
        }
        let mut exited = Vec::new();
        for role in &mut roles {
            let status = tokio::time::timeout(within, role.child.wait())
                .await
                .unwrap_or_else(|_| panic!("{} did not stop within {within:?}", role.name))
                .expect("wait for a role to exit");
            exited.push((role.name.clone(), status));
        }
        // Their logs stay readable for the test's failure report.
        self.old_logs.extend(roles.into_iter().map(|r| r.log));
        exited
    }

    /// Stops every process (SIGKILL: nothing of the test depends on a clean shutdown).
    pub async fn stop(mut self) {
        let roles: Vec<Role> = self
            .gateway
            .take()
            .into_iter()
            .chain(self.workers.iter_mut().filter_map(Option::take))
            .chain(self.scheduler.take())
            .collect();
        for role in roles {
            self.reap(role).await;
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(30));
        }
        if std::thread::panicking() || std::env::var_os("CMDFLOW_TEST_KEEP_LOGS").is_some() {
            // Kept for a look, whole; swept with the stale scratch after an hour.
            self.logs.keep = true;
            eprintln!("The whole logs are kept in {}.", self.logs.path().display());
        }
        // kill_on_drop kills what is still running.
    }
}
