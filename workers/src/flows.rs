//! Flows as data: command kinds defined in TOML files, validated at start-up, versioned, and
//! run by one generic handler. A funnel is a flow with a `name` instead of a `kind`: it runs as
//! `funnel.{name}`, one command per person, and its transitions listen for the person's
//! broadcasts.
//!
//! ```toml
//! version = 1                       # the format (1)
//! kind = "shop.quote"               # or `name = "visitor_to_member"` for a funnel
//! revision = 3                      # optional: the flow's version (else a hash of the file)
//! title = "Quote"
//! initial = "drafting"
//! final = ["accepted"]              # reaching one completes the command
//!
//! [[states]]                        # `stages` is the same list
//! name = "drafting"
//! ui = { code = "quote.unfinished", text = "Your quote is waiting for you" }
//! on_enter = [{ send = { template = "quote_started" } }]
//! timers = [{ after = "3d", actions = [{ send = { template = "quote_nudge" } }] },
//!           { cron = "0 9 * * Mon-Fri", tz = "Europe/Paris", actions = [...] }]
//! transitions = [
//!   { on = "quote.priced", set = { total = "$.event.total" } },
//!   { on = "quote.accepted", to = "accepted", guard = { path = "$.data.total", gt = 0 } },
//! ]
//! ```
//!
//! A transition without `to` stays in its state (its `set`, `inc` and `actions` apply); one
//! with `to` leaves: the state's timers are cancelled, its waits stop, and the next state's
//! `on_enter` runs. A funnel's transitions wait for broadcast events whose `correlationid` is
//! the person (the command's owner); a flow's transitions take the events sent to the command,
//! and an explicit `wait` action waits for a correlated event. `timer.fired`, `wait.timed_out`
//! and `children.settled` are transitions like any other.
//!
//! Values may read the event and the command: a string `$.event.a.b` is the event's data at
//! `a.b`, `$.data.a` the command's data, `$.command.owner` / `$.command.id` the command's.
//!
//! A flow keeps its state in its data: `stage` (the current state), `stages` (the states it
//! went through), `stage_entered_at`, and `sent` (the templates sent, each at most once per
//! state).
//!
//! A person is in at most one open funnel per track, across all their linked identities: a
//! `start_on` broadcast for a person already in the track starts nothing, unless the event also
//! moves the open funnel to a final stage (the hand-over from one funnel of a path to the next).
//! A stage without a `ui` hint shows the person no pending condition.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cmdflow_shared::contract::types::{self, COMMAND_START, TIMER_FIRED};
use cmdflow_shared::decision::{AbortChildren, Channel, ChildSpec, DataChange, FanIn, Outcome};
use cmdflow_shared::domain::check_dotted_name;
use cmdflow_shared::{Command, CommandState, Decision, Event, HandlerError};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::Digest;

use crate::messages::Templates;
use crate::registry::Handler;

/// One flow (or funnel) file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowDef {
    /// The file format: 1.
    pub version: u32,
    /// A funnel's name: it runs as the kind `funnel.{name}`.
    #[serde(default)]
    pub name: Option<String>,
    /// The kind a flow runs as.
    #[serde(default)]
    pub kind: Option<String>,
    /// The author's number for this definition; without it, the file's hash is its version.
    #[serde(default)]
    pub revision: Option<u32>,
    pub title: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Funnels of one track are one path: a person is in at most one of them at a time.
    /// Defaults to the funnel's own name.
    #[serde(default)]
    pub track: Option<String>,
    /// A broadcast of this type (subject = the owner) starts a command. Required of a funnel.
    #[serde(default)]
    pub start_on: Option<String>,
    pub initial: String,
    #[serde(rename = "final", default)]
    pub finals: Vec<String>,
    #[serde(alias = "states")]
    pub stages: Vec<StageDef>,
    /// Where it came from: set by [`FlowDef::parse`].
    #[serde(skip)]
    pub source: FlowSource,
}

