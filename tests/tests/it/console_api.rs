//! The API the web console reads, at a real gateway and worker: the command search (filters,
//! keyset pages, bad parameters named, owner isolation, index plans at scale), the overview's
//! numbers, `whoami` for any credential, and the console's files served offline under a strict
//! policy.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use cmdflow_shared::CommandState;
use cmdflow_shared::config::Secret;
use cmdflow_shared::store::console::{self, CommandFilter};
use cmdflow_tests::{TestEnv, event, eventually, get, send, start_command};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const HS_SECRET: &str = "a-console-test-secret-long-enough-0123456";

/// A client that sends no credential unless told.
async fn get_with(url: &str, token: Option<&str>) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

async fn get_as(url: &str, token: Option<&str>) -> (u16, Value) {
    let (status, _, body) = get_with(url, token).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn jwt(sub: &str, scope: &str) -> String {
    let exp = chrono::Utc::now().timestamp() + 600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "scope": scope, "exp": exp}),
        &EncodingKey::from_secret(HS_SECRET.as_bytes()),
    )
    .unwrap()
}

fn ids(page: &Value) -> Vec<String> {
    page["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_command_search_filters_pages_refuses_bad_parameters_and_keeps_owners_apart() {
    let mut env = TestEnv::new().await;
    let gw = env
        .start_gateway_with(|c| c.jwt_hs256_secret = Some(Secret::new(HS_SECRET)))
        .await;
    env.start_worker().await;
    let mut mine = Vec::new();
    for data in [json!({}), json!({}), json!({"fail": true})] {
        let id = start_command(&gw.url, "demo.noop", "member:c1", data).await;
        mine.push(id);
    }
    let counter = start_command(&gw.url, "demo.counter", "member:c1", json!({})).await;
    mine.push(counter.clone());
    let theirs = start_command(&gw.url, "demo.noop", "member:c2", json!({})).await;
    env.wait_state(&mine[0], CommandState::Completed).await;
    env.wait_state(&mine[1], CommandState::Completed).await;
    env.wait_state(&mine[2], CommandState::Failed).await;
    env.wait_state(&counter, CommandState::Running).await;
    env.wait_state(&theirs, CommandState::Completed).await;

    let search = |q: &str| format!("{}/v1/commands?{q}", gw.url);
    let (status, all) = get(&search("owner=member:c1")).await;
    assert_eq!(status, 200, "{all}");
    let found = ids(&all);
    assert_eq!(found.len(), 4);
    assert_eq!(
        found.iter().collect::<HashSet<_>>(),
        mine.iter().collect::<HashSet<_>>()
    );
    let times: Vec<&str> = all["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["created_at"].as_str().unwrap())
        .collect();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted, "newest first");
    assert!(all["next"].is_null(), "one page: {all}");

    let (_, noop) = get(&search("owner=member:c1&kind=demo.noop")).await;
    assert_eq!(ids(&noop).len(), 3);
    let (_, failed) = get(&search("owner=member:c1&state=failed")).await;
    assert_eq!(ids(&failed), vec![mine[2].clone()]);
    let (_, open) = get(&search("state=open")).await;
    assert_eq!(
        ids(&open),
        vec![counter.clone()],
        "only the counter is open"
    );
    let (_, ended) = get(&search("kind=demo.noop&state=completed,failed")).await;
    assert_eq!(ids(&ended).len(), 4, "three of c1's and one of c2's");
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let (_, none) = get(&search(&format!("since={}", later.replace('+', "%2B")))).await;
    assert!(ids(&none).is_empty(), "{none}");
    let (_, window) = get(&search(&format!(
        "owner=member:c1&until={}",
        later.replace('+', "%2B")
    )))
    .await;
    assert_eq!(ids(&window).len(), 4);

    // Pages of two, by cursor, give the same commands in the same order as one page.
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let (status, page) = get(&search(&format!("owner=member:c1&limit=2&after={after}"))).await;
        assert_eq!(status, 200, "{page}");
        paged.extend(ids(&page));
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(paged, found);

    // Bad parameters: 422 with the usual body, naming the parameter.
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1000", "limit"),
        ("state=sleeping", "state"),
        ("since=yesterday", "since"),
        ("until=2026-02-30T00:00:00Z", "until"),
        ("owner=Pirate:1", "owner"),
        ("kind=Quote!", "kind"),
        ("after=not-a-cursor", "after"),
        ("colour=red", "query"),
    ] {
        let (status, body) = get(&search(query)).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (422, Some("invalid_field")),
            "{query}: {body}"
        );
        assert!(
            body["detail"].as_str().unwrap().starts_with(field)
                || body["detail"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("`{field}")),
            "{query}: the detail names {field}: {body}"
        );
    }

    // An `owner:read` token sees its own owner's commands, and nothing else.
    let own = jwt("member:c1", "owner:read");
    let (status, page) = get_as(&search("owner=member:c1"), Some(&own)).await;
    assert_eq!((status, ids(&page).len()), (200, 4), "{page}");
    let (status, other) = get_as(&search("owner=member:c2"), Some(&own)).await;
    assert_eq!((status, other["code"].as_str()), (403, Some("forbidden")));
    let (status, unknown) = get_as(&search("owner=member:nobody"), Some(&own)).await;
    assert_eq!(
        (status, &unknown["detail"]),
        (403, &other["detail"]),
        "the same answer whether or not the owner exists"
    );
    let (status, everyone) = get_as(&search(""), Some(&own)).await;
    assert_eq!(status, 403, "{everyone}");
    let (status, body) = get_as(&search("owner=member:c1"), None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let publisher = jwt("shop", "events:publish");
    let (status, body) = get_as(&search(""), Some(&publisher)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("commands:read"));
    env.cleanup().await;
}

