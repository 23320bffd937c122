//! A flow drawn: a Mermaid state diagram, Graphviz DOT and SVG for the console, and the text
//! `cmdflow flows show` prints.

use super::*;

impl FlowDef {
    /// The flow as a Mermaid state diagram.
    pub fn mermaid(&self) -> String {
        let id = |name: &str| -> String {
            name.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect()
        };
        let label = |s: &str| s.replace([':', ';', '#'], " ");
        let mut out = String::from("stateDiagram-v2\n");
        for stage in &self.stages {
            let _ = writeln!(
                out,
                "    state \"{}\" as {}",
                label(&stage.name),
                id(&stage.name)
            );
        }
        let _ = writeln!(out, "    [*] --> {}", id(&self.initial));
        for stage in &self.stages {
            for t in &stage.transitions {
                let to = t.to.as_deref().unwrap_or(&stage.name);
                let guard = t.guard.as_ref().map(guard_text).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "    {} --> {} : {}{}",
                    id(&stage.name),
                    id(to),
                    label(&t.on),
                    label(&guard)
                );
            }
            for a in &stage.after {
                if let Some(to) = &a.to {
                    let _ = writeln!(
                        out,
                        "    {} --> {} : {}",
                        id(&stage.name),
                        id(to),
                        label(&when_text(a))
                    );
                }
            }
            if self.finals.contains(&stage.name) {
                let _ = writeln!(out, "    {} --> [*]", id(&stage.name));
            }
        }
        out
    }

    /// The flow as a Graphviz DOT graph: states, transitions (labelled with their event and
    /// guard) and timers that move.
    pub fn dot(&self) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace(['"', '\\'], "'"));
        let mut out = String::from("digraph flow {\n  rankdir=LR;\n  \"[start]\" [shape=point];\n");
        for stage in &self.stages {
            let shape = if self.finals.contains(&stage.name) {
                "doublecircle"
            } else {
                "box"
            };
            let _ = writeln!(out, "  {} [shape={shape}];", q(&stage.name));
        }
        let _ = writeln!(out, "  \"[start]\" -> {};", q(&self.initial));
        for stage in &self.stages {
            for t in &stage.transitions {
                let to = t.to.as_deref().unwrap_or(&stage.name);
                let guard = t.guard.as_ref().map(guard_text).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {} -> {} [label={}];",
                    q(&stage.name),
                    q(to),
                    q(&format!("{}{guard}", t.on))
                );
            }
            for a in stage.after.iter().filter(|a| a.to.is_some()) {
                let to = a.to.as_deref().unwrap_or(&stage.name);
                let _ = writeln!(
                    out,
                    "  {} -> {} [label={}];",
                    q(&stage.name),
                    q(to),
                    q(&when_text(a))
                );
            }
        }
        out.push_str("}\n");
        out
    }

    /// The flow drawn as an SVG image (laid out from [`FlowDef::dot`]); empty when the layout
    /// fails.
    pub fn svg(&self) -> String {
        use layout::backends::svg::SVGWriter;
        use layout::gv::{DotParser, GraphBuilder};
        let dot = self.dot();
        // The layout is a library's: a graph it cannot draw costs the picture, not the worker.
        std::panic::catch_unwind(|| {
            let mut parser = DotParser::new(&dot);
            let tree = parser.process().ok()?;
            let mut builder = GraphBuilder::new();
            builder.visit_graph(&tree);
            let mut graph = builder.get();
            let mut svg = SVGWriter::new();
            graph.do_it(false, false, false, &mut svg);
            Some(svg.finalize())
        })
        .ok()
        .flatten()
        .unwrap_or_default()
    }

    /// The flow as text: its states, timers and transitions (what `cmdflow flows show` prints).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{} — {}", self.kind(), self.title);
        let _ = writeln!(
            out,
            "version {} · file {} · sha256 {}",
            self.flow_version(),
            self.source.file,
            self.source.hash.chars().take(12).collect::<String>()
        );
        if let Some(start_on) = &self.start_on {
            let _ = writeln!(out, "starts on {start_on}");
        }
        for stage in &self.stages {
            let mut marks = Vec::new();
            if stage.name == self.initial {
                marks.push("initial");
            }
            if self.finals.contains(&stage.name) {
                marks.push("final");
            }
            let marks = if marks.is_empty() {
                String::new()
            } else {
                format!(" ({})", marks.join(", "))
            };
            let _ = writeln!(out, "\n[{}]{marks}", stage.name);
            if let Some(ui) = &stage.ui {
                let _ = writeln!(out, "  shows {}: {}", ui.code, ui.text);
            }
            for a in &stage.on_enter {
                let _ = writeln!(out, "  on enter: {}", action_text(a));
            }
            for a in &stage.after {
                let to =
                    a.to.as_deref()
                        .map(|t| format!(" → {t}"))
                        .unwrap_or_default();
                let _ = writeln!(out, "  {}{to}", when_text(a));
                for action in &a.actions {
                    let _ = writeln!(out, "    then {}", action_text(action));
                }
            }
            for t in &stage.transitions {
                let to =
                    t.to.as_deref()
                        .map(|t| format!(" → {t}"))
                        .unwrap_or_default();
                let guard = t.guard.as_ref().map(guard_text).unwrap_or_default();
                let _ = writeln!(out, "  on {}{guard}{to}", t.on);
                for (what, table) in [("set", &t.set), ("add", &t.inc)] {
                    for (k, v) in table.iter().flatten() {
                        let _ = writeln!(out, "    {what} {k} = {v}");
                    }
                }
                for action in &t.actions {
                    let _ = writeln!(out, "    then {}", action_text(action));
                }
            }
        }
        out
    }
}

