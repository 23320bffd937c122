//! cmdflow's gateway: a thin HTTP API that validates events, publishes them with confirms and
//! serves reads from PostgreSQL; and the `cmdflow` command-line tool.

pub mod app;
pub mod auth;
pub mod cli;
pub mod console;
pub mod error;
pub mod routes;

pub use app::{AppState, Application};
