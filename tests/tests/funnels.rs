//! The six shipped funnels, end to end by events alone, each with a reminder fired by a timer.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cmdflow_shared::CommandState;
use cmdflow_shared::time::ManualClock;
use cmdflow_tests::{TestEnv, event, eventually, get, send};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// A broadcast about a person: `subject` and `correlationid` are the person.
fn about(ty: &str, person: &str, data: Value) -> Value {
    let mut e = event(ty, None, data);
    e["subject"] = json!(person);
    e["correlationid"] = json!(person);
    e
}

/// The person's funnel command of `funnel`, once it is at `stage`.
async fn at_stage(
    env: &TestEnv,
    person: &str,
    funnel: &str,
    stage: &str,
) -> cmdflow_shared::Command {
    eventually(WAIT, &format!("{person} at {funnel}/{stage}"), || async {
        let id: Option<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM commands WHERE owner = $1 AND kind = $2 ORDER BY created_at DESC LIMIT 1")
            .bind(person)
            .bind(format!("funnel.{funnel}"))
            .fetch_optional(&env.pool)
            .await
            .unwrap();
        let c = env.command(&id?.to_string()).await?;
        (c.data["stage"] == stage).then_some(c)
    })
    .await
}

async fn subjects(gateway: &str, person: &str) -> Vec<String> {
    let (_, feed) = get(&format!("{gateway}/v1/owners/{person}/feed")).await;
    feed["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["subject"].as_str().unwrap().to_owned())
        .collect()
}

async fn wait_message(gateway: &str, person: &str, subject: &str) {
    eventually(WAIT, &format!("{person} to get `{subject}`"), || async {
        subjects(gateway, person)
            .await
            .iter()
            .any(|s| s == subject)
            .then_some(())
    })
    .await;
}

async fn pending_codes(gateway: &str, person: &str) -> Vec<String> {
    let (_, feed) = get(&format!("{gateway}/v1/owners/{person}/feed")).await;
    feed["pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["code"].as_str().unwrap().to_owned())
        .collect()
}

/// Fires every timer due within `ahead`, as a scheduler would once that time has come.
async fn time_passes(env: &TestEnv, ahead: chrono::Duration) {
    let scheduler = env.scheduler(Arc::new(ManualClock::new(Utc::now() + ahead)));
    while scheduler.fire_due().await.unwrap() > 0 {}
}

/// Approves the person's open membership (an admin event addressed to the command).
async fn approve_membership(env: &TestEnv, gateway: &str, person: &str) {
    let id: uuid::Uuid = eventually(WAIT, "the spawned membership", || async {
        sqlx::query_scalar("SELECT id FROM commands WHERE owner = $1 AND kind = 'membership' AND state = 'waiting'")
            .bind(person)
            .fetch_optional(&env.pool)
            .await
            .unwrap()
    })
    .await;
    send(
        gateway,
        &event(
            "membership.approved",
            Some(&id.to_string()),
            json!({"by": "admin:1"}),
        ),
    )
    .await;
}

#[tokio::test]
async fn lead_to_visitor() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    send(
        &gw.url,
        &about("lead.created", "lead:1", json!({"name": "Ada"})),
    )
    .await;
    at_stage(&env, "lead:1", "lead_to_visitor", "lead").await;
    wait_message(&gw.url, "lead:1", "Welcome, Ada").await;
    assert!(
        pending_codes(&gw.url, "lead:1")
            .await
            .contains(&"visit.invited".to_owned())
    );
    time_passes(
        &env,
        chrono::Duration::days(2) + chrono::Duration::minutes(1),
    )
    .await;
    wait_message(&gw.url, "lead:1", "Ada, still thinking it over?").await;
    send(&gw.url, &about("visitor.arrived", "lead:1", json!({}))).await;
    let done = at_stage(&env, "lead:1", "lead_to_visitor", "visitor").await;
    env.wait_state(&done.id.to_string(), CommandState::Completed)
        .await;
    assert!(
        !pending_codes(&gw.url, "lead:1")
            .await
            .contains(&"visit.invited".to_owned())
    );
    env.cleanup().await;
}

#[tokio::test]
async fn visitor_to_member_then_member_to_client() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let person = "visitor:cookie-9";
    send(
        &gw.url,
        &about("visitor.arrived", person, json!({"name": "Bo"})),
    )
    .await;
    // A second arrival does not start a second funnel for the same person.
    send(
        &gw.url,
        &about("visitor.arrived", person, json!({"name": "Bo"})),
    )
    .await;
    at_stage(&env, person, "visitor_to_member", "visitor").await;
    eventually(WAIT, "membership.required", || async {
        pending_codes(&gw.url, person)
            .await
            .contains(&"membership.required".to_owned())
            .then_some(())
    })
    .await;
    // A visitor who has not signed up after 3 days gets a personal nudge.
    time_passes(
        &env,
        chrono::Duration::days(3) + chrono::Duration::minutes(1),
    )
    .await;
    wait_message(&gw.url, person, "Bo, your member prices are waiting").await;
    let funnels: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM commands WHERE owner = $1 AND kind = 'funnel.visitor_to_member'",
    )
    .bind(person)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(funnels, 1, "one funnel command per person and funnel");

    send(&gw.url, &about("member.signed_up", person, json!({}))).await;
    at_stage(&env, person, "visitor_to_member", "applicant").await;
    eventually(WAIT, "membership.pending", || async {
        let codes = pending_codes(&gw.url, person).await;
        (codes.contains(&"membership.pending".to_owned())
            && !codes.contains(&"membership.required".to_owned()))
        .then_some(())
    })
    .await;
    approve_membership(&env, &gw.url, person).await;
    let member = at_stage(&env, person, "visitor_to_member", "member").await;
    env.wait_state(&member.id.to_string(), CommandState::Completed)
        .await;
    eventually(WAIT, "membership.approved", || async {
        pending_codes(&gw.url, person)
            .await
            .contains(&"membership.approved".to_owned())
            .then_some(())
    })
    .await;

    // member.approved started the next funnel.
    at_stage(&env, person, "member_to_client", "member").await;
    time_passes(
        &env,
        chrono::Duration::days(7) + chrono::Duration::minutes(1),
    )
    .await;
    wait_message(&gw.url, person, "Bo, still thinking it over?").await;
    send(&gw.url, &about("order.placed", person, json!({}))).await; // no total: the guard holds it
    tokio::time::sleep(Duration::from_millis(300)).await;
    at_stage(&env, person, "member_to_client", "member").await;
    send(
        &gw.url,
        &about("order.placed", person, json!({"total": 42})),
    )
    .await;
    let client = at_stage(&env, person, "member_to_client", "client").await;
    env.wait_state(&client.id.to_string(), CommandState::Completed)
        .await;
    env.cleanup().await;
}

