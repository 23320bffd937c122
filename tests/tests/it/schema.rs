//! Rolling back past a migration: every role agrees on which databases a binary may run against.
//! A database holding a newer migration that is marked compatible (`schema_compat`, an
//! expand-only migration) is fine for `migrate`, the worker and the gateway alike; one holding a
//! newer migration that is not marked is refused by all of them, naming it; a database that lacks
//! one of the binary's own migrations is refused by the roles that do not migrate, which say to
//! run `cmdflow migrate`.

#![allow(clippy::unwrap_used)]

use cmdflow_gateway::Application;
use cmdflow_shared::store::{self, Schema};
use cmdflow_tests::TestEnv;
use cmdflow_workers::Worker;

/// Records `version` as applied, as a newer binary's `migrate` would, and marks it compatible or
/// not.
async fn applied_by_a_newer_binary(env: &TestEnv, version: i64, compatible: Option<bool>) {
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES ($1, 'from a newer release', true, '\\x00', 1)",
    )
    .bind(version)
    .execute(&env.pool)
    .await
    .unwrap();
    if let Some(compatible) = compatible {
        sqlx::query(
            "INSERT INTO schema_compat (version, compatible, note) VALUES ($1, $2, 'test')",
        )
        .bind(version)
        .bind(compatible)
        .execute(&env.pool)
        .await
        .unwrap();
    }
}

/// What a worker and a gateway say about the database as they build.
async fn role_verdicts(env: &TestEnv) -> (Result<(), String>, Result<(), String>) {
    let worker = Worker::build(&env.config, cmdflow_tests::registry())
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    let gateway = Application::build(&env.config)
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    (worker, gateway)
}

/// What each role says about the database: `migrate`, a worker, a gateway, and the binary's
/// own `cmdflow migrate`.
async fn verdicts(env: &TestEnv) -> [Result<(), String>; 4] {
    let migrate = store::migrate(&env.pool).await.map_err(|e| e.to_string());
    let (worker, gateway) = role_verdicts(env).await;
    let out = tokio::process::Command::new(cmdflow_tests::fleet::cmdflow_binary())
        .arg("migrate")
        .env("CMDFLOW_DATABASE_URL", &env.config.database_url)
        .env("RUST_LOG", "error")
        .output()
        .await
        .unwrap();
    let binary = if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    [migrate, worker, gateway, binary]
}

#[tokio::test]
async fn a_newer_compatible_migration_is_run_against_by_every_role() {
    let env = TestEnv::new().await;
    applied_by_a_newer_binary(&env, 9001, Some(true)).await;
    let schema = Schema::read(&env.pool).await.unwrap();
    assert_eq!(
        schema,
        Schema {
            ahead: vec![9001],
            ..Schema::default()
        }
    );
    for (role, verdict) in ["migrate", "worker", "gateway", "cmdflow migrate"]
        .iter()
        .zip(verdicts(&env).await)
    {
        assert!(verdict.is_ok(), "{role}: {verdict:?}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_newer_migration_not_marked_compatible_is_refused_by_every_role() {
    let env = TestEnv::new().await;
    applied_by_a_newer_binary(&env, 9002, None).await;
    applied_by_a_newer_binary(&env, 9003, Some(false)).await;
    for (role, verdict) in ["migrate", "worker", "gateway", "cmdflow migrate"]
        .iter()
        .zip(verdicts(&env).await)
    {
        let why = verdict.expect_err(role);
        assert!(
            why.contains("[9002, 9003]") && why.contains("not marked compatible"),
            "{role}: {why}"
        );
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_database_behind_the_binary_is_refused_until_migrated() {
    let env = TestEnv::new().await;
    // The last migration undone, as on a database the previous release migrated: its record
    // and its compatibility mark (its statements run again over themselves).
    let last = store::MIGRATOR.iter().map(|m| m.version).max().unwrap();
    sqlx::query("DELETE FROM schema_compat WHERE version = $1")
        .bind(last)
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(last)
        .execute(&env.pool)
        .await
        .unwrap();
    let schema = Schema::read(&env.pool).await.unwrap();
    assert_eq!(schema.missing, vec![last]);
    let (worker, gateway) = role_verdicts(&env).await;
    for (role, verdict) in [("worker", worker), ("gateway", gateway)] {
        let why = verdict.expect_err(role);
        assert!(
            why.contains(&format!("[{last}]")) && why.contains("cmdflow migrate"),
            "{role}: {why}"
        );
    }
    store::migrate(&env.pool).await.unwrap();
    assert_eq!(Schema::read(&env.pool).await.unwrap(), Schema::default());
    for verdict in verdicts(&env).await {
        assert!(verdict.is_ok(), "{verdict:?}");
    }
    env.cleanup().await;
}
