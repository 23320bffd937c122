//! Hostile input for the funnel-definition loader and the timer specs of the built-in kinds.
//!
//! The loader must never panic, and every error must name the file, the funnel and the field,
//! with a reason. Inputs: the regression corpus `tests/corpus/funnel/` (whole files; the first
//! comment lines `# expect-field: …` and `# expect-reason: …` say what the error must name),
//! `tests/corpus/duration/` (each delay put where a funnel takes one) and `tests/corpus/cron/`
//! (through `demo.timer`'s start-data check), all replayed on every run; and proptest-generated
//! files — random text, byte-damaged valid files, one field of a valid definition perturbed,
//! random stage graphs. Proptest keeps the seeds of failures in
//! `tests/corpus/funnel/proptest-seeds.txt` and replays them first.

#![allow(clippy::unwrap_used)]

#[path = "../../../tests/corpus/replay.rs"]
mod replay;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cmdflow_workers::Registry;
use cmdflow_workers::flows::{self, FlowDef, FlowError};
use cmdflow_workers::messages::Templates;
use proptest::prelude::*;
use proptest::test_runner::{FailurePersistence, FileFailurePersistence};
use replay::{corpus, expectation};
use serde_json::{Map, Value, json};

const OK: &str = r#"version = 1
name = "t"
title = "T"
start_on = "lead.created"
initial = "a"
final = ["b"]
[[stages]]
name = "a"
on_enter = [{ send = { template = "funnel_welcome" } }]
after = [{ delay = "3d", actions = [{ send = { template = "funnel_nudge" } }] }]
transitions = [{ on = "lead.converted", to = "b" }]
[[stages]]
name = "b"
"#;

/// The longest error a loader may produce, whatever the file: it is logged at start-up.
const MAX_MESSAGE: usize = 1000;

/// The example kinds and templates, without the funnels: what a funnel file is checked against.
fn examples() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut registry = Registry::new();
        cmdflow_demo::install_kinds(&mut registry).unwrap();
        registry
    })
}

fn kinds() -> BTreeSet<String> {
    examples().kinds().map(str::to_owned).collect()
}

fn templates() -> &'static Templates {
    examples().templates()
}

fn parse(text: &str) -> Result<FlowDef, FlowError> {
    static KINDS: OnceLock<BTreeSet<String>> = OnceLock::new();
    FlowDef::parse(
        "funnels/hostile.toml",
        text,
        templates(),
        KINDS.get_or_init(kinds),
    )
}

/// Loads every funnel file of `dir`, as a worker does at start-up.
fn load(dir: &Path) -> Result<Vec<FlowDef>, FlowError> {
    flows::read_dir(dir).and_then(|files| flows::parse_all(&files, templates(), &kinds()))
}

/// `demo.timer`'s start-data check, as the gateway and the worker run it: `field: reason`,
/// the field without its `data.` prefix.
fn check_timer(data: &Map<String, Value>) -> Result<(), String> {
    check_start("demo.timer", data)
}

fn check_wait(data: &Map<String, Value>) -> Result<(), String> {
    check_start("demo.wait", data)
}

fn check_start(kind: &str, data: &Map<String, Value>) -> Result<(), String> {
    examples().check_start(kind, data).map_err(|v| {
        let field = v.field.strip_prefix("data.").unwrap_or(&v.field);
        format!("{field}: {}", v.reason)
    })
}

/// Why `e` is not a precise error, if it is not. `file` is the path it must name.
fn imprecise(e: &FlowError, file: &str) -> Option<String> {
    let message = e.to_string();
    if e.file != file {
        return Some(format!("names file {:?}", e.file));
    }
    if e.field.trim().is_empty() {
        return Some("names no field".into());
    }
    if e.reason.trim().is_empty() {
        return Some(format!("{}: no reason", e.field));
    }
    if !message.contains(&e.field) || !message.contains(&e.reason) {
        return Some("the message leaves out the field or the reason".into());
    }
    if let Some(span) = e.field.strip_prefix("bytes ") {
        // A TOML error points into the file.
        let ok = span
            .split_once("..")
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
            .is_some_and(|(a, b)| a <= b);
        if !ok {
            return Some(format!("a span {span:?}"));
        }
    }
    None
}

/// The message stays short, whatever the size of the file.
fn too_long(e: &FlowError) -> Option<String> {
    let n = e.to_string().chars().count();
    (n > MAX_MESSAGE).then(|| format!("a {n}-character message"))
}

