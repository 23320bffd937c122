//! Reading results back: the ratio of each W workload to its baseline, and the Markdown table
//! `scripts/bench.sh` prints from the JSON lines it saved.

use serde_json::{Value, json};

/// Each W workload with its baseline. `feedw1` is W1 run under feed reads; the flow and
/// remote counters are compared with the Rust counter too.
const PAIRS: [(&str, &str); 10] = [
    ("W1", "B1"),
    ("W1flow", "B1"),
    ("W1remote", "B1"),
    ("W1flow", "W1"),
    ("W1remote", "W1"),
    ("W2", "B2"),
    ("W2s", "B2"),
    ("W3", "B3"),
    ("W4", "B4"),
    ("feedw1", "B1"),
];

/// The number a workload is compared by: throughput (higher is better), or for timers the p99
/// lateness in ms (lower is better).
fn headline(line: &Value) -> Option<(&'static str, f64)> {
    match line["workload"].as_str()? {
        "W1" | "W1flow" | "W1remote" | "W4" | "B1" | "B4" => {
            Some(("events_per_s", line["events_per_s"].as_f64()?))
        }
        "W2" | "W2s" | "B2" => Some(("parents_per_s", line["parents_per_s"].as_f64()?)),
        "W3" | "B3" => Some(("lateness_p99_ms", line["lateness_ms"]["p99"].as_f64()?)),
        "feedw1" => Some(("events_per_s", line["w1"]["events_per_s"].as_f64()?)),
        _ => None,
    }
}

/// `value / baseline` rounded to 0.01, for the pair whose W side is `line`.
fn ratio_to(line: &Value, baseline: &Value) -> Option<(String, &'static str, f64)> {
    let name = line["workload"].as_str()?;
    let (_, base) = PAIRS
        .iter()
        .find(|(w, b)| *w == name && baseline["workload"].as_str() == Some(*b))?;
    let (metric, value) = headline(line)?;
    let (_, of_base) = headline(baseline)?;
    if of_base == 0.0 {
        return None;
    }
    let ratio = format!("{}/{}", name.to_lowercase(), base.to_lowercase());
    Some((ratio, metric, (value / of_base * 100.0).round() / 100.0))
}

/// One `{"ratio": "w1/b1", "value": …}` line for each pair that ran in `results`. For W3/B3 the
/// value is the ratio of the p99 lateness, so there above 1 is worse; elsewhere below 1 is.
pub fn ratios(results: &[Value]) -> Vec<Value> {
    let mut lines = Vec::new();
    for line in results {
        for baseline in results {
            if let Some((ratio, metric, value)) = ratio_to(line, baseline) {
                lines.push(json!({"ratio": ratio, "value": value, "metric": metric}));
            }
        }
    }
    lines
}

/// A Markdown table of the workload lines in `text` (one JSON object a line; others skipped).
/// The ratio column compares with the last baseline line of the same shape in `text`.
pub fn markdown(text: &str) -> String {
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(|v| v["workload"].is_string())
        .collect();
    let mut out = String::from(
        "| workload | workers | events/s | p50 ms | p99 ms | ratio to baseline | settings |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for line in &lines {
        let name = line["workload"].as_str().unwrap_or_default();
        let workers = match line["workers"].as_u64() {
            Some(w) => w.to_string(),
            None if line["baseline"] == true => "baseline".to_owned(),
            None => "–".to_owned(),
        };
        let (rate, latency) = match name {
            "W2" | "W2s" | "B2" => (
                format!("{} parents/s", num(&line["parents_per_s"])),
                &line["parent_latency_ms"],
            ),
            "W3" | "B3" => ("–".to_owned(), &line["lateness_ms"]),
            "feedw1" => (num(&line["w1"]["events_per_s"]), &line["feed_latency_ms"]),
            _ => (num(&line["events_per_s"]), &line["latency_ms"]),
        };
        let ratio = lines
            .iter()
            .rev()
            .filter(|b| b["workload"].as_str().is_some_and(|w| w.starts_with('B')))
            .find_map(|b| ratio_to(line, b))
            .map(|(_, _, v)| format!("{v}"))
            .unwrap_or_else(|| "–".to_owned());
        out.push_str(&format!(
            "| {name} | {workers} | {rate} | {} | {} | {ratio} | {} |\n",
            num(&latency["p50"]),
            num(&latency["p99"]),
            settings(line),
        ));
    }
    out.push_str(
        "\nW3/B3: p50/p99 are the timers' lateness and the ratio is of p99 lateness (above 1 is \
         worse). feedw1: events/s is W1's while the feed is read, p50/p99 the feed's, the ratio \
         W1's events/s to B1's. W2s is W2 with the group's reports `settled`. W1flow and W1remote \
         are W1 on the counter defined as a flow file and on a remote decider over HTTP. \
         Elsewhere p50/p99 \
         are publish-to-commit latency (W2/W2s/B2: of the \
         parent).\n",
    );
    out
}

fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!("{x}"),
        None => "–".to_owned(),
    }
}

/// The settings of a line that are not results, as `key=value` pairs.
fn settings(line: &Value) -> String {
    const KEYS: [&str; 20] = [
        "events",
        "event_rate",
        "counters",
        "commands",
        "parents",
        "children_per_parent",
        "timers",
        "span_s",
        "schedulers",
        "consumers",
        "concurrency",
        "prefetch",
        "batch",
        "pool",
        "lock",
        "in_process",
        "feed_commands",
        "feed_clients",
        "feed_paced",
        "feed_rate",
    ];
    KEYS.iter()
        .filter_map(|k| match &line[*k] {
            Value::Null => None,
            v => Some(format!("{k}={v}")),
        })
        .collect::<Vec<_>>()
        .join(" ")
}
