//! The baseline's workloads b1–b4, in the shapes of W1–W4, on the pipeline of this module.

use super::*;

impl Run {
    async fn baseline_schema(&self) -> anyhow::Result<()> {
        sqlx::raw_sql(SCHEMA).execute(&self.pool).await?;
        Ok(())
    }

    /// Publishes `messages` to the baseline's `queue` as the W workloads publish their events:
    /// in chunks of 500 with confirms, each chunk stamped with its send time.
    async fn publish_baseline(&self, queue: &str, messages: &mut [Value]) -> anyhow::Result<()> {
        for chunk in messages.chunks_mut(500) {
            let now_us = chrono::Utc::now().timestamp_micros();
            let results = futures::future::join_all(chunk.iter_mut().map(|m| {
                m["sent_us"] = json!(now_us);
                let body = serde_json::to_vec(m).unwrap();
                let id = m["id"].as_str().unwrap().to_owned();
                async move {
                    self.bus
                        .publish("", queue, &body, event_properties(&id))
                        .await
                }
            }))
            .await;
            for r in results {
                r?;
            }
        }
        Ok(())
    }

    /// The settings every baseline line reports.
    fn baseline_settings(&self) -> Value {
        json!({
            "consumers": self.args.concurrency,
            "prefetch": self.args.prefetch,
            "pool": self.config.database_pool_size,
            "lock": !self.args.no_lock,
        })
    }

    /// B1: W1's shape on the baseline.
    pub async fn b1(&self) -> anyhow::Result<Value> {
        self.baseline_counters("B1", "b1", self.args.counters, self.args.events)
            .await
    }

    /// B4: W4's shape (one hot counter) on the baseline.
    pub async fn b4(&self) -> anyhow::Result<Value> {
        self.baseline_counters("B4", "b4", 1, self.args.hot_events)
            .await
    }

