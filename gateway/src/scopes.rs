//! What each route asks of its caller, declared where the route is added to the router
//! ([`crate::app`]), and refused by default: a route that declares nothing is answered 403,
//! whatever the caller holds. A new endpoint is closed until its author says who may call it.
//!
//! The same declarations give each operation of the OpenAPI document its `security`.

use std::collections::BTreeMap;

use axum::http::Method;
use utoipa::openapi::path::{Operation, PathItem, Paths};
use utoipa::openapi::security::SecurityRequirement;

use crate::auth::{BEARER, Scope};

/// What a route asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing, not even a credential: liveness and readiness.
    Public,
    /// Any valid credential, whatever its scopes (`/v1/whoami`, `/v1/kinds`).
    Credential,
    /// A valid credential holding this scope.
    Scope(Scope),
    /// Command and owner reads: `commands:read`, or `owner:read`, which the handler checks
    /// against the owner it reads.
    Read,
}

impl Need {
    /// How the need reads in the route listing and in errors.
    pub fn describe(self) -> String {
        match self {
            Need::Public => "public".to_owned(),
            Need::Credential => "any credential".to_owned(),
            Need::Scope(scope) => scope.as_str().to_owned(),
            Need::Read => format!(
                "{} or {} (own owner)",
                Scope::CommandsRead.as_str(),
                Scope::OwnerRead.as_str()
            ),
        }
    }

    /// The operation's `security` in the OpenAPI document: one requirement per way in, the
    /// scopes named as the roles of the bearer scheme (OpenAPI 3.1).
    fn security(self) -> Vec<SecurityRequirement> {
        let bearer =
            |scopes: &[Scope]| SecurityRequirement::new(BEARER, scopes.iter().map(|s| s.as_str()));
        match self {
            Need::Public => Vec::new(),
            Need::Credential => vec![bearer(&[])],
            Need::Scope(scope) => vec![bearer(&[scope])],
            Need::Read => vec![bearer(&[Scope::CommandsRead]), bearer(&[Scope::OwnerRead])],
        }
    }
}

/// The declared need of every route, by method and path template (as axum matches it).
#[derive(Debug, Clone, Default)]
pub struct RouteNeeds(BTreeMap<(String, String), Need>);

impl RouteNeeds {
    /// Declares `need` for every operation of `paths` (what one `routes!` adds).
    pub fn declare(&mut self, paths: &Paths, need: Need) {
        for (path, item) in &paths.paths {
            for (method, _) in operations(item) {
                self.0.insert((method.to_owned(), path.clone()), need);
            }
        }
    }

    /// The need of `method` on `path`, if it declared one. `HEAD` is served by `GET`.
    pub fn get(&self, method: &Method, path: &str) -> Option<Need> {
        let method = if *method == Method::HEAD {
            Method::GET.as_str()
        } else {
            method.as_str()
        };
        self.0.get(&(method.to_owned(), path.to_owned())).copied()
    }

    /// Whether some method of `path` declared a need (another method gets 405, not 403).
    pub fn knows_path(&self, path: &str) -> bool {
        self.0.keys().any(|(_, p)| p == path)
    }

    /// Every declared route, as `METHOD path`, with its need, sorted by path then method.
    pub fn listing(&self) -> Vec<(String, Need)> {
        let mut routes: Vec<_> = self.0.iter().collect();
        routes.sort_by(|((m1, p1), _), ((m2, p2), _)| (p1, m1).cmp(&(p2, m2)));
        routes
            .into_iter()
            .map(|((method, path), need)| (format!("{method} {path}"), *need))
            .collect()
    }

    /// Gives each operation of `doc` the `security` of its declared need. An operation that
    /// declared none says so, and gets a requirement no credential meets: it is refused.
    pub fn document(&self, doc: &mut utoipa::openapi::OpenApi) {
        for (path, item) in doc.paths.paths.iter_mut() {
            for (method, operation) in operations_mut(item) {
                let key = (method.to_owned(), path.clone());
                operation.security = Some(match self.0.get(&key) {
                    Some(need) => need.security(),
                    None => vec![SecurityRequirement::new(BEARER, ["undeclared"])],
                });
            }
        }
    }
}

fn operations(item: &PathItem) -> impl Iterator<Item = (&'static str, &Operation)> {
    [
        ("GET", &item.get),
        ("PUT", &item.put),
        ("POST", &item.post),
        ("DELETE", &item.delete),
        ("OPTIONS", &item.options),
        ("HEAD", &item.head),
        ("PATCH", &item.patch),
        ("TRACE", &item.trace),
    ]
    .into_iter()
    .filter_map(|(m, op)| op.as_ref().map(|op| (m, op)))
}

fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = (&'static str, &mut Operation)> {
    [
        ("GET", &mut item.get),
        ("PUT", &mut item.put),
        ("POST", &mut item.post),
        ("DELETE", &mut item.delete),
        ("OPTIONS", &mut item.options),
        ("HEAD", &mut item.head),
        ("PATCH", &mut item.patch),
        ("TRACE", &mut item.trace),
    ]
    .into_iter()
    .filter_map(|(m, op)| op.as_mut().map(|op| (m, op)))
}
