//! The gateway application: state, router, and a listener it binds itself (port 0 in tests).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cmdflow_shared::bus::Bus;
use cmdflow_shared::lock::Locks;
use cmdflow_shared::{Config, store};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

use crate::auth::{self, Authenticator, Scope};
use crate::catalogue::Catalogue;
use crate::error::{ApiError, ErrorBody};
use crate::routes::{
    commands, dead_letters, events, flows, health, kinds, messages, overview, owners, search,
};
use crate::scopes::{Need, RouteNeeds};
use crate::serve;

/// The largest request body: a batch of events (each event is still at most 256 KiB).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub bus: Arc<Bus>,
    pub locks: Locks,
    /// The command kinds `POST /v1/commands` accepts, with their start-data checks: the
    /// catalogue the workers publish.
    pub catalogue: Arc<Catalogue>,
    /// API keys, JWT keys and rate limits.
    pub auth: Arc<Authenticator>,
    /// Fires when the gateway starts to stop: readiness turns false while requests finish.
    pub draining: CancellationToken,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "cmdflow",
        description = "Durable commands and events: publish events, start commands, read their state and history. Every /v1 endpoint needs `Authorization: Bearer <API key or JWT>`."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    // What a remote decider answers (it is called by the workers, not through this API).
    components(schemas(
        cmdflow_shared::remote::WireDecision,
        cmdflow_shared::remote::WireEmit,
        cmdflow_shared::remote::WireChild,
        cmdflow_shared::remote::WireGroup,
        cmdflow_shared::remote::WireTimer,
        cmdflow_shared::remote::WireWait,
        cmdflow_shared::remote::WireMessage
    ))
)]
struct ApiDoc;

/// Declares the bearer scheme every `/v1` endpoint uses.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`cfk_…`) or a JWT (HS256 or RS256) with `sub` and `scope`",
                    ))
                    .build(),
            ),
        );
    }
}

/// The API's routes, each added with what it needs of its caller: the router, the OpenAPI
/// document generated from the handlers, and the declared needs the auth middleware checks.
/// A route added without a need is refused ([`crate::scopes`]).
fn api_routes() -> Api {
    use Need::{Credential, Public, Read};
    let ops = Need::Scope(Scope::Ops);
    let publish = Need::Scope(Scope::Publish);
    let read_all = Need::Scope(Scope::CommandsRead);
    Api::new()
        .route(publish, routes!(events::post_events))
        .route(read_all, routes!(events::get_unmatched))
        .route(publish, routes!(commands::start_command))
        .route(Read, routes!(commands::get_command))
        .route(Read, routes!(commands::get_history))
        // A tree is a per-command read: its handler checks the owner, as for the command.
        .route(Read, routes!(commands::get_tree))
        .route(ops, routes!(commands::abort_command))
        .route(Credential, routes!(kinds::list_kinds))
        .route(ops, routes!(dead_letters::list))
        .route(ops, routes!(dead_letters::groups))
        .route(ops, routes!(dead_letters::show))
        .route(ops, routes!(dead_letters::body))
        .route(ops, routes!(dead_letters::replay))
        .route(ops, routes!(dead_letters::replay_status))
        .route(ops, routes!(dead_letters::interrupt))
        .route(ops, routes!(dead_letters::resume))
        .route(ops, routes!(dead_letters::discard))
        .route(ops, routes!(messages::list))
        .route(Read, routes!(owners::get_feed))
        // Marking a message read acts for its owner: the handler asks for that owner's own
        // token, or `ops`.
        .route(Read, routes!(owners::read_message))
        .route(Public, routes!(health::healthz))
        .route(Public, routes!(health::readyz))
        .route(Read, routes!(search::search_commands))
        .route(read_all, routes!(overview::get_overview))
        .route(read_all, routes!(flows::list_flows))
        .route(read_all, routes!(flows::get_flow))
        .route(Credential, routes!(overview::whoami))
}

/// The API's router under construction, with the need each route declared.
struct Api {
    router: OpenApiRouter<AppState>,
    needs: RouteNeeds,
}