    async fn baseline_counters(
        &self,
        name: &str,
        workload: &str,
        counters: usize,
        events: usize,
    ) -> anyhow::Result<Value> {
        self.baseline_schema().await?;
        let ids: Vec<Uuid> = (0..counters.max(1)).map(|_| Uuid::now_v7()).collect();
        sqlx::query("INSERT INTO baseline_counters (id) SELECT unnest($1::uuid[])")
            .bind(&ids)
            .execute(&self.pool)
            .await?;
        let pipeline = Pipeline::start(self, workload).await?;
        let consumers = pipeline
            .consume(self.args.concurrency, self.args.prefetch)
            .await?;
        let mut messages: Vec<Value> = (0..events)
            .map(|i| {
                json!({"type": "increment", "id": Uuid::now_v7().to_string(),
                       "counter": ids[i % ids.len()].to_string()})
            })
            .collect();
        let expected = events as i64;
        let started = Instant::now();
        let publisher = async {
            self.publish_baseline(&pipeline.queue, &mut messages)
                .await?;
            anyhow::Ok(started.elapsed())
        };
        let drain = self.sum_reaches(
            name,
            "SELECT sum(n)::bigint FROM baseline_counters WHERE id = ANY($1)",
            &ids,
            expected,
        );
        let outcome = tokio::try_join!(publisher, drain);
        let elapsed = started.elapsed();
        consumers.stop().await;
        let (published_in, total) = outcome?;
        if total != expected {
            bail!("{name}: counters add up to {total}, expected {expected} (doubled events)");
        }
        let mut latencies: Vec<f64> = sqlx::query_scalar(
            "SELECT (extract(epoch FROM at) * 1e6 - sent_us)::float8 / 1000.0
               FROM baseline_history WHERE counter_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| percentile(&latencies, p);
        let mut line = json!({
            "workload": name,
            "baseline": true,
            "events": expected,
            "counters": ids.len(),
            "published_s": (published_in.as_secs_f64() * 1000.0).round() / 1000.0,
            "elapsed_s": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "events_per_s": (expected as f64 / elapsed.as_secs_f64()).round(),
            "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
            "exact": true,
        });
        merge(&mut line, self.baseline_settings());
        Ok(line)
    }

    /// B2: W2's shape (parents × children counting down in the parent's row) on the baseline.
    pub async fn b2(&self) -> anyhow::Result<Value> {
        self.baseline_schema().await?;
        let pipeline = Pipeline::start(self, "b2").await?;
        let consumers = pipeline
            .consume(self.args.concurrency, self.args.prefetch)
            .await?;
        let parents: Vec<Uuid> = (0..self.args.parents).map(|_| Uuid::now_v7()).collect();
        let mut messages: Vec<Value> = parents
            .iter()
            .map(|id| {
                json!({"type": "parent", "id": Uuid::now_v7().to_string(),
                       "parent": id.to_string(), "children": self.args.children})
            })
            .collect();
        let started = Instant::now();
        let run = async {
            self.publish_baseline(&pipeline.queue, &mut messages)
                .await?;
            poll_until("B2", || async {
                let done: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM baseline_parents WHERE id = ANY($1) AND done_at IS NOT NULL",
                )
                .bind(&parents)
                .fetch_one(&self.pool)
                .await?;
                Ok(if done as usize == parents.len() {
                    Polled::Done(())
                } else {
                    Polled::Waiting(format!("only {done} of {} parents completed", parents.len()))
                })
            })
            .await
        };
        let outcome = run.await;
        let elapsed = started.elapsed();
        consumers.stop().await;
        outcome?;
        let (children, steps): (i64, i64) = sqlx::query_as(
            "SELECT count(*), coalesce(sum(steps), 0)::bigint FROM baseline_children WHERE parent_id = ANY($1)",
        )
        .bind(&parents)
        .fetch_one(&self.pool)
        .await?;
        let expected_children = (self.args.parents * self.args.children) as i64;
        if children != expected_children || steps != expected_children {
            bail!(
                "B2: {children} children with {steps} steps, expected {expected_children} of each"
            );
        }
        let mut latencies: Vec<f64> = sqlx::query_scalar(
            "SELECT (extract(epoch FROM done_at) * 1e6 - sent_us)::float8 / 1000.0
               FROM baseline_parents WHERE id = ANY($1)",
        )
        .bind(&parents)
        .fetch_all(&self.pool)
        .await?;
        latencies.sort_by(f64::total_cmp);
        let secs = elapsed.as_secs_f64();
        // Messages consumed: one per parent and one per child.
        let consumed = self.args.parents as i64 + children;
        let mut line = json!({
            "workload": "B2",
            "baseline": true,
            "parents": self.args.parents,
            "children_per_parent": self.args.children,
            "elapsed_s": (secs * 1000.0).round() / 1000.0,
            "parents_per_s": (self.args.parents as f64 / secs * 10.0).round() / 10.0,
            "messages": consumed,
            "messages_per_s": (consumed as f64 / secs).round(),
            "parent_latency_ms": {"p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99), "max": percentile(&latencies, 1.0)},
            "exact": true,
        });
        merge(&mut line, self.baseline_settings());
        Ok(line)
    }

    /// B3: W3's shape (timers due uniformly over the span) on the baseline: one poller every
    /// 2 ms, claiming with `FOR UPDATE SKIP LOCKED`.
    pub async fn b3(&self) -> anyhow::Result<Value> {
        self.baseline_schema().await?;
        let pipeline = Pipeline::start(self, "b3").await?;
        let consumers = pipeline
            .consume(self.args.concurrency, self.args.prefetch)
            .await?;
        let n = self.args.timers;
        let span_us = (self.args.timer_span_s * 1_000_000) as i64;
        let lead = chrono::Duration::seconds(2);
        let t0 = chrono::Utc::now() + lead;
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
        let due: Vec<chrono::DateTime<chrono::Utc>> = (0..n)
            .map(|i| t0 + chrono::Duration::microseconds(span_us * i as i64 / n.max(1) as i64))
            .collect();
        sqlx::query(
            "INSERT INTO baseline_timers (id, due_at) SELECT * FROM unnest($1::uuid[], $2::timestamptz[])",
        )
        .bind(&ids)
        .bind(&due)
        .execute(&self.pool)
        .await?;
        let ready_before_first_due = chrono::Utc::now() < t0;
        let stop = CancellationToken::new();
        let batch = self.config.scheduler_batch;
        let poller = {
            let (pipeline, stop) = (Arc::clone(&pipeline), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    match pipeline.fire_due(batch).await {
                        Ok(fired) if fired as i64 >= batch => {}
                        Ok(_) => tokio::time::sleep(POLL_EVERY).await,
                        Err(e) => {
                            eprintln!("baseline: poll timers: {e:#}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(self.args.timer_span_s + 120);
        let waited = async {
            loop {
                let fired: i64 = sqlx::query_scalar(
                    "SELECT count(DISTINCT timer_id) FROM baseline_firings WHERE timer_id = ANY($1)",
                )
                .bind(&ids)
                .fetch_one(&self.pool)
                .await?;
                if fired as usize >= n || Instant::now() > deadline {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        .await;
        // Let stray doubles, if any, arrive, as W3 does.
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.cancel();
        drop(poller.await);
        consumers.stop().await;
        waited?;
        let rows: Vec<(f64, f64)> = sqlx::query_as(
            "SELECT ((extract(epoch FROM fired_at) - extract(epoch FROM due_at)) * 1000.0)::float8,
                    ((extract(epoch FROM at) - extract(epoch FROM due_at)) * 1000.0)::float8
               FROM (SELECT DISTINCT ON (timer_id) * FROM baseline_firings
                      WHERE timer_id = ANY($1) ORDER BY timer_id, at) f",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let doubled: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT timer_id FROM baseline_firings WHERE timer_id = ANY($1)
               GROUP BY timer_id HAVING count(*) > 1) d",
        )
        .bind(&ids)
        .fetch_one(&self.pool)
        .await?;
        let fired = rows.len();
        let mut lateness: Vec<f64> = rows.iter().map(|r| r.0).collect();
        let mut applied: Vec<f64> = rows.iter().map(|r| r.1).collect();
        lateness.sort_by(f64::total_cmp);
        applied.sort_by(f64::total_cmp);
        let mut line = json!({
            "workload": "B3",
            "baseline": true,
            "timers": n,
            "span_s": self.args.timer_span_s,
            "poll_ms": POLL_EVERY.as_millis() as u64,
            "batch": batch,
            "ready_before_first_due": ready_before_first_due,
            "fired": fired,
            "missed": n - fired,
            "doubled": doubled,
            "lateness_ms": {"p50": percentile(&lateness, 0.5), "p99": percentile(&lateness, 0.99), "max": percentile(&lateness, 1.0)},
            "due_to_commit_ms": {"p50": percentile(&applied, 0.5), "p99": percentile(&applied, 0.99), "max": percentile(&applied, 1.0)},
        });
        merge(&mut line, self.baseline_settings());
        Ok(line)
    }
}

/// Adds the fields of `extra` to the object `line`.
fn merge(line: &mut Value, extra: Value) {
    if let (Some(line), Value::Object(extra)) = (line.as_object_mut(), extra) {
        line.extend(extra);
    }
}
