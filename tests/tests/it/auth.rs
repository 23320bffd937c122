//! Authentication and scopes at a real gateway: API keys from a hashed keys file, HS256 and
//! RS256 JWTs, 401 and 403 with the missing scope named, owner isolation that never tells whether
//! another owner exists, per-caller rate limits, and the audit's actor.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_gateway::auth::{generate_key, hash_key};
use cmdflow_shared::CommandState;
use cmdflow_shared::config::Secret;
use cmdflow_tests::{TestEnv, event, start_command};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const HS_SECRET: &str = "an-hs256-secret-that-is-long-enough-0123";

/// A client that sends no credential unless told.
fn bare() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn call(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = bare().request(method, url);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

async fn get_as(url: &str, token: Option<&str>) -> (u16, Value) {
    let (status, _, body) = call(reqwest::Method::GET, url, token, None).await;
    (status, body)
}

async fn post_as(url: &str, token: &str, body: Value) -> (u16, Value) {
    let (status, _, body) = call(reqwest::Method::POST, url, Some(token), Some(body)).await;
    (status, body)
}

fn hs256(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(HS_SECRET.as_bytes()),
    )
    .unwrap()
}

fn in_an_hour() -> i64 {
    chrono::Utc::now().timestamp() + 3600
}

struct Keys {
    dir: std::path::PathBuf,
    shop: String,
    reader: String,
    ops: String,
}

