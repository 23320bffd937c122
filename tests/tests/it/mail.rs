//! E-mail delivery end to end, against the real services and an SMTP sink that refuses some
//! recipients: each message is sent on its own, a bad address blocks nothing behind it, a
//! message given up ends `failed` with its reason (listed by the API), and a message that
//! cannot render fails alone, not the command that sent it.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cmdflow_shared::CommandState;
use cmdflow_shared::decision::Channel;
use cmdflow_tests::smtp::{BUSY_DOMAIN, REFUSED_DOMAIN, SmtpSink, TARPIT_DOMAIN};
use cmdflow_tests::{TestEnv, eventually, get, post};
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// A world whose workers send e-mail to `sink`, with `adjust` applied to the config.
async fn world(sink: &SmtpSink, adjust: impl FnOnce(&mut cmdflow_shared::Config)) -> TestEnv {
    let smtp = format!("smtp://127.0.0.1:{}", sink.port);
    TestEnv::with(|c| {
        c.smtp_url = Some(smtp);
        adjust(c);
    })
    .await
}

/// Queues an e-mail to `to`, made `age_ms` milliseconds ago (older is nearer the head).
async fn queue_mail(pool: &PgPool, to: &str, age_ms: i64) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO messages (id, owner, command_id, trigger_key, template, channel, subject, body,
                               email_to, delivery, created_at)
         VALUES ($1, 'member:mail', $2, $3, 'membership_pending', 'email', $4, 'Hello', $5,
                 'pending', now() - make_interval(secs => $6::float8 / 1000))",
    )
    .bind(id)
    .bind(Uuid::now_v7())
    .bind(id.to_string())
    .bind(format!("Mail to {to}"))
    .bind(to)
    .bind(age_ms as f64)
    .execute(pool)
    .await
    .unwrap();
    id
}

