//! The one error envelope every 4xx/5xx uses:
//! `{"error":{"code":"snake_case_code","message":"…"}}`.
//!
//! Kinds map to statuses in exactly one place ([`status_for`]). A 5xx logs
//! the whole cause chain and answers a generic message: database or internal
//! error text never reaches a client.

use std::borrow::Cow;

use axum::body::Bytes;
use axum::extract::FromRequest;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flywheel_domain::{DomainError, ErrorKind};
use flywheel_store::StoreError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

/// The JSON body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable, snake_case. Match on this, not on `message`.
    #[schema(example = "invalid_api_key")]
    pub code: Cow<'static, str>,
    /// Human-readable explanation; may change between versions.
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Cow<'static, str>,
    pub message: String,
    /// Present for 5xx only: logged, never sent.
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

pub fn status_for(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            source: None,
            retry_after: None,
        }
    }

    /// A 400 listing every problem a document validation found (each
    /// message names its JSON path).
    pub fn invalid_document(code: &'static str, problems: &[flywheel_domain::DomainError]) -> Self {
        let message = problems
            .iter()
            .map(|problem| problem.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn internal(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal".into(),
            message: "an internal error occurred; it has been logged".into(),
            source: Some(source.into()),
            retry_after: None,
        }
    }

    fn unavailable(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "store_unavailable".into(),
            message: "the store is unavailable; retry later".into(),
            source: Some(source.into()),
            retry_after: None,
        }
    }
}

impl From<DomainError> for ApiError {
    fn from(error: DomainError) -> Self {
        if error.kind == ErrorKind::Internal {
            return ApiError::internal(error);
        }
        ApiError::new(status_for(error.kind), error.code, error.message)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => ApiError::not_found("not_found", "not found"),
            StoreError::Conflict(what) => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{what} already exists"),
            ),
            StoreError::Unavailable(_) => ApiError::unavailable(error),
            StoreError::Internal(_) => ApiError::internal(error),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Some(source) = &self.source {
            let mut chain = source.to_string();
            let mut cause = source.source();
            while let Some(next) = cause {
                chain.push_str(": ");
                chain.push_str(&next.to_string());
                cause = next.source();
            }
            tracing::error!(status = self.status.as_u16(), code = %self.code, error = %chain, "request failed");
        }
        let body = ErrorEnvelope {
            error: ErrorBody {
                code: self.code,
                message: self.message,
            },
        };
        let retry_after = self.retry_after;
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// The query-string extractor: a malformed or mistyped parameter is a
/// `400 invalid_query` in the error envelope (axum's own `Query` answers
/// plain text), naming the parameter.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| ApiQuery(value))
            .map_err(|rejection| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    rejection.body_text(),
                )
            })
    }
}

/// A JSON request body whose rejections use the error envelope and name the
/// field at fault: `415 unsupported_media_type` without a JSON content type,
/// `413 payload_too_large` over the body limit, `400 invalid_json` when the
/// bytes are not JSON, `400 invalid_body` when the JSON has the wrong shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        if !has_json_content_type(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with `Content-Type: application/json`",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
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
        // The common case first: straight into `T`, one pass.
        if let Ok(value) = serde_json::from_slice::<T>(&bytes) {
            return Ok(ApiJson(value));
        }
        // On failure, parse to a tree, so syntax errors and shape errors are
        // told apart reliably, and shape errors name the field (`label: …`).
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not valid JSON: {e}"),
            )
        })?;
        serde_path_to_error::deserialize(value)
            .map(ApiJson)
            .map_err(|e| {
                let path = e.path().to_string();
                let message = if path == "." {
                    e.inner().to_string()
                } else {
                    format!("{path}: {}", e.inner())
                };
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", message)
            })
    }
}

fn has_json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    // Compared as bytes, without lowercasing a copy: this runs on every
    // JSON request.
    let essence = value.split(';').next().unwrap_or("").trim().as_bytes();
    let Some(subtype) = essence
        .get(..12)
        .filter(|kind| kind.eq_ignore_ascii_case(b"application/"))
        .and(essence.get(12..))
    else {
        return false;
    };
    subtype.eq_ignore_ascii_case(b"json")
        || subtype
            .len()
            .checked_sub(5)
            .is_some_and(|at| subtype[at..].eq_ignore_ascii_case(b"+json"))
}