impl Keys {
    /// A keys file holding only hashes: a publisher limited to `demo.*`, a reader, an operator.
    fn write() -> Keys {
        let dir = std::env::temp_dir().join(format!("cmdflow-auth-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let (shop, reader, ops) = (generate_key(), generate_key(), generate_key());
        let file = format!(
            r#"
[[keys]]
name = "shop"
sha256 = "{}"
scopes = ["events:publish"]
event_types = ["demo.*"]

[[keys]]
name = "support"
sha256 = "{}"
scopes = ["commands:read"]

[[keys]]
name = "oncall"
sha256 = "{}"
scopes = ["ops", "commands:read"]
"#,
            hash_key(&shop),
            hash_key(&reader),
            hash_key(&ops)
        );
        assert!(!file.contains(&shop), "the file holds hashes, not keys");
        std::fs::write(dir.join("keys.toml"), file).unwrap();
        Keys {
            dir,
            shop,
            reader,
            ops,
        }
    }

    fn path(&self) -> String {
        self.dir.join("keys.toml").display().to_string()
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        drop(std::fs::remove_dir_all(&self.dir));
    }
}

#[tokio::test]
async fn keys_and_scopes_decide_what_each_caller_may_do() {
    let keys = Keys::write();
    let mut env = TestEnv::new().await;
    let path = keys.path();
    let gw = env
        .start_gateway_with(|c| c.auth_keys_file = Some(path))
        .await;
    let url = &gw.url;

    // No credential, a wrong one, a malformed header: 401, with the scheme to use.
    let (status, headers, body) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/dead-letters"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "unauthorized");
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    let (status, body) = get_as(&format!("{url}/v1/dead-letters"), Some("cfk_nope")).await;
    assert_eq!(
        (status, body["detail"].as_str()),
        (401, Some("unknown API key"))
    );
    let resp = bare()
        .get(format!("{url}/v1/dead-letters"))
        .header("authorization", "Basic Zm9vOmJhcg==")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    // Health, readiness and the API description need no credential.
    for open in ["/healthz", "/openapi.json"] {
        let (status, _) = get_as(&format!("{url}{open}"), None).await;
        assert_eq!(status, 200, "{open}");
    }

    // The publisher publishes what its allow-list names, and nothing else.
    let (status, body) = post_as(
        &format!("{url}/v1/commands"),
        &keys.shop,
        json!({"kind": "demo.counter", "owner": "member:1"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let counter = body["command_id"].as_str().unwrap().to_owned();
    let (status, body) = post_as(
        &format!("{url}/v1/commands"),
        &keys.shop,
        json!({"kind": "quote", "owner": "member:1"}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("may not publish `quote`"),
        "{body}"
    );
    let resp = bare()
        .post(format!("{url}/v1/events"))
        .bearer_auth(&keys.shop)
        .header("content-type", "application/cloudevents-batch+json")
        .body(
            serde_json::to_vec(&json!([
                event("demo.increment", Some(&counter), json!({})),
                event("member.joined", None, json!({})),
            ]))
            .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403, "a batch is refused whole");
    let body: Value = resp.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("member.joined"));

    // It may not read, nor operate; the answer names the scope it lacks.
    let (status, body) = get_as(&format!("{url}/v1/commands/{counter}"), Some(&keys.shop)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "forbidden");
    assert!(body["detail"].as_str().unwrap().contains("`commands:read`"));
    let (status, body) = get_as(&format!("{url}/v1/dead-letters"), Some(&keys.shop)).await;
    assert_eq!(status, 403);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("needs the `ops` scope; this credential has: events:publish"),
        "{body}"
    );

    // The reader reads any command and feed, but may neither publish nor operate.
    env.start_worker().await;
    env.wait_state(&counter, CommandState::Running).await;
    let (status, body) = get_as(&format!("{url}/v1/commands/{counter}"), Some(&keys.reader)).await;
    assert_eq!((status, body["owner"].as_str()), (200, Some("member:1")));
    let (status, _) = get_as(
        &format!("{url}/v1/owners/member:1/feed"),
        Some(&keys.reader),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = post_as(
        &format!("{url}/v1/commands/{counter}/abort"),
        &keys.reader,
        json!({"reason": "no"}),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = post_as(
        &format!("{url}/v1/commands"),
        &keys.reader,
        json!({"kind": "demo.counter", "owner": "member:1"}),
    )
    .await;
    assert_eq!(status, 403);

    // The operator's actions are audited under its key's name.
    let (status, body) = post_as(
        &format!("{url}/v1/dead-letters/discard"),
        &keys.ops,
        json!({"type": "demo.nothing", "reason": "audit check"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let actor: String = sqlx::query_scalar("SELECT actor FROM ops_audit ORDER BY id DESC LIMIT 1")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(actor, "key:oncall");
    let (status, body) = post_as(
        &format!("{url}/v1/commands/{counter}/abort"),
        &keys.ops,
        json!({"reason": "by the operator"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    env.wait_state(&counter, CommandState::Aborted).await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_owner_token_reads_its_own_feed_and_commands_and_nothing_about_others() {
    let mut env = TestEnv::new().await;
    let gw = env
        .start_gateway_with(|c| c.jwt_hs256_secret = Some(Secret::new(HS_SECRET)))
        .await;
    env.start_worker().await;
    let url = &gw.url;
    let mine = start_command(url, "demo.counter", "member:42", json!({})).await;
    let theirs = start_command(url, "demo.counter", "member:43", json!({})).await;
    env.wait_state(&mine, CommandState::Running).await;
    env.wait_state(&theirs, CommandState::Running).await;

    let token = hs256(json!({"sub": "member:42", "scope": "owner:read", "exp": in_an_hour()}));
    let (status, feed) = get_as(&format!("{url}/v1/owners/member:42/feed"), Some(&token)).await;
    assert_eq!(status, 200, "{feed}");
    assert_eq!(feed["history"][0]["command_id"], mine.as_str());
    let (status, body) = get_as(&format!("{url}/v1/commands/{mine}"), Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = get_as(&format!("{url}/v1/commands/{mine}/history"), Some(&token)).await;
    assert_eq!(status, 200);

    // Another owner who exists, and one who does not: the same 403, word for word.
    let (status, exists) = get_as(&format!("{url}/v1/owners/member:43/feed"), Some(&token)).await;
    assert_eq!(status, 403, "{exists}");
    let (status, absent) = get_as(&format!("{url}/v1/owners/member:99/feed"), Some(&token)).await;
    assert_eq!(status, 403);
    assert_eq!(exists, absent);
    assert!(!exists.to_string().contains("member:43"));
    // The same for another owner's command and a command that does not exist.
    let (status, other) = get_as(&format!("{url}/v1/commands/{theirs}"), Some(&token)).await;
    assert_eq!(status, 403, "{other}");
    let missing = cmdflow_shared::CommandId::new();
    let (status, none) = get_as(&format!("{url}/v1/commands/{missing}"), Some(&token)).await;
    assert_eq!(status, 403);
    assert_eq!(other, none);
    let (status, _) = get_as(&format!("{url}/v1/commands/{theirs}/history"), Some(&token)).await;
    assert_eq!(status, 403);
    // A tree follows the rule of its command: the caller's own, and nothing else.
    let (status, tree) = get_as(&format!("{url}/v1/commands/{mine}/tree"), Some(&token)).await;
    assert_eq!((status, &tree["root"]["id"]), (200, &json!(mine)), "{tree}");
    let (status, other) = get_as(&format!("{url}/v1/commands/{theirs}/tree"), Some(&token)).await;
    assert_eq!(status, 403, "{other}");
    let (status, none) = get_as(&format!("{url}/v1/commands/{missing}/tree"), Some(&token)).await;
    assert_eq!((status, other), (403, none));
    // It publishes nothing and operates nothing.
    let (status, body) = post_as(
        &format!("{url}/v1/commands"),
        &token,
        json!({"kind": "demo.counter", "owner": "member:42"}),
    )
    .await;
    assert_eq!(status, 403);
    assert!(body["detail"].as_str().unwrap().contains("events:publish"));

    // OAuth2 scopes are space-separated; a token with several holds each.
    let staff = hs256(
        json!({"sub": "staff:7", "scope": "commands:read events:publish", "exp": in_an_hour()}),
    );
    let (status, _) = get_as(&format!("{url}/v1/owners/member:43/feed"), Some(&staff)).await;
    assert_eq!(status, 200);

    // Expired, wrongly signed, unsigned, or without a subject: 401, with the reason.
    let expired = hs256(json!({"sub": "member:42", "scope": "owner:read", "exp": 1_000_000}));
    let (status, body) = get_as(&format!("{url}/v1/owners/member:42/feed"), Some(&expired)).await;
    assert_eq!(status, 401);
    assert!(
        body["detail"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "member:42", "scope": "commands:read", "exp": in_an_hour()}),
        &EncodingKey::from_secret(b"another-secret-that-is-long-enough-0123"),
    )
    .unwrap();
    let (status, body) = get_as(&format!("{url}/v1/owners/member:43/feed"), Some(&forged)).await;
    assert_eq!(status, 401);
    assert!(
        body["detail"].as_str().unwrap().contains("signature"),
        "{body}"
    );
    // `alg: none`, made by hand.
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(format!(
            r#"{{"sub":"member:43","scope":"commands:read","exp":{}}}"#,
            in_an_hour()
        )
        .as_bytes())
    );
    let (status, _) = get_as(&format!("{url}/v1/owners/member:43/feed"), Some(&none)).await;
    assert_eq!(status, 401);
    let no_sub = hs256(json!({"scope": "commands:read", "exp": in_an_hour()}));
    let (status, body) = get_as(&format!("{url}/v1/owners/member:43/feed"), Some(&no_sub)).await;
    assert_eq!(status, 401);
    assert!(body["detail"].as_str().unwrap().contains("`sub`"), "{body}");
    env.cleanup().await;
}

fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn rs256_tokens_are_checked_against_the_configured_public_key() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let dir = std::env::temp_dir().join(format!("cmdflow-rs256-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let public = dir.join("jwt.pub.pem");
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let mut env = TestEnv::new().await;
    let path = public.display().to_string();
    let gw = env
        .start_gateway_with(|c| c.jwt_rs256_public_key_file = Some(path))
        .await;
    let signer = EncodingKey::from_rsa_pem(key.serialize_pem().as_bytes()).unwrap();
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &json!({"sub": "member:5", "scope": "owner:read", "exp": in_an_hour()}),
        &signer,
    )
    .unwrap();
    let (status, body) = get_as(&format!("{}/v1/owners/member:5/feed", gw.url), Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    // HS256 is not configured on this gateway: such tokens are refused, whatever they hold.
    let hs = hs256(json!({"sub": "member:5", "scope": "owner:read", "exp": in_an_hour()}));
    let (status, body) = get_as(&format!("{}/v1/owners/member:5/feed", gw.url), Some(&hs)).await;
    assert_eq!(status, 401);
    assert!(body["detail"].as_str().unwrap().contains("HS256"), "{body}");
    env.cleanup().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn each_caller_has_its_own_rate_limit() {
    let keys = Keys::write();
    let mut env = TestEnv::new().await;
    let path = keys.path();
    let gw = env
        .start_gateway_with(|c| {
            c.auth_keys_file = Some(path);
            c.rate_limit_per_second = 1;
            c.rate_limit_burst = 5;
        })
        .await;
    let url = format!("{}/v1/dead-letters", gw.url);
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..8 {
        let (status, headers, body) = call(reqwest::Method::GET, &url, Some(&keys.ops), None).await;
        if status == 429 {
            assert_eq!(body["code"], "rate_limited", "{body}");
            assert!(body["detail"].as_str().unwrap().contains("key:oncall"));
            retry_after = headers
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        3,
        "{statuses:?}"
    );
    assert!(matches!(retry_after, Some(1..=2)), "{retry_after:?}");
    // Another caller is not held back by the first one's limit.
    let (status, _) = get_as(
        &format!("{}/v1/commands/{}", gw.url, uuid::Uuid::now_v7()),
        Some(&keys.reader),
    )
    .await;
    assert_eq!(status, 404);
    env.cleanup().await;
}

#[tokio::test]
async fn a_gateway_without_any_credential_source_refuses_to_start() {
    let env = TestEnv::new().await;
    let mut config = env.config.clone();
    config.dev_key = None;
    let err = cmdflow_gateway::Application::build(&config)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("CMDFLOW_AUTH_KEYS_FILE"), "{err}");
    config.dev_key = Some(Secret::new("short"));
    let err = cmdflow_gateway::Application::build(&config)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("at least 16"), "{err}");
    env.cleanup().await;
}
