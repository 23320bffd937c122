//! Liveness and readiness.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;

use crate::app::AppState;

#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    pub status: &'static str,
    /// Per dependency: `ok` or what is wrong.
    pub checks: BTreeMap<&'static str, String>,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is alive", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        checks: BTreeMap::new(),
    })
}

/// Readiness: PostgreSQL and RabbitMQ answer. Redis is reported, not required: the gateway
/// takes no locks, and what it accepts while Redis is down waits in the queue.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "A dependency is down", body = Health)))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    if state.draining.is_cancelled() {
        let checks = BTreeMap::from([("shutdown", "draining".to_owned())]);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "draining",
                checks,
            }),
        );
    }
    let checks = dependencies(Some(&state.pool), Some(&state.bus), Some(&state.locks)).await;
    // Redis is shown but does not gate readiness: the gateway publishes without locks, and
    // events accepted while Redis is down wait in the queue for the workers.
    let ready = ["postgres", "rabbitmq"]
        .iter()
        .all(|name| checks.get(name).is_some_and(|c| c == "ok"));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Health {
            status: if ready { "ready" } else { "not_ready" },
            checks,
        }),
    )
}

/// Checks each dependency given, at once, each within 2 s: `ok`, or what is wrong. PostgreSQL
/// answers a query; RabbitMQ opens a channel and finds the namespace's exchange and first
/// partition queue (a broker that stopped answering, or was reset, fails here, not only a
/// closed connection); a majority of the Redis masters answer.
pub async fn dependencies(
    pool: Option<&sqlx::PgPool>,
    bus: Option<&cmdflow_shared::bus::Bus>,
    locks: Option<&cmdflow_shared::lock::Locks>,
) -> BTreeMap<&'static str, String> {
    let within = Duration::from_secs(2);
    let late = || format!("no answer within {}s", within.as_secs());
    let pg = async {
        let pool = pool?;
        Some(
            match tokio::time::timeout(within, cmdflow_shared::store::ping(pool)).await {
                Ok(Ok(())) => "ok".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => late(),
            },
        )
    };
    let amqp = async {
        let bus = bus?;
        // Connected is not enough: every publish fails while the exchange or the queues behind
        // it are missing (a broker reset, a namespace nobody declared).
        Some(
            match tokio::time::timeout(within, bus.topology_in_place()).await {
                Ok(Ok(None)) => "ok".to_owned(),
                Ok(Ok(Some(missing))) => missing,
                Ok(Err(e)) => e.to_string(),
                Err(_) => late(),
            },
        )
    };
    let redis = async {
        let locks = locks?;
        Some(
            match tokio::time::timeout(within, locks.check_quorum()).await {
                Ok(Ok(_)) => "ok".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => late(),
            },
        )
    };
    let (pg, amqp, redis) = tokio::join!(pg, amqp, redis);
    [("postgres", pg), ("rabbitmq", amqp), ("redis", redis)]
        .into_iter()
        .filter_map(|(name, check)| Some((name, check?)))
        .collect()
}