impl<T> std::ops::Deref for ApiJson<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// The bytes a JSON answer usually needs: a `check` answer is ~300.
const JSON_BODY_CAPACITY: usize = 512;

/// A JSON response body, serialised straight into one buffer sized for the
/// usual answer (axum's `Json` starts at 128 bytes and grows through a
/// `BytesMut` writer: visible on the `check` path). A value that cannot be
/// serialised is a 500 `internal` envelope, as with axum's `Json`.
impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(JSON_BODY_CAPACITY);
        if let Err(e) = serde_json::to_writer(&mut body, &self.0) {
            return ApiError::internal(e).into_response();
        }
        let mut response = Response::new(axum::body::Body::from(body));
        response.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        );
        response
    }
}

impl From<crate::projects::ProjectError> for ApiError {
    fn from(error: crate::projects::ProjectError) -> Self {
        match error {
            crate::projects::ProjectError::Invalid(e) => e.into(),
            crate::projects::ProjectError::Store(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_statuses() {
        assert_eq!(status_for(ErrorKind::Invalid), StatusCode::BAD_REQUEST);
        assert_eq!(
            status_for(ErrorKind::Unauthorized),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(status_for(ErrorKind::Forbidden), StatusCode::FORBIDDEN);
        assert_eq!(status_for(ErrorKind::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(status_for(ErrorKind::Conflict), StatusCode::CONFLICT);
        assert_eq!(
            status_for(ErrorKind::LimitExceeded),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            status_for(ErrorKind::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status_for(ErrorKind::Internal),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[tokio::test]
    async fn internal_errors_never_leak_their_text() {
        let error: ApiError =
            StoreError::Internal("relation \"secret_table\" does not exist".into()).into();
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(!text.contains("secret_table"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["error"]["code"], "internal");
    }

    #[tokio::test]
    async fn domain_errors_keep_code_and_message() {
        let error: ApiError = DomainError::invalid("invalid_project_name", "too long").into();
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "invalid_project_name");
        assert_eq!(json["error"]["message"], "too long");
    }

    fn json_content_type(value: &str) -> bool {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_str(value).unwrap(),
        );
        has_json_content_type(&headers)
    }

    #[test]
    fn json_content_types_are_matched_without_case_and_parameters() {
        for accepted in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ;charset=UTF-8",
            "application/merge-patch+json",
            "application/vnd.api+JSON",
        ] {
            assert!(json_content_type(accepted), "{accepted}");
        }
        for refused in [
            "text/json",
            "application/jsonx",
            "application/x-www-form-urlencoded",
            "application",
            "application/",
            "json",
            "",
            "application/json+xml",
            "multipart/form-data; boundary=+json",
        ] {
            assert!(!json_content_type(refused), "{refused}");
        }
        assert!(!has_json_content_type(&axum::http::HeaderMap::new()));
    }

    #[tokio::test]
    async fn json_answers_carry_their_content_type_and_any_size_of_body() {
        let small = ApiJson(serde_json::json!({"allowed": true})).into_response();
        assert_eq!(small.status(), StatusCode::OK);
        assert_eq!(small.headers()["content-type"], "application/json");
        let body = axum::body::to_bytes(small.into_body(), 1 << 16)
            .await
            .unwrap();
        assert_eq!(&body[..], br#"{"allowed":true}"#);
        // Past the initial capacity the buffer grows; nothing is cut.
        let long = "x".repeat(3 * JSON_BODY_CAPACITY);
        let large = ApiJson(serde_json::json!({ "text": long })).into_response();
        let body = axum::body::to_bytes(large.into_body(), 1 << 16)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json["text"].as_str().map(str::len),
            Some(3 * JSON_BODY_CAPACITY)
        );
    }

    #[tokio::test]
    async fn a_value_json_cannot_encode_is_an_internal_error() {
        // A map with non-string keys cannot be a JSON object.
        let map: std::collections::BTreeMap<(i32, i32), i32> = [((1, 2), 3)].into();
        let response = ApiJson(map).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "internal");
    }
}
