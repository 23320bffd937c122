//! Funnels as data: sales funnels defined in versioned TOML files, validated at start-up, and
//! run by one generic command kind per funnel (`funnel.{name}`), one command per person.
//!
//! ```toml
//! version = 1
//! name = "visitor_to_member"
//! title = "Visitor → member"
//! track = "client"                  # one open funnel per person and track (default: its name)
//! start_on = "visitor.arrived"      # a broadcast of this type (subject = the person) starts it
//! initial = "visitor"
//! final = ["member"]                # reaching one completes the funnel
//!
//! [[stages]]
//! name = "visitor"
//! ui = { code = "membership.required", text = "Become a member to see member prices" }
//! on_enter = [{ send = { template = "visitor_welcome" } }]
//! after = [{ delay = "3d", actions = [{ send = { template = "visitor_nudge" } }] }]
//! transitions = [{ on = "member.signed_up", to = "member", guard = { path = "plan", equals = "gold" } }]
//! ```
//!
//! A stage's transitions wait for broadcast events whose `correlationid` is the person (the
//! command's owner); a transition on `timer.fired` or `wait.timed_out` reacts to the funnel's own
//! time events. Actions: `send` a templated message, set (`timer`) or `cancel_timer` a timer,
//! `wait` for an event, `spawn` a command. Delays in a stage (`after`) are timers that leaving the
//! stage cancels.
//!
//! A person is in at most one open funnel per track, across all their linked identities: a
//! `start_on` broadcast for a person already in the track starts nothing, unless the event also
//! moves the open funnel to a final stage (the hand-over from one funnel of a path to the next).
//! A template is sent at most once per stage for a person (kept in `data.sent`), so coming back
//! to a stage does not repeat its welcome. A stage without a `ui` hint shows the person no
//! pending condition.

