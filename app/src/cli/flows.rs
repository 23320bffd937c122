//! `cmdflow flows check` and `cmdflow flows show`: flow files read, checked and described on
//! this machine, against the binary's kinds and templates, without starting anything.

use std::path::PathBuf;

use clap::Subcommand;
use cmdflow_workers::Registry;
use cmdflow_workers::flows::{self, FlowDef, FlowError};
use serde_json::json;

use super::exit::{NotFoundError, UsageError};

#[derive(Debug, Subcommand)]
pub enum FlowsCmd {
    /// Check flow files (directories of `*.toml`, or files) against this binary's kinds and
    /// templates, as a worker would at start-up; start nothing. Exits with 2 when one is bad.
    #[command(
        after_help = "Examples:\n  cmdflow flows check flows/\n  CMDFLOW_EXAMPLES=true cmdflow flows check examples/flows/quote.toml"
    )]
    Check {
        /// Directories or files to check.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print a flow's states, timers and transitions, or its Mermaid state diagram.
    #[command(
        after_help = "Examples:\n  cmdflow flows show shop.quote --from examples/flows\n  CMDFLOW_EXAMPLES=true cmdflow flows show funnel.lead_to_visitor --mermaid"
    )]
    Show {
        /// The kind the flow runs as (`funnel.{name}` for a funnel).
        kind: String,
        /// Print the Mermaid state diagram instead of the text.
        #[arg(long)]
        mermaid: bool,
        /// Directories or files to read flows from, besides the binary's own and
        /// `CMDFLOW_FLOWS_DIR`.
        #[arg(long = "from")]
        from: Vec<PathBuf>,
    },
}

/// Reads the `(file, text)` pairs of `paths`: every `*.toml` of a directory, or the file.
fn read(paths: &[PathBuf]) -> anyhow::Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            files.extend(flows::read_dir(path)?);
        } else {
            let text = std::fs::read_to_string(path)
                .map_err(|e| UsageError(format!("{}: {e}", path.display())))?;
            files.push((path.display().to_string(), text));
        }
    }
    if files.is_empty() {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(UsageError(format!("no *.toml flow file in {}", names.join(", "))).into());
    }
    Ok(files)
}

fn state_count(def: &FlowDef) -> String {
    match def.stages.len() {
        1 => "1 state".to_owned(),
        n => format!("{n} states"),
    }
}

/// Runs a `flows` subcommand with `registry`, the kinds and templates the binary runs with.
pub fn run(registry: &Registry, cmd: FlowsCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        FlowsCmd::Check { paths } => check(registry, &read(&paths)?, json),
        FlowsCmd::Show {
            kind,
            mermaid,
            from,
        } => {
            let extra = if from.is_empty() {
                Vec::new()
            } else {
                registry
                    .check_flows(&read(&from)?)
                    .into_iter()
                    .collect::<Result<Vec<_>, FlowError>>()?
            };
            let def = extra
                .iter()
                .chain(registry.flow_defs())
                .find(|d| d.kind() == kind);
            let Some(def) = def else {
                let mut known: Vec<String> = extra
                    .iter()
                    .chain(registry.flow_defs())
                    .map(FlowDef::kind)
                    .collect();
                known.sort();
                known.dedup();
                let known = if known.is_empty() {
                    "none (give --from DIR, or set CMDFLOW_FLOWS_DIR)".to_owned()
                } else {
                    known.join(", ")
                };
                return Err(
                    NotFoundError(format!("no flow runs as {kind}; flows: {known}")).into(),
                );
            };
            show(def, mermaid, json);
            Ok(())
        }
    }
}

fn check(registry: &Registry, files: &[(String, String)], json: bool) -> anyhow::Result<()> {
    let checked = registry.check_flows(files);
    let bad = checked.iter().filter(|c| c.is_err()).count();
    if json {
        let rows: Vec<_> = checked
            .iter()
            .map(|c| match c {
                Ok(def) => json!({
                    "file": def.source.file,
                    "kind": def.kind(),
                    "version": def.flow_version(),
                    "states": def.stages.len(),
                    "ok": true,
                }),
                Err(e) => json!({
                    "file": e.file,
                    "kind": e.flow,
                    "ok": false,
                    "error": { "field": e.field, "reason": e.reason, "message": e.to_string() },
                }),
            })
            .collect();
        outln!("{}", serde_json::Value::Array(rows));
    } else {
        for c in &checked {
            match c {
                Ok(def) => outln!(
                    "ok     {}  {} version {}, {}",
                    def.source.file,
                    def.kind(),
                    def.flow_version(),
                    state_count(def)
                ),
                Err(e) => outln!("error  {e}"),
            }
        }
    }
    if bad > 0 {
        return Err(UsageError(format!("{bad} of {} flow files cannot run", checked.len())).into());
    }
    Ok(())
}

fn show(def: &FlowDef, mermaid: bool, json: bool) {
    if json {
        outln!(
            "{}",
            json!({
                "kind": def.kind(),
                "version": def.flow_version(),
                "file": def.source.file,
                "sha256": def.source.hash,
                "title": def.title,
                "initial": def.initial,
                "final": def.finals,
                "states": def.stages.iter().map(|s| &s.name).collect::<Vec<_>>(),
                "mermaid": def.mermaid(),
                "text": def.describe(),
            })
        );
    } else if mermaid {
        out!("{}", def.mermaid());
    } else {
        out!("{}", def.describe());
    }
}
