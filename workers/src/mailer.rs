//! The mailer: sends pending e-mails through SMTP (lettre) to `CMDFLOW_SMTP_URL`, each message
//! on its own.
//!
//! A message is claimed (`FOR UPDATE SKIP LOCKED`, so several workers never take the same one)
//! when it is due, its attempt counted and a lease set in `next_attempt_at`, and the claim is
//! committed before the SMTP conversation starts: no row stays locked while a server is slow.
//! Up to [`IN_FLIGHT`] messages are sent at once, so one slow or refused address never holds up
//! the ones behind it. A failed attempt is tried again after an exponential back-off
//! (`CMDFLOW_MAIL_RETRY_FIRST`, doubled each time, at most `CMDFLOW_MAIL_RETRY_MAX`); a
//! permanent refusal (5xx), an unusable address, or the last of `CMDFLOW_MAIL_ATTEMPTS` ends the
//! message `failed` with its reason, logged at WARN. A worker that dies mid-send leaves its
//! message to be taken again when the lease runs out: an e-mail goes out at least once.

use std::sync::Arc;
use std::time::Duration;

use cmdflow_shared::Config;
use cmdflow_shared::metrics as names;
use cmdflow_shared::store::people::{self, Delivery};
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The most e-mails one worker sends at once.
pub const IN_FLIGHT: usize = 8;
/// How long a claimed message is left to its worker before another may take it: longer than an
/// SMTP conversation can last ([`SEND_TIMEOUT`]).
pub const CLAIM_LEASE: Duration = Duration::from_secs(300);
/// The time one SMTP step may take.
pub const SMTP_TIMEOUT: Duration = Duration::from_secs(10);
/// The time a whole SMTP conversation may take. lettre's own time-out does not cover every
/// read, and a server that never answers must not keep a slot (and its message) for ever.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the mailer looks for due messages when it has nothing in flight to wait for.
const POLL: Duration = Duration::from_millis(500);
/// How often the failed and pending gauges are counted.
const GAUGE_EVERY: Duration = Duration::from_secs(15);

/// How often, and how far apart, an e-mail is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Attempts before the message is failed.
    pub attempts: u32,
    /// The wait after the first failed attempt.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Retry {
    pub fn from_config(config: &Config) -> Retry {
        Retry {
            attempts: config.mail_attempts,
            first: config.mail_retry_first,
            max: config.mail_retry_max,
        }
    }

    /// The wait after failed attempt number `attempt` (1 for the first): `first`, doubled for
    /// each attempt after it, at most `max`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.first
            .checked_mul(1 << doublings)
            .map_or(self.max, |d| d.min(self.max))
    }
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Sent,
    /// Worth another try: a busy server, a lost connection, a time-out.
    Transient(String),
    /// Never deliverable as it is: a 5xx refusal, an address that is not one.
    Permanent(String),
}

/// A claimed message.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub email_to: Option<String>,
    pub subject: String,
    pub body: String,
    /// This attempt's number, 1 for the first.
    pub attempts: i32,
}

/// Sends e-mails from one worker.
#[derive(Clone)]
pub struct Mailer {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    retry: Retry,
}

impl Mailer {
    /// A mailer for `smtp_url`, sending as `from`; Err says which setting is unusable.
    pub fn new(pool: PgPool, smtp_url: &str, from: &str, retry: Retry) -> Result<Mailer, String> {
        let transport = smtp_transport(smtp_url)?;
        let from = from
            .parse::<Mailbox>()
            .map_err(|e| format!("CMDFLOW_MAIL_FROM `{from}` is not a mailbox: {e}"))?;
        Ok(Mailer {
            inner: Arc::new(Inner {
                pool,
                transport,
                from,
                retry,
            }),
        })
    }

