//! Applying one event to one command inside a transaction: create on start, lock the row,
//! dedupe, fold a child's ACK into its fan-in group, decide, check limits, guarded update,
//! spawn children, cascade aborts, report to the parent, history, outbox.

use chrono::Utc;
use cmdflow_shared::contract::types::{
    self, CHILDREN_DEADLINE, CHILDREN_SETTLED, COMMAND_ABORT, COMMAND_ABORTED, COMMAND_COMPLETED,
    COMMAND_FAILED, COMMAND_START,
};
use cmdflow_shared::decision::{
    AbortChildren, Channel, ChildSpec, Decision, FanIn, Outcome, TimerOp, WaitSpec, apply_data,
};
use cmdflow_shared::domain::{Kind, Owner};
use cmdflow_shared::store::time::{self, NewTimer};
use cmdflow_shared::store::{self, EntryKind, GroupRow, HistoryEntry, NewCommand, OutboxRow, Tx};
use cmdflow_shared::time::{TimerSpec, check_delay};
use cmdflow_shared::{Command, CommandId, CommandState, Event, HandlerError};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Applied, ApplyError, Engine};
use crate::fanin::{Tally, Verdict, evaluate};
use crate::remote::RemoteError;

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

/// Writes the steps a batch kept back (if it keeps any), before a statement that reads other
/// commands' rows.
async fn flush(tx: &mut Tx<'_>, steps: Option<&mut store::Steps>) -> Result<(), ApplyError> {
    if let Some(steps) = steps {
        store::flush_steps(tx, steps).await?;
    }
    Ok(())
}

impl Engine {
    /// Applies one event addressed to `command_id` inside `tx`. Returns the outbox rows to
    /// publish after commit. A child that ends and counts itself into its group adds its
    /// [`Report`] to `reports`, for [`Engine::count_reports`] before the commit.
    pub async fn apply(
        &self,
        tx: &mut Tx<'_>,
        command_id: CommandId,
        event: &Event,
        reports: &mut Vec<Report>,
    ) -> Result<(Applied, Vec<OutboxRow>), ApplyError> {
        let (applied, outbox, _) = self
            .apply_locked(tx, command_id, event, None, reports, None)
            .await?;
        Ok((applied, outbox))
    }

