//! Upgrade prompts and the per-user live stream: `GET/PUT
//! /v1/prompt-rules`, `GET /v1/prompts`, `GET /v1/prompts/stats`,
//! `GET /v1/prompts/{id}`, `POST /v1/prompts/{id}/events`, `POST
//! /v1/decide`, `GET /v1/stream`, `GET /v1/project/identity-secret`.
//!
//! Prompts are created by the store in the transaction of their trigger
//! (see `flywheel-store`'s `growth/prompts.rs`, `raise_prompts`); this module lists them, records
//! what the product did with them (as `$prompt_*` events, applied to the
//! prompt in the events' transaction), and streams them live.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::Router;
use flywheel_domain::events::{decode_native, Envelope};
use flywheel_domain::growth::model::validate_external_id;
use flywheel_domain::identity::verify_user_hash;
use flywheel_domain::keys::KeyKind;
use flywheel_domain::prompts::{action_event_id, Prompt, PromptAction, PromptRules};
use flywheel_domain::snapshot::Principal;
use flywheel_store::growth::{LiveRecord, PromptStats};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;
use utoipa::{IntoParams, ToSchema};

use crate::auth::{AnyKey, SecretKey};
use crate::error::{ApiError, ApiJson, ApiQuery, ErrorEnvelope};
use crate::state::AppState;

/// Heartbeat comments on idle streams, so proxies keep them open.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// Messages committed this long before a reconnect are re-read on
/// PostgreSQL, where numbers can commit out of order.
const LATE_COMMITS: chrono::Duration = chrono::Duration::seconds(10);
/// Most messages replayed to a reconnecting stream.
const MAX_REPLAY: u32 = 1_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/prompt-rules",
            get(get_prompt_rules).put(put_prompt_rules),
        )
        .route("/v1/prompts", get(list_prompts))
        .route("/v1/prompts/stats", get(prompt_stats))
        .route("/v1/prompts/{prompt_id}", get(get_prompt))
        .route("/v1/prompts/{prompt_id}/events", post(prompt_event))
        .route("/v1/decide", post(decide))
        .route("/v1/stream", get(stream))
        .route("/v1/project/identity-secret", get(identity_secret_view))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PromptRulesView {
    /// 0 when never written.
    version: i64,
    rules: PromptRules,
}

/// The project's prompt rules.
#[utoipa::path(get, path = "/v1/prompt-rules", tag = "prompts",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The current rules", body = PromptRulesView),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn get_prompt_rules(
    State(state): State<AppState>,
    auth: SecretKey,
) -> Result<ApiJson<PromptRulesView>, ApiError> {
    let Some((version, document)) = state
        .store
        .prompt_rules(auth.principal.project_id())
        .await?
    else {
        return Ok(ApiJson(PromptRulesView {
            version: 0,
            rules: PromptRules::default(),
        }));
    };
    let rules = serde_json::from_value(document).map_err(ApiError::internal)?;
    Ok(ApiJson(PromptRulesView { version, rules }))
}

