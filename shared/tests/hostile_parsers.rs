//! Hostile input for the parsers of the shared crate: the CloudEvents envelope, cron patterns
//! and time zones, delays (milliseconds and the humantime strings of the config), timer names.
//!
//! Each parser must never panic, and every error it returns must say what is wrong: a
//! non-empty message that names the field (or repeats the bad value), without echoing a huge
//! input back. Two kinds of input: a regression corpus of hand-picked nasty inputs under
//! `tests/corpus/{envelope,cron,duration}/` (replayed on every run; a file name says what is
//! expected, see `tests/corpus/README.md`), and proptest-generated ones — random bytes and
//! strings, and structure-aware mutations of valid values (a field perturbed, huge, unicode,
//! NULs, deep nesting). Proptest keeps the seeds of any failure it finds next to the corpus
//! (`tests/corpus/*/proptest-seeds.txt`) and replays them first on every run.

#![allow(clippy::unwrap_used)]

#[path = "../../tests/corpus/replay.rs"]
mod replay;

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use cmdflow_shared::Config;
use cmdflow_shared::contract::{EnvelopeError, Event, MAX_EVENT_BYTES, parse_batch};
use cmdflow_shared::time::{
    MAX_DELAY, MAX_TIMER_NAME, TimeError, TimerSpec, TimerWhen, check_delay, check_name,
    delay_from_millis, next_cron, parse_cron, parse_zone,
};
use proptest::prelude::*;
use proptest::test_runner::{FailurePersistence, FileFailurePersistence};
use replay::{corpus, expectation};
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------------------------

/// Where proptest keeps the seeds of failures it found, replayed first on every run.
fn seeds(dir: &'static str) -> Option<Box<dyn FailurePersistence>> {
    let path: &'static str = match dir {
        "envelope" => concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/corpus/envelope/proptest-seeds.txt"
        ),
        "cron" => concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/corpus/cron/proptest-seeds.txt"
        ),
        _ => concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/corpus/duration/proptest-seeds.txt"
        ),
    };
    Some(Box::new(FileFailurePersistence::Direct(path)))
}

fn config(cases: u32, dir: &'static str) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: seeds(dir),
        ..ProptestConfig::default()
    }
}

/// The longest error message a parser may produce, whatever the input's size: an error that
/// echoes a 4 MiB input would flood the logs and the HTTP answer.
const MAX_MESSAGE: usize = 1000;

// ---------------------------------------------------------------------------------------------
// The envelope
// ---------------------------------------------------------------------------------------------

fn good() -> Value {
    json!({
        "specversion": "1.0", "id": "e-1", "source": "web-frontend",
        "type": "quote.requested", "time": "2026-11-26T10:00:00Z",
        "subject": "visitor:cookie-7f3a", "commandid": null,
        "correlationid": "visitor:cookie-7f3a", "causationid": null,
        "datacontenttype": "application/json", "data": {"total": 3}
    })
}

