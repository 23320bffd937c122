//! Remote deciders: kinds whose decisions a service in any language makes, over HTTP (see
//! [`cmdflow_shared::remote`] for the protocol).
//!
//! HTTP rather than an AMQP request/reply queue: every language has an HTTP server in its
//! standard library, a request and its answer are one exchange that a signature covers whole,
//! and the worker holds the command's lock for exactly one bounded call.
//!
//! Declared in a TOML file (`CMDFLOW_DECIDERS_FILE`, or [`Registry::deciders`]):
//!
//! ```toml
//! [[decider]]
//! kind = "billing.invoice"
//! url = "http://billing:9000/decide"
//! secret_env = "BILLING_DECIDER_SECRET"   # the shared secret, read from this variable
//! # or: secret_file = "/var/run/secrets/billing/decider"  (a mounted secret; trailing newline cut)
//! timeout = "5s"                          # default 5s; always below the lock's TTL
//! start_on = ["invoice.requested"]        # broadcasts that start it (optional)
//! description = "An invoice, from draft to paid"
//! ```

use std::time::Duration;

use cmdflow_shared::remote::{self, ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use cmdflow_shared::{Command, Decision, Event};
use serde::Deserialize;

/// One remote kind: where its decider listens and the secret it shares with cmdflow.
#[derive(Clone)]
pub struct RemoteDecider {
    url: String,
    secret: Vec<u8>,
    timeout: Duration,
    client: reqwest::Client,
}

impl std::fmt::Debug for RemoteDecider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs.
        f.debug_struct("RemoteDecider")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why a remote decision could not be had.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Try again later: a timeout, a refused connection, a 5xx, 408 or 429.
    #[error("decider {url} is unavailable: {reason}")]
    Unavailable { url: String, reason: String },
    /// The decider refused the event (another 4xx), in its own words.
    #[error("decider {url} refused the event ({status}): {reason}")]
    Refused {
        url: String,
        status: u16,
        reason: String,
    },
    /// The answer is not a decision: the field and what is wrong with it.
    #[error("decider {url} answered an invalid decision: {reason}")]
    Invalid { url: String, reason: String },
}

impl RemoteDecider {
    /// A decider at `url` (http), signing with `secret`, each call bounded by `timeout`.
    pub fn new(url: &str, secret: &[u8], timeout: Duration) -> Result<Self, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("url `{url}`: {e}"))?;
        if parsed.scheme() != "http" {
            return Err(format!(
                "url `{url}`: only http is supported; keep the decider inside the cluster (a \
                 service mesh adds mutual TLS) — every request is signed"
            ));
        }
        if secret.len() < 16 {
            return Err("the shared secret must be at least 16 bytes".to_owned());
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            url: url.to_owned(),
            secret: secret.to_vec(),
            timeout,
            client,
        })
    }

    /// The call's bound.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Asks the decider what `event` does to `command`.
    pub async fn decide(&self, command: &Command, event: &Event) -> Result<Decision, RemoteError> {
        let body = serde_json::to_vec(&remote::request_body(command, event)).unwrap_or_default();
        let timestamp = chrono::Utc::now().timestamp();
        let signature = remote::sign(&self.secret, &event.id, timestamp, &body);
        let unavailable = |reason: String| RemoteError::Unavailable {
            url: self.url.clone(),
            reason,
        };
        let answer = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(ID_HEADER, &event.id)
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await
            .map_err(|e| unavailable(without_url(&e)))?;
        let status = answer.status();
        let bytes = answer
            .bytes()
            .await
            .map_err(|e| unavailable(without_url(&e)))?;
        if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
            return Err(unavailable(format!("{status}: {}", snippet(&bytes))));
        }
        if !status.is_success() {
            return Err(RemoteError::Refused {
                url: self.url.clone(),
                status: status.as_u16(),
                reason: snippet(&bytes),
            });
        }
        remote::parse_decision(&bytes).map_err(|reason| RemoteError::Invalid {
            url: self.url.clone(),
            reason,
        })
    }
}

/// The error without the URL reqwest repeats (the caller names it once).
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind} ({detail})")
    }
}

/// The start of an answer's body, for a reason.
fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.is_empty() {
        "no body".to_owned()
    } else {
        cmdflow_shared::contract::clip_to(text, 500)
    }
}

/// One `[[decider]]` of a deciders file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeciderDef {
    pub kind: String,
    pub url: String,
    /// The environment variable that holds the shared secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Or the file that holds it (a mounted secret); a trailing newline is not part of it.
    #[serde(default)]
    pub secret_file: Option<String>,
    /// The bound of one call, such as `5s` (default 5 s).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Broadcast types that start a command of this kind.
    #[serde(default)]
    pub start_on: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecidersFile {
    #[serde(default)]
    decider: Vec<DeciderDef>,
}

