//! The domain model: command ids, owners, kinds and the command state machine.
//!
//! Values that come from outside (HTTP bodies, AMQP messages) are parsed through the
//! constructors here, so an invalid owner or kind cannot exist past the edge.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// A command's identity: a UUIDv7, so ids sort by creation time.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    sqlx::Type,
    utoipa::ToSchema,
)]
#[sqlx(transparent)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid)]
pub struct CommandId(Uuid);

impl CommandId {
    /// A new id: a UUIDv7, so ids sort by creation time.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id as a UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for CommandId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for CommandId {
    fn from(value: Uuid) -> Self {
        Self(value)
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for CommandId {
    type Err = DomainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s)
            .map(Self)
            .map_err(|_| DomainError::CommandId(truncate(s, 64)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
/// What is wrong with a value from outside.
pub enum DomainError {
    #[error(
        "`{0}` is not a command id (expected a UUID such as 0192f0c1-7a3b-7c2d-9e4f-5a6b7c8d9e0f)"
    )]
    /// Not a command id.
    CommandId(String),
    #[error(
        "`{0}` is not an owner: expected `kind:id`, the kind a lower-case word such as member, visitor or tenant (letters, digits and _, at most 32 bytes)"
    )]
    /// Not `kind:id`, or a kind that is not a lower-case word.
    OwnerKind(String),
    #[error("owner id {0}")]
    /// An owner id that breaks a rule.
    OwnerId(&'static str),
    #[error("`{0}` is not a valid name: {1}")]
    /// A name that is not dotted lower-case words.
    Name(String, &'static str),
    #[error("a command cannot go from {from} to {to}")]
    /// A state change the state machine does not allow.
    Transition {
        /// Where the command is.
        from: CommandState,
        /// Where it was asked to go.
        to: CommandState,
    },
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// `kind:id`, for example `member:42`, `visitor:cookie-7f3a` or `tenant:acme`.
///
/// The kind is open: a lower-case prefix (`[a-z][a-z0-9_]*`, at most 32 bytes) names the kind
/// of party, so each business brings its own (visitors, members, vendors, tenants, users…).
/// The shipped funnels use the personas `visitor`, `lead`, `member`, `client`, `supplier`,
/// `shipper` and `vendor`, and cmdflow itself acts as `system:cmdflow`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    kind: String,
    id: String,
}

impl Owner {
    /// The longest owner id, in bytes.
    pub const MAX_ID_LEN: usize = 128;
    /// The longest owner kind, in bytes.
    pub const MAX_KIND_LEN: usize = 32;

    /// An owner of `kind` with `id`, or the rule it breaks.
    pub fn new(kind: &str, id: &str) -> Result<Self, DomainError> {
        let kind_ok = kind.len() <= Self::MAX_KIND_LEN
            && kind.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
            && kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !kind_ok {
            return Err(DomainError::OwnerKind(truncate(
                &format!("{kind}:{id}"),
                64,
            )));
        }
        if id.is_empty() {
            return Err(DomainError::OwnerId("must not be empty"));
        }
        if id.len() > Self::MAX_ID_LEN {
            return Err(DomainError::OwnerId("must be at most 128 bytes"));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b'+'))
        {
            return Err(DomainError::OwnerId(
                "may hold only ASCII letters, digits and - _ . @ +",
            ));
        }
        Ok(Self {
            kind: kind.to_owned(),
            id: id.to_owned(),
        })
    }

    /// Reads `kind:id`.
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        let (kind, id) = s
            .split_once(':')
            .ok_or_else(|| DomainError::OwnerKind(truncate(s, 64)))?;
        Self::new(kind, id)
    }

    /// The kind of party, such as `member` or `tenant`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Who within the kind, such as `42`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `system:cmdflow`: cmdflow acting for itself.
    pub fn system() -> Self {
        Self {
            kind: "system".to_owned(),
            id: "cmdflow".to_owned(),
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.id)
    }
}

