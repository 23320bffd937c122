//! Loading flows: the files of a directory, checked together, and their versions recorded in
//! (and earlier ones read back from) PostgreSQL.

use super::*;

/// Reads every `*.toml` in `dir`: `(path, text)` pairs, by path.
pub fn read_dir(dir: &Path) -> Result<Vec<(String, String)>, FlowError> {
    let io = |reason: String| FlowError {
        file: dir.display().to_string(),
        flow: "-".into(),
        field: "-".into(),
        reason,
    };
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| io(e.to_string()))?;
    for entry in entries {
        let path = entry.map_err(|e| io(e.to_string()))?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| io(format!("{}: {e}", path.display())))?;
            files.push((path.display().to_string(), text));
        }
    }
    files.sort();
    Ok(files)
}

/// Parses and checks flow files (`(file name, TOML text)`). Any invalid file is an error
/// with its precise place; so are two flows of one kind.
pub fn parse_all(
    files: &[(String, String)],
    templates: &Templates,
    kinds: &BTreeSet<String>,
) -> Result<Vec<FlowDef>, FlowError> {
    check_each(files, templates, kinds).into_iter().collect()
}

/// Checks every flow file on its own (`(file name, TOML text)`), in order: each file's flow,
/// or what is wrong with it. The flows of one batch may spawn one another; the second flow of a
/// kind is an error.
pub fn check_each(
    files: &[(String, String)],
    templates: &Templates,
    kinds: &BTreeSet<String>,
) -> Vec<Result<FlowDef, FlowError>> {
    let mut kinds = kinds.clone();
    kinds.extend(
        files
            .iter()
            .filter_map(|(_, text)| toml::from_str::<FlowDef>(text).ok())
            .map(|d| d.kind()),
    );
    let mut checked: Vec<Result<FlowDef, FlowError>> = Vec::new();
    for (file, text) in files {
        let def = FlowDef::parse(file, text, templates, &kinds).and_then(|def| {
            let twin = checked.iter().flatten().find(|d| d.kind() == def.kind());
            match twin {
                None => Ok(def),
                Some(twin) => Err(FlowError {
                    file: file.clone(),
                    flow: def.kind(),
                    field: if def.is_funnel() { "name" } else { "kind" }.into(),
                    reason: if def.is_funnel() {
                        format!("{} defines a funnel of the same name", twin.source.file)
                    } else {
                        format!("{} defines a flow of the same kind", twin.source.file)
                    },
                }),
            }
        });
        checked.push(def);
    }
    checked
}

/// Records the registry's flows as their kinds' current versions, and keeps every earlier
/// version the store holds for them, so that commands started on one finish on it. An earlier
/// version that no longer loads here (a template or kind it uses is gone) is left out, with a
/// warning: its commands' events wait for a worker that has it. A current version whose
/// `revision` the store holds with another text stops start-up.
pub async fn sync_versions(
    pool: &sqlx::PgPool,
    mut registry: crate::Registry,
) -> Result<crate::Registry, crate::WorkerError> {
    use cmdflow_shared::store;
    let defs: Vec<FlowDef> = registry.flow_defs().to_vec();
    for def in &defs {
        let (kind, version) = (def.kind(), def.flow_version());
        let (mermaid, svg) = (def.mermaid(), def.svg());
        let recorded = store::flows::record(
            pool,
            store::flows::NewFlowVersion {
                kind: &kind,
                version: &version,
                hash: &def.source.hash,
                file: &def.source.file,
                definition: &def.source.text,
                mermaid: &mermaid,
                svg: &svg,
            },
        )
        .await?;
        if let Err(other) = recorded {
            return Err(crate::WorkerError::Flow(format!(
                "{}: flow {kind}: revision: version {version} of {kind} was run with another text (from {other}); a changed flow needs a new revision, or none (its hash is then its version)",
                def.source.file
            )));
        }
        for earlier in store::flows::versions_of(pool, &kind).await? {
            if earlier.version == version {
                continue;
            }
            if let Err(e) = registry.keep_flow_version(&earlier.file, &earlier.definition) {
                tracing::warn!(kind = %kind, version = %earlier.version, error = %e, "An earlier version of a flow does not load here: its commands' events wait for a worker that has it.");
            }
        }
    }
    Ok(registry)
}
