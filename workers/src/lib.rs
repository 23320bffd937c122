//! cmdflow's worker role: the engine that applies events to commands, the registry of the kinds
//! it runs (filled by the binary that runs it), and the loops that run beside it: the outbox
//! sweeper, the dead-letter keeper, the replay runner, the mailer and the gauges read from the
//! stores.

pub mod archiver;
pub mod dead_letters;
pub mod engine;
pub mod fanin;
pub mod flows;
pub mod gauges;
pub mod mailer;
pub mod messages;
pub mod registry;
pub mod remote;
pub mod replays;
pub mod scheduler;
pub mod workflow;

use std::sync::Arc;

use cmdflow_shared::bus::Bus;
use cmdflow_shared::lock::Locks;
use cmdflow_shared::{Config, store};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use engine::{Applied, Disposition, Engine, EngineSettings, RetryCause};
pub use registry::{Handler, Registry, RegistryError};
pub use workflow::Workflow;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] cmdflow_shared::config::ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Bus(#[from] cmdflow_shared::bus::BusError),
    #[error(transparent)]
    Lock(#[from] cmdflow_shared::lock::LockError),
    /// A flow whose version names another text in the store.
    #[error("{0}")]
    Flow(String),
}

/// A worker: its engine and the connections it was built with.
pub struct Worker {
    engine: Arc<Engine>,
    /// `(smtp_url, from, retry)` when e-mails are sent.
    mail: Option<(String, String, mailer::Retry)>,
    replay_lease: std::time::Duration,
    /// `CMDFLOW_DEAD_LETTER_MAX_BODY`, for the dead-letter keeper.
    dead_letter_max_body: usize,
}

impl Worker {
    /// Connects to the three services (failing with one clear line if one is unreachable),
    /// declares the topology and builds the engine.
    pub async fn build(config: &Config, registry: Registry) -> Result<Worker, WorkerError> {
        let lock_timeout = config.lock_enabled.then_some(config.lock_ttl);
        let pool = store::connect_with_lock_timeout(
            &config.database_url,
            config.database_pool_size,
            lock_timeout,
        )
        .await?;
        // Redis before RabbitMQ: each is checked once, and an unreachable one is named at once.
        let locks = Self::locks(config).await?;
        let bus = Bus::for_config(config, "cmdflow-worker").await?;
        Self::assemble(config, registry, pool, bus, locks).await
    }

    /// Builds on connections the caller already holds (one process running several roles).
    pub async fn build_with(
        config: &Config,
        registry: Registry,
        pool: PgPool,
        bus: Arc<Bus>,
    ) -> Result<Worker, WorkerError> {
        let locks = Self::locks(config).await?;
        Self::assemble(config, registry, pool, bus, locks).await
    }

    /// The Redlock quorum, checked, or none when locking is disabled.
    async fn locks(config: &Config) -> Result<Option<Locks>, WorkerError> {
        if !config.lock_enabled {
            tracing::warn!(
                "Redlock is disabled: only the guarded update fences concurrent writers."
            );
            return Ok(None);
        }
        let locks = Locks::new(
            &config.redis_url_list(),
            &config.namespace,
            config.lock_ttl,
            config.lock_wait,
        )?;
        locks.check_quorum().await?;
        Ok(Some(locks))
    }

    async fn assemble(
        config: &Config,
        registry: Registry,
        pool: PgPool,
        bus: Arc<Bus>,
        locks: Option<Locks>,
    ) -> Result<Worker, WorkerError> {
        let settings = EngineSettings::from_config(config)?;
        // A database this binary cannot run against stops it here, saying why.
        store::require_schema(&pool).await?;
        bus.declare_topology().await?;
        bus.set_engine_mark(store::engine_mark(&pool).await?);
        let registry = flows::sync_versions(&pool, registry).await?;
        // The gateway checks starts against what the workers publish here.
        store::kinds::publish(&pool, &registry.catalogue()).await?;
        let engine = Arc::new(Engine::new(pool, bus, locks, Arc::new(registry), settings));
        let mail = config.smtp_url.clone().map(|url| {
            (
                url,
                config.mail_from.clone(),
                mailer::Retry::from_config(config),
            )
        });
        Ok(Worker {
            engine,
            mail,
            replay_lease: config.replay_lease,
            dead_letter_max_body: config.dead_letter_max_body,
        })
    }

    /// Uses `clock` for "now" when timers are set (tests).
    pub fn with_clock(self, clock: Arc<dyn cmdflow_shared::time::Clock>) -> Self {
        let engine = Arc::try_unwrap(self.engine)
            .map(|e| Arc::new(e.with_clock(clock)))
            .unwrap_or_else(|shared| shared);
        Worker {
            engine,
            mail: self.mail,
            replay_lease: self.replay_lease,
            dead_letter_max_body: self.dead_letter_max_body,
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Consumes and sweeps until `shutdown` fires; then drains in-flight events and returns.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) {
        let sweeper =
            tokio::spawn(Arc::clone(&self.engine).sweep_outbox_until_stopped(shutdown.clone()));
        let mailer = self.mail.and_then(|(url, from, retry)| {
            match mailer::Mailer::new(self.engine.pool().clone(), &url, &from, retry) {
                Ok(mailer) => Some(tokio::spawn(mailer.send_until_stopped(shutdown.clone()))),
                Err(e) => {
                    tracing::error!(error = %e, "The mailer cannot start; e-mails stay pending.");
                    None
                }
            }
        });
        let keeper = tokio::spawn(dead_letters::keep_until_stopped(
            self.engine.pool().clone(),
            Arc::clone(self.engine.bus()),
            self.dead_letter_max_body,
            shutdown.clone(),
        ));
        let replays = replays::Runner::new(
            self.engine.pool().clone(),
            Arc::clone(self.engine.bus()),
            self.replay_lease,
        );
        let replays = tokio::spawn(replays.run_until_stopped(shutdown.clone()));
        let gauges = tokio::spawn(gauges::refresh_until_stopped(
            self.engine.pool().clone(),
            Arc::clone(self.engine.bus()),
            shutdown.clone(),
        ));
        Arc::clone(&self.engine).run_until_stopped(shutdown).await;
        drop(gauges.await);
        drop(sweeper.await);
        drop(keeper.await);
        drop(replays.await);
        if let Some(mailer) = mailer {
            drop(mailer.await);
        }
    }
}
