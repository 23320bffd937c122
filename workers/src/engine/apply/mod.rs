//! Applying one event to one command inside a transaction: create on start, lock the row,
//! dedupe, fold a child's ACK into its fan-in group, decide, check limits, guarded update,
//! spawn children, cascade aborts, report to the parent, history, outbox.

use chrono::Utc;
use cmdflow_shared::contract::types::{
    self, CHILDREN_DEADLINE, CHILDREN_SETTLED, COMMAND_ABORT, COMMAND_ABORTED, COMMAND_COMPLETED,
    COMMAND_FAILED, COMMAND_START,
};
use cmdflow_shared::decision::{
    AbortChildren, Channel, ChildSpec, Decision, FanIn, Outcome, Reports, TimerOp, WaitSpec,
    apply_data,
};
use cmdflow_shared::domain::{Kind, Owner};
use cmdflow_shared::store::time::{self, NewTimer};
use cmdflow_shared::store::{
    self, EntryKind, GroupRow, GroupState, HistoryEntry, NewCommand, Tx, Writer,
};
use cmdflow_shared::time::{TimerSpec, check_delay};
use cmdflow_shared::{Command, CommandId, CommandState, Event, HandlerError};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tracing::Instrument;

use super::{Applied, ApplyError, Engine};
use crate::fanin::{Tally, Verdict, evaluate};
use crate::remote::RemoteError;

mod children;
mod decision;
mod plan;
mod timers;

use plan::{End, Plan, history, plan};

/// The data of a `command.start` event.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartData {
    kind: String,
    owner: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    parent_id: Option<CommandId>,
}

/// The data of a child's ACK to its parent.
#[derive(Debug, Deserialize)]
struct AckData {
    child_id: CommandId,
    group: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    reason: Option<String>,
}

/// Why a child's report to `parent` does not count, if it does not: it names no child, or one
/// that is not a member of the group it names. A report counts only from a member.
async fn stranger(
    tx: &mut Tx<'_>,
    parent: &Command,
    event: &Event,
) -> Result<Option<String>, ApplyError> {
    let ack: AckData = match serde_json::from_value(Value::Object(event.data.clone())) {
        Ok(ack) => ack,
        Err(e) => return Ok(Some(format!("not a child's report ({e}); not counted"))),
    };
    if store::is_group_member(tx, ack.child_id, parent.id, &ack.group).await? {
        return Ok(None);
    }
    Ok(Some(format!(
        "a report from {}, which is not a child of this command in group {}; not counted",
        ack.child_id, ack.group
    )))
}

/// What a transaction carries from one event it applies to the next, until its commit: the
/// reports of children that counted themselves into their groups, to count before the commit,
/// and how many more children may start in it without a message (see
/// [`Engine::spawn`]).
#[derive(Debug)]
pub struct Carry {
    pub(in crate::engine) reports: Vec<Report>,
    starts_left: usize,
}

impl Engine {
    /// Nothing carried yet: a transaction's start.
    pub(in crate::engine) fn carry(&self) -> Carry {
        Carry {
            reports: Vec::new(),
            starts_left: self.settings.eager_starts,
        }
    }
}

/// A step's decision with what was noted and emitted before it was made (a report folded into
/// its group, a deadline).
struct Decided {
    decision: Decision,
    out: Vec<Event>,
    notes: Vec<String>,
}

/// A child's end, to be counted into its parent's group (whose reports are `settled`) at the end
/// of the transaction. All of a transaction's reports are counted together, in (parent, group)
/// order, after every event is applied: two batches that end children of the same parents then
/// take the group rows in the same order and never wait on each other in a cycle.
#[derive(Debug)]
pub struct Report {
    parent: CommandId,
    group: String,
    child: CommandId,
    /// `completed`, `failed` or `aborted`.
    state: &'static str,
    outcome: Value,
    /// The event that ended the child: the settled event it may cause is chained to it.
    cause: Event,
}

/// The engine's name for the timer of a wait's timeout.
pub fn wait_timer_name(event_type: &str, key: &str) -> String {
    format!("wait:{event_type}:{key}")
}

