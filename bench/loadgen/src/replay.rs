//! Replays of dead letters: at full speed, then throttled.

use super::*;

impl Run {
    pub(crate) async fn replay(&self) -> anyhow::Result<Value> {
        use cmdflow_shared::store::dead::{self, Filter};
        let seed = |n: i64, signature: &'static str| {
            let pool = self.pool.clone();
            async move {
                sqlx::query(
                    "INSERT INTO dead_letters (dead_id, event_source, event_id, event_type, routing_key, body, reason,
                                               error_class, signature, attempts, first_failed_at, last_failed_at)
                     SELECT gen_random_uuid()::text, 'loadgen', e.id, 'demo.increment', 'demo.increment',
                            convert_to(json_build_object('specversion', '1.0', 'id', e.id, 'source', 'loadgen',
                                       'type', 'demo.increment', 'commandid', gen_random_uuid(), 'data', json_build_object())::text, 'UTF8'),
                            'seeded', 'permanent', $2, 1, now(), now()
                       FROM (SELECT gen_random_uuid()::text AS id FROM generate_series(1, $1)) e",
                )
                .bind(n)
                .bind(signature)
                .execute(&pool)
                .await
            }
        };
        seed(100_000, "permanent:full").await?;
        seed(10_000, "permanent:throttled").await?;
        let mut lines = Vec::new();
        for (signature, rate) in [
            ("permanent:full", None),
            ("permanent:throttled", Some(1000)),
        ] {
            let filter = Filter {
                signature: Some(signature.to_owned()),
                ..Filter::default()
            };
            let total = dead::count(&self.pool, &filter).await?;
            let job = dead::create_job(&self.pool, "loadgen", &filter, rate, total).await?;
            let started = Instant::now();
            let done = cmdflow_workers::replays::run_replay(&self.pool, &self.bus, job.id).await?;
            let secs = started.elapsed().as_secs_f64();
            lines.push(json!({
                "replayed": done.replayed,
                "rate_limit": rate,
                "elapsed_s": (secs * 100.0).round() / 100.0,
                "replayed_per_s": (f64::from(done.replayed) / secs).round(),
            }));
        }
        Ok(json!({ "workload": "replay", "runs": lines }))
    }
}
