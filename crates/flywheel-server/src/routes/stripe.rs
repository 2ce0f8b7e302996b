//! `POST /v1/webhooks/stripe`: Stripe events, verified, deduplicated on the
//! event id in the transaction that applies them, and applied in `created`
//! order (an older event never overwrites newer subscription state).
//!
//! Outcomes (always 2xx once the signature checks, so Stripe stops retrying):
//! `applied`, `duplicate` (this event id was applied before), `stale` (older
//! than what was applied), `ignored` (a type Flywheel does not use),
//! `unmatched` (no org: no `metadata.org_id` and an unknown customer).
//! A bad signature is a 400 and changes nothing.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use chrono::Duration;
use flywheel_domain::billing::org::{OrgCommand, StripeChange, StripeSync};
use flywheel_domain::billing::stripe::{
    interpret, parse_event, plan_for_prices, verify_signature, StripeFact,
};
use flywheel_domain::billing::Reply;
use flywheel_domain::snapshot::ProjectConfig;
use flywheel_store::{Billing, OrgRequest, OrgResult};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiJson, ErrorEnvelope};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/webhooks/stripe", post(webhook))
        .route("/v1/orgs/{org_id}/checkout", post(checkout))
        .route("/v1/orgs/{org_id}/billing-portal", post(billing_portal))
}

/// What became of an event.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAck {
    received: bool,
    /// `applied`, `duplicate`, `stale`, `ignored` or `unmatched`.
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    org_id: Option<String>,
}

fn ack(outcome: &'static str, org_id: Option<String>) -> ApiJson<WebhookAck> {
    ApiJson(WebhookAck {
        received: true,
        outcome,
        org_id,
    })
}

/// Receives a Stripe event. Verifies `Stripe-Signature` (HMAC-SHA256 of
/// `{t}.{body}` with any configured secret, any `v1` matching, within the
/// tolerance), then applies `checkout.session.completed`,
/// `customer.subscription.created|updated|deleted`, `invoice.paid` and
/// `invoice.payment_failed` to the org (from `metadata.org_id`, the
/// checkout's `client_reference_id`, or the linked customer).
#[utoipa::path(post, path = "/v1/webhooks/stripe", tag = "billing",
    request_body(content = Object, description = "A Stripe event, as Stripe signs it"),
    responses(
        (status = 200, description = "Received; the outcome says what it did", body = WebhookAck),
        (status = 400, description = "`missing_signature`, `invalid_signature` (the message names why) or `invalid_stripe_event`", body = ErrorEnvelope),
        (status = 404, description = "`stripe_not_configured`: no webhook secret is set", body = ErrorEnvelope),
    ))]
