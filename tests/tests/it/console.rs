//! The web console in a real headless Chromium, driven over WebDriver (chromedriver), against a
//! real fleet: gateway, worker and scheduler on PostgreSQL, RabbitMQ and Redis. A person signs
//! in, reads the overview, finds a command by owner, reads its tree and timeline and aborts it
//! through the confirmation dialog, replays a dead-letter group after a dry run and sees it
//! processed, and opens a person's page with their unfinished quote. Each page is saved as a
//! screenshot (1280 px and 375 px wide), and no page is wider than a 375 px screen.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/test.sh` installs them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cmdflow_shared::CommandState;
use cmdflow_tests::fleet::{Scratch, free_port, port_open, signal};
use cmdflow_tests::{
    TEST_KEY, TestEnv, event, eventually, frozen_counter_with_dead_increments, get, send,
    start_command,
};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Where the screenshots go: `$CARGO_TARGET_DIR/console-screenshots`, else the workspace's
/// `target/console-screenshots`.
fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("create the screenshot directory");
    dir
}

fn find_binary(name: &str, usual: &str) -> Option<PathBuf> {
    if Path::new(usual).exists() {
        return Some(PathBuf::from(usual));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.exists())
    })
}

/// chromedriver on a free port, in its own process group (so Chromium goes with it), and a
/// WebDriver session of a headless Chromium with a fresh profile.
struct Browser {
    client: Client,
    driver_pid: u32,
    _driver: tokio::process::Child,
    _profile: Scratch,
    shots: PathBuf,
}