impl Api {
    fn new() -> Api {
        Api {
            router: OpenApiRouter::with_openapi(ApiDoc::openapi()),
            needs: RouteNeeds::default(),
        }
    }

    /// Adds a route, declaring what it needs of its caller.
    fn route(mut self, need: Need, route: UtoipaMethodRouter<AppState>) -> Api {
        self.needs.declare(&route.1, need);
        self.router = self.router.routes(route);
        self
    }

    /// The router, and the OpenAPI document with each operation's `security` from its need.
    fn split(self) -> (Router<AppState>, utoipa::openapi::OpenApi, RouteNeeds) {
        let (router, mut doc) = self.router.split_for_parts();
        self.needs.document(&mut doc);
        (router, doc, self.needs)
    }
}

/// The OpenAPI document of the API, as `/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().split().1
}

/// Every route of the API with what it needs of its caller, as `METHOD path`.
pub fn route_needs() -> Vec<(String, Need)> {
    api_routes().split().2.listing()
}

/// The router and the OpenAPI document generated from the same handlers.
pub fn router(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    let (api, openapi, needs) = api_routes().split();
    let api = api.with_state(state.clone());
    let gate = Arc::new(auth::Gate {
        auth: state.auth.clone(),
        needs,
    });
    let doc = openapi.clone();
    let router = api
        .route_layer(axum::middleware::from_fn_with_state(gate, auth::middleware))
        // The console's files: no data, no credentials (its API calls carry them).
        .merge(crate::console::router())
        .route("/openapi.json", get(move || async move { axum::Json(doc) }))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::NotFound("no such endpoint".to_owned()).into_response() })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(axum::middleware::map_response(json_errors))
        .layer(TraceLayer::new_for_http())
        .layer(axum::middleware::from_fn(crate::http_trace::record))
        .layer(axum::middleware::from_fn(crate::http_metrics::record));
    (router, openapi)
}

/// Prometheus text for every series of this process (all roles it runs).
pub async fn metrics_text() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        cmdflow_shared::metrics::render(),
    )
}

