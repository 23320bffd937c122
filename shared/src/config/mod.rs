//! Configuration: compiled-in defaults pointing at local services, then an optional TOML file
//! (`CMDFLOW_CONFIG`), then `CMDFLOW_…` environment variables. Validated once at start-up.

use std::io::IsTerminal;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

mod env;

use env::string_like;
pub use env::unknown_variables;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
/// Every setting of every role, each read from `CMDFLOW_<NAME>` (see the README's table).
pub struct Config {
    /// PostgreSQL URL (`CMDFLOW_DATABASE_URL`).
    #[serde(deserialize_with = "string_like::text")]
    pub database_url: String,
    /// Connections in the PostgreSQL pool of one process.
    pub database_pool_size: u32,
    /// AMQP URL of RabbitMQ (`CMDFLOW_AMQP_URL`).
    #[serde(deserialize_with = "string_like::text")]
    pub amqp_url: String,
    /// AMQP heartbeat (`CMDFLOW_AMQP_HEARTBEAT`): the broker closes a connection that misses two,
    /// so a paused worker's deliveries go back to the queue after about twice this. A
    /// `heartbeat` in the URL wins.
    #[serde(with = "humantime_serde")]
    pub amqp_heartbeat: Duration,
    /// Redis masters for Redlock, comma-separated (`CMDFLOW_REDIS_URLS`).
    #[serde(deserialize_with = "string_like::text")]
    pub redis_urls: String,
    /// Prefix of every exchange, queue and lock key (`CMDFLOW_NAMESPACE`).
    #[serde(deserialize_with = "string_like::text")]
    pub namespace: String,
    /// Where the gateway listens (`CMDFLOW_HTTP_ADDR`).
    #[serde(deserialize_with = "string_like::text")]
    pub http_addr: String,
    /// How long a client may take to send a complete request head (request line and headers),
    /// from when it connects or starts its next request; slower, it is disconnected before any
    /// authentication (`CMDFLOW_HTTP_HEADER_TIMEOUT`).
    #[serde(with = "humantime_serde")]
    pub http_header_timeout: Duration,
    /// How long a keep-alive connection may stay open with no request in flight
    /// (`CMDFLOW_HTTP_IDLE_TIMEOUT`). A long request is never cut by it.
    #[serde(with = "humantime_serde")]
    pub http_idle_timeout: Duration,
    /// The most connections the gateway holds open at once (`CMDFLOW_HTTP_MAX_CONNECTIONS`);
    /// one more is answered 503 and closed at once.
    pub http_max_connections: usize,
    /// Unacknowledged deliveries a worker holds (`CMDFLOW_PREFETCH`).
    pub prefetch: u16,
    /// Batches a worker processes at once (`CMDFLOW_CONCURRENCY`).
    pub concurrency: usize,
    /// The most deliveries, for distinct commands, applied in one transaction
    /// (`CMDFLOW_BATCH`; 1 turns group commit off).
    pub batch: usize,
    /// The most children a worker starts in the transaction that spawns them, without a
    /// message of their own (`CMDFLOW_EAGER_STARTS`; 0 sends every child's start through the
    /// broker).
    pub eager_starts: usize,
    /// Whether workers take the Redlock lock (`CMDFLOW_LOCK_ENABLED`). Off only for tests and
    /// benchmarks: the guarded update in PostgreSQL still fences every write.
    pub lock_enabled: bool,
    /// Redlock TTL; the lock is extended while a handler runs (`CMDFLOW_LOCK_TTL`, e.g. `30s`).
    #[serde(with = "humantime_serde")]
    pub lock_ttl: Duration,
    /// How long one attempt at a busy lock waits; a worker tries again until it has the lock,
    /// the command's later events waiting behind it (`CMDFLOW_LOCK_WAIT`).
    #[serde(with = "humantime_serde")]
    pub lock_wait: Duration,
    /// Delays between attempts after a retryable error, comma-separated
    /// (`CMDFLOW_RETRY_DELAYS`, e.g. `1s,10s,1m,10m`). After the last one, the event is a dead letter.
    #[serde(deserialize_with = "string_like::text")]
    pub retry_delays: String,
    /// Age after which the outbox sweeper republishes an unconfirmed row (`CMDFLOW_OUTBOX_SWEEP_AFTER`).
    #[serde(with = "humantime_serde")]
    pub outbox_sweep_after: Duration,
    /// Deepest level of a command tree; a command there cannot spawn (`CMDFLOW_MAX_DEPTH`).
    pub max_depth: i32,
    /// Most children one decision may spawn (`CMDFLOW_MAX_CHILDREN`).
    pub max_children: usize,
    /// How long broadcast events are kept to match waits registered just after them
    /// (`CMDFLOW_EARLY_EVENT_WINDOW`).
    #[serde(with = "humantime_serde")]
    pub early_event_window: Duration,
    /// How long an event that matched nothing stays listed in `/v1/events/unmatched`
    /// (`CMDFLOW_UNMATCHED_RETENTION`); the scheduler deletes older ones.
    #[serde(with = "humantime_serde")]
    pub unmatched_retention: Duration,
    /// Timers one scheduler claims per transaction (`CMDFLOW_SCHEDULER_BATCH`).
    pub scheduler_batch: i64,
    /// SMTP server for e-mails, `smtp://host[:port]` (`CMDFLOW_SMTP_URL`). Without it, e-mails
    /// are kept and shown in the app.
    #[serde(deserialize_with = "string_like::optional")]
    pub smtp_url: Option<String>,
    /// The sender of e-mails (`CMDFLOW_MAIL_FROM`).
    #[serde(deserialize_with = "string_like::text")]
    pub mail_from: String,
    /// Attempts at one e-mail before it is `failed` (`CMDFLOW_MAIL_ATTEMPTS`, default 5). A
    /// permanent refusal by the SMTP server (5xx) fails it at the first.
    pub mail_attempts: u32,
    /// Wait after an e-mail's first failed attempt, doubled after each further one
    /// (`CMDFLOW_MAIL_RETRY_FIRST`, default 30s).
    #[serde(with = "humantime_serde")]
    pub mail_retry_first: Duration,
    /// The longest wait between two attempts at an e-mail (`CMDFLOW_MAIL_RETRY_MAX`, default 1h).
    #[serde(with = "humantime_serde")]
    pub mail_retry_max: Duration,
    /// A folder of flow definitions (`*.toml`, funnels included) to run besides those the
    /// binary registers (`CMDFLOW_FLOWS_DIR`). An invalid file stops start-up with its precise
    /// error.
    #[serde(deserialize_with = "string_like::optional")]
    pub flows_dir: Option<String>,
    /// One more such folder, by its earlier name (`CMDFLOW_FUNNELS_DIR`).
    #[serde(deserialize_with = "string_like::optional")]
    pub funnels_dir: Option<String>,
    /// A TOML file declaring kinds decided by remote deciders over HTTP
    /// (`CMDFLOW_DECIDERS_FILE`). An invalid file, or a secret that cannot be read, stops start-up.
    #[serde(deserialize_with = "string_like::optional")]
    pub deciders_file: Option<String>,
    /// A folder of message templates (`*.txt`, named after the file) besides those the binary
    /// registers (`CMDFLOW_TEMPLATES_DIR`).
    #[serde(deserialize_with = "string_like::optional")]
    pub templates_dir: Option<String>,
    /// Whether the binary's example kinds run (`CMDFLOW_EXAMPLES`): on for `cmdflow up` unless
    /// set to `false`, off for every other role unless set to `true`.
    pub examples: Option<bool>,
    /// How long a worker holds a replay job without renewing its lease; a job whose worker
    /// died is taken over after it (`CMDFLOW_REPLAY_LEASE`).
    #[serde(with = "humantime_serde")]
    pub replay_lease: Duration,
    /// The most bytes of a dead letter's body kept, in bytes (`CMDFLOW_DEAD_LETTER_MAX_BODY`,
    /// default 16 MiB). A longer message is kept truncated to this, with the size and SHA-256
    /// of the whole, and cannot be replayed.
    pub dead_letter_max_body: usize,
    /// How many partition queues the namespace's work is split into (`CMDFLOW_PARTITIONS`):
    /// one command's events all go to one, in order, and each is consumed by one worker at a
    /// time. The same for every process of a namespace; more partitions than workers lets
    /// workers be added.
    pub partitions: u32,
    /// How long a worker holds a partition without renewing its claim; a dead worker's
    /// partitions are taken over after it (`CMDFLOW_PARTITION_LEASE`).
    #[serde(with = "humantime_serde")]
    pub partition_lease: Duration,
    /// How long an event for a command whose start has not been applied waits for that start
    /// (parked, in order) before it becomes a dead letter (`CMDFLOW_START_WAIT`).
    #[serde(with = "humantime_serde")]
    pub start_wait: Duration,
    /// Where the `worker` and `scheduler` roles serve `/metrics` and `/healthz`
    /// (`CMDFLOW_METRICS_ADDR`); the gateway serves them on its own address.
    #[serde(deserialize_with = "string_like::text")]
    pub metrics_addr: String,
    /// How long ended command trees stay live before the archiver moves them
    /// (`CMDFLOW_ARCHIVE_RETENTION`, e.g. `30d`).
    #[serde(with = "humantime_serde")]
    pub archive_retention: Duration,
    /// Retention per root kind, overriding the default: `kind=duration,…`
    /// (`CMDFLOW_ARCHIVE_RETENTION_BY_KIND`, e.g. `query=7d,quote=90d`).
    #[serde(deserialize_with = "string_like::text")]
    pub archive_retention_by_kind: String,
    /// How often the archiver runs (`CMDFLOW_ARCHIVE_INTERVAL`).
    #[serde(with = "humantime_serde")]
    pub archive_interval: Duration,
    /// Trees moved per transaction (`CMDFLOW_ARCHIVE_BATCH`).
    pub archive_batch: i64,
    /// Log format: `json` or `pretty` (`CMDFLOW_LOG_FORMAT`). Unset, `pretty` when standard error
    /// is a terminal and `json` otherwise (see [`crate::telemetry::default_log_format`]).
    #[serde(deserialize_with = "string_like::text")]
    pub log_format: String,
    /// A development key that holds every scope (`CMDFLOW_DEV_KEY`). `cmdflow up` generates and
    /// prints one when this is unset; other roles accept it only when it is set.
    pub dev_key: Option<Secret>,
    /// A TOML file of API keys, stored as SHA-256 hashes with their scopes
    /// (`CMDFLOW_AUTH_KEYS_FILE`); see the README for its format.
    #[serde(deserialize_with = "string_like::optional")]
    pub auth_keys_file: Option<String>,
    /// The shared secret of HS256 JWTs (`CMDFLOW_JWT_HS256_SECRET`).
    pub jwt_hs256_secret: Option<Secret>,
    /// A PEM file with the public key of RS256 JWTs (`CMDFLOW_JWT_RS256_PUBLIC_KEY_FILE`).
    #[serde(deserialize_with = "string_like::optional")]
    pub jwt_rs256_public_key_file: Option<String>,
    /// When set, JWTs must carry this `iss` (`CMDFLOW_JWT_ISSUER`).
    #[serde(deserialize_with = "string_like::optional")]
    pub jwt_issuer: Option<String>,
    /// When set, JWTs must carry this `aud` (`CMDFLOW_JWT_AUDIENCE`).
    #[serde(deserialize_with = "string_like::optional")]
    pub jwt_audience: Option<String>,
    /// Event sources allowed to send `owner.linked` straight to the broker, comma-separated
    /// (`CMDFLOW_LINK_SOURCES`). Through the gateway, linking needs the `owners:link` scope.
    #[serde(deserialize_with = "string_like::optional")]
    pub link_sources: Option<String>,
    /// Seconds of clock skew allowed on a JWT's `exp` and `nbf` (`CMDFLOW_JWT_LEEWAY_SECS`).
    pub jwt_leeway_secs: u64,
    /// Requests per second one caller (an API key, or a token's subject) may make
    /// (`CMDFLOW_RATE_LIMIT_PER_SECOND`); 0 turns the limit off.
    pub rate_limit_per_second: u32,
    /// Requests one caller may make at once above that rate (`CMDFLOW_RATE_LIMIT_BURST`).
    pub rate_limit_burst: u32,
    /// A PEM bundle of certificate authorities that TLS connections to RabbitMQ (`amqps://`),
    /// PostgreSQL (`sslmode=verify-full`) and Redis (`rediss://`) trust besides the system's
    /// (`CMDFLOW_TLS_CA_FILE`).
    #[serde(deserialize_with = "string_like::optional")]
    pub tls_ca_file: Option<String>,
    /// How long a stopping process (SIGTERM) lets its in-flight events and requests finish
    /// (`CMDFLOW_SHUTDOWN_GRACE`). Keep it below the pod's `terminationGracePeriodSeconds`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

/// A secret from the environment or a file: never printed, in `Debug` or in logs.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(#[serde(deserialize_with = "string_like::text")] String);

impl Secret {
    /// Keeps `value` as a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for where it is used (never for a log line).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/cmdflow".to_owned(),
            database_pool_size: 16,
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            amqp_heartbeat: Duration::from_secs(10),
            redis_urls: "redis://127.0.0.1:6379/".to_owned(),
            namespace: "cmdflow".to_owned(),
            http_addr: "127.0.0.1:8080".to_owned(),
            http_header_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(60),
            http_max_connections: 10_000,
            prefetch: 1024,
            concurrency: 4,
            batch: 128,
            eager_starts: 10_000,
            lock_enabled: true,
            lock_ttl: Duration::from_secs(30),
            lock_wait: Duration::from_millis(200),
            retry_delays: "1s,10s,1m,10m".to_owned(),
            outbox_sweep_after: Duration::from_secs(10),
            max_depth: 16,
            max_children: 1000,
            early_event_window: Duration::from_secs(300),
            unmatched_retention: Duration::from_secs(7 * 24 * 3600),
            scheduler_batch: 500,
            smtp_url: None,
            flows_dir: None,
            funnels_dir: None,
            deciders_file: None,
            templates_dir: None,
            examples: None,
            replay_lease: Duration::from_secs(30),
            dead_letter_max_body: 16 * 1024 * 1024,
            partitions: crate::bus::DEFAULT_PARTITIONS,
            partition_lease: Duration::from_secs(10),
            start_wait: Duration::from_secs(15 * 60),
            metrics_addr: "127.0.0.1:9091".to_owned(),
            archive_retention: Duration::from_secs(30 * 24 * 3600),
            archive_retention_by_kind: String::new(),
            archive_interval: Duration::from_secs(60),
            archive_batch: 200,
            mail_from: "cmdflow <cmdflow@localhost>".to_owned(),
            mail_attempts: 5,
            mail_retry_first: Duration::from_secs(30),
            mail_retry_max: Duration::from_secs(3600),
            log_format: crate::telemetry::default_log_format(std::io::stderr().is_terminal())
                .to_owned(),
            dev_key: None,
            auth_keys_file: None,
            jwt_hs256_secret: None,
            jwt_rs256_public_key_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway_secs: 5,
            link_sources: None,
            rate_limit_per_second: 500,
            rate_limit_burst: 1000,
            tls_ca_file: None,
            shutdown_grace: Duration::from_secs(25),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value of the wrong type, or a file that cannot be read.
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A value that breaks a rule.
    #[error("configuration: {field}: {reason}")]
    Invalid {
        /// The setting, without the `CMDFLOW_` prefix, in lower case.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl Config {
    /// Defaults, then the file named by `CMDFLOW_CONFIG` if any, then `CMDFLOW_…` variables.
    pub fn load() -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Ok(path) = std::env::var("CMDFLOW_CONFIG") {
            figment = figment.merge(Toml::file_exact(path));
        }
        let config: Config = figment
            .merge(Env::prefixed("CMDFLOW_").ignore(&["config", "url", "token"]))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every setting; the first bad one is named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.redis_url_list().is_empty() {
            return invalid("redis_urls", "name at least one Redis master");
        }
        if self.namespace.is_empty()
            || !self
                .namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return invalid(
                "namespace",
                "must be non-empty ASCII letters, digits, - or _",
            );
        }
        if self.batch == 0 || self.batch > 1000 {
            return invalid("batch", "a batch holds 1 to 1000 deliveries");
        }
        if self.concurrency == 0 || self.prefetch == 0 {
            return invalid("concurrency", "concurrency and prefetch must be at least 1");
        }
        if self.mail_attempts == 0 {
            return invalid("mail_attempts", "an e-mail is tried at least once");
        }
        if self.mail_retry_first.is_zero() || self.mail_retry_first > self.mail_retry_max {
            return invalid(
                "mail_retry_first",
                "must be more than 0 and at most mail_retry_max",
            );
        }
        if self.lock_ttl < Duration::from_secs(1) {
            return invalid("lock_ttl", "must be at least 1s");
        }
        if self.amqp_heartbeat < Duration::from_secs(1)
            || self.amqp_heartbeat > Duration::from_secs(600)
        {
            return invalid("amqp_heartbeat", "must be between 1s and 10m");
        }
        self.retry_delay_list()?;
        if self.max_depth < 1 || self.max_children < 1 {
            return invalid("max_depth", "max_depth and max_children must be at least 1");
        }
        self.retention()?;
        if self.archive_batch < 1 {
            return invalid("archive_batch", "must be at least 1");
        }
        if !matches!(self.log_format.as_str(), "json" | "pretty") {
            return invalid("log_format", "must be `json` or `pretty`");
        }
        if self.replay_lease < Duration::from_secs(1) {
            return invalid("replay_lease", "must be at least 1s");
        }
        if self.dead_letter_max_body == 0 || self.dead_letter_max_body > 1 << 30 {
            return invalid(
                "dead_letter_max_body",
                "must be 1 byte to 1 GiB (1073741824), PostgreSQL's largest value",
            );
        }
        if self.partitions == 0 || self.partitions > 1024 {
            return invalid("partitions", "a namespace has 1 to 1024 partitions");
        }
        if self.partition_lease < Duration::from_secs(2) {
            return invalid("partition_lease", "must be at least 2s");
        }
        if self.database_pool_size == 0 {
            return invalid("database_pool_size", "a pool holds at least 1 connection");
        }
        if self.http_header_timeout.is_zero() {
            return invalid(
                "http_header_timeout",
                "must be longer than zero (e.g. `10s`)",
            );
        }
        if self.http_idle_timeout.is_zero() {
            return invalid("http_idle_timeout", "must be longer than zero (e.g. `60s`)");
        }
        if self.http_max_connections == 0 {
            return invalid(
                "http_max_connections",
                "the gateway must accept at least 1 connection",
            );
        }
        Ok(())
    }

