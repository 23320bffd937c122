//! What the console's overview shows (throughput, failures, backlogs, timers, people per funnel
//! stage), and `whoami`: who the caller is and which scopes it holds, so a UI can say why an
//! action is not offered.
//!
//! The overview needs `commands:read`: it holds counts across every owner, which is less than
//! that scope already lets a caller read one by one, and no personal data. It is not `ops`-only
//! because people who read commands without operating the fleet (support) need it too.

use axum::Json;
use axum::extract::{Extension, State};
use chrono::{DateTime, Utc};
use cmdflow_shared::store::console::{self, FunnelStage, ThroughputBucket};
use serde::Serialize;

use crate::app::AppState;
use crate::auth::{Principal, Scope};
use crate::error::{ApiResult, ErrorBody};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Rate {
    /// Events in the window.
    pub total: i64,
    /// `total` divided by the window's seconds.
    pub per_second: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FailedRate {
    pub total: i64,
    pub per_second: f64,
    /// Failed attempts that were retried (or ended in dead letters after the last retry).
    pub retried: i64,
    /// Events that went to dead letters at once (permanent errors).
    pub dead_lettered: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueueDepth {
    pub queue: String,
    /// Messages ready in the work queue; absent when the broker did not answer.
    pub depth: Option<u32>,
    /// Why the depth is absent.
    pub error: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Timers {
    /// Timers whose time has come and that no scheduler has fired yet.
    pub overdue: i64,
    /// Timers due within the next hour.
    pub due_next_hour: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Overview {
    /// When these numbers were read (the database's clock).
    pub at: DateTime<Utc>,
    /// The throughput window, in seconds.
    pub window_seconds: i64,
    /// The width of one bucket of `series`, in seconds.
    pub bucket_seconds: i64,
    /// Events applied to commands in the window.
    pub processed: Rate,
    /// Failed attempts in the window.
    pub failed: FailedRate,
    /// Processed and failed events per bucket, oldest first.
    pub series: Vec<ThroughputBucket>,
    pub work_queue: QueueDepth,
    /// Events decided but not yet confirmed by the broker.
    pub outbox_backlog: i64,
    /// Dead letters neither replayed nor discarded.
    pub dead_letters_open: i64,
    pub timers: Timers,
    /// Events that wait for a worker with the definition version their command runs on.
    pub waiting_for_definition: i64,
    /// People in each stage of each funnel (open funnel commands), by funnel.
    pub funnels: Vec<FunnelStage>,
}

/// The numbers of the console's overview, read in one round trip to PostgreSQL and one passive
/// queue declare.
#[utoipa::path(get, path = "/v1/overview", tag = "console",
    responses(
        (status = 200, description = "The overview", body = Overview),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "No `commands:read` scope", body = ErrorBody)))]
pub async fn get_overview(State(state): State<AppState>) -> ApiResult<Json<Overview>> {
    // The backlog of every work queue: the partitions and the unkeyed queue.
    let queue = format!("{}.work.*", state.bus.topology().namespace());
    let (rows, depth) = tokio::join!(console::overview(&state.pool), state.bus.work_backlog());
    let rows = rows?;
    let window = console::WINDOW_SECONDS;
    let processed: i64 = rows.series.iter().map(|b| b.processed).sum();
    let failed = rows.retried + rows.dead_lettered;
    let work_queue = match depth {
        Ok(depth) => QueueDepth {
            queue,
            depth: Some(depth),
            error: None,
        },
        Err(e) => {
            tracing::warn!(error = %e, "queue.name" = %queue, "Could not read the work queue's depth.");
            QueueDepth {
                queue,
                depth: None,
                error: Some(format!("the broker did not answer: {e}")),
            }
        }
    };
    Ok(Json(Overview {
        at: rows.at,
        window_seconds: window,
        bucket_seconds: console::BUCKET_SECONDS,
        processed: Rate {
            total: processed,
            per_second: processed as f64 / window as f64,
        },
        failed: FailedRate {
            total: failed,
            per_second: failed as f64 / window as f64,
            retried: rows.retried,
            dead_lettered: rows.dead_lettered,
        },
        series: rows.series,
        work_queue,
        outbox_backlog: rows.outbox_backlog,
        dead_letters_open: rows.dead_letters_open,
        timers: Timers {
            overdue: rows.timers_overdue,
            due_next_hour: rows.timers_due_next_hour,
        },
        waiting_for_definition: rows.waiting_for_definition,
        funnels: rows.funnels,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WhoAmI {
    /// `key:<name>` or `jwt:<sub>`, as audit records name the caller.
    pub id: String,
    /// The scopes this credential holds.
    pub scopes: Vec<String>,
    /// The owner an `owner:read` token may read (its `sub`), when it is one.
    pub owner: Option<String>,
}

/// Who the caller is and what it may do. Any valid credential may ask, whatever its scopes.
#[utoipa::path(get, path = "/v1/whoami", tag = "console",
    responses(
        (status = 200, description = "Who the caller is, and its scopes", body = WhoAmI),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 429, description = "Over the caller's rate limit", body = ErrorBody)))]
pub async fn whoami(Extension(principal): Extension<Principal>) -> Json<WhoAmI> {
    let scopes = Scope::ALL
        .into_iter()
        .filter(|s| principal.has(*s))
        .map(|s| s.as_str().to_owned())
        .collect();
    let owner = principal.own_owner().map(ToString::to_string);
    Json(WhoAmI {
        owner,
        id: principal.id,
        scopes,
    })
}
