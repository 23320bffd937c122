//! HTTP routes. Each handler is documented with `#[utoipa::path]`, so `/openapi.json` is
//! generated from the code.

pub mod commands;
pub mod dead_letters;
pub mod events;
pub mod flows;
pub mod health;
pub mod kinds;
pub mod messages;
pub mod overview;
pub mod owners;
pub mod search;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};

use crate::error::ApiError;

/// Reads a JSON body: checks the content type (415) and maps body-limit rejections (413).
pub fn json_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    accepted: &[&str],
) -> Result<Bytes, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let base = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if !accepted.contains(&base.as_str()) {
        let got = if content_type.is_empty() {
            "no Content-Type".to_owned()
        } else {
            format!("Content-Type {content_type:?}")
        };
        return Err(ApiError::UnsupportedMediaType(format!(
            "{got}; send one of {}",
            accepted.join(", ")
        )));
    }
    read_body(body)
}

/// The body of a request whose content type was checked already; maps body-limit rejections
/// (413).
pub fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!("the body is too large: {}", rejection.body_text()))
        } else {
            ApiError::BadRequest(format!(
                "could not read the body: {}",
                rejection.body_text()
            ))
        }
    })
}