pub async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<ApiJson<WebhookAck>, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is too large",
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                rejection.body_text(),
            )
        }
    })?;
    let settings = &state.stripe;
    if settings.webhook_secrets.is_empty() {
        return Err(ApiError::not_found(
            "stripe_not_configured",
            "no Stripe webhook secret is configured (stripe.webhook_secrets)",
        ));
    }
    let header = headers
        .get("stripe-signature")
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing_signature",
                "the Stripe-Signature header is missing",
            )
        })?;
    let secrets: Vec<&str> = settings
        .webhook_secrets
        .iter()
        .map(String::as_str)
        .collect();
    let tolerance = Duration::seconds(i64::from(settings.tolerance_secs));
    verify_signature(header, &body, &secrets, state.clock.now(), tolerance).map_err(|error| {
        metrics::counter!("flywheel_stripe_webhooks_total", "outcome" => "bad_signature")
            .increment(1);
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_signature",
            format!("{} ({error})", error.code()),
        )
    })?;
    let event = parse_event(&body)?;
    let project = stripe_project(&state)?;
    let (org_hint, customer, subscription, change) = match interpret(&event) {
        StripeFact::Ignored => return Ok(counted(ack("ignored", None))),
        StripeFact::Subscription(fact) => {
            let plan =
                plan_for_prices(&project.catalog, &fact.price_ids).map(|plan| plan.key.clone());
            if plan.is_none() && !fact.deleted {
                tracing::warn!(event = %event.id, prices = ?fact.price_ids, "no plan maps to the subscription's prices; keeping the org's plan");
            }
            let change = StripeChange::Subscription {
                plan,
                status: fact.status,
                current_period_start: fact.current_period_start,
                current_period_end: fact.current_period_end,
                cancel_at_period_end: fact.cancel_at_period_end,
                cancel_at: fact.cancel_at,
                trial_end: fact.trial_end,
                deleted: fact.deleted,
            };
            (
                fact.org_id,
                fact.customer_id,
                Some(fact.subscription_id),
                change,
            )
        }
        StripeFact::CheckoutCompleted {
            org_id,
            customer_id,
            subscription_id,
        } => (org_id, customer_id, subscription_id, StripeChange::Linked),
        StripeFact::InvoicePaid {
            customer_id,
            subscription_id,
        } => (
            None,
            customer_id,
            subscription_id,
            StripeChange::InvoicePaid,
        ),
        StripeFact::PaymentFailed {
            customer_id,
            subscription_id,
        } => (
            None,
            customer_id,
            subscription_id,
            StripeChange::PaymentFailed,
        ),
    };
    let org_id = match (org_hint, &customer) {
        (Some(org), _) => Some(org),
        (None, Some(customer)) => {
            state
                .store
                .org_for_stripe_customer(project.project.id, customer)
                .await?
        }
        (None, None) => None,
    };
    let Some(org_id) = org_id else {
        tracing::warn!(event = %event.id, kind = %event.kind, "a Stripe event names no known org; set metadata.org_id or start checkout through Flywheel");
        return Ok(counted(ack("unmatched", None)));
    };
    let request = OrgRequest {
        project: project.project.id,
        org_id: org_id.clone(),
        command: OrgCommand::StripeSync(StripeSync {
            event_created: event.created,
            customer_id: customer,
            subscription_id: subscription,
            change,
        }),
        // The dedupe on the event id happens in the applying transaction.
        idempotency_key: Some(format!("stripe:{}", event.id)),
        billing: Billing::for_project(&project, state.billing.grace()),
        now: state.clock.now(),
        actor_user_id: None,
    };
    let outcome = match state.org_writer.execute(request).await? {
        OrgResult::Applied(Reply::Stale) => "stale",
        OrgResult::Applied(_) => "applied",
        // Same id, same or different content: the first copy stands.
        OrgResult::Replayed(_) | OrgResult::KeyReused => "duplicate",
        OrgResult::Rejected(error) => return Err(error.into()),
    };
    Ok(counted(ack(outcome, Some(org_id))))
}

fn counted(ack: ApiJson<WebhookAck>) -> ApiJson<WebhookAck> {
    metrics::counter!("flywheel_stripe_webhooks_total", "outcome" => ack.outcome).increment(1);
    ack
}

fn stripe_project(state: &AppState) -> Result<std::sync::Arc<ProjectConfig>, ApiError> {
    let snapshot = state.snapshot.load();
    let found = snapshot
        .project_ids()
        .filter_map(|id| snapshot.project(id))
        .find(|config| config.project.name == state.stripe.project)
        .cloned();
    found.ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stripe_project_not_found",
            format!(
                "stripe.project names `{}`, which does not exist",
                state.stripe.project
            ),
        )
    })
}

#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    /// The plan to buy (its first `stripe_price_ids` entry is charged).
    plan: String,
    success_url: String,
    cancel_url: String,
}

#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortalRequest {
    return_url: String,
}

/// Where to send the user.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    id: String,
    url: String,
}

fn absolute_url(field: &str, url: &str) -> Result<(), ApiError> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.len() <= 2048
        && !url.chars().any(char::is_whitespace);
    if !ok {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_url",
            format!("`{field}` must be an absolute http(s) URL"),
        ));
    }
    Ok(())
}

fn stripe_client(state: &AppState) -> Result<&crate::stripe_api::StripeClient, ApiError> {
    state.stripe_client.as_ref().ok_or_else(|| {
        ApiError::not_found(
            "stripe_not_configured",
            "no Stripe API key is configured (stripe.api_key)",
        )
    })
}

