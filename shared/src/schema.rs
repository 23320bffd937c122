//! Start-data checks: the JSON Schema of a kind's start data, compiled once and run at both
//! doors (the gateway's `POST /v1/commands`, and the worker for a `command.start` published
//! straight to the broker), so a bad start is refused with the field it is about.
//!
//! Besides the standard keywords, a schema may use cmdflow's own string formats, which carry
//! the same checks the engine applies later: `cron` (5 or 6 fields that occur at least once),
//! `time-zone` (an IANA zone), `event-type` (`domain.past_tense_verb`), `timer-name`, `owner`
//! (`kind:id`) and `duration` (`30m`, `3d`).

use serde_json::{Map, Value};

/// A format's check: `Err` says why the string is not one.
pub type FormatCheck = fn(&str) -> Result<(), String>;

/// cmdflow's string formats, each with the check that explains a refusal.
pub const FORMATS: &[(&str, FormatCheck)] = &[
    ("cron", check_cron),
    ("time-zone", check_zone),
    ("event-type", check_event_type),
    ("timer-name", check_timer_name),
    ("owner", check_owner),
    ("duration", check_duration),
];

fn check_cron(s: &str) -> Result<(), String> {
    crate::time::parse_cron(s).map_err(|e| e.to_string())?;
    // A pattern that never occurs (`0 0 31 2 *`) is refused here, not failed by the worker.
    crate::time::next_cron(s, "UTC", chrono::Utc::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn check_zone(s: &str) -> Result<(), String> {
    crate::time::parse_zone(s)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn check_event_type(s: &str) -> Result<(), String> {
    crate::domain::check_dotted_name(s, 2).map_err(|e| e.to_string())
}

fn check_timer_name(s: &str) -> Result<(), String> {
    crate::time::check_name(s).map_err(|e| e.to_string())
}

fn check_owner(s: &str) -> Result<(), String> {
    crate::domain::Owner::parse(s)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn check_duration(s: &str) -> Result<(), String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); use e.g. 30m or 3d"))?;
    crate::time::check_delay(d).map_err(|e| e.to_string())
}

/// The schema of a kind that declares none: any JSON object.
pub fn any_object() -> Value {
    serde_json::json!({ "type": "object" })
}

/// Why a schema could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSON Schema: {0}")]
pub struct SchemaError(pub String);

/// A compiled start-data schema.
pub struct StartCheck {
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for StartCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StartCheck")
    }
}

/// Start data that breaks its kind's schema: the field (`data.amount`, or `data` for the
/// object itself) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Violation {
    pub field: String,
    pub reason: String,
}

impl StartCheck {
    /// Compiles `schema` with cmdflow's formats; formats are asserted, not just annotations.
    pub fn compile(schema: &Value) -> Result<StartCheck, SchemaError> {
        let mut options = jsonschema::options().should_validate_formats(true);
        for (name, check) in FORMATS {
            options = options.with_format(*name, move |s: &str| check(s).is_ok());
        }
        let validator = options
            .build(schema)
            .map_err(|e| SchemaError(e.to_string()))?;
        Ok(StartCheck { validator })
    }

    /// Checks start data; the first violation names its field.
    pub fn check(&self, data: &Map<String, Value>) -> Result<(), Violation> {
        self.check_value(&Value::Object(data.clone()))
    }

    /// [`StartCheck::check`] of data already held as a JSON value.
    pub fn check_value(&self, instance: &Value) -> Result<(), Violation> {
        if self.validator.is_valid(instance) {
            return Ok(());
        }
        let Some(error) = self.validator.iter_errors(instance).next() else {
            return Ok(());
        };
        let mut field = String::from("data");
        for segment in error.instance_path().as_str().split('/').skip(1) {
            let segment = segment.replace("~1", "/").replace("~0", "~");
            if segment.bytes().all(|b| b.is_ascii_digit()) && !segment.is_empty() {
                field.push_str(&format!("[{segment}]"));
            } else {
                field.push('.');
                field.push_str(&segment);
            }
        }
        let reason = match error.kind() {
            jsonschema::error::ValidationErrorKind::Required { property } => {
                let name = property
                    .as_str()
                    .map_or_else(|| property.to_string(), str::to_owned);
                field.push('.');
                field.push_str(&name);
                "is required".to_owned()
            }
            jsonschema::error::ValidationErrorKind::Format { format } => {
                let value = error.instance().as_str().unwrap_or_default().to_owned();
                match FORMATS.iter().find(|(name, _)| name == format) {
                    Some((_, check)) => check(&value)
                        .err()
                        .unwrap_or_else(|| format!("is not a {format}")),
                    None => format!("is not a {format}"),
                }
            }
            _ => error.to_string(),
        };
        Err(Violation {
            field,
            reason: crate::contract::clip_to(&reason, 500),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(schema: Value, data: Value) -> Result<(), Violation> {
        StartCheck::compile(&schema)
            .unwrap()
            .check(data.as_object().unwrap())
    }

    #[test]
    fn a_missing_field_is_named() {
        let schema = json!({"type": "object", "required": ["amount"], "properties": {"amount": {"type": "integer"}}});
        let v = check(schema.clone(), json!({})).unwrap_err();
        assert_eq!(
            (v.field.as_str(), v.reason.as_str()),
            ("data.amount", "is required")
        );
        let v = check(schema.clone(), json!({"amount": "ten"})).unwrap_err();
        assert_eq!(v.field, "data.amount");
        assert!(v.reason.contains("integer"), "{v}");
        check(schema, json!({"amount": 10})).unwrap();
    }

    #[test]
    fn nested_and_listed_fields_are_named_by_their_path() {
        let schema = json!({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}}}}});
        let v = check(schema, json!({"items": [{"sku": "a"}, {"sku": 7}]})).unwrap_err();
        assert_eq!(v.field, "data.items[1].sku");
    }

    #[test]
    fn cmdflow_formats_explain_their_refusal() {
        let schema = json!({"type": "object", "properties": {
            "cron": {"type": "string", "format": "cron"},
            "tz": {"type": "string", "format": "time-zone"},
            "on": {"type": "string", "format": "event-type"},
        }});
        let v = check(schema.clone(), json!({"cron": "0 0 31 2 *"})).unwrap_err();
        assert_eq!(v.field, "data.cron");
        let v = check(schema.clone(), json!({"tz": "Mars/Olympus"})).unwrap_err();
        assert!(v.reason.contains("time zone"), "{v}");
        let v = check(schema.clone(), json!({"on": "Quote"})).unwrap_err();
        assert_eq!(v.field, "data.on");
        check(
            schema,
            json!({"cron": "0 10 * * 1-5", "tz": "Europe/Berlin", "on": "quote.requested"}),
        )
        .unwrap();
    }

    #[test]
    fn a_bad_schema_is_refused_when_compiled() {
        assert!(StartCheck::compile(&json!({"type": "no-such-type"})).is_err());
    }
}
