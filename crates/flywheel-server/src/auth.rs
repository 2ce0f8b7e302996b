//! Request authentication: an extractor that reads the key, authorises it
//! against the current snapshot and the route's scope, and yields the
//! [`Principal`]. Handlers state their scope in their signature:
//! `AnyKey` (publishable or secret) or `SecretKey`.

use std::marker::PhantomData;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::StatusCode;
use flywheel_domain::keys::Scope;
use flywheel_domain::snapshot::Principal;

use crate::error::ApiError;
use crate::state::AppState;

pub trait RequiredScope: Send + Sync {
    const SCOPE: Scope;
}

#[derive(Debug)]
pub struct PublicScope;
impl RequiredScope for PublicScope {
    const SCOPE: Scope = Scope::Public;
}

#[derive(Debug)]
pub struct SecretScope;
impl RequiredScope for SecretScope {
    const SCOPE: Scope = Scope::Secret;
}

/// An authenticated caller whose key has scope `S`.
#[derive(Debug)]
pub struct Authenticated<S> {
    pub principal: Principal,
    _scope: PhantomData<S>,
}

/// Publishable or secret key.
pub type AnyKey = Authenticated<PublicScope>;
/// Secret key only.
pub type SecretKey = Authenticated<SecretScope>;

impl<S: RequiredScope> FromRequestParts<AppState> for Authenticated<S> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let presented = bearer_token(parts)?;
        let principal = state.snapshot.load().authorize(presented, S::SCOPE)?;
        Ok(Self {
            principal,
            _scope: PhantomData,
        })
    }
}

/// The caller of an event stream: the key in the headers, or else (for a
/// browser's `EventSource`, which cannot set headers) a publishable-scope
/// key in the `key` query parameter. Headers win.
pub async fn stream_principal(
    state: &AppState,
    query_key: Option<&str>,
    parts: &mut Parts,
) -> Result<Principal, ApiError> {
    let has_header =
        parts.headers.contains_key(AUTHORIZATION) || parts.headers.contains_key("x-api-key");
    match (query_key, has_header) {
        (Some(key), false) => Ok(state.snapshot.load().authorize(Some(key), Scope::Public)?),
        _ => Ok(AnyKey::from_request_parts(parts, state).await?.principal),
    }
}

/// The key from `Authorization: Bearer <key>`, or else from `X-API-Key`
/// (OFREP's second scheme), if either header is there.
fn bearer_token(parts: &Parts) -> Result<Option<&str>, ApiError> {
    let Some(header) = parts.headers.get(AUTHORIZATION) else {
        return match parts.headers.get("x-api-key") {
            None => Ok(None),
            Some(value) => value.to_str().map(|key| Some(key.trim())).map_err(|_| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_api_key_header",
                    "the X-API-Key header must be visible ASCII",
                )
            }),
        };
    };
    let invalid = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_authorization_header",
            "the Authorization header must be `Bearer <key>`",
        )
    };
    let value = header.to_str().map_err(|_| invalid())?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(invalid)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(invalid());
    }
    Ok(Some(token.trim()))
}
