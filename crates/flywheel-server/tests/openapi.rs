//! The committed `openapi.json` must be exactly what the code generates.
//! Regenerate with `cargo run -p flywheel -- openapi > openapi.json`
//! (or run this test with `UPDATE_OPENAPI=1`).

use std::path::PathBuf;

#[test]
fn committed_openapi_document_matches_the_code() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../openapi.json");
    let generated = flywheel_server::openapi::document_json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed =
        std::fs::read_to_string(&path).expect("openapi.json is committed at the repository root");
    assert!(
        committed == generated,
        "openapi.json is stale: run `cargo run -p flywheel -- openapi > openapi.json` and commit it"
    );
}

#[test]
fn every_operation_documents_its_errors_with_the_envelope() {
    let doc: serde_json::Value =
        serde_json::from_str(&flywheel_server::openapi::document_json()).unwrap();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let secured = operation.get("security").is_some();
            let responses = operation["responses"].as_object().unwrap();
            if secured {
                let unauthorized = &responses
                    .get("401")
                    .unwrap_or_else(|| panic!("{method} {path} documents 401"));
                let schema = &unauthorized["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(
                    schema, "#/components/schemas/ErrorEnvelope",
                    "{method} {path}"
                );
            }
        }
    }
}

#[test]
fn every_reference_resolves() {
    let doc: serde_json::Value =
        serde_json::from_str(&flywheel_server::openapi::document_json()).unwrap();
    fn walk(value: &serde_json::Value, refs: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(target)) = map.get("$ref") {
                    refs.push(target.clone());
                }
                map.values().for_each(|v| walk(v, refs));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, refs)),
            _ => {}
        }
    }
    let mut refs = Vec::new();
    walk(&doc, &mut refs);
    assert!(!refs.is_empty());
    for target in refs {
        let name = target
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {target}"));
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "dangling $ref {target}"
        );
    }
}
