//! Projects, their API keys, the configuration changes that fan out to
//! every node, and the loading of a project's decision-snapshot
//! configuration (keys, settings, schemas, flags, catalog, rules): written
//! once for both backends over the shared SQL layer of `crate::sql`.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use flywheel_domain::flags::{compile_entries, CurrentFlagEntry, FlagEntryKind};
use flywheel_domain::keys::{KeyHash, KeyKind};
use flywheel_domain::project::{ApiKeyRecord, KeyId, Project, ProjectId};
use flywheel_domain::schemas::EventSchema;
use flywheel_domain::snapshot::ProjectConfig;

use crate::sql::{
    arg_bytes, arg_opt_time, arg_project, arg_time, arg_uuid, query, query_scalar, read_json,
    read_opt_time, read_time, read_uuid, Row, SqlBackend, SqlConn, WriteConn,
};
use crate::{compile_stored_catalog, distinct_projects, timed, ConfigChanges, StoreError};

/// Projects, keys and configuration changes.
#[async_trait]
pub trait ProjectStore: Send + Sync {
    /// Creates a project and its initial keys in one transaction.
    /// `Conflict("project name")` when the name is taken.
    async fn create_project(
        &self,
        project: &Project,
        keys: &[ApiKeyRecord],
    ) -> Result<(), StoreError>;

    async fn list_projects(&self) -> Result<Vec<Project>, StoreError>;

    async fn project_by_id(&self, id: ProjectId) -> Result<Option<Project>, StoreError>;

    async fn project_by_name(&self, name: &str) -> Result<Option<Project>, StoreError>;

    /// Adds a key to an existing project (`NotFound` if it does not exist).
    async fn insert_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError>;

    /// All keys of a project, revoked ones included, oldest first.
    async fn list_keys(&self, project: ProjectId) -> Result<Vec<ApiKeyRecord>, StoreError>;

    /// Revokes a key. Idempotent: revoking a revoked key keeps the first
    /// revocation time. `NotFound` if the project has no such key.
    async fn revoke_key(
        &self,
        project: ProjectId,
        key: KeyId,
        at: DateTime<Utc>,
    ) -> Result<ApiKeyRecord, StoreError>;

    /// A project with its active keys, as the decision snapshot holds it.
    async fn load_project_config(
        &self,
        project: ProjectId,
    ) -> Result<Option<ProjectConfig>, StoreError>;

    async fn load_all_project_configs(&self) -> Result<Vec<ProjectConfig>, StoreError>;

    /// The sequence number of the latest configuration change (0 when none).
    async fn latest_config_seq(&self) -> Result<i64, StoreError>;

    /// Changes recorded after `after_seq`.
    async fn config_changes_since(&self, after_seq: i64) -> Result<ConfigChanges, StoreError>;
}

const PROJECT_COLUMNS: &str = "id, name, created_at";
const KEY_COLUMNS: &str = "id, project_id, kind, prefix, key_hash, label, created_at, revoked_at";

/// A stored enum value this build does not know.
#[derive(Debug, thiserror::Error)]
#[error("unexpected stored value `{0}`")]
pub(crate) struct UnknownValue(pub(crate) String);

fn project_from(row: &Row) -> Result<Project, StoreError> {
    Ok(Project {
        id: ProjectId(read_uuid(row, "id")?),
        name: row.try_get("name")?,
        created_at: read_time(row, "created_at")?,
    })
}

fn key_from(row: &Row) -> Result<ApiKeyRecord, StoreError> {
    let kind: String = row.try_get("kind")?;
    let hash: Vec<u8> = row.try_get("key_hash")?;
    Ok(ApiKeyRecord {
        id: KeyId(read_uuid(row, "id")?),
        project_id: ProjectId(read_uuid(row, "project_id")?),
        kind: KeyKind::parse(&kind).ok_or_else(|| StoreError::internal(UnknownValue(kind)))?,
        prefix: row.try_get("prefix")?,
        hash: KeyHash::from_slice(&hash).ok_or_else(|| {
            StoreError::internal(sqlx::Error::Decode("key hash is not 32 bytes".into()))
        })?,
        label: row.try_get("label")?,
        created_at: read_time(row, "created_at")?,
        revoked_at: read_opt_time(row, "revoked_at")?,
    })
}

/// The kind column of `flag_versions`.
pub(crate) fn flag_kind(row: &Row) -> Result<FlagEntryKind, StoreError> {
    let kind: String = row.try_get("kind")?;
    FlagEntryKind::parse(&kind).ok_or_else(|| StoreError::internal(UnknownValue(kind)))
}

