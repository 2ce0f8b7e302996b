//! Guest tokens: what resolving a share link hands the product, so it can
//! show one resource to someone without an account. Short-lived, compact and
//! signed: `fwg_<base64url(JSON claims)>.<base64url(HMAC-SHA256)>`, the MAC
//! taken over everything before the dot.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::{DomainError, ErrorKind};

/// What a guest token grants: one permission on one resource, through one
/// share link, until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GuestClaims {
    /// The project the share link belongs to.
    pub project: String,
    /// The share link that was resolved.
    pub link_id: String,
    /// The product's type of the shared resource.
    pub resource_type: String,
    /// The product's id of the shared resource.
    pub resource_id: String,
    /// What the guest may do with it, as the share link grants.
    pub permission: String,
    /// Who the guest is: `user:<id>`, `email:<address>` or `guest:<id>`.
    pub guest: String,
    /// When the token was issued (unix seconds).
    pub issued_at: i64,
    /// The first second the token is no longer valid (unix seconds).
    pub expires_at: i64,
}

const PREFIX: &str = "fwg_";

fn mac(key: &[u8], signed_part: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(signed_part.as_bytes());
    mac
}

/// Signs `claims` with `key` into a `fwg_…` token.
pub fn sign_guest_token(key: &[u8], claims: &GuestClaims) -> String {
    let json = serde_json::to_vec(claims).expect("strings and integers always serialize");
    let signed_part = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json));
    let signature = URL_SAFE_NO_PAD.encode(mac(key, &signed_part).finalize().into_bytes());
    format!("{signed_part}.{signature}")
}

fn invalid_token() -> DomainError {
    // One answer for every malformation, so a prober learns nothing about
    // which part was wrong.
    DomainError::new(
        ErrorKind::Unauthorized,
        "invalid_guest_token",
        "the guest token is malformed or its signature does not match",
    )
}

/// Checks a guest token signed with `key` and returns its claims if it is
/// still valid at `now` (unix seconds). The MAC is checked, in constant
/// time, before the payload is decoded, so unauthenticated JSON is never
/// parsed.
pub fn verify_guest_token(key: &[u8], token: &str, now: i64) -> Result<GuestClaims, DomainError> {
    let (signed_part, signature) = token.split_once('.').ok_or_else(invalid_token)?;
    let payload = signed_part.strip_prefix(PREFIX).ok_or_else(invalid_token)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| invalid_token())?;
    mac(key, signed_part)
        .verify_slice(&signature)
        .map_err(|_| invalid_token())?;
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| invalid_token())?;
    let claims: GuestClaims = serde_json::from_slice(&json).map_err(|_| invalid_token())?;
    if now >= claims.expires_at {
        return Err(DomainError::new(
            ErrorKind::Unauthorized,
            "guest_token_expired",
            "the guest token has expired; resolve the share link again",
        ));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> GuestClaims {
        GuestClaims {
            project: "p".into(),
            link_id: "shr_1".into(),
            resource_type: "doc".into(),
            resource_id: "d1".into(),
            permission: "view".into(),
            guest: "guest:g1".into(),
            issued_at: 100,
            expires_at: 200,
        }
    }

    fn error_of(key: &[u8], token: &str, now: i64) -> DomainError {
        verify_guest_token(key, token, now).unwrap_err()
    }

    /// A token with `payload` as its (raw) claims bytes, correctly signed.
    fn signed_raw(key: &[u8], payload: &[u8]) -> String {
        let signed_part = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(payload));
        let signature = URL_SAFE_NO_PAD.encode(mac(key, &signed_part).finalize().into_bytes());
        format!("{signed_part}.{signature}")
    }

    #[test]
    fn the_wire_format_matches_an_independent_computation() {
        // python3: signed = "fwg_" + b64url_nopad(json.dumps(claims,
        //   separators=(",", ":"))); signed + "." +
        //   b64url_nopad(hmac.new(b"key", signed.encode(), hashlib.sha256).digest())
        assert_eq!(
            sign_guest_token(b"key", &claims()),
            "fwg_eyJwcm9qZWN0IjoicCIsImxpbmtfaWQiOiJzaHJfMSIsInJlc291cmNlX3R5cGUiOiJkb2MiL\
             CJyZXNvdXJjZV9pZCI6ImQxIiwicGVybWlzc2lvbiI6InZpZXciLCJndWVzdCI6Imd1ZXN0OmcxIiwia\
             XNzdWVkX2F0IjoxMDAsImV4cGlyZXNfYXQiOjIwMH0.HhhCeTEry569t8EyAMHty2sZ-MNPJJuDSUse9CYHEew"
        );
    }

    #[test]
    fn a_signed_token_verifies_until_it_expires() {
        let token = sign_guest_token(b"key", &claims());
        assert!(token.starts_with("fwg_"));
        assert_eq!(verify_guest_token(b"key", &token, 100).unwrap(), claims());
        assert_eq!(verify_guest_token(b"key", &token, 199).unwrap(), claims());
        let expired = error_of(b"key", &token, 200);
        assert_eq!(expired.code, "guest_token_expired");
        assert_eq!(expired.kind, ErrorKind::Unauthorized);
        assert_eq!(
            error_of(b"key", &token, i64::MAX).code,
            "guest_token_expired"
        );
    }

    #[test]
    fn another_key_or_a_spliced_payload_is_refused() {
        let token = sign_guest_token(b"key", &claims());
        let wrong_key = error_of(b"other", &token, 150);
        assert_eq!(wrong_key.code, "invalid_guest_token");
        assert_eq!(wrong_key.kind, ErrorKind::Unauthorized);

        let mut forged = claims();
        forged.permission = "edit".into();
        let forged_token = sign_guest_token(b"attacker", &forged);
        let (forged_part, _) = forged_token.split_once('.').unwrap();
        let (_, real_signature) = token.split_once('.').unwrap();
        let spliced = format!("{forged_part}.{real_signature}");
        assert_eq!(error_of(b"key", &spliced, 150).code, "invalid_guest_token");

        // Expiry is no loophole: an expired forgery is still just invalid.
        assert_eq!(
            error_of(b"key", &spliced, 10_000).code,
            "invalid_guest_token"
        );
    }

    #[test]
    fn malformed_tokens_are_invalid() {
        let token = sign_guest_token(b"key", &claims());
        let (signed_part, signature) = token.split_once('.').unwrap();
        for junk in [
            String::new(),
            "fwg_".into(),
            "fwg_abc.def".into(),
            "nope.nope".into(),
            "fwg_!!.!!".into(),
            signed_part.into(),
            format!("{signed_part}."),
            format!("{signed_part}.{signature}="),
            format!("{signed_part}.{signature}.{signature}"),
            format!(" {token}"),
            token.replacen("fwg_", "fwx_", 1),
            token[..token.len() - 1].into(),
        ] {
            assert_eq!(
                error_of(b"key", &junk, 150).code,
                "invalid_guest_token",
                "{junk:?}"
            );
        }
    }

    #[test]
    fn a_correctly_signed_but_unreadable_payload_is_invalid() {
        for payload in [&b"not json"[..], br#"{"project":"p"}"#, b""] {
            let token = signed_raw(b"key", payload);
            assert_eq!(error_of(b"key", &token, 150).code, "invalid_guest_token");
        }
    }
}
