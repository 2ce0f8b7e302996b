//! Share-link passwords, hashed with Argon2id (PHC strings).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::{CryptoRng, RngCore};

use crate::DomainError;

pub const MAX_PASSWORD_BYTES: usize = 1024;

pub fn hash_password(
    password: &str,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<String, DomainError> {
    if password.is_empty() || password.len() > MAX_PASSWORD_BYTES {
        return Err(DomainError::invalid(
            "invalid_password",
            format!("a password is 1-{MAX_PASSWORD_BYTES} bytes"),
        ));
    }
    let mut salt = [0u8; 16];
    rng.fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|error| {
        DomainError::new(
            crate::ErrorKind::Internal,
            "password_hash_failed",
            error.to_string(),
        )
    })?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| {
            DomainError::new(
                crate::ErrorKind::Internal,
                "password_hash_failed",
                error.to_string(),
            )
        })
}

pub fn verify_password(password: &str, phc: &str) -> bool {
    if password.len() > MAX_PASSWORD_BYTES {
        return false;
    }
    PasswordHash::new(phc)
        .map(|hash| {
            Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn hashes_verify_only_the_right_password() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let hash = hash_password("correct horse", &mut rng).unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
        assert!(!verify_password("correct horse", "not a phc string"));
        assert_ne!(
            hash,
            hash_password("correct horse", &mut rng).unwrap(),
            "salted"
        );
    }

    #[test]
    fn empty_and_huge_passwords_are_refused() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        assert_eq!(
            hash_password("", &mut rng).unwrap_err().code,
            "invalid_password"
        );
        let huge = "x".repeat(MAX_PASSWORD_BYTES + 1);
        assert_eq!(
            hash_password(&huge, &mut rng).unwrap_err().code,
            "invalid_password"
        );
        assert!(!verify_password(
            &huge,
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"
        ));
    }
}