async fn insert_key_row(conn: &mut dyn WriteConn, key: &ApiKeyRecord) -> Result<(), StoreError> {
    query(
        "INSERT INTO api_keys (id, project_id, kind, prefix, key_hash, label, created_at, revoked_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(arg_uuid(key.id.0))
    .bind(arg_project(key.project_id))
    .bind(key.kind.as_str())
    .bind(&key.prefix)
    .bind(arg_bytes(key.hash.as_bytes()))
    .bind(&key.label)
    .bind(arg_time(key.created_at))
    .bind(arg_opt_time(key.revoked_at))
    .execute(conn)
    .await
    .map_err(|e| StoreError::from_sqlx(e, "api key"))?;
    Ok(())
}

/// A project's keys, `filter` appended to the `WHERE` (SQL text only).
async fn keys_where(
    conn: &mut dyn SqlConn,
    filter: &'static str,
    project: ProjectId,
) -> Result<Vec<ApiKeyRecord>, StoreError> {
    let rows = query(format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE project_id = $1 {filter} ORDER BY created_at, id"
    ))
    .bind(arg_project(project))
    .fetch_all(conn)
    .await?;
    rows.iter().map(key_from).collect()
}

/// The current (newest, not deleted) version of every flag-set entry.
async fn current_flag_entries(
    conn: &mut dyn SqlConn,
    project: ProjectId,
) -> Result<Vec<CurrentFlagEntry>, StoreError> {
    let rows = query(
        "SELECT kind, key, version, definition, created_at FROM flag_versions AS v \
         WHERE project_id = $1 AND definition IS NOT NULL AND version = \
         (SELECT MAX(version) FROM flag_versions AS w \
          WHERE w.project_id = v.project_id AND w.kind = v.kind AND w.key = v.key) \
         ORDER BY kind, key",
    )
    .bind(arg_project(project))
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(CurrentFlagEntry {
                kind: flag_kind(row)?,
                key: row.try_get("key")?,
                version: row.try_get("version")?,
                definition: read_json(row, "definition")?,
                updated_at: read_time(row, "created_at")?,
            })
        })
        .collect()
}

/// A project's snapshot configuration: active keys, settings, schemas,
/// flags, catalog, activation and prompt rules.
async fn config_of(conn: &mut dyn SqlConn, project: Project) -> Result<ProjectConfig, StoreError> {
    let keys = keys_where(&mut *conn, "AND revoked_at IS NULL", project.id).await?;
    let row = query("SELECT settings FROM projects WHERE id = $1")
        .bind(arg_project(project.id))
        .fetch_one(&mut *conn)
        .await?;
    let settings =
        serde_json::from_value(read_json(&row, "settings")?).map_err(StoreError::internal)?;
    // The version is INT4 on PostgreSQL and a 64-bit INTEGER on SQLite: read
    // as BIGINT on both.
    let rows = query(
        "SELECT event, CAST(version AS BIGINT) AS version, required FROM event_schemas \
         WHERE project_id = $1",
    )
    .bind(arg_project(project.id))
    .fetch_all(&mut *conn)
    .await?;
    let mut schemas = BTreeMap::new();
    for row in rows {
        let event: String = row.try_get("event")?;
        let version: i64 = row.try_get("version")?;
        let schema = EventSchema {
            event: event.clone(),
            version: u32::try_from(version).map_err(StoreError::internal)?,
            required: serde_json::from_value(read_json(&row, "required")?)
                .map_err(StoreError::internal)?,
        };
        schemas.insert(event, schema);
    }
    let flag_entries = current_flag_entries(&mut *conn, project.id).await?;
    let (flags, problems) = compile_entries(&flag_entries);
    for problem in problems {
        tracing::error!(project = %project.id.0, problem, "a stored flag does not compile; left out");
    }
    let catalog_row = query(
        "SELECT version, document FROM catalog_versions WHERE project_id = $1 \
         ORDER BY version DESC LIMIT 1",
    )
    .bind(arg_project(project.id))
    .fetch_optional(&mut *conn)
    .await?;
    let (catalog_version, document) = match catalog_row {
        Some(row) => (
            row.try_get::<i64, _>("version")?,
            Some(read_json(&row, "document")?),
        ),
        None => (0, None),
    };
    let activation = crate::compile_stored_rules(
        project.id,
        crate::growth::activation::latest_versioned(
            &mut *conn,
            "activation_rule_versions",
            project.id,
        )
        .await?,
    );
    let prompts = crate::compile_stored_rules(
        project.id,
        crate::growth::activation::latest_versioned(&mut *conn, "prompt_rule_versions", project.id)
            .await?,
    );
    Ok(ProjectConfig {
        catalog: compile_stored_catalog(project.id, document),
        catalog_version,
        activation,
        prompts,
        project,
        keys,
        settings,
        schemas,
        flags,
        flag_entries,
    })
}

async fn project_where(
    conn: &mut dyn SqlConn,
    column: &'static str,
    value: crate::sql::Arg<'_>,
) -> Result<Option<Project>, StoreError> {
    let row = query(format!(
        "SELECT {PROJECT_COLUMNS} FROM projects WHERE {column} = $1"
    ))
    .bind(value)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(project_from).transpose()
}

