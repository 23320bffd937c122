//! The wire contract: CloudEvents 1.0 in structured JSON mode, with cmdflow's extension
//! attributes `commandid`, `correlationid` and `causationid`.
//!
//! Every event that enters cmdflow, through the gateway or straight from RabbitMQ, is parsed
//! by [`Event::parse`], which says precisely what is wrong with a bad one. Events in binary
//! content mode (attributes as headers) are read by [`binary`] into the same checks.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::domain::{CommandId, check_dotted_name};

pub mod binary;

/// The largest event accepted, serialized.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;
/// The longest `id`.
pub const MAX_ID_LEN: usize = 128;
/// The longest `source`, `subject`, `correlationid` or `causationid`.
pub const MAX_ATTR_LEN: usize = 512;

/// The extension attribute that names the command an event came from: cmdflow sets it on every
/// event a command emits, so whoever answers it (an activity, another service) can address the
/// answer back with `commandid`.
pub const FROM_COMMAND: &str = "fromcommandid";

/// The extension attribute that names who linked two identities (`owner.linked`): the gateway
/// sets it to the caller (`key:<name>`, `jwt:<sub>`), whatever the caller sent.
pub const LINKED_BY: &str = "linkedby";

/// The extension attribute that says when cmdflow accepted an event (RFC 3339): the gateway sets
/// it on every event it publishes, whatever the caller sent, and the engine on every event it
/// emits. A command's events are ordered by it, and an early event matches only the waits of a
/// command that started before the event was accepted. An event published straight to the
/// broker without it counts as accepted when a worker first handles it.
pub const ACCEPTED_AT: &str = "acceptedat";

/// Engine event types (`command.` prefix and the time events).
pub mod types {
    /// Starts a command: `data = {kind, owner, data}`, addressed to the new command's id.
    pub const COMMAND_START: &str = "command.start";
    /// Aborts the command it is addressed to, and its open descendants: `data = {reason}`.
    pub const COMMAND_ABORT: &str = "command.abort";
    /// A child's report to its parent: it completed (`data = {child_id, kind, group, result}`).
    pub const COMMAND_COMPLETED: &str = "command.completed";
    /// A child's report to its parent: it failed (`data = {child_id, kind, group, reason}`).
    pub const COMMAND_FAILED: &str = "command.failed";
    /// A child's report to its parent: it was aborted (`data = {child_id, kind, group, reason}`).
    pub const COMMAND_ABORTED: &str = "command.aborted";
    /// A fan-in group settled: `data = {group, policy, outcome, total, completed, failed, aborted, outcomes}`.
    pub const CHILDREN_SETTLED: &str = "children.settled";

    /// A timer fired: `data = {name, due_at, fired_at}`, addressed to its command.
    pub const TIMER_FIRED: &str = "timer.fired";
    /// A wait's timeout passed before its event: `data = {type, key, due_at, fired_at}`.
    pub const WAIT_TIMED_OUT: &str = "wait.timed_out";
    /// A fan-in group's deadline passed: `data = {group, due_at, fired_at}`.
    pub const CHILDREN_DEADLINE: &str = "children.deadline";

    /// Joins two identities of one person: `data = {from, to}` (owners), e.g. a visitor's
    /// cookie to the member it signed up as. History and pending conditions follow the person.
    pub const OWNER_LINKED: &str = "owner.linked";

    /// Whether `ty` is a child's report to its parent (an ACK).
    pub fn is_ack(ty: &str) -> bool {
        matches!(ty, COMMAND_COMPLETED | COMMAND_FAILED | COMMAND_ABORTED)
    }

    /// Whether `ty` is reserved for the engine (`command.*`, `children.*`, `timer.*`, `wait.*`):
    /// only cmdflow's own processes send such events; the gateway refuses them from callers, and
    /// a worker refuses them without the engine's mark.
    pub fn is_reserved(ty: &str) -> bool {
        ["command.", "children.", "timer.", "wait."]
            .iter()
            .any(|prefix| ty.starts_with(prefix))
    }

