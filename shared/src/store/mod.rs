//! PostgreSQL: the pool, migrations, and every statement cmdflow runs.
//!
//! Writes under a lock are still fenced: [`write_step`] only succeeds at the version the
//! transaction read, so a worker that lost its lock to a pause cannot overwrite a newer state.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use crate::config::redact_url;
use crate::domain::{Command, CommandId, CommandState};

pub type Tx<'a> = Transaction<'a, Postgres>;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to PostgreSQL at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Schema(String),
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("command {id} changed under us (expected version {version})")]
    Conflict { id: CommandId, version: i64 },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Whether trying again cannot help: PostgreSQL refused the data itself (see
    /// [`is_permanent_sqlstate`]), or a value could not be encoded or decoded. Everything else
    /// (a lost connection, a timeout, a deadlock, a serialization failure, a lock not
    /// available, a shutdown, a fenced update that lost, or a state not known here) may pass
    /// and is tried again.
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => {
                db.code().is_some_and(|code| is_permanent_sqlstate(&code))
            }
            StoreError::Database(
                sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. },
            ) => true,
            _ => false,
        }
    }

    /// The SQLSTATE PostgreSQL answered, if it answered one.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }
}

/// Whether a SQLSTATE says the statement can never succeed with this data: class 22 (a data
/// exception: an encoding, a range, a malformed value), 23 (an integrity constraint: unique,
/// foreign key, check, not null) or 54 (a program limit: a row or index entry too large).
/// The other classes (08 connection, 40 rollback, 53 resources, 55 lock not available, 57
/// cancelled or shut down, 58 system, XX internal, …) are worth another try.
pub fn is_permanent_sqlstate(code: &str) -> bool {
    matches!(code.get(..2), Some("22" | "23" | "54"))
}

/// How long a connection may sit idle inside a transaction before PostgreSQL aborts it: longer
/// than any handler, and than the default lock TTL (30 s).
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "60s";

/// Opens a pool and checks the server answers, so a wrong URL fails at start-up with one line.
pub async fn connect(url: &str, pool_size: u32) -> Result<PgPool> {
    connect_with_lock_timeout(url, pool_size, None).await
}

/// [`connect`] for a worker whose Redlock TTL is `lock_timeout`: a statement that waits for a row
/// lock, or runs, for 3/4 of the TTL fails instead of going on (a wait that long means the
/// command's lock is about to lapse, and whoever holds the row will hold the lock), and a
/// transaction idle for half the TTL (its process paused, or frozen) is ended by PostgreSQL, so
/// the next holder of the lock is not kept waiting. The event is tried again under a fresh lock.
pub async fn connect_with_lock_timeout(
    url: &str,
    pool_size: u32,
    lock_timeout: Option<Duration>,
) -> Result<PgPool> {
    let connect_err = |source| StoreError::Connect {
        url: redact_url(url),
        source,
    };
    let mut options: PgConnectOptions = url.parse().map_err(connect_err)?;
    if let Some(trust) = crate::tls::trust() {
        options = options.ssl_root_cert(trust.path.as_str());
    }
    // A process stopped mid-transaction (paused, or its host frozen) must not hold its rows
    // for ever: PostgreSQL ends such a transaction, so the others go on.
    options = options.options([(
        "idle_in_transaction_session_timeout",
        IDLE_IN_TRANSACTION_TIMEOUT,
    )]);
    if let Some(ttl) = lock_timeout {
        // A worker's transaction runs under its command's lock: whatever outlives the lock's TTL
        // is ended by PostgreSQL before the TTL passes, so a paused or stalled worker holds the
        // rows for less time than it holds the lock, and the next holder does not wait on it.
        let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
        options = options.options([
            ("lock_timeout", ms(ttl * 3 / 4)),
            ("statement_timeout", ms(ttl * 3 / 4)),
            ("idle_in_transaction_session_timeout", ms(ttl / 2)),
        ]);
    }
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(connect_err)?;
    Ok(pool)
}

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

/// The engine's mark: the secret cmdflow's processes mark their engine events with
/// ([`crate::bus::Bus::set_engine_mark`]).
pub async fn engine_mark(pool: &PgPool) -> Result<String> {
    Ok(sqlx::query_scalar("SELECT mark FROM engine_mark WHERE id")
        .fetch_one(pool)
        .await?)
}

pub async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// A command to create, as decided by a start event.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub id: CommandId,
    pub kind: String,
    pub owner: String,
    pub parent_id: Option<CommandId>,
    pub root_id: CommandId,
    pub depth: i32,
    pub data: Value,
    /// The fan-in group the child reports to; `None` for a root or a fire-and-forget child.
    pub group_name: Option<String>,
    /// `abort` or `abandon`.
    pub parent_close: String,
    /// When the command counts as started: when the event that created it was accepted
    /// (`None`: now). An early event accepted before it never matches its waits.
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The version of the kind's definition it starts on.
    pub kind_version: Option<String>,
}

