//! Each event's step (the command's new state, its history and its outbox
//! rows), fenced by the version its transaction read, written one at a time or kept back and
//! flushed together before the commit.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::domain::{Command, CommandId};

use super::*;

/// Writes one step of a command in one round trip: its new state, fenced by the version the
/// transaction read (zero rows is a conflict, never a success, and then nothing else is
/// written); its history lines at the new version, in order; and the events it emits into the
/// outbox, whose rows are returned. `next` is then brought up to the row as written (version,
/// `updated_at`, `ended_at`).
pub(crate) async fn write_step(
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
/// Nothing else in the transaction sees a kept-back step until it is flushed: a statement that
/// reads other commands' rows or a group the batch counted into goes through a [`Writer`],
/// which flushes when the read could miss a kept-back step.
#[derive(Debug)]
pub(crate) struct Steps {
    /// The transaction's `now()`, for the rows as they will be written.
    now: DateTime<Utc>,
    /// Each command's row as it will be written, with the version the transaction read
    /// (`None`: created in this transaction, and inserted by the flush).
    rows: Vec<(Option<i64>, Command)>,
    index: std::collections::HashMap<CommandId, usize>,
    history: Vec<Value>,
    /// Each event to the outbox: its command, type and body.
    outbox: Vec<(CommandId, String, Value)>,
    /// Fan-in groups (of `each` reports) as the batch's events left them, by parent and name:
    /// read once, locked, and saved by the flush.
    pub(super) groups: std::collections::HashMap<(CommandId, String), GroupRow>,
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
                self.rows.push((Some(seen_version), next.clone()));
            }
        }
        self.history(next.id, next.version, history);
        self.outbox.extend(events.iter().map(|e| {
            let body = serde_json::to_value(e).unwrap_or(Value::Null);
            (next.id, e.ty.clone(), body)
        }));
    }

    /// [`insert_children`], kept back: the row is inserted by the flush as the steps left it.
    pub fn create(&mut self, child: &NewCommand) {
        self.index.insert(child.id, self.rows.len());
        self.rows.push((None, child.row(self.now)));
    }

    /// The transaction's `now()`.
    pub fn now(&self) -> DateTime<Utc> {
        self.now
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

    /// Whether reading `what` now could miss a step kept back: the rule the [`Writer`] keeps.
    pub fn hides_from(&self, what: Read) -> bool {
        match what {
            // The row, or a group of it, kept back by an earlier event of the batch.
            Read::Row(id) | Read::GroupsOf(id) => self.keeps(id),
            // Counted into by an earlier report, or a member's row stepped.
            Read::Group | Read::Children => !self.is_empty(),
        }
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

/// What a statement in a batch's transaction is about to read that the batch may keep back.
/// The [`Writer`] decides from it whether the kept-back steps must be written first.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Read {
    /// The command's own row: locking it again for its next event in the batch.
    Row(CommandId),
    /// The command's fan-in groups: spawning into one reads it.
    GroupsOf(CommandId),
    /// A group, which an earlier report of the batch may have counted into.
    Group,
    /// Children's rows: open children, a group's members. Which rows are members is not
    /// known here, so any kept-back row may be one.
    Children,
}

/// Writes the steps `steps` kept back, in one round trip: each command's row, fenced by the
/// version the transaction first read (a row that moved on is a conflict, and the caller rolls
/// back), the history lines and the outbox events in order, and the groups counted into. The
/// outbox rows join `steps.written`; the groups are forgotten (read again when needed).
pub(crate) async fn flush_steps(tx: &mut Tx<'_>, steps: &mut Steps) -> Result<()> {
    if steps.is_empty() {
        return Ok(());
    }
    #[derive(sqlx::FromRow)]
    struct Written {
        updated: Option<Vec<uuid::Uuid>>,
        id: Option<i64>,
    }
    // Rows read by this transaction are updated, fenced by the version read; rows created in it
    // are inserted. Apart, so that the update's join is as large as the batch's commands, not
    // as all the children it started.
    let mut ids: Vec<uuid::Uuid> = Vec::new();
    let (mut updates, mut inserts): (Vec<Value>, Vec<Value>) = (Vec::new(), Vec::new());
    for (seen, c) in &steps.rows {
        let mut row = serde_json::json!({
            "id": c.id, "version": c.version, "state": c.state.as_str(),
            "data": c.data, "result": c.result, "reason": c.reason, "ui": c.ui,
        });
        let Value::Object(fields) = &mut row else {
            continue;
        };
        match seen {
            Some(seen) => {
                fields.insert("seen".to_owned(), serde_json::json!(seen));
                ids.push(c.id.as_uuid());
                updates.push(row);
            }
            None => {
                fields.extend([
                    ("kind".to_owned(), serde_json::json!(c.kind)),
                    ("owner".to_owned(), serde_json::json!(c.owner)),
                    ("parent_id".to_owned(), serde_json::json!(c.parent_id)),
                    ("root_id".to_owned(), serde_json::json!(c.root_id)),
                    ("depth".to_owned(), serde_json::json!(c.depth)),
                    ("group_name".to_owned(), serde_json::json!(c.group_name)),
                    ("parent_close".to_owned(), serde_json::json!(c.parent_close)),
                    ("created_at".to_owned(), serde_json::json!(c.created_at)),
                    ("kind_version".to_owned(), serde_json::json!(c.kind_version)),
                ]);
                inserts.push(row);
            }
        }
    }
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
         n AS (
            INSERT INTO commands (id, kind, owner, parent_id, root_id, depth, state, data, result,
                                  reason, ui, version, group_name, parent_close, created_at,
                                  updated_at, ended_at, kind_version)
            SELECT n.id, n.kind, n.owner, n.parent_id, n.root_id, n.depth, n.state, n.data,
                   n.result, n.reason, n.ui, n.version, n.group_name, n.parent_close,
                   n.created_at, now(),
                   CASE WHEN n.state IN ('completed'::command_state, 'failed'::command_state, 'aborted'::command_state)
                        THEN now() END,
                   n.kind_version
              FROM jsonb_to_recordset($7)
                AS n(id uuid, version bigint, state command_state, data jsonb, result jsonb,
                     reason text, ui jsonb, kind text, owner text, parent_id uuid,
                     root_id uuid, depth int, group_name text, parent_close text,
                     created_at timestamptz, kind_version text)),
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
         SELECT ARRAY(SELECT id FROM u) AS updated, NULL::bigint AS id
         UNION ALL
         SELECT NULL, o.id FROM o",
    )
    .bind(Value::Array(updates))
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
    .bind(Value::Array(inserts))
    .fetch_all(&mut **tx)
    .await?;
    // One row names the rows updated (once: not beside each outbox row), the others are the
    // outbox ids. A row read but not updated had moved on. A new row is inserted or the
    // statement fails.
    let updated: std::collections::HashSet<uuid::Uuid> = written
        .iter()
        .find_map(|w| w.updated.as_ref())
        .map(|ids| ids.iter().copied().collect())
        .unwrap_or_default();
    if let Some((seen, c)) = steps
        .rows
        .iter()
        .find(|(seen, c)| seen.is_some() && !updated.contains(&c.id.as_uuid()))
    {
        return Err(StoreError::Conflict {
            id: c.id,
            version: seen.unwrap_or_default(),
        });
    }
    steps.rows.clear();
    steps.index.clear();
    // Sorted, the ids are in the order the rows were inserted: the order of `outbox`. The
    // bodies stay here instead of coming back over the wire.
    let mut ids: Vec<i64> = written.iter().filter_map(|w| w.id).collect();
    ids.sort_unstable();
    let events = std::mem::take(&mut steps.outbox);
    steps.written.extend(ids.into_iter().zip(events).map(
        |(id, (command_id, event_type, body))| OutboxRow {
            id,
            command_id,
            event_type,
            body,
        },
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_flushes_first_only_when_it_could_miss_a_kept_back_step() {
        let mut steps = Steps::new(Utc::now());
        let (mut parent, other) = (
            Command::new("demo.fanout", "member:1", Value::Null),
            CommandId::new(),
        );
        let all = |id| {
            [
                Read::Row(id),
                Read::GroupsOf(id),
                Read::Group,
                Read::Children,
            ]
        };
        assert!(
            all(parent.id).iter().all(|r| !steps.hides_from(*r)),
            "nothing kept back"
        );
        steps.step(&mut parent, 0, &[], &[]);
        assert!(steps.hides_from(Read::Row(parent.id)));
        assert!(steps.hides_from(Read::GroupsOf(parent.id)));
        assert!(
            !steps.hides_from(Read::Row(other)),
            "another command's row is not kept"
        );
        assert!(!steps.hides_from(Read::GroupsOf(other)));
        // A member's row or a counted group may be among what is kept: any step counts.
        assert!(steps.hides_from(Read::Children));
        assert!(steps.hides_from(Read::Group));
    }

    #[test]
    fn a_child_created_in_a_batch_is_kept_back_and_its_step_keeps_it_new() {
        let mut steps = Steps::new(Utc::now());
        let child = NewCommand {
            id: CommandId::new(),
            kind: "demo.noop".into(),
            owner: "member:1".into(),
            parent_id: Some(CommandId::new()),
            root_id: CommandId::new(),
            depth: 1,
            data: serde_json::json!({}),
            group_name: Some("children".into()),
            parent_close: crate::decision::ParentClose::Abort,
            created_at: None,
            kind_version: None,
        };
        steps.create(&child);
        assert!(steps.hides_from(Read::Row(child.id)));
        assert!(steps.hides_from(Read::Children));
        let mut next = child.row(steps.now());
        next.state = crate::domain::CommandState::Completed;
        steps.step(&mut next, 0, &[], &[]);
        // Still one row, still to be inserted (no version read), now as its step left it.
        assert_eq!(steps.rows.len(), 1);
        assert_eq!(steps.rows[0].0, None);
        assert_eq!(
            steps.rows[0].1.state,
            crate::domain::CommandState::Completed
        );
        assert_eq!(steps.rows[0].1.version, 1);
    }
}
