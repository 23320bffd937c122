//! Reading the regression corpus of `tests/corpus/`, shared by the property tests of several
//! crates (each includes this file with `#[path]`).

use std::path::PathBuf;

/// `tests/corpus/` of the workspace, found from the including crate's directory upwards.
pub fn corpus_root() -> PathBuf {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    crate_dir
        .ancestors()
        .map(|dir| dir.join("tests/corpus"))
        .find(|dir| dir.is_dir())
        .unwrap_or_else(|| panic!("no tests/corpus above {}", crate_dir.display()))
}

/// Every input of `tests/corpus/{dir}`, by file name, sorted (seed files and notes skipped).
pub fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let root = corpus_root().join(dir);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .filter(|(name, _)| !name.starts_with("proptest-") && !name.starts_with("README"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "{dir}: the corpus is too small");
    files
}

/// The expectation a corpus file name carries: the part before `--`, and whether the file
/// shows a known product bug (`bug.` prefix). A known bug is replayed for "no panic" only; its
/// `#[ignore]`d test checks the expectation.
pub fn expectation(name: &str) -> (bool, &str) {
    let expect = name.split_once("--").map(|(e, _)| e).unwrap_or("any");
    match expect.strip_prefix("bug.") {
        Some(rest) => (true, rest),
        None => (false, expect),
    }
}