/// Inserts a command in `pending` unless its id exists. Returns whether it was created.
pub async fn insert_command(tx: &mut Tx<'_>, new: &NewCommand) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO commands (id, kind, owner, parent_id, root_id, depth, state, data, group_name, parent_close, created_at, kind_version)
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8, $9, coalesce($10, now()), $11)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(new.id)
    .bind(&new.kind)
    .bind(&new.owner)
    .bind(new.parent_id)
    .bind(new.root_id)
    .bind(new.depth)
    .bind(&new.data)
    .bind(&new.group_name)
    .bind(&new.parent_close)
    .bind(new.created_at)
    .bind(&new.kind_version)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Inserts children in `pending`, in one statement.
pub async fn insert_children(tx: &mut Tx<'_>, children: &[NewCommand]) -> Result<()> {
    if children.is_empty() {
        return Ok(());
    }
    let rows: Vec<Value> = children
        .iter()
        .map(|c| {
            serde_json::json!({
                "id": c.id, "kind": c.kind, "owner": c.owner, "parent_id": c.parent_id,
                "root_id": c.root_id, "depth": c.depth, "data": c.data,
                "group_name": c.group_name, "parent_close": c.parent_close,
                "created_at": c.created_at, "kind_version": c.kind_version,
            })
        })
        .collect();
    sqlx::query(
        "INSERT INTO commands (id, kind, owner, parent_id, root_id, depth, state, data, group_name, parent_close, created_at, kind_version)
         SELECT (e->>'id')::uuid, e->>'kind', e->>'owner', (e->>'parent_id')::uuid, (e->>'root_id')::uuid,
                (e->>'depth')::int, 'pending', e->'data', e->>'group_name', e->>'parent_close',
                coalesce((e->>'created_at')::timestamptz, now()), e->>'kind_version'
           FROM jsonb_array_elements($1) AS e",
    )
    .bind(Value::Array(rows))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The columns of a [`Command`], in one place for every statement that returns one.
macro_rules! command_columns {
    () => {
        "id, kind, owner, parent_id, root_id, depth, state, data, result, reason, ui, version, group_name, parent_close, created_at, updated_at, ended_at, kind_version"
    };
}

/// Whether the command `c` is a child whose group's reports are `settled` (see
/// [`Locked::counts_itself`]), for every statement that locks a command for an event.
macro_rules! counts_itself {
    () => {
        // A scalar subquery, one primary-key probe per row: an EXISTS may be planned as a
        // hashed subplan, which reads every settled group of every command for each statement.
        "coalesce((SELECT g.reports = 'settled' FROM child_groups g WHERE g.parent_id = c.parent_id AND g.name = c.group_name), false) AS counts_itself"
    };
}

/// The columns of a [`GroupRow`], in one place for every statement that returns one.
macro_rules! group_columns {
    () => {
        "parent_id, name, policy, quorum, reports, total, completed, failed, aborted, outcomes, state, deadline_at, created_at, settled_at"
    };
}

/// A parent's fan-in group.
#[derive(Debug, Clone, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub struct GroupRow {
    #[serde(skip)]
    pub parent_id: CommandId,
    pub name: String,
    pub policy: String,
    pub quorum: Option<i32>,
    /// `each` or `settled`: how its children report (see `decision::Reports`).
    pub reports: String,
    pub total: i32,
    pub completed: i32,
    pub failed: i32,
    pub aborted: i32,
    /// Child id → `{state, kind, result | reason}`.
    #[schema(value_type = Object)]
    pub outcomes: Value,
    /// `open`, `succeeded`, `failed`, or `closed` (its parent ended first).
    pub state: String,
    pub deadline_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub settled_at: Option<DateTime<Utc>>,
}

/// A group a parent spawns children into.
pub struct NewGroup<'a> {
    pub parent: CommandId,
    pub name: &'a str,
    pub policy: &'a str,
    pub quorum: Option<i32>,
    /// `each` or `settled`; kept from the first spawn when the group exists.
    pub reports: &'a str,
    /// The children this spawn adds.
    pub add_total: i32,
    pub deadline_at: Option<DateTime<Utc>>,
}

/// Creates a group, or adds `add_total` children to the open group of that name. `None` when a
/// group of that name has already settled.
pub async fn upsert_group(tx: &mut Tx<'_>, g: &NewGroup<'_>) -> Result<Option<GroupRow>> {
    const SQL: &str = concat!(
        "INSERT INTO child_groups (parent_id, name, policy, quorum, total, deadline_at, reports)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (parent_id, name) DO UPDATE SET total = child_groups.total + EXCLUDED.total
          WHERE child_groups.state = 'open'
         RETURNING ",
        group_columns!()
    );
    Ok(sqlx::query_as::<_, GroupRow>(SQL)
        .bind(g.parent)
        .bind(g.name)
        .bind(g.policy)
        .bind(g.quorum)
        .bind(g.add_total)
        .bind(g.deadline_at)
        .bind(g.reports)
        .fetch_optional(&mut **tx)
        .await?)
}