/// A flow's file, its text and the hash of its text.
#[derive(Debug, Clone, Default)]
pub struct FlowSource {
    pub file: String,
    pub text: String,
    /// The SHA-256 of the text, in hex.
    pub hash: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageDef {
    pub name: String,
    #[serde(default)]
    pub ui: Option<UiHint>,
    #[serde(default)]
    pub on_enter: Vec<Action>,
    /// Timers of the state, cancelled when it is left.
    #[serde(default, alias = "timers")]
    pub after: Vec<After>,
    #[serde(default)]
    pub transitions: Vec<Transition>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UiHint {
    pub code: String,
    pub text: String,
}

/// A timer of a state: after a delay, at a time, or on a cron schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct After {
    /// A duration such as `30m` or `3d` (`after` is the same).
    #[serde(default, alias = "after")]
    pub delay: Option<String>,
    /// An RFC 3339 time, or a `$.data.…` / `$.event.…` path to one.
    #[serde(default)]
    pub at: Option<String>,
    /// A cron expression (`min hour day month weekday`, or with seconds first), in `tz`.
    #[serde(default)]
    pub cron: Option<String>,
    /// The IANA time zone of `cron` (default `UTC`).
    #[serde(default)]
    pub tz: Option<String>,
    #[serde(default)]
    pub actions: Vec<Action>,
    /// The state it moves to when it fires.
    #[serde(default)]
    pub to: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transition {
    pub on: String,
    /// The next state; without it, the command stays where it is.
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub guard: Option<Guard>,
    /// Data set from the event: `{ total = "$.event.total" }`.
    #[serde(default)]
    pub set: Option<toml::Table>,
    /// Numbers added to: `{ count = 1 }`.
    #[serde(default)]
    pub inc: Option<toml::Table>,
    #[serde(default)]
    pub actions: Vec<Action>,
}

/// A condition: the value at `path` (the event's data by default; `$.data.…` for the
/// command's) exists, equals or differs from a value, or compares with a number. All given
/// conditions must hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guard {
    pub path: String,
    #[serde(default)]
    pub equals: Option<toml::Value>,
    #[serde(default)]
    pub not_equals: Option<toml::Value>,
    #[serde(default)]
    pub exists: Option<bool>,
    #[serde(default)]
    pub gt: Option<f64>,
    #[serde(default)]
    pub gte: Option<f64>,
    #[serde(default)]
    pub lt: Option<f64>,
    #[serde(default)]
    pub lte: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// A personal message from a template, in-app (or by e-mail to `data.email`).
    Send {
        template: String,
        #[serde(default)]
        email: bool,
    },
    /// A named timer: `after` a delay, `at` a time, or on a `cron` schedule in `tz`.
    Timer {
        name: String,
        #[serde(default)]
        after: Option<String>,
        #[serde(default)]
        at: Option<String>,
        #[serde(default)]
        cron: Option<String>,
        #[serde(default)]
        tz: Option<String>,
    },
    CancelTimer {
        name: String,
    },
    /// Wait for an event of `type` whose `correlationid` is `key` (default: the owner); after
    /// `timeout`, a `wait.timed_out` comes instead.
    Wait {
        #[serde(rename = "type")]
        event_type: String,
        #[serde(default)]
        key: Option<String>,
        #[serde(default)]
        timeout: Option<String>,
    },
    /// A fire-and-forget child.
    Spawn {
        kind: String,
        #[serde(default)]
        data: Option<toml::Table>,
    },
    /// Children waited for together: `children.settled` comes when `policy` is decided
    /// (`all`, `any`, `quorum:N`, `all_settled`), or at the `deadline`.
    Group {
        name: String,
        #[serde(default)]
        policy: Option<String>,
        #[serde(default)]
        deadline: Option<String>,
        children: Vec<ChildDef>,
    },
    /// Aborts the open children (of one group, when named).
    AbortChildren {
        #[serde(default)]
        group: Option<String>,
    },
    /// Publishes a domain event.
    Emit {
        #[serde(rename = "type")]
        event_type: String,
        #[serde(default)]
        data: Option<toml::Table>,
    },
    /// Completes the command with `result`.
    Complete {
        #[serde(default)]
        result: Option<toml::Table>,
    },
    /// Fails the command.
    Fail {
        reason: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildDef {
    pub kind: String,
    #[serde(default)]
    pub data: Option<toml::Table>,
}

/// What is wrong with a flow file: the file, the flow and the field are named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: flow {flow}: {field}: {reason}")]
pub struct FlowError {
    pub file: String,
    pub flow: String,
    pub field: String,
    pub reason: String,
}

/// The keys of a flow's data that the flow keeps itself.
const KEPT: [&str; 4] = ["stage", "stages", "stage_entered_at", "sent"];

fn parse_delay(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); use e.g. 30m or 3d"))?;
    cmdflow_shared::time::check_delay(d).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err(format!("`{s}` is zero"));
    }
    Ok(d)
}

fn is_path(s: &str) -> bool {
    s.starts_with("$.")
}

fn check_path(s: &str) -> Result<(), String> {
    let rest = ["$.event", "$.data", "$.command"]
        .iter()
        .find_map(|root| s.strip_prefix(root));
    match rest {
        Some("") if !s.starts_with("$.command") => Ok(()),
        Some(rest) if s.starts_with("$.command") => match rest {
            ".id" | ".owner" | ".kind" => Ok(()),
            _ => Err(format!(
                "`{s}` names no field of the command: use $.command.id, $.command.owner or $.command.kind"
            )),
        },
        Some(rest) if rest.starts_with('.') && rest.len() > 1 => Ok(()),
        _ => Err(format!(
            "`{s}` is not a path: use $.event.<field>, $.data.<field> or $.command.<id|owner|kind>"
        )),
    }
}

/// The timer, as checked: delay, time (or path to one), or cron.
fn check_when(
    delay: Option<&str>,
    at: Option<&str>,
    cron: Option<&str>,
    tz: Option<&str>,
) -> Result<(), String> {
    match (delay, at, cron) {
        (Some(d), None, None) if tz.is_none() => parse_delay(d).map(|_| ()),
        (None, Some(at), None) if tz.is_none() => {
            if is_path(at) {
                check_path(at)
            } else {
                chrono::DateTime::parse_from_rfc3339(at)
                    .map(|_| ())
                    .map_err(|e| format!("`{at}` is not an RFC 3339 time ({e})"))
            }
        }
        (None, None, Some(expr)) => {
            cmdflow_shared::time::parse_cron(expr).map_err(|e| e.to_string())?;
            cmdflow_shared::time::parse_zone(tz.unwrap_or("UTC")).map_err(|e| e.to_string())?;
            Ok(())
        }
        (_, _, None) if tz.is_some() => Err("`tz` goes with `cron` only".into()),
        _ => Err("give exactly one of a delay (`after`), `at` or `cron`".into()),
    }
}

fn check_values(table: &toml::Table) -> Result<(), String> {
    fn walk(v: &toml::Value) -> Result<(), String> {
        match v {
            toml::Value::String(s) if is_path(s) => check_path(s),
            toml::Value::Array(items) => items.iter().try_for_each(walk),
            toml::Value::Table(t) => t.values().try_for_each(walk),
            _ => Ok(()),
        }
    }
    table.values().try_for_each(walk)
}

impl FlowDef {
    /// Parses and validates one flow file.
    pub fn parse(
        file: &str,
        text: &str,
        templates: &Templates,
        kinds: &BTreeSet<String>,
    ) -> Result<FlowDef, FlowError> {
        let stem = Path::new(file)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(file)
            .to_owned();
        let mut def: FlowDef = toml::from_str(text).map_err(|e| FlowError {
            file: file.to_owned(),
            flow: stem.clone(),
            field: e
                .span()
                .map(|s| format!("bytes {}..{}", s.start, s.end))
                .unwrap_or_else(|| "file".into()),
            // toml leaves the message empty for some inputs (`A=`): say what kind of error.
            reason: match e.message().trim() {
                "" => "is not valid TOML here".to_owned(),
                message => message.to_owned(),
            },
        })?;
        def.validate(templates, kinds)
            .map_err(|(field, reason)| FlowError {
                // Named as the file names its states: `states` (flows) or `stages` (funnels).
                field: match field.strip_prefix("stages") {
                    Some(rest)
                        if text
                            .parse::<toml::Table>()
                            .is_ok_and(|t| t.contains_key("states")) =>
                    {
                        format!("states{rest}")
                    }
                    _ => field,
                },
                file: file.to_owned(),
                // The name may be what is wrong, and huge: the error repeats its beginning.
                flow: cmdflow_shared::contract::clip_to(
                    def.name.as_deref().or(def.kind.as_deref()).unwrap_or(&stem),
                    64,
                ),
                reason,
            })?;
        def.source = FlowSource {
            file: file.to_owned(),
            text: text.to_owned(),
            hash: hex::encode(sha2::Sha256::digest(text.as_bytes())),
        };
        Ok(def)
    }

    /// The kind it runs as: its `kind`, or `funnel.{name}` for a funnel.
    pub fn kind(&self) -> String {
        match (&self.kind, &self.name) {
            (Some(kind), _) => kind.clone(),
            (None, Some(name)) => format!("funnel.{name}"),
            (None, None) => String::new(),
        }
    }

    /// Whether it is a funnel (one per person, listening for the person's broadcasts).
    pub fn is_funnel(&self) -> bool {
        self.name.is_some()
    }

    /// Its version: the author's `revision`, or the first 12 hex digits of its file's hash.
    pub fn flow_version(&self) -> String {
        match self.revision {
            Some(r) => r.to_string(),
            None => self.source.hash.chars().take(12).collect(),
        }
    }

