//! Event ingestion (native, Segment and PostHog wire protocols) and event
//! inspection. Handlers decode the request into domain events and hand them
//! to the group committer; they answer 2xx only once the events are durable.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Read as _;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use flywheel_domain::events::{self, Envelope, Event, EventType, Rejection};
use flywheel_domain::keys::Scope;
use flywheel_domain::snapshot::Principal;
use flywheel_store::{EventQuery, StoredEvent};
use futures_util::stream::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use crate::auth::SecretKey;
use crate::error::{ApiError, ApiJson, ApiQuery, ErrorEnvelope};
use crate::ingest::{self, IngestOutcome};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    let mut ingest = Router::new()
        .route("/v1/events", post(native).get(list_events))
        .route("/v1/batch", post(segment_batch));
    for kind in [
        EventType::Track,
        EventType::Identify,
        EventType::Alias,
        EventType::Group,
        EventType::Page,
        EventType::Screen,
    ] {
        let handler = move |state: State<AppState>, headers: HeaderMap, body: Body| {
            segment_single(state, kind, headers, body)
        };
        ingest = ingest.route(&format!("/v1/{}", kind.as_str()), post(handler));
    }
    for path in ["/batch", "/e", "/i/v0/e", "/capture", "/track", "/engage"] {
        ingest = ingest
            .route(path, post(posthog))
            .route(&format!("{path}/"), post(posthog));
    }
    ingest.route("/v1/events/tail", get(tail_events))
}

/// Reads the body: at most `max` bytes after gzip decompression.
fn read_body_limited(headers: &HeaderMap, raw: Bytes, max: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "batch_too_large",
            format!("the request is larger than {max} bytes; send smaller batches"),
        )
    };
    let encoding = headers
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match encoding.as_str() {
        "" | "identity" => {
            if raw.len() > max {
                return Err(too_large());
            }
            Ok(raw)
        }
        "gzip" | "x-gzip" => {
            let mut decoded = Vec::with_capacity(raw.len() * 4);
            flate2::read::GzDecoder::new(&raw[..])
                .take(max as u64 + 1)
                .read_to_end(&mut decoded)
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_gzip",
                        "the body is not valid gzip",
                    )
                })?;
            if decoded.len() > max {
                return Err(too_large());
            }
            Ok(Bytes::from(decoded))
        }
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_content_encoding",
            format!("Content-Encoding {other:?} is not supported; use gzip or none"),
        )),
    }
}

/// Event bodies are JSON whatever the declared type: `application/json`,
/// `text/plain` (what `navigator.sendBeacon` sends to avoid a CORS
/// preflight), untyped, or a form whose `data` field holds the JSON, plain or
/// base64 (as `posthog-js` sends it). A form without `data` is read as JSON
/// (what `curl -d` sends).
fn json_payload(headers: &HeaderMap, bytes: Bytes) -> Result<Bytes, ApiError> {
    let essence = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if essence.starts_with("multipart/") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send events as JSON (application/json or text/plain)",
        ));
    }
    if essence != "application/x-www-form-urlencoded" {
        return Ok(bytes);
    }
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
    let Some(data) = form.get("data") else {
        return Ok(bytes);
    };
    let trimmed = data.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        return Ok(Bytes::from(data.clone().into_bytes()));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map(Bytes::from)
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "the form's data field is neither JSON nor base64 JSON",
            )
        })
}

async fn read_payload(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, ApiError> {
    let max = state.ingest.max_batch_bytes;
    // Compressed bodies are bounded by the same limit before decompression.
    let raw = axum::body::to_bytes(body, max + 1).await.map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "batch_too_large",
            format!("the request is larger than {max} bytes; send smaller batches"),
        )
    })?;
    json_payload(headers, read_body_limited(headers, raw, max)?)
}

/// Parses the body once: a syntax error is `invalid_json`, a document of the
/// wrong shape `invalid_body` (naming what was expected).
fn parse_body<'a, T: Deserialize<'a>>(bytes: &'a [u8], expected: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("expected {expected}: {e}"),
        ),
        _ => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        ),
    })
}

/// Authenticates an ingestion key (publishable or secret) and applies the
/// per-key rate limit.
fn authorize(state: &AppState, key: Option<&str>) -> Result<Principal, ApiError> {
    let principal = state.snapshot.load().authorize(key, Scope::Public)?;
    if let Err(retry_after) = state.rate_limiter.check(principal.key_id, Instant::now()) {
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests for this key; retry after the Retry-After delay",
        );
        error.retry_after = Some(retry_after.as_secs().max(1));
        return Err(error);
    }
    Ok(principal)
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// Segment sends the write key as the Basic-auth user name with an empty password.
fn basic_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.split(':').next().unwrap_or("").to_string())
}