const FIELDS: [&str; 11] = [
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
const REQUIRED: [&str; 4] = ["specversion", "id", "source", "type"];

/// Why `e` is not a precise error, if it is not.
fn imprecise_envelope_error(e: &EnvelopeError) -> Option<String> {
    let message = e.to_string();
    if message.trim().is_empty() {
        return Some("empty message".into());
    }
    if message.chars().count() > MAX_MESSAGE {
        return Some(format!("a {}-character message", message.chars().count()));
    }
    match e {
        EnvelopeError::Malformed(detail) if detail.trim().is_empty() => {
            Some("malformed, without saying where".into())
        }
        EnvelopeError::TooLarge(n)
            if *n <= MAX_EVENT_BYTES || !message.contains(&n.to_string()) =>
        {
            Some(format!("too large at {n} bytes?"))
        }
        EnvelopeError::Invalid { field, reason } => {
            if field.trim().is_empty() {
                Some("no field named".into())
            } else if reason.trim().is_empty() {
                Some(format!("{field}: no reason"))
            } else if !message.starts_with(field.as_str()) {
                Some("the message does not start with the field".into())
            } else {
                None
            }
        }
        _ => None,
    }
}

fn field_of(e: &EnvelopeError) -> Option<&str> {
    match e {
        EnvelopeError::Invalid { field, .. } => Some(field),
        _ => None,
    }
}

fn parse_value(v: &Value) -> Result<Event, EnvelopeError> {
    Event::parse(&serde_json::to_vec(v).unwrap())
}

/// A parsed event survives its own serialization: what the gateway publishes is what the
/// worker reads. Floats are compared to a few ulps (see
/// `a_float_in_data_is_kept_to_the_last_digit` for why they are not exact).
fn round_trips(event: &Event) -> bool {
    let Ok(again) = Event::parse(&event.to_bytes()) else {
        return false;
    };
    same_json(
        &serde_json::to_value(event).unwrap(),
        &serde_json::to_value(&again).unwrap(),
    )
}

fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn the_envelope_corpus_replays() {
    let mut failures = Vec::new();
    for (name, bytes) in corpus("envelope") {
        let started = Instant::now();
        let single = Event::parse(&bytes);
        let batch = parse_batch(&bytes);
        if started.elapsed() > Duration::from_secs(2) {
            failures.push(format!("{name}: took {:?}", started.elapsed()));
        }
        let (known_bug, expect) = expectation(&name);
        if known_bug {
            continue;
        }
        for e in [single.as_ref().err(), batch.as_ref().err()]
            .into_iter()
            .flatten()
        {
            if let Some(why) = imprecise_envelope_error(e) {
                failures.push(format!("{name}: {why}: {e}"));
            }
        }
        if let Ok(event) = &single
            && !round_trips(event)
        {
            failures.push(format!("{name}: does not round-trip"));
        }
        let ok = match expect {
            "any" => true,
            "ok" => batch.is_ok(),
            "malformed" => matches!(batch, Err(EnvelopeError::Malformed(_))),
            "too_large" => matches!(single, Err(EnvelopeError::TooLarge(_))),
            "invalid" => matches!(batch, Err(EnvelopeError::Invalid { .. })),
            invalid => match invalid.strip_prefix("invalid.") {
                Some(field) => batch.as_ref().err().and_then(field_of) == Some(field),
                None => panic!("{name}: unknown expectation `{invalid}`"),
            },
        };
        if !ok {
            failures.push(format!("{name}: expected {expect}, got {batch:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_size_limit_is_exact() {
    // `{"data":{"x":"…"},…}` padded to exactly the limit, then one byte more.
    let mut v = good();
    let base = serde_json::to_vec(&v).unwrap().len() + r#","x":"""#.len();
    for (size, too_large) in [(MAX_EVENT_BYTES, false), (MAX_EVENT_BYTES + 1, true)] {
        v["data"]["x"] = json!("y".repeat(size - base));
        let bytes = serde_json::to_vec(&v).unwrap();
        assert_eq!(bytes.len(), size);
        let result = Event::parse(&bytes);
        assert_eq!(
            matches!(result, Err(EnvelopeError::TooLarge(_))),
            too_large,
            "{size}: {result:?}"
        );
    }
    // Far over the limit: refused before any parsing, and the message stays short.
    let huge = vec![b'['; 8 * MAX_EVENT_BYTES];
    let e = Event::parse(&huge).unwrap_err();
    assert!(
        matches!(e, EnvelopeError::TooLarge(n) if n == huge.len()),
        "{e}"
    );
    assert!(imprecise_envelope_error(&e).is_none(), "{e}");
}

#[test]
fn nesting_is_refused_before_it_hurts() {
    // serde_json stops at 128 levels; deeper is malformed, never a stack overflow.
    for depth in [1usize, 100, 126, 127, 128, 200, 100_000] {
        let mut v = good();
        let text = serde_json::to_string(&v).unwrap().replace(
            r#""data":{"total":3}"#,
            &format!(
                r#""data":{{"x":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            ),
        );
        let result = Event::parse(text.as_bytes());
        match &result {
            Ok(event) => {
                assert!(depth < 128, "{depth} levels parsed");
                v["data"] = json!(event.data);
                assert!(round_trips(event));
            }
            Err(e) => {
                assert!(depth >= 126, "{depth}: {e}");
                assert!(imprecise_envelope_error(e).is_none(), "{e}");
            }
        }
    }
}

/// The values a hostile client puts in a field.
fn hostile_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        hostile_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(hostile_string(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\PC{0,64}",
        "[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}a.]{0,16}",
        proptest::sample::select(vec![
            "",
            " ",
            "1.0",
            "a.b",
            "quote.requested",
            "'; DROP TABLE commands;--",
            "\0",
            "a\0b",
            "%",
            "_",
            "\\",
            "\\\\'\"",
            "\r\nX-Injected: 1",
            "../../etc/passwd",
            "..%2F..%2Fetc%2Fpasswd",
            "2026-11-26T10:00:00Z",
            "2016-12-31T23:59:60Z",
            "+275760-09-13T00:00:00Z",
            "0192f0c1-7a3b-7c2d-9e4f-5a6b7c8d9e0f",
            "{0192f0c1-7a3b-7c2d-9e4f-5a6b7c8d9e0f}",
            "urn:uuid:0192f0c1-7a3b-7c2d-9e4f-5a6b7c8d9e0f",
            "application/json",
            "application/x+json; charset=\r\n",
            "\u{202e}gnp.exe",
            "\u{feff}",
            "👩‍👩‍👧‍👦",
        ])
        .prop_map(str::to_owned),
        // Around the length limits (128 and 512 characters), in 1- to 4-byte characters.
        (
            proptest::sample::select(vec!['x', 'é', '€', '🦀']),
            prop_oneof![120usize..=130, 505usize..=520, Just(5000usize)]
        )
            .prop_map(|(c, n)| c.to_string().repeat(n)),
    ]
}

/// Small byte-level damage to a valid event.
#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Duplicate(usize, usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Damage::Flip(i, b)),
        (
            any::<usize>(),
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 1..8),
                proptest::sample::select(vec![
                    b"\0".to_vec(),
                    b"\xff".to_vec(),
                    b"\\u0000".to_vec(),
                    b"\\ud800".to_vec(),
                    b"\xef\xbb\xbf".to_vec(),
                    b"[".repeat(200),
                    b"{\"a\":".repeat(200),
                    b"1e999".to_vec(),
                    b"-0".to_vec(),
                    b"\"type\":\"c.d\",".to_vec(),
                ]),
            ]
        )
            .prop_map(|(i, bytes)| Damage::Insert(i, bytes)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Damage::Delete(i, n)),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Damage::Duplicate(i, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, d: &Damage) {
    let len = bytes.len();
    match d {
        Damage::Flip(i, b) => bytes[i % len] ^= b,
        Damage::Insert(i, new) => {
            let at = i % (len + 1);
            bytes.splice(at..at, new.iter().copied());
        }
        Damage::Delete(i, n) => {
            let at = i % len;
            bytes.drain(at..(at + n).min(len));
        }
        Damage::Duplicate(i, n) => {
            let at = i % len;
            let piece = bytes[at..(at + n).min(len)].to_vec();
            bytes.splice(at..at, piece);
        }
    }
}

proptest! {
    #![proptest_config(config(512, "envelope"))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        for result in [Event::parse(&bytes).map(|_| ()), parse_batch(&bytes).map(|_| ())] {
            if let Err(e) = result {
                prop_assert!(imprecise_envelope_error(&e).is_none(), "{e}");
            }
        }
    }

    #[test]
    fn damaged_events_never_panic(damages in proptest::collection::vec(damage(), 1..6)) {
        let mut bytes = serde_json::to_vec(&good()).unwrap();
        for d in &damages {
            apply(&mut bytes, d);
            if bytes.is_empty() {
                bytes.push(b'{');
            }
        }
        match Event::parse(&bytes) {
            Ok(event) => prop_assert!(round_trips(&event)),
            Err(e) => prop_assert!(imprecise_envelope_error(&e).is_none(), "{e}"),
        }
    }

    /// One field perturbed: the event parses, or the error names exactly that field.
    #[test]
    fn a_perturbed_field_is_the_one_named(
        field in proptest::sample::select(FIELDS.to_vec()),
        value in hostile_value(),
    ) {
        let mut v = good();
        v[field] = value;
        match parse_value(&v) {
            Ok(event) => prop_assert!(round_trips(&event)),
            Err(EnvelopeError::TooLarge(_)) => {}
            Err(e) => {
                prop_assert!(imprecise_envelope_error(&e).is_none(), "{e}");
                // A value inside `data` is named by its path, `data.key[2]`.
                let named = field_of(&e).unwrap_or_default();
                prop_assert!(named == field || named.starts_with(&format!("{field}.")), "{}", e);
            }
        }
    }

    #[test]
    fn a_missing_field_is_named_when_required(field in proptest::sample::select(FIELDS.to_vec())) {
        let mut v = good();
        v.as_object_mut().unwrap().remove(field);
        match parse_value(&v) {
            Ok(_) => prop_assert!(!REQUIRED.contains(&field)),
            Err(e) => {
                prop_assert!(REQUIRED.contains(&field));
                prop_assert_eq!(field_of(&e), Some(field));
            }
        }
    }

    /// An unknown attribute is a valid extension, or the error names it (clipped).
    #[test]
    fn an_extra_attribute_is_named(name in hostile_string(), value in hostile_value()) {
        let mut v = good();
        prop_assume!(!FIELDS.contains(&name.as_str()));
        // A blank name is quoted in the error: `an_attribute_with_a_blank_name_is_named`.
        prop_assume!(!name.trim().is_empty());
        v[name.as_str()] = value;
        match parse_value(&v) {
            Ok(event) => {
                prop_assert!(name.len() <= 20 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
                prop_assert!(round_trips(&event));
            }
            Err(EnvelopeError::TooLarge(_)) => {}
            Err(e) => {
                prop_assert!(imprecise_envelope_error(&e).is_none(), "{e}");
                let field = field_of(&e).unwrap_or_default();
                prop_assert!(name.starts_with(field.trim_end_matches('…')), "{field:?} for {name:?}");
            }
        }
    }

    /// In a batch, the error names the index of the one bad event and its field.
    #[test]
    fn a_bad_event_in_a_batch_is_named_by_index(
        n in 1usize..8,
        at in any::<prop::sample::Index>(),
        field in proptest::sample::select(REQUIRED.to_vec()),
        value in prop_oneof![Just(Value::Null), Just(json!("")), Just(json!(7)), Just(json!({"a": [1]}))],
    ) {
        let k = at.index(n);
        let mut items: Vec<Value> = (0..n).map(|_| good()).collect();
        items[k][field] = value;
        let e = parse_batch(&serde_json::to_vec(&items).unwrap()).unwrap_err();
        prop_assert!(imprecise_envelope_error(&e).is_none(), "{e}");
        let want = format!("[{k}].{field}");
        prop_assert_eq!(field_of(&e), Some(want.as_str()));
    }
}

// ---------------------------------------------------------------------------------------------
// Cron patterns and time zones
// ---------------------------------------------------------------------------------------------

const ZONES: [&str; 6] = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "Asia/Kathmandu",
];

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// Why a cron error is not precise, if it is not.
fn imprecise_time_error(e: &TimeError, input: &str) -> Option<String> {
    let message = e.to_string();
    if message.trim().is_empty() {
        return Some("empty message".into());
    }
    match e {
        TimeError::Cron { expr, reason } if !names(expr, input) || reason.trim().is_empty() => {
            Some(format!("names {expr:?} with reason {reason:?}"))
        }
        TimeError::Cron { .. } if !message.contains("cron") => Some("does not say cron".into()),
        TimeError::Zone(zone) if !names(zone, input) => Some(format!("names zone {zone:?}")),
        TimeError::NoOccurrence(expr) if !names(expr, input) => Some(format!("names {expr:?}")),
        _ if message.chars().count() > MAX_MESSAGE => Some("too long".into()),
        _ => None,
    }
}

/// Whether an error's `shown` text names `input`: the input itself, or its beginning cut with
/// `…` when the input is long.
fn names(shown: &str, input: &str) -> bool {
    shown == input
        || shown
            .strip_suffix('…')
            .is_some_and(|start| start.chars().count() >= 40 && input.starts_with(start))
}

/// The next occurrence of `expr` after each of a few instants (a DST change, a leap day, the
/// last representable years): later than the instant, or an error that says why; in bounded
/// time.
fn check_occurrences(expr: &str, tz: &str) -> Result<(), String> {
    let instants = [
        utc("2026-03-29T00:30:00Z"),
        utc("2026-10-25T00:30:00Z"),
        utc("2028-02-29T23:59:59Z"),
        utc("1970-01-01T00:00:00Z"),
        utc("4999-12-31T23:59:59Z"),
        utc("9999-12-31T23:59:59Z"),
    ];
    for after in instants {
        let started = Instant::now();
        let result = next_cron(expr, tz, after);
        if started.elapsed() > Duration::from_secs(5) {
            return Err(format!(
                "{expr:?} in {tz} after {after}: took {:?}",
                started.elapsed()
            ));
        }
        match result {
            Ok(next) if next <= after => {
                return Err(format!(
                    "{expr:?} in {tz} after {after}: {next} is not later"
                ));
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(why) = imprecise_time_error(&e, expr).or_else(|| {
                    matches!(&e, TimeError::Zone(_)).then(|| format!("zone {tz} refused"))
                }) {
                    return Err(format!("{expr:?} in {tz} after {after}: {why}: {e}"));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn the_cron_corpus_replays() {
    let mut failures = Vec::new();
    for (name, bytes) in corpus("cron") {
        let text = String::from_utf8_lossy(&bytes);
        let (known_bug, expect) = expectation(&name);
        if known_bug {
            // Parsing is quick; the next occurrence is what takes minutes.
            drop(parse_cron(&text));
            continue;
        }
        if name.ends_with(".tz") {
            let result = parse_zone(&text);
            if let Err(e) = &result
                && let Some(why) = imprecise_time_error(e, &text)
            {
                failures.push(format!("{name}: {why}"));
            }
            if (expect == "zone-ok") != result.is_ok() {
                failures.push(format!("{name}: expected {expect}, got {result:?}"));
            }
            continue;
        }
        let started = Instant::now();
        let result = parse_cron(&text);
        if started.elapsed() > Duration::from_secs(2) {
            failures.push(format!("{name}: took {:?}", started.elapsed()));
        }
        match (&result, expect) {
            (Err(e), _) => {
                if let Some(why) = imprecise_time_error(e, &text) {
                    failures.push(format!("{name}: {why}"));
                }
            }
            (Ok(_), _) => {
                // Patterns that never occur take half a second a zone to be found missing.
                let zones = if expect == "ok" {
                    &ZONES[..]
                } else {
                    &ZONES[..1]
                };
                for tz in zones {
                    if let Err(why) = check_occurrences(&text, tz) {
                        failures.push(format!("{name}: {why}"));
                    }
                }
            }
        }
        let ok = match expect {
            "ok" => result.is_ok(),
            "bad" => result.is_err(),
            "any" => true,
            other => panic!("{name}: unknown expectation `{other}`"),
        };
        if !ok {
            failures.push(format!("{name}: expected {expect}, got {result:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A cron error repeats the whole pattern it refuses, however long.
#[test]
fn a_cron_error_stays_short_for_a_huge_pattern() {
    let huge = "1,".repeat(100_000) + " * * * *";
    let e = parse_cron(&huge).unwrap_err();
    assert!(
        e.to_string().chars().count() <= MAX_MESSAGE,
        "{} characters",
        e.to_string().chars().count()
    );
}

/// One token of a cron field, hostile or not.
fn cron_token() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        0u64..70,
        Just(u64::from(u32::MAX)),
        Just(u64::from(u32::MAX) + 1),
        Just(u64::MAX),
    ];
    prop_oneof![
        Just("*".to_owned()),
        Just("?".to_owned()),
        Just("L".to_owned()),
        Just("W".to_owned()),
        number.clone().prop_map(|n| n.to_string()),
        (number.clone(), number.clone()).prop_map(|(a, b)| format!("{a}-{b}")),
        (number.clone(), number.clone(), number.clone())
            .prop_map(|(a, b, s)| format!("{a}-{b}/{s}")),
        number.clone().prop_map(|s| format!("*/{s}")),
        (number.clone(), number.clone()).prop_map(|(a, n)| format!("{a}#{n}")),
        number.clone().prop_map(|n| format!("{n}L")),
        number.prop_map(|n| format!("{n}W")),
        proptest::sample::select(vec![
            "MON", "fri", "SUN-SAT", "JAN", "dec", "FOO", "-", "/", ",", "#", "--1", "1--2", "٣",
            "１", "🦀", "\0", "'", ";--", "%", "_", "\\",
        ])
        .prop_map(str::to_owned),
    ]
}

fn cron_field() -> impl Strategy<Value = String> {
    proptest::collection::vec(cron_token(), 1..4).prop_map(|tokens| tokens.join(","))
}

fn cron_expression() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(cron_field(), 4..8),
        proptest::sample::select(vec![" ", "  ", "\t", " \u{a0}", "\n"]),
    )
        .prop_map(|(fields, sep)| fields.join(sep))
}

proptest! {
    #![proptest_config(config(256, "cron"))]

    #[test]
    fn random_cron_strings_never_panic(expr in prop_oneof![any::<String>(), "[0-9*/,\\-LW#? A-Za-z]{0,48}"]) {
        if let Err(e) = parse_cron(&expr) {
            prop_assert!(imprecise_time_error(&e, &expr).is_none(), "{e}");
        }
    }

    /// Patterns built from cron's own tokens: a pattern that parses has a next occurrence
    /// after any instant, or an error that says it has none.
    #[test]
    fn structured_cron_patterns_parse_or_say_why(
        expr in cron_expression(),
        tz in proptest::sample::select(ZONES.to_vec()),
        secs in 0i64..95_617_584_000, // 1970 to 5000
    ) {
        let started = Instant::now();
        match parse_cron(&expr) {
            Err(e) => prop_assert!(imprecise_time_error(&e, &expr).is_none(), "{e}"),
            Ok(_) => {
                let after = Utc.timestamp_opt(secs, 0).unwrap();
                match next_cron(&expr, tz, after) {
                    Ok(next) => prop_assert!(next > after, "{next} after {after}"),
                    Err(e) => prop_assert!(imprecise_time_error(&e, &expr).is_none(), "{e}"),
                }
            }
        }
        prop_assert!(started.elapsed() < Duration::from_secs(5), "{expr:?} took {:?}", started.elapsed());
    }

    #[test]
    fn any_zone_name_is_refused_by_name(tz in prop_oneof![any::<String>(), "[A-Za-z_/+\\-0-9.]{0,32}"]) {
        match parse_zone(&tz) {
            Ok(_) => prop_assert!(!tz.is_empty()),
            Err(e) => prop_assert!(imprecise_time_error(&e, &tz).is_none(), "{e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Delays and timer names
// ---------------------------------------------------------------------------------------------

fn retry_delays(s: &str) -> Result<Vec<Duration>, String> {
    let config = Config {
        retry_delays: s.to_owned(),
        ..Config::default()
    };
    config.retry_delay_list().map_err(|e| e.to_string())
}

fn retention(s: &str) -> Result<(), String> {
    let config = Config {
        archive_retention_by_kind: format!("demo.counter={s}"),
        ..Config::default()
    };
    config.retention().map(|_| ()).map_err(|e| e.to_string())
}

/// The duration corpus through the config's humantime parsers (its funnel expectations are
/// checked by the workers' `hostile_funnels`; here: no panic, and the error names the setting).
#[test]
fn the_duration_corpus_replays_through_the_config() {
    let mut failures = Vec::new();
    for (name, bytes) in corpus("duration") {
        let text = String::from_utf8_lossy(&bytes);
        match retry_delays(&text) {
            Err(e) if !e.contains("retry_delays") => failures.push(format!("{name}: {e}")),
            Ok(delays) if delays.iter().any(Duration::is_zero) => {
                failures.push(format!("{name}: a zero retry delay was accepted"));
            }
            _ => {}
        }
        if expectation(&name) == (false, "ok") && retry_delays(&text).is_err() {
            failures.push(format!("{name}: a good delay was refused"));
        }
        if let Err(e) = retention(&text)
            && !e.contains("archive_retention_by_kind")
        {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

proptest! {
    #![proptest_config(config(512, "duration"))]

    #[test]
    fn any_millisecond_count_is_a_delay_or_refused(ms in prop_oneof![any::<i64>(), -10i64..10, Just(i64::MAX), Just(i64::MIN)]) {
        match delay_from_millis(ms) {
            Ok(d) => {
                prop_assert!(ms >= 0);
                prop_assert!(d <= MAX_DELAY);
                prop_assert_eq!(d.as_millis(), u128::try_from(ms).unwrap());
            }
            Err(e) => {
                prop_assert!(ms < 0 || Duration::from_millis(ms.unsigned_abs()) > MAX_DELAY);
                prop_assert!(matches!(e, TimeError::Duration(_)));
                prop_assert!(!e.to_string().trim().is_empty());
            }
        }
    }

    #[test]
    fn any_duration_is_checked(secs in any::<u64>(), nanos in 0u32..1_000_000_000) {
        let d = Duration::new(secs, nanos);
        match check_delay(d) {
            Ok(()) => prop_assert!(d <= MAX_DELAY),
            Err(e) => {
                prop_assert!(d > MAX_DELAY);
                prop_assert!(e.to_string().contains("10 years"), "{e}");
            }
        }
    }

    /// Delay strings in the config: random, and humantime's own grammar with hostile numbers.
    #[test]
    fn any_delay_string_parses_or_names_the_setting(
        s in prop_oneof![
            any::<String>(),
            "[0-9 ]{0,30}(ns|us|ms|s|m|h|d|w|M|y|x|)",
            (any::<u64>(), proptest::sample::select(vec!["ns", "s", "m", "h", "d", "w", "y", "years", "µs", ""]))
                .prop_map(|(n, u)| format!("{n}{u}")),
        ],
    ) {
        match retry_delays(&s) {
            Ok(delays) => prop_assert!(delays.iter().all(|d| !d.is_zero())),
            Err(e) => prop_assert!(e.contains("retry_delays"), "{e}"),
        }
        if let Err(e) = retention(&s) {
            prop_assert!(e.contains("archive_retention_by_kind"), "{e}");
        }
    }

    /// Timer names and specs: a name is refused with the reason, and a spec is due later (or at
    /// its instant), never panicking on a long delay.
    #[test]
    fn timer_specs_are_checked(
        name in hostile_string(),
        ms in prop_oneof![any::<i64>(), 0i64..1_000_000],
        at in -62_135_596_800i64..253_402_300_799, // years 1 to 9999
        now in 0i64..4_102_444_800, // 1970 to 2100
    ) {
        let now = Utc.timestamp_opt(now, 0).unwrap();
        let name_ok = check_name(&name).is_ok();
        prop_assert_eq!(
            name_ok,
            !name.is_empty() && name.chars().count() <= MAX_TIMER_NAME && !name.chars().any(char::is_control)
        );
        if let Ok(d) = delay_from_millis(ms) {
            let spec = TimerSpec { name: name.clone(), when: TimerWhen::After(d) };
            match spec.first_due(now) {
                Ok(due) => prop_assert!(name_ok && due >= now),
                Err(e) => prop_assert!(!name_ok && matches!(e, TimeError::Name(_)), "{e}"),
            }
        }
        let at = Utc.timestamp_opt(at, 0).unwrap();
        let spec = TimerSpec { name, when: TimerWhen::At(at) };
        match spec.first_due(now) {
            Ok(due) => prop_assert_eq!(due, at),
            Err(e) => prop_assert!(!name_ok && !e.to_string().is_empty()),
        }
    }
}

#[test]
fn a_data_map_never_holds_a_value_the_parser_refused() {
    // `data` is kept as it came: keys with quotes and SQL survive parsing verbatim.
    let mut data = Map::new();
    for key in ["'; DROP TABLE commands;--", "%", "_", "\\", "é🦀"] {
        data.insert(key.to_owned(), json!(key));
    }
    let mut v = good();
    v["data"] = Value::Object(data.clone());
    let event = parse_value(&v).unwrap();
    assert_eq!(event.data, data);
    assert!(round_trips(&event));
    // A NUL, which jsonb cannot store, is refused where it is rather than lost later.
    data.insert("\0".to_owned(), json!(1));
    v["data"] = Value::Object(data);
    let e = parse_value(&v).unwrap_err();
    assert_eq!(field_of(&e), Some("data.\\u0000"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Bugs found by these tests and fixed since: each test keeps its bug fixed.
// ---------------------------------------------------------------------------------------------

#[test]
fn an_attribute_with_a_blank_name_is_named() {
    for name in ["", " ", "\t"] {
        let mut v = good();
        v[name] = json!(1);
        let e = parse_value(&v).unwrap_err();
        assert!(imprecise_envelope_error(&e).is_none(), "{name:?}: {e}");
    }
}

#[test]
fn a_float_in_data_is_kept_to_the_last_digit() {
    for text in [
        "-1.6354816675387925e-271",
        "2.2250738585072014e-308",
        "1.7976931348623157e308",
    ] {
        let body = format!(
            r#"{{"specversion":"1.0","id":"f","source":"s","type":"a.b","data":{{"x":{text}}}}}"#
        );
        let event = Event::parse(body.as_bytes()).unwrap();
        let again = Event::parse(&event.to_bytes()).unwrap();
        let exact: f64 = text.parse().unwrap();
        assert_eq!(event.data["x"].as_f64(), Some(exact), "{text} parsed");
        assert_eq!(
            again.data["x"].as_f64(),
            Some(exact),
            "{text} after a round trip"
        );
    }
}

/// Patterns once accepted and then searched for centuries (`,,,, * * * *`) are refused, and
/// no pattern of the corpus takes more than a second to find its next occurrence.
#[test]
fn cron_patterns_are_refused_or_answered_quickly() {
    let mut failures = Vec::new();
    for (name, bytes) in corpus("cron") {
        if name.ends_with(".tz") {
            continue;
        }
        let (_, expect) = expectation(&name);
        let text = String::from_utf8_lossy(&bytes);
        let result = parse_cron(&text);
        if expect != "any" && (expect == "bad") != result.is_err() {
            failures.push(format!("{name}: expected {expect}, got {result:?}"));
        }
        let started = Instant::now();
        let next = next_cron(&text, "UTC", utc("2026-01-01T00:00:00Z"));
        if started.elapsed() > Duration::from_secs(2) {
            failures.push(format!(
                "{name}: the next occurrence took {:?} to compute ({next:?})",
                started.elapsed()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