/// What a role without the gateway needs to be ready: each dependency given is checked on every
/// `/readyz` (see [`crate::routes::health::dependencies`]), and all must answer.
#[derive(Clone, Default)]
pub struct Needs {
    pub pool: Option<PgPool>,
    pub bus: Option<Arc<Bus>>,
    pub locks: Option<Locks>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr`, for the roles without the gateway's
/// listener, until `stop`. Readiness is 503 as soon as `draining` fires, while the role
/// finishes its work in flight, and whenever one of the dependencies in `needs` does not answer
/// (a worker cannot apply anything without PostgreSQL, the broker and a Redis majority).
pub async fn serve_metrics(
    addr: &str,
    draining: CancellationToken,
    stop: CancellationToken,
    needs: Needs,
) -> std::io::Result<()> {
    use crate::routes::health::{Health, dependencies};
    let listener = TcpListener::bind(addr).await?;
    let router = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let (draining, needs) = (draining.is_cancelled(), needs.clone());
                async move {
                    if draining {
                        let checks = BTreeMap::from([("shutdown", "draining".to_owned())]);
                        let health = Health {
                            status: "draining",
                            checks,
                        };
                        return (StatusCode::SERVICE_UNAVAILABLE, Json(health));
                    }
                    let checks = dependencies(
                        needs.pool.as_ref(),
                        needs.bus.as_deref(),
                        needs.locks.as_ref(),
                    )
                    .await;
                    let ready = checks.values().all(|c| c == "ok");
                    let status = if ready {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    let health = Health {
                        status: if ready { "ready" } else { "not_ready" },
                        checks,
                    };
                    (status, Json(health))
                }
            }),
        );
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// Gives error responses produced by layers and the router itself (413 from the body limit,
/// 408 from the timeout, 405) the same `{code, detail}` body as the handlers' errors.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let (code, detail) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            "too_large",
            format!("the body is larger than {MAX_BODY_BYTES} bytes"),
        ),
        StatusCode::REQUEST_TIMEOUT => (
            "timeout",
            format!("the request took longer than {REQUEST_TIMEOUT:?}"),
        ),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this endpoint does not take that method".to_owned(),
        ),
        other => {
            // An extractor's rejection (an undecodable path segment, say) explains itself in
            // plain text: keep its words.
            let reason = other.canonical_reason().unwrap_or("bad request");
            let (parts, body) = response.into_parts();
            let text = axum::body::to_bytes(body, 2048)
                .await
                .ok()
                .and_then(|b| String::from_utf8(b.to_vec()).ok())
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty());
            let detail = text.unwrap_or_else(|| reason.to_owned());
            return with_headers(parts.status, "bad_request", detail, &parts.headers);
        }
    };
    with_headers(status, code, detail, response.headers())
}

/// A `{code, detail}` response that keeps the headers of the one it replaces (`Allow`,
/// `Retry-After`, …).
fn with_headers(
    status: StatusCode,
    code: &'static str,
    detail: String,
    headers: &header::HeaderMap,
) -> Response {
    let mut replaced = (status, axum::Json(ErrorBody { code, detail })).into_response();
    for (name, value) in headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            replaced.headers_mut().insert(name.clone(), value.clone());
        }
    }
    replaced
}

/// A built gateway: a bound listener, its router and the limits it serves them within.
pub struct Application {
    listener: TcpListener,
    router: Router,
    draining: CancellationToken,
    limits: serve::Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Bus(#[from] cmdflow_shared::bus::BusError),
    #[error(transparent)]
    Lock(#[from] cmdflow_shared::lock::LockError),
    #[error(transparent)]
    Auth(#[from] auth::AuthConfigError),
}

impl Application {
    /// Connects to the services and binds `config.http_addr`.
    pub async fn build(config: &Config) -> Result<Application, BuildError> {
        let pool = store::connect(&config.database_url, config.database_pool_size).await?;
        let bus = Bus::for_config(config, "cmdflow-gateway").await?;
        Self::build_with(config, pool, bus).await
    }

    /// Builds on connections the caller already holds.
    pub async fn build_with(
        config: &Config,
        pool: PgPool,
        bus: Arc<Bus>,
    ) -> Result<Application, BuildError> {
        let auth = Arc::new(Authenticator::from_config(config)?);
        // A database this binary cannot run against stops it here, saying why.
        store::require_schema(&pool).await?;
        let locks = Locks::new(
            &config.redis_url_list(),
            &config.namespace,
            config.lock_ttl,
            config.lock_wait,
        )?;
        // The gateway publishes without locks: Redis down is reported by readiness, not fatal.
        // The exchanges it publishes to; a namespace with another number of partitions stops it.
        bus.declare_exchanges().await?;
        // It speaks for the engine in starts and aborts, and for nobody in callers' events.
        bus.set_engine_mark(store::engine_mark(&pool).await?);
        if let Err(e) = locks.check_quorum().await {
            tracing::warn!(error = %e, "Redis has no quorum; the gateway starts anyway (workers need it).");
        }
        let draining = CancellationToken::new();
        let state = AppState {
            auth,
            draining: draining.clone(),
            catalogue: Arc::new(Catalogue::new(pool.clone())),
            pool,
            bus,
            locks,
        };
        let listener = TcpListener::bind(&config.http_addr)
            .await
            .map_err(|source| BuildError::Bind {
                addr: config.http_addr.clone(),
                source,
            })?;
        let (router, _) = router(state);
        Ok(Application {
            listener,
            router,
            draining,
            limits: serve::Limits::from_config(config),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Serves until `shutdown` fires, then finishes the requests in flight. Slow and idle
    /// clients are cut and connections capped as [`serve`] describes.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let draining = self.draining;
        serve::serve(self.listener, self.router, self.limits, async move {
            shutdown.cancelled().await;
            draining.cancel();
        })
        .await
    }
}

#[cfg(test)]
mod tests;
