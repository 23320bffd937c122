//! The command line of a cmdflow binary: server roles (`up`, `gateway`, `worker`, `scheduler`,
//! `archiver`, `activities`, `migrate`) and client subcommands (`emit`, `start`, `show`, …)
//! that talk to the gateway at `CMDFLOW_URL`.

/// `println!` for the client commands' output. When the reader has gone (`cmdflow dlq show |
/// head`), the command ends quietly, as Unix tools do, instead of panicking on the broken pipe.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            $crate::cli::output_failed(e);
        }
    }};
}

/// `print!` for the client commands' output, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout().lock(), $($arg)*) {
            $crate::cli::output_failed(e);
        }
    }};
}

pub mod client;
pub mod dlq;
pub mod exit;
pub mod flows;
pub mod progress;

/// Ends the process when the output cannot be written: quietly (status 0) when the reader closed
/// the pipe, with the error otherwise.
pub(crate) fn output_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("cmdflow: cannot write the output: {e}");
    std::process::exit(1);
}

use clap::{Parser, Subcommand};

use crate::App;
use crate::roles;
use client::{Client, EmitArgs};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Durable commands and events on PostgreSQL, RabbitMQ and Redis",
    long_about = "Durable commands and events on PostgreSQL, RabbitMQ and Redis.\n\n\
        Server roles read their configuration from CMDFLOW_* environment variables \
        (CMDFLOW_DATABASE_URL, CMDFLOW_AMQP_URL, CMDFLOW_REDIS_URLS, CMDFLOW_NAMESPACE, \
        CMDFLOW_HTTP_ADDR, ...), with defaults pointing at local services.\n\
        Client subcommands talk to the gateway at CMDFLOW_URL (default http://127.0.0.1:8080)."
)]
pub struct Cli {
    /// Client subcommands: print the gateway's JSON instead of tables, for scripts; errors
    /// are then one JSON object on standard error.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

/// Which dead letters: every flag narrows.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DlqFilter {
    /// Event type.
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// Command kind.
    #[arg(long)]
    pub kind: Option<String>,
    /// Owner, `kind:id`.
    #[arg(long)]
    pub owner: Option<String>,
    /// Funnel name.
    #[arg(long)]
    pub funnel: Option<String>,
    /// Failure signature (`error_class:kind`), as `dlq groups` shows it.
    #[arg(long)]
    pub signature: Option<String>,
    /// Failed at or after (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Failed before (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    /// Exactly these dead letters (repeat the flag).
    #[arg(long = "id")]
    pub ids: Vec<i64>,
}

