//! Secret tokens (invitations, invite links, share links): 256 random bits,
//! URL-safe, shown once; stored only as a keyed hash (HMAC-SHA256 with the
//! installation's key) plus a short prefix to tell them apart in lists.
//!
//! A keyed hash rather than a password hash: the tokens carry 256 bits of
//! entropy, so a fast hash is safe, and a lookup by hash stays one indexed
//! query. The key means a leaked table alone cannot confirm a token.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// What a token grants; its prefix makes a leaked token recognisable (for
/// secret scanners) and routes a pasted one to the right lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// A personal invitation sent to one address.
    Invitation,
    /// A reusable link that lets anyone holding it join an org.
    InviteLink,
    /// A link that shows one resource to its holder.
    ShareLink,
}

impl TokenKind {
    /// Every kind, for matching a plaintext against the prefixes.
    pub const ALL: [TokenKind; 3] = [
        TokenKind::Invitation,
        TokenKind::InviteLink,
        TokenKind::ShareLink,
    ];

    /// The plaintext prefix of tokens of this kind. No prefix is a prefix of
    /// another, so [`token_kind`] is unambiguous.
    pub fn prefix(self) -> &'static str {
        match self {
            TokenKind::Invitation => "fwinv_",
            TokenKind::InviteLink => "fwjoin_",
            TokenKind::ShareLink => "fwshr_",
        }
    }
}

/// Random bytes per token: 256 bits.
const RANDOM_BYTES: usize = 32;
/// Length of the random part: 32 bytes in unpadded base64url.
const RANDOM_CHARS: usize = 43;
/// How much of the random part a display prefix shows: enough to tell
/// tokens apart in a list, far too little to help guess one.
const DISPLAY_CHARS: usize = 6;

/// What is stored for a token instead of the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenDigest {
    /// Lowercase hex HMAC-SHA256 of the whole plaintext (prefix included).
    pub hash: String,
    /// The kind prefix and the first six characters of the random part:
    /// safe to show in lists.
    pub display_prefix: String,
}

/// A freshly issued token: the plaintext is handed to the caller once and
/// never stored; the digest is what the store keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The full token, e.g. `fwinv_` followed by 43 base64url characters.
    pub plaintext: String,
    /// What to store and look the token up by.
    pub digest: TokenDigest,
}

/// Issues a token of `kind`: 32 bytes from `rng` in unpadded base64url after
/// the kind's prefix, digested with `key`.
pub fn issue_token(kind: TokenKind, key: &[u8], rng: &mut impl RngCore) -> IssuedToken {
    let mut random = [0u8; RANDOM_BYTES];
    rng.fill_bytes(&mut random);
    let plaintext = format!("{}{}", kind.prefix(), URL_SAFE_NO_PAD.encode(random));
    IssuedToken {
        digest: digest_token(key, &plaintext),
        plaintext,
    }
}

/// The digest of a presented token, to look it up by: the same hash
/// [`issue_token`] stored. Input of any shape is accepted (a display prefix
/// of something unrecognised is its first six characters).
pub fn digest_token(key: &[u8], plaintext: &str) -> TokenDigest {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(plaintext.as_bytes());
    let hash = hex::encode(mac.finalize().into_bytes());
    let prefix_chars = token_kind(plaintext).map_or(0, |kind| kind.prefix().chars().count());
    let display_prefix = plaintext
        .chars()
        .take(prefix_chars + DISPLAY_CHARS)
        .collect();
    TokenDigest {
        hash,
        display_prefix,
    }
}

/// The kind a plaintext claims to be, by its prefix alone.
pub fn token_kind(plaintext: &str) -> Option<TokenKind> {
    TokenKind::ALL
        .into_iter()
        .find(|kind| plaintext.starts_with(kind.prefix()))
}

