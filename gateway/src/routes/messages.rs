//! `GET /v1/messages?state=failed|pending|sent` (scope `ops`): the messages in one delivery
//! state, newest first, with their attempts and the reason the last one failed, so a failed
//! e-mail is seen by people, not only in the log.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use cmdflow_shared::store::people::{self, Delivery, MailRow};
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::error::{ApiError, ApiResult, ErrorBody};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessagesQuery {
    /// `failed` (default), `pending` or `sent`.
    pub state: Option<String>,
    /// At most this many, newest first (1 to 1000, default 100).
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Messages {
    pub state: Delivery,
    pub messages: Vec<MailRow>,
}

/// Messages in one delivery state, newest first (the failed ones by when they failed).
#[utoipa::path(get, path = "/v1/messages", tag = "messages", operation_id = "list_messages", params(MessagesQuery),
    responses(
        (status = 200, description = "Messages in that state, newest first", body = Messages),
        (status = 403, description = "The key lacks the `ops` scope", body = ErrorBody),
        (status = 422, description = "Invalid query", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<MessagesQuery>, QueryRejection>,
) -> ApiResult<Json<Messages>> {
    let Query(query) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let delivery = match query.state.as_deref() {
        None => Delivery::Failed,
        Some(s) => match Delivery::parse(s) {
            Some(d @ (Delivery::Failed | Delivery::Pending | Delivery::Sent)) => d,
            _ => {
                return Err(ApiError::invalid(
                    "state",
                    "must be failed, pending or sent",
                ));
            }
        },
    };
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be between 1 and 1000"));
    }
    let messages = people::messages_in(&state.pool, delivery, limit).await?;
    Ok(Json(Messages {
        state: delivery,
        messages,
    }))
}