use std::collections::{BTreeSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cmdflow_shared::contract::types::{self, COMMAND_START, TIMER_FIRED};
use cmdflow_shared::decision::{Channel, ChildSpec, DataChange};
use cmdflow_shared::domain::check_dotted_name;
use cmdflow_shared::{Command, CommandState, Decision, Event, HandlerError};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::messages::Templates;
use crate::registry::Handler;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelDef {
    pub version: u32,
    pub name: String,
    pub title: String,
    /// Funnels of one track are one path: a person is in at most one of them at a time.
    /// Defaults to the funnel's own name.
    #[serde(default)]
    pub track: Option<String>,
    pub start_on: String,
    pub initial: String,
    #[serde(rename = "final")]
    pub finals: Vec<String>,
    pub stages: Vec<StageDef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageDef {
    pub name: String,
    #[serde(default)]
    pub ui: Option<UiHint>,
    #[serde(default)]
    pub on_enter: Vec<Action>,
    #[serde(default)]
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct After {
    /// A duration such as `30m` or `3d`.
    pub delay: String,
    pub actions: Vec<Action>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transition {
    pub on: String,
    pub to: String,
    #[serde(default)]
    pub guard: Option<Guard>,
}

/// A condition on the event's data: the value at `path` (dotted) equals `equals`, or exists.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guard {
    pub path: String,
    #[serde(default)]
    pub equals: Option<toml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    Send {
        template: String,
        #[serde(default)]
        email: bool,
    },
    Timer {
        name: String,
        after: String,
    },
    CancelTimer {
        name: String,
    },
    Wait {
        #[serde(rename = "type")]
        event_type: String,
        #[serde(default)]
        timeout: Option<String>,
    },
    Spawn {
        kind: String,
        #[serde(default)]
        data: Option<toml::Table>,
    },
}

/// What is wrong with a funnel file: the file, the funnel and the field are named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: funnel {funnel}: {field}: {reason}")]
pub struct FunnelError {
    pub file: String,
    pub funnel: String,
    pub field: String,
    pub reason: String,
}

fn parse_delay(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); use e.g. 30m or 3d"))?;
    cmdflow_shared::time::check_delay(d).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err(format!("`{s}` is zero"));
    }
    Ok(d)
}

impl FunnelDef {
    /// Parses and validates one funnel file.
    pub fn parse(
        file: &str,
        text: &str,
        templates: &Templates,
        kinds: &BTreeSet<String>,
    ) -> Result<FunnelDef, FunnelError> {
        let stem = Path::new(file)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(file)
            .to_owned();
        let def: FunnelDef = toml::from_str(text).map_err(|e| FunnelError {
            file: file.to_owned(),
            funnel: stem.clone(),
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
            .map_err(|(field, reason)| FunnelError {
                file: file.to_owned(),
                // The name may be what is wrong, and huge: the error repeats its beginning.
                funnel: cmdflow_shared::contract::clip_to(&def.name, 64),
                field,
                reason,
            })?;
        Ok(def)
    }

    pub fn kind(&self) -> String {
        format!("funnel.{}", self.name)
    }

    fn stage(&self, name: &str) -> Option<&StageDef> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The funnel's track (its name when it names none).
    pub fn track(&self) -> &str {
        self.track.as_deref().unwrap_or(&self.name)
    }

    /// Whether an event of type `ty` moves a person at `stage` to a final stage.
    pub fn ends_on(&self, stage: &str, ty: &str) -> bool {
        self.stage(stage).is_some_and(|s| {
            s.transitions
                .iter()
                .any(|t| t.on == ty && self.finals.contains(&t.to))
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
        check_dotted_name(&self.name, 1).map_err(|e| ("name".into(), e.to_string()))?;
        if let Some(track) = &self.track {
            check_dotted_name(track, 1).map_err(|e| ("track".into(), e.to_string()))?;
        }
        check_dotted_name(&self.start_on, 2).map_err(|e| ("start_on".into(), e.to_string()))?;
        let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
        let mut seen = BTreeSet::new();
        for (i, name) in names.iter().enumerate() {
            if !seen.insert(*name) {
                return err(
                    format!("stages[{i}].name"),
                    format!("stage `{name}` is defined twice"),
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
        for (i, stage) in self.stages.iter().enumerate() {
            let at = |what: &str| format!("stages[{i}] ({}).{what}", stage.name);
            for (j, a) in stage.on_enter.iter().enumerate() {
                check_action(a, templates, kinds)
                    .map_err(|r| (at(&format!("on_enter[{j}]")), r))?;
            }
            for (j, after) in stage.after.iter().enumerate() {
                parse_delay(&after.delay).map_err(|r| (at(&format!("after[{j}].delay")), r))?;
                for (k, a) in after.actions.iter().enumerate() {
                    check_action(a, templates, kinds)
                        .map_err(|r| (at(&format!("after[{j}].actions[{k}]")), r))?;
                }
            }
            for (j, t) in stage.transitions.iter().enumerate() {
                if !seen.contains(t.to.as_str()) {
                    return err(
                        at(&format!("transitions[{j}].to")),
                        format!("unknown stage `{}`", t.to),
                    );
                }
                check_dotted_name(&t.on, 2)
                    .map_err(|e| (at(&format!("transitions[{j}].on")), e.to_string()))?;
            }
            if stage.transitions.is_empty() && !self.finals.contains(&stage.name) {
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
            for t in self
                .stage(name)
                .map(|s| s.transitions.as_slice())
                .unwrap_or_default()
            {
                if reached.insert(t.to.as_str()) {
                    queue.push_back(t.to.as_str());
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
}

fn check_action(a: &Action, templates: &Templates, kinds: &BTreeSet<String>) -> Result<(), String> {
    match a {
        Action::Send { template, .. } if !templates.contains(template) => {
            Err(format!("missing template `{template}`"))
        }
        Action::Send { .. } => Ok(()),
        Action::Timer { name, after } => {
            cmdflow_shared::time::check_name(name).map_err(|e| e.to_string())?;
            parse_delay(after).map(|_| ())
        }
        Action::CancelTimer { name } => {
            cmdflow_shared::time::check_name(name).map_err(|e| e.to_string())
        }
        Action::Wait {
            event_type,
            timeout,
        } => {
            check_dotted_name(event_type, 2).map_err(|e| format!("type: {e}"))?;
            timeout.as_deref().map(parse_delay).transpose().map(|_| ())
        }
        Action::Spawn { kind, .. } if !kinds.contains(kind) => {
            Err(format!("cannot spawn unknown kind `{kind}`"))
        }
        Action::Spawn { .. } => Ok(()),
    }
}

/// Reads every `*.toml` in `dir`: `(path, text)` pairs, by path.
pub fn read_dir(dir: &Path) -> Result<Vec<(String, String)>, FunnelError> {
    let io = |reason: String| FunnelError {
        file: dir.display().to_string(),
        funnel: "-".into(),
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

/// Parses and checks funnel files (`(file name, TOML text)`). Any invalid file is an error
/// with its precise place; so are two funnels of one name.
pub fn parse_all(
    files: &[(String, String)],
    templates: &Templates,
    kinds: &BTreeSet<String>,
) -> Result<Vec<FunnelDef>, FunnelError> {
    let mut defs: Vec<FunnelDef> = Vec::new();
    for (file, text) in files {
        let def = FunnelDef::parse(file, text, templates, kinds)?;
        if defs.iter().any(|d| d.name == def.name) {
            return Err(FunnelError {
                file: file.clone(),
                funnel: def.name.clone(),
                field: "name".into(),
                reason: "another file defines a funnel of the same name".into(),
            });
        }
        defs.push(def);
    }
    Ok(defs)
}

/// The generic funnel kind: runs any definition.
pub struct FunnelHandler {
    def: Arc<FunnelDef>,
}

impl FunnelHandler {
    pub fn new(def: FunnelDef) -> Self {
        Self { def: Arc::new(def) }
    }
}

fn guard_holds(guard: &Guard, data: &Map<String, Value>) -> bool {
    let mut value = Some(&Value::Object(data.clone())).cloned();
    for part in guard.path.split('.') {
        value = value.and_then(|v| v.get(part).cloned());
    }
    match (&guard.equals, value) {
        (None, Some(v)) => !v.is_null(),
        (Some(want), Some(v)) => serde_json::to_value(want).is_ok_and(|w| w == v),
        (_, None) => false,
    }
}

impl FunnelHandler {
    fn owner_key(command: &Command) -> String {
        command.owner.clone()
    }

    /// Applies `actions` to `decision`. A template already sent at this stage (in `sent`, the
    /// `stage:template` keys of `data.sent`) is not sent again; one sent now is added.
    fn act(
        &self,
        command: &Command,
        stage: &str,
        actions: &[Action],
        sent: &mut Vec<Value>,
        mut decision: Decision,
    ) -> Decision {
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
                Action::Timer { name, after } => match parse_delay(after) {
                    Ok(d) => decision.after(name, d),
                    Err(_) => decision,
                },
                Action::CancelTimer { name } => decision.cancel_timer(name),
                Action::Wait {
                    event_type,
                    timeout,
                } => {
                    let timeout = timeout.as_deref().and_then(|t| parse_delay(t).ok());
                    decision.wait_for(event_type, &Self::owner_key(command), timeout)
                }
                Action::Spawn { kind, data } => {
                    // The person's own data travels with them: name and e-mail, then the
                    // action's data.
                    let mut child = Map::new();
                    for key in ["name", "email"] {
                        if let Some(v) = command.data.get(key) {
                            child.insert(key.into(), v.clone());
                        }
                    }
                    if let Some(Value::Object(extra)) =
                        data.as_ref().and_then(|d| serde_json::to_value(d).ok())
                    {
                        child.extend(extra);
                    }
                    decision.spawn_detached(ChildSpec::new(kind, child))
                }
            };
        }
        decision
    }

    /// [`FunnelHandler::act`], keeping in `data.sent` the `stage:template` keys of the messages
    /// sent, so that none is sent twice.
    fn act_once(
        &self,
        command: &Command,
        stage: &str,
        actions: &[Action],
        decision: Decision,
    ) -> Decision {
        let mut sent = command
            .data
            .get("sent")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let before = sent.len();
        let decision = self.act(command, stage, actions, &mut sent, decision);
        if sent.len() == before {
            return decision;
        }
        let mut patch = match &decision.data {
            Some(DataChange::Patch(patch)) => patch.clone(),
            _ => Map::new(),
        };
        patch.insert("sent".into(), Value::Array(sent));
        decision.with_patch(patch)
    }

    /// Moves the person into `stage`: its hint, its waits, its delays, its actions.
    fn enter(
        &self,
        command: &Command,
        from: Option<&str>,
        stage: &StageDef,
        now: Option<&Value>,
    ) -> Decision {
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
        let mut decision = Decision::nothing().with_patch(patch).stop_waiting();
        if let Some(prev) = from.and_then(|f| self.def.stage(f)) {
            for i in 0..prev.after.len() {
                decision = decision.cancel_timer(&format!("after:{}:{i}", prev.name));
            }
        }
        decision = self.act_once(command, &stage.name, &stage.on_enter, decision);
        if self.def.finals.contains(&stage.name) {
            return decision
                .with_outcome(cmdflow_shared::decision::Outcome::Complete(
                    json!({ "stage": stage.name }),
                ))
                .with_ui(Value::Null);
        }
        // A stage without a hint shows the person nothing: no raw stage label.
        decision = decision
            .with_state(CommandState::Running)
            .with_ui(match &stage.ui {
                Some(ui) => json!({ "code": ui.code, "text": ui.text, "stage": stage.name }),
                None => Value::Null,
            });
        for (i, after) in stage.after.iter().enumerate() {
            if let Ok(d) = parse_delay(&after.delay) {
                decision = decision.after(&format!("after:{}:{i}", stage.name), d);
            }
        }
        let key = Self::owner_key(command);
        let mut types: Vec<&str> = stage.transitions.iter().map(|t| t.on.as_str()).collect();
        types.sort_unstable();
        types.dedup();
        for ty in types {
            if !types::is_engine_event(ty) && ty != TIMER_FIRED && ty != types::WAIT_TIMED_OUT {
                decision = decision.wait_for(ty, &key, None);
            }
        }
        decision
    }
}

impl Handler for FunnelHandler {
    fn decide(&self, command: &Command, event: &Event) -> Result<Decision, HandlerError> {
        // When the event was accepted (the time it is about), else when its sender says it
        // happened.
        let now = event.accepted_at().or(event.time).map(|t| json!(t));
        let current = command.data.get("stage").and_then(Value::as_str);
        let Some(current) = current else {
            // The first event: the start (a broadcast of `start_on`, or an explicit start).
            let initial = self
                .def
                .stage(&self.def.initial)
                .ok_or_else(|| HandlerError::Refused("no initial stage".into()))?;
            return Ok(self.enter(command, None, initial, now.as_ref()));
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
            return Ok(self.act_once(command, &stage.name, &after.actions, Decision::nothing()));
        }
        let mut matched_type = false;
        for t in &stage.transitions {
            if t.on != event.ty {
                continue;
            }
            matched_type = true;
            if t.guard.as_ref().is_none_or(|g| guard_holds(g, &event.data)) {
                let next = self
                    .def
                    .stage(&t.to)
                    .ok_or_else(|| HandlerError::Refused(format!("unknown stage `{}`", t.to)))?;
                return Ok(self.enter(command, Some(&stage.name), next, now.as_ref()));
            }
        }
        if matched_type
            && !types::is_engine_event(&event.ty)
            && event.ty != TIMER_FIRED
            && event.ty != types::WAIT_TIMED_OUT
        {
            // The guard did not hold: keep waiting for the next one.
            return Ok(Decision::nothing().wait_for(&event.ty, &Self::owner_key(command), None));
        }
        if event.ty == COMMAND_START
            || event.ty == self.def.start_on
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

    fn bad(text: &str) -> FunnelError {
        FunnelDef::parse("funnels/bad.toml", text, &templates(), &kinds()).unwrap_err()
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
        FunnelDef::parse("funnels/t.toml", OK, &templates(), &kinds()).unwrap();
    }

    #[test]
    fn bad_definitions_name_the_file_the_funnel_and_the_field() {
        let e = bad(&OK.replace("to = \"b\"", "to = \"c\""));
        assert_eq!(
            (e.file.as_str(), e.funnel.as_str()),
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
                .starts_with("funnels/bad.toml: funnel bad: bytes"),
            "{e}"
        );
    }
}
