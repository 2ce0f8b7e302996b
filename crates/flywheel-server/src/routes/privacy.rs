//! Project settings (consent, IP, PII, schema mode), event schemas and their
//! violations, and deleting a person. Secret keys only.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, put};
use axum::Router;
use chrono::{DateTime, Utc};
use flywheel_domain::privacy::ProjectSettings;
use flywheel_domain::schemas::{EventSchema, PropertyType};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::SecretKey;
use crate::error::{ApiError, ApiJson, ApiQuery, ErrorEnvelope};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/project/settings", get(get_settings).put(put_settings))
        .route("/v1/schemas", get(list_schemas))
        .route("/v1/schemas/violations", get(list_violations))
        .route("/v1/schemas/{event}", put(put_schema).delete(delete_schema))
        .route("/v1/users/{user_id}", delete(delete_user))
}

/// The project's privacy and validation settings.
#[utoipa::path(get, path = "/v1/project/settings", tag = "privacy",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Current settings", body = ProjectSettings),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn get_settings(auth: SecretKey) -> ApiJson<ProjectSettings> {
    ApiJson(auth.principal.project.settings.clone())
}

/// Replaces the project's settings. Omitted fields take their defaults.
#[utoipa::path(put, path = "/v1/project/settings", tag = "privacy",
    security(("api_key" = [])),
    request_body = ProjectSettings,
    responses(
        (status = 200, description = "The settings now in force", body = ProjectSettings),
        (status = 400, description = "Unknown field or bad value", body = ErrorEnvelope),
        (status = 415, description = "The body is not declared as JSON", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn put_settings(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(settings): ApiJson<ProjectSettings>,
) -> Result<ApiJson<ProjectSettings>, ApiError> {
    let project = auth.principal.project_id();
    state
        .store
        .update_project_settings(project, &settings, state.clock.now())
        .await?;
    state.snapshot.reload_project(project).await?;
    Ok(ApiJson(settings))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SchemaList {
    schemas: Vec<EventSchema>,
}

/// Every event schema of the project.
#[utoipa::path(get, path = "/v1/schemas", tag = "privacy",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Schemas by event name", body = SchemaList),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn list_schemas(auth: SecretKey) -> ApiJson<SchemaList> {
    ApiJson(SchemaList {
        schemas: auth.principal.project.schemas.values().cloned().collect(),
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SchemaBody {
    /// Bump when the schema changes; violations record it.
    version: u32,
    /// Property name → required JSON type.
    required: BTreeMap<String, PropertyType>,
}

/// Creates or replaces the schema of one event name. It applies per the
/// project's `schema_mode`: `off`, `warn` (store and record) or `enforce`
/// (reject the event; the rest of its batch proceeds).
#[utoipa::path(put, path = "/v1/schemas/{event}", tag = "privacy",
    security(("api_key" = [])),
    params(("event" = String, Path, description = "Event name")),
    request_body = SchemaBody,
    responses(
        (status = 200, description = "The schema", body = EventSchema),
        (status = 400, description = "Bad schema", body = ErrorEnvelope),
        (status = 415, description = "The body is not declared as JSON", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn put_schema(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(event): Path<String>,
    ApiJson(body): ApiJson<SchemaBody>,
) -> Result<ApiJson<EventSchema>, ApiError> {
    if event.is_empty() || event.len() > 256 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_event_name",
            "event name must be 1 to 256 bytes",
        ));
    }
    let schema = EventSchema {
        event,
        version: body.version,
        required: body.required,
    };
    let project = auth.principal.project_id();
    state
        .store
        .put_event_schema(project, &schema, state.clock.now())
        .await?;
    state.snapshot.reload_project(project).await?;
    Ok(ApiJson(schema))
}

/// Removes the schema of one event name.
#[utoipa::path(delete, path = "/v1/schemas/{event}", tag = "privacy",
    security(("api_key" = [])),
    params(("event" = String, Path, description = "Event name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
        (status = 404, description = "No schema for that event", body = ErrorEnvelope),
    ))]
pub async fn delete_schema(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(event): Path<String>,
) -> Result<StatusCode, ApiError> {
    let project = auth.principal.project_id();
    state
        .store
        .delete_event_schema(project, &event, state.clock.now())
        .await
        .map_err(|e| match ApiError::from(e) {
            e if e.status == StatusCode::NOT_FOUND => {
                ApiError::not_found("schema_not_found", "no schema for that event")
            }
            e => e,
        })?;
    state.snapshot.reload_project(project).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LimitParams {
    /// At most this many (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ViolationView {
    event_id: Uuid,
    event: String,
    problems: Vec<String>,
    recorded_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ViolationList {
    violations: Vec<ViolationView>,
}

/// Events stored in `warn` mode that broke their schema, newest first.
#[utoipa::path(get, path = "/v1/schemas/violations", tag = "privacy",
    security(("api_key" = [])),
    params(LimitParams),
    responses(
        (status = 200, description = "Recorded violations", body = ViolationList),
        (status = 400, description = "Invalid parameter", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn list_violations(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiQuery(params): ApiQuery<LimitParams>,
) -> Result<ApiJson<ViolationList>, ApiError> {
    let limit = super::page_limit(params.limit)?;
    let found = state
        .store
        .list_schema_violations(auth.principal.project_id(), limit)
        .await?;
    Ok(ApiJson(ViolationList {
        violations: found
            .into_iter()
            .map(|v| ViolationView {
                event_id: v.event_id,
                event: v.event,
                problems: v.problems,
                recorded_at: v.recorded_at,
            })
            .collect(),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeletedUser {
    /// The ids deleted and now suppressed (the user and every linked id).
    ids: Vec<String>,
    /// Events deleted.
    events_deleted: u64,
}

/// Deletes a person: their events, identity links and org memberships. Every
/// id of theirs is kept as a suppression tombstone, so late retries that name
/// them are dropped (counted as `suppressed`). Idempotent.
#[utoipa::path(delete, path = "/v1/users/{user_id}", tag = "privacy",
    security(("api_key" = [])),
    params(("user_id" = String, Path, description = "The user's id (or any id linked to it)")),
    responses(
        (status = 200, description = "Deleted", body = DeletedUser),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn delete_user(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(user_id): Path<String>,
) -> Result<ApiJson<DeletedUser>, ApiError> {
    let project = auth.principal.project_id();
    let person = state.store.resolve_person(project, &user_id).await?;
    let mut ids = state.store.person_ids(project, &person).await?;
    if !ids.contains(&user_id) {
        ids.push(user_id);
    }
    let events_deleted = state
        .store
        .delete_person(project, &ids, state.clock.now())
        .await?;
    for id in &ids {
        state.profiles.forget(project, id);
    }
    Ok(ApiJson(DeletedUser {
        ids,
        events_deleted,
    }))
}