/// A group, locked until the transaction ends.
pub async fn lock_group(
    tx: &mut Tx<'_>,
    parent: CommandId,
    name: &str,
) -> Result<Option<GroupRow>> {
    const SQL: &str = concat!(
        "SELECT ",
        group_columns!(),
        " FROM child_groups WHERE parent_id = $1 AND name = $2 FOR UPDATE"
    );
    Ok(sqlx::query_as::<_, GroupRow>(SQL)
        .bind(parent)
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?)
}

/// What came of counting a child's report into its group.
pub enum Counted {
    /// Counted: the group as it is now, locked until the transaction ends.
    Counted(Box<GroupRow>),
    /// The child had reported already: counted once, nothing changed.
    AlreadyReported,
    /// The parent has no group of that name.
    NoGroup,
}

/// Counts a child's report into its parent's group in one statement: its state
/// (`completed`, `failed` or `aborted`) and its outcome, once per child.
pub async fn count_report(
    tx: &mut Tx<'_>,
    parent: CommandId,
    name: &str,
    child: &str,
    state: &str,
    outcome: &Value,
) -> Result<Counted> {
    const SQL: &str = concat!(
        "UPDATE child_groups
            SET completed = completed + ($4 = 'completed')::int,
                failed = failed + ($4 = 'failed')::int,
                aborted = aborted + ($4 = 'aborted')::int,
                outcomes = outcomes || jsonb_build_object($3::text, $5::jsonb)
          WHERE parent_id = $1 AND name = $2 AND NOT (outcomes ? $3)
         RETURNING ",
        group_columns!()
    );
    let counted = sqlx::query_as::<_, GroupRow>(SQL)
        .bind(parent)
        .bind(name)
        .bind(child)
        .bind(state)
        .bind(outcome)
        .fetch_optional(&mut **tx)
        .await?;
    if let Some(group) = counted {
        return Ok(Counted::Counted(Box::new(group)));
    }
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM child_groups WHERE parent_id = $1 AND name = $2)",
    )
    .bind(parent)
    .bind(name)
    .fetch_one(&mut **tx)
    .await?;
    Ok(if exists {
        Counted::AlreadyReported
    } else {
        Counted::NoGroup
    })
}

/// Whether `child` is a child of `parent` in its group `group`.
pub async fn is_group_member(
    tx: &mut Tx<'_>,
    child: CommandId,
    parent: CommandId,
    group: &str,
) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM commands WHERE id = $1 AND parent_id = $2 AND group_name = $3)",
    )
    .bind(child)
    .bind(parent)
    .bind(group)
    .fetch_one(&mut **tx)
    .await?)
}

/// [`count_report`] for a batch that keeps its steps back: the group is read and locked once,
/// counted into in memory, and saved by the next [`flush_steps`].
pub async fn count_report_kept(
    tx: &mut Tx<'_>,
    steps: &mut Steps,
    parent: CommandId,
    name: &str,
    child: &str,
    state: &str,
    outcome: &Value,
) -> Result<Counted> {
    let key = (parent, name.to_owned());
    let mut group = match steps.groups.remove(&key) {
        Some(group) => group,
        None => match lock_group(tx, parent, name).await? {
            Some(group) => group,
            None => return Ok(Counted::NoGroup),
        },
    };
    if group.outcomes.get(child).is_some() {
        steps.groups.insert(key, group);
        return Ok(Counted::AlreadyReported);
    }
    match state {
        "completed" => group.completed += 1,
        "failed" => group.failed += 1,
        "aborted" => group.aborted += 1,
        _ => {}
    }
    if !group.outcomes.is_object() {
        group.outcomes = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(outcomes) = &mut group.outcomes {
        outcomes.insert(child.to_owned(), outcome.clone());
    }
    steps.groups.insert(key, group.clone());
    Ok(Counted::Counted(Box::new(group)))
}

pub async fn save_group(tx: &mut Tx<'_>, g: &GroupRow) -> Result<()> {
    sqlx::query(
        "UPDATE child_groups
            SET completed = $3, failed = $4, aborted = $5, outcomes = $6, state = $7,
                settled_at = CASE WHEN $7 <> 'open' THEN coalesce(settled_at, now()) END
          WHERE parent_id = $1 AND name = $2",
    )
    .bind(g.parent_id)
    .bind(&g.name)
    .bind(g.completed)
    .bind(g.failed)
    .bind(g.aborted)
    .bind(&g.outcomes)
    .bind(&g.state)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn groups_of(pool: &PgPool, parent: CommandId) -> Result<Vec<GroupRow>> {
    const SQL: &str = concat!(
        "SELECT ",
        group_columns!(),
        " FROM child_groups WHERE parent_id = $1 ORDER BY created_at, name"
    );
    Ok(sqlx::query_as::<_, GroupRow>(SQL)
        .bind(parent)
        .fetch_all(pool)
        .await?)
}

/// Open children of `parent`: all of them, or one group's; only those whose parent-close
/// policy is `abort` when `abortable_only`.
pub async fn open_children(
    tx: &mut Tx<'_>,
    parent: CommandId,
    group: Option<&str>,
    abortable_only: bool,
) -> Result<Vec<CommandId>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM commands
          WHERE parent_id = $1 AND state IN ('pending', 'running', 'waiting')
            AND ($2::text IS NULL OR group_name = $2)
            AND (NOT $3 OR parent_close = 'abort')
          ORDER BY id",
    )
    .bind(parent)
    .bind(group)
    .bind(abortable_only)
    .fetch_all(&mut **tx)
    .await?)
}

