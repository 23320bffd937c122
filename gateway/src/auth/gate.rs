//! The gate: the middleware that checks every request of the API against its route's need.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{Authenticator, Scope};
use crate::error::ApiError;
use crate::scopes::{Need, RouteNeeds};

/// The authenticator, and what each route declared it needs of its caller: what the
/// middleware checks every request of the API against.
#[derive(Debug)]
pub struct Gate {
    pub auth: Arc<Authenticator>,
    pub needs: RouteNeeds,
}

/// Checks every request of the API against the need its route declared: none for a public
/// route; otherwise authenticates the caller, applies its rate limit and the route's scope,
/// and hands the [`Principal`](super::Principal) to the handler. A route that declared no
/// need is refused, whatever the caller holds.
pub async fn middleware(
    State(gate): State<Arc<Gate>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| request.uri().path().to_owned());
    let need = match gate.needs.get(request.method(), &path) {
        Some(need) => need,
        None if gate.needs.knows_path(&path) => {
            return axum::http::StatusCode::METHOD_NOT_ALLOWED.into_response();
        }
        None => {
            let route = format!("{} {path}", request.method());
            tracing::error!(route = %route, "A route declares no scope; it is refused until it does.");
            return refused(
                "undeclared",
                ApiError::Forbidden(format!(
                    "`{route}` declares no scope, so no credential may call it"
                )),
            );
        }
    };
    if need == Need::Public {
        return next.run(request).await;
    }
    let auth = &gate.auth;
    let principal = match auth.authenticate(
        request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    ) {
        Ok(p) => p,
        Err(e) => return refused("unauthorized", e),
    };
    if let Err(retry_after) = auth.check_rate(&principal) {
        let caller = principal.id;
        return refused(
            "rate_limited",
            ApiError::RateLimited {
                caller,
                retry_after,
            },
        );
    }
    let allowed = match need {
        Need::Public | Need::Credential => Ok(()),
        Need::Scope(scope) => principal.require(scope),
        Need::Read if principal.has(Scope::CommandsRead) || principal.has(Scope::OwnerRead) => {
            Ok(())
        }
        Need::Read => principal.require(Scope::CommandsRead),
    };
    if let Err(e) = allowed {
        return refused("forbidden", e);
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// The answer to a request refused before its handler, counted by `reason`.
fn refused(reason: &'static str, error: ApiError) -> Response {
    metrics::counter!(cmdflow_shared::metrics::AUTH_FAILURES, "reason" => reason).increment(1);
    error.into_response()
}
