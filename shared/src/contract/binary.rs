//! CloudEvents binary content mode: the attributes travel as transport headers and the body is
//! the event's data, as Knative, Dapr, Argo Events and most SDKs send by default.
//!
//! - HTTP (CloudEvents HTTP binding 1.0): each attribute is a `ce-<name>` header, its value
//!   percent-encoded; `Content-Type` is the `datacontenttype`.
//! - AMQP (CloudEvents AMQP binding 1.0): each attribute is an application property (an AMQP
//!   0-9-1 header) `cloudEvents:<name>`, or `cloudEvents_<name>` where `:` cannot be used; the
//!   message's `content-type` property is the `datacontenttype`. `time` may be an AMQP
//!   timestamp, or an integer of milliseconds as AMQP 1.0 clients send it. The `ce-<name>`
//!   headers of Knative's RabbitMQ binding are read the same way.
//!
//! Both become the structured-mode JSON object the rest of cmdflow knows, and are validated by
//! [`Event::from_value`], so a binary event is held to exactly the rules of a structured one
//! and its errors name the same fields. Only JSON data is accepted, as in structured mode.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value};

use super::{EnvelopeError, Event, MAX_EVENT_BYTES, clip, is_json_content_type, parse_json};

/// The prefix of a CloudEvents attribute header over HTTP (lower case: header names are
/// case-insensitive and arrive lower-cased).
pub const HTTP_PREFIX: &str = "ce-";

/// The prefixes of a CloudEvents application property over AMQP: the binding's `cloudEvents:`,
/// `cloudEvents_` for clients (JMS) that cannot use `:` in a property name, and `ce-` of the
/// RabbitMQ binding that Knative's RabbitMQ broker speaks.
pub const AMQP_PREFIXES: [&str; 3] = ["cloudEvents:", "cloudEvents_", "ce-"];

