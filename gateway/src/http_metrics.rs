//! Request metrics of the gateway: a counter by route template, method and status class, and a
//! latency histogram by route template and method. The route is the template the router matched
//! (`/v1/commands/{id}`), never the path itself, so ids in paths add no series; a request no route
//! matched is counted as `unmatched`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use cmdflow_shared::metrics::{HTTP_REQUEST_SECONDS, HTTP_REQUESTS};

/// Middleware (`axum::middleware::from_fn`) that counts and times every request it wraps.
pub async fn record(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::counter!(
        HTTP_REQUESTS,
        "route" => route.clone(),
        "method" => method,
        "status" => status_class(response.status()),
    )
    .increment(1);
    metrics::histogram!(HTTP_REQUEST_SECONDS, "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The method as a label: the standard ones by name, anything else as `other` (a caller chooses
/// the method, so it is not taken verbatim).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// `2xx`, `4xx`, `5xx`, ...: what alerts and dashboards group by.
pub fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    fn line(text: &str, name: &str, labels: &str) -> Option<String> {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
            .map(str::to_owned)
    }

    #[tokio::test]
    async fn requests_are_counted_by_route_template_and_status_class() {
        cmdflow_shared::metrics::install();
        let app = Router::new()
            .route(
                "/metrics-test/{id}",
                get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "no") }),
            )
            .fallback(|| async { StatusCode::NOT_FOUND })
            .layer(axum::middleware::from_fn(record));
        for path in [
            "/metrics-test/1",
            "/metrics-test/2",
            "/metrics-test-nothing",
        ] {
            let request = Request::builder()
                .uri(path)
                .body(Body::empty())
                .expect("a request");
            app.clone().oneshot(request).await.expect("an answer");
        }
        let text = cmdflow_shared::metrics::render();
        let counted = line(
            &text,
            HTTP_REQUESTS,
            r#"route="/metrics-test/{id}",method="GET",status="5xx""#,
        )
        .unwrap_or_else(|| panic!("no request counter for the template in:\n{text}"));
        assert!(counted.ends_with(" 2"), "{counted}");
        assert!(
            line(
                &text,
                HTTP_REQUESTS,
                r#"route="unmatched",method="GET",status="4xx""#
            )
            .is_some(),
            "no counter for the unmatched request in:\n{text}"
        );
        assert!(
            line(
                &format!("{text}\n"),
                &format!("{HTTP_REQUEST_SECONDS}_count"),
                r#"route="/metrics-test/{id}",method="GET""#
            )
            .is_some(),
            "no latency histogram in:\n{text}"
        );
        assert!(
            !text.contains("/metrics-test/1"),
            "a raw path became a label"
        );
    }
}
