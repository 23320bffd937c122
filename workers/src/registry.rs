//! The registry: every kind a worker runs (its handler, the schema of its start data, the
//! broadcast types that start it, its version), the message templates, and the funnels. The
//! binary that runs the worker fills it: cmdflow ships no kinds of its own.
//!
//! A worker publishes the registry's [`catalogue`](Registry::catalogue) at start-up, so the
//! gateway can check starts without linking any handler.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use cmdflow_shared::schema::{self, StartCheck, Violation};
use cmdflow_shared::store::kinds::{KindInfo, KindSource};
use cmdflow_shared::{Command, Decision, Event, HandlerError};
use serde_json::{Map, Value};

use crate::flows::{FlowDef, FlowError, FlowHandler};
use crate::messages::{TemplateError, Templates};
use crate::remote::{DeciderDef, RemoteDecider};
use crate::workflow::{Typed, Workflow};

/// A command kind. `decide` does no I/O: the engine applies what it returns.
pub trait Handler: Send + Sync + 'static {
    /// Decides what `event` does to `command`.
    fn decide(&self, command: &Command, event: &Event) -> Result<Decision, HandlerError>;
}

impl<F> Handler for F
where
    F: Fn(&Command, &Event) -> Result<Decision, HandlerError> + Send + Sync + 'static,
{
    fn decide(&self, command: &Command, event: &Event) -> Result<Decision, HandlerError> {
        self(command, event)
    }
}

/// Why a registry could not be filled.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    /// A flow file that cannot run.
    Flow(#[from] FlowError),
    #[error(transparent)]
    /// A template that cannot be used.
    Template(#[from] TemplateError),
    #[error("kind {kind}: {source}")]
    /// A start-data schema that does not compile.
    Schema {
        /// The kind.
        kind: String,
        /// Why it does not compile.
        #[source]
        source: schema::SchemaError,
    },
    #[error("kind {0}: {1}")]
    /// A kind that cannot be registered: its name, and why.
    Kind(String, String),
}

/// One registered kind.
#[derive(Clone)]
struct Entry {
    handler: Arc<dyn Handler>,
    schema: Value,
    /// `None` for a kind whose start data may be any object: nothing to check.
    check: Option<Arc<StartCheck>>,
    version: String,
    source: KindSource,
    description: Option<String>,
}

/// Kind name → handler and schema; broadcast event type → the kinds it starts; templates;
/// funnel definitions.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<String, Entry>,
    starts: BTreeMap<String, Vec<String>>,
    templates: Templates,
    flows: Vec<FlowDef>,
    remotes: BTreeMap<String, Arc<RemoteDecider>>,
    /// Earlier versions of kinds, kept so that commands started on them finish on them:
    /// kind → version → handler.
    earlier: BTreeMap<String, BTreeMap<String, Arc<dyn Handler>>>,
    build: Option<String>,
}

/// The version a kind has when it names none.
pub const DEFAULT_VERSION: &str = "1";

impl Registry {
    /// No kinds yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an untyped handler, whose start data may be any JSON object. Replaces a kind
    /// of the same name. Give it a schema with [`Registry::schema`].
    pub fn register(&mut self, kind: &str, handler: impl Handler) -> &mut Self {
        self.insert(kind, Arc::new(handler), KindSource::Rust);
        self
    }

    fn insert(&mut self, kind: &str, handler: Arc<dyn Handler>, source: KindSource) {
        self.kinds.insert(
            kind.to_owned(),
            Entry {
                handler,
                schema: schema::any_object(),
                check: None,
                version: DEFAULT_VERSION.to_owned(),
                source,
                description: None,
            },
        );
    }

    /// Registers a typed workflow: its kind, version and the JSON Schema of its data (derived
    /// from `W::Data`), and the broadcast types that start it.
    pub fn workflow<W: Workflow>(&mut self, workflow: W) -> Result<&mut Self, RegistryError> {
        cmdflow_shared::domain::Kind::parse(W::KIND)
            .map_err(|e| RegistryError::Kind(W::KIND.to_owned(), e.to_string()))?;
        let schema = serde_json::to_value(schemars::schema_for!(W::Data))
            .map_err(|e| RegistryError::Kind(W::KIND.to_owned(), e.to_string()))?;
        self.insert(W::KIND, Arc::new(Typed(workflow)), KindSource::Rust);
        self.schema(W::KIND, schema)?;
        self.version(W::KIND, W::VERSION);
        if let Some(text) = W::DESCRIPTION {
            self.describe(W::KIND, text);
        }
        for ty in W::STARTS_ON {
            self.start_on(ty, W::KIND);
        }
        Ok(self)
    }