    /// Engine events a handler may leave unhandled without it being an error.
    pub fn is_engine_event(ty: &str) -> bool {
        is_ack(ty) || matches!(ty, CHILDREN_SETTLED | COMMAND_ABORT | CHILDREN_DEADLINE)
    }
}

/// A validated CloudEvent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Always `1.0`.
    pub specversion: String,
    /// Unique per `source`; at most 128 characters.
    pub id: String,
    /// Who sent it (a service, `cmdflow/<kind>` for what a command emits).
    pub source: String,
    /// A dotted lower-case name such as `quote.requested`; the routing key.
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// When it happened, if the sender says.
    pub time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Who it is about: the owner a broadcast start gives its command (`visitor:cookie-7f3a`).
    pub subject: Option<String>,
    /// The command this event is addressed to; absent for a broadcast.
    #[serde(default)]
    pub commandid: Option<CommandId>,
    #[serde(default)]
    /// What it belongs with: a broadcast correlated by a person wakes that person's waits.
    pub correlationid: Option<String>,
    #[serde(default)]
    /// The id of the event that caused it.
    pub causationid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// `application/json` when given.
    pub datacontenttype: Option<String>,
    /// The event's data: a JSON object.
    #[schema(value_type = Object)]
    pub data: Map<String, Value>,
    /// Other CloudEvents extension attributes, kept as they came.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extensions: BTreeMap<String, Value>,
}

/// What is wrong with an incoming event. Each variant maps to one HTTP status at the gateway
/// and to a dead-letter reason at the worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("the event is {0} bytes; at most 262144 bytes (256 KiB) are accepted")]
    TooLarge(usize),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl EnvelopeError {
    fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    /// Prefixes the field with its place in a batch, as in `[3].type`.
    pub fn in_batch(self, index: usize) -> Self {
        match self {
            Self::Invalid { field, reason } => Self::Invalid {
                field: format!("[{index}].{field}"),
                reason,
            },
            other => other,
        }
    }
}

const KNOWN: [&str; 11] = [
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "subject",
    "commandid",
    "correlationid",
    "causationid",
    "datacontenttype",
    "data",
];

impl Event {
    /// Parses and validates one event from its JSON bytes.
    pub fn parse(bytes: &[u8]) -> Result<Event, EnvelopeError> {
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(EnvelopeError::TooLarge(bytes.len()));
        }
        let value = parse_json(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        Self::from_value(value, bytes.len())
    }

