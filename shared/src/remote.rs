//! The remote decider protocol: a kind whose decisions are made by a service in any language.
//!
//! For each event, the worker `POST`s `{"command": …, "event": …}` (JSON) to the decider's URL,
//! signed as Standard Webhooks sign a delivery: the headers `webhook-id` (the event's id),
//! `webhook-timestamp` (Unix seconds) and `webhook-signature` (`v1,` and the base64 HMAC-SHA256 of
//! `{id}.{timestamp}.{body}` under the shared secret). The decider answers `200` with a
//! [`WireDecision`]: the same decision a Rust handler returns, as JSON. Any other answer is
//! either retried (a 5xx, 408, 429, a timeout, a refused connection) or refuses the event (another
//! 4xx: a dead letter with the decider's own words).

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::Sha256;

use crate::contract::Event;
use crate::decision::{
    AbortChildren, Channel, ChildSpec, DataChange, Decision, FanIn, MessageSpec, Outcome,
    ParentClose, Reports, SpawnGroup, TimerOp, WaitSpec,
};
use crate::domain::{Command, CommandId, CommandState};
use crate::time::{TimerSpec, TimerWhen};

/// The header naming the delivery (the event's id).
pub const ID_HEADER: &str = "webhook-id";
/// The header carrying the Unix time of the signature, in seconds.
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
/// The header carrying `v1,<base64 signature>`.
pub const SIGNATURE_HEADER: &str = "webhook-signature";

/// The signature of `body`, as Standard Webhooks compute it: `v1,` then the base64 of the
/// HMAC-SHA256 of `{id}.{timestamp}.{body}` under `secret`.
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// The body the worker sends: the command as stored and the event to decide on.
pub fn request_body(command: &Command, event: &Event) -> Value {
    json!({
        "command": {
            "id": command.id, "kind": command.kind, "owner": command.owner,
            "parent_id": command.parent_id, "root_id": command.root_id, "depth": command.depth,
            "state": command.state, "data": command.data, "result": command.result,
            "reason": command.reason, "ui": command.ui, "version": command.version,
            "group_name": command.group_name, "created_at": command.created_at,
            "updated_at": command.updated_at,
        },
        "event": event,
    })
}

/// A decision as JSON: what a remote decider answers. Every field may be left out; an empty
/// object changes nothing (the event is still recorded).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WireDecision {
    /// `running` or `waiting`.
    #[serde(default)]
    pub state: Option<String>,
    /// Top-level keys to set in the command's data (`null` removes a key).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub patch: Option<Map<String, Value>>,
    /// The command's whole new data (instead of `patch`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub replace: Option<Map<String, Value>>,
    /// Completes the command with this result.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub complete: Option<Value>,
    /// Fails the command with this reason.
    #[serde(default)]
    pub fail: Option<String>,
    /// The UI's pending condition, `{code, text}`; `null` clears it.
    #[serde(default, deserialize_with = "some_value")]
    #[schema(value_type = Option<Object>)]
    pub ui: Option<Value>,
    /// Events to send after the commit.
    #[serde(default)]
    pub emit: Vec<WireEmit>,
    /// Children started fire-and-forget.
    #[serde(default)]
    pub spawn: Vec<WireChild>,
    /// Children to wait for, by group.
    #[serde(default)]
    pub groups: Vec<WireGroup>,
    /// `"all"`, `{"group": name}` or `{"ids": [...]}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub abort_children: Option<Value>,
    /// Timers to set or replace (by name).
    #[serde(default)]
    pub timers: Vec<WireTimer>,
    /// Timers to cancel, by name.
    #[serde(default)]
    pub cancel_timers: Vec<String>,
    /// Events to wait for.
    #[serde(default)]
    pub waits: Vec<WireWait>,
    /// End every wait the command has, before this decision's waits.
    #[serde(default)]
    pub stop_waiting: bool,
    /// Personal messages, rendered from the worker's templates.
    #[serde(default)]
    pub messages: Vec<WireMessage>,
}

/// `ui: null` is a decision too (clear the hint): keep it apart from a missing `ui`.
fn some_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// An event to send.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WireEmit {
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Map<String, Value>,
    /// The command it is addressed to; a broadcast when left out.
    #[serde(default)]
    pub to: Option<CommandId>,
    /// The `correlationid` to set.
    #[serde(default)]
    pub correlation: Option<String>,
}

/// A child to start.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WireChild {
    pub kind: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Map<String, Value>,
    /// Defaults to the parent's owner.
    #[serde(default)]
    pub owner: Option<String>,
    /// `abort` (default) or `abandon`: what the parent's end does to a child of a group.
    #[serde(default)]
    pub parent_close: Option<String>,
}