impl Browser {
    async fn start() -> Browser {
        let chromedriver = find_binary("chromedriver", CHROMEDRIVER).unwrap_or_else(|| {
            panic!(
                "chromedriver is missing: the console's browser tests need Debian's `chromium` and \
                 `chromium-driver` (apt-get install -y chromium chromium-driver; \
                 ./scripts/test.sh installs them)"
            )
        });
        let chromium = find_binary("chromium", CHROMIUM).unwrap_or_else(|| {
            panic!(
                "chromium is missing: install Debian's `chromium` and `chromium-driver` \
                 (apt-get install -y chromium chromium-driver)"
            )
        });
        let profile = Scratch::new("cfchrome");
        let port = free_port();
        let log = std::fs::File::create(profile.join("chromedriver.log")).unwrap();
        let driver = tokio::process::Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let driver_pid = driver.id().expect("chromedriver's pid");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !port_open(port).await {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on {port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let user_data = profile.join("profile");
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", user_data.display()),
                ],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start a Chromium session: {e}\n{}",
                    cmdflow_tests::fleet::tail_of(&profile.join("chromedriver.log"), 30)
                )
            });
        let shots = screenshot_dir();
        println!("console screenshots: {}", shots.display());
        Browser {
            client,
            driver_pid,
            _driver: driver,
            _profile: profile,
            shots,
        }
    }

    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Waits until `script` returns a truthy value; on time-out, saves a screenshot and fails
    /// with what the page says.
    async fn until(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self.js(script).await;
            let truthy = match &value {
                Value::Null | Value::Bool(false) => false,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            if Instant::now() > deadline {
                self.shot("failure").await;
                let text = self
                    .js("return document.getElementById('main').innerText")
                    .await;
                panic!("timed out waiting for {what}; the page says:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, css: &str) {
        self.until(&format!("{css} to be there"), &exists(css))
            .await;
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.until(&format!("{css} to be there"), &exists(css))
            .await;
        let field = self.client.find(Locator::Css(css)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    /// Saves the whole page: the window grows to the page's height for the picture.
    async fn shot(&self, name: &str) -> PathBuf {
        let height = self
            .js("return document.scrollingElement.scrollHeight")
            .await
            .as_u64()
            .unwrap();
        let (w, h) = self.client.get_window_size().await.unwrap();
        self.client
            .set_window_size(w as u32, (height as u32).clamp(h as u32, 6000))
            .await
            .unwrap();
        let png = self.client.screenshot().await.unwrap();
        self.client
            .set_window_size(w as u32, h as u32)
            .await
            .unwrap();
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        println!("screenshot: {}", path.display());
        path
    }

    /// The page is no wider than the window: nothing to scroll sideways.
    async fn assert_no_horizontal_overflow(&self, page: &str) {
        let sizes = self
            .js("return [document.scrollingElement.scrollWidth, window.innerWidth]")
            .await;
        let (scroll, inner) = (sizes[0].as_i64().unwrap(), sizes[1].as_i64().unwrap());
        assert!(
            scroll <= inner,
            "{page} is {scroll} px wide in a {inner} px window"
        );
    }

    async fn stop(self) {
        drop(self.client.clone().close().await);
        signal(self.driver_pid, "KILL", true);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A failed test still ends chromedriver and the Chromium it started.
        signal(self.driver_pid, "KILL", true);
    }
}

fn exists(css: &str) -> String {
    format!(
        "return document.querySelector({}) !== null",
        serde_json::to_string(css).unwrap()
    )
}

fn text_of(css: &str) -> String {
    format!(
        "const e = document.querySelector({}); return e ? e.innerText : ''",
        serde_json::to_string(css).unwrap()
    )
}

/// A broadcast about a person: `subject` and `correlationid` are the person.
fn about(ty: &str, person: &str, data: Value) -> Value {
    let mut e = event(ty, None, data);
    e["subject"] = json!(person);
    e["correlationid"] = json!(person);
    e
}

#[tokio::test]
async fn a_person_uses_the_console_in_a_real_browser() {
    let started = Instant::now();
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    env.start_worker().await;
    env.start_scheduler();

    // What the pages will show.
    send(
        &gw.url,
        &about("visitor.arrived", "visitor:e2e-funnel", json!({})),
    )
    .await;
    let fanout = start_command(
        &gw.url,
        "demo.fanout",
        "member:e2e-abort",
        json!({
            "children": 2, "child_kind": "demo.wait", "deadline_ms": 3_600_000,
            "child_data": {"type": "console.never", "key": "e2e", "timeout_ms": 3_600_000},
        }),
    )
    .await;
    env.wait_state(&fanout, CommandState::Waiting).await;
    eventually(WAIT, "both children waiting", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM commands WHERE parent_id = $1::uuid AND state = 'waiting'",
        )
        .bind(&fanout)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        (waiting == 2).then_some(())
    })
    .await;
    let counter = frozen_counter_with_dead_increments(&env, &gw.url, "member:e2e-dead", 3).await;
    let quote = start_command(
        &gw.url,
        "quote",
        "visitor:e2e-quote",
        json!({"items": [{"name": "chair", "qty": 2}], "name": "Ada"}),
    )
    .await;
    eventually(WAIT, "the unfinished quote in the feed", || async {
        let (_, feed) = get(&format!("{}/v1/owners/visitor:e2e-quote/feed", gw.url)).await;
        (feed["pending"][0]["code"] == "quote.unfinished").then_some(())
    })
    .await;

    let browser = Browser::start().await;
    let console = format!("{}/console", gw.url);

    // Sign in.
    browser.client.goto(&console).await.unwrap();
    browser.type_into("#credential", TEST_KEY).await;
    browser.click(".signin button[type=submit]").await;

    // Overview: the numbers, and the funnel chart.
    browser
        .until("the overview", &exists("[data-metric=processed] .value"))
        .await;
    browser
        .until(
            "the visitor_to_member funnel on the chart",
            "return [...document.querySelectorAll('[data-section=funnels] figure')].some(f => f.innerText.includes('visitor_to_member') && f.querySelector('svg rect'))",
        )
        .await;
    let dead = browser.js(&text_of("[data-metric=dead] .value")).await;
    assert_eq!(dead, "3", "three dead letters on the overview");
    let waiting = browser.js(&text_of("[data-metric=waiting] .value")).await;
    assert_eq!(waiting, "0", "no event waits for a flow version");
    let who = browser.js(&text_of("#who")).await;
    assert!(who.as_str().unwrap().contains("key:dev"), "{who}");
    browser.shot("overview-1280").await;

    // Commands: find the fan-out by its owner, open it.
    browser.click("#nav a[data-page=commands]").await;
    browser
        .type_into("input[name=owner]", "member:e2e-abort")
        .await;
    browser.click("form.filters button[type=submit]").await;
    let link = format!("[data-role=results] a[href='#/commands/{fanout}']");
    browser
        .until("the fan-out in the results", &exists(&link))
        .await;
    let rows = browser
        .js("return document.querySelectorAll('[data-role=results] tbody tr').length")
        .await;
    let owned: i64 =
        sqlx::query_scalar("SELECT count(*) FROM commands WHERE owner = 'member:e2e-abort'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(rows, owned, "the root and its children, all of that owner");
    browser.shot("commands-1280").await;
    browser.click(&link).await;

    // One command: its tree (itself and two waiting children), timeline, timers and waits.
    browser
        .until(
            "the tree with two children",
            "return document.querySelectorAll('[data-role=tree] li').length === 3",
        )
        .await;
    let tree = browser.js(&text_of("[data-role=tree]")).await;
    let tree = tree.as_str().unwrap();
    assert_eq!(tree.matches("demo.wait").count(), 2, "{tree}");
    assert_eq!(
        (
            tree.matches("running").count(),
            tree.matches("waiting").count()
        ),
        (0, 3),
        "{tree}"
    );
    browser
        .until(
            "the timeline",
            "return document.querySelectorAll('[data-role=timeline] li[data-entry=received]').length >= 1",
        )
        .await;
    let timeline = browser.js(&text_of("[data-role=timeline]")).await;
    assert!(
        timeline.as_str().unwrap().contains("command.start"),
        "{timeline}"
    );
    assert!(timeline.as_str().unwrap().contains("State changed"));
    let pending = browser.js(&text_of("[data-role=pending]")).await;
    assert!(
        pending.as_str().unwrap().contains("group_deadline"),
        "its deadline timer: {pending}"
    );
    browser.shot("command-1280").await;

    // A child shows its wait for `console.never`.
    let child: String = sqlx::query_scalar(
        "SELECT id::text FROM commands WHERE parent_id = $1::uuid ORDER BY id LIMIT 1",
    )
    .bind(&fanout)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    browser
        .client
        .goto(&format!("{console}#/commands/{child}"))
        .await
        .unwrap();
    browser
        .until(
            "the child's wait",
            "return (document.querySelector('[data-role=pending]')?.innerText || '').includes('console.never')",
        )
        .await;
    browser.shot("command-child-1280").await;
    browser.click("[data-role=tree] li a").await; // the root
    browser
        .until("the root again", &exists("button[data-role=abort]"))
        .await;
    browser
        .until(
            "the root's page",
            &format!("return document.querySelector('[data-role=id]')?.innerText === '{fanout}'"),
        )
        .await;

    // Abort: the dialog takes the focus, Esc cancels and gives it back; then confirm.
    browser.click("button[data-role=abort]").await;
    browser
        .until(
            "the dialog with the focus",
            "const d = document.querySelector('dialog[open]'); return d && d.contains(document.activeElement)",
        )
        .await;
    browser.shot("command-abort-dialog-1280").await;
    browser
        .client
        .active_element()
        .await
        .unwrap()
        .send_keys("\u{E00C}")
        .await
        .unwrap();
    browser
        .until(
            "the focus back on the abort button",
            "return !document.querySelector('dialog') && document.activeElement?.dataset.role === 'abort'",
        )
        .await;
    browser.click("button[data-role=abort]").await;
    browser
        .type_into("dialog textarea[name=reason]", "a console test")
        .await;
    browser.click("dialog button[data-role=confirm]").await;
    browser
        .until(
            "the command aborted on its page",
            "return (document.querySelector('h1')?.innerText || '').includes('aborted') && document.querySelectorAll('[data-role=tree] li[data-state=aborted]').length === 3",
        )
        .await;
    let abort = browser
        .js("return document.querySelector('button[data-role=abort]').disabled")
        .await;
    assert_eq!(abort, true, "nothing left to abort");
    let root = env.wait_state(&fanout, CommandState::Aborted).await;
    assert_eq!(root.reason.as_deref(), Some("a console test"));
    let child_after = env.wait_state(&child, CommandState::Aborted).await;
    assert!(
        child_after.reason.unwrap_or_default().contains(&fanout),
        "the abort cascaded from the root"
    );
    browser.shot("command-aborted-1280").await;

    // An API error is shown as it came.
    browser
        .client
        .goto(&format!("{console}#/commands?state=sleeping"))
        .await
        .unwrap();
    let error = browser
        .until(
            "the API's error",
            "const e = document.querySelector('[data-role=results] .error'); return e ? e.innerText : ''",
        )
        .await;
    let error = error.as_str().unwrap();
    assert!(
        error.contains("HTTP 422 invalid_field")
            && error.contains("state: `sleeping` is not a state"),
        "{error}"
    );

    // Dead letters: the group, a dry run, the replay, and its progress to the end.
    browser.click("#nav a[data-page=dead-letters]").await;
    let group = "button[data-role=replay][data-signature='permanent:demo.counter']";
    browser.until("the dead-letter group", &exists(group)).await;
    let count = browser
        .js("return [...document.querySelectorAll('[data-role=groups] tbody tr')].find(r => r.innerText.includes('permanent:demo.counter')).querySelector('[data-role=count]').innerText")
        .await;
    assert_eq!(count, "3");
    browser.shot("dead-letters-1280").await;
    send(&gw.url, &event("demo.unfreeze", Some(&counter), json!({}))).await;
    eventually(WAIT, "unfrozen", || async {
        (env.command(&counter).await?.data["frozen"] == false).then_some(())
    })
    .await;
    browser.click(group).await;
    browser
        .until(
            "the dry run's count",
            &exists("dialog [data-role=dry-run][data-count='3']"),
        )
        .await;
    assert_eq!(
        env.command(&counter).await.unwrap().data["count"],
        0,
        "a dry run changes nothing"
    );
    let label = browser
        .js(&text_of("dialog button[data-role=confirm]"))
        .await;
    assert_eq!(label, "Replay 3");
    browser.shot("dead-letters-replay-dialog-1280").await;
    browser.click("dialog button[data-role=confirm]").await;
    browser
        .until(
            "the replay finished",
            &exists("[data-role=replay] [data-state=finished]"),
        )
        .await;
    let progress = browser.js(&text_of("[data-role=replay]")).await;
    assert!(
        progress.as_str().unwrap().contains("Replayed 3 of 3"),
        "{progress}"
    );
    browser
        .until(
            "the group gone from the list",
            &format!("return !document.querySelector(\"{group}\")"),
        )
        .await;
    browser.shot("dead-letters-replayed-1280").await;
    // Processed: the counter counted the three replayed increments.
    browser
        .client
        .goto(&format!("{console}#/commands/{counter}"))
        .await
        .unwrap();
    browser
        .until(
            "the counter at 3",
            "return (document.querySelector('[data-role=data] pre')?.innerText || '').includes('\"count\": 3')",
        )
        .await;
    assert_eq!(env.command(&counter).await.unwrap().data["count"], 3);

    // Person: the unfinished quote, as the person's app would say it.
    browser
        .client
        .goto(&format!("{console}#/person/visitor%3Ae2e-quote"))
        .await
        .unwrap();
    let card = browser
        .until(
            "the unfinished quote",
            &text_of(".pending-card[data-code='quote.unfinished']"),
        )
        .await;
    assert!(
        card.as_str()
            .unwrap()
            .contains("Here is that quote you started but never finished"),
        "{card}"
    );
    let link = browser
        .js("return document.querySelector(\".pending-card[data-code='quote.unfinished'] a\").getAttribute('href')")
        .await;
    assert_eq!(link, format!("#/commands/{quote}"));
    // Greeted by the name the feed knows; an item object reads as its name.
    assert_eq!(browser.js(&text_of(".hello")).await, "Hello, Ada");
    let activity = browser.js(&text_of("[data-role=activity]")).await;
    let activity = activity.as_str().unwrap();
    assert!(
        activity.contains("Your quote for chair") && !activity.contains("[object Object]"),
        "{activity}"
    );
    browser.shot("person-1280").await;

    // Kinds: the catalogue the workers published, with what each kind's start requires.
    browser
        .client
        .goto(&format!("{console}#/kinds"))
        .await
        .unwrap();
    let kinds = browser
        .until("the kind catalogue", &text_of("main table tbody"))
        .await;
    let kinds = kinds.as_str().unwrap();
    for needle in [
        "demo.counter",
        "demo.requested",
        "funnel.visitor_to_member",
        "funnel",
    ] {
        assert!(kinds.contains(needle), "{needle} in {kinds}");
    }
    let query_row = browser
        .js("return [...document.querySelectorAll('main table tbody tr')].find(r => r.cells[0].innerText === 'query').innerText")
        .await;
    assert!(
        query_row
            .as_str()
            .unwrap()
            .contains("A search a person ran"),
        "{query_row}"
    );
    browser.shot("kinds-1280").await;

    // Flows: a funnel's versions, drawn, with its Mermaid source and its file.
    browser
        .client
        .goto(&format!("{console}#/flows"))
        .await
        .unwrap();
    let flows = browser
        .until("the flows", &text_of("main table tbody"))
        .await;
    assert!(
        flows.as_str().unwrap().contains("funnel.visitor_to_member"),
        "{flows}"
    );
    browser
        .client
        .goto(&format!("{console}#/flows/funnel.visitor_to_member"))
        .await
        .unwrap();
    let drawn = browser
        .until(
            "the flow's diagram, drawn",
            "const img = document.querySelector('.flow-diagram img'); return img && img.complete && img.naturalWidth > 0 ? img.naturalWidth : null",
        )
        .await;
    assert!(drawn.as_i64().unwrap() > 100, "{drawn}");
    let mermaid = browser
        .js("return document.querySelectorAll('details pre')[0].textContent")
        .await;
    assert!(
        mermaid
            .as_str()
            .unwrap()
            .starts_with("stateDiagram-v2\n    state \"visitor\" as visitor"),
        "{mermaid}"
    );
    browser.shot("flow-1280").await;

    // A credential the gateway no longer accepts: the API's 401 brings the sign-in back, with
    // the API's reason.
    browser
        .js("sessionStorage.setItem('cmdflow.console.token', 'cfk_revoked_0000000000000000'); return true")
        .await;
    browser
        .client
        .goto(&format!("{console}#/commands?owner=member%3Ae2e-dead"))
        .await
        .unwrap();
    let signed_out = browser
        .until("the sign-in form again", &text_of(".signin .error"))
        .await;
    assert!(
        signed_out
            .as_str()
            .unwrap()
            .contains("HTTP 401 unauthorized")
            && signed_out.as_str().unwrap().contains("unknown API key"),
        "{signed_out}"
    );
    browser.shot("signed-out-1280").await;
    browser.type_into("#credential", TEST_KEY).await;
    browser.click(".signin button[type=submit]").await;
    browser
        .until("signed in again", &exists("[data-role=results] tbody tr"))
        .await;

    // 375 px wide: every page fits, nothing scrolls sideways.
    browser.client.set_window_size(375, 812).await.unwrap();
    let width = browser.js("return window.innerWidth").await;
    assert!(
        width.as_i64().unwrap() <= 375,
        "the window is {width} px wide"
    );
    for (name, hash, ready) in [
        ("overview", "#/", "[data-metric=processed] .value"),
        (
            "commands",
            "#/commands?owner=member%3Ae2e-dead",
            "[data-role=results] tbody tr",
        ),
        (
            "command",
            &*format!("#/commands/{fanout}"),
            "[data-role=tree] li",
        ),
        (
            "dead-letters",
            "#/dead-letters?state=replayed",
            "[data-role=groups] tbody tr",
        ),
        ("person", "#/person/visitor%3Ae2e-quote", ".pending-card"),
        ("kinds", "#/kinds", "main table tbody tr"),
        (
            "flow",
            "#/flows/funnel.visitor_to_member",
            ".flow-diagram img",
        ),
    ] {
        browser
            .client
            .goto(&format!("{console}{hash}"))
            .await
            .unwrap();
        browser
            .until(&format!("{name} at 375 px"), &exists(ready))
            .await;
        // Let late sections (the timeline, the chart) arrive before measuring.
        tokio::time::sleep(Duration::from_millis(300)).await;
        browser.shot(&format!("{name}-375")).await;
        browser.assert_no_horizontal_overflow(name).await;
    }

    browser.stop().await;
    env.cleanup().await;
    println!("the console's browser test took {:?}", started.elapsed());
}
