//! The kind catalogue: what the workers of this fleet can run, with the JSON Schema of each
//! kind's start data, the broadcast types that start it and its version. Any credential may
//! read it: it is the contract a caller starts commands against, and holds no one's data.

use axum::Json;
use axum::extract::State;
use cmdflow_shared::store::kinds::KindInfo;
use serde::Serialize;

use crate::app::AppState;
use crate::error::{ApiResult, ErrorBody};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Kinds {
    /// Every kind a worker has published, by name.
    pub kinds: Vec<KindInfo>,
}

/// The kinds the workers run: name, start-data schema, starting event types, version.
#[utoipa::path(get, path = "/v1/kinds", tag = "commands",
    responses(
        (status = 200, description = "The catalogue", body = Kinds),
        (status = 401, description = "No valid credential", body = ErrorBody)))]
pub async fn list_kinds(State(state): State<AppState>) -> ApiResult<Json<Kinds>> {
    Ok(Json(Kinds {
        kinds: state.catalogue.list().await?,
    }))
}
