//! Validation against flagd's published flag-definition JSON schemas.
//!
//! The schemas (Apache-2.0, `schemas/`, copied from open-feature/flagd-schemas)
//! are compiled once per process. What they accept is exactly what flagd
//! accepts, so a document that passes here loads in flagd and the reverse.

use std::sync::OnceLock;

use jsonschema::{Registry, Validator};
use serde_json::{json, Value};

use crate::FlagError;

const FLAGS_SCHEMA: &str = include_str!("../schemas/flags.json");
const TARGETING_SCHEMA: &str = include_str!("../schemas/targeting.json");
const FLAGS_ID: &str = "https://flagd.dev/schema/v0/flags.json";
const TARGETING_ID: &str = "https://flagd.dev/schema/v0/targeting.json";

struct Validators {
    /// A whole flagd document; flags as a map or an array (flagd's `flagdConfig`).
    document: Validator,
    /// A provider document: flags as a map only (flagd's `providerConfig`).
    provider_document: Validator,
    /// One flag object, without its key (`anyFlag`).
    flag: Validator,
    /// One flag of a known variant type (`booleanFlag`, `stringFlag`, …):
    /// its errors are precise where `anyFlag`'s `oneOf` is vague.
    typed_flags: [Validator; 4],
    /// One targeting rule or evaluator (`targeting.json`).
    targeting: Validator,
}

fn validators() -> &'static Validators {
    static VALIDATORS: OnceLock<Validators> = OnceLock::new();
    VALIDATORS.get_or_init(|| {
        // The embedded schemas are fixed at build time; failing to compile
        // them is a build defect, caught by every test in this crate.
        let flags: Value = serde_json::from_str(FLAGS_SCHEMA).expect("embedded flags.json parses");
        let targeting: Value =
            serde_json::from_str(TARGETING_SCHEMA).expect("embedded targeting.json parses");
        let registry = Registry::new()
            .add(FLAGS_ID, flags)
            .and_then(|registry| registry.add(TARGETING_ID, targeting))
            .and_then(|registry| registry.prepare())
            .expect("embedded flagd schemas register");
        let build = |schema: Value| {
            jsonschema::options()
                .with_registry(&registry)
                .build(&schema)
                .expect("embedded flagd schemas compile")
        };
        Validators {
            document: build(json!({"$ref": format!("{FLAGS_ID}#/definitions/flagdConfig")})),
            provider_document: build(json!({"$ref": FLAGS_ID})),
            flag: build(json!({"$ref": format!("{FLAGS_ID}#/definitions/anyFlag")})),
            typed_flags: ["booleanFlag", "stringFlag", "numberFlag", "objectFlag"]
                .map(|name| build(json!({"$ref": format!("{FLAGS_ID}#/definitions/{name}")}))),
            targeting: build(json!({"$ref": TARGETING_ID})),
        }
    })
}

/// Checks a whole flagd document (`{"flags": …, "$evaluators"?, "metadata"?}`).
pub fn validate_document(document: &Value) -> Result<(), FlagError> {
    check(&validators().document, document, "")
}

/// Checks a document as in-process providers read it (flags as a map).
pub fn validate_provider_document(document: &Value) -> Result<(), FlagError> {
    check(&validators().provider_document, document, "")
}

/// Checks one flag object (no `key`); `at` is the JSON path reported on error.
pub fn validate_flag(flag: &Value, at: &str) -> Result<(), FlagError> {
    let validators = validators();
    // A flag's type is its first variant's: check against that type's schema
    // so an error says "`off` is not a boolean", not "matches no flag type".
    let first_variant = flag
        .get("variants")
        .and_then(Value::as_object)
        .and_then(|variants| variants.values().next());
    let validator = match first_variant {
        Some(Value::Bool(_)) => &validators.typed_flags[0],
        Some(Value::String(_)) => &validators.typed_flags[1],
        Some(Value::Number(_)) => &validators.typed_flags[2],
        Some(Value::Object(_)) => &validators.typed_flags[3],
        _ => &validators.flag,
    };
    check(validator, flag, at)
}

/// Checks one targeting rule or shared evaluator.
pub fn validate_targeting(rule: &Value, at: &str) -> Result<(), FlagError> {
    check(&validators().targeting, rule, at)
}

fn check(validator: &Validator, instance: &Value, at: &str) -> Result<(), FlagError> {
    if validator.is_valid(instance) {
        return Ok(());
    }
    // The evaluation output lists the errors inside `oneOf`/`anyOf` branches
    // too. Report the deepest: the shallow one only says "not valid under any
    // of the schemas", the deep one says what is wrong and where.
    let evaluation = validator.evaluate(instance);
    let deepest = evaluation
        .iter_errors()
        .max_by_key(|entry| entry.instance_location.as_str().len())
        .map(|entry| {
            (
                entry.instance_location.as_str().to_string(),
                entry.error.to_string(),
            )
        });
    let (path, message) = deepest.unwrap_or_else(|| {
        let error = validator.iter_errors(instance).next().map(|error| {
            (
                error.instance_path().as_str().to_string(),
                error.to_string(),
            )
        });
        error.unwrap_or_default()
    });
    Err(FlagError::schema(format!("{at}{path}"), message))
}
