//! Privacy applied to every event before it is stored: consent, IP
//! reduction, and PII redaction. Pure: the project's settings come in as an
//! argument.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::events::Event;

/// What to keep of a client IP address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum IpHandling {
    /// Keep the network only: IPv4 /24, IPv6 /48.
    #[default]
    Truncate,
    /// Store no IP at all.
    Drop,
    /// Store the address as sent.
    Keep,
}

/// How events are checked against the project's event schemas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SchemaMode {
    #[default]
    Off,
    /// Store the event and record the violation for review.
    Warn,
    /// Reject the event (the rest of its batch proceeds).
    Enforce,
}

/// Per-project privacy and validation settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default, deny_unknown_fields)]
pub struct ProjectSettings {
    /// Drop (and count) events that do not carry analytics consent.
    pub require_analytics_consent: bool,
    pub ip_handling: IpHandling,
    /// Redact email addresses, phone numbers and card numbers (Luhn-valid)
    /// found in event property values.
    pub pii_detectors: bool,
    /// Property names (case-insensitive, at any depth) whose values are always redacted.
    pub pii_denylist: Vec<String>,
    pub schema_mode: SchemaMode,
    /// Publishable-key reads of one user's data (the live stream, `decide`,
    /// prompts) must carry `user_hash`, the user id signed with the
    /// project's identity secret. Off by default: then knowing a user id is
    /// enough to read that user's prompts.
    pub identity_verification: bool,
}

impl Default for ProjectSettings {
    fn default() -> Self {
        Self {
            require_analytics_consent: false,
            ip_handling: IpHandling::Truncate,
            pii_detectors: true,
            pii_denylist: [
                "password",
                "passwd",
                "secret",
                "ssn",
                "card_number",
                "credit_card",
                "cvv",
            ]
            .map(String::from)
            .to_vec(),
            schema_mode: SchemaMode::Off,
            identity_verification: false,
        }
    }
}

pub const REDACTED: &str = "[redacted]";

/// Whether the event may be stored under the project's consent rule.
/// Analytics consent is read from the native `consent` field
/// (`{"analytics": true}`) or Segment's
/// `context.consent.categoryPreferences` (category names compared
/// case-insensitively).
pub fn has_analytics_consent(event: &Event) -> bool {
    let native = event.properties.get("$consent");
    let segment = event
        .context
        .get("consent")
        .and_then(|c| c.get("categoryPreferences"));
    [native, segment].into_iter().flatten().any(|preferences| {
        preferences
            .as_object()
            .map(|map| {
                map.iter()
                    .any(|(k, v)| k.eq_ignore_ascii_case("analytics") && v == &Value::Bool(true))
            })
            .unwrap_or(false)
    })
}

/// Reduces or removes IP addresses in `context.ip` and `properties.$ip`.
pub fn reduce_ips(event: &mut Event, handling: IpHandling) {
    for map in [&mut event.context, &mut event.properties] {
        for key in ["ip", "$ip"] {
            match handling {
                IpHandling::Keep => {}
                IpHandling::Drop => {
                    map.remove(key);
                }
                IpHandling::Truncate => {
                    if let Some(Value::String(text)) = map.get(key) {
                        let reduced = truncate_ip(text).unwrap_or_default();
                        if reduced.is_empty() {
                            map.remove(key);
                        } else {
                            map.insert(key.to_string(), Value::String(reduced));
                        }
                    }
                }
            }
        }
    }
}

/// `203.0.113.77` → `203.0.113.0`; `2001:db8:85a3:8d3::1` → `2001:db8:85a3::`.
/// `None` for text that is not an address (it is then removed).
pub fn truncate_ip(text: &str) -> Option<String> {
    match text.trim().parse::<IpAddr>().ok()? {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            Some(std::net::Ipv4Addr::new(a, b, c, 0).to_string())
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            Some(std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0).to_string())
        }
    }
}

/// Redacts denylisted properties and detected PII in `properties`. Traits
/// are left alone: an identify's email is the product's own record of its
/// user, sent on purpose.
pub fn redact_pii(event: &mut Event, settings: &ProjectSettings) -> usize {
    let denylist: Vec<String> = settings
        .pii_denylist
        .iter()
        .map(|k| k.to_ascii_lowercase())
        .collect();
    let mut count = 0;
    redact_map(
        &mut event.properties,
        &denylist,
        settings.pii_detectors,
        &mut count,
    );
    count
}

fn redact_map(map: &mut Map<String, Value>, denylist: &[String], detect: bool, count: &mut usize) {
    for (key, value) in map.iter_mut() {
        if key.starts_with('$') && key != "$set" {
            continue; // SDK bookkeeping ($lib, $consent, …)
        }
        if denylist.iter().any(|d| key.eq_ignore_ascii_case(d)) {
            if !value.is_null() {
                *value = Value::String(REDACTED.into());
                *count += 1;
            }
            continue;
        }
        redact_value(value, denylist, detect, count);
    }
}