/// How many children a command has, and how many are still open; an archived command's from
/// the archive (its tree moved whole).
pub async fn children_counts(pool: &PgPool, parent: CommandId) -> Result<(i64, i64)> {
    let (total, open): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state IN ('pending', 'running', 'waiting'))
           FROM (SELECT state FROM commands WHERE parent_id = $1
                 UNION ALL
                 SELECT state FROM archive.commands WHERE parent_id = $1) c",
    )
    .bind(parent)
    .fetch_one(pool)
    .await?;
    Ok((total, open))
}

/// A command and all its descendants (at most `limit` rows), parents before children. Trees
/// move to the archive whole, so a command not in the live table is read, with its tree, from
/// the archive.
pub async fn subtree(pool: &PgPool, id: CommandId, limit: i64) -> Result<Vec<Command>> {
    const LIVE: &str = concat!(
        "WITH RECURSIVE tree AS (
             SELECT c.*, 0 AS level FROM commands c WHERE c.id = $1
             UNION ALL
             SELECT c.*, t.level + 1 FROM commands c JOIN tree t ON c.parent_id = t.id
         ) SELECT ",
        command_columns!(),
        " FROM tree ORDER BY level, id LIMIT $2"
    );
    const ARCHIVED: &str = concat!(
        "WITH RECURSIVE tree AS (
             SELECT c.*, 0 AS level FROM archive.commands c WHERE c.id = $1
             UNION ALL
             SELECT c.*, t.level + 1 FROM archive.commands c JOIN tree t ON c.parent_id = t.id
         ) SELECT ",
        command_columns!(),
        " FROM tree ORDER BY level, id LIMIT $2"
    );
    for sql in [LIVE, ARCHIVED] {
        let rows = sqlx::query_as::<_, Command>(sql)
            .bind(id)
            .bind(limit)
            .fetch_all(pool)
            .await?;
        if !rows.is_empty() {
            return Ok(rows);
        }
    }
    Ok(Vec::new())
}

