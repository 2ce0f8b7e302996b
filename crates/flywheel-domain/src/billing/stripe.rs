//! Stripe webhooks: signature verification and the subscription facts an
//! event carries.
//!
//! Three steps, all pure (the caller passes the raw body, the header, the
//! secrets and the time):
//!
//! 1. [`verify_signature`] checks the `Stripe-Signature` header against the
//!    raw body, before anything trusts it.
//! 2. [`parse_event`] reads the envelope ([`StripeEvent`]).
//! 3. [`interpret`] turns the event into a [`StripeFact`]: what it says about
//!    a subscription, a checkout or an invoice, in Flywheel's terms. Applying
//!    the fact to an org (and ordering by [`StripeEvent::created`], since
//!    Stripe does not deliver in order) is the caller's job.
//!
//! Stripe has changed where some fields live over API versions; the reader
//! accepts both shapes where noted, so a webhook endpoint pinned to an older
//! version keeps working.

use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use super::catalog::{Catalog, PlanDefinition};
use super::org::SubscriptionStatus;
use crate::error::DomainError;

type HmacSha256 = Hmac<Sha256>;

/// How far a signature's timestamp may be from now (Stripe's default).
pub const DEFAULT_TOLERANCE: Duration = Duration::seconds(300);

/// Why a `Stripe-Signature` header was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header has no `t=` entry.
    #[error("the Stripe-Signature header has no timestamp (`t=`)")]
    MissingTimestamp,
    /// The header is empty, has an entry without `=`, several `t=` entries,
    /// or a `t=` that is not a whole number.
    #[error("the Stripe-Signature header is malformed")]
    MalformedHeader,
    /// The header has no `v1=` entry (only `v0`, or unknown schemes).
    #[error("the Stripe-Signature header has no v1 signature")]
    NoV1Signature,
    /// The signature is valid but its timestamp is too far from now: a
    /// replay, or a clock out of sync.
    #[error("the Stripe-Signature timestamp is outside the tolerance")]
    TimestampOutsideTolerance,
    /// No `v1` signature matches the body under any of the secrets.
    #[error("no signature in the Stripe-Signature header matches the payload")]
    SignatureMismatch,
}

impl SignatureError {
    /// A stable, machine-readable code (logged, and safe to return).
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::MissingTimestamp => "missing_timestamp",
            SignatureError::MalformedHeader => "malformed_header",
            SignatureError::NoV1Signature => "no_v1_signature",
            SignatureError::TimestampOutsideTolerance => "timestamp_outside_tolerance",
            SignatureError::SignatureMismatch => "signature_mismatch",
        }
    }
}

/// The MAC of `"{t}.{payload}"` under `secret`. `t` is the timestamp exactly
/// as written in the header: that text is what the sender signed.
fn mac_for(secret: &str, t: &str, payload: &[u8]) -> HmacSha256 {
    // Stripe's libraries use the whole `whsec_...` string as the key bytes.
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac
}

/// A `Stripe-Signature` header value (`t=...,v1=...`) for `payload`, as
/// Stripe would send it. For tests, and for signing payloads the server's
/// own test suite replays.
pub fn sign(payload: &[u8], secret: &str, t: i64) -> String {
    let signature = mac_for(secret, &t.to_string(), payload)
        .finalize()
        .into_bytes();
    format!("t={t},v1={}", hex::encode(signature))
}

/// Verifies a `Stripe-Signature` header against the raw request body and
/// returns its timestamp `t`.
///
/// * The signed payload is `"{t}.{body}"`, HMAC-SHA256, hex-encoded, as
///   Stripe documents. Any `v1` entry matching under any of `secrets` is
///   enough: during a secret rotation Stripe signs with both the old and the
///   new secret, and the endpoint may hold both. `v0` and unknown schemes are
///   ignored; a `v1` that is not hex simply does not match. Empty secrets
///   are skipped (an HMAC with an empty key is one anyone can compute).
/// * The comparison is constant-time ([`Mac::verify_slice`]).
/// * The timestamp is checked after the signature, as Stripe's libraries do,
///   so `timestamp_outside_tolerance` always means "authentic but stale (or
///   early)". Unlike Stripe's libraries, which reject only timestamps older
///   than the tolerance, this rejects both `now - t > tolerance` (a replay)
///   and `t - now > tolerance` (a future timestamp: a clock out of sync, or a
///   signature minted to be replayed later). A difference of exactly
///   `tolerance` is accepted.
pub fn verify_signature(
    header: &str,
    payload: &[u8],
    secrets: &[&str],
    now: DateTime<Utc>,
    tolerance: Duration,
) -> Result<i64, SignatureError> {
    let header = parse_header(header)?;
    let authentic = secrets
        .iter()
        .filter(|secret| !secret.is_empty())
        .any(|secret| {
            let mac = mac_for(secret, header.t_text, payload);
            header
                .v1
                .iter()
                .any(|signature| mac.clone().verify_slice(signature).is_ok())
        });
    if !authentic {
        return Err(SignatureError::SignatureMismatch);
    }
    let skew = now.timestamp().saturating_sub(header.t).unsigned_abs();
    if skew > tolerance.num_seconds().max(0).unsigned_abs() {
        return Err(SignatureError::TimestampOutsideTolerance);
    }
    Ok(header.t)
}

