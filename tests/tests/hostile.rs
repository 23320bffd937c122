//! Hostile input at the gateway, against a real gateway on real PostgreSQL and RabbitMQ: deep
//! nesting, huge fields and bodies, invalid UTF-8, SQL metacharacters in every field, path
//! traversal in ids, header injection, wrong content types, numbers out of range.
//!
//! A malformed request gets a precise 4xx with a `{code, detail}` body whose detail names the
//! problem, and leaves no trace: no row in the store, nothing published. A hostile value that
//! is valid input is accepted and kept verbatim, and the tables are still there afterwards.
//! Requests a client library refuses to send (CR in a header, conflicting lengths) go over a
//! raw TCP connection. Known product bugs are kept as `#[ignore]`d tests that say what is wrong.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_tests::{TEST_KEY, TestEnv, eventually, get, http, post};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CE: &str = "application/cloudevents+json";
const JSON: &str = "application/json";
const SQL: &str = "'; DROP TABLE commands;--";
/// A value that is valid where any text is: quotes, LIKE wildcards, backslashes, SQL.
const NASTY: &str = "'; DROP TABLE commands;-- % _ \\ \\\\ \" `";

/// The tables a request could leave a trace in.
const TABLES: [&str; 9] = [
    "commands",
    "command_events",
    "outbox",
    "unmatched_events",
    "dead_letters",
    "processed_events",
    "recent_events",
    "timers",
    "waits",
];

async fn rows(env: &TestEnv) -> Vec<(&'static str, i64)> {
    let mut counts = Vec::new();
    for table in TABLES {
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(&env.pool)
                .await
                .unwrap_or_else(|e| panic!("{table} is gone: {e}"));
        counts.push((table, n));
    }
    counts
}

/// No row anywhere, nothing waiting in the work queue.
async fn assert_no_trace(env: &TestEnv, case: &str) {
    let dirty: Vec<_> = rows(env)
        .await
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    assert!(dirty.is_empty(), "{case}: rows left in {dirty:?}");
    let depth = env.queue_depth(&env.bus.topology().work_queue()).await;
    assert_eq!(depth, 0, "{case}: {depth} messages published");
}

fn good_event() -> Value {
    json!({
        "specversion": "1.0", "id": uuid::Uuid::now_v7().to_string(), "source": "tests",
        "type": "hostile.probe", "data": {"n": 1}
    })
}

fn event_with(field: &str, value: Value) -> Vec<u8> {
    let mut ev = good_event();
    ev[field] = value;
    serde_json::to_vec(&ev).unwrap()
}

fn start_with(kind: Value, owner: Value, data: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"kind": kind, "owner": owner, "data": data})).unwrap()
}

/// `data` nested `depth` levels deep in arrays.
fn deep_arrays(depth: usize) -> Vec<u8> {
    format!(
        r#"{{"specversion":"1.0","id":"deep","source":"tests","type":"hostile.probe","data":{{"x":{}{}}}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    )
    .into_bytes()
}

/// One malformed request and what the gateway must answer.
struct Case {
    name: &'static str,
    method: &'static str,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    /// Words the detail must hold (case-insensitive): it names the problem.
    detail: &'static [&'static str],
}

