//! Project and key management, shared by the HTTP API and the CLI.

use flywheel_domain::clock::Clock;
use flywheel_domain::keys::{GeneratedKey, KeyKind};
use flywheel_domain::project::{
    parse_key_label, ApiKeyRecord, KeyId, Project, ProjectId, ProjectName,
};
use flywheel_domain::DomainError;
use flywheel_store::{Store, StoreError};
use uuid::Uuid;

/// The name of the project `serve` creates in an empty store.
pub const DEFAULT_PROJECT_NAME: &str = "default";

/// A new project and the plaintext of its first keys, shown once.
#[derive(Debug)]
pub struct CreatedProject {
    pub project: Project,
    pub publishable_key: GeneratedKey,
    pub secret_key: GeneratedKey,
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error(transparent)]
    Invalid(#[from] DomainError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn key_record(
    project: ProjectId,
    key: &GeneratedKey,
    label: Option<String>,
    clock: &dyn Clock,
) -> ApiKeyRecord {
    ApiKeyRecord {
        id: KeyId(Uuid::now_v7()),
        project_id: project,
        kind: key.kind,
        prefix: key.prefix(),
        hash: key.hash(),
        label,
        created_at: clock.now(),
        revoked_at: None,
    }
}

/// Creates a project with one publishable and one secret key, atomically.
pub async fn create_project(
    store: &dyn Store,
    clock: &dyn Clock,
    name: &str,
) -> Result<CreatedProject, ProjectError> {
    let name = ProjectName::parse(name)?;
    let project = Project {
        id: ProjectId::new_v7(),
        name: name.as_str().to_string(),
        created_at: clock.now(),
    };
    let mut rng = rand::rngs::OsRng;
    let publishable_key = GeneratedKey::generate(KeyKind::Publishable, &mut rng);
    let secret_key = GeneratedKey::generate(KeyKind::Secret, &mut rng);
    let keys = [
        key_record(project.id, &publishable_key, Some("initial".into()), clock),
        key_record(project.id, &secret_key, Some("initial".into()), clock),
    ];
    store.create_project(&project, &keys).await?;
    Ok(CreatedProject {
        project,
        publishable_key,
        secret_key,
    })
}

/// Creates the `default` project when the store has no project at all.
/// Returns `None` when there already is one (or another node won the race).
pub async fn ensure_default_project(
    store: &dyn Store,
    clock: &dyn Clock,
) -> Result<Option<CreatedProject>, ProjectError> {
    if !store.list_projects().await?.is_empty() {
        return Ok(None);
    }
    match create_project(store, clock, DEFAULT_PROJECT_NAME).await {
        Ok(created) => Ok(Some(created)),
        Err(ProjectError::Store(StoreError::Conflict(_))) => Ok(None),
        Err(other) => Err(other),
    }
}

pub async fn create_key(
    store: &dyn Store,
    clock: &dyn Clock,
    project: ProjectId,
    kind: KeyKind,
    label: Option<&str>,
) -> Result<(ApiKeyRecord, GeneratedKey), ProjectError> {
    let label = parse_key_label(label)?;
    let key = GeneratedKey::generate(kind, &mut rand::rngs::OsRng);
    let record = key_record(project, &key, label, clock);
    store.insert_key(&record).await?;
    Ok((record, key))
}

pub async fn revoke_key(
    store: &dyn Store,
    clock: &dyn Clock,
    project: ProjectId,
    key: KeyId,
) -> Result<ApiKeyRecord, ProjectError> {
    Ok(store.revoke_key(project, key, clock.now()).await?)
}

/// Finds a project by id or by name.
pub async fn find_project(
    store: &dyn Store,
    id_or_name: &str,
) -> Result<Option<Project>, StoreError> {
    if let Ok(id) = Uuid::parse_str(id_or_name) {
        if let Some(project) = store.project_by_id(ProjectId(id)).await? {
            return Ok(Some(project));
        }
    }
    store.project_by_name(id_or_name.trim()).await
}
