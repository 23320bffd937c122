//! The gateway's OpenAPI document is valid OpenAPI, as openapi-spec-validator (in the tests'
//! Python venv) checks it, so that generated clients work.

#![allow(clippy::unwrap_used)]

use cmdflow_tests::python;

#[tokio::test]
async fn the_openapi_document_passes_openapi_spec_validator() {
    let doc = cmdflow_gateway::app::openapi();
    let json = serde_json::to_value(&doc).unwrap();
    for health in ["/healthz", "/readyz"] {
        assert_eq!(
            json["paths"][health]["get"]["security"],
            serde_json::json!([]),
            "{health} takes no credential"
        );
    }
    assert_eq!(json["security"], serde_json::json!([{"bearer": []}]));
    let path = std::env::temp_dir().join(format!("cmdflow-openapi-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let out = tokio::process::Command::new(python::python())
        .arg(python::workspace().join("tests/python/check_openapi.py"))
        .arg(&path)
        .output()
        .await
        .unwrap();
    std::fs::remove_file(&path).ok();
    assert!(
        out.status.success(),
        "openapi-spec-validator refuses the document:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
