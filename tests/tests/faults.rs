//! The fault suite: real `cmdflow gateway`, `cmdflow worker` and `cmdflow scheduler` processes
//! under load (fan-outs of `demo.noop` children and increments of `demo.counter` commands, sent
//! through the gateway), one fault per test, then the store must show that nothing accepted was
//! lost or applied twice:
//!
//! - every event the gateway accepted (202) has its `processed_events` row (applied);
//! - no event was received twice by a command (`command_events` history, whole database);
//! - every fan-out (and timer) tree ended, successfully;
//! - every counter equals the number of accepted increments addressed to it;
//! - every counter received its increments in the order they were accepted: each counter's
//!   increments are sent one after the other (the next once the last got its 202), and carry
//!   their place (`seq`), which the counter's history must show rising.
//!
//! The load generator counts only 202s as accepted and sends anything else again with the same
//! event id (commands dedupe by id), as a well-behaved upstream service does.
//!
//! Faults that restart a service use private instances ([`cmdflow_tests::fleet`]); the shared
//! PostgreSQL, Redis and RabbitMQ are never stopped. Each test prints one line:
//! `FAULT | <fault> | accepted=… | applied=… | duplicates=… | trees_not_terminal=… | recover_ms=…`
//! where `recover_ms` is the time from the end of the fault (the process restarted, the service
//! back, the link restored) until the first event is applied after it: a `received` history row
//! written after that instant (for the scheduler, the first `timer.fired`). It is the outage
//! as the fleet's users see it, not the time to drain the backlog.
//!
//! Run: `cargo build -p cmdflow --bin cmdflow && cargo test -p cmdflow-tests --test
//! faults -- --nocapture`. A test binary of its own: its faults restart services and its
//! recovery is timed, so it does not share the machine with the other integration tests.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cmdflow_tests::TestEnv;
use cmdflow_tests::fleet::{Fleet, PrivatePostgres, PrivateRabbit, PrivateRedis};
use cmdflow_tests::proxy::Proxy;
use serde_json::{Value, json};
use uuid::Uuid;

/// The `source` of every event the load sends: `processed_events` is keyed by it.
const SOURCE: &str = "faults";
/// How long an event is sent again before the load generator gives up on it.
const GIVE_UP_AFTER: Duration = Duration::from_secs(120);
/// How long the fleet may take to apply everything once the fault has ended.
const DRAIN_WITHIN: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// The load

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum What {
    CounterStart,
    Increment(usize),
    FanoutStart,
    TimerStart,
}

#[derive(Debug, Clone)]
struct Planned {
    command: Uuid,
    id: String,
    what: What,
    body: Vec<u8>,
}

impl Planned {
    /// An event of type `ty` addressed to `command`, with a fixed id for all its sends.
    fn new(command: Uuid, ty: &str, data: Value, what: What) -> Planned {
        let id = Uuid::now_v7().to_string();
        let event = json!({
            "specversion": "1.0", "id": id, "source": SOURCE, "type": ty,
            "commandid": command.to_string(), "data": data,
        });
        Planned {
            command,
            id,
            what,
            body: serde_json::to_vec(&event).unwrap(),
        }
    }