    fn stage(&self, name: &str) -> Option<&StageDef> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// A funnel's track (its name when it names none); `None` for a flow that is no funnel.
    pub fn track(&self) -> Option<&str> {
        self.track.as_deref().or(self.name.as_deref())
    }

    /// Whether an event of type `ty` moves a person at `stage` to a final stage.
    pub fn ends_on(&self, stage: &str, ty: &str) -> bool {
        self.stage(stage).is_some_and(|s| {
            s.transitions
                .iter()
                .any(|t| t.on == ty && t.to.as_ref().is_some_and(|to| self.finals.contains(to)))
        })
    }

    fn validate(
        &self,
        templates: &Templates,
        kinds: &BTreeSet<String>,
    ) -> Result<(), (String, String)> {
        let err = |field: String, reason: String| Err((field, reason));
        if self.version != 1 {
            return err(
                "version".into(),
                format!("{} is not a supported version (1)", self.version),
            );
        }
        match (&self.name, &self.kind) {
            (Some(name), None) => {
                check_dotted_name(name, 1).map_err(|e| ("name".into(), e.to_string()))?;
                if self.start_on.is_none() {
                    return err(
                        "start_on".into(),
                        "a funnel needs the broadcast type that starts it".into(),
                    );
                }
            }
            (None, Some(kind)) => {
                check_dotted_name(kind, 1).map_err(|e| ("kind".into(), e.to_string()))?;
                if kind.starts_with("funnel.") {
                    return err(
                        "kind".into(),
                        "`funnel.` kinds are the funnels': give a funnel a `name` instead".into(),
                    );
                }
                if self.track.is_some() {
                    return err("track".into(), "only a funnel (`name`) has a track".into());
                }
            }
            _ => {
                return err(
                    "kind".into(),
                    "give exactly one of `kind` (a flow) or `name` (a funnel)".into(),
                );
            }
        }
        if let Some(track) = &self.track {
            check_dotted_name(track, 1).map_err(|e| ("track".into(), e.to_string()))?;
        }
        if let Some(start_on) = &self.start_on {
            check_dotted_name(start_on, 2).map_err(|e| ("start_on".into(), e.to_string()))?;
        }
        let mut seen = BTreeSet::new();
        for (i, stage) in self.stages.iter().enumerate() {
            if !seen.insert(stage.name.as_str()) {
                return err(
                    format!("stages[{i}].name"),
                    format!("stage `{}` is defined twice", stage.name),
                );
            }
        }
        if !seen.contains(self.initial.as_str()) {
            return err(
                "initial".into(),
                format!("unknown stage `{}`", self.initial),
            );
        }
        for (i, f) in self.finals.iter().enumerate() {
            if !seen.contains(f.as_str()) {
                return err(format!("final[{i}]"), format!("unknown stage `{f}`"));
            }
        }
        let known = |to: &Option<String>| to.as_ref().is_none_or(|t| seen.contains(t.as_str()));
        for (i, stage) in self.stages.iter().enumerate() {
            let at = |what: &str| format!("stages[{i}] ({}).{what}", stage.name);
            let check_actions = |actions: &[Action], field: &str| {
                actions.iter().enumerate().try_for_each(|(j, a)| {
                    check_action(a, templates, kinds).map_err(|r| (at(&format!("{field}[{j}]")), r))
                })
            };
            check_actions(&stage.on_enter, "on_enter")?;
            for (j, after) in stage.after.iter().enumerate() {
                check_when(
                    after.delay.as_deref(),
                    after.at.as_deref(),
                    after.cron.as_deref(),
                    after.tz.as_deref(),
                )
                .map_err(|r| {
                    let which = match (&after.delay, &after.at, &after.cron) {
                        (Some(_), None, None) => ".delay",
                        (None, Some(_), None) => ".at",
                        (None, None, Some(_)) => ".cron",
                        _ => "",
                    };
                    (at(&format!("after[{j}]{which}")), r)
                })?;
                check_actions(&after.actions, &format!("after[{j}].actions"))?;
                if !known(&after.to) {
                    return err(
                        at(&format!("after[{j}].to")),
                        format!("unknown stage `{}`", after.to.clone().unwrap_or_default()),
                    );
                }
            }
            for (j, t) in stage.transitions.iter().enumerate() {
                if !known(&t.to) {
                    return err(
                        at(&format!("transitions[{j}].to")),
                        format!("unknown stage `{}`", t.to.clone().unwrap_or_default()),
                    );
                }
                check_dotted_name(&t.on, 2)
                    .map_err(|e| (at(&format!("transitions[{j}].on")), e.to_string()))?;
                if let Some(g) = &t.guard {
                    check_guard(g).map_err(|r| (at(&format!("transitions[{j}].guard")), r))?;
                }
                for (field, table) in [("set", &t.set), ("inc", &t.inc)] {
                    let Some(table) = table else { continue };
                    let place = at(&format!("transitions[{j}].{field}"));
                    if let Some(k) = table.keys().find(|k| KEPT.contains(&k.as_str())) {
                        return err(place, format!("`{k}` is kept by the flow itself"));
                    }
                    check_values(table).map_err(|r| (place.clone(), r))?;
                    if field == "inc"
                        && let Some((k, _)) = table.iter().find(|(_, v)| match v {
                            toml::Value::Integer(_) | toml::Value::Float(_) => false,
                            toml::Value::String(s) => !is_path(s),
                            _ => true,
                        })
                    {
                        return err(
                            place,
                            format!(
                                "`{k}` must be a number to add, or a $.event/$.data path to one"
                            ),
                        );
                    }
                }
                check_actions(&t.actions, &format!("transitions[{j}].actions"))?;
            }
            let leaves = !stage.transitions.is_empty()
                || stage.after.iter().any(|a| a.to.is_some())
                || stage
                    .on_enter
                    .iter()
                    .any(|a| matches!(a, Action::Complete { .. } | Action::Fail { .. }));
            if !leaves && !self.finals.contains(&stage.name) {
                return err(
                    at("transitions"),
                    "a stage that is not final needs a way out".into(),
                );
            }
        }
        // Every stage must be reachable from the initial one.
        let mut reached = BTreeSet::from([self.initial.as_str()]);
        let mut queue = VecDeque::from([self.initial.as_str()]);
        while let Some(name) = queue.pop_front() {
            let Some(stage) = self.stage(name) else {
                continue;
            };
            let next = stage
                .transitions
                .iter()
                .filter_map(|t| t.to.as_deref())
                .chain(stage.after.iter().filter_map(|a| a.to.as_deref()));
            for to in next {
                if reached.insert(to) {
                    queue.push_back(to);
                }
            }
        }
        for (i, stage) in self.stages.iter().enumerate() {
            if !reached.contains(stage.name.as_str()) {
                return err(
                    format!("stages[{i}] ({})", stage.name),
                    format!("unreachable from the initial stage `{}`", self.initial),
                );
            }
        }
        Ok(())
    }

