//! A project's configuration writes (settings, event schemas, flags, the
//! billing catalog) and their histories, written once for both backends
//! over the shared SQL layer of `crate::sql`. Every write records a
//! configuration change in its own transaction, so every node reloads the
//! project's snapshot.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use flywheel_domain::flags::{FlagAction, FlagChange, FlagEntryKind, FlagVersion};
use flywheel_domain::privacy::ProjectSettings;
use flywheel_domain::project::ProjectId;
use flywheel_domain::schemas::EventSchema;

use crate::projects::{flag_kind, UnknownValue};
use crate::sql::{
    arg_json, arg_opt_json, arg_project, arg_time, query, query_scalar, read_json, read_opt_json,
    read_time, read_uuid, Row, SqlBackend, WriteConn,
};
use crate::{plan_flag_version, timed, CatalogVersion, SchemaViolation, StoreError};

/// Settings, schemas, flags and the catalog of a project.
#[async_trait]
pub trait ConfigStore: Send + Sync {
    /// Replaces a project's settings and records the change.
    async fn update_project_settings(
        &self,
        project: ProjectId,
        settings: &ProjectSettings,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Creates or replaces the schema of one event name.
    async fn put_event_schema(
        &self,
        project: ProjectId,
        schema: &EventSchema,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// `NotFound` if the event has no schema.
    async fn delete_event_schema(
        &self,
        project: ProjectId,
        event: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// The newest violations first.
    async fn list_schema_violations(
        &self,
        project: ProjectId,
        limit: u32,
    ) -> Result<Vec<SchemaViolation>, StoreError>;

    /// Applies flag changes in one transaction, each as the next version of
    /// its entry (an unchanged definition writes nothing), and records the
    /// change if anything was written. Returns the versions written.
    async fn write_flags(
        &self,
        project: ProjectId,
        changes: &[FlagChange],
        actor: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<FlagVersion>, StoreError>;

    /// Every version of one entry, oldest first.
    async fn flag_history(
        &self,
        project: ProjectId,
        kind: FlagEntryKind,
        key: &str,
    ) -> Result<Vec<FlagVersion>, StoreError>;

    /// Stores the next version of the project's catalog (`NotFound`: no
    /// such project).
    async fn write_catalog(
        &self,
        project: ProjectId,
        document: &serde_json::Value,
        actor: &str,
        at: DateTime<Utc>,
    ) -> Result<CatalogVersion, StoreError>;

    /// Every catalog version, oldest first.
    async fn catalog_history(&self, project: ProjectId) -> Result<Vec<CatalogVersion>, StoreError>;
}

const FLAG_VERSION_COLUMNS: &str = "kind, key, version, definition, action, actor, created_at";

fn flag_version(row: &Row) -> Result<FlagVersion, StoreError> {
    let action: String = row.try_get("action")?;
    Ok(FlagVersion {
        kind: flag_kind(row)?,
        key: row.try_get("key")?,
        version: row.try_get("version")?,
        definition: read_opt_json(row, "definition")?,
        action: FlagAction::parse(&action)
            .ok_or_else(|| StoreError::internal(UnknownValue(action)))?,
        actor: row.try_get("actor")?,
        created_at: read_time(row, "created_at")?,
    })
}

/// Locks the project row for the rest of the transaction (PostgreSQL; under
/// SQLite's single writer the transaction is alone anyway): versions are
/// numbered by reading the newest, so writers of one project serialise.
/// `false` when there is no such project.
async fn lock_project(conn: &mut dyn WriteConn, project: ProjectId) -> Result<bool, StoreError> {
    let found = query(format!(
        "SELECT id FROM projects WHERE id = $1{}",
        conn.backend().lock()
    ))
    .bind(arg_project(project))
    .fetch_optional(conn)
    .await?;
    Ok(found.is_some())
}

#[async_trait]
impl<S: SqlBackend> ConfigStore for S {
    async fn update_project_settings(
        &self,
        project: ProjectId,
        settings: &ProjectSettings,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        timed(S::BACKEND, "update_project_settings", async {
            let settings = serde_json::to_value(settings).map_err(StoreError::internal)?;
            let mut tx = self.begin().await?;
            let updated = query("UPDATE projects SET settings = $1 WHERE id = $2")
                .bind(arg_json(&settings))
                .bind(arg_project(project))
                .execute(&mut *tx)
                .await?;
            if updated.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            tx.record_change(project, "settings", at).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn put_event_schema(
        &self,
        project: ProjectId,
        schema: &EventSchema,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        timed(S::BACKEND, "put_event_schema", async {
            let required = serde_json::to_value(&schema.required).map_err(StoreError::internal)?;
            let mut tx = self.begin().await?;
            query(
                "INSERT INTO event_schemas (project_id, event, version, required, updated_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (project_id, event) DO UPDATE SET \
                 version = excluded.version, required = excluded.required, updated_at = excluded.updated_at",
            )
            .bind(arg_project(project))
            .bind(&schema.event)
            // PostgreSQL casts it to the INT4 column (refusing what does
            // not fit); SQLite keeps all 64 bits.
            .bind(i64::from(schema.version))
            .bind(arg_json(&required))
            .bind(arg_time(at))
            .execute(&mut *tx)
            .await?;
            tx.record_change(project, "event_schema", at).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn delete_event_schema(
        &self,
        project: ProjectId,
        event: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        timed(S::BACKEND, "delete_event_schema", async {
            let mut tx = self.begin().await?;
            let deleted = query("DELETE FROM event_schemas WHERE project_id = $1 AND event = $2")
                .bind(arg_project(project))
                .bind(event)
                .execute(&mut *tx)
                .await?;
            if deleted.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            tx.record_change(project, "event_schema", at).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn list_schema_violations(
        &self,
        project: ProjectId,
        limit: u32,
    ) -> Result<Vec<SchemaViolation>, StoreError> {
        timed(S::BACKEND, "list_schema_violations", async {
            let rows = query(
                "SELECT event_id, event, problems, recorded_at FROM schema_violations \
                 WHERE project_id = $1 ORDER BY recorded_at DESC, event_id LIMIT $2",
            )
            .bind(arg_project(project))
            .bind(i64::from(limit))
            .fetch_all(&mut *self.reader().await?)
            .await?;
            rows.iter()
                .map(|row| {
                    Ok(SchemaViolation {
                        event_id: read_uuid(row, "event_id")?,
                        event: row.try_get("event")?,
                        problems: serde_json::from_value(read_json(row, "problems")?)
                            .map_err(StoreError::internal)?,
                        recorded_at: read_time(row, "recorded_at")?,
                    })
                })
                .collect()
        })
        .await
    }

    async fn write_flags(
        &self,
        project: ProjectId,
        changes: &[FlagChange],
        actor: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<FlagVersion>, StoreError> {
        timed(S::BACKEND, "write_flags", async {
            let mut tx = self.begin().await?;
            lock_project(&mut *tx, project).await?;
            let mut written = Vec::new();
            for change in changes {
                let current = query(
                    "SELECT version, definition FROM flag_versions \
                     WHERE project_id = $1 AND kind = $2 AND key = $3 ORDER BY version DESC LIMIT 1",
                )
                .bind(arg_project(project))
                .bind(change.kind.as_str())
                .bind(&change.key)
                .fetch_optional(&mut *tx)
                .await?;
                let current = match current {
                    Some(row) => Some((
                        row.try_get::<i64, _>("version")?,
                        read_opt_json(&row, "definition")?,
                    )),
                    None => None,
                };
                let current_ref = current
                    .as_ref()
                    .map(|(version, definition)| (*version, definition.as_ref()));
                let Some((version, action)) = plan_flag_version(current_ref, change) else {
                    continue;
                };
                let row = query(format!(
                    "INSERT INTO flag_versions ({FLAG_VERSION_COLUMNS}, project_id) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {FLAG_VERSION_COLUMNS}"
                ))
                .bind(change.kind.as_str())
                .bind(&change.key)
                .bind(version)
                .bind(arg_opt_json(change.definition.as_ref()))
                .bind(action.as_str())
                .bind(actor)
                .bind(arg_time(at))
                .bind(arg_project(project))
                .fetch_one(&mut *tx)
                .await
                .map_err(|error| StoreError::from_sqlx(error, "project_not_found"))?;
                written.push(flag_version(&row)?);
            }
            if !written.is_empty() {
                tx.record_change(project, "flags", at).await?;
            }
            tx.commit().await?;
            Ok(written)
        })
        .await
    }

    async fn flag_history(
        &self,
        project: ProjectId,
        kind: FlagEntryKind,
        key: &str,
    ) -> Result<Vec<FlagVersion>, StoreError> {
        timed(S::BACKEND, "flag_history", async {
            let rows = query(format!(
                "SELECT {FLAG_VERSION_COLUMNS} FROM flag_versions \
                 WHERE project_id = $1 AND kind = $2 AND key = $3 ORDER BY version"
            ))
            .bind(arg_project(project))
            .bind(kind.as_str())
            .bind(key)
            .fetch_all(&mut *self.reader().await?)
            .await?;
            rows.iter().map(flag_version).collect()
        })
        .await
    }

    async fn write_catalog(
        &self,
        project: ProjectId,
        document: &serde_json::Value,
        actor: &str,
        at: DateTime<Utc>,
    ) -> Result<CatalogVersion, StoreError> {
        timed(S::BACKEND, "write_catalog", async {
            let mut tx = self.begin().await?;
            if !lock_project(&mut *tx, project).await? {
                return Err(StoreError::NotFound);
            }
            let latest: Option<i64> =
                query_scalar("SELECT MAX(version) FROM catalog_versions WHERE project_id = $1")
                    .bind(arg_project(project))
                    .fetch_one(&mut *tx)
                    .await?;
            let version = latest.unwrap_or(0) + 1;
            query(
                "INSERT INTO catalog_versions (project_id, version, document, actor, created_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(arg_project(project))
            .bind(version)
            .bind(arg_json(document))
            .bind(actor)
            .bind(arg_time(at))
            .execute(&mut *tx)
            .await?;
            tx.record_change(project, "catalog", at).await?;
            tx.commit().await?;
            Ok(CatalogVersion {
                version,
                document: document.clone(),
                actor: actor.to_string(),
                created_at: at,
            })
        })
        .await
    }

    async fn catalog_history(&self, project: ProjectId) -> Result<Vec<CatalogVersion>, StoreError> {
        timed(S::BACKEND, "catalog_history", async {
            let rows = query(
                "SELECT version, document, actor, created_at FROM catalog_versions \
                 WHERE project_id = $1 ORDER BY version",
            )
            .bind(arg_project(project))
            .fetch_all(&mut *self.reader().await?)
            .await?;
            rows.iter()
                .map(|row| {
                    Ok(CatalogVersion {
                        version: row.try_get("version")?,
                        document: read_json(row, "document")?,
                        actor: row.try_get("actor")?,
                        created_at: read_time(row, "created_at")?,
                    })
                })
                .collect()
        })
        .await
    }
}
