//! Server roles: `up`, `gateway`, `worker`, `scheduler`, `archiver`, `activities`, `migrate`.

use anyhow::Context;
use cmdflow_gateway::Application;
use cmdflow_gateway::app::Needs;
use cmdflow_shared::bus::Bus;
use cmdflow_shared::config::{Secret, redact_url};
use cmdflow_shared::{Config, store};
use cmdflow_workers::scheduler::Scheduler;
use cmdflow_workers::{Registry, Worker};
use sqlx::migrate::MigrateDatabase;
use tokio_util::sync::CancellationToken;

use crate::App;

/// Cancels the token on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            () = term => {}
        }
        tracing::info!("Stopping: finishing the work in flight.");
        trigger.cancel();
    });
    token
}

/// The `/metrics`, `/healthz` and `/readyz` listener of a role without the gateway.
struct MetricsServer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Stops the listener once the role has finished its work.
    async fn finish(self) {
        self.stop.cancel();
        drop(self.task.await);
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `CMDFLOW_METRICS_ADDR`; readiness turns false
/// when `shutdown` fires, and the listener stays up while the role drains.
async fn metrics_server(
    config: &Config,
    shutdown: &CancellationToken,
    needs: Needs,
) -> anyhow::Result<MetricsServer> {
    let addr = config.metrics_addr.clone();
    // Bind now, so a taken port fails start-up with one line.
    let probe = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (CMDFLOW_METRICS_ADDR)"))?;
    drop(probe);
    let (draining, stop) = (shutdown.clone(), CancellationToken::new());
    let stopping = stop.clone();
    Ok(MetricsServer {
        stop,
        task: tokio::spawn(async move {
            if let Err(e) =
                cmdflow_gateway::app::serve_metrics(&addr, draining, stopping, needs).await
            {
                tracing::error!(error = %e, "The metrics listener stopped.");
            }
        }),
    })
}

/// Creates the database if it does not exist, then applies the migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let url = &config.database_url;
    let exists = sqlx::Postgres::database_exists(url)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", redact_url(url)))?;
    if !exists {
        sqlx::Postgres::create_database(url)
            .await
            .with_context(|| format!("cannot create the database at {}", redact_url(url)))?;
        tracing::info!(database = %redact_url(url), "Created the database.");
    }
    let pool = store::connect(url, 2).await?;
    store::migrate(&pool).await?;
    pool.close().await;
    Ok(())
}

pub async fn up(app: &App, mut config: Config) -> anyhow::Result<()> {
    // A development fleet always has a key with every scope: CMDFLOW_DEV_KEY, or a new one.
    let generated = config.dev_key.is_none();
    let dev_key = config
        .dev_key
        .get_or_insert_with(|| Secret::new(cmdflow_gateway::auth::generate_key()))
        .clone();
    migrate(&config).await?;
    let registry = app.registry(true)?;
    let pool = store::connect(&config.database_url, config.database_pool_size).await?;
    let bus = Bus::for_config(&config, "cmdflow-up").await?;
    let worker = Worker::build_with(&config, registry.clone(), pool.clone(), bus.clone()).await?;
    let scheduler = Scheduler::new(pool.clone(), bus.clone(), &config);
    let archive_pool = pool.clone();
    let kinds = registry.kinds().collect::<Vec<_>>().join(", ");
    let gateway = Application::build_with(&config, pool, bus.clone()).await?;
    let shutdown = shutdown_on_signals();
    println!(
        "cmdflow is up: gateway http://{} · namespace {} · kinds {}",
        gateway.local_addr(),
        config.namespace,
        kinds
    );
    if generated {
        // Printed once, for the person who started the fleet; never logged.
        println!(
            "development key (every scope; set CMDFLOW_DEV_KEY to choose it): export CMDFLOW_TOKEN={}",
            dev_key.expose()
        );
    } else {
        println!("development key: the value of CMDFLOW_DEV_KEY (every scope)");
    }
    let worker_task = tokio::spawn(worker.run_until_stopped(shutdown.clone()));
    let scheduler_task = tokio::spawn(scheduler.run_until_stopped(shutdown.clone()));
    let archiver_task = tokio::spawn(cmdflow_workers::archiver::run_until_stopped(
        archive_pool,
        config.retention()?,
        config.archive_batch,
        config.archive_interval,
        shutdown.clone(),
    ));
    let activities = spawn_activities(app, &bus, &shutdown);
    let served = gateway.run_until_stopped(shutdown.clone()).await;
    shutdown.cancel();
    for task in activities {
        task.await.context("an activity task failed")?;
    }
    worker_task.await.context("the worker task failed")?;
    scheduler_task.await.context("the scheduler task failed")?;
    archiver_task.await.context("the archiver task failed")?;
    bus.close().await;
    served.context("the gateway stopped with an error")
}

pub async fn gateway(config: Config) -> anyhow::Result<()> {
    let app = Application::build(&config).await?;
    tracing::info!(addr = %app.local_addr(), "Gateway listening.");
    let shutdown = shutdown_on_signals();
    app.run_until_stopped(shutdown).await?;
    Ok(())
}