/// Replaces the prompt rules (a new version). Each rule has a trigger
/// (`milestone`, `usage_warning`, `limit_reached`, `trial_ending`,
/// `grace_ending`), copy as templates (or, with an `audience` flag, copy
/// per variant), a frequency cap and a priority. Templates are checked by
/// rendering them against every known variable: a typo is a 400 naming its
/// path. Rules apply to triggers from now on.
#[utoipa::path(put, path = "/v1/prompt-rules", tag = "prompts",
    security(("api_key" = [])),
    request_body = PromptRules,
    responses(
        (status = 200, description = "Written", body = PromptRulesView),
        (status = 400, description = "Invalid rules (`invalid_prompt_rules`, each problem with its path)", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn put_prompt_rules(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(rules): ApiJson<PromptRules>,
) -> Result<ApiJson<PromptRulesView>, ApiError> {
    let rules = rules
        .validate()
        .map_err(|problems| ApiError::invalid_document("invalid_prompt_rules", &problems))?;
    let project = auth.principal.project_id();
    let document = serde_json::to_value(&rules).map_err(ApiError::internal)?;
    let actor = format!("key:{}", auth.principal.key_id.0);
    let version = state
        .store
        .put_prompt_rules(project, &document, &actor, state.clock.now())
        .await?;
    state.snapshot.reload_project(project).await?;
    Ok(ApiJson(PromptRulesView { version, rules }))
}

/// The project's identity secret, generated on first use: the product's
/// backend signs user ids with it (`user_hash`).
pub(crate) async fn identity_secret(
    state: &AppState,
    principal: &Principal,
) -> Result<Arc<str>, ApiError> {
    let project = principal.project_id();
    if let Some(secret) = state.identity_secrets.get(&project) {
        return Ok(secret.clone());
    }
    let candidate = format!("idv_{}", hex::encode(rand::random::<[u8; 32]>()));
    let secret: Arc<str> = state
        .store
        .instance_secret(&format!("identity_verification:{}", project.0), &candidate)
        .await?
        .into();
    state.identity_secrets.insert(project, secret.clone());
    Ok(secret)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IdentitySecretView {
    /// HMAC-SHA256 key: `user_hash = hex(HMAC-SHA256(secret, user_id))`.
    secret: String,
    /// Whether the project requires `user_hash` now
    /// (`identity_verification` in `/v1/project/settings`).
    required: bool,
}

/// The secret the product's backend signs user ids with for identity
/// verification. Keep it on the server: whoever has it can read any user's
/// prompts with the publishable key.
#[utoipa::path(get, path = "/v1/project/identity-secret", tag = "prompts",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The secret", body = IdentitySecretView),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn identity_secret_view(
    State(state): State<AppState>,
    auth: SecretKey,
) -> Result<ApiJson<IdentitySecretView>, ApiError> {
    let secret = identity_secret(&state, &auth.principal).await?;
    Ok(ApiJson(IdentitySecretView {
        secret: secret.to_string(),
        required: auth.principal.project.settings.identity_verification,
    }))
}

/// With identity verification on, a publishable-key read of one user's data
/// must carry that user's `user_hash`. Secret keys are trusted.
pub(crate) async fn verify_user(
    state: &AppState,
    principal: &Principal,
    user_id: &str,
    user_hash: Option<&str>,
) -> Result<(), ApiError> {
    if principal.key_kind == KeyKind::Secret || !principal.project.settings.identity_verification {
        return Ok(());
    }
    let Some(presented) = user_hash.filter(|hash| !hash.is_empty()) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "user_hash_required",
            "this project requires identity verification: send user_hash, the user id signed by \
             your backend (hex HMAC-SHA256 with the project's identity secret)",
        ));
    };
    let secret = identity_secret(state, principal).await?;
    if verify_user_hash(&secret, user_id, presented) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid_user_hash",
            "user_hash is not this user id's signature",
        ))
    }
}

/// The orgs a stream or `decide` follows: the user's known orgs plus the
/// one asked for. Under identity verification the one asked for must be
/// among the user's (the signature covers the user, not the org).
async fn orgs_of_user(
    state: &AppState,
    principal: &Principal,
    user_id: &str,
    asked: Option<&str>,
) -> Result<Vec<String>, ApiError> {
    let profile = state
        .profiles
        .get(state.store.as_ref(), principal.project_id(), user_id)
        .await;
    let mut orgs: Vec<String> = profile.map(|p| p.org_ids.clone()).unwrap_or_default();
    if let Some(org) = asked {
        validate_external_id("org_id", org)?;
        if !orgs.iter().any(|known| known == org) {
            let verified = principal.key_kind == KeyKind::Publishable
                && principal.project.settings.identity_verification;
            if verified {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "org_not_permitted",
                    "under identity verification a user can follow only orgs they belong to",
                ));
            }
            orgs.insert(0, org.to_owned());
        } else {
            // The one asked for first: it is the one `decide` answers for.
            orgs.retain(|known| known != org);
            orgs.insert(0, org.to_owned());
        }
    }
    Ok(orgs)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PromptsQuery {
    user_id: String,
    /// The user id signed by the product's backend (identity verification).
    user_hash: Option<String>,
    /// 1 to 100 (default 20).
    limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PromptList {
    prompts: Vec<Prompt>,
}

/// A user's pending prompts (not clicked, dismissed or expired), highest
/// priority first, then newest.
#[utoipa::path(get, path = "/v1/prompts", tag = "prompts",
    security(("api_key" = [])),
    params(PromptsQuery),
    responses(
        (status = 200, description = "The pending prompts", body = PromptList),
        (status = 400, description = "Invalid user id or limit", body = ErrorEnvelope),
        (status = 401, description = "Missing key, or `user_hash_required`", body = ErrorEnvelope),
        (status = 403, description = "`invalid_user_hash`", body = ErrorEnvelope),
    ))]
