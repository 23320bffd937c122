//! Archiving ended commands while clients read the feed.

use super::*;
use crate::feed::read_feeds;

impl Run {
    pub(crate) async fn archive(&self) -> anyhow::Result<Value> {
        let n: i64 = 1_000_000;
        let owners: i64 = 100_000;
        sqlx::query(
            "INSERT INTO commands (id, kind, owner, root_id, state, data, result, created_at, updated_at, ended_at)
             SELECT id, 'query', 'member:' || (g % $2), id, 'completed', jsonb_build_object('q', 'search ' || g),
                    '{}'::jsonb, now() - interval '40 days', now() - interval '40 days', now() - interval '40 days'
               FROM (SELECT gen_random_uuid() AS id, g FROM generate_series(1, $1) g) s",
        )
        .bind(n)
        .bind(owners)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "INSERT INTO command_events (command_id, version, entry, event_type, from_state, to_state, at)
             SELECT id, 1, 'received', 'command.start', NULL::command_state, NULL::command_state, created_at FROM commands
             UNION ALL
             SELECT id, 1, 'state_changed', NULL, 'pending'::command_state, 'completed'::command_state, created_at FROM commands",
        )
        .execute(&self.pool)
        .await?;
        // Live commands the feed reads while archival runs.
        sqlx::query(
            "INSERT INTO commands (id, kind, owner, root_id, state, data, created_at, updated_at)
             SELECT id, 'quote', 'member:' || (g % $1), id, 'running', '{}'::jsonb, now(), now()
               FROM (SELECT gen_random_uuid() AS id, g FROM generate_series(1, $1) g) s",
        )
        .bind(owners)
        .execute(&self.pool)
        .await?;
        sqlx::query("ANALYZE").execute(&self.pool).await?;

        let config = Config {
            http_addr: "127.0.0.1:0".to_owned(),
            archive_retention: Duration::from_secs(30 * 24 * 3600),
            ..self.config.clone()
        };
        let (base, gateway) = self.serve_gateway(&config).await?;
        let readers = read_feeds(&base, 20, owners as u64, 0)?;
        let retention = config.retention()?;
        let started = Instant::now();
        let moved =
            cmdflow_workers::archiver::run_all(&self.pool, &retention, 1000, |_| {}).await?;
        let secs = started.elapsed().as_secs_f64();
        let (lat, failed) = readers.finish().await?;
        // The gateway stops after its readers, so no request is cut off.
        gateway.stop().await;
        Ok(json!({
            "workload": "archive",
            "trees": moved.trees,
            "rows_moved": moved.rows(),
            "elapsed_s": (secs * 10.0).round() / 10.0,
            "rows_per_s": (moved.rows() as f64 / secs).round(),
            "feed_during_archival": {
                "clients": 20,
                "requests": lat.len(),
                "failed": failed,
                "p50_ms": percentile(&lat, 0.5),
                "p99_ms": percentile(&lat, 0.99),
                "max_ms": percentile(&lat, 1.0),
            },
        }))
    }
}
