//! The calling key's project.

use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use flywheel_domain::keys::KeyKind;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::AnyKey;
use crate::error::{ApiJson, ErrorEnvelope};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/project", get(current_project))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CurrentProject {
    pub project_id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// The key this request was made with.
    pub key_id: Uuid,
    pub key_kind: KeyKind,
}

/// The project the presented key belongs to. Any key may call it: a quick
/// way to check that a key works.
#[utoipa::path(get, path = "/v1/project", tag = "projects",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The key's project", body = CurrentProject),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
    ))]
pub async fn current_project(auth: AnyKey) -> ApiJson<CurrentProject> {
    let project = &auth.principal.project.project;
    ApiJson(CurrentProject {
        project_id: project.id.0,
        name: project.name.clone(),
        created_at: project.created_at,
        key_id: auth.principal.key_id.0,
        key_kind: auth.principal.key_kind,
    })
}
