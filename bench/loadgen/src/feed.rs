//! The owner feed: seeded with commands of many owners, read by clients through a gateway,
//! alone (`feed`) or while W1 runs (`feedw1`).

use super::*;

impl Run {
    /// Seeds `--feed-commands` commands of one owner per 10 commands (`member:0..owners`) with
    /// their history (two lines and a dedupe row each), messages and identities, and analyzes. Returns the owners and how long it took.
    pub(crate) async fn seed_feed(&self) -> anyhow::Result<(u64, Duration)> {
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
        // Each command's history as the engine writes it: its start received, its state
        // changed, and the start's dedupe row.
        sqlx::query(
            "INSERT INTO command_events (command_id, version, entry, event_id, event_type, to_state, at)
             SELECT id, 1, 'received', 'seed-' || id, 'command.start', NULL, created_at FROM commands
             UNION ALL
             SELECT id, 1, 'state_changed', NULL, NULL, state, updated_at FROM commands",
        )
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "INSERT INTO processed_events (command_id, source, event_id, processed_at)
             SELECT id, 'seed', 'seed-' || id, created_at FROM commands",
        )
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

    pub(crate) async fn feed(&self) -> anyhow::Result<Value> {
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
    pub(crate) async fn feed_w1(&self) -> anyhow::Result<Value> {
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

    /// The gateway the feed readers use: a `cmdflow gateway` process, as in production, so that
    /// its latency is not the load generator's (which publishes the load on its own runtime).
    /// With `--in-process`, one inside this process. Its pool holds 16 connections.
    pub(crate) async fn serve_gateway(&self, config: &Config) -> anyhow::Result<(String, Gateway)> {
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
}

/// A gateway serving the feed readers.
pub(crate) enum Gateway {
    Process(Child),
    InProcess(CancellationToken),
}

impl Gateway {
    pub(crate) async fn stop(self) {
        match self {
            Gateway::Process(mut child) => drop(child.kill().await),
            Gateway::InProcess(stop) => stop.cancel(),
        }
    }
}

/// Feed clients at work; [`FeedReaders::finish`] stops them.
pub(crate) struct FeedReaders {
    /// Each client's latencies of its successful requests (ms), and how many failed.
    clients: Vec<tokio::task::JoinHandle<(Vec<f64>, u64)>>,
    stop: CancellationToken,
    /// The clients' own runtime (one thread): a UI does not share its threads with the process
    /// that publishes the load, so neither do the clients that stand in for it.
    runtime: tokio::runtime::Runtime,
}

impl FeedReaders {
    /// Stops the clients: every latency, sorted, and how many requests failed.
    pub(crate) async fn finish(self) -> anyhow::Result<(Vec<f64>, u64)> {
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
pub(crate) fn read_feeds(
    base: &str,
    clients: u64,
    owners: u64,
    rate: u64,
) -> anyhow::Result<FeedReaders> {
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
