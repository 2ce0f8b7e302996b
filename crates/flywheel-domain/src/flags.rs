//! Stored feature-flag entries and their versions. The flag format and its
//! evaluation live in `flywheel-flags`; this is what the store keeps: an
//! append-only history per entry, the newest version being the current one.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use flywheel_flags::definition::FlagDefinition;
use flywheel_flags::{CompiledFlagSet, FlagDocument};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What an entry of a flag set is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FlagEntryKind {
    Flag,
    /// A shared targeting rule (`$evaluators`).
    Evaluator,
    /// The flag set's metadata (one entry, key "").
    Set,
}

impl FlagEntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Flag => "flag",
            Self::Evaluator => "evaluator",
            Self::Set => "set",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "flag" => Some(Self::Flag),
            "evaluator" => Some(Self::Evaluator),
            "set" => Some(Self::Set),
            _ => None,
        }
    }
}

/// Why a version was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FlagAction {
    Created,
    Updated,
    Deleted,
    Restored,
    Imported,
}

impl FlagAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Deleted => "deleted",
            Self::Restored => "restored",
            Self::Imported => "imported",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "created" => Some(Self::Created),
            "updated" => Some(Self::Updated),
            "deleted" => Some(Self::Deleted),
            "restored" => Some(Self::Restored),
            "imported" => Some(Self::Imported),
            _ => None,
        }
    }
}

/// One change to write: `definition: None` deletes the entry.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagChange {
    pub kind: FlagEntryKind,
    pub key: String,
    pub definition: Option<Value>,
    pub action: FlagAction,
}

/// One stored version of an entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlagVersion {
    pub kind: FlagEntryKind,
    pub key: String,
    pub version: i64,
    /// `None`: the entry was deleted by this version.
    pub definition: Option<Value>,
    pub action: FlagAction,
    /// Who wrote it: an API key id, or `cli`.
    pub actor: String,
    pub created_at: DateTime<Utc>,
}

/// The current entry of a flag set as loaded from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentFlagEntry {
    pub kind: FlagEntryKind,
    pub key: String,
    pub version: i64,
    pub definition: Value,
    pub updated_at: DateTime<Utc>,
}

/// Builds the compiled flag set from stored entries. Entries were checked
/// when written, so they are only deserialised and compiled here (once); one
/// that no longer compiles (a bug, or a hand-edited database) is left out
/// and reported, so it cannot take every other flag of the project down.
pub fn compile_entries(entries: &[CurrentFlagEntry]) -> (Arc<CompiledFlagSet>, Vec<String>) {
    let mut document = FlagDocument::default();
    let mut problems = Vec::new();
    for entry in entries {
        match entry.kind {
            FlagEntryKind::Evaluator => {
                document
                    .evaluators
                    .insert(entry.key.clone(), entry.definition.clone());
            }
            FlagEntryKind::Set => {
                if let Value::Object(metadata) = &entry.definition {
                    document.metadata = metadata.clone();
                }
            }
            FlagEntryKind::Flag => match FlagDefinition::deserialize(&entry.definition) {
                Ok(flag) => {
                    document.flags.insert(entry.key.clone(), flag);
                }
                Err(error) => problems.push(format!("flag `{}`: {error}", entry.key)),
            },
        }
    }
    let (set, errors) = CompiledFlagSet::compile_lenient(document);
    problems.extend(errors.iter().map(ToString::to_string));
    (Arc::new(set), problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn entry(kind: FlagEntryKind, key: &str, definition: Value) -> CurrentFlagEntry {
        CurrentFlagEntry {
            kind,
            key: key.into(),
            version: 1,
            definition,
            updated_at: Utc.timestamp_opt(0, 0).unwrap(),
        }
    }

    #[test]
    fn a_bad_stored_flag_is_left_out_and_reported_the_rest_compile() {
        let entries = [
            entry(
                FlagEntryKind::Evaluator,
                "pro",
                json!({"==": [{"var": "plan"}, "pro"]}),
            ),
            entry(FlagEntryKind::Set, "", json!({"flagSetId": "web"})),
            entry(
                FlagEntryKind::Flag,
                "good",
                json!({"state": "ENABLED", "variants": {"on": true},
                "defaultVariant": "on", "targeting": {"if": [{"$ref": "pro"}, "on", null]}}),
            ),
            entry(
                FlagEntryKind::Flag,
                "dangling",
                json!({"state": "ENABLED", "variants": {"on": true},
                "targeting": {"if": [{"$ref": "gone"}, "on", null]}}),
            ),
            entry(FlagEntryKind::Flag, "garbled", json!({"state": "MAYBE"})),
        ];
        let (set, problems) = compile_entries(&entries);
        assert!(set.contains("good"));
        assert!(!set.contains("dangling") && !set.contains("garbled"));
        assert_eq!(set.document().metadata["flagSetId"], "web");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|problem| problem.contains("garbled")));
        assert!(problems
            .iter()
            .any(|problem| problem.contains("unknown_evaluator")));
    }
}
