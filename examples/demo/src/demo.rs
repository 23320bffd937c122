//! Built-in kinds for tests, demos and benchmarks.
//!
//! - `demo.noop` completes on start (and fails instead when its data says `{"fail": true}`).
//! - `demo.counter` adds `data.by` (default 1) to `data.count` on each `demo.increment`
//!   addressed to it, and completes with `{count}` on `demo.finish` (it fails on start when its
//!   data says `{"fail": true}`). `demo.freeze` makes it refuse increments (a handler failure
//!   controlled by data, for dead-letter tests) until `demo.unfreeze`. A broadcast
//!   `demo.requested` starts one, owned by the event's subject.
//! - `demo.fanout` spawns `data.children` (default 10) children of `data.child_kind` (default
//!   `demo.noop`, with `data.child_data`) under `data.policy` (default `all`; `any`,
//!   `all_settled`, `quorum:N`), and completes when the group settles, or fails if it fails.
//!   Children listed in `data.fail_children` (indexes) get `{"fail": true}`. With
//!   `data.detached = true` the children are fire-and-forget and the fan-out completes on
//!   `demo.finish`; with `data.abandon = true` they run on when the fan-out ends first. With
//!   `data.deadline_ms` the group fails if it has not settled in time. With
//!   `data.reports = "each"` the fan-out hears each child's end as an event before the verdict
//!   (default `"settled"`: the children count themselves into the group and the fan-out hears
//!   only `children.settled`).

use cmdflow_shared::contract::types::{self, CHILDREN_SETTLED, COMMAND_START};
use std::time::Duration;

use cmdflow_shared::decision::{ChildSpec, FanIn, ParentClose, Reports};
use cmdflow_shared::{Command, CommandState, Decision, Event, HandlerError};
use serde_json::{Map, Value, json};

use cmdflow_workers::Registry;

pub const NOOP: &str = "demo.noop";
pub const COUNTER: &str = "demo.counter";
pub const INCREMENT: &str = "demo.increment";
pub const FINISH: &str = "demo.finish";
pub const FANOUT: &str = "demo.fanout";
pub const REQUESTED: &str = "demo.requested";

pub fn register(registry: &mut Registry) {
    registry
        .register(NOOP, noop)
        .describe(NOOP, "Completes as soon as it starts (a demo)")
        .register(COUNTER, counter)
        .describe(
            COUNTER,
            "Counts demo.increment events until demo.finish (a demo)",
        )
        .register(FANOUT, fanout)
        .describe(FANOUT, "Spawns children and follows their group (a demo)")
        .start_on(REQUESTED, COUNTER);
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
        COMMAND_START if command.data.get("fail") == Some(&Value::Bool(true)) => {
            Ok(Decision::fail("demo.counter was asked to fail"))
        }
        COMMAND_START => {
            let mut patch = Map::new();
            patch.insert("count".into(), json!(count));
            Ok(Decision::nothing()
                .with_state(CommandState::Running)
                .with_patch(patch))
        }
        INCREMENT if command.data.get("frozen") == Some(&Value::Bool(true)) => Err(
            HandlerError::Refused("the counter is frozen (send demo.unfreeze)".into()),
        ),
        "demo.freeze" | "demo.unfreeze" => {
            let mut patch = Map::new();
            patch.insert("frozen".into(), json!(event.ty == "demo.freeze"));
            Ok(Decision::nothing().with_patch(patch))
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
        REQUESTED => Ok(Decision::nothing().with_state(CommandState::Running)),
        _ => Err(HandlerError::unexpected(COUNTER, event)),
    }
}

