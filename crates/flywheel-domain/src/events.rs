//! Events: the envelope every ingested event is normalised to, the decoders
//! for the native, Segment and PostHog wire shapes, timestamp correction, and
//! the effects an event implies. All pure: the server decodes and the store
//! applies effects inside the transaction that commits the event.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Clock skew above which a device's timestamps are corrected.
pub const SKEW_TOLERANCE: Duration = Duration::seconds(60);
/// How far in the future a timestamp may be before it is clamped.
pub const FUTURE_TOLERANCE: Duration = Duration::hours(1);
/// Namespace for turning non-UUID message ids (Segment's `ajs-…`, PostHog's
/// anything) into stable UUIDv5s, so a retry dedupes to the same id.
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2a4e_8b7d_4c1a_9e35_0d2f_7a61_b8c4);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Track,
    Identify,
    Alias,
    Group,
    Page,
    Screen,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Track => "track",
            EventType::Identify => "identify",
            EventType::Alias => "alias",
            EventType::Group => "group",
            EventType::Page => "page",
            EventType::Screen => "screen",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "track" => EventType::Track,
            "identify" => EventType::Identify,
            "alias" => EventType::Alias,
            "group" => EventType::Group,
            "page" => EventType::Page,
            "screen" => EventType::Screen,
            _ => return None,
        })
    }
}

/// Which wire protocol an event arrived through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Native,
    Segment,
    Posthog,
    /// Recorded by Flywheel itself (e.g. `activation_threshold_crossed`).
    Derived,
}

/// The normalised envelope: what is stored, whatever the wire shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: Uuid,
    /// True when the client sent no id and the server minted a UUIDv7.
    pub event_id_generated: bool,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The event name (`track`), page/screen name, or a `$`-name for the others.
    pub event: String,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub org_id: Option<String>,
    /// For `alias`: the id being merged into `user_id`.
    pub previous_id: Option<String>,
    // Timestamps are written by `wire_time` (the same text as chrono's
    // `Serialize`): chrono's goes through `fmt` for every field, and each
    // stored event carries four.
    /// Corrected for clock skew, clamped when in the future.
    #[serde(serialize_with = "crate::wire_time::serialize")]
    pub timestamp: DateTime<Utc>,
    #[serde(serialize_with = "crate::wire_time::serialize_option")]
    pub original_timestamp: Option<DateTime<Utc>>,
    #[serde(serialize_with = "crate::wire_time::serialize_option")]
    pub sent_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "crate::wire_time::serialize")]
    pub received_at: DateTime<Utc>,
    // Defaults: the stored form (`to_stored_json`) leaves out what is
    // absent, false or empty.
    #[serde(default)]
    pub skew_corrected: bool,
    #[serde(default)]
    pub future_clamped: bool,
    #[serde(default)]
    pub properties: Map<String, Value>,
    #[serde(default)]
    pub traits: Map<String, Value>,
    #[serde(default)]
    pub context: Map<String, Value>,
    pub schema_version: Option<String>,
    pub source: Source,
    /// Problems against the project's schema, recorded in `warn` mode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schema_violations: Vec<String>,
}

/// An event as stored: [`Event`]'s fields without the absent, false and
/// empty ones, which read back as their defaults. A quarter of a typical
/// event's JSON was such fields, and every byte is written twice (the WAL,
/// then the database) and kept.
#[derive(Serialize)]
struct StoredBody<'a> {
    event_id: &'a Uuid,
    event_id_generated: bool,
    #[serde(rename = "type")]
    kind: EventType,
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    anonymous_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    org_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_id: Option<&'a str>,
    #[serde(serialize_with = "crate::wire_time::serialize")]
    timestamp: &'a DateTime<Utc>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::wire_time::serialize_option"
    )]
    original_timestamp: &'a Option<DateTime<Utc>>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::wire_time::serialize_option"
    )]
    sent_at: &'a Option<DateTime<Utc>>,
    #[serde(serialize_with = "crate::wire_time::serialize")]
    received_at: &'a DateTime<Utc>,
    #[serde(skip_serializing_if = "is_false")]
    skew_corrected: bool,
    #[serde(skip_serializing_if = "is_false")]
    future_clamped: bool,
    #[serde(skip_serializing_if = "Map::is_empty")]
    properties: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    traits: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    context: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema_version: Option<&'a str>,
    source: Source,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    schema_violations: &'a [String],
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl Event {
    /// The JSON the store keeps ([`StoredBody`]); it deserializes back into
    /// the same `Event`.
    pub fn to_stored_json(&self) -> serde_json::Result<String> {
        // Destructured without `..`, so a new field cannot be left out of
        // the stored form unnoticed.
        let Event {
            event_id,
            event_id_generated,
            kind,
            event,
            user_id,
            anonymous_id,
            org_id,
            previous_id,
            timestamp,
            original_timestamp,
            sent_at,
            received_at,
            skew_corrected,
            future_clamped,
            properties,
            traits,
            context,
            schema_version,
            source,
            schema_violations,
        } = self;
        serde_json::to_string(&StoredBody {
            event_id,
            event_id_generated: *event_id_generated,
            kind: *kind,
            event,
            user_id: user_id.as_deref(),
            anonymous_id: anonymous_id.as_deref(),
            org_id: org_id.as_deref(),
            previous_id: previous_id.as_deref(),
            timestamp,
            original_timestamp,
            sent_at,
            received_at,
            skew_corrected: *skew_corrected,
            future_clamped: *future_clamped,
            properties,
            traits,
            context,
            schema_version: schema_version.as_deref(),
            source: *source,
            schema_violations,
        })
    }

    /// The id that stands for the actor: the user id, else the anonymous id.
    pub fn distinct_id(&self) -> &str {
        self.user_id
            .as_deref()
            .or(self.anonymous_id.as_deref())
            .expect("a decoded event has a user_id or an anonymous_id")
    }

    /// What committing this event implies for the identity graph.
    pub fn effects(&self) -> Vec<Effect> {
        let mut effects = Vec::new();
        match self.kind {
            EventType::Identify => {
                if let (Some(anonymous), Some(user)) = (&self.anonymous_id, &self.user_id) {
                    effects.push(Effect::LinkIdentity {
                        alias: anonymous.clone(),
                        user_id: user.clone(),
                    });
                }
                if !self.traits.is_empty() {
                    effects.push(Effect::SetTraits {
                        distinct_id: self.distinct_id().to_string(),
                        traits: self.traits.clone(),
                    });
                }
            }
            EventType::Alias => {
                let previous = self.previous_id.as_ref().or(self.anonymous_id.as_ref());
                if let (Some(previous), Some(user)) = (previous, &self.user_id) {
                    effects.push(Effect::LinkIdentity {
                        alias: previous.clone(),
                        user_id: user.clone(),
                    });
                }
            }
            _ => {}
        }
        if !self.schema_violations.is_empty() {
            effects.push(Effect::RecordSchemaViolation {
                problems: self.schema_violations.clone(),
            });
        }
        if let Some(org) = &self.org_id {
            if self.kind == EventType::Group {
                effects.push(Effect::JoinOrg {
                    distinct_id: self.distinct_id().to_string(),
                    org_id: org.clone(),
                });
            }
        }
        effects
    }
}