/// The org's Stripe customer: the linked one, else a new one (tagged with
/// the org id), linked before anything else happens.
async fn stripe_customer(
    state: &AppState,
    principal: &flywheel_domain::snapshot::Principal,
    org_id: &str,
) -> Result<String, ApiError> {
    let project = principal.project_id();
    let org = state
        .snapshot
        .orgs
        .load(state.store.as_ref(), project, org_id, state.clock.now())
        .await?;
    if let Some(customer) = &org.stripe_customer_id {
        return Ok(customer.clone());
    }
    let customer = stripe_client(state)?.create_customer(org_id).await?;
    let link = OrgCommand::LinkStripeCustomer {
        customer_id: customer.clone(),
    };
    crate::routes::billing::execute(state, principal, org_id, link, None).await?;
    Ok(customer)
}

/// Self-serve upgrade: creates a Stripe Checkout Session for the plan and
/// returns its URL. The org's Stripe customer is created (and linked) first
/// if it has none; the session carries the org id (`client_reference_id`,
/// subscription metadata), so the webhooks that follow find the org.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/checkout", tag = "billing",
    security(("api_key" = [])),
    params(("org_id" = String, Path, description = "The product's id of the org")),
    request_body = CheckoutRequest,
    responses(
        (status = 200, description = "The Checkout Session", body = SessionView),
        (status = 400, description = "`invalid_url`, `plan_not_purchasable` (no Stripe price)", body = ErrorEnvelope),
        (status = 404, description = "`unknown_plan`, `stripe_not_configured`", body = ErrorEnvelope),
        (status = 502, description = "`stripe_error` (Stripe's message) or `stripe_unreachable`", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn checkout(
    State(state): State<AppState>,
    auth: crate::auth::SecretKey,
    axum::extract::Path(org_id): axum::extract::Path<String>,
    crate::error::ApiJson(request): crate::error::ApiJson<CheckoutRequest>,
) -> Result<ApiJson<SessionView>, ApiError> {
    crate::routes::billing::valid_org_id(&org_id)?;
    absolute_url("success_url", &request.success_url)?;
    absolute_url("cancel_url", &request.cancel_url)?;
    let client = stripe_client(&state)?;
    let catalog = &auth.principal.project.catalog;
    let plan = catalog.plan(&request.plan).ok_or_else(|| {
        ApiError::not_found(
            "unknown_plan",
            format!("no plan `{}` in the catalog", request.plan),
        )
    })?;
    let price = plan.stripe_price_ids.first().ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "plan_not_purchasable",
            format!("plan `{}` has no `stripe_price_ids`", plan.key),
        )
    })?;
    let customer = stripe_customer(&state, &auth.principal, &org_id).await?;
    let session = client
        .create_checkout_session(
            &org_id,
            &customer,
            price,
            &request.success_url,
            &request.cancel_url,
        )
        .await?;
    Ok(ApiJson(SessionView {
        id: session.id,
        url: session.url,
    }))
}

/// A Stripe billing-portal session for the org's customer (update the card,
/// see invoices, cancel), returning its URL.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/billing-portal", tag = "billing",
    security(("api_key" = [])),
    params(("org_id" = String, Path, description = "The product's id of the org")),
    request_body = PortalRequest,
    responses(
        (status = 200, description = "The portal session", body = SessionView),
        (status = 400, description = "`invalid_url`", body = ErrorEnvelope),
        (status = 404, description = "`stripe_not_configured`", body = ErrorEnvelope),
        (status = 409, description = "`no_stripe_customer`: the org has never been through Checkout", body = ErrorEnvelope),
        (status = 502, description = "`stripe_error` (Stripe's message) or `stripe_unreachable`", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn billing_portal(
    State(state): State<AppState>,
    auth: crate::auth::SecretKey,
    axum::extract::Path(org_id): axum::extract::Path<String>,
    crate::error::ApiJson(request): crate::error::ApiJson<PortalRequest>,
) -> Result<ApiJson<SessionView>, ApiError> {
    crate::routes::billing::valid_org_id(&org_id)?;
    absolute_url("return_url", &request.return_url)?;
    let client = stripe_client(&state)?;
    let org = state
        .snapshot
        .orgs
        .load(
            state.store.as_ref(),
            auth.principal.project_id(),
            &org_id,
            state.clock.now(),
        )
        .await?;
    let customer = org.stripe_customer_id.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_stripe_customer",
            "the org has no Stripe customer yet: start with Checkout",
        )
    })?;
    let session = client
        .create_portal_session(&customer, &request.return_url)
        .await?;
    Ok(ApiJson(SessionView {
        id: session.id,
        url: session.url,
    }))
}
