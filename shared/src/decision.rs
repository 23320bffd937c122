//! What a handler returns for (command, event): handlers decide, the engine applies.
//!
//! A `Decision` is plain data, so a handler is a pure function tested without any server.
//! The engine applies the whole decision in the one transaction of the event.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::contract::Event;
use crate::domain::CommandState;
use crate::time::{TimerSpec, TimerWhen};

/// How the command's `data` changes.
#[derive(Debug, Clone, PartialEq)]
pub enum DataChange {
    /// Top-level keys are set (a `null` value removes the key), the rest stays.
    Patch(Map<String, Value>),
    /// The whole object is replaced.
    Replace(Map<String, Value>),
}

/// The end of a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Completed, with this result.
    Complete(Value),
    /// Failed, with this reason.
    Fail(String),
}

/// An event a decision sends out, through the outbox, after commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Emit {
    /// The event's type, such as `payment.requested`.
    pub ty: String,
    /// The event's data.
    pub data: Map<String, Value>,
    /// Addressed to one command, or broadcast by type when `None`.
    pub to: Option<crate::domain::CommandId>,
    /// The `correlationid` to set (by default the cause's, or the root command's id). A
    /// broadcast correlated by a person wakes that person's waits and funnels.
    pub correlation: Option<String>,
}

/// How a parent waits on a group of children.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FanIn {
    /// Complete when every child completes; fail fast on the first failure and abort the rest.
    All,
    /// The first completion wins and the others are aborted; fail when none can complete.
    Any,
    /// Complete when `n` children complete (the rest are aborted); fail once `n` cannot be reached.
    Quorum(u32),
    /// Wait for every child whatever its outcome, and hand all the outcomes to the parent.
    AllSettled,
}

impl FanIn {
    /// Parses `all`, `any`, `all_settled` or `quorum:N`.
    pub fn parse(s: &str) -> Result<FanIn, String> {
        match s {
            "all" => Ok(Self::All),
            "any" => Ok(Self::Any),
            "all_settled" => Ok(Self::AllSettled),
            other => match other.strip_prefix("quorum:").map(str::parse::<u32>) {
                Some(Ok(n)) if n >= 1 => Ok(Self::Quorum(n)),
                _ => Err(format!(
                    "`{other}` is not a fan-in policy: use all, any, all_settled or quorum:N (N ≥ 1)"
                )),
            },
        }
    }

    /// The policy's name (`quorum` for any `quorum:N`).
    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Any => "any",
            Self::Quorum(_) => "quorum",
            Self::AllSettled => "all_settled",
        }
    }
}

/// What happens to a child when its parent ends while the child still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParentClose {
    /// The child is aborted (the default: nothing is left running unowned).
    #[default]
    Abort,
    /// The child runs on by itself.
    Abandon,
}

impl ParentClose {
    /// `abort` or `abandon`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Abort => "abort",
            Self::Abandon => "abandon",
        }
    }

    /// Reads `abort` or `abandon`.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Abort, Self::Abandon]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// A child command to create.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildSpec {
    /// The child's kind: a registered one, or the decision fails its command.
    pub kind: String,
    /// The child's start data, checked against its kind's schema.
    pub data: Map<String, Value>,
    /// Defaults to the parent's owner.
    pub owner: Option<String>,
    /// What happens to it when its parent ends first.
    pub parent_close: ParentClose,
}

impl ChildSpec {
    /// A child of `kind` with `data`, owned by the parent's owner, aborted if the parent ends first.
    pub fn new(kind: &str, data: Map<String, Value>) -> Self {
        Self {
            kind: kind.to_owned(),
            data,
            owner: None,
            parent_close: ParentClose::Abort,
        }
    }
}

/// Children the parent waits for, under one fan-in policy.
#[derive(Debug, Clone, PartialEq)]
pub struct SpawnGroup {
    /// The group's name, unique among the command's open groups.
    pub name: String,
    /// When the group settles, and how.
    pub policy: FanIn,
    /// The group fails if it has not settled by then (delivered as a time event).
    pub deadline: Option<std::time::Duration>,
    /// How the children's ends reach the parent.
    pub reports: Reports,
    /// The children to start.
    pub children: Vec<ChildSpec>,
}