    /// A start through `POST /v1/commands`, with the command id chosen here: resent, it is the
    /// same start (its event id is `start-{id}`).
    fn start(command: Uuid, kind: &str, data: Value, what: What) -> Planned {
        let body = json!({"id": command.to_string(), "kind": kind, "owner": "system:faults", "data": data});
        Planned {
            command,
            id: format!("start-{command}"),
            what,
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    fn is_start(&self) -> bool {
        self.id.starts_with("start-")
    }
}

/// What a test sends: counters started before the fault, then a mixed load spread over time.
struct Plan {
    counters: Vec<Uuid>,
    setup: Vec<Planned>,
    main: Vec<Planned>,
}

#[derive(Debug, Clone, Copy)]
struct Shape {
    counters: usize,
    increments: usize,
    fanouts: usize,
    children: usize,
    /// `demo.timer` commands, due 1 to 8 s after they start.
    timers: usize,
}

impl Plan {
    fn new(shape: Shape) -> Plan {
        let counters: Vec<Uuid> = (0..shape.counters).map(|_| Uuid::now_v7()).collect();
        let setup = counters
            .iter()
            .map(|id| Planned::start(*id, "demo.counter", json!({}), What::CounterStart))
            .collect();
        // Interleave the three kinds evenly, so each is in flight when the fault hits.
        let mut main: Vec<(f64, Planned)> = Vec::new();
        for i in 0..shape.increments {
            let c = i % shape.counters;
            let e = Planned::new(
                counters[c],
                "demo.increment",
                json!({"by": 1, "seq": i / shape.counters}),
                What::Increment(c),
            );
            main.push((i as f64 / shape.increments as f64, e));
        }
        for i in 0..shape.fanouts {
            let e = Planned::start(
                Uuid::now_v7(),
                "demo.fanout",
                json!({"children": shape.children}),
                What::FanoutStart,
            );
            main.push((i as f64 / shape.fanouts as f64, e));
        }
        for i in 0..shape.timers {
            let after_ms = 1_000 + (i * 7_000 / shape.timers.max(1)) as u64;
            let e = Planned::start(
                Uuid::now_v7(),
                "demo.timer",
                json!({"after_ms": after_ms}),
                What::TimerStart,
            );
            main.push((i as f64 / shape.timers as f64, e));
        }
        main.sort_by(|a, b| a.0.total_cmp(&b.0));
        Plan {
            counters,
            setup,
            main: main.into_iter().map(|(_, e)| e).collect(),
        }
    }
}

/// What the gateway answered.
#[derive(Default)]
struct Tally {
    accepted: Vec<Planned>,
    /// Answers by HTTP status; 0 counts requests that got no answer at all.
    answers: HashMap<u16, u64>,
    gave_up: Vec<String>,
    refused: Vec<String>,
}

type SharedTally = Arc<Mutex<Tally>>;

/// Posts `event` until the gateway answers 202, with the same id each time. A 4xx other than
/// 408/429 is the test's fault: recorded as refused, never sent again.
async fn deliver(client: reqwest::Client, url: String, event: Planned, tally: SharedTally) {
    let give_up_at = Instant::now() + GIVE_UP_AFTER;
    loop {
        let (url, content_type) = if event.is_start() {
            (
                url.replace("/v1/events", "/v1/commands"),
                "application/json",
            )
        } else {
            (url.clone(), "application/cloudevents+json")
        };
        let answer = client
            .post(&url)
            .header("content-type", content_type)
            .body(event.body.clone())
            .timeout(Duration::from_secs(15))
            .send()
            .await;
        let (status, text) = match answer {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        };
        {
            let mut t = tally.lock().unwrap();
            *t.answers.entry(status).or_default() += 1;
            if status == 202 {
                t.accepted.push(event);
                return;
            }
            if (400..500).contains(&status) && status != 408 && status != 429 {
                t.refused.push(format!("{status} {text}"));
                return;
            }
            if Instant::now() > give_up_at {
                t.gave_up.push(event.id.clone());
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends `events` spread evenly over `over` (each until accepted, at most 64 in flight);
/// resolves when every one is accepted or given up. The increments of one counter are sent one
/// after the other: each once the one before it was accepted.
fn send_over(
    gateway: &str,
    events: Vec<Planned>,
    over: Duration,
    tally: SharedTally,
) -> tokio::task::JoinHandle<()> {
    let url = format!("{gateway}/v1/events");
    let client = cmdflow_tests::http();
    tokio::spawn(async move {
        let permits = Arc::new(tokio::sync::Semaphore::new(64));
        let mut sends = tokio::task::JoinSet::new();
        let n = events.len().max(1) as u32;
        let start = tokio::time::Instant::now();
        // Each counter's increments: a chain, in order.
        let mut chains: HashMap<usize, Vec<(tokio::time::Instant, Planned)>> = HashMap::new();
        let mut others = Vec::new();
        for (i, event) in events.into_iter().enumerate() {
            let due = start + over * i as u32 / n;
            match event.what {
                What::Increment(c) => chains.entry(c).or_default().push((due, event)),
                _ => others.push((due, event)),
            }
        }
        for (_, chain) in chains {
            let (client, url, tally) = (client.clone(), url.clone(), tally.clone());
            sends.spawn(async move {
                for (due, event) in chain {
                    tokio::time::sleep_until(due).await;
                    deliver(client.clone(), url.clone(), event, tally.clone()).await;
                }
            });
        }
        for (due, event) in others {
            tokio::time::sleep_until(due).await;
            let permit = permits.clone().acquire_owned().await.unwrap();
            let (client, url, tally) = (client.clone(), url.clone(), tally.clone());
            sends.spawn(async move {
                deliver(client, url, event, tally).await;
                drop(permit);
            });
        }
        while sends.join_next().await.is_some() {}
    })
}

// ---------------------------------------------------------------------------------------------
// What the store says

#[derive(Debug, Default, Clone, PartialEq)]
struct Snapshot {
    accepted: usize,
    applied: i64,
    duplicates: i64,
    trees_not_terminal: i64,
    trees_not_completed: i64,
    counters_off: i64,
    /// Counters whose increments were applied in another order than they were accepted.
    counters_out_of_order: i64,
    timers_not_fired_once: i64,
    outbox: i64,
    dead_letters: i64,
    queued: Option<u32>,
    /// Workers sharing the partitions, once every partition has its consumer.
    consumers: Option<u32>,
}

impl Snapshot {
    fn converged(&self) -> bool {
        self.applied == self.accepted as i64
            && self.trees_not_terminal == 0
            && self.counters_off == 0
            && self.counters_out_of_order == 0
            && self.timers_not_fired_once == 0
            && self.outbox == 0
            && self.queued == Some(0)
    }
}

/// The histories of up to three counters whose increments were applied out of order: what
/// was applied when, by which version, to tell where the order broke.
async fn out_of_order_detail(pool: &sqlx::PgPool, counters: &[Uuid]) -> String {
    type Row = (Uuid, i64, i64, Option<i32>, DateTime<Utc>, Option<String>);
    let rows: Vec<Row> =
        sqlx::query_as(
            "WITH h AS (
                SELECT command_id, seq, version, (detail->'data'->>'seq')::int AS place, at,
                       event_id,
                       lag((detail->'data'->>'seq')::int) OVER (PARTITION BY command_id ORDER BY seq) AS before
                  FROM command_events
                 WHERE entry = 'received' AND event_type = 'demo.increment' AND command_id = ANY($1)),
             bad AS (SELECT DISTINCT command_id FROM h WHERE before IS NOT NULL AND place <= before LIMIT 3)
             SELECT command_id, seq, version, place, at, event_id FROM h
              WHERE command_id IN (SELECT command_id FROM bad) ORDER BY command_id, seq",
        )
        .bind(counters)
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    rows.iter()
        .map(|(c, seq, version, place, at, id)| {
            format!(
                "{c} seq={seq} v={version} place={place:?} at={} id={id:?}",
                at.format("%H:%M:%S%.3f")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn snapshot(
    world: &TestEnv,
    plan: &Plan,
    accepted: &[Planned],
) -> Result<Snapshot, sqlx::Error> {
    let pool = &world.pool;
    let commands: Vec<Uuid> = accepted.iter().map(|e| e.command).collect();
    let ids: Vec<String> = accepted.iter().map(|e| e.id.clone()).collect();
    let applied: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM unnest($1::uuid[], $2::text[]) a(command_id, event_id)
          WHERE EXISTS (SELECT 1 FROM processed_events p
                         WHERE p.command_id = a.command_id AND p.event_id = a.event_id
                           AND p.source IN ($3, 'cmdflow/gateway'))",
    )
    .bind(&commands)
    .bind(&ids)
    .bind(SOURCE)
    .fetch_one(pool)
    .await?;
    // Any event received twice by any command: the load's, the children's starts and reports,
    // the timers' firings.
    let duplicates: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(n - 1), 0)::bigint FROM (
            SELECT count(*) AS n FROM command_events WHERE entry = 'received'
             GROUP BY command_id, event_id HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await?;
    let roots: Vec<Uuid> = accepted
        .iter()
        .filter(|e| matches!(e.what, What::FanoutStart | What::TimerStart))
        .map(|e| e.command)
        .collect();
    let (trees_not_terminal, trees_not_completed): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE NOT ended), count(*) FILTER (WHERE NOT completed) FROM (
            SELECT EXISTS (SELECT 1 FROM commands c WHERE c.id = r.id AND c.ended_at IS NOT NULL)
                   AND NOT EXISTS (SELECT 1 FROM commands c WHERE c.root_id = r.id AND c.ended_at IS NULL) AS ended,
                   NOT EXISTS (SELECT 1 FROM commands c WHERE c.root_id = r.id AND c.state <> 'completed')
                   AND EXISTS (SELECT 1 FROM commands c WHERE c.id = r.id) AS completed
              FROM unnest($1::uuid[]) r(id)) t",
    )
    .bind(&roots)
    .fetch_one(pool)
    .await?;
    let mut expected = vec![0i64; plan.counters.len()];
    for e in accepted {
        if let What::Increment(c) = e.what {
            expected[c] += 1;
        }
    }
    let counters: Vec<Uuid> = accepted
        .iter()
        .filter(|e| e.what == What::CounterStart)
        .map(|e| e.command)
        .collect();
    let expected: Vec<i64> = counters
        .iter()
        .map(|id| expected[plan.counters.iter().position(|c| c == id).unwrap()])
        .collect();
    let counters_off: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM unnest($1::uuid[], $2::bigint[]) e(id, n)
           LEFT JOIN commands c ON c.id = e.id
          WHERE c.id IS NULL OR (c.data->>'count')::bigint IS DISTINCT FROM e.n",
    )
    .bind(&counters)
    .bind(&expected)
    .fetch_one(pool)
    .await?;
    let counters_out_of_order: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
            SELECT command_id FROM (
                SELECT command_id, (detail->'data'->>'seq')::int AS place,
                       lag((detail->'data'->>'seq')::int) OVER (PARTITION BY command_id ORDER BY seq) AS before
                  FROM command_events
                 WHERE entry = 'received' AND event_type = 'demo.increment' AND command_id = ANY($1)) x
             WHERE before IS NOT NULL AND place <= before
             GROUP BY command_id) y",
    )
    .bind(&counters)
    .fetch_one(pool)
    .await?;
    let timers: Vec<Uuid> = accepted
        .iter()
        .filter(|e| e.what == What::TimerStart)
        .map(|e| e.command)
        .collect();
    let timers_not_fired_once: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM unnest($1::uuid[]) t(id)
          WHERE (SELECT count(*) FROM command_events e
                  WHERE e.command_id = t.id AND e.entry = 'received' AND e.event_type = 'timer.fired') <> 1
             OR EXISTS (SELECT 1 FROM timers WHERE command_id = t.id)",
    )
    .bind(&timers)
    .fetch_one(pool)
    .await?;
    let (outbox, dead_letters): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM dead_letters)")
            .fetch_one(pool)
            .await?;
    let queues = world.queues().await;
    let workers = world.workers_consuming().await;
    Ok(Snapshot {
        accepted: accepted.len(),
        applied,
        duplicates,
        trees_not_terminal,
        trees_not_completed,
        counters_off,
        counters_out_of_order,
        timers_not_fired_once,
        outbox,
        dead_letters,
        queued: queues.map(|q| q.0),
        consumers: workers,
    })
}

// ---------------------------------------------------------------------------------------------
// One run: set up, load, fault, recovery, checks

struct Run {
    fault: &'static str,
    plan: Plan,
    tally: SharedTally,
    load: Option<tokio::task::JoinHandle<()>>,
    started: Instant,
}

impl Run {
    /// Starts the counters (and waits until they run), then the main load over `load_for`.
    async fn begin(
        fault: &'static str,
        world: &TestEnv,
        fleet: &Fleet,
        shape: Shape,
        load_for: Duration,
    ) -> Run {
        let plan = Plan::new(shape);
        let tally: SharedTally = Arc::default();
        send_over(
            fleet.gateway_url(),
            plan.setup.clone(),
            Duration::ZERO,
            tally.clone(),
        )
        .await
        .unwrap();
        let counters = plan.counters.clone();
        cmdflow_tests::eventually(Duration::from_secs(60), "the counters to run", || async {
            let running: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM commands WHERE id = ANY($1) AND state = 'running'",
            )
            .bind(&counters)
            .fetch_one(&world.pool)
            .await
            .ok()?;
            (running as usize == counters.len()).then_some(())
        })
        .await;
        let load = send_over(
            fleet.gateway_url(),
            plan.main.clone(),
            load_for,
            tally.clone(),
        );
        Run {
            fault,
            plan,
            tally,
            load: Some(load),
            started: Instant::now(),
        }
    }