/// Whether `plaintext` has the shape of a token of `kind` (its prefix and 43
/// base64url characters), so malformed input is answered "not found" without
/// a store lookup. Says nothing about whether the token exists.
pub fn plausible_token(kind: TokenKind, plaintext: &str) -> bool {
    plaintext.strip_prefix(kind.prefix()).is_some_and(|random| {
        random.len() == RANDOM_CHARS
            && random
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::mock::StepRng;
    use rand::SeedableRng;

    #[test]
    fn prefixes_are_distinct_and_recognised() {
        for kind in TokenKind::ALL {
            assert_eq!(token_kind(&format!("{}abc", kind.prefix())), Some(kind));
            for other in TokenKind::ALL.into_iter().filter(|o| *o != kind) {
                assert!(!kind.prefix().starts_with(other.prefix()));
            }
        }
        assert_eq!(token_kind("nope"), None);
        assert_eq!(token_kind(""), None);
        assert_eq!(token_kind("FWINV_abc"), None);
    }

    #[test]
    fn issued_tokens_are_url_safe_plausible_and_hashed_with_the_key() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for kind in TokenKind::ALL {
            let token = issue_token(kind, b"key", &mut rng);
            let random = token.plaintext.strip_prefix(kind.prefix()).unwrap();
            assert_eq!(random.len(), 43);
            assert!(plausible_token(kind, &token.plaintext));
            assert_eq!(token_kind(&token.plaintext), Some(kind));
            assert_eq!(token.digest, digest_token(b"key", &token.plaintext));
            assert_ne!(
                token.digest.hash,
                digest_token(b"other key", &token.plaintext).hash
            );
            assert_eq!(
                token.digest.display_prefix,
                format!("{}{}", kind.prefix(), &random[..6])
            );
        }
        let first = issue_token(TokenKind::Invitation, b"key", &mut rng);
        let second = issue_token(TokenKind::Invitation, b"key", &mut rng);
        assert_ne!(first.plaintext, second.plaintext);
        assert_ne!(first.digest.hash, second.digest.hash);
    }

    #[test]
    fn digest_matches_an_independent_hmac() {
        // All-zero randomness gives a predictable plaintext. Expected hash from
        // python3: hmac.new(b"key", b"fwinv_" + b"A" * 43, hashlib.sha256).hexdigest()
        let token = issue_token(TokenKind::Invitation, b"key", &mut StepRng::new(0, 0));
        assert_eq!(token.plaintext, format!("fwinv_{}", "A".repeat(43)));
        assert_eq!(
            token.digest.hash,
            "3577108b64b0d57b3968eca41f79001ec759ab1ea9c31648886c07a13a1947e6"
        );
        assert_eq!(token.digest.display_prefix, "fwinv_AAAAAA");
    }

    #[test]
    fn malformed_tokens_are_not_plausible() {
        let random = "A".repeat(43);
        assert!(plausible_token(
            TokenKind::ShareLink,
            &format!("fwshr_{random}")
        ));
        // Wrong kind, wrong length, padding, foreign alphabet, stray spaces.
        assert!(!plausible_token(
            TokenKind::Invitation,
            &format!("fwshr_{random}")
        ));
        assert!(!plausible_token(
            TokenKind::ShareLink,
            &format!("fwshr_{}", "A".repeat(42))
        ));
        assert!(!plausible_token(
            TokenKind::ShareLink,
            &format!("fwshr_{}", "A".repeat(44))
        ));
        assert!(!plausible_token(
            TokenKind::ShareLink,
            &format!("fwshr_{}=", "A".repeat(42))
        ));
        assert!(!plausible_token(
            TokenKind::ShareLink,
            &format!("fwshr_{}+", "A".repeat(42))
        ));
        assert!(!plausible_token(
            TokenKind::ShareLink,
            &format!(" fwshr_{random}")
        ));
        assert!(!plausible_token(
            TokenKind::ShareLink,
            &format!("fwshr_{}é", "A".repeat(41))
        ));
        assert!(!plausible_token(TokenKind::ShareLink, "fwshr_"));
        assert!(!plausible_token(TokenKind::ShareLink, ""));
    }

    #[test]
    fn digesting_odd_input_never_panics() {
        assert_eq!(digest_token(b"k", "é").display_prefix, "é");
        assert_eq!(digest_token(b"k", "").display_prefix, "");
        assert_eq!(digest_token(b"k", "fwjoin_ab").display_prefix, "fwjoin_ab");
        assert_eq!(digest_token(b"k", "éééééééé").display_prefix, "éééééé");
        assert_eq!(digest_token(b"", "x").hash.len(), 64);
    }
}