pub async fn list_prompts(
    State(state): State<AppState>,
    auth: AnyKey,
    ApiQuery(query): ApiQuery<PromptsQuery>,
) -> Result<ApiJson<PromptList>, ApiError> {
    validate_external_id("user_id", &query.user_id)?;
    let limit = match query.limit {
        None => 20,
        Some(limit @ 1..=100) => limit,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("limit must be between 1 and 100, not {other}"),
            ))
        }
    };
    verify_user(
        &state,
        &auth.principal,
        &query.user_id,
        query.user_hash.as_deref(),
    )
    .await?;
    let prompts = state
        .store
        .pending_prompts(
            auth.principal.project_id(),
            &query.user_id,
            state.clock.now(),
            limit,
        )
        .await?;
    Ok(ApiJson(PromptList { prompts }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PromptStatsList {
    stats: Vec<PromptStats>,
}

/// Per rule and variant: prompts created, shown, clicked, dismissed, and
/// upgrades credited to them (a prompt experiment's outcome).
#[utoipa::path(get, path = "/v1/prompts/stats", tag = "prompts",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The counts", body = PromptStatsList),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn prompt_stats(
    State(state): State<AppState>,
    auth: SecretKey,
) -> Result<ApiJson<PromptStatsList>, ApiError> {
    let stats = state
        .store
        .prompt_stats(auth.principal.project_id())
        .await?;
    Ok(ApiJson(PromptStatsList { stats }))
}

fn valid_prompt_id(id: &str) -> Result<(), ApiError> {
    let valid =
        id.len() == 36 && id.starts_with("prm_") && id[4..].bytes().all(|b| b.is_ascii_hexdigit());
    if valid {
        Ok(())
    } else {
        Err(prompt_not_found())
    }
}

fn prompt_not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "prompt_not_found", "no such prompt")
}

/// One prompt, whatever its status.
#[utoipa::path(get, path = "/v1/prompts/{prompt_id}", tag = "prompts",
    security(("api_key" = [])),
    params(("prompt_id" = String, Path)),
    responses(
        (status = 200, description = "The prompt", body = Prompt),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
        (status = 404, description = "`prompt_not_found`", body = ErrorEnvelope),
    ))]
pub async fn get_prompt(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(prompt_id): Path<String>,
) -> Result<ApiJson<Prompt>, ApiError> {
    valid_prompt_id(&prompt_id)?;
    state
        .store
        .get_prompt(auth.principal.project_id(), &prompt_id, state.clock.now())
        .await?
        .map(ApiJson)
        .ok_or_else(prompt_not_found)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptEventRequest {
    /// `shown`, `clicked` or `dismissed`.
    #[serde(rename = "type")]
    action: PromptAction,
    /// The prompt's user id signed by the product's backend (identity
    /// verification).
    #[serde(default)]
    user_hash: Option<String>,
    /// The user's consent, as on a native event (`{"analytics": true}`).
    /// Where the project requires analytics consent and this lacks it, the
    /// prompt still changes but no event is stored.
    #[serde(default)]
    consent: Option<Value>,
}

/// Records what the product did with a prompt, as a `$prompt_shown`,
/// `$prompt_clicked` or `$prompt_dismissed` event of the prompt's user
/// (the first of each counts; repeating it changes nothing). A clicked or
/// dismissed prompt is no longer pending; an upgrade of the org within the
/// attribution window after a click is credited to the prompt and its
/// variant. Where the project requires analytics consent and the request
/// carries none (`consent`), the prompt changes all the same but no event
/// is stored. Answers the prompt as it now stands.
#[utoipa::path(post, path = "/v1/prompts/{prompt_id}/events", tag = "prompts",
    security(("api_key" = [])),
    params(("prompt_id" = String, Path)),
    request_body = PromptEventRequest,
    responses(
        (status = 200, description = "Recorded", body = Prompt),
        (status = 400, description = "Invalid body", body = ErrorEnvelope),
        (status = 401, description = "Missing key, or `user_hash_required`", body = ErrorEnvelope),
        (status = 403, description = "`invalid_user_hash`", body = ErrorEnvelope),
        (status = 404, description = "`prompt_not_found`", body = ErrorEnvelope),
    ))]
