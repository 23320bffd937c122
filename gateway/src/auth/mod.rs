//! Who is calling, and what they may do.
//!
//! Callers send `Authorization: Bearer <credential>`, where the credential is either an API key
//! (`cfk_…`, kept only as a SHA-256 hash in the keys file) or a JWT signed with HS256 (shared
//! secret) or RS256 (configured public key). A credential carries scopes:
//! - `events:publish`: post events and start commands, limited to an allow-list of event types
//!   (and command kinds) where the key names one;
//! - `commands:read`: read any command, its history and tree, any owner's feed;
//! - `owner:read`: read the feed of the owner named in the token's `sub`, and that owner's
//!   commands, nothing else;
//! - `ops`: dead letters, replay, discard, abort, the messages list.
//!
//! Each route declares which of these it needs ([`crate::scopes`]); one that declares nothing
//! is refused. A missing or wrong credential is 401; a missing scope, or another owner's data, is 403, and
//! the answer never says whether the other owner or command exists. Each caller (API key, or
//! token subject) has its own rate limit; beyond it the answer is 429 with `Retry-After`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use cmdflow_shared::Config;
use cmdflow_shared::domain::Owner;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::error::ApiError;

mod gate;
mod keys;

pub use gate::{Gate, middleware};
use keys::load_keys;
pub use keys::{KEY_PREFIX, generate_key, hash_key, new_key_entry};

/// The name of the bearer security scheme in the OpenAPI document.
pub const BEARER: &str = "bearer";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Publish,
    CommandsRead,
    OwnerRead,
    Ops,
    /// `owner.linked`: joining two identities of one person.
    Link,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::Publish,
        Scope::CommandsRead,
        Scope::OwnerRead,
        Scope::Ops,
        Scope::Link,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Publish => "events:publish",
            Scope::CommandsRead => "commands:read",
            Scope::OwnerRead => "owner:read",
            Scope::Ops => "ops",
            Scope::Link => "owners:link",
        }
    }

    pub fn parse(raw: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// `key:<name>` or `jwt:<sub>`: the rate-limit key and the actor in audit records.
    pub id: String,
    scopes: Vec<Scope>,
    /// A JWT's `sub` when it is an owner (`kind:id`).
    subject: Option<Owner>,
    /// Event types (and command kinds) this caller may publish; `None` is any.
    allowed_types: Option<Vec<String>>,
}

impl Principal {
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    fn scope_list(&self) -> String {
        if self.scopes.is_empty() {
            return "none".to_owned();
        }
        self.scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Acting on an owner's data (marking their messages read): the owner's own `owner:read`
    /// token, or `ops`. Reading everything (`commands:read`) is not enough.
    pub fn may_act_for_owner(&self, owner: &Owner) -> Result<(), ApiError> {
        if self.has(Scope::Ops) || self.own_owner() == Some(owner) {
            return Ok(());
        }
        if self.has(Scope::OwnerRead) {
            return Err(self.not_own());
        }
        Err(ApiError::Forbidden(format!(
            "this acts for an owner: it needs the owner's own `owner:read` token, or the `ops` \
             scope; this credential has: {}",
            self.scope_list()
        )))
    }

    /// 403 unless the caller holds `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.has(scope) {
            return Ok(());
        }
        Err(ApiError::Forbidden(format!(
            "this needs the `{}` scope; this credential has: {}",
            scope.as_str(),
            self.scope_list()
        )))
    }

    /// 403 unless the caller may read `owner`'s feed and commands: `commands:read`, or
    /// `owner:read` with `owner` as its subject.
    /// The owner an `owner:read` caller may read: its JWT's `sub`.
    pub fn own_owner(&self) -> Option<&Owner> {
        self.subject.as_ref().filter(|_| self.has(Scope::OwnerRead))
    }

    pub fn may_read_owner(&self, owner: &Owner) -> Result<(), ApiError> {
        if self.has(Scope::CommandsRead) {
            return Ok(());
        }
        if self.has(Scope::OwnerRead) {
            if self.subject.as_ref() == Some(owner) {
                return Ok(());
            }
            return Err(self.not_own());
        }
        Err(ApiError::Forbidden(format!(
            "this needs the `commands:read` scope, or `owner:read` for the caller's own owner; \
             this credential has: {}",
            self.scope_list()
        )))
    }

    /// Whether the caller may read a command owned by `owner` (`None`: no such command). An
    /// `owner:read` caller gets the same 403 for another owner's command and for none at all.
    pub fn may_read_command(&self, owner: Option<&str>) -> Result<(), ApiError> {
        match owner.map(Owner::parse) {
            Some(Ok(owner)) => self.may_read_owner(&owner),
            _ if self.has(Scope::CommandsRead) => Ok(()),
            _ => Err(self.not_own()),
        }
    }

    /// The 403 for an `owner:read` caller asking for anything but its own data. The same text
    /// whether or not the other owner or command exists.
    pub fn not_own(&self) -> ApiError {
        let own = self
            .subject
            .as_ref()
            .map_or_else(|| "no owner".to_owned(), ToString::to_string);
        ApiError::Forbidden(format!(
            "`owner:read` covers only the token subject's own data ({own}); reading anything else \
             needs the `commands:read` scope"
        ))
    }

    /// 403 unless the caller may publish events of type `ty` (or start commands of kind `ty`).
    pub fn may_publish(&self, ty: &str) -> Result<(), ApiError> {
        self.require(Scope::Publish)?;
        if ty == cmdflow_shared::contract::types::OWNER_LINKED {
            // Joining two people's identities shows one the other's data.
            self.require(Scope::Link)?;
        }
        match &self.allowed_types {
            None => Ok(()),
            Some(allowed) if allowed.iter().any(|p| type_matches(p, ty)) => Ok(()),
            Some(allowed) => Err(ApiError::Forbidden(format!(
                "this credential may not publish `{ty}`; it may publish: {}",
                allowed.join(", ")
            ))),
        }
    }
}

