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

use super::Registry;

pub const TIMER: &str = "demo.timer";
pub const WAIT: &str = "demo.wait";

pub fn register(registry: &mut Registry) {
    registry
        .register(TIMER, timer)
        .check_start_with(TIMER, check_timer)
        .register(WAIT, wait)
        .check_start_with(WAIT, check_wait);
}

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

/// The gateway's check of `demo.timer` start data.
pub fn check_timer(data: &Map<String, Value>) -> Result<(), String> {
    millis(data, "after_ms")?;
    if let Some(at) = str_field(data, "at")? {
        DateTime::parse_from_rfc3339(at).map_err(|_| "at must be an RFC 3339 time".to_owned())?;
    }
    if let Some(expr) = str_field(data, "cron")? {
        time::parse_cron(expr).map_err(|e| format!("cron: {e}"))?;
        let tz = str_field(data, "tz")?.unwrap_or("UTC");
        time::parse_zone(tz).map_err(|e| format!("tz: {e}"))?;
        // A pattern that never occurs (`0 0 31 2 *`) is refused here, not failed by the worker.
        time::next_cron(expr, tz, Utc::now()).map_err(|e| format!("cron: {e}"))?;
    }
    if let Some(name) = str_field(data, "name")? {
        time::check_name(name).map_err(|e| format!("name: {e}"))?;
    }
    if let Some(times) = data.get("times")
        && times.as_u64().is_none_or(|n| n == 0)
    {
        return Err("times must be a positive integer".to_owned());
    }
    Ok(())
}

/// The gateway's check of `demo.wait` start data.
pub fn check_wait(data: &Map<String, Value>) -> Result<(), String> {
    let ty = str_field(data, "type")?.ok_or("type is required")?;
    cmdflow_shared::domain::check_dotted_name(ty, 2).map_err(|e| format!("type: {e}"))?;
    let key = str_field(data, "key")?.ok_or("key is required")?;
    if key.is_empty() || key.chars().count() > 512 {
        return Err("key must be 1 to 512 characters".to_owned());
    }
    millis(data, "timeout_ms")?;
    Ok(())
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

    fn data(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn timer_checks_name_the_field() {
        check_timer(&data(json!({"after_ms": 30_000}))).unwrap();
        check_timer(&data(
            json!({"cron": "0 * * * 1-5", "tz": "Europe/Berlin", "times": 2}),
        ))
        .unwrap();
        for (bad, field) in [
            (json!({"after_ms": -5}), "after_ms"),
            (json!({"after_ms": 400_000_000_000i64}), "after_ms"),
            (json!({"cron": "61 * * * *"}), "cron"),
            (json!({"cron": "0 * * * *", "tz": "Mars/Base"}), "tz"),
            (json!({"name": "n".repeat(200)}), "name"),
            (json!({"at": "tomorrow"}), "at"),
            (json!({"times": 0}), "times"),
        ] {
            let err = check_timer(&data(bad.clone())).unwrap_err();
            assert!(err.starts_with(field), "{bad}: {err}");
        }
    }

    #[test]
    fn wait_checks_name_the_field() {
        check_wait(&data(
            json!({"type": "special.clicked", "key": "member:42", "timeout_ms": 1000}),
        ))
        .unwrap();
        assert!(
            check_wait(&data(json!({"key": "k"})))
                .unwrap_err()
                .starts_with("type")
        );
        assert!(
            check_wait(&data(json!({"type": "special.clicked"})))
                .unwrap_err()
                .starts_with("key")
        );
        assert!(
            check_wait(&data(json!({"type": "x", "key": "k"})))
                .unwrap_err()
                .starts_with("type")
        );
    }
}