    /// Sets the JSON Schema of `kind`'s start data; starts that break it are refused at the
    /// gateway (422 naming the field) and at the worker (a dead letter naming the field).
    pub fn schema(&mut self, kind: &str, schema: Value) -> Result<&mut Self, RegistryError> {
        let check = StartCheck::compile(&schema).map_err(|source| RegistryError::Schema {
            kind: kind.to_owned(),
            source,
        })?;
        let entry = self
            .kinds
            .get_mut(kind)
            .ok_or_else(|| RegistryError::Kind(kind.to_owned(), "is not registered".into()))?;
        entry.check = (schema != schema::any_object()).then(|| Arc::new(check));
        entry.schema = schema;
        Ok(self)
    }

    /// Sets `kind`'s version (shown in the catalogue); a kind that names none is at `1`.
    pub fn version(&mut self, kind: &str, version: &str) -> &mut Self {
        if let Some(entry) = self.kinds.get_mut(kind) {
            entry.version = version.to_owned();
        }
        self
    }

    /// Keeps `handler` as version `version` of `kind`, a version that is not (or no longer) the
    /// current one: commands started on it finish on it, while new commands start on the
    /// current one. Register the current version first.
    pub fn keep_version(
        &mut self,
        kind: &str,
        version: &str,
        handler: impl Handler,
    ) -> Result<&mut Self, RegistryError> {
        self.keep_version_arc(kind, version, Arc::new(handler))
    }

    fn keep_version_arc(
        &mut self,
        kind: &str,
        version: &str,
        handler: Arc<dyn Handler>,
    ) -> Result<&mut Self, RegistryError> {
        let entry = self.kinds.get(kind).ok_or_else(|| {
            RegistryError::Kind(
                kind.to_owned(),
                "is not registered: register its current version first".into(),
            )
        })?;
        if entry.version == version {
            return Err(RegistryError::Kind(
                kind.to_owned(),
                format!("version {version} is its current version already"),
            ));
        }
        self.earlier
            .entry(kind.to_owned())
            .or_default()
            .insert(version.to_owned(), handler);
        Ok(self)
    }

    /// The current version of `kind`: the one new commands start on.
    pub fn version_of(&self, kind: &str) -> Option<&str> {
        self.kinds.get(kind).map(|e| e.version.as_str())
    }

    /// The versions of `kind` this registry runs, the current one first.
    pub fn versions_of(&self, kind: &str) -> Vec<&str> {
        let mut all: Vec<&str> = self.version_of(kind).into_iter().collect();
        if let Some(earlier) = self.earlier.get(kind) {
            all.extend(earlier.keys().map(String::as_str));
        }
        all
    }

    /// The handler of version `version` of `kind` (`None`: the current one). `None` when this
    /// registry does not have that version: the command's events must wait for a worker that
    /// has it, never be decided by another version.
    pub fn handler_for(&self, kind: &str, version: Option<&str>) -> Option<&Arc<dyn Handler>> {
        let entry = self.kinds.get(kind)?;
        match version {
            None => Some(&entry.handler),
            Some(v) if v == entry.version => Some(&entry.handler),
            Some(v) => self.earlier.get(kind)?.get(v),
        }
    }

    /// Says in a sentence what `kind` is for (shown in the catalogue and the console).
    pub fn describe(&mut self, kind: &str, text: &str) -> &mut Self {
        if let Some(entry) = self.kinds.get_mut(kind) {
            entry.description = Some(text.to_owned());
        }
        self
    }

    /// Names the build of the binary (its version), published with each kind.
    pub fn set_build(&mut self, build: &str) -> &mut Self {
        self.build = Some(build.to_owned());
        self
    }

    /// A broadcast event of type `event_type` starts a command of `kind` (owned by the event's
    /// `subject`), once per event.
    pub fn start_on(&mut self, event_type: &str, kind: &str) -> &mut Self {
        let kinds = self.starts.entry(event_type.to_owned()).or_default();
        if !kinds.iter().any(|k| k == kind) {
            kinds.push(kind.to_owned());
        }
        self
    }

    /// Adds a message template (first line: the subject).
    pub fn template(&mut self, name: &str, source: &str) -> Result<&mut Self, RegistryError> {
        self.templates.add(name, source)?;
        Ok(self)
    }