fn envelope<'a>(
    state: &AppState,
    sent_at: Option<DateTime<Utc>>,
    context: Option<&'a Map<String, Value>>,
) -> Envelope<'a> {
    Envelope {
        received_at: state.clock.now(),
        sent_at,
        context,
        max_event_bytes: state.ingest.max_event_bytes,
    }
}

fn time_of(value: Option<&Value>) -> Result<Option<DateTime<Utc>>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(value) => events::parse_time(value).map(Some).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_sent_at",
                "sent_at must be RFC 3339 or epoch milliseconds",
            )
        }),
    }
}

#[derive(Debug, Deserialize)]
struct NativeBody<'a> {
    #[serde(borrow)]
    batch: Vec<&'a RawValue>,
    #[serde(default)]
    sent_at: Option<Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the wire shape; decoding is by `NativeBody`
pub struct NativeBatch {
    /// Events: `{event_id?, type, event, user_id?, anonymous_id?, org_id?, timestamp?, properties?, traits?, context?, consent?, schema_version?}`.
    #[schema(value_type = Vec<Object>)]
    batch: Vec<Value>,
    /// When the client sent the batch (RFC 3339), for clock-skew correction.
    sent_at: Option<String>,
}

/// Sends a batch of events (native API). Rejected events are listed with
/// their index and code; the rest are stored. Answers once stored durably.
#[utoipa::path(post, path = "/v1/events", tag = "events",
    security(("api_key" = [])),
    request_body = NativeBatch,
    responses(
        (status = 200, description = "Stored (and duplicates skipped)", body = IngestOutcome),
        (status = 400, description = "Undecodable or too large", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 429, description = "Over the key's rate limit (see Retry-After)", body = ErrorEnvelope),
        (status = 503, description = "The store is unavailable; nothing was stored", body = ErrorEnvelope),
    ))]
pub async fn native(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<ApiJson<IngestOutcome>, ApiError> {
    let principal = authorize(&state, bearer(&headers).as_deref())?;
    let bytes = read_payload(&state, &headers, body).await?;
    let parsed: NativeBody<'_> = parse_body(&bytes, "{\"batch\": [events…]}")?;
    let env = envelope(&state, time_of(parsed.sent_at.as_ref())?, None);
    let decoded = parsed
        .batch
        .iter()
        .enumerate()
        .map(|(index, raw)| events::decode_native_text(raw.get(), index, &env))
        .collect();
    Ok(ApiJson(
        ingest::ingest(&state.committer, &principal.project, decoded).await?,
    ))
}

fn decode_each(
    raws: &[&RawValue],
    decode: impl Fn(&RawValue, Value, usize) -> Result<Event, Rejection>,
) -> Vec<Result<Event, Rejection>> {
    raws.iter()
        .enumerate()
        .map(|(index, raw)| {
            let value: Value = serde_json::from_str(raw.get()).map_err(|e| Rejection {
                index,
                code: "invalid_event",
                message: e.to_string(),
            })?;
            decode(raw, value, index)
        })
        .collect()
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SegmentAnswer {
    /// Always true on 200, as Segment's API answers.
    success: bool,
    #[serde(flatten)]
    outcome: IngestOutcome,
}

/// The Segment batch body, as documented (decoding is by `SegmentBatchBody`).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct SegmentBatch {
    /// Segment messages: `{type, messageId?, userId?, anonymousId?, event?, name?, groupId?, previousId?, properties?, traits?, context?, timestamp?}`.
    #[schema(value_type = Vec<Object>)]
    batch: Vec<Value>,
    /// Merged under each message's own context.
    #[schema(value_type = Option<Object>)]
    context: Option<Value>,
    /// The key, when not sent as the Basic-auth user name.
    #[schema(rename = "writeKey")]
    write_key: Option<String>,
    #[schema(rename = "sentAt")]
    sent_at: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SegmentBatchBody<'a> {
    #[serde(borrow)]
    batch: Vec<&'a RawValue>,
    #[serde(default)]
    context: Option<Map<String, Value>>,
    #[serde(default, rename = "writeKey")]
    write_key: Option<String>,
    #[serde(default, rename = "sentAt")]
    sent_at: Option<Value>,
}

/// Segment HTTP API batch (`analytics-python`, `@segment/analytics-node`, …).
/// The key is the Basic-auth user name (empty password) or `writeKey`.
#[utoipa::path(post, path = "/v1/batch", tag = "events",
    request_body = SegmentBatch,
    responses(
        (status = 200, description = "Stored", body = SegmentAnswer),
        (status = 400, description = "Undecodable or too large", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 429, description = "Over the key's rate limit", body = ErrorEnvelope),
    ))]