/// `(delivery, attempts, reason)` of a message.
async fn state_of(pool: &PgPool, id: Uuid) -> (String, i32, Option<String>) {
    sqlx::query_as("SELECT delivery, attempts, last_error FROM messages WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn delivered_to(sink: &SmtpSink, to: &str) -> bool {
    sink.mails()
        .iter()
        .any(|m| m.contains(&format!("Subject: Mail to {to}")))
}

#[tokio::test]
async fn sixty_refused_addresses_at_the_head_stop_none_of_the_forty_good_ones() {
    let sink = SmtpSink::start().await.unwrap();
    let mut env = world(&sink, |_| {}).await;
    // The refused ones first: the oldest 50 pending were once all the sender ever looked at.
    let mut refused = Vec::new();
    for i in 0..60 {
        let to = format!("nobody{i}@{REFUSED_DOMAIN}");
        refused.push(queue_mail(&env.pool, &to, 100_000 - i).await);
    }
    for i in 0..40 {
        queue_mail(&env.pool, &format!("member{i}@example.test"), 1_000 - i).await;
    }
    let gw = env.start_gateway().await;
    env.start_worker().await;

    eventually(WAIT, "all 40 good e-mails at the SMTP server", || async {
        (sink.mails().len() == 40).then_some(())
    })
    .await;
    for i in 0..40 {
        assert!(delivered_to(&sink, &format!("member{i}@example.test")));
    }
    eventually(WAIT, "the 60 refused ones failed", || async {
        let failed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM messages WHERE delivery = 'failed'")
                .fetch_one(&env.pool)
                .await
                .unwrap();
        (failed == 60).then_some(())
    })
    .await;
    // A 5xx refusal is for good: failed at the first attempt, with the server's words.
    for id in &refused {
        let (delivery, attempts, reason) = state_of(&env.pool, *id).await;
        assert_eq!((delivery.as_str(), attempts), ("failed", 1));
        assert!(
            reason
                .as_deref()
                .unwrap_or_default()
                .contains("No such mailbox"),
            "{reason:?}"
        );
    }
    let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE delivery = 'sent'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(sent, 40);

    // Ops see them, each with its reason.
    let (status, answer) = get(&format!("{}/v1/messages?state=failed&limit=1000", gw.url)).await;
    assert_eq!(status, 200, "{answer}");
    let listed = answer["messages"].as_array().unwrap();
    assert_eq!(listed.len(), 60, "{answer}");
    for m in listed {
        assert_eq!(m["delivery"], "failed");
        assert!(
            m["email_to"]
                .as_str()
                .unwrap()
                .ends_with(&format!("@{REFUSED_DOMAIN}"))
        );
        assert!(
            m["reason"].as_str().unwrap().contains("No such mailbox"),
            "{m}"
        );
        assert!(m["failed_at"].is_string(), "{m}");
    }
    let (status, answer) = get(&format!("{}/v1/messages?state=sent&limit=1000", gw.url)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["messages"].as_array().unwrap().len(), 40);
    let (status, answer) = get(&format!("{}/v1/messages?state=kept", gw.url)).await;
    assert_eq!(status, 422, "{answer}");
    env.cleanup().await;
}

#[tokio::test]
async fn an_address_that_never_answers_at_the_head_does_not_delay_the_one_behind_it() {
    let sink = SmtpSink::start().await.unwrap();
    let mut env = world(&sink, |_| {}).await;
    let stuck = queue_mail(&env.pool, &format!("slow@{TARPIT_DOMAIN}"), 60_000).await;
    queue_mail(&env.pool, "next@example.test", 1_000).await;
    let started = Instant::now();
    env.start_worker().await;
    eventually(WAIT, "the good e-mail at the SMTP server", || async {
        delivered_to(&sink, "next@example.test").then_some(())
    })
    .await;
    // A sender that waited for the head would wait for its time-out (10 s at the least).
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the good e-mail waited {:?} behind the silent one",
        started.elapsed()
    );
    // The silent one times out and is tried again later, not given up at once.
    let (delivery, attempts, reason) =
        eventually(WAIT, "the silent one's attempt recorded", || async {
            let state = state_of(&env.pool, stuck).await;
            state.2.is_some().then_some(state)
        })
        .await;
    assert_eq!((delivery.as_str(), attempts), ("pending", 1), "{reason:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_server_busy_for_good_fails_the_message_after_its_attempts_with_back_off() {
    let sink = SmtpSink::start().await.unwrap();
    let mut env = world(&sink, |c| {
        c.mail_attempts = 3;
        c.mail_retry_first = Duration::from_millis(300);
        c.mail_retry_max = Duration::from_millis(600);
    })
    .await;
    let busy = queue_mail(&env.pool, &format!("later@{BUSY_DOMAIN}"), 1_000).await;
    let started = Instant::now();
    env.start_worker().await;
    let (attempts, reason) = eventually(WAIT, "the busy one failed", || async {
        let (delivery, attempts, reason) = state_of(&env.pool, busy).await;
        (delivery == "failed").then_some((attempts, reason))
    })
    .await;
    assert_eq!(attempts, 3);
    assert!(
        reason
            .as_deref()
            .unwrap_or_default()
            .contains("Try again later"),
        "{reason:?}"
    );
    // Two waits between three attempts: 300 ms, then 600 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert!(sink.mails().is_empty());
    env.cleanup().await;
}

/// `test.loyalty`: completes at once and sends a greeting by e-mail with a template that wants a
/// `stage` it is not given (a funnel's template, reused).
fn loyalty_kind(
    command: &cmdflow_shared::Command,
    event: &cmdflow_shared::Event,
) -> Result<cmdflow_shared::Decision, cmdflow_shared::HandlerError> {
    match event.ty.as_str() {
        "command.start" => Ok(cmdflow_shared::Decision::complete(json!({"points": 10}))
            .message_to(
                &command.owner,
                command.data.get("email").and_then(Value::as_str),
                "funnel_welcome",
                Channel::Email,
                Map::new(),
            )),
        _ => Err(cmdflow_shared::HandlerError::unexpected(
            "test.loyalty",
            event,
        )),
    }
}

#[tokio::test]
async fn a_template_missing_a_value_fails_the_message_and_the_command_completes() {
    let sink = SmtpSink::start().await.unwrap();
    let mut env = world(&sink, |_| {}).await;
    let mut registry = cmdflow_tests::registry();
    registry.register("test.loyalty", loyalty_kind);
    env.start_worker_custom(
        registry,
        std::sync::Arc::new(cmdflow_shared::time::SystemClock),
    )
    .await;
    let gw = env.start_gateway().await;
    let id = env
        .start_raw(
            "test.loyalty",
            "member:77",
            json!({"name": "Grace", "email": "grace@example.test"}),
        )
        .await;
    let done = env.wait_state(&id, CommandState::Completed).await;
    assert_eq!(done.result, Some(json!({"points": 10})));
    let (delivery, attempts, reason) = sqlx::query_as::<_, (String, i32, Option<String>)>(
        "SELECT delivery, attempts, last_error FROM messages WHERE command_id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((delivery.as_str(), attempts), ("failed", 0));
    let reason = reason.unwrap();
    assert!(
        reason.starts_with("template funnel_welcome:") && reason.contains("stage"),
        "{reason}"
    );
    let (status, answer) = get(&format!("{}/v1/messages?state=failed", gw.url)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["messages"][0]["reason"], json!(reason), "{answer}");
    // Not counted as unread: the person never got it.
    let (status, feed) = get(&format!("{}/v1/owners/member:77/feed", gw.url)).await;
    assert_eq!(status, 200);
    assert!(
        !feed["pending"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["code"] == "message.unread"),
        "{feed}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(sink.mails().is_empty(), "nothing half-rendered went out");
    env.cleanup().await;
}

#[tokio::test]
async fn a_malformed_owner_email_is_refused_at_the_gateway_and_dead_lettered_past_it() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let ev = json!({
        "specversion": "1.0", "id": "lead-1", "source": "web", "type": "lead.captured",
        "subject": "lead:1", "data": {"email": "grace at example"}
    });
    let (status, answer) = post(
        &format!("{}/v1/events", gw.url),
        "application/cloudevents+json",
        &serde_json::to_vec(&ev).unwrap(),
    )
    .await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().contains("data.email"),
        "{answer}"
    );

    let start = json!({"kind": "membership", "owner": "member:5", "data": {"email": "@nowhere"}});
    let (status, answer) = post(
        &format!("{}/v1/commands", gw.url),
        "application/json",
        &serde_json::to_vec(&start).unwrap(),
    )
    .await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().contains("data.email"),
        "{answer}"
    );

    // Sent straight to the broker, the event is a dead letter with its reason.
    env.publish_raw("lead.captured", &serde_json::to_vec(&ev).unwrap())
        .await;
    let letter = eventually(WAIT, "the dead letter", || env.dead_letter_after(0)).await;
    assert!(letter.reason.contains("data.email"), "{}", letter.reason);
    env.cleanup().await;
}