pub fn fanout(command: &Command, event: &Event) -> Result<Decision, HandlerError> {
    let data = &command.data;
    match event.ty.as_str() {
        COMMAND_START => {
            let n = match data.get("children") {
                None => 10,
                Some(v) => v.as_u64().ok_or_else(|| {
                    HandlerError::InvalidData("`children` must be a non-negative integer".into())
                })?,
            };
            let policy = match data.get("policy") {
                None => FanIn::All,
                Some(Value::String(s)) => FanIn::parse(s).map_err(HandlerError::InvalidData)?,
                Some(_) => {
                    return Err(HandlerError::InvalidData(
                        "`policy` must be a string".into(),
                    ));
                }
            };
            let reports = match data.get("reports") {
                None => Reports::default(),
                Some(v) => v.as_str().and_then(Reports::parse).ok_or_else(|| {
                    HandlerError::InvalidData("`reports` must be \"each\" or \"settled\"".into())
                })?,
            };
            let child_kind = match data.get("child_kind") {
                None => NOOP,
                Some(v) => v.as_str().ok_or_else(|| {
                    HandlerError::InvalidData("`child_kind` must be a string".into())
                })?,
            };
            let child_data = match data.get("child_data") {
                None => Map::new(),
                Some(Value::Object(map)) => map.clone(),
                Some(_) => {
                    return Err(HandlerError::InvalidData(
                        "`child_data` must be an object".into(),
                    ));
                }
            };
            let fail: Vec<u64> = match data.get("fail_children") {
                None => Vec::new(),
                Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                    HandlerError::InvalidData("`fail_children` must be a list of indexes".into())
                })?,
            };
            let detached = data.get("detached") == Some(&Value::Bool(true));
            let parent_close = if data.get("abandon") == Some(&Value::Bool(true)) {
                ParentClose::Abandon
            } else {
                ParentClose::Abort
            };
            let specs: Vec<ChildSpec> = (0..n)
                .map(|i| {
                    let mut d = child_data.clone();
                    d.insert("index".into(), json!(i));
                    if fail.contains(&i) {
                        d.insert("fail".into(), json!(true));
                    }
                    ChildSpec {
                        parent_close,
                        ..ChildSpec::new(child_kind, d)
                    }
                })
                .collect();
            if detached {
                // Nothing reports back: it runs on until `demo.finish`.
                let decision = Decision::nothing().with_state(CommandState::Running);
                Ok(specs.into_iter().fold(decision, Decision::spawn_detached))
            } else {
                // No state named: the engine has a parent of a fan-in group wait for it.
                let decision = Decision::nothing()
                    .spawn_group("children", policy, specs)
                    .with_group_reports("children", reports);
                match data.get("deadline_ms").and_then(Value::as_u64) {
                    Some(ms) => {
                        Ok(decision.with_group_deadline("children", Duration::from_millis(ms)))
                    }
                    None => Ok(decision),
                }
            }
        }
        CHILDREN_SETTLED => {
            let outcome = event.data.get("outcome").and_then(Value::as_str);
            let count = |k: &str| event.data.get(k).and_then(Value::as_i64).unwrap_or(0);
            if outcome == Some("succeeded") {
                Ok(Decision::complete(json!({
                    "completed": count("completed"),
                    "failed": count("failed"),
                    "aborted": count("aborted"),
                    "outcomes": event.data.get("outcomes").cloned().unwrap_or(Value::Null),
                })))
            } else {
                Ok(Decision::fail(format!(
                    "the children's group failed: {} completed, {} failed, {} aborted of {}",
                    count("completed"),
                    count("failed"),
                    count("aborted"),
                    count("total")
                )))
            }
        }
        FINISH => Ok(Decision::complete(json!({}))),
        ty if types::is_engine_event(ty) => Ok(Decision::nothing()),
        _ => Err(HandlerError::unexpected(FANOUT, event)),
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
            group_name: None,
            parent_close: ParentClose::Abort,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            ended_at: None,
            kind_version: None,
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
    fn fanout_spawns_its_group_and_follows_its_outcome() {
        let c = command(
            FANOUT,
            json!({"children": 3, "policy": "quorum:2", "fail_children": [1]}),
        );
        let d = fanout(&c, &event(COMMAND_START, json!({}))).unwrap();
        assert_eq!(d.spawn_groups.len(), 1);
        let group = &d.spawn_groups[0];
        assert_eq!(group.policy, FanIn::Quorum(2));
        assert_eq!(group.children.len(), 3);
        assert_eq!(group.children[1].data["fail"], true);
        assert!(group.children[0].data.get("fail").is_none());

        let ok = fanout(
            &c,
            &event(
                CHILDREN_SETTLED,
                json!({"outcome": "succeeded", "completed": 2}),
            ),
        )
        .unwrap();
        assert!(matches!(ok.outcome, Some(Outcome::Complete(_))));
        let bad = fanout(
            &c,
            &event(
                CHILDREN_SETTLED,
                json!({"outcome": "failed", "failed": 2, "total": 3}),
            ),
        )
        .unwrap();
        assert!(matches!(bad.outcome, Some(Outcome::Fail(ref r)) if r.contains("2 failed")));

        let c = command(FANOUT, json!({"policy": "most"}));
        assert!(matches!(
            fanout(&c, &event(COMMAND_START, json!({}))),
            Err(HandlerError::InvalidData(_))
        ));
        let c = command(FANOUT, json!({"children": 2, "reports": "settled"}));
        let d = fanout(&c, &event(COMMAND_START, json!({}))).unwrap();
        assert_eq!(d.spawn_groups[0].reports, Reports::Settled);
        let c = command(FANOUT, json!({"reports": "batched"}));
        assert!(matches!(
            fanout(&c, &event(COMMAND_START, json!({}))),
            Err(HandlerError::InvalidData(ref m)) if m.contains("reports")
        ));
        let c = command(FANOUT, json!({"children": 2, "detached": true}));
        let d = fanout(&c, &event(COMMAND_START, json!({}))).unwrap();
        assert_eq!((d.spawn_detached.len(), d.spawn_groups.len()), (2, 0));
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
