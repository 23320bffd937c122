//! How a command ends when it fails: an exit code a script can branch on (README, "CLI"), and
//! the error on standard error, as one line of text or, with `--json`, one JSON object.

use serde_json::json;

/// The exit codes of a failed command. Success is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Anything not below: a gateway error (5xx), a replay that failed, a server role that
    /// stopped.
    Failure,
    /// The command line, or the request it makes, is invalid: a wrong flag (clap), `--data`
    /// that is not a JSON object, or a 400, 413, 415 or 422 from the gateway.
    Usage,
    /// The credential is missing, wrong (401), or lacks the scope (403).
    Auth,
    /// No such command, dead letter or replay job (404).
    NotFound,
    /// The gateway cannot be reached, or is unavailable for now (408, 429, 502, 503, 504):
    /// try again later.
    Unavailable,
    /// The request conflicts with the current state (409), e.g. resuming a finished replay.
    Conflict,
}

impl Exit {
    pub fn code(self) -> i32 {
        match self {
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::Auth => 3,
            Exit::NotFound => 4,
            Exit::Unavailable => 5,
            Exit::Conflict => 6,
        }
    }

    /// The name in a JSON error's `error` field.
    pub fn name(self) -> &'static str {
        match self {
            Exit::Failure => "failure",
            Exit::Usage => "usage",
            Exit::Auth => "auth",
            Exit::NotFound => "not_found",
            Exit::Unavailable => "unavailable",
            Exit::Conflict => "conflict",
        }
    }

    /// The exit for an error status from the gateway.
    pub fn of_status(status: u16) -> Exit {
        match status {
            400 | 413 | 415 | 422 => Exit::Usage,
            401 | 403 => Exit::Auth,
            404 => Exit::NotFound,
            409 => Exit::Conflict,
            408 | 429 | 502 | 503 | 504 => Exit::Unavailable,
            _ => Exit::Failure,
        }
    }

    /// The exit for `error`: by the first cause in its chain that says.
    pub fn of(error: &anyhow::Error) -> Exit {
        for cause in error.chain() {
            if let Some(answer) = cause.downcast_ref::<GatewayError>() {
                return Exit::of_status(answer.status);
            }
            if cause.is::<UsageError>() || cause.is::<clap::Error>() {
                return Exit::Usage;
            }
            if cause.is::<NotFoundError>() {
                return Exit::NotFound;
            }
            // Sending failed: no connection, a reset, a timeout.
            if let Some(e) = cause.downcast_ref::<reqwest::Error>()
                && !e.is_builder()
            {
                return Exit::Unavailable;
            }
        }
        Exit::Failure
    }
}

/// The gateway refused a request: its status and its `{code, detail}`.
#[derive(Debug, thiserror::Error)]
#[error("the gateway answered {status}: {code}: {detail}")]
pub struct GatewayError {
    pub status: u16,
    pub code: String,
    pub detail: String,
}

/// The command line asks for something invalid, found before any request is sent.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// What the command line names does not exist, found without asking the gateway.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFoundError(pub String);

/// Prints `error` on standard error, as text or as JSON, and ends the process with its exit
/// code.
pub fn fail(program: &str, error: &anyhow::Error, json: bool) -> ! {
    let exit = Exit::of(error);
    if json {
        let mut body = json!({
            "error": exit.name(),
            "exit_code": exit.code(),
            "message": format!("{error:#}"),
        });
        if let Some(answer) = error.chain().find_map(|c| c.downcast_ref::<GatewayError>()) {
            body["status"] = json!(answer.status);
            body["code"] = json!(answer.code);
            body["detail"] = json!(answer.detail);
        }
        eprintln!("{body}");
    } else {
        let message = match error.downcast_ref::<clap::Error>() {
            // clap's own text says `error:` and shows the usage.
            Some(e) => e.to_string().trim_end().to_owned(),
            None => format!("{program}: {error:#}"),
        };
        eprintln!("{message}");
    }
    std::process::exit(exit.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_exit_has_its_own_code() {
        let all = [
            Exit::Failure,
            Exit::Usage,
            Exit::Auth,
            Exit::NotFound,
            Exit::Unavailable,
            Exit::Conflict,
        ];
        let mut codes: Vec<i32> = all.iter().map(|e| e.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(Exit::of_status(403), Exit::Auth);
        assert_eq!(Exit::of_status(500), Exit::Failure);
        let wrapped = anyhow::Error::new(GatewayError {
            status: 409,
            code: "conflict".into(),
            detail: "finished".into(),
        })
        .context("cannot resume");
        assert_eq!(Exit::of(&wrapped), Exit::Conflict);
        let usage = anyhow::Error::new(UsageError("--data must be a JSON object".into()));
        assert_eq!(Exit::of(&usage), Exit::Usage);
        assert_eq!(Exit::of(&anyhow::anyhow!("other")), Exit::Failure);
    }
}
