//! Built-in kinds for tests, demos and benchmarks.
//!
//! - `demo.noop` completes on start (and fails instead when its data says `{"fail": true}`).
//! - `demo.counter` adds `data.by` (default 1) to `data.count` on each `demo.increment`
//!   addressed to it, and completes with `{count}` on `demo.finish`.

use cmdflow_shared::contract::types::COMMAND_START;
use cmdflow_shared::{Command, CommandState, Decision, Event, HandlerError};
use serde_json::{Map, Value, json};

use super::Registry;

pub const NOOP: &str = "demo.noop";
pub const COUNTER: &str = "demo.counter";
pub const INCREMENT: &str = "demo.increment";
pub const FINISH: &str = "demo.finish";

pub fn register(registry: &mut Registry) {
    registry.register(NOOP, noop).register(COUNTER, counter);
}

pub fn noop(command: &Command, event: &Event) -> Result<Decision, HandlerError> {
    if event.ty != COMMAND_START {
        return Err(HandlerError::unexpected(NOOP, event));
    }
    if command.data.get("fail") == Some(&Value::Bool(true)) {
        return Ok(Decision::fail("demo.noop was asked to fail"));
    }
    Ok(Decision::complete(json!({})))
}

pub fn counter(command: &Command, event: &Event) -> Result<Decision, HandlerError> {
    let count = match command.data.get("count") {
        None => 0,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| HandlerError::InvalidData("data.count must be an integer".into()))?,
    };
    match event.ty.as_str() {
        COMMAND_START => {
            let mut patch = Map::new();
            patch.insert("count".into(), json!(count));
            Ok(Decision::nothing()
                .with_state(CommandState::Running)
                .with_patch(patch))
        }
        INCREMENT => {
            let by = match event.data.get("by") {
                None => 1,
                Some(v) => v
                    .as_i64()
                    .ok_or_else(|| HandlerError::InvalidData("`by` must be an integer".into()))?,
            };
            let next = count
                .checked_add(by)
                .ok_or_else(|| HandlerError::Refused(format!("count {count} + {by} overflows")))?;
            let mut patch = Map::new();
            patch.insert("count".into(), json!(next));
            Ok(Decision::nothing().with_patch(patch))
        }
        FINISH => Ok(Decision::complete(json!({ "count": count }))),
        _ => Err(HandlerError::unexpected(COUNTER, event)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use cmdflow_shared::CommandId;
    use cmdflow_shared::decision::{DataChange, Outcome};

    fn command(kind: &str, data: Value) -> Command {
        let id = CommandId::new();
        Command {
            id,
            kind: kind.into(),
            owner: "member:42".into(),
            parent_id: None,
            root_id: id,
            depth: 0,
            state: CommandState::Running,
            data,
            result: None,
            reason: None,
            ui: None,
            version: 1,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            ended_at: None,
        }
    }

    fn event(ty: &str, data: Value) -> Event {
        Event::new("test", ty, data.as_object().cloned().unwrap_or_default())
    }

    #[test]
    fn counter_adds_by_and_defaults_to_one() {
        let c = command(COUNTER, json!({"count": 5}));
        let d = counter(&c, &event(INCREMENT, json!({"by": 3}))).unwrap();
        assert_eq!(
            d.data,
            Some(DataChange::Patch(
                json!({"count": 8}).as_object().unwrap().clone()
            ))
        );
        let d = counter(&c, &event(INCREMENT, json!({}))).unwrap();
        assert_eq!(
            d.data,
            Some(DataChange::Patch(
                json!({"count": 6}).as_object().unwrap().clone()
            ))
        );
    }

    #[test]
    fn counter_finishes_with_its_count() {
        let c = command(COUNTER, json!({"count": 2}));
        let d = counter(&c, &event(FINISH, json!({}))).unwrap();
        assert_eq!(d.outcome, Some(Outcome::Complete(json!({"count": 2}))));
    }

    #[test]
    fn counter_refuses_bad_input() {
        let c = command(COUNTER, json!({"count": 1}));
        assert!(matches!(
            counter(&c, &event(INCREMENT, json!({"by": "two"}))),
            Err(HandlerError::InvalidData(_))
        ));
        assert!(matches!(
            counter(&c, &event("demo.unknown", json!({}))),
            Err(HandlerError::UnexpectedEvent { .. })
        ));
        let c = command(COUNTER, json!({"count": i64::MAX}));
        assert!(matches!(
            counter(&c, &event(INCREMENT, json!({}))),
            Err(HandlerError::Refused(_))
        ));
    }

    #[test]
    fn noop_completes_or_fails_on_request() {
        let d = noop(&command(NOOP, json!({})), &event(COMMAND_START, json!({}))).unwrap();
        assert!(matches!(d.outcome, Some(Outcome::Complete(_))));
        let d = noop(
            &command(NOOP, json!({"fail": true})),
            &event(COMMAND_START, json!({})),
        )
        .unwrap();
        assert!(matches!(d.outcome, Some(Outcome::Fail(_))));
    }
}