/// A state change an event implies, applied in the transaction that commits
/// the event. Later features (meters, activation, growth graph) add variants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// `alias` (an anonymous or previous id) now resolves to `user_id`.
    /// The first link of an id wins; history is never rewritten.
    LinkIdentity { alias: String, user_id: String },
    /// The actor belongs to the org.
    JoinOrg { distinct_id: String, org_id: String },
    /// The event broke its schema (`warn` mode): keep it for review.
    RecordSchemaViolation { problems: Vec<String> },
    /// `identify` traits, merged into the person's (flag context enrichment).
    SetTraits {
        distinct_id: String,
        traits: Map<String, Value>,
    },
}

/// What the ingestion pipeline decided for one decoded event.
#[derive(Debug, Clone, PartialEq)]
pub enum Prepared {
    /// Store it (privacy applied, violations noted in `warn` mode).
    Store(Box<Event>),
    /// Dropped and counted: the project requires analytics consent.
    DroppedNoConsent,
    /// Refused (`enforce` mode schema violation).
    Rejected(Rejection),
}

/// Applies the project's rules to a decoded event, in order: consent, schema
/// (against what the client sent), IP reduction, PII redaction.
pub fn prepare(
    mut event: Event,
    index: usize,
    config: &crate::snapshot::ProjectConfig,
) -> Prepared {
    use crate::privacy::{has_analytics_consent, redact_pii, reduce_ips, SchemaMode};
    let settings = &config.settings;
    if settings.require_analytics_consent && !has_analytics_consent(&event) {
        return Prepared::DroppedNoConsent;
    }
    if settings.schema_mode != SchemaMode::Off {
        if let Some(schema) = config.schemas.get(&event.event) {
            let problems = schema.violations(&event);
            if !problems.is_empty() {
                if settings.schema_mode == SchemaMode::Enforce {
                    return Prepared::Rejected(Rejection {
                        index,
                        code: "schema_violation",
                        message: format!(
                            "{} (schema version {})",
                            problems.join("; "),
                            schema.version
                        ),
                    });
                }
                event.schema_violations = problems;
            }
        }
    }
    reduce_ips(&mut event, settings.ip_handling);
    redact_pii(&mut event, settings);
    Prepared::Store(Box::new(event))
}

/// Why one event of a batch was rejected (the rest proceed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rejection {
    /// Position in the batch.
    pub index: usize,
    /// Stable code: `event_too_large`, `invalid_event`, `invalid_type`,
    /// `missing_event_name`, `missing_identity`, `invalid_event_id`,
    /// `invalid_timestamp`, `invalid_field`.
    pub code: &'static str,
    pub message: String,
}

/// Request-level facts the decoders need.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    pub received_at: DateTime<Utc>,
    /// Batch-level `sent_at`, when the protocol has one.
    pub sent_at: Option<DateTime<Utc>>,
    /// Batch-level context merged under each event's own (Segment).
    pub context: Option<&'a Map<String, Value>>,
    pub max_event_bytes: usize,
}

/// Corrects a device timestamp for clock skew, only when the device clock is
/// off by more than [`SKEW_TOLERANCE`] (so ordinary network delay never
/// reorders a device's events), then clamps timestamps more than
/// [`FUTURE_TOLERANCE`] ahead. Returns (timestamp, corrected, clamped).
pub fn correct_timestamp(
    original: Option<DateTime<Utc>>,
    sent_at: Option<DateTime<Utc>>,
    received_at: DateTime<Utc>,
) -> (DateTime<Utc>, bool, bool) {
    let Some(original) = original else {
        return (received_at, false, false);
    };
    let (mut timestamp, mut corrected) = (original, false);
    if let Some(sent_at) = sent_at {
        if (sent_at - received_at).abs() > SKEW_TOLERANCE {
            timestamp = received_at - (sent_at - original);
            corrected = true;
        }
    }
    if timestamp > received_at + FUTURE_TOLERANCE {
        return (received_at, corrected, true);
    }
    (timestamp, corrected, false)
}

/// Parses RFC 3339 text, or epoch milliseconds as a number.
pub fn parse_time(value: &Value) -> Option<DateTime<Utc>> {
    match value {
        Value::String(text) => time_from_text(text),
        Value::Number(n) => time_from_millis(n),
        _ => None,
    }
}