    /// Waits until `at` after the main load started (when the fault is due).
    async fn at(&self, at: Duration) {
        tokio::time::sleep_until((self.started + at).into()).await;
    }

    fn answers(&self, status: u16) -> u64 {
        self.tally
            .lock()
            .unwrap()
            .answers
            .get(&status)
            .copied()
            .unwrap_or(0)
    }

    /// Milliseconds from `ended` until the first event (of `ty`, when given) applied after
    /// it, by the store's own timestamps (so how often this polls does not matter).
    async fn recovered(&self, world: &TestEnv, ended: DateTime<Utc>, ty: Option<&str>) -> i64 {
        let first = cmdflow_tests::eventually(
            DRAIN_WITHIN,
            "the first event applied after the fault",
            || async {
                sqlx::query_scalar::<_, Option<DateTime<Utc>>>(
                    "SELECT min(at) FROM command_events
                      WHERE entry = 'received' AND at > $1 AND ($2::text IS NULL OR event_type = $2)",
                )
                .bind(ended)
                .bind(ty)
                .fetch_one(&world.pool)
                .await
                .ok()
                .flatten()
            },
        )
        .await;
        (first - ended).num_milliseconds()
    }

    /// Waits for the load to end and the fleet to apply it, prints the FAULT line and asserts.
    async fn finish(mut self, world: &TestEnv, fleet: &mut Fleet, fault: Window) -> Snapshot {
        let recover_ms = self.recovered(world, fault.ended, fault.probe).await;
        if let Some(load) = self.load.take() {
            load.await.unwrap();
        }
        let accepted = self.tally.lock().unwrap().accepted.clone();
        let deadline = Instant::now() + DRAIN_WITHIN;
        let mut last = Snapshot::default();
        loop {
            match snapshot(world, &self.plan, &accepted).await {
                Ok(s) if s.converged() => {
                    last = s;
                    break;
                }
                Ok(s) => last = s,
                Err(e) => eprintln!("{}: reading the store: {e}", self.fault),
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "FAULT | {} | accepted={} | applied={} | duplicates={} | trees_not_terminal={} | recover_ms={}",
            self.fault,
            last.accepted,
            last.applied,
            last.duplicates,
            last.trees_not_terminal,
            recover_ms
        );
        let during: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM command_events WHERE entry = 'received' AND at BETWEEN $1 AND $2",
        )
        .bind(fault.began)
        .bind(fault.ended)
        .fetch_one(&world.pool)
        .await
        .unwrap_or(-1);
        // Before the tally is locked: it is held to the end, across no await.
        let detail = if last.counters_out_of_order > 0 {
            out_of_order_detail(&world.pool, &self.plan.counters).await
        } else {
            String::new()
        };
        {
            let t = self.tally.lock().unwrap();
            let mut answers: Vec<_> = t.answers.iter().collect();
            answers.sort();
            eprintln!(
                "{}: answers {answers:?}; events applied during the fault: {during}; {last:?}",
                self.fault
            );
            let crashed = fleet.crashed();
            assert!(
                crashed.is_empty(),
                "{}: processes crashed: {crashed:?}",
                self.fault
            );
            assert!(
                t.refused.is_empty(),
                "{}: the gateway refused events: {:?}",
                self.fault,
                t.refused
            );
            assert!(
                t.gave_up.is_empty(),
                "{}: {} events never got a 202",
                self.fault,
                t.gave_up.len()
            );
            assert_eq!(
                last.accepted,
                self.plan.setup.len() + self.plan.main.len(),
                "{}: every event sent was accepted in the end",
                self.fault
            );
            assert_eq!(
                last.applied, last.accepted as i64,
                "{}: accepted events not applied (lost): {last:?}",
                self.fault
            );
            assert_eq!(
                last.duplicates, 0,
                "{}: events applied twice: {last:?}",
                self.fault
            );
            assert_eq!(
                last.trees_not_terminal, 0,
                "{}: trees that never ended: {last:?}",
                self.fault
            );
            assert_eq!(
                last.trees_not_completed, 0,
                "{}: trees that did not complete: {last:?}",
                self.fault
            );
            assert_eq!(
                last.counters_off, 0,
                "{}: counters that are not exact: {last:?}",
                self.fault
            );
            assert_eq!(
                last.counters_out_of_order, 0,
                "{}: counters whose increments were applied out of their order: {last:?}\n{detail}",
                self.fault
            );
            assert_eq!(
                last.timers_not_fired_once, 0,
                "{}: timers not fired exactly once: {last:?}",
                self.fault
            );
            assert_eq!(
                last.dead_letters, 0,
                "{}: dead letters: {last:?}",
                self.fault
            );
            assert!(
                last.converged(),
                "{}: the fleet did not settle: {last:?}",
                self.fault
            );
        }
        let sharing = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match world.workers_consuming().await {
                    Some(n) if n == fault.workers => return n,
                    _ => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
        })
        .await;
        assert_eq!(
            sharing.ok(),
            Some(fault.workers),
            "{}: every worker consumes again",
            self.fault
        );
        last.clone()
    }
}

