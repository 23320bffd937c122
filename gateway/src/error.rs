//! Gateway errors and their one mapping to HTTP. 4xx bodies are stable `{code, detail}`;
//! 5xx bodies say nothing internal (the log has the chain).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cmdflow_shared::bus::BusError;
use cmdflow_shared::contract::EnvelopeError;
use cmdflow_shared::store::StoreError;
use serde::Serialize;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `invalid_field`.
    pub code: &'static str,
    /// What is wrong, for a person.
    pub detail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    MalformedJson(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{field}: {reason}")]
    InvalidField { field: String, reason: String },
    #[error("{0}")]
    UnknownKind(String),
    #[error("{0}")]
    NotFound(String),
    /// The resource is in a state that does not allow the request (a replay that is running).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{caller} sent more requests than its rate limit allows")]
    RateLimited { caller: String, retry_after: u64 },
    #[error("the event broker could not confirm the message: {0}")]
    BrokerUnavailable(#[source] BusError),
    #[error("database: {0}")]
    Database(#[source] StoreError),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    /// 422 for text that PostgreSQL cannot store: a NUL character. Checked before the text
    /// reaches a query or an event, so it is refused at the door and not as a 503 (or a dead
    /// letter) later.
    pub fn check_text(field: &str, value: &str) -> Result<(), ApiError> {
        match value.find('\0') {
            Some(at) => Err(Self::invalid(
                field,
                format!("holds a NUL character (at byte {at}); text may not contain U+0000"),
            )),
            None => Ok(()),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            Self::MalformedJson(d) => (StatusCode::BAD_REQUEST, "malformed_json", d.clone()),
            Self::BadRequest(d) => (StatusCode::BAD_REQUEST, "bad_request", d.clone()),
            Self::TooLarge(d) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large", d.clone()),
            Self::UnsupportedMediaType(d) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                d.clone(),
            ),
            Self::InvalidField { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                self.to_string(),
            ),
            Self::UnknownKind(d) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_kind", d.clone()),
            Self::NotFound(d) => (StatusCode::NOT_FOUND, "not_found", d.clone()),
            Self::Conflict(d) => (StatusCode::CONFLICT, "conflict", d.clone()),
            Self::Unauthorized(d) => (StatusCode::UNAUTHORIZED, "unauthorized", d.clone()),
            Self::Forbidden(d) => (StatusCode::FORBIDDEN, "forbidden", d.clone()),
            Self::RateLimited { retry_after, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("{self}; try again in {retry_after} s"),
            ),
            Self::BrokerUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                "the event broker did not confirm every event; send them again (events are deduplicated by id)"
                    .to_owned(),
            ),
            Self::Database(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database did not answer; try again".to_owned(),
            ),
        }
    }
}

impl From<EnvelopeError> for ApiError {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::Malformed(d) => Self::MalformedJson(format!("malformed JSON: {d}")),
            EnvelopeError::TooLarge(_) => Self::TooLarge(e.to_string()),
            EnvelopeError::Invalid { field, reason } => Self::InvalidField { field, reason },
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::Database(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, detail) = self.parts();
        if status.is_server_error() {
            tracing::error!(error = %self, "Request failed.");
        }
        let mut response = (status, Json(ErrorBody { code, detail })).into_response();
        match &self {
            Self::Unauthorized(_) => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"cmdflow\""),
                );
            }
            Self::RateLimited { retry_after, .. } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            _ => {}
        }
        response
    }
}