pub async fn prompt_event(
    State(state): State<AppState>,
    auth: AnyKey,
    Path(prompt_id): Path<String>,
    ApiJson(request): ApiJson<PromptEventRequest>,
) -> Result<ApiJson<Prompt>, ApiError> {
    valid_prompt_id(&prompt_id)?;
    let project = auth.principal.project_id();
    let now = state.clock.now();
    let prompt = state
        .store
        .get_prompt(project, &prompt_id, now)
        .await?
        .ok_or_else(prompt_not_found)?;
    verify_user(
        &state,
        &auth.principal,
        &prompt.user_id,
        request.user_hash.as_deref(),
    )
    .await?;
    let action = request.action;
    let envelope = Envelope {
        received_at: now,
        sent_at: None,
        context: None,
        max_event_bytes: state.ingest.max_event_bytes,
    };
    let raw = json!({
        "type": "track",
        "event": action.event_name(),
        "event_id": action_event_id(&prompt.id, action),
        "user_id": prompt.user_id,
        "org_id": prompt.org_id,
        "properties": {
            "prompt_id": prompt.id,
            "rule": prompt.rule,
            "variant": prompt.variant,
            "flag": prompt.flag,
            "trigger": prompt.trigger,
        },
        "consent": request.consent,
    });
    let len = raw.to_string().len();
    let decoded = vec![decode_native(raw, len, 0, &envelope)];
    let outcome = crate::ingest::ingest(&state.committer, &auth.principal.project, decoded).await?;
    if let Some(rejected) = outcome.rejected.first() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "prompt_event_rejected",
            format!(
                "the {} event was refused: {}",
                action.event_name(),
                rejected.message
            ),
        ));
    }
    if outcome.dropped_no_consent > 0 {
        state
            .store
            .record_prompt_action(project, &prompt.id, &prompt.user_id, action, now)
            .await?;
    }
    state
        .store
        .get_prompt(project, &prompt_id, now)
        .await?
        .map(ApiJson)
        .ok_or_else(prompt_not_found)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecideRequest {
    /// The product's user id (or give `anonymous_id` before signup).
    #[serde(default)]
    user_id: Option<String>,
    /// Answer for this org (default: the user's first org).
    #[serde(default)]
    org_id: Option<String>,
    #[serde(default)]
    anonymous_id: Option<String>,
    /// Extra evaluation context for the flags (the caller's values win over
    /// what Flywheel adds).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    context: Option<Map<String, Value>>,
    /// The user id signed by the product's backend (identity verification).
    #[serde(default)]
    user_hash: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DecideAnswer<'f> {
    /// Whom this answers for: `user_id`, else `anonymous_id`.
    user_id: String,
    org_id: Option<String>,
    /// Every flag, as OFREP's bulk evaluation answers them.
    #[schema(value_type = Vec<Object>)]
    flags: Vec<crate::routes::ofrep::OfrepItem<'f>>,
    /// The org's entitlements with usage (`null` without an org).
    entitlements: Option<crate::routes::billing::EntitlementsView>,
    /// Pending prompts, highest priority first.
    prompts: Vec<Prompt>,
    /// The user's live stream (prompts, entitlement and flag changes).
    stream_url: String,
}

