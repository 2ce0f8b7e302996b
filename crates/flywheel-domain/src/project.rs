//! Projects and their API keys.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;
use crate::keys::{KeyHash, KeyKind};

/// Identifies a project. UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProjectId(pub Uuid);

impl ProjectId {
    pub fn new_v7() -> Self {
        ProjectId(Uuid::now_v7())
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Identifies an API key (not the key itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(pub Uuid);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A validated project name: 1 to 100 characters after trimming, no control
/// characters. Names are unique per store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProjectName(String);

impl ProjectName {
    pub const MAX_CHARS: usize = 100;

    pub fn parse(raw: &str) -> Result<Self, DomainError> {
        let name = raw.trim();
        if name.is_empty() {
            return Err(DomainError::invalid(
                "invalid_project_name",
                "project name must not be empty",
            ));
        }
        if name.chars().count() > Self::MAX_CHARS {
            return Err(DomainError::invalid(
                "invalid_project_name",
                format!(
                    "project name must be at most {} characters",
                    Self::MAX_CHARS
                ),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(DomainError::invalid(
                "invalid_project_name",
                "project name must not contain control characters",
            ));
        }
        Ok(Self(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A key label: optional, at most 100 characters, no control characters.
pub fn parse_key_label(raw: Option<&str>) -> Result<Option<String>, DomainError> {
    let Some(label) = raw.map(str::trim).filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    if label.chars().count() > 100 || label.chars().any(char::is_control) {
        return Err(DomainError::invalid(
            "invalid_key_label",
            "key label must be at most 100 characters without control characters",
        ));
    }
    Ok(Some(label.to_string()))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    pub id: ProjectId,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// A stored API key: everything but the plaintext, which is never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: KeyId,
    pub project_id: ProjectId,
    pub kind: KeyKind,
    /// The first characters of the key, shown in listings (`sk_Ab3xYz`).
    pub prefix: String,
    pub hash: KeyHash,
    pub label: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl ApiKeyRecord {
    pub fn is_active(&self) -> bool {
        self.revoked_at.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_are_trimmed_and_bounded() {
        assert_eq!(ProjectName::parse("  acme  ").unwrap().as_str(), "acme");
        assert_eq!(
            ProjectName::parse(&"é".repeat(100))
                .unwrap()
                .as_str()
                .chars()
                .count(),
            100
        );
        for bad in ["", "   ", "a\nb", "tab\there"] {
            assert_eq!(
                ProjectName::parse(bad).unwrap_err().code,
                "invalid_project_name",
                "{bad:?}"
            );
        }
        assert!(ProjectName::parse(&"x".repeat(101)).is_err());
    }

    #[test]
    fn key_labels_are_optional_and_bounded() {
        assert_eq!(parse_key_label(None).unwrap(), None);
        assert_eq!(parse_key_label(Some("  ")).unwrap(), None);
        assert_eq!(
            parse_key_label(Some(" ci ")).unwrap().as_deref(),
            Some("ci")
        );
        assert!(parse_key_label(Some(&"x".repeat(101))).is_err());
        assert!(parse_key_label(Some("a\u{7}")).is_err());
    }

    #[test]
    fn project_ids_sort_by_creation() {
        let first = ProjectId::new_v7();
        let second = ProjectId::new_v7();
        assert!(first < second);
    }
}