    /// Validates an already-parsed JSON value, whose serialized size is `size`.
    pub fn from_value(value: Value, size: usize) -> Result<Event, EnvelopeError> {
        if size > MAX_EVENT_BYTES {
            return Err(EnvelopeError::TooLarge(size));
        }
        let Value::Object(mut obj) = value else {
            return Err(EnvelopeError::invalid(
                "event",
                "must be a JSON object (a CloudEvent)",
            ));
        };

        let specversion = required_str(&mut obj, "specversion")?;
        if specversion != "1.0" {
            return Err(EnvelopeError::invalid(
                "specversion",
                format!("must be \"1.0\", got {:?}", clip(&specversion)),
            ));
        }
        let id = required_str(&mut obj, "id")?;
        check_len("id", &id, MAX_ID_LEN)?;
        let source = required_str(&mut obj, "source")?;
        check_len("source", &source, MAX_ATTR_LEN)?;
        let ty = required_str(&mut obj, "type")?;
        check_dotted_name(&ty, 2).map_err(|e| EnvelopeError::invalid("type", e.to_string()))?;

        let time = match optional_str(&mut obj, "time")? {
            None => None,
            Some(t) => Some(
                DateTime::parse_from_rfc3339(&t)
                    .map_err(|_| {
                        EnvelopeError::invalid(
                            "time",
                            "must be an RFC 3339 timestamp such as 2026-11-26T10:00:00Z",
                        )
                    })?
                    .with_timezone(&Utc),
            ),
        };
        let subject = optional_str(&mut obj, "subject")?;
        if let Some(s) = &subject {
            check_len("subject", s, MAX_ATTR_LEN)?;
        }
        let commandid = match optional_str(&mut obj, "commandid")? {
            None => None,
            Some(s) => Some(s.parse::<CommandId>().map_err(|_| {
                EnvelopeError::invalid(
                    "commandid",
                    format!("must be a command id (a UUID), got {:?}", clip(&s)),
                )
            })?),
        };
        let correlationid = optional_str(&mut obj, "correlationid")?;
        if let Some(s) = &correlationid {
            check_len("correlationid", s, MAX_ATTR_LEN)?;
        }
        let causationid = optional_str(&mut obj, "causationid")?;
        if let Some(s) = &causationid {
            check_len("causationid", s, MAX_ATTR_LEN)?;
        }
        let datacontenttype = optional_str(&mut obj, "datacontenttype")?;
        if let Some(ct) = &datacontenttype
            && !is_json_content_type(ct)
        {
            return Err(EnvelopeError::invalid(
                "datacontenttype",
                format!("must be application/json when present, got {:?}", clip(ct)),
            ));
        }
        let data = match obj.remove("data") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map,
            Some(_) => {
                return Err(EnvelopeError::invalid("data", "must be a JSON object"));
            }
        };
        // The owner's address enters here: one a mailer could never use is refused at the door
        // (and dead-lettered when sent straight to the broker), not failed later, silently.
        crate::domain::check_email_in(&data, "data")
            .map_err(|(field, reason)| EnvelopeError::invalid(&field, reason))?;
        if obj.contains_key("data_base64") {
            return Err(EnvelopeError::invalid(
                "data_base64",
                "binary data is not accepted; send a JSON object in `data`",
            ));
        }
        // Attributes and data end up in text and jsonb columns, which cannot hold U+0000.
        let attributes = [
            ("id", Some(&id)),
            ("source", Some(&source)),
            ("subject", subject.as_ref()),
            ("correlationid", correlationid.as_ref()),
            ("causationid", causationid.as_ref()),
        ];
        if let Some((name, _)) = attributes
            .iter()
            .find(|(_, v)| v.is_some_and(|v| v.contains('\0')))
        {
            return Err(EnvelopeError::invalid(name, NUL_REASON));
        }
        if let Some(at) = nul_in_map(&data, "data") {
            return Err(EnvelopeError::invalid(&at, NUL_REASON));
        }
        let mut extensions = BTreeMap::new();
        for (name, value) in obj {
            if !is_extension_name(&name) {
                // A blank name is quoted, so that the error still shows which attribute.
                let shown = if name.trim().is_empty() {
                    format!("{name:?}")
                } else {
                    clip(&name)
                };
                return Err(EnvelopeError::invalid(
                    &shown,
                    "is not a CloudEvents attribute: extension names are 1 to 20 lower-case letters or digits",
                ));
            }
            if matches!(value, Value::Object(_) | Value::Array(_)) {
                return Err(EnvelopeError::invalid(
                    &name,
                    "an extension attribute must be a string, number, boolean or null",
                ));
            }
            if value.as_str().is_some_and(|v| v.contains('\0')) {
                return Err(EnvelopeError::invalid(&name, NUL_REASON));
            }
            extensions.insert(name, value);
        }

        Ok(Event {
            specversion,
            id,
            source,
            ty,
            time,
            subject,
            commandid,
            correlationid,
            causationid,
            datacontenttype,
            data,
            extensions,
        })
    }

    /// A new event emitted by cmdflow itself, with a fresh id, the time set and stamped as
    /// accepted now.
    pub fn new(source: &str, ty: &str, data: Map<String, Value>) -> Event {
        let now = Utc::now();
        let mut event = Event {
            specversion: "1.0".to_owned(),
            id: Uuid::now_v7().to_string(),
            source: source.to_owned(),
            ty: ty.to_owned(),
            time: Some(now),
            subject: None,
            commandid: None,
            correlationid: None,
            causationid: None,
            datacontenttype: Some("application/json".to_owned()),
            data,
            extensions: BTreeMap::new(),
        };
        event.stamp_accepted(now);
        event
    }

    /// When cmdflow accepted the event (its `acceptedat`), if it was stamped.
    pub fn accepted_at(&self) -> Option<DateTime<Utc>> {
        self.extensions
            .get(ACCEPTED_AT)
            .and_then(Value::as_str)
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
    }

    /// Stamps the event as accepted at `now`, replacing any `acceptedat` it carried.
    pub fn stamp_accepted(&mut self, now: DateTime<Utc>) {
        self.extensions.insert(
            ACCEPTED_AT.to_owned(),
            Value::String(now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
    }

    /// The event as structured-mode JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain data (strings, maps, numbers) cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Parses the body of `POST /v1/events`: one event, or a JSON array of them.
pub fn parse_batch(bytes: &[u8]) -> Result<Vec<Event>, EnvelopeError> {
    let value = parse_json(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(EnvelopeError::invalid(
                    "events",
                    "the batch is empty; send at least one event",
                ));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    let size = serde_json::to_vec(&item).map(|v| v.len()).unwrap_or(0);
                    Event::from_value(item, size).map_err(|e| e.in_batch(i))
                })
                .collect()
        }
        single => Ok(vec![Event::from_value(single, bytes.len())?]),
    }
}

