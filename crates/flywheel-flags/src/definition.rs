//! Flag definitions in flagd's flag-definition format, the only format Flywheel
//! stores and exchanges. The simpler `{key, enabled, rollout_percentage,
//! target_users}` form is accepted on input and converted here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::{schema, FlagError};

/// A flag's on/off switch. A `DISABLED` flag evaluates to no value at all, so
/// the caller's code default applies; a kill switch that must serve a known
/// value is an `ENABLED` flag whose default variant is the "off" one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FlagState {
    Enabled,
    Disabled,
}

/// One flag, as flagd writes it (without its key, which is the map key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagDefinition {
    pub state: FlagState,
    pub variants: Map<String, Value>,
    /// `None` (absent or `null`): the caller's code default is served when
    /// targeting does not pick a variant.
    #[serde(
        rename = "defaultVariant",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub default_variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targeting: Option<Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
}

/// A whole flag set: what `GET /v1/flags/snapshot` returns and what import
/// and export exchange.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagDocument {
    pub flags: BTreeMap<String, FlagDefinition>,
    /// Shared targeting rules, referenced as `{"$ref": "name"}`.
    pub evaluators: BTreeMap<String, Value>,
    /// Flag-set metadata (`flagSetId`, `version`, …).
    pub metadata: Map<String, Value>,
}

/// Longest flag or evaluator key accepted; keys travel in URLs and headers.
pub const MAX_KEY_LEN: usize = 200;

impl FlagDocument {
    /// Parses and fully checks a flagd document (flags as a map or an array),
    /// or an array of simple-form flags. Every error names its JSON path.
    pub fn from_json(document: &Value) -> Result<Self, FlagError> {
        let document = normalize_simple_document(document)?;
        // Flags are checked one by one first, for precise errors; the whole
        // document after, for everything else.
        let Some(object) = document.as_object() else {
            schema::validate_document(&document)?;
            unreachable!("the schema requires an object");
        };
        let mut flags = BTreeMap::new();
        match object.get("flags").unwrap_or(&Value::Null) {
            Value::Object(map) => {
                for (key, flag) in map {
                    let at = format!("/flags/{}", escape_pointer(key));
                    flags.insert(key.clone(), parse_flag_object(flag, &at)?);
                }
            }
            Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    let at = format!("/flags/{index}");
                    let Some(mut flag) = item.as_object().cloned() else {
                        break; // the document check below names it
                    };
                    let key = match flag.remove("key") {
                        Some(Value::String(key)) if !key.is_empty() => key,
                        _ => {
                            return Err(FlagError::invalid(
                                "missing_key",
                                format!("{at}/key"),
                                "a flag in an array needs a non-empty string `key`",
                            ))
                        }
                    };
                    if flags.contains_key(&key) {
                        return Err(FlagError::invalid(
                            "duplicate_flag_key",
                            format!("{at}/key"),
                            format!("flag `{key}` appears twice"),
                        ));
                    }
                    let parsed = parse_flag_object(&Value::Object(flag), &at)?;
                    flags.insert(key, parsed);
                }
            }
            _ => {}
        }
        schema::validate_document(&document)?;
        let evaluators = match object.get("$evaluators") {
            Some(Value::Object(map)) => map.clone().into_iter().collect(),
            _ => BTreeMap::new(),
        };
        let metadata = match object.get("metadata") {
            Some(Value::Object(map)) => map.clone(),
            _ => Map::new(),
        };
        let document = FlagDocument {
            flags,
            evaluators,
            metadata,
        };
        document.check()?;
        Ok(document)
    }

    /// The flagd JSON of this document, flags as a map.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert(
            "flags".into(),
            serde_json::to_value(&self.flags).expect("flags serialize"),
        );
        if !self.evaluators.is_empty() {
            object.insert(
                "$evaluators".into(),
                Value::Object(self.evaluators.clone().into_iter().collect()),
            );
        }
        if !self.metadata.is_empty() {
            object.insert("metadata".into(), Value::Object(self.metadata.clone()));
        }
        Value::Object(object)
    }

    /// The checks the schema cannot express: keys, default variants that
    /// exist, `$ref`s that resolve, and targeting the engine can compile.
    pub fn check(&self) -> Result<(), FlagError> {
        for (name, rule) in &self.evaluators {
            let at = format!("/$evaluators/{}", escape_pointer(name));
            check_key(name, &at)?;
            schema::validate_targeting(rule, &at)?;
            crate::evaluate::expand_refs(rule, &self.evaluators, &at)?;
        }
        for (key, flag) in &self.flags {
            let at = format!("/flags/{}", escape_pointer(key));
            check_key(key, &at)?;
            flag.check(&self.evaluators, &at)?;
        }
        Ok(())
    }
}

