//! The integration tests of cmdflow, against the real PostgreSQL, RabbitMQ and Redis: one test
//! binary, with a module per area, so that the whole stack is linked once rather than once per
//! area. Run one area with `cargo test -p cmdflow-tests --test it flows::`. The fault suite
//! (`tests/tests/faults.rs`) is a binary of its own: it restarts services under load and times
//! the recovery, so it runs apart from the rest.

mod archive;
mod auth;
mod batch;
mod cloudevents_binary;
mod console;
mod console_api;
mod consumers;
mod deciders;
mod drain;
mod eager;
mod flows;
mod funnels;
mod hostile;
mod mail;
mod openapi;
mod operations;
mod order;
mod people;
mod redlock;
mod schema;
mod settled_reports;
mod skeleton;
mod slow_clients;
mod time;
mod tls;
mod traces;
mod workflows;
