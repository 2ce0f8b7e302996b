//! Feature-flag administration (secret key): create, update, list, get,
//! delete, import and export a whole flagd document, versions and restore;
//! plus, for SDKs (publishable key), the flagd snapshot for local evaluation
//! and a server-sent-events stream of changes.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::header::{ETAG, IF_NONE_MATCH};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use flywheel_domain::flags::{
    CurrentFlagEntry, FlagAction, FlagChange, FlagEntryKind, FlagVersion,
};
use flywheel_domain::snapshot::{Principal, ProjectConfig};
use flywheel_flags::definition::FlagDefinition;
use flywheel_flags::diff::{diff, Change};
use flywheel_flags::{FlagDocument, FlagError};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::broadcast;
use utoipa::{IntoParams, ToSchema};

use crate::auth::{AnyKey, SecretKey};
use crate::error::{ApiError, ApiJson, ApiQuery, ErrorEnvelope};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/flags", get(list_flags).post(create_flag))
        .route(
            "/v1/flags/document",
            get(export_document).put(import_document),
        )
        .route("/v1/flags/snapshot", get(snapshot))
        .route("/v1/flags/stream", get(stream))
        .route(
            "/v1/flags/{key}",
            get(get_flag).put(put_flag).delete(delete_flag),
        )
        .route("/v1/flags/{key}/versions", get(flag_versions))
        .route(
            "/v1/flags/{key}/versions/{version}/restore",
            post(restore_flag),
        )
}

impl From<FlagError> for ApiError {
    fn from(error: FlagError) -> Self {
        let at = if error.path.is_empty() {
            "/"
        } else {
            &error.path
        };
        ApiError::new(
            StatusCode::BAD_REQUEST,
            error.code,
            format!("{} (at `{at}`)", error.message),
        )
    }
}

/// One flag as stored: its flagd definition and where it is in its history.
#[derive(Debug, Serialize, ToSchema)]
pub struct FlagView {
    key: String,
    /// The flagd flag object (`state`, `variants`, `defaultVariant`,
    /// `targeting`, `metadata`).
    #[schema(value_type = Object)]
    definition: Value,
    version: i64,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FlagList {
    flags: Vec<FlagView>,
}

impl From<&CurrentFlagEntry> for FlagView {
    fn from(entry: &CurrentFlagEntry) -> Self {
        Self {
            key: entry.key.clone(),
            definition: entry.definition.clone(),
            version: entry.version,
            updated_at: entry.updated_at,
        }
    }
}

fn flag_view(project: &ProjectConfig, key: &str) -> Option<FlagView> {
    project
        .flag_entries
        .iter()
        .find(|entry| entry.kind == FlagEntryKind::Flag && entry.key == key)
        .map(FlagView::from)
}

fn flag_not_found(key: &str) -> ApiError {
    ApiError::not_found("flag_not_found", format!("no flag `{key}` in this project"))
}

fn actor(principal: &Principal) -> String {
    format!("key:{}", principal.key_id.0)
}

/// Checks one flag against the project's current evaluators and returns its
/// normalised flagd JSON (the simple form is converted here).
fn checked_definition(principal: &Principal, key: &str, body: &Value) -> Result<Value, ApiError> {
    if key.is_empty()
        || key.len() > flywheel_flags::definition::MAX_KEY_LEN
        || key.chars().any(char::is_control)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_key",
            "flag keys are 1 to 200 characters without control characters",
        ));
    }
    let mut body = body.clone();
    if let Some(object) = body.as_object_mut() {
        // The key travels in the path; a matching `key` member is tolerated.
        match object.remove("key") {
            Some(Value::String(inner)) if inner != key => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "key_mismatch",
                    format!("the body's key `{inner}` is not the path's `{key}`"),
                ))
            }
            _ => {}
        }
    }
    let evaluators = &principal.project.flags.document().evaluators;
    Ok(FlagDefinition::from_json(&body, evaluators)?.to_json())
}

