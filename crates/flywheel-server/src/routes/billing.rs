//! Plans, entitlements and usage: the catalog (secret key), `check` and org
//! entitlements (any key: a browser may show "4 of 5 used"), `consume`,
//! `release`, grants, overrides and plan changes (secret key).
//!
//! `check` answers from memory (the catalog in the snapshot, the org's state
//! in the org cache) and never calls the store once the org is cached, nor
//! the billing provider ever.

use axum::extract::{Path, State};
use axum::http::header::ETAG;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use chrono::{DateTime, Utc};
use flywheel_domain::billing::answer::{Reply, SubscriptionView, UsageAnswer};
use flywheel_domain::billing::catalog::{CatalogDocument, PlanFeature};
use flywheel_domain::billing::org::{OrgCommand, OrgState, SubscriptionStatus, Timing, UsageGrant};
use flywheel_domain::billing::Catalog;
use flywheel_domain::snapshot::Principal;
use flywheel_store::{Billing, OrgRequest, OrgResult};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{AnyKey, SecretKey};
use crate::error::{ApiError, ApiJson, ApiQuery, ErrorEnvelope};
use crate::routes::flags::etag_matches;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/catalog", get(get_catalog).put(put_catalog))
        .route("/v1/catalog/versions", get(catalog_versions))
        .route("/v1/check", post(check))
        .route("/v1/consume", post(consume))
        .route("/v1/release", post(release))
        .route("/v1/orgs/{org_id}/entitlements", get(entitlements))
        .route(
            "/v1/orgs/{org_id}/subscription",
            get(get_subscription)
                .post(change_subscription)
                .delete(cancel_subscription),
        )
        .route("/v1/orgs/{org_id}/subscription/status", put(set_status))
        .route("/v1/orgs/{org_id}/grants", get(list_grants).post(add_grant))
        .route(
            "/v1/orgs/{org_id}/overrides/{feature}",
            put(put_override).delete(delete_override),
        )
}

/// The longest org id accepted (the product's own id for the account).
const MAX_ORG_ID: usize = 200;
const MAX_IDEMPOTENCY_KEY: usize = 255;

pub(crate) fn valid_org_id(org_id: &str) -> Result<(), ApiError> {
    if org_id.is_empty() || org_id.len() > MAX_ORG_ID || org_id.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_org_id",
            format!("an org id is 1–{MAX_ORG_ID} characters without control characters"),
        ));
    }
    Ok(())
}

fn valid_idempotency_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            format!("`idempotency_key` is 1–{MAX_IDEMPOTENCY_KEY} characters"),
        ));
    }
    Ok(())
}

fn valid_amount(amount: i64) -> Result<(), ApiError> {
    if amount < 1 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_amount",
            "`amount` is a whole number ≥ 1",
        ));
    }
    Ok(())
}

// ---- Catalog ---------------------------------------------------------------