fn is_json_content_type(ct: &str) -> bool {
    let base = ct.split(';').next().unwrap_or("").trim();
    base.eq_ignore_ascii_case("application/json") || base.to_ascii_lowercase().ends_with("+json")
}

fn is_extension_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && !KNOWN.contains(&name)
}

/// Why a value holding U+0000 is refused: PostgreSQL's `text` and `jsonb` cannot store it.
pub const NUL_REASON: &str = "contains a NUL character (\\u0000), which cannot be stored";

/// The path (`data.items[2].name`) of the first string or key in `value` holding U+0000.
pub fn nul_at(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(if path.is_empty() {
            "value".to_owned()
        } else {
            path.to_owned()
        }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_at(v, &format!("{path}[{i}]"))),
        Value::Object(map) => nul_in_map(map, path),
        _ => None,
    }
}

/// [`nul_at`] for the members of a JSON object at `path`.
pub fn nul_in_map(map: &Map<String, Value>, path: &str) -> Option<String> {
    let join = |key: &str| {
        if path.is_empty() {
            clip(key)
        } else {
            format!("{path}.{}", clip(key))
        }
    };
    map.iter().find_map(|(k, v)| {
        if k.contains('\0') {
            Some(join(&k.replace('\0', "\\u0000")))
        } else {
            nul_at(v, &join(k))
        }
    })
}

/// Parses a JSON document into a [`Value`] as `serde_json::from_slice` does, but refuses an
/// object that names the same key twice, at any depth: serde_json would keep the last one and
/// silently drop the other (`{"owner": "a", "owner": "b"}`).
pub fn parse_json(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<Strict>(bytes).map(|strict| strict.0)
}

/// A JSON value without duplicate keys; see [`parse_json`].
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON text has no NaN or infinity, so every parsed float is a number.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if members.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "the key {:?} appears twice in one object",
                    clip(&key)
                )));
            }
            let Strict(value) = map.next_value()?;
            members.insert(key, value);
        }
        Ok(Value::Object(members))
    }
}

/// `s`, cut to 40 characters with `…` when longer: what an error message repeats of an input.
fn clip(s: &str) -> String {
    clip_to(s, 40)
}

/// `s`, cut to `max` characters with `…` when longer, so an error never repeats a huge input.
pub fn clip_to(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn required_str(obj: &mut Map<String, Value>, field: &str) -> Result<String, EnvelopeError> {
    match obj.remove(field) {
        None | Some(Value::Null) => Err(EnvelopeError::invalid(field, "is required")),
        Some(Value::String(s)) if s.is_empty() => {
            Err(EnvelopeError::invalid(field, "must not be empty"))
        }
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(EnvelopeError::invalid(field, "must be a string")),
    }
}

fn optional_str(
    obj: &mut Map<String, Value>,
    field: &str,
) -> Result<Option<String>, EnvelopeError> {
    match obj.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err(EnvelopeError::invalid(
            field,
            "must not be empty when present (omit it or send null)",
        )),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(EnvelopeError::invalid(field, "must be a string")),
    }
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), EnvelopeError> {
    if value.chars().count() > max {
        return Err(EnvelopeError::invalid(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(EnvelopeError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