impl FlagDefinition {
    /// Parses one flag object (no key), as sent to the per-flag admin API.
    /// Accepts the simple form too when `key` is given.
    pub fn from_json(
        flag: &Value,
        evaluators: &BTreeMap<String, Value>,
    ) -> Result<Self, FlagError> {
        let flag = if is_simple_form(flag) {
            simple_to_flagd(flag, "")?
        } else {
            flag.clone()
        };
        let parsed = parse_flag_object(&flag, "")?;
        parsed.check(evaluators, "")?;
        Ok(parsed)
    }

    fn check(&self, evaluators: &BTreeMap<String, Value>, at: &str) -> Result<(), FlagError> {
        if let Some(default) = &self.default_variant {
            if !self.variants.contains_key(default) {
                return Err(FlagError::invalid(
                    "unknown_default_variant",
                    format!("{at}/defaultVariant"),
                    format!("defaultVariant `{default}` is not one of the flag's variants"),
                ));
            }
        }
        if let Some(targeting) = &self.targeting {
            let at = format!("{at}/targeting");
            let expanded = crate::evaluate::expand_refs(targeting, evaluators, &at)?;
            crate::evaluate::compile_rule(&expanded, &at)?;
        }
        Ok(())
    }

    /// The flag's JSON, as stored.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a flag serializes")
    }
}

fn parse_flag_object(flag: &Value, at: &str) -> Result<FlagDefinition, FlagError> {
    schema::validate_flag(flag, at)?;
    let mut parsed: FlagDefinition = serde_path_to_flag_error(flag, at)?;
    // An empty targeting object means "no targeting" in flagd.
    if matches!(&parsed.targeting, Some(Value::Object(map)) if map.is_empty()) {
        parsed.targeting = None;
    }
    Ok(parsed)
}

fn serde_path_to_flag_error(flag: &Value, at: &str) -> Result<FlagDefinition, FlagError> {
    FlagDefinition::deserialize(flag)
        .map_err(|error| FlagError::schema(at.to_string(), error.to_string()))
}

fn check_key(key: &str, at: &str) -> Result<(), FlagError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || key.chars().any(char::is_control) {
        return Err(FlagError::invalid(
            "invalid_key",
            at.to_string(),
            format!("keys are 1 to {MAX_KEY_LEN} characters without control characters"),
        ));
    }
    Ok(())
}

/// JSON Pointer escaping (RFC 6901) for a key used as a path segment.
pub fn escape_pointer(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// True when an object looks like the simple form (`enabled` and/or
/// `rollout_percentage` instead of `state` and `variants`).
pub fn is_simple_form(flag: &Value) -> bool {
    flag.as_object().is_some_and(|object| {
        !object.contains_key("state")
            && !object.contains_key("variants")
            && (object.contains_key("enabled") || object.contains_key("rollout_percentage"))
    })
}

/// A document whose `flags` (or the document itself) is an array of
/// simple-form flags is converted to flagd's array form first.
fn normalize_simple_document(document: &Value) -> Result<Value, FlagError> {
    let (items, wrap) = match document {
        Value::Array(items) => (items, true),
        Value::Object(object) => match object.get("flags") {
            Some(Value::Array(items)) if items.iter().any(is_simple_form) => (items, false),
            _ => return Ok(document.clone()),
        },
        _ => return Ok(document.clone()),
    };
    let mut converted = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let at = format!("/flags/{index}");
        if is_simple_form(item) {
            let mut flag = simple_to_flagd(item, &at)?;
            let key = item.get("key").cloned().ok_or_else(|| {
                FlagError::invalid("missing_key", at.clone(), "a flag needs a key")
            })?;
            flag.as_object_mut()
                .expect("an object")
                .insert("key".into(), key);
            converted.push(flag);
        } else {
            converted.push(item.clone());
        }
    }
    if wrap {
        return Ok(json!({ "flags": converted }));
    }
    let mut object = document.as_object().cloned().unwrap_or_default();
    object.insert("flags".into(), Value::Array(converted));
    Ok(Value::Object(object))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimpleFlag {
    #[serde(default)]
    #[allow(dead_code)] // read by the caller from the raw object
    key: Option<String>,
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default = "default_full_rollout")]
    rollout_percentage: f64,
    #[serde(default)]
    target_users: Vec<String>,
}

fn default_true() -> bool {
    true
}

fn default_full_rollout() -> f64 {
    100.0
}

