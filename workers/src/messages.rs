//! Personal answers: message templates rendered with minijinja, and the loop that sends e-mails
//! through SMTP (lettre) to `CMDFLOW_SMTP_URL`.
//!
//! A template file's first line is the subject; the rest is the body. Rendering is strict: an
//! undefined value is an error that names the template, so a half-rendered message never goes
//! out. Without SMTP configured, e-mails are kept and shown in the app.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The templates cmdflow ships with.
const BUILTIN: &[(&str, &str)] = &[
    (
        "quote_submitted",
        include_str!("../templates/quote_submitted.txt"),
    ),
    (
        "membership_pending",
        include_str!("../templates/membership_pending.txt"),
    ),
    (
        "membership_approved",
        include_str!("../templates/membership_approved.txt"),
    ),
    (
        "membership_rejected",
        include_str!("../templates/membership_rejected.txt"),
    ),
    (
        "membership_reminder",
        include_str!("../templates/membership_reminder.txt"),
    ),
    (
        "funnel_welcome",
        include_str!("../templates/funnel_welcome.txt"),
    ),
    (
        "funnel_nudge",
        include_str!("../templates/funnel_nudge.txt"),
    ),
    ("funnel_done", include_str!("../templates/funnel_done.txt")),
    (
        "visitor_nudge",
        include_str!("../templates/visitor_nudge.txt"),
    ),
    (
        "application_received",
        include_str!("../templates/application_received.txt"),
    ),
    (
        "application_reminder",
        include_str!("../templates/application_reminder.txt"),
    ),
];

/// Compiled templates.
#[derive(Clone)]
pub struct Templates {
    env: Arc<Environment<'static>>,
}

impl Default for Templates {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Templates {
    pub fn builtin() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.add_filter("date", date_filter);
        for (name, source) in BUILTIN {
            // The built-in templates are compiled into the binary and tested below.
            if let Err(e) = env.add_template(name, source) {
                tracing::error!(template = name, error = %e, "A built-in template does not compile.");
            }
        }
        Self { env: Arc::new(env) }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.env.get_template(name).is_ok()
    }

    /// Renders `name` with `context`: `(subject, body)`, or an error that names the template.
    pub fn render(&self, name: &str, context: &Value) -> Result<(String, String), String> {
        let template = self
            .env
            .get_template(name)
            .map_err(|_| format!("template {name}: no such template"))?;
        let text = template
            .render(minijinja::value::Serde(context))
            .map_err(|e| format!("template {name}: {e}"))?;
        let (subject, body) = text.split_once('\n').unwrap_or((text.as_str(), ""));
        let subject = subject.trim();
        if subject.is_empty() {
            return Err(format!(
                "template {name}: the first line (the subject) is empty"
            ));
        }
        Ok((subject.to_owned(), body.trim_start_matches('\n').to_owned()))
    }
}

/// `{{ when | date }}`: an RFC 3339 time as `26 November 2026`.
fn date_filter(value: String) -> String {
    DateTime::parse_from_rfc3339(&value)
        .map(|t| t.with_timezone(&Utc).format("%-d %B %Y").to_string())
        .unwrap_or(value)
}

/// Sends pending e-mails until `shutdown` fires. Each one is claimed with `SKIP LOCKED`, so
/// several workers never send the same message twice.
pub async fn send_until_stopped(
    pool: PgPool,
    smtp_url: String,
    from: String,
    shutdown: CancellationToken,
) {
    let transport = match smtp_transport(&smtp_url) {
        Ok(transport) => transport,
        Err(e) => {
            tracing::error!(error = %e, "CMDFLOW_SMTP_URL is not a valid SMTP URL; e-mails stay pending.");
            return;
        }
    };
    loop {
        match send_pending(&pool, &transport, &from).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sent = n, "Sent e-mails."),
            Err(e) => tracing::warn!(error = %e, "Sending e-mails failed; trying again shortly."),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// `smtp://host[:port]`: plain SMTP, as a local relay or a test server speaks it. (TLS to a remote
/// server arrives with the security issue.)
pub fn smtp_transport(url: &str) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
    let rest = url
        .strip_prefix("smtp://")
        .ok_or_else(|| format!("`{url}`: expected smtp://host[:port]"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("`{url}`: bad port"))?,
        ),
        None => (rest, 25),
    };
    if host.is_empty() {
        return Err(format!("`{url}`: no host"));
    }
    Ok(
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(Duration::from_secs(10)))
            .build(),
    )
}

async fn send_pending(
    pool: &PgPool,
    transport: &AsyncSmtpTransport<Tokio1Executor>,
    from: &str,
) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(uuid::Uuid, String, String, String)> = sqlx::query_as(
        "SELECT id, email_to, subject, body FROM messages
          WHERE delivery = 'pending' ORDER BY created_at LIMIT 50 FOR UPDATE SKIP LOCKED",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut sent = 0;
    for (id, to, subject, body) in rows {
        let outcome = async {
            let email = Message::builder()
                .from(from.parse::<Mailbox>().map_err(|e| format!("from: {e}"))?)
                .to(to.parse::<Mailbox>().map_err(|e| format!("to {to}: {e}"))?)
                .subject(subject)
                .body(body)
                .map_err(|e| e.to_string())?;
            transport.send(email).await.map_err(|e| e.to_string())
        }
        .await;
        match outcome {
            Ok(_) => {
                sqlx::query("UPDATE messages SET delivery = 'sent', sent_at = now(), last_error = NULL WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sent += 1;
            }
            Err(e) => {
                sqlx::query("UPDATE messages SET last_error = $2 WHERE id = $1")
                    .bind(id)
                    .bind(&e)
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    tx.commit().await?;
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_builtin_templates_render_with_their_data() {
        let t = Templates::builtin();
        for (name, _) in BUILTIN {
            assert!(t.contains(name), "{name} compiles");
        }
        let (subject, body) = t
            .render(
                "quote_submitted",
                &json!({"name": "Ada", "now": "2026-11-26T10:00:00Z", "total": 120}),
            )
            .unwrap();
        assert_eq!(subject, "Your quote is on its way, Ada");
        assert!(
            body.contains("26 November 2026") && body.contains("120"),
            "{body}"
        );
    }

    #[test]
    fn a_missing_value_fails_loudly_with_the_template_name() {
        let err = Templates::builtin()
            .render(
                "membership_approved",
                &json!({"now": "2026-11-26T10:00:00Z"}),
            )
            .unwrap_err();
        assert!(err.starts_with("template membership_approved:"), "{err}");
        let err = Templates::builtin().render("nope", &json!({})).unwrap_err();
        assert!(err.contains("no such template"));
    }
}
