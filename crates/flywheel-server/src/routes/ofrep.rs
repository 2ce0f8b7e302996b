//! OpenFeature Remote Evaluation Protocol (OFREP): single and bulk
//! evaluation of the project's flags, for any OFREP provider. Publishable
//! keys may call it, as `Authorization: Bearer <key>` or `X-API-Key`.
//!
//! A disabled flag answers `DISABLED` with no value, and a flag without a
//! default variant whose targeting picked nothing answers `DEFAULT` with no
//! value: in both cases the caller's code default applies. A kill switch
//! that must serve a known value is an enabled flag serving its "off"
//! variant.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::ETAG;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use flywheel_domain::events::{decode_native, Envelope};
use flywheel_domain::snapshot::Principal;
use flywheel_flags::{EvaluationContext, Resolution, ResolutionErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::AnyKey;
use crate::error::{ApiError, ApiJson, ApiQuery, ErrorEnvelope};
use crate::ingest::ingest;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ofrep/v1/evaluate/flags/{key}", post(evaluate_flag))
        .route("/ofrep/v1/evaluate/flags", post(evaluate_flags))
}

/// One flag's evaluation, as OFREP's `evaluationSuccess`.
// Borrows from the compiled flag: a bulk answer allocates nothing per flag
// but its bytes.
#[derive(Debug, Serialize, ToSchema)]
pub struct OfrepSuccess<'f> {
    #[schema(value_type = String)]
    key: &'f str,
    /// Absent: use the code default (disabled flag, or no default variant).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    value: Option<&'f Value>,
    /// `STATIC`, `TARGETING_MATCH`, `DEFAULT` or `DISABLED`.
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    variant: Option<&'f str>,
    /// Flag-set metadata overlaid with the flag's; scalar values only.
    #[schema(value_type = Object)]
    metadata: ScalarMetadata<'f>,
}

/// OFREP metadata holds booleans, strings and numbers only: the others are
/// left out as the map is written.
#[derive(Debug)]
pub struct ScalarMetadata<'f>(&'f Map<String, Value>);

impl Serialize for ScalarMetadata<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().filter(|(_, value)| is_scalar(value)))
    }
}

fn is_scalar(value: &Value) -> bool {
    matches!(value, Value::Bool(_) | Value::String(_) | Value::Number(_))
}

/// OFREP's `evaluationFailure` (also inline in bulk answers).
#[derive(Debug, Serialize, ToSchema)]
pub struct OfrepFailure {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// `FLAG_NOT_FOUND`, `PARSE_ERROR`, `TARGETING_KEY_MISSING`,
    /// `INVALID_CONTEXT` or `GENERAL`.
    #[serde(rename = "errorCode")]
    error_code: &'static str,
    #[serde(rename = "errorDetails")]
    error_details: String,
}

/// One flag of a bulk answer: OFREP's `evaluationSuccess` or `evaluationFailure`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum OfrepItem<'f> {
    Success(OfrepSuccess<'f>),
    Failure(OfrepFailure),
}

/// OFREP's bulk answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct OfrepBulk<'f> {
    /// Every flag of the project, successes and failures, by key.
    #[schema(value_type = Vec<Object>)]
    flags: Vec<OfrepItem<'f>>,
    /// Where to hear about changes: this server's SSE stream.
    #[serde(rename = "eventStreams")]
    #[schema(value_type = Vec<Object>)]
    event_streams: Vec<Value>,
    #[schema(value_type = Object)]
    metadata: ScalarMetadata<'f>,
}

impl OfrepFailure {
    fn new(key: Option<&str>, code: &'static str, details: impl Into<String>) -> Self {
        Self {
            key: key.map(str::to_owned),
            error_code: code,
            error_details: details.into(),
        }
    }
}

fn failure(
    status: StatusCode,
    key: Option<&str>,
    code: &'static str,
    details: impl Into<String>,
) -> Response {
    (status, ApiJson(OfrepFailure::new(key, code, details))).into_response()
}

/// An evaluation request: the context, and whether to record exposures.
struct EvaluationRequest {
    context: EvaluationContext,
    track_exposure: bool,
}