/// `quote.*` matches `quote.started` and `quote.item.added`; anything else matches exactly.
fn type_matches(pattern: &str, ty: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => ty.starts_with(prefix),
        None => pattern == ty,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error(
        "no way to authenticate callers: set CMDFLOW_AUTH_KEYS_FILE, CMDFLOW_JWT_HS256_SECRET, \
         CMDFLOW_JWT_RS256_PUBLIC_KEY_FILE or CMDFLOW_DEV_KEY"
    )]
    NoCredentials,
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("keys file {path}: {reason}")]
    KeysFile { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// What a key or token grants, looked up by the key's hash.
struct Grant {
    name: String,
    scopes: Vec<Scope>,
    allowed_types: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    /// Space-separated scopes (OAuth2).
    #[serde(default)]
    scope: String,
}

pub struct Authenticator {
    keys: HashMap<String, Grant>,
    hs256: Option<(DecodingKey, Validation)>,
    rs256: Option<(DecodingKey, Validation)>,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    checks: AtomicU64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("keys", &self.keys.len())
            .field("hs256", &self.hs256.is_some())
            .field("rs256", &self.rs256.is_some())
            .finish()
    }
}

impl Authenticator {
    /// Reads the keys file, JWT keys and dev key named by `config`. At least one must be set.
    pub fn from_config(config: &Config) -> Result<Authenticator, AuthConfigError> {
        let mut keys = HashMap::new();
        if let Some(dev) = &config.dev_key {
            if dev.expose().len() < 16 {
                return Err(AuthConfigError::Invalid(
                    "CMDFLOW_DEV_KEY must be at least 16 characters".to_owned(),
                ));
            }
            keys.insert(
                hash_key(dev.expose()),
                Grant {
                    name: "dev".to_owned(),
                    scopes: Scope::ALL.to_vec(),
                    allowed_types: None,
                },
            );
        }
        if let Some(path) = &config.auth_keys_file {
            for (hash, grant) in load_keys(Path::new(path))? {
                keys.insert(hash, grant);
            }
        }
        let validation = |alg| {
            let mut v = Validation::new(alg);
            // A configured issuer or audience is required, not only checked when present.
            let mut required = vec!["exp", "sub"];
            match &config.jwt_audience {
                Some(aud) => {
                    v.set_audience(&[aud]);
                    required.push("aud");
                }
                None => v.validate_aud = false,
            }
            if let Some(iss) = &config.jwt_issuer {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            v.set_required_spec_claims(&required);
            v.validate_nbf = true;
            v.leeway = config.jwt_leeway_secs;
            v
        };
        let hs256 = match &config.jwt_hs256_secret {
            Some(secret) if secret.expose().len() < 32 => {
                return Err(AuthConfigError::Invalid(
                    "CMDFLOW_JWT_HS256_SECRET must be at least 32 bytes".to_owned(),
                ));
            }
            Some(secret) => Some((
                DecodingKey::from_secret(secret.expose().as_bytes()),
                validation(Algorithm::HS256),
            )),
            None => None,
        };
        let rs256 = match &config.jwt_rs256_public_key_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|source| AuthConfigError::Read {
                    what: "the RS256 public key",
                    path: path.clone(),
                    source,
                })?;
                let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                    AuthConfigError::Invalid(format!(
                        "CMDFLOW_JWT_RS256_PUBLIC_KEY_FILE {path}: not an RSA public key in PEM: {e}"
                    ))
                })?;
                Some((key, validation(Algorithm::RS256)))
            }
            None => None,
        };
        if keys.is_empty() && hs256.is_none() && rs256.is_none() {
            return Err(AuthConfigError::NoCredentials);
        }
        let limiter = match NonZeroU32::new(config.rate_limit_per_second) {
            None => None,
            Some(rate) => {
                let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(rate);
                Some(RateLimiter::keyed(
                    Quota::per_second(rate).allow_burst(burst),
                ))
            }
        };
        Ok(Authenticator {
            keys,
            hs256,
            rs256,
            limiter,
            checks: AtomicU64::new(0),
        })
    }

    /// The caller behind an `Authorization` header value, or 401.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Principal, ApiError> {
        let Some(raw) = authorization else {
            return Err(ApiError::Unauthorized(
                "send `Authorization: Bearer <API key or JWT>`".to_owned(),
            ));
        };
        let raw = std::str::from_utf8(raw)
            .map_err(|_| ApiError::Unauthorized("the Authorization header is not text".into()))?;
        let Some(credential) = raw
            .strip_prefix("Bearer ")
            .or_else(|| raw.strip_prefix("bearer "))
        else {
            return Err(ApiError::Unauthorized(
                "the Authorization header must be `Bearer <API key or JWT>`".to_owned(),
            ));
        };
        let credential = credential.trim();
        if credential.matches('.').count() == 2 {
            return self.verify_jwt(credential);
        }
        match self.keys.get(&hash_key(credential)) {
            Some(grant) => Ok(Principal {
                id: format!("key:{}", grant.name),
                scopes: grant.scopes.clone(),
                subject: None,
                allowed_types: grant.allowed_types.clone(),
            }),
            None => Err(ApiError::Unauthorized("unknown API key".to_owned())),
        }
    }

    fn verify_jwt(&self, token: &str) -> Result<Principal, ApiError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| ApiError::Unauthorized(format!("not a valid JWT: {e}")))?;
        let (key, validation) = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => self.rs256.as_ref(),
            _ => None,
        }
        .ok_or_else(|| {
            ApiError::Unauthorized(format!(
                "tokens signed with {:?} are not accepted here",
                header.alg
            ))
        })?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            let why = match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
                ErrorKind::ImmatureSignature => {
                    "the token is not valid yet (its `nbf` is in the future)".to_owned()
                }
                ErrorKind::InvalidSignature => "the token's signature is wrong".to_owned(),
                ErrorKind::InvalidIssuer => "the token's issuer is not accepted".to_owned(),
                ErrorKind::InvalidAudience => "the token's audience is not accepted".to_owned(),
                ErrorKind::MissingRequiredClaim(claim) => {
                    format!("the token has no `{claim}` claim")
                }
                _ => format!("the token is not valid: {e}"),
            };
            ApiError::Unauthorized(why)
        })?;
        let claims = data.claims;
        Ok(Principal {
            id: format!("jwt:{}", claims.sub),
            scopes: claims
                .scope
                .split_whitespace()
                .filter_map(Scope::parse)
                .collect(),
            subject: Owner::parse(&claims.sub).ok(),
            allowed_types: None,
        })
    }

    /// `Ok` when `principal` may make one more request now; otherwise the seconds to wait.
    pub fn check_rate(&self, principal: &Principal) -> Result<(), u64> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        // Forget callers idle long enough to be back at a full burst, now and then.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 10_000 == 9_999 {
            limiter.retain_recent();
        }
        limiter.check_key(&principal.id).map_err(|not_until| {
            let wait = not_until.wait_time_from(limiter.clock().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

#[cfg(test)]
mod tests;
