//! W2 and W2s: fan-outs of `demo.noop` children, each child's end reported to its parent
//! (`each`) or counted into its group (`settled`).

use super::*;

impl Run {
    pub(crate) async fn w2(&self, reports: Reports) -> anyhow::Result<Value> {
        let name = match reports {
            Reports::Each => "W2",
            Reports::Settled => "W2s",
        };
        let parents: Vec<Uuid> = (0..self.args.parents).map(|_| Uuid::now_v7()).collect();
        let started = Instant::now();
        let mut events: Vec<Value> = parents
            .iter()
            .map(|id| {
                json!({
                    "specversion": "1.0", "id": Uuid::now_v7().to_string(), "source": "loadgen",
                    "type": "command.start", "commandid": id.to_string(),
                    "data": {"kind": "demo.fanout", "owner": "system:loadgen",
                             "data": {"children": self.args.children, "reports": reports.as_str()}},
                })
            })
            .collect();
        for chunk in events.chunks_mut(500) {
            let now_us = chrono::Utc::now().timestamp_micros();
            for e in chunk.iter_mut() {
                e["data"]["data"]["sent_us"] = json!(now_us);
            }
            self.publish_all(chunk).await?;
        }
        poll_until(name, || async {
            let (done, failed): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE state = 'completed'), count(*) FILTER (WHERE state IN ('failed', 'aborted'))
                   FROM commands WHERE id = ANY($1)",
            )
            .bind(&parents)
            .fetch_one(&self.pool)
            .await?;
            if failed > 0 {
                bail!("{name}: {failed} parents failed or were aborted");
            }
            Ok(if done as usize == parents.len() {
                Polled::Done(())
            } else {
                Polled::Waiting(format!("only {done} of {} parents completed", parents.len()))
            })
        })
        .await?;
        let elapsed = started.elapsed();
        let (children, steps): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM commands WHERE root_id = ANY($1) AND parent_id IS NOT NULL AND state = 'completed'),
                    (SELECT count(*) FROM command_events e JOIN commands c ON c.id = e.command_id
                      WHERE c.root_id = ANY($1) AND e.entry = 'received')",
        )
        .bind(&parents)
        .fetch_one(&self.pool)
        .await?;
        let expected_children = (self.args.parents * self.args.children) as i64;
        if children != expected_children {
            bail!("{name}: {children} children completed, expected {expected_children}");
        }
        let mut latencies: Vec<f64> = sqlx::query_scalar(
            "SELECT (extract(epoch FROM ended_at) * 1e6 - (data->>'sent_us')::float8) / 1000.0
               FROM commands WHERE id = ANY($1)",
        )
        .bind(&parents)
        .fetch_all(&self.pool)
        .await?;
        latencies.sort_by(f64::total_cmp);
        let secs = elapsed.as_secs_f64();
        Ok(json!({
            "workload": name,
            "reports": reports.as_str(),
            "parents": self.args.parents,
            "children_per_parent": self.args.children,
            "workers": self.args.workers,
            "in_process": self.args.in_process,
            "concurrency": self.args.concurrency,
            "prefetch": self.args.prefetch,
            "batch": self.args.batch,
            "lock": !self.args.no_lock,
            "elapsed_s": (secs * 1000.0).round() / 1000.0,
            "parents_per_s": (self.args.parents as f64 / secs * 10.0).round() / 10.0,
            "steps": steps,
            "steps_per_s": (steps as f64 / secs).round(),
            "parent_latency_ms": {"p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99), "max": percentile(&latencies, 1.0)},
            "exact": true,
        }))
    }
}