struct SignatureHeader<'h> {
    t: i64,
    /// The timestamp as written, which is what was signed.
    t_text: &'h str,
    /// The decoded `v1` signatures (entries that are not hex are dropped).
    v1: Vec<Vec<u8>>,
}

fn parse_header(header: &str) -> Result<SignatureHeader<'_>, SignatureError> {
    let mut t = None;
    let mut v1 = Vec::new();
    let mut saw_v1 = false;
    // Stripe separates entries with `,`; tolerate spaces around them.
    for item in header.split(',').map(str::trim) {
        let (key, value) = item
            .split_once('=')
            .ok_or(SignatureError::MalformedHeader)?;
        match key.trim() {
            "t" => {
                // Two timestamps would make "what was signed" ambiguous.
                if t.is_some() {
                    return Err(SignatureError::MalformedHeader);
                }
                let value = value.trim();
                let parsed: i64 = value.parse().map_err(|_| SignatureError::MalformedHeader)?;
                t = Some((parsed, value));
            }
            "v1" => {
                saw_v1 = true;
                if let Ok(bytes) = hex::decode(value.trim()) {
                    v1.push(bytes);
                }
            }
            // `v0` (Stripe's test scheme) and schemes we do not know.
            _ => {}
        }
    }
    let (t, t_text) = t.ok_or(SignatureError::MissingTimestamp)?;
    if !saw_v1 {
        return Err(SignatureError::NoV1Signature);
    }
    Ok(SignatureHeader { t, t_text, v1 })
}

/// The envelope of a Stripe event.
#[derive(Debug, Clone, PartialEq)]
pub struct StripeEvent {
    /// `evt_...`: the caller deduplicates on it (Stripe retries deliveries).
    pub id: String,
    /// The event's `type`, e.g. `customer.subscription.updated`.
    pub kind: String,
    /// When Stripe created the event: orders events, which may arrive out
    /// of order.
    pub created: DateTime<Utc>,
    pub livemode: bool,
    /// `data.object`: the object as it was when the event happened.
    pub object: Value,
    /// `data.previous_attributes`, on `*.updated` events.
    pub previous_attributes: Option<Value>,
}

fn invalid_event(message: impl Into<String>) -> DomainError {
    DomainError::invalid("invalid_stripe_event", message)
}

/// Reads a Stripe event from the raw (verified) request body. `id`, `type`,
/// `created` and `data.object` are required; `livemode` defaults to false.
pub fn parse_event(payload: &[u8]) -> Result<StripeEvent, DomainError> {
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| invalid_event(format!("the body is not JSON: {e}")))?;
    let Value::Object(mut root) = value else {
        return Err(invalid_event("the body is not a JSON object"));
    };
    let id = non_empty_str(root.get("id"))
        .ok_or_else(|| invalid_event("`id` is missing or not a string"))?
        .to_string();
    let kind = non_empty_str(root.get("type"))
        .ok_or_else(|| invalid_event("`type` is missing or not a string"))?
        .to_string();
    let created = timestamp(root.get("created"))
        .ok_or_else(|| invalid_event("`created` is missing or not a Unix timestamp"))?;
    let livemode = match root.get("livemode") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(livemode)) => *livemode,
        Some(_) => return Err(invalid_event("`livemode` is not a boolean")),
    };
    let Some(Value::Object(mut data)) = root.remove("data") else {
        return Err(invalid_event("`data` is missing or not an object"));
    };
    let object = match data.remove("object") {
        Some(object @ Value::Object(_)) => object,
        _ => return Err(invalid_event("`data.object` is missing or not an object")),
    };
    let previous_attributes = data
        .remove("previous_attributes")
        .filter(|attributes| !attributes.is_null());
    Ok(StripeEvent {
        id,
        kind,
        created,
        livemode,
        object,
        previous_attributes,
    })
}

/// What an event tells Flywheel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StripeFact {
    /// The subscription's current state (checkout.session.completed carries
    /// only ids: see [`StripeFact::CheckoutCompleted`]).
    Subscription(SubscriptionFact),
    /// `checkout.session.completed`: links an org (`client_reference_id`,
    /// else `metadata.org_id`) to a customer and a subscription id.
    CheckoutCompleted {
        org_id: Option<String>,
        customer_id: Option<String>,
        subscription_id: Option<String>,
    },
    /// `invoice.paid`
    InvoicePaid {
        customer_id: Option<String>,
        subscription_id: Option<String>,
    },
    /// `invoice.payment_failed`
    PaymentFailed {
        customer_id: Option<String>,
        subscription_id: Option<String>,
    },
    /// Any other type (or a subscription event without an id): acknowledged,
    /// nothing to do.
    Ignored,
}