impl FromStr for Owner {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Owner {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Owner {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Checks an e-mail address (`ada@example.org`, no display name) as the mailer will read it:
/// an address that passes here is one SMTP can be asked to deliver to.
pub fn check_email(s: &str) -> Result<(), String> {
    s.parse::<lettre::Address>()
        .map(|_| ())
        .map_err(|e| format!("`{}` is not an e-mail address ({e})", clip_for_error(s)))
}

/// At most 64 characters of caller input, for an error message.
fn clip_for_error(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// The owner's e-mail address in data that carries one (`data.email`): `Err((field, reason))`
/// when it is present and not an address. Absent or null is fine; a schema may require it.
pub fn check_email_in(
    data: &serde_json::Map<String, Value>,
    at: &str,
) -> Result<(), (String, String)> {
    let field = format!("{at}.email");
    match data.get("email") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) => check_email(s).map_err(|reason| (field, reason)),
        Some(_) => Err((field, "must be a string (an e-mail address)".to_owned())),
    }
}

/// Checks a dotted lower-case name such as `quote.requested` or `demo.counter`:
/// segments of `[a-z0-9_]`, starting with a letter, joined by dots, at most 64 bytes.
pub fn check_dotted_name(s: &str, min_segments: usize) -> Result<(), DomainError> {
    let bad = |why| Err(DomainError::Name(truncate(s, 64), why));
    if s.is_empty() || s.len() > 64 {
        return bad("must be 1 to 64 bytes long");
    }
    let segments: Vec<&str> = s.split('.').collect();
    if segments.len() < min_segments {
        return bad("must be dotted lower-case words, such as `quote.requested`");
    }
    for seg in segments {
        let mut bytes = seg.bytes();
        match bytes.next() {
            Some(b'a'..=b'z') => {}
            _ => return bad("each dot-separated word must start with a lower-case letter"),
        }
        if !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            return bad("words may hold only lower-case letters, digits and `_`");
        }
    }
    Ok(())
}

/// A command kind, such as `quote` or `demo.counter`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Kind(String);

impl Kind {
    /// Reads a kind name (dotted lower-case words).
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        check_dotted_name(s, 1)?;
        Ok(Self(s.to_owned()))
    }
    /// The kind's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Kind {
    type Error = DomainError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Kind> for String {
    fn from(value: Kind) -> Self {
        value.0
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The command state machine: `pending → running ⇄ waiting → completed | failed | aborted`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[sqlx(type_name = "command_state", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum CommandState {
    /// Created, its start not applied yet.
    Pending,
    /// Working: its decisions move it on.
    Running,
    /// Waiting for something outside it: children, a timer, an event.
    Waiting,
    /// Ended well, with a result.
    Completed,
    /// Ended badly, with a reason.
    Failed,
    /// Ended by an abort, with a reason.
    Aborted,
}

impl CommandState {
    /// Every state.
    pub const ALL: [CommandState; 6] = [
        Self::Pending,
        Self::Running,
        Self::Waiting,
        Self::Completed,
        Self::Failed,
        Self::Aborted,
    ];

    /// Whether the state is an end (completed, failed, aborted).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Aborted)
    }

    /// The state's name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Waiting => "waiting",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Aborted => "aborted",
        }
    }

    /// The one place that says which moves are legal. Staying in a non-terminal state is
    /// allowed (an event that changes only data); nothing leaves a terminal state, and
    /// nothing returns to `pending`.
    pub fn transition(self, to: CommandState) -> Result<CommandState, DomainError> {
        use CommandState::*;
        let legal = match (self, to) {
            (Completed | Failed | Aborted, _) => false,
            (_, Pending) => self == Pending,
            (Pending | Running | Waiting, Running | Waiting) => true,
            (Pending | Running | Waiting, Completed | Failed | Aborted) => true,
        };
        if legal {
            Ok(to)
        } else {
            Err(DomainError::Transition { from: self, to })
        }
    }
}

impl fmt::Display for CommandState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command as stored: the row a handler decides on.
///
/// `D` is the type of its data: JSON as stored (`Command` alone), or a workflow's own type,
/// which the engine deserializes before the workflow decides (see [`Command::map_data`]).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Command<D = Value> {
    /// Its id.
    pub id: CommandId,
    /// Its kind, such as `purchase.approval`.
    pub kind: String,
    /// Who it is attributed to, `kind:id`.
    pub owner: String,
    /// The command that spawned it; `None` for a root.
    pub parent_id: Option<CommandId>,
    /// The root of its tree (itself for a root).
    pub root_id: CommandId,
    /// How deep in its tree (0 for a root).
    pub depth: i32,
    /// Its state.
    pub state: CommandState,
    /// Its data, as the last decision left it.
    pub data: D,
    /// What it completed with.
    pub result: Option<Value>,
    /// Why it failed or was aborted.
    pub reason: Option<String>,
    /// What a UI shows about it while it is open (`{code, text}`).
    pub ui: Option<Value>,
    /// How many events changed it: the fence of every write.
    pub version: i64,
    /// The fan-in group this child reports to; `None` for roots and fire-and-forget children.
    pub group_name: Option<String>,
    /// What happens to this child when its parent ends first.
    pub parent_close: crate::decision::ParentClose,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// The version of its kind's definition it started on, and runs on to its end (`None`:
    /// started before versions were kept; it runs on the current definition).
    pub kind_version: Option<String>,
}

impl<D> Command<D> {
    /// A root command of `kind`, owned by `owner`, as it is when its start event arrives
    /// (`pending`, version 0): for unit tests of a workflow's `decide`.
    pub fn new(kind: &str, owner: &str, data: D) -> Self {
        let id = CommandId::new();
        let now = Utc::now();
        Command {
            id,
            kind: kind.to_owned(),
            owner: owner.to_owned(),
            parent_id: None,
            root_id: id,
            depth: 0,
            state: CommandState::Pending,
            data,
            result: None,
            reason: None,
            ui: None,
            version: 0,
            group_name: None,
            parent_close: crate::decision::ParentClose::Abort,
            created_at: now,
            updated_at: now,
            ended_at: None,
            kind_version: None,
        }
    }

    /// The same command with other data: what a typed workflow sees.
    pub fn map_data<E>(self, data: E) -> Command<E> {
        Command {
            id: self.id,
            kind: self.kind,
            owner: self.owner,
            parent_id: self.parent_id,
            root_id: self.root_id,
            depth: self.depth,
            state: self.state,
            data,
            result: self.result,
            reason: self.reason,
            ui: self.ui,
            version: self.version,
            group_name: self.group_name,
            parent_close: self.parent_close,
            created_at: self.created_at,
            updated_at: self.updated_at,
            ended_at: self.ended_at,
            kind_version: self.kind_version,
        }
    }
}

#[cfg(test)]
mod tests;
