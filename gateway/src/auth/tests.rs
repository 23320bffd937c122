//! The authenticator's unit tests: type patterns, the dev key, JWTs, and keys-file errors.

use super::*;
use cmdflow_shared::config::Secret;

fn config() -> Config {
    Config {
        dev_key: Some(Secret::new("cfk_dev_0123456789abcdef")),
        jwt_hs256_secret: Some(Secret::new("0123456789abcdef0123456789abcdef")),
        ..Config::default()
    }
}

#[test]
fn patterns_match_types_and_prefixes() {
    assert!(type_matches("quote.*", "quote.started"));
    assert!(type_matches("quote.*", "quote.item.added"));
    assert!(!type_matches("quote.*", "quotes"));
    assert!(type_matches("visitor.clicked", "visitor.clicked"));
    assert!(!type_matches("visitor.clicked", "visitor.clicked.twice"));
}

#[test]
fn the_dev_key_holds_every_scope_and_a_wrong_key_is_refused() {
    let auth = Authenticator::from_config(&config()).unwrap();
    let p = auth
        .authenticate(Some(b"Bearer cfk_dev_0123456789abcdef"))
        .unwrap();
    assert!(Scope::ALL.iter().all(|s| p.has(*s)));
    assert_eq!(p.id, "key:dev");
    for bad in [
        &b"Bearer cfk_dev_0123456789abcdeX"[..],
        b"Basic Zm9vOmJhcg==",
        b"Bearer ",
        b"\xff\xfe",
    ] {
        assert!(matches!(
            auth.authenticate(Some(bad)),
            Err(ApiError::Unauthorized(_))
        ));
    }
    assert!(matches!(
        auth.authenticate(None),
        Err(ApiError::Unauthorized(_))
    ));
}

#[test]
fn no_credentials_configured_is_an_error() {
    let err = Authenticator::from_config(&Config::default()).unwrap_err();
    assert!(err.to_string().contains("CMDFLOW_DEV_KEY"), "{err}");
}

#[test]
fn jwt_scopes_subject_and_expiry() {
    let auth = Authenticator::from_config(&config()).unwrap();
    let key = jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
    let token = |exp: i64, scope: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "member:42", "scope": scope, "exp": exp}),
            &key,
        )
        .unwrap()
    };
    let now = chrono::Utc::now().timestamp();
    let p = auth
        .authenticate(Some(
            format!("Bearer {}", token(now + 60, "owner:read")).as_bytes(),
        ))
        .unwrap();
    assert!(p.has(Scope::OwnerRead) && !p.has(Scope::CommandsRead));
    p.may_read_owner(&Owner::parse("member:42").unwrap())
        .unwrap();
    let other = p
        .may_read_owner(&Owner::parse("member:43").unwrap())
        .unwrap_err()
        .to_string();
    assert!(!other.contains("member:43"), "{other}");
    let expired = auth
        .authenticate(Some(
            format!("Bearer {}", token(now - 3600, "ops")).as_bytes(),
        ))
        .unwrap_err();
    assert!(expired.to_string().contains("expired"), "{expired}");
}

#[test]
fn keys_file_errors_name_the_entry() {
    let dir = std::env::temp_dir().join(format!("cmdflow-keys-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.toml");
    std::fs::write(
        &path,
        "[[keys]]\nname = \"shop\"\nsha256 = \"abc\"\nscopes = [\"events:publish\"]\n",
    )
    .unwrap();
    let err = load_keys(&path).err().unwrap().to_string();
    assert!(err.contains("keys[0] (shop).sha256"), "{err}");
    std::fs::write(
        &path,
        format!(
            "[[keys]]\nname = \"shop\"\nsha256 = \"{}\"\nscopes = [\"publish\"]\n",
            hash_key("k")
        ),
    )
    .unwrap();
    let err = load_keys(&path).err().unwrap().to_string();
    assert!(err.contains("unknown scope `publish`"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
