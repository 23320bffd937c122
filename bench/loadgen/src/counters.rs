//! W1 and W4: increments of `demo.counter` commands (or their flow and remote twins),
//! published straight to the broker, measured from publish to commit.

use super::*;

impl Run {
    /// Starts `n` counters of `kind` and waits until all are running.
    pub(crate) async fn start_counters(&self, kind: &str, n: usize) -> anyhow::Result<Vec<Uuid>> {
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

    pub(crate) fn increments(&self, targets: &[Uuid], n: usize) -> Vec<Value> {
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
    pub(crate) async fn measure(
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
    pub(crate) async fn w1(&self, name: &str, kind: &str) -> anyhow::Result<Value> {
        if self.args.in_process && kind != "demo.counter" {
            bail!("{name} needs worker processes (drop --in-process)");
        }
        let counters = self.start_counters(kind, self.args.counters).await?;
        let events = self.increments(&counters, self.args.events);
        let mut line = self.measure(name, &counters, events).await?;
        line["kind"] = json!(kind);
        Ok(line)
    }

    pub(crate) async fn w4(&self) -> anyhow::Result<Value> {
        let counter = self.start_counters("demo.counter", 1).await?;
        let events = self.increments(&counter, self.args.hot_events);
        self.measure("W4", &counter, events).await
    }
}