    /// The flow as a Mermaid state diagram.
    pub fn mermaid(&self) -> String {
        let id = |name: &str| -> String {
            name.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect()
        };
        let label = |s: &str| s.replace([':', ';', '#'], " ");
        let mut out = String::from("stateDiagram-v2\n");
        for stage in &self.stages {
            let _ = writeln!(
                out,
                "    state \"{}\" as {}",
                label(&stage.name),
                id(&stage.name)
            );
        }
        let _ = writeln!(out, "    [*] --> {}", id(&self.initial));
        for stage in &self.stages {
            for t in &stage.transitions {
                let to = t.to.as_deref().unwrap_or(&stage.name);
                let guard = t.guard.as_ref().map(guard_text).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "    {} --> {} : {}{}",
                    id(&stage.name),
                    id(to),
                    label(&t.on),
                    label(&guard)
                );
            }
            for a in &stage.after {
                if let Some(to) = &a.to {
                    let _ = writeln!(
                        out,
                        "    {} --> {} : {}",
                        id(&stage.name),
                        id(to),
                        label(&when_text(a))
                    );
                }
            }
            if self.finals.contains(&stage.name) {
                let _ = writeln!(out, "    {} --> [*]", id(&stage.name));
            }
        }
        out
    }

    /// The flow as a Graphviz DOT graph: states, transitions (labelled with their event and
    /// guard) and timers that move.
    pub fn dot(&self) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace(['"', '\\'], "'"));
        let mut out = String::from("digraph flow {\n  rankdir=LR;\n  \"[start]\" [shape=point];\n");
        for stage in &self.stages {
            let shape = if self.finals.contains(&stage.name) {
                "doublecircle"
            } else {
                "box"
            };
            let _ = writeln!(out, "  {} [shape={shape}];", q(&stage.name));
        }
        let _ = writeln!(out, "  \"[start]\" -> {};", q(&self.initial));
        for stage in &self.stages {
            for t in &stage.transitions {
                let to = t.to.as_deref().unwrap_or(&stage.name);
                let guard = t.guard.as_ref().map(guard_text).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {} -> {} [label={}];",
                    q(&stage.name),
                    q(to),
                    q(&format!("{}{guard}", t.on))
                );
            }
            for a in stage.after.iter().filter(|a| a.to.is_some()) {
                let to = a.to.as_deref().unwrap_or(&stage.name);
                let _ = writeln!(
                    out,
                    "  {} -> {} [label={}];",
                    q(&stage.name),
                    q(to),
                    q(&when_text(a))
                );
            }
        }
        out.push_str("}\n");
        out
    }

    /// The flow drawn as an SVG image (laid out from [`FlowDef::dot`]); empty when the layout
    /// fails.
    pub fn svg(&self) -> String {
        use layout::backends::svg::SVGWriter;
        use layout::gv::{DotParser, GraphBuilder};
        let dot = self.dot();
        // The layout is a library's: a graph it cannot draw costs the picture, not the worker.
        std::panic::catch_unwind(|| {
            let mut parser = DotParser::new(&dot);
            let tree = parser.process().ok()?;
            let mut builder = GraphBuilder::new();
            builder.visit_graph(&tree);
            let mut graph = builder.get();
            let mut svg = SVGWriter::new();
            graph.do_it(false, false, false, &mut svg);
            Some(svg.finalize())
        })
        .ok()
        .flatten()
        .unwrap_or_default()
    }

    /// The flow as text: its states, timers and transitions (what `cmdflow flows show` prints).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{} — {}", self.kind(), self.title);
        let _ = writeln!(
            out,
            "version {} · file {} · sha256 {}",
            self.flow_version(),
            self.source.file,
            self.source.hash.chars().take(12).collect::<String>()
        );
        if let Some(start_on) = &self.start_on {
            let _ = writeln!(out, "starts on {start_on}");
        }
        for stage in &self.stages {
            let mut marks = Vec::new();
            if stage.name == self.initial {
                marks.push("initial");
            }
            if self.finals.contains(&stage.name) {
                marks.push("final");
            }
            let marks = if marks.is_empty() {
                String::new()
            } else {
                format!(" ({})", marks.join(", "))
            };
            let _ = writeln!(out, "\n[{}]{marks}", stage.name);
            if let Some(ui) = &stage.ui {
                let _ = writeln!(out, "  shows {}: {}", ui.code, ui.text);
            }
            for a in &stage.on_enter {
                let _ = writeln!(out, "  on enter: {}", action_text(a));
            }
            for a in &stage.after {
                let to =
                    a.to.as_deref()
                        .map(|t| format!(" → {t}"))
                        .unwrap_or_default();
                let _ = writeln!(out, "  {}{to}", when_text(a));
                for action in &a.actions {
                    let _ = writeln!(out, "    then {}", action_text(action));
                }
            }
            for t in &stage.transitions {
                let to =
                    t.to.as_deref()
                        .map(|t| format!(" → {t}"))
                        .unwrap_or_default();
                let guard = t.guard.as_ref().map(guard_text).unwrap_or_default();
                let _ = writeln!(out, "  on {}{guard}{to}", t.on);
                for (what, table) in [("set", &t.set), ("add", &t.inc)] {
                    for (k, v) in table.iter().flatten() {
                        let _ = writeln!(out, "    {what} {k} = {v}");
                    }
                }
                for action in &t.actions {
                    let _ = writeln!(out, "    then {}", action_text(action));
                }
            }
        }
        out
    }
}

fn guard_text(g: &Guard) -> String {
    let mut parts = Vec::new();
    if let Some(v) = &g.equals {
        parts.push(format!("{} = {v}", g.path));
    }
    if let Some(v) = &g.not_equals {
        parts.push(format!("{} != {v}", g.path));
    }
    for (op, v) in [("<", g.lt), ("<=", g.lte), (">", g.gt), (">=", g.gte)] {
        if let Some(v) = v {
            parts.push(format!("{} {op} {v}", g.path));
        }
    }
    match g.exists {
        Some(false) => parts.push(format!("no {}", g.path)),
        Some(true) => parts.push(format!("{} exists", g.path)),
        None if parts.is_empty() => parts.push(format!("{} exists", g.path)),
        None => {}
    }
    format!(" [{}]", parts.join(", "))
}

fn when_text(a: &After) -> String {
    match (&a.delay, &a.at, &a.cron) {
        (Some(d), _, _) => format!("after {d}"),
        (_, Some(at), _) => format!("at {at}"),
        (_, _, Some(cron)) => format!("cron {cron} ({})", a.tz.as_deref().unwrap_or("UTC")),
        _ => String::new(),
    }
}