    /// Adds every `*.txt` in `dir` as a template named after its file (`welcome.txt` →
    /// `welcome`).
    pub fn templates_dir(&mut self, dir: &Path) -> Result<&mut Self, RegistryError> {
        self.templates.add_dir(dir)?;
        Ok(self)
    }

    /// Adds flows (and funnels) from `(file name, TOML text)` pairs, checked against the kinds
    /// and templates registered so far: register the kinds they spawn and the templates they
    /// send first. A funnel runs as the kind `funnel.{name}`, a flow as its `kind`.
    pub fn flows(&mut self, files: &[(String, String)]) -> Result<&mut Self, RegistryError> {
        let defs = crate::flows::parse_all(files, &self.templates, &self.kind_names())?;
        for def in defs {
            self.add_flow(def)?;
        }
        Ok(self)
    }

    /// Checks flow files against this registry without adding them (what `cmdflow flows
    /// check` runs): each file's flow, or what is wrong with it. Besides the file's own
    /// errors, a flow may not take the name of a kind registered in code or decided remotely.
    pub fn check_flows(&self, files: &[(String, String)]) -> Vec<Result<FlowDef, FlowError>> {
        let checked = crate::flows::check_each(files, &self.templates, &self.kind_names());
        checked
            .into_iter()
            .map(|def| {
                let def = def?;
                let kind = def.kind();
                match self.kinds.get(&kind).map(|e| e.source) {
                    Some(KindSource::Rust | KindSource::Remote) => Err(FlowError {
                        file: def.source.file.clone(),
                        flow: kind,
                        field: if def.is_funnel() { "name" } else { "kind" }.into(),
                        reason: "a kind of that name is registered already, in code or as a remote decider".into(),
                    }),
                    _ => Ok(def),
                }
            })
            .collect()
    }

    /// Adds the flows of every `*.toml` in `dir` (see [`Registry::flows`]).
    pub fn flows_dir(&mut self, dir: &Path) -> Result<&mut Self, RegistryError> {
        let files = crate::flows::read_dir(dir)?;
        self.flows(&files)
    }

    /// Adds one parsed flow as the current version of its kind.
    pub fn add_flow(&mut self, def: FlowDef) -> Result<&mut Self, RegistryError> {
        let kind = def.kind();
        if self.kinds.contains_key(&kind) {
            let what = match self.flows.iter().find(|d| d.kind() == kind) {
                Some(twin) => format!("{} defines it already", twin.source.file),
                None => "a kind of that name is registered already".to_owned(),
            };
            return Err(RegistryError::Kind(kind, what));
        }
        let source = if def.is_funnel() {
            KindSource::Funnel
        } else {
            KindSource::Flow
        };
        self.insert(&kind, Arc::new(FlowHandler::new(def.clone())), source);
        self.version(&kind, &def.flow_version());
        self.describe(&kind, def.description.as_deref().unwrap_or(&def.title));
        if let Some(start_on) = &def.start_on {
            self.start_on(start_on, &kind);
        }
        self.flows.push(def);
        Ok(self)
    }

    /// Keeps an earlier version of a flow registered here (read back from the store): commands
    /// started on it finish on it. Checked against this registry's kinds and templates.
    pub fn keep_flow_version(
        &mut self,
        file: &str,
        text: &str,
    ) -> Result<&mut Self, RegistryError> {
        let def = FlowDef::parse(file, text, &self.templates, &self.kind_names())?;
        let (kind, version) = (def.kind(), def.flow_version());
        self.keep_version_arc(&kind, &version, Arc::new(FlowHandler::new(def)))
    }

    /// Registers `kind` as decided by a remote decider (see [`crate::remote`]): the worker asks
    /// it for every event of the kind's commands and applies the decision it answers.
    pub fn remote(
        &mut self,
        kind: &str,
        decider: RemoteDecider,
    ) -> Result<&mut Self, RegistryError> {
        cmdflow_shared::domain::Kind::parse(kind)
            .map_err(|e| RegistryError::Kind(kind.to_owned(), e.to_string()))?;
        if let Some(entry) = self.kinds.get(kind) {
            let what = match entry.source {
                KindSource::Rust => "a handler in code",
                KindSource::Funnel => "a funnel",
                KindSource::Flow => "a flow",
                KindSource::Remote => "another decider",
            };
            return Err(RegistryError::Kind(
                kind.to_owned(),
                format!("cannot be decided remotely: {what} defines it already"),
            ));
        }
        let name = kind.to_owned();
        // Never called: the engine asks the decider instead.
        let local = move |_: &Command, _: &Event| -> Result<Decision, HandlerError> {
            Err(HandlerError::Refused(format!("{name} is decided remotely")))
        };
        self.insert(kind, Arc::new(local), KindSource::Remote);
        self.remotes.insert(kind.to_owned(), Arc::new(decider));
        Ok(self)
    }