/// How a group's children report to their parent (`child_groups.reports`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Reports {
    /// Each child's end is an event to the parent (`command.completed`, `command.failed`,
    /// `command.aborted`) that its handler sees, and the group's verdict follows as
    /// `children.settled`. For a parent that acts on each child's end.
    Each,
    /// Each child counts itself into the group in the transaction that ends it; the parent hears
    /// only `children.settled`, with every child's outcome. One event per group instead of one
    /// per child: the default, for a parent that waits for its group's verdict.
    #[default]
    Settled,
}

impl Reports {
    /// `each` or `settled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Each => "each",
            Self::Settled => "settled",
        }
    }

    /// Reads `each` or `settled`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "each" => Some(Self::Each),
            "settled" => Some(Self::Settled),
            _ => None,
        }
    }
}

/// Which children to abort.
#[derive(Debug, Clone, PartialEq)]
pub enum AbortChildren {
    /// Every open child.
    All,
    /// The open children of one fan-in group.
    Group(String),
    /// These children (the ones still open).
    Ids(Vec<crate::domain::CommandId>),
}

#[derive(Debug, Clone, PartialEq, Default)]
/// What a handler decided for one event: the engine applies all of it in the event's transaction.
/// Build it from [`Decision::nothing`], [`Decision::complete`] or [`Decision::fail`] and the
/// `with_*` and action methods; every field left at its default changes nothing.
pub struct Decision {
    /// The new state (`running` or `waiting`); ending states come from [`Decision::outcome`].
    pub state: Option<CommandState>,
    /// How the command's data changes.
    pub data: Option<DataChange>,
    /// Events to send, through the outbox, after the commit.
    pub emit: Vec<Emit>,
    /// Ends the command: completed with a result, or failed with a reason.
    pub outcome: Option<Outcome>,
    /// What a UI should say about the command while it is open; `Some(Value::Null)` clears it.
    pub ui: Option<Value>,
    /// Children to wait for, by group.
    pub spawn_groups: Vec<SpawnGroup>,
    /// Children started fire-and-forget: they never report back.
    pub spawn_detached: Vec<ChildSpec>,
    /// Children to abort.
    pub abort_children: Option<AbortChildren>,
    /// Timers to set (a name that exists is replaced) or cancel.
    pub timers: Vec<TimerOp>,
    /// Events to wait for.
    pub waits: Vec<WaitSpec>,
    /// Messages to send, rendered from templates with the person's own data.
    pub messages: Vec<MessageSpec>,
    /// End every wait the command has (before registering this decision's waits).
    pub stop_waiting: bool,
}

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// Stored and shown in the app, with a read/unread state.
    InApp,
    /// Sent by SMTP (and shown in the app too); kept in the app when no SMTP server is set.
    Email,
}

/// An automatic, personal answer.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageSpec {
    /// The template's name, e.g. `quote_submitted`.
    pub template: String,
    /// In the app, or by e-mail too.
    pub channel: Channel,
    /// The owner it is for; the command's owner when `None`.
    pub to: Option<String>,
    /// The e-mail address, for the e-mail channel.
    pub email: Option<String>,
    /// Extra values for the template.
    pub vars: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
/// A timer to set or cancel.
pub enum TimerOp {
    /// Set (or replace) a timer.
    Set(TimerSpec),
    /// Cancel the timer of this name.
    Cancel(String),
}

/// "Wake me when the next broadcast event of this type with this correlation id arrives."
#[derive(Debug, Clone, PartialEq)]
pub struct WaitSpec {
    /// The broadcast event's type.
    pub event_type: String,
    /// Its `correlationid`, such as the person's owner id.
    pub key: String,
    /// When it passes first, `wait.timed_out` arrives instead.
    pub timeout: Option<std::time::Duration>,
}

impl Decision {
    /// Changes nothing (the event is still recorded in the history).
    pub fn nothing() -> Self {
        Self::default()
    }

    /// Completes the command with `result`.
    pub fn complete(result: Value) -> Self {
        Self {
            outcome: Some(Outcome::Complete(result)),
            ..Self::default()
        }
    }

    /// Fails the command with `reason`.
    pub fn fail(reason: impl Into<String>) -> Self {
        Self {
            outcome: Some(Outcome::Fail(reason.into())),
            ..Self::default()
        }
    }

    /// Moves the command to `state` (`running` or `waiting`).
    pub fn with_state(mut self, state: CommandState) -> Self {
        self.state = Some(state);
        self
    }