/// What a group's policy says of its tally so far.
fn verdict_of(group: &GroupRow) -> Verdict {
    let policy = match (group.policy.as_str(), group.quorum) {
        ("quorum", Some(q)) => FanIn::Quorum(q.max(0) as u32),
        (name, _) => FanIn::parse(name).unwrap_or(FanIn::All),
    };
    let tally = Tally {
        total: group.total.max(0) as u32,
        completed: group.completed.max(0) as u32,
        failed: group.failed.max(0) as u32,
        aborted: group.aborted.max(0) as u32,
    };
    evaluate(policy, tally)
}

/// How a child ended, as its report and its group keep it: `{result}` when it completed,
/// `{reason}` when it failed or was aborted.
fn ended(state: &str, result: Option<Value>, reason: Option<String>) -> Map<String, Value> {
    match state {
        "completed" => obj(json!({ "result": result.unwrap_or(Value::Null) })),
        _ => obj(json!({ "reason": reason })),
    }
}

fn obj(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

impl Engine {
    /// Applies one event addressed to `command_id` through `w`, which gathers the outbox rows
    /// to publish after the commit. `locked` is the command's row as this transaction already
    /// locked it, with whether this event was fresh when it was marked (the batch path); `None`
    /// locks and marks it here. Returns the command's row as it is after the event, for its
    /// next event in the same transaction. A child that ends and counts itself into its group
    /// adds its [`Report`] to `carry`, for [`Engine::count_reports`] before the commit.
    pub async fn apply(
        &self,
        w: &mut Writer<'_, '_>,
        command_id: CommandId,
        event: &Event,
        locked: Option<store::Locked>,
        carry: &mut Carry,
    ) -> Result<(Applied, Command), ApplyError> {
        if event.ty == COMMAND_START {
            // A child's row is created by its parent; a root's by its start event (a row locked
            // already exists).
            let new = self.new_command(command_id, event)?;
            if new.parent_id.is_none() && locked.is_none() {
                store::insert_command(w.tx(), &new).await?;
            }
        }
        let locked = match locked {
            Some(locked) => Some(locked),
            None => {
                w.lock_and_mark(command_id, &event.source, &event.id)
                    .await?
            }
        };
        let Some(store::Locked {
            command,
            fresh,
            counts_itself,
        }) = locked
        else {
            return Err(ApplyError::NotFound(command_id));
        };
        if !fresh {
            tracing::debug!("Already applied; ignoring the redelivery.");
            return Ok((Applied::Duplicate, command));
        }
        let starting = command.state == CommandState::Pending && command.version == 0;
        let ignore = if command.state.is_terminal() {
            Some(match event.ty.as_str() {
                COMMAND_ABORT => {
                    format!("abort reached a {} command; nothing to do", command.state)
                }
                ty if types::is_ack(ty) => format!(
                    "a child's report reached a {} parent; nothing to do",
                    command.state
                ),
                _ => format!(
                    "the command is {}; a terminal command accepts no more events",
                    command.state
                ),
            })
        } else if event.ty == COMMAND_START && !starting {
            Some("the command has already started; a second start changes nothing".to_owned())
        } else if types::is_ack(&event.ty) {
            stranger(w.tx(), &command, event).await?
        } else {
            None
        };
        if let Some(reason) = ignore {
            let line = [HistoryEntry {
                entry: EntryKind::Ignored,
                event_id: Some(event.id.clone()),
                event_type: Some(event.ty.clone()),
                from_state: None,
                to_state: None,
                detail: Some(json!({ "reason": reason, "source": event.source })),
            }];
            w.history(command_id, command.version, &line).await?;
            return Ok((Applied::Ignored, command));
        }
        let written = self
            .decide_and_apply(w, command, event, counts_itself, carry)
            .await?;
        Ok((Applied::Applied, written))
    }

    /// Decides and applies one event to a locked command. Returns the command's row as written.
    /// When the event ends a child that `counts_itself` into its group, its report joins
    /// `carry`, to be counted before the commit.
    pub(super) async fn decide_and_apply(
        &self,
        w: &mut Writer<'_, '_>,
        command: Command,
        event: &Event,
        counts_itself: bool,
        carry: &mut Carry,
    ) -> Result<Command, ApplyError> {
        let mut out: Vec<Event> = Vec::new();
        let mut notes: Vec<String> = Vec::new();

        // Only the definition the command started on decides it: without it, nothing is
        // applied and the event waits.
        let handler = match self
            .registry
            .handler_for(&command.kind, command.kind_version.as_deref())
        {
            Some(handler) => handler,
            None if self.registry.contains(&command.kind) => {
                return Err(ApplyError::VersionMissing {
                    id: command.id,
                    kind: command.kind.clone(),
                    version: command.kind_version.clone().unwrap_or_default(),
                });
            }
            None => {
                return Err(ApplyError::Permanent(format!(
                    "unknown command kind `{}`",
                    command.kind
                )));
            }
        };

        if types::is_ack(&event.ty) {
            self.fold_ack(w, &command, event, &mut out, &mut notes)
                .await?;
        }
        if event.ty == CHILDREN_DEADLINE {
            self.group_deadline(w, &command, event, &mut out, &mut notes)
                .await?;
        }

        let aborting = event.ty == COMMAND_ABORT;
        let decided = match self.registry.remote_decider(&command.kind) {
            // Asked under the command's lock, within the decider's bound (below the lock's TTL).
            Some(remote) => match self.ask_remote(remote, &command, event).await {
                Ok(decision) => Ok(decision),
                Err(e @ RemoteError::Unavailable { .. }) => {
                    return Err(ApplyError::Unavailable(e.to_string()));
                }
                Err(e @ RemoteError::Invalid { .. }) => {
                    return Err(ApplyError::Permanent(format!(
                        "handler {} refused {}: {e}",
                        command.kind, event.ty
                    )));
                }
                Err(e @ RemoteError::Refused { .. }) => Err(HandlerError::Refused(e.to_string())),
            },
            None => handler.decide(&command, event),
        };
        let decision = match decided {
            Ok(decision) => decision,
            Err(HandlerError::UnexpectedEvent { .. }) if types::is_engine_event(&event.ty) => {
                Decision::nothing()
            }
            Err(e) if aborting => {
                notes.push(format!("the handler's cleanup failed: {e}"));
                Decision::nothing()
            }
            Err(e) => {
                return Err(ApplyError::Permanent(format!(
                    "handler {} refused {}: {e}",
                    command.kind, event.ty
                )));
            }
        };
        let decided = Decided {
            decision,
            out,
            notes,
        };
        self.apply_decided(w, command, event, decided, counts_itself, carry)
            .await
    }

    /// Applies a decision made on `event` to the locked `command`: its limits, its step, its
    /// children (the first ones started in this transaction), time, aborts and its report.
    async fn apply_decided(
        &self,
        w: &mut Writer<'_, '_>,
        command: Command,
        event: &Event,
        decided: Decided,
        counts_itself: bool,
        carry: &mut Carry,
    ) -> Result<Command, ApplyError> {
        let Decided {
            mut decision,
            mut out,
            mut notes,
        } = decided;
        if let Err(reason) = self.check_limits(&command, &decision) {
            notes.push(reason.clone());
            decision = Decision::fail(reason);
        }
        // Render every message before anything is applied. A template error fails that message
        // (stored `failed` with the error as its reason), never the command's step: the business
        // decision stands, and no half-rendered message goes out.
        let rendered = self.render_messages(&command, event, &decision);
        notes.extend(rendered.iter().filter_map(|m| m.failed_reason.clone()));

        let Plan { mut next, end } = plan(&command, event, &decision).map_err(|e| {
            ApplyError::Permanent(format!(
                "handler {} decided an illegal move: {e}",
                command.kind
            ))
        })?;

        for emit in &decision.emit {
            let mut e = self.engine_event(&command, event, &emit.ty, emit.data.clone(), emit.to);
            if let Some(key) = &emit.correlation {
                e.correlationid = Some(key.clone());
            }
            out.push(e);
        }
        let eager = self
            .spawn(w, &command, event, &decision, &mut out, carry)
            .await?;
        // A command's timers and waits belong to it: they end with it, and so do its open
        // children whose parent-close policy is `abort`.
        // A command that ends at its first event, spawning nothing, has none of these yet.
        let first_and_alone = command.version == 0
            && decision.spawn_groups.is_empty()
            && decision.spawn_detached.is_empty();
        let orphans = if next.state.is_terminal() && first_and_alone {
            Vec::new()
        } else if next.state.is_terminal() {
            w.clear_time_of_ended(command.id).await?
        } else {
            self.apply_time(w.tx(), &command, &decision, &mut out)
                .await?;
            Vec::new()
        };

        // Aborts: the ones the handler asked for, and on ending, every open child whose
        // parent-close policy is `abort`. Each child is told once.
        let mut to_abort: Vec<(CommandId, String)> = Vec::new();
        if let Some(which) = &decision.abort_children {
            let ids = match which {
                AbortChildren::All => w.open_children(command.id, None, false).await?,
                AbortChildren::Group(g) => w.open_children(command.id, Some(g), false).await?,
                AbortChildren::Ids(ids) => {
                    let open = w.open_children(command.id, None, false).await?;
                    ids.iter().copied().filter(|id| open.contains(id)).collect()
                }
            };
            to_abort.extend(
                ids.into_iter()
                    .map(|id| (id, format!("aborted by its parent {}", command.id))),
            );
        }
        if next.state.is_terminal() {
            let reason = format!("its parent {} ended ({})", command.id, next.state);
            for id in orphans {
                to_abort.push((id, reason.clone()));
            }
        }
        if event.ty == COMMAND_ABORT && next.state == CommandState::Aborted {
            // An abort reaches the whole tree, fire-and-forget children too.
            let reason = format!("its parent {} was aborted", command.id);
            for id in w.open_children(command.id, None, false).await? {
                to_abort.push((id, reason.clone()));
            }
        }
        to_abort.sort_by_key(|(id, _)| *id);
        to_abort.dedup_by_key(|(id, _)| *id);
        for (id, reason) in to_abort {
            let mut data = Map::new();
            data.insert("reason".into(), json!(reason));
            out.push(self.engine_event(&command, event, COMMAND_ABORT, data, Some(id)));
        }

        // A child that ends reports to its parent, if the parent waits for it: by an event, or
        // by counting itself into the group before this transaction commits.
        match end {
            Some(End {
                parent,
                group,
                state,
                mut data,
                ..
            }) if counts_itself => {
                data.insert("state".into(), json!(state));
                notes.push(format!("counted into group {group} of {parent}"));
                carry.reports.push(Report {
                    parent,
                    group,
                    child: command.id,
                    state,
                    outcome: Value::Object(data),
                    cause: event.clone(),
                });
            }
            Some(End {
                parent,
                group,
                ty,
                mut data,
                ..
            }) => {
                data.insert("child_id".into(), json!(command.id));
                data.insert("group".into(), json!(group));
                out.push(self.engine_event(&command, event, ty, data, Some(parent)));
            }
            None => {}
        }

        for (i, m) in rendered.iter().enumerate() {
            let trigger = format!(
                "{}/{}/{}/{}/{i}",
                command.id, event.source, event.id, m.template
            );
            let stored = store::people::insert_message(w.tx(), m, command.id, &trigger).await?;
            if stored && let Some(reason) = &m.failed_reason {
                tracing::warn!(command.id = %command.id, template = %m.template, reason = %reason, "A message failed to render; it is stored failed and the step goes on.");
                metrics::counter!(cmdflow_shared::metrics::MESSAGES_FAILED_TOTAL).increment(1);
            }
        }

        // The history names every child's start; those started here send no message.
        let lines = history(&command, &next, event, &notes, &out);
        if !eager.is_empty() {
            let here: std::collections::HashSet<CommandId> =
                eager.iter().map(|e| e.command.id).collect();
            out.retain(|e| {
                e.ty != COMMAND_START || !e.commandid.is_some_and(|id| here.contains(&id))
            });
        }
        w.step(&mut next, command.version, &lines, &out).await?;
        for child in eager {
            Box::pin(self.start_eagerly(w, child, carry)).await?;
        }
        Ok(next)
    }
}