impl Event {
    /// Parses and validates an event given in binary mode: its attributes (names without the
    /// transport's prefix), the data's content type, and the data itself.
    pub fn from_binary(
        attributes: Vec<(String, Value)>,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Event, EnvelopeError> {
        let value = structured(attributes, content_type, body)?;
        let size = serde_json::to_vec(&value).map_or(usize::MAX, |v| v.len());
        Event::from_value(value, size)
    }

    /// The event of an AMQP message in binary mode, or `None` when the message carries no
    /// `cloudEvents:*` or `cloudEvents_*` property (it is structured: its body is the event).
    pub fn from_amqp_binary(
        properties: &BasicProperties,
        body: &[u8],
    ) -> Option<Result<Event, EnvelopeError>> {
        let attributes = amqp_attributes(properties.headers().as_ref()?)?;
        let content_type = properties.content_type().as_ref().map(|ct| ct.as_str());
        Some(Event::from_binary(attributes, content_type, body))
    }

    /// The event of an AMQP message in either mode: binary when it carries CloudEvents
    /// properties, otherwise the structured JSON of its body.
    pub fn from_amqp(properties: &BasicProperties, body: &[u8]) -> Result<Event, EnvelopeError> {
        Event::from_amqp_binary(properties, body).unwrap_or_else(|| Event::parse(body))
    }
}

/// An AMQP message in binary mode rewritten in structured mode, as cmdflow carries events
/// between its own queues: the event's JSON as the body, the CloudEvents properties dropped,
/// the other headers kept. `None` when the message is not in binary mode, or is not a valid
/// event (it goes on as it came, and the worker dead-letters it with the reason).
pub fn structured_message(
    properties: &BasicProperties,
    body: &[u8],
) -> Option<(Vec<u8>, BasicProperties)> {
    let event = Event::from_amqp_binary(properties, body)?.ok()?;
    let headers: FieldTable = properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter(|(k, _)| !AMQP_PREFIXES.iter().any(|p| k.as_str().starts_with(p)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<std::collections::BTreeMap<_, _>>()
                .into()
        })
        .unwrap_or_default();
    let properties = properties
        .clone()
        .with_content_type(STRUCTURED_CONTENT_TYPE.into())
        .with_message_id(event.id.as_str().into())
        .with_headers(headers);
    Some((event.to_bytes(), properties))
}

/// The content type of an event in structured mode.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// The structured-mode JSON object of a binary-mode event. Attributes are checked later, by
/// [`Event::from_value`]; here only what binary mode itself adds: the data must be JSON.
pub fn structured(
    attributes: Vec<(String, Value)>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Value, EnvelopeError> {
    if body.len() > MAX_EVENT_BYTES {
        return Err(EnvelopeError::TooLarge(body.len()));
    }
    let mut obj = Map::new();
    for (name, value) in attributes {
        if name == "data" || name == "data_base64" {
            return Err(EnvelopeError::invalid(
                &name,
                "is not an attribute in binary mode: the data is the message body",
            ));
        }
        if obj.contains_key(&name) {
            return Err(EnvelopeError::invalid(&name, "is given twice"));
        }
        obj.insert(name, value);
    }
    // The transport's content type is the data's; a `datacontenttype` attribute is not part of
    // binary mode, and is only used when the transport gives none.
    if let Some(ct) = content_type.map(str::trim).filter(|ct| !ct.is_empty()) {
        obj.insert("datacontenttype".to_owned(), Value::String(ct.to_owned()));
    }
    if let Some(Value::String(ct)) = obj.get("datacontenttype")
        && !is_json_content_type(ct)
    {
        return Err(EnvelopeError::invalid(
            "datacontenttype",
            format!(
                "cmdflow accepts JSON data only (application/json or a +json type), got {:?}",
                clip(ct)
            ),
        ));
    }
    if !body.iter().all(u8::is_ascii_whitespace) {
        let data = parse_json(body)
            .map_err(|e| EnvelopeError::Malformed(format!("the body (the event's data): {e}")))?;
        obj.insert("data".to_owned(), data);
    }
    Ok(Value::Object(obj))
}

/// The CloudEvents attributes of AMQP headers, or `None` when there is none. A header of a type
/// no attribute can have is passed on as text, so that validation names it.
pub fn amqp_attributes(headers: &FieldTable) -> Option<Vec<(String, Value)>> {
    let attributes: Vec<(String, Value)> = headers
        .inner()
        .iter()
        .filter_map(|(key, value)| {
            let key = key.as_str();
            let name = AMQP_PREFIXES.iter().find_map(|p| key.strip_prefix(p))?;
            let value = match (name, amqp_value(value)) {
                // An AMQP 1.0 timestamp, as an integer: milliseconds since the epoch.
                ("time", Value::Number(ms)) => ms
                    .as_i64()
                    .and_then(chrono::DateTime::from_timestamp_millis)
                    .map_or(Value::Number(ms), |t| {
                        Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                    }),
                (_, value) => value,
            };
            Some((name.to_owned(), value))
        })
        .collect();
    (!attributes.is_empty()).then_some(attributes)
}

/// Whether AMQP `headers` carry a CloudEvents attribute (the message is in binary mode).
pub fn is_amqp_binary(headers: Option<&FieldTable>) -> bool {
    headers.is_some_and(|h| {
        h.inner()
            .keys()
            .any(|k| AMQP_PREFIXES.iter().any(|p| k.as_str().starts_with(p)))
    })
}

fn amqp_value(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        // The binding maps `time` to an AMQP timestamp (seconds since the epoch).
        AMQPValue::Timestamp(secs) => i64::try_from(*secs)
            .ok()
            .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
            .map_or(Value::Null, |t| {
                Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            }),
        AMQPValue::Void => Value::Null,
        other => Value::String(format!("{other:?}")),
    }
}

/// Decodes an HTTP `ce-*` header value: percent-encoded UTF-8 (CloudEvents HTTP binding,
/// 3.1.3.2). `None` when the bytes are not valid UTF-8 once decoded.
pub fn percent_decode(raw: &[u8]) -> Option<String> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let escaped = match raw.get(i..i + 3) {
            Some([b'%', hi, lo]) => hex(*hi).zip(hex(*lo)),
            _ => None,
        };
        match escaped {
            Some((hi, lo)) => {
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                i += 3;
            }
            None => {
                out.push(raw[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn attrs(pairs: &[(&str, &str)]) -> Vec<(String, Value)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
            .collect()
    }

    const MINIMAL: [(&str, &str); 4] = [
        ("specversion", "1.0"),
        ("id", "e-1"),
        ("source", "knative"),
        ("type", "demo.increment"),
    ];

    #[test]
    fn binary_mode_gives_the_same_event_as_structured_mode() {
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("commandid", "0192f0c4-7a2e-7cc1-9d6a-1c2b3d4e5f60"));
        pairs.push((
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ));
        let binary =
            Event::from_binary(attrs(&pairs), Some("application/json"), br#"{"by": 2}"#).unwrap();
        let structured = Event::parse(
            &serde_json::to_vec(&json!({
                "specversion": "1.0", "id": "e-1", "source": "knative", "type": "demo.increment",
                "commandid": "0192f0c4-7a2e-7cc1-9d6a-1c2b3d4e5f60",
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "datacontenttype": "application/json", "data": {"by": 2}
            }))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(binary, structured);
    }

    #[test]
    fn binary_mode_errors_name_the_field() {
        let field = |e: EnvelopeError| match e {
            EnvelopeError::Invalid { field, .. } => field,
            other => panic!("{other}"),
        };
        let no_type = attrs(&MINIMAL[..3]);
        assert_eq!(
            field(Event::from_binary(no_type, Some("application/json"), b"{}").unwrap_err()),
            "type"
        );
        let xml = Event::from_binary(attrs(&MINIMAL), Some("application/xml"), b"<a/>");
        assert_eq!(field(xml.unwrap_err()), "datacontenttype");
        let list = Event::from_binary(attrs(&MINIMAL), Some("application/json"), b"[1]");
        assert_eq!(field(list.unwrap_err()), "data");
        let mut with_data = MINIMAL.to_vec();
        with_data.push(("data", "{}"));
        assert_eq!(
            field(Event::from_binary(attrs(&with_data), None, b"").unwrap_err()),
            "data"
        );
        assert!(matches!(
            Event::from_binary(attrs(&MINIMAL), Some("application/json"), b"{"),
            Err(EnvelopeError::Malformed(_))
        ));
        let empty = Event::from_binary(attrs(&MINIMAL), None, b"").unwrap();
        assert!(empty.data.is_empty() && empty.datacontenttype.is_none());
    }

    #[test]
    fn amqp_properties_under_either_prefix_are_attributes() {
        let mut headers = FieldTable::default();
        headers.insert("cloudEvents:specversion".into(), crate::bus::string("1.0"));
        headers.insert("cloudEvents_id".into(), crate::bus::string("e-2"));
        headers.insert("cloudEvents:source".into(), crate::bus::string("dapr"));
        headers.insert(
            "cloudEvents:type".into(),
            crate::bus::string("demo.increment"),
        );
        headers.insert(
            "cloudEvents:time".into(),
            AMQPValue::Timestamp(1_764_151_200),
        );
        headers.insert("cloudEvents:attempt".into(), AMQPValue::LongInt(3));
        headers.insert("ce-subject".into(), crate::bus::string("member:7"));
        headers.insert("traceparent".into(), crate::bus::string("not an attribute"));
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers);
        let event = Event::from_amqp_binary(&properties, br#"{"by": 3}"#)
            .unwrap()
            .unwrap();
        assert_eq!((event.id.as_str(), event.source.as_str()), ("e-2", "dapr"));
        assert_eq!(event.data["by"], 3);
        assert_eq!(
            event.time.unwrap().to_rfc3339(),
            "2025-11-26T10:00:00+00:00"
        );
        assert_eq!(event.extensions["attempt"], 3);
        assert_eq!(event.subject.as_deref(), Some("member:7"));
        let mut millis = FieldTable::default();
        for (k, v) in properties.headers().as_ref().unwrap() {
            millis.insert(k.clone(), v.clone());
        }
        millis.insert(
            "cloudEvents:time".into(),
            AMQPValue::LongLongInt(1_764_151_200_250),
        );
        let event = Event::from_amqp_binary(&properties.clone().with_headers(millis), b"")
            .unwrap()
            .unwrap();
        assert_eq!(event.time.unwrap().timestamp_millis(), 1_764_151_200_250);
        assert!(!event.extensions.contains_key("traceparent"));
        let structured = BasicProperties::default();
        assert!(Event::from_amqp_binary(&structured, b"{}").is_none());
        assert!(is_amqp_binary(properties.headers().as_ref()));
        assert!(!is_amqp_binary(None));
    }

    #[test]
    fn http_header_values_are_percent_decoded() {
        assert_eq!(percent_decode(b"a%20b%25c").unwrap(), "a b%c");
        assert_eq!(percent_decode(b"caf%C3%A9").unwrap(), "café");
        assert_eq!(percent_decode(b"100%").unwrap(), "100%");
        assert_eq!(percent_decode(b"%zz").unwrap(), "%zz");
        assert!(percent_decode(b"%FF").is_none());
    }
}