#[tokio::test]
async fn whoami_answers_any_credential_and_the_overview_needs_commands_read() {
    let mut env = TestEnv::new().await;
    let gw = env
        .start_gateway_with(|c| c.jwt_hs256_secret = Some(Secret::new(HS_SECRET)))
        .await;
    let who = |token: Option<String>| {
        let url = format!("{}/v1/whoami", gw.url);
        async move { get_as(&url, token.as_deref()).await }
    };
    let (status, me) = who(Some(cmdflow_tests::TEST_KEY.to_owned())).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["id"], "key:dev");
    assert_eq!(
        me["scopes"],
        json!([
            "events:publish",
            "commands:read",
            "owner:read",
            "ops",
            "owners:link"
        ])
    );
    assert!(me["owner"].is_null());
    let (status, me) = who(Some(jwt("member:7", "owner:read"))).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(
        (me["id"].as_str(), me["owner"].as_str()),
        (Some("jwt:member:7"), Some("member:7"))
    );
    assert_eq!(me["scopes"], json!(["owner:read"]));
    // A credential with neither read scope still learns what it holds.
    let (status, me) = who(Some(jwt("shop", "events:publish"))).await;
    assert_eq!((status, &me["scopes"]), (200, &json!(["events:publish"])));
    assert!(me["owner"].is_null(), "a service is not an owner");
    let (status, body) = who(None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let (status, body) = who(Some("cfk_wrong_key_0000000000".to_owned())).await;
    assert_eq!(
        (status, body["detail"].as_str()),
        (401, Some("unknown API key"))
    );

    let overview = format!("{}/v1/overview", gw.url);
    let (status, body) = get_as(&overview, Some(&jwt("member:7", "owner:read"))).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    assert!(body["detail"].as_str().unwrap().contains("commands:read"));
    let (status, body) = get_as(&overview, Some(&jwt("oncall", "ops"))).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = get_as(&overview, Some(&jwt("support", "commands:read"))).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = get_as(&overview, None).await;
    assert_eq!(status, 401);

    // Both are in the OpenAPI document.
    let (_, doc) = get_as(&format!("{}/openapi.json", gw.url), None).await;
    for path in ["/v1/whoami", "/v1/overview", "/v1/commands"] {
        assert!(doc["paths"][path]["get"].is_object(), "{path} documented");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn the_overview_counts_throughput_failures_dead_letters_timers_and_funnel_stages() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let mut done = Vec::new();
    for _ in 0..5 {
        done.push(start_command(&gw.url, "demo.noop", "member:o1", json!({})).await);
    }
    let timer = start_command(
        &gw.url,
        "demo.timer",
        "member:o1",
        json!({"after_ms": 30 * 60 * 1000}),
    )
    .await;
    let mut visitor = event("visitor.arrived", None, json!({"name": "Ada"}));
    visitor["subject"] = json!("visitor:o2");
    visitor["correlationid"] = json!("visitor:o2");
    send(&gw.url, &visitor).await;
    env.publish_raw("demo.increment", b"{not an event").await;
    for id in &done {
        env.wait_state(id, CommandState::Completed).await;
    }
    env.wait_state(&timer, CommandState::Waiting).await;

    let o = eventually(WAIT, "the overview to count everything", || async {
        let (status, o) = get(&format!("{}/v1/overview", gw.url)).await;
        assert_eq!(status, 200, "{o}");
        let funnel = o["funnels"].as_array().unwrap().iter().any(|f| {
            f["funnel"] == "visitor_to_member" && f["stage"] == "visitor" && f["people"] == 1
        });
        (o["dead_letters_open"] == 1 && funnel).then_some(o)
    })
    .await;
    assert!(o["processed"]["total"].as_i64().unwrap() >= 6, "{o}");
    assert!(o["processed"]["per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(o["failed"]["dead_lettered"], 1, "{o}");
    assert_eq!(o["failed"]["total"], 1);
    assert_eq!(o["window_seconds"], 60);
    let series = o["series"].as_array().unwrap();
    assert_eq!(series.len(), 12);
    let summed: i64 = series
        .iter()
        .map(|b| b["processed"].as_i64().unwrap())
        .sum();
    assert_eq!(summed, o["processed"]["total"].as_i64().unwrap());
    assert!(
        series
            .windows(2)
            .all(|w| w[0]["at"].as_str() < w[1]["at"].as_str()),
        "oldest first"
    );
    assert_eq!(o["timers"]["due_next_hour"], 1, "the 30-minute timer: {o}");
    assert_eq!(o["timers"]["overdue"], 0);
    assert_eq!(o["outbox_backlog"], 0);
    assert_eq!(
        o["work_queue"]["queue"],
        format!("{}.work.*", env.config.namespace)
    );
    assert!(o["work_queue"]["depth"].is_u64(), "{o}");
    assert!(o["work_queue"]["error"].is_null());
    env.cleanup().await;
}

#[tokio::test]
async fn the_console_files_are_served_without_credentials_under_a_strict_policy() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    let (status, headers, body) = get_with(&format!("{}/console", gw.url), None).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'") && csp.contains("script-src 'self'"));
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["cache-control"], "no-cache");
    let html = String::from_utf8(body).unwrap();
    assert!(html.contains(r#"<script type="module" src="/console/assets/app.js">"#));

    for (file, content_type) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ] {
        let url = format!("{}/console/assets/{file}", gw.url);
        let (status, headers, body) = get_with(&url, None).await;
        assert_eq!(status, 200, "{file}");
        assert_eq!(headers["content-type"], content_type);
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert!(!body.is_empty());
        let etag = headers["etag"].to_str().unwrap().to_owned();
        let again = reqwest::Client::new()
            .get(&url)
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status().as_u16(), 304, "{file} revalidates");
    }
    let (status, headers, body) =
        get_with(&format!("{}/console/assets/missing.js", gw.url), None).await;
    assert_eq!(status, 404);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["code"], "not_found");
    env.cleanup().await;
}