/// A subscription's state, as a `customer.subscription.*` event carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionFact {
    pub subscription_id: String,
    pub customer_id: Option<String>,
    /// `metadata.org_id` of the subscription, when the product set it.
    pub org_id: Option<String>,
    pub status: SubscriptionStatus,
    /// The price ids of the subscription items (`items.data[].price.id`,
    /// falling back to `items.data[].plan.id`, then the top-level `plan.id`),
    /// in order, without duplicates.
    pub price_ids: Vec<String>,
    /// The current period, read from the subscription items (where it lives
    /// since API version 2025-03-31 "basil"), falling back to the older
    /// top-level `current_period_start`/`current_period_end`.
    pub current_period_start: Option<DateTime<Utc>>,
    pub current_period_end: Option<DateTime<Utc>>,
    pub cancel_at_period_end: bool,
    /// `cancel_at`, if set.
    pub cancel_at: Option<DateTime<Utc>>,
    /// `trial_end`, if the subscription has (or had) a trial.
    pub trial_end: Option<DateTime<Utc>>,
    /// The event is `customer.subscription.deleted`.
    pub deleted: bool,
}

/// What `event` says, in Flywheel's terms. Never fails: fields Flywheel
/// cannot read come back as `None`, and types it does not handle as
/// [`StripeFact::Ignored`], so the endpoint can acknowledge every event.
pub fn interpret(event: &StripeEvent) -> StripeFact {
    let object = &event.object;
    match event.kind.as_str() {
        "customer.subscription.created" | "customer.subscription.updated" => {
            subscription_fact(object, false)
        }
        "customer.subscription.deleted" => subscription_fact(object, true),
        "checkout.session.completed" => StripeFact::CheckoutCompleted {
            org_id: non_empty_str(object.get("client_reference_id"))
                .or_else(|| metadata_org_id(object))
                .map(str::to_string),
            customer_id: id_of(object.get("customer")),
            subscription_id: id_of(object.get("subscription")),
        },
        "invoice.paid" => StripeFact::InvoicePaid {
            customer_id: id_of(object.get("customer")),
            subscription_id: invoice_subscription(object),
        },
        "invoice.payment_failed" => StripeFact::PaymentFailed {
            customer_id: id_of(object.get("customer")),
            subscription_id: invoice_subscription(object),
        },
        _ => StripeFact::Ignored,
    }
}

fn subscription_fact(object: &Value, deleted: bool) -> StripeFact {
    let Some(subscription_id) = id_of(object.get("id")) else {
        return StripeFact::Ignored;
    };
    let items: &[Value] = object
        .pointer("/items/data")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let mut price_ids: Vec<String> = Vec::new();
    for item in items {
        if let Some(id) = id_of(item.get("price")).or_else(|| id_of(item.get("plan"))) {
            if !price_ids.contains(&id) {
                price_ids.push(id);
            }
        }
    }
    if price_ids.is_empty() {
        // Legacy single-plan subscriptions.
        price_ids.extend(id_of(object.get("plan")));
    }
    // Since "basil" the period is per item; items of one subscription share
    // the billing cycle, so the first item that has one speaks for all.
    let period = |field: &str| {
        items
            .iter()
            .find_map(|item| timestamp(item.get(field)))
            .or_else(|| timestamp(object.get(field)))
    };
    let status = if deleted {
        SubscriptionStatus::Canceled
    } else {
        object
            .get("status")
            .and_then(Value::as_str)
            .map_or(SubscriptionStatus::Incomplete, map_status)
    };
    StripeFact::Subscription(SubscriptionFact {
        subscription_id,
        customer_id: id_of(object.get("customer")),
        org_id: metadata_org_id(object).map(str::to_string),
        status,
        price_ids,
        current_period_start: period("current_period_start"),
        current_period_end: period("current_period_end"),
        cancel_at_period_end: object
            .get("cancel_at_period_end")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        cancel_at: timestamp(object.get("cancel_at")),
        trial_end: timestamp(object.get("trial_end")),
        deleted,
    })
}

/// Stripe's subscription status in Flywheel's terms. Unknown statuses (a
/// newer API) map to `Incomplete`: no paid access until Flywheel knows
/// better.
fn map_status(status: &str) -> SubscriptionStatus {
    match status {
        "active" => SubscriptionStatus::Active,
        "trialing" => SubscriptionStatus::Trialing,
        "past_due" => SubscriptionStatus::PastDue,
        "canceled" => SubscriptionStatus::Canceled,
        "unpaid" | "incomplete_expired" => SubscriptionStatus::Unpaid,
        _ => SubscriptionStatus::Incomplete,
    }
}

/// The subscription an invoice belongs to: `parent.subscription_details
/// .subscription` since 2025 ("basil"), top-level `subscription` before.
fn invoice_subscription(invoice: &Value) -> Option<String> {
    id_of(invoice.get("subscription"))
        .or_else(|| id_of(invoice.pointer("/parent/subscription_details/subscription")))
}

/// The first plan any of `price_ids` maps to in the catalog.
pub fn plan_for_prices<'c>(
    catalog: &'c Catalog,
    price_ids: &[String],
) -> Option<&'c PlanDefinition> {
    price_ids
        .iter()
        .find_map(|price| catalog.plan_by_stripe_price(price))
}