fn action_text(a: &Action) -> String {
    match a {
        Action::Send { template, email } => {
            format!("send {template}{}", if *email { " by e-mail" } else { "" })
        }
        Action::Timer { name, .. } => format!("set timer {name}"),
        Action::CancelTimer { name } => format!("cancel timer {name}"),
        Action::Wait {
            event_type,
            timeout,
            ..
        } => match timeout {
            Some(t) => format!("wait for {event_type} (at most {t})"),
            None => format!("wait for {event_type}"),
        },
        Action::Spawn { kind, .. } => format!("spawn {kind} (fire and forget)"),
        Action::Group {
            name,
            policy,
            deadline,
            children,
        } => {
            let kinds: Vec<&str> = children.iter().map(|c| c.kind.as_str()).collect();
            format!(
                "spawn group {name} ({}{}): {}",
                policy.as_deref().unwrap_or("all"),
                deadline
                    .as_deref()
                    .map(|d| format!(", deadline {d}"))
                    .unwrap_or_default(),
                kinds.join(", ")
            )
        }
        Action::AbortChildren { group: Some(g) } => format!("abort the children of {g}"),
        Action::AbortChildren { group: None } => "abort the children".into(),
        Action::Emit { event_type, .. } => format!("emit {event_type}"),
        Action::Complete { .. } => "complete".into(),
        Action::Fail { reason } => format!("fail: {reason}"),
    }
}

fn check_guard(g: &Guard) -> Result<(), String> {
    if g.path.is_empty() {
        return Err("path is empty".into());
    }
    if is_path(&g.path) {
        check_path(&g.path)?;
    }
    Ok(())
}

/// Whether an event type is the engine's to publish.
fn is_reserved(ty: &str) -> bool {
    ["command.", "timer.", "children.", "wait."]
        .iter()
        .any(|p| ty.starts_with(p))
}

fn check_action(a: &Action, templates: &Templates, kinds: &BTreeSet<String>) -> Result<(), String> {
    let known_kind = |kind: &str| {
        if kinds.contains(kind) {
            Ok(())
        } else {
            Err(format!("cannot spawn unknown kind `{kind}`"))
        }
    };
    match a {
        Action::Send { template, .. } if !templates.contains(template) => Err(format!(
            "missing template `{template}`: register it, or put {template}.txt in CMDFLOW_TEMPLATES_DIR"
        )),
        Action::Send { .. } => Ok(()),
        Action::Timer {
            name,
            after,
            at,
            cron,
            tz,
        } => {
            cmdflow_shared::time::check_name(name).map_err(|e| e.to_string())?;
            check_when(
                after.as_deref(),
                at.as_deref(),
                cron.as_deref(),
                tz.as_deref(),
            )
        }
        Action::CancelTimer { name } => {
            cmdflow_shared::time::check_name(name).map_err(|e| e.to_string())
        }
        Action::Wait {
            event_type,
            key,
            timeout,
        } => {
            check_dotted_name(event_type, 2).map_err(|e| format!("type: {e}"))?;
            if let Some(key) = key.as_deref().filter(|k| is_path(k)) {
                check_path(key).map_err(|e| format!("key: {e}"))?;
            }
            timeout.as_deref().map(parse_delay).transpose().map(|_| ())
        }
        Action::Spawn { kind, data } => {
            known_kind(kind)?;
            data.as_ref().map(check_values).transpose().map(|_| ())
        }
        Action::Group {
            name,
            policy,
            deadline,
            children,
        } => {
            check_dotted_name(name, 1).map_err(|e| format!("name: {e}"))?;
            if let Some(p) = policy {
                FanIn::parse(p).map_err(|e| format!("policy: {e}"))?;
            }
            if let Some(d) = deadline {
                parse_delay(d).map_err(|e| format!("deadline: {e}"))?;
            }
            if children.is_empty() {
                return Err("children: a group needs at least one child".into());
            }
            for (i, c) in children.iter().enumerate() {
                known_kind(&c.kind).map_err(|e| format!("children[{i}]: {e}"))?;
                if let Some(data) = &c.data {
                    check_values(data).map_err(|e| format!("children[{i}].data: {e}"))?;
                }
            }
            Ok(())
        }
        Action::AbortChildren { .. } => Ok(()),
        Action::Emit { event_type, data } => {
            check_dotted_name(event_type, 2).map_err(|e| format!("type: {e}"))?;
            if is_reserved(event_type) {
                return Err(format!(
                    "type: `{event_type}` is cmdflow's own: command.*, timer.*, children.* and wait.* are the engine's"
                ));
            }
            data.as_ref().map(check_values).transpose().map(|_| ())
        }
        Action::Complete { result } => result.as_ref().map(check_values).transpose().map(|_| ()),
        Action::Fail { reason } if reason.trim().is_empty() => Err("reason is empty".into()),
        Action::Fail { .. } => Ok(()),
    }
}

/// Reads every `*.toml` in `dir`: `(path, text)` pairs, by path.
pub fn read_dir(dir: &Path) -> Result<Vec<(String, String)>, FlowError> {
    let io = |reason: String| FlowError {
        file: dir.display().to_string(),
        flow: "-".into(),
        field: "-".into(),
        reason,
    };
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| io(e.to_string()))?;
    for entry in entries {
        let path = entry.map_err(|e| io(e.to_string()))?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| io(format!("{}: {e}", path.display())))?;
            files.push((path.display().to_string(), text));
        }
    }
    files.sort();
    Ok(files)
}

/// Parses and checks flow files (`(file name, TOML text)`). Any invalid file is an error
/// with its precise place; so are two flows of one kind.
pub fn parse_all(
    files: &[(String, String)],
    templates: &Templates,
    kinds: &BTreeSet<String>,
) -> Result<Vec<FlowDef>, FlowError> {
    check_each(files, templates, kinds).into_iter().collect()
}

/// Checks every flow file on its own (`(file name, TOML text)`), in order: each file's flow,
/// or what is wrong with it. The flows of one batch may spawn one another; the second flow of a
/// kind is an error.
pub fn check_each(
    files: &[(String, String)],
    templates: &Templates,
    kinds: &BTreeSet<String>,
) -> Vec<Result<FlowDef, FlowError>> {
    let mut kinds = kinds.clone();
    kinds.extend(
        files
            .iter()
            .filter_map(|(_, text)| toml::from_str::<FlowDef>(text).ok())
            .map(|d| d.kind()),
    );
    let mut checked: Vec<Result<FlowDef, FlowError>> = Vec::new();
    for (file, text) in files {
        let def = FlowDef::parse(file, text, templates, &kinds).and_then(|def| {
            let twin = checked.iter().flatten().find(|d| d.kind() == def.kind());
            match twin {
                None => Ok(def),
                Some(twin) => Err(FlowError {
                    file: file.clone(),
                    flow: def.kind(),
                    field: if def.is_funnel() { "name" } else { "kind" }.into(),
                    reason: if def.is_funnel() {
                        format!("{} defines a funnel of the same name", twin.source.file)
                    } else {
                        format!("{} defines a flow of the same kind", twin.source.file)
                    },
                }),
            }
        });
        checked.push(def);
    }
    checked
}

