//! Typed workflows: a kind with its own data type. The engine deserializes the command's data
//! into `Data` before each decision, and the JSON Schema derived from `Data` checks every start
//! (at the gateway, through the kind catalogue, and at the worker).

use schemars::JsonSchema;
use serde::de::DeserializeOwned;

use cmdflow_shared::{Command, Decision, Event, HandlerError};

use crate::registry::Handler;

/// A command kind with typed data and a pure decision.
///
/// ```
/// use cmdflow_workers::Workflow;
/// use cmdflow_shared::{Command, CommandState, Decision, Event, HandlerError};
/// use cmdflow_shared::contract::types::COMMAND_START;
///
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct Greeting {
///     /// Who to greet.
///     name: String,
/// }
///
/// struct Greeter;
///
/// impl Workflow for Greeter {
///     const KIND: &'static str = "greeting";
///     type Data = Greeting;
///
///     fn decide(&self, command: &Command<Greeting>, event: &Event) -> Result<Decision, HandlerError> {
///         match event.ty.as_str() {
///             COMMAND_START => Ok(Decision::complete(serde_json::json!({
///                 "text": format!("Hello, {}", command.data.name)
///             }))),
///             _ => Err(HandlerError::unexpected(Self::KIND, event)),
///         }
///     }
/// }
/// ```
pub trait Workflow: Send + Sync + 'static {
    /// The kind's name: dotted lower-case words, such as `purchase.approval`.
    const KIND: &'static str;
    /// The kind's version, shown in the catalogue.
    const VERSION: &'static str = crate::registry::DEFAULT_VERSION;
    /// Broadcast event types that start a command of this kind, owned by the event's
    /// `subject`, with the event's data as its data.
    const STARTS_ON: &'static [&'static str] = &[];
    /// What the kind is for, in a sentence (the catalogue and the console show it).
    const DESCRIPTION: Option<&'static str> = None;

    /// The command's data. Its JSON Schema checks the start data; every event is decided on
    /// the data as the last decision left it, deserialized into this type.
    type Data: DeserializeOwned + JsonSchema + Send + Sync;

    /// Decides what `event` does to `command`. No I/O: the engine applies the decision in the
    /// event's transaction.
    fn decide(
        &self,
        command: &Command<Self::Data>,
        event: &Event,
    ) -> Result<Decision, HandlerError>;
}

/// A [`Workflow`] as an untyped [`Handler`].
pub(crate) struct Typed<W>(pub W);

impl<W: Workflow> Handler for Typed<W> {
    fn decide(&self, command: &Command, event: &Event) -> Result<Decision, HandlerError> {
        let data: W::Data = serde_path_to_error::deserialize(&command.data).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "data".to_owned()
            } else {
                format!("data.{path}")
            };
            HandlerError::InvalidData(format!("{field}: {}", e.into_inner()))
        })?;
        self.0.decide(&command.clone().map_data(data), event)
    }
}