    /// Sets the top-level keys of `patch` in the command's data (`null` removes a key).
    pub fn with_patch(mut self, patch: Map<String, Value>) -> Self {
        self.data = Some(DataChange::Patch(patch));
        self
    }

    /// Replaces the command's data.
    pub fn with_data(mut self, data: Map<String, Value>) -> Self {
        self.data = Some(DataChange::Replace(data));
        self
    }

    /// Says what a UI shows while the command is open: `{"code": …, "text": …}`, a pending
    /// condition of the owner's feed. `Value::Null` clears it; a hint set by the decision that ends
    /// the command outlives it ("your membership is approved").
    pub fn with_ui(mut self, ui: Value) -> Self {
        self.ui = Some(ui);
        self
    }

    /// Broadcasts an event of type `ty`, routed by its type to whoever listens (other services,
    /// activities, waits). It carries `fromcommandid`, so an answer can be addressed back.
    pub fn emit(mut self, ty: &str, data: Map<String, Value>) -> Self {
        self.emit.push(Emit {
            ty: ty.to_owned(),
            data,
            to: None,
            correlation: None,
        });
        self
    }

    /// Broadcasts an event with an explicit correlation id (such as the person's owner id).
    pub fn emit_correlated(
        mut self,
        ty: &str,
        data: Map<String, Value>,
        correlation: &str,
    ) -> Self {
        self.emit.push(Emit {
            ty: ty.to_owned(),
            data,
            to: None,
            correlation: Some(correlation.to_owned()),
        });
        self
    }

    /// Ends the command with `outcome`.
    pub fn with_outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = Some(outcome);
        self
    }

    /// Sends an event addressed to one command.
    pub fn send(
        mut self,
        to: crate::domain::CommandId,
        ty: &str,
        data: Map<String, Value>,
    ) -> Self {
        self.emit.push(Emit {
            ty: ty.to_owned(),
            data,
            to: Some(to),
            correlation: None,
        });
        self
    }

    /// Spawns children the command waits for, as one fan-in group.
    pub fn spawn_group(mut self, name: &str, policy: FanIn, children: Vec<ChildSpec>) -> Self {
        self.spawn_groups.push(SpawnGroup {
            name: name.to_owned(),
            policy,
            deadline: None,
            reports: Reports::default(),
            children,
        });
        self
    }

    /// Sets how the children of the group `name` of this decision report back. The first spawn
    /// into a group decides; a later spawn into the same open group keeps it.
    pub fn with_group_reports(mut self, name: &str, reports: Reports) -> Self {
        for group in self.spawn_groups.iter_mut().filter(|g| g.name == name) {
            group.reports = reports;
        }
        self
    }

    /// Gives the group `name` of this decision a deadline: if it has not settled by then, it
    /// fails and its open children are aborted.
    pub fn with_group_deadline(mut self, name: &str, deadline: std::time::Duration) -> Self {
        for group in self.spawn_groups.iter_mut().filter(|g| g.name == name) {
            group.deadline = Some(deadline);
        }
        self
    }

    /// Spawns a child that never reports back.
    pub fn spawn_detached(mut self, child: ChildSpec) -> Self {
        self.spawn_detached.push(child);
        self
    }

    /// Aborts some or all of the command's open children.
    pub fn abort_children(mut self, which: AbortChildren) -> Self {
        self.abort_children = Some(which);
        self
    }

    /// Sets (or replaces) the timer `name` to fire after `delay`.
    pub fn after(self, name: &str, delay: std::time::Duration) -> Self {
        self.timer(name, TimerWhen::After(delay))
    }

    /// Sets (or replaces) the timer `name` to fire at `at` (at once when it is past).
    pub fn at(self, name: &str, at: chrono::DateTime<chrono::Utc>) -> Self {
        self.timer(name, TimerWhen::At(at))
    }

    /// Sets (or replaces) the recurring timer `name` on a cron schedule in the IANA zone `tz`.
    /// It belongs to the command: it stops when the command ends.
    pub fn cron(self, name: &str, expr: &str, tz: &str) -> Self {
        self.timer(
            name,
            TimerWhen::Cron {
                expr: expr.to_owned(),
                tz: tz.to_owned(),
            },
        )
    }

    fn timer(mut self, name: &str, when: TimerWhen) -> Self {
        self.timers.push(TimerOp::Set(TimerSpec {
            name: name.to_owned(),
            when,
        }));
        self
    }

    /// Cancels the timer `name`, if it is set.
    pub fn cancel_timer(mut self, name: &str) -> Self {
        self.timers.push(TimerOp::Cancel(name.to_owned()));
        self
    }

    /// Waits for the next broadcast `event_type` whose `correlationid` is `key`.
    pub fn wait_for(
        mut self,
        event_type: &str,
        key: &str,
        timeout: Option<std::time::Duration>,
    ) -> Self {
        self.waits.push(WaitSpec {
            event_type: event_type.to_owned(),
            key: key.to_owned(),
            timeout,
        });
        self
    }

    /// Sends a message rendered from `template` to the command's owner.
    pub fn message(mut self, template: &str, channel: Channel, vars: Map<String, Value>) -> Self {
        self.messages.push(MessageSpec {
            template: template.to_owned(),
            channel,
            to: None,
            email: None,
            vars,
        });
        self
    }

    /// Sends a message to someone else than the command's owner.
    pub fn message_to(
        mut self,
        to: &str,
        email: Option<&str>,
        template: &str,
        channel: Channel,
        vars: Map<String, Value>,
    ) -> Self {
        self.messages.push(MessageSpec {
            template: template.to_owned(),
            channel,
            to: Some(to.to_owned()),
            email: email.map(str::to_owned),
            vars,
        });
        self
    }

    /// Ends every wait the command has; this decision's own waits are registered after.
    pub fn stop_waiting(mut self) -> Self {
        self.stop_waiting = true;
        self
    }

    /// Children this decision creates, waited for or not.
    pub fn spawn_count(&self) -> usize {
        self.spawn_detached.len()
            + self
                .spawn_groups
                .iter()
                .map(|g| g.children.len())
                .sum::<usize>()
    }
}

