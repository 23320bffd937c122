//! Business kinds behind the UI's examples. They start through `POST /v1/commands`; the events
//! named below are addressed to the command.
//!
//! - `quote`: started, edited (`quote.updated`, a data patch), submitted (`quote.submitted`).
//!   While unsubmitted it shows the pending condition `quote.unfinished`. Submitting sends the
//!   person an in-app message.
//! - `query`: a search a person ran (`data.q`); it completes at once and is recorded, so the UI
//!   can show the last ones.
//! - `membership`: applied, then pending approval (`membership.pending`, and a message), approved
//!   (`membership.approved`) or rejected (`membership.rejected`) by an admin event. While pending,
//!   a reminder goes to the approvers every weekday at 10:00 (`data.approvers_tz`, default
//!   Europe/Berlin). An approval leaves the condition `membership.approved` on the ended command,
//!   and broadcasts `member.approved` (or `member.rejected`) correlated by the person, for their
//!   funnels.

use cmdflow_shared::contract::types::{COMMAND_START, TIMER_FIRED};
use cmdflow_shared::decision::Channel;
use cmdflow_shared::{Command, CommandState, Decision, Event, HandlerError};
use serde_json::{Map, Value, json};

use cmdflow_workers::{Registry, RegistryError};

pub const QUOTE: &str = "quote";
pub const QUERY: &str = "query";
pub const MEMBERSHIP: &str = "membership";

/// Who is reminded of pending memberships.
pub const APPROVERS: &str = "admin:approvers";

pub fn register(registry: &mut Registry) -> Result<(), RegistryError> {
    registry
        .register(QUOTE, quote)
        .describe(QUOTE, "A quote a person started, until they submit it")
        .register(MEMBERSHIP, membership)
        .describe(
            MEMBERSHIP,
            "A membership application, until an admin decides",
        )
        .schema(
            MEMBERSHIP,
            json!({
                "type": "object",
                "properties": {
                    "email": {"type": ["string", "null"]},
                    "name": {"type": ["string", "null"]},
                    "approvers_tz": {"type": ["string", "null"], "format": "time-zone"},
                },
            }),
        )?;
    registry
        .register(QUERY, query)
        .describe(QUERY, "A search a person ran")
        .schema(
            QUERY,
            json!({
                "type": "object",
                "required": ["q"],
                "properties": {
                    "q": {"type": "string", "minLength": 1, "maxLength": 1000, "pattern": "\\S"},
                },
            }),
        )?;
    Ok(())
}

fn hint(code: &str, text: &str) -> Value {
    json!({ "code": code, "text": text })
}

pub fn quote(command: &Command, event: &Event) -> Result<Decision, HandlerError> {
    match event.ty.as_str() {
        COMMAND_START => Ok(Decision::nothing()
            .with_state(CommandState::Running)
            .with_ui(hint(
                "quote.unfinished",
                "Here is that quote you started but never finished",
            ))),
        "quote.updated" => Ok(Decision::nothing().with_patch(event.data.clone())),
        "quote.submitted" => {
            let mut data = command.data.as_object().cloned().unwrap_or_default();
            data.extend(event.data.clone());
            let mut vars = Map::new();
            vars.insert(
                "total".into(),
                data.get("total").cloned().unwrap_or(Value::Null),
            );
            Ok(Decision::complete(Value::Object(data.clone()))
                .with_data(data)
                .message("quote_submitted", Channel::InApp, vars))
        }
        _ => Err(HandlerError::unexpected(QUOTE, event)),
    }
}

pub fn query(command: &Command, event: &Event) -> Result<Decision, HandlerError> {
    match event.ty.as_str() {
        COMMAND_START => Ok(Decision::complete(json!({ "q": command.data.get("q") }))),
        _ => Err(HandlerError::unexpected(QUERY, event)),
    }
}

/// The person's own data a command carries (name, e-mail), for the events it sends about them.
fn person_data(command: &Command) -> Map<String, Value> {
    ["name", "email"]
        .into_iter()
        .filter_map(|k| command.data.get(k).map(|v| (k.to_owned(), v.clone())))
        .collect()
}

pub fn membership(command: &Command, event: &Event) -> Result<Decision, HandlerError> {
    let email = command
        .data
        .get("email")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let to_applicant = |decision: Decision, template: &str, vars: Map<String, Value>| match &email {
        Some(address) => decision.message_to(
            &command.owner,
            Some(address),
            template,
            Channel::Email,
            vars,
        ),
        None => decision.message(template, Channel::InApp, vars),
    };
    match event.ty.as_str() {
        COMMAND_START => {
            let tz = command
                .data
                .get("approvers_tz")
                .and_then(Value::as_str)
                .unwrap_or("Europe/Berlin");
            let decision = Decision::nothing()
                .with_state(CommandState::Waiting)
                .with_ui(hint("membership.pending", "Your membership is pending"))
                .cron("remind-approvers", "0 10 * * 1-5", tz);
            Ok(to_applicant(decision, "membership_pending", Map::new()))
        }
        TIMER_FIRED => {
            let mut vars = Map::new();
            vars.insert("applicant".into(), json!(command.owner));
            vars.insert("applied_at".into(), json!(command.created_at));
            Ok(Decision::nothing().message_to(
                APPROVERS,
                None,
                "membership_reminder",
                Channel::InApp,
                vars,
            ))
        }
        "membership.approved" => {
            let decision =
                Decision::complete(json!({ "approved": true, "by": event.data.get("by") }))
                    .with_ui(hint("membership.approved", "Your membership is approved"))
                    .emit_correlated("member.approved", person_data(command), &command.owner);
            Ok(to_applicant(decision, "membership_approved", Map::new()))
        }
        "membership.rejected" => {
            let mut vars = Map::new();
            vars.insert(
                "reason".into(),
                event.data.get("reason").cloned().unwrap_or(Value::Null),
            );
            let decision = Decision::complete(
                json!({ "approved": false, "reason": event.data.get("reason") }),
            )
            .emit_correlated("member.rejected", person_data(command), &command.owner);
            Ok(to_applicant(decision, "membership_rejected", vars))
        }
        _ => Err(HandlerError::unexpected(MEMBERSHIP, event)),
    }
}
