//! PostgreSQL: every statement cmdflow runs, by what it is about.
//!
//! Writes under a lock are still fenced: [`write_step`] only succeeds at the version the
//! transaction read, so a worker that lost its lock to a pause cannot overwrite a newer state.
//!
//! - [`pool`]: connecting, the store's errors and which are worth another try;
//! - [`schema`]: migrations, and the databases a binary may run against;
//! - [`commands`]: command rows, created, read, and locked with their events' dedupe rows;
//! - [`groups`]: fan-in groups and the reports that count each child once;
//! - [`steps`]: the batch writer (fenced steps, kept back and flushed before a read or commit);
//! - [`history`](mod@history): a command's history;
//! - [`outbox`]: events decided in a step, published after its commit, swept when unconfirmed;
//! - the rest by area: [`dead`] letters, [`time`] (timers and waits), [`people`] (the owner
//!   feed), [`partitions`], [`kinds`], [`flows`], [`archive`], [`console`].

pub mod commands;
pub mod groups;
pub mod history;
pub mod outbox;
pub mod pool;
pub mod schema;
pub mod steps;

pub use commands::*;
pub use groups::*;
pub use history::*;
pub use outbox::*;
pub use pool::*;
pub use schema::*;
pub use steps::*;

pub mod archive;
pub mod console;
pub mod dead;
pub mod flows;
pub mod kinds;
pub mod partitions;
pub mod people;
pub mod time;