/// The billing catalog and its version.
#[derive(Debug, Serialize, ToSchema)]
pub struct CatalogView {
    /// 0 until a catalog is written.
    version: i64,
    #[schema(value_type = CatalogDocument)]
    catalog: serde_json::Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CatalogVersionView {
    version: i64,
    #[schema(value_type = CatalogDocument)]
    catalog: serde_json::Value,
    actor: String,
    created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CatalogHistory {
    versions: Vec<CatalogVersionView>,
}

/// The project's features, meters and plans.
#[utoipa::path(get, path = "/v1/catalog", tag = "billing",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The current catalog", body = CatalogView),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn get_catalog(auth: SecretKey) -> ApiJson<CatalogView> {
    let project = &auth.principal.project;
    ApiJson(CatalogView {
        version: project.catalog_version,
        catalog: serde_json::to_value(&project.catalog.document).expect("a catalog serializes"),
    })
}

/// Replaces the catalog. The whole document is validated; every problem is
/// reported with its JSON path, and nothing is written unless all is well.
#[utoipa::path(put, path = "/v1/catalog", tag = "billing",
    security(("api_key" = [])),
    request_body = CatalogDocument,
    responses(
        (status = 200, description = "Written as a new version", body = CatalogView),
        (status = 400, description = "Invalid catalog; the message lists each problem with its path", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn put_catalog(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(document): ApiJson<CatalogDocument>,
) -> Result<ApiJson<CatalogView>, ApiError> {
    let catalog = Catalog::compile(document)
        .map_err(|problems| ApiError::invalid_document("invalid_catalog", &problems))?;
    let project = auth.principal.project_id();
    let document = serde_json::to_value(&catalog.document).map_err(ApiError::internal)?;
    let written = state
        .store
        .write_catalog(
            project,
            &document,
            &actor(&auth.principal),
            state.clock.now(),
        )
        .await?;
    state.snapshot.reload_project(project).await?;
    Ok(ApiJson(CatalogView {
        version: written.version,
        catalog: written.document,
    }))
}

fn actor(principal: &Principal) -> String {
    format!("key:{}", principal.key_id.0)
}

/// Every version of the catalog, oldest first.
#[utoipa::path(get, path = "/v1/catalog/versions", tag = "billing",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The catalog's history", body = CatalogHistory),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn catalog_versions(
    State(state): State<AppState>,
    auth: SecretKey,
) -> Result<ApiJson<CatalogHistory>, ApiError> {
    let history = state
        .store
        .catalog_history(auth.principal.project_id())
        .await?;
    Ok(ApiJson(CatalogHistory {
        versions: history
            .into_iter()
            .map(|v| CatalogVersionView {
                version: v.version,
                catalog: v.document,
                actor: v.actor,
                created_at: v.created_at,
            })
            .collect(),
    }))
}

// ---- Decisions ---------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    org_id: String,
    feature: String,
    /// Units the caller is about to use (default 1).
    #[serde(default = "one")]
    required: i64,
    /// Include what an upgrade prompt needs.
    #[serde(default)]
    with_preview: bool,
}

fn one() -> i64 {
    1
}

pub(crate) async fn org_state(
    state: &AppState,
    project: flywheel_domain::project::ProjectId,
    org_id: &str,
) -> Result<std::sync::Arc<OrgState>, ApiError> {
    Ok(state
        .snapshot
        .orgs
        .load(state.store.as_ref(), project, org_id, state.clock.now())
        .await?)
}

/// May this org use this feature now? Read-only and advisory: answered from
/// memory, never from the billing provider. A denial is a 200 with
/// `allowed: false` and a `reason` from a closed set: `not_in_plan`,
/// `limit_reached`, `no_active_subscription`, `unknown_feature` (and
/// `soft_limit_exceeded` when allowed past a soft limit).
#[utoipa::path(post, path = "/v1/check", tag = "billing",
    security(("api_key" = [])),
    request_body = CheckRequest,
    responses(
        (status = 200, description = "The decision", body = UsageAnswer),
        (status = 400, description = "Invalid request", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
    ))]
