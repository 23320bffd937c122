//! cmdflow's gateway: a thin HTTP API that validates events, publishes them with confirms and
//! serves reads from PostgreSQL. It links no handler code: the kinds it accepts come from the
//! catalogue the workers publish.

pub mod app;
pub mod auth;
pub mod catalogue;
pub mod console;
pub mod error;
pub mod http_metrics;
pub mod http_trace;
pub mod routes;
pub mod scopes;
pub mod serve;

pub use app::{AppState, Application};