fn time_from_text(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn time_from_millis(n: &serde_json::Number) -> Option<DateTime<Utc>> {
    n.as_i64().and_then(DateTime::from_timestamp_millis)
}

/// Longest id (user, anonymous, org, …) accepted, in bytes.
const MAX_ID_BYTES: usize = 512;

/// The id rule for text: blank is absent; `Err` when too long.
fn id_from_text(text: &str) -> Result<Option<&str>, ()> {
    match text {
        _ if text.trim().is_empty() => Ok(None),
        _ if text.len() > MAX_ID_BYTES => Err(()),
        _ => Ok(Some(text)),
    }
}

fn reject(index: usize, code: &'static str, message: impl Into<String>) -> Rejection {
    Rejection {
        index,
        code,
        message: message.into(),
    }
}

/// Reads an optional string-ish id field: strings as they are, numbers as
/// their decimal text (some SDKs send numeric user ids), empty as absent.
fn id_field(
    object: &Map<String, Value>,
    key: &str,
    index: usize,
) -> Result<Option<String>, Rejection> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => match id_from_text(s) {
            Ok(id) => Ok(id.map(str::to_string)),
            Err(()) => Err(reject(
                index,
                "invalid_field",
                format!("{key} is longer than {MAX_ID_BYTES} bytes"),
            )),
        },
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(reject(
            index,
            "invalid_field",
            format!("{key} must be a string"),
        )),
    }
}

/// Moves an object field out of the event (no copy of its contents).
fn take_object(
    object: &mut Map<String, Value>,
    key: &str,
    index: usize,
) -> Result<Map<String, Value>, Rejection> {
    match object.remove(key) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(reject(
            index,
            "invalid_field",
            format!("{key} must be an object"),
        )),
    }
}

fn time_field(
    object: &Map<String, Value>,
    key: &str,
    index: usize,
) -> Result<Option<DateTime<Utc>>, Rejection> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => parse_time(value).map(Some).ok_or_else(|| {
            reject(
                index,
                "invalid_timestamp",
                format!("{key} must be RFC 3339 or epoch milliseconds"),
            )
        }),
    }
}

/// A message id that is a UUID is used as is; any other string maps to a
/// stable UUIDv5, so retries of the same message still dedupe.
fn message_id(
    object: &Map<String, Value>,
    key: &str,
    index: usize,
    strict: bool,
) -> Result<(Uuid, bool), Rejection> {
    match object.get(key) {
        None | Some(Value::Null) => Ok((Uuid::now_v7(), true)),
        Some(Value::String(text)) => match Uuid::parse_str(text) {
            Ok(id) => Ok((id, false)),
            Err(_) if strict => Err(reject(
                index,
                "invalid_event_id",
                format!("{key} must be a UUID"),
            )),
            Err(_) if text.is_empty() || text.len() > 256 => Err(reject(
                index,
                "invalid_event_id",
                format!("{key} must be 1 to 256 characters"),
            )),
            Err(_) => Ok((Uuid::new_v5(&MESSAGE_ID_NAMESPACE, text.as_bytes()), false)),
        },
        Some(_) => Err(reject(
            index,
            "invalid_event_id",
            format!("{key} must be a string"),
        )),
    }
}

/// Fields shared by every wire shape once they are pulled out.
struct Parts {
    event_id: (Uuid, bool),
    kind: EventType,
    event: Option<String>,
    user_id: Option<String>,
    anonymous_id: Option<String>,
    org_id: Option<String>,
    previous_id: Option<String>,
    original_timestamp: Option<DateTime<Utc>>,
    sent_at: Option<DateTime<Utc>>,
    properties: Map<String, Value>,
    traits: Map<String, Value>,
    context: Map<String, Value>,
    schema_version: Option<String>,
}