/// When a fault began and ended, on the clock of the store's rows (same machine), and what
/// recovery waits for: any event, or one of type `probe`.
struct Window {
    began: DateTime<Utc>,
    ended: DateTime<Utc>,
    probe: Option<&'static str>,
    /// Workers that must consume the work queue at the end.
    workers: u32,
}

impl Window {
    /// A fault that began at `began` and ends now; recovery is the first event applied.
    fn any(began: DateTime<Utc>) -> Window {
        Window {
            began,
            ended: Utc::now(),
            probe: None,
            workers: 2,
        }
    }
}

/// Waits until `n` workers share the partitions and each partition has its consumer.
async fn consumers(world: &TestEnv, n: u32) {
    cmdflow_tests::eventually(
        Duration::from_secs(60),
        &format!("{n} workers sharing the partitions"),
        || async { (world.workers_consuming().await == Some(n)).then_some(()) },
    )
    .await;
}

/// The shared servers, as the harness reaches them.
fn shared_pg_server() -> String {
    cmdflow_tests::shared_servers().postgres
}

fn shared_amqp() -> String {
    cmdflow_tests::shared_servers().amqp
}

fn shared_redis() -> String {
    cmdflow_tests::shared_servers().redis
}

const SHAPE: Shape = Shape {
    counters: 10,
    increments: 600,
    fanouts: 30,
    children: 10,
    timers: 0,
};
const LOAD_FOR: Duration = Duration::from_secs(12);
const FAULT_AT: Duration = Duration::from_secs(3);

