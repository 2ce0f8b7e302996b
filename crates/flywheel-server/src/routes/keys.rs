//! API key management for the calling project (secret keys only).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::Router;
use chrono::{DateTime, Utc};
use flywheel_domain::keys::KeyKind;
use flywheel_domain::project::{ApiKeyRecord, KeyId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::SecretKey;
use crate::error::{ApiError, ApiJson, ErrorEnvelope};
use crate::projects;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/keys", get(list_keys).post(create_key))
        .route("/v1/keys/{key_id}", delete(revoke_key))
}

/// A key as listed: never its plaintext.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyInfo {
    pub id: Uuid,
    pub kind: KeyKind,
    /// The key's first characters, to recognise it (`sk_Ab3xYz`).
    pub prefix: String,
    pub label: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRecord> for ApiKeyInfo {
    fn from(record: ApiKeyRecord) -> Self {
        Self {
            id: record.id.0,
            kind: record.kind,
            prefix: record.prefix,
            label: record.label,
            created_at: record.created_at,
            revoked_at: record.revoked_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<ApiKeyInfo>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    pub kind: KeyKind,
    /// Optional note, at most 100 characters (e.g. "web app", "CI").
    pub label: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub info: ApiKeyInfo,
    /// The key itself. Shown this once: only its hash is stored.
    pub key: String,
}

/// Lists the project's keys, revoked ones included.
#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The project's keys", body = KeyList),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn list_keys(
    State(state): State<AppState>,
    auth: SecretKey,
) -> Result<ApiJson<KeyList>, ApiError> {
    let keys = state.store.list_keys(auth.principal.project_id()).await?;
    Ok(ApiJson(KeyList {
        keys: keys.into_iter().map(ApiKeyInfo::from).collect(),
    }))
}

/// Creates a key. It works on every node within a second (at once on this one).
#[utoipa::path(post, path = "/v1/keys", tag = "keys",
    security(("api_key" = [])),
    request_body = CreateKeyRequest,
    responses(
        (status = 201, description = "The new key, with its plaintext shown once", body = CreatedKey),
        (status = 400, description = "Invalid body", body = ErrorEnvelope),
        (status = 415, description = "The body is not declared as JSON", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn create_key(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(request): ApiJson<CreateKeyRequest>,
) -> Result<(StatusCode, ApiJson<CreatedKey>), ApiError> {
    let project = auth.principal.project_id();
    let (record, key) = projects::create_key(
        state.store.as_ref(),
        state.clock.as_ref(),
        project,
        request.kind,
        request.label.as_deref(),
    )
    .await?;
    state.snapshot.reload_project(project).await?;
    let created = CreatedKey {
        info: record.into(),
        key: key.plaintext,
    };
    Ok((StatusCode::CREATED, ApiJson(created)))
}

/// Revokes a key at once. Revoking a revoked key is a no-op that returns it.
#[utoipa::path(delete, path = "/v1/keys/{key_id}", tag = "keys",
    security(("api_key" = [])),
    params(("key_id" = Uuid, Path, description = "The key's id (not the key)")),
    responses(
        (status = 200, description = "The revoked key", body = ApiKeyInfo),
        (status = 400, description = "The id is not a UUID", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
        (status = 404, description = "The project has no such key", body = ErrorEnvelope),
    ))]
pub async fn revoke_key(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(key_id): Path<String>,
) -> Result<ApiJson<ApiKeyInfo>, ApiError> {
    let key_id = Uuid::parse_str(&key_id).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_key_id",
            "key_id must be a UUID",
        )
    })?;
    let project = auth.principal.project_id();
    let record = projects::revoke_key(
        state.store.as_ref(),
        state.clock.as_ref(),
        project,
        KeyId(key_id),
    )
    .await
    .map_err(|e| match ApiError::from(e) {
        e if e.status == StatusCode::NOT_FOUND => {
            ApiError::not_found("key_not_found", "the project has no such key")
        }
        e => e,
    })?;
    state.snapshot.reload_project(project).await?;
    Ok(ApiJson(record.into()))
}