pub async fn segment_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<ApiJson<SegmentAnswer>, ApiError> {
    let bytes = read_payload(&state, &headers, body).await?;
    let parsed: SegmentBatchBody<'_> = parse_body(&bytes, "{\"batch\": [messages…]}")?;
    let key = basic_user(&headers)
        .or(parsed.write_key.clone())
        .or_else(|| bearer(&headers));
    let principal = authorize(&state, key.as_deref())?;
    let env = envelope(
        &state,
        time_of(parsed.sent_at.as_ref())?,
        parsed.context.as_ref(),
    );
    let decoded = decode_each(&parsed.batch, |raw, value, index| {
        events::decode_segment(value, raw.get().len(), index, None, &env)
    });
    let outcome = ingest::ingest(&state.committer, &principal.project, decoded).await?;
    Ok(ApiJson(SegmentAnswer {
        success: true,
        outcome,
    }))
}

/// Segment single calls: `/v1/track`, `/v1/identify`, `/v1/alias`,
/// `/v1/group`, `/v1/page`, `/v1/screen`. A rejected message is a 400.
#[utoipa::path(post, path = "/v1/{call}", tag = "events",
    params(("call" = EventType, Path, description = "Which Segment call")),
    request_body(content = Object, description = "One Segment message"),
    responses(
        (status = 200, description = "Stored", body = SegmentAnswer),
        (status = 400, description = "The message was rejected", body = ErrorEnvelope),
        (status = 404, description = "Not a Segment call", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
    ))]
