//! Configuration: compiled-in defaults pointing at local services, then an optional TOML file
//! (`CMDFLOW_CONFIG`), then `CMDFLOW_…` environment variables. Validated once at start-up.

use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
/// Every setting of every role, each read from `CMDFLOW_<NAME>` (see the README's table).
pub struct Config {
    /// PostgreSQL URL (`CMDFLOW_DATABASE_URL`).
    pub database_url: String,
    /// Connections in the PostgreSQL pool of one process.
    pub database_pool_size: u32,
    /// AMQP URL of RabbitMQ (`CMDFLOW_AMQP_URL`).
    pub amqp_url: String,
    /// Redis masters for Redlock, comma-separated (`CMDFLOW_REDIS_URLS`).
    pub redis_urls: String,
    /// Prefix of every exchange, queue and lock key (`CMDFLOW_NAMESPACE`).
    pub namespace: String,
    /// Where the gateway listens (`CMDFLOW_HTTP_ADDR`).
    pub http_addr: String,
    /// Unacknowledged deliveries a worker holds (`CMDFLOW_PREFETCH`).
    pub prefetch: u16,
    /// Batches a worker processes at once (`CMDFLOW_CONCURRENCY`).
    pub concurrency: usize,
    /// The most deliveries, for distinct commands, applied in one transaction
    /// (`CMDFLOW_BATCH`; 1 turns group commit off).
    pub batch: usize,
    /// Whether workers take the Redlock lock (`CMDFLOW_LOCK_ENABLED`). Off only for tests and
    /// benchmarks: the guarded update in PostgreSQL still fences every write.
    pub lock_enabled: bool,
    /// Redlock TTL; the lock is extended while a handler runs (`CMDFLOW_LOCK_TTL`, e.g. `30s`).
    #[serde(with = "humantime_serde")]
    pub lock_ttl: Duration,
    /// How long a worker waits for a busy lock before it hands the event to a short delay
    /// (`CMDFLOW_LOCK_WAIT`).
    #[serde(with = "humantime_serde")]
    pub lock_wait: Duration,
    /// The delay before an event that found its lock busy is tried again (`CMDFLOW_BUSY_DELAY`).
    #[serde(with = "humantime_serde")]
    pub busy_delay: Duration,
    /// Delays between attempts after a retryable error, comma-separated
    /// (`CMDFLOW_RETRY_DELAYS`, e.g. `1s,10s,1m,10m`). After the last one, the event is a dead letter.
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
    /// Timers one scheduler claims per transaction (`CMDFLOW_SCHEDULER_BATCH`).
    pub scheduler_batch: i64,
    /// SMTP server for e-mails, `smtp://host[:port]` (`CMDFLOW_SMTP_URL`). Without it, e-mails
    /// are kept and shown in the app.
    pub smtp_url: Option<String>,
    /// The sender of e-mails (`CMDFLOW_MAIL_FROM`).
    pub mail_from: String,
    /// A folder of funnel definitions (`*.toml`) to run besides those the binary registers
    /// (`CMDFLOW_FUNNELS_DIR`). An invalid file stops start-up with its precise error.
    pub funnels_dir: Option<String>,
    /// A folder of message templates (`*.txt`, named after the file) besides those the binary
    /// registers (`CMDFLOW_TEMPLATES_DIR`).
    pub templates_dir: Option<String>,
    /// Whether the binary's example kinds run (`CMDFLOW_EXAMPLES`): on for `cmdflow up` unless
    /// set to `false`, off for every other role unless set to `true`.
    pub examples: Option<bool>,
    /// How long a worker holds a replay job without renewing its lease; a job whose worker
    /// died is taken over after it (`CMDFLOW_REPLAY_LEASE`).
    #[serde(with = "humantime_serde")]
    pub replay_lease: Duration,
    /// Where the `worker` and `scheduler` roles serve `/metrics` and `/healthz`
    /// (`CMDFLOW_METRICS_ADDR`); the gateway serves them on its own address.
    pub metrics_addr: String,
    /// How long ended command trees stay live before the archiver moves them
    /// (`CMDFLOW_ARCHIVE_RETENTION`, e.g. `30d`).
    #[serde(with = "humantime_serde")]
    pub archive_retention: Duration,
    /// Retention per root kind, overriding the default: `kind=duration,…`
    /// (`CMDFLOW_ARCHIVE_RETENTION_BY_KIND`, e.g. `query=7d,quote=90d`).
    pub archive_retention_by_kind: String,
    /// How often the archiver runs (`CMDFLOW_ARCHIVE_INTERVAL`).
    #[serde(with = "humantime_serde")]
    pub archive_interval: Duration,
    /// Trees moved per transaction (`CMDFLOW_ARCHIVE_BATCH`).
    pub archive_batch: i64,
    /// Log format: `json` or `pretty` (`CMDFLOW_LOG_FORMAT`).
    pub log_format: String,
    /// A development key that holds every scope (`CMDFLOW_DEV_KEY`). `cmdflow up` generates and
    /// prints one when this is unset; other roles accept it only when it is set.
    pub dev_key: Option<Secret>,
    /// A TOML file of API keys, stored as SHA-256 hashes with their scopes
    /// (`CMDFLOW_AUTH_KEYS_FILE`); see the README for its format.
    pub auth_keys_file: Option<String>,
    /// The shared secret of HS256 JWTs (`CMDFLOW_JWT_HS256_SECRET`).
    pub jwt_hs256_secret: Option<Secret>,
    /// A PEM file with the public key of RS256 JWTs (`CMDFLOW_JWT_RS256_PUBLIC_KEY_FILE`).
    pub jwt_rs256_public_key_file: Option<String>,
    /// When set, JWTs must carry this `iss` (`CMDFLOW_JWT_ISSUER`).
    pub jwt_issuer: Option<String>,
    /// When set, JWTs must carry this `aud` (`CMDFLOW_JWT_AUDIENCE`).
    pub jwt_audience: Option<String>,
    /// Requests per second one caller (an API key, or a token's subject) may make
    /// (`CMDFLOW_RATE_LIMIT_PER_SECOND`); 0 turns the limit off.
    pub rate_limit_per_second: u32,
    /// Requests one caller may make at once above that rate (`CMDFLOW_RATE_LIMIT_BURST`).
    pub rate_limit_burst: u32,
    /// A PEM bundle of certificate authorities that TLS connections to RabbitMQ (`amqps://`),
    /// PostgreSQL (`sslmode=verify-full`) and Redis (`rediss://`) trust besides the system's
    /// (`CMDFLOW_TLS_CA_FILE`).
    pub tls_ca_file: Option<String>,
    /// How long a stopping process (SIGTERM) lets its in-flight events and requests finish
    /// (`CMDFLOW_SHUTDOWN_GRACE`). Keep it below the pod's `terminationGracePeriodSeconds`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

/// A secret from the environment or a file: never printed, in `Debug` or in logs.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

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
            redis_urls: "redis://127.0.0.1:6379/".to_owned(),
            namespace: "cmdflow".to_owned(),
            http_addr: "127.0.0.1:8080".to_owned(),
            prefetch: 1024,
            concurrency: 4,
            batch: 128,
            lock_enabled: true,
            lock_ttl: Duration::from_secs(30),
            lock_wait: Duration::from_millis(200),
            busy_delay: Duration::from_millis(100),
            retry_delays: "1s,10s,1m,10m".to_owned(),
            outbox_sweep_after: Duration::from_secs(10),
            max_depth: 16,
            max_children: 1000,
            early_event_window: Duration::from_secs(300),
            scheduler_batch: 500,
            smtp_url: None,
            funnels_dir: None,
            templates_dir: None,
            examples: None,
            replay_lease: Duration::from_secs(30),
            metrics_addr: "127.0.0.1:9091".to_owned(),
            archive_retention: Duration::from_secs(30 * 24 * 3600),
            archive_retention_by_kind: String::new(),
            archive_interval: Duration::from_secs(60),
            archive_batch: 200,
            mail_from: "cmdflow <cmdflow@localhost>".to_owned(),
            log_format: "pretty".to_owned(),
            dev_key: None,
            auth_keys_file: None,
            jwt_hs256_secret: None,
            jwt_rs256_public_key_file: None,
            jwt_issuer: None,
            jwt_audience: None,
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
        if self.lock_ttl < Duration::from_secs(1) {
            return invalid("lock_ttl", "must be at least 1s");
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
        Ok(())
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
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        assert_eq!(Config::default().retry_delay_list().unwrap().len(), 4);
    }

    #[test]
    fn bad_values_name_their_field() {
        let config = Config {
            retry_delays: "1s,soon".to_owned(),
            ..Config::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("retry_delays")
        );
        let config = Config {
            namespace: "a b".to_owned(),
            ..Config::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("namespace")
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("redis://127.0.0.1/"), "redis://127.0.0.1/");
    }
}
