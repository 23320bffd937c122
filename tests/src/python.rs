//! The tests' Python: a venv with the CloudEvents SDK, pika and openapi-spec-validator
//! (`scripts/test-venv.sh`, `tests/python/`), so that tests speak to cmdflow as other software
//! does. A test that needs it and cannot have it fails, saying why; it never skips.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The workspace's root directory.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The venv's `python`, made by `scripts/test-venv.sh` on first use (once per test process).
/// Panics with the script's own words when the venv cannot be made.
pub fn python() -> PathBuf {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let venv = VENV.get_or_init(|| {
        let script = workspace().join("scripts/test-venv.sh");
        let output = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let dir = stdout.lines().last().unwrap_or_default().trim();
        if !output.status.success() || dir.is_empty() {
            return Err(format!(
                "{} failed ({}): {}",
                script.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(PathBuf::from(dir).join("bin/python"))
    });
    match venv {
        Ok(python) => python.clone(),
        Err(why) => panic!(
            "this test needs the Python venv with the CloudEvents SDK, pika and \
             openapi-spec-validator, and it could not be made: {why}"
        ),
    }
}

/// Runs `tests/python/<script>` with `args` in the venv; its stdout, or a panic with its stderr
/// when it fails.
pub async fn run(script: &str, args: &[&str]) -> String {
    let path = workspace().join("tests/python").join(script);
    let output = tokio::process::Command::new(python())
        .arg(&path)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{} failed ({}):\n{stdout}\n{}",
        path.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
