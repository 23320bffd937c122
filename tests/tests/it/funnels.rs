//! The five shipped funnels, end to end by events alone, each with a reminder fired by a timer,
//! and one person's whole journey through them.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cmdflow_shared::CommandState;
use cmdflow_shared::time::ManualClock;
use cmdflow_tests::{
    TestEnv, event, eventually, get, listed_unmatched, pending_codes, send, start_command,
};
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

async fn codes_of(gateway: &str, person: &str) -> Vec<String> {
    let (_, feed) = get(&format!("{gateway}/v1/owners/{person}/feed")).await;
    pending_codes(&feed)
}

/// Fires every timer due within `ahead`, as a scheduler would once that time has come.
async fn time_passes(env: &TestEnv, ahead: chrono::Duration) {
    let scheduler = env.scheduler(Arc::new(ManualClock::new(Utc::now() + ahead)));
    while scheduler.fire_due().await.unwrap() > 0 {}
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
        codes_of(&gw.url, "lead:1")
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
        !codes_of(&gw.url, "lead:1")
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
        codes_of(&gw.url, person)
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

    // The sign-up carries no `time`: the stage is entered when it was accepted, not when the
    // funnel last changed.
    let before_signup = Utc::now();
    send(&gw.url, &about("member.signed_up", person, json!({}))).await;
    let applicant = at_stage(&env, person, "visitor_to_member", "applicant").await;
    let entered: chrono::DateTime<Utc> =
        serde_json::from_value(applicant.data["stage_entered_at"].clone()).unwrap();
    assert!(
        entered >= before_signup,
        "stage_entered_at {entered} is before the sign-up was sent ({before_signup})"
    );
    eventually(WAIT, "membership.pending", || async {
        let codes = codes_of(&gw.url, person).await;
        (codes.contains(&"membership.pending".to_owned())
            && !codes.contains(&"membership.required".to_owned()))
        .then_some(())
    })
    .await;
    answer_membership(&env, &gw.url, person, "membership.approved").await;
    let member = at_stage(&env, person, "visitor_to_member", "member").await;
    env.wait_state(&member.id.to_string(), CommandState::Completed)
        .await;
    eventually(WAIT, "membership.approved", || async {
        codes_of(&gw.url, person)
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

/// The person's feed once it shows exactly `pending` (codes, sorted, besides one `message.unread`
/// per unread message) and `messages` (subjects, oldest first): fails naming what it showed last. Every message is checked to be unique by
/// (command, template), so no step ever sends its message twice.
async fn feed_is(gateway: &str, person: &str, step: &str, pending: &[&str], messages: &[&str]) {
    let want = (
        pending.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        messages.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    );
    let mut last = Value::Null;
    let found = tokio::time::timeout(WAIT, async {
        loop {
            let (_, feed) = get(&format!("{gateway}/v1/owners/{person}/feed")).await;
            let mut codes = pending_codes(&feed);
            // Every unread message is a pending condition of its own: all of them are unread.
            let unread = codes.iter().filter(|c| *c == "message.unread").count();
            codes.retain(|c| c != "message.unread");
            let mut messages = feed["messages"].as_array().unwrap().clone();
            assert_eq!(
                unread,
                messages.len(),
                "{step}: one message.unread per unread message"
            );
            messages.sort_by_key(|m| m["created_at"].as_str().unwrap_or("").to_owned());
            let subjects: Vec<String> = messages
                .iter()
                .map(|m| m["subject"].as_str().unwrap().to_owned())
                .collect();
            let mut sent: Vec<(String, String)> = messages
                .iter()
                .map(|m| (m["command_id"].to_string(), m["template"].to_string()))
                .collect();
            sent.sort();
            let before = sent.len();
            sent.dedup();
            assert_eq!(
                sent.len(),
                before,
                "{step}: a message was sent twice: {feed:#}"
            );
            if (codes.clone(), subjects.clone()) == want {
                return;
            }
            last = json!({"pending": codes, "messages": subjects});
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "{step}: the feed of {person} never showed pending {pending:?} and messages {messages:?}; last {last:#}"
    );
}

/// Links two identities of one person, as the sign-up service does.
async fn link(gateway: &str, from: &str, to: &str) {
    send(
        gateway,
        &event("owner.linked", None, json!({"from": from, "to": to})),
    )
    .await;
}

/// Sends the admin's answer to the person's open membership.
async fn answer_membership(env: &TestEnv, gateway: &str, person: &str, answer: &str) {
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
            answer,
            Some(&id.to_string()),
            json!({"by": "admin:1", "reason": "no references yet"}),
        ),
    )
    .await;
    env.wait_state(&id.to_string(), CommandState::Completed)
        .await;
}

#[tokio::test]
async fn one_person_walks_the_whole_journey() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let (cookie, lead, member) = ("visitor:cookie-cy", "lead:cy", "member:cy");

    // An anonymous visitor starts a quote and leaves.
    let quote = start_command(&gw.url, "quote", cookie, json!({"items": ["desk"]})).await;
    feed_is(&gw.url, cookie, "cookie", &["quote.unfinished"], &[]).await;

    // They leave an address: one lead.created starts one funnel of the client track.
    link(&gw.url, cookie, lead).await;
    send(&gw.url, &about("lead.created", lead, json!({"name": "Cy"}))).await;
    feed_is(
        &gw.url,
        lead,
        "lead",
        &["quote.unfinished", "visit.invited"],
        &["Welcome, Cy"],
    )
    .await;

    // A visit hands them over from lead_to_visitor to visitor_to_member.
    send(
        &gw.url,
        &about("visitor.arrived", lead, json!({"name": "Cy"})),
    )
    .await;
    let steps = ["Welcome, Cy", "Good to see you, Cy"];
    feed_is(
        &gw.url,
        lead,
        "visitor",
        &["membership.required", "quote.unfinished"],
        &steps,
    )
    .await;

    // They sign up as a member: the sign-up's events speak of member:cy, and reach the funnel
    // waiting on lead:cy.
    link(&gw.url, lead, member).await;
    send(&gw.url, &about("member.signed_up", member, json!({}))).await;
    let mut steps = steps.to_vec();
    steps.push("Your membership is pending");
    feed_is(
        &gw.url,
        cookie,
        "applicant",
        &["membership.pending", "quote.unfinished"],
        &steps,
    )
    .await;

    // Rejected: back to the visitor stage, without a second welcome.
    answer_membership(&env, &gw.url, lead, "membership.rejected").await;
    steps.push("About your membership application");
    feed_is(
        &gw.url,
        member,
        "rejected",
        &["membership.required", "quote.unfinished"],
        &steps,
    )
    .await;

    // They apply again, and are approved: the next funnel offers the first order.
    send(&gw.url, &about("member.signed_up", member, json!({}))).await;
    steps.push("Your membership is pending");
    feed_is(
        &gw.url,
        member,
        "re-applied",
        &["membership.pending", "quote.unfinished"],
        &steps,
    )
    .await;
    answer_membership(&env, &gw.url, lead, "membership.approved").await;
    steps.extend([
        "Welcome, Cy: your membership is approved",
        "Your first order ships free, Cy",
    ]);
    let pending = ["client.offer", "membership.approved", "quote.unfinished"];
    feed_is(&gw.url, member, "member", &pending, &steps).await;

    // The first order, placed as member:cy, makes them a client.
    send(
        &gw.url,
        &about("order.placed", member, json!({"total": 99})),
    )
    .await;
    steps.push("Thank you for your first order, Cy");
    feed_is(
        &gw.url,
        lead,
        "client",
        &["membership.approved", "quote.unfinished"],
        &steps,
    )
    .await;

    // One funnel per step of the path, each ended; two applications, one approved.
    let funnels: Vec<(String, String)> = sqlx::query_as(
        "SELECT kind, state::text FROM commands WHERE kind LIKE 'funnel.%' ORDER BY created_at",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let completed = |k: &str| (format!("funnel.{k}"), "completed".to_owned());
    assert_eq!(
        funnels,
        [
            completed("lead_to_visitor"),
            completed("visitor_to_member"),
            completed("member_to_client")
        ]
    );
    let client = at_stage(&env, lead, "visitor_to_member", "member").await;
    assert_eq!(
        client.data["stages"],
        json!(["visitor", "applicant", "visitor", "applicant", "member"])
    );
    assert!(
        !env.command(&quote).await.unwrap().state.is_terminal(),
        "the quote waits for its owner"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_new_application_is_not_decided_by_an_old_answer() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let dave = "lead:dave";
    send(
        &gw.url,
        &about("supplier.applied", dave, json!({"name": "Dave"})),
    )
    .await;
    at_stage(&env, dave, "lead_to_supplier", "applicant").await;
    send(&gw.url, &about("supplier.rejected", dave, json!({}))).await;
    let first = at_stage(&env, dave, "lead_to_supplier", "declined").await;
    env.wait_state(&first.id.to_string(), CommandState::Completed)
        .await;

    // A new application, well inside the early-event window of the old rejection.
    send(
        &gw.url,
        &about("supplier.applied", dave, json!({"name": "Dave"})),
    )
    .await;
    let second = eventually(WAIT, "a second application", || async {
        let c = at_stage(&env, dave, "lead_to_supplier", "applicant").await;
        (c.id != first.id).then_some(c)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = env.command(&second.id.to_string()).await.unwrap();
    assert_eq!(
        second.data["stage"], "applicant",
        "the old rejection decided the new application"
    );
    assert!(!second.state.is_terminal());
    feed_is(
        &gw.url,
        dave,
        "re-applied",
        &["supplier.pending"],
        &[
            "We received your application, Dave",
            "About your application",
            "We received your application, Dave",
        ],
    )
    .await;

    // Its own answer decides it; a third application after the approval waits for its own.
    send(&gw.url, &about("supplier.approved", dave, json!({}))).await;
    let approved = at_stage(&env, dave, "lead_to_supplier", "supplier").await;
    assert_eq!(approved.id, second.id);
    send(
        &gw.url,
        &about("supplier.applied", dave, json!({"name": "Dave"})),
    )
    .await;
    let third = eventually(WAIT, "a third application", || async {
        let c = at_stage(&env, dave, "lead_to_supplier", "applicant").await;
        (c.id != second.id).then_some(c)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.command(&third.id.to_string()).await.unwrap().data["stage"],
        "applicant"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_event_handled_before_the_link_still_reaches_the_persons_funnel() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let (lead, member) = ("lead:eve", "member:eve");
    send(
        &gw.url,
        &about("visitor.arrived", lead, json!({"name": "Eve"})),
    )
    .await;
    at_stage(&env, lead, "visitor_to_member", "visitor").await;
    // The sign-up service's two events took different paths: the sign-up, about member:eve,
    // was handled first, when nothing linked the two yet.
    let signed_up = about("member.signed_up", member, json!({}));
    send(&gw.url, &signed_up).await;
    eventually(WAIT, "the sign-up kept as unmatched", || async {
        listed_unmatched(&gw.url, None, &signed_up)
            .await
            .then_some(())
    })
    .await;
    link(&gw.url, lead, member).await;
    at_stage(&env, lead, "visitor_to_member", "applicant").await;
    assert!(
        !listed_unmatched(&gw.url, None, &signed_up).await,
        "the sign-up matched once the link came"
    );
    env.cleanup().await;
}