/// The search's statements stay index scans on a large table, whatever the filters, and the
/// keyset cursor neither skips nor repeats commands created in the same microsecond.
#[tokio::test]
async fn the_search_reads_by_index_at_scale_and_pages_through_ties() {
    let env = TestEnv::new().await;
    sqlx::query(
        "INSERT INTO commands (id, kind, owner, root_id, state, created_at, updated_at, ended_at)
         SELECT id, kind, owner, id, state, at, at,
                CASE WHEN state IN ('completed', 'failed', 'aborted') THEN at END
           FROM (SELECT gen_random_uuid() AS id,
                        (ARRAY['query', 'quote', 'demo.noop', 'membership'])[1 + g % 4] AS kind,
                        'member:' || (g % 20000) AS owner,
                        CASE WHEN g % 500 = 0 THEN 'failed' WHEN g % 97 = 0 THEN 'running' ELSE 'completed' END::command_state AS state,
                        now() - interval '30 days' + g * interval '10 seconds' AS at
                   FROM generate_series(1, 200000) g) s",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let tie = chrono::Utc::now() - chrono::Duration::days(40);
    sqlx::query(
        "INSERT INTO commands (id, kind, owner, root_id, state, created_at, updated_at, ended_at)
         SELECT id, 'demo.tie', 'member:tie', id, 'completed', $1, $1, $1
           FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 300)) s",
    )
    .bind(tie)
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE commands")
        .execute(&env.pool)
        .await
        .unwrap();

    let at = chrono::Utc::now() - chrono::Duration::days(10);
    for (what, index, filter) in [
        ("no filter", "commands_recent", CommandFilter::default()),
        (
            "a kind",
            "commands_kind_recent",
            CommandFilter {
                kind: Some("membership".into()),
                ..CommandFilter::default()
            },
        ),
        (
            "an absent kind",
            "commands_kind_recent",
            CommandFilter {
                kind: Some("no.such".into()),
                ..CommandFilter::default()
            },
        ),
        (
            "an owner",
            "commands_owner_recent",
            CommandFilter {
                owner: Some("member:42".into()),
                ..CommandFilter::default()
            },
        ),
        (
            "failed",
            "commands_failed_recent",
            CommandFilter {
                states: vec![CommandState::Failed],
                ..CommandFilter::default()
            },
        ),
        (
            "a deep page",
            "commands_recent",
            CommandFilter {
                before: Some((at, cmdflow_shared::CommandId::new())),
                ..CommandFilter::default()
            },
        ),
        (
            "a day",
            "commands_recent",
            CommandFilter {
                since: Some(at - chrono::Duration::days(1)),
                until: Some(at),
                ..CommandFilter::default()
            },
        ),
    ] {
        let plan = console::explain_search(&env.pool, &filter, 51)
            .await
            .unwrap()
            .join("\n");
        assert!(
            plan.contains(index) && !plan.contains("Seq Scan"),
            "{what} reads {index}: {plan}"
        );
    }

    let mut seen = Vec::new();
    let mut filter = CommandFilter {
        owner: Some("member:tie".into()),
        ..CommandFilter::default()
    };
    loop {
        let page = console::search(&env.pool, &filter, 7).await.unwrap();
        let Some(last) = page.last() else { break };
        filter.before = Some((last.created_at, last.id));
        seen.extend(page.iter().map(|c| c.id));
    }
    assert_eq!(seen.len(), 300);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 300, "no repeats");
    env.cleanup().await;
}
