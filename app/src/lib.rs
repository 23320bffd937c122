//! # cmdflow: durable workflows you bring, on PostgreSQL, RabbitMQ and Redis
//!
//! cmdflow runs *commands*: durable records with an owner, JSON data, a state and a full
//! history, moved forward by *events* (CloudEvents). You bring the kinds of command your
//! business runs (quotes, memberships, approvals, onboarding) as Rust workflows, as funnel
//! files, or both; this crate gives your binary every cmdflow role (`up`, `gateway`, `worker`,
//! `scheduler`, `archiver`, `activities`, `migrate`) and every client subcommand, with your kinds
//! registered.
//!
//! ## Hello, workflow
//!
//! A workflow is a kind name, a data type and a pure `decide`: given the command (with its data
//! deserialized) and one event, say what happens. The engine applies the [`Decision`] in the
//! event's transaction; `decide` does no I/O.
//!
//! ```no_run
//! use cmdflow::{App, Command, CommandState, Decision, Event, HandlerError, Workflow};
//! use cmdflow::types::COMMAND_START;
//!
//! #[derive(serde::Deserialize, schemars::JsonSchema)]
//! struct Greeting {
//!     /// Who to greet.
//!     name: String,
//! }
//!
//! struct Greeter;
//!
//! impl Workflow for Greeter {
//!     const KIND: &'static str = "greeting";
//!     type Data = Greeting;
//!
//!     fn decide(&self, command: &Command<Greeting>, event: &Event) -> Result<Decision, HandlerError> {
//!         match event.ty.as_str() {
//!             COMMAND_START => Ok(Decision::complete(serde_json::json!({
//!                 "text": format!("Hello, {}", command.data.name),
//!             }))),
//!             _ => Err(HandlerError::unexpected(Self::KIND, event)),
//!         }
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> anyhow::Result<()> {
//!     App::from_env()?.workflow(Greeter).run_cli().await
//! }
//! ```
//!
//! `my-binary up` runs the whole fleet in one process; `POST /v1/commands` with
//! `{"kind": "greeting", "owner": "member:42", "data": {"name": "Ada"}}` starts one. The JSON
//! Schema derived from `Greeting` checks the start at the gateway: `{"data": {}}` gets a 422
//! naming `data.name`.
//!
//! ## Moving on: events, waits and time
//!
//! A command stays open while its decisions keep it `running` or `waiting`, and each event
//! addressed to it (`commandid`) comes to `decide` in the order it was accepted:
//!
//! - [`Decision::with_patch`] changes its data, [`Decision::with_state`] its state,
//!   [`Decision::complete`] and [`Decision::fail`] end it;
//! - [`Decision::with_ui`] says what a person's UI shows while it is open (`{code, text}`, a
//!   *pending condition* such as "your membership is pending");
//! - [`Decision::after`], [`Decision::at`] and [`Decision::cron`] set named timers that arrive
//!   as `timer.fired`; [`Decision::wait_for`] waits for a broadcast event with a correlation
//!   key ("when this person clicks the special"), with a timeout that arrives as
//!   `wait.timed_out`;
//! - [`Decision::message`] sends the owner a message rendered from a template
//!   ([`App::template`], [`App::templates_dir`]);
//! - [`Decision::emit`] broadcasts an event for other services, and [`Decision::send`]
//!   addresses one to another command.
//!
//! ## Children
//!
//! [`Decision::spawn_group`] starts children the command waits for, under a fan-in policy
//! ([`FanIn::All`], [`FanIn::Any`], [`FanIn::Quorum`], [`FanIn::AllSettled`]), optionally with a
//! deadline ([`Decision::with_group_deadline`]). The group's verdict arrives as one
//! `children.settled` event. [`Decision::spawn_detached`] starts a child fire-and-forget.
//! Aborting a command (`POST /v1/commands/{id}/abort`) cascades to its open children.
//!
//! ## Side effects: activities
//!
//! Charging a card or calling a carrier is an [`activity::Activity`]: the workflow emits a
//! request event, the activity does the work and answers with an event addressed to the
//! command. See the [`activity`] module.
//!
//! ## Data files
//!
//! Flows and funnels (TOML files) need no Rust: [`App::flows_dir`] or `CMDFLOW_FLOWS_DIR`. Every kind your binary registers is published to the kind catalogue
//! at start-up, which the gateway reads: the gateway links none of your code.

#![warn(missing_docs)]

pub mod activity;
mod cli;
mod roles;

/// The README's Rust examples, compiled as doctests (`cargo test --doc -p cmdflow`).
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

use std::path::{Path, PathBuf};

use anyhow::Context;
#[doc(inline)]
pub use cmdflow_shared::contract::types;
#[doc(inline)]
pub use cmdflow_shared::decision::{
    AbortChildren, Channel, ChildSpec, DataChange, FanIn, Outcome, ParentClose, Reports,
};
#[doc(inline)]
pub use cmdflow_shared::{
    Command, CommandId, CommandState, Config, Decision, Event, HandlerError, Owner,
};
#[doc(inline)]
pub use cmdflow_workers::{Handler, Registry, RegistryError, Workflow};

use activity::Activity;

/// Registers kinds into a registry (the example kinds, a library of workflows).
pub type Install = fn(&mut Registry) -> Result<(), RegistryError>;

/// Your binary: its kinds, templates, funnels and activities, and the configuration from
/// `CMDFLOW_*` variables. Build it, then [`App::run_cli`].
pub struct App {
    config: Config,
    registry: Registry,
    /// The first registration that failed: reported when the app runs.
    error: Option<RegistryError>,
    flow_dirs: Vec<PathBuf>,
    template_dirs: Vec<PathBuf>,
    examples: Option<Install>,
    pub(crate) activities: Vec<Activity>,
    build: String,
}

impl App {
    /// The configuration from `CMDFLOW_*` variables (and the TOML file `CMDFLOW_CONFIG`),
    /// over defaults that point at local services, checked now.
    pub fn from_env() -> anyhow::Result<App> {
        Ok(Self::new(Config::load()?))
    }

    /// An app with this configuration and no kinds yet.
    pub fn new(config: Config) -> App {
        App {
            config,
            registry: Registry::new(),
            error: None,
            flow_dirs: Vec::new(),
            template_dirs: Vec::new(),
            examples: None,
            activities: Vec::new(),
            build: format!("cmdflow {}", env!("CARGO_PKG_VERSION")),
        }
    }

    fn keep(mut self, result: Result<(), RegistryError>) -> Self {
        if let (Err(e), None) = (result, &self.error) {
            self.error = Some(e);
        }
        self
    }

    /// Registers a typed workflow.
    pub fn workflow<W: Workflow>(mut self, workflow: W) -> Self {
        let done = self.registry.workflow(workflow).map(|_| ());
        self.keep(done)
    }

    /// Registers an untyped handler of `kind`: any JSON object starts it, unless a
    /// [`schema`](App::schema) says otherwise.
    pub fn handler(mut self, kind: &str, handler: impl Handler) -> Self {
        self.registry.register(kind, handler);
        self
    }

    /// Sets the JSON Schema of `kind`'s start data.
    pub fn schema(mut self, kind: &str, schema: serde_json::Value) -> Self {
        let done = self.registry.schema(kind, schema).map(|_| ());
        self.keep(done)
    }

    /// A broadcast event of `event_type` starts a command of `kind`, owned by its `subject`.
    pub fn start_on(mut self, event_type: &str, kind: &str) -> Self {
        self.registry.start_on(event_type, kind);
        self
    }

    /// Adds a message template: its first line is the subject, the rest the body, rendered
    /// with minijinja from the person's own data.
    pub fn template(mut self, name: &str, source: &str) -> Self {
        let done = self.registry.template(name, source).map(|_| ());
        self.keep(done)
    }

    /// Adds every `*.txt` in `dir` as a template named after its file, when the app runs
    /// (`CMDFLOW_TEMPLATES_DIR` adds one more directory).
    pub fn templates_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.template_dirs.push(dir.as_ref().to_owned());
        self
    }

    /// Adds the flows (and funnels) of every `*.toml` in `dir`, when the app runs
    /// (`CMDFLOW_FLOWS_DIR` adds one more directory).
    pub fn flows_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.flow_dirs.push(dir.as_ref().to_owned());
        self
    }

    /// Registers anything into the registry at once (a library of kinds).
    pub fn install(mut self, install: Install) -> Self {
        let done = install(&mut self.registry);
        self.keep(done)
    }

    /// Kinds for development and demos: installed by `up`, unless `CMDFLOW_EXAMPLES=false`,
    /// and by the other roles only when `CMDFLOW_EXAMPLES=true`.
    pub fn examples(mut self, install: Install) -> Self {
        self.examples = Some(install);
        self
    }

    /// Runs an activity in the `activities` role and in `up`.
    pub fn activity(mut self, activity: Activity) -> Self {
        self.activities.push(activity);
        self
    }

    /// Names the build (your binary's version), published with each kind in the catalogue.
    pub fn version(mut self, build: &str) -> Self {
        self.build = build.to_owned();
        self
    }

    /// The configuration the app runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The registry a role runs with: the app's kinds and templates, the examples when `up`
    /// (or `CMDFLOW_EXAMPLES`) asks for them, then the template and funnel directories. The
    /// first error names its kind, template, decider or flow file.
    pub fn registry(&self, development: bool) -> anyhow::Result<Registry> {
        if let Some(e) = &self.error {
            anyhow::bail!("{e}");
        }
        let mut registry = self.registry.clone();
        registry.set_build(&self.build);
        let examples = self.config.examples.unwrap_or(development);
        if let (true, Some(install)) = (examples, self.examples) {
            install(&mut registry)?;
        }
        let extra_templates = self.config.templates_dir.as_ref().map(PathBuf::from);
        for dir in self.template_dirs.iter().chain(&extra_templates) {
            registry
                .templates_dir(dir)
                .with_context(|| format!("templates in {}", dir.display()))?;
        }
        // Remote kinds first: a flow may spawn them.
        if let Some(file) = &self.config.deciders_file {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("CMDFLOW_DECIDERS_FILE {file}"))?;
            registry.deciders(file, &text, self.config.lock_ttl)?;
        }
        let extra = [&self.config.flows_dir, &self.config.funnels_dir];
        let extra: Vec<PathBuf> = extra.into_iter().flatten().map(PathBuf::from).collect();
        for dir in self.flow_dirs.iter().chain(&extra) {
            registry.flows_dir(dir)?;
        }
        Ok(registry)
    }

    /// Parses the command line and runs the role or client subcommand it names. On failure it
    /// prints the error on one line (`name: what went wrong`) and exits with a non-zero status,
    /// as a command-line tool does; it returns only on success.
    pub async fn run_cli(self) -> anyhow::Result<()> {
        let program = std::env::args()
            .next()
            .and_then(|p| {
                Path::new(&p)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "cmdflow".to_owned());
        // Asked for before the line is parsed, so that a usage error is JSON too.
        let json = std::env::args().skip(1).any(|a| a == "--json");
        let cli = match <cli::Cli as clap::Parser>::try_parse() {
            Ok(cli) => cli,
            // `--help` and `--version` (status 0), and usage errors without `--json` (status 2,
            // `Exit::Usage`), as clap prints them.
            Err(e) if !e.use_stderr() || !json => e.exit(),
            Err(e) => cli::exit::fail(&program, &anyhow::Error::new(e), json),
        };
        let json = cli.json;
        match cli::run(self, cli).await {
            Ok(()) => Ok(()),
            Err(e) => cli::exit::fail(&program, &e, json),
        }
    }
}
