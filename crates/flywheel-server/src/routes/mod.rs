//! HTTP routers, one per area, composed in [`router`]. Handlers are thin:
//! parse, call one service function, map the result.

use axum::http::{Method, StatusCode, Uri};
use axum::Router;

use crate::error::ApiError;
use crate::state::AppState;

pub mod activation;
pub mod billing;
pub mod events;
pub mod flags;
pub mod growth;
pub mod health;
pub mod keys;
pub mod ofrep;
pub mod privacy;
pub mod project;
pub mod prompts;
pub mod stripe;
pub mod webhooks;

/// Every route of the API.
pub fn router() -> Router<AppState> {
    Router::new()
        .merge(health::router())
        .merge(project::router())
        .merge(keys::router())
        .merge(events::router())
        .merge(privacy::router())
        .merge(flags::router())
        .merge(ofrep::router())
        .merge(billing::router())
        .merge(stripe::router())
        .merge(growth::router())
        .merge(webhooks::router())
        .merge(activation::router())
        .merge(prompts::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

/// The `limit` query parameter: default 100, 1 to 1000, anything else a 400.
pub(crate) fn page_limit(requested: Option<u32>) -> Result<u32, ApiError> {
    match requested {
        None => Ok(100),
        Some(limit @ 1..=1000) => Ok(limit),
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("limit must be between 1 and 1000, not {other}"),
        )),
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