/// Records that a broadcast event started `kind`. `false` when it already did.
pub async fn record_event_start(
    tx: &mut Tx<'_>,
    source: &str,
    event_id: &str,
    kind: &str,
    command: CommandId,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO event_starts (source, event_id, kind, command_id) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(source)
    .bind(event_id)
    .bind(kind)
    .bind(command)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A command's row, locked by [`lock_and_mark`].
#[derive(sqlx::FromRow)]
pub struct Locked {
    #[sqlx(flatten)]
    pub command: Command,
    /// `false` when the event already was applied (a redelivery or a replay, which must change
    /// nothing).
    pub fresh: bool,
    /// The command is a child whose group's reports are `settled`: when it ends, it counts
    /// itself into the group instead of sending its parent an event.
    pub counts_itself: bool,
}

/// Locks a command's row until the transaction ends and, in the same round trip, records that
/// `(source, event_id)` is applied to it, and reads how it reports to its group. `None` when the
/// command does not exist.
pub async fn lock_and_mark(
    tx: &mut Tx<'_>,
    id: CommandId,
    source: &str,
    event_id: &str,
) -> Result<Option<Locked>> {
    const SQL: &str = concat!(
        "WITH p AS (INSERT INTO processed_events (command_id, source, event_id) VALUES ($1, $2, $3)",
        " ON CONFLICT DO NOTHING RETURNING 1)",
        " SELECT ",
        command_columns!(),
        ", EXISTS (SELECT 1 FROM p) AS fresh, ",
        counts_itself!(),
        " FROM commands c WHERE c.id = $1 FOR UPDATE OF c"
    );
    Ok(sqlx::query_as::<_, Locked>(SQL)
        .bind(id)
        .bind(source)
        .bind(event_id)
        .fetch_optional(&mut **tx)
        .await?)
}

/// A command's row locked by [`lock_and_mark_batch`], with its events of the batch that were
/// new when they were marked.
#[derive(sqlx::FromRow)]
pub struct LockedBatch {
    #[sqlx(flatten)]
    pub command: Command,
    /// `source` + U+001F + `event_id` of each of the batch's events for this command that had
    /// not been applied before (each listed once, however often it came).
    pub fresh: Vec<String>,
    /// As in [`Locked`].
    pub counts_itself: bool,
    /// The transaction's `now()`.
    pub now: DateTime<Utc>,
}

/// The key of an event in [`LockedBatch::fresh`].
pub fn event_key(source: &str, event_id: &str) -> String {
    format!("{source}\u{1f}{event_id}")
}

/// [`lock_and_mark`] for a whole batch, in one round trip: records every event as applied to its
/// command (`commands`, `sources` and `event_ids` side by side, in the batch's order), and locks
/// the commands' rows in ascending id order. A command that does not exist is missing from the
/// result (which is in ascending id order) and its events are not marked, so that
/// [`lock_and_mark`] can handle them afterwards (a root's start inserts its row first).
pub async fn lock_and_mark_batch(
    tx: &mut Tx<'_>,
    commands: &[CommandId],
    sources: &[&str],
    event_ids: &[&str],
) -> Result<Vec<LockedBatch>> {
    const SQL: &str = concat!(
        "WITH p AS (INSERT INTO processed_events (command_id, source, event_id)",
        " SELECT e.* FROM unnest($1::uuid[], $2::text[], $3::text[]) AS e(command_id, source, event_id)",
        " WHERE EXISTS (SELECT 1 FROM commands x WHERE x.id = e.command_id)",
        " ON CONFLICT DO NOTHING RETURNING command_id, source, event_id)",
        " SELECT ",
        command_columns!(),
        ", ARRAY(SELECT p.source || chr(31) || p.event_id FROM p WHERE p.command_id = c.id) AS fresh, ",
        counts_itself!(),
        ", now() AS now FROM commands c WHERE c.id = ANY($1) ORDER BY c.id FOR UPDATE OF c"
    );
    let ids: Vec<uuid::Uuid> = commands.iter().map(CommandId::as_uuid).collect();
    Ok(sqlx::query_as::<_, LockedBatch>(SQL)
        .bind(&ids)
        .bind(sources)
        .bind(event_ids)
        .fetch_all(&mut **tx)
        .await?)
}

/// A live command as this transaction sees it, without locking it.
pub async fn command_in(tx: &mut Tx<'_>, id: CommandId) -> Result<Option<Command>> {
    const SQL: &str = concat!(
        "SELECT ",
        command_columns!(),
        " FROM commands WHERE id = $1"
    );
    Ok(sqlx::query_as::<_, Command>(SQL)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?)
}

/// A command, live or archived.
pub async fn get_command(pool: &PgPool, id: CommandId) -> Result<Option<Command>> {
    const SQL: &str = concat!(
        "SELECT ",
        command_columns!(),
        " FROM commands WHERE id = $1",
        " UNION ALL SELECT ",
        command_columns!(),
        " FROM archive.commands WHERE id = $1 LIMIT 1"
    );
    Ok(sqlx::query_as::<_, Command>(SQL)
        .bind(id)
        .fetch_optional(pool)
        .await?)
}

/// Writes one step of a command in one round trip: its new state, fenced by the version the
/// transaction read (zero rows is a conflict, never a success, and then nothing else is
/// written); its history lines at the new version, in order; and the events it emits into the
/// outbox, whose rows are returned. `next` is then brought up to the row as written (version,
/// `updated_at`, `ended_at`).
pub async fn write_step(
    tx: &mut Tx<'_>,
    next: &mut Command,
    seen_version: i64,
    history: &[HistoryEntry],
    events: &[crate::contract::Event],
) -> Result<Vec<OutboxRow>> {
    #[derive(sqlx::FromRow)]
    struct Written {
        updated: i64,
        updated_at: Option<DateTime<Utc>>,
        ended_at: Option<DateTime<Utc>>,
        id: Option<i64>,
        command_id: Option<CommandId>,
        event_type: Option<String>,
        body: Option<Value>,
    }
    let rows = sqlx::query_as::<_, Written>(
        "WITH u AS (
            UPDATE commands
               SET state = $3, data = $4, result = $5, reason = $6, ui = $7,
                   version = version + 1, updated_at = now(),
                   ended_at = CASE WHEN $3 IN ('completed'::command_state, 'failed'::command_state, 'aborted'::command_state)
                                   THEN coalesce(ended_at, now()) END
             WHERE id = $1 AND version = $2
         RETURNING id, updated_at, ended_at),
         h AS (
            INSERT INTO command_events (command_id, version, entry, event_id, event_type, from_state, to_state, detail)
            SELECT u.id, $2 + 1, e->>'entry', e->>'event_id', e->>'event_type',
                   (e->>'from_state')::command_state, (e->>'to_state')::command_state,
                   nullif(e->'detail', 'null'::jsonb)
              FROM u, jsonb_array_elements($8) WITH ORDINALITY AS r(e, ord)
             ORDER BY r.ord),
         o AS (
            INSERT INTO outbox (command_id, event_id, event_type, body)
            SELECT u.id, r.body->>'id', r.body->>'type', r.body
              FROM u, jsonb_array_elements($9) WITH ORDINALITY AS r(body, ord)
             ORDER BY r.ord
         RETURNING id, command_id, event_type, body)
         SELECT (SELECT count(*) FROM u) AS updated, (SELECT updated_at FROM u) AS updated_at,
                (SELECT ended_at FROM u) AS ended_at, o.id, o.command_id, o.event_type, o.body
           FROM (SELECT 1) AS one LEFT JOIN o ON true
          ORDER BY o.id",
    )
    .bind(next.id)
    .bind(seen_version)
    .bind(next.state)
    .bind(&next.data)
    .bind(&next.result)
    .bind(&next.reason)
    .bind(&next.ui)
    .bind(serde_json::to_value(history).unwrap_or(Value::Null))
    .bind(serde_json::to_value(events).unwrap_or(Value::Null))
    .fetch_all(&mut **tx)
    .await?;
    let Some(first) = rows.first().filter(|r| r.updated > 0) else {
        return Err(StoreError::Conflict {
            id: next.id,
            version: seen_version,
        });
    };
    // `next` becomes the row as written, for a later event of the same transaction.
    next.version = seen_version + 1;
    if let Some(at) = first.updated_at {
        next.updated_at = at;
    }
    next.ended_at = first.ended_at;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            Some(OutboxRow {
                id: r.id?,
                command_id: r.command_id?,
                event_type: r.event_type?,
                body: r.body?,
            })
        })
        .collect())
}

