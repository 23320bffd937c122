//! A team's own workflow on cmdflow, in its own binary: a purchase approval.
//!
//! - `purchase.approval` starts two checks (`purchase.check`), a budget check and a
//!   compliance check, and waits for both (`all`) with a deadline. It reminds the owner after a
//!   delay, completes when both pass, and fails when one fails or the deadline passes. Aborting
//!   it (`POST /v1/commands/{id}/abort`) aborts its open checks.
//! - The budget check asks the `budget` activity (`purchase.budget_requested`), which answers
//!   `purchase.budget_checked`. The compliance check waits for a person's
//!   `purchase.check_passed` or `purchase.check_rejected`, addressed to it.
//!
//! `purchase-approval up` runs the whole fleet in one process; every other role and client
//! subcommand of `cmdflow` is here too (`purchase-approval worker`, `… kinds`, …).

use cmdflow::activity::{Activity, ActivityError, Reply};
use cmdflow::types::{CHILDREN_SETTLED, COMMAND_START, TIMER_FIRED};
use cmdflow::{
    Channel, ChildSpec, Command, CommandState, Decision, Event, FanIn, HandlerError, Workflow,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::time::Duration;

/// What is to be bought, and how long the approval may take.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Purchase {
    /// What is bought.
    #[schemars(length(min = 1, max = 200))]
    pub item: String,
    /// Its price, in cents.
    #[schemars(range(min = 1))]
    pub amount: u64,
    /// Seconds the checks may take (default two days).
    #[serde(default = "two_days")]
    #[schemars(range(min = 1))]
    pub deadline_secs: u64,
    /// Seconds before the owner is reminded that it still waits (default one hour).
    #[serde(default = "one_hour")]
    #[schemars(range(min = 1))]
    pub remind_after_secs: u64,
}

fn two_days() -> u64 {
    2 * 24 * 3600
}

fn one_hour() -> u64 {
    3600
}

/// Approves a purchase once its budget and compliance checks pass.
pub struct PurchaseApproval;

impl Workflow for PurchaseApproval {
    const KIND: &'static str = "purchase.approval";
    const DESCRIPTION: Option<&'static str> =
        Some("Approves a purchase once its budget and compliance checks pass");
    type Data = Purchase;

    fn decide(&self, command: &Command<Purchase>, event: &Event) -> Result<Decision, HandlerError> {
        let p = &command.data;
        match event.ty.as_str() {
            COMMAND_START => {
                let check = |which: &str| {
                    let mut data = Map::new();
                    data.insert("check".into(), json!(which));
                    data.insert("item".into(), json!(p.item));
                    data.insert("amount".into(), json!(p.amount));
                    ChildSpec::new(PurchaseCheck::KIND, data)
                };
                Ok(Decision::nothing()
                    .with_state(CommandState::Waiting)
                    .with_ui(json!({
                        "code": "purchase.pending",
                        "text": format!("Your purchase of {} waits for approval", p.item),
                    }))
                    .spawn_group(
                        "checks",
                        FanIn::All,
                        vec![check("budget"), check("compliance")],
                    )
                    .with_group_deadline("checks", Duration::from_secs(p.deadline_secs))
                    .after("remind", Duration::from_secs(p.remind_after_secs)))
            }
            TIMER_FIRED => {
                Ok(Decision::nothing().message("purchase_reminder", Channel::InApp, Map::new()))
            }
            CHILDREN_SETTLED => {
                if event.data.get("outcome").and_then(Value::as_str) == Some("succeeded") {
                    Ok(
                        Decision::complete(json!({ "approved": true, "item": p.item })).message(
                            "purchase_approved",
                            Channel::InApp,
                            Map::new(),
                        ),
                    )
                } else {
                    Ok(Decision::fail(format!(
                        "not approved: {}",
                        failure_of(&event.data)
                    )))
                }
            }
            _ => Err(HandlerError::unexpected(Self::KIND, event)),
        }
    }
}

/// Why a group of checks failed: the reasons of the failed ones, or the deadline.
fn failure_of(settled: &Map<String, Value>) -> String {
    let reasons: Vec<String> = settled
        .get("outcomes")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|o| o.values())
        .filter(|o| o.get("state").and_then(Value::as_str) == Some("failed"))
        .filter_map(|o| o.get("reason").and_then(Value::as_str).map(str::to_owned))
        .collect();
    if reasons.is_empty() {
        let outcome = settled.get("outcome").and_then(Value::as_str);
        format!(
            "the checks did not pass in time ({})",
            outcome.unwrap_or("failed")
        )
    } else {
        reasons.join("; ")
    }
}

/// Which check a `purchase.check` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// Answered by the `budget` activity.
    Budget,
    /// Answered by a person.
    Compliance,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CheckData {
    pub check: CheckKind,
    pub item: String,
    pub amount: u64,
}

/// One check of a purchase.
pub struct PurchaseCheck;

impl Workflow for PurchaseCheck {
    const KIND: &'static str = "purchase.check";
    const DESCRIPTION: Option<&'static str> = Some("One check of a purchase: budget or compliance");
    type Data = CheckData;