/// Reads `{"context": {...}, "track_exposure"?: bool}` leniently, as real
/// providers send it: a missing body or `context` is an empty context.
fn parse_request(
    body: &Bytes,
    query: &ExposureQuery,
) -> Result<EvaluationRequest, (&'static str, String)> {
    let tracked_by_query = query.track_exposure;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(EvaluationRequest {
            context: Map::new(),
            track_exposure: tracked_by_query.unwrap_or(false),
        });
    }
    let request: Value = serde_json::from_slice(body)
        .map_err(|error| ("PARSE_ERROR", format!("the body is not JSON: {error}")))?;
    let mut track_exposure = tracked_by_query.unwrap_or(false);
    let context = match request {
        Value::Object(mut object) => {
            match object.remove("track_exposure") {
                None | Some(Value::Null) => {}
                Some(Value::Bool(track)) => track_exposure |= track,
                Some(_) => {
                    return Err((
                        "INVALID_CONTEXT",
                        "`track_exposure` must be a boolean".into(),
                    ))
                }
            }
            object
                .remove("context")
                .unwrap_or(Value::Object(Map::new()))
        }
        _ => {
            return Err((
                "INVALID_CONTEXT",
                "the body must be an object with `context`".into(),
            ))
        }
    };
    let Value::Object(context) = context else {
        return Err(("INVALID_CONTEXT", "`context` must be an object".into()));
    };
    if let Some(key) = context.get("targetingKey") {
        if !key.is_string() {
            return Err(("INVALID_CONTEXT", "`targetingKey` must be a string".into()));
        }
    }
    Ok(EvaluationRequest {
        context,
        track_exposure,
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExposureQuery {
    /// Record a `$exposure` event for each served variant (also accepted as
    /// `"track_exposure": true` in the body).
    track_exposure: Option<bool>,
}

/// Fixes exposure event ids: one id per project, user, flag, variant and UTC
/// day, so the ingestion dedupe keeps at most one exposure a day for each.
const EXPOSURE_NAMESPACE: Uuid = Uuid::from_u128(0x6f1e_2c1a_9d4b_4e8a_b1c7_53f0_e2a9_d6b4);

/// Records `$exposure` events (flag, variant, reason) for the served
/// resolutions of one user, through the same durable, exactly-once path as
/// any event. At most once per user, flag and variant per UTC day: the event
/// id is derived from exactly those, and duplicates are dropped by the store.
/// A failure is logged, never turned into an evaluation error.
async fn record_exposures(
    state: &AppState,
    principal: &Principal,
    context: &EvaluationContext,
    served: Vec<(String, String, &'static str)>,
) {
    let Some(user) = context
        .get("targetingKey")
        .and_then(Value::as_str)
        .filter(|user| !user.is_empty())
    else {
        return;
    };
    if served.is_empty() {
        return;
    }
    let now = state.clock.now();
    let day = now.format("%Y-%m-%d");
    let project = principal.project_id();
    let envelope = Envelope {
        received_at: now,
        sent_at: None,
        context: None,
        max_event_bytes: state.ingest.max_event_bytes,
    };
    let decoded = served
        .into_iter()
        .enumerate()
        .map(|(index, (flag, variant, reason))| {
            let id = Uuid::new_v5(
                &EXPOSURE_NAMESPACE,
                format!("{}/{user}/{flag}/{variant}/{day}", project.0).as_bytes(),
            );
            let raw = json!({"type": "track", "event": "$exposure", "event_id": id, "user_id": user,
                             "properties": {"flag": flag, "variant": variant, "reason": reason}});
            let len = raw.to_string().len();
            decode_native(raw, len, index, &envelope)
        })
        .collect();
    if let Err(error) = ingest(&state.committer, &principal.project, decoded).await {
        tracing::warn!(code = %error.code, message = %error.message, "exposure events were not recorded");
    }
}

fn exposure_of(resolution: &Resolution<'_>) -> Option<(String, String, &'static str)> {
    match (&resolution.error, resolution.variant) {
        (None, Some(variant)) => Some((
            resolution.key.to_owned(),
            variant.to_owned(),
            resolution.reason.as_str(),
        )),
        _ => None,
    }
}

/// What both OFREP endpoints do first: the per-key rate limit, then the
/// request body. `key` is the flag of a single evaluation, for error bodies.
fn admit(
    state: &AppState,
    principal: &Principal,
    body: &Bytes,
    query: &ExposureQuery,
    key: Option<&str>,
) -> Result<EvaluationRequest, Box<Response>> {
    if let Some(limited) = rate_limited(state, principal) {
        return Err(Box::new(limited));
    }
    parse_request(body, query)
        .map_err(|(code, details)| Box::new(failure(StatusCode::BAD_REQUEST, key, code, details)))
}

fn rate_limited(state: &AppState, principal: &Principal) -> Option<Response> {
    let retry_after = state
        .evaluation_rate_limiter
        .check(principal.key_id, Instant::now())
        .err()?;
    let mut error = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many evaluation requests for this key",
    );
    error.retry_after = Some(retry_after.as_secs().max(1));
    Some(error.into_response())
}

fn success<'f>(resolution: &Resolution<'f>) -> OfrepSuccess<'f> {
    OfrepSuccess {
        key: resolution.key,
        value: resolution.value,
        reason: resolution.reason.as_str(),
        variant: resolution.variant,
        metadata: ScalarMetadata(resolution.metadata),
    }
}

