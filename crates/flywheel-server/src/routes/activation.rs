//! Activation rules and the milestones they record: `GET/PUT
//! /v1/activation-rules`, `GET /v1/users/{id}/milestones`,
//! `GET /v1/orgs/{org}/milestones`. The rules are applied by the store
//! when events commit (see `flywheel-store`'s `growth::activation::apply_activation`).

use axum::extract::{Path, State};
use axum::routing::get;
use axum::Router;
use flywheel_domain::activation::{ActivationRules, Milestone, Scope};
use flywheel_domain::growth::model::validate_external_id;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::SecretKey;
use crate::error::{ApiError, ApiJson, ErrorEnvelope};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/activation-rules",
            get(get_activation_rules).put(put_activation_rules),
        )
        .route("/v1/users/{user_id}/milestones", get(user_milestones))
        .route("/v1/orgs/{org_id}/milestones", get(org_milestones))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ActivationRulesView {
    /// 0 when never written.
    version: i64,
    rules: ActivationRules,
}

/// The project's activation rules.
#[utoipa::path(get, path = "/v1/activation-rules", tag = "activation",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The current rules", body = ActivationRulesView),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn get_activation_rules(
    State(state): State<AppState>,
    auth: SecretKey,
) -> Result<ApiJson<ActivationRulesView>, ApiError> {
    // Version and rules from the same stored row (this node's snapshot may
    // lag another node's write).
    let Some((version, document)) = state
        .store
        .activation_rules(auth.principal.project_id())
        .await?
    else {
        return Ok(ApiJson(ActivationRulesView {
            version: 0,
            rules: ActivationRules::default(),
        }));
    };
    let rules = serde_json::from_value(document).map_err(ApiError::internal)?;
    Ok(ApiJson(ActivationRulesView { version, rules }))
}

/// Replaces the activation rules (a new version). Conditions read as the
/// seeds write them (`"project_created >= 3"`, `"feature:api_calls >= 50"`)
/// or as objects; every problem is reported with its JSON path. Counting
/// starts when a rule exists: events before it are not counted.
#[utoipa::path(put, path = "/v1/activation-rules", tag = "activation",
    security(("api_key" = [])),
    request_body = ActivationRules,
    responses(
        (status = 200, description = "Written", body = ActivationRulesView),
        (status = 400, description = "Invalid rules (`invalid_activation_rules`, each problem with its path)", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn put_activation_rules(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(rules): ApiJson<ActivationRules>,
) -> Result<ApiJson<ActivationRulesView>, ApiError> {
    let rules = rules
        .validate()
        .map_err(|problems| ApiError::invalid_document("invalid_activation_rules", &problems))?;
    let project = auth.principal.project_id();
    let document = serde_json::to_value(&rules).map_err(ApiError::internal)?;
    let actor = format!("key:{}", auth.principal.key_id.0);
    let version = state
        .store
        .put_activation_rules(project, &document, &actor, state.clock.now())
        .await?;
    state.snapshot.reload_project(project).await?;
    Ok(ApiJson(ActivationRulesView { version, rules }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MilestoneList {
    milestones: Vec<Milestone>,
}

/// A user's milestones (user-scoped rules), oldest first.
#[utoipa::path(get, path = "/v1/users/{user_id}/milestones", tag = "activation",
    security(("api_key" = [])),
    params(("user_id" = String, Path)),
    responses(
        (status = 200, description = "The milestones", body = MilestoneList),
        (status = 400, description = "An invalid user id", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn user_milestones(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(user_id): Path<String>,
) -> Result<ApiJson<MilestoneList>, ApiError> {
    milestones_of(&state, &auth, Scope::User, "user_id", &user_id).await
}

/// An org's milestones (org-scoped rules), oldest first.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/milestones", tag = "activation",
    security(("api_key" = [])),
    params(("org_id" = String, Path)),
    responses(
        (status = 200, description = "The milestones", body = MilestoneList),
        (status = 400, description = "An invalid org id", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn org_milestones(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(org_id): Path<String>,
) -> Result<ApiJson<MilestoneList>, ApiError> {
    milestones_of(&state, &auth, Scope::Org, "org_id", &org_id).await
}

async fn milestones_of(
    state: &AppState,
    auth: &SecretKey,
    scope: Scope,
    what: &'static str,
    id: &str,
) -> Result<ApiJson<MilestoneList>, ApiError> {
    validate_external_id(what, id)?;
    let milestones = state
        .store
        .milestones(auth.principal.project_id(), scope, id)
        .await?;
    Ok(ApiJson(MilestoneList { milestones }))
}
