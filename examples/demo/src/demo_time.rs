//! Built-in kinds for time events, for tests, demos and benchmarks.
//!
//! - `demo.timer` sets one timer and completes after it fires: `data.after_ms` (default 0), or
//!   `data.at` (RFC 3339), or `data.cron` in `data.tz` (default UTC), firing `data.times`
//!   (default 1) times. It completes with the last firing's `{due_at, fired_at}`.
//! - `demo.wait` waits for the next broadcast `data.type` with correlation id `data.key`, at most
//!   `data.timeout_ms`, and completes with what came: the event's data, or `{timed_out: true}`.

use chrono::{DateTime, Utc};
use cmdflow_shared::contract::types::{COMMAND_START, TIMER_FIRED, WAIT_TIMED_OUT};
use cmdflow_shared::time::{self, delay_from_millis};
use cmdflow_shared::{Command, CommandState, Decision, Event, HandlerError};
use serde_json::{Map, Value, json};

use cmdflow_workers::{Registry, RegistryError};

pub const TIMER: &str = "demo.timer";
pub const WAIT: &str = "demo.wait";

pub fn register(registry: &mut Registry) -> Result<(), RegistryError> {
    let ms = json!({"type": ["integer", "null"], "minimum": 0, "maximum": MAX_DELAY_MS});
    let text = |format: &str| json!({"type": ["string", "null"], "format": format});
    registry
        .register(TIMER, timer)
        .describe(
            TIMER,
            "Sets one timer and completes after it fires (a demo)",
        )
        .schema(
            TIMER,
            json!({
                "type": "object",
                "properties": {
                    "after_ms": ms,
                    "at": text("date-time"),
                    "cron": text("cron"),
                    "tz": text("time-zone"),
                    "name": text("timer-name"),
                    "times": {"type": ["integer", "null"], "minimum": 1},
                },
            }),
        )?;
    registry
        .register(WAIT, wait)
        .describe(
            WAIT,
            "Waits for one broadcast event, at most a timeout (a demo)",
        )
        .schema(
            WAIT,
            json!({
                "type": "object",
                "required": ["type", "key"],
                "properties": {
                    "type": {"type": "string", "format": "event-type"},
                    "key": {"type": "string", "minLength": 1, "maxLength": 512},
                    "timeout_ms": ms,
                },
            }),
        )?;
    Ok(())
}

/// The longest delay a timer may wait, in milliseconds.
const MAX_DELAY_MS: u64 = time::MAX_DELAY.as_millis() as u64;

fn str_field<'a>(data: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, String> {
    match data.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{field} must be a string")),
    }
}

fn millis(data: &Map<String, Value>, field: &str) -> Result<Option<std::time::Duration>, String> {
    match data.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let ms = v
                .as_i64()
                .ok_or_else(|| format!("{field} must be an integer (milliseconds)"))?;
            delay_from_millis(ms)
                .map(Some)
                .map_err(|e| format!("{field}: {e}"))
        }
    }
}

