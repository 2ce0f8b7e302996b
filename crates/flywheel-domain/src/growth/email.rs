//! Email addresses: normalisation (what is stored and compared), the
//! mailbox identity used to refuse self-referrals, and masking for display.

use crate::DomainError;

/// The longest address a mail path can carry (RFC 5321 path limit minus the
/// angle brackets).
const MAX_EMAIL_BYTES: usize = 254;
/// RFC 5321's limit on the part before the `@`.
const MAX_LOCAL_PART_BYTES: usize = 64;

fn invalid(message: &'static str) -> DomainError {
    // Messages name the problem but never echo the input back.
    DomainError::invalid("invalid_email", message)
}

/// Trims and lowercases (ASCII and Unicode) an address and checks its shape:
/// exactly one `@`, a local part of 1-64 bytes, a domain of dot-separated
/// non-empty labels (at least two), no whitespace or control characters, at
/// most 254 bytes in all. Returns the normalised address.
///
/// Deliberately not a full RFC 5322 parser: quoted local parts and IP
/// literals are refused along with the whitespace they usually need.
pub fn normalize_email(raw: &str) -> Result<String, DomainError> {
    let email = raw.trim().to_lowercase();
    if email.is_empty() {
        return Err(invalid("email is empty"));
    }
    // Lengths are checked on the normalised form, since that is what is stored.
    if email.len() > MAX_EMAIL_BYTES {
        return Err(invalid("email is longer than 254 bytes"));
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("email contains whitespace or control characters"));
    }
    let mut parts = email.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid("email must contain exactly one '@'"));
    };
    if local.is_empty() {
        return Err(invalid("the part before '@' is empty"));
    }
    if local.len() > MAX_LOCAL_PART_BYTES {
        return Err(invalid("the part before '@' is longer than 64 bytes"));
    }
    if !domain.contains('.') {
        return Err(invalid("the domain must contain a '.'"));
    }
    if domain.split('.').any(str::is_empty) {
        return Err(invalid("the domain has an empty label"));
    }
    Ok(email)
}

/// The mailbox an address delivers to, for telling whether two addresses are
/// the same person's: a `+tag` is dropped (any domain), and for Gmail dots in
/// the local part are dropped and `googlemail.com` reads as `gmail.com`.
/// Takes an address from [`normalize_email`].
pub fn identity_of_email(normalized: &str) -> String {
    let Some((local, domain)) = normalized.rsplit_once('@') else {
        return normalized.to_owned();
    };
    // `+tag@x` has no base to fall back to; keep it whole rather than
    // collapse every such address to `@x`.
    let local = match local.split_once('+') {
        Some((base, _tag)) if !base.is_empty() => base,
        _ => local,
    };
    match domain {
        "gmail.com" | "googlemail.com" => {
            let undotted = local.replace('.', "");
            let local = if undotted.is_empty() {
                local
            } else {
                &undotted
            };
            format!("{local}@gmail.com")
        }
        _ => format!("{local}@{domain}"),
    }
}