/// One call for a client at start-up: the user's evaluated flags (context
/// enriched as OFREP's), the org's entitlements with usage and the user's
/// pending prompts, and where to listen for changes.
#[utoipa::path(post, path = "/v1/decide", tag = "prompts",
    security(("api_key" = [])),
    request_body = DecideRequest,
    responses(
        (status = 200, description = "Flags, entitlements and prompts", body = DecideAnswer),
        (status = 400, description = "Invalid body (`missing_identity` without user_id and anonymous_id)", body = ErrorEnvelope),
        (status = 401, description = "Missing key, or `user_hash_required`", body = ErrorEnvelope),
        (status = 403, description = "`invalid_user_hash`, `org_not_permitted`", body = ErrorEnvelope),
    ))]
pub async fn decide(
    State(state): State<AppState>,
    auth: AnyKey,
    headers: HeaderMap,
    ApiJson(request): ApiJson<DecideRequest>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let Some(user) = request.user_id.clone().or(request.anonymous_id.clone()) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_identity",
            "send user_id (or anonymous_id before signup)",
        ));
    };
    validate_external_id("user_id", &user)?;
    let principal = &auth.principal;
    verify_user(&state, principal, &user, request.user_hash.as_deref()).await?;
    let orgs = orgs_of_user(&state, principal, &user, request.org_id.as_deref()).await?;
    let org_id = orgs.first().cloned();
    let mut context = request.context.unwrap_or_default();
    context
        .entry("targetingKey")
        .or_insert_with(|| Value::from(user.clone()));
    if let Some(org) = &org_id {
        context
            .entry("org_id")
            .or_insert_with(|| Value::from(org.clone()));
    }
    let context = crate::enrichment::enrich(&state, principal, context).await;
    let project = principal.project_id();
    let now = state.clock.now();
    let entitlements = match &org_id {
        Some(org) => {
            let state_of_org = crate::routes::billing::org_state(&state, project, org).await?;
            Some(crate::routes::billing::entitlements_view(
                &state,
                &principal.project,
                &state_of_org,
            ))
        }
        None => None,
    };
    let prompts = state.store.pending_prompts(project, &user, now, 20).await?;
    let items = crate::routes::ofrep::bulk_items(
        &principal.project.flags,
        &context,
        now.timestamp(),
        |_| {},
    );
    let mut query: Vec<(&str, &str)> = vec![("user_id", &user)];
    if let Some(org) = &org_id {
        query.push(("org_id", org));
    }
    if let Some(hash) = &request.user_hash {
        query.push(("user_hash", hash));
    }
    // EventSource cannot send headers; a publishable key is public (a
    // secret key never goes into a URL).
    if let Some(key) = crate::routes::ofrep::publishable_key(&headers, principal) {
        query.push(("key", key));
    }
    let stream_url = format!(
        "/v1/stream?{}",
        serde_urlencoded::to_string(&query).map_err(ApiError::internal)?
    );
    let answer = DecideAnswer {
        user_id: user,
        org_id,
        flags: items,
        entitlements,
        prompts,
        stream_url,
    };
    Ok(ApiJson(answer).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    user_id: String,
    /// Also follow this org's entitlement changes (the user's known orgs
    /// are always followed).
    org_id: Option<String>,
    /// The user id signed by the product's backend (identity verification).
    user_hash: Option<String>,
    /// A publishable key, for clients that cannot set headers (a browser's
    /// `EventSource`). Headers work too and win.
    key: Option<String>,
    /// Resume after this message (for clients that cannot send the
    /// `Last-Event-ID` header; the header wins).
    last_event_id: Option<i64>,
}

/// A user's live stream (server-sent events). On connect: `event: flags`
/// (`{"etag"}` of the flag set: refetch if it differs from yours). Then, as
/// they commit: `event: prompt` (a prompt created for the user),
/// `event: entitlements` (`{"type": "subscription.changed" |
/// "usage.warning" | "usage.limit_reached", …}` for the user's orgs) and
/// `event: flags` (the flag set changed). Prompts and entitlement messages
/// carry an `id`: reconnect with `Last-Event-ID` (browsers do it for you)
/// and what was missed is sent first, for up to an hour. Heartbeat comments
/// every 15 s. With identity verification on, a publishable key must send
/// `user_hash`.
#[utoipa::path(get, path = "/v1/stream", tag = "prompts",
    security(("api_key" = [])),
    params(StreamQuery),
    responses(
        (status = 200, description = "An event stream (text/event-stream)", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid user id, org id or Last-Event-ID", body = ErrorEnvelope),
        (status = 401, description = "Missing key, or `user_hash_required`", body = ErrorEnvelope),
        (status = 403, description = "`invalid_user_hash`, `org_not_permitted`", body = ErrorEnvelope),
    ))]