#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// List dead letters.
    #[command(
        after_help = "Examples:\n  cmdflow dlq list --kind quote\n  cmdflow dlq list --owner member:42 --json"
    )]
    List {
        #[command(flatten)]
        filter: DlqFilter,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Group dead letters by failure signature, with counts.
    #[command(after_help = "Example:\n  cmdflow dlq groups")]
    Groups {
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Show one dead letter, with its original event.
    #[command(after_help = "Example:\n  cmdflow dlq show 42")]
    Show { id: i64 },
    /// Replay dead letters (each is applied once; commands dedupe by event id).
    #[command(
        after_help = "Examples:\n  cmdflow dlq replay --signature permanent:quote --dry-run\n  cmdflow dlq replay --funnel visitor_to_member --rate 100\n  cmdflow dlq replay --resume 0192f0c1-..."
    )]
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
        /// Only count what would be replayed.
        #[arg(long)]
        dry_run: bool,
        /// Replays per second.
        #[arg(long)]
        rate: Option<u32>,
        /// Resume an interrupted replay job.
        #[arg(long)]
        resume: Option<String>,
        /// Start the job and return at once, without following its progress.
        #[arg(long)]
        detach: bool,
    },
    /// Discard dead letters, with a reason.
    #[command(
        after_help = "Example:\n  cmdflow dlq discard --signature invalid_event:demo.increment --reason 'test traffic'"
    )]
    Discard {
        #[command(flatten)]
        filter: DlqFilter,
        /// Why (required; kept in the audit).
        #[arg(long)]
        reason: String,
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ArchiveCmd {
    /// Move every eligible tree now, with progress; `--dry-run` only counts them.
    #[command(after_help = "Examples:\n  cmdflow archive run --dry-run\n  cmdflow archive run")]
    Run {
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Make a new API key: prints the key once, and the `[[keys]]` entry (with its SHA-256 only)
    /// to add to the keys file.
    #[command(
        after_help = "Example:\n  cmdflow key new --name shop --scope events:publish --event-type 'quote.*'"
    )]
    New {
        /// Who holds the key; shows in audit records and rate limits.
        #[arg(long)]
        name: String,
        /// A scope: events:publish, commands:read or ops. Repeat for several.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// An event type (or `prefix.*`) the key may publish. Repeat for several; none is any.
        #[arg(long = "event-type")]
        event_types: Vec<String>,
    },
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
    /// Run the activities role only: the binary's activities, each consuming its own queue.
    #[command(after_help = "Example:\n  my-binary activities")]
    Activities,
    /// Run the archiver role only: move ended command trees to the archive, every interval.
    #[command(
        after_help = "Example:\n  CMDFLOW_ARCHIVE_RETENTION=30d CMDFLOW_ARCHIVE_RETENTION_BY_KIND=query=7d cmdflow archiver"
    )]
    Archiver,
    /// Archive now (server side: talks to PostgreSQL with the server configuration).
    #[command(subcommand)]
    Archive(ArchiveCmd),
    /// API keys for the gateway's keys file.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Create the database if needed and apply the migrations.
    #[command(
        after_help = "Example:\n  CMDFLOW_DATABASE_URL=postgres://postgres@db/cmdflow cmdflow migrate"
    )]
    Migrate,
    /// Publish one event through the gateway.
    #[command(
        after_help = "Examples:\n  cmdflow emit demo.increment --command 0192f0c1-... --data '{\"by\": 2}'\n  cmdflow emit quote.requested --correlation visitor:cookie-7f3a\n  cmdflow emit visitor.arrived --subject visitor:cookie-7f3a\n  cmdflow emit --file event.json"
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
        /// The person the event is about, `kind:id`: a broadcast with a subject starts the
        /// funnels and kinds registered for its type, owned by that person.
        #[arg(long)]
        subject: Option<String>,
        /// Send a whole CloudEvent (or an array) from this file; `-` reads standard input.
        #[arg(long, conflicts_with_all = ["event_type", "command", "id", "correlation", "subject"])]
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
    /// List the kinds the workers run (the kind catalogue), with their start-data schemas.
    #[command(after_help = "Examples:\n  cmdflow kinds\n  cmdflow kinds --json")]
    Kinds,
    /// List commands, newest first; every flag narrows.
    #[command(
        after_help = "Examples:\n  cmdflow commands --owner member:42\n  cmdflow commands --kind quote --state open --limit 10"
    )]
    Commands {
        /// Owner, `kind:id`.
        #[arg(long)]
        owner: Option<String>,
        /// Command kind.
        #[arg(long)]
        kind: Option<String>,
        /// A state, or several separated by commas; `open` and `ended` stand for the
        /// non-terminal and terminal states.
        #[arg(long)]
        state: Option<String>,
        /// Commands to list, 1 to 200.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show a command, with its children, timers and waits.
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
    /// Dead letters: list, group, show, replay, discard.
    #[command(subcommand)]
    Dlq(DlqCmd),
    /// Show a command's tree: every descendant with its state.
    #[command(after_help = "Example:\n  cmdflow tree 0192f0c1-7a3b-7c2d-9e4f-5a6b7c8d9e0f")]
    Tree { id: String },
    /// Flow files: check them, or show a flow's states and transitions.
    #[command(subcommand)]
    Flows(flows::FlowsCmd),
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

/// The configuration of a server role: the app's, with telemetry, TLS and metrics set up. `role`
/// names the process in its spans (`cmdflow-gateway`, …) unless `OTEL_SERVICE_NAME` does.
fn server_config(app: &App, role: &str) -> anyhow::Result<cmdflow_shared::Config> {
    let config = app.config().clone();
    cmdflow_shared::tls::configure(config.tls_ca_file.as_deref())?;
    cmdflow_shared::telemetry::init(&config.log_format, &format!("cmdflow-{role}"))?;
    for warning in cmdflow_shared::config::unknown_variables(std::env::vars()) {
        tracing::warn!("{warning}");
    }
    cmdflow_shared::metrics::install();
    Ok(config)
}

/// Runs what the command line names; once a server role has stopped, sends its last spans.
pub async fn run(app: App, cli: Cli) -> anyhow::Result<()> {
    let result = run_command(app, cli).await;
    if cmdflow_shared::telemetry::traces_enabled() {
        // Blocks while the exporter sends (a few seconds at most): off the async threads.
        drop(tokio::task::spawn_blocking(cmdflow_shared::telemetry::shutdown).await);
    }
    result
}

async fn run_command(app: App, cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    match cli.command {
        Cmd::Up { http, concurrency } => {
            let mut config = server_config(&app, "up")?;
            config.http_addr = http;
            if let Some(n) = concurrency {
                config.concurrency = n;
            }
            config.validate()?;
            roles::up(&app, config).await
        }
        Cmd::Gateway { http } => {
            let mut config = server_config(&app, "gateway")?;
            config.http_addr = http;
            roles::gateway(config).await
        }
        Cmd::Worker { concurrency } => {
            let mut config = server_config(&app, "worker")?;
            if let Some(n) = concurrency {
                config.concurrency = n;
            }
            config.validate()?;
            roles::worker(app.registry(false)?, config).await
        }
        Cmd::Scheduler => roles::scheduler(server_config(&app, "scheduler")?).await,
        Cmd::Archiver => roles::archiver(server_config(&app, "archiver")?).await,
        Cmd::Activities => roles::activities(&app, server_config(&app, "activities")?).await,
        Cmd::Archive(ArchiveCmd::Run { dry_run }) => {
            roles::archive_run(server_config(&app, "archive")?, dry_run, json).await
        }
        Cmd::Key(KeyCmd::New {
            name,
            scopes,
            event_types,
        }) => {
            out!(
                "{}",
                cmdflow_gateway::auth::new_key_entry(&name, &scopes, &event_types)?
            );
            Ok(())
        }
        Cmd::Migrate => {
            let config = server_config(&app, "migrate")?;
            roles::migrate(&config).await?;
            outln!("migrations applied");
            Ok(())
        }
        Cmd::Emit {
            event_type,
            command,
            data,
            source,
            id,
            correlation,
            subject,
            file,
        } => {
            let args = EmitArgs {
                event_type,
                command,
                data,
                source,
                id,
                correlation,
                subject,
                file,
            };
            client::emit(&Client::from_env(json)?, args).await
        }
        Cmd::Start {
            kind,
            owner,
            data,
            wait,
        } => client::start(&Client::from_env(json)?, &kind, &owner, &data, wait).await,
        Cmd::Kinds => client::kinds(&Client::from_env(json)?).await,
        Cmd::Commands {
            owner,
            kind,
            state,
            limit,
        } => {
            let filter = client::CommandsFilter {
                owner,
                kind,
                state,
                limit,
            };
            client::commands(&Client::from_env(json)?, &filter).await
        }
        Cmd::Show { id } => client::show(&Client::from_env(json)?, &id).await,
        Cmd::History { id } => client::history(&Client::from_env(json)?, &id).await,
        Cmd::Feed { owner, kind, limit } => {
            client::feed(&Client::from_env(json)?, &owner, kind.as_deref(), limit).await
        }
        Cmd::Dlq(cmd) => dlq::run(&Client::from_env(json)?, cmd).await,
        Cmd::Tree { id } => client::tree(&Client::from_env(json)?, &id).await,
        Cmd::Flows(cmd) => flows::run(&app.registry(false)?, cmd, json),
        Cmd::Abort { id, reason } => client::abort(&Client::from_env(json)?, &id, reason).await,
    }
}
