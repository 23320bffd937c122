//! The flow format's unit tests: parsing, checking, drawing and deciding.

use super::*;

fn kinds() -> BTreeSet<String> {
    ["membership", "quote", "query"]
        .into_iter()
        .map(str::to_owned)
        .collect()
}

fn templates() -> Templates {
    let mut t = Templates::new();
    t.add("funnel_welcome", "Welcome\n").unwrap();
    t.add("funnel_nudge", "Still there?\n").unwrap();
    t
}

fn bad(text: &str) -> FlowError {
    FlowDef::parse("funnels/bad.toml", text, &templates(), &kinds()).unwrap_err()
}

const OK: &str = r#"
version = 1
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

#[test]
fn a_good_definition_parses() {
    FlowDef::parse("funnels/t.toml", OK, &templates(), &kinds()).unwrap();
}

#[test]
fn bad_definitions_name_the_file_the_funnel_and_the_field() {
    let e = bad(&OK.replace("to = \"b\"", "to = \"c\""));
    assert_eq!(
        (e.file.as_str(), e.flow.as_str()),
        ("funnels/bad.toml", "t")
    );
    assert_eq!(e.field, "stages[0] (a).transitions[0].to");
    assert!(e.reason.contains("unknown stage `c`"));
    let e = bad(&OK.replace("3d", "three days"));
    assert_eq!(e.field, "stages[0] (a).after[0].delay");
    let e = bad(&OK.replace("funnel_nudge", "no_such_template"));
    assert!(
        e.reason.contains("missing template `no_such_template`"),
        "{e}"
    );
    let e = bad(&format!(
        "{OK}\n[[stages]]\nname = \"island\"\ntransitions = [{{ on = \"x.y\", to = \"b\" }}]\n"
    ));
    assert_eq!(e.field, "stages[2] (island)");
    assert!(e.reason.contains("unreachable"));
    let e = bad(&OK.replace("initial = \"a\"", "initial = \"z\""));
    assert_eq!(e.field, "initial");
    let e = bad(&OK.replace("version = 1", "version = 2"));
    assert_eq!(e.field, "version");
    let e = bad("version = 1\nname = ");
    assert!(
        e.to_string()
            .starts_with("funnels/bad.toml: flow bad: bytes"),
        "{e}"
    );
}

#[test]
fn a_flow_is_drawn_and_described() {
    let mut kinds = kinds();
    kinds.insert("shop.supplier_quote".into());
    let mut templates = templates();
    templates.add("quote_submitted", "Quote\n").unwrap();
    let text = include_str!("../../../examples/flows/quote.toml");
    let def = FlowDef::parse("flows/quote.toml", text, &templates, &kinds).unwrap();
    assert_eq!(def.kind(), "shop.quote");
    assert_eq!(def.flow_version().len(), 12);
    let mermaid = def.mermaid();
    assert!(mermaid.starts_with("stateDiagram-v2\n    state \"collecting\" as collecting"));
    assert!(
        mermaid.contains("    offered --> expired : wait.timed_out\n"),
        "{mermaid}"
    );
    assert!(mermaid.contains("    accepted --> [*]\n"), "{mermaid}");
    let svg = def.svg();
    assert!(svg.contains("<svg"), "{svg}");
    for state in [
        "collecting",
        "offered",
        "accepted",
        "declined",
        "expired",
        "unpriced",
    ] {
        assert!(svg.contains(&format!(">{state}<")), "{state} is not drawn");
    }
    let text = def.describe();
    assert!(text.contains("[collecting] (initial)"), "{text}");
    assert!(
        text.contains("cron 0 0 9-17 * * Mon-Fri (Europe/Paris)"),
        "{text}"
    );
    assert!(
        text.contains("on quote.answered [accepted = true] → accepted"),
        "{text}"
    );
}

#[test]
fn guards_compare_and_changes_read_the_event() {
    let def = FlowDef::parse(
        "flows/c.toml",
        r#"
version = 1
kind = "t.counter"
title = "Counter"
initial = "counting"
[[states]]
name = "counting"
transitions = [
  { on = "t.add", guard = { path = "$.event.by", gte = 1, lt = 10 }, inc = { count = 1 }, set = { last = "$.event.by", who = "$.command.owner" } },
  { on = "t.stop", guard = { path = "$.data.count", gt = 1 }, actions = [{ complete = { result = { count = "$.data.count" } } }] },
]
"#,
        &templates(),
        &kinds(),
    )
    .unwrap();
    let handler = FlowHandler::new(def);
    let mut command = Command::new("t.counter", "member:1", json!({ "stage": "counting" }));
    let ev = |ty: &str, data: Value| Event::new("t", ty, data.as_object().cloned().unwrap());
    let d = handler
        .decide(&command, &ev("t.add", json!({ "by": 3 })))
        .unwrap();
    assert_eq!(
        d.data,
        Some(DataChange::Patch(
            json!({ "count": 1, "last": 3, "who": "member:1" })
                .as_object()
                .cloned()
                .unwrap()
        ))
    );
    // Out of the guard's range: nothing changes.
    let d = handler
        .decide(&command, &ev("t.add", json!({ "by": 10 })))
        .unwrap();
    assert_eq!(d, Decision::nothing());
    // Not yet above one: the stop is ignored; then it completes with the count.
    let d = handler.decide(&command, &ev("t.stop", json!({}))).unwrap();
    assert_eq!(d.outcome, None);
    command.data["count"] = json!(2);
    let d = handler.decide(&command, &ev("t.stop", json!({}))).unwrap();
    assert_eq!(d.outcome, Some(Outcome::Complete(json!({ "count": 2 }))));
}

