//! A small client for the Stripe API calls Flywheel makes: create a customer,
//! a Checkout Session and a billing-portal session. Form-encoded, bearer
//! authentication, a timeout; Stripe's own error message is passed on.
//! `check` never comes here: only the self-serve upgrade flow does.

use std::time::Duration;

use axum::http::StatusCode;
use serde::Deserialize;

use crate::error::ApiError;
use crate::settings::StripeSettings;

#[derive(Debug, Clone)]
pub struct StripeClient {
    http: reqwest::Client,
    base: String,
    key: String,
}

#[derive(Debug, Deserialize)]
struct Created {
    id: String,
    #[serde(default)]
    url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct StripeErrorBody {
    error: StripeErrorDetail,
}

#[derive(Debug, Deserialize)]
struct StripeErrorDetail {
    #[serde(default)]
    message: Option<String>,
}

/// A session to send the user to.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub url: String,
}

impl StripeClient {
    /// `None` when no API key is configured.
    pub fn from_settings(settings: &StripeSettings) -> Option<Self> {
        let key = settings.api_key.clone().filter(|key| !key.is_empty())?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .user_agent(concat!("flywheel/", env!("CARGO_PKG_VERSION")))
            .build()
            .ok()?;
        Some(Self {
            http,
            base: settings.api_base.trim_end_matches('/').to_string(),
            key,
        })
    }

    async fn post(
        &self,
        path: &str,
        form: &[(String, String)],
        idempotency_key: Option<&str>,
    ) -> Result<Created, ApiError> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string(form).map_err(ApiError::internal)?);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let unreachable = |error: reqwest::Error| {
            tracing::warn!(%error, path, "Stripe API call failed");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "stripe_unreachable",
                "Stripe could not be reached; retry later",
            )
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let body = response.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let message = serde_json::from_slice::<StripeErrorBody>(&body)
                .ok()
                .and_then(|body| body.error.message)
                .unwrap_or_else(|| format!("HTTP {status}"));
            tracing::warn!(%status, path, message, "Stripe refused an API call");
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "stripe_error",
                format!("Stripe answered {status}: {message}"),
            ));
        }
        serde_json::from_slice(&body).map_err(|error| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "stripe_error",
                format!("Stripe's answer was not understood: {error}"),
            )
        })
    }

    /// A customer for the org, tagged `metadata[org_id]` so every later
    /// event finds the org.
    pub async fn create_customer(&self, org_id: &str) -> Result<String, ApiError> {
        let form = vec![("metadata[org_id]".to_string(), org_id.to_string())];
        // One customer per org even if the caller retries.
        let created = self
            .post(
                "/v1/customers",
                &form,
                Some(&format!("flywheel-customer-{org_id}")),
            )
            .await?;
        Ok(created.id)
    }

    pub async fn create_checkout_session(
        &self,
        org_id: &str,
        customer: &str,
        price_id: &str,
        success_url: &str,
        cancel_url: &str,
    ) -> Result<Session, ApiError> {
        let form = vec![
            ("mode".to_string(), "subscription".to_string()),
            ("customer".to_string(), customer.to_string()),
            ("client_reference_id".to_string(), org_id.to_string()),
            ("line_items[0][price]".to_string(), price_id.to_string()),
            ("line_items[0][quantity]".to_string(), "1".to_string()),
            ("success_url".to_string(), success_url.to_string()),
            ("cancel_url".to_string(), cancel_url.to_string()),
            ("metadata[org_id]".to_string(), org_id.to_string()),
            (
                "subscription_data[metadata][org_id]".to_string(),
                org_id.to_string(),
            ),
        ];
        let created = self.post("/v1/checkout/sessions", &form, None).await?;
        session(created)
    }

    pub async fn create_portal_session(
        &self,
        customer: &str,
        return_url: &str,
    ) -> Result<Session, ApiError> {
        let form = vec![
            ("customer".to_string(), customer.to_string()),
            ("return_url".to_string(), return_url.to_string()),
        ];
        let created = self
            .post("/v1/billing_portal/sessions", &form, None)
            .await?;
        session(created)
    }
}

fn session(created: Created) -> Result<Session, ApiError> {
    let url = created.url.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "stripe_error",
            "Stripe's session has no url",
        )
    })?;
    Ok(Session {
        id: created.id,
        url,
    })
}
