//! The contract's unit tests: parsing good and bad events, batches, and properties of the parser.

use super::*;
use proptest::prelude::*;
use serde_json::json;

fn good() -> Value {
    json!({
        "specversion": "1.0", "id": "e-1", "source": "web-frontend",
        "type": "quote.requested", "time": "2026-11-26T10:00:00Z",
        "subject": "visitor:cookie-7f3a", "commandid": null,
        "correlationid": "visitor:cookie-7f3a", "causationid": null,
        "datacontenttype": "application/json", "data": {"total": 3}
    })
}

fn parse(v: Value) -> Result<Event, EnvelopeError> {
    Event::parse(&serde_json::to_vec(&v).unwrap())
}

fn field_of(err: EnvelopeError) -> String {
    match err {
        EnvelopeError::Invalid { field, .. } => field,
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

#[test]
fn a_good_event_parses_and_round_trips() {
    let event = parse(good()).unwrap();
    assert_eq!(event.ty, "quote.requested");
    assert_eq!(event.data["total"], 3);
    let again = Event::parse(&event.to_bytes()).unwrap();
    assert_eq!(again, event);
}

#[test]
fn each_bad_field_is_named() {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("specversion", json!("0.3"), "specversion"),
        ("id", json!(""), "id"),
        ("id", json!("x".repeat(129)), "id"),
        ("id", json!(7), "id"),
        ("source", json!(""), "source"),
        ("type", json!("QuoteRequested"), "type"),
        ("type", json!("quote"), "type"),
        ("time", json!("yesterday"), "time"),
        ("commandid", json!("../../etc/passwd"), "commandid"),
        ("data", json!([1, 2]), "data"),
        ("data", json!("text"), "data"),
        ("datacontenttype", json!("text/xml"), "datacontenttype"),
        ("data", json!({"email": "ada at example.org"}), "data.email"),
        ("data", json!({"email": "ada@"}), "data.email"),
        ("data", json!({"email": 7}), "data.email"),
    ];
    for (key, value, field) in cases {
        let mut v = good();
        v[key] = value;
        assert_eq!(field_of(parse(v).unwrap_err()), field, "{key}");
    }
    let mut v = good();
    v.as_object_mut().unwrap().remove("source");
    assert_eq!(field_of(parse(v).unwrap_err()), "source");
    for email in [json!("ada@example.org"), Value::Null] {
        let mut v = good();
        v["data"] = json!({ "email": email });
        assert!(parse(v).is_ok(), "{email}");
    }
    let mut v = good();
    v["Bad-Ext"] = json!(1);
    assert_eq!(field_of(parse(v).unwrap_err()), "Bad-Ext");
}

#[test]
fn extensions_are_kept() {
    let mut v = good();
    v["traceparent"] = json!("00-abc-def-01");
    let event = parse(v).unwrap();
    assert_eq!(event.extensions["traceparent"], "00-abc-def-01");
    assert!(
        String::from_utf8(event.to_bytes())
            .unwrap()
            .contains("traceparent")
    );
}

#[test]
fn too_large_and_malformed() {
    let mut v = good();
    v["data"] = json!({"blob": "x".repeat(MAX_EVENT_BYTES)});
    assert!(matches!(parse(v), Err(EnvelopeError::TooLarge(_))));
    assert!(matches!(
        Event::parse(b"{nope"),
        Err(EnvelopeError::Malformed(_))
    ));
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    assert!(matches!(
        Event::parse(deep.as_bytes()),
        Err(EnvelopeError::Malformed(_))
    ));
}

#[test]
fn batches_name_the_bad_index() {
    let mut bad = good();
    bad["type"] = json!("nope");
    let body = serde_json::to_vec(&json!([good(), bad])).unwrap();
    assert_eq!(field_of(parse_batch(&body).unwrap_err()), "[1].type");
    let body = serde_json::to_vec(&json!([good(), good()])).unwrap();
    assert_eq!(parse_batch(&body).unwrap().len(), 2);
    assert!(parse_batch(b"[]").is_err());
}

proptest! {
    #[test]
    fn parse_never_panics_and_errors_say_something(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = Event::parse(&bytes) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn any_string_field_value_never_panics(key in proptest::sample::select(KNOWN.to_vec()), s in "\\PC{0,200}") {
        let mut v = good();
        v[key] = json!(s);
        if let Err(e) = parse(v) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}
