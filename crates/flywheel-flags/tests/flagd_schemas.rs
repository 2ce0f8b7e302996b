//! flagd's own schema fixtures (`tests/fixtures/flagd-schemas`, Apache-2.0,
//! copied from open-feature/flagd-schemas): every positive fixture must be
//! accepted and every negative one rejected, naming the JSON path at fault.

use std::path::{Path, PathBuf};

use flywheel_flags::{schema, CompiledFlagSet, FlagDocument};
use serde_json::Value;

fn fixtures(group: &str, polarity: &str) -> Vec<(String, Value)> {
    let dir: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests/fixtures/flagd-schemas",
        group,
        polarity,
    ]
    .iter()
    .collect();
    let mut found: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .map(|path| {
            (
                name(&path),
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap(),
            )
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!found.is_empty(), "no fixtures in {}", dir.display());
    found
}

fn name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn every_positive_flag_document_is_accepted_and_compiles() {
    for group in ["flags", "flagd"] {
        for (name, document) in fixtures(group, "positive") {
            let parsed = FlagDocument::from_json(&document)
                .unwrap_or_else(|error| panic!("{group}/{name} was rejected: {error}"));
            assert!(!parsed.flags.is_empty(), "{name}: no flags read");
            CompiledFlagSet::compile(parsed).unwrap_or_else(|error| panic!("{name}: {error}"));
        }
    }
}

#[test]
fn every_negative_flag_document_is_rejected_at_the_path_at_fault() {
    let expected_paths = [
        ("empty-variants.json", "/flags/myBoolFlag/variants"),
        ("malformed-flag.json", "/flags/not-a-flag"),
        ("missing-variants.json", "/flags/myBoolFlag"),
        (
            "mixed-variant-types.ffconfig.json",
            "/flags/myBoolFlag/variants/o",
        ),
        ("state-set-incorrectly.json", "/flags/myBoolFlag/state"),
        ("with-array-flags.json", "/flags"),
        (
            "with-invalid-flag-metadata.json",
            "/flags/myBoolFlag/metadata/invalid",
        ),
        ("with-invalid-flag-set-metadata.json", "/metadata/invalid"),
        (
            "with-invalid-targeting.json",
            "/flags/targetedFlag/targeting",
        ),
    ];
    let negatives = fixtures("flags", "negative");
    assert_eq!(
        negatives.len(),
        expected_paths.len(),
        "a fixture without an expectation"
    );
    let mut mismatches = Vec::new();
    for (name, document) in negatives {
        // Documents with array flags are valid for flagd but not for the
        // provider schema this group targets; check them that way.
        let error = if name == "with-array-flags.json" {
            schema::validate_provider_document(&document).unwrap_err()
        } else {
            FlagDocument::from_json(&document).expect_err(&name)
        };
        let (_, expected) = expected_paths
            .iter()
            .find(|(file, _)| *file == name)
            .unwrap();
        if !error.path.starts_with(expected) {
            mismatches.push(format!(
                "{name}: error at `{}`, expected under `{expected}`: {}",
                error.path, error.message
            ));
        }
    }
    assert!(mismatches.is_empty(), "{mismatches:#?}");
}

#[test]
fn targeting_fixtures_are_accepted_or_rejected_with_a_path() {
    for (name, rule) in fixtures("targeting", "positive") {
        schema::validate_targeting(&rule, "/targeting")
            .unwrap_or_else(|error| panic!("targeting/{name} was rejected: {error}"));
    }
    for (name, rule) in fixtures("targeting", "negative") {
        let error = schema::validate_targeting(&rule, "/targeting").expect_err(&name);
        assert!(
            error.path.starts_with("/targeting"),
            "{name}: {}",
            error.path
        );
        assert!(!error.message.is_empty());
    }
}