fn case(
    name: &'static str,
    method: &'static str,
    path: impl Into<String>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    (status, code, detail): (u16, &'static str, &'static [&'static str]),
) -> Case {
    Case {
        name,
        method,
        path: path.into(),
        content_type,
        body,
        status,
        code,
        detail,
    }
}

fn events(
    name: &'static str,
    body: Vec<u8>,
    want: (u16, &'static str, &'static [&'static str]),
) -> Case {
    case(name, "POST", "/v1/events", Some(CE), body, want)
}

fn commands(
    name: &'static str,
    body: Vec<u8>,
    want: (u16, &'static str, &'static [&'static str]),
) -> Case {
    case(name, "POST", "/v1/commands", Some(JSON), body, want)
}

fn get_case(
    name: &'static str,
    path: impl Into<String>,
    want: (u16, &'static str, &'static [&'static str]),
) -> Case {
    case(name, "GET", path, None, Vec::new(), want)
}

const MALFORMED: (u16, &str, &[&str]) = (400, "malformed_json", &["malformed json"]);
const TOO_DEEP: (u16, &str, &[&str]) = (400, "malformed_json", &["recursion limit"]);
const OUT_OF_RANGE: (u16, &str, &[&str]) = (400, "malformed_json", &["number out of range"]);

fn cases() -> Vec<Case> {
    let uuid = uuid::Uuid::now_v7();
    let long = |n: usize| json!("x".repeat(n));
    let mut cases = vec![
        // ---- POST /v1/events: nesting, size, encoding.
        events("10,000 nested arrays in data", deep_arrays(10_000), TOO_DEEP),
        events("10,000 nested objects in data", format!(
            r#"{{"specversion":"1.0","id":"deep","source":"tests","type":"hostile.probe","data":{}1{}}}"#,
            "{\"a\":".repeat(10_000), "}".repeat(10_000)).into_bytes(), TOO_DEEP),
        events("129 nested arrays in data", deep_arrays(129), TOO_DEEP),
        events("an id of 129 characters", event_with("id", long(129)), (422, "invalid_field", &["id", "128"])),
        events("a source of 513 characters", event_with("source", long(513)), (422, "invalid_field", &["source", "512"])),
        events("a subject of 513 characters", event_with("subject", long(513)), (422, "invalid_field", &["subject", "512"])),
        events("a correlationid of 513 characters", event_with("correlationid", long(513)), (422, "invalid_field", &["correlationid", "512"])),
        events("a causationid of 513 characters", event_with("causationid", long(513)), (422, "invalid_field", &["causationid", "512"])),
        events("an event over 256 KiB", event_with("data", json!({"blob": "x".repeat(300 * 1024)})), (413, "too_large", &["262144"])),
        events("a body over 4 MiB", vec![b' '; 4 * 1024 * 1024 + 1], (413, "too_large", &["4194304"])),
        events("a batch over 4 MiB of small events", serde_json::to_vec(&vec![good_event(); 40_000]).unwrap(), (413, "too_large", &["4194304"])),
        events("invalid UTF-8 in a string", String::from_utf8(event_with("id", json!("e-#"))).unwrap().replace('#', "\u{1}").into_bytes().into_iter().map(|b| if b == 1 { 0xff } else { b }).collect(), (400, "malformed_json", &["invalid unicode code point"])),
        events("invalid UTF-8 in a key", b"{\"specversion\":\"1.0\",\"id\":\"e\",\"source\":\"s\",\"type\":\"a.b\",\"data\":{\"k\xc3(\":1}}".to_vec(), (400, "malformed_json", &["invalid unicode code point"])),
        events("a byte-order mark", [b"\xef\xbb\xbf".as_slice(), &event_with("id", json!("bom"))].concat(), MALFORMED),
        events("UTF-16", String::from_utf8(event_with("id", json!("u16"))).unwrap().encode_utf16().flat_map(u16::to_le_bytes).collect(), MALFORMED),
        events("a raw NUL in a string", br#"{"specversion":"1.0","id":"a\0b","source":"s","type":"a.b"}"#.iter().map(|&b| if b == b'\\' { 0 } else { b }).filter(|&b| b != b'0').collect(), MALFORMED),
        events("an empty body", Vec::new(), (400, "malformed_json", &["eof"])),
        events("trailing garbage", [event_with("id", json!("t")), b"; DROP TABLE commands;--".to_vec()].concat(), (400, "malformed_json", &["trailing characters"])),
        events("an empty batch", b"[]".to_vec(), (422, "invalid_field", &["events", "empty"])),
        events("a batch whose second event is bad", serde_json::to_vec(&json!([good_event(), {"specversion": "1.0", "id": "b", "source": "s", "type": SQL}])).unwrap(), (422, "invalid_field", &["[1].type"])),
        events("a batch of null", b"[null]".to_vec(), (422, "invalid_field", &["[0].event"])),
        // ---- SQL metacharacters and NULs where they are not valid.
        events("a NUL in data", event_with("data", json!({"note": {"items": ["ok", "a\u{0}b"]}})), (422, "invalid_field", &["data.note.items[1]", "nul"])),
        events("a NUL in a data key", event_with("data", json!({"k\u{0}": 1})), (422, "invalid_field", &["data.k\\u0000", "nul"])),
        events("a NUL in the id", event_with("id", json!("e\u{0}1")), (422, "invalid_field", &["id", "control characters"])),
        events("a NUL in the source", event_with("source", json!("s\u{0}")), (422, "invalid_field", &["source", "control characters"])),
        events("a NUL in an extension", event_with("tenant", json!("t\u{0}")), (422, "invalid_field", &["tenant", "nul"])),
        events("SQL in type", event_with("type", json!(SQL)), (422, "invalid_field", &["type", "not a valid name"])),
        events("SQL in specversion", event_with("specversion", json!(SQL)), (422, "invalid_field", &["specversion", "1.0"])),
        events("SQL in commandid", event_with("commandid", json!(SQL)), (422, "invalid_field", &["commandid", "uuid"])),
        events("path traversal in commandid", event_with("commandid", json!("../../etc/passwd")), (422, "invalid_field", &["commandid", "uuid"])),
        events("a NUL after a commandid", event_with("commandid", json!(format!("{uuid}\0"))), (422, "invalid_field", &["commandid", "uuid"])),
        events("SQL in time", event_with("time", json!(SQL)), (422, "invalid_field", &["time", "rfc 3339"])),
        events("SQL in datacontenttype", event_with("datacontenttype", json!(SQL)), (422, "invalid_field", &["datacontenttype", "application/json"])),
        events("CR/LF in datacontenttype", event_with("datacontenttype", json!("text/plain\r\nContent-Type: application/json")), (422, "invalid_field", &["datacontenttype"])),
        events("SQL as data", event_with("data", json!(SQL)), (422, "invalid_field", &["data", "object"])),
        events("SQL as an attribute name", event_with(SQL, json!(1)), (422, "invalid_field", &["drop table", "not a cloudevents attribute"])),
        events("an object as an extension", event_with("x", json!({"$ne": null})), (422, "invalid_field", &["x", "extension"])),
        events("binary data", event_with("data_base64", json!("AAAA")), (422, "invalid_field", &["data_base64"])),
        events("an empty source", event_with("source", json!("")), (422, "invalid_field", &["source", "empty"])),
        events("a number as id", event_with("id", json!(7)), (422, "invalid_field", &["id", "string"])),
        // ---- Numbers out of range.
        events("1e400 in data", br#"{"specversion":"1.0","id":"n","source":"s","type":"a.b","data":{"n":1e400}}"#.to_vec(), OUT_OF_RANGE),
        events("-1e400 as specversion", br#"{"specversion":-1e400,"id":"n","source":"s","type":"a.b"}"#.to_vec(), OUT_OF_RANGE),
        events("NaN in data", br#"{"specversion":"1.0","id":"n","source":"s","type":"a.b","data":{"n":NaN}}"#.to_vec(), MALFORMED),
        // ---- Content types.
        case("text/plain", "POST", "/v1/events", Some("text/plain"), event_with("id", json!("ct")), (415, "unsupported_media_type", &["text/plain", "application/cloudevents+json"])),
        case("no content type", "POST", "/v1/events", None, event_with("id", json!("ct")), (415, "unsupported_media_type", &["no content-type"])),
        case("a form", "POST", "/v1/events", Some("application/x-www-form-urlencoded"), b"specversion=1.0&type=a.b".to_vec(), (415, "unsupported_media_type", &["x-www-form-urlencoded"])),
        case("JSON declared, UTF-16 sent", "POST", "/v1/events", Some("application/json; charset=utf-16"), String::from_utf8(event_with("id", json!("u"))).unwrap().encode_utf16().flat_map(u16::to_be_bytes).collect(), MALFORMED),
        case("a content type of SQL", "POST", "/v1/events", Some(SQL), event_with("id", json!("ct")), (415, "unsupported_media_type", &["drop table"])),
        // ---- POST /v1/commands.
        commands("SQL in kind", start_with(json!(SQL), json!("member:1"), json!({})), (422, "invalid_field", &["kind", "not a valid name"])),
        commands("a NUL in kind", start_with(json!("demo.counter\0"), json!("member:1"), json!({})), (422, "invalid_field", &["kind"])),
        commands("a number as kind", start_with(json!(1e300), json!("member:1"), json!({})), (422, "invalid_field", &["kind", "string"])),
        commands("SQL as owner", start_with(json!("demo.counter"), json!(SQL), json!({})), (422, "invalid_field", &["owner", "kind:id"])),
        commands("SQL in an owner id", start_with(json!("demo.counter"), json!(format!("member:{SQL}")), json!({})), (422, "invalid_field", &["owner", "may hold only"])),
        commands("% in an owner id", start_with(json!("demo.counter"), json!("member:%"), json!({})), (422, "invalid_field", &["owner", "may hold only"])),
        commands("a backslash in an owner id", start_with(json!("demo.counter"), json!("member:a\\b"), json!({})), (422, "invalid_field", &["owner", "may hold only"])),
        commands("a NUL in an owner id", start_with(json!("demo.counter"), json!("member:1\0"), json!({})), (422, "invalid_field", &["owner", "may hold only"])),
        commands("path traversal in an owner id", start_with(json!("demo.counter"), json!("member:../../etc/passwd"), json!({})), (422, "invalid_field", &["owner", "may hold only"])),
        commands("an owner id of 129 bytes", start_with(json!("demo.counter"), json!(format!("member:{}", "x".repeat(129))), json!({})), (422, "invalid_field", &["owner", "128"])),
        commands("an owner whose kind is not a lower-case word", start_with(json!("demo.counter"), json!("Root:0"), json!({})), (422, "invalid_field", &["owner", "Root:0"])),
        commands("SQL as data", start_with(json!("demo.counter"), json!("member:1"), json!(SQL)), (422, "invalid_field", &["data", "object"])),
        commands("an unknown kind", start_with(json!("no.such"), json!("member:1"), json!({})), (422, "unknown_kind", &["no.such"])),
        commands("SQL as an extra field", serde_json::to_vec(&json!({"kind": "demo.counter", "owner": "member:1", SQL: 1})).unwrap(), (422, "invalid_field", &["drop table", "not a field"])),
        commands("10,000 nested arrays in data", format!(r#"{{"kind":"demo.counter","owner":"member:1","data":{{"x":{}{}}}}}"#, "[".repeat(10_000), "]".repeat(10_000)).into_bytes(), TOO_DEEP),
        commands("start data over 256 KiB", start_with(json!("demo.counter"), json!("member:1"), json!({"blob": "x".repeat(300 * 1024)})), (413, "too_large", &["262144"])),
        commands("1e400 in data", br#"{"kind":"demo.counter","owner":"member:1","data":{"n":1e400}}"#.to_vec(), OUT_OF_RANGE),
        commands("an array body", b"[]".to_vec(), (422, "invalid_field", &["body", "object"])),
        commands("invalid UTF-8", b"{\"kind\":\"demo.counter\",\"owner\":\"member:\xff\"}".to_vec(), MALFORMED),
        case("a command as text/plain", "POST", "/v1/commands", Some("text/plain"), start_with(json!("demo.counter"), json!("member:1"), json!({})), (415, "unsupported_media_type", &["text/plain"])),
        commands("SQL as a cron", start_with(json!("demo.timer"), json!("member:1"), json!({"cron": SQL})), (422, "invalid_field", &["data", "cron"])),
        commands("path traversal as a time zone", start_with(json!("demo.timer"), json!("member:1"), json!({"cron": "0 * * * *", "tz": "../../../../etc/passwd"})), (422, "invalid_field", &["tz", "unknown time zone"])),
        commands("a NUL in a timer name", start_with(json!("demo.timer"), json!("member:1"), json!({"name": "a\0b"})), (422, "invalid_field", &["name", "control"])),
        commands("a delay beyond u64", br#"{"kind":"demo.timer","owner":"member:1","data":{"after_ms":99999999999999999999}}"#.to_vec(), (422, "invalid_field", &["data.after_ms", "maximum"])),
        commands("a negative delay", start_with(json!("demo.timer"), json!("member:1"), json!({"after_ms": i64::MIN})), (422, "invalid_field", &["data.after_ms", "minimum of 0"])),
        commands("a delay of i64::MAX", start_with(json!("demo.timer"), json!("member:1"), json!({"after_ms": i64::MAX})), (422, "invalid_field", &["data.after_ms", "maximum"])),
        // ---- Aborts.
        case("path traversal in an abort", "POST", "/v1/commands/..%2F..%2Fetc%2Fpasswd/abort", Some(JSON), Vec::new(), (400, "bad_request", &["../../etc/passwd", "not a command id"])),
        case("an abort reason over 1,000 characters", "POST", format!("/v1/commands/{uuid}/abort"), Some(JSON), serde_json::to_vec(&json!({"reason": "x".repeat(1001)})).unwrap(), (422, "invalid_field", &["reason", "1000"])),
        case("an abort body of SQL", "POST", format!("/v1/commands/{uuid}/abort"), Some(JSON), SQL.as_bytes().to_vec(), (422, "invalid_field", &["body", "reason"])),
        // ---- Path traversal and NULs in ids.
        get_case("encoded path traversal as a command id", "/v1/commands/..%2F..%2Fetc%2Fpasswd", (400, "bad_request", &["../../etc/passwd", "not a command id"])),
        get_case("an encoded NUL as a command id", "/v1/commands/%00", (400, "bad_request", &["not a command id"])),
        get_case("a command id and a NUL", format!("/v1/commands/{uuid}%00"), (400, "bad_request", &["not a command id"])),
        get_case("SQL as a command id", "/v1/commands/%27%3B%20DROP%20TABLE%20commands%3B--", (400, "bad_request", &["drop table", "not a command id"])),
        get_case("path traversal in a history", "/v1/commands/..%2F..%2Fetc%2Fpasswd/history", (400, "bad_request", &["not a command id"])),
        get_case("path traversal in a tree", "/v1/commands/..%2F..%2Fetc%2Fpasswd/tree", (400, "bad_request", &["not a command id"])),
        get_case("a history limit beyond i64", format!("/v1/commands/{uuid}/history?limit=99999999999999999999"), (422, "invalid_field", &["query", "limit"])),
        get_case("a negative history limit", format!("/v1/commands/{uuid}/history?limit=-1"), (422, "invalid_field", &["limit", "between 1 and 1000"])),
        get_case("SQL as a history cursor", format!("/v1/commands/{uuid}/history?after=%27%3B%20DROP%20TABLE%20commands%3B--"), (422, "invalid_field", &["query", "after"])),
        get_case("encoded path traversal as an owner", "/v1/owners/..%2fadmin/feed", (400, "bad_request", &["../admin", "not an owner"])),
        get_case("path traversal in an owner id", "/v1/owners/member:..%2F..%2Fadmin/feed", (400, "bad_request", &["owner id", "may hold only"])),
        get_case("an owner and a NUL", "/v1/owners/member:1%00/feed", (400, "bad_request", &["owner id", "may hold only"])),
        get_case("SQL as an owner", "/v1/owners/%27%3B%20DROP%20TABLE%20commands%3B--/feed", (400, "bad_request", &["drop table", "not an owner"])),
        get_case("SQL as a feed cursor", "/v1/owners/member:1/feed?cursor=%27%3B%20DROP%20TABLE%20commands%3B--", (422, "invalid_field", &["cursor"])),
        get_case("a feed cursor beyond time", format!("/v1/owners/member:1/feed?cursor=9223372036854775807_{uuid}"), (422, "invalid_field", &["cursor"])),
        get_case("a feed limit of 0", "/v1/owners/member:1/feed?limit=0", (422, "invalid_field", &["limit", "between 1 and 100"])),
        get_case("a feed flag that is not a boolean", "/v1/owners/member:1/feed?include_archived=%27", (422, "invalid_field", &["query", "include_archived"])),
        case("path traversal as a message id", "POST", "/v1/owners/member:1/messages/..%2F..%2Fx/read", None, Vec::new(), (400, "bad_request", &["message id", "uuid"])),
        get_case("an unmatched limit of 1e400", "/v1/events/unmatched?limit=1e400", (422, "invalid_field", &["query", "limit"])),
        get_case("SQL as a dead-letter state", "/v1/dead-letters?state=%27%3B%20DROP%20TABLE%20commands%3B--", (422, "invalid_field", &["state", "drop table"])),
        get_case("a dead-letter time that is not one", "/v1/dead-letters?since=%27%3B--", (422, "invalid_field", &["query", "since"])),
        case("POST to a command", "POST", format!("/v1/commands/{uuid}"), Some(JSON), b"{}".to_vec(), (405, "method_not_allowed", &["method"])),
    ];
    // Every free-text envelope field with a NUL (a control character) is refused by name.
    for field in ["id", "source", "subject", "correlationid", "causationid"] {
        let name: &'static str = Box::leak(format!("a NUL in {field}").into_boxed_str());
        let want: &'static [&'static str] =
            Box::leak(vec![field, "control characters"].into_boxed_slice());
        cases.push(events(
            name,
            event_with(field, json!(format!("a\0{SQL}"))),
            (422, "invalid_field", want),
        ));
    }
    cases
}

/// Sends `c` through reqwest; returns (status, body).
async fn send(base: &str, c: &Case) -> (u16, Value) {
    let client = http();
    let url = format!("{base}{}", c.path);
    let mut request = match c.method {
        "GET" => client.get(&url),
        _ => client.post(&url),
    };
    if let Some(ct) = c.content_type {
        request = request.header("content-type", ct);
    }
    let response = request.body(c.body.clone()).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Whether `body` is a `{code, detail}` answer with `code` whose detail holds every word.
fn precise(body: &Value, code: &str, words: &[&str]) -> Result<(), String> {
    let detail = body["detail"].as_str().unwrap_or_default();
    if body["code"] != code {
        return Err(format!("code {} instead of {code}", body["code"]));
    }
    if detail.trim().is_empty() {
        return Err("an empty detail".into());
    }
    let lower = detail.to_lowercase();
    let missing: Vec<_> = words
        .iter()
        .filter(|w| !lower.contains(&w.to_lowercase()))
        .collect();
    if !missing.is_empty() {
        return Err(format!("the detail lacks {missing:?}"));
    }
    Ok(())
}

#[tokio::test]
async fn malformed_requests_get_a_precise_4xx_and_leave_no_trace() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    let mut failures = Vec::new();
    for c in cases() {
        let (status, body) = send(&gw.url, &c).await;
        if status != c.status {
            failures.push(format!(
                "{}: {status} instead of {}: {body}",
                c.name, c.status
            ));
        } else if let Err(why) = precise(&body, c.code, c.detail) {
            failures.push(format!("{}: {why}: {body}", c.name));
        }
        assert_no_trace(&env, c.name).await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    env.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1: what a client library refuses to send
// ---------------------------------------------------------------------------------------------

/// An HTTP/1.1 answer read off a raw connection.
struct RawAnswer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawAnswer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Writes `request` (head and body, as given) to the gateway and reads the first answer.
async fn raw(base: &str, request: &[u8]) -> RawAnswer {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it has read everything: a failed write is fine.
    drop(stream.write_all(request).await);
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            if complete(&answer) {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok() || !answer.is_empty(), "no answer in 15 s");
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(answer.len());
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = answer.get(split + 4..).unwrap_or_default().to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    RawAnswer { status, head, body }
}

/// Whether `answer` holds a whole response (by its content-length, or a final chunk).
fn complete(answer: &[u8]) -> bool {
    let Some(split) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
    let body = &answer[split + 4..];
    if let Some(n) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok())
    {
        return body.len() >= n;
    }
    head.contains("chunked") && body.ends_with(b"0\r\n\r\n")
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = body.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&body[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = end + 2;
        out.extend_from_slice(&body[start..(start + size).min(body.len())]);
        body = body.get(start + size + 2..).unwrap_or_default();
    }
    out
}

/// A request head with the test key, `extra` header lines (each ending in CRLF), and a body.
fn request(method: &str, path: &str, extra: &[u8], body: &[u8]) -> Vec<u8> {
    [
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TEST_KEY}\r\nConnection: close\r\n").as_bytes(),
        extra,
        format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes(),
        body,
    ]
    .concat()
}

/// What the gateway must answer to a raw request.
enum Want {
    /// A `{code, detail}` answer from the gateway.
    Json(u16, &'static str, &'static [&'static str]),
    /// Refused by the HTTP parser, before the gateway's code runs: a bare 4xx.
    Protocol(u16),
}

#[tokio::test]
async fn raw_protocol_abuse_gets_a_4xx_and_leaves_no_trace() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    let body = event_with("id", json!("raw"));
    let ce = format!("Content-Type: {CE}\r\n");
    let cases: Vec<(&str, Vec<u8>, Want)> = vec![
        (
            "a bare CR in the content type",
            request("POST", "/v1/events", b"Content-Type: application/json\rX-Injected: 1\r\n", &body),
            Want::Protocol(400),
        ),
        (
            "a NUL in the content type",
            request("POST", "/v1/events", b"Content-Type: application/json\0\r\n", &body),
            Want::Protocol(400),
        ),
        (
            "CR/LF injected into a ce-* header",
            request("POST", "/v1/events", format!("{ce}ce-id: a\rce-type: command.abort\r\n").as_bytes(), b"{}"),
            Want::Protocol(400),
        ),
        (
            "a header name with a space",
            request("POST", "/v1/events", format!("{ce}Bad Header: 1\r\n").as_bytes(), &body),
            Want::Protocol(400),
        ),
        (
            "a 1 MiB header",
            request("POST", "/v1/events", format!("{ce}X-Pad: {}\r\n", "a".repeat(1024 * 1024)).as_bytes(), &body),
            Want::Protocol(431),
        ),
        (
            "500 headers",
            request("POST", "/v1/events", format!("{ce}{}", "X-H: 1\r\n".repeat(500)).as_bytes(), &body),
            Want::Protocol(431),
        ),
        (
            "two different content lengths",
            [
                format!("POST /v1/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TEST_KEY}\r\n{ce}Content-Length: 2\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(),
                &body,
            ]
            .concat(),
            Want::Protocol(400),
        ),
        (
            "raw bytes above ASCII in the path",
            [
                b"GET /v1/commands/\xff\xfe HTTP/1.1\r\nHost: localhost\r\n".as_slice(),
                format!("Authorization: Bearer {TEST_KEY}\r\nConnection: close\r\n\r\n").as_bytes(),
            ]
            .concat(),
            Want::Protocol(400),
        ),
        (
            "literal path traversal",
            request("GET", "/v1/commands/../../etc/passwd", b"", b""),
            Want::Json(404, "not_found", &["no such endpoint"]),
        ),
        (
            "a wrong content type with a CR/LF-free injection attempt",
            request("POST", "/v1/events", b"Content-Type: text/html; x=application/json\r\n", &body),
            Want::Json(415, "unsupported_media_type", &["text/html"]),
        ),
        (
            "a chunked body over 4 MiB",
            {
                let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
                [
                    format!("POST /v1/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TEST_KEY}\r\nConnection: close\r\n{ce}Transfer-Encoding: chunked\r\n\r\n").as_bytes(),
                    chunk.repeat(65).as_bytes(),
                    b"0\r\n\r\n",
                ]
                .concat()
            },
            Want::Json(413, "too_large", &["too large"]),
        ),
    ];
    let mut failures = Vec::new();
    for (name, bytes, want) in cases {
        let answer = raw(&gw.url, &bytes).await;
        match want {
            Want::Json(status, code, words) => {
                if answer.status != status {
                    failures.push(format!(
                        "{name}: {} instead of {status}: {}",
                        answer.status, answer.head
                    ));
                } else if let Err(why) = precise(&answer.json(), code, words) {
                    failures.push(format!(
                        "{name}: {why}: {}",
                        String::from_utf8_lossy(&answer.body)
                    ));
                }
            }
            Want::Protocol(status) => {
                if answer.status != status {
                    failures.push(format!(
                        "{name}: {} instead of {status}: {}",
                        answer.status, answer.head
                    ));
                }
            }
        }
        assert_no_trace(&env, name).await;
    }
    // A smuggling attempt: a length and a chunked body that hides a second request. Whatever
    // the parser makes of it, nothing is published.
    let smuggle = [
        format!("POST /v1/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TEST_KEY}\r\n{ce}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").as_bytes(),
        &request("POST", "/v1/events", ce.as_bytes(), &body),
    ]
    .concat();
    let answer = raw(&gw.url, &smuggle).await;
    assert!(
        (400..500).contains(&answer.status),
        "smuggling: {}",
        answer.head
    );
    assert_no_trace(&env, "smuggling").await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    env.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Valid hostile values: accepted, kept verbatim, and the tables are intact
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn hostile_but_valid_values_are_kept_verbatim() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;

    // A command whose owner uses every owner-id punctuation (a LIKE wildcard among them) and
    // whose data holds SQL, quotes, wildcards, backslashes and unicode, in keys and values.
    let owner = "member:a_b.c@d+e-f";
    let data = json!({
        NASTY: NASTY, "%": "_", "_": "%", "\\": "\\\\", "'": "''",
        "unicode": "é🦀\u{202e}\u{feff}", "nested": {"a": [SQL, 1, -0.5, true, null]},
        "big": i64::MAX, "small": i64::MIN,
    });
    let id = cmdflow_tests::start_command(&gw.url, "demo.counter", owner, data.clone()).await;
    let command = eventually(Duration::from_secs(30), "the command", || async {
        let (status, body) = get(&format!("{}/v1/commands/{id}", gw.url)).await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(command["owner"], owner);
    let mut expected = data.as_object().unwrap().clone();
    expected.insert("count".into(), json!(0));
    assert_eq!(command["data"], Value::Object(expected));

    // A broadcast event with hostile text in every free field: kept as unmatched, verbatim.
    let ev = json!({
        "specversion": "1.0", "id": format!("{NASTY} {}", uuid::Uuid::now_v7()), "source": NASTY,
        "type": "hostile.probe", "subject": NASTY, "correlationid": NASTY, "causationid": NASTY,
        "x": NASTY, "data": data,
    });
    let (status, body) = post(
        &format!("{}/v1/events", gw.url),
        CE,
        &serde_json::to_vec(&ev).unwrap(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let row = eventually(Duration::from_secs(30), "the unmatched event", || async {
        let (_, body) = get(&format!(
            "{}/v1/events/unmatched?type=hostile.probe",
            gw.url
        ))
        .await;
        body["events"].as_array().and_then(|e| e.first().cloned())
    })
    .await;
    assert_eq!(row["source"], NASTY);
    assert_eq!(row["event_id"], ev["id"]);
    assert_eq!(row["correlation_key"], NASTY);
    let kept = &row["body"];
    for field in [
        "id",
        "source",
        "subject",
        "correlationid",
        "causationid",
        "x",
        "data",
    ] {
        assert_eq!(kept[field], ev[field], "{field}");
    }

    // Filters that hold SQL and wildcards match nothing, and break nothing.
    for path in [
        "/v1/events/unmatched?type=%27%3B%20DROP%20TABLE%20commands%3B--".to_owned(),
        "/v1/events/unmatched?type=%25".to_owned(),
        "/v1/dead-letters?owner=%27%3B%20DROP%20TABLE%20dead_letters%3B--&kind=%25&funnel=_"
            .to_owned(),
        "/v1/dead-letters/groups?type=%25".to_owned(),
    ] {
        let (status, body) = get(&format!("{}{path}", gw.url)).await;
        assert_eq!(status, 200, "{path}: {body}");
        let items = body["events"]
            .as_array()
            .or(body["dead_letters"].as_array())
            .or(body["groups"].as_array());
        assert!(items.is_some_and(Vec::is_empty), "{path}: {body}");
    }
    // `_` is a LIKE wildcard: the feed of `member:_` is not the feed of `member:a_b…`.
    let (status, feed) = get(&format!("{}/v1/owners/member:_/feed", gw.url)).await;
    assert_eq!(status, 200, "{feed}");
    assert_eq!(feed["history"], json!([]), "{feed}");
    let (_, feed) = get(&format!("{}/v1/owners/{owner}/feed", gw.url)).await;
    assert_eq!(feed["history"].as_array().map(Vec::len), Some(1), "{feed}");

    // Every table is still there.
    let counts = rows(&env).await;
    assert!(
        counts.iter().any(|(t, n)| *t == "commands" && *n == 1),
        "{counts:?}"
    );
    env.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Known product bugs
// ---------------------------------------------------------------------------------------------

/// Posts `body` to the events endpoint of a fresh gateway (no worker) and returns the answer,
/// whether anything was published.
async fn post_alone(path: &str, content_type: &str, body: &[u8]) -> (u16, Value, bool) {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    let (status, answer) = post(&format!("{}{path}", gw.url), content_type, body).await;
    let depth = env.queue_depth(&env.bus.topology().work_queue()).await;
    env.cleanup().await;
    (status, answer, depth > 0)
}

#[tokio::test]
async fn duplicate_keys_are_refused() {
    let g = r#""specversion":"1.0","id":"dup","source":"s","data":{}"#;
    for (path, ct, body) in [
        (
            "/v1/events",
            CE,
            format!(r#"{{{g},"type":"quote.requested","type":"command.abort"}}"#),
        ),
        (
            "/v1/events",
            CE,
            format!(
                r#"{{{g},"type":"a.b","commandid":"0192f0c1-7a3b-7c2d-9e4f-5a6b7c8d9e0f","commandid":null}}"#
            ),
        ),
        (
            "/v1/commands",
            JSON,
            r#"{"kind":"demo.counter","owner":"Pirate:1","owner":"member:1"}"#.to_owned(),
        ),
    ] {
        let (status, answer, published) = post_alone(path, ct, body.as_bytes()).await;
        assert!((400..500).contains(&status), "{body}: {status} {answer}");
        assert!(!published, "{body}: published");
    }
}

#[tokio::test]
async fn a_blank_attribute_name_is_named() {
    let (status, answer, published) = post_alone("/v1/events", CE, &event_with("", json!(1))).await;
    assert_eq!(status, 422, "{answer}");
    assert!(!published);
    let detail = answer["detail"].as_str().unwrap_or_default();
    assert!(
        !detail.starts_with(':'),
        "the detail names no attribute: {detail:?}"
    );
}

#[tokio::test]
async fn an_undecodable_path_segment_is_named() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    let (status, answer) = get(&format!("{}/v1/commands/%ff%fe", gw.url)).await;
    env.cleanup().await;
    assert_eq!(status, 400, "{answer}");
    assert_ne!(answer["detail"], "Bad Request", "{answer}");
}

/// Starts `data` as `kind` and waits for the command: its data, or the reason it never came.
async fn start_and_read(kind: &str, data: Value) -> Result<Value, String> {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let body = start_with(json!(kind), json!("member:1"), data);
    let (status, answer) = post(&format!("{}/v1/commands", gw.url), JSON, &body).await;
    let result = if status != 202 {
        Err(format!("refused with {status}: {answer}"))
    } else {
        let id = answer["command_id"].as_str().unwrap().to_owned();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, command) = get(&format!("{}/v1/commands/{id}", gw.url)).await;
            if status == 200 {
                break Ok(command["data"].clone());
            }
            if let Some(dead) = env.dead_letter_after(0).await {
                break Err(format!(
                    "accepted (202), then dead-lettered: {}",
                    dead.reason
                ));
            }
            if std::time::Instant::now() > deadline {
                break Err("accepted (202), and never stored".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    env.cleanup().await;
    result
}

#[tokio::test]
async fn a_nul_in_command_data_is_refused_or_kept() {
    let data = json!({"note": "a\u{0}b"});
    match start_and_read("demo.counter", data.clone()).await {
        Ok(kept) => assert_eq!(kept["note"], data["note"]),
        Err(why) => assert!(why.starts_with("refused with 422"), "{why}"),
    }
}

#[tokio::test]
async fn a_nul_in_a_wait_key_is_refused_or_kept() {
    let data = json!({"type": "special.clicked", "key": "member:1\u{0}"});
    match start_and_read("demo.wait", data).await {
        Ok(_) => {}
        Err(why) => assert!(why.starts_with("refused with 422"), "{why}"),
    }
}

/// 64-bit integers and floats come back exactly as sent, through jsonb and back. (An integer
/// beyond 64 bits is kept as the nearest double, as JavaScript's JSON does.)
#[tokio::test]
async fn numbers_in_data_are_kept_exactly() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let body = br#"{"kind":"demo.counter","owner":"member:1","data":{"max":18446744073709551615,"min":-9223372036854775808,"f":-1.6354816675387925e-271,"g":2.2250738585072014e-308,"h":0.30000000000000004}}"#;
    let (status, answer) = post(&format!("{}/v1/commands", gw.url), JSON, body).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["command_id"].as_str().unwrap().to_owned();
    let data = eventually(Duration::from_secs(20), "the command", || async {
        let (status, command) = get(&format!("{}/v1/commands/{id}", gw.url)).await;
        (status == 200).then(|| command["data"].clone())
    })
    .await;
    env.cleanup().await;
    assert_eq!(data["max"].as_u64(), Some(u64::MAX), "{data}");
    assert_eq!(data["min"].as_i64(), Some(i64::MIN), "{data}");
    for (key, text) in [
        ("f", "-1.6354816675387925e-271"),
        ("g", "2.2250738585072014e-308"),
        ("h", "0.30000000000000004"),
    ] {
        let exact: f64 = text.parse().unwrap();
        assert_eq!(data[key].as_f64(), Some(exact), "{key}: {data}");
    }
}