fn redact_value(value: &mut Value, denylist: &[String], detect: bool, count: &mut usize) {
    match value {
        Value::Object(map) => redact_map(map, denylist, detect, count),
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| redact_value(v, denylist, detect, count)),
        Value::String(text) if detect => {
            if let Some(clean) = scrub_text(text) {
                *text = clean;
                *count += 1;
            }
        }
        _ => {}
    }
}

/// Replaces email addresses, card numbers and phone numbers inside `text`;
/// `None` when there was nothing to replace.
pub fn scrub_text(text: &str) -> Option<String> {
    // Fast path for the common case: no `@` and too few digits for any detector.
    if !text.contains('@') && text.bytes().filter(u8::is_ascii_digit).count() < 10 {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    for (i, token) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let trimmed = token
            .trim_matches(|c: char| matches!(c, ',' | ';' | '(' | ')' | '<' | '>' | '"' | '\''));
        if is_email(trimmed) {
            out.push_str(&token.replace(trimmed, "[redacted:email]"));
            changed = true;
        } else {
            out.push_str(token);
        }
    }
    let after_email = if changed { out } else { text.to_string() };
    let (after_numbers, numbers_changed) = scrub_numbers(&after_email);
    (changed || numbers_changed).then_some(after_numbers)
}

fn is_email(token: &str) -> bool {
    let Some((local, domain)) = token.split_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._%+-".contains(c));
    let (name, tld) = match domain.rsplit_once('.') {
        Some(parts) => parts,
        None => return false,
    };
    local_ok
        && !name.is_empty()
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        && tld.len() >= 2
        && tld.chars().all(|c| c.is_ascii_alphabetic())
}