pub async fn check(
    State(state): State<AppState>,
    auth: AnyKey,
    ApiJson(request): ApiJson<CheckRequest>,
) -> Result<ApiJson<UsageAnswer>, ApiError> {
    valid_org_id(&request.org_id)?;
    if request.required < 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_required",
            "`required` is a whole number ≥ 0",
        ));
    }
    let project = &auth.principal.project;
    let (grace, now) = (state.billing.grace(), state.clock.now());
    let answer = |org: &std::sync::Arc<OrgState>| {
        org.answer(
            &project.catalog,
            &request.feature,
            request.required,
            request.with_preview,
            grace,
            now,
        )
    };
    // The hot path: a cached org, no reference count taken, no store read.
    if let Some(hit) = state
        .snapshot
        .orgs
        .with(project.project.id, &request.org_id, answer)
    {
        return Ok(ApiJson(hit));
    }
    let org = org_state(&state, project.project.id, &request.org_id).await?;
    Ok(ApiJson(answer(&org)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageRequest {
    org_id: String,
    feature: String,
    amount: i64,
    /// Retries with the same key return the first answer and count once.
    idempotency_key: String,
    /// The product's user on whose behalf the units move: the prompts this
    /// write fires (`usage_warning`, `limit_reached`, a denied consume) are
    /// theirs. Absent: the org owner's.
    #[serde(default)]
    user_id: Option<String>,
}

/// Submits one org command and maps its result.
pub(crate) async fn execute(
    state: &AppState,
    principal: &Principal,
    org_id: &str,
    command: OrgCommand,
    idempotency_key: Option<String>,
) -> Result<Reply, ApiError> {
    execute_as(state, principal, org_id, command, idempotency_key, None).await
}

/// [`execute`] on behalf of one of the product's users: the prompts the
/// write fires are theirs (else the org owner's).
pub(crate) async fn execute_as(
    state: &AppState,
    principal: &Principal,
    org_id: &str,
    command: OrgCommand,
    idempotency_key: Option<String>,
    actor_user_id: Option<String>,
) -> Result<Reply, ApiError> {
    let request = OrgRequest {
        project: principal.project_id(),
        org_id: org_id.to_string(),
        command,
        idempotency_key,
        billing: Billing::for_project(&principal.project, state.billing.grace()),
        now: state.clock.now(),
        actor_user_id,
    };
    match state.org_writer.execute(request).await? {
        OrgResult::Applied(reply) | OrgResult::Replayed(reply) => Ok(reply),
        OrgResult::KeyReused => Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_key_reused",
            "this idempotency key was already used for a different request",
        )),
        OrgResult::Rejected(error) => Err(error.into()),
    }
}

