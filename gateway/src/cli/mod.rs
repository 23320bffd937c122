//! The `cmdflow` command line: server roles (`up`, `gateway`, `worker`, `migrate`) and client
//! subcommands (`emit`, `start`, `show`, `history`) that talk to the gateway at `CMDFLOW_URL`.

pub mod client;
pub mod roles;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cmdflow",
    version,
    about = "Durable commands and events on PostgreSQL, RabbitMQ and Redis",
    long_about = "Durable commands and events on PostgreSQL, RabbitMQ and Redis.\n\n\
        Server roles read their configuration from CMDFLOW_* environment variables \
        (CMDFLOW_DATABASE_URL, CMDFLOW_AMQP_URL, CMDFLOW_REDIS_URLS, CMDFLOW_NAMESPACE, \
        CMDFLOW_HTTP_ADDR, ...), with defaults pointing at local services.\n\
        Client subcommands talk to the gateway at CMDFLOW_URL (default http://127.0.0.1:8080)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Migrate, declare the topology, and run the gateway and a worker in one process.
    #[command(after_help = "Example:\n  cmdflow up --http 127.0.0.1:8080 --concurrency 32")]
    Up {
        /// Address the gateway listens on.
        #[arg(long, env = "CMDFLOW_HTTP_ADDR", default_value = "127.0.0.1:8080")]
        http: String,
        /// Events the worker processes at once.
        #[arg(long, env = "CMDFLOW_CONCURRENCY")]
        concurrency: Option<usize>,
    },
    /// Run the gateway role only.
    #[command(after_help = "Example:\n  CMDFLOW_HTTP_ADDR=0.0.0.0:8080 cmdflow gateway")]
    Gateway {
        #[arg(long, env = "CMDFLOW_HTTP_ADDR", default_value = "127.0.0.1:8080")]
        http: String,
    },
    /// Run the worker role only.
    #[command(after_help = "Example:\n  cmdflow worker --concurrency 64")]
    Worker {
        #[arg(long, env = "CMDFLOW_CONCURRENCY")]
        concurrency: Option<usize>,
    },
    /// Run the scheduler role only: turn due timers into events. Several may run at once.
    #[command(after_help = "Example:\n  cmdflow scheduler")]
    Scheduler,
    /// Create the database if needed and apply the migrations.
    #[command(
        after_help = "Example:\n  CMDFLOW_DATABASE_URL=postgres://postgres@db/cmdflow cmdflow migrate"
    )]
    Migrate,
    /// Publish one event through the gateway.
    #[command(
        after_help = "Examples:\n  cmdflow emit demo.increment --command 0192f0c1-... --data '{\"by\": 2}'\n  cmdflow emit quote.requested --correlation visitor:cookie-7f3a\n  cmdflow emit --file event.json"
    )]
    Emit {
        /// Event type, e.g. `demo.increment`. Not needed with --file.
        #[arg(required_unless_present = "file")]
        event_type: Option<String>,
        /// Address the event to this command.
        #[arg(long)]
        command: Option<String>,
        /// The event's data, a JSON object.
        #[arg(long, default_value = "{}")]
        data: String,
        /// CloudEvents source.
        #[arg(long, default_value = "cmdflow-cli")]
        source: String,
        /// Event id (default: a new UUIDv7). Reuse it to resend safely.
        #[arg(long)]
        id: Option<String>,
        /// Correlation id.
        #[arg(long)]
        correlation: Option<String>,
        /// Send a whole CloudEvent (or an array) from this file; `-` reads standard input.
        #[arg(long, conflicts_with_all = ["event_type", "command", "id", "correlation"])]
        file: Option<String>,
    },
    /// Start a command.
    #[command(
        after_help = "Example:\n  cmdflow start demo.counter --owner member:42 --data '{\"count\": 0}'"
    )]
    Start {
        /// Command kind, e.g. `demo.counter`.
        kind: String,
        /// Owner, `kind:id`.
        #[arg(long)]
        owner: String,
        /// Initial data, a JSON object.
        #[arg(long, default_value = "{}")]
        data: String,
        /// Wait until the command exists and print it.
        #[arg(long)]
        wait: bool,
    },
    /// Show a command.
    #[command(after_help = "Example:\n  cmdflow show 0192f0c1-7a3b-7c2d-9e4f-5a6b7c8d9e0f")]
    Show { id: String },
    /// Show a command's history.
    #[command(after_help = "Example:\n  cmdflow history 0192f0c1-7a3b-7c2d-9e4f-5a6b7c8d9e0f")]
    History { id: String },
    /// Show what a person's UI shows: pending conditions, history and messages.
    #[command(
        after_help = "Examples:\n  cmdflow feed member:42\n  cmdflow feed member:42 --kind query --limit 10"
    )]
    Feed {
        owner: String,
        /// Only history of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// History entries to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show a command's tree: every descendant with its state.
    #[command(after_help = "Example:\n  cmdflow tree 0192f0c1-7a3b-7c2d-9e4f-5a6b7c8d9e0f")]
    Tree { id: String },
    /// Abort a command and its open descendants.
    #[command(
        after_help = "Example:\n  cmdflow abort 0192f0c1-7a3b-7c2d-9e4f-5a6b7c8d9e0f --reason 'customer cancelled'"
    )]
    Abort {
        id: String,
        /// Why; recorded in every aborted command's history.
        #[arg(long)]
        reason: Option<String>,
    },
}
