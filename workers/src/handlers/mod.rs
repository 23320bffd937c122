//! Command kinds: each is a pure handler, `decide(&Command, &Event) -> Result<Decision, HandlerError>`.
//! The registry maps kind names to handlers.

pub mod business;
pub mod demo;
pub mod demo_time;

use std::collections::BTreeMap;
use std::sync::Arc;

use cmdflow_shared::{Command, Decision, Event, HandlerError};

/// A command kind. `decide` does no I/O: the engine applies what it returns.
pub trait Handler: Send + Sync + 'static {
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

/// Kind name → handler, and broadcast event type → the kinds it starts.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<String, Arc<dyn Handler>>,
    starts: BTreeMap<String, Vec<String>>,
    checks: BTreeMap<String, StartCheck>,
}

/// Checks a kind's start data at the gateway, so a bad request gets a 422 instead of a failed
/// command. The reason names the field.
pub type StartCheck = fn(&serde_json::Map<String, serde_json::Value>) -> Result<(), String>;

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The kinds cmdflow ships with, and the funnels shipped in `workers/funnels/`.
    pub fn builtin() -> Self {
        let mut registry = Self::kinds_only();
        let kinds = registry.kinds().map(str::to_owned).collect();
        match crate::funnels::load(None, &crate::messages::Templates::builtin(), &kinds) {
            Ok(defs) => crate::funnels::register(&mut registry, defs),
            // The shipped funnels are validated by a unit test; this cannot happen in a build
            // that passed its tests.
            Err(e) => tracing::error!(error = %e, "A built-in funnel is invalid; funnels are off."),
        }
        registry
    }

    /// The built-in kinds, with the funnels of every `*.toml` in `dir` instead of the shipped
    /// ones. An invalid file is an error that names the file, the funnel and the field.
    pub fn with_funnels_from(dir: &std::path::Path) -> Result<Self, crate::funnels::FunnelError> {
        let mut registry = Self::kinds_only();
        let kinds = registry.kinds().map(str::to_owned).collect();
        let defs = crate::funnels::load(Some(dir), &crate::messages::Templates::builtin(), &kinds)?;
        crate::funnels::register(&mut registry, defs);
        Ok(registry)
    }

    fn kinds_only() -> Self {
        let mut registry = Self::new();
        business::register(&mut registry);
        demo::register(&mut registry);
        demo_time::register(&mut registry);
        registry
    }

    pub fn register(&mut self, kind: &str, handler: impl Handler) -> &mut Self {
        self.kinds.insert(kind.to_owned(), Arc::new(handler));
        self
    }

    /// Checks the start data of `kind` at the gateway.
    pub fn check_start_with(&mut self, kind: &str, check: StartCheck) -> &mut Self {
        self.checks.insert(kind.to_owned(), check);
        self
    }

    /// Runs the start-data check of `kind`, if it has one.
    pub fn check_start(
        &self,
        kind: &str,
        data: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), String> {
        match self.checks.get(kind) {
            Some(check) => check(data),
            None => Ok(()),
        }
    }

    /// A broadcast event of type `event_type` starts a command of `kind` (owned by the event's
    /// `subject`), once per event.
    pub fn start_on(&mut self, event_type: &str, kind: &str) -> &mut Self {
        self.starts
            .entry(event_type.to_owned())
            .or_default()
            .push(kind.to_owned());
        self
    }

    /// The kinds a broadcast event of this type starts.
    pub fn kinds_started_by(&self, event_type: &str) -> &[String] {
        self.starts
            .get(event_type)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Handler>> {
        self.kinds.get(kind)
    }

    pub fn contains(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }
}