/// The default bound of one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses a deciders file: `file` names it in errors.
pub fn parse_file(file: &str, text: &str) -> Result<Vec<DeciderDef>, String> {
    let parsed: DecidersFile = toml::from_str(text).map_err(|e| format!("{file}: {e}"))?;
    for (i, d) in parsed.decider.iter().enumerate() {
        let at = |field: &str| format!("{file}: decider[{i}] ({}).{field}", d.kind);
        cmdflow_shared::domain::Kind::parse(&d.kind).map_err(|e| format!("{}: {e}", at("kind")))?;
        if d.secret_env.is_some() == d.secret_file.is_some() {
            return Err(format!(
                "{}: give exactly one of secret_env and secret_file",
                at("secret_env")
            ));
        }
        if let Some(t) = &d.timeout {
            humantime::parse_duration(t)
                .map_err(|e| format!("{}: `{t}` is not a duration ({e})", at("timeout")))?;
        }
        for (j, ty) in d.start_on.iter().enumerate() {
            cmdflow_shared::domain::check_dotted_name(ty, 2)
                .map_err(|e| format!("{}: {e}", at(&format!("start_on[{j}]"))))?;
        }
    }
    Ok(parsed.decider)
}

impl DeciderDef {
    /// The decider it declares, reading its secret from the environment or its file;
    /// `lock_ttl` bounds the call (to half of it), so the command's lock outlives the wait.
    pub fn build(&self, lock_ttl: Duration) -> Result<RemoteDecider, String> {
        let secret = match (&self.secret_env, &self.secret_file) {
            (Some(var), _) => std::env::var(var).map_err(|_| {
                format!(
                    "decider {}: the secret variable {var} is not set",
                    self.kind
                )
            })?,
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| format!("decider {}: secret_file {file}: {e}", self.kind))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            (None, None) => {
                return Err(format!(
                    "decider {}: no secret_env or secret_file",
                    self.kind
                ));
            }
        };
        let timeout = match &self.timeout {
            Some(t) => humantime::parse_duration(t).map_err(|e| e.to_string())?,
            None => DEFAULT_TIMEOUT,
        };
        let bound = lock_ttl / 2;
        if timeout > bound {
            return Err(format!(
                "decider {}: timeout {} must stay below half the lock's TTL ({})",
                self.kind,
                humantime::format_duration(timeout),
                humantime::format_duration(bound)
            ));
        }
        RemoteDecider::new(&self.url, secret.as_bytes(), timeout)
            .map_err(|e| format!("decider {}: {e}", self.kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deciders_file_names_what_is_wrong() {
        let ok = "[[decider]]\nkind = \"billing.invoice\"\nurl = \"http://billing:9000/decide\"\n\
                  secret_env = \"S\"\nstart_on = [\"invoice.requested\"]\n";
        let defs = parse_file("d.toml", ok).unwrap();
        assert_eq!(defs[0].start_on, ["invoice.requested"]);
        for (text, want) in [
            (
                "[[decider]]\nkind = \"Bad Kind\"\nurl = \"http://x\"\nsecret_env = \"S\"\n",
                "kind",
            ),
            (
                "[[decider]]\nkind = \"a.b\"\nurl = \"http://x\"\n",
                "exactly one of secret_env and secret_file",
            ),
            (
                "[[decider]]\nkind = \"a.b\"\nurl = \"http://x\"\nsecret_env = \"S\"\ntimeout = \"soon\"\n",
                "timeout",
            ),
            (
                "[[decider]]\nkind = \"a.b\"\nurl = \"http://x\"\nsecret_env = \"S\"\ncolour = 1\n",
                "colour",
            ),
        ] {
            let e = parse_file("d.toml", text).unwrap_err();
            assert!(e.contains("d.toml") && e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_decider_is_http_with_a_real_secret_and_a_bound_below_the_lock() {
        let secret = b"0123456789abcdef";
        assert!(RemoteDecider::new("https://x/decide", secret, DEFAULT_TIMEOUT).is_err());
        assert!(RemoteDecider::new("http://x/decide", b"short", DEFAULT_TIMEOUT).is_err());
        RemoteDecider::new("http://x/decide", secret, DEFAULT_TIMEOUT).unwrap();
        let def = DeciderDef {
            kind: "a.b".into(),
            url: "http://x/decide".into(),
            secret_env: None,
            secret_file: Some("/nonexistent/secret".into()),
            timeout: Some("20s".into()),
            start_on: Vec::new(),
            description: None,
        };
        assert!(
            def.build(Duration::from_secs(30))
                .unwrap_err()
                .contains("/nonexistent/secret")
        );
    }
}