#[async_trait]
impl<S: SqlBackend> ProjectStore for S {
    async fn create_project(
        &self,
        project: &Project,
        keys: &[ApiKeyRecord],
    ) -> Result<(), StoreError> {
        timed(S::BACKEND, "create_project", async {
            let mut tx = self.begin().await?;
            query("INSERT INTO projects (id, name, created_at) VALUES ($1, $2, $3)")
                .bind(arg_project(project.id))
                .bind(&project.name)
                .bind(arg_time(project.created_at))
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "project name"))?;
            for key in keys {
                insert_key_row(&mut *tx, key).await?;
            }
            tx.record_change(project.id, "project", project.created_at)
                .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn list_projects(&self) -> Result<Vec<Project>, StoreError> {
        timed(S::BACKEND, "list_projects", async {
            let rows = query(format!(
                "SELECT {PROJECT_COLUMNS} FROM projects ORDER BY created_at, id"
            ))
            .fetch_all(&mut *self.reader().await?)
            .await?;
            rows.iter().map(project_from).collect()
        })
        .await
    }

    async fn project_by_id(&self, id: ProjectId) -> Result<Option<Project>, StoreError> {
        timed(S::BACKEND, "project_by_id", async {
            project_where(&mut *self.reader().await?, "id", arg_project(id)).await
        })
        .await
    }

    async fn project_by_name(&self, name: &str) -> Result<Option<Project>, StoreError> {
        timed(S::BACKEND, "project_by_name", async {
            project_where(&mut *self.reader().await?, "name", name.into()).await
        })
        .await
    }

    async fn insert_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        timed(S::BACKEND, "insert_key", async {
            let mut tx = self.begin().await?;
            // PostgreSQL: the project row is locked so that a concurrent
            // delete cannot slip in between.
            let exists = query(format!(
                "SELECT id FROM projects WHERE id = $1{}",
                tx.backend().lock_shared()
            ))
            .bind(arg_project(key.project_id))
            .fetch_optional(&mut *tx)
            .await?;
            if exists.is_none() {
                return Err(StoreError::NotFound);
            }
            insert_key_row(&mut *tx, key).await?;
            tx.record_change(key.project_id, "api_key", key.created_at)
                .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn list_keys(&self, project: ProjectId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        timed(S::BACKEND, "list_keys", async {
            keys_where(&mut *self.reader().await?, "", project).await
        })
        .await
    }

    async fn revoke_key(
        &self,
        project: ProjectId,
        key: KeyId,
        at: DateTime<Utc>,
    ) -> Result<ApiKeyRecord, StoreError> {
        timed(S::BACKEND, "revoke_key", async {
            let mut tx = self.begin().await?;
            let row = query(format!(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) \
                 WHERE id = $2 AND project_id = $3 RETURNING {KEY_COLUMNS}"
            ))
            .bind(arg_time(at))
            .bind(arg_uuid(key.0))
            .bind(arg_project(project))
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound)?;
            let record = key_from(&row)?;
            tx.record_change(project, "api_key", at).await?;
            tx.commit().await?;
            Ok(record)
        })
        .await
    }

    async fn load_project_config(
        &self,
        project: ProjectId,
    ) -> Result<Option<ProjectConfig>, StoreError> {
        timed(S::BACKEND, "load_project_config", async {
            let mut conn = self.reader().await?;
            let Some(found) = project_where(&mut *conn, "id", arg_project(project)).await? else {
                return Ok(None);
            };
            Ok(Some(config_of(&mut *conn, found).await?))
        })
        .await
    }

    async fn load_all_project_configs(&self) -> Result<Vec<ProjectConfig>, StoreError> {
        timed(S::BACKEND, "load_all_project_configs", async {
            let projects = self.list_projects().await?;
            let mut conn = self.reader().await?;
            let mut configs = Vec::with_capacity(projects.len());
            for project in projects {
                configs.push(config_of(&mut *conn, project).await?);
            }
            Ok(configs)
        })
        .await
    }

    async fn latest_config_seq(&self) -> Result<i64, StoreError> {
        timed(S::BACKEND, "latest_config_seq", async {
            let latest: Option<i64> = query_scalar("SELECT MAX(seq) FROM config_changes")
                .fetch_one(&mut *self.reader().await?)
                .await?;
            Ok(latest.unwrap_or(0))
        })
        .await
    }

    async fn config_changes_since(&self, after_seq: i64) -> Result<ConfigChanges, StoreError> {
        timed(S::BACKEND, "config_changes_since", async {
            // Nothing new, the common case, is one probe of the primary key.
            let rows =
                query("SELECT seq, project_id FROM config_changes WHERE seq > $1 ORDER BY seq")
                    .bind(after_seq)
                    .fetch_all(&mut *self.reader().await?)
                    .await?;
            let mut latest_seq = after_seq;
            let mut ids = Vec::with_capacity(rows.len());
            for row in &rows {
                latest_seq = latest_seq.max(row.try_get("seq")?);
                ids.push(ProjectId(read_uuid(row, "project_id")?));
            }
            Ok(ConfigChanges {
                latest_seq,
                projects: distinct_projects(ids),
            })
        })
        .await
    }
}
