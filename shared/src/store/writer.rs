//! The apply code's one way to its transaction: a [`Writer`] writes each step at once (an event
//! applied by itself) or keeps the steps back and writes them together (a batch), and it
//! owns the rule of when kept-back steps must be written before a read.
//!
//! Every statement that reads what a batch keeps back (a command's row, its fan-in groups, its
//! children's rows) is a method here, which writes what the read could miss first. Callers
//! cannot forget the rule: the store's functions for those reads are not public.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::contract::Event;
use crate::domain::{Command, CommandId};

use super::*;

/// A transaction as the apply code writes to it. Outbox rows of everything written gather here,
/// for [`Writer::finish`] to hand over for publishing after the commit.
pub struct Writer<'t, 'c> {
    tx: &'t mut Tx<'c>,
    /// `None`: each step is written when it is made.
    steps: Option<Steps>,
    written: Vec<OutboxRow>,
}

impl<'t, 'c> Writer<'t, 'c> {
    /// Writes each step as it is made, in its own round trip.
    pub fn at_once(tx: &'t mut Tx<'c>) -> Self {
        Self {
            tx,
            steps: None,
            written: Vec::new(),
        }
    }

    /// Keeps the steps back, to write them together before a read that could miss them and at
    /// [`Writer::finish`]. `now` is the transaction's `now()`.
    pub fn batched(tx: &'t mut Tx<'c>, now: DateTime<Utc>) -> Self {
        Self {
            tx,
            steps: Some(Steps::new(now)),
            written: Vec::new(),
        }
    }

