//! What a handler returns for (command, event): handlers decide, the engine applies.
//!
//! A `Decision` is plain data, so a handler is a pure function tested without any server.
//! The engine applies the whole decision in the one transaction of the event.

use serde_json::{Map, Value};

use crate::contract::Event;
use crate::domain::CommandState;

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
    Complete(Value),
    Fail(String),
}

/// An event a decision sends out, through the outbox, after commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Emit {
    pub ty: String,
    pub data: Map<String, Value>,
    /// Addressed to one command, or broadcast by type when `None`.
    pub to: Option<crate::domain::CommandId>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    pub state: Option<CommandState>,
    pub data: Option<DataChange>,
    pub emit: Vec<Emit>,
    pub outcome: Option<Outcome>,
    /// What a UI should say about the command while it is open; `Some(Value::Null)` clears it.
    pub ui: Option<Value>,
}

impl Decision {
    /// Changes nothing (the event is still recorded in the history).
    pub fn nothing() -> Self {
        Self::default()
    }

    pub fn complete(result: Value) -> Self {
        Self {
            outcome: Some(Outcome::Complete(result)),
            ..Self::default()
        }
    }

    pub fn fail(reason: impl Into<String>) -> Self {
        Self {
            outcome: Some(Outcome::Fail(reason.into())),
            ..Self::default()
        }
    }

    pub fn with_state(mut self, state: CommandState) -> Self {
        self.state = Some(state);
        self
    }

    pub fn with_patch(mut self, patch: Map<String, Value>) -> Self {
        self.data = Some(DataChange::Patch(patch));
        self
    }

    pub fn with_data(mut self, data: Map<String, Value>) -> Self {
        self.data = Some(DataChange::Replace(data));
        self
    }

    pub fn with_ui(mut self, ui: Value) -> Self {
        self.ui = Some(ui);
        self
    }

    pub fn emit(mut self, ty: &str, data: Map<String, Value>) -> Self {
        self.emit.push(Emit {
            ty: ty.to_owned(),
            data,
            to: None,
        });
        self
    }

    pub fn with_outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = Some(outcome);
        self
    }
}

/// Why a handler refused an event. Every variant is permanent: retrying the same event against
/// the same state gives the same answer, so the event goes to dead letters with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    #[error("{kind} does not handle events of type {event_type}")]
    UnexpectedEvent { kind: String, event_type: String },
    #[error("invalid data: {0}")]
    InvalidData(String),
    #[error("refused: {0}")]
    Refused(String),
}

impl HandlerError {
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