/// Evaluates one flag for the context (`{"context": {"targetingKey": …, …}}`).
/// When the `targetingKey` is a user Flywheel knows, the context is
/// enriched (`org_id`, `plan`, `entitlements`, `signed_up_at`,
/// `days_since_signup`, `acquisition_source`, `traits`); values the caller
/// sends win. `$flagd.flagKey` and `$flagd.timestamp` are added too.
#[utoipa::path(post, path = "/ofrep/v1/evaluate/flags/{key}", tag = "ofrep",
    security(("api_key" = [])),
    params(("key" = String, Path, description = "Flag key"), ExposureQuery),
    request_body(content = Object, description = "`{\"context\": {\"targetingKey\": …}, \"track_exposure\"?: true}`"),
    responses(
        (status = 200, description = "The evaluation", body = OfrepSuccess),
        (status = 400, description = "PARSE_ERROR, INVALID_CONTEXT, TARGETING_KEY_MISSING or GENERAL", body = OfrepFailure),
        (status = 404, description = "FLAG_NOT_FOUND", body = OfrepFailure),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 429, description = "Over the per-key rate; see Retry-After (seconds)", body = ErrorEnvelope),
    ))]
pub async fn evaluate_flag(
    State(state): State<AppState>,
    auth: AnyKey,
    Path(key): Path<String>,
    ApiQuery(query): ApiQuery<ExposureQuery>,
    body: Bytes,
) -> Response {
    let EvaluationRequest {
        context,
        track_exposure,
    } = match admit(&state, &auth.principal, &body, &query, Some(&key)) {
        Ok(request) => request,
        Err(refused) => return *refused,
    };
    let context = crate::enrichment::enrich(&state, &auth.principal, context).await;
    let flags = &auth.principal.project.flags;
    if flags.needs_targeting_key(&key) && !has_targeting_key(&context) {
        return failure(
            StatusCode::BAD_REQUEST,
            Some(&key),
            "TARGETING_KEY_MISSING",
            format!("flag `{key}` buckets by targetingKey, and the context has none"),
        );
    }
    let resolution = flags.evaluate(&key, &context, state.clock.now().timestamp());
    if track_exposure {
        let served = exposure_of(&resolution).into_iter().collect();
        record_exposures(&state, &auth.principal, &context, served).await;
    }
    match &resolution.error {
        None => ApiJson(success(&resolution)).into_response(),
        Some(error) if error.code == ResolutionErrorCode::FlagNotFound => failure(
            StatusCode::NOT_FOUND,
            Some(&key),
            "FLAG_NOT_FOUND",
            format!("flag `{key}` was not found"),
        ),
        Some(error) => failure(
            StatusCode::BAD_REQUEST,
            Some(&key),
            error.code.as_str(),
            error.message.to_string(),
        ),
    }
}

fn has_targeting_key(context: &EvaluationContext) -> bool {
    context
        .get("targetingKey")
        .and_then(Value::as_str)
        .is_some_and(|key| !key.is_empty())
}