    fn decide(
        &self,
        command: &Command<CheckData>,
        event: &Event,
    ) -> Result<Decision, HandlerError> {
        let c = &command.data;
        match (event.ty.as_str(), c.check) {
            (COMMAND_START, CheckKind::Budget) => {
                let mut request = Map::new();
                request.insert("item".into(), json!(c.item));
                request.insert("amount".into(), json!(c.amount));
                Ok(Decision::nothing()
                    .with_state(CommandState::Waiting)
                    .emit("purchase.budget_requested", request))
            }
            (COMMAND_START, CheckKind::Compliance) => Ok(Decision::nothing()
                .with_state(CommandState::Waiting)
                .with_ui(json!({
                    "code": "purchase.compliance",
                    "text": format!("Compliance is reviewing the purchase of {}", c.item),
                }))),
            ("purchase.budget_checked", CheckKind::Budget) => {
                match event.data.get("approved").and_then(Value::as_bool) {
                    Some(true) => Ok(Decision::complete(json!({ "check": "budget" }))),
                    Some(false) => Ok(Decision::fail(format!(
                        "over budget: {} cents is more than the {} left",
                        c.amount,
                        event.data.get("left").cloned().unwrap_or(Value::Null)
                    ))),
                    None => Err(HandlerError::InvalidData(
                        "purchase.budget_checked needs `approved`, a boolean".into(),
                    )),
                }
            }
            ("purchase.check_passed", CheckKind::Compliance) => Ok(Decision::complete(
                json!({ "check": "compliance", "by": event.data.get("by") }),
            )),
            ("purchase.check_rejected", CheckKind::Compliance) => Ok(Decision::fail(format!(
                "compliance rejected it: {}",
                event
                    .data
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
            ))),
            _ => Err(HandlerError::unexpected(Self::KIND, event)),
        }
    }
}

/// The budget activity: approves what fits in what is left (`BUDGET_LEFT_CENTS`, default
/// 100,000). A real one would ask the finance system; this is where that call would go.
fn budget() -> Activity {
    let left: u64 = std::env::var("BUDGET_LEFT_CENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    Activity::new(
        "budget",
        &["purchase.budget_requested"],
        move |event| async move {
            let amount = event
                .data
                .get("amount")
                .and_then(Value::as_u64)
                .ok_or_else(|| ActivityError::Fail("`amount` is required".into()))?;
            Ok(Reply::new(
                "purchase.budget_checked",
                json!({ "approved": amount <= left, "left": left }),
            ))
        },
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cmdflow::App::from_env()?
        .version(concat!("purchase-approval ", env!("CARGO_PKG_VERSION")))
        .workflow(PurchaseApproval)
        .workflow(PurchaseCheck)
        .template(
            "purchase_reminder",
            include_str!("../templates/purchase_reminder.txt"),
        )
        .template(
            "purchase_approved",
            include_str!("../templates/purchase_approved.txt"),
        )
        .activity(budget())
        .run_cli()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command<D>(kind: &str, data: D) -> Command<D> {
        Command::new(kind, "member:ada", data)
    }

    fn event(ty: &str, data: Value) -> Event {
        Event::new("tests", ty, data.as_object().cloned().unwrap_or_default())
    }

    fn purchase() -> Purchase {
        Purchase {
            item: "a desk".into(),
            amount: 45_000,
            deadline_secs: 60,
            remind_after_secs: 5,
        }
    }

    #[test]
    fn a_start_spawns_both_checks_with_a_deadline_and_a_reminder() {
        let d = PurchaseApproval
            .decide(
                &command("purchase.approval", purchase()),
                &event(COMMAND_START, json!({})),
            )
            .unwrap();
        let group = &d.spawn_groups[0];
        assert_eq!(group.policy, FanIn::All);
        assert_eq!(group.deadline, Some(Duration::from_secs(60)));
        let checks: Vec<_> = group
            .children
            .iter()
            .map(|c| c.data["check"].clone())
            .collect();
        assert_eq!(checks, [json!("budget"), json!("compliance")]);
        assert_eq!(d.timers.len(), 1);
    }

    #[test]
    fn the_verdict_completes_or_fails_with_the_reasons() {
        let cmd = command("purchase.approval", purchase());
        let ok = PurchaseApproval
            .decide(
                &cmd,
                &event(CHILDREN_SETTLED, json!({"outcome": "succeeded"})),
            )
            .unwrap();
        assert!(matches!(ok.outcome, Some(cmdflow::Outcome::Complete(_))));
        let failed = PurchaseApproval
            .decide(
                &cmd,
                &event(
                    CHILDREN_SETTLED,
                    json!({"outcome": "failed", "outcomes": {"x": {"state": "failed", "reason": "over budget"}}}),
                ),
            )
            .unwrap();
        assert_eq!(
            failed.outcome,
            Some(cmdflow::Outcome::Fail("not approved: over budget".into()))
        );
    }

    #[test]
    fn a_budget_answer_ends_the_budget_check() {
        let data = CheckData {
            check: CheckKind::Budget,
            item: "a desk".into(),
            amount: 45_000,
        };
        let cmd = command("purchase.check", data);
        let no = PurchaseCheck
            .decide(
                &cmd,
                &event(
                    "purchase.budget_checked",
                    json!({"approved": false, "left": 10}),
                ),
            )
            .unwrap();
        assert!(matches!(no.outcome, Some(cmdflow::Outcome::Fail(r)) if r.contains("over budget")));
        assert!(
            PurchaseCheck
                .decide(&cmd, &event("purchase.check_passed", json!({})))
                .is_err(),
            "a person does not pass the budget check"
        );
    }
}
