//! The owner feed, business kinds, identity links and personal messages, end to end.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_shared::CommandState;
use cmdflow_tests::smtp::SmtpSink;
use cmdflow_tests::{TestEnv, event, eventually, get, pending_codes, post, send, start_command};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

async fn feed(gateway: &str, owner: &str) -> Value {
    let (status, feed) = get(&format!("{gateway}/v1/owners/{owner}/feed")).await;
    assert_eq!(status, 200, "{feed}");
    feed
}

async fn wait_codes(gateway: &str, owner: &str, want: &[&str]) -> Value {
    eventually(WAIT, &format!("pending {want:?} for {owner}"), || async {
        let f = feed(gateway, owner).await;
        (pending_codes(&f) == want).then_some(f)
    })
    .await
}

#[tokio::test]
async fn an_unfinished_quote_shows_until_it_is_submitted_and_its_message_until_read() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let quote = start_command(
        &gw.url,
        "quote",
        "visitor:cookie-1",
        json!({"items": ["chair"]}),
    )
    .await;
    let f = wait_codes(&gw.url, "visitor:cookie-1", &["quote.unfinished"]).await;
    assert!(f["name"].is_null(), "no name given: {f}");
    assert_eq!(
        f["pending"][0]["text"],
        "Here is that quote you started but never finished"
    );
    assert_eq!(f["pending"][0]["command_id"], quote);

    send(
        &gw.url,
        &event("quote.updated", Some(&quote), json!({"total": 120})),
    )
    .await;
    eventually(WAIT, "the edit", || async {
        (env.command(&quote).await.unwrap().data["total"] == 120).then_some(())
    })
    .await;
    let submitted = event("quote.submitted", Some(&quote), json!({}));
    send(&gw.url, &submitted).await;
    send(&gw.url, &submitted).await; // a redelivered trigger
    let f = wait_codes(&gw.url, "visitor:cookie-1", &["message.unread"]).await;
    let messages = f["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "one message per triggering event");
    assert_eq!(messages[0]["subject"], "Your quote is on its way, cookie-1");
    assert!(
        messages[0]["body"].as_str().unwrap().contains("for 120"),
        "rendered with the person's data"
    );
    let id = messages[0]["id"].as_str().unwrap();
    let (status, _) = post(
        &format!("{}/v1/owners/visitor:cookie-1/messages/{id}/read", gw.url),
        "application/json",
        b"",
    )
    .await;
    assert_eq!(status, 204);
    wait_codes(&gw.url, "visitor:cookie-1", &[]).await;
    let (status, _) = post(
        &format!("{}/v1/owners/member:999/messages/{id}/read", gw.url),
        "application/json",
        b"",
    )
    .await;
    assert_eq!(status, 404, "not someone else's message");
    env.cleanup().await;
}

