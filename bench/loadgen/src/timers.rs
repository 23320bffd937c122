//! W3 (timers due over a span: lateness, missed and doubled firings) and timers1m (a million
//! pending timers: the claim's plan and the scheduler's memory).

use super::*;

impl Run {
    pub(crate) async fn w3(&self) -> anyhow::Result<Value> {
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

        let pending = self.args.pending_timers;
        if pending > 0 {
            self.add_pending_timers(pending).await?;
            sqlx::query("ANALYZE timers").execute(&self.pool).await?;
        }
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
                let waiting: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM timers WHERE name <> 'pending'")
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
            "pending_timers": pending,
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

    /// Puts `n` timers named `pending` into the table, due in a day (1 ms apart), for no command:
    /// nothing fires them while a run lasts.
    async fn add_pending_timers(&self, n: usize) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO timers (command_id, name, kind, due_at)
             SELECT gen_random_uuid(), 'pending', 'at', now() + interval '1 day' + g * interval '1 ms'
               FROM generate_series(1, $1) g",
        )
        .bind(n as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn timers_1m(&self) -> anyhow::Result<Value> {
        self.add_pending_timers(1_000_000).await?;
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
}