/// Converts `{key, enabled, rollout_percentage, target_users}` to flagd:
/// variants `on: true` / `off: false`, default `off`; targeting serves `on`
/// to the listed users, then splits the rest with `fractional` weighted
/// `[on, p]`, `[off, 100 - p]`. Because `on` is the first bucket, raising
/// `p` only ever moves users from `off` to `on`. `enabled: false` becomes a
/// `DISABLED` flag, so callers get their code default.
fn simple_to_flagd(flag: &Value, at: &str) -> Result<Value, FlagError> {
    let simple = SimpleFlag::deserialize(flag).map_err(|error| {
        FlagError::invalid("invalid_simple_flag", at.to_string(), error.to_string())
    })?;
    let percentage = simple.rollout_percentage;
    if !(0.0..=100.0).contains(&percentage) || percentage.fract() != 0.0 {
        return Err(FlagError::invalid(
            "invalid_rollout_percentage",
            format!("{at}/rollout_percentage"),
            "rollout_percentage is a whole number from 0 to 100",
        ));
    }
    let on_weight = percentage as u64;
    let split = json!({ "fractional": [["on", on_weight], ["off", 100 - on_weight]] });
    let targeting = if simple.target_users.is_empty() {
        split
    } else {
        json!({ "if": [
            { "in": [{ "var": "targetingKey" }, simple.target_users] },
            "on",
            split
        ]})
    };
    Ok(json!({
        "state": if simple.enabled { "ENABLED" } else { "DISABLED" },
        "variants": { "on": true, "off": false },
        "defaultVariant": "off",
        "targeting": targeting,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_form_becomes_flagd_with_users_first_and_a_monotonic_split() {
        let document = FlagDocument::from_json(&json!([
            {"key": "growth_upgrade_prompt", "enabled": true, "rollout_percentage": 50, "target_users": []},
            {"key": "advanced_export", "enabled": true, "rollout_percentage": 100, "target_users": ["enterprise_trial"]},
            {"key": "off_flag", "enabled": false, "rollout_percentage": 10}
        ]))
        .unwrap();
        let prompt = &document.flags["growth_upgrade_prompt"];
        assert_eq!(prompt.state, FlagState::Enabled);
        assert_eq!(prompt.default_variant.as_deref(), Some("off"));
        assert_eq!(
            prompt.targeting,
            Some(json!({"fractional": [["on", 50], ["off", 50]]}))
        );
        let export = &document.flags["advanced_export"];
        assert_eq!(
            export.targeting.as_ref().unwrap()["if"][0],
            json!({"in": [{"var": "targetingKey"}, ["enterprise_trial"]]})
        );
        assert_eq!(document.flags["off_flag"].state, FlagState::Disabled);
    }

    #[test]
    fn simple_form_rejects_fractional_and_out_of_range_percentages() {
        for bad in [json!(-1), json!(101), json!(12.5)] {
            let error = FlagDocument::from_json(&json!([{"key": "f", "rollout_percentage": bad}]))
                .unwrap_err();
            assert_eq!(error.code, "invalid_rollout_percentage");
            assert_eq!(error.path, "/flags/0/rollout_percentage");
        }
    }

    #[test]
    fn unknown_default_variant_and_dangling_ref_name_their_paths() {
        let error = FlagDocument::from_json(&json!({"flags": {"a/b": {
            "state": "ENABLED", "variants": {"on": true}, "defaultVariant": "nope"
        }}}))
        .unwrap_err();
        assert_eq!(error.code, "unknown_default_variant");
        assert_eq!(error.path, "/flags/a~1b/defaultVariant");

        let error = FlagDocument::from_json(&json!({"flags": {"f": {
            "state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on",
            "targeting": {"if": [{"$ref": "missing"}, "on", null]}
        }}}))
        .unwrap_err();
        assert_eq!(error.code, "unknown_evaluator");
        assert_eq!(error.path, "/flags/f/targeting/if/0");
    }

    #[test]
    fn array_form_rejects_duplicate_keys() {
        let flag = json!({"key": "f", "state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"});
        let error = FlagDocument::from_json(&json!({"flags": [flag, flag]})).unwrap_err();
        assert_eq!(error.code, "duplicate_flag_key");
        assert_eq!(error.path, "/flags/1/key");
    }

    #[test]
    fn round_trips_through_json_with_null_default_variant_dropped() {
        let document = FlagDocument::from_json(&json!({
            "flags": {"f": {"state": "DISABLED", "variants": {"a": "x", "b": "y"}, "defaultVariant": null,
                             "targeting": {}, "metadata": {"owner": "growth"}}},
            "$evaluators": {"pro": {"in": [{"var": "plan"}, ["pro", "team"]]}},
            "metadata": {"flagSetId": "web"}
        }))
        .unwrap();
        assert_eq!(document.flags["f"].targeting, None);
        let again = FlagDocument::from_json(&document.to_json()).unwrap();
        assert_eq!(again, document);
    }
}
