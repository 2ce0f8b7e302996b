//! The decision snapshot: the immutable, in-memory view of configuration the
//! hot path reads. Building one is pure; the server swaps whole snapshots
//! atomically so readers never lock.
//!
//! Invariant: a snapshot is never mutated after it is built. A change makes a
//! new [`ProjectConfig`] for the changed project and a new
//! [`DecisionSnapshot`] that shares every other project's `Arc`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use flywheel_flags::CompiledFlagSet;

use crate::billing::Catalog;
use crate::error::{DomainError, ErrorKind};
use crate::flags::CurrentFlagEntry;
use crate::keys::{KeyKind, PresentedKey, Scope};
use crate::privacy::ProjectSettings;
use crate::project::{ApiKeyRecord, KeyId, Project, ProjectId};
use crate::schemas::EventSchema;

/// Everything the hot path needs about one project. Later features (flags,
/// plans, rules) add their compiled form here.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectConfig {
    pub project: Project,
    /// Active keys only; revoked keys are not loaded.
    pub keys: Vec<ApiKeyRecord>,
    pub settings: ProjectSettings,
    /// Event schemas by event name.
    pub schemas: BTreeMap<String, EventSchema>,
    /// Feature flags, compiled for evaluation.
    pub flags: Arc<CompiledFlagSet>,
    /// The current stored entries behind `flags`, with their versions.
    pub flag_entries: Vec<CurrentFlagEntry>,
    /// Features, meters and plans, compiled.
    pub catalog: Arc<Catalog>,
    /// The catalog's stored version (0: never written).
    pub catalog_version: i64,
    /// Activation rules, applied when events commit (empty: none).
    pub activation: Arc<crate::activation::ActivationRules>,
    /// Prompt rules, applied by the writes that see their triggers.
    pub prompts: Arc<crate::prompts::PromptRules>,
}

/// Who is calling: the outcome of authenticating a request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub project: Arc<ProjectConfig>,
    pub key_id: KeyId,
    pub key_kind: KeyKind,
}

impl Principal {
    pub fn project_id(&self) -> ProjectId {
        self.project.project.id
    }
}

#[derive(Debug, Clone, Copy)]
struct KeyEntry {
    project_id: ProjectId,
    key_id: KeyId,
    kind: KeyKind,
}

/// All projects' configuration plus an index from key digest to key.
#[derive(Debug, Default, Clone)]
pub struct DecisionSnapshot {
    projects: HashMap<ProjectId, Arc<ProjectConfig>>,
    keys: HashMap<crate::keys::KeyHash, KeyEntry>,
}

impl DecisionSnapshot {
    pub fn from_configs(configs: impl IntoIterator<Item = ProjectConfig>) -> Self {
        let projects = configs
            .into_iter()
            .map(|config| (config.project.id, Arc::new(config)))
            .collect();
        Self::index(projects)
    }

    fn index(projects: HashMap<ProjectId, Arc<ProjectConfig>>) -> Self {
        let keys = projects
            .values()
            .flat_map(|config| config.keys.iter())
            .filter(|key| key.is_active())
            .map(|key| {
                let entry = KeyEntry {
                    project_id: key.project_id,
                    key_id: key.id,
                    kind: key.kind,
                };
                (key.hash, entry)
            })
            .collect();
        Self { projects, keys }
    }

    /// A new snapshot with `project_id` replaced by `config`, or removed when
    /// `config` is `None`. Other projects are shared, not copied.
    pub fn with_project(&self, project_id: ProjectId, config: Option<ProjectConfig>) -> Self {
        let mut projects = self.projects.clone();
        match config {
            Some(config) => {
                projects.insert(project_id, Arc::new(config));
            }
            None => {
                projects.remove(&project_id);
            }
        }
        Self::index(projects)
    }

    pub fn project(&self, id: ProjectId) -> Option<&Arc<ProjectConfig>> {
        self.projects.get(&id)
    }