    /// [`Engine::apply`], where `locked` is the command's row as this transaction already locked
    /// it, with whether this event was fresh when it was marked (the batch path); `None` locks
    /// and marks it here. Also returns the command's row as it is after the event, for the
    /// command's next event in the same transaction. With `steps`, the command's row, history
    /// and outbox events are kept back there (and no outbox rows are returned), to be written
    /// with the batch's other steps.
    pub async fn apply_locked(
        &self,
        tx: &mut Tx<'_>,
        command_id: CommandId,
        event: &Event,
        locked: Option<store::Locked>,
        reports: &mut Vec<Report>,
        mut steps: Option<&mut store::Steps>,
    ) -> Result<(Applied, Vec<OutboxRow>, Command), ApplyError> {
        if event.ty == COMMAND_START {
            // A child's row is created by its parent; a root's by its start event (a row locked
            // already exists).
            let new = self.new_command(command_id, event)?;
            if new.parent_id.is_none() && locked.is_none() {
                store::insert_command(tx, &new).await?;
            }
        }
        let locked = match locked {
            Some(locked) => Some(locked),
            None => {
                // Its row may carry a step kept back (a root's second event in the batch).
                if steps.as_ref().is_some_and(|s| s.keeps(command_id)) {
                    flush(tx, steps.as_deref_mut()).await?;
                }
                store::lock_and_mark(tx, command_id, &event.source, &event.id).await?
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
            return Ok((Applied::Duplicate, Vec::new(), command));
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
            stranger(tx, &command, event).await?
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
            match steps {
                Some(steps) => steps.history(command_id, command.version, &line),
                None => store::append_history(tx, command_id, command.version, &line).await?,
            }
            return Ok((Applied::Ignored, Vec::new(), command));
        }
        let (outbox, report, written) = self
            .decide_and_apply(tx, command, event, counts_itself, steps)
            .await?;
        reports.extend(report);
        Ok((Applied::Applied, outbox, written))
    }

    /// Decides and applies one event to a locked command. Returns its outbox rows and, when it
    /// ends a child that `counts_itself` into its group, the report to count before the commit.
    pub(super) async fn decide_and_apply(
        &self,
        tx: &mut Tx<'_>,
        command: Command,
        event: &Event,
        counts_itself: bool,
        mut steps: Option<&mut store::Steps>,
    ) -> Result<(Vec<OutboxRow>, Option<Report>, Command), ApplyError> {
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
            self.fold_ack(
                tx,
                &command,
                event,
                &mut out,
                &mut notes,
                steps.as_deref_mut(),
            )
            .await?;
        }
        if event.ty == CHILDREN_DEADLINE {
            self.group_deadline(
                tx,
                &command,
                event,
                &mut out,
                &mut notes,
                steps.as_deref_mut(),
            )
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
        let mut decision = match decided {
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
        if let Err(reason) = self.check_limits(&command, &decision) {
            notes.push(reason.clone());
            decision = Decision::fail(reason);
        }
        // Render every message before anything is applied. A template error fails that message
        // (stored `failed` with the error as its reason), never the command's step: the business
        // decision stands, and no half-rendered message goes out.
        let rendered = self.render_messages(&command, event, &decision);
        notes.extend(rendered.iter().filter_map(|m| m.failed_reason.clone()));

        let mut next = command.clone();
        // A command that starts a fan-in group and names no state now waits for its children.
        let default_state = if !decision.spawn_groups.is_empty() {
            CommandState::Waiting
        } else if command.state == CommandState::Pending {
            CommandState::Running
        } else {
            command.state
        };
        let target = if aborting {
            next.reason = Some(
                event
                    .data
                    .get("reason")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("aborted by {}", event.source)),
            );
            CommandState::Aborted
        } else {
            match &decision.outcome {
                Some(Outcome::Complete(result)) => {
                    next.result = Some(result.clone());
                    CommandState::Completed
                }
                Some(Outcome::Fail(reason)) => {
                    next.reason = Some(reason.clone());
                    CommandState::Failed
                }
                None => decision.state.unwrap_or(default_state),
            }
        };
        next.state = command.state.transition(target).map_err(|e| {
            ApplyError::Permanent(format!(
                "handler {} decided an illegal move: {e}",
                command.kind
            ))
        })?;
        if let Some(change) = &decision.data {
            next.data = apply_data(&command.data, change);
        }
        if let Some(ui) = &decision.ui {
            next.ui = if ui.is_null() { None } else { Some(ui.clone()) };
        }
        // A hint ends with its command, unless the ending decision sets one that outlives it
        // (such as "your membership is approved").
        if next.state.is_terminal() && decision.ui.is_none() {
            next.ui = None;
        }

        for emit in &decision.emit {
            let mut e = self.engine_event(&command, event, &emit.ty, emit.data.clone(), emit.to);
            if let Some(key) = &emit.correlation {
                e.correlationid = Some(key.clone());
            }
            out.push(e);
        }
        if !decision.spawn_groups.is_empty() && steps.as_ref().is_some_and(|s| s.keeps(command.id))
        {
            // Spawning into a group reads it, and it may be kept back.
            flush(tx, steps.as_deref_mut()).await?;
        }
        self.spawn(tx, &command, event, &decision, &mut out).await?;
        // A command's timers and waits belong to it: they end with it, and so do its open
        // children whose parent-close policy is `abort`.
        // A command that ends at its first event, spawning nothing, has none of these yet.
        let first_and_alone = command.version == 0
            && decision.spawn_groups.is_empty()
            && decision.spawn_detached.is_empty();
        let orphans = if next.state.is_terminal() && first_and_alone {
            Vec::new()
        } else if next.state.is_terminal() {
            // It reads the children's rows, which may carry kept-back steps.
            flush(tx, steps.as_deref_mut()).await?;
            time::clear_time_of_ended(tx, command.id).await?
        } else {
            self.apply_time(tx, &command, &decision, &mut out).await?;
            Vec::new()
        };

        // Aborts: the ones the handler asked for, and on ending, every open child whose
        // parent-close policy is `abort`. Each child is told once.
        let mut to_abort: Vec<(CommandId, String)> = Vec::new();
        if let Some(which) = &decision.abort_children {
            flush(tx, steps.as_deref_mut()).await?;
            let ids = match which {
                AbortChildren::All => store::open_children(tx, command.id, None, false).await?,
                AbortChildren::Group(g) => {
                    store::open_children(tx, command.id, Some(g), false).await?
                }
                AbortChildren::Ids(ids) => {
                    let open = store::open_children(tx, command.id, None, false).await?;
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
        if aborting && next.state == CommandState::Aborted {
            // An abort reaches the whole tree, fire-and-forget children too.
            let reason = format!("its parent {} was aborted", command.id);
            for id in store::open_children(tx, command.id, None, false).await? {
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
        let mut report = None;
        if next.state.is_terminal()
            && let (Some(parent), Some(group)) = (command.parent_id, &command.group_name)
        {
            let (state, ty) = match next.state {
                CommandState::Completed => ("completed", COMMAND_COMPLETED),
                CommandState::Failed => ("failed", COMMAND_FAILED),
                _ => ("aborted", COMMAND_ABORTED),
            };
            let mut data = ended(state, next.result.clone(), next.reason.clone());
            data.insert("kind".into(), json!(command.kind));
            if counts_itself {
                data.insert("state".into(), json!(state));
                notes.push(format!("counted into group {group} of {parent}"));
                report = Some(Report {
                    parent,
                    group: group.clone(),
                    child: command.id,
                    state,
                    outcome: Value::Object(data),
                    cause: event.clone(),
                });
            } else {
                data.insert("child_id".into(), json!(command.id));
                data.insert("group".into(), json!(group));
                out.push(self.engine_event(&command, event, ty, data, Some(parent)));
            }
        }

        for (i, m) in rendered.iter().enumerate() {
            let trigger = format!(
                "{}/{}/{}/{}/{i}",
                command.id, event.source, event.id, m.template
            );
            let stored = store::people::insert_message(tx, m, command.id, &trigger).await?;
            if stored && let Some(reason) = &m.failed_reason {
                tracing::warn!(command.id = %command.id, template = %m.template, reason = %reason, "A message failed to render; it is stored failed and the step goes on.");
                metrics::counter!(cmdflow_shared::metrics::MESSAGES_FAILED_TOTAL).increment(1);
            }
        }

        let mut detail = obj(json!({ "source": event.source, "data": event.data }));
        if let Some(tp) = event.extensions.get(cmdflow_shared::trace::TRACEPARENT) {
            detail.insert("traceparent".into(), tp.clone());
        }
        if !notes.is_empty() {
            detail.insert("notes".into(), json!(notes));
        }
        // The version of the definition that decided it.
        if let Some(version) = &command.kind_version {
            detail.insert("kind_version".into(), json!(version));
        }
        let mut history = vec![HistoryEntry {
            entry: EntryKind::Received,
            event_id: Some(event.id.clone()),
            event_type: Some(event.ty.clone()),
            from_state: None,
            to_state: None,
            detail: Some(Value::Object(detail)),
        }];
        if next.state != command.state {
            history.push(HistoryEntry {
                entry: EntryKind::StateChanged,
                event_id: Some(event.id.clone()),
                event_type: None,
                from_state: Some(command.state),
                to_state: Some(next.state),
                detail: match next.state {
                    CommandState::Completed => Some(json!({ "result": next.result })),
                    CommandState::Failed | CommandState::Aborted => {
                        Some(json!({ "reason": next.reason }))
                    }
                    _ => None,
                },
            });
        }
        history.extend(out.iter().map(|e| HistoryEntry {
            entry: EntryKind::Emitted,
            event_id: Some(e.id.clone()),
            event_type: Some(e.ty.clone()),
            from_state: None,
            to_state: None,
            detail: Some(json!({ "commandid": e.commandid, "data": e.data })),
        }));
        let outbox = match steps {
            Some(steps) => {
                steps.step(&mut next, command.version, &history, &out);
                Vec::new()
            }
            None => store::write_step(tx, &mut next, command.version, &history, &out).await?,
        };
        Ok((outbox, report, next))
    }

    /// Counts the transaction's reports into their groups, in (parent, group, child) order, and
    /// settles each group its policy decides: its open members are aborted and the parent gets
    /// one `children.settled`. Returns the outbox rows of those events.
    pub async fn count_reports(
        &self,
        tx: &mut Tx<'_>,
        mut reports: Vec<Report>,
    ) -> Result<Vec<OutboxRow>, ApplyError> {
        reports.sort_by(|a, b| (a.parent, &a.group, a.child).cmp(&(b.parent, &b.group, b.child)));
        let mut outbox = Vec::new();
        for r in reports {
            let child = r.child.to_string();
            let mut group = match store::count_report(
                tx, r.parent, &r.group, &child, r.state, &r.outcome,
            )
            .await?
            {
                store::Counted::Counted(group) if group.state == "open" => group,
                store::Counted::Counted(group) => {
                    tracing::debug!(group = %group.name, state = %group.state, "Counted into a group that had already ended.");
                    continue;
                }
                store::Counted::AlreadyReported | store::Counted::NoGroup => continue,
            };
            let verdict = verdict_of(&group);
            if verdict == Verdict::Open {
                continue;
            }
            let Some(parent) = store::command_in(tx, r.parent).await? else {
                tracing::warn!(parent = %r.parent, group = %group.name, "A group decided by a child's report has no live parent; left as it is.");
                continue;
            };
            let reason = format!("group {} settled ({})", group.name, verdict.as_str());
            let mut out = Vec::new();
            self.close_group(
                tx, &parent, &r.cause, &mut group, verdict, &reason, false, &mut out, None,
            )
            .await?;
            store::save_group(tx, &group).await?;
            outbox.extend(store::insert_outbox(tx, r.child, &out).await?);
        }
        Ok(outbox)
    }

    /// An event cmdflow emits on behalf of `command`, chained to the event that caused it.
    fn engine_event(
        &self,
        command: &Command,
        cause: &Event,
        ty: &str,
        data: Map<String, Value>,
        to: Option<CommandId>,
    ) -> Event {
        let mut e = Event::new(&format!("cmdflow/{}", command.kind), ty, data);
        e.commandid = to;
        e.extensions.insert(
            cmdflow_shared::contract::FROM_COMMAND.to_owned(),
            json!(command.id),
        );
        e.subject = Some(command.owner.clone());
        e.causationid = Some(cause.id.clone());
        e.correlationid = cause
            .correlationid
            .clone()
            .or_else(|| Some(command.root_id.to_string()));
        // The trace goes on: a child of this handling's span when traces are on, else a new
        // span in the cause's trace.
        let traceparent = cmdflow_shared::telemetry::current_traceparent().or_else(|| {
            cause
                .extensions
                .get(cmdflow_shared::trace::TRACEPARENT)
                .and_then(Value::as_str)
                .map(|parent| cmdflow_shared::trace::child_of(Some(parent)))
        });
        if let Some(traceparent) = traceparent {
            e.extensions.insert(
                cmdflow_shared::trace::TRACEPARENT.to_owned(),
                json!(traceparent),
            );
        }
        e
    }

    /// Refuses decisions that would let a tree run away. The reason fails the command.
    fn check_limits(&self, command: &Command, decision: &Decision) -> Result<(), String> {
        let now = self.clock.now();
        for op in &decision.timers {
            match op {
                TimerOp::Set(spec) => {
                    if spec.name.starts_with("wait:") || spec.name.starts_with("group:") {
                        return Err(format!(
                            "timer {}: names starting with wait: or group: are the engine's",
                            spec.name
                        ));
                    }
                    spec.first_due(now)
                        .map_err(|e| format!("timer {}: {e}", spec.name))?;
                }
                TimerOp::Cancel(name) => {
                    cmdflow_shared::time::check_name(name)
                        .map_err(|e| format!("cancel timer: {e}"))?;
                }
            }
        }
        for wait in &decision.waits {
            cmdflow_shared::domain::check_dotted_name(&wait.event_type, 2)
                .map_err(|e| format!("wait: event type: {e}"))?;
            if wait.key.is_empty() || wait.key.chars().count() > 512 {
                return Err("wait: the correlation key must be 1 to 512 characters".to_owned());
            }
            if let Some(t) = wait.timeout {
                check_delay(t).map_err(|e| format!("wait timeout: {e}"))?;
            }
        }
        for group in &decision.spawn_groups {
            if let Some(d) = group.deadline {
                check_delay(d).map_err(|e| format!("group {} deadline: {e}", group.name))?;
            }
        }
        let n = decision.spawn_count();
        if n == 0 {
            return Ok(());
        }
        let max = self.settings.max_children;
        if n > max {
            return Err(format!(
                "limit: a decision may spawn at most {max} children; this one spawned {n}"
            ));
        }
        if command.depth + 1 > self.settings.max_depth {
            return Err(format!(
                "limit: the tree may be at most {} levels deep; {} at depth {} cannot spawn children",
                self.settings.max_depth, command.kind, command.depth
            ));
        }
        for group in &decision.spawn_groups {
            if group.name.is_empty() || group.name.len() > 64 {
                return Err("a group name must be 1 to 64 bytes".to_owned());
            }
            if let FanIn::Quorum(q) = group.policy
                && q as usize > group.children.len()
            {
                return Err(format!(
                    "group {}: quorum:{q} needs at least {q} children; it has {}",
                    group.name,
                    group.children.len()
                ));
            }
        }
        let specs = decision
            .spawn_detached
            .iter()
            .chain(decision.spawn_groups.iter().flat_map(|g| g.children.iter()));
        for spec in specs {
            if !self.registry.contains(&spec.kind) {
                return Err(format!("cannot spawn unknown command kind `{}`", spec.kind));
            }
            self.registry
                .check_start(&spec.kind, &spec.data)
                .map_err(|v| format!("cannot spawn {}: {v}", spec.kind))?;
            if let Some(owner) = &spec.owner {
                Owner::parse(owner).map_err(|e| format!("child owner: {e}"))?;
            }
        }
        Ok(())
    }

    /// Creates the decision's children as rows in this transaction, opens their groups, and
    /// queues their start events.
    async fn spawn(
        &self,
        tx: &mut Tx<'_>,
        parent: &Command,
        cause: &Event,
        decision: &Decision,
        out: &mut Vec<Event>,
    ) -> Result<(), ApplyError> {
        if decision.spawn_count() == 0 {
            return Ok(());
        }
        let mut rows = Vec::with_capacity(decision.spawn_count());
        let created_at = cause.accepted_at();
        let mut child = |spec: &ChildSpec, group: Option<&str>| {
            let id = CommandId::new();
            let owner = spec.owner.clone().unwrap_or_else(|| parent.owner.clone());
            rows.push(NewCommand {
                id,
                kind: spec.kind.clone(),
                owner: owner.clone(),
                parent_id: Some(parent.id),
                root_id: parent.root_id,
                depth: parent.depth + 1,
                data: Value::Object(spec.data.clone()),
                group_name: group.map(str::to_owned),
                // A fire-and-forget child has no concern for its parent: the parent's end never
                // aborts it (an abort of the parent does).
                parent_close: match group {
                    None => "abandon".to_owned(),
                    Some(_) => spec.parent_close.as_str().to_owned(),
                },
                created_at,
                kind_version: self.registry.version_of(&spec.kind).map(str::to_owned),
            });
            let start = obj(json!({
                "kind": spec.kind, "owner": owner, "data": spec.data, "parent_id": parent.id,
            }));
            out.push(self.engine_event(parent, cause, COMMAND_START, start, Some(id)));
        };
        for spec in &decision.spawn_detached {
            child(spec, None);
        }
        for group in &decision.spawn_groups {
            for spec in &group.children {
                child(spec, Some(&group.name));
            }
        }
        store::insert_children(tx, &rows).await?;
        for group in &decision.spawn_groups {
            let quorum = match group.policy {
                FanIn::Quorum(q) => Some(q as i32),
                _ => None,
            };
            let deadline_at = group
                .deadline
                .and_then(|d| chrono::Duration::from_std(d).ok())
                .map(|d| Utc::now() + d);
            let new = store::NewGroup {
                parent: parent.id,
                name: &group.name,
                policy: group.policy.name(),
                quorum,
                reports: group.reports.name(),
                add_total: group.children.len() as i32,
                deadline_at,
            };
            let row = store::upsert_group(tx, &new).await?.ok_or_else(|| {
                ApplyError::Permanent(format!(
                    "group {} of {} has already settled; spawn into a new group",
                    group.name, parent.id
                ))
            })?;
            if let Some(due_at) = deadline_at {
                time::upsert_timer(
                    tx,
                    &NewTimer {
                        command: parent.id,
                        name: &format!("group:{}", group.name),
                        kind: "group_deadline",
                        due_at,
                        cron: None,
                        tz: None,
                        payload: Some(json!({ "group": group.name })),
                    },
                )
                .await?;
            }
            // An empty group settles at once, so a parent never waits on nothing.
            if row.total == 0 {
                let mut row = row;
                // A group just made has no members to read.
                self.settle_if_decided(tx, parent, cause, &mut row, out, None)
                    .await?;
                store::save_group(tx, &row).await?;
            }
        }
        Ok(())
    }

    /// Folds a child's ACK into its group: counts it once, and settles the group when its policy
    /// says so.
    async fn fold_ack(
        &self,
        tx: &mut Tx<'_>,
        parent: &Command,
        event: &Event,
        out: &mut Vec<Event>,
        notes: &mut Vec<String>,
        mut steps: Option<&mut store::Steps>,
    ) -> Result<(), ApplyError> {
        let ack: AckData = match serde_json::from_value(Value::Object(event.data.clone())) {
            Ok(ack) => ack,
            Err(e) => {
                notes.push(format!("not a child's report ({e}); no group counted it"));
                return Ok(());
            }
        };
        let state = match event.ty.as_str() {
            COMMAND_COMPLETED => "completed",
            COMMAND_FAILED => "failed",
            COMMAND_ABORTED => "aborted",
            _ => return Ok(()),
        };
        let mut outcome = ended(state, ack.result, ack.reason);
        outcome.insert("state".into(), json!(state));
        outcome.insert("kind".into(), json!(ack.kind));
        let child = ack.child_id.to_string();
        let outcome = Value::Object(outcome);
        let counted = match steps.as_deref_mut() {
            Some(steps) => {
                store::count_report_kept(tx, steps, parent.id, &ack.group, &child, state, &outcome)
                    .await?
            }
            None => store::count_report(tx, parent.id, &ack.group, &child, state, &outcome).await?,
        };
        let mut group = match counted {
            store::Counted::Counted(group) => group,
            store::Counted::AlreadyReported => {
                notes.push(format!("child {child} has already reported; counted once"));
                return Ok(());
            }
            store::Counted::NoGroup => {
                notes.push(format!("no group {} on this command", ack.group));
                return Ok(());
            }
        };
        if group.state != "open" {
            notes.push(format!("group {} had already {}", group.name, group.state));
            return Ok(());
        }
        self.settle_if_decided(tx, parent, event, &mut group, out, steps.as_deref_mut())
            .await?;
        if group.state != "open" {
            // Settled by this report: its verdict is saved with it.
            match steps {
                Some(steps) => steps.keep_group(*group),
                None => store::save_group(tx, &group).await?,
            }
        }
        Ok(())
    }

    /// When the group's policy decides it, freezes it, aborts its open members, and tells the
    /// parent with one `children.settled` event.
    async fn settle_if_decided(
        &self,
        tx: &mut Tx<'_>,
        parent: &Command,
        cause: &Event,
        group: &mut GroupRow,
        out: &mut Vec<Event>,
        steps: Option<&mut store::Steps>,
    ) -> Result<(), ApplyError> {
        let verdict = verdict_of(group);
        if verdict == Verdict::Open {
            return Ok(());
        }
        let reason = format!("group {} settled ({})", group.name, verdict.as_str());
        self.close_group(
            tx, parent, cause, group, verdict, &reason, false, out, steps,
        )
        .await
    }

    /// Freezes a group at its verdict, cancels its deadline, aborts its open members, and tells
    /// the parent with one `children.settled` event.
    #[allow(clippy::too_many_arguments)]
    async fn close_group(
        &self,
        tx: &mut Tx<'_>,
        parent: &Command,
        cause: &Event,
        group: &mut GroupRow,
        verdict: Verdict,
        reason: &str,
        deadline: bool,
        out: &mut Vec<Event>,
        steps: Option<&mut store::Steps>,
    ) -> Result<(), ApplyError> {
        group.state = verdict.as_str().to_owned();
        time::cancel_timer(tx, parent.id, &format!("group:{}", group.name)).await?;
        // The members' rows may carry kept-back steps.
        flush(tx, steps).await?;
        for id in store::open_children(tx, parent.id, Some(&group.name), false).await? {
            let data = obj(json!({ "reason": reason }));
            out.push(self.engine_event(parent, cause, COMMAND_ABORT, data, Some(id)));
        }
        let data = obj(json!({
            "group": group.name,
            "policy": group.policy,
            "quorum": group.quorum,
            "outcome": verdict.as_str(),
            "deadline": deadline,
            "total": group.total,
            "completed": group.completed,
            "failed": group.failed,
            "aborted": group.aborted,
            "outcomes": group.outcomes,
        }));
        out.push(self.engine_event(parent, cause, CHILDREN_SETTLED, data, Some(parent.id)));
        Ok(())
    }

    /// Sets and cancels the decision's timers, and registers its waits. A wait whose event
    /// arrived shortly before (within the early-event window) is matched at once.
    async fn apply_time(
        &self,
        tx: &mut Tx<'_>,
        command: &Command,
        decision: &Decision,
        out: &mut Vec<Event>,
    ) -> Result<(), ApplyError> {
        let now = self.clock.now();
        for op in &decision.timers {
            match op {
                TimerOp::Set(spec) => self.set_timer(tx, command.id, spec, now).await?,
                TimerOp::Cancel(name) => {
                    time::cancel_timer(tx, command.id, name).await?;
                }
            }
        }
        if decision.stop_waiting {
            time::clear_waits(tx, command.id).await?;
        }
        for wait in &decision.waits {
            self.register_wait(tx, command, wait, now, out).await?;
        }
        Ok(())
    }

    async fn set_timer(
        &self,
        tx: &mut Tx<'_>,
        command: CommandId,
        spec: &TimerSpec,
        now: chrono::DateTime<Utc>,
    ) -> Result<(), ApplyError> {
        let due_at = spec
            .first_due(now)
            .map_err(|e| ApplyError::Permanent(format!("timer {}: {e}", spec.name)))?;
        let kind = match &spec.when {
            cmdflow_shared::time::TimerWhen::After(_) => "after",
            cmdflow_shared::time::TimerWhen::At(_) => "at",
            cmdflow_shared::time::TimerWhen::Cron { .. } => "cron",
        };
        let (cron, tz) = spec.cron().unzip();
        time::upsert_timer(
            tx,
            &NewTimer {
                command,
                name: &spec.name,
                kind,
                due_at,
                cron,
                tz,
                payload: None,
            },
        )
        .await?;
        Ok(())
    }

    async fn register_wait(
        &self,
        tx: &mut Tx<'_>,
        command: &Command,
        wait: &WaitSpec,
        now: chrono::DateTime<Utc>,
        out: &mut Vec<Event>,
    ) -> Result<(), ApplyError> {
        time::lock_key(tx, &wait.event_type, &wait.key).await?;
        let window = self.settings.early_event_window;
        // An event about any identity of the person, accepted since the command started.
        let keys = self.linked_keys(tx, &wait.key).await?;
        if let Some(body) = time::early_match(
            tx,
            command.id,
            command.created_at,
            &wait.event_type,
            &keys,
            window,
        )
        .await?
        {
            // The event came first: deliver it now, and register nothing.
            if let Ok(mut early) = serde_json::from_value::<Event>(body) {
                early.commandid = Some(command.id);
                out.push(early);
                return Ok(());
            }
        }
        let timeout_at = wait
            .timeout
            .and_then(|t| chrono::Duration::from_std(t).ok())
            .map(|t| now + t);
        time::insert_wait(tx, command.id, &wait.event_type, &wait.key, timeout_at).await?;
        if let Some(due_at) = timeout_at {
            time::upsert_timer(
                tx,
                &NewTimer {
                    command: command.id,
                    name: &wait_timer_name(&wait.event_type, &wait.key),
                    kind: "wait_timeout",
                    due_at,
                    cron: None,
                    tz: None,
                    payload: Some(json!({ "type": wait.event_type, "key": wait.key })),
                },
            )
            .await?;
        }
        Ok(())
    }

    /// A group's deadline passed: if it is still open, it fails and its open children are aborted.
    async fn group_deadline(
        &self,
        tx: &mut Tx<'_>,
        parent: &Command,
        event: &Event,
        out: &mut Vec<Event>,
        notes: &mut Vec<String>,
        steps: Option<&mut store::Steps>,
    ) -> Result<(), ApplyError> {
        let Some(name) = event.data.get("group").and_then(Value::as_str) else {
            notes.push("a deadline without a group".to_owned());
            return Ok(());
        };
        // The group may be kept back, counted into by an earlier report of the batch.
        flush(tx, steps).await?;
        let Some(mut group) = store::lock_group(tx, parent.id, name).await? else {
            notes.push(format!("no group {name} on this command"));
            return Ok(());
        };
        if group.state != "open" {
            notes.push(format!("group {name} had already {}", group.state));
            return Ok(());
        }
        let reason = format!("group {name} missed its deadline");
        self.close_group(
            tx,
            parent,
            event,
            &mut group,
            Verdict::Failed,
            &reason,
            true,
            out,
            None,
        )
        .await?;
        store::save_group(tx, &group).await?;
        Ok(())
    }

    /// Renders the decision's messages with the person's own data.
    fn render_messages(
        &self,
        command: &Command,
        event: &Event,
        decision: &Decision,
    ) -> Vec<store::people::NewMessage> {
        use store::people::Delivery;
        let now = self.clock.now();
        decision
            .messages
            .iter()
            .map(|spec| {
                let channel = match spec.channel {
                    Channel::InApp => "in_app",
                    Channel::Email => "email",
                };
                let to = spec.to.clone().unwrap_or_else(|| command.owner.clone());
                let failed = |reason: String| store::people::NewMessage {
                    owner: to.clone(),
                    template: spec.template.clone(),
                    channel,
                    subject: String::new(),
                    body: String::new(),
                    email_to: spec.email.clone(),
                    delivery: Delivery::Failed,
                    failed_reason: Some(reason),
                };
                let mut context = command.data.as_object().cloned().unwrap_or_default();
                for (k, v) in &spec.vars {
                    context.insert(k.clone(), v.clone());
                }
                if !context.contains_key("name") {
                    context.insert("name".into(), json!(to.split_once(':').map_or(to.as_str(), |(_, id)| id)));
                }
                context.insert("owner".into(), json!(to));
                context.insert("now".into(), json!(now));
                context.insert("command".into(), json!({"id": command.id, "kind": command.kind, "created_at": command.created_at}));
                context.insert("event".into(), json!({"type": event.ty, "data": event.data, "time": event.time}));
                let (subject, body) = match self.registry.templates().render(&spec.template, &Value::Object(context)) {
                    Ok(rendered) => rendered,
                    Err(reason) => return failed(reason),
                };
                let delivery = match (spec.channel, &spec.email) {
                    (Channel::InApp, _) => Delivery::InApp,
                    (Channel::Email, None) => return failed(format!("template {}: an e-mail needs an address", spec.template)),
                    (Channel::Email, Some(address)) => match cmdflow_shared::domain::check_email(address) {
                        Err(reason) => return failed(format!("template {}: to: {reason}", spec.template)),
                        Ok(()) if self.settings.smtp_enabled => Delivery::Pending,
                        Ok(()) => Delivery::Kept,
                    },
                };
                store::people::NewMessage {
                    owner: to.clone(),
                    template: spec.template.clone(),
                    channel,
                    subject,
                    body,
                    email_to: spec.email.clone(),
                    delivery,
                    failed_reason: None,
                }
            })
            .collect()
    }

    /// Asks a remote decider, counting the call by kind and outcome and timing it.
    async fn ask_remote(
        &self,
        remote: &crate::remote::RemoteDecider,
        command: &cmdflow_shared::Command,
        event: &Event,
    ) -> Result<Decision, RemoteError> {
        let started = std::time::Instant::now();
        let answer = remote.decide(command, event).await;
        let outcome = match &answer {
            Ok(_) => "decided",
            Err(RemoteError::Unavailable { .. }) => "unavailable",
            Err(RemoteError::Refused { .. }) => "refused",
            Err(RemoteError::Invalid { .. }) => "invalid",
        };
        let kind = command.kind.clone();
        metrics::counter!(cmdflow_shared::metrics::DECIDER_CALLS, "kind" => kind.clone(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!(cmdflow_shared::metrics::DECIDER_SECONDS, "kind" => kind)
            .record(started.elapsed().as_secs_f64());
        answer
    }

    pub(super) fn new_command(
        &self,
        id: CommandId,
        event: &Event,
    ) -> Result<NewCommand, ApplyError> {
        let start: StartData = serde_json::from_value(Value::Object(event.data.clone()))
            .map_err(|e| ApplyError::Permanent(format!("invalid command.start data: {e}")))?;
        let kind = Kind::parse(&start.kind)
            .map_err(|e| ApplyError::Permanent(format!("invalid command.start data: kind: {e}")))?;
        if !self.registry.contains(kind.as_str()) {
            return Err(ApplyError::Permanent(format!(
                "unknown command kind `{kind}`"
            )));
        }
        let owner = Owner::parse(&start.owner).map_err(|e| {
            ApplyError::Permanent(format!("invalid command.start data: owner: {e}"))
        })?;
        let data = match start.data {
            None | Some(Value::Null) => json!({}),
            Some(Value::Object(map)) => Value::Object(map),
            Some(_) => {
                return Err(ApplyError::Permanent(
                    "invalid command.start data: data must be a JSON object".into(),
                ));
            }
        };
        // The kind's schema, as the gateway checks it: a start sent past the gateway is refused
        // with the same field.
        self.registry
            .check_start_value(kind.as_str(), &data)
            .map_err(|v| ApplyError::Permanent(format!("invalid start data of {kind}: {v}")))?;
        if let Some(map) = data.as_object() {
            cmdflow_shared::domain::check_email_in(map, "data").map_err(|(field, reason)| {
                ApplyError::Permanent(format!("invalid start data of {kind}: {field}: {reason}"))
            })?;
        }
        Ok(NewCommand {
            id,
            kind: kind.to_string(),
            owner: owner.to_string(),
            parent_id: start.parent_id,
            root_id: id,
            depth: 0,
            data,
            group_name: None,
            parent_close: "abort".to_owned(),
            // A root counts from when its start was accepted.
            created_at: event.accepted_at(),
            kind_version: self.registry.version_of(kind.as_str()).map(str::to_owned),
        })
    }
}
