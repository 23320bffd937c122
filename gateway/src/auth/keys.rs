//! API keys and the keys file: generating and hashing a key, reading and checking the file.

use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{AuthConfigError, Grant, Scope};

/// The prefix of every API key cmdflow generates.
pub const KEY_PREFIX: &str = "cfk_";

/// The SHA-256 of a key, in hex: what the keys file stores.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random API key.
pub fn generate_key() -> String {
    let bytes: [u8; 24] = rand::random();
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

/// A new key and its keys-file entry, as `cmdflow key new` prints them. The scopes and types
/// are checked as the gateway will check them.
pub fn new_key_entry(
    name: &str,
    scopes: &[String],
    event_types: &[String],
) -> Result<String, AuthConfigError> {
    let key = generate_key();
    let quoted = |list: &[String]| {
        list.iter()
            .map(|s| serde_json::Value::String(s.clone()).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut entry = format!(
        "[[keys]]\nname = {}\nsha256 = \"{}\"\nscopes = [{}]\n",
        serde_json::Value::String(name.to_owned()),
        hash_key(&key),
        quoted(scopes)
    );
    if !event_types.is_empty() {
        entry.push_str(&format!("event_types = [{}]\n", quoted(event_types)));
    }
    let file: KeysFile =
        toml::from_str(&entry).map_err(|e| AuthConfigError::Invalid(e.to_string()))?;
    check_entries(file, "the new key")?;
    Ok(format!(
        "# The key (shown once; give it to its holder, e.g. as CMDFLOW_TOKEN):\n# {key}\n# Add this to the keys file (CMDFLOW_AUTH_KEYS_FILE):\n{entry}"
    ))
}

/// The keys file: `[[keys]]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    /// Who holds the key, for audit records and rate limits.
    name: String,
    /// The SHA-256 of the key, hex (`cmdflow key new` prints it).
    sha256: String,
    scopes: Vec<String>,
    /// Event types (and command kinds) the key may publish; `prefix.*` patterns allowed.
    event_types: Option<Vec<String>>,
}

pub(super) fn load_keys(path: &Path) -> Result<Vec<(String, Grant)>, AuthConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| AuthConfigError::Read {
        what: "the keys file",
        path: shown.clone(),
        source,
    })?;
    let bad = |reason: String| AuthConfigError::KeysFile {
        path: shown.clone(),
        reason,
    };
    let file: KeysFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    check_entries(file, &shown)
}

/// Checks every entry of a keys file; `shown` names the file in errors.
fn check_entries(file: KeysFile, shown: &str) -> Result<Vec<(String, Grant)>, AuthConfigError> {
    let bad = |reason: String| AuthConfigError::KeysFile {
        path: shown.to_owned(),
        reason,
    };
    let mut out = Vec::with_capacity(file.keys.len());
    for (i, entry) in file.keys.into_iter().enumerate() {
        let at = format!("keys[{i}] ({})", entry.name);
        if entry.name.trim().is_empty() {
            return Err(bad(format!("keys[{i}].name is empty")));
        }
        let hash = entry.sha256.to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!(
                "{at}.sha256 must be 64 hex digits (the SHA-256 of the key)"
            )));
        }
        if entry.scopes.is_empty() {
            return Err(bad(format!("{at}.scopes is empty")));
        }
        let scopes = entry
            .scopes
            .iter()
            .map(|s| {
                Scope::parse(s).ok_or_else(|| {
                    bad(format!(
                        "{at}.scopes: unknown scope `{s}`; known: {}",
                        Scope::ALL.map(Scope::as_str).join(", ")
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if scopes.contains(&Scope::OwnerRead) {
            return Err(bad(format!(
                "{at}.scopes: `owner:read` needs an owner, so it is for JWTs (their `sub`), not keys"
            )));
        }
        if let Some(types) = &entry.event_types
            && let Some(t) = types
                .iter()
                .find(|t| t.is_empty() || t[..t.len().saturating_sub(1)].contains('*'))
        {
            return Err(bad(format!(
                "{at}.event_types: `{t}` must be a type, or a prefix ending in `*`"
            )));
        }
        out.push((
            hash,
            Grant {
                name: entry.name,
                scopes,
                allowed_types: entry.event_types,
            },
        ));
    }
    Ok(out)
}