#[tokio::test]
async fn lead_to_supplier_and_lead_to_shipper() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    send(
        &gw.url,
        &about("supplier.applied", "supplier:3", json!({"name": "Acme"})),
    )
    .await;
    send(
        &gw.url,
        &about("shipper.applied", "shipper:4", json!({"name": "Swift"})),
    )
    .await;
    at_stage(&env, "supplier:3", "lead_to_supplier", "applicant").await;
    at_stage(&env, "shipper:4", "lead_to_shipper", "applicant").await;
    wait_message(&gw.url, "supplier:3", "We received your application, Acme").await;
    time_passes(
        &env,
        chrono::Duration::days(2) + chrono::Duration::minutes(1),
    )
    .await;
    wait_message(
        &gw.url,
        "supplier:3",
        "Your application is still under review",
    )
    .await;
    wait_message(
        &gw.url,
        "shipper:4",
        "Your application is still under review",
    )
    .await;

    send(
        &gw.url,
        &about("supplier.approved", "supplier:3", json!({})),
    )
    .await;
    let s = at_stage(&env, "supplier:3", "lead_to_supplier", "supplier").await;
    env.wait_state(&s.id.to_string(), CommandState::Completed)
        .await;

    send(&gw.url, &about("shipper.approved", "shipper:4", json!({}))).await;
    at_stage(&env, "shipper:4", "lead_to_shipper", "onboarding").await;
    send(&gw.url, &about("shipment.accepted", "shipper:4", json!({}))).await;
    let s = at_stage(&env, "shipper:4", "lead_to_shipper", "shipper").await;
    env.wait_state(&s.id.to_string(), CommandState::Completed)
        .await;
    env.cleanup().await;
}

#[tokio::test]
async fn lead_to_client_the_whole_path() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let person = "lead:77";
    send(
        &gw.url,
        &about("lead.created", person, json!({"name": "Cy"})),
    )
    .await;
    at_stage(&env, person, "lead_to_client", "lead").await;
    send(&gw.url, &about("visitor.arrived", person, json!({}))).await;
    at_stage(&env, person, "lead_to_client", "visitor").await;
    time_passes(
        &env,
        chrono::Duration::days(3) + chrono::Duration::minutes(1),
    )
    .await;
    wait_message(&gw.url, person, "Cy, your member prices are waiting").await;
    send(&gw.url, &about("member.signed_up", person, json!({}))).await;
    at_stage(&env, person, "lead_to_client", "applicant").await;
    approve_membership(&env, &gw.url, person).await;
    at_stage(&env, person, "lead_to_client", "member").await;
    send(
        &gw.url,
        &about("order.placed", person, json!({"total": 99})).clone(),
    )
    .await;
    let done = at_stage(&env, person, "lead_to_client", "client").await;
    let done = env
        .wait_state(&done.id.to_string(), CommandState::Completed)
        .await;
    assert_eq!(
        done.data["stages"],
        json!(["lead", "visitor", "applicant", "member", "client"])
    );
    env.cleanup().await;
}