/// Steps of a batch's transaction kept back to be written together by [`flush_steps`]: the last
/// row of each command (fenced by the version the transaction read first), and every history
/// line and outbox event in the order they were written. What [`write_step`] writes, in one
/// round trip for the whole batch instead of one per event.
///
/// Nothing else in the transaction sees a kept-back step until it is flushed: flush before any
/// statement that reads other commands' rows, their history, the outbox, or a group the batch
/// counted into.
#[derive(Debug)]
pub struct Steps {
    /// The transaction's `now()`, for the rows as they will be written.
    now: DateTime<Utc>,
    rows: Vec<(i64, Command)>,
    index: std::collections::HashMap<CommandId, usize>,
    history: Vec<Value>,
    /// Each event to the outbox: its command, type and body.
    outbox: Vec<(CommandId, String, Value)>,
    /// Fan-in groups (of `each` reports) as the batch's events left them, by parent and name:
    /// read once, locked, and saved by the flush.
    groups: std::collections::HashMap<(CommandId, String), GroupRow>,
    /// Outbox rows of the steps flushed so far, to publish after the commit.
    pub written: Vec<OutboxRow>,
}

impl Steps {
    /// Nothing kept back yet, in a transaction whose `now()` is `now`.
    pub fn new(now: DateTime<Utc>) -> Self {
        Self {
            now,
            rows: Vec::new(),
            index: std::collections::HashMap::new(),
            history: Vec::new(),
            outbox: Vec::new(),
            groups: std::collections::HashMap::new(),
            written: Vec::new(),
        }
    }

    /// [`write_step`], kept back. `next` is brought up to the row as it will be written.
    pub fn step(
        &mut self,
        next: &mut Command,
        seen_version: i64,
        history: &[HistoryEntry],
        events: &[crate::contract::Event],
    ) {
        let now = self.now;
        next.version = seen_version + 1;
        next.updated_at = now;
        next.ended_at = if next.state.is_terminal() {
            next.ended_at.or(Some(now))
        } else {
            None
        };
        match self.index.get(&next.id) {
            Some(&i) => self.rows[i].1 = next.clone(),
            None => {
                self.index.insert(next.id, self.rows.len());
                self.rows.push((seen_version, next.clone()));
            }
        }
        self.history(next.id, next.version, history);
        self.outbox.extend(events.iter().map(|e| {
            let body = serde_json::to_value(e).unwrap_or(Value::Null);
            (next.id, e.ty.clone(), body)
        }));
    }

    /// [`append_history`], kept back.
    pub fn history(&mut self, command: CommandId, version: i64, entries: &[HistoryEntry]) {
        self.history.extend(entries.iter().map(|e| {
            let mut line = serde_json::to_value(e).unwrap_or(Value::Null);
            if let Value::Object(line) = &mut line {
                line.insert("command_id".into(), serde_json::json!(command));
                line.insert("version".into(), serde_json::json!(version));
            }
            line
        }));
    }

    /// Whether a step of `command` is kept back: its row, or one of its groups.
    pub fn keeps(&self, command: CommandId) -> bool {
        self.index.contains_key(&command)
            || self.groups.keys().any(|(parent, _)| *parent == command)
    }

    /// Keeps `group` as the batch's event left it, to be saved by the next flush.
    pub fn keep_group(&mut self, group: GroupRow) {
        self.groups
            .insert((group.parent_id, group.name.clone()), group);
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.history.is_empty()
            && self.outbox.is_empty()
            && self.groups.is_empty()
    }
}

