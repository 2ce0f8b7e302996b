//! The Standard Webhooks signature scheme
//! (<https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md>):
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`,
//! keyed with the bytes of a `whsec_<base64>` secret. Following the spec
//! lets receivers verify with any Standard Webhooks (or Svix) library.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::{DomainError, ErrorKind};

const WIRE_PREFIX: &str = "whsec_";
const SIGNATURE_VERSION: &str = "v1,";
/// Bytes in a generated secret.
const GENERATED_SECRET_BYTES: usize = 32;
/// The secret sizes the spec allows.
const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// An endpoint's signing secret: raw key bytes. `Debug` hides them.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

impl WebhookSecret {
    /// A new secret of 32 random bytes.
    pub fn generate(rng: &mut impl RngCore) -> Self {
        let mut bytes = vec![0u8; GENERATED_SECRET_BYTES];
        rng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The form shown to the endpoint's owner and stored: `whsec_` and the
    /// bytes in standard, padded base64.
    pub fn to_wire(&self) -> String {
        format!("{WIRE_PREFIX}{}", STANDARD.encode(&self.0))
    }

    /// Reads `whsec_<base64>` or the bare base64 (standard alphabet, padded)
    /// of a 24- to 64-byte secret.
    pub fn parse(text: &str) -> Result<Self, DomainError> {
        let text = text.trim();
        let encoded = text.strip_prefix(WIRE_PREFIX).unwrap_or(text);
        let bytes = STANDARD.decode(encoded).map_err(|_| {
            DomainError::invalid("invalid_webhook_secret", "the secret is not valid base64")
        })?;
        if !SECRET_BYTES.contains(&bytes.len()) {
            return Err(DomainError::invalid(
                "invalid_webhook_secret",
                "the secret must be 24 to 64 bytes",
            ));
        }
        Ok(Self(bytes))
    }

    /// The MAC over the signed content, `{id}.{timestamp}.{body}`, where
    /// `timestamp` is the exact text of the header.
    fn mac(&self, message_id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(message_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

/// The `webhook-signature` header value for a message: `v1,` and the
/// standard, padded base64 of HMAC-SHA256 over `{id}.{timestamp}.{body}`.
/// `timestamp_secs` must be the value sent as `webhook-timestamp`.
pub fn sign(secret: &WebhookSecret, message_id: &str, timestamp_secs: i64, body: &[u8]) -> String {
    let mac = secret.mac(message_id, &timestamp_secs.to_string(), body);
    format!(
        "{SIGNATURE_VERSION}{}",
        STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// Checks a received message as a receiver would: the `webhook-timestamp`
/// within `tolerance_secs` of `now_secs` either way (stale or future
/// messages are refused, which bounds replays), and at least one of the
/// space-separated `v1,<signature>` entries (several during key rotation;
/// other versions are skipped) matching, compared in constant time.
pub fn verify(
    secret: &WebhookSecret,
    message_id: &str,
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), DomainError> {
    let out_of_tolerance = |message: &str| {
        DomainError::new(
            ErrorKind::Unauthorized,
            "webhook_timestamp_out_of_tolerance",
            message,
        )
    };
    let timestamp_text = timestamp_header.trim();
    let timestamp: i64 = timestamp_text
        .parse()
        .map_err(|_| out_of_tolerance("the timestamp is not a whole number of seconds"))?;
    // `abs_diff` cannot overflow, whatever the header holds.
    let tolerance = u64::try_from(tolerance_secs).unwrap_or(0);
    if now_secs.abs_diff(timestamp) > tolerance {
        return Err(out_of_tolerance("the timestamp is too far from now"));
    }
    let expected = secret.mac(message_id, timestamp_text, body);
    let matches = signature_header
        .split_whitespace()
        .filter_map(|entry| entry.strip_prefix(SIGNATURE_VERSION))
        .filter_map(|encoded| STANDARD.decode(encoded).ok())
        .any(|candidate| expected.clone().verify_slice(&candidate).is_ok());
    if matches {
        Ok(())
    } else {
        Err(DomainError::new(
            ErrorKind::Unauthorized,
            "webhook_signature_mismatch",
            "no v1 signature matches the message",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The spec's example secret (24 bytes, the minimum).
    fn secret() -> WebhookSecret {
        WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()
    }

    fn error_code(result: Result<(), DomainError>) -> String {
        result.unwrap_err().code.into_owned()
    }

    #[test]
    fn signatures_match_an_independent_computation() {
        // python3 -c 'import hmac,hashlib,base64; print("v1,"+base64.b64encode(
        //   hmac.new(base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        //   b"msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{\"test\": 2432232314}",
        //   hashlib.sha256).digest()).decode())'
        let signature = sign(
            &secret(),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(verify(
            &secret(),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            &signature,
            br#"{"test": 2432232314}"#,
            1_614_265_330,
            300,
        )
        .is_ok());
    }

    #[test]
    fn any_listed_signature_may_match_during_rotation() {
        let body = br#"{"type":"x"}"#;
        let old = WebhookSecret::generate(&mut rand::rngs::StdRng::seed_from_u64(1));
        let good = sign(&secret(), "msg_1", 1000, body);
        let by_old_key = sign(&old, "msg_1", 1000, body);
        for header in [
            format!("{by_old_key} {good}"),
            format!("{good} {by_old_key}"),
            format!("v1a,c2lnbmF0dXJl v1,!!notbase64!! {good}"),
            format!("  {good}  "),
        ] {
            assert!(
                verify(&secret(), "msg_1", "1000", &header, body, 1000, 300).is_ok(),
                "{header}"
            );
        }
        assert_eq!(
            error_code(verify(
                &secret(),
                "msg_1",
                "1000",
                &by_old_key,
                body,
                1000,
                300
            )),
            "webhook_signature_mismatch"
        );
    }

    #[test]
    fn any_change_to_the_signed_content_is_a_mismatch() {
        let body = br#"{"type":"x"}"#;
        let good = sign(&secret(), "msg_1", 1000, body);
        let check = |id: &str, timestamp: &str, header: &str, body: &[u8]| {
            error_code(verify(&secret(), id, timestamp, header, body, 1000, 300))
        };
        let mismatch = "webhook_signature_mismatch";
        assert_eq!(check("msg_2", "1000", &good, body), mismatch);
        assert_eq!(check("msg_1", "1001", &good, body), mismatch);
        assert_eq!(check("msg_1", "1000", &good, b"{}"), mismatch);
        // The bare signature without its version, or truncated.
        assert_eq!(check("msg_1", "1000", &good[3..], body), mismatch);
        assert_eq!(
            check("msg_1", "1000", &good[..good.len() - 4], body),
            mismatch
        );
        assert_eq!(check("msg_1", "1000", "", body), mismatch);
        assert_eq!(check("msg_1", "1000", "v1,", body), mismatch);
    }

    #[test]
    fn timestamps_must_be_within_tolerance_either_way() {
        let body = b"{}";
        let good = sign(&secret(), "msg_1", 1000, body);
        let at = |now: i64| verify(&secret(), "msg_1", "1000", &good, body, now, 300);
        assert!(at(1300).is_ok());
        assert!(at(700).is_ok());
        let out = "webhook_timestamp_out_of_tolerance";
        assert_eq!(error_code(at(1301)), out);
        assert_eq!(error_code(at(699)), out);
        // A negative tolerance accepts only the exact second.
        assert!(verify(&secret(), "msg_1", "1000", &good, body, 1000, -5).is_ok());
        assert_eq!(
            error_code(verify(&secret(), "msg_1", "1000", &good, body, 1001, -5)),
            out
        );
        for junk in ["", "abc", "1000.5", "99999999999999999999"] {
            assert_eq!(
                error_code(verify(&secret(), "msg_1", junk, &good, body, 1000, 300)),
                out
            );
        }
        // Extremes do not overflow.
        let extreme = i64::MIN.to_string();
        assert_eq!(
            error_code(verify(
                &secret(),
                "msg_1",
                &extreme,
                &good,
                body,
                i64::MAX,
                300
            )),
            out
        );
    }

    #[test]
    fn secrets_round_trip_and_are_bounded() {
        let generated = WebhookSecret::generate(&mut rand::rngs::StdRng::seed_from_u64(3));
        let wire = generated.to_wire();
        assert!(wire.starts_with("whsec_"));
        // 32 bytes are 44 padded base64 characters.
        assert_eq!(wire.len(), "whsec_".len() + 44);
        assert!(wire.ends_with('='));
        assert_eq!(WebhookSecret::parse(&wire).unwrap(), generated);
        assert_eq!(
            WebhookSecret::parse(&wire["whsec_".len()..]).unwrap(),
            generated
        );
        assert_eq!(
            WebhookSecret::parse(&format!(" {wire}\n")).unwrap(),
            generated
        );

        let of_len = |len: usize| WebhookSecret::parse(&STANDARD.encode(vec![7u8; len]));
        assert!(of_len(24).is_ok());
        assert!(of_len(64).is_ok());
        for bad_len in [0, 23, 65] {
            assert_eq!(of_len(bad_len).unwrap_err().code, "invalid_webhook_secret");
        }
        for junk in [
            "whsec_!!!",
            "whsec_",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS",
        ] {
            assert_eq!(
                WebhookSecret::parse(junk).unwrap_err().code,
                "invalid_webhook_secret"
            );
        }
        assert_eq!(format!("{generated:?}"), "WebhookSecret(..)");
    }
}