/// Evaluates every flag of the project for one context. The answer carries a
/// strong `ETag` over its body: send it back as `If-None-Match` and an
/// unchanged answer is a bodiless 304. `eventStreams` points at this
/// server's change stream (`/v1/flags/stream`).
#[utoipa::path(post, path = "/ofrep/v1/evaluate/flags", tag = "ofrep",
    security(("api_key" = [])),
    params(ExposureQuery),
    request_body(content = Object, description = "`{\"context\": {\"targetingKey\": …}, \"track_exposure\"?: true}`"),
    responses(
        (status = 200, description = "Every flag's evaluation", body = OfrepBulk,
         headers(("ETag" = String, description = "Tag of this answer"))),
        (status = 304, description = "Unchanged since the tag in If-None-Match"),
        (status = 400, description = "PARSE_ERROR or INVALID_CONTEXT", body = OfrepFailure),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 429, description = "Over the per-key rate; see Retry-After (seconds)", body = ErrorEnvelope),
    ))]
pub async fn evaluate_flags(
    State(state): State<AppState>,
    auth: AnyKey,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<ExposureQuery>,
    body: Bytes,
) -> Response {
    let EvaluationRequest {
        context,
        track_exposure,
    } = match admit(&state, &auth.principal, &body, &query, None) {
        Ok(request) => request,
        Err(refused) => return *refused,
    };
    let context = crate::enrichment::enrich(&state, &auth.principal, context).await;
    let flags = &auth.principal.project.flags;
    let mut served = Vec::new();
    let results = bulk_items(
        flags,
        &context,
        state.clock.now().timestamp(),
        |resolution| {
            if track_exposure {
                served.extend(exposure_of(resolution));
            }
        },
    );
    if track_exposure {
        record_exposures(&state, &auth.principal, &context, served).await;
    }
    let mut stream_uri = String::from("/v1/flags/stream");
    if let Some(publishable) = publishable_key(&headers, &auth.principal) {
        // A browser's EventSource cannot send headers; a publishable key is
        // public by design, a secret key never goes into a URL.
        stream_uri.push_str("?key=");
        stream_uri.push_str(publishable);
    }
    let answer = OfrepBulk {
        flags: results,
        event_streams: vec![
            serde_json::json!({"type": "sse", "endpoint": {"requestUri": stream_uri}}),
        ],
        metadata: ScalarMetadata(&flags.document().metadata),
    };
    let body = serde_json::to_vec(&answer).expect("serializes");
    let etag = flywheel_flags::strong_etag(&body);
    let etag_header = HeaderValue::from_str(&etag).expect("hex is a valid header");
    let unchanged = super::flags::etag_matches(&headers, &etag);
    if unchanged {
        return (StatusCode::NOT_MODIFIED, [(ETAG, etag_header)]).into_response();
    }
    (
        [
            (ETAG, etag_header),
            (
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ],
        body,
    )
        .into_response()
}

/// Every flag's OFREP item for one context, in key order (the context is
/// mirrored once); `each` sees every resolution (for exposures).
pub(crate) fn bulk_items<'f>(
    flags: &'f flywheel_flags::CompiledFlagSet,
    context: &EvaluationContext,
    now: i64,
    mut each: impl FnMut(&Resolution<'f>),
) -> Vec<OfrepItem<'f>> {
    let targeting_key = has_targeting_key(context);
    let mut items = Vec::with_capacity(flags.len());
    flags.evaluate_all(context, now, |resolution| {
        each(&resolution);
        let item = if !targeting_key && flags.needs_targeting_key(resolution.key) {
            OfrepItem::Failure(OfrepFailure::new(
                Some(resolution.key),
                "TARGETING_KEY_MISSING",
                "this flag buckets by targetingKey, and the context has none",
            ))
        } else {
            match &resolution.error {
                None => OfrepItem::Success(success(&resolution)),
                Some(error) => OfrepItem::Failure(OfrepFailure::new(
                    Some(resolution.key),
                    error.code.as_str(),
                    error.message.to_string(),
                )),
            }
        };
        items.push(item);
    });
    items
}

pub(crate) fn publishable_key<'h>(
    headers: &'h HeaderMap,
    principal: &Principal,
) -> Option<&'h str> {
    use flywheel_domain::keys::KeyKind;
    if principal.key_kind != KeyKind::Publishable {
        return None;
    }
    let from_bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().split_once(' '))
        .map(|(_, key)| key.trim());
    from_bearer.or_else(|| {
        headers
            .get("x-api-key")
            .and_then(|value| value.to_str().ok())
    })
}