/// Why a handler refused an event. Every variant is permanent: retrying the same event against
/// the same state gives the same answer, so the event goes to dead letters with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    #[error("{kind} does not handle events of type {event_type}")]
    /// The kind has no use for this event (for engine events, that is not an error).
    UnexpectedEvent {
        /// The kind that was asked.
        kind: String,
        /// The event's type.
        event_type: String,
    },
    #[error("invalid data: {0}")]
    /// The command's or the event's data is not what the kind needs.
    InvalidData(String),
    #[error("refused: {0}")]
    /// The kind refuses the event, for this reason.
    Refused(String),
}

impl HandlerError {
    /// `kind` has no use for `event`.
    pub fn unexpected(kind: &str, event: &Event) -> Self {
        Self::UnexpectedEvent {
            kind: kind.to_owned(),
            event_type: event.ty.clone(),
        }
    }
}

/// Applies a data change to a JSON object.
pub fn apply_data(current: &Value, change: &DataChange) -> Value {
    match change {
        DataChange::Replace(map) => Value::Object(map.clone()),
        DataChange::Patch(patch) => {
            let mut obj = current.as_object().cloned().unwrap_or_default();
            for (k, v) in patch {
                if v.is_null() {
                    obj.remove(k);
                } else {
                    obj.insert(k.clone(), v.clone());
                }
            }
            Value::Object(obj)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fan_in_policies_parse() {
        assert_eq!(FanIn::parse("all"), Ok(FanIn::All));
        assert_eq!(FanIn::parse("quorum:3"), Ok(FanIn::Quorum(3)));
        assert!(FanIn::parse("quorum:0").is_err());
        assert!(FanIn::parse("most").unwrap_err().contains("all_settled"));
    }

    #[test]
    fn a_group_reports_settled_unless_told_each() {
        let spawn = |d: Decision| d.spawn_group("g", FanIn::All, vec![]);
        assert_eq!(
            spawn(Decision::nothing()).spawn_groups[0].reports,
            Reports::Settled
        );
        let each = spawn(Decision::nothing()).with_group_reports("g", Reports::Each);
        assert_eq!(each.spawn_groups[0].reports, Reports::Each);
    }

    #[test]
    fn patch_sets_and_removes_keys() {
        let current = json!({"a": 1, "b": 2});
        let patch = json!({"b": null, "c": 3}).as_object().unwrap().clone();
        assert_eq!(
            apply_data(&current, &DataChange::Patch(patch)),
            json!({"a": 1, "c": 3})
        );
        let replace = json!({"z": 0}).as_object().unwrap().clone();
        assert_eq!(
            apply_data(&current, &DataChange::Replace(replace)),
            json!({"z": 0})
        );
    }
}
