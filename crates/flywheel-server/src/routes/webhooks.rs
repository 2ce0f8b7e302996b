//! Outbound webhook endpoints and their deliveries (secret key). Messages
//! are signed with the Standard Webhooks scheme; see `outbound.rs`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::Router;
use flywheel_domain::growth::webhook_signature::WebhookSecret;
use flywheel_store::growth::{DeliveryQuery, DeliveryRecord, WebhookEndpoint};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::SecretKey;
use crate::error::{ApiError, ApiJson, ApiQuery, ErrorEnvelope};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/webhook-endpoints",
            get(list_endpoints).post(create_endpoint),
        )
        .route("/v1/webhook-endpoints/{id}", delete(delete_endpoint))
        .route("/v1/webhook-endpoints/{id}/enable", post(enable_endpoint))
        .route("/v1/webhook-endpoints/{id}/disable", post(disable_endpoint))
        .route("/v1/webhook-deliveries", get(list_deliveries))
        .route("/v1/webhook-deliveries/{id}/replay", post(replay_delivery))
}

/// Every event type Flywheel sends.
pub const EVENT_TYPES: &[&str] = &[
    "user.signed_up",
    "org.provisioned",
    "membership.created",
    "invitation.created",
    "invitation.resent",
    "invitation.accepted",
    "invitation.declined",
    "invitation.revoked",
    "invite_link.created",
    "share_link.created",
    "membership.removed",
    "subscription.changed",
    "usage.warning",
    "usage.limit_reached",
    "milestone.reached",
    "prompt.created",
    "prompt.converted",
];

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEndpointBody {
    /// `http://` or `https://`.
    url: String,
    /// The event types to send; empty or absent: all.
    #[serde(default)]
    event_types: Vec<String>,
    #[serde(default)]
    description: Option<String>,
}

fn not_found() -> ApiError {
    ApiError::not_found("webhook_endpoint_not_found", "no such webhook endpoint")
}

/// Adds an endpoint. The reply holds its signing secret (`whsec_…`) for
/// verifying `webhook-signature` with any Standard Webhooks library.
#[utoipa::path(post, path = "/v1/webhook-endpoints", tag = "webhooks",
    security(("api_key" = [])),
    request_body = CreateEndpointBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 201, description = "Created", body = WebhookEndpoint),
        (status = 400, description = "Invalid URL or unknown event type", body = ErrorEnvelope),
    ))]
pub async fn create_endpoint(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(body): ApiJson<CreateEndpointBody>,
) -> Result<(StatusCode, ApiJson<WebhookEndpoint>), ApiError> {
    let url = reqwest::Url::parse(&body.url).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_url",
            format!("url is not a URL: {error}"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() || body.url.len() > 2000 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_url",
            "url must be an http(s) URL with a host, at most 2000 bytes",
        ));
    }
    if let Some(unknown) = body
        .event_types
        .iter()
        .find(|t| !EVENT_TYPES.contains(&t.as_str()))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_event_type",
            format!(
                "unknown event type {unknown}; known: {}",
                EVENT_TYPES.join(", ")
            ),
        ));
    }
    let endpoint = WebhookEndpoint {
        id: format!("ep_{}", uuid::Uuid::now_v7().simple()),
        url: body.url,
        secret: WebhookSecret::generate(&mut rand::thread_rng()).to_wire(),
        event_types: body.event_types,
        description: body.description,
        enabled: true,
        disabled_reason: None,
        failing_since: None,
        created_at: state.clock.now(),
    };
    state
        .store
        .create_webhook_endpoint(auth.principal.project_id(), &endpoint)
        .await?;
    Ok((StatusCode::CREATED, ApiJson(endpoint)))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EndpointList {
    endpoints: Vec<WebhookEndpoint>,
}

/// The project's endpoints; a disabled one says why.
#[utoipa::path(get, path = "/v1/webhook-endpoints", tag = "webhooks",
    security(("api_key" = [])),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),(status = 200, description = "The endpoints", body = EndpointList)))]
