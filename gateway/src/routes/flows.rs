//! Flows as data: every version of every flow the workers have run, with its text, its Mermaid
//! state diagram and how many open commands run on it. The console draws the diagram.

use axum::Json;
use axum::extract::{Path, State};
use cmdflow_shared::store;
use cmdflow_shared::store::flows::FlowVersion;
use serde::Serialize;

use crate::app::AppState;
use crate::error::{ApiError, ApiResult, ErrorBody};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FlowSummary {
    pub kind: String,
    /// The version new commands start on: the one a worker started with last.
    pub current: String,
    /// Every version kept, the newest first.
    pub versions: Vec<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Flows {
    /// Every flow a worker has run, by kind.
    pub flows: Vec<FlowSummary>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FlowVersionView {
    #[serde(flatten)]
    pub version: FlowVersion,
    /// Open commands that run on this version.
    pub open_commands: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FlowDetail {
    pub kind: String,
    /// Every version kept, the newest (current) first.
    pub versions: Vec<FlowVersionView>,
}

/// The flows the workers run, with their versions.
#[utoipa::path(get, path = "/v1/flows", tag = "console",
    responses(
        (status = 200, description = "The flows, by kind", body = Flows),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "No `commands:read` scope", body = ErrorBody)))]
pub async fn list_flows(State(state): State<AppState>) -> ApiResult<Json<Flows>> {
    let mut flows: Vec<FlowSummary> = Vec::new();
    for v in store::flows::list(&state.pool).await? {
        match flows.last_mut() {
            Some(last) if last.kind == v.kind => last.versions.push(v.version),
            _ => flows.push(FlowSummary {
                kind: v.kind,
                current: v.version.clone(),
                versions: vec![v.version],
            }),
        }
    }
    Ok(Json(Flows { flows }))
}

/// One flow: each version's text, Mermaid diagram and open commands.
#[utoipa::path(get, path = "/v1/flows/{kind}", tag = "console",
    params(("kind" = String, Path, description = "The kind the flow runs as")),
    responses(
        (status = 200, description = "The flow's versions", body = FlowDetail),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "No `commands:read` scope", body = ErrorBody),
        (status = 404, description = "No flow runs as this kind", body = ErrorBody)))]
pub async fn get_flow(
    State(state): State<AppState>,
    Path(kind): Path<String>,
) -> ApiResult<Json<FlowDetail>> {
    let versions = store::flows::versions_of(&state.pool, &kind).await?;
    if versions.is_empty() {
        return Err(ApiError::NotFound(format!(
            "no flow runs as the kind `{}`",
            cmdflow_shared::contract::clip_to(&kind, 64)
        )));
    }
    let open = store::flows::in_flight(&state.pool, &kind).await?;
    let versions = versions
        .into_iter()
        .map(|version| {
            let open_commands = open
                .iter()
                .find(|(v, _)| *v == version.version)
                .map_or(0, |(_, n)| *n);
            FlowVersionView {
                version,
                open_commands,
            }
        })
        .collect();
    Ok(Json(FlowDetail { kind, versions }))
}
