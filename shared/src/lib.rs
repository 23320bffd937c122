//! cmdflow's shared crate: the wire contract, the domain model, and the store, bus, lock, config
//! and telemetry that the gateway and the workers both use.

pub mod bus;
pub mod config;
pub mod contract;
pub mod decision;
pub mod domain;
pub mod lock;
pub mod metrics;
pub mod remote;
pub mod schema;
pub mod store;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod trace;

pub use config::Config;
pub use contract::Event;
pub use decision::{Decision, HandlerError};
pub use domain::{Command, CommandId, CommandState, Owner};
