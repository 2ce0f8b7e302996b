//! API keys: their format, generation, hashing and scopes.
//!
//! A key is `pk_` (publishable) or `sk_` (secret) followed by 32 base62
//! characters drawn from a CSPRNG: about 190 bits, far above the 128 the
//! design asks for. Only a SHA-256 digest and a short visible prefix are
//! stored. A fast hash is the right tool here (unlike passwords): the input
//! is uniformly random and long, so there is nothing to brute-force, and the
//! digest is computed on every request.

use std::fmt;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Length of the random part of a key, in base62 characters.
pub const KEY_SECRET_LEN: usize = 32;
/// How many characters of the random part are kept in clear as the prefix.
const VISIBLE_CHARS: usize = 6;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The two kinds of key a project has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// Safe in a browser: send events, evaluate flags, read own decisions.
    Publishable,
    /// Server only: everything for its project.
    Secret,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Publishable => "publishable",
            KeyKind::Secret => "secret",
        }
    }

    fn marker(self) -> &'static str {
        match self {
            KeyKind::Publishable => "pk_",
            KeyKind::Secret => "sk_",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "publishable" => Some(KeyKind::Publishable),
            "secret" => Some(KeyKind::Secret),
            _ => None,
        }
    }

    /// Whether a key of this kind may call a route that needs `scope`.
    pub fn permits(self, scope: Scope) -> bool {
        match scope {
            Scope::Public => true,
            Scope::Secret => self == KeyKind::Secret,
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// What a route requires of the presented key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Publishable or secret keys.
    Public,
    /// Secret keys only.
    Secret,
}

/// SHA-256 digest of a full key: what the store keeps and the snapshot indexes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> Self {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(KeyHash)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a digest in full: it is as good as an index into the keys table.
        write!(f, "KeyHash({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// A freshly generated key. The plaintext exists only here, to be shown once.
#[derive(Clone, PartialEq, Eq)]
pub struct GeneratedKey {
    pub kind: KeyKind,
    pub plaintext: String,
}

impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GeneratedKey({})", self.prefix())
    }
}

impl GeneratedKey {
    pub fn generate(kind: KeyKind, rng: &mut impl RngCore) -> Self {
        let mut plaintext = String::with_capacity(3 + KEY_SECRET_LEN);
        plaintext.push_str(kind.marker());
        let mut filled = 0;
        let mut buf = [0u8; 64];
        while filled < KEY_SECRET_LEN {
            rng.fill_bytes(&mut buf);
            for byte in buf {
                // Rejection sampling keeps every character equally likely:
                // 248 = 4 * 62 is the largest multiple of 62 below 256.
                if byte < 248 && filled < KEY_SECRET_LEN {
                    plaintext.push(BASE62[(byte % 62) as usize] as char);
                    filled += 1;
                }
            }
        }
        Self { kind, plaintext }
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.plaintext)
    }

    /// The clear part shown in listings, e.g. `sk_Ab3xYz`.
    pub fn prefix(&self) -> String {
        self.plaintext[..3 + VISIBLE_CHARS].to_string()
    }
}

/// A key as presented by a client, checked for shape before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresentedKey<'a> {
    pub kind: KeyKind,
    pub text: &'a str,
}

impl<'a> PresentedKey<'a> {
    /// `None` when the text cannot be a Flywheel key at all.
    pub fn parse(text: &'a str) -> Option<Self> {
        let kind = if text.starts_with("pk_") {
            KeyKind::Publishable
        } else if text.starts_with("sk_") {
            KeyKind::Secret
        } else {
            return None;
        };
        let secret = &text[3..];
        if secret.len() != KEY_SECRET_LEN || !secret.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return None;
        }
        Some(Self { kind, text })
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash::of(self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn generated_keys_have_the_documented_shape_and_parse_back() {
        let mut rng = StdRng::seed_from_u64(7);
        for kind in [KeyKind::Publishable, KeyKind::Secret] {
            let key = GeneratedKey::generate(kind, &mut rng);
            assert_eq!(key.plaintext.len(), 3 + KEY_SECRET_LEN);
            assert!(key.plaintext.starts_with(kind.marker()));
            let parsed = PresentedKey::parse(&key.plaintext).expect("own keys parse");
            assert_eq!(parsed.kind, kind);
            assert_eq!(parsed.hash(), key.hash());
            assert_eq!(key.prefix().len(), 9);
            assert!(key.plaintext.starts_with(&key.prefix()));
        }
    }

    #[test]
    fn keys_do_not_repeat_and_use_the_whole_alphabet() {
        let mut rng = rand::rngs::OsRng;
        let mut seen = std::collections::HashSet::new();
        let mut chars = std::collections::HashSet::new();
        for _ in 0..2_000 {
            let key = GeneratedKey::generate(KeyKind::Secret, &mut rng);
            chars.extend(key.plaintext[3..].bytes());
            assert!(seen.insert(key.plaintext));
        }
        assert_eq!(chars.len(), 62);
    }

    #[test]
    fn malformed_keys_are_refused_before_lookup() {
        for text in [
            "",
            "pk_",
            "xx_0123456789abcdefghijABCDEFGHIJ01",
            "pk_0123456789abcdefghijABCDEFGHIJ0",   // one short
            "pk_0123456789abcdefghijABCDEFGHIJ012", // one long
            "sk_0123456789abcdefghijABCDEFGHIJ0-",  // bad character
            "sk_0123456789abcdefghijABCDEFGHIJ0é",  // non-ASCII
        ] {
            assert_eq!(PresentedKey::parse(text), None, "{text:?}");
        }
        assert!(PresentedKey::parse("sk_0123456789abcdefghijABCDEFGHIJ01").is_some());
    }

    #[test]
    fn scopes() {
        assert!(KeyKind::Publishable.permits(Scope::Public));
        assert!(!KeyKind::Publishable.permits(Scope::Secret));
        assert!(KeyKind::Secret.permits(Scope::Public));
        assert!(KeyKind::Secret.permits(Scope::Secret));
    }

    #[test]
    fn debug_output_never_reveals_a_key() {
        let key = GeneratedKey::generate(KeyKind::Secret, &mut rand::rngs::OsRng);
        let shown = format!("{key:?} {:?}", key.hash());
        assert!(!shown.contains(&key.plaintext[3..]));
    }

    #[test]
    fn kind_round_trips_through_text() {
        for kind in [KeyKind::Publishable, KeyKind::Secret] {
            assert_eq!(KeyKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(KeyKind::parse("admin"), None);
    }
}