pub(super) fn guard_text(g: &Guard) -> String {
    let mut parts = Vec::new();
    if let Some(v) = &g.equals {
        parts.push(format!("{} = {v}", g.path));
    }
    if let Some(v) = &g.not_equals {
        parts.push(format!("{} != {v}", g.path));
    }
    for (op, v) in [("<", g.lt), ("<=", g.lte), (">", g.gt), (">=", g.gte)] {
        if let Some(v) = v {
            parts.push(format!("{} {op} {v}", g.path));
        }
    }
    match g.exists {
        Some(false) => parts.push(format!("no {}", g.path)),
        Some(true) => parts.push(format!("{} exists", g.path)),
        None if parts.is_empty() => parts.push(format!("{} exists", g.path)),
        None => {}
    }
    format!(" [{}]", parts.join(", "))
}

pub(super) fn when_text(a: &After) -> String {
    match (&a.delay, &a.at, &a.cron) {
        (Some(d), _, _) => format!("after {d}"),
        (_, Some(at), _) => format!("at {at}"),
        (_, _, Some(cron)) => format!("cron {cron} ({})", a.tz.as_deref().unwrap_or("UTC")),
        _ => String::new(),
    }
}

pub(super) fn action_text(a: &Action) -> String {
    match a {
        Action::Send { template, email } => {
            format!("send {template}{}", if *email { " by e-mail" } else { "" })
        }
        Action::Timer { name, .. } => format!("set timer {name}"),
        Action::CancelTimer { name } => format!("cancel timer {name}"),
        Action::Wait {
            event_type,
            timeout,
            ..
        } => match timeout {
            Some(t) => format!("wait for {event_type} (at most {t})"),
            None => format!("wait for {event_type}"),
        },
        Action::Spawn { kind, .. } => format!("spawn {kind} (fire and forget)"),
        Action::Group {
            name,
            policy,
            deadline,
            children,
        } => {
            let kinds: Vec<&str> = children.iter().map(|c| c.kind.as_str()).collect();
            format!(
                "spawn group {name} ({}{}): {}",
                policy.as_deref().unwrap_or("all"),
                deadline
                    .as_deref()
                    .map(|d| format!(", deadline {d}"))
                    .unwrap_or_default(),
                kinds.join(", ")
            )
        }
        Action::AbortChildren { group: Some(g) } => format!("abort the children of {g}"),
        Action::AbortChildren { group: None } => "abort the children".into(),
        Action::Emit { event_type, .. } => format!("emit {event_type}"),
        Action::Complete { .. } => "complete".into(),
        Action::Fail { reason } => format!("fail: {reason}"),
    }
}
