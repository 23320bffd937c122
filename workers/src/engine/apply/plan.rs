//! What a decision does to its own command, worked out without the database: the row after the
//! step, the report of a child that ends, and the step's history lines. The apply code adds
//! what needs the transaction (children, timers, aborts of open children) and writes the step.

use cmdflow_shared::domain::DomainError;

use super::*;

/// A decision's step, as far as it is the command's own.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plan {
    /// The command's row after the step: state, data, result or reason, hint. Its version and
    /// times are the ones read; writing the step brings them up.
    pub next: Command,
    /// How the command reports its end to its parent, when it ends as a member of a group.
    pub end: Option<End>,
}

/// A child's end, as its parent hears of it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct End {
    pub parent: CommandId,
    pub group: String,
    /// `completed`, `failed` or `aborted`.
    pub state: &'static str,
    /// The event that tells the parent: `command.completed`, `command.failed` or
    /// `command.aborted`.
    pub ty: &'static str,
    /// `{result}` or `{reason}`, and the child's kind.
    pub data: Map<String, Value>,
}

/// What `decision`, made for `event`, does to `command`. An abort ends it `aborted` whatever the
/// decision says; a decision that starts a fan-in group and names no state leaves it waiting.
/// Refused when the decision moves the command where its state cannot go.
pub(super) fn plan(
    command: &Command,
    event: &Event,
    decision: &Decision,
) -> Result<Plan, DomainError> {
    let mut next = command.clone();
    let default_state = if !decision.spawn_groups.is_empty() {
        CommandState::Waiting
    } else if command.state == CommandState::Pending {
        CommandState::Running
    } else {
        command.state
    };
    let target = if event.ty == COMMAND_ABORT {
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
    next.state = command.state.transition(target)?;
    if let Some(change) = &decision.data {
        next.data = apply_data(&command.data, change);
    }
    if let Some(ui) = &decision.ui {
        next.ui = if ui.is_null() { None } else { Some(ui.clone()) };
    }
    // A hint ends with its command, unless the ending decision sets one that outlives it (such
    // as "your membership is approved").
    if next.state.is_terminal() && decision.ui.is_none() {
        next.ui = None;
    }
    let end = match (command.parent_id, &command.group_name) {
        (Some(parent), Some(group)) if next.state.is_terminal() => {
            let (state, ty) = match next.state {
                CommandState::Completed => ("completed", COMMAND_COMPLETED),
                CommandState::Failed => ("failed", COMMAND_FAILED),
                _ => ("aborted", COMMAND_ABORTED),
            };
            let mut data = ended(state, next.result.clone(), next.reason.clone());
            data.insert("kind".into(), json!(command.kind));
            Some(End {
                parent,
                group: group.clone(),
                state,
                ty,
                data,
            })
        }
        _ => None,
    };
    Ok(Plan { next, end })
}

/// The history lines of a step: the event received (with its source, data, trace, the notes
/// made while applying it, and the definition's version), the state change if any, and each
/// event emitted.
pub(super) fn history(
    command: &Command,
    next: &Command,
    event: &Event,
    notes: &[String],
    out: &[Event],
) -> Vec<HistoryEntry> {
    let mut detail = obj(json!({ "source": event.source, "data": event.data }));
    if let Some(tp) = event.extensions.get(cmdflow_shared::trace::TRACEPARENT) {
        detail.insert("traceparent".into(), tp.clone());
    }
    if !notes.is_empty() {
        detail.insert("notes".into(), json!(notes));
    }
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
    history
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmdflow_shared::decision::{DataChange, SpawnGroup};

    fn running() -> Command {
        let mut c = Command::new("quote.request", "lead:ada", json!({ "items": 2 }));
        c.state = CommandState::Running;
        c.version = 3;
        c.ui = Some(json!({ "hint": "your quote is pending" }));
        c
    }

    fn event(ty: &str, data: Value) -> Event {
        Event::new("shop", ty, obj(data))
    }

    fn child_of(parent: &Command) -> Command {
        let mut c = running();
        c.parent_id = Some(parent.id);
        c.group_name = Some("quotes".to_owned());
        c
    }

    #[test]
    fn a_start_runs_and_a_group_spawned_without_a_state_waits() {
        let mut pending = running();
        pending.state = CommandState::Pending;
        let start = event(COMMAND_START, json!({}));
        let p = plan(&pending, &start, &Decision::nothing()).unwrap();
        assert_eq!(p.next.state, CommandState::Running);

        let mut fanout = Decision::nothing();
        fanout.spawn_groups.push(SpawnGroup {
            name: "quotes".into(),
            policy: FanIn::All,
            deadline: None,
            reports: Default::default(),
            children: vec![ChildSpec::new("quote.supplier", Map::new())],
        });
        let p = plan(&pending, &start, &fanout).unwrap();
        assert_eq!(p.next.state, CommandState::Waiting);
        let mut staying = fanout.clone();
        staying.state = Some(CommandState::Running);
        assert_eq!(
            plan(&pending, &start, &staying).unwrap().next.state,
            CommandState::Running,
            "a state the decision names wins over waiting"
        );
    }

    #[test]
    fn data_and_hint_change_as_decided_and_the_row_read_is_left_alone() {
        let c = running();
        let mut d = Decision::nothing();
        d.data = Some(DataChange::Patch(obj(json!({ "step": "priced" }))));
        d.ui = Some(Value::Null);
        let p = plan(&c, &event("quote.priced", json!({})), &d).unwrap();
        assert_eq!(p.next.data, json!({ "items": 2, "step": "priced" }));
        assert_eq!(p.next.ui, None, "a null hint clears it");
        assert_eq!(
            p.next.version, c.version,
            "writing the step moves the version"
        );
        assert_eq!(p.end, None, "a root reports to no one");
    }

    #[test]
    fn an_ending_clears_the_hint_unless_it_sets_one() {
        let c = running();
        let p = plan(&c, &event("quote.accepted", json!({})), &{
            Decision::complete(json!({ "total": 40 }))
        })
        .unwrap();
        assert_eq!(p.next.state, CommandState::Completed);
        assert_eq!(p.next.result, Some(json!({ "total": 40 })));
        assert_eq!(p.next.ui, None);

        let mut approved = Decision::complete(json!({}));
        approved.ui = Some(json!({ "hint": "your membership is approved" }));
        let p = plan(&c, &event("membership.approved", json!({})), &approved).unwrap();
        assert_eq!(p.next.ui, approved.ui, "a hint the ending sets outlives it");
    }

    #[test]
    fn an_abort_ends_aborted_with_its_reason_whatever_was_decided() {
        let c = running();
        let abort = event(COMMAND_ABORT, json!({ "reason": "the buyer left" }));
        let p = plan(&c, &abort, &Decision::complete(json!({}))).unwrap();
        assert_eq!(p.next.state, CommandState::Aborted);
        assert_eq!(p.next.reason.as_deref(), Some("the buyer left"));
        assert_eq!(p.next.result, None);
        let p = plan(&c, &event(COMMAND_ABORT, json!({})), &Decision::nothing()).unwrap();
        assert_eq!(p.next.reason.as_deref(), Some("aborted by shop"));
    }

    #[test]
    fn a_move_the_state_cannot_make_is_refused() {
        let mut done = running();
        done.state = CommandState::Completed;
        let e = plan(
            &done,
            &event("quote.priced", json!({})),
            &Decision::nothing(),
        );
        assert!(matches!(e, Err(DomainError::Transition { .. })), "{e:?}");
        let mut back = Decision::nothing();
        back.state = Some(CommandState::Pending);
        let e = plan(&running(), &event("quote.priced", json!({})), &back);
        assert!(e.is_err(), "a running command cannot go back to pending");
    }

    #[test]
    fn a_member_that_ends_reports_how_it_ended_to_its_parent() {
        let parent = running();
        let child = child_of(&parent);
        let p = plan(
            &child,
            &event("x.done", json!({})),
            &Decision::fail("no stock"),
        )
        .unwrap();
        let end = p.end.expect("a member reports");
        assert_eq!((end.parent, end.group.as_str()), (parent.id, "quotes"));
        assert_eq!((end.state, end.ty), ("failed", COMMAND_FAILED));
        assert_eq!(
            Value::Object(end.data),
            json!({ "reason": "no stock", "kind": "quote.request" })
        );
        let p = plan(&child, &event("x.more", json!({})), &Decision::nothing()).unwrap();
        assert_eq!(p.end, None, "a member that goes on reports nothing");
    }

    #[test]
    fn history_says_what_was_received_what_changed_and_what_went_out() {
        let c = running();
        let e = event("quote.accepted", json!({ "by": "ada" }));
        let p = plan(&c, &e, &Decision::complete(json!({ "total": 40 }))).unwrap();
        let out = [event("quote.sent", json!({}))];
        let lines = history(&c, &p.next, &e, &["a note".to_owned()], &out);
        let kinds: Vec<EntryKind> = lines.iter().map(|l| l.entry).collect();
        assert_eq!(
            kinds,
            [
                EntryKind::Received,
                EntryKind::StateChanged,
                EntryKind::Emitted
            ]
        );
        assert_eq!(
            lines[0].detail,
            Some(json!({ "source": "shop", "data": { "by": "ada" }, "notes": ["a note"] }))
        );
        assert_eq!(
            (lines[1].from_state, lines[1].to_state),
            (Some(CommandState::Running), Some(CommandState::Completed))
        );
        assert_eq!(lines[1].detail, Some(json!({ "result": { "total": 40 } })));
        assert_eq!(lines[2].event_type.as_deref(), Some("quote.sent"));

        let same = history(&c, &c, &e, &[], &[]);
        assert_eq!(same.len(), 1, "no state change, nothing emitted: one line");
    }
}