/// Finds runs of digits with common separators; a run of 13–19 digits that
/// passes Luhn is a card number, 10–15 digits starting with `+` or written
/// with phone separators is a phone number.
fn scrub_numbers(text: &str) -> (String, bool) {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut i = 0;
    while i < chars.len() {
        let starts_run = chars[i].is_ascii_digit()
            || (chars[i] == '+' && chars.get(i + 1).is_some_and(char::is_ascii_digit));
        let preceded_by_word = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if !starts_run || preceded_by_word {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let mut end = i;
        let mut digits = String::new();
        while end < chars.len() {
            let c = chars[end];
            let separator = matches!(c, ' ' | '-' | '.' | '(' | ')') || (c == '+' && end == i);
            // A space only continues a number when a digit or `(` follows it.
            let space_ends_number = c == ' '
                && !chars
                    .get(end + 1)
                    .is_some_and(|n| n.is_ascii_digit() || *n == '(');
            if c.is_ascii_digit() {
                digits.push(c);
            } else if !separator || space_ends_number {
                break;
            }
            end += 1;
        }
        // Do not swallow trailing separators.
        while end > i && !chars[end - 1].is_ascii_digit() {
            end -= 1;
        }
        let run: String = chars[i..end].iter().collect();
        let followed_by_word = chars
            .get(end)
            .is_some_and(|c| c.is_alphanumeric() || *c == '_');
        let has_phone_shape = run.starts_with('+')
            || run.contains('(')
            || run.contains('-')
            || run.contains(' ')
            || run.contains('.');
        let replacement = if followed_by_word {
            None
        } else if (13..=19).contains(&digits.len()) && luhn_valid(&digits) {
            Some("[redacted:card]")
        } else if (10..=15).contains(&digits.len()) && has_phone_shape && !looks_like_date(&run) {
            Some("[redacted:phone]")
        } else {
            None
        };
        match replacement {
            Some(r) => {
                out.push_str(r);
                changed = true;
            }
            None => out.push_str(&run),
        }
        i = end.max(i + 1);
    }
    (out, changed)
}

fn looks_like_date(run: &str) -> bool {
    // 2026-03-31 12:00, 2026.03.31: a 4-digit year first.
    run.len() >= 10
        && run.as_bytes()[..4].iter().all(u8::is_ascii_digit)
        && matches!(run.as_bytes()[4], b'-' | b'.')
}

/// The Luhn checksum card numbers carry.
pub fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0;
    for (i, c) in digits.chars().rev().enumerate() {
        let Some(mut d) = c.to_digit(10) else {
            return false;
        };
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    !digits.is_empty() && sum % 10 == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{decode_native, Envelope};
    use chrono::Utc;
    use serde_json::json;

    fn event(raw: Value) -> Event {
        let env = Envelope {
            received_at: Utc::now(),
            sent_at: None,
            context: None,
            max_event_bytes: 1 << 20,
        };
        decode_native(raw.clone(), 10, 0, &env).unwrap()
    }

    #[test]
    fn luhn() {
        assert!(luhn_valid("4111111111111111"));
        assert!(luhn_valid("79927398713"));
        assert!(!luhn_valid("4111111111111112"));
        assert!(!luhn_valid(""));
    }

    #[test]
    fn ips_are_truncated_dropped_or_kept() {
        assert_eq!(truncate_ip("203.0.113.77").as_deref(), Some("203.0.113.0"));
        assert_eq!(
            truncate_ip("2001:db8:85a3:8d3:1319:8a2e:370:7348").as_deref(),
            Some("2001:db8:85a3::")
        );
        assert_eq!(truncate_ip("not an ip"), None);
        let raw = json!({"event": "e", "user_id": "u", "context": {"ip": "198.51.100.9"}, "properties": {"$ip": "198.51.100.10"}});
        let mut truncated = event(raw.clone());
        reduce_ips(&mut truncated, IpHandling::Truncate);
        assert_eq!(truncated.context["ip"], "198.51.100.0");
        assert_eq!(truncated.properties["$ip"], "198.51.100.0");
        let mut dropped = event(raw.clone());
        reduce_ips(&mut dropped, IpHandling::Drop);
        assert!(dropped.context.get("ip").is_none() && dropped.properties.get("$ip").is_none());
        let mut kept = event(raw);
        reduce_ips(&mut kept, IpHandling::Keep);
        assert_eq!(kept.context["ip"], "198.51.100.9");
    }

    #[test]
    fn detectors_redact_emails_cards_and_phones_in_text() {
        assert_eq!(
            scrub_text("contact ada@example.com now").as_deref(),
            Some("contact [redacted:email] now")
        );
        assert_eq!(
            scrub_text("card 4111 1111 1111 1111 ok").as_deref(),
            Some("card [redacted:card] ok")
        );
        assert_eq!(
            scrub_text("4111-1111-1111-1111").as_deref(),
            Some("[redacted:card]")
        );
        assert_eq!(
            scrub_text("call +1 (415) 555-2671").as_deref(),
            Some("call [redacted:phone]")
        );
        assert_eq!(
            scrub_text("call 415-555-2671.").as_deref(),
            Some("call [redacted:phone].")
        );
        // Not PII: plain numbers, dates, versions, ids, a Luhn-invalid 16 digits.
        for clean in [
            "order 12345",
            "2026-03-31 12:00:00",
            "v1.2.3",
            "user_4111111111111111",
            "4111111111111112",
            "no at sign",
            "a@b",
        ] {
            assert_eq!(scrub_text(clean), None, "{clean}");
        }
    }

    #[test]
    fn redaction_covers_nested_properties_and_the_denylist_but_not_traits() {
        let mut e = event(json!({"event": "e", "user_id": "u",
            "properties": {"note": "mail me: bob@example.org", "Password": "hunter2", "nested": {"cards": ["5555555555554444"]}, "$lib": "x@y.zz"},
            "traits": {"email": "bob@example.org"}}));
        let count = redact_pii(&mut e, &ProjectSettings::default());
        assert_eq!(count, 3);
        assert_eq!(e.properties["note"], "mail me: [redacted:email]");
        assert_eq!(e.properties["Password"], REDACTED);
        assert_eq!(e.properties["nested"]["cards"][0], "[redacted:card]");
        assert_eq!(e.properties["$lib"], "x@y.zz", "SDK fields are left alone");
        assert_eq!(e.traits["email"], "bob@example.org");

        let off = ProjectSettings {
            pii_detectors: false,
            pii_denylist: vec![],
            ..ProjectSettings::default()
        };
        let mut e = event(
            json!({"event": "e", "user_id": "u", "properties": {"note": "bob@example.org", "password": "x"}}),
        );
        assert_eq!(redact_pii(&mut e, &off), 0);
    }

    #[test]
    fn consent_is_read_from_native_and_segment_shapes() {
        assert!(has_analytics_consent(&event(
            json!({"event": "e", "user_id": "u", "consent": {"analytics": true}})
        )));
        assert!(!has_analytics_consent(&event(
            json!({"event": "e", "user_id": "u", "consent": {"analytics": false}})
        )));
        assert!(!has_analytics_consent(&event(
            json!({"event": "e", "user_id": "u"})
        )));
        let segment = json!({"event": "e", "user_id": "u", "context": {"consent": {"categoryPreferences": {"Analytics": true, "Advertising": false}}}});
        assert!(has_analytics_consent(&event(segment)));
    }

    #[test]
    fn settings_default_and_reject_unknown_keys() {
        let parsed: ProjectSettings =
            serde_json::from_value(json!({"ip_handling": "drop"})).unwrap();
        assert_eq!(parsed.ip_handling, IpHandling::Drop);
        assert!(parsed.pii_detectors);
        assert!(serde_json::from_value::<ProjectSettings>(json!({"ip": "drop"})).is_err());
    }
}
