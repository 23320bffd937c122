//! Fan-in groups: a parent's waited children, their counts and outcomes, and the reports
//! that count each child once.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use crate::decision::Reports;
use crate::domain::CommandId;

use super::*;

/// The columns of a [`GroupRow`], in one place for every statement that returns one.
macro_rules! group_columns {
    () => {
        "parent_id, name, policy, quorum, reports, total, completed, failed, aborted, outcomes, state, deadline_at, created_at, settled_at"
    };
}

/// Where a fan-in group stands (`child_groups.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GroupState {
    /// Waiting for its children's reports.
    Open,
    Succeeded,
    Failed,
    /// Its parent ended first.
    Closed,
}

text_enum!(GroupState, "group state", {
    Open => "open",
    Succeeded => "succeeded",
    Failed => "failed",
    Closed => "closed",
});
text_enum!(Reports, "reports mode");

/// A parent's fan-in group.
#[derive(Debug, Clone, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub struct GroupRow {
    #[serde(skip)]
    pub parent_id: CommandId,
    pub name: String,
    pub policy: String,
    pub quorum: Option<i32>,
    /// How its children report.
    pub reports: Reports,
    pub total: i32,
    pub completed: i32,
    pub failed: i32,
    pub aborted: i32,
    /// Child id → `{state, kind, result | reason}`.
    #[schema(value_type = Object)]
    pub outcomes: Value,
    pub state: GroupState,
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
    /// Kept from the first spawn when the group exists.
    pub reports: Reports,
    /// The children this spawn adds.
    pub add_total: i32,
    pub deadline_at: Option<DateTime<Utc>>,
}

/// Creates a group, or adds `add_total` children to the open group of that name. `None` when a
/// group of that name has already settled.
pub(crate) async fn upsert_group(tx: &mut Tx<'_>, g: &NewGroup<'_>) -> Result<Option<GroupRow>> {
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
pub(crate) async fn lock_group(
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
pub(crate) async fn count_report(
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
/// counted into in memory, and handed out of `steps` (not copied): the caller gives it back
/// with [`Steps::keep_group`], and the next [`flush_steps`] saves it.
pub(crate) async fn count_report_kept(
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
    // Taken out of `steps`, not copied: the caller keeps it back again ([`Steps::keep_group`]).
    Ok(Counted::Counted(Box::new(group)))
}

pub(crate) async fn save_group(tx: &mut Tx<'_>, g: &GroupRow) -> Result<()> {
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
    .bind(g.state)
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
pub(crate) async fn open_children(
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
