//! Error kinds shared by every layer. The HTTP layer maps a kind to a status
//! code; the `code` is the stable, machine-readable part a client may match on.

use std::borrow::Cow;

/// What went wrong, in the terms a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input is malformed or violates a rule (4xx, usually 400).
    Invalid,
    /// No credentials, or credentials that are not valid (401).
    Unauthorized,
    /// Valid credentials without the needed scope (403).
    Forbidden,
    /// The thing does not exist (404).
    NotFound,
    /// The request conflicts with current state (409).
    Conflict,
    /// A limit or quota stops the request (429 or a domain answer).
    LimitExceeded,
    /// A dependency such as the store is unreachable; retry later (503).
    Unavailable,
    /// A bug or an unexpected failure (500); details are logged, not returned.
    Internal,
}

/// A domain error: a kind, a stable snake_case code and a human message that
/// is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DomainError {
    pub kind: ErrorKind,
    pub code: Cow<'static, str>,
    pub message: String,
}

impl DomainError {
    pub fn new(
        kind: ErrorKind,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            code: code.into(),
            message: message.into(),
        }
    }

    pub fn invalid(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, code, message)
    }

    pub fn not_found(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, code, message)
    }
}