async fn write_and_reload(
    state: &AppState,
    principal: &Principal,
    changes: &[FlagChange],
) -> Result<Vec<FlagVersion>, ApiError> {
    let project = principal.project_id();
    let written = state
        .store
        .write_flags(project, changes, &actor(principal), state.clock.now())
        .await?;
    state.snapshot.reload_project(project).await?;
    Ok(written)
}

/// The flag as this node's snapshot has it after a write (the write reloaded it).
fn view_after_write(
    state: &AppState,
    principal: &Principal,
    key: &str,
) -> Result<FlagView, ApiError> {
    let snapshot = state.snapshot.load();
    snapshot
        .project(principal.project_id())
        .and_then(|project| flag_view(project, key))
        .ok_or_else(|| flag_not_found(key))
}

/// Every flag of the project, by key.
#[utoipa::path(get, path = "/v1/flags", tag = "flags",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Flags by key", body = FlagList),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn list_flags(auth: SecretKey) -> ApiJson<FlagList> {
    let flags = auth
        .principal
        .project
        .flag_entries
        .iter()
        .filter(|entry| entry.kind == FlagEntryKind::Flag)
        .map(FlagView::from)
        .collect();
    ApiJson(FlagList { flags })
}

/// Creates a flag: a flagd flag object with a `key`, or the simple form
/// `{key, enabled, rollout_percentage, target_users}`. 409 if it exists.
#[utoipa::path(post, path = "/v1/flags", tag = "flags",
    security(("api_key" = [])),
    request_body(content = Object, description = "A flagd flag with `key`, or the simple form"),
    responses(
        (status = 201, description = "Created", body = FlagView),
        (status = 400, description = "Invalid flag; the message names the JSON path", body = ErrorEnvelope),
        (status = 409, description = "A flag with this key exists", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn create_flag(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, ApiJson<FlagView>), ApiError> {
    let Some(key) = body.get("key").and_then(Value::as_str).map(str::to_owned) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_key",
            "a new flag needs a string `key`",
        ));
    };
    if flag_view(&auth.principal.project, &key).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "flag_exists",
            format!("flag `{key}` exists; PUT /v1/flags/{key} to change it"),
        ));
    }
    let definition = checked_definition(&auth.principal, &key, &body)?;
    let change = FlagChange {
        kind: FlagEntryKind::Flag,
        key: key.clone(),
        definition: Some(definition),
        action: FlagAction::Created,
    };
    write_and_reload(&state, &auth.principal, &[change]).await?;
    Ok((
        StatusCode::CREATED,
        ApiJson(view_after_write(&state, &auth.principal, &key)?),
    ))
}