#[test]
fn a_transition_acts_on_the_data_it_has_just_set() {
    let def = FlowDef::parse(
        "flows/o.toml",
        r#"
version = 1
kind = "t.order"
title = "Order"
initial = "open"
[[states]]
name = "open"
transitions = [
  { on = "t.priced", to = "priced", set = { total = "$.event.total", due = "$.event.due" }, inc = { changes = 1 }, actions = [
{ emit = { type = "t.total", data = { total = "$.data.total", changes = "$.data.changes", all = "$.data" } } },
  ] },
]
[[states]]
name = "priced"
on_enter = [{ timer = { name = "pay", at = "$.data.due" } }]
transitions = [{ on = "t.paid", actions = [{ complete = { result = { total = "$.data.total" } } }] }]
"#,
        &templates(),
        &kinds(),
    )
    .unwrap();
    let handler = FlowHandler::new(def);
    let command = Command::new(
        "t.order",
        "member:1",
        json!({ "stage": "open", "note": "n" }),
    );
    let event = Event::new(
        "t",
        "t.priced",
        json!({ "total": 12, "due": "2030-01-01T00:00:00Z" })
            .as_object()
            .cloned()
            .unwrap(),
    );
    let d = handler.decide(&command, &event).unwrap();
    let emitted = &d.emit[0].data;
    assert_eq!(emitted["total"], json!(12));
    assert_eq!(emitted["changes"], json!(1));
    assert_eq!(emitted["all"]["note"], json!("n"));
    assert_eq!(emitted["all"]["total"], json!(12));
    let due = chrono::DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z").unwrap();
    assert!(
        format!("{:?}", d.timers).contains(&format!("{:?}", due.with_timezone(&chrono::Utc))),
        "the timer is set at the time the transition set: {:?}",
        d.timers
    );
}

#[test]
fn a_command_path_names_one_of_its_fields() {
    let text = OK.replace(
        r#"on_enter = [{ send = { template = "funnel_welcome" } }]"#,
        r#"on_enter = [{ emit = { type = "t.x", data = { who = "$.command.ownr" } } }]"#,
    );
    let e = bad(&text);
    assert!(
        e.reason
            .contains("`$.command.ownr` names no field of the command"),
        "{}",
        e.reason
    );
}

#[test]
fn inc_adds_the_number_a_path_names_and_refuses_anything_else() {
    let flow = |inc: &str| {
        format!(
            "version = 1\nkind = \"t.sum\"\ntitle = \"Sum\"\ninitial = \"s\"\n[[states]]\nname = \"s\"\ntransitions = [{{ on = \"t.add\", inc = {{ total = {inc} }} }}]\n"
        )
    };
    let def = FlowDef::parse(
        "flows/s.toml",
        &flow("\"$.event.amount\""),
        &templates(),
        &kinds(),
    )
    .unwrap();
    let handler = FlowHandler::new(def);
    let command = Command::new("t.sum", "member:1", json!({ "stage": "s", "total": 5 }));
    let ev = |data: Value| Event::new("t", "t.add", data.as_object().cloned().unwrap());
    let d = handler
        .decide(&command, &ev(json!({ "amount": 4 })))
        .unwrap();
    let total = match d.data {
        Some(DataChange::Patch(p)) => p["total"].clone(),
        other => panic!("a patch, got {other:?}"),
    };
    assert_eq!(total, json!(9));
    // A value that is no number is invalid data (a dead letter with this reason).
    let e = handler
        .decide(&command, &ev(json!({ "amount": "four" })))
        .unwrap_err();
    assert_eq!(
        e,
        HandlerError::InvalidData(r#"inc total: $.event.amount is "four", not a number"#.into())
    );
    let e = handler.decide(&command, &ev(json!({}))).unwrap_err();
    assert!(e.to_string().contains("$.event.amount is absent"), "{e}");
    // A string that is no path is refused when the file loads.
    let e = FlowDef::parse("flows/s.toml", &flow("\"four\""), &templates(), &kinds()).unwrap_err();
    assert_eq!(e.field, "states[0] (s).transitions[0].inc");
    assert!(
        e.reason.contains("`total` must be a number to add"),
        "{}",
        e.reason
    );
}