fn non_empty_str(value: Option<&Value>) -> Option<&str> {
    value.and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// An id that may be a string or, when the sender expanded it, an object
/// with an `id`.
fn id_of(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::Object(object) => non_empty_str(object.get("id")),
        other => non_empty_str(Some(other)),
    }
    .map(str::to_string)
}

fn metadata_org_id(object: &Value) -> Option<&str> {
    non_empty_str(object.pointer("/metadata/org_id"))
}

/// A Unix timestamp in whole seconds (Stripe's format for every time).
fn timestamp(value: Option<&Value>) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(value?.as_i64()?, 0)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::billing::catalog::CatalogDocument;
    use crate::error::ErrorKind;

    const SECRET: &str = "whsec_test_5WbX5kEWLlfzsGNjH64I8lOOqUB6e8FH";
    const OLD_SECRET: &str = "whsec_test_oldoldoldoldoldoldoldoldoldoldol";
    const T: i64 = 1_735_689_600; // 2025-01-01T00:00:00Z

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    fn body() -> Vec<u8> {
        br#"{"id":"evt_1","object":"event","type":"invoice.paid"}"#.to_vec()
    }

    fn v1(payload: &[u8], secret: &str, t: i64) -> String {
        sign(payload, secret, t)
            .split_once(",v1=")
            .unwrap()
            .1
            .to_string()
    }

    fn verify(
        header: &str,
        payload: &[u8],
        secrets: &[&str],
        now: i64,
    ) -> Result<i64, SignatureError> {
        verify_signature(header, payload, secrets, at(now), DEFAULT_TOLERANCE)
    }

    // ---- signatures ----

    #[test]
    fn a_signed_payload_verifies_and_returns_its_timestamp() {
        let header = sign(&body(), SECRET, T);
        assert!(header.starts_with(&format!("t={T},v1=")));
        assert_eq!(verify(&header, &body(), &[SECRET], T + 5), Ok(T));
    }

    #[test]
    fn the_signature_is_stripes_hmac_sha256_of_t_dot_body() {
        // Computed independently of `mac_for`, so a change to the scheme
        // shows up here.
        let mut mac = HmacSha256::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{T}.").as_bytes());
        mac.update(&body());
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(v1(&body(), SECRET, T), expected);
        assert_eq!(expected.len(), 64);
    }

    #[test]
    fn any_matching_v1_entry_is_enough() {
        // During a rotation Stripe signs with both secrets.
        let header = format!(
            "t={T},v1={},v1={},v0={}",
            v1(&body(), OLD_SECRET, T),
            v1(&body(), SECRET, T),
            "6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39",
        );
        assert_eq!(verify(&header, &body(), &[SECRET], T), Ok(T));
        assert_eq!(verify(&header, &body(), &[OLD_SECRET], T), Ok(T));
        // Extra entries that are not hex, or unknown schemes, are ignored.
        let header = format!(
            "t={T}, v1=zz-not-hex, v9=abc, v1={}",
            v1(&body(), SECRET, T)
        );
        assert_eq!(verify(&header, &body(), &[SECRET], T), Ok(T));
    }

    #[test]
    fn any_of_several_secrets_may_verify() {
        let header = sign(&body(), OLD_SECRET, T);
        assert_eq!(verify(&header, &body(), &[SECRET, OLD_SECRET], T), Ok(T));
        assert_eq!(
            verify(&header, &body(), &[SECRET], T),
            Err(SignatureError::SignatureMismatch)
        );
        assert_eq!(
            verify(&header, &body(), &[], T),
            Err(SignatureError::SignatureMismatch)
        );
    }

    #[test]
    fn an_empty_secret_never_verifies() {
        let header = sign(&body(), "", T);
        assert_eq!(
            verify(&header, &body(), &[""], T),
            Err(SignatureError::SignatureMismatch)
        );
    }

    #[test]
    fn a_tampered_body_is_rejected() {
        let header = sign(&body(), SECRET, T);
        let tampered = br#"{"id":"evt_1","object":"event","type":"invoice.paid "}"#;
        assert_eq!(
            verify(&header, tampered, &[SECRET], T),
            Err(SignatureError::SignatureMismatch)
        );
    }

    #[test]
    fn a_tampered_timestamp_is_rejected() {
        let signature = v1(&body(), SECRET, T);
        let header = format!("t={},v1={signature}", T + 1);
        assert_eq!(
            verify(&header, &body(), &[SECRET], T),
            Err(SignatureError::SignatureMismatch)
        );
    }

    #[test]
    fn a_wrong_secret_is_rejected() {
        let header = sign(&body(), "whsec_someone_else", T);
        assert_eq!(
            verify(&header, &body(), &[SECRET], T),
            Err(SignatureError::SignatureMismatch)
        );
    }

    #[test]
    fn stale_timestamps_are_rejected_past_the_tolerance() {
        let header = sign(&body(), SECRET, T);
        assert_eq!(verify(&header, &body(), &[SECRET], T + 300), Ok(T));
        assert_eq!(
            verify(&header, &body(), &[SECRET], T + 301),
            Err(SignatureError::TimestampOutsideTolerance)
        );
        // A custom tolerance.
        assert_eq!(
            verify_signature(
                &header,
                &body(),
                &[SECRET],
                at(T + 30),
                Duration::seconds(10)
            ),
            Err(SignatureError::TimestampOutsideTolerance)
        );
    }

    #[test]
    fn future_timestamps_are_rejected_past_the_tolerance() {
        let header = sign(&body(), SECRET, T);
        assert_eq!(verify(&header, &body(), &[SECRET], T - 300), Ok(T));
        assert_eq!(
            verify(&header, &body(), &[SECRET], T - 301),
            Err(SignatureError::TimestampOutsideTolerance)
        );
    }

    #[test]
    fn the_signature_is_checked_before_the_timestamp() {
        // A forged, stale header is a mismatch, not a timing problem.
        let header = sign(&body(), "whsec_forged", T);
        assert_eq!(
            verify(&header, &body(), &[SECRET], T + 10_000),
            Err(SignatureError::SignatureMismatch)
        );
    }

    #[test]
    fn malformed_headers_are_rejected() {
        let signature = v1(&body(), SECRET, T);
        for header in [
            String::new(),
            "garbage".to_string(),
            format!("t={T},{signature}"),
            format!("t=yesterday,v1={signature}"),
            format!("t=1.5,v1={signature}"),
            format!("t={T},t={T},v1={signature}"),
        ] {
            assert_eq!(
                verify(&header, &body(), &[SECRET], T),
                Err(SignatureError::MalformedHeader),
                "{header:?}"
            );
        }
    }

    #[test]
    fn a_header_without_a_timestamp_is_rejected() {
        let header = format!("v1={}", v1(&body(), SECRET, T));
        assert_eq!(
            verify(&header, &body(), &[SECRET], T),
            Err(SignatureError::MissingTimestamp)
        );
    }

    #[test]
    fn a_header_with_only_v0_is_rejected() {
        let header = format!("t={T},v0={}", v1(&body(), SECRET, T));
        assert_eq!(
            verify(&header, &body(), &[SECRET], T),
            Err(SignatureError::NoV1Signature)
        );
    }

    #[test]
    fn error_codes_are_stable() {
        let codes: Vec<&str> = [
            SignatureError::MissingTimestamp,
            SignatureError::MalformedHeader,
            SignatureError::NoV1Signature,
            SignatureError::TimestampOutsideTolerance,
            SignatureError::SignatureMismatch,
        ]
        .iter()
        .map(SignatureError::code)
        .collect();
        assert_eq!(
            codes,
            [
                "missing_timestamp",
                "malformed_header",
                "no_v1_signature",
                "timestamp_outside_tolerance",
                "signature_mismatch"
            ]
        );
    }

    // ---- events ----

    fn envelope(kind: &str, object: Value) -> Value {
        json!({
            "id": "evt_1QmFj2LkdIwHu7ix0a1b2c3d",
            "object": "event",
            "api_version": "2025-03-31.basil",
            "created": T,
            "livemode": false,
            "pending_webhooks": 1,
            "request": {"id": "req_8a7b6c5d4e3f", "idempotency_key": null},
            "type": kind,
            "data": {"object": object}
        })
    }

    fn parsed(value: &Value) -> StripeEvent {
        parse_event(&serde_json::to_vec(value).unwrap()).unwrap()
    }

    fn fact(kind: &str, object: Value) -> StripeFact {
        interpret(&parsed(&envelope(kind, object)))
    }

    fn subscription(kind: &str, object: Value) -> SubscriptionFact {
        match fact(kind, object) {
            StripeFact::Subscription(fact) => fact,
            other => panic!("expected a subscription fact, got {other:?}"),
        }
    }

    /// A subscription in the current ("basil") shape: periods on the items.
    fn basil_subscription() -> Value {
        json!({
            "id": "sub_1QmFiyLkdIwHu7ixK3pD9q2Z",
            "object": "subscription",
            "billing_cycle_anchor": T,
            "cancel_at": null,
            "cancel_at_period_end": false,
            "canceled_at": null,
            "collection_method": "charge_automatically",
            "created": T,
            "currency": "usd",
            "customer": "cus_RfT0aXb1c2d3e4",
            "items": {
                "object": "list",
                "data": [{
                    "id": "si_RfT0Q1w2e3r4t5",
                    "object": "subscription_item",
                    "created": T,
                    "current_period_start": T,
                    "current_period_end": T + 31 * 86_400,
                    "price": {
                        "id": "price_pro_m",
                        "object": "price",
                        "active": true,
                        "currency": "usd",
                        "product": "prod_RfSzAbCdEf",
                        "recurring": {"interval": "month", "interval_count": 1},
                        "unit_amount": 2900
                    },
                    "quantity": 1,
                    "subscription": "sub_1QmFiyLkdIwHu7ixK3pD9q2Z"
                }],
                "has_more": false,
                "url": "/v1/subscription_items?subscription=sub_1QmFiyLkdIwHu7ixK3pD9q2Z"
            },
            "livemode": false,
            "metadata": {"org_id": "org_42"},
            "start_date": T,
            "status": "active"
        })
    }

    /// The same subscription as an older API version sends it: periods at the
    /// top level, items carrying the legacy `plan` alongside `price`.
    fn legacy_subscription() -> Value {
        json!({
            "id": "sub_1MowQVLkdIwHu7ixeRlqHVzs",
            "object": "subscription",
            "cancel_at": T + 20 * 86_400,
            "cancel_at_period_end": true,
            "created": T - 86_400,
            "current_period_start": T - 86_400,
            "current_period_end": T + 30 * 86_400,
            "customer": {"id": "cus_NffrFeUfNV2Hib", "object": "customer", "email": "a@b.example"},
            "items": {
                "object": "list",
                "data": [{
                    "id": "si_NcLYdDxLHxlFo7",
                    "object": "subscription_item",
                    "plan": {"id": "price_team_y", "object": "plan", "interval": "year"},
                    "quantity": 3
                }]
            },
            "metadata": {},
            "plan": {"id": "price_team_y", "object": "plan"},
            "status": "trialing",
            "trial_end": T + 13 * 86_400
        })
    }

    #[test]
    fn an_event_envelope_parses() {
        let mut value = envelope("customer.subscription.updated", basil_subscription());
        value["data"]["previous_attributes"] = json!({"status": "trialing"});
        value["livemode"] = json!(true);
        let event = parsed(&value);
        assert_eq!(event.id, "evt_1QmFj2LkdIwHu7ix0a1b2c3d");
        assert_eq!(event.kind, "customer.subscription.updated");
        assert_eq!(event.created, at(T));
        assert!(event.livemode);
        assert_eq!(event.object["id"], "sub_1QmFiyLkdIwHu7ixK3pD9q2Z");
        assert_eq!(
            event.previous_attributes,
            Some(json!({"status": "trialing"}))
        );

        let mut value = envelope("customer.subscription.created", basil_subscription());
        value.as_object_mut().unwrap().remove("livemode");
        let event = parsed(&value);
        assert!(!event.livemode);
        assert_eq!(event.previous_attributes, None);
    }

    #[test]
    fn malformed_events_are_rejected_naming_what_is_wrong() {
        let cases: Vec<(Vec<u8>, &str)> =
            vec![
            (b"{not json".to_vec(), "not JSON"),
            (b"[]".to_vec(), "not a JSON object"),
            (br#"{"type":"x","created":1,"data":{"object":{}}}"#.to_vec(), "`id`"),
            (br#"{"id":"evt_1","created":1,"data":{"object":{}}}"#.to_vec(), "`type`"),
            (br#"{"id":"evt_1","type":"x","data":{"object":{}}}"#.to_vec(), "`created`"),
            (
                br#"{"id":"evt_1","type":"x","created":"yesterday","data":{"object":{}}}"#
                    .to_vec(),
                "`created`",
            ),
            (
                br#"{"id":"evt_1","type":"x","created":1,"livemode":"no","data":{"object":{}}}"#
                    .to_vec(),
                "`livemode`",
            ),
            (br#"{"id":"evt_1","type":"x","created":1}"#.to_vec(), "`data`"),
            (br#"{"id":"evt_1","type":"x","created":1,"data":{}}"#.to_vec(), "`data.object`"),
            (
                br#"{"id":"evt_1","type":"x","created":1,"data":{"object":"sub_1"}}"#.to_vec(),
                "`data.object`",
            ),
        ];
        for (body, needle) in cases {
            let error = parse_event(&body).unwrap_err();
            assert_eq!(error.kind, ErrorKind::Invalid);
            assert_eq!(error.code, "invalid_stripe_event");
            assert!(
                error.message.contains(needle),
                "{needle} not in {:?}",
                error.message
            );
        }
    }

    #[test]
    fn a_subscription_in_the_current_shape_reads_periods_from_its_items() {
        let fact = subscription("customer.subscription.created", basil_subscription());
        assert_eq!(
            fact,
            SubscriptionFact {
                subscription_id: "sub_1QmFiyLkdIwHu7ixK3pD9q2Z".into(),
                customer_id: Some("cus_RfT0aXb1c2d3e4".into()),
                org_id: Some("org_42".into()),
                status: SubscriptionStatus::Active,
                price_ids: vec!["price_pro_m".into()],
                current_period_start: Some(at(T)),
                current_period_end: Some(at(T + 31 * 86_400)),
                cancel_at_period_end: false,
                cancel_at: None,
                trial_end: None,
                deleted: false,
            }
        );
    }

    #[test]
    fn a_subscription_in_the_legacy_shape_reads_top_level_periods_and_plans() {
        let fact = subscription("customer.subscription.updated", legacy_subscription());
        assert_eq!(
            fact,
            SubscriptionFact {
                subscription_id: "sub_1MowQVLkdIwHu7ixeRlqHVzs".into(),
                // Expanded customer object.
                customer_id: Some("cus_NffrFeUfNV2Hib".into()),
                org_id: None,
                status: SubscriptionStatus::Trialing,
                price_ids: vec!["price_team_y".into()],
                current_period_start: Some(at(T - 86_400)),
                current_period_end: Some(at(T + 30 * 86_400)),
                cancel_at_period_end: true,
                cancel_at: Some(at(T + 20 * 86_400)),
                trial_end: Some(at(T + 13 * 86_400)),
                deleted: false,
            }
        );
    }

    #[test]
    fn item_periods_win_over_top_level_ones() {
        let mut object = basil_subscription();
        object["current_period_start"] = json!(T - 999);
        object["current_period_end"] = json!(T + 999);
        let fact = subscription("customer.subscription.updated", object);
        assert_eq!(fact.current_period_start, Some(at(T)));
        assert_eq!(fact.current_period_end, Some(at(T + 31 * 86_400)));
    }

    #[test]
    fn price_ids_cover_every_item_and_fall_back_to_the_top_level_plan() {
        let mut object = basil_subscription();
        object["items"]["data"] = json!([
            {"id": "si_1", "price": {"id": "price_pro_m"}},
            {"id": "si_2", "price": {"id": "price_seats"}, "plan": {"id": "plan_ignored"}},
            {"id": "si_3", "plan": {"id": "plan_legacy"}},
            {"id": "si_4", "price": {"id": "price_pro_m"}},
            {"id": "si_5"}
        ]);
        let fact = subscription("customer.subscription.updated", object);
        assert_eq!(
            fact.price_ids,
            ["price_pro_m", "price_seats", "plan_legacy"]
        );
        // No items or periods at all: the top-level plan, and no period.
        let object = json!({
            "id": "sub_old", "object": "subscription", "status": "active",
            "customer": "cus_1", "plan": {"id": "plan_gold"}
        });
        let fact = subscription("customer.subscription.updated", object);
        assert_eq!(fact.price_ids, ["plan_gold"]);
        assert_eq!(fact.current_period_start, None);
        assert_eq!(fact.current_period_end, None);
    }

    #[test]
    fn a_deleted_subscription_is_canceled_whatever_its_status() {
        let mut object = basil_subscription();
        object["status"] = json!("active");
        object["canceled_at"] = json!(T + 100);
        object["ended_at"] = json!(T + 100);
        let fact = subscription("customer.subscription.deleted", object);
        assert!(fact.deleted);
        assert_eq!(fact.status, SubscriptionStatus::Canceled);
        assert_eq!(fact.org_id.as_deref(), Some("org_42"));
    }

    #[test]
    fn stripe_statuses_map_to_flywheels() {
        for (stripe, expected) in [
            ("active", SubscriptionStatus::Active),
            ("trialing", SubscriptionStatus::Trialing),
            ("past_due", SubscriptionStatus::PastDue),
            ("canceled", SubscriptionStatus::Canceled),
            ("unpaid", SubscriptionStatus::Unpaid),
            ("incomplete", SubscriptionStatus::Incomplete),
            ("incomplete_expired", SubscriptionStatus::Unpaid),
            ("paused", SubscriptionStatus::Incomplete),
            ("some_future_status", SubscriptionStatus::Incomplete),
        ] {
            let mut object = basil_subscription();
            object["status"] = json!(stripe);
            let fact = subscription("customer.subscription.updated", object);
            assert_eq!(fact.status, expected, "{stripe}");
        }
        let mut object = basil_subscription();
        object.as_object_mut().unwrap().remove("status");
        let fact = subscription("customer.subscription.updated", object);
        assert_eq!(fact.status, SubscriptionStatus::Incomplete);
    }

    #[test]
    fn a_subscription_event_without_an_id_is_ignored() {
        let mut object = basil_subscription();
        object.as_object_mut().unwrap().remove("id");
        assert_eq!(
            fact("customer.subscription.updated", object),
            StripeFact::Ignored
        );
    }

    /// An invoice in the current shape: the subscription under `parent`.
    fn basil_invoice() -> Value {
        json!({
            "id": "in_1QmFk0LkdIwHu7ixAbCdEfGh",
            "object": "invoice",
            "amount_due": 2900,
            "amount_paid": 2900,
            "billing_reason": "subscription_cycle",
            "currency": "usd",
            "customer": "cus_RfT0aXb1c2d3e4",
            "parent": {
                "type": "subscription_details",
                "quote_details": null,
                "subscription_details": {
                    "metadata": {"org_id": "org_42"},
                    "subscription": "sub_1QmFiyLkdIwHu7ixK3pD9q2Z"
                }
            },
            "status": "paid"
        })
    }

    /// An invoice as older API versions send it.
    fn legacy_invoice() -> Value {
        json!({
            "id": "in_1MtHbELkdIwHu7ixl4OzzPMv",
            "object": "invoice",
            "amount_due": 2900,
            "attempt_count": 1,
            "billing_reason": "subscription_cycle",
            "customer": {"id": "cus_NffrFeUfNV2Hib", "object": "customer"},
            "paid": false,
            "status": "open",
            "subscription": "sub_1MowQVLkdIwHu7ixeRlqHVzs"
        })
    }

    #[test]
    fn invoice_events_read_the_subscription_in_both_shapes() {
        assert_eq!(
            fact("invoice.paid", basil_invoice()),
            StripeFact::InvoicePaid {
                customer_id: Some("cus_RfT0aXb1c2d3e4".into()),
                subscription_id: Some("sub_1QmFiyLkdIwHu7ixK3pD9q2Z".into()),
            }
        );
        assert_eq!(
            fact("invoice.payment_failed", legacy_invoice()),
            StripeFact::PaymentFailed {
                customer_id: Some("cus_NffrFeUfNV2Hib".into()),
                subscription_id: Some("sub_1MowQVLkdIwHu7ixeRlqHVzs".into()),
            }
        );
        // Expanded subscription under `parent`.
        let mut invoice = basil_invoice();
        invoice["parent"]["subscription_details"]["subscription"] =
            json!({"id": "sub_expanded", "object": "subscription"});
        assert_eq!(
            fact("invoice.payment_failed", invoice),
            StripeFact::PaymentFailed {
                customer_id: Some("cus_RfT0aXb1c2d3e4".into()),
                subscription_id: Some("sub_expanded".into()),
            }
        );
        // A one-off invoice: no subscription anywhere.
        let invoice = json!({
            "id": "in_oneoff", "object": "invoice", "customer": "cus_1",
            "parent": null, "subscription": null
        });
        assert_eq!(
            fact("invoice.paid", invoice),
            StripeFact::InvoicePaid {
                customer_id: Some("cus_1".into()),
                subscription_id: None,
            }
        );
    }

    fn checkout_session() -> Value {
        json!({
            "id": "cs_test_a1b2c3d4e5f6g7h8",
            "object": "checkout.session",
            "client_reference_id": "org_42",
            "customer": "cus_RfT0aXb1c2d3e4",
            "metadata": {"org_id": "org_from_metadata"},
            "mode": "subscription",
            "payment_status": "paid",
            "status": "complete",
            "subscription": "sub_1QmFiyLkdIwHu7ixK3pD9q2Z"
        })
    }

    #[test]
    fn a_completed_checkout_links_an_org_to_its_customer_and_subscription() {
        assert_eq!(
            fact("checkout.session.completed", checkout_session()),
            StripeFact::CheckoutCompleted {
                org_id: Some("org_42".into()),
                customer_id: Some("cus_RfT0aXb1c2d3e4".into()),
                subscription_id: Some("sub_1QmFiyLkdIwHu7ixK3pD9q2Z".into()),
            }
        );
        // Without a client reference: metadata.org_id; expanded ids.
        let mut session = checkout_session();
        session["client_reference_id"] = Value::Null;
        session["customer"] = json!({"id": "cus_expanded", "object": "customer"});
        session["subscription"] = json!({"id": "sub_expanded", "object": "subscription"});
        assert_eq!(
            fact("checkout.session.completed", session),
            StripeFact::CheckoutCompleted {
                org_id: Some("org_from_metadata".into()),
                customer_id: Some("cus_expanded".into()),
                subscription_id: Some("sub_expanded".into()),
            }
        );
        // Neither: no org.
        let session =
            json!({"id": "cs_test_x", "object": "checkout.session", "client_reference_id": ""});
        assert_eq!(
            fact("checkout.session.completed", session),
            StripeFact::CheckoutCompleted {
                org_id: None,
                customer_id: None,
                subscription_id: None,
            }
        );
    }

    #[test]
    fn other_event_types_are_ignored() {
        for kind in [
            "customer.created",
            "invoice.created",
            "payment_intent.succeeded",
            "customer.subscription.trial_will_end",
        ] {
            assert_eq!(
                fact(kind, json!({"id": "x_1"})),
                StripeFact::Ignored,
                "{kind}"
            );
        }
    }

    #[test]
    fn a_signed_event_flows_end_to_end() {
        let payload = serde_json::to_vec(&envelope(
            "customer.subscription.updated",
            basil_subscription(),
        ))
        .unwrap();
        let header = sign(&payload, SECRET, T);
        assert_eq!(verify(&header, &payload, &[SECRET], T + 1), Ok(T));
        let event = parse_event(&payload).unwrap();
        let StripeFact::Subscription(fact) = interpret(&event) else {
            panic!("expected a subscription fact");
        };
        assert_eq!(fact.price_ids, ["price_pro_m"]);
    }

    // ---- plans ----

    #[test]
    fn the_first_price_with_a_plan_picks_it() {
        let document: CatalogDocument = serde_json::from_value(json!({
            "features": [{"key": "sso", "kind": "boolean"}],
            "plans": [
                {"key": "free", "default": true},
                {"key": "pro", "stripe_price_ids": ["price_pro_m", "price_pro_y"],
                 "features": {"sso": {}}},
                {"key": "team", "stripe_price_ids": ["price_team_y"]}
            ]
        }))
        .unwrap();
        let catalog = Catalog::compile(document).unwrap();
        let ids = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let key = |ids: Vec<String>| plan_for_prices(&catalog, &ids).map(|p| p.key.clone());
        assert_eq!(
            key(ids(&["price_seats", "price_pro_y"])),
            Some("pro".into())
        );
        assert_eq!(
            key(ids(&["price_team_y", "price_pro_m"])),
            Some("team".into())
        );
        assert_eq!(key(ids(&["price_seats"])), None);
        assert_eq!(key(ids(&[])), None);
    }
}