async fn fleet_of(world: &TestEnv, amqp_url: Option<String>, workers: usize) -> Fleet {
    let mut config = world.config.clone();
    if let Some(url) = amqp_url {
        config.amqp_url = url;
    }
    let mut fleet = Fleet::new(&config);
    fleet.start_gateway().await;
    for i in 0..workers {
        fleet.start_worker(i);
    }
    consumers(world, workers as u32).await;
    fleet
}

// ---------------------------------------------------------------------------------------------
// The cases

#[tokio::test]
async fn a_worker_killed_with_kill_9_mid_load_loses_and_doubles_nothing() {
    let world = TestEnv::on(&shared_pg_server(), &shared_amqp(), &shared_redis()).await;
    let mut fleet = fleet_of(&world, None, 2).await;
    let run = Run::begin("worker kill -9", &world, &fleet, SHAPE, LOAD_FOR).await;
    run.at(FAULT_AT).await;
    let began = Utc::now();
    fleet.kill_worker(0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.start_worker(0);
    run.finish(&world, &mut fleet, Window::any(began)).await;
    fleet.stop().await;
    world.cleanup().await;
}

#[tokio::test]
async fn a_rabbitmq_restart_mid_load_loses_no_accepted_event() {
    let mut rabbit = PrivateRabbit::start().await;
    let world = TestEnv::on(&shared_pg_server(), &rabbit.amqp_url(), &shared_redis()).await;
    let mut fleet = fleet_of(&world, None, 2).await;
    let run = Run::begin("rabbitmq restart", &world, &fleet, SHAPE, LOAD_FOR).await;
    run.at(FAULT_AT).await;
    let (began, before) = (Utc::now(), run.answers(503));
    rabbit.stop().await;
    rabbit.start_again().await;
    let unavailable = run.answers(503) - before;
    run.finish(&world, &mut fleet, Window::any(began)).await;
    assert!(
        unavailable > 0,
        "the gateway answered 503 while the broker was down"
    );
    fleet.stop().await;
    world.cleanup().await;
}

#[tokio::test]
async fn a_redis_restart_mid_load_loses_and_doubles_nothing() {
    let mut redis = PrivateRedis::start().await;
    let world = TestEnv::on(&shared_pg_server(), &shared_amqp(), &redis.url()).await;
    let mut fleet = fleet_of(&world, None, 2).await;
    let run = Run::begin("redis restart", &world, &fleet, SHAPE, LOAD_FOR).await;
    run.at(FAULT_AT).await;
    let began = Utc::now();
    redis.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.start_again().await;
    run.finish(&world, &mut fleet, Window::any(began)).await;
    fleet.stop().await;
    world.cleanup().await;
}

#[tokio::test]
async fn a_postgres_restart_mid_load_loses_and_doubles_nothing() {
    let pg = PrivatePostgres::start().await;
    let world = TestEnv::on(&pg.server(), &shared_amqp(), &shared_redis()).await;
    let mut fleet = fleet_of(&world, None, 2).await;
    let run = Run::begin("postgres restart", &world, &fleet, SHAPE, LOAD_FOR).await;
    run.at(FAULT_AT).await;
    let began = Utc::now();
    pg.stop("fast").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.start_again().await;
    run.finish(&world, &mut fleet, Window::any(began)).await;
    fleet.stop().await;
    world.cleanup().await;
}

#[tokio::test]
async fn a_scheduler_killed_while_timers_are_due_fires_each_once_after_its_restart() {
    let world = TestEnv::on(&shared_pg_server(), &shared_amqp(), &shared_redis()).await;
    let mut fleet = fleet_of(&world, None, 2).await;
    fleet.start_scheduler();
    let shape = Shape {
        timers: 100,
        ..SHAPE
    };
    let run = Run::begin("scheduler kill -9", &world, &fleet, shape, LOAD_FOR).await;
    run.at(FAULT_AT).await;
    let began = Utc::now();
    fleet.kill_scheduler().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    fleet.start_scheduler();
    let window = Window {
        probe: Some("timer.fired"),
        ..Window::any(began)
    };
    let ended = window.ended;
    run.finish(&world, &mut fleet, window).await;
    // The case proves something only if timers fell due while no scheduler ran.
    let overdue: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM commands WHERE kind = 'demo.timer'
            AND (result->>'due_at')::timestamptz BETWEEN $1 AND $2",
    )
    .bind(began)
    .bind(ended)
    .fetch_one(&world.pool)
    .await
    .unwrap();
    assert!(overdue > 0, "no timer was due while the scheduler was down");
    fleet.stop().await;
    world.cleanup().await;
}

#[tokio::test]
async fn a_network_cut_to_the_broker_loses_no_accepted_event() {
    let world = TestEnv::on(&shared_pg_server(), &shared_amqp(), &shared_redis()).await;
    let (proxy, through_proxy) = Proxy::for_amqp(&world.config.amqp_url).await.unwrap();
    let mut fleet = fleet_of(&world, Some(through_proxy), 2).await;
    let run = Run::begin("broker network cut", &world, &fleet, SHAPE, LOAD_FOR).await;
    run.at(FAULT_AT).await;
    let (began, before) = (Utc::now(), run.answers(503));
    proxy.cut().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.restore();
    let unavailable = run.answers(503) - before;
    run.finish(&world, &mut fleet, Window::any(began)).await;
    assert!(
        unavailable > 0,
        "the gateway answered 503 while the link was cut"
    );
    fleet.stop().await;
    world.cleanup().await;
}
