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
//!
//! By file: this one holds the format; `check` checks a file field by field, `draw` draws it
//! (Mermaid, DOT, SVG, text), `load` reads directories and records versions, and `handler` is
//! the generic kind that runs a flow.

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

mod check;
mod draw;
mod handler;
mod load;
#[cfg(test)]
mod tests;

use check::*;
pub use handler::FlowHandler;
pub use load::{check_each, parse_all, read_dir, sync_versions};

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
}