pub async fn scheduler(config: Config) -> anyhow::Result<()> {
    // One connection per cycle in flight, one for LISTEN, one for the next-due and prune queries.
    let connections = cmdflow_workers::scheduler::IN_FLIGHT as u32 + 2;
    let pool = store::connect(&config.database_url, connections).await?;
    store::require_schema(&pool).await?;
    let bus = Bus::for_config(&config, "cmdflow-scheduler").await?;
    bus.set_engine_mark(store::engine_mark(&pool).await?);
    let shutdown = shutdown_on_signals();
    let needs = Needs {
        pool: Some(pool.clone()),
        bus: Some(bus.clone()),
        locks: None,
    };
    let metrics = metrics_server(&config, &shutdown, needs).await?;
    tracing::info!(namespace = %config.namespace, "Scheduler started.");
    Scheduler::new(pool, bus, &config)
        .run_until_stopped(shutdown)
        .await;
    metrics.finish().await;
    Ok(())
}

pub async fn archiver(config: Config) -> anyhow::Result<()> {
    let retention = config.retention()?;
    let pool = store::connect(&config.database_url, 2).await?;
    store::require_schema(&pool).await?;
    let shutdown = shutdown_on_signals();
    let needs = Needs {
        pool: Some(pool.clone()),
        ..Needs::default()
    };
    let metrics = metrics_server(&config, &shutdown, needs).await?;
    tracing::info!(interval = ?config.archive_interval, "Archiver started.");
    cmdflow_workers::archiver::run_until_stopped(
        pool,
        retention,
        config.archive_batch,
        config.archive_interval,
        shutdown,
    )
    .await;
    metrics.finish().await;
    Ok(())
}

pub async fn archive_run(config: Config, dry_run: bool, json: bool) -> anyhow::Result<()> {
    let retention = config.retention()?;
    let pool = store::connect(&config.database_url, 2).await?;
    let eligible = store::archive::eligible(&pool, &retention).await?;
    if dry_run {
        if json {
            println!(
                "{}",
                serde_json::json!({ "eligible_trees": eligible, "dry_run": true })
            );
        } else {
            println!("{eligible} command trees would be archived (dry run: nothing moved)");
        }
        return Ok(());
    }
    let mut shown = crate::cli::progress::Progress::new();
    let moved = cmdflow_workers::archiver::run_all(&pool, &retention, config.archive_batch, |m| {
        if !json {
            let done = (m.trees * 30 / eligible.max(1)).clamp(0, 30) as usize;
            shown.update(format!(
                "[{}{}] {}/{eligible} trees, {} rows",
                "#".repeat(done),
                " ".repeat(30 - done),
                m.trees,
                m.rows()
            ));
        }
    })
    .await?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "trees": moved.trees, "commands": moved.commands, "events": moved.events, "messages": moved.messages })
        );
    } else {
        shown.finish();
        println!(
            "archived {} trees ({} commands, {} history rows, {} messages)",
            moved.trees, moved.commands, moved.events, moved.messages
        );
    }
    Ok(())
}

pub async fn worker(registry: Registry, config: Config) -> anyhow::Result<()> {
    if registry.kinds().next().is_none() {
        // Every event would become a dead letter for its unknown kind.
        anyhow::bail!(
            "this worker runs no kinds: register workflows with cmdflow::App, set CMDFLOW_FUNNELS_DIR, or CMDFLOW_EXAMPLES=true for cmdflow's examples"
        );
    }
    let worker = Worker::build(&config, registry).await?;
    let shutdown = shutdown_on_signals();
    let needs = Needs {
        pool: Some(worker.engine().pool().clone()),
        bus: Some(worker.engine().bus().clone()),
        locks: worker.engine().locks().cloned(),
    };
    let metrics = metrics_server(&config, &shutdown, needs).await?;
    tracing::info!(namespace = %config.namespace, concurrency = config.concurrency, "Worker started.");
    worker.run_until_stopped(shutdown).await;
    metrics.finish().await;
    Ok(())
}

/// Starts each of the app's activities on `bus`, until `shutdown`.
fn spawn_activities(
    app: &App,
    bus: &std::sync::Arc<Bus>,
    shutdown: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    app.activities
        .iter()
        .map(|activity| {
            let activity = activity.clone();
            tokio::spawn(activity.run_until_stopped(bus.clone(), shutdown.clone()))
        })
        .collect()
}

/// The activities role: each of the binary's activities consumes its own queue.
pub async fn activities(app: &App, config: Config) -> anyhow::Result<()> {
    if app.activities.is_empty() {
        anyhow::bail!("this binary registers no activities (App::activity)");
    }
    let bus = Bus::for_config(&config, "cmdflow-activities").await?;
    let shutdown = shutdown_on_signals();
    let needs = Needs {
        bus: Some(bus.clone()),
        ..Needs::default()
    };
    let metrics = metrics_server(&config, &shutdown, needs).await?;
    let names: Vec<&str> = app.activities.iter().map(|a| a.name()).collect();
    tracing::info!(activities = %names.join(", "), "Activities started.");
    for task in spawn_activities(app, &bus, &shutdown) {
        task.await.context("an activity task failed")?;
    }
    bus.close().await;
    metrics.finish().await;
    Ok(())
}