pub fn timer(command: &Command, event: &Event) -> Result<Decision, HandlerError> {
    let data = command.data.as_object().cloned().unwrap_or_default();
    let name = str_field(&data, "name")
        .map_err(HandlerError::InvalidData)?
        .unwrap_or("wake")
        .to_owned();
    match event.ty.as_str() {
        COMMAND_START => {
            // Bad specs fail the command with the reason, as the engine does for its own checks.
            let waiting = Decision::nothing().with_state(CommandState::Waiting);
            let decision = if let Some(expr) = data.get("cron").and_then(Value::as_str) {
                let tz = data.get("tz").and_then(Value::as_str).unwrap_or("UTC");
                waiting.cron(&name, expr, tz)
            } else if let Some(at) = data.get("at").and_then(Value::as_str) {
                match DateTime::parse_from_rfc3339(at) {
                    Ok(at) => waiting.at(&name, at.with_timezone(&Utc)),
                    Err(_) => Decision::fail("at must be an RFC 3339 time"),
                }
            } else {
                match millis(&data, "after_ms") {
                    Ok(d) => waiting.after(&name, d.unwrap_or_default()),
                    Err(reason) => Decision::fail(reason),
                }
            };
            Ok(decision)
        }
        TIMER_FIRED => {
            let fired = data.get("fired").and_then(Value::as_u64).unwrap_or(0) + 1;
            let times = data.get("times").and_then(Value::as_u64).unwrap_or(1);
            let last = json!({
                "name": event.data.get("name"),
                "due_at": event.data.get("due_at"),
                "fired_at": event.data.get("fired_at"),
                "fired": fired,
            });
            if fired >= times {
                Ok(Decision::complete(last))
            } else {
                let mut patch = Map::new();
                patch.insert("fired".into(), json!(fired));
                Ok(Decision::nothing().with_patch(patch))
            }
        }
        super::demo::FINISH => Ok(Decision::complete(json!({ "finished": true }))),
        _ => Err(HandlerError::unexpected(TIMER, event)),
    }
}

pub fn wait(command: &Command, event: &Event) -> Result<Decision, HandlerError> {
    let data = command.data.as_object().cloned().unwrap_or_default();
    let ty = data.get("type").and_then(Value::as_str).unwrap_or_default();
    let key = data.get("key").and_then(Value::as_str).unwrap_or_default();
    match event.ty.as_str() {
        COMMAND_START => {
            let timeout = millis(&data, "timeout_ms").map_err(HandlerError::InvalidData)?;
            Ok(Decision::nothing()
                .with_state(CommandState::Waiting)
                .wait_for(ty, key, timeout))
        }
        WAIT_TIMED_OUT => Ok(Decision::complete(
            json!({ "timed_out": true, "type": ty, "key": key }),
        )),
        t if t == ty => Ok(Decision::complete(json!({
            "type": event.ty,
            "id": event.id,
            "source": event.source,
            "data": event.data,
        }))),
        _ => Err(HandlerError::unexpected(WAIT, event)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(kind: &str, v: Value) -> Result<(), String> {
        let mut registry = Registry::new();
        register(&mut registry).unwrap();
        registry
            .check_start(kind, v.as_object().unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn timer_checks_name_the_field() {
        check(TIMER, json!({"after_ms": 30_000})).unwrap();
        check(
            TIMER,
            json!({"cron": "0 * * * 1-5", "tz": "Europe/Berlin", "times": 2}),
        )
        .unwrap();
        check(TIMER, json!({"after_ms": null, "name": null})).unwrap();
        for (bad, field) in [
            (json!({"after_ms": -5}), "after_ms"),
            (json!({"after_ms": 400_000_000_000i64}), "after_ms"),
            (json!({"cron": "61 * * * *"}), "cron"),
            (json!({"cron": "0 * * * *", "tz": "Mars/Base"}), "tz"),
            (json!({"name": "n".repeat(200)}), "name"),
            (json!({"at": "tomorrow"}), "at"),
            (json!({"times": 0}), "times"),
        ] {
            let err = check(TIMER, bad.clone()).unwrap_err();
            assert!(err.starts_with(&format!("data.{field}:")), "{bad}: {err}");
        }
    }

    #[test]
    fn wait_checks_name_the_field() {
        check(
            WAIT,
            json!({"type": "special.clicked", "key": "member:42", "timeout_ms": 1000}),
        )
        .unwrap();
        for (bad, field) in [
            (json!({"key": "k"}), "type"),
            (json!({"type": "special.clicked"}), "key"),
            (json!({"type": "x", "key": "k"}), "type"),
        ] {
            let err = check(WAIT, bad.clone()).unwrap_err();
            assert!(err.starts_with(&format!("data.{field}:")), "{bad}: {err}");
        }
    }
}
