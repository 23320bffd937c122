//! Logs: `tracing` with fixed dotted field names (`command.id`, `event.id`, `event.type`,
//! `owner`, `queue.name`, `lock.key`, `attempt`), as JSON lines in production or pretty for people.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt;
use tracing_subscriber::prelude::*;

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