pub async fn segment_single(
    State(state): State<AppState>,
    kind: EventType,
    headers: HeaderMap,
    body: Body,
) -> Result<ApiJson<SegmentAnswer>, ApiError> {
    let bytes = read_payload(&state, &headers, body).await?;
    let value: Value = parse_body(&bytes, "a JSON document")?;
    let key = basic_user(&headers)
        .or_else(|| {
            value
                .get("writeKey")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .or_else(|| bearer(&headers));
    let principal = authorize(&state, key.as_deref())?;
    let env = envelope(&state, time_of(value.get("sentAt"))?, None);
    let event =
        events::decode_segment(value, bytes.len(), 0, Some(kind), &env).map_err(|rejection| {
            ApiError::new(StatusCode::BAD_REQUEST, rejection.code, rejection.message)
        })?;
    let outcome = ingest::ingest(&state.committer, &principal.project, vec![Ok(event)]).await?;
    Ok(ApiJson(SegmentAnswer {
        success: true,
        outcome,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PosthogAnswer {
    /// `1`, as PostHog's capture API answers.
    status: u8,
    #[serde(flatten)]
    outcome: IngestOutcome,
}

/// PostHog capture (`posthog-python`, `posthog-node`, `posthog-js`): `/batch`,
/// `/e`, `/i/v0/e`, `/capture` (with or without a trailing slash). The key is
/// `api_key` or `token` in the body.
#[utoipa::path(post, path = "/batch", tag = "events",
    request_body(content = Object, description = "{api_key, batch: [events]} or one event {api_key, event, distinct_id, properties}, or an array of events"),
    responses(
        (status = 200, description = "Stored", body = PosthogAnswer),
        (status = 400, description = "Undecodable or too large", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
    ))]
pub async fn posthog(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<ApiJson<PosthogAnswer>, ApiError> {
    let bytes = read_payload(&state, &headers, body).await?;
    let value: Value = parse_body(&bytes, "a JSON document")?;
    let key_of = |v: &Value| {
        ["api_key", "token"]
            .iter()
            .find_map(|k| v.get(k).and_then(Value::as_str))
            .or_else(|| {
                v.get("properties")
                    .and_then(|p| p.get("token"))
                    .and_then(Value::as_str)
            })
            .map(str::to_string)
    };
    let (raws, key, sent_at): (Vec<&RawValue>, Option<String>, Option<&Value>) = match &value {
        Value::Array(items) => {
            let raws: Vec<&RawValue> = serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string())
            })?;
            (raws, items.first().and_then(key_of), None)
        }
        Value::Object(object) if object.contains_key("batch") => {
            #[derive(Deserialize)]
            struct Batch<'a> {
                #[serde(borrow)]
                batch: Vec<&'a RawValue>,
            }
            let parsed: Batch<'_> = serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    format!("batch must be an array: {e}"),
                )
            })?;
            let key = key_of(&value).or_else(|| {
                parsed
                    .batch
                    .first()
                    .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
                    .and_then(|v| key_of(&v))
            });
            (parsed.batch, key, object.get("sent_at"))
        }
        Value::Object(_) => {
            let raw: &RawValue = serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string())
            })?;
            (vec![raw], key_of(&value), value.get("sent_at"))
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "expected an event, an array of events or {batch: [...]}",
            ))
        }
    };
    let principal = authorize(&state, key.or_else(|| bearer(&headers)).as_deref())?;
    let env = envelope(&state, time_of(sent_at)?, None);
    let decoded = decode_each(&raws, |raw, value, index| {
        events::decode_posthog(value, raw.get().len(), index, &env)
    });
    let outcome = ingest::ingest(&state.committer, &principal.project, decoded).await?;
    Ok(ApiJson(PosthogAnswer { status: 1, outcome }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListEventsParams {
    /// Only this person's events: the user and every id linked to it.
    user_id: Option<String>,
    /// Only events with this name.
    event: Option<String>,
    /// Only events at or after this time (RFC 3339).
    since: Option<DateTime<Utc>>,
    /// At most this many, newest first (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StoredEventView {
    /// Per-project sequence number, in commit order.
    seq: i64,
    /// The person the event resolves to now (identity is resolved at read).
    person_id: String,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    event: Event,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    events: Vec<StoredEventView>,
}

async fn views(
    state: &AppState,
    project: flywheel_domain::project::ProjectId,
    stored: Vec<StoredEvent>,
) -> Result<Vec<StoredEventView>, ApiError> {
    let mut people: HashMap<String, String> = HashMap::new();
    let mut out = Vec::with_capacity(stored.len());
    for item in stored {
        let distinct = item.event.distinct_id().to_string();
        let person = match people.get(&distinct) {
            Some(person) => person.clone(),
            None => {
                let person = state.store.resolve_person(project, &distinct).await?;
                people.insert(distinct, person.clone());
                person
            }
        };
        out.push(StoredEventView {
            seq: item.seq,
            person_id: person,
            event: item.event,
        });
    }
    Ok(out)
}

/// Lists stored events, newest first, to check instrumentation (secret key).
#[utoipa::path(get, path = "/v1/events", tag = "events",
    security(("api_key" = [])),
    params(ListEventsParams),
    responses(
        (status = 200, description = "Stored events", body = EventList),
        (status = 400, description = "Invalid parameter", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn list_events(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiQuery(params): ApiQuery<ListEventsParams>,
) -> Result<ApiJson<EventList>, ApiError> {
    let project = auth.principal.project_id();
    let distinct_ids = match &params.user_id {
        Some(user) => {
            let person = state.store.resolve_person(project, user).await?;
            Some(state.store.person_ids(project, &person).await?)
        }
        None => None,
    };
    let query = EventQuery {
        distinct_ids,
        event: params.event,
        since: params.since,
        after_seq: None,
        limit: super::page_limit(params.limit)?,
    };
    let stored = state.store.list_events(project, &query).await?;
    Ok(ApiJson(EventList {
        events: views(&state, project, stored).await?,
    }))
}

/// A live tail of the project's events as server-sent events (secret key):
/// one `event` message per stored event, oldest first, starting with events
/// stored after the stream opened.
#[utoipa::path(get, path = "/v1/events/tail", tag = "events",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "text/event-stream of stored events", content_type = "text/event-stream"),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn tail_events(
    State(state): State<AppState>,
    auth: SecretKey,
) -> Result<Response, ApiError> {
    let project = auth.principal.project_id();
    let newest = state
        .store
        .list_events(
            project,
            &EventQuery {
                limit: 1,
                ..Default::default()
            },
        )
        .await?;
    let start = newest.first().map_or(0, |e| e.seq);
    // Ends at shutdown (drain): the client reconnects elsewhere.
    let closing = state.live_closing.clone().cancelled_owned();
    let stream = tail_stream(state, project, start).take_until(closing);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn tail_stream(
    state: AppState,
    project: flywheel_domain::project::ProjectId,
    start: i64,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    futures_util::stream::unfold(
        (state, start, Vec::<SseEvent>::new()),
        move |(state, mut after, mut pending)| async move {
            loop {
                if let Some(next) = pending.pop() {
                    return Some((Ok(next), (state, after, pending)));
                }
                // Wake on a local commit, or poll for other nodes' commits.
                let notified = state.committer.committed.notified();
                let query = EventQuery {
                    after_seq: Some(after),
                    limit: 500,
                    ..Default::default()
                };
                match state.store.list_events(project, &query).await {
                    Ok(found) if !found.is_empty() => {
                        after = found.last().map_or(after, |e| e.seq);
                        let views = views(&state, project, found).await.unwrap_or_default();
                        pending = views
                            .iter()
                            .rev()
                            .filter_map(|view| {
                                SseEvent::default()
                                    .event("event")
                                    .id(view.seq.to_string())
                                    .json_data(view)
                                    .ok()
                            })
                            .collect();
                        continue;
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(error = %error, "event tail query failed"),
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
            }
        },
    )
}