/// Children to wait for under one fan-in policy.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WireGroup {
    pub name: String,
    /// `all` (default), `any`, `all_settled` or `quorum:N`.
    #[serde(default)]
    pub policy: Option<String>,
    /// The group fails if it has not settled after this many milliseconds.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// `each` (default) or `settled`.
    #[serde(default)]
    pub reports: Option<String>,
    pub children: Vec<WireChild>,
}

/// A timer: exactly one of `after_ms`, `at` and `cron`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WireTimer {
    pub name: String,
    #[serde(default)]
    pub after_ms: Option<u64>,
    #[serde(default)]
    pub at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    pub cron: Option<String>,
    /// The cron's IANA time zone (default UTC).
    #[serde(default)]
    pub tz: Option<String>,
}

/// A wait for a broadcast event.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WireWait {
    #[serde(rename = "type")]
    pub ty: String,
    pub key: String,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A personal message.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WireMessage {
    pub template: String,
    /// `in_app` (default) or `email`.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub channel: Option<Channel>,
    /// The owner it is for; the command's owner by default.
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub vars: Map<String, Value>,
}

/// Parses a decider's answer, naming the field of the first thing wrong with it.
pub fn parse_decision(body: &[u8]) -> Result<Decision, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let wire: WireDecision = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        match path.as_str() {
            "" | "." => e.inner().to_string(),
            _ => format!("{path}: {}", e.inner()),
        }
    })?;
    wire.into_decision()
}

fn child(c: WireChild, at: &str) -> Result<ChildSpec, String> {
    let parent_close = match c.parent_close.as_deref() {
        None | Some("abort") => ParentClose::Abort,
        Some("abandon") => ParentClose::Abandon,
        Some(other) => {
            return Err(format!(
                "{at}.parent_close: `{other}` is neither abort nor abandon"
            ));
        }
    };
    Ok(ChildSpec {
        kind: c.kind,
        data: c.data,
        owner: c.owner,
        parent_close,
    })
}

