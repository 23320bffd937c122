//! The gateway's unit tests: every route declares its need, and the gate enforces it.

#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::http::Request;
use cmdflow_shared::config::Secret;
use tower::ServiceExt;

use super::*;

/// Every route of the API with what it needs. A route added without a declared need is
/// refused at run time and missing here; a new route fails this test until it is listed,
/// so that a reviewer sees who may call it.
#[test]
fn every_route_declares_what_it_needs() {
    let expected = [
        ("GET /healthz", "public"),
        ("GET /readyz", "public"),
        (
            "GET /v1/commands",
            "commands:read or owner:read (own owner)",
        ),
        ("POST /v1/commands", "events:publish"),
        (
            "GET /v1/commands/{id}",
            "commands:read or owner:read (own owner)",
        ),
        ("POST /v1/commands/{id}/abort", "ops"),
        (
            "GET /v1/commands/{id}/history",
            "commands:read or owner:read (own owner)",
        ),
        (
            "GET /v1/commands/{id}/tree",
            "commands:read or owner:read (own owner)",
        ),
        ("GET /v1/dead-letters", "ops"),
        ("POST /v1/dead-letters/discard", "ops"),
        ("GET /v1/dead-letters/groups", "ops"),
        ("POST /v1/dead-letters/replay", "ops"),
        ("GET /v1/dead-letters/replays/{id}", "ops"),
        ("POST /v1/dead-letters/replays/{id}/interrupt", "ops"),
        ("POST /v1/dead-letters/replays/{id}/resume", "ops"),
        ("GET /v1/dead-letters/{id}", "ops"),
        ("GET /v1/dead-letters/{id}/body", "ops"),
        ("POST /v1/events", "events:publish"),
        ("GET /v1/events/unmatched", "commands:read"),
        ("GET /v1/flows", "commands:read"),
        ("GET /v1/flows/{kind}", "commands:read"),
        ("GET /v1/kinds", "any credential"),
        ("GET /v1/messages", "ops"),
        ("GET /v1/overview", "commands:read"),
        (
            "GET /v1/owners/{owner}/feed",
            "commands:read or owner:read (own owner)",
        ),
        (
            "POST /v1/owners/{owner}/messages/{id}/read",
            "commands:read or owner:read (own owner)",
        ),
        ("GET /v1/whoami", "any credential"),
    ];
    let listed: Vec<(String, String)> = route_needs()
        .into_iter()
        .map(|(route, need)| (route, need.describe()))
        .collect();
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(r, n)| ((*r).to_owned(), (*n).to_owned()))
        .collect();
    assert_eq!(listed, expected);

    // The document has every route, each with the security of its need.
    let doc = serde_json::to_value(openapi()).unwrap();
    let mut documented = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            documented += 1;
            let security = op["security"].to_string();
            assert!(!security.contains("undeclared"), "{method} {path}");
            if path.starts_with("/v1/") {
                assert!(security.contains("bearer"), "{method} {path}: {security}");
            } else {
                assert_eq!(op["security"], serde_json::json!([]), "{method} {path}");
            }
        }
    }
    assert_eq!(documented, expected.len());
    assert_eq!(
        doc["paths"]["/v1/dead-letters"]["get"]["security"],
        serde_json::json!([{"bearer": ["ops"]}])
    );
}

fn gate(needs: RouteNeeds) -> Arc<auth::Gate> {
    let config = Config {
        dev_key: Some(Secret::new("cfk_dev_0123456789abcdef")),
        jwt_hs256_secret: Some(Secret::new("0123456789abcdef0123456789abcdef")),
        ..Config::default()
    };
    Arc::new(auth::Gate {
        auth: Arc::new(Authenticator::from_config(&config).unwrap()),
        needs,
    })
}

async fn status(router: &Router, uri: &str, token: Option<&str>) -> u16 {
    let mut request = Request::get(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    response.status().as_u16()
}

#[tokio::test]
async fn a_route_without_a_declared_need_is_refused_even_to_every_scope() {
    let mut needs = RouteNeeds::default();
    let (_, paths, _): UtoipaMethodRouter<AppState> = routes!(health::healthz);
    needs.declare(&paths, Need::Public);
    let ok = || async { "ok" };
    let router = Router::new()
        .route("/healthz", get(ok))
        .route("/v1/new-ops-endpoint", get(ok))
        .route_layer(axum::middleware::from_fn_with_state(
            gate(needs),
            auth::middleware,
        ));
    let dev = Some("cfk_dev_0123456789abcdef");
    assert_eq!(status(&router, "/healthz", None).await, 200);
    assert_eq!(status(&router, "/v1/new-ops-endpoint", dev).await, 403);
    assert_eq!(status(&router, "/v1/new-ops-endpoint", None).await, 403);
}

#[tokio::test]
async fn a_declared_scope_is_required() {
    let mut needs = RouteNeeds::default();
    let (_, paths, _): UtoipaMethodRouter<AppState> = routes!(dead_letters::list);
    needs.declare(&paths, Need::Scope(Scope::Ops));
    let router = Router::new()
        .route("/v1/dead-letters", get(|| async { "ok" }))
        .route_layer(axum::middleware::from_fn_with_state(
            gate(needs),
            auth::middleware,
        ));
    let key = jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
    let exp = chrono::Utc::now().timestamp() + 60;
    let reader = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "member:1", "scope": "commands:read owner:read", "exp": exp}),
        &key,
    )
    .unwrap();
    assert_eq!(status(&router, "/v1/dead-letters", None).await, 401);
    assert_eq!(
        status(&router, "/v1/dead-letters", Some(&reader)).await,
        403
    );
    let dev = Some("cfk_dev_0123456789abcdef");
    assert_eq!(status(&router, "/v1/dead-letters", dev).await, 200);
}
