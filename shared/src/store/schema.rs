//! Migrations, and which databases a binary may run against (expand/contract: newer
//! migrations marked compatible are fine, others are refused by name).

use sqlx::PgPool;

use super::*;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Applies the migrations this binary knows that the database lacks. A database that already
/// holds migrations of a newer binary is left as it is when each of them is marked compatible
/// (`schema_compat`, an expand-only migration), and refused otherwise, naming them.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    let schema = Schema::read(pool).await?;
    schema.refuse_incompatible()?;
    if schema.ahead.is_empty() {
        MIGRATOR.run(pool).await?;
    } else {
        tracing::warn!(ahead = ?schema.ahead, "The database holds newer migrations than this binary, each marked compatible; applying only what is missing.");
        // The same migrations, told to ignore the applied ones it does not know. (The fields
        // are those `migrate!` fills; sqlx's Migrator is not Clone.)
        let migrator = sqlx::migrate::Migrator {
            migrations: MIGRATOR.migrations.clone(),
            ignore_missing: true,
            locking: MIGRATOR.locking,
            no_tx: MIGRATOR.no_tx,
            table_name: MIGRATOR.table_name.clone(),
            create_schemas: MIGRATOR.create_schemas.clone(),
        };
        migrator.run(pool).await?;
    }
    Ok(())
}

/// What the database's migrations are, against those this binary knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Schema {
    /// Known to this binary and not applied: the database is behind (run `cmdflow migrate`).
    pub missing: Vec<i64>,
    /// Applied, unknown to this binary, and marked compatible: a newer binary migrated, and
    /// this one may run against it (a rollback).
    pub ahead: Vec<i64>,
    /// Applied, unknown to this binary, and not marked compatible: this binary must not run.
    pub incompatible: Vec<i64>,
}

impl Schema {
    /// Reads the applied migrations (none on a fresh database) and the compatibility marks.
    pub async fn read(pool: &PgPool) -> Result<Schema> {
        let applied: Vec<i64> = if table_exists(pool, &MIGRATOR.table_name).await? {
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT version FROM {} WHERE success ORDER BY version",
                MIGRATOR.table_name
            )))
            .fetch_all(pool)
            .await?
        } else {
            Vec::new()
        };
        let compatible: Vec<i64> = if table_exists(pool, "schema_compat").await? {
            sqlx::query_scalar("SELECT version FROM schema_compat WHERE compatible")
                .fetch_all(pool)
                .await?
        } else {
            Vec::new()
        };
        let known: Vec<i64> = MIGRATOR
            .iter()
            .filter(|m| !m.migration_type.is_down_migration())
            .map(|m| m.version)
            .collect();
        let (ahead, incompatible) = applied
            .iter()
            .filter(|v| !known.contains(v))
            .partition(|v| compatible.contains(v));
        Ok(Schema {
            missing: known.into_iter().filter(|v| !applied.contains(v)).collect(),
            ahead,
            incompatible,
        })
    }

    /// Err naming the migrations this binary cannot run against.
    pub fn refuse_incompatible(&self) -> Result<()> {
        if self.incompatible.is_empty() {
            return Ok(());
        }
        Err(StoreError::Schema(format!(
            "the database holds migration(s) {:?}, which this binary does not know and which are \
             not marked compatible with older binaries (schema_compat): run the cmdflow release \
             that applied them, or a newer one",
            self.incompatible
        )))
    }

    /// For a role that does not migrate (gateway, worker, scheduler, archiver): Err unless this
    /// binary can run against the database as it is. Newer compatible migrations are fine.
    pub fn require_runnable(&self) -> Result<()> {
        self.refuse_incompatible()?;
        if !self.missing.is_empty() {
            return Err(StoreError::Schema(format!(
                "the database lacks migration(s) {:?} of this binary: run `cmdflow migrate` \
                 first (in Kubernetes, the migrate init container)",
                self.missing
            )));
        }
        if !self.ahead.is_empty() {
            tracing::warn!(ahead = ?self.ahead, "The database holds newer migrations than this binary, each marked compatible; running against it.");
        }
        Ok(())
    }
}

/// Checks, for a role that does not migrate, that this binary can run against the database.
pub async fn require_schema(pool: &PgPool) -> Result<()> {
    Schema::read(pool).await?.require_runnable()
}

async fn table_exists(pool: &PgPool, name: &str) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(name)
        .fetch_one(pool)
        .await?)
}