/// One flag.
#[utoipa::path(get, path = "/v1/flags/{key}", tag = "flags",
    security(("api_key" = [])),
    params(("key" = String, Path, description = "Flag key")),
    responses(
        (status = 200, description = "The flag", body = FlagView),
        (status = 404, description = "No such flag", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn get_flag(
    auth: SecretKey,
    Path(key): Path<String>,
) -> Result<ApiJson<FlagView>, ApiError> {
    flag_view(&auth.principal.project, &key)
        .map(ApiJson)
        .ok_or_else(|| flag_not_found(&key))
}

/// Creates or replaces one flag (flagd flag object, or the simple form).
/// Writing the definition it already has changes nothing.
#[utoipa::path(put, path = "/v1/flags/{key}", tag = "flags",
    security(("api_key" = [])),
    params(("key" = String, Path, description = "Flag key")),
    request_body(content = Object, description = "A flagd flag object, or the simple form"),
    responses(
        (status = 200, description = "Updated (or unchanged)", body = FlagView),
        (status = 201, description = "Created", body = FlagView),
        (status = 400, description = "Invalid flag; the message names the JSON path", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn put_flag(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(key): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, ApiJson<FlagView>), ApiError> {
    let existed = flag_view(&auth.principal.project, &key).is_some();
    let definition = checked_definition(&auth.principal, &key, &body)?;
    let change = FlagChange {
        kind: FlagEntryKind::Flag,
        key: key.clone(),
        definition: Some(definition),
        action: FlagAction::Updated,
    };
    write_and_reload(&state, &auth.principal, &[change]).await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        ApiJson(view_after_write(&state, &auth.principal, &key)?),
    ))
}

/// Deletes one flag. Its history stays, and any version can be restored.
#[utoipa::path(delete, path = "/v1/flags/{key}", tag = "flags",
    security(("api_key" = [])),
    params(("key" = String, Path, description = "Flag key")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such flag", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn delete_flag(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    if flag_view(&auth.principal.project, &key).is_none() {
        return Err(flag_not_found(&key));
    }
    let change = FlagChange {
        kind: FlagEntryKind::Flag,
        key,
        definition: None,
        action: FlagAction::Deleted,
    };
    write_and_reload(&state, &auth.principal, &[change]).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One version in a flag's audit trail.
#[derive(Debug, Serialize, ToSchema)]
pub struct VersionView {
    version: i64,
    action: FlagAction,
    /// Who wrote it: `key:<key id>` or `cli`.
    actor: String,
    created_at: DateTime<Utc>,
    /// The definition this version set; absent for a deletion.
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    definition: Option<Value>,
    /// What changed from the previous version, by JSON path.
    #[schema(value_type = Vec<Object>)]
    changes: Vec<Change>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VersionList {
    key: String,
    versions: Vec<VersionView>,
}

/// The audit trail of one flag: every version, oldest first, with who wrote
/// it, when, and the diff from the version before.
#[utoipa::path(get, path = "/v1/flags/{key}/versions", tag = "flags",
    security(("api_key" = [])),
    params(("key" = String, Path, description = "Flag key")),
    responses(
        (status = 200, description = "Versions, oldest first", body = VersionList),
        (status = 404, description = "The flag never existed", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn flag_versions(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(key): Path<String>,
) -> Result<ApiJson<VersionList>, ApiError> {
    let history = state
        .store
        .flag_history(auth.principal.project_id(), FlagEntryKind::Flag, &key)
        .await?;
    if history.is_empty() {
        return Err(flag_not_found(&key));
    }
    let mut previous: Option<Value> = None;
    let versions = history
        .into_iter()
        .map(|version| {
            let changes = diff(previous.as_ref(), version.definition.as_ref());
            previous = version.definition.clone();
            VersionView {
                version: version.version,
                action: version.action,
                actor: version.actor,
                created_at: version.created_at,
                definition: version.definition,
                changes,
            }
        })
        .collect();
    Ok(ApiJson(VersionList { key, versions }))
}

/// Makes an old version current again, as a new version (history is never
/// rewritten). Restoring a deletion deletes the flag.
#[utoipa::path(post, path = "/v1/flags/{key}/versions/{version}/restore", tag = "flags",
    security(("api_key" = [])),
    params(("key" = String, Path, description = "Flag key"),
           ("version" = i64, Path, description = "The version to restore")),
    responses(
        (status = 200, description = "The flag as restored", body = FlagView),
        (status = 204, description = "The restored version was a deletion"),
        (status = 400, description = "The old definition no longer checks (say, a `$ref` to a removed evaluator)", body = ErrorEnvelope),
        (status = 404, description = "No such flag or version", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn restore_flag(
    State(state): State<AppState>,
    auth: SecretKey,
    Path((key, version)): Path<(String, i64)>,
) -> Result<Response, ApiError> {
    let history = state
        .store
        .flag_history(auth.principal.project_id(), FlagEntryKind::Flag, &key)
        .await?;
    let Some(old) = history.into_iter().find(|entry| entry.version == version) else {
        return Err(ApiError::not_found(
            "version_not_found",
            format!("flag `{key}` has no version {version}"),
        ));
    };
    let definition = match &old.definition {
        Some(definition) => Some(checked_definition(&auth.principal, &key, definition)?),
        None => None,
    };
    let deleted = definition.is_none();
    let change = FlagChange {
        kind: FlagEntryKind::Flag,
        key: key.clone(),
        definition,
        action: if deleted {
            FlagAction::Deleted
        } else {
            FlagAction::Restored
        },
    };
    write_and_reload(&state, &auth.principal, &[change]).await?;
    if deleted {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok(ApiJson(view_after_write(&state, &auth.principal, &key)?).into_response())
}

/// The whole flag set as one flagd document (flags as a map).
#[utoipa::path(get, path = "/v1/flags/document", tag = "flags",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "A flagd flag-definition document", body = Object),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn export_document(auth: SecretKey) -> ApiJson<Value> {
    ApiJson(auth.principal.project.flags.document().to_json())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImportQuery {
    /// `replace` (default): flags and evaluators not in the document are
    /// deleted. `merge`: they are kept.
    mode: Option<String>,
}

/// What an import did.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ImportSummary {
    created: Vec<String>,
    updated: Vec<String>,
    deleted: Vec<String>,
    unchanged: usize,
}

/// Imports a whole flagd document (flags as a map or an array; the simple
/// form too), checked in full before anything is written, and written in
/// one transaction. Only entries that differ become new versions.
#[utoipa::path(put, path = "/v1/flags/document", tag = "flags",
    security(("api_key" = [])),
    params(ImportQuery),
    request_body(content = Object, description = "A flagd flag-definition document"),
    responses(
        (status = 200, description = "What changed", body = ImportSummary),
        (status = 400, description = "Invalid document; the message names the JSON path", body = ErrorEnvelope),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 403, description = "A publishable key was used", body = ErrorEnvelope),
    ))]
pub async fn import_document(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiQuery(query): ApiQuery<ImportQuery>,
    ApiJson(body): ApiJson<Value>,
) -> Result<ApiJson<ImportSummary>, ApiError> {
    let replace = match query.mode.as_deref() {
        None | Some("replace") => true,
        Some("merge") => false,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("mode is `replace` or `merge`, not `{other}`"),
            ))
        }
    };
    let current = auth.principal.project.flags.document();
    let mut incoming = FlagDocument::from_json(&body)?;
    if !replace {
        // Merged documents must check as a whole (a kept flag may use an
        // evaluator the import replaces).
        for (name, rule) in &current.evaluators {
            incoming
                .evaluators
                .entry(name.clone())
                .or_insert_with(|| rule.clone());
        }
        for (key, flag) in &current.flags {
            incoming
                .flags
                .entry(key.clone())
                .or_insert_with(|| flag.clone());
        }
        incoming.check()?;
    }
    let mut changes = Vec::new();
    for (name, rule) in &incoming.evaluators {
        changes.push(FlagChange {
            kind: FlagEntryKind::Evaluator,
            key: name.clone(),
            definition: Some(rule.clone()),
            action: FlagAction::Imported,
        });
    }
    for (key, flag) in &incoming.flags {
        changes.push(FlagChange {
            kind: FlagEntryKind::Flag,
            key: key.clone(),
            definition: Some(flag.to_json()),
            action: FlagAction::Imported,
        });
    }
    changes.push(FlagChange {
        kind: FlagEntryKind::Set,
        key: String::new(),
        definition: (!incoming.metadata.is_empty())
            .then(|| Value::Object(incoming.metadata.clone())),
        action: FlagAction::Imported,
    });
    if replace {
        for key in current
            .flags
            .keys()
            .filter(|key| !incoming.flags.contains_key(*key))
        {
            changes.push(FlagChange {
                kind: FlagEntryKind::Flag,
                key: key.clone(),
                definition: None,
                action: FlagAction::Deleted,
            });
        }
        for name in current
            .evaluators
            .keys()
            .filter(|name| !incoming.evaluators.contains_key(*name))
        {
            changes.push(FlagChange {
                kind: FlagEntryKind::Evaluator,
                key: name.clone(),
                definition: None,
                action: FlagAction::Deleted,
            });
        }
    }
    let considered = incoming.flags.len();
    let written = write_and_reload(&state, &auth.principal, &changes).await?;
    let mut summary = ImportSummary::default();
    for version in written
        .iter()
        .filter(|version| version.kind == FlagEntryKind::Flag)
    {
        match version.definition {
            None => summary.deleted.push(version.key.clone()),
            Some(_) if version.version == 1 || !current.flags.contains_key(&version.key) => {
                summary.created.push(version.key.clone())
            }
            Some(_) => summary.updated.push(version.key.clone()),
        }
    }
    summary.unchanged = considered - summary.created.len() - summary.updated.len();
    Ok(ApiJson(summary))
}

/// True when `If-None-Match` names `etag` (or `*`); weak tags compare by value.
pub(crate) fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(',')
                .map(|tag| tag.trim().trim_start_matches("W/"))
                .any(|tag| tag == etag || tag == "*")
        })
}