    /// The transaction, for a statement on what no step keeps back: timers, waits, messages,
    /// people, dedupe marks, new rows (a root, children) and what a row is given when it is
    /// made (a child's parent and group). A read of a command's state, its groups or its
    /// children goes through the methods below.
    pub fn tx(&mut self) -> &mut Tx<'c> {
        self.tx
    }

    /// Writes what is kept back when reading `what` now could miss it.
    async fn before(&mut self, what: Read) -> Result<()> {
        if self
            .steps
            .as_ref()
            .is_some_and(|steps| steps.hides_from(what))
        {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes everything kept back.
    pub async fn flush(&mut self) -> Result<()> {
        if let Some(steps) = &mut self.steps {
            flush_steps(self.tx, steps).await?;
            self.written.append(&mut steps.written);
        }
        Ok(())
    }

    /// Writes everything kept back and returns the outbox rows of all that was written, to
    /// publish after the commit.
    pub async fn finish(mut self) -> Result<Vec<OutboxRow>> {
        self.flush().await?;
        Ok(self.written)
    }

    /// Children of a step, to be created: inserted at once, or in a batch kept back and
    /// inserted by the flush, as their first steps leave them (an insert instead of an insert
    /// and an update).
    pub async fn create_children(&mut self, children: &[NewCommand]) -> Result<()> {
        match &mut self.steps {
            Some(steps) => {
                for child in children {
                    steps.create(child);
                }
            }
            None => insert_children(self.tx, children).await?,
        }
        Ok(())
    }

    /// The transaction's `now()` as the rows kept back will have it, or the clock's now when
    /// each step is written at once.
    pub fn now(&self) -> DateTime<Utc> {
        self.steps.as_ref().map_or_else(Utc::now, Steps::now)
    }

    /// One step of a command: its new state, fenced by `seen_version`, its history lines and
    /// the events it emits. `next` is brought up to the row as written (or as it will be).
    pub async fn step(
        &mut self,
        next: &mut Command,
        seen_version: i64,
        history: &[HistoryEntry],
        events: &[Event],
    ) -> Result<()> {
        match &mut self.steps {
            Some(steps) => steps.step(next, seen_version, history, events),
            None => {
                let rows = write_step(self.tx, next, seen_version, history, events).await?;
                self.written.extend(rows);
            }
        }
        Ok(())
    }

    /// History lines of a command at `version`, with no step.
    pub async fn history(
        &mut self,
        command: CommandId,
        version: i64,
        entries: &[HistoryEntry],
    ) -> Result<()> {
        match &mut self.steps {
            Some(steps) => steps.history(command, version, entries),
            None => append_history(self.tx, command, version, entries).await?,
        }
        Ok(())
    }

    /// Events into the outbox for `command`, outside a step of it (a woken wait).
    pub async fn outbox(&mut self, command: CommandId, events: &[Event]) -> Result<()> {
        let rows = insert_outbox(self.tx, command, events).await?;
        self.written.extend(rows);
        Ok(())
    }

    /// [`lock_and_mark`], after the command's row if it is kept back.
    pub async fn lock_and_mark(
        &mut self,
        id: CommandId,
        source: &str,
        event_id: &str,
    ) -> Result<Option<Locked>> {
        self.before(Read::Row(id)).await?;
        lock_and_mark(self.tx, id, source, event_id).await
    }

    /// [`command_in`]: a live command's row as it is now.
    pub async fn command(&mut self, id: CommandId) -> Result<Option<Command>> {
        self.before(Read::Row(id)).await?;
        command_in(self.tx, id).await
    }

    /// [`upsert_group`], after the parent's groups if any is kept back.
    pub async fn upsert_group(&mut self, group: &NewGroup<'_>) -> Result<Option<GroupRow>> {
        self.before(Read::GroupsOf(group.parent)).await?;
        upsert_group(self.tx, group).await
    }

    /// [`lock_group`], after anything kept back that may have counted into it.
    pub async fn lock_group(&mut self, parent: CommandId, name: &str) -> Result<Option<GroupRow>> {
        self.before(Read::Group).await?;
        lock_group(self.tx, parent, name).await
    }

    /// [`open_children`], after anything kept back that may be one of them.
    pub async fn open_children(
        &mut self,
        parent: CommandId,
        group: Option<&str>,
        abortable_only: bool,
    ) -> Result<Vec<CommandId>> {
        self.before(Read::Children).await?;
        open_children(self.tx, parent, group, abortable_only).await
    }

    /// [`time::clear_time_of_ended`], after anything kept back that may be one of its children
    /// or groups.
    pub async fn clear_time_of_ended(&mut self, command: CommandId) -> Result<Vec<CommandId>> {
        self.before(Read::Children).await?;
        time::clear_time_of_ended(self.tx, command).await
    }

    /// Counts a child's report into its parent's group once. At once, in one statement; in a
    /// batch, in memory, the group read and locked once. A [`Counted::Counted`] group is handed
    /// out: give it back with [`Writer::counted`].
    pub async fn count_report(
        &mut self,
        parent: CommandId,
        name: &str,
        child: &str,
        state: &str,
        outcome: &Value,
    ) -> Result<Counted> {
        match &mut self.steps {
            Some(steps) => {
                count_report_kept(self.tx, steps, parent, name, child, state, outcome).await
            }
            None => count_report(self.tx, parent, name, child, state, outcome).await,
        }
    }

    /// Gives back a group [`Writer::count_report`] handed out. In a batch it is kept back, to
    /// be saved by the next flush; at once its counters are in its row already, and it is
    /// saved only when `settled` by this report.
    pub async fn counted(&mut self, group: GroupRow, settled: bool) -> Result<()> {
        match &mut self.steps {
            Some(steps) => steps.keep_group(group),
            None if settled => save_group(self.tx, &group).await?,
            None => {}
        }
        Ok(())
    }

    /// Saves a group as it is now: kept back in a batch, written at once otherwise.
    pub async fn save_group(&mut self, group: GroupRow) -> Result<()> {
        match &mut self.steps {
            Some(steps) => steps.keep_group(group),
            None => save_group(self.tx, &group).await?,
        }
        Ok(())
    }
}

impl std::fmt::Debug for Writer<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("steps", &self.steps)
            .field("written", &self.written.len())
            .finish_non_exhaustive()
    }
}