/// Records the registry's flows as their kinds' current versions, and keeps every earlier
/// version the store holds for them, so that commands started on one finish on it. An earlier
/// version that no longer loads here (a template or kind it uses is gone) is left out, with a
/// warning: its commands' events wait for a worker that has it. A current version whose
/// `revision` the store holds with another text stops start-up.
pub async fn sync_versions(
    pool: &sqlx::PgPool,
    mut registry: crate::Registry,
) -> Result<crate::Registry, crate::WorkerError> {
    use cmdflow_shared::store;
    let defs: Vec<FlowDef> = registry.flow_defs().to_vec();
    for def in &defs {
        let (kind, version) = (def.kind(), def.flow_version());
        let (mermaid, svg) = (def.mermaid(), def.svg());
        let recorded = store::flows::record(
            pool,
            store::flows::NewFlowVersion {
                kind: &kind,
                version: &version,
                hash: &def.source.hash,
                file: &def.source.file,
                definition: &def.source.text,
                mermaid: &mermaid,
                svg: &svg,
            },
        )
        .await?;
        if let Err(other) = recorded {
            return Err(crate::WorkerError::Flow(format!(
                "{}: flow {kind}: revision: version {version} of {kind} was run with another text (from {other}); a changed flow needs a new revision, or none (its hash is then its version)",
                def.source.file
            )));
        }
        for earlier in store::flows::versions_of(pool, &kind).await? {
            if earlier.version == version {
                continue;
            }
            if let Err(e) = registry.keep_flow_version(&earlier.file, &earlier.definition) {
                tracing::warn!(kind = %kind, version = %earlier.version, error = %e, "An earlier version of a flow does not load here: its commands' events wait for a worker that has it.");
            }
        }
    }
    Ok(registry)
}

/// The generic flow kind: runs any definition.
pub struct FlowHandler {
    def: Arc<FlowDef>,
}

impl FlowHandler {
    pub fn new(def: FlowDef) -> Self {
        Self { def: Arc::new(def) }
    }
}

/// The value at a dotted `path` below `root`.
fn lookup<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .filter(|p| !p.is_empty())
        .try_fold(root, |v, part| match v {
            Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => v.get(part),
        })
}

/// What an event and its command offer to paths.
struct Scope<'a> {
    command: &'a Command,
    event: Value,
    /// The data a transition has set so far (`set`, `inc`): `$.data` paths see it, so that its
    /// actions and the next state's work on the data as changed.
    changed: Map<String, Value>,
}

impl<'a> Scope<'a> {
    fn new(command: &'a Command, event: &Event) -> Self {
        Self {
            command,
            event: Value::Object(event.data.clone()),
            changed: Map::new(),
        }
    }

    /// The value at `rest` (`.field.…`) of the command's data, as changed.
    fn data(&self, rest: &str) -> Option<Value> {
        let rest = rest.trim_start_matches('.');
        if rest.is_empty() {
            let mut data = self.command.data.as_object().cloned().unwrap_or_default();
            data.extend(self.changed.clone());
            return Some(Value::Object(data));
        }
        let (first, tail) = rest.split_once('.').unwrap_or((rest, ""));
        let root = self
            .changed
            .get(first)
            .or_else(|| self.command.data.get(first))?;
        lookup(root, tail).cloned()
    }

    /// The value of a `$.…` path, or of a plain path in the event's data.
    fn get(&self, path: &str) -> Option<Value> {
        if let Some(rest) = path.strip_prefix("$.event") {
            return lookup(&self.event, rest).cloned();
        }
        if let Some(rest) = path.strip_prefix("$.data") {
            return self.data(rest);
        }
        match path {
            "$.command.id" => Some(json!(self.command.id)),
            "$.command.owner" => Some(json!(self.command.owner)),
            "$.command.kind" => Some(json!(self.command.kind)),
            _ => lookup(&self.event, path).cloned(),
        }
    }

    /// A TOML value with its `$.…` strings replaced by what they name (null when absent).
    fn resolve(&self, v: &toml::Value) -> Value {
        match v {
            toml::Value::String(s) if is_path(s) => self.get(s).unwrap_or(Value::Null),
            toml::Value::Array(items) => items.iter().map(|i| self.resolve(i)).collect(),
            toml::Value::Table(t) => Value::Object(self.resolve_table(t)),
            other => serde_json::to_value(other).unwrap_or(Value::Null),
        }
    }

    fn resolve_table(&self, t: &toml::Table) -> Map<String, Value> {
        t.iter()
            .map(|(k, v)| (k.clone(), self.resolve(v)))
            .collect()
    }

    fn holds(&self, g: &Guard) -> bool {
        let value = self.get(&g.path).filter(|v| !v.is_null());
        let number = value.as_ref().and_then(Value::as_f64);
        let want = |w: &toml::Value| serde_json::to_value(w).ok();
        let compares = [
            (g.gt, number.map(|n| g.gt.is_none_or(|x| n > x))),
            (g.gte, number.map(|n| g.gte.is_none_or(|x| n >= x))),
            (g.lt, number.map(|n| g.lt.is_none_or(|x| n < x))),
            (g.lte, number.map(|n| g.lte.is_none_or(|x| n <= x))),
        ];
        let equals = g
            .equals
            .as_ref()
            .is_none_or(|w| value.is_some() && want(w) == value);
        let differs = g.not_equals.as_ref().is_none_or(|w| want(w) != value);
        let exists = match g.exists {
            Some(e) => value.is_some() == e,
            // A bare guard asks that the value be there.
            None => {
                value.is_some()
                    || g.equals.is_some()
                    || g.not_equals.is_some()
                    || compares.iter().any(|(bound, _)| bound.is_some())
            }
        };
        let compared = compares
            .iter()
            .all(|(bound, ok)| bound.is_none() || *ok == Some(true));
        exists && equals && differs && compared
    }
}

/// Merges `patch` into the decision's data patch.
fn merge_patch(decision: Decision, patch: Map<String, Value>) -> Decision {
    if patch.is_empty() {
        return decision;
    }
    let mut merged = match &decision.data {
        Some(DataChange::Patch(current)) => current.clone(),
        _ => Map::new(),
    };
    merged.extend(patch);
    decision.with_patch(merged)
}