/// The project's flags as a flagd document, for SDKs that evaluate locally.
/// Sends an `ETag`; with a matching `If-None-Match` the answer is 304.
#[utoipa::path(get, path = "/v1/flags/snapshot", tag = "flags",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "A flagd flag-definition document", body = Object,
         headers(("ETag" = String, description = "Tag of the flag set"))),
        (status = 304, description = "Unchanged since the tag in If-None-Match"),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
    ))]
pub async fn snapshot(auth: AnyKey, headers: HeaderMap) -> Response {
    let flags = &auth.principal.project.flags;
    let etag = HeaderValue::from_str(flags.etag()).expect("a hex tag is a valid header");
    if etag_matches(&headers, flags.etag()) {
        return (StatusCode::NOT_MODIFIED, [(ETAG, etag)]).into_response();
    }
    ([(ETAG, etag)], ApiJson(flags.document().to_json())).into_response()
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// A publishable key, for clients that cannot set headers (a browser's
    /// `EventSource`). Headers work too and win.
    key: Option<String>,
}

/// Server-sent events announcing every change of the project's flags, within
/// milliseconds of the write on this node: `event: message`, data
/// `{"type":"refetchEvaluation","etag":…,"lastModified":…}` (OFREP's event
/// stream format). The first event is sent on connect, so a client that
/// reconnects refetches at once.
#[utoipa::path(get, path = "/v1/flags/stream", tag = "flags",
    security(("api_key" = [])),
    params(StreamQuery),
    responses(
        (status = 200, description = "An event stream (text/event-stream)", content_type = "text/event-stream", body = String),
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
    ))]