    /// Sends due e-mails until `shutdown` fires; then waits (a little) for those in flight.
    pub async fn send_until_stopped(self, shutdown: CancellationToken) {
        let mut in_flight = JoinSet::new();
        let mut counted_at: Option<tokio::time::Instant> = None;
        loop {
            let free = IN_FLIGHT - in_flight.len();
            if free > 0 {
                match self.claim_due(free).await {
                    Ok(claimed) => {
                        for message in claimed {
                            let mailer = self.clone();
                            in_flight.spawn(async move { mailer.attempt(message).await });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Claiming e-mails to send failed; trying again shortly.");
                    }
                }
            }
            if counted_at.is_none_or(|at| at.elapsed() >= GAUGE_EVERY) {
                self.count().await;
                counted_at = Some(tokio::time::Instant::now());
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
        // Sends cut short here are taken again when their lease runs out.
        let finish = async { while in_flight.join_next().await.is_some() {} };
        drop(tokio::time::timeout(SMTP_TIMEOUT, finish).await);
    }

    /// Claims up to `limit` due messages (`next_attempt_at` unset or past): counts their attempt
    /// and leases them for [`CLAIM_LEASE`], longest due first (a new message is due since it was
    /// made), skipping those another worker holds.
    pub async fn claim_due(&self, limit: usize) -> Result<Vec<Claimed>, sqlx::Error> {
        sqlx::query_as(
            "WITH due AS (
                SELECT id FROM messages
                 WHERE delivery = $1 AND coalesce(next_attempt_at, created_at) <= now()
                 ORDER BY coalesce(next_attempt_at, created_at)
                 LIMIT $2 FOR UPDATE SKIP LOCKED)
             UPDATE messages m
                SET attempts = m.attempts + 1,
                    next_attempt_at = now() + make_interval(secs => $3)
               FROM due WHERE m.id = due.id
             RETURNING m.id, m.email_to, m.subject, m.body, m.attempts",
        )
        .bind(Delivery::Pending.as_str())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(CLAIM_LEASE.as_secs_f64())
        .fetch_all(&self.inner.pool)
        .await
    }

    /// Sends one claimed message and records what came of it.
    pub async fn attempt(&self, message: Claimed) {
        let outcome = self.send(&message).await;
        if let Err(e) = self.record(&message, &outcome).await {
            // The lease runs out and the message is tried again.
            tracing::warn!(message.id = %message.id, error = %e, "Recording an e-mail attempt failed; it will be tried again.");
        }
    }

    async fn send(&self, message: &Claimed) -> Attempt {
        let Some(to) = &message.email_to else {
            return Attempt::Permanent("no address to send to".to_owned());
        };
        let to = match to.parse::<Mailbox>() {
            Ok(to) => to,
            Err(e) => return Attempt::Permanent(format!("to `{to}`: {e}")),
        };
        let email = match Message::builder()
            .from(self.inner.from.clone())
            .to(to)
            .subject(message.subject.clone())
            .body(message.body.clone())
        {
            Ok(email) => email,
            Err(e) => return Attempt::Permanent(e.to_string()),
        };
        match tokio::time::timeout(SEND_TIMEOUT, self.inner.transport.send(email)).await {
            Ok(Ok(_)) => Attempt::Sent,
            Ok(Err(e)) if e.is_permanent() => Attempt::Permanent(e.to_string()),
            Ok(Err(e)) => Attempt::Transient(e.to_string()),
            Err(_) => Attempt::Transient(format!(
                "the SMTP server did not finish within {SEND_TIMEOUT:?}"
            )),
        }
    }

    /// Stores an attempt's outcome, fenced by the attempt number: a message whose lease ran
    /// out and that another worker took is left to that worker.
    async fn record(&self, message: &Claimed, outcome: &Attempt) -> Result<(), sqlx::Error> {
        let attempt = u32::try_from(message.attempts).unwrap_or(0);
        let (delivery, reason, retry_in) = match outcome {
            Attempt::Sent => (Delivery::Sent, None, None),
            Attempt::Permanent(reason) => (Delivery::Failed, Some(reason), None),
            Attempt::Transient(reason) if attempt >= self.inner.retry.attempts => {
                (Delivery::Failed, Some(reason), None)
            }
            Attempt::Transient(reason) => (
                Delivery::Pending,
                Some(reason),
                Some(self.inner.retry.backoff(attempt)),
            ),
        };
        let done = sqlx::query(
            "UPDATE messages
                SET delivery = $3,
                    last_error = $4,
                    sent_at = CASE WHEN $3 = 'sent' THEN now() END,
                    failed_at = CASE WHEN $3 = 'failed' THEN now() END,
                    next_attempt_at = CASE WHEN $5::float8 IS NULL THEN NULL
                                           ELSE now() + make_interval(secs => $5) END
              WHERE id = $1 AND attempts = $2 AND delivery = 'pending'",
        )
        .bind(message.id)
        .bind(message.attempts)
        .bind(delivery.as_str())
        .bind(reason)
        .bind(retry_in.map(|d| d.as_secs_f64()))
        .execute(&self.inner.pool)
        .await?;
        if done.rows_affected() == 0 {
            tracing::debug!(message.id = %message.id, attempt, "An e-mail's lease ran out before its attempt was recorded; another worker has it.");
            return Ok(());
        }
        let label = match delivery {
            Delivery::Sent => "sent",
            Delivery::Failed => "failed",
            _ => "retry",
        };
        metrics::counter!(names::MAIL_ATTEMPTS, "outcome" => label).increment(1);
        match (delivery, reason) {
            (Delivery::Failed, Some(reason)) => {
                metrics::counter!(names::MESSAGES_FAILED_TOTAL).increment(1);
                tracing::warn!(message.id = %message.id, attempt, reason = %reason, "An e-mail failed for good; it will not be sent.");
            }
            (Delivery::Pending, Some(reason)) => {
                tracing::info!(message.id = %message.id, attempt, reason = %reason, retry_in = ?retry_in, "An e-mail attempt failed; it will be tried again.");
            }
            _ => {}
        }
        Ok(())
    }

    /// Sets the failed and pending gauges.
    async fn count(&self) {
        match people::count_failed_and_pending(&self.inner.pool).await {
            Ok((failed, pending)) => {
                metrics::gauge!(names::MESSAGES_FAILED).set(failed as f64);
                metrics::gauge!(names::MAIL_PENDING).set(pending as f64);
            }
            Err(e) => tracing::debug!(error = %e, "Counting messages failed."),
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
            .timeout(Some(SMTP_TIMEOUT))
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_from_the_first_wait_up_to_the_longest() {
        let retry = Retry {
            attempts: 5,
            first: Duration::from_secs(30),
            max: Duration::from_secs(3600),
        };
        let waits: Vec<u64> = (1..=9).map(|a| retry.backoff(a).as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(retry.backoff(0).as_secs(), 30);
        assert_eq!(retry.backoff(u32::MAX), retry.max);
    }

    #[test]
    fn an_smtp_url_names_host_and_port() {
        assert!(smtp_transport("smtp://127.0.0.1:2525").is_ok());
        assert!(smtp_transport("smtp://relay").is_ok());
        assert!(smtp_transport("http://relay").is_err());
        assert!(smtp_transport("smtp://:25").is_err());
        assert!(smtp_transport("smtp://relay:port").is_err());
    }
}
