//! Metrics: every name in one place, with its help text, and the Prometheus recorder. Labels have
//! bounded cardinality (event type, outcome), never a command id.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const EVENTS_RECEIVED: &str = "cmdflow_events_received_total";
pub const EVENTS_PROCESSED: &str = "cmdflow_events_processed_total";
pub const HANDLER_SECONDS: &str = "cmdflow_handler_seconds";
pub const EVENT_LATENCY_SECONDS: &str = "cmdflow_event_latency_seconds";
pub const LOCK_WAIT_SECONDS: &str = "cmdflow_lock_wait_seconds";
pub const LOCK_BUSY: &str = "cmdflow_lock_busy_total";
pub const OUTBOX_BACKLOG: &str = "cmdflow_outbox_backlog";
pub const TIMER_LATENESS_SECONDS: &str = "cmdflow_timer_lateness_seconds";
pub const TIMERS_FIRED: &str = "cmdflow_timers_fired_total";
pub const DEAD_LETTERS_KEPT: &str = "cmdflow_dead_letters_kept_total";
pub const DEAD_LETTERS_OPEN: &str = "cmdflow_dead_letters";
pub const AUTH_FAILURES: &str = "cmdflow_auth_refused_total";
pub const LOCK_LOST: &str = "cmdflow_lock_lost_total";
pub const BATCH_SIZE: &str = "cmdflow_batch_size";
pub const BATCH_FAILURES: &str = "cmdflow_batch_failures_total";
pub const EAGER_STARTS_TOTAL: &str = "cmdflow_eager_starts_total";
pub const MAIL_ATTEMPTS: &str = "cmdflow_mail_attempts_total";
pub const MESSAGES_FAILED_TOTAL: &str = "cmdflow_messages_failed_total";
pub const MESSAGES_FAILED: &str = "cmdflow_messages_failed";
pub const MAIL_PENDING: &str = "cmdflow_mail_pending";
pub const DECIDER_CALLS: &str = "cmdflow_decider_calls_total";
pub const DECIDER_SECONDS: &str = "cmdflow_decider_seconds";
pub const BUILD_INFO: &str = "cmdflow_build_info";
pub const HTTP_REQUESTS: &str = "cmdflow_http_requests_total";
pub const HTTP_REQUEST_SECONDS: &str = "cmdflow_http_request_duration_seconds";
pub const QUEUE_MESSAGES: &str = "cmdflow_queue_messages";
pub const TIMERS_OVERDUE_SECONDS: &str = "cmdflow_timers_overdue_seconds";