fn usage_reply(reply: Reply) -> Result<ApiJson<UsageAnswer>, ApiError> {
    match reply {
        Reply::Usage(answer) => Ok(ApiJson(answer)),
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

/// Takes units of a metered feature: one atomic compare-and-add (under a
/// hard limit all or nothing; concurrent callers on any node can never push
/// usage past it). Units come from the plan's allowance, then from grants,
/// earliest-expiring first. A refusal is a 200 with `allowed: false`.
#[utoipa::path(post, path = "/v1/consume", tag = "billing",
    security(("api_key" = [])),
    request_body = UsageRequest,
    responses(
        (status = 200, description = "Taken (`allowed: true`) or refused, with usage after", body = UsageAnswer),
        (status = 400, description = "Invalid request, or the feature is not consumable (`feature_not_metered`, `feature_not_consumable`)", body = ErrorEnvelope),
        (status = 404, description = "`unknown_feature`", body = ErrorEnvelope),
        (status = 409, description = "`idempotency_key_reused` for a different request", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn consume(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(request): ApiJson<UsageRequest>,
) -> Result<ApiJson<UsageAnswer>, ApiError> {
    usage_command(&state, &auth.principal, request, |feature, amount| {
        OrgCommand::Consume { feature, amount }
    })
    .await
}

/// Gives units back (a deleted project, a refunded call): to grants first,
/// then to the plan's allowance; usage never goes below zero.
#[utoipa::path(post, path = "/v1/release", tag = "billing",
    security(("api_key" = [])),
    request_body = UsageRequest,
    responses(
        (status = 200, description = "Usage after the release", body = UsageAnswer),
        (status = 400, description = "Invalid request", body = ErrorEnvelope),
        (status = 404, description = "`unknown_feature`", body = ErrorEnvelope),
        (status = 409, description = "`idempotency_key_reused` for a different request", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn release(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(request): ApiJson<UsageRequest>,
) -> Result<ApiJson<UsageAnswer>, ApiError> {
    usage_command(&state, &auth.principal, request, |feature, amount| {
        OrgCommand::Release { feature, amount }
    })
    .await
}

/// `consume` and `release`: the same checks, one idempotent org command.
async fn usage_command(
    state: &AppState,
    principal: &Principal,
    request: UsageRequest,
    command: impl FnOnce(String, i64) -> OrgCommand,
) -> Result<ApiJson<UsageAnswer>, ApiError> {
    valid_org_id(&request.org_id)?;
    valid_amount(request.amount)?;
    valid_idempotency_key(&request.idempotency_key)?;
    if let Some(user) = &request.user_id {
        flywheel_domain::growth::model::validate_external_id("user_id", user)?;
    }
    let command = command(request.feature, request.amount);
    let reply = execute_as(
        state,
        principal,
        &request.org_id,
        command,
        Some(request.idempotency_key),
        request.user_id,
    )
    .await?;
    usage_reply(reply)
}

/// Every entitlement of an org.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntitlementsView {
    org_id: String,
    plan: Option<String>,
    /// Payment lapsed past the grace period: the default plan applies.
    lapsed: bool,
    /// One answer per catalog feature, in catalog order.
    entitlements: Vec<UsageAnswer>,
}

/// Every entitlement of `org` now, as `GET …/entitlements` and `decide`
/// answer it.
pub(crate) fn entitlements_view(
    state: &AppState,
    project: &flywheel_domain::snapshot::ProjectConfig,
    org: &OrgState,
) -> EntitlementsView {
    let now = state.clock.now();
    let grace = state.billing.grace();
    let access = org.access(&project.catalog, grace, now);
    EntitlementsView {
        org_id: org.org_id.clone(),
        plan: access.plan.map(|(_, plan)| plan.key.clone()),
        lapsed: access.lapsed.is_some(),
        entitlements: project
            .catalog
            .document
            .features
            .iter()
            .map(|feature| org.answer(&project.catalog, &feature.key, 0, false, grace, now))
            .collect(),
    }
}

/// Every feature of the catalog for this org, with usage: for dashboards and
/// for SDKs that check locally. Sends an `ETag`; with a matching
/// `If-None-Match` the answer is 304.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/entitlements", tag = "billing",
    security(("api_key" = [])),
    params(("org_id" = String, Path, description = "The product's id of the org")),
    responses(
        (status = 200, description = "The org's entitlements", body = EntitlementsView,
         headers(("ETag" = String, description = "Tag of this answer"))),
        (status = 304, description = "Unchanged since the tag in If-None-Match"),
        (status = 400, description = "Invalid org id", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
    ))]
pub async fn entitlements(
    State(state): State<AppState>,
    auth: AnyKey,
    Path(org_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    valid_org_id(&org_id)?;
    let project = &auth.principal.project;
    let org = org_state(&state, project.project.id, &org_id).await?;
    let view = entitlements_view(&state, project, &org);
    let body = serde_json::to_vec(&view).map_err(ApiError::internal)?;
    let etag = format!("\"{}\"", flywheel_flags::strong_etag(&body));
    if etag_matches(&headers, &etag) {
        return Ok((
            StatusCode::NOT_MODIFIED,
            [(ETAG, HeaderValue::from_str(&etag).expect("hex"))],
        )
            .into_response());
    }
    Ok((
        [
            (ETAG, HeaderValue::from_str(&etag).expect("hex")),
            (
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ],
        body,
    )
        .into_response())
}

// ---- Subscriptions, grants, overrides -----------------------------------------

/// The org's subscription: the plan that applies now, the stored
/// subscription, and any change waiting for the period end.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/subscription", tag = "billing",
    security(("api_key" = [])),
    params(("org_id" = String, Path, description = "The product's id of the org")),
    responses(
        (status = 200, description = "The subscription", body = SubscriptionView),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn get_subscription(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(org_id): Path<String>,
) -> Result<ApiJson<SubscriptionView>, ApiError> {
    valid_org_id(&org_id)?;
    let project = &auth.principal.project;
    let org = org_state(&state, project.project.id, &org_id).await?;
    Ok(ApiJson(org.subscription_view(
        &project.catalog,
        state.billing.grace(),
        state.clock.now(),
    )))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanChangeRequest {
    /// The plan's key.
    plan: String,
    /// Default: an upgrade (a pricier plan) applies at once and carries
    /// usage; a downgrade waits for the end of the billing period.
    #[serde(default)]
    timing: Option<Timing>,
}

fn subscription_reply(reply: Reply) -> Result<ApiJson<SubscriptionView>, ApiError> {
    match reply {
        Reply::Subscription(view) => Ok(ApiJson(view)),
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

/// Moves the org to a plan (for projects that do not bill through Stripe).
/// Asking for the current plan withdraws a pending downgrade or
/// cancellation.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/subscription", tag = "billing",
    security(("api_key" = [])),
    params(("org_id" = String, Path, description = "The product's id of the org")),
    request_body = PlanChangeRequest,
    responses(
        (status = 200, description = "The subscription after the change", body = SubscriptionView),
        (status = 400, description = "Invalid request", body = ErrorEnvelope),
        (status = 404, description = "`unknown_plan`", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn change_subscription(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(org_id): Path<String>,
    ApiJson(request): ApiJson<PlanChangeRequest>,
) -> Result<ApiJson<SubscriptionView>, ApiError> {
    valid_org_id(&org_id)?;
    let command = OrgCommand::ChangePlan {
        plan: request.plan,
        timing: request.timing,
    };
    subscription_reply(execute(&state, &auth.principal, &org_id, command, None).await?)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CancelQuery {
    /// `period_end` (default: access continues until the billing period
    /// ends, then the default plan) or `immediate`.
    timing: Option<Timing>,
}

/// Cancels: back to the default plan at period end (or at once).
#[utoipa::path(delete, path = "/v1/orgs/{org_id}/subscription", tag = "billing",
    security(("api_key" = [])),
    params(("org_id" = String, Path, description = "The product's id of the org"), CancelQuery),
    responses(
        (status = 200, description = "The subscription after the cancellation", body = SubscriptionView),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn cancel_subscription(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(org_id): Path<String>,
    ApiQuery(query): ApiQuery<CancelQuery>,
) -> Result<ApiJson<SubscriptionView>, ApiError> {
    valid_org_id(&org_id)?;
    let command = OrgCommand::Cancel {
        timing: query.timing.unwrap_or(Timing::PeriodEnd),
    };
    subscription_reply(execute(&state, &auth.principal, &org_id, command, None).await?)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    status: SubscriptionStatus,
}

/// Records the payment state (for billing systems other than Stripe):
/// `past_due` keeps the plan for the grace period, `unpaid` and
/// `incomplete` fall back to the default plan, `active` restores it.
#[utoipa::path(put, path = "/v1/orgs/{org_id}/subscription/status", tag = "billing",
    security(("api_key" = [])),
    params(("org_id" = String, Path, description = "The product's id of the org")),
    request_body = StatusRequest,
    responses(
        (status = 200, description = "The subscription after the change", body = SubscriptionView),
        (status = 409, description = "`no_subscription`: the org is on the default plan", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn set_status(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(org_id): Path<String>,
    ApiJson(request): ApiJson<StatusRequest>,
) -> Result<ApiJson<SubscriptionView>, ApiError> {
    valid_org_id(&org_id)?;
    let command = OrgCommand::SetStatus {
        status: request.status,
    };
    subscription_reply(execute(&state, &auth.principal, &org_id, command, None).await?)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    feature: String,
    amount: i64,
    /// When the units lapse (absent: never).
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    reason: Option<String>,
    /// A retry with the same key adds nothing (e.g. the top-up purchase id).
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GrantList {
    grants: Vec<UsageGrant>,
}

/// Adds one-off units of a metered feature (a purchased top-up, a credit),
/// used after the plan's allowance, earliest-expiring first.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/grants", tag = "billing",
    security(("api_key" = [])),
    params(("org_id" = String, Path, description = "The product's id of the org")),
    request_body = GrantRequest,
    responses(
        (status = 201, description = "The grant", body = UsageGrant),
        (status = 400, description = "Invalid request (`invalid_amount`, `invalid_expiry`, `feature_not_metered`)", body = ErrorEnvelope),
        (status = 404, description = "`unknown_feature`", body = ErrorEnvelope),
        (status = 409, description = "`idempotency_key_reused` for a different request", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn add_grant(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(org_id): Path<String>,
    ApiJson(request): ApiJson<GrantRequest>,
) -> Result<(StatusCode, ApiJson<UsageGrant>), ApiError> {
    valid_org_id(&org_id)?;
    valid_amount(request.amount)?;
    if let Some(key) = &request.idempotency_key {
        valid_idempotency_key(key)?;
    }
    // A retry must name the same grant, so its id derives from the key.
    let id = match &request.idempotency_key {
        Some(key) => Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("{}/{org_id}/{key}", auth.principal.project_id().0).as_bytes(),
        ),
        None => Uuid::now_v7(),
    };
    let command = OrgCommand::AddGrant {
        id,
        feature: request.feature,
        amount: request.amount,
        expires_at: request.expires_at,
        reason: request.reason,
    };
    match execute(
        &state,
        &auth.principal,
        &org_id,
        command,
        request.idempotency_key,
    )
    .await?
    {
        Reply::Grant(grant) => Ok((StatusCode::CREATED, ApiJson(grant))),
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

/// The org's grants, expired and used-up ones included.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/grants", tag = "billing",
    security(("api_key" = [])),
    params(("org_id" = String, Path, description = "The product's id of the org")),
    responses(
        (status = 200, description = "The grants", body = GrantList),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn list_grants(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(org_id): Path<String>,
) -> Result<ApiJson<GrantList>, ApiError> {
    valid_org_id(&org_id)?;
    let org = org_state(&state, auth.principal.project_id(), &org_id).await?;
    Ok(ApiJson(GrantList {
        grants: org.grants.clone(),
    }))
}

/// Replaces the plan's entry for one feature, for this org only (a custom
/// deal, a beta): the same shape as a plan's feature entry.
#[utoipa::path(put, path = "/v1/orgs/{org_id}/overrides/{feature}", tag = "billing",
    security(("api_key" = [])),
    params(
        ("org_id" = String, Path, description = "The product's id of the org"),
        ("feature" = String, Path, description = "Feature key"),
    ),
    request_body = PlanFeature,
    responses(
        (status = 204, description = "Set"),
        (status = 400, description = "`invalid_override`: wrong shape for the feature's kind", body = ErrorEnvelope),
        (status = 404, description = "`unknown_feature`", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn put_override(
    State(state): State<AppState>,
    auth: SecretKey,
    Path((org_id, feature)): Path<(String, String)>,
    ApiJson(entry): ApiJson<PlanFeature>,
) -> Result<StatusCode, ApiError> {
    valid_org_id(&org_id)?;
    let command = OrgCommand::SetOverride {
        feature,
        entry: Some(entry),
    };
    execute(&state, &auth.principal, &org_id, command, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes the org's override: the plan's entry applies again.
#[utoipa::path(delete, path = "/v1/orgs/{org_id}/overrides/{feature}", tag = "billing",
    security(("api_key" = [])),
    params(
        ("org_id" = String, Path, description = "The product's id of the org"),
        ("feature" = String, Path, description = "Feature key"),
    ),
    responses(
        (status = 204, description = "Removed (or there was none)"),
        (status = 404, description = "`unknown_feature`", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn delete_override(
    State(state): State<AppState>,
    auth: SecretKey,
    Path((org_id, feature)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    valid_org_id(&org_id)?;
    let command = OrgCommand::SetOverride {
        feature,
        entry: None,
    };
    execute(&state, &auth.principal, &org_id, command, None).await?;
    Ok(StatusCode::NO_CONTENT)
}