    /// Registers every decider of a deciders file (`file` names it in errors), each call
    /// bounded below half of `lock_ttl`.
    pub fn deciders(
        &mut self,
        file: &str,
        text: &str,
        lock_ttl: std::time::Duration,
    ) -> Result<&mut Self, RegistryError> {
        let defs: Vec<DeciderDef> = crate::remote::parse_file(file, text)
            .map_err(|e| RegistryError::Kind("decider".into(), e))?;
        for def in defs {
            let decider = def
                .build(lock_ttl)
                .map_err(|e| RegistryError::Kind(def.kind.clone(), e))?;
            self.remote(&def.kind, decider)?;
            if let Some(text) = &def.description {
                self.describe(&def.kind, text);
            }
            for ty in &def.start_on {
                self.start_on(ty, &def.kind);
            }
        }
        Ok(self)
    }

    /// The remote decider of `kind`, if it is decided remotely.
    pub fn remote_decider(&self, kind: &str) -> Option<&Arc<RemoteDecider>> {
        self.remotes.get(kind)
    }

    /// The kinds a broadcast event of this type starts.
    pub fn kinds_started_by(&self, event_type: &str) -> &[String] {
        self.starts
            .get(event_type)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The handler of `kind`.
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Handler>> {
        self.kinds.get(kind).map(|e| &e.handler)
    }

    /// Whether `kind` is registered.
    pub fn contains(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    /// The registered kinds, by name.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    fn kind_names(&self) -> BTreeSet<String> {
        self.kinds.keys().cloned().collect()
    }

    /// Checks `kind`'s start data against its schema.
    pub fn check_start(&self, kind: &str, data: &Map<String, Value>) -> Result<(), Violation> {
        match self.kinds.get(kind).and_then(|e| e.check.as_ref()) {
            Some(check) => check.check(data),
            None => Ok(()),
        }
    }

    /// [`Registry::check_start`] of start data already held as a JSON value.
    pub fn check_start_value(&self, kind: &str, data: &Value) -> Result<(), Violation> {
        match self.kinds.get(kind).and_then(|e| e.check.as_ref()) {
            Some(check) => check.check_value(data),
            None => Ok(()),
        }
    }

    /// The message templates.
    pub fn templates(&self) -> &Templates {
        &self.templates
    }

    /// The flow definitions (funnels included), in the order they were added: the current
    /// version of each.
    pub fn flow_defs(&self) -> &[FlowDef] {
        &self.flows
    }

    /// The current definition of the flow that runs as `kind`.
    pub fn flow(&self, kind: &str) -> Option<&FlowDef> {
        self.flows.iter().find(|d| d.kind() == kind)
    }

    /// The definition of the funnel that runs as `kind` (`funnel.{name}`).
    pub fn funnel(&self, kind: &str) -> Option<&FlowDef> {
        self.flow(kind).filter(|d| d.is_funnel())
    }

    /// The kinds of the funnels on `track`.
    pub fn track_kinds(&self, track: &str) -> Vec<String> {
        self.flows
            .iter()
            .filter(|d| d.is_funnel() && d.track() == Some(track))
            .map(FlowDef::kind)
            .collect()
    }

    /// What a worker publishes to the kind catalogue.
    pub fn catalogue(&self) -> Vec<KindInfo> {
        let build = self
            .build
            .clone()
            .unwrap_or_else(|| format!("cmdflow {}", env!("CARGO_PKG_VERSION")));
        self.kinds
            .iter()
            .map(|(name, e)| KindInfo {
                name: name.clone(),
                schema: e.schema.clone(),
                starts_on: self
                    .starts
                    .iter()
                    .filter(|(_, kinds)| kinds.contains(name))
                    .map(|(ty, _)| ty.clone())
                    .collect(),
                version: e.version.clone(),
                build: build.clone(),
                source: e.source,
                description: e.description.clone(),
                published_at: chrono::Utc::now(),
            })
            .collect()
    }
}