/// The version every process reports in [`BUILD_INFO`]: the workspace's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        BUILD_INFO,
        "Always 1; its `version` label is the cmdflow version this process runs."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "Requests the gateway answered, by route template, method and status class (2xx, 4xx, 5xx)."
    );
    describe_histogram!(
        HTTP_REQUEST_SECONDS,
        Unit::Seconds,
        "Time from a request's arrival to its answer's head, by route template and method."
    );
    describe_gauge!(
        QUEUE_MESSAGES,
        "Messages ready in a cmdflow queue (not those delivered and unacknowledged), by queue, as a worker last counted."
    );
    describe_gauge!(
        TIMERS_OVERDUE_SECONDS,
        Unit::Seconds,
        "How long the oldest due timer has waited to fire (0 when none is due), as a worker last counted."
    );
    describe_counter!(
        MAIL_ATTEMPTS,
        "Attempts at sending an e-mail, by outcome (sent, retry, failed)."
    );
    describe_counter!(
        MESSAGES_FAILED_TOTAL,
        "Messages given up: an e-mail refused or out of attempts, or a template that did not render."
    );
    describe_gauge!(
        MESSAGES_FAILED,
        "Messages in the failed state, as the mailer last counted."
    );
    describe_gauge!(
        MAIL_PENDING,
        "E-mails waiting to be sent (due or backing off), as the mailer last counted."
    );
    describe_counter!(
        DECIDER_CALLS,
        "Calls to remote deciders, by kind and outcome (decided, unavailable, refused, invalid)."
    );
    describe_histogram!(
        DECIDER_SECONDS,
        Unit::Seconds,
        "How long a remote decider took to answer, by kind."
    );
    describe_counter!(
        LOCK_LOST,
        "Events rolled back because their command's lock ran out before commit (a paused or stalled worker)."
    );
    describe_histogram!(
        BATCH_SIZE,
        "Events committed together in one transaction (group commit), per batch of two or more."
    );
    describe_counter!(
        EAGER_STARTS_TOTAL,
        "Children started in the transaction that spawned them, without a message of their own."
    );
    describe_counter!(
        BATCH_FAILURES,
        "Batch transactions that failed, by cause: store (a PostgreSQL error, also logged at WARN) or event (one event the batch could not take); their events are then tried one by one."
    );
    describe_counter!(
        AUTH_FAILURES,
        "Requests the gateway refused before their handler, by reason (unauthorized, forbidden, rate_limited)."
    );
    describe_counter!(
        EVENTS_RECEIVED,
        "Events accepted by the gateway (confirmed by the broker), by type."
    );
    describe_counter!(
        EVENTS_PROCESSED,
        "Events a worker settled, by type and outcome (applied, duplicate, ignored, unmatched, busy, retry, dead)."
    );
    describe_histogram!(
        HANDLER_SECONDS,
        Unit::Seconds,
        "Time to apply one event: the transaction with the handler's decision, by type."
    );
    describe_histogram!(
        EVENT_LATENCY_SECONDS,
        Unit::Seconds,
        "From the event's time to its commit, by type."
    );
    describe_histogram!(
        LOCK_WAIT_SECONDS,
        Unit::Seconds,
        "Time spent taking a command's Redlock lock."
    );
    describe_counter!(
        LOCK_BUSY,
        "Events that found their command's lock busy and were delayed."
    );
    describe_gauge!(
        OUTBOX_BACKLOG,
        "Outbox rows not yet confirmed by the broker, as the last sweep counted."
    );
    describe_histogram!(
        TIMER_LATENESS_SECONDS,
        Unit::Seconds,
        "How late timers fire: firing time minus due time."
    );
    describe_counter!(TIMERS_FIRED, "Timers the scheduler fired, by kind.");
    describe_counter!(DEAD_LETTERS_KEPT, "Dead letters kept, by error class.");
    describe_gauge!(
        DEAD_LETTERS_OPEN,
        "Dead letters waiting for ops (neither replayed nor discarded), counted from PostgreSQL periodically by every worker."
    );
}

/// Most distinct event types, besides cmdflow's own, one process labels by name; past them, a
/// type is counted as `other`. Callers choose event types, so a label taken verbatim would let
/// them grow the series without limit.
pub const MAX_TYPE_LABELS: usize = 100;

/// The `type` label for an event type: cmdflow's own types, and the first [`MAX_TYPE_LABELS`]
/// other types this process has seen, by name; any further type is `other`.
pub fn type_label(ty: &str) -> String {
    use crate::contract::types;
    use std::collections::HashSet;
    use std::sync::RwLock;
    static SEEN: OnceLock<RwLock<HashSet<String>>> = OnceLock::new();
    if types::is_reserved(ty) || ty == types::OWNER_LINKED {
        return ty.to_owned();
    }
    let seen = SEEN.get_or_init(|| RwLock::new(HashSet::new()));
    if seen.read().map(|s| s.contains(ty)).unwrap_or(false) {
        return ty.to_owned();
    }
    let Ok(mut seen) = seen.write() else {
        return "other".to_owned();
    };
    if seen.contains(ty) || seen.len() < MAX_TYPE_LABELS {
        seen.insert(ty.to_owned());
        ty.to_owned()
    } else {
        "other".to_owned()
    }
}

/// The `process_*` series that [`render`] adds on Linux (the `metrics-process` collector, as the
/// Prometheus client libraries name them): what dashboards and alerts may use.
pub const PROCESS_METRICS: &[&str] = &[
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_virtual_memory_max_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
];

/// The `process_*` series (CPU seconds, resident memory, open file descriptors, threads, start
/// time), read from the operating system each time [`render`] runs.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// The Prometheus text of every series of this process, with the process series read now.
pub fn render() -> String {
    let handle = install();
    process_collector().collect();
    handle.render()
}

/// Installs the process's Prometheus recorder once, and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (an embedding program): render an empty one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            describe();
            process_collector().describe();
            metrics::gauge!(BUILD_INFO, "version" => VERSION).set(1.0);
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_reports_the_build_and_the_process() {
        let text = render();
        assert!(
            text.contains(&format!("{BUILD_INFO}{{version=\"{VERSION}\"}} 1")),
            "no build_info in:\n{text}"
        );
        #[cfg(target_os = "linux")]
        for name in PROCESS_METRICS {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "no {name} in:\n{text}"
            );
        }
    }
}