impl WireDecision {
    /// The decision it describes, or what is wrong with it (naming the field).
    pub fn into_decision(self) -> Result<Decision, String> {
        let mut d = Decision::nothing();
        d.state = match self.state.as_deref() {
            None => None,
            Some("running") => Some(CommandState::Running),
            Some("waiting") => Some(CommandState::Waiting),
            Some(other) => {
                return Err(format!(
                    "state: `{other}` is not running or waiting (end with complete or fail)"
                ));
            }
        };
        d.data = match (self.patch, self.replace) {
            (Some(_), Some(_)) => return Err("patch, replace: give one of them, not both".into()),
            (Some(p), None) => Some(DataChange::Patch(p)),
            (None, Some(r)) => Some(DataChange::Replace(r)),
            (None, None) => None,
        };
        d.outcome = match (self.complete, self.fail) {
            (Some(_), Some(_)) => return Err("complete, fail: give one of them, not both".into()),
            (Some(result), None) => Some(Outcome::Complete(result)),
            (None, Some(reason)) => Some(Outcome::Fail(reason)),
            (None, None) => None,
        };
        if let Some(ui) = &self.ui
            && !(ui.is_null() || ui.is_object())
        {
            return Err("ui: an object {code, text} or null".into());
        }
        d.ui = self.ui;
        for (i, e) in self.emit.into_iter().enumerate() {
            crate::domain::check_dotted_name(&e.ty, 2)
                .map_err(|err| format!("emit[{i}].type: {err}"))?;
            d.emit.push(crate::decision::Emit {
                ty: e.ty,
                data: e.data,
                to: e.to,
                correlation: e.correlation,
            });
        }
        for (i, c) in self.spawn.into_iter().enumerate() {
            d.spawn_detached.push(child(c, &format!("spawn[{i}]"))?);
        }
        for (i, g) in self.groups.into_iter().enumerate() {
            let at = format!("groups[{i}]");
            let policy = FanIn::parse(g.policy.as_deref().unwrap_or("all"))
                .map_err(|e| format!("{at}.policy: {e}"))?;
            let reports = match g.reports.as_deref() {
                None => Reports::default(),
                Some(r) => Reports::parse(r)
                    .ok_or_else(|| format!("{at}.reports: `{r}` is neither each nor settled"))?,
            };
            let children = g
                .children
                .into_iter()
                .enumerate()
                .map(|(j, c)| child(c, &format!("{at}.children[{j}]")))
                .collect::<Result<Vec<_>, _>>()?;
            d.spawn_groups.push(SpawnGroup {
                name: g.name,
                policy,
                deadline: g.deadline_ms.map(Duration::from_millis),
                reports,
                children,
            });
        }
        d.abort_children = match self.abort_children {
            None => None,
            Some(Value::String(s)) if s == "all" => Some(AbortChildren::All),
            Some(Value::Object(o)) => match (o.get("group"), o.get("ids")) {
                (Some(Value::String(g)), None) => Some(AbortChildren::Group(g.clone())),
                (None, Some(ids)) => Some(AbortChildren::Ids(
                    serde_json::from_value(ids.clone())
                        .map_err(|e| format!("abort_children.ids: {e}"))?,
                )),
                _ => {
                    return Err(
                        "abort_children: \"all\", {\"group\": name} or {\"ids\": [...]}".into(),
                    );
                }
            },
            Some(_) => {
                return Err(
                    "abort_children: \"all\", {\"group\": name} or {\"ids\": [...]}".into(),
                );
            }
        };
        for (i, t) in self.timers.into_iter().enumerate() {
            let when = match (t.after_ms, t.at, t.cron) {
                (Some(ms), None, None) => TimerWhen::After(Duration::from_millis(ms)),
                (None, Some(at), None) => TimerWhen::At(at),
                (None, None, Some(expr)) => TimerWhen::Cron {
                    expr,
                    tz: t.tz.unwrap_or_else(|| "UTC".to_owned()),
                },
                _ => {
                    return Err(format!(
                        "timers[{i}]: give exactly one of after_ms, at and cron"
                    ));
                }
            };
            d.timers
                .push(TimerOp::Set(TimerSpec { name: t.name, when }));
        }
        d.timers
            .extend(self.cancel_timers.into_iter().map(TimerOp::Cancel));
        for (i, w) in self.waits.into_iter().enumerate() {
            crate::domain::check_dotted_name(&w.ty, 2)
                .map_err(|err| format!("waits[{i}].type: {err}"))?;
            if w.key.is_empty() {
                return Err(format!("waits[{i}].key: empty"));
            }
            d.waits.push(WaitSpec {
                event_type: w.ty,
                key: w.key,
                timeout: w.timeout_ms.map(Duration::from_millis),
            });
        }
        d.stop_waiting = self.stop_waiting;
        for m in self.messages {
            d.messages.push(MessageSpec {
                template: m.template,
                channel: m.channel.unwrap_or(Channel::InApp),
                to: m.to,
                email: m.email,
                vars: m.vars,
            });
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_decision_parses() {
        let d = parse_decision(
            br#"{"state": "waiting", "patch": {"n": 1}, "ui": null,
                 "emit": [{"type": "order.shipped", "data": {"n": 1}}],
                 "groups": [{"name": "ship", "policy": "quorum:1", "deadline_ms": 60000,
                             "children": [{"kind": "demo.noop"}]}],
                 "timers": [{"name": "remind", "cron": "0 * * * 1-5", "tz": "Europe/Berlin"}],
                 "cancel_timers": ["old"],
                 "waits": [{"type": "special.clicked", "key": "member:1", "timeout_ms": 5000}],
                 "messages": [{"template": "welcome", "channel": "email", "email": "a@b.example"}]}"#,
        )
        .unwrap();
        assert_eq!(d.state, Some(CommandState::Waiting));
        assert_eq!(d.ui, Some(Value::Null));
        assert_eq!(d.spawn_groups[0].policy, FanIn::Quorum(1));
        assert_eq!(d.timers.len(), 2);
        assert_eq!(d.waits[0].timeout, Some(Duration::from_millis(5000)));
        assert_eq!(d.messages[0].channel, Channel::Email);
        assert_eq!(parse_decision(b"{}").unwrap(), Decision::nothing());
    }

    #[test]
    fn a_bad_decision_names_its_field() {
        for (body, field) in [
            (&br#"{"state": "completed"}"#[..], "state"),
            (
                br#"{"groups": [{"name": "g", "policy": "most", "children": []}]}"#,
                "groups[0].policy",
            ),
            (br#"{"emit": [{"type": "Shipped"}]}"#, "emit[0].type"),
            (br#"{"timers": [{"name": "t"}]}"#, "timers[0]"),
            (br#"{"waits": [{"type": "a.b", "key": 5}]}"#, "waits[0].key"),
            (br#"{"colour": "red"}"#, "colour"),
            (br#"{"complete": 1, "fail": "no"}"#, "complete, fail"),
        ] {
            let e = parse_decision(body).unwrap_err();
            assert!(e.contains(field), "{e} should name {field}");
        }
    }

    #[test]
    fn the_signature_is_the_standard_webhooks_one() {
        // The example of the Standard Webhooks specification (its secret, base64-decoded).
        let secret = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