/// Writes the steps `steps` kept back, in one round trip: each command's row, fenced by the
/// version the transaction first read (a row that moved on is a conflict, and the caller rolls
/// back), the history lines and the outbox events in order, and the groups counted into. The
/// outbox rows join `steps.written`; the groups are forgotten (read again when needed).
pub async fn flush_steps(tx: &mut Tx<'_>, steps: &mut Steps) -> Result<()> {
    if steps.is_empty() {
        return Ok(());
    }
    #[derive(sqlx::FromRow)]
    struct Written {
        updated: Vec<uuid::Uuid>,
        id: Option<i64>,
    }
    let ids: Vec<uuid::Uuid> = steps.rows.iter().map(|(_, c)| c.id.as_uuid()).collect();
    let rows: Vec<Value> = steps
        .rows
        .iter()
        .map(|(seen, c)| {
            serde_json::json!({
                "id": c.id, "seen": seen, "version": c.version, "state": c.state.as_str(),
                "data": c.data, "result": c.result, "reason": c.reason, "ui": c.ui,
            })
        })
        .collect();
    let (group_parents, groups): (Vec<uuid::Uuid>, Vec<Value>) = steps
        .groups
        .drain()
        .map(|(_, g)| {
            let parent = g.parent_id.as_uuid();
            let row = serde_json::json!({
                "parent_id": g.parent_id, "name": g.name, "completed": g.completed,
                "failed": g.failed, "aborted": g.aborted, "outcomes": g.outcomes,
                "state": g.state,
            });
            (parent, row)
        })
        .unzip();
    let written = sqlx::query_as::<_, Written>(
        "WITH v AS (
            SELECT * FROM jsonb_to_recordset($1)
                AS v(id uuid, seen bigint, version bigint, state command_state, data jsonb,
                     result jsonb, reason text, ui jsonb)),
         u AS (
            UPDATE commands c
               SET state = v.state, data = v.data, result = v.result, reason = v.reason,
                   ui = v.ui, version = v.version, updated_at = now(),
                   ended_at = CASE WHEN v.state IN ('completed'::command_state, 'failed'::command_state, 'aborted'::command_state)
                                   THEN coalesce(c.ended_at, now()) END
              FROM v
             WHERE c.id = ANY($4) AND c.id = v.id AND c.version = v.seen
         RETURNING c.id),
         h AS (
            INSERT INTO command_events (command_id, version, entry, event_id, event_type, from_state, to_state, detail)
            SELECT (e->>'command_id')::uuid, (e->>'version')::bigint, e->>'entry', e->>'event_id',
                   e->>'event_type', (e->>'from_state')::command_state,
                   (e->>'to_state')::command_state, nullif(e->'detail', 'null'::jsonb)
              FROM jsonb_array_elements($2) WITH ORDINALITY AS r(e, ord)
             ORDER BY r.ord),
         o AS (
            INSERT INTO outbox (command_id, event_id, event_type, body)
            SELECT (r.x->>0)::uuid, r.x->1->>'id', r.x->1->>'type', r.x->1
              FROM jsonb_array_elements($3) WITH ORDINALITY AS r(x, ord)
             ORDER BY r.ord
         RETURNING id),
         g AS (
            UPDATE child_groups x
               SET completed = gv.completed, failed = gv.failed, aborted = gv.aborted,
                   outcomes = gv.outcomes, state = gv.state,
                   settled_at = CASE WHEN gv.state <> 'open' THEN coalesce(x.settled_at, now()) END
              FROM jsonb_to_recordset($5)
                AS gv(parent_id uuid, name text, completed int, failed int, aborted int,
                      outcomes jsonb, state text)
             WHERE x.parent_id = ANY($6) AND x.parent_id = gv.parent_id AND x.name = gv.name)
         SELECT ARRAY(SELECT id FROM u) AS updated, o.id
           FROM (SELECT 1) AS one LEFT JOIN o ON true
          ORDER BY o.id",
    )
    .bind(Value::Array(rows))
    .bind(Value::Array(std::mem::take(&mut steps.history)))
    .bind(Value::Array(
        steps
            .outbox
            .iter()
            .map(|(command, _, body)| serde_json::json!([command, body]))
            .collect(),
    ))
    // The ids again, as an array: the row estimate of a JSON record set is a guess, and with
    // it the planner may scan the whole table; `= ANY` goes through the primary key.
    .bind(ids)
    .bind(Value::Array(groups))
    // The groups' parents, for the same reason: a scan of `child_groups` for each batch.
    .bind(group_parents)
    .fetch_all(&mut **tx)
    .await?;
    let updated = written
        .first()
        .map(|w| w.updated.as_slice())
        .unwrap_or_default();
    if let Some((seen, c)) = steps
        .rows
        .iter()
        .find(|(_, c)| !updated.contains(&c.id.as_uuid()))
    {
        return Err(StoreError::Conflict {
            id: c.id,
            version: *seen,
        });
    }
    steps.rows.clear();
    steps.index.clear();
    // The ids come back ascending, as the rows were inserted: in the order of `outbox`. The
    // bodies stay here instead of coming back over the wire.
    let ids = written.iter().filter_map(|w| w.id);
    let events = std::mem::take(&mut steps.outbox);
    steps.written.extend(
        ids.zip(events)
            .map(|(id, (command_id, event_type, body))| OutboxRow {
                id,
                command_id,
                event_type,
                body,
            }),
    );
    Ok(())
}