fn finish(
    parts: Parts,
    index: usize,
    envelope: &Envelope<'_>,
    source: Source,
) -> Result<Event, Rejection> {
    if parts.user_id.is_none() && parts.anonymous_id.is_none() {
        return Err(reject(
            index,
            "missing_identity",
            "an event needs a user_id or an anonymous_id",
        ));
    }
    let event = match (parts.kind, parts.event) {
        (_, Some(name)) if name.len() > 256 => {
            return Err(reject(
                index,
                "invalid_field",
                "event name is longer than 256 bytes",
            ))
        }
        (_, Some(name)) => name,
        (EventType::Track, None) => {
            return Err(reject(
                index,
                "missing_event_name",
                "a track event needs an event name",
            ))
        }
        (kind, None) => format!("${}", kind.as_str()),
    };
    let sent_at = parts.sent_at.or(envelope.sent_at);
    let (timestamp, skew_corrected, future_clamped) =
        correct_timestamp(parts.original_timestamp, sent_at, envelope.received_at);
    let mut context = parts.context;
    if let Some(batch_context) = envelope.context {
        for (key, value) in batch_context {
            context.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
    Ok(Event {
        event_id: parts.event_id.0,
        event_id_generated: parts.event_id.1,
        kind: parts.kind,
        event,
        user_id: parts.user_id,
        anonymous_id: parts.anonymous_id,
        org_id: parts.org_id,
        previous_id: parts.previous_id,
        timestamp,
        original_timestamp: parts.original_timestamp,
        sent_at,
        received_at: envelope.received_at,
        skew_corrected,
        future_clamped,
        properties: parts.properties,
        traits: parts.traits,
        context,
        schema_version: parts.schema_version,
        source,
        schema_violations: Vec::new(),
    })
}

fn into_object(raw: Value, index: usize) -> Result<Map<String, Value>, Rejection> {
    match raw {
        Value::Object(map) => Ok(map),
        _ => Err(reject(
            index,
            "invalid_event",
            "an event must be a JSON object",
        )),
    }
}

fn check_size(raw_len: usize, index: usize, envelope: &Envelope<'_>) -> Result<(), Rejection> {
    if raw_len > envelope.max_event_bytes {
        return Err(reject(
            index,
            "event_too_large",
            format!(
                "the event is {raw_len} bytes; the limit is {}",
                envelope.max_event_bytes
            ),
        ));
    }
    Ok(())
}

/// Decodes one event of the native API (`POST /v1/events`).
pub fn decode_native(
    raw: Value,
    raw_len: usize,
    index: usize,
    envelope: &Envelope<'_>,
) -> Result<Event, Rejection> {
    check_size(raw_len, index, envelope)?;
    let mut object = into_object(raw, index)?;
    let kind = match object.get("type") {
        None | Some(Value::Null) => EventType::Track,
        Some(Value::String(text)) => EventType::parse(text).ok_or_else(|| {
            reject(
                index,
                "invalid_type",
                format!("unknown event type {text:?}"),
            )
        })?,
        Some(_) => return Err(reject(index, "invalid_type", "type must be a string")),
    };
    let mut properties = take_object(&mut object, "properties", index)?;
    if let Some(consent) = object.get("consent").filter(|v| !v.is_null()) {
        properties.insert("$consent".into(), consent.clone());
    }
    let parts = Parts {
        event_id: message_id(&object, "event_id", index, true)?,
        kind,
        event: id_field(&object, "event", index)?,
        user_id: id_field(&object, "user_id", index)?,
        anonymous_id: id_field(&object, "anonymous_id", index)?,
        org_id: id_field(&object, "org_id", index)?,
        previous_id: id_field(&object, "previous_id", index)?,
        original_timestamp: time_field(&object, "timestamp", index)?,
        sent_at: time_field(&object, "sent_at", index)?,
        properties,
        traits: take_object(&mut object, "traits", index)?,
        context: take_object(&mut object, "context", index)?,
        schema_version: id_field(&object, "schema_version", index)?,
    };
    finish(parts, index, envelope, Source::Native)
}

/// Decodes one native event from its JSON text. Well-formed events take a
/// typed path that borrows the top-level strings and builds no map for the
/// envelope; anything irregular (a wrong type, a duplicate key, a field that
/// fails validation) is decoded again by [`decode_native`], so every
/// rejection and every edge case is exactly that function's.
pub fn decode_native_text(
    raw: &str,
    index: usize,
    envelope: &Envelope<'_>,
) -> Result<Event, Rejection> {
    check_size(raw.len(), index, envelope)?;
    if let Some(decoded) = native_fast(raw, index, envelope) {
        return decoded;
    }
    let value: Value =
        serde_json::from_str(raw).map_err(|e| reject(index, "invalid_event", e.to_string()))?;
    decode_native(value, raw.len(), index, envelope)
}

/// A top-level scalar as sent: text (borrowed when it has no escapes) or a
/// number. Any other JSON type fails the typed parse.
enum WireScalar<'a> {
    Text(std::borrow::Cow<'a, str>),
    Number(serde_json::Number),
}

impl<'de: 'a, 'a> Deserialize<'de> for WireScalar<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = WireScalar<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(WireScalar::Text(text.into()))
            }
            fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
                Ok(WireScalar::Text(text.to_string().into()))
            }
            fn visit_string<E>(self, text: String) -> Result<Self::Value, E> {
                Ok(WireScalar::Text(text.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
                Ok(WireScalar::Number(n.into()))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
                Ok(WireScalar::Number(n.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Self::Value, E> {
                serde_json::Number::from_f64(n)
                    .map(WireScalar::Number)
                    .ok_or_else(|| E::custom("not a finite number"))
            }
        }
        deserializer.deserialize_any(Visitor(std::marker::PhantomData))
    }
}

/// The native event's wire shape, for the typed path. Unknown keys are
/// ignored, as [`decode_native`] ignores them; a duplicate key fails the
/// parse (serde's derive refuses it), which sends the event to the map path
/// and its last-one-wins reading.
#[derive(Deserialize)]
struct NativeWire<'a> {
    #[serde(borrow, default)]
    event_id: Option<WireScalar<'a>>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<WireScalar<'a>>,
    #[serde(borrow, default)]
    event: Option<WireScalar<'a>>,
    #[serde(borrow, default)]
    user_id: Option<WireScalar<'a>>,
    #[serde(borrow, default)]
    anonymous_id: Option<WireScalar<'a>>,
    #[serde(borrow, default)]
    org_id: Option<WireScalar<'a>>,
    #[serde(borrow, default)]
    previous_id: Option<WireScalar<'a>>,
    #[serde(borrow, default)]
    timestamp: Option<WireScalar<'a>>,
    #[serde(borrow, default)]
    sent_at: Option<WireScalar<'a>>,
    #[serde(borrow, default)]
    schema_version: Option<WireScalar<'a>>,
    #[serde(default)]
    properties: Option<Map<String, Value>>,
    #[serde(default)]
    traits: Option<Map<String, Value>>,
    #[serde(default)]
    context: Option<Map<String, Value>>,
    #[serde(default)]
    consent: Option<Value>,
}

/// [`id_field`]'s reading of a typed scalar; `None` when irregular.
fn wire_id(value: Option<WireScalar<'_>>) -> Option<Option<String>> {
    match value {
        None => Some(None),
        Some(WireScalar::Text(text)) => match id_from_text(&text).ok()? {
            None => Some(None),
            // The text is kept whole (untrimmed), as `id_field` keeps it.
            Some(_) => Some(Some(text.into_owned())),
        },
        Some(WireScalar::Number(n)) => Some(Some(n.to_string())),
    }
}

/// [`time_field`]'s reading of a typed scalar; `None` when irregular.
fn wire_time(value: Option<WireScalar<'_>>) -> Option<Option<DateTime<Utc>>> {
    match value {
        None => Some(None),
        Some(WireScalar::Text(text)) => time_from_text(&text).map(Some),
        Some(WireScalar::Number(n)) => time_from_millis(&n).map(Some),
    }
}

/// The typed path of [`decode_native_text`]: `None` hands the event to the
/// map path. Once every field is regular, [`finish`] sees the same parts the
/// map path would build, so its answer (an event or a rejection) is final.
fn native_fast(
    raw: &str,
    index: usize,
    envelope: &Envelope<'_>,
) -> Option<Result<Event, Rejection>> {
    let wire: NativeWire<'_> = serde_json::from_str(raw).ok()?;
    let kind = match wire.kind {
        None => EventType::Track,
        Some(WireScalar::Text(text)) => EventType::parse(&text)?,
        Some(WireScalar::Number(_)) => return None,
    };
    let event_id = match wire.event_id {
        None => (Uuid::now_v7(), true),
        Some(WireScalar::Text(text)) => (Uuid::parse_str(&text).ok()?, false),
        Some(WireScalar::Number(_)) => return None,
    };
    let mut properties = wire.properties.unwrap_or_default();
    if let Some(consent) = wire.consent {
        properties.insert("$consent".into(), consent);
    }
    let parts = Parts {
        event_id,
        kind,
        event: wire_id(wire.event)?,
        user_id: wire_id(wire.user_id)?,
        anonymous_id: wire_id(wire.anonymous_id)?,
        org_id: wire_id(wire.org_id)?,
        previous_id: wire_id(wire.previous_id)?,
        original_timestamp: wire_time(wire.timestamp)?,
        sent_at: wire_time(wire.sent_at)?,
        properties,
        traits: wire.traits.unwrap_or_default(),
        context: wire.context.unwrap_or_default(),
        schema_version: wire_id(wire.schema_version)?,
    };
    Some(finish(parts, index, envelope, Source::Native))
}

/// Decodes one Segment message (`/v1/batch` item or a single-call body).
/// `call` is the type implied by the endpoint (`/v1/track` → track); batch
/// items carry their own `type`.
pub fn decode_segment(
    raw: Value,
    raw_len: usize,
    index: usize,
    call: Option<EventType>,
    envelope: &Envelope<'_>,
) -> Result<Event, Rejection> {
    check_size(raw_len, index, envelope)?;
    let mut object = into_object(raw, index)?;
    let kind = match (call, object.get("type").and_then(Value::as_str)) {
        (Some(kind), _) => kind,
        (None, Some(text)) => EventType::parse(text).ok_or_else(|| {
            reject(
                index,
                "invalid_type",
                format!("unknown event type {text:?}"),
            )
        })?,
        (None, None) => return Err(reject(index, "invalid_type", "a batch item needs a type")),
    };
    let name = match kind {
        EventType::Track => id_field(&object, "event", index)?,
        EventType::Page | EventType::Screen => id_field(&object, "name", index)?,
        _ => None,
    };
    let org_id = match kind {
        EventType::Group => id_field(&object, "groupId", index)?,
        _ => None,
    };
    let properties = take_object(&mut object, "properties", index)?;
    let parts = Parts {
        event_id: message_id(&object, "messageId", index, false)?,
        kind,
        event: name,
        user_id: id_field(&object, "userId", index)?,
        anonymous_id: id_field(&object, "anonymousId", index)?,
        org_id,
        previous_id: id_field(&object, "previousId", index)?,
        original_timestamp: time_field(&object, "timestamp", index)?.or(time_field(
            &object,
            "originalTimestamp",
            index,
        )?),
        sent_at: time_field(&object, "sentAt", index)?,
        properties,
        traits: take_object(&mut object, "traits", index)?,
        context: take_object(&mut object, "context", index)?,
        schema_version: None,
    };
    finish(parts, index, envelope, Source::Segment)
}

/// Decodes one PostHog capture event. PostHog has one id, `distinct_id`; it
/// becomes `user_id`. `$identify` with `$anon_distinct_id` and
/// `$create_alias` link the other id to it; `$groups` names the org.
pub fn decode_posthog(
    raw: Value,
    raw_len: usize,
    index: usize,
    envelope: &Envelope<'_>,
) -> Result<Event, Rejection> {
    check_size(raw_len, index, envelope)?;
    let mut object = into_object(raw, index)?;
    let mut properties = take_object(&mut object, "properties", index)?;
    let distinct_id = id_field(&object, "distinct_id", index)?
        .or(id_field(&properties, "distinct_id", index)?)
        .ok_or_else(|| {
            reject(
                index,
                "missing_identity",
                "a PostHog event needs a distinct_id",
            )
        })?;
    let name = id_field(&object, "event", index)?.ok_or_else(|| {
        reject(
            index,
            "missing_event_name",
            "a PostHog event needs an event name",
        )
    })?;
    let (kind, anonymous_id, previous_id) = match name.as_str() {
        "$identify" => (
            EventType::Identify,
            id_field(&properties, "$anon_distinct_id", index)?,
            None,
        ),
        "$create_alias" => (
            EventType::Alias,
            None,
            id_field(&properties, "alias", index)?,
        ),
        "$pageview" => (EventType::Page, None, None),
        "$screen" => (EventType::Screen, None, None),
        "$groupidentify" => (EventType::Group, None, None),
        _ => (EventType::Track, None, None),
    };
    // `$groups: {"company": "acme"}`: the first group is the org.
    let org_id = properties
        .get("$groups")
        .and_then(Value::as_object)
        .and_then(|groups| groups.values().find_map(|v| v.as_str().map(str::to_string)))
        .or_else(|| match kind {
            EventType::Group => properties
                .get("$group_key")
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        });
    let kind = if kind == EventType::Track && org_id.is_some() && name == "$groupidentify" {
        EventType::Group
    } else {
        kind
    };
    let mut traits = Map::new();
    for key in ["$set", "$set_once"] {
        if let Some(Value::Object(set)) = properties.remove(key) {
            for (k, v) in set {
                traits.entry(k).or_insert(v);
            }
        }
    }
    let mut context = Map::new();
    if let Some(lib) = properties.get("$lib").cloned() {
        context.insert(
            "library".into(),
            serde_json::json!({ "name": lib, "version": properties.get("$lib_version") }),
        );
    }
    if let Some(ip) = properties.get("$ip").cloned() {
        context.insert("ip".into(), ip);
    }
    let parts = Parts {
        event_id: message_id(&object, "uuid", index, false)?,
        kind,
        event: Some(name),
        user_id: Some(distinct_id),
        anonymous_id,
        org_id,
        previous_id,
        original_timestamp: time_field(&object, "timestamp", index)?,
        sent_at: time_field(&object, "sent_at", index)?,
        properties,
        traits,
        context,
        schema_version: None,
    };
    finish(parts, index, envelope, Source::Posthog)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn t(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 31, h, m, s).unwrap()
    }

    fn envelope() -> Envelope<'static> {
        Envelope {
            received_at: t(12, 0, 0),
            sent_at: None,
            context: None,
            max_event_bytes: 32 * 1024,
        }
    }

    #[test]
    fn small_skew_keeps_device_time_so_network_delay_never_reorders() {
        // Sent 30 s "late" per the device: within tolerance, no correction.
        let (ts, corrected, clamped) =
            correct_timestamp(Some(t(11, 59, 0)), Some(t(11, 59, 30)), t(12, 0, 0));
        assert_eq!((ts, corrected, clamped), (t(11, 59, 0), false, false));
        // Exactly at the tolerance: still no correction.
        let (ts, corrected, _) =
            correct_timestamp(Some(t(11, 0, 0)), Some(t(11, 59, 0)), t(12, 0, 0));
        assert_eq!((ts, corrected), (t(11, 0, 0), false));
    }

    #[test]
    fn large_skew_is_corrected_from_sent_at() {
        // Device clock 2 h behind: happened 10 s before sending.
        let (ts, corrected, clamped) =
            correct_timestamp(Some(t(9, 59, 50)), Some(t(10, 0, 0)), t(12, 0, 0));
        assert_eq!((ts, corrected, clamped), (t(11, 59, 50), true, false));
        // Device clock ahead by 3 h.
        let (ts, corrected, _) =
            correct_timestamp(Some(t(14, 59, 0)), Some(t(15, 0, 0)), t(12, 0, 0));
        assert_eq!((ts, corrected), (t(11, 59, 0), true));
    }

    #[test]
    fn far_future_timestamps_are_clamped_and_flagged() {
        let (ts, corrected, clamped) = correct_timestamp(Some(t(13, 0, 1)), None, t(12, 0, 0));
        assert_eq!((ts, corrected, clamped), (t(12, 0, 0), false, true));
        let (ts, _, clamped) = correct_timestamp(Some(t(13, 0, 0)), None, t(12, 0, 0));
        assert_eq!(
            (ts, clamped),
            (t(13, 0, 0), false),
            "exactly one hour ahead is allowed"
        );
        assert_eq!(
            correct_timestamp(None, None, t(12, 0, 0)),
            (t(12, 0, 0), false, false)
        );
    }

    #[test]
    fn times_parse_from_rfc3339_and_epoch_millis() {
        assert_eq!(
            parse_time(&json!("2026-03-31T12:00:00Z")),
            Some(t(12, 0, 0))
        );
        assert_eq!(
            parse_time(&json!("2026-03-31T14:00:00+02:00")),
            Some(t(12, 0, 0))
        );
        assert_eq!(
            parse_time(&json!(t(12, 0, 0).timestamp_millis())),
            Some(t(12, 0, 0))
        );
        assert_eq!(parse_time(&json!("yesterday")), None);
        assert_eq!(parse_time(&json!(true)), None);
    }

    #[test]
    fn native_events_decode_and_mint_ids() {
        let raw = json!({"type": "track", "event": "project_created", "user_id": "u1", "properties": {"n": 3}});
        let event = decode_native(raw.clone(), 80, 0, &envelope()).unwrap();
        assert_eq!(event.kind, EventType::Track);
        assert_eq!(event.event, "project_created");
        assert!(event.event_id_generated);
        assert_eq!(event.event_id.get_version_num(), 7);
        assert_eq!(event.timestamp, t(12, 0, 0));
        assert_eq!(event.properties["n"], 3);

        let id = Uuid::new_v4();
        let raw = json!({"event_id": id, "type": "identify", "user_id": 42, "anonymous_id": "a1", "traits": {"plan": "free"}});
        let event = decode_native(raw.clone(), 80, 0, &envelope()).unwrap();
        assert_eq!((event.event_id, event.event_id_generated), (id, false));
        assert_eq!(event.user_id.as_deref(), Some("42"));
        assert_eq!(event.event, "$identify");
        assert_eq!(
            event.effects(),
            vec![
                Effect::LinkIdentity {
                    alias: "a1".into(),
                    user_id: "42".into()
                },
                Effect::SetTraits {
                    distinct_id: "42".into(),
                    traits: json!({"plan": "free"}).as_object().unwrap().clone(),
                }
            ]
        );
    }

    /// The stored form leaves out absent, false and empty fields and reads
    /// back as the same event, whether fields are set or not.
    #[test]
    fn stored_json_is_compact_and_reads_back_the_same_event() {
        let env = envelope();
        let sparse = decode_native_text(r#"{"event":"x","user_id":"u"}"#, 0, &env).unwrap();
        let text = sparse.to_stored_json().unwrap();
        for absent in [
            "anonymous_id",
            "org_id",
            "previous_id",
            "original_timestamp",
            "sent_at",
            "skew_corrected",
            "future_clamped",
            "properties",
            "traits",
            "context",
            "schema_version",
            "schema_violations",
        ] {
            assert!(
                !text.contains(&format!("\"{absent}\"")),
                "{absent} in {text}"
            );
        }
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), sparse);

        let mut full = decode_native_text(
            r#"{"type":"identify","event_id":"0192f3a4-5b6c-7d8e-9f01-23456789abcd","user_id":"u",
                "anonymous_id":"a","org_id":"o","previous_id":"p","timestamp":"2026-11-22T09:00:00Z",
                "sent_at":"2026-11-22T11:00:00Z","properties":{"n":1},"traits":{"plan":"pro"},
                "context":{"ip":"1.2.3.4"},"schema_version":"3"}"#,
            0,
            &env,
        )
        .unwrap();
        full.future_clamped = true;
        full.schema_violations = vec!["missing plan".into()];
        assert!(full.skew_corrected, "sent_at is an hour off");
        let text = full.to_stored_json().unwrap();
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), full);
        // The full form (the API's) reads back the same too.
        let api = serde_json::to_string(&full).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&api).unwrap(), full);
    }

    /// The typed path and the map path agree on every input, accepted or
    /// rejected; regular events take the typed path.
    #[test]
    fn native_text_decoding_matches_the_map_decoder() {
        let id = "0192f3a4-5b6c-7d8e-9f01-23456789abcd";
        let regular = [
            r#"{"type":"track","event":"project_created","user_id":"u1","properties":{"n":3,"nested":{"a":[1,2.5,null]}}}"#.to_string(),
            format!(r#"{{"event_id":"{id}","type":"identify","user_id":42,"anonymous_id":"a1","traits":{{"plan":"free"}}}}"#),
            r#"{"event":"caf\u00e9 \"quoted\"","anonymous_id":"an\\on","timestamp":1764000000000,"sent_at":"2026-11-22T12:05:00Z"}"#.to_string(),
            r#"{"event":"x","user_id":4.5,"org_id":"acme","consent":{"analytics":true},"context":{"ip":"1.2.3.4"},"schema_version":"2"}"#.to_string(),
            r#"{"type":null,"event":"x","user_id":"u","anonymous_id":"  ","properties":null,"traits":null,"consent":null,"unknown":[{}]}"#.to_string(),
            r#"{"type":"alias","user_id":"u","previous_id":"old","timestamp":"2026-11-22T11:00:00+02:00"}"#.to_string(),
            r#"{"type":"track","user_id":"u"}"#.to_string(),
            r#"{"type":"page","user_id":"u","timestamp":"2099-01-01T00:00:00Z"}"#.to_string(),
        ];
        let irregular = [
            r#"{"event":"x","user_id":"u","user_id":"v"}"#.to_string(),
            r#"{"event":"x","user_id":true}"#.to_string(),
            r#"{"event":"x","user_id":"u","type":7}"#.to_string(),
            r#"{"event":"x","user_id":"u","type":"shout"}"#.to_string(),
            r#"{"event":"x","user_id":"u","event_id":"not-a-uuid"}"#.to_string(),
            r#"{"event":"x","user_id":"u","event_id":5}"#.to_string(),
            r#"{"event":"x","user_id":"u","timestamp":"soon"}"#.to_string(),
            r#"{"event":"x","user_id":"u","timestamp":1.5}"#.to_string(),
            r#"{"event":"x","user_id":"u","properties":[1]}"#.to_string(),
            format!(r#"{{"event":"x","user_id":"{}"}}"#, "u".repeat(513)),
            "[1]".to_string(),
            "{\"event\":".to_string(),
        ];
        let env = envelope();
        let by_map = |text: &str| {
            serde_json::from_str::<Value>(text)
                .map_err(|e| reject(0, "invalid_event", e.to_string()))
                .and_then(|value| decode_native(value, text.len(), 0, &env))
        };
        // Minted ids differ between two decodes; everything else must not.
        let comparable = |decoded: Result<Event, Rejection>| {
            decoded.map(|mut event| {
                if event.event_id_generated {
                    event.event_id = Uuid::nil();
                }
                event
            })
        };
        for text in regular.iter().chain(&irregular) {
            assert_eq!(
                comparable(decode_native_text(text, 0, &env)),
                comparable(by_map(text)),
                "{text}"
            );
        }
        for text in &regular {
            assert!(native_fast(text, 0, &env).is_some(), "typed path: {text}");
        }
        for text in &irregular {
            assert!(native_fast(text, 0, &env).is_none(), "map path: {text}");
        }
        let big = decode_native_text(&format!(r#"{{"event":"{}"}}"#, "x".repeat(40_000)), 7, &env);
        assert_eq!(big.unwrap_err().code, "event_too_large");
    }

    #[test]
    fn native_rejections_have_codes() {
        let cases = [
            (json!([1]), "invalid_event"),
            (
                json!({"type": "track", "user_id": "u"}),
                "missing_event_name",
            ),
            (json!({"type": "track", "event": "x"}), "missing_identity"),
            (
                json!({"type": "shout", "event": "x", "user_id": "u"}),
                "invalid_type",
            ),
            (
                json!({"event_id": "not-a-uuid", "event": "x", "user_id": "u"}),
                "invalid_event_id",
            ),
            (
                json!({"event": "x", "user_id": "u", "timestamp": "soon"}),
                "invalid_timestamp",
            ),
            (
                json!({"event": "x", "user_id": "u", "properties": [1]}),
                "invalid_field",
            ),
            (json!({"event": "x", "user_id": {"id": 1}}), "invalid_field"),
        ];
        for (raw, code) in cases {
            assert_eq!(
                decode_native(raw.clone(), 10, 3, &envelope())
                    .unwrap_err()
                    .code,
                code,
                "{raw}"
            );
        }
        let big = decode_native(json!({}), 40_000, 7, &envelope()).unwrap_err();
        assert_eq!((big.index, big.code), (7, "event_too_large"));
    }

    #[test]
    fn segment_messages_map_their_fields() {
        let batch_context = json!({"library": {"name": "analytics-python"}, "ip": "1.2.3.4"});
        let env = Envelope {
            sent_at: Some(t(12, 0, 0)),
            context: batch_context.as_object(),
            ..envelope()
        };
        let raw = json!({"type": "track", "event": "Signed Up", "userId": "u1", "anonymousId": "a1",
            "messageId": "ajs-next-123", "timestamp": "2026-03-31T11:59:59Z", "context": {"ip": "5.6.7.8"}});
        let event = decode_segment(raw.clone(), 100, 0, None, &env).unwrap();
        assert_eq!(event.event, "Signed Up");
        assert_eq!(
            event.event_id,
            Uuid::new_v5(&MESSAGE_ID_NAMESPACE, b"ajs-next-123"),
            "stable id for retries"
        );
        assert_eq!(
            event.context["ip"], "5.6.7.8",
            "the event's own context wins"
        );
        assert_eq!(
            event.context["library"]["name"], "analytics-python",
            "batch context merges in"
        );
        assert_eq!(event.timestamp, t(11, 59, 59));

        let alias = decode_segment(
            json!({"previousId": "a1", "userId": "u1"}),
            10,
            0,
            Some(EventType::Alias),
            &env,
        )
        .unwrap();
        assert_eq!(
            alias.effects(),
            vec![Effect::LinkIdentity {
                alias: "a1".into(),
                user_id: "u1".into()
            }]
        );
        let group = decode_segment(
            json!({"groupId": "acme", "userId": "u1"}),
            10,
            0,
            Some(EventType::Group),
            &env,
        )
        .unwrap();
        assert_eq!(group.org_id.as_deref(), Some("acme"));
        assert_eq!(
            group.effects(),
            vec![Effect::JoinOrg {
                distinct_id: "u1".into(),
                org_id: "acme".into()
            }]
        );
        let page = decode_segment(
            json!({"name": "Pricing", "anonymousId": "a1"}),
            10,
            0,
            Some(EventType::Page),
            &env,
        )
        .unwrap();
        assert_eq!(page.event, "Pricing");
        assert_eq!(
            decode_segment(json!({"userId": "u"}), 10, 0, None, &env)
                .unwrap_err()
                .code,
            "invalid_type"
        );
    }

    #[test]
    fn posthog_events_map_identify_alias_and_groups() {
        let env = envelope();
        let identify = json!({"event": "$identify", "distinct_id": "user-1", "uuid": Uuid::new_v4(),
            "properties": {"$anon_distinct_id": "anon-1", "$set": {"email": "a@b.c"}}});
        let event = decode_posthog(identify.clone(), 10, 0, &env).unwrap();
        assert_eq!(event.kind, EventType::Identify);
        assert_eq!(event.traits["email"], "a@b.c");
        assert_eq!(
            event.effects(),
            vec![
                Effect::LinkIdentity {
                    alias: "anon-1".into(),
                    user_id: "user-1".into()
                },
                Effect::SetTraits {
                    distinct_id: "user-1".into(),
                    traits: json!({"email": "a@b.c"}).as_object().unwrap().clone(),
                }
            ]
        );

        let alias = json!({"event": "$create_alias", "distinct_id": "user-1", "properties": {"alias": "other"}});
        assert_eq!(
            decode_posthog(alias.clone(), 10, 0, &env)
                .unwrap()
                .effects(),
            vec![Effect::LinkIdentity {
                alias: "other".into(),
                user_id: "user-1".into()
            }]
        );

        let grouped = json!({"event": "clicked", "properties": {"distinct_id": "u2", "$groups": {"company": "acme"}}});
        let event = decode_posthog(grouped.clone(), 10, 0, &env).unwrap();
        assert_eq!(
            (event.user_id.as_deref(), event.org_id.as_deref()),
            (Some("u2"), Some("acme"))
        );

        assert_eq!(
            decode_posthog(json!({"event": "x"}), 10, 0, &env)
                .unwrap_err()
                .code,
            "missing_identity"
        );
        assert_eq!(
            decode_posthog(json!({"distinct_id": "u"}), 10, 0, &env)
                .unwrap_err()
                .code,
            "missing_event_name"
        );
    }

    #[test]
    fn prepare_applies_consent_then_schema_then_privacy() {
        use crate::privacy::{ProjectSettings, SchemaMode};
        use crate::project::{Project, ProjectId};
        use crate::schemas::{EventSchema, PropertyType};
        use crate::snapshot::ProjectConfig;

        let mut config = ProjectConfig {
            project: Project {
                id: ProjectId::new_v7(),
                name: "p".into(),
                created_at: t(0, 0, 0),
            },
            keys: vec![],
            settings: ProjectSettings::default(),
            schemas: [(
                "signup".to_string(),
                EventSchema {
                    event: "signup".into(),
                    version: 4,
                    required: [("plan".to_string(), PropertyType::String)].into(),
                },
            )]
            .into(),
            flags: Default::default(),
            flag_entries: Vec::new(),
            catalog: Default::default(),
            catalog_version: 0,
            activation: Default::default(),
            prompts: Default::default(),
        };
        let raw = json!({"event": "signup", "user_id": "u", "context": {"ip": "10.1.2.3"},
                         "properties": {"note": "a@b.co"}});
        let decoded = || decode_native(raw.clone(), 10, 0, &envelope()).unwrap();

        // Defaults: schema off, IP truncated, PII redacted.
        let Prepared::Store(event) = prepare(decoded(), 0, &config) else {
            panic!()
        };
        assert_eq!(event.context["ip"], "10.1.2.0");
        assert_eq!(event.properties["note"], "[redacted:email]");
        assert!(event.schema_violations.is_empty());

        config.settings.schema_mode = SchemaMode::Warn;
        let Prepared::Store(event) = prepare(decoded(), 0, &config) else {
            panic!()
        };
        assert_eq!(event.schema_violations, vec!["missing property `plan`"]);
        assert!(matches!(
            event.effects().as_slice(),
            [Effect::RecordSchemaViolation { .. }]
        ));

        config.settings.schema_mode = SchemaMode::Enforce;
        let Prepared::Rejected(rejection) = prepare(decoded(), 5, &config) else {
            panic!()
        };
        assert_eq!((rejection.index, rejection.code), (5, "schema_violation"));
        assert!(rejection.message.contains("schema version 4"));

        // Consent comes first: without it nothing else matters.
        config.settings.require_analytics_consent = true;
        assert_eq!(prepare(decoded(), 0, &config), Prepared::DroppedNoConsent);
    }
}