/// A failure report keeps its first characters.
fn clip(s: &str) -> String {
    cmdflow_shared::contract::clip_to(s, 300)
}

fn seeds() -> Option<Box<dyn FailurePersistence>> {
    Some(Box::new(FileFailurePersistence::Direct(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/corpus/funnel/proptest-seeds.txt"
    ))))
}

/// A fresh directory of its own under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "cmdflow-hostile-funnels-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        drop(std::fs::remove_dir_all(&self.0));
    }
}

/// The `# expect-field:` and `# expect-reason:` lines at the top of a corpus file.
fn expected(bytes: &[u8], key: &str) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .find_map(|l| l.strip_prefix(&format!("# {key}: ")).map(str::to_owned))
}

#[test]
fn the_funnel_corpus_replays_through_the_loader() {
    let mut failures = Vec::new();
    for (name, bytes) in corpus("funnel") {
        // Each file alone in a directory, loaded as the worker loads them at start-up.
        let dir = TempDir::new();
        let path = dir.path().join(&name);
        std::fs::write(&path, &bytes).unwrap();
        let started = Instant::now();
        let result = load(dir.path());
        if started.elapsed() > Duration::from_secs(2) {
            failures.push(format!("{name}: took {:?}", started.elapsed()));
        }
        let (known_bug, expect) = expectation(&name);
        if known_bug {
            continue;
        }
        let file = path.display().to_string();
        match (&result, expect) {
            (Ok(defs), "ok") => {
                if defs.len() != 1 {
                    failures.push(format!("{name}: {} definitions", defs.len()));
                }
            }
            (Err(e), "bad") => {
                // A file that cannot be read is named by its directory.
                let named = if e.field == "-" {
                    dir.path().display().to_string()
                } else {
                    file.clone()
                };
                if let Some(why) = imprecise(e, &named).or_else(|| too_long(e)) {
                    failures.push(format!("{name}: {why}: {}", clip(&e.to_string())));
                }
                if let Some(field) = expected(&bytes, "expect-field")
                    && !e.field.starts_with(&field)
                {
                    failures.push(format!("{name}: names field {:?}, not {field:?}", e.field));
                }
                if let Some(reason) = expected(&bytes, "expect-reason")
                    && !e.reason.contains(&reason)
                {
                    failures.push(format!("{name}: reason {:?} lacks {reason:?}", e.reason));
                }
            }
            (result, expect) => failures.push(format!(
                "{name}: expected {expect}, got {}",
                clip(&format!("{result:?}"))
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn two_files_of_one_funnel_are_refused_by_name() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("a.toml"), OK).unwrap();
    std::fs::write(dir.path().join("b.toml"), OK).unwrap();
    // Not a TOML file: skipped, whatever it holds.
    std::fs::write(dir.path().join("c.txt"), b"\xff\xfe garbage").unwrap();
    let e = load(dir.path()).unwrap_err();
    assert_eq!(e.field, "name", "{e}");
    assert!(e.reason.contains("same name"), "{e}");
    assert!(e.file.ends_with("b.toml"), "{e}");
}

#[test]
fn a_missing_directory_is_named() {
    let dir = TempDir::new();
    let gone = dir.path().join("no/such/dir");
    let e = load(&gone).unwrap_err();
    assert!(imprecise(&e, &gone.display().to_string()).is_none(), "{e}");
}

#[test]
fn a_funnel_name_in_an_error_is_clipped() {
    // The name is checked (and clipped to 64 characters in the reason) …
    let huge = "t".repeat(100_000);
    let e = parse(&OK.replace("name = \"t\"", &format!("name = \"{huge}\""))).unwrap_err();
    assert_eq!(e.field, "name");
    assert!(e.reason.chars().count() < MAX_MESSAGE, "{}", e.reason);
}

#[test]
fn a_funnel_error_stays_short_for_a_huge_name() {
    let huge = "t".repeat(100_000);
    let e = parse(&OK.replace("name = \"t\"", &format!("name = \"{huge}\""))).unwrap_err();
    assert!(too_long(&e).is_none(), "{}", clip(&e.to_string()));
}

// ---------------------------------------------------------------------------------------------
// Delays: every place a funnel takes one
// ---------------------------------------------------------------------------------------------

/// `OK` with `delay` (TOML-quoted) where a funnel takes a delay, and the field that names it.
fn with_delay(place: usize, delay: &str) -> (String, &'static str) {
    let quoted = toml::Value::String(delay.to_owned()).to_string();
    let welcome = r#"{ send = { template = "funnel_welcome" } }"#;
    match place {
        0 => (
            OK.replace("\"3d\"", &quoted),
            "stages[0] (a).after[0].delay",
        ),
        1 => (
            OK.replace(
                welcome,
                &format!("{{ timer = {{ name = \"x\", after = {quoted} }} }}"),
            ),
            "stages[0] (a).on_enter[0]",
        ),
        _ => (
            OK.replace(
                welcome,
                &format!("{{ wait = {{ type = \"a.b\", timeout = {quoted} }} }}"),
            ),
            "stages[0] (a).on_enter[0]",
        ),
    }
}

#[test]
fn the_duration_corpus_replays_in_funnels() {
    let mut failures = Vec::new();
    for (name, bytes) in corpus("duration") {
        let (known_bug, expect) = expectation(&name);
        let delay = String::from_utf8_lossy(&bytes);
        for place in 0..3 {
            let (text, field) = with_delay(place, &delay);
            let result = parse(&text);
            if known_bug {
                continue;
            }
            match (&result, expect) {
                (Ok(_), "ok" | "any") => {}
                (Err(e), "bad" | "any") => {
                    if let Some(why) = imprecise(e, "funnels/hostile.toml") {
                        failures.push(format!("{name} at {place}: {why}: {e}"));
                    }
                    if e.field != field {
                        failures.push(format!("{name} at {place}: names {:?}: {e}", e.field));
                    }
                }
                (result, expect) => failures.push(format!(
                    "{name} at {place}: expected {expect}, got {}",
                    clip(&format!("{result:?}"))
                )),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Timer specs in start data: `demo.timer` and `demo.wait`
// ---------------------------------------------------------------------------------------------

const TIMER_FIELDS: [&str; 6] = ["after_ms", "at", "cron", "tz", "name", "times"];

#[test]
fn the_cron_corpus_replays_through_the_timer_check() {
    let mut failures = Vec::new();
    for (name, bytes) in corpus("cron") {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let data = if name.ends_with(".tz") {
            json!({"cron": "0 0 * * *", "tz": text})
        } else {
            json!({"cron": text})
        };
        let result = check_timer(data.as_object().unwrap());
        let (known_bug, expect) = expectation(&name);
        if let Err(e) = &result
            && !(e.starts_with("cron: ") || e.starts_with("tz: "))
        {
            failures.push(format!("{name}: {e}"));
        }
        let ok = match expect {
            _ if known_bug => true,
            "ok" | "zone-ok" => result.is_ok(),
            "bad" | "zone-bad" => result.is_err(),
            _ => true,
        };
        if !ok {
            failures.push(format!("{name}: expected {expect}, got {result:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_timer_check_refuses_a_cron_that_never_occurs() {
    for expr in ["0 0 31 2 *", "0 0 30 2 *", ",,,, * * * *"] {
        let result = check_timer(json!({"cron": expr}).as_object().unwrap());
        assert!(result.is_err(), "{expr:?} was accepted");
    }
}

fn hostile_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e20f64..1e20).prop_map(Value::from),
        hostile_string().prop_map(Value::String),
        Just(json!([1, "a"])),
        Just(json!({"$ne": null})),
    ]
}

fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\PC{0,40}",
        proptest::sample::select(vec![
            "",
            "0 * * * *",
            "*/0 * * * *",
            ",,,,,",
            "Europe/Berlin",
            "../../etc/passwd",
            "2026-11-26T10:00:00Z",
            "9999-12-31T23:59:59Z",
            "'; DROP TABLE commands;--",
            "\0",
            "%_\\",
            "a.b",
            "\r\n",
        ])
        .prop_map(str::to_owned),
        (
            proptest::sample::select(vec!['n', 'é', '🦀']),
            120usize..140
        )
            .prop_map(|(c, n)| c.to_string().repeat(n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: seeds(), ..ProptestConfig::default() })]

    /// Any start data: accepted, or refused with the field named first.
    #[test]
    fn timer_start_data_is_checked_field_by_field(
        fields in proptest::collection::btree_map(proptest::sample::select(TIMER_FIELDS.to_vec()), hostile_json(), 0..5),
    ) {
        let data: Map<String, Value> = fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        if let Err(e) = check_timer(&data) {
            prop_assert!(TIMER_FIELDS.iter().any(|f| e.starts_with(f)), "{e}");
            prop_assert!(e.chars().count() > 10, "{e}");
        }
    }

    #[test]
    fn wait_start_data_is_checked_field_by_field(
        ty in prop_oneof![Just(json!("special.clicked")), hostile_json()],
        key in prop_oneof![Just(json!("member:42")), hostile_json()],
        timeout in hostile_json(),
    ) {
        let data = json!({"type": ty, "key": key, "timeout_ms": timeout});
        if let Err(e) = check_wait(data.as_object().unwrap()) {
            prop_assert!(["type", "key", "timeout_ms"].iter().any(|f| e.starts_with(f)), "{e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Generated funnel files
// ---------------------------------------------------------------------------------------------

/// A hostile TOML value for one field.
fn hostile_toml() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        hostile_string().prop_map(toml::Value::String),
        any::<i64>().prop_map(toml::Value::Integer),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(2),
            Just(-1),
            Just(i64::from(u32::MAX) + 1)
        ]
        .prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        proptest::sample::select(vec![
            "a",
            "b",
            "t",
            "lead.created",
            "3d",
            "0s",
            "funnel_nudge"
        ])
        .prop_map(|s| toml::Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(toml::Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

/// Every path to a value in `v`, as keys and indexes.
fn paths(v: &toml::Value, prefix: &mut Vec<PathPart>, out: &mut Vec<Vec<PathPart>>) {
    match v {
        toml::Value::Table(t) => {
            for (k, child) in t {
                prefix.push(PathPart::Key(k.clone()));
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        toml::Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                prefix.push(PathPart::Index(i));
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum PathPart {
    Key(String),
    Index(usize),
}

fn at_path<'a>(v: &'a mut toml::Value, path: &[PathPart]) -> Option<&'a mut toml::Value> {
    let mut v = v;
    for part in path {
        v = match (part, v) {
            (PathPart::Key(k), toml::Value::Table(t)) => t.get_mut(k)?,
            (PathPart::Index(i), toml::Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(v)
}

#[derive(Debug, Clone)]
enum Edit {
    Replace(toml::Value),
    Remove,
    AddKey(String, toml::Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => hostile_toml().prop_map(Edit::Replace),
        1 => Just(Edit::Remove),
        1 => ("[a-z_]{1,12}", hostile_toml()).prop_map(|(k, v)| Edit::AddKey(k, v)),
    ]
}

fn a_rich_definition() -> toml::Value {
    let text = OK.replace(
        r#"transitions = [{ on = "lead.converted", to = "b" }]"#,
        r#"transitions = [{ on = "lead.converted", to = "b", guard = { path = "plan", equals = "gold" } }, { on = "lead.pinged", to = "a" }]
ui = { code = "x.y", text = "z" }"#,
    )
    .replace(
        r#"on_enter = [{ send = { template = "funnel_welcome" } }]"#,
        r#"on_enter = [{ send = { template = "funnel_welcome", email = true } }, { timer = { name = "x", after = "1h" } }, { cancel_timer = { name = "x" } }, { wait = { type = "a.b", timeout = "5m" } }, { spawn = { kind = "membership", data = { k = 1 } } }]"#,
    );
    toml::from_str(&text).unwrap()
}

/// A random funnel graph: `n` stages, each with transitions to some others, some final.
fn a_graph() -> impl Strategy<Value = (usize, Vec<Vec<usize>>, Vec<bool>)> {
    (1usize..24).prop_flat_map(|n| {
        (
            Just(n),
            proptest::collection::vec(proptest::collection::vec(0..n, 0..3), n),
            proptest::collection::vec(proptest::bool::weighted(0.3), n),
        )
    })
}

fn graph_text(n: usize, edges: &[Vec<usize>], finals: &[bool]) -> String {
    let finals: Vec<String> = (0..n)
        .filter(|&i| finals[i])
        .map(|i| format!("\"s{i}\""))
        .collect();
    let mut text = format!(
        "version = 1\nname = \"g\"\ntitle = \"G\"\nstart_on = \"lead.created\"\ninitial = \"s0\"\nfinal = [{}]\n",
        finals.join(", ")
    );
    for (i, out) in edges.iter().enumerate() {
        let transitions: Vec<String> = out
            .iter()
            .enumerate()
            .map(|(j, to)| format!("{{ on = \"e{i}.t{j}\", to = \"s{to}\" }}"))
            .collect();
        text.push_str(&format!(
            "[[stages]]\nname = \"s{i}\"\ntransitions = [{}]\n",
            transitions.join(", ")
        ));
    }
    text
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: seeds(), ..ProptestConfig::default() })]

    #[test]
    fn random_text_never_panics(text in prop_oneof![any::<String>(), "[a-z_\\[\\]{}=\", .0-9\\n#]{0,300}"]) {
        if let Err(e) = parse(&text) {
            prop_assert!(imprecise(&e, "funnels/hostile.toml").is_none(), "{e}");
        }
    }

    #[test]
    fn damaged_files_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..8, "\\PC{0,4}|[\\[\\]{}=\"#\\\\\\n]"), 1..6),
    ) {
        let mut text: Vec<char> = OK.chars().collect();
        for (at, delete, insert) in &edits {
            let i = at.index(text.len() + 1);
            let end = (i + delete).min(text.len());
            text.splice(i..end, insert.chars());
        }
        let text: String = text.into_iter().collect();
        if let Err(e) = parse(&text) {
            prop_assert!(imprecise(&e, "funnels/hostile.toml").is_none(), "{e}");
        }
    }

    /// One value of a rich, valid definition replaced, removed, or a key added next to it.
    #[test]
    fn a_perturbed_definition_is_refused_precisely(at in any::<prop::sample::Index>(), change in edit()) {
        let mut def = a_rich_definition();
        let mut all = Vec::new();
        paths(&def, &mut Vec::new(), &mut all);
        let path = at.get(&all).clone();
        let (last, parent) = path.split_last().unwrap();
        let target = at_path(&mut def, parent).unwrap();
        match (&change, target, last) {
            (Edit::Replace(v), target, last) => {
                *at_path(target, std::slice::from_ref(last)).unwrap() = v.clone();
            }
            (Edit::Remove, toml::Value::Table(t), PathPart::Key(k)) => {
                t.remove(k);
            }
            (Edit::Remove, toml::Value::Array(a), PathPart::Index(i)) => {
                a.remove(*i);
            }
            (Edit::AddKey(k, v), toml::Value::Table(t), _) => {
                t.insert(k.clone(), v.clone());
            }
            _ => {}
        }
        // Some values (a table in an array of scalars…) have no TOML text: nothing to test.
        let Ok(text) = toml::to_string(&def) else { return Ok(()) };
        let started = Instant::now();
        let result = parse(&text);
        prop_assert!(started.elapsed() < Duration::from_secs(2));
        if let Err(e) = result {
            prop_assert!(imprecise(&e, "funnels/hostile.toml").is_none(), "{e}");
            if let (Edit::Replace(_), [PathPart::Key(top)]) = (&change, path.as_slice())
                && ["version", "name", "start_on", "initial"].contains(&top.as_str())
                && !e.field.starts_with("bytes")
            {
                // A top-level value that is well-typed but wrong is named as itself (or, for
                // `initial`, as the stage it leaves unreachable).
                prop_assert!(e.field == *top || (top == "initial" && e.field.starts_with("stages[")), "{e}");
            }
        }
    }

    /// Random stage graphs: a definition loads exactly when every stage is reachable from the
    /// first and every stage that is not final has a way out.
    #[test]
    fn random_graphs_load_exactly_when_sound((n, edges, finals) in a_graph()) {
        let text = graph_text(n, &edges, &finals);
        let mut reached = vec![false; n];
        let mut queue = vec![0usize];
        reached[0] = true;
        while let Some(i) = queue.pop() {
            for &to in &edges[i] {
                if !reached[to] {
                    reached[to] = true;
                    queue.push(to);
                }
            }
        }
        let sound = reached.iter().all(|&r| r) && (0..n).all(|i| finals[i] || !edges[i].is_empty());
        match parse(&text) {
            Ok(_) => prop_assert!(sound, "{text}"),
            Err(e) => {
                prop_assert!(!sound, "{e}\n{text}");
                prop_assert!(imprecise(&e, "funnels/hostile.toml").is_none(), "{e}");
                prop_assert!(e.field.starts_with("stages["), "{e}");
            }
        }
    }
}

#[test]
fn a_large_definition_loads_in_bounded_time() {
    // 3,000 stages in a chain: the checks stay fast enough for a start-up.
    let n = 3000;
    let edges: Vec<Vec<usize>> = (0..n)
        .map(|i| if i + 1 < n { vec![i + 1] } else { vec![] })
        .collect();
    let finals: Vec<bool> = (0..n).map(|i| i + 1 == n).collect();
    let started = Instant::now();
    parse(&graph_text(n, &edges, &finals)).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