/// One line of a command's history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryEntry {
    pub entry: EntryKind,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub from_state: Option<CommandState>,
    pub to_state: Option<CommandState>,
    pub detail: Option<Value>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// An event came in and was applied.
    Received,
    /// An event went out (through the outbox).
    Emitted,
    /// The state moved.
    StateChanged,
    /// An event came in and changed nothing; `detail.reason` says why.
    Ignored,
}

/// Appends history lines for `command` at `version`, in order, in one statement.
pub async fn append_history(
    tx: &mut Tx<'_>,
    command: CommandId,
    version: i64,
    entries: &[HistoryEntry],
) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO command_events (command_id, version, entry, event_id, event_type, from_state, to_state, detail)
         SELECT $1, $2, e->>'entry', e->>'event_id', e->>'event_type',
                (e->>'from_state')::command_state, (e->>'to_state')::command_state,
                nullif(e->'detail', 'null'::jsonb)
           FROM jsonb_array_elements($3) WITH ORDINALITY AS r(e, ord)
          ORDER BY r.ord",
    )
    .bind(command)
    .bind(version)
    .bind(serde_json::to_value(entries).unwrap_or(Value::Null))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub struct HistoryRow {
    pub seq: i64,
    pub version: i64,
    #[schema(value_type = String)]
    pub entry: String,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub from_state: Option<CommandState>,
    pub to_state: Option<CommandState>,
    #[schema(value_type = Option<Object>)]
    pub detail: Option<Value>,
    pub at: DateTime<Utc>,
}

/// A page of a command's history, oldest first, after `after_seq`.
pub async fn history(
    pool: &PgPool,
    command: CommandId,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<HistoryRow>> {
    Ok(sqlx::query_as::<_, HistoryRow>(
        "SELECT seq, version, entry, event_id, event_type, from_state, to_state, detail, at
           FROM (SELECT * FROM command_events WHERE command_id = $1 AND seq > $2
                 UNION ALL
                 SELECT * FROM archive.command_events WHERE command_id = $1 AND seq > $2) h
          ORDER BY seq LIMIT $3",
    )
    .bind(command)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// An event waiting in the outbox.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub command_id: CommandId,
    pub event_type: String,
    pub body: Value,
}

/// Adds events to the outbox in the transaction that decided them. Returns the rows.
pub async fn insert_outbox(
    tx: &mut Tx<'_>,
    command: CommandId,
    events: &[crate::contract::Event],
) -> Result<Vec<OutboxRow>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let bodies = serde_json::to_value(events).unwrap_or(Value::Null);
    Ok(sqlx::query_as::<_, OutboxRow>(
        "INSERT INTO outbox (command_id, event_id, event_type, body)
         SELECT $1, r.body->>'id', r.body->>'type', r.body
           FROM jsonb_array_elements($2) WITH ORDINALITY AS r(body, ord)
          ORDER BY r.ord
         RETURNING id, command_id, event_type, body",
    )
    .bind(command)
    .bind(bodies)
    .fetch_all(&mut **tx)
    .await?)
}

pub async fn delete_outbox(pool: &PgPool, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Locks up to `limit` outbox rows older than `older_than` that no other sweeper holds.
pub async fn claim_stale_outbox(
    tx: &mut Tx<'_>,
    older_than: Duration,
    limit: i64,
) -> Result<Vec<OutboxRow>> {
    Ok(sqlx::query_as::<_, OutboxRow>(
        "SELECT id, command_id, event_type, body FROM outbox
          WHERE created_at < now() - make_interval(secs => $1)
          ORDER BY created_at, id
          LIMIT $2
          FOR UPDATE SKIP LOCKED",
    )
    .bind(older_than.as_secs_f64())
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?)
}

pub async fn delete_outbox_in(tx: &mut Tx<'_>, ids: &[i64]) -> Result<()> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn outbox_backlog(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?)
}

pub mod archive;
pub mod console;
pub mod dead;
pub mod flows;
pub mod kinds;
pub mod partitions;
pub mod people;
pub mod time;

#[cfg(test)]
mod error_tests {
    use super::is_permanent_sqlstate;

    #[test]
    fn data_constraint_and_limit_errors_are_permanent_and_the_rest_retried() {
        for permanent in [
            "22P05", "22021", "22003", "23505", "23514", "23503", "54000",
        ] {
            assert!(is_permanent_sqlstate(permanent), "{permanent}");
        }
        for retried in [
            "40001", "40P01", "55P03", "57014", "57P01", "08006", "53300", "XX000", "",
        ] {
            assert!(!is_permanent_sqlstate(retried), "{retried}");
        }
    }
}