pub async fn stream(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<StreamQuery>,
    mut parts: axum::http::request::Parts,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let principal = crate::auth::stream_principal(&state, query.key.as_deref(), &mut parts).await?;
    validate_external_id("user_id", &query.user_id)?;
    verify_user(
        &state,
        &principal,
        &query.user_id,
        query.user_hash.as_deref(),
    )
    .await?;
    let last_event_id = match parts.headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<i64>().ok())
                .filter(|seq| *seq >= 0)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_last_event_id",
                        "Last-Event-ID must be the id of an event this stream sent",
                    )
                })?,
        ),
        None => query.last_event_id,
    };
    let orgs = orgs_of_user(&state, &principal, &query.user_id, query.org_id.as_deref()).await?;
    let project = principal.project_id();
    // Subscribe before reading what was missed, so nothing falls between.
    let subscription = state.live.subscribe(project, &query.user_id, &orgs);
    let flag_changes = state.snapshot.subscribe_flag_changes();
    let mut replay = VecDeque::new();
    if let Some(after) = last_event_id {
        let late_since = state.clock.now() - LATE_COMMITS;
        replay.extend(
            state
                .store
                .live_messages_for(
                    project,
                    &query.user_id,
                    &orgs,
                    after,
                    late_since,
                    MAX_REPLAY,
                )
                .await?,
        );
    }
    let replayed: HashSet<i64> = replay.iter().map(|record| record.seq).collect();
    let first = principal.project.flags.etag().to_string();
    let stream = LiveStream {
        first: Some(first),
        replay,
        replayed,
        subscription,
        flag_changes,
        project,
    };
    let events = futures_util::stream::unfold(stream, |mut stream| async move {
        let event = stream.next_event().await?;
        Some((Ok(event), stream))
    })
    // Ends at shutdown (drain): the client reconnects elsewhere and resumes.
    .take_until(state.live_closing.clone().cancelled_owned());
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(HEARTBEAT).text("ping")))
}

/// One open stream's state.
struct LiveStream {
    first: Option<String>,
    replay: VecDeque<LiveRecord>,
    /// Numbers already sent by replay (the hub may deliver them again).
    replayed: HashSet<i64>,
    subscription: crate::live::Subscription,
    flag_changes: broadcast::Receiver<crate::snapshot::FlagSetChanged>,
    project: flywheel_domain::project::ProjectId,
}

impl LiveStream {
    /// The next event to send; `None` ends the stream (this node cut it off
    /// as too slow, or is shutting down): the client reconnects and resumes.
    async fn next_event(&mut self) -> Option<SseEvent> {
        if let Some(etag) = self.first.take() {
            return Some(flags_event(&etag));
        }
        if let Some(record) = self.replay.pop_front() {
            return Some(record_event(&record));
        }
        loop {
            tokio::select! {
                record = self.subscription.receiver.recv() => {
                    let record = record?;
                    if self.replayed.remove(&record.seq) {
                        continue;
                    }
                    return Some(record_event(&record));
                }
                change = self.flag_changes.recv() => match change {
                    Ok(change) if change.project == self.project => return Some(flags_event(&change.etag)),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return Some(flags_event("")),
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    }
}

fn flags_event(etag: &str) -> SseEvent {
    SseEvent::default()
        .event("flags")
        .data(json!({"etag": etag}).to_string())
}

fn record_event(record: &LiveRecord) -> SseEvent {
    SseEvent::default()
        .id(record.seq.to_string())
        .event(record.message.kind.as_str())
        .data(record.message.payload.to_string())
}