pub async fn stream(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<StreamQuery>,
    mut parts: axum::http::request::Parts,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let principal = crate::auth::stream_principal(&state, query.key.as_deref(), &mut parts).await?;
    let project = principal.project_id();
    let first = Some(principal.project.flags.etag().to_string());
    let changes = state.snapshot.subscribe_flag_changes();
    let clock = state.clock.clone();
    // Ends when the client goes away (the stream is dropped) or the server
    // shuts down (drain: the client reconnects elsewhere).
    let events = futures_util::stream::unfold((first, changes), move |(mut first, mut changes)| {
        let clock = clock.clone();
        async move {
            if let Some(etag) = first.take() {
                return Some((Ok(refetch_event(&etag, clock.now())), (None, changes)));
            }
            loop {
                match changes.recv().await {
                    Ok(change) if change.project == project => {
                        let event = refetch_event(&change.etag, clock.now());
                        return Some((Ok(event), (None, changes)));
                    }
                    Ok(_) => {}
                    // Missed some: one refetch covers them all.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Some((Ok(refetch_event("", clock.now())), (None, changes)));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    let events = events.take_until(state.live_closing.clone().cancelled_owned());
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn refetch_event(etag: &str, now: DateTime<Utc>) -> SseEvent {
    let mut data = Map::new();
    data.insert("type".into(), Value::from("refetchEvaluation"));
    if !etag.is_empty() {
        data.insert("etag".into(), Value::from(etag));
    }
    data.insert("lastModified".into(), Value::from(now.timestamp()));
    SseEvent::default()
        .event("message")
        .data(Value::Object(data).to_string())
}
