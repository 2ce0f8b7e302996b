//! Flywheel's domain: plain types and functions with no I/O.
//!
//! Everything here is deterministic given its inputs (time comes in through
//! [`clock::Clock`], randomness through an `RngCore`), so the server and the
//! SDKs share it and it is unit-tested without a database or a network.

pub mod activation;
pub mod billing;
pub mod clock;
pub mod enrichment;
pub mod error;
pub mod events;
pub mod flags;
pub mod growth;
pub mod identity;
pub mod keys;
pub mod privacy;
pub mod project;
pub mod prompts;
pub mod schemas;
pub mod snapshot;
pub mod wire_time;

pub use error::{DomainError, ErrorKind};
