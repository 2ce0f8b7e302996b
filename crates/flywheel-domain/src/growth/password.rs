//! Share-link passwords, hashed with Argon2id into PHC strings
//! (`$argon2id$v=19$m=…,t=…,p=…$<salt>$<hash>`), so the parameters travel
//! with each hash and can be raised later without breaking old ones.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::{CryptoRng, RngCore};

use crate::{DomainError, ErrorKind};

/// The longest password accepted: hashing cost does not depend on length
/// much, but there is no reason to take unbounded input.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Salt length: the 16 bytes the PHC guidelines recommend.
const SALT_BYTES: usize = 16;

fn hashing_failed(error: argon2::password_hash::Error) -> DomainError {
    DomainError::new(
        ErrorKind::Internal,
        "password_hash_failed",
        error.to_string(),
    )
}

/// Hashes a share-link password with Argon2id (the crate's default, OWASP
/// recommended parameters) and a 16-byte salt drawn from `rng`. Refuses
/// empty passwords and ones over [`MAX_PASSWORD_BYTES`] (`invalid_password`).
pub fn hash_password(
    password: &str,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<String, DomainError> {
    if password.is_empty() {
        return Err(DomainError::invalid(
            "invalid_password",
            "the password is empty",
        ));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(DomainError::invalid(
            "invalid_password",
            format!("the password is longer than {MAX_PASSWORD_BYTES} bytes"),
        ));
    }
    // The salt comes from the caller's rng rather than `SaltString::generate`
    // so the crate needs no OS randomness of its own (and no extra feature).
    let mut salt = [0u8; SALT_BYTES];
    rng.fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(hashing_failed)?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(hashing_failed)
}

/// Whether `password` matches a PHC string from [`hash_password`], in
/// constant time. A malformed PHC string or an over-long password is simply
/// no match.
pub fn verify_password(password: &str, phc: &str) -> bool {
    if password.len() > MAX_PASSWORD_BYTES {
        return false;
    }
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    // The algorithm, version and parameters are read from the PHC string.
    Argon2::default()
        .verify_password(password.as_bytes(), &hash)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn hashes_are_salted_argon2id_and_verify_only_the_right_password() {
        let mut rng = StdRng::seed_from_u64(9);
        let hash = hash_password("correct horse", &mut rng).unwrap();
        assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("correct horse ", &hash));
        assert!(!verify_password("Correct horse", &hash));
        assert!(!verify_password("", &hash));
        let again = hash_password("correct horse", &mut rng).unwrap();
        assert_ne!(hash, again, "a fresh salt each time");
        assert!(verify_password("correct horse", &again));
    }

    #[test]
    fn unicode_and_maximum_length_passwords_work() {
        let mut rng = StdRng::seed_from_u64(1);
        let unicode = hash_password("pässwörd 🔑", &mut rng).unwrap();
        assert!(verify_password("pässwörd 🔑", &unicode));
        assert!(!verify_password("passwort 🔑", &unicode));

        let longest = "x".repeat(MAX_PASSWORD_BYTES);
        let hash = hash_password(&longest, &mut rng).unwrap();
        assert!(verify_password(&longest, &hash));
    }

    #[test]
    fn empty_and_oversized_passwords_are_refused() {
        let mut rng = StdRng::seed_from_u64(9);
        let empty = hash_password("", &mut rng).unwrap_err();
        assert_eq!(empty.code, "invalid_password");
        assert_eq!(empty.kind, ErrorKind::Invalid);
        let oversized = "x".repeat(MAX_PASSWORD_BYTES + 1);
        assert_eq!(
            hash_password(&oversized, &mut rng).unwrap_err().code,
            "invalid_password"
        );
        // Multi-byte characters count in bytes.
        let oversized_unicode = "é".repeat(MAX_PASSWORD_BYTES / 2 + 1);
        assert!(hash_password(&oversized_unicode, &mut rng).is_err());
    }

    #[test]
    fn malformed_or_tampered_hashes_never_match() {
        let mut rng = StdRng::seed_from_u64(4);
        let hash = hash_password("secret", &mut rng).unwrap();
        assert!(!verify_password("secret", ""));
        assert!(!verify_password("secret", "not a phc string"));
        assert!(!verify_password(
            "secret",
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"
        ));
        // Flip the last character of the hash part.
        let mut tampered = hash.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(!verify_password("secret", &tampered));
        // Over-long input is refused before any hashing.
        assert!(!verify_password(&"x".repeat(MAX_PASSWORD_BYTES + 1), &hash));
    }
}