impl FlowHandler {
    fn wait_key(command: &Command, scope: &Scope<'_>, key: Option<&str>) -> String {
        match key {
            None => command.owner.clone(),
            Some(k) if is_path(k) => match scope.get(k) {
                Some(Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => String::new(),
            },
            Some(k) => k.to_owned(),
        }
    }

    fn when(
        scope: &Scope<'_>,
        decision: Decision,
        name: &str,
        delay: Option<&str>,
        at: Option<&str>,
        cron: Option<&str>,
        tz: Option<&str>,
    ) -> Result<Decision, HandlerError> {
        match (delay, at, cron) {
            (Some(d), _, _) => {
                Ok(decision.after(name, parse_delay(d).map_err(HandlerError::InvalidData)?))
            }
            (_, Some(at), _) => {
                let text = if is_path(at) {
                    match scope.get(at) {
                        Some(Value::String(s)) => s,
                        _ => {
                            return Err(HandlerError::InvalidData(format!(
                                "timer {name}: {at} is not a time"
                            )));
                        }
                    }
                } else {
                    at.to_owned()
                };
                let at = chrono::DateTime::parse_from_rfc3339(&text).map_err(|e| {
                    HandlerError::InvalidData(format!("timer {name}: `{text}` is not a time: {e}"))
                })?;
                Ok(decision.at(name, at.with_timezone(&chrono::Utc)))
            }
            (_, _, Some(expr)) => Ok(decision.cron(name, expr, tz.unwrap_or("UTC"))),
            _ => Ok(decision),
        }
    }

    /// Applies `actions` to `decision`. A template already sent at this stage (in `sent`, the
    /// `stage:template` keys of `data.sent`) is not sent again; one sent now is added.
    fn act(
        &self,
        scope: &Scope<'_>,
        stage: &str,
        actions: &[Action],
        sent: &mut Vec<Value>,
        mut decision: Decision,
    ) -> Result<Decision, HandlerError> {
        let command = scope.command;
        for a in actions {
            decision = match a {
                Action::Send { template, .. }
                    if sent.contains(&json!(format!("{stage}:{template}"))) =>
                {
                    decision
                }
                Action::Send { template, email } => {
                    sent.push(json!(format!("{stage}:{template}")));
                    let mut vars = Map::new();
                    vars.insert("stage".into(), json!(stage));
                    vars.insert("funnel".into(), json!(self.def.title));
                    vars.insert("flow".into(), json!(self.def.title));
                    let address = command.data.get("email").and_then(Value::as_str);
                    match (email, address) {
                        (true, Some(address)) => decision.message_to(
                            &command.owner,
                            Some(address),
                            template,
                            Channel::Email,
                            vars,
                        ),
                        _ => decision.message(template, Channel::InApp, vars),
                    }
                }
                Action::Timer {
                    name,
                    after,
                    at,
                    cron,
                    tz,
                } => Self::when(
                    scope,
                    decision,
                    name,
                    after.as_deref(),
                    at.as_deref(),
                    cron.as_deref(),
                    tz.as_deref(),
                )?,
                Action::CancelTimer { name } => decision.cancel_timer(name),
                Action::Wait {
                    event_type,
                    key,
                    timeout,
                } => {
                    let timeout = timeout.as_deref().and_then(|t| parse_delay(t).ok());
                    let key = Self::wait_key(command, scope, key.as_deref());
                    decision.wait_for(event_type, &key, timeout)
                }
                Action::Spawn { kind, data } => {
                    decision.spawn_detached(ChildSpec::new(kind, self.child_data(scope, data)))
                }
                Action::Group {
                    name,
                    policy,
                    deadline,
                    children,
                } => {
                    let policy = policy
                        .as_deref()
                        .map(FanIn::parse)
                        .transpose()
                        .map_err(HandlerError::InvalidData)?
                        .unwrap_or(FanIn::All);
                    let specs = children
                        .iter()
                        .map(|c| ChildSpec::new(&c.kind, self.child_data(scope, &c.data)))
                        .collect();
                    let decision = decision.spawn_group(name, policy, specs);
                    match deadline.as_deref().map(parse_delay) {
                        Some(Ok(d)) => decision.with_group_deadline(name, d),
                        _ => decision,
                    }
                }
                Action::AbortChildren { group } => decision.abort_children(match group {
                    Some(g) => AbortChildren::Group(g.clone()),
                    None => AbortChildren::All,
                }),
                Action::Emit { event_type, data } => {
                    let data = data
                        .as_ref()
                        .map(|d| scope.resolve_table(d))
                        .unwrap_or_default();
                    decision.emit(event_type, data)
                }
                Action::Complete { result } => {
                    let result = result
                        .as_ref()
                        .map(|r| Value::Object(scope.resolve_table(r)))
                        .unwrap_or_else(|| json!({ "stage": stage }));
                    decision
                        .with_outcome(Outcome::Complete(result))
                        .with_ui(Value::Null)
                }
                Action::Fail { reason } => decision
                    .with_outcome(Outcome::Fail(reason.clone()))
                    .with_ui(Value::Null),
            };
        }
        Ok(decision)
    }

    /// A child's data: the person's name and e-mail (for a funnel), then the action's data.
    fn child_data(&self, scope: &Scope<'_>, data: &Option<toml::Table>) -> Map<String, Value> {
        let mut child = Map::new();
        if self.def.is_funnel() {
            for key in ["name", "email"] {
                if let Some(v) = scope.command.data.get(key) {
                    child.insert(key.into(), v.clone());
                }
            }
        }
        if let Some(data) = data {
            child.extend(scope.resolve_table(data));
        }
        child
    }

    /// [`FlowHandler::act`], keeping in `data.sent` the `stage:template` keys of the messages
    /// sent, so that none is sent twice.
    fn act_once(
        &self,
        scope: &Scope<'_>,
        stage: &str,
        actions: &[Action],
        decision: Decision,
    ) -> Result<Decision, HandlerError> {
        let mut sent = scope
            .command
            .data
            .get("sent")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let before = sent.len();
        let decision = self.act(scope, stage, actions, &mut sent, decision)?;
        if sent.len() == before {
            return Ok(decision);
        }
        Ok(merge_patch(
            decision,
            Map::from_iter([("sent".to_owned(), Value::Array(sent))]),
        ))
    }

    /// Moves the command into `stage`: its hint, its waits, its timers, its actions.
    fn enter(
        &self,
        scope: &Scope<'_>,
        from: Option<&str>,
        stage: &StageDef,
        now: Option<&Value>,
        decision: Decision,
    ) -> Result<Decision, HandlerError> {
        let command = scope.command;
        let mut patch = Map::new();
        patch.insert("stage".into(), json!(stage.name));
        patch.insert(
            "stage_entered_at".into(),
            now.cloned().unwrap_or_else(|| json!(command.updated_at)),
        );
        let mut history = command
            .data
            .get("stages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        history.push(json!(stage.name));
        patch.insert("stages".into(), Value::Array(history));
        let mut decision = merge_patch(decision, patch).stop_waiting();
        if let Some(prev) = from.and_then(|f| self.def.stage(f)) {
            for i in 0..prev.after.len() {
                decision = decision.cancel_timer(&format!("after:{}:{i}", prev.name));
            }
        }
        decision = self.act_once(scope, &stage.name, &stage.on_enter, decision)?;
        if decision.outcome.is_some() {
            return Ok(decision);
        }
        if self.def.finals.contains(&stage.name) {
            return Ok(decision
                .with_outcome(Outcome::Complete(json!({ "stage": stage.name })))
                .with_ui(Value::Null));
        }
        // A stage without a hint shows the person nothing: no raw stage label.
        decision = decision
            .with_state(CommandState::Running)
            .with_ui(match &stage.ui {
                Some(ui) => json!({ "code": ui.code, "text": ui.text, "stage": stage.name }),
                None => Value::Null,
            });
        for (i, after) in stage.after.iter().enumerate() {
            decision = Self::when(
                scope,
                decision,
                &format!("after:{}:{i}", stage.name),
                after.delay.as_deref(),
                after.at.as_deref(),
                after.cron.as_deref(),
                after.tz.as_deref(),
            )?;
        }
        if self.def.is_funnel() {
            let key = command.owner.clone();
            let mut types: Vec<&str> = stage.transitions.iter().map(|t| t.on.as_str()).collect();
            types.sort_unstable();
            types.dedup();
            for ty in types {
                if !types::is_engine_event(ty) && !is_reserved(ty) {
                    decision = decision.wait_for(ty, &key, None);
                }
            }
        }
        Ok(decision)
    }

    /// A transition's data changes: `set` values, then `inc` additions (a number, or a path
    /// to one: a path to anything else is invalid data).
    fn changes(scope: &Scope<'_>, t: &Transition) -> Result<Map<String, Value>, HandlerError> {
        let mut patch = t
            .set
            .as_ref()
            .map(|s| scope.resolve_table(s))
            .unwrap_or_default();
        for (k, by) in t.inc.iter().flatten() {
            let by = match by {
                toml::Value::String(path) => match scope.get(path) {
                    Some(n @ Value::Number(_)) => n,
                    other => {
                        return Err(HandlerError::InvalidData(format!(
                            "inc {k}: {path} is {}, not a number",
                            other.map_or_else(|| "absent".to_owned(), |v| v.to_string())
                        )));
                    }
                },
                other => serde_json::to_value(other).unwrap_or(json!(0)),
            };
            let current = patch
                .get(k)
                .or_else(|| scope.command.data.get(k))
                .cloned()
                .unwrap_or(json!(0));
            let sum = match (current.as_i64(), by.as_i64()) {
                (Some(a), Some(b)) => json!(a.saturating_add(b)),
                _ => json!(current.as_f64().unwrap_or(0.0) + by.as_f64().unwrap_or(0.0)),
            };
            patch.insert(k.clone(), sum);
        }
        Ok(patch)
    }
}

impl Handler for FlowHandler {
    fn decide(&self, command: &Command, event: &Event) -> Result<Decision, HandlerError> {
        // When the event was accepted (the time it is about), else when its sender says it
        // happened.
        let now = event.accepted_at().or(event.time).map(|t| json!(t));
        let scope = Scope::new(command, event);
        let current = command.data.get("stage").and_then(Value::as_str);
        let Some(current) = current else {
            // The first event: the start (a broadcast of `start_on`, or an explicit start).
            let initial = self
                .def
                .stage(&self.def.initial)
                .ok_or_else(|| HandlerError::Refused("no initial stage".into()))?;
            return self.enter(&scope, None, initial, now.as_ref(), Decision::nothing());
        };
        let stage = self.def.stage(current).ok_or_else(|| {
            HandlerError::InvalidData(format!("unknown stage `{current}` in data.stage"))
        })?;
        if event.ty == TIMER_FIRED
            && let Some(name) = event.data.get("name").and_then(Value::as_str)
            && let Some(i) = name
                .strip_prefix(&format!("after:{}:", stage.name))
                .and_then(|i| i.parse::<usize>().ok())
            && let Some(after) = stage.after.get(i)
        {
            let decision =
                self.act_once(&scope, &stage.name, &after.actions, Decision::nothing())?;
            return match after.to.as_deref().and_then(|to| self.def.stage(to)) {
                Some(next) if decision.outcome.is_none() => {
                    self.enter(&scope, Some(&stage.name), next, now.as_ref(), decision)
                }
                _ => Ok(decision),
            };
        }
        let mut matched_type = false;
        for t in &stage.transitions {
            if t.on != event.ty {
                continue;
            }
            matched_type = true;
            if !t.guard.as_ref().is_none_or(|g| scope.holds(g)) {
                continue;
            }
            let changed = Self::changes(&scope, t)?;
            let scope = Scope {
                changed: changed.clone(),
                ..scope
            };
            let decision = merge_patch(Decision::nothing(), changed);
            let decision = self.act_once(&scope, &stage.name, &t.actions, decision)?;
            let next = match &t.to {
                Some(to) => Some(
                    self.def
                        .stage(to)
                        .ok_or_else(|| HandlerError::Refused(format!("unknown stage `{to}`")))?,
                ),
                None => None,
            };
            return match next {
                Some(next) if decision.outcome.is_none() => {
                    self.enter(&scope, Some(&stage.name), next, now.as_ref(), decision)
                }
                _ => Ok(decision),
            };
        }
        if matched_type && self.def.is_funnel() && !is_reserved(&event.ty) {
            // The guard did not hold: keep waiting for the next one.
            return Ok(Decision::nothing().wait_for(&event.ty, &command.owner, None));
        }
        if matched_type
            || event.ty == COMMAND_START
            || self.def.start_on.as_deref() == Some(event.ty.as_str())
            || event.ty == TIMER_FIRED
            || types::is_engine_event(&event.ty)
        {
            return Ok(Decision::nothing());
        }
        Err(HandlerError::unexpected(&self.def.kind(), event))
    }
}

#[cfg(test)]
mod tests {
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
        let text = include_str!("../../examples/flows/quote.toml");
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
            HandlerError::InvalidData(
                r#"inc total: $.event.amount is "four", not a number"#.into()
            )
        );
        let e = handler.decide(&command, &ev(json!({}))).unwrap_err();
        assert!(e.to_string().contains("$.event.amount is absent"), "{e}");
        // A string that is no path is refused when the file loads.
        let e =
            FlowDef::parse("flows/s.toml", &flow("\"four\""), &templates(), &kinds()).unwrap_err();
        assert_eq!(e.field, "states[0] (s).transitions[0].inc");
        assert!(
            e.reason.contains("`total` must be a number to add"),
            "{}",
            e.reason
        );
    }
}
