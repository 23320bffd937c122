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

/// Readiness: PostgreSQL, RabbitMQ and a majority of the Redis masters answer.
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
    let within = Duration::from_secs(2);
    let pg = async {
        match tokio::time::timeout(within, cmdflow_shared::store::ping(&state.pool)).await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 2s".to_owned(),
        }
    };
    let amqp = async {
        // Connected is not enough: every publish fails while the exchange or the queues behind
        // it are missing (a broker reset, a namespace nobody declared).
        match tokio::time::timeout(within, state.bus.topology_in_place()).await {
            Ok(Ok(None)) => "ok".to_owned(),
            Ok(Ok(Some(missing))) => missing,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 2s".to_owned(),
        }
    };
    let redis = async {
        match state.locks.check_quorum().await {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.to_string(),
        }
    };
    let (pg, amqp, redis) = tokio::join!(pg, amqp, redis);
    // Redis is shown but does not gate readiness: the gateway publishes without locks, and
    // events accepted while Redis is down wait in the queue for the workers.
    let ready = [&pg, &amqp].iter().all(|c| *c == "ok");
    let checks = BTreeMap::from([("postgres", pg), ("rabbitmq", amqp), ("redis", redis)]);
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
