//! Logs: `tracing` with fixed dotted field names (`command.id`, `event.id`, `event.type`,
//! `owner`, `queue.name`, `lock.key`, `attempt`), as JSON lines in production or pretty for people.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt;
use tracing_subscriber::prelude::*;

/// The log format when `CMDFLOW_LOG_FORMAT` is unset: pretty for a person at a terminal, JSON
/// lines for a log collector (standard error redirected: a container, a service manager).
pub fn default_log_format(stderr_is_terminal: bool) -> &'static str {
    if stderr_is_terminal { "pretty" } else { "json" }
}

/// Installs the global subscriber once. `RUST_LOG` filters (default `info`).
pub fn init(format: &str) {
    init_with_default(format, "info,lapin=warn,sqlx=warn");
}

/// For tests: logs go through the test harness's capture, so a failing test shows its logs
/// and a passing one stays quiet. `RUST_LOG` filters (default `warn`).
pub fn init_for_tests() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,lapin=error"));
    drop(
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt::layer().compact().with_test_writer())
            .try_init(),
    );
}

/// Like [`init`], with another filter when `RUST_LOG` is unset.
pub fn init_with_default(format: &str, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter);
    let result = if format == "json" {
        registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(fmt::layer().compact().with_writer(std::io::stderr))
            .try_init()
    };
    // A second init (tests, embedded use) keeps the first subscriber.
    drop(result);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_json_unless_a_person_reads_them() {
        assert_eq!(default_log_format(false), "json");
        assert_eq!(default_log_format(true), "pretty");
    }
}
