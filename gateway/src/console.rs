//! The web console: plain HTML, CSS and ES modules from `gateway/console/`, embedded in the
//! binary, so `cmdflow up` serves it offline with no build step and nothing from elsewhere.
//!
//! The files hold no data and are served without credentials; every number the console shows
//! comes from the `/v1` API, called with the bearer credential the person signs in with. The
//! answers carry a strict Content-Security-Policy (only this origin's scripts, styles and API;
//! no inline script), `nosniff`, and an `ETag` with `Cache-Control: no-cache`, so a browser
//! revalidates (a 304) and never runs an old module against a new API.

use std::collections::HashMap;
use std::sync::OnceLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Where the console is served.
pub const PATH: &str = "/console";

pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
     object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $type:expr) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../console/", $name)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file of the console; `index.html` is the page itself.
static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("ui.js", JS),
    asset!("overview.js", JS),
    asset!("commands.js", JS),
    asset!("command.js", JS),
    asset!("dead_letters.js", JS),
    asset!("kinds.js", JS),
    asset!("flows.js", JS),
    asset!("messages.js", JS),
    asset!("person.js", JS),
];

/// Each file's `ETag`: a hash of its bytes, computed once.
fn etags() -> &'static HashMap<&'static str, HeaderValue> {
    static ETAGS: OnceLock<HashMap<&'static str, HeaderValue>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let hash = hex::encode(&Sha256::digest(a.body)[..12]);
                let value = HeaderValue::from_str(&format!("\"{hash}\""))
                    .unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
                (a.name, value)
            })
            .collect()
    })
}

/// The console's routes, with no state of their own and no authentication.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(PATH, get(index))
        .route("/console/", get(index))
        .route("/console/assets/{name}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    serve(&name, &headers)
}

fn serve(name: &str, request: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return ApiError::NotFound(format!("the console has no file `{name}`")).into_response();
    };
    let etag = etags().get(asset.name).cloned();
    let fresh = match (&etag, request.get(header::IF_NONE_MATCH)) {
        (Some(etag), Some(seen)) => seen.to_str().is_ok_and(|seen| {
            seen.split(',')
                .any(|s| s.trim() == etag.to_str().unwrap_or(""))
        }),
        _ => false,
    };
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    if let Some(etag) = etag {
        headers.insert(header::ETAG, etag);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_the_page_imports_is_served() {
        let served: Vec<&str> = ASSETS.iter().map(|a| a.name).collect();
        for a in ASSETS
            .iter()
            .filter(|a| a.name.ends_with(".js") || a.name.ends_with(".html"))
        {
            let text = std::str::from_utf8(a.body).unwrap();
            for (i, _) in text.match_indices("./") {
                let rest = &text[i + 2..];
                if let Some(end) = rest.find(".js") {
                    let file = &rest[..end + 3];
                    if !file.contains(char::is_whitespace) && !file.contains('/') {
                        assert!(served.contains(&file), "{} imports {file}", a.name);
                    }
                }
            }
        }
    }

    #[test]
    fn the_page_has_no_inline_script_and_nothing_from_elsewhere() {
        for a in ASSETS {
            // The SVG namespace is a name, not an address anything is loaded from.
            let text = String::from_utf8_lossy(a.body).replace("http://www.w3.org/2000/svg", "");
            assert!(
                !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"),
                "{} names another origin",
                a.name
            );
        }
        let html = std::str::from_utf8(ASSETS[0].body).unwrap();
        for tag in html.split("<script").skip(1) {
            assert!(
                tag.trim_start().starts_with("type=\"module\" src="),
                "inline script: {tag}"
            );
        }
        assert!(!html.contains(" style=") && !html.contains("onclick"));
    }
}