/// Shows enough of an address to recognise it without disclosing it, for
/// someone holding an invitation token: `alice@example.com` →
/// `a***e@example.com`; local parts of one or two characters keep only the
/// first (`al@x.io` → `a***@x.io`). Takes an address from [`normalize_email`].
pub fn mask_email(normalized: &str) -> String {
    let Some((local, domain)) = normalized.rsplit_once('@') else {
        return "***".to_owned();
    };
    let mut chars = local.chars();
    let first = chars.next().unwrap_or('*');
    let masked_local = match chars.next_back() {
        // At least three characters: first, something hidden, last.
        Some(last) if chars.next().is_some() => format!("{first}***{last}"),
        _ => format!("{first}***"),
    };
    format!("{masked_local}@{domain}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_message(raw: &str) -> String {
        let error = normalize_email(raw).unwrap_err();
        assert_eq!(error.code, "invalid_email", "{raw:?}");
        error.message
    }

    #[test]
    fn normalisation_trims_and_lowercases() {
        assert_eq!(
            normalize_email("  Alice@Example.COM \n").unwrap(),
            "alice@example.com"
        );
        assert_eq!(
            normalize_email("ÄLICE@Bücher.DE").unwrap(),
            "älice@bücher.de"
        );
        assert_eq!(
            normalize_email("first.last+tag@sub.example.co.uk").unwrap(),
            "first.last+tag@sub.example.co.uk"
        );
    }

    #[test]
    fn malformed_addresses_are_refused_with_the_reason() {
        assert_eq!(error_message("   "), "email is empty");
        assert!(error_message("alice").contains("exactly one '@'"));
        assert!(error_message("a@b@c.io").contains("exactly one '@'"));
        assert!(error_message("@example.com").contains("is empty"));
        assert!(error_message("alice@").contains("must contain a '.'"));
        assert!(error_message("alice@example").contains("must contain a '.'"));
        for empty_label in [
            "alice@example..com",
            "alice@.example.com",
            "alice@example.com.",
        ] {
            assert!(error_message(empty_label).contains("empty label"));
        }
        for spaced in [
            "al ice@example.com",
            "alice@exam\u{7}ple.com",
            "alice\t@example.com",
            "alice@exa\u{a0}mple.com",
        ] {
            assert!(error_message(spaced).contains("whitespace or control"));
        }
    }

    #[test]
    fn length_limits_are_inclusive() {
        let longest_local = format!("{}@example.com", "a".repeat(64));
        assert!(normalize_email(&longest_local).is_ok());
        let too_long_local = format!("{}@example.com", "a".repeat(65));
        assert!(error_message(&too_long_local).contains("64 bytes"));

        // 64 + 1 + 185 + 4 = 254 bytes.
        let longest = format!("{}@{}.com", "a".repeat(64), "b".repeat(185));
        assert_eq!(longest.len(), 254);
        assert!(normalize_email(&longest).is_ok());
        let too_long = format!("{}@{}.com", "a".repeat(64), "b".repeat(186));
        assert!(error_message(&too_long).contains("254 bytes"));
    }

    #[test]
    fn messages_do_not_echo_the_input() {
        let message = error_message("secret-name@nowhere");
        assert!(!message.contains("secret-name"));
    }

    #[test]
    fn identity_drops_tags_on_any_domain() {
        assert_eq!(
            identity_of_email("alice+promo@example.com"),
            "alice@example.com"
        );
        assert_eq!(
            identity_of_email("alice+a+b@example.com"),
            "alice@example.com"
        );
        // Dots matter outside Gmail.
        assert_eq!(
            identity_of_email("a.lice@example.com"),
            "a.lice@example.com"
        );
        // Nothing before the tag: the address is its own identity.
        assert_eq!(identity_of_email("+tag@example.com"), "+tag@example.com");
    }

    #[test]
    fn identity_folds_gmail_addresses() {
        assert_eq!(identity_of_email("a.l.ice+x@gmail.com"), "alice@gmail.com");
        assert_eq!(identity_of_email("alice@googlemail.com"), "alice@gmail.com");
        assert_eq!(
            identity_of_email("a.lice+y@googlemail.com"),
            identity_of_email("alice@gmail.com")
        );
        // Only Gmail itself, not look-alikes or subdomains.
        assert_eq!(
            identity_of_email("a.lice@mail.gmail.com"),
            "a.lice@mail.gmail.com"
        );
        assert_eq!(identity_of_email("..@gmail.com"), "..@gmail.com");
    }

    #[test]
    fn masking_keeps_the_ends_of_the_local_part() {
        assert_eq!(mask_email("alice@example.com"), "a***e@example.com");
        assert_eq!(mask_email("bob@example.com"), "b***b@example.com");
        assert_eq!(mask_email("al@example.com"), "a***@example.com");
        assert_eq!(mask_email("a@example.com"), "a***@example.com");
        assert_eq!(mask_email("élodie@example.fr"), "é***e@example.fr");
        assert_eq!(mask_email("not-an-address"), "***");
    }
}