pub async fn list_endpoints(
    State(state): State<AppState>,
    auth: SecretKey,
) -> Result<ApiJson<EndpointList>, ApiError> {
    let endpoints = state
        .store
        .list_webhook_endpoints(auth.principal.project_id())
        .await?;
    Ok(ApiJson(EndpointList { endpoints }))
}

/// Removes an endpoint; its undelivered messages are marked failed.
#[utoipa::path(delete, path = "/v1/webhook-endpoints/{id}", tag = "webhooks",
    security(("api_key" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such endpoint", body = ErrorEnvelope),
    ))]
pub async fn delete_endpoint(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state
        .store
        .delete_webhook_endpoint(auth.principal.project_id(), &id)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found())
    }
}

/// Re-enables an endpoint (after it was disabled for failing); its waiting
/// deliveries resume.
#[utoipa::path(post, path = "/v1/webhook-endpoints/{id}/enable", tag = "webhooks",
    security(("api_key" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "Enabled", body = WebhookEndpoint),
        (status = 404, description = "No such endpoint", body = ErrorEnvelope),
    ))]
pub async fn enable_endpoint(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(id): Path<String>,
) -> Result<ApiJson<WebhookEndpoint>, ApiError> {
    let endpoint = state
        .store
        .set_webhook_endpoint_enabled(auth.principal.project_id(), &id, true, None)
        .await?
        .ok_or_else(not_found)?;
    state.outbox_signal.wake();
    Ok(ApiJson(endpoint))
}

/// Pauses an endpoint: its messages wait until it is enabled again.
#[utoipa::path(post, path = "/v1/webhook-endpoints/{id}/disable", tag = "webhooks",
    security(("api_key" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "Disabled", body = WebhookEndpoint),
        (status = 404, description = "No such endpoint", body = ErrorEnvelope),
    ))]
pub async fn disable_endpoint(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(id): Path<String>,
) -> Result<ApiJson<WebhookEndpoint>, ApiError> {
    state
        .store
        .set_webhook_endpoint_enabled(
            auth.principal.project_id(),
            &id,
            false,
            Some("disabled by the API"),
        )
        .await?
        .map(ApiJson)
        .ok_or_else(not_found)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveryParams {
    endpoint_id: Option<String>,
    /// `pending`, `succeeded` or `failed`.
    status: Option<String>,
    message_id: Option<String>,
    limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    deliveries: Vec<DeliveryRecord>,
}

/// Deliveries, newest first, with their attempts and last error.
#[utoipa::path(get, path = "/v1/webhook-deliveries", tag = "webhooks",
    security(("api_key" = [])),
    params(DeliveryParams),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "The deliveries", body = DeliveryList),
        (status = 400, description = "Unknown status or bad limit", body = ErrorEnvelope),
    ))]
pub async fn list_deliveries(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiQuery(params): ApiQuery<DeliveryParams>,
) -> Result<ApiJson<DeliveryList>, ApiError> {
    let limit = crate::routes::page_limit(params.limit)?;
    if let Some(status) = &params.status {
        if !matches!(status.as_str(), "pending" | "succeeded" | "failed") {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "status is one of pending, succeeded, failed",
            ));
        }
    }
    let deliveries = state
        .store
        .list_deliveries(
            auth.principal.project_id(),
            &DeliveryQuery {
                endpoint_id: params.endpoint_id,
                status: params.status,
                message_id: params.message_id,
                limit,
            },
        )
        .await?;
    Ok(ApiJson(DeliveryList { deliveries }))
}

/// Sends a delivery again now (same `webhook-id`), whatever its state.
#[utoipa::path(post, path = "/v1/webhook-deliveries/{id}/replay", tag = "webhooks",
    security(("api_key" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "Scheduled", body = DeliveryRecord),
        (status = 404, description = "No such delivery", body = ErrorEnvelope),
    ))]
pub async fn replay_delivery(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(id): Path<String>,
) -> Result<ApiJson<DeliveryRecord>, ApiError> {
    let record = state
        .store
        .replay_delivery(auth.principal.project_id(), &id, state.clock.now())
        .await?
        .ok_or_else(|| ApiError::not_found("webhook_delivery_not_found", "no such delivery"))?;
    state.outbox_signal.wake();
    Ok(ApiJson(record))
}