#[tokio::test]
async fn the_feed_pages_the_last_queries() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let mut ids = Vec::new();
    // One after the other: "newest" is the order the commands were created in the store.
    for i in 0..12 {
        let id = start_command(
            &gw.url,
            "query",
            "lead:5",
            json!({"q": format!("red chairs {i}")}),
        )
        .await;
        env.wait_state(&id, CommandState::Completed).await;
        ids.push(id);
    }
    for id in &ids {
        env.wait_state(id, CommandState::Completed).await;
    }
    start_command(&gw.url, "quote", "lead:5", json!({})).await;
    let (_, page) = get(&format!(
        "{}/v1/owners/lead:5/feed?kind=query&limit=10",
        gw.url
    ))
    .await;
    let history = page["history"].as_array().unwrap();
    assert_eq!(history.len(), 10);
    assert!(history.iter().all(|c| c["kind"] == "query"));
    assert_eq!(history[0]["command_id"], ids[11], "newest first");
    assert_eq!(history[0]["data"]["q"], "red chairs 11");
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, rest) = get(&format!(
        "{}/v1/owners/lead:5/feed?kind=query&limit=10&cursor={cursor}",
        gw.url
    ))
    .await;
    let rest: Vec<&Value> = rest["history"].as_array().unwrap().iter().collect();
    assert_eq!(rest.len(), 2);
    assert_eq!(rest[1]["command_id"], ids[0]);

    let body =
        serde_json::to_vec(&json!({"kind": "query", "owner": "lead:5", "data": {}})).unwrap();
    let (status, b) = post(
        &format!("{}/v1/commands", gw.url),
        "application/json",
        &body,
    )
    .await;
    assert_eq!(
        (status, b["code"].as_str()),
        (422, Some("invalid_field")),
        "{b}"
    );
    let (status, b) = get(&format!("{}/v1/owners/Pirate:1/feed", gw.url)).await;
    assert_eq!(
        (status, b["code"].as_str()),
        (400, Some("bad_request")),
        "{b}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_membership_goes_from_pending_to_approved() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let m = start_command(&gw.url, "membership", "member:7", json!({"name": "Grace"})).await;
    let f = wait_codes(
        &gw.url,
        "member:7",
        &["membership.pending", "message.unread"],
    )
    .await;
    assert_eq!(f["messages"][0]["subject"], "Your membership is pending");
    assert_eq!(f["name"], "Grace", "the name the person gave");
    let (_, view) = get(&format!("{}/v1/commands/{m}", gw.url)).await;
    assert_eq!(
        view["timers"][0]["cron"], "0 10 * * 1-5",
        "the weekday reminder to approvers"
    );
    send(
        &gw.url,
        &event("membership.approved", Some(&m), json!({"by": "admin:1"})),
    )
    .await;
    let f = eventually(WAIT, "approved", || async {
        let f = feed(&gw.url, "member:7").await;
        pending_codes(&f)
            .contains(&"membership.approved".to_owned())
            .then_some(f)
    })
    .await;
    assert!(!pending_codes(&f).contains(&"membership.pending".to_owned()));
    assert!(
        f["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["subject"] == "Welcome, Grace: your membership is approved")
    );
    assert!(env.command(&m).await.unwrap().state == CommandState::Completed);
    env.cleanup().await;
}

#[tokio::test]
async fn a_visitor_linked_to_a_member_keeps_one_history() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let quote = start_command(&gw.url, "quote", "visitor:cookie-7f3a", json!({})).await;
    let query = start_command(&gw.url, "query", "member:42", json!({"q": "tables"})).await;
    env.wait_state(&query, CommandState::Completed).await;
    env.wait_state(&quote, CommandState::Running).await;
    let mut link = event(
        "owner.linked",
        None,
        json!({"from": "visitor:cookie-7f3a", "to": "member:42"}),
    );
    link["subject"] = json!("member:42");
    send(&gw.url, &link).await;
    for owner in ["member:42", "visitor:cookie-7f3a"] {
        let f = eventually(WAIT, "one history", || async {
            let f = feed(&gw.url, owner).await;
            (f["history"].as_array().unwrap().len() == 2).then_some(f)
        })
        .await;
        assert_eq!(
            pending_codes(&f),
            vec!["quote.unfinished"],
            "the cookie's quote follows the person"
        );
        let mut identities: Vec<&str> = f["identities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        identities.sort();
        assert_eq!(identities, vec!["member:42", "visitor:cookie-7f3a"]);
    }
    // A later link (the member becomes a client) carries the whole person along.
    let mut link = event(
        "owner.linked",
        None,
        json!({"from": "member:42", "to": "client:42"}),
    );
    link["subject"] = json!("client:42");
    send(&gw.url, &link).await;
    eventually(WAIT, "the client sees it all", || async {
        let f = feed(&gw.url, "client:42").await;
        (f["history"].as_array().unwrap().len() == 2
            && f["identities"].as_array().unwrap().len() == 3)
            .then_some(())
    })
    .await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_email_reaches_the_smtp_server_and_without_one_is_kept_in_the_app() {
    let sink = SmtpSink::start().await.unwrap();
    let smtp = format!("smtp://127.0.0.1:{}", sink.port);
    let mut env = TestEnv::with(|c| c.smtp_url = Some(smtp.clone())).await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    start_command(
        &gw.url,
        "membership",
        "member:8",
        json!({"name": "Linus", "email": "linus@example.test"}),
    )
    .await;
    let mail = eventually(WAIT, "the e-mail at the SMTP server", || async {
        sink.mails().pop()
    })
    .await;
    assert!(
        mail.contains("Subject: Your membership is pending"),
        "{mail}"
    );
    assert!(mail.contains("linus@example.test"), "{mail}");
    assert!(mail.contains("Hello Linus"), "{mail}");
    eventually(WAIT, "marked sent", || async {
        let f = feed(&gw.url, "member:8").await;
        (f["messages"][0]["delivery"] == "sent").then_some(())
    })
    .await;
    env.cleanup().await;

    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    start_command(
        &gw.url,
        "membership",
        "member:9",
        json!({"email": "nobody@example.test"}),
    )
    .await;
    let f = wait_codes(
        &gw.url,
        "member:9",
        &["membership.pending", "message.unread"],
    )
    .await;
    assert_eq!(f["messages"][0]["delivery"], "kept");
    assert!(
        f["pending"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["text"] == "Here is an email: Your membership is pending")
    );
    env.cleanup().await;
}

/// `test.badmessage`: sends the approvers' reminder without the values its template needs.
fn bad_message_kind(
    _: &cmdflow_shared::Command,
    event: &cmdflow_shared::Event,
) -> Result<cmdflow_shared::Decision, cmdflow_shared::HandlerError> {
    match event.ty.as_str() {
        "command.start" => Ok(cmdflow_shared::Decision::nothing().message(
            "membership_reminder",
            cmdflow_shared::decision::Channel::InApp,
            serde_json::Map::new(),
        )),
        _ => Err(cmdflow_shared::HandlerError::unexpected(
            "test.badmessage",
            event,
        )),
    }
}

#[tokio::test]
async fn a_template_error_fails_the_message_with_the_template_name_not_the_command() {
    let mut env = TestEnv::new().await;
    let mut registry = cmdflow_tests::registry();
    registry.register("test.badmessage", bad_message_kind);
    env.start_worker_custom(
        registry,
        std::sync::Arc::new(cmdflow_shared::time::SystemClock),
    )
    .await;
    let id = env
        .start_raw("test.badmessage", "member:50", json!({}))
        .await;
    // The step commits: the command runs on, its message stored failed with the reason.
    env.wait_state(&id, CommandState::Running).await;
    let (delivery, subject, reason): (String, String, Option<String>) =
        sqlx::query_as("SELECT delivery, subject, last_error FROM messages")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(delivery, "failed");
    assert_eq!(subject, "", "nothing half-rendered is kept");
    assert!(
        reason
            .as_deref()
            .unwrap_or_default()
            .starts_with("template membership_reminder:"),
        "{reason:?}"
    );
    env.cleanup().await;
}
