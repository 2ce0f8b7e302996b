//! Identity verification for user-scoped reads made with a publishable key
//! (the live stream, `decide`, a user's prompts): the product's backend
//! signs the user id with the project's identity secret, and the browser
//! presents that signature (`user_hash`). Without it, anyone holding the
//! publishable key and a user id could read that user's prompts; projects
//! turn it on with the `identity_verification` setting (off by default).

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// `hex(HMAC-SHA256(secret, user_id))`: what the product's backend computes.
pub fn user_hash(secret: &str, user_id: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(user_id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Whether `presented` is the user id's signature (constant-time compare;
/// hex in either case).
pub fn verify_user_hash(secret: &str, user_id: &str, presented: &str) -> bool {
    let Ok(bytes) = hex::decode(presented.trim()) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(user_id.as_bytes());
    mac.verify_slice(&bytes).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_user_and_secret() {
        let hash = user_hash("idv_secret", "alice");
        assert_eq!(hash.len(), 64);
        assert!(verify_user_hash("idv_secret", "alice", &hash));
        assert!(verify_user_hash(
            "idv_secret",
            "alice",
            &hash.to_uppercase()
        ));
        assert!(!verify_user_hash("idv_secret", "bob", &hash));
        assert!(!verify_user_hash("other", "alice", &hash));
        assert!(!verify_user_hash("idv_secret", "alice", "zz"));
        assert!(!verify_user_hash("idv_secret", "alice", &hash[..62]));
        assert!(!verify_user_hash("idv_secret", "alice", ""));
    }

    #[test]
    fn it_is_plain_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            user_hash("Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