    pub fn project_ids(&self) -> impl Iterator<Item = ProjectId> + '_ {
        self.projects.keys().copied()
    }

    pub fn project_count(&self) -> usize {
        self.projects.len()
    }

    /// Authenticates a bearer key and checks it against the route's scope.
    /// Unknown, malformed and revoked keys are indistinguishable (401); a
    /// valid key without the scope is 403.
    pub fn authorize(
        &self,
        presented: Option<&str>,
        scope: Scope,
    ) -> Result<Principal, DomainError> {
        let Some(text) = presented else {
            return Err(DomainError::new(
                ErrorKind::Unauthorized,
                "missing_api_key",
                "this route needs an API key: send `Authorization: Bearer <key>`",
            ));
        };
        let entry = PresentedKey::parse(text)
            .and_then(|key| self.keys.get(&key.hash()))
            .ok_or_else(|| {
                DomainError::new(
                    ErrorKind::Unauthorized,
                    "invalid_api_key",
                    "the API key is not valid",
                )
            })?;
        if !entry.kind.permits(scope) {
            return Err(DomainError::new(
                ErrorKind::Forbidden,
                "secret_key_required",
                "this route needs a secret key (sk_…); publishable keys may not call it",
            ));
        }
        let project = self
            .projects
            .get(&entry.project_id)
            .cloned()
            .ok_or_else(|| {
                // The index is built from `projects`, so this cannot happen.
                DomainError::new(ErrorKind::Internal, "internal", "key index out of sync")
            })?;
        Ok(Principal {
            project,
            key_id: entry.key_id,
            key_kind: entry.kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::GeneratedKey;
    use chrono::Utc;
    use uuid::Uuid;

    fn config_with(keys: &[(KeyKind, bool)]) -> (ProjectConfig, Vec<GeneratedKey>) {
        let project = Project {
            id: ProjectId::new_v7(),
            name: "p".into(),
            created_at: Utc::now(),
        };
        let mut generated = Vec::new();
        let records = keys
            .iter()
            .map(|&(kind, revoked)| {
                let key = GeneratedKey::generate(kind, &mut rand::rngs::OsRng);
                let record = ApiKeyRecord {
                    id: KeyId(Uuid::now_v7()),
                    project_id: project.id,
                    kind,
                    prefix: key.prefix(),
                    hash: key.hash(),
                    label: None,
                    created_at: Utc::now(),
                    revoked_at: revoked.then(Utc::now),
                };
                generated.push(key);
                record
            })
            .collect();
        (
            ProjectConfig {
                project,
                keys: records,
                settings: ProjectSettings::default(),
                schemas: BTreeMap::new(),
                flags: Default::default(),
                flag_entries: Vec::new(),
                catalog: Default::default(),
                catalog_version: 0,
                activation: Default::default(),
                prompts: Default::default(),
            },
            generated,
        )
    }

    #[test]
    fn authorize_maps_every_key_state_to_its_outcome() {
        let (config, keys) = config_with(&[
            (KeyKind::Publishable, false),
            (KeyKind::Secret, false),
            (KeyKind::Secret, true),
        ]);
        let project_id = config.project.id;
        let snap = DecisionSnapshot::from_configs([config]);
        let (pk, sk, revoked) = (&keys[0].plaintext, &keys[1].plaintext, &keys[2].plaintext);

        assert_eq!(
            snap.authorize(Some(pk), Scope::Public)
                .unwrap()
                .project_id(),
            project_id
        );
        assert_eq!(
            snap.authorize(Some(sk), Scope::Secret).unwrap().key_kind,
            KeyKind::Secret
        );
        assert_eq!(
            snap.authorize(Some(sk), Scope::Public).unwrap().key_kind,
            KeyKind::Secret
        );

        let forbidden = snap.authorize(Some(pk), Scope::Secret).unwrap_err();
        assert_eq!(
            (forbidden.kind, forbidden.code.as_ref()),
            (ErrorKind::Forbidden, "secret_key_required")
        );

        let missing = snap.authorize(None, Scope::Public).unwrap_err();
        assert_eq!(
            (missing.kind, missing.code.as_ref()),
            (ErrorKind::Unauthorized, "missing_api_key")
        );

        let unknown = GeneratedKey::generate(KeyKind::Secret, &mut rand::rngs::OsRng);
        for bad in [revoked.as_str(), unknown.plaintext.as_str(), "garbage", ""] {
            let err = snap.authorize(Some(bad), Scope::Public).unwrap_err();
            assert_eq!(
                (err.kind, err.code.as_ref()),
                (ErrorKind::Unauthorized, "invalid_api_key"),
                "{bad}"
            );
        }
    }

    #[test]
    fn with_project_replaces_one_project_and_shares_the_rest() {
        let (a, a_keys) = config_with(&[(KeyKind::Secret, false)]);
        let (b, b_keys) = config_with(&[(KeyKind::Secret, false)]);
        let (a_id, b_id) = (a.project.id, b.project.id);
        let before = DecisionSnapshot::from_configs([a.clone(), b]);

        let mut a_revoked = a.clone();
        a_revoked.keys.clear();
        let after = before.with_project(a_id, Some(a_revoked));
        assert!(Arc::ptr_eq(
            before.project(b_id).unwrap(),
            after.project(b_id).unwrap()
        ));
        assert!(after
            .authorize(Some(&a_keys[0].plaintext), Scope::Public)
            .is_err());
        assert!(after
            .authorize(Some(&b_keys[0].plaintext), Scope::Public)
            .is_ok());
        // The old snapshot is untouched: readers holding it see a consistent view.
        assert!(before
            .authorize(Some(&a_keys[0].plaintext), Scope::Public)
            .is_ok());

        let removed = after.with_project(b_id, None);
        assert_eq!(removed.project_count(), 1);
        assert!(removed
            .authorize(Some(&b_keys[0].plaintext), Scope::Public)
            .is_err());
    }
}