    /// The sources allowed to send `owner.linked` straight to the broker.
    pub fn link_source_list(&self) -> Vec<String> {
        self.link_sources
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The Redis masters, one URL each.
    pub fn redis_url_list(&self) -> Vec<String> {
        self.redis_urls
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The delays between attempts after a retryable error.
    pub fn retry_delay_list(&self) -> Result<Vec<Duration>, ConfigError> {
        self.retry_delays
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                let d = humantime::parse_duration(s).map_err(|e| ConfigError::Invalid {
                    field: "retry_delays",
                    reason: format!("`{s}`: {e}"),
                })?;
                if d.is_zero() {
                    return Err(ConfigError::Invalid {
                        field: "retry_delays",
                        reason: "a delay must be longer than zero".to_owned(),
                    });
                }
                Ok(d)
            })
            .collect()
    }
}

impl Config {
    /// The archiver's retention: the default, and per kind.
    pub fn retention(&self) -> Result<crate::store::archive::Retention, ConfigError> {
        let by_kind = self
            .archive_retention_by_kind
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|pair| {
                let bad = |reason: String| ConfigError::Invalid {
                    field: "archive_retention_by_kind",
                    reason,
                };
                let (kind, d) = pair
                    .split_once('=')
                    .ok_or_else(|| bad(format!("`{pair}`: expected kind=duration")))?;
                let d = humantime::parse_duration(d.trim())
                    .map_err(|e| bad(format!("`{pair}`: {e}")))?;
                Ok((kind.trim().to_owned(), d))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(crate::store::archive::Retention {
            default: self.archive_retention,
            by_kind,
        })
    }
}

/// A URL fit for a log line or an error message: the password is replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests;
